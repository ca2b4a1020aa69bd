"""PyTorch interop with the released modules, and bit-exactness against their digests.

``tests/data/reference_init_digests.json`` is a compact copy of the per-tensor SHA-256 of the
initial parameters of the released PyTorch code of arXiv 2603.28040 (``ECGRepNetConformer(
base_ch=40, etf_init=True)``, ``BaselineCNN()``, ``ResNet18MedMNIST(2, 1)``): names, shapes
(PyTorch layout) and registration order per arch, one digest list per (arch, init) config.

* ``naming="reference"`` of :mod:`detjax.models.export` reproduces those names, shapes and
  that order (the BatchNorm buffers, which the file does not list, right after each BN's
  parameters), and ``from_torch_state_dict`` inverts it bit for bit.
* Conformer and Baseline × {dct, hadamard, hartley, sinusoidal, mixed_as_released}: every
  tensor except the Conformer's ``heads.*.weight`` has the reference digest (float32,
  little-endian, C order, PyTorch layout). The heads are not a target: the released ETF
  comes from an SVD whose orientation depends on the BLAS path; detjax's closed-form
  (Helmert) ETF is tested for the properties that define a simplex ETF instead.
* ResNet-18 (2 classes, 1 channel) × 4 bases: the BatchNorm tensors, ``fc.bias`` and some
  kernels match; the kernels in :data:`RESNET18_DIFFERENT` do not, and the set is pinned
  so that a change either way shows. Those digests hash values that are exactly zero in
  exact arithmetic as the float64 rounding noise (~1e-17) of one particular evaluation,
  which float32 keeps: filters whose std is below 1e-10 (the DC filters) are left with
  their centring residue instead of becoming zero, and entries where a basis value is
  exactly 0 (e.g. cos(pi/2)) carry that evaluation's residue; ``conv2``'s fixup × 0.01 is
  applied after rounding to float32 (two roundings), whereas the Conformer digests round
  the fixed-up ``conv3`` once. detjax computes exact zeros there and rounds once.
  (With those three effects the Hadamard digests are reproduced tensor for tensor.)

Models are initialised eagerly (no jit: the structured kernels are numpy-built, and a
short input keeps the forward pass cheap), once per config for the whole module.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detjax.initializers as di
from detjax.hashing import ordered_digests
from detjax.models import get_model
from detjax.models.export import NAMINGS, from_torch_state_dict, to_torch_state_dict, torch_layout

DATA = Path(__file__).parent / "data" / "reference_init_digests.json"
INITS = ("dct", "hadamard", "hartley", "sinusoidal", "mixed_as_released")
CONFIGS = [f"{arch}_{init}" for arch in ("conformer", "baseline") for init in INITS] + [
    f"resnet18_{basis}" for basis in di.BASES
]
MODEL_KWARGS = {"conformer": {}, "baseline": {}, "resnet18": {"num_classes": 2, "in_channels": 1}}
INPUTS = {"conformer": (1, 64, 12), "baseline": (1, 64, 12), "resnet18": (1, 28, 28, 1)}
NUM_CLASSES = {"conformer": 12, "baseline": 12, "resnet18": 2}

# ResNet-18 kernels whose reference digest differs from detjax (see the module docstring).
_RESNET18_3X3 = frozenset(
    ["conv1.weight"] + [f"layer{s}.{b}.conv{c}.weight" for s in range(1, 5) for b in range(2) for c in (1, 2)]
)
_RESNET18_CONV2 = frozenset(n for n in _RESNET18_3X3 if n.endswith("conv2.weight"))
_SHORTCUTS = frozenset(f"layer{s}.0.shortcut.0.weight" for s in (2, 3, 4))
RESNET18_DIFFERENT = {
    "dct": _RESNET18_3X3 | {"layer3.0.shortcut.0.weight", "fc.weight"},
    "hadamard": _RESNET18_CONV2 | {"layer2.1.conv1.weight", "layer3.0.conv1.weight", "layer4.1.conv1.weight",
                                   "layer3.0.shortcut.0.weight", "fc.weight"},
    "hartley": (_RESNET18_3X3 - {"conv1.weight"}) | _SHORTCUTS | {"fc.weight"},
    "sinusoidal": _RESNET18_3X3,
}  # fmt: skip


@functools.cache
def _reference() -> dict:
    return json.loads(DATA.read_text())


def _layout(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(shape)) for name, shape in _reference()["layouts"][arch]]


@functools.cache
def _variables(arch: str, init: str) -> dict:
    """Initial ``params`` (and ``batch_stats``) of ``get_model(arch, init=init)`` (default
    fixup), as numpy; sown collections such as the Conformer's ``losses`` are dropped."""
    model = get_model(arch, init=init, **MODEL_KWARGS[arch])
    variables = model.init(jax.random.key(0), jnp.zeros(INPUTS[arch], jnp.float32))
    return {k: jax.tree.map(np.asarray, variables[k]) for k in ("params", "batch_stats") if k in variables}


