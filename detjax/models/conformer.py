"""The ECG Conformer of the paper (exactly 1,827,634 parameters) as a Flax module.

Input ``(B, T, leads)`` channel-last (PTB-XL: ``T = 1000``), output logits
``(B, num_classes)``. Lengths for ``T = 1000``: stem 1000 → 500 → (avg-pool) 250,
stage0 250, stage1 125, stage2 63, stage3 32.

================  ===========  =====================================================  ==========
part              stage        layers                                                 params
================  ===========  =====================================================  ==========
``stem``          stem         Conv(12→40,k5,s2) GELU, Conv(40→40,k5) GELU,              42,640
                               Conv(40→160,k5) GELU, AvgPool(3,2,1, pads counted)
``stages.s.b``    stage0/1/2   3/4/23 post-norm bottleneck blocks, 21,360 each          640,800
``down``          stage3       Conv(160→160,k5,s2) GELU                                 128,160
``blocks.i``      transformer  3 pre-norm Conformer blocks, 337,120 each              1,011,360
``bottleneck``    head         concat(mean, max over time) → Dense(320→14) GELU           4,494
``heads.k``       head         12 × Dense(14→1), simplex-ETF init                           180
================  ===========  =====================================================  ==========

Bottleneck block (post-norm)::

    branch = Conv1x1(160→40) GELU → Conv(40→40, k5, stride s) GELU → Conv1x1(40→160)·fixup
    skip   = x                          if s == 1
           = adaptive_avg_pool(x, T')  if s == 2   (channels identity, 160 → 160)
    out    = LayerNorm(GELU(branch + skip))

Conformer block (pre-norm; LN = LayerNorm)::

    x += ½ FFN1(LN x)          FFN: Dense(160→320) GELU Dense(320→160)
    x += MHSA(LN x)            qkv Conv1x1(160→480), 4 heads of 40, softmax(qkᵀ/√40) v,
                               out-projection Conv1x1(160→160)
    x += ConvModule(LN x)      depthwise Conv(160, k5) GELU, pointwise Conv1x1(160→160)
    x += ½ FFN2(LN x)
    x  = LN x

The conv module has its own LayerNorm: that is what makes 337,120 parameters per block
(without it the count is 336,800). The fused ``qkv`` output channels are
``[q | k | v]``, each ``C = 160`` wide, with channel ``h * 40 + j`` = head ``h``, dim ``j``
(PyTorch ``qkv.chunk(3, dim=1)`` then ``view(B, 4, 40, T)``).

Fixup: as in the released code, the bottleneck blocks' Conv1x1(40→160) (``conv3``) starts
× 0.01 and nothing else does (the default, ``transformer_fixup=False``). A wider reading,
"the last 1×1 conv of every residual branch", would also scale the Conformer blocks'
attention out-projection (``proj``) and the conv module's pointwise conv (``pw``):
``transformer_fixup=True`` gives it (its bits differ from the release; earlier detjax
versions used it by default). The FFNs end in a Dense layer, never scaled. Kaiming inits
ignore the fixup (the PyTorch baseline has none).

"Mixed" schedules: ``"mixed"`` assigns bases by stage (stem/stage0 DCT, stage1 Hadamard,
stage2 Hartley, the rest DCT). ``"mixed_as_released"`` is what the released code computes:
its stage test on module names never matches the Conformer's names, so every layer is DCT
(the weights equal ``init_mode="dct"``), and the paper's "mixed" Conformer numbers came from
these all-DCT weights.

Head: ``h = GELU(Dense(320→K+2)(concat(mean_t x, max_t x)))`` (K = ``num_classes``); logit
``k = heads.k(h)``, head ``k`` initialised with vertex ``k`` of a closed-form simplex ETF
with K+1 vertices in K+2 dims (``di.etf_head_init``), bias 0; for ``init_mode="kaiming"`` the
heads get PyTorch's default init instead. The auxiliary loss
``0.01 * mean(h[:, K:]**2)`` (the 2 extra bottleneck dims) is sown per sample,
``0.01 * mean(h[b, K:]**2)`` of shape ``(B,)``, as ``("losses", "bottleneck_l2")``; the
train step averages it over the batch's real samples.

Intermediates sown under ``"intermediates"``: ``stem_conv`` (after the first conv),
``stem_pool`` (after the stem's pooling), ``stage0`` … ``stage3``, ``transformer``, ``pooled``
(320) and ``hidden`` (the bottleneck ``h``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import detjax.initializers as di
from detjax.models import layers as L

__all__ = [
    "ECGConformer",
    "BottleneckBlock",
    "ConformerBlock",
    "FeedForward",
    "MultiHeadSelfAttention",
    "ConvModule",
    "STAGE_DEPTHS",
    "NUM_TRANSFORMER_BLOCKS",
    "NUM_PARAMS",
    "BOTTLENECK_BLOCK_PARAMS",
    "CONFORMER_BLOCK_PARAMS",
]

WIDTH = 160  # channels of the stages and the transformer
BOTTLENECK_WIDTH = 40  # inner width of a bottleneck block
STEM_WIDTH = 40
STAGE_DEPTHS = (3, 4, 23)  # bottleneck blocks in stage0, stage1, stage2
STAGE_STRIDES = (1, 2, 2)  # stride of the first block of each stage
NUM_TRANSFORMER_BLOCKS = 3
NUM_HEADS = 4
FFN_WIDTH = 320
KERNEL = 5
AUX_WEIGHT = 0.01  # weight of the bottleneck L2 term (docs/method.md §7)

NUM_PARAMS = 1_827_634
BOTTLENECK_BLOCK_PARAMS = 21_360
CONFORMER_BLOCK_PARAMS = 337_120


class BottleneckBlock(nn.Module):
    """Post-norm bottleneck ``LN(GELU(branch(x) + skip(x)))``; see the module docstring."""

    stage: str
    stride: int = 1
    init_mode: str = "mixed"
    variant: str = "reference"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(stage=self.stage, init_mode=self.init_mode, variant=self.variant)
        channels = x.shape[-1]
        h = L.gelu(L.conv1d(x, BOTTLENECK_WIDTH, 1, name="conv1", **kw))
        h = L.gelu(L.conv1d(h, BOTTLENECK_WIDTH, KERNEL, stride=self.stride, name="conv2", **kw))
        h = L.conv1d(h, channels, 1, scale=L.FIXUP_SCALE, name="conv3", **kw)
        # Down-sampling skip: PyTorch-binned adaptive average pool as a constant matmul.
        skip = x if h.shape[1] == x.shape[1] else L.adaptive_avg_pool1d(x, h.shape[1])
        return L.layer_norm(L.gelu(h + skip), name="norm")


class FeedForward(nn.Module):
    """``Dense(C→2C) GELU Dense(2C→C)`` on ``LN x`` (the ½ is applied by the caller)."""

    init_mode: str = "mixed"
    variant: str = "reference"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(stage="transformer", init_mode=self.init_mode, variant=self.variant)
        h = L.layer_norm(x, name="norm")
        h = L.gelu(L.dense(h, FFN_WIDTH, name="fc1", **kw))
        return L.dense(h, x.shape[-1], name="fc2", **kw)


class MultiHeadSelfAttention(nn.Module):
    r"""Pre-norm MHSA: :math:`\mathrm{proj}(\mathrm{softmax}(q k^\top/\sqrt{d})\,v)` per head.

    ``qkv`` and ``proj`` are 1×1 convs (docs/method.md §3), plain softmax, no masking, no dropout.
    """

    num_heads: int = NUM_HEADS
    init_mode: str = "mixed"
    variant: str = "reference"
    fixup: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(stage="transformer", init_mode=self.init_mode, variant=self.variant)
        b, t, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"attention width {c} not divisible by num_heads={self.num_heads}")
        d = c // self.num_heads
        qkv = L.conv1d(L.layer_norm(x, name="norm"), 3 * c, 1, name="qkv", **kw)
        # [q | k | v] along channels, each split head-major: channel h*d + j.
        q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, t, self.num_heads, d) for i in range(3))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=L.PRECISION) * (1.0 / math.sqrt(d))
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=L.PRECISION).reshape(b, t, c)
        return L.conv1d(out, c, 1, scale=self.fixup, name="proj", **kw)


class ConvModule(nn.Module):
    """``LN → depthwise Conv(C, k5) → GELU → pointwise Conv1x1(C→C)``."""

    init_mode: str = "mixed"
    variant: str = "reference"
    fixup: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(stage="transformer", init_mode=self.init_mode, variant=self.variant)
        c = x.shape[-1]
        h = L.layer_norm(x, name="norm")
        h = L.gelu(L.conv1d(h, c, KERNEL, groups=c, name="dw", **kw))
        return L.conv1d(h, c, 1, scale=self.fixup, name="pw", **kw)


class ConformerBlock(nn.Module):
    """Pre-norm Conformer block (macaron FFNs, MHSA, conv module, final LN)."""

    init_mode: str = "mixed"
    variant: str = "reference"
    fixup: float = L.FIXUP_SCALE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(init_mode=self.init_mode, variant=self.variant)
        x = x + 0.5 * FeedForward(name="ffn1", **kw)(x)
        x = x + MultiHeadSelfAttention(fixup=self.fixup, name="attn", **kw)(x)
        x = x + ConvModule(fixup=self.fixup, name="conv", **kw)(x)
        x = x + 0.5 * FeedForward(name="ffn2", **kw)(x)
        return L.layer_norm(x, name="norm")


def _etf(vertex: int, num_classes: int):
    """Head ``vertex``'s kernel init: simplex ETF, ``K+1`` vertices in ``K+2`` dims."""
    return di.etf_head_init(vertex, num_vertices=num_classes + 1, dim=num_classes + 2)


