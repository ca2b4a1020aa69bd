"""Deterministic building blocks shared by the ECG models.

Every op here has a forward AND a backward pass that XLA lowers without atomics or
``select_and_scatter`` (docs/method.md §6), so gradients are bit-reproducible on GPU:

* :func:`adaptive_avg_pool1d` is a matmul with a constant ``(out, in)`` averaging matrix
  (PyTorch's bins), so its gradient is the transposed matmul;
* :func:`max_pool1d` is a max over ``k`` stacked strided slices (gradient: a select and
  pads), never ``reduce_window``;
* :func:`avg_pool1d` is a sum of ``k`` strided slices;
* :class:`BatchNorm` follows PyTorch's ``BatchNorm1d`` semantics exactly (unbiased running
  variance), so exported statistics mean the same thing in both frameworks; given a batch
  ``mask`` it takes its statistics from the real samples only (:func:`masked_mean`), so a
  padded last batch normalises exactly as the unpadded one would.

Layout is channel-last: ``(B, T, C)``. Convolutions and dense layers take their kernel and
bias initialisers from :mod:`detjax.initializers` (``di.kernel_init`` / ``di.bias_init``)
with an explicit ``stage``, so the mixed-basis assignment is visible per layer.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import detjax.initializers as di

__all__ = [
    "PRECISION",
    "LN_EPSILON",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "FIXUP_SCALE",
    "gelu",
    "torch_padding",
    "conv_output_length",
    "conv1d",
    "dense",
    "layer_norm",
    "adaptive_avg_pool_bins",
    "adaptive_avg_pool_matrix",
    "adaptive_avg_pool1d",
    "max_pool1d",
    "avg_pool1d",
    "BatchNorm",
    "masked_mean",
    "check_ecg_input",
    "check_init_mode",
    "ECG_INIT_MODES",
]

# TF32 off (docs/method.md §6): every contraction is requested at full float32 precision,
# whatever the global ``jax_default_matmul_precision`` says.
PRECISION = jax.lax.Precision.HIGHEST
LN_EPSILON = 1e-5  # PyTorch LayerNorm default
BN_EPSILON = 1e-5  # PyTorch BatchNorm default
BN_MOMENTUM = 0.9  # Flax convention; equals PyTorch momentum=0.1
FIXUP_SCALE = di.FIXUP_SCALE  # 0.01 on the last 1x1 conv of the CNN residual blocks


def gelu(x: jax.Array) -> jax.Array:
    r"""Exact GELU, :math:`x \Phi(x) = \tfrac{x}{2}(1 + \operatorname{erf}(x/\sqrt2))`."""
    return jax.nn.gelu(x, approximate=False)


def torch_padding(kernel_size: int) -> int:
    """PyTorch-style symmetric padding ``(k - 1) / 2`` for an odd kernel size ``k``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    return (kernel_size - 1) // 2


