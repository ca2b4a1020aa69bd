"""Deterministic MedMNIST augmentation: random crop with padding and horizontal flip.

The randomness of sample ``i`` at epoch ``e`` comes from its own key

    k(i, e) = fold_in(fold_in(key(seed), e), i)          (threefry2x32, pinned)
    (dy, dx) = randint(fold_in(k, 0), (2,), 0, 2p + 1)   crop offsets, uniform on 0..2p
    flip     = bernoulli(fold_in(k, 1), 0.5)             horizontal flip

and nothing else, so a sample gets the same crop and flip at a given epoch whatever
batch it lands in, its position there, or the batch size. The image is padded by ``p``
pixels on each side with ``fill``, the ``H×W`` window at ``(dy, dx)`` is cut with
``jax.lax.dynamic_slice`` and then mirrored along the width when ``flip``. This is
torchvision's ``RandomCrop(H, padding=p)`` followed by ``RandomHorizontalFlip(0.5)``,
with the random draws replaced by the keyed ones above.

``i`` must be the sample's index in the training set (not its position in the batch).

Fill value: torchvision pads the ``uint8`` image with 0 (black) *before* ``ToTensor`` and
``Normalize(0.5, 0.5)``. These functions act on images already normalised by
:func:`detjax.data.medmnist.preprocess`, where black is ``(0/255 - 0.5)/0.5 = -1``; the
default ``fill=-1.0`` therefore reproduces torchvision's zero padding. Pass ``fill=0.0``
for images that are not normalised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["PAD", "BLACK", "sample_key", "augment_params", "apply_augment", "augment_batch"]

PAD = 2
BLACK = -1.0  # preprocess(0): the normalised value of torchvision's zero padding
_PRNG_IMPL = "threefry2x32"  # pinned, so a global jax_default_prng_impl cannot change the draws


def sample_key(seed: jax.Array | int, epoch: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """Typed key of one sample at one epoch: ``fold_in(fold_in(key(seed), epoch), index)``."""
    key = jax.random.key(seed, impl=_PRNG_IMPL)
    return jax.random.fold_in(jax.random.fold_in(key, epoch), index)


def _one_sample_params(key: jax.Array, pad: int) -> tuple[jax.Array, jax.Array]:
    offsets = jax.random.randint(jax.random.fold_in(key, 0), (2,), 0, 2 * pad + 1, dtype=jnp.int32)
    flip = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5)
    return offsets, flip


@functools.partial(jax.jit, static_argnames=("pad",))
def augment_params(
    indices: jax.Array, epoch: jax.Array | int, seed: jax.Array | int, *, pad: int = PAD
) -> tuple[jax.Array, jax.Array]:
    """Crop offsets ``int32 (B, 2)`` as ``(dy, dx)`` in ``0..2·pad`` and flips ``bool (B,)``."""
    keys = jax.vmap(sample_key, in_axes=(None, None, 0))(seed, epoch, jnp.asarray(indices))
    return jax.vmap(_one_sample_params, in_axes=(0, None))(keys, pad)


def _crop_flip(image: jax.Array, offset: jax.Array, flip: jax.Array, pad: int, fill: jax.Array) -> jax.Array:
    h, w, c = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
    window = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, window[:, ::-1, :], window)


@functools.partial(jax.jit, static_argnames=("pad",))
def apply_augment(
    images: jax.Array, offsets: jax.Array, flips: jax.Array, *, pad: int = PAD, fill: float = BLACK
) -> jax.Array:
    """Pad by ``pad`` with ``fill``, crop ``H×W`` at ``offsets[b] = (dy, dx)``, mirror where ``flips[b]``.

    ``out[b, y, x] = P_b[y + dy_b, x' + dx_b]`` with ``P_b`` the padded image and
    ``x' = W-1-x`` if ``flips[b]`` else ``x``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):  # fill=-1 would wrap around in uint8
        raise ValueError(f"images must be float (normalised by preprocess), got dtype {images.dtype}")
    fill = jnp.asarray(fill, images.dtype)
    return jax.vmap(_crop_flip, in_axes=(0, 0, 0, None, None))(images, offsets, flips, pad, fill)


@functools.partial(jax.jit, static_argnames=("pad",))
def augment_batch(
    images: jax.Array,
    indices: jax.Array,
    epoch: jax.Array | int,
    seed: jax.Array | int,
    *,
    pad: int = PAD,
    fill: float = BLACK,
) -> jax.Array:
    """Randomly crop (padding ``pad``) and horizontally flip a batch, deterministically.

    Args:
      images: float ``(B, H, W, C)``, normalised as by ``preprocess``.
      indices: int ``(B,)`` training-set indices of the samples.
      epoch, seed: integers (traced: changing them does not recompile).
      pad: padding on each side (static); offsets are uniform on ``0..2·pad``.
      fill: padding value; default -1.0, torchvision's black pixel after normalisation.

    Returns:
      the augmented batch, same shape and dtype as ``images``.
    """
    indices = jnp.asarray(indices)
    if indices.shape != images.shape[:1]:
        raise ValueError(
            f"indices must have shape ({images.shape[0]},) to match images {images.shape}, got {indices.shape}"
        )
    offsets, flips = augment_params(indices, epoch, seed, pad=pad)
    return apply_augment(images, offsets, flips, pad=pad, fill=fill)
