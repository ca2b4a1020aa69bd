"""The ECG baseline CNN of the paper (exactly 1,653,772 parameters) as a Flax module.

Input ``(B, T, leads)`` channel-last, output logits ``(B, num_classes)``. Lengths for
``T = 1000``: stem conv 500, max-pool 250, stage0 250, stage1 125, stage2 63.

=============  ======  =====================================================  =========
part           stage   layers                                                 params
=============  ======  =====================================================  =========
``stem``       stem    Conv(12→64,k5,s2) BN ReLU MaxPool(3,2,1)                   4,032
``stages.0``   stage0  3 res blocks at 64                                        62,016
``stages.1``   stage1  Conv(64→128,k5,s2) BN ReLU, 4 res blocks at 128          370,560
``stages.2``   stage2  Conv(128→256,k5,s2) BN ReLU, 3 res blocks at 256       1,149,952
``head``       head    concat(mean, max over time) = 512, Dropout .5,            67,212
                       Dense 512→128, ReLU, Dropout .25, Dense 128→12
=============  ======  =====================================================  =========

Residual block: ``x + ReLU(BN(Conv_k5(x)))``. All convs have biases (the count requires
them) and are padded ``(k-1)/2``. BatchNorm follows PyTorch (:class:`layers.BatchNorm`:
momentum 0.1 in PyTorch terms, eps 1e-5, unbiased running variance) with statistics in
``"batch_stats"``.

Fixup: the released code multiplies by 0.01 only the modules named ``conv3`` (the last 1×1
conv of the Conformer's bottleneck blocks). The baseline has no such conv, so no fixup
applies here.

Determinism: max-pool is :func:`layers.max_pool1d` (max over strided slices, no
``select_and_scatter`` in the gradient); dropout uses the ``"dropout"`` rng, which the
trainer derives from ``fold_in(key, step)``.

Intermediates sown under ``"intermediates"``: ``stem_conv``, ``stem_pool`` (after the
max-pool), ``stage0`` … ``stage2`` and ``pooled`` (512).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from detjax.models import layers as L

__all__ = ["ECGBaselineCNN", "ResBlock", "STAGE_WIDTHS", "STAGE_DEPTHS", "NUM_PARAMS"]

STEM_WIDTH = 64
STAGE_WIDTHS = (64, 128, 256)
STAGE_DEPTHS = (3, 4, 3)
HIDDEN = 128
KERNEL = 5

NUM_PARAMS = 1_653_772


def _conv_bn(x, features, *, stage, stride, train, mask, init_mode, variant, released_name):
    """``Conv(k5, stride) → BN`` as submodules ``conv`` and ``bn`` of the calling module."""
    x = L.conv1d(
        x, features, KERNEL, stride=stride, stage=stage, init_mode=init_mode, variant=variant, name="conv",
        released_name=released_name,
    )
    return L.BatchNorm(name="bn")(x, use_running_average=not train, mask=mask)


class ConvBN(nn.Module):
    """``ReLU(BN(Conv_k5(x)))`` with a stride: the stem and the stage transitions."""

    features: int
    stage: str
    stride: int = 1
    init_mode: str = "mixed"
    variant: str = "reference"
    released_name: str | None = None  # the conv's name in the released code (mixed_as_released)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(stage=self.stage, stride=self.stride, init_mode=self.init_mode, variant=self.variant,
                  released_name=self.released_name)
        return nn.relu(_conv_bn(x, self.features, train=train, mask=mask, **kw))


class ResBlock(nn.Module):
    """``x + ReLU(BN(Conv_k5(x)))`` at constant width."""

    stage: str
    init_mode: str = "mixed"
    variant: str = "reference"
    released_name: str | None = None  # the conv's name in the released code (mixed_as_released)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(stage=self.stage, stride=1, init_mode=self.init_mode, variant=self.variant,
                  released_name=self.released_name)
        return x + nn.relu(_conv_bn(x, x.shape[-1], train=train, mask=mask, **kw))


class ECGBaselineCNN(nn.Module):
    """ECG baseline CNN of the paper; see the module docstring.

    Attributes:
      num_classes: number of logits (12).
      in_leads: number of input leads (12).
      init_mode: ``"mixed"``, ``"mixed_as_released"`` (64-channel stage Hadamard, 128-channel
        stage Hartley, everything else DCT), a basis name or ``"kaiming"``.
      variant: ``"reference"`` or ``"orthonormal"``.
      feature_dropout: dropout rate on the pooled 512 features (0.5).
      hidden_dropout: dropout rate on the 128 hidden units (0.25).

    ``__call__(x, train=False, mask=None)``: in training, BN uses batch statistics (call with
    ``mutable=["batch_stats"]``; ``mask``, ``bool[B]``, limits them to the real samples of a
    padded batch) and dropout needs ``rngs={"dropout": key}``.
    """

    num_classes: int = 12
    in_leads: int = 12
    init_mode: str = "mixed"
    variant: str = "reference"
    feature_dropout: float = 0.5
    hidden_dropout: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        L.check_init_mode(self.init_mode, "ECGBaselineCNN")
        x = L.check_ecg_input(x, self.in_leads, "ECGBaselineCNN")
        kw = dict(init_mode=self.init_mode, variant=self.variant)

        # released_name: the module names of the released code, 1-based stages ("stage1" is
        # our stage0) and "downN" transitions; they pick the bases of "mixed_as_released".
        x = ConvBN(STEM_WIDTH, "stem", stride=2, name="stem", released_name="stem.0", **kw)(x, train, mask)
        self.sow("intermediates", "stem_conv", x)
        x = L.max_pool1d(x, 3, 2, 1)
        self.sow("intermediates", "stem_pool", x)

        for s, (width, depth) in enumerate(zip(STAGE_WIDTHS, STAGE_DEPTHS)):
            stage = f"stage{s}"
            first = 0
            if width != x.shape[-1]:  # transition conv, stride 2, is module 0 of the stage
                x = ConvBN(width, stage, stride=2, name=f"stages_{s}_0", released_name=f"down{s}.0",
                           **kw)(x, train, mask)
                first = 1
            for b in range(depth):
                x = ResBlock(stage, name=f"stages_{s}_{first + b}", released_name=f"stage{s + 1}.{b}.conv",
                             **kw)(x, train, mask)
            self.sow("intermediates", stage, x)

        pooled = jnp.concatenate([jnp.mean(x, axis=1), jnp.max(x, axis=1)], axis=-1)
        self.sow("intermediates", "pooled", pooled)
        # PyTorch head = Sequential(Dropout, Linear, ReLU, Dropout, Linear): indices 1 and 4.
        h = nn.Dropout(self.feature_dropout, deterministic=not train)(pooled)
        h = nn.relu(L.dense(h, HIDDEN, stage="head", name="head_1", released_name="head.1", **kw))
        h = nn.Dropout(self.hidden_dropout, deterministic=not train)(h)
        return L.dense(h, self.num_classes, stage="head", name="head_4", released_name="head.4", **kw)