def conv_output_length(length: int, kernel_size: int, stride: int = 1, padding: int | None = None) -> int:
    r"""Output length of a conv/pool: :math:`\lfloor (L + 2p - k) / s \rfloor + 1`.

    ``padding=None`` means :func:`torch_padding`. With ``k=5, p=2, s=2`` this gives
    1000 → 500, 250 → 125, 125 → 63, 63 → 32.
    """
    pad = torch_padding(kernel_size) if padding is None else padding
    out = (length + 2 * pad - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(
            f"input length {length} too short for kernel {kernel_size}, stride {stride}, padding {pad}"
        )
    return out


def conv1d(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    stage: str,
    init_mode: str,
    variant: str,
    name: str,
    stride: int = 1,
    groups: int = 1,
    scale: float = 1.0,
    released_name: str | None = None,
) -> jax.Array:
    """A 1-D convolution (with bias) padded ``(k-1)/2`` like PyTorch, applied to ``x``.

    Must be called inside a ``@nn.compact`` method: it creates the submodule ``name`` of
    the calling module. Kernel ``(k, in/groups, features)``; ``fan_in = in/groups * k``
    (the bias init needs it for the Kaiming baseline). ``scale`` is the fixup factor;
    ``released_name`` is the layer's module name in the released PyTorch code (it picks the
    basis for ``init_mode="mixed_as_released"``, see ``di.released_mixed_basis``).
    """
    in_ch = x.shape[-1]
    if in_ch % groups:
        raise ValueError(f"conv {name!r}: {in_ch} input channels not divisible by groups={groups}")
    pad = torch_padding(kernel_size)
    fan_in = in_ch // groups * kernel_size
    return nn.Conv(
        features,
        kernel_size=(kernel_size,),
        strides=(stride,),
        padding=[(pad, pad)],
        feature_group_count=groups,
        use_bias=True,
        precision=PRECISION,
        kernel_init=di.kernel_init(init_mode, stage, scale=scale, variant=variant,
                                   released_name=released_name),
        bias_init=di.bias_init(init_mode, fan_in),
        name=name,
    )(x)


def dense(
    x: jax.Array,
    features: int,
    *,
    stage: str,
    init_mode: str,
    variant: str,
    name: str,
    scale: float = 1.0,
    kernel_init=None,
    bias_init=None,
    released_name: str | None = None,
) -> jax.Array:
    """A dense layer (with bias) on the last axis; kernel ``(in, out)``, ``fan_in = in``.

    ``kernel_init`` / ``bias_init`` override the stage rule (used by the ETF heads);
    ``released_name`` as for :func:`conv1d`.
    Must be called inside a ``@nn.compact`` method.
    """
    in_features = x.shape[-1]
    return nn.Dense(
        features,
        use_bias=True,
        precision=PRECISION,
        kernel_init=kernel_init or di.kernel_init(init_mode, stage, scale=scale, variant=variant,
                                                  released_name=released_name),
        bias_init=bias_init or di.bias_init(init_mode, in_features),
        name=name,
    )(x)


def layer_norm(x: jax.Array, *, name: str) -> jax.Array:
    r"""PyTorch ``LayerNorm`` over the channel axis: eps 1e-5, scale 1, bias 0.

    The variance is the two-pass :math:`\operatorname{mean}((x-\mu)^2)`, not
    :math:`E[x^2]-\mu^2` (Flax's fast default), which cancels badly.
    """
    return nn.LayerNorm(epsilon=LN_EPSILON, use_fast_variance=False, name=name)(x)


# ---------------------------------------------------------------------------- pooling
def adaptive_avg_pool_bins(in_len: int, out_len: int) -> list[tuple[int, int]]:
    r"""PyTorch's adaptive pooling bins :math:`[\lfloor iL/o \rfloor, \lceil (i+1)L/o \rceil)`.

    Bins overlap when ``o`` does not divide ``L`` (125 → 63: bin 31 is ``[61, 64)``, bin
    32 is ``[63, 66)``).
    """
    if not (isinstance(in_len, (int, np.integer)) and isinstance(out_len, (int, np.integer))):
        raise ValueError(f"adaptive pool lengths must be integers, got in={in_len!r}, out={out_len!r}")
    if in_len < 1 or out_len < 1:
        raise ValueError(f"adaptive pool lengths must be positive, got in={in_len}, out={out_len}")
    # Integer arithmetic: floor(i*L/o) and ceil((i+1)*L/o) without float rounding.
    return [((i * in_len) // out_len, -((-(i + 1) * in_len) // out_len)) for i in range(out_len)]


def adaptive_avg_pool_matrix(in_len: int, out_len: int) -> np.ndarray:
    r"""Constant ``(out_len, in_len)`` float32 matrix ``A`` with ``A[i, j] = 1/|bin_i|`` on bin ``i``.

    ``y = A x`` (over time) is PyTorch's ``adaptive_avg_pool1d``; its gradient
    :math:`A^\top g` is a plain matmul (no atomics).
    """
    a = np.zeros((out_len, in_len), np.float64)
    for i, (start, end) in enumerate(adaptive_avg_pool_bins(in_len, out_len)):
        a[i, start:end] = 1.0 / (end - start)
    return a.astype(np.float32)


def adaptive_avg_pool1d(x: jax.Array, out_len: int) -> jax.Array:
    """Adaptive average pooling over time of ``x`` ``(B, L, C)`` → ``(B, out_len, C)``."""
    if x.ndim != 3:
        raise ValueError(f"adaptive_avg_pool1d expects (B, L, C), got shape {x.shape}")
    a = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], out_len), dtype=x.dtype)
    return jnp.einsum("ol,blc->boc", a, x, precision=PRECISION)


def _strided_windows(
    x: jax.Array, window: int, stride: int, padding: int, pad_value: float
) -> list[jax.Array]:
    """The ``window`` strided slices ``xp[:, j::stride][:out_len]`` of the padded input.

    Slice ``j`` holds tap ``j`` of every output window; their transposes are pads, so
    any elementwise combination of them differentiates without scatters.
    """
    if x.ndim != 3:
        raise ValueError(f"pooling expects (B, L, C), got shape {x.shape}")
    if padding > window // 2:
        raise ValueError(f"padding {padding} must be at most half the window {window} (as in PyTorch)")
    out_len = conv_output_length(x.shape[1], window, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (0, 0)), constant_values=pad_value)
    limit = stride * (out_len - 1) + 1
    return [jax.lax.slice_in_dim(xp, j, j + limit, stride, axis=1) for j in range(window)]


