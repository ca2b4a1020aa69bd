"""ResNet-18 for 28×28 MedMNIST images (docs/method.md §7) as a Flax module.

Input ``(B, H, W, in_channels)`` float32 channel-last (28×28 for MedMNIST; any size
works, the pool is global), output logits ``(B, num_classes)``.

==========  ======  ==============================================================  =======
part        stage   layers (names as in torchvision's ``resnet18``)                  28×28
==========  ======  ==============================================================  =======
stem        stem    ``conv1`` 3×3 s1 p1 (in→64, no bias), ``bn1``, ReLU; no max-pool   28
``layer1``  stage0  2 BasicBlocks at 64, stride 1                                      28
``layer2``  stage1  2 BasicBlocks at 128, first stride 2                               14
``layer3``  stage2  2 BasicBlocks at 256, first stride 2                                7
``layer4``  stage3  2 BasicBlocks at 512, first stride 2                                4
head        head    global average pool, ``fc`` Dense 512→num_classes (with bias)
==========  ======  ==============================================================  =======

BasicBlock ``layerS_B``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3×3
convs padded 1 (PyTorch padding, not Flax ``"SAME"``, which pads stride-2 convs
asymmetrically), no conv biases, and ``shortcut = downsample_1(downsample_0(x))`` (1×1
conv with the block's stride + BN) where the shape changes, identity otherwise. Flax
names map to PyTorch ones by ``_`` → ``.`` (``layer2_0/downsample_0`` ↔
``layer2.0.downsample.0``); kernels are ``(kh, kw, in, out)`` (PyTorch ``(out, in, kh,
kw)``), BN ``scale``/``bias``/``mean``/``var`` ↔ ``weight``/``bias``/``running_mean``/
``running_var``.

Parameter count (``"params"`` only; BN running statistics live in ``"batch_stats"`` and
are not parameters, as in PyTorch's ``parameters()``): convs have no bias, each BN has a
scale and a bias, the head has a bias:

    n_params = 11,167,104 + 576 · in_channels + 513 · num_classes

so BreastMNIST (1 channel, 2 classes) has exactly 11,168,706 (docs/method.md §7), and the
CIFAR-style 3-channel, 10-class network the well-known 11,173,962.

Initialisation (field ``init_mode``, ``init=`` in ``get_model("resnet18", ...)``):

* structured (``"dct"``, ``"hadamard"``, ``"hartley"``, ``"sinusoidal"``, ``"mixed"``,
  which takes the basis from ``di.MIXED_SCHEDULE`` by stage, or ``"mixed_as_released"``,
  the released code's rule on module names: ``layer1`` Hadamard, ``layer2`` Hartley, the
  rest DCT, see ``di.released_mixed_basis``): every conv kernel from the
  separable 2-D rule with per-filter rescaling to std ``1/sqrt(3 fan_in)``
  (``di.conv2d_kernel``), the second conv of every BasicBlock times 0.01 (fixup; not the
  shortcut conv), the head ``B[:out, :in]`` with per-row rescaling
  (``di.dense_kernel_per_row``) and a zero bias. Deterministic: no rng is used.
* ``"he_normal"`` (the seeded baseline, torchvision style): every conv ``N(0, 2/fan_in)``
  (docs/method.md §3: fan_in, gain √2; torchvision itself uses fan_out), no fixup; the head
  keeps PyTorch's ``nn.Linear`` default, as torchvision's ``resnet18`` does: kernel
  ``U(±1/sqrt(512))`` (``kaiming_uniform(a=√5)``) and bias ``U(±1/sqrt(512))``. Needs the
  ``"params"`` rng of ``model.init``.

BN: scale 1, bias 0, PyTorch semantics (:class:`detjax.models.layers.BatchNorm`: momentum
0.1 in PyTorch terms = 0.9 here, eps 1e-5, unbiased running variance), statistics in
``"batch_stats"``. Convs and the head run at ``Precision.HIGHEST`` (no TF32).

Usage::

    model = ResNet18(num_classes=2, in_channels=1, init_mode="dct")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import detjax.initializers as di
from detjax.models import layers as L

__all__ = [
    "ResNet18", "BasicBlock", "INITS", "STAGE_WIDTHS", "STAGE_DEPTHS", "STAGE_STRIDES", "NUM_PARAMS",
    "param_count",
]  # fmt: skip

INITS = di.MIXED_INITS + tuple(di.BASES) + ("he_normal",)  # models.inits_for("resnet18")
STEM_WIDTH = 64
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_DEPTHS = (2, 2, 2, 2)
STAGE_STRIDES = (1, 2, 2, 2)
FIXUP_SCALE = di.FIXUP_SCALE

NUM_PARAMS = 11_168_706  # BreastMNIST head: in_channels=1, num_classes=2 (docs/method.md §7)


def param_count(in_channels: int, num_classes: int) -> int:
    """Number of ``"params"`` entries: ``11,167,104 + 576 in_channels + 513 num_classes``.

    576 = 3·3·64 stem weights per input channel; 513 = 512 head weights + 1 bias per class.
    """
    return 11_167_104 + 576 * in_channels + 513 * num_classes


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"ResNet18: unknown init {init!r}; expected one of {INITS}")


def _conv(
    features: int, kernel: int, stride: int, *, stage: str, init: str, variant: str, name: str, scale: float = 1.0,
    released_name: str | None = None,
) -> nn.Conv:
    """Bias-free ``kernel×kernel`` conv with PyTorch padding ``(kernel-1)/2``.

    ``released_name``: the module name in the released code (picks the basis of
    ``"mixed_as_released"``; torchvision-style ``layerN`` names, 1-based).
    """
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        precision=L.PRECISION,
        kernel_init=di.kernel_init(init, stage, scale=scale, variant=variant, released_name=released_name),
        name=name,
    )


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; conv2's init × 0.01 (fixup).

    Attributes:
      features: output channels.
      strides: stride of ``conv1`` and of the shortcut conv.
      stage: the explicit stage (``"stage0"`` … ``"stage3"``) that picks the basis.
      init_mode, variant: as for :class:`ResNet18`.
    """

    features: int
    strides: int
    stage: str
    init_mode: str = "dct"
    variant: str = "reference"
    released_prefix: str | None = None  # e.g. "layer2.0", the block's name in the released code

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(stage=self.stage, init=self.init_mode, variant=self.variant)
        released = lambda name: self.released_prefix and f"{self.released_prefix}.{name}"  # noqa: E731
        bn = lambda name: L.BatchNorm(name=name)  # noqa: E731
        y = _conv(self.features, 3, self.strides, name="conv1", released_name=released("conv1"), **kw)(x)
        y = nn.relu(bn("bn1")(y, use_running_average=not train, mask=mask))
        y = _conv(self.features, 3, 1, name="conv2", scale=FIXUP_SCALE, released_name=released("conv2"), **kw)(y)
        y = bn("bn2")(y, use_running_average=not train, mask=mask)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.strides, name="downsample_0", released_name=released("shortcut"),
                      **kw)(x)
            x = bn("downsample_1")(x, use_running_average=not train, mask=mask)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18 for 28×28 MedMNIST (docs/method.md §7); see the module docstring.

    Attributes:
      num_classes: logits (2 for BreastMNIST; the label count for multi-label ChestMNIST).
      in_channels: input channels (1 grayscale, 3 RGB); checked against the input.
      init_mode: ``"dct"`` (default), ``"hadamard"``, ``"hartley"``, ``"sinusoidal"``,
        ``"mixed"`` or ``"he_normal"`` (seeded baseline). Called ``init`` in the paper and in
        :func:`detjax.models.get_model` (``get_model("resnet18", init="dct", ...)``); a Flax
        field named ``init`` would shadow ``Module.init``, hence the name.
      variant: ``"reference"`` (the original's matrices) or ``"orthonormal"``.
      width: stem and first-stage channels; stages use ``width·(1, 2, 4, 8)``. 64 is
        the paper's ResNet-18; smaller widths (e.g. 16, about 1/16 of the FLOPs) are for
        reduced CPU studies and must be reported as such.

    ``__call__(x, train=False, mask=None)``: in training BN uses batch statistics and updates
    the running ones (call with ``mutable=["batch_stats"]``); ``mask`` (``bool[B]``) limits
    the statistics to the real samples of a padded batch.
    """

    num_classes: int
    in_channels: int
    init_mode: str = "dct"
    variant: str = "reference"
    width: int = STEM_WIDTH

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        _check_init(self.init_mode)
        if self.width < 1:
            raise ValueError(f"ResNet18 width must be a positive channel count, got {self.width}")
        if getattr(x, "ndim", None) != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet18 expects a channel-last batch (B, H, W, {self.in_channels}), "
                f"got shape {getattr(x, 'shape', None)}"
            )
        x = jnp.asarray(x, jnp.float32)
        kw = dict(init=self.init_mode, variant=self.variant)

        x = _conv(self.width, 3, 1, stage="stem", name="conv1", **kw)(x)
        x = nn.relu(L.BatchNorm(name="bn1")(x, use_running_average=not train, mask=mask))
        self.sow("intermediates", "stem", x)

        for s, (base_width, depth, stride) in enumerate(zip(STAGE_WIDTHS, STAGE_DEPTHS, STAGE_STRIDES)):
            width = self.width * base_width // STEM_WIDTH
            for b in range(depth):
                stage, strides = f"stage{s}", stride if b == 0 else 1
                block = BasicBlock(width, strides, stage, self.init_mode, self.variant,
                                   released_prefix=f"layer{s + 1}.{b}", name=f"layer{s + 1}_{b}")
                x = block(x, train, mask)
            self.sow("intermediates", f"stage{s}", x)

        pooled = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pooled", pooled)
        in_features = pooled.shape[-1]
        if self.init_mode == "he_normal":  # torchvision keeps nn.Linear's default init
            kernel_init = di.kernel_init("kaiming", "head")
            bias_init = di.bias_init("kaiming", in_features)
        else:
            kernel_init = di.kernel_init(self.init_mode, "head", variant=self.variant, per_filter=True)
            bias_init = di.bias_init(self.init_mode, in_features)
        return nn.Dense(
            self.num_classes, precision=L.PRECISION, kernel_init=kernel_init, bias_init=bias_init, name="fc"
        )(pooled)