class ECGConformer(nn.Module):
    """ECG Conformer of the paper; see the module docstring for structure and names.

    Attributes:
      num_classes: number of logits K (12 rhythm labels); the bottleneck has K+2 dims.
      in_leads: number of input leads (12; 6 for the limb-lead models).
      init_mode: ``"mixed"`` (basis by stage, ``di.MIXED_SCHEDULE``), ``"mixed_as_released"``
        (all DCT, as the released code computes it), one basis name
        (``"dct"``, ``"hadamard"``, ``"hartley"``, ``"sinusoidal"``) or ``"kaiming"``
        (PyTorch default init; needs a ``"params"`` rng). Called ``init`` in the paper and
        in :func:`detjax.models.get_model`; a Flax field named ``init`` would shadow
        ``Module.init``, hence the name.
      variant: ``"reference"`` (the original's matrices) or ``"orthonormal"``.
      transformer_fixup: also scale the attention out-projection and the conv module's
        pointwise conv by 0.01 (not the release's behaviour; see the module docstring).

    ``__call__(x, train=False, mask=None)``: ``x`` is ``(B, T, in_leads)``; returns
    ``(B, num_classes)``. ``train`` and ``mask`` are accepted for a uniform model signature;
    the Conformer has no dropout or batch statistics (every sample is computed on its own),
    so they change nothing.
    """

    # 262 keyed tensors in 33 shapes: with a keyed init, drawing them apart from the init
    # program (di.init_variables) compiles about 3x faster; for models with few tensors per
    # shape it does not pay (docs/RESULTS.md, benchmarks/bench_model_init.py).
    draw_keyed_apart: ClassVar[bool] = True

    num_classes: int = 12
    in_leads: int = 12
    init_mode: str = "mixed"
    variant: str = "reference"
    transformer_fixup: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        del train, mask  # no train-time behaviour, nothing computed across samples
        L.check_init_mode(self.init_mode, "ECGConformer")
        x = L.check_ecg_input(x, self.in_leads, "ECGConformer")
        kw = dict(init_mode=self.init_mode, variant=self.variant)

        # Stem (PyTorch Sequential indices 0, 2, 4 are the convs).
        x = L.gelu(L.conv1d(x, STEM_WIDTH, KERNEL, stride=2, stage="stem", name="stem_0", **kw))
        self.sow("intermediates", "stem_conv", x)
        x = L.gelu(L.conv1d(x, STEM_WIDTH, KERNEL, stage="stem", name="stem_2", **kw))
        x = L.gelu(L.conv1d(x, WIDTH, KERNEL, stage="stem", name="stem_4", **kw))
        x = L.avg_pool1d(x, 3, 2, 1)
        self.sow("intermediates", "stem_pool", x)

        for s, (depth, stride) in enumerate(zip(STAGE_DEPTHS, STAGE_STRIDES)):
            for b in range(depth):
                x = BottleneckBlock(
                    stage=f"stage{s}", stride=stride if b == 0 else 1, name=f"stages_{s}_{b}", **kw
                )(x)
            self.sow("intermediates", f"stage{s}", x)

        x = L.gelu(L.conv1d(x, WIDTH, KERNEL, stride=2, stage="stage3", name="down", **kw))
        self.sow("intermediates", "stage3", x)

        fixup = L.FIXUP_SCALE if self.transformer_fixup else 1.0
        for i in range(NUM_TRANSFORMER_BLOCKS):
            x = ConformerBlock(fixup=fixup, name=f"blocks_{i}", **kw)(x)
        self.sow("intermediates", "transformer", x)

        pooled = jnp.concatenate([jnp.mean(x, axis=1), jnp.max(x, axis=1)], axis=-1)
        self.sow("intermediates", "pooled", pooled)
        k = self.num_classes
        h = L.gelu(L.dense(pooled, k + 2, stage="head", name="bottleneck", **kw))
        self.sow("intermediates", "hidden", h)
        self.sow("losses", "bottleneck_l2", AUX_WEIGHT * jnp.mean(h[:, k:] ** 2, axis=-1))

        # K separate heads (separate parameter sets, as in PyTorch's ModuleList).
        logits = [
            L.dense(
                h,
                1,
                stage="head",
                name=f"heads_{j}",
                kernel_init=None if self.init_mode == "kaiming" else _etf(j, k),
                **kw,
            )
            for j in range(k)
        ]
        return jnp.concatenate(logits, axis=-1)