def max_pool1d(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch ``MaxPool1d(window, stride, padding)`` over time, with a deterministic gradient.

    ``y[t] = max_j xp[t*stride + j]`` on the ``-inf``-padded input. The gradient goes to
    the FIRST maximal tap of each window (PyTorch's and XLA's ``select_and_scatter``
    choice on ties): the first argmax is selected with a mask, and ``max`` over the masked
    stack has exactly one maximiser, so the backward pass is a select, not a scatter.
    """
    taps = jnp.stack(_strided_windows(x, window, stride, padding, -jnp.inf), axis=0)
    first = jnp.argmax(taps, axis=0)  # first index on ties
    chosen = jnp.arange(window).reshape((window,) + (1,) * (taps.ndim - 1)) == first[None]
    return jnp.max(jnp.where(chosen, taps, -jnp.inf), axis=0)


def avg_pool1d(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch ``AvgPool1d(window, stride, padding, count_include_pad=True)`` over time.

    ``y[t] = (sum_j xp[t*stride + j]) / window`` on the zero-padded input: padded zeros
    count in the denominator. Summed tap by tap, left to right.
    """
    taps = _strided_windows(x, window, stride, padding, 0.0)
    total = taps[0]
    for tap in taps[1:]:
        total = total + tap
    return total / window


# ------------------------------------------------------------------------- batch norm
def masked_mean(values: jax.Array, mask: jax.Array | None = None, axis=None) -> jax.Array:
    r"""Mean of ``values`` over ``axis`` (all axes by default) that counts only real samples.

    ``mask`` is ``bool[B]`` over the leading (sample) axis of ``values``; with
    :math:`m_b \in \{0, 1\}` and the reduced entries :math:`v_{b,j}` of sample :math:`b`,

    .. math:: \bar v = \frac{\sum_b m_b \sum_j v_{b,j}}{\sum_b m_b \sum_j 1}.

    Padded samples (:math:`m_b = 0`) are selected away (``jnp.mean(..., where=)``), so they add
    nothing to the value or to its gradient, whatever they hold. Without ``mask``: ``jnp.mean``.
    """
    if mask is None:
        return jnp.mean(values, axis=axis)
    where = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)
    return jnp.mean(values, axis=axis, where=where)


class BatchNorm(nn.Module):
    r"""PyTorch ``BatchNorm1d`` on channel-last input, statistics over all but the last axis.

    Training: :math:`y = (x - \mu_B)/\sqrt{\sigma^2_B + \epsilon}\,\gamma + \beta` with the
    biased batch variance; running statistics are updated as
    ``m * running + (1 - m) * batch`` with the UNBIASED variance
    :math:`\sigma^2_B \cdot n/(n-1)`, exactly as PyTorch does (Flax's ``BatchNorm`` stores the
    biased one). With ``mask`` (``bool[B]``, the real samples of a padded batch) the batch
    statistics and ``n`` count the real samples only (:func:`masked_mean`). Evaluation uses the
    running statistics. Parameters ``scale`` (1) and ``bias`` (0); statistics ``mean`` (0) and
    ``var`` (1) in ``"batch_stats"``. Statistics are not updated during ``init``.
    """

    use_running_average: bool | None = None
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        if use_ra:
            mean, var = ra_mean.value, ra_var.value
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                raise ValueError(
                    f"BatchNorm needs more than one value per channel in training, got input shape {x.shape}"
                )
            mean = masked_mean(x, mask, axes)
            var = masked_mean(jnp.square(x - mean), mask, axes)
            if not self.is_initializing():
                if mask is not None:  # the real values per channel; a single one keeps var (0) as is
                    n = jnp.sum(mask, dtype=jnp.float32) * (n // x.shape[0])
                    n = jnp.maximum(n, 2.0)
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * (var * (n / (n - 1)))
        return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


# Inits of the ECG models: a structured basis (or one of the two mixed schedules) or
# PyTorch's default.
ECG_INIT_MODES = di.MIXED_INITS + tuple(di.BASES) + ("kaiming",)


def check_init_mode(init_mode: str, model: str) -> None:
    """Raise ``ValueError`` naming ``init_mode`` unless it is one of :data:`ECG_INIT_MODES`."""
    if init_mode not in ECG_INIT_MODES:
        raise ValueError(f"{model}: unknown init {init_mode!r}; expected one of {ECG_INIT_MODES}")


def check_ecg_input(x: jax.Array, in_leads: int, model: str) -> jax.Array:
    """Validate a channel-last ECG batch ``(B, T, in_leads)`` and return it as float32."""
    if getattr(x, "ndim", None) != 3 or x.shape[-1] != in_leads:
        raise ValueError(
            f"{model} expects a channel-last batch (B, T, {in_leads}), got shape {getattr(x, 'shape', None)}"
        )
    return jnp.asarray(x, jnp.float32)
