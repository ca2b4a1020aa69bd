"""Canonical hashing: stability (golden digests), sensitivity, order independence."""

import hashlib
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax import hashing


def golden_tree():
    return {
        "params": {
            "dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
                      "bias": np.zeros(3, np.float32)},
            "conv": {"kernel": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2)},
        },
        "step": np.int32(42),
        "flags": np.array([True, False]),
    }


# Pinned once: these digests must never change for this tree on any platform, or hashes
# recorded in old manifests stop being comparable.
GOLDEN_SHA256 = "2bedde126946b64bd196d0bb641ef17a17494ece10a99c60b5a85bf4153ac880"
GOLDEN_MD5 = "ce5ca614a6487f816ca6129464e99162"


def test_golden_digest_is_stable():
    digests = hashing.tree_digests(golden_tree())
    assert digests == {"sha256": GOLDEN_SHA256, "md5": GOLDEN_MD5}


def test_canonical_bytes_layout():
    data = hashing.canonical_bytes({"b": np.array([1.0], np.float32), "a": np.int32(3)})
    expected = (hashing.MAGIC
                + b"a\t<i4\t()\t4\n" + np.int32(3).tobytes()
                + b"b\t<f4\t(1,)\t4\n" + np.float32(1.0).tobytes())
    assert data == expected
    assert hashing.tree_sha256({"b": np.array([1.0], np.float32), "a": np.int32(3)}) == \
        hashlib.sha256(expected).hexdigest()


def test_jax_and_numpy_leaves_hash_the_same():
    tree = golden_tree()
    as_jax = jax.tree_util.tree_map(jnp.asarray, tree)
    assert hashing.tree_sha256(as_jax) == hashing.tree_sha256(tree)


def test_insertion_order_does_not_matter():
    a = {"x": np.ones(2, np.float32), "y": np.zeros(2, np.float32)}
    b = {"y": np.zeros(2, np.float32), "x": np.ones(2, np.float32)}
    assert hashing.tree_sha256(a) == hashing.tree_sha256(b)


def test_big_endian_input_hashes_like_little_endian():
    le = np.arange(5, dtype="<f4")
    be = le.astype(">f4")
    assert hashing.tree_sha256({"w": be}) == hashing.tree_sha256({"w": le})


@pytest.mark.parametrize("bit", [0, 7, 31, 100, 383])
def test_one_flipped_bit_changes_the_digest(bit):
    tree = golden_tree()
    before = hashing.tree_digests(tree)
    kernel = tree["params"]["dense"]["kernel"]
    raw = kernel.view(np.uint8).reshape(-1).copy()
    byte = bit // 8 % raw.size
    raw[byte] ^= np.uint8(1 << (bit % 8))
    tree["params"]["dense"]["kernel"] = raw.view(np.float32).reshape(kernel.shape)
    after = hashing.tree_digests(tree)
    assert after["sha256"] != before["sha256"] and after["md5"] != before["md5"]
    diff = hashing.first_difference(golden_tree(), tree)
    assert diff["path"] == "params/dense/kernel" and diff["reason"] == "values"
    assert diff["n_different"] == 1 and diff["first_index"] == byte // 4


def test_shape_and_dtype_are_part_of_the_hash():
    x = np.arange(6, dtype=np.float32)
    assert hashing.tree_sha256({"w": x}) != hashing.tree_sha256({"w": x.reshape(2, 3)})
    assert hashing.tree_sha256({"w": x}) != hashing.tree_sha256({"w": x.view(np.int32)})
    assert hashing.first_difference({"w": x}, {"w": x.reshape(2, 3)})["reason"] == "shape"
    assert hashing.first_difference({"w": x}, {"w": x.view(np.int32)})["reason"] == "dtype"
    assert hashing.first_difference({"w": x}, {"v": x}) == {"path": "v", "reason": "missing", "in": "b"}
    assert hashing.first_difference({"w": x}, {"w": x.copy()}) is None


def test_prng_keys_hash_through_key_data():
    key = jax.random.key(3)
    assert hashing.tree_sha256({"k": key}) == hashing.tree_sha256({"k": jax.random.key_data(key)})
    assert hashing.tree_sha256({"k": key}) != hashing.tree_sha256({"k": jax.random.key(4)})


def test_ordered_digests_follow_the_given_order_and_raw_mode_matches_plain_md5():
    w = np.arange(4, dtype=np.float32).reshape(2, 2)
    b = np.ones(2, np.float32)
    first = hashing.ordered_digests(OrderedDict([("w", w), ("b", b)]))
    second = hashing.ordered_digests([("b", b), ("w", w)])
    assert first != second
    raw = hashing.ordered_digests([("w", w), ("b", b)], headers=False)
    assert raw["md5"] == hashlib.md5(w.tobytes() + b.tobytes()).hexdigest()
    # A transposed layout is a different serialisation.
    assert hashing.ordered_digests([("w", w.T)], headers=False) != \
        hashing.ordered_digests([("w", w)], headers=False)


def test_leaf_digests_locate_the_changed_leaf():
    tree = golden_tree()
    before = hashing.leaf_digests(tree)
    tree["params"]["conv"]["kernel"] = tree["params"]["conv"]["kernel"] + 1
    after = hashing.leaf_digests(tree)
    assert [p for p in before if before[p] != after[p]] == ["params/conv/kernel"]


def test_ambiguous_paths_are_refused():
    with pytest.raises(ValueError, match="key path"):
        hashing.tree_sha256({"a": {"0": np.zeros(1)}, "a/0": np.zeros(1)})


def test_object_leaves_are_refused():
    with pytest.raises(ValueError, match="object"):
        hashing.tree_sha256({"a": np.array([None])})
