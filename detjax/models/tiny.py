"""A small ECG-shaped model for tests, smoke runs and the CPU bitwise check.

Conv(k5, s2) → GELU → Conv(k5) → GELU → LayerNorm → mean‖max over time → Dense. It uses the
same initializer entry point as the full models (``di.kernel_init`` by stage), the same
input layout ``(B, T, leads)`` and sows an auxiliary loss, so every path of the training
engine is exercised in seconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

import detjax.initializers as di


class TinyECG(nn.Module):
    num_classes: int = 12
    init_mode: str = "mixed"
    variant: str = "reference"
    width: int = 16
    dropout: float = 0.1
    in_leads: int | None = None  # checked against the input when given (the ECG recipes pass it)

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        del mask  # nothing is computed across samples
        if self.in_leads is not None and x.shape[-1] != self.in_leads:
            raise ValueError(f"TinyECG expects (B, T, {self.in_leads}), got shape {x.shape}")
        def conv(features, stride, stage, fan_in, scale=1.0):
            return nn.Conv(features, (5,), strides=(stride,), padding=[(2, 2)],
                           kernel_init=di.kernel_init(self.init_mode, stage, scale=scale, variant=self.variant),
                           bias_init=di.bias_init(self.init_mode, fan_in))

        h = nn.gelu(conv(self.width, 2, "stem", x.shape[-1] * 5)(x), approximate=False)
        h = h + nn.gelu(conv(self.width, 1, "stage0", self.width * 5, scale=0.01)(h), approximate=False)
        h = nn.LayerNorm(epsilon=1e-5)(h)
        pooled = jnp.concatenate([h.mean(axis=1), h.max(axis=1)], axis=-1)
        pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_classes, kernel_init=di.kernel_init(self.init_mode, "head", variant=self.variant),
                          bias_init=di.bias_init(self.init_mode, pooled.shape[-1]))(pooled)
        self.sow("losses", "logit_l2", 1e-4 * jnp.mean(logits ** 2, axis=-1))  # per sample
        return logits