def _random_like(variables: dict, seed: int) -> dict:
    """Distinct random values for every leaf: a swap of two equal-shaped tensors shows."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32), variables)


def _sha256(value: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(value, dtype="<f4").tobytes()).hexdigest()


def _is_head_weight(name: str) -> bool:
    return name.startswith("heads.") and name.endswith(".weight")


# -------------------------------------------------------------------- the fixture itself
def test_reference_fixture_is_complete():
    ref = _reference()
    assert "released PyTorch" in ref["about"] and "2603.28040" in ref["about"]
    assert sorted(ref["configs"]) == sorted(CONFIGS)
    for name, cfg in ref["configs"].items():
        assert name == f"{cfg['arch']}_{name.split('_', 1)[1]}"
        assert len(cfg["sha256"]) == len(ref["layouts"][cfg["arch"]])
        assert all(len(d) == 64 and int(d, 16) >= 0 for d in cfg["sha256"])
    for arch, rows in ref["layouts"].items():
        names = [n for n, _ in rows]
        assert len(set(names)) == len(names), arch
    # the released "mixed" never fires on the Conformer's module names: all DCT
    assert ref["configs"]["conformer_mixed_as_released"]["sha256"] == ref["configs"]["conformer_dct"]["sha256"]


# -------------------------------------------------------------------- names, shapes, order
@pytest.mark.parametrize("arch", ["conformer", "baseline", "resnet18"])
def test_reference_naming_names_shapes_order(arch):
    init = "dct"
    sd = to_torch_state_dict(arch, _variables(arch, init), naming="reference")
    params = [(n, v.shape) for n, v in sd.items() if not n.endswith((".running_mean", ".running_var"))]
    assert params == _layout(arch)
    assert torch_layout(arch, NUM_CLASSES[arch], naming="reference", buffers=False) == [n for n, _ in _layout(arch)]
    assert torch_layout(arch, NUM_CLASSES[arch], naming="reference") == list(sd)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    # BatchNorm buffers as the released module's state_dict() has them: right after the
    # BN's weight and bias (num_batches_tracked only on request, after running_var)
    names = list(sd)
    buffers = [i for i, n in enumerate(names) if n.endswith(".running_mean")]
    assert len(buffers) == {"conformer": 0, "baseline": 13, "resnet18": 20}[arch]
    for i in buffers:
        bn = names[i].rsplit(".", 1)[0]
        assert names[i - 2 : i + 2] == [f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"]
    with_count = to_torch_state_dict(arch, _variables(arch, init), naming="reference", num_batches_tracked=0)
    assert len(with_count) == len(sd) + len(buffers)
    for i in buffers:
        bn = names[i].rsplit(".", 1)[0]
        keys = list(with_count)
        j = keys.index(f"{bn}.running_var")
        assert keys[j + 1] == f"{bn}.num_batches_tracked" and with_count[keys[j + 1]].dtype == np.int64
    # a digest over the parameters in this order is the released code's parameter digest
    ordered = [(n, sd[n]) for n, _ in _layout(arch)]
    raw = hashlib.md5(b"".join(v.tobytes() for _, v in ordered)).hexdigest()
    assert ordered_digests(ordered, headers=False)["md5"] == raw


# the same arrays under both namings, for a few names that differ (random values)
NAME_PAIRS = {
    "conformer": [
        ("stages.0.0.norm.weight", "stages.0.0.ln.ln.weight"),
        ("stages.2.22.norm.bias", "stages.2.22.ln.ln.bias"),
        ("down.weight", "conformer_downsample.0.weight"),
        ("blocks.0.ffn1.norm.weight", "conformer_blocks.0.ff1_norm.weight"),
        ("blocks.1.ffn1.fc1.weight", "conformer_blocks.1.ff1.0.weight"),
        ("blocks.1.ffn2.fc2.bias", "conformer_blocks.1.ff2.2.bias"),
        ("blocks.2.attn.norm.bias", "conformer_blocks.2.attn_norm.bias"),
        ("blocks.2.attn.qkv.weight", "conformer_blocks.2.attn.qkv.weight"),
        ("blocks.2.attn.proj.weight", "conformer_blocks.2.attn.out_proj.weight"),
        ("blocks.0.conv.norm.weight", "conformer_blocks.0.conv_norm.weight"),
        ("blocks.0.conv.dw.weight", "conformer_blocks.0.conv.0.weight"),
        ("blocks.0.conv.pw.weight", "conformer_blocks.0.conv.2.weight"),
        ("blocks.2.norm.weight", "conformer_blocks.2.final_norm.weight"),
        ("bottleneck.weight", "bn_linear.weight"),
        ("heads.11.weight", "heads.11.weight"),
    ],
    "baseline": [
        ("stem.conv.weight", "stem.0.weight"),
        ("stem.bn.running_var", "stem.1.running_var"),
        ("stages.0.2.conv.weight", "stage1.2.conv.weight"),
        ("stages.1.0.conv.weight", "down1.0.weight"),
        ("stages.1.0.bn.running_mean", "down1.1.running_mean"),
        ("stages.1.1.conv.weight", "stage2.0.conv.weight"),
        ("stages.1.4.bn.bias", "stage2.3.bn.bias"),
        ("stages.2.0.bn.weight", "down2.1.weight"),
        ("stages.2.3.conv.bias", "stage3.2.conv.bias"),
        ("head.4.weight", "head.4.weight"),
    ],
    "resnet18": [
        ("layer3.0.downsample.0.weight", "layer3.0.shortcut.0.weight"),
        ("layer3.0.downsample.1.running_var", "layer3.0.shortcut.1.running_var"),
        ("layer4.1.conv2.weight", "layer4.1.conv2.weight"),
        ("fc.weight", "fc.weight"),
    ],
}


@pytest.mark.parametrize("arch", ["conformer", "baseline", "resnet18"])
def test_reference_naming_round_trip_is_bit_exact(arch):
    variables = _random_like(_variables(arch, "dct"), seed=len(arch))
    ours = to_torch_state_dict(arch, variables)
    ref = to_torch_state_dict(arch, variables, naming="reference")
    # one array per entry under either naming: the same bytes, only names and order differ
    assert sorted(v.tobytes() for v in ours.values()) == sorted(v.tobytes() for v in ref.values())
    for detjax_name, reference_name in NAME_PAIRS[arch]:
        assert np.array_equal(ours[detjax_name], ref[reference_name]), (detjax_name, reference_name)
    # variables -> reference state dict -> variables, bit for bit (params and batch_stats)
    back = from_torch_state_dict(arch, ref, naming="reference")
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    flat_back = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        assert flat_back[path].dtype == np.float32 and flat_back[path].tobytes() == value.tobytes(), path
    # the released module's own state_dict() (with num_batches_tracked) loads the same way
    released = to_torch_state_dict(arch, variables, naming="reference", num_batches_tracked=7)
    again = from_torch_state_dict(arch, released, naming="reference")
    same = jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), again, back)
    assert jax.tree.structure(again) == jax.tree.structure(back) and all(jax.tree.leaves(same))


def test_naming_is_checked():
    variables = _variables("baseline", "dct")
    for call in (
        lambda: to_torch_state_dict("baseline", variables, naming="torch"),
        lambda: from_torch_state_dict("baseline", {}, naming="Reference"),
        lambda: torch_layout("baseline", naming=None),
    ):
        with pytest.raises(ValueError, match=r"unknown PyTorch naming .*'detjax', 'reference'"):
            call()
    assert NAMINGS == ("detjax", "reference")
    assert list(to_torch_state_dict("baseline", variables)) == torch_layout("baseline")  # default: detjax
    # a state dict in one naming read with the other: the error says which naming it is
    ref = to_torch_state_dict("baseline", variables, naming="reference")
    with pytest.raises(ValueError, match=r"'stem\.conv\.weight' is missing.*pass naming='reference'"):
        from_torch_state_dict("baseline", ref)
    ours = to_torch_state_dict("baseline", variables)
    with pytest.raises(ValueError, match=r"'stem\.0\.weight' is missing.*pass naming='detjax'"):
        from_torch_state_dict("baseline", ours, naming="reference")
    del ref["down2.1.running_var"]
    with pytest.raises(ValueError, match=r"'down2\.1\.running_var' is missing \(naming='reference'\)$"):
        from_torch_state_dict("baseline", ref, naming="reference")


# ----------------------------------------------------------------- bit-exact initial values
@pytest.mark.parametrize("config", CONFIGS)
def test_initial_parameters_match_reference_digests(config):
    arch, init = config.split("_", 1)
    cfg = _reference()["configs"][config]
    sd = to_torch_state_dict(arch, _variables(arch, init), naming="reference")
    different = []
    for (name, shape), digest in zip(_layout(arch), cfg["sha256"], strict=True):
        value = sd[name]
        assert value.shape == shape and value.dtype == np.float32, name
        if not _is_head_weight(name) and _sha256(value) != digest:
            different.append(name)
    if arch == "resnet18":  # only kernels differ, exactly the pinned ones
        assert set(different) == RESNET18_DIFFERENT[init]
        assert all(len(shape) == 4 or name == "fc.weight" for name, shape in _layout(arch) if name in different)
    else:
        assert different == []
    compared = [n for n, _ in _layout(arch) if not _is_head_weight(n)]
    assert len(compared) == {"conformer": 340, "baseline": 56, "resnet18": 62}[arch]


# ------------------------------------------------------------------------ the ETF heads
def test_conformer_heads_are_the_closed_form_simplex_etf():
    """Not compared with the released heads (an SVD's orientation): the properties instead.

    The 12 heads are vertices 0..11 of a 13-vertex simplex ETF in R^14: unit norm, pairwise
    cosine -1/12, the 13 vertices sum to zero, the two padding coordinates exactly zero, and
    bias 0. Any two such frames have the same Gram matrix, so the released heads equal these
    up to an orthogonal map of R^14 (which is not applied to ``bn_linear``, so the networks
    are not the same function).
    """
    sd = to_torch_state_dict("conformer", _variables("conformer", "dct"), naming="reference")
    heads = np.concatenate([sd[f"heads.{k}.weight"] for k in range(12)])  # (12, 14), PyTorch (out, in)
    assert heads.shape == (12, 14) and heads.dtype == np.float32
    frame = di.simplex_etf(13, 14)
    assert heads.tobytes() == frame[:12].astype(np.float32).tobytes()
    assert np.all(heads[:, 12:] == 0)
    h = heads.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, atol=1e-7)
    gram = h @ h.T
    np.testing.assert_allclose(gram[~np.eye(12, dtype=bool)], -1 / 12, atol=1e-7)
    np.testing.assert_allclose(h.sum(axis=0) + frame[12], 0.0, atol=1e-6)  # with the 13th vertex
    assert all(np.all(sd[f"heads.{k}.bias"] == 0) for k in range(12))
    # the same heads for every structured init (they do not depend on the basis)
    for init in INITS[1:]:
        other = to_torch_state_dict("conformer", _variables("conformer", init), naming="reference")
        assert all(np.array_equal(other[f"heads.{k}.weight"], sd[f"heads.{k}.weight"]) for k in range(12))
