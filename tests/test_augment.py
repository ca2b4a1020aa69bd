"""Tests of detjax.data.augment: keyed crop + flip, checked against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detjax.data import augment as aug


def _images(n, h=28, w=28, c=1, seed=0):
    return np.random.default_rng(seed).normal(size=(n, h, w, c)).astype(np.float32)


def _reference(images, offsets, flips, pad, fill):
    """Independent numpy construction: np.pad, slice, np.flip."""
    out = []
    for img, (dy, dx), f in zip(images, offsets, flips):
        h, w, _ = img.shape
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
        win = padded[dy : dy + h, dx : dx + w]
        out.append(np.flip(win, axis=1) if f else win)
    return np.stack(out)


def test_apply_augment_matches_numpy_for_every_offset_and_flip():
    pad = aug.PAD
    grid = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)]
    images = _images(len(grid), c=3)
    offsets = np.array([(dy, dx) for dy, dx, _ in grid], np.int32)
    flips = np.array([f for *_, f in grid])
    got = np.asarray(aug.apply_augment(images, offsets, flips))
    np.testing.assert_array_equal(got, _reference(images, offsets, flips, pad, aug.BLACK))


def test_hand_computed_crop_and_flip():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    # offset (0, 0): the window starts in the padding corner (2 rows, 2 cols of fill).
    got = np.asarray(aug.apply_augment(img, np.array([[0, 0]]), np.array([False]), fill=0.0))[0, ..., 0]
    np.testing.assert_array_equal(got, [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 4, 5]])
    # centre offset (2, 2) with flip: the image mirrored left-right.
    got = np.asarray(aug.apply_augment(img, np.array([[2, 2]]), np.array([True])))[0, ..., 0]
    np.testing.assert_array_equal(got, img[0, :, ::-1, 0])


def test_default_fill_is_normalised_black():
    from detjax.data.medmnist import preprocess

    assert aug.BLACK == float(preprocess(np.zeros((1,), np.uint8))[0]) == -1.0
    img = np.ones((1, 6, 6, 1), np.float32)
    got = np.asarray(aug.apply_augment(img, np.array([[4, 4]]), np.array([False])))
    assert (got[0, 4:, :, 0] == -1.0).all() and (got[0, :, 4:, 0] == -1.0).all()
    assert (got[0, :4, :4, 0] == 1.0).all()


def test_same_epoch_and_index_give_same_output_whatever_the_batch():
    images = _images(10)
    a = np.asarray(aug.augment_batch(images[[3, 7]], jnp.array([3, 7]), 5, 42))
    b = np.asarray(aug.augment_batch(images[[7, 3, 9]], jnp.array([7, 3, 9]), 5, 42))
    np.testing.assert_array_equal(a[0], b[1])  # sample 3
    np.testing.assert_array_equal(a[1], b[0])  # sample 7
    again = np.asarray(aug.augment_batch(images[[3, 7]], jnp.array([3, 7]), 5, 42))
    np.testing.assert_array_equal(a, again)


def test_params_are_a_function_of_seed_epoch_index_only():
    idx = np.arange(64, dtype=np.int32)
    off, flip = aug.augment_params(idx, 3, 7)
    off_rev, flip_rev = aug.augment_params(idx[::-1].copy(), 3, 7)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(off_rev)[::-1])
    np.testing.assert_array_equal(np.asarray(flip), np.asarray(flip_rev)[::-1])
    # one-sample batches agree with the big batch
    for i in (0, 17, 63):
        o1, f1 = aug.augment_params(np.array([i], np.int32), 3, 7)
        np.testing.assert_array_equal(np.asarray(o1)[0], np.asarray(off)[i])
        assert bool(f1[0]) == bool(flip[i])
    # and equal the documented key derivation
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(7, impl="threefry2x32"), 3), 17)
    expected = jax.random.randint(jax.random.fold_in(k, 0), (2,), 0, 5, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(off)[17], np.asarray(expected))
    assert bool(flip[17]) == bool(jax.random.bernoulli(jax.random.fold_in(k, 1), 0.5))


def test_epochs_and_seeds_differ():
    idx = np.arange(64, dtype=np.int32)  # same shape as above: no new compile
    off0, flip0 = map(np.asarray, aug.augment_params(idx, 0, 1))
    off1, flip1 = map(np.asarray, aug.augment_params(idx, 1, 1))
    off_s, _ = map(np.asarray, aug.augment_params(idx, 0, 2))
    assert (off0 != off1).any(axis=1).mean() > 0.8  # P(same pair) = 1/25
    assert (off0 != off_s).any(axis=1).mean() > 0.8
    assert 0.3 < (flip0 != flip1).mean() < 0.7
    images = _images(2)
    e0 = np.asarray(aug.augment_batch(images, idx[:2], 0, 1))
    e1 = np.asarray(aug.augment_batch(images, idx[:2], 1, 1))
    assert not np.array_equal(e0, e1)


def test_offsets_uniform_and_flip_balanced():
    n = 20000
    off, flip = map(np.asarray, aug.augment_params(np.arange(n, dtype=np.int32), 0, 0))
    assert off.min() == 0 and off.max() == 2 * aug.PAD
    for axis in (0, 1):
        freq = np.bincount(off[:, axis], minlength=5) / n
        np.testing.assert_allclose(freq, 0.2, atol=0.015)  # 5 sd of a binomial proportion
    assert abs(flip.mean() - 0.5) < 0.02
    # dy and dx independent: the 25 pairs are uniform too
    pairs = np.bincount(off[:, 0] * 5 + off[:, 1], minlength=25) / n
    np.testing.assert_allclose(pairs, 0.04, atol=0.008)


def test_shape_dtype_kept_and_bad_indices_rejected():
    images = _images(3)
    out = aug.augment_batch(images, np.arange(3), 0, 0)
    assert out.shape == images.shape and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"indices must have shape \(3,\)"):
        aug.augment_batch(images, np.arange(2), 0, 0)
    with pytest.raises(ValueError, match="must be float .* got dtype uint8"):
        aug.augment_batch(np.zeros((3, 28, 28, 1), np.uint8), np.arange(3), 0, 0)
