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
* ResNet-18 (2 classes, 1 channel) × 4 bases: the BatchNorm tensors, ``fc.bias`` and the
  other kernels match; the kernels in :data:`RESNET18_DIFFERENT` do not, and the set is
  pinned so that a change either way shows: DCT all 17 3×3 kernels,
  ``layer3.0.shortcut.0`` and ``fc``; Hadamard the 8 ``conv2``, ``layer2.1``/``layer3.0``/
  ``layer4.1.conv1``, ``layer3.0.shortcut.0`` and ``fc``; Hartley the 16 block 3×3
  kernels, the 3 shortcuts and ``fc``; sinusoidal all 17 3×3 kernels. Not the layout or
  order: the digest generator evaluated the formulas with three conventions of its own:

  1. a filter with std < 1e-10 (DC⊗DC, Hadamard's constant row ⊗ constant pattern,
     ``fc``'s constant row) is centred with numpy's mean and left unscaled, so its float64
     residue (0 or ~1e-17) survives in float32;
  2. ``conv2``'s fixup is applied after rounding to float32, as a float32 product with
     float32(0.01) (two roundings; the Conformer's ``conv3`` digests are rounded once);
  3. basis entries that are exactly 0 (cos(pi/2), sin(pi)) come from libm ``np.cos``/
     ``np.sin`` as ~1e-16.

  detjax writes the exact zeros and rounds once on purpose: its bytes do not depend on the
  platform (naive libm trigonometry differs in the last bit between CPUs). Reproduced
  here: all 21 Hadamard kernels from detjax's own float64 Hadamard basis with 1 and 2
  (detjax differs only by those exact zeros and by <= 1 ulp on ``conv2``), and the DCT and
  sinusoidal stem ``conv1`` with 3 (and 1).

Models are initialised eagerly (no jit: the structured kernels are numpy-built, and a
short input keeps the forward pass cheap), once per config for the whole module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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


# ---------------------------------------------- ResNet-18: the differences, reproduced
def _generator_rescale(w: np.ndarray, fan_in: int) -> np.ndarray:
    """The digest generator's per-filter rescaling (convention 1), float64: each filter
    centred with numpy's mean and scaled to population std ``1/sqrt(3 fan_in)``; a filter
    with std < 1e-10 is NOT scaled and keeps its centring residue (0 or ~1e-17), where
    :func:`detjax.initializers._rescale_per_filter` (``math.fsum``) writes exact zeros."""
    flat = w.reshape(w.shape[0], -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    std = np.sqrt((centred * centred).mean(axis=1, keepdims=True))
    dead = std[:, 0] < 1e-10
    out = centred / np.where(dead[:, None], 1.0, std) * (1.0 / math.sqrt(3.0 * fan_in))
    out[dead] = centred[dead]
    return out.reshape(w.shape)


def _generator_conv2d(basis, out_ch: int, in_ch: int, kh: int, kw: int) -> np.ndarray:
    """Separable 2-D rule in PyTorch layout ``(out, in, kh, kw)`` from ``basis(n)`` (float64):
    filter ``f`` (cyclic) = channel row ``f // (kh kw)`` ⊗ spatial pattern ``f % (kh kw)``."""
    n_pat = kh * kw
    f = np.arange(out_ch) % (min(in_ch, out_ch) * n_pat)
    chan, pat = np.asarray(basis(in_ch))[f // n_pat], f % n_pat
    spatial = np.asarray(basis(kh))[pat // kw][:, :, None] * np.asarray(basis(kw))[pat % kw][:, None, :]
    return _generator_rescale(chan[:, :, None, None] * spatial[:, None, :, :], in_ch * kh * kw)


def _generator_fixup(w64: np.ndarray) -> np.ndarray:
    """Convention 2: round to float32, then a float32 multiply by float32(0.01) (PyTorch's
    ``weight.data.mul_(0.01)`` on a float32 tensor): two roundings. detjax rounds once."""
    return np.float32(w64) * np.float32(di.FIXUP_SCALE)


def _generator_resnet18(basis) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every ResNet-18 kernel (convs, shortcuts, ``fc.weight``) as the digest generator
    evaluates it: (float64 before the fixup, final float32), PyTorch layout."""
    w64, w32 = {}, {}
    for name, shape in _layout("resnet18"):
        if name == "fc.weight":  # B[:out, :in] of the max(out, in) basis, per-row rescaling
            out_f, in_f = shape
            w64[name] = _generator_rescale(np.asarray(basis(max(shape)))[:out_f, :in_f], in_f)
        elif len(shape) == 4:
            w64[name] = _generator_conv2d(basis, *shape)
        else:
            continue
        w32[name] = _generator_fixup(w64[name]) if name in _RESNET18_CONV2 else np.float32(w64[name])
    return w64, w32


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place (same-sign values)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_resnet18_hadamard_digests_follow_from_detjax_values_under_the_generators_conventions():
    """All 21 ResNet-18 Hadamard kernels, rebuilt from detjax's own float64 Hadamard basis
    with the generator's conventions 1 (DC-filter centring residue kept) and 2 (fixup after
    rounding to float32), have the reference digests; so the pinned differences are those
    two conventions and nothing else (Hadamard entries are +-1/sqrt(n): no trigonometry)."""
    digests = dict(zip([n for n, _ in _layout("resnet18")], _reference()["configs"]["resnet18_hadamard"]["sha256"]))
    w64, rebuilt = _generator_resnet18(lambda n: di.basis("hadamard", n, "reference"))
    kernels = [n for n, shape in _layout("resnet18") if len(shape) == 4 or n == "fc.weight"]
    assert list(rebuilt) == kernels and len(kernels) == 21
    assert [n for n in kernels if _sha256(rebuilt[n]) != digests[n]] == []
    # convention 2 exactly: neither one rounding nor a float64 product of the float32 value
    for other_fixup in (lambda w: np.float32(w * di.FIXUP_SCALE),
                        lambda w: np.float32(np.float64(np.float32(w)) * di.FIXUP_SCALE)):
        assert any(_sha256(other_fixup(w64[n])) != digests[n] for n in _RESNET18_CONV2)
    # detjax differs from the reconstruction only (a) where detjax has the exact 0 of a
    # constant filter and the generator a residue below 1e-12, and (b) by 1 ulp at most
    # on the fixup-scaled conv2 kernels (one rounding instead of two)
    sd = to_torch_state_dict("resnet18", _variables("resnet18", "hadamard"), naming="reference")
    different, residues = set(), set()
    for name in kernels:
        ours, ref = sd[name], rebuilt[name]
        assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32, name
        if ours.tobytes() == ref.tobytes():
            continue
        different.add(name)
        residue = (ours == 0) & (np.abs(ref) < 1e-12)
        if np.any(residue & (ref != 0)):
            residues.add(name)
        ulps = _ulps(ours, ref)[~residue]
        assert ulps.max(initial=0) <= (1 if name in _RESNET18_CONV2 else 0), name
    assert different == RESNET18_DIFFERENT["hadamard"]
    # every non-conv2 difference is a kept residue (convention 1 alone)
    assert different - _RESNET18_CONV2 <= residues
    assert residues == {"layer2.0.conv2.weight", "layer2.1.conv1.weight", "layer2.1.conv2.weight",
                        "layer3.0.conv1.weight", "layer3.0.shortcut.0.weight", "layer4.0.conv2.weight",
                        "layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight"}


def test_resnet18_stem_digests_follow_from_naive_trigonometry():
    """Convention 3 on the stem ``conv1`` (64, 1, 3, 3) of the DCT and sinusoidal ResNets:
    bases from numpy's ``np.cos``/``np.sin`` (cos(pi/2) ~ 6e-17, sin(pi) ~ 1.2e-16 instead
    of 0) give the reference digests; the same bases with those entries set to the exact 0
    do not. detjax's stem differs from the reconstruction only where it has the exact 0.
    (The DCT reconstruction writes the DC coefficient 1/sqrt(n): with sqrt(1/n), which
    differs in the last bit for n = 3, the digest is not reproduced.)"""

    def naive_dct(n):
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        return np.where(i == 0, 1 / np.sqrt(n), np.sqrt(2 / n)) * np.cos(np.pi * i * (2 * j + 1) / (2 * n))

    def naive_sinusoidal(n):
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        return np.sqrt(2 / n) * np.sin(np.pi * (i + 1) * (2 * j + 1) / (2 * n))

    index = [n for n, _ in _layout("resnet18")].index("conv1.weight")
    for name, naive in (("dct", naive_dct), ("sinusoidal", naive_sinusoidal)):
        digest = _reference()["configs"][f"resnet18_{name}"]["sha256"][index]
        rebuilt = np.float32(_generator_conv2d(naive, 64, 1, 3, 3))
        assert _sha256(rebuilt) == digest, name
        exact_zeros = lambda n: np.where(di.basis(name, n) == 0, 0.0, naive(n))  # noqa: E731
        assert _sha256(np.float32(_generator_conv2d(exact_zeros, 64, 1, 3, 3))) != digest, name
        ours = di.conv2d_kernel(name, 3, 3, 1, 64).transpose(3, 2, 0, 1)  # the model's stem, PyTorch layout
        residue = (ours == 0) & (np.abs(rebuilt) < 1e-12)
        assert np.any(residue & (rebuilt != 0)), name
        assert ours[~residue].tobytes() == rebuilt[~residue].tobytes(), name


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
