#!/usr/bin/env python
"""Train-step throughput: detjax (deterministic JAX/XLA) vs the same models in PyTorch.

For each model (ECG Conformer and baseline CNN on PTB-XL-shaped batches of 1000 × 12 with 12
labels; ResNet-18 on 28×28×1 with 2 classes, the BreastMNIST head), the same train step is
timed on both sides: the same batch (``--batch``, synthetic, from ``numpy`` seed 0, as in
``bench_train_step.py``), the same initial weights (detjax's, exported with
:func:`detjax.models.export.to_torch_state_dict` and loaded into the PyTorch module), the
same loss and optimiser as the task's recipe (:mod:`detjax.recipes`):

* ``conformer``, ``baseline`` (``recipes.ptbxl``): class-weighted BCE on logits clamped to
  ±50, Adam 1e-3 (β 0.9/0.999, ε 1e-8, no weight decay); the Conformer adds its sown
  auxiliary loss ``0.01 · mean(h[:, K:]²)`` on both sides; the baseline's dropout is on.
* ``resnet18`` (``recipes.medmnist``, BreastMNIST): softmax cross-entropy, SGD 0.1 with
  momentum 0.9 and weight decay 5e-4 added to the gradient (``torch.optim.SGD``'s rule).

The learning rate is the recipe's base rate, held constant during the timing (the cosine is
stepped per epoch; all steps here lie in epoch 0). No augmentation on either side.

Every measurement runs in a fresh process pinned to the same ``--threads`` cores: detjax
after ``detjax.determinism.configure(cpu_threads=N)`` (plus ``--xla-flags``, appended to
``XLA_FLAGS`` first, to compare levers; the persistent compilation cache is off so the
compile time is real), PyTorch (eager, CPU) after ``torch.set_num_threads(N)`` and
``torch.use_deterministic_algorithms(True)`` (which by default also NaN-fills every
uninitialised tensor; ``--torch-no-fill`` turns that off; ``--torch-sdpa`` runs the
Conformer's attention with ``F.scaled_dot_product_attention`` instead of detjax's einsums:
two PyTorch levers). Per model the two workers alternate for
``--rounds`` rounds; each runs ``--warmup`` untimed steps (detjax's first one is the
compile step, timed separately) and then times ``--steps`` steps one by one. A round's
throughput is ``batch / median step time``; the table shows the median over rounds.
``compile`` is the wall time of detjax's first step (trace, lower, XLA compile, run);
``init`` that of ``create_train_state`` (its jitted init included). GFLOP/s uses the FLOPs
of XLA's cost analysis of the compiled step.

Before timing, each model is checked once in a fresh process (``--no-check`` skips it;
``--check`` does only that): the PyTorch module must have detjax's trainable-parameter count
(BatchNorm running statistics excluded on both sides) and exactly the state-dict names and
shapes :func:`~detjax.models.export.to_torch_state_dict` gives; with detjax's weights
loaded, the float32 eval-mode and train-mode logits (train mode: batch statistics, dropout
rate 0), the loss and the updated BatchNorm statistics must agree with detjax's to 1e-4, and
the gradients computed in float64 on both sides to 1e-6 (relative). Any mismatch stops the
benchmark with an ``AssertionError`` naming it. Float32 gradients are reported only (see
:func:`check_model`).

Output: a markdown table, then per model the lines ``speedup <model> <detjax samples/s ÷
torch samples/s>``, ``compile <model> <seconds>`` and ``init <model> <seconds>``.

Needs PyTorch: ``pip install -e ".[bench]"`` (torch 2.13.0; the numbers here are its CPU build).

    python benchmarks/bench_vs_torch.py                                  # all three, batch 128, 2 threads
    python benchmarks/bench_vs_torch.py --models conformer --steps 20 --rounds 3
    python benchmarks/bench_vs_torch.py --models baseline --xla-flags "--xla_cpu_use_thunk_runtime=false"
    python benchmarks/bench_vs_torch.py --models conformer --torch-sdpa --torch-no-fill
    python benchmarks/bench_vs_torch.py --check                          # architecture checks only
    python benchmarks/bench_vs_torch.py --threads 1 --json runs/bench_vs_torch.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODELS = ("conformer", "baseline", "resnet18")
# Input shape (channel-last, as detjax takes it) and number of classes, as in bench_train_step.py.
SHAPES = {"conformer": ((1000, 12), 12), "baseline": ((1000, 12), 12), "resnet18": ((28, 28, 1), 2)}
MEDMNIST_FLAG = "breastmnist"  # 1 channel, 2 classes: ResNet-18's shape above
INSTALL_HINT = 'PyTorch is not installed; this benchmark needs it: pip install -e ".[bench]"'


# ------------------------------------------------------------------------ the shared spec


def make_spec(arch: str, batch: int) -> dict[str, Any]:
    """Everything both workers need, as plain JSON: shapes and the recipe's loss/optimiser.

    The hyperparameters are read from the task's recipe (``recipes.ptbxl`` for the ECG
    models, ``recipes.medmnist`` for ResNet-18), so the PyTorch side follows the recipe.
    Imports detjax (and so jax) but does not start a JAX backend.
    """
    if arch not in SHAPES:
        raise ValueError(f"unknown model {arch!r}; choose from {MODELS}")
    config = recipe_config(arch, batch)
    shape, classes = SHAPES[arch]
    return {
        "arch": arch, "batch": batch, "shape": list(shape), "classes": classes,
        "model": dict(config.model), "init": config.init, "seed": config.seed,
        "loss": config.loss, "logit_clamp": config.logit_clamp, "optimizer": config.optimizer,
        "learning_rate": config.learning_rate, "momentum": config.momentum,
        "weight_decay": config.weight_decay,
    }


def recipe_config(arch: str, batch: int):
    """The recipe's :class:`~detjax.train.TrainConfig` of ``arch`` at batch ``batch``."""
    from detjax import recipes

    if arch == "resnet18":
        return recipes.get_config(f"medmnist:{MEDMNIST_FLAG}", batch_size=batch)
    return recipes.get_config("ptbxl", arch=arch, batch_size=batch)


def synthetic_batch(spec: dict[str, Any]):
    """``(x, y)`` numpy, channel-last ``x``; the same draws as ``bench_train_step.py``."""
    import numpy as np

    batch, shape, classes = spec["batch"], tuple(spec["shape"]), spec["classes"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    if spec["loss"] == "ce":
        y = rng.integers(0, classes, (batch, 1)).astype(np.int32)
    else:
        y = (rng.random((batch, classes)) < 0.2).astype(np.float32)
    return x, y


def pos_weights(y):
    """``detjax.train.pos_weights`` in numpy (the check asserts they are equal)."""
    import numpy as np

    counts = y.sum(axis=0, dtype=np.float64)
    return np.sqrt(y.shape[0] / np.maximum(counts, 1.0)).astype(np.float32)


def to_channels_first(x):
    """detjax's channel-last batch in PyTorch's layout: ``(B, T, C)`` → ``(B, C, T)``,
    ``(B, H, W, C)`` → ``(B, C, H, W)``."""
    import numpy as np

    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


# ------------------------------------------------------------------------ PyTorch models


@functools.cache
def torch_classes() -> dict[str, type]:
    """The PyTorch modules, defined on first use (so this file imports without torch).

    State-dict names, order and layouts are those of ``to_torch_state_dict(arch, ...)``
    (naming ``"detjax"``); the checks assert it. Activations are channels-first, as PyTorch
    convolutions want them; LayerNorms over channels transpose around ``nn.LayerNorm``.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    def conv1d(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv1d:
        return nn.Conv1d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups)

    class ChannelLayerNorm(nn.LayerNorm):
        """``LayerNorm`` over the channels of ``(B, C, T)`` (detjax: channel-last LayerNorm)."""

        def forward(self, x):
            return super().forward(x.transpose(1, 2)).transpose(1, 2)

    # ----------------------------------------------------------------- ECG Conformer
    class BottleneckBlock(nn.Module):
        """``LN(GELU(conv3(GELU(conv2(GELU(conv1 x)))) + skip))``; skip = adaptive avg pool."""

        def __init__(self, channels: int, width: int, kernel: int, stride: int):
            super().__init__()
            self.conv1 = conv1d(channels, width, 1)
            self.conv2 = conv1d(width, width, kernel, stride)
            self.conv3 = conv1d(width, channels, 1)
            self.norm = ChannelLayerNorm(channels)

        def forward(self, x):
            h = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
            # PyTorch's adaptive pool has the bins detjax's constant matmul reproduces.
            skip = x if h.shape[-1] == x.shape[-1] else F.adaptive_avg_pool1d(x, h.shape[-1])
            return self.norm(F.gelu(h + skip))

    class FeedForward(nn.Module):
        def __init__(self, channels: int, hidden: int):
            super().__init__()
            self.norm = nn.LayerNorm(channels)
            self.fc1 = nn.Linear(channels, hidden)
            self.fc2 = nn.Linear(hidden, channels)

        def forward(self, x):  # (B, T, C)
            return self.fc2(F.gelu(self.fc1(self.norm(x))))

    class MultiHeadSelfAttention(nn.Module):
        """qkv/proj are 1×1 ``Conv1d``; ``[q | k | v]`` channels, channel ``h*d + j``."""

        def __init__(self, channels: int, heads: int, sdpa: bool = False):
            super().__init__()
            self.heads, self.sdpa = heads, sdpa
            self.norm = nn.LayerNorm(channels)
            self.qkv = conv1d(channels, 3 * channels, 1)
            self.proj = conv1d(channels, channels, 1)

        def forward(self, x):  # (B, T, C)
            b, t, c = x.shape
            d = c // self.heads
            q, k, v = self.qkv(self.norm(x).transpose(1, 2)).chunk(3, dim=1)  # (B, C, T) each
            q, k, v = (z.reshape(b, self.heads, d, t) for z in (q, k, v))
            if self.sdpa:  # fused kernel (a lever, off by default: not the same summation order)
                out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
                out = out.transpose(2, 3)
            else:  # the same math, in the same order, as detjax's einsums
                weights = torch.softmax(torch.einsum("bhdq,bhdk->bhqk", q, k) * (1.0 / math.sqrt(d)), dim=-1)
                out = torch.einsum("bhqk,bhdk->bhdq", weights, v)
            return self.proj(out.reshape(b, c, t)).transpose(1, 2)

    class ConvModule(nn.Module):
        def __init__(self, channels: int, kernel: int):
            super().__init__()
            self.norm = nn.LayerNorm(channels)
            self.dw = conv1d(channels, channels, kernel, groups=channels)
            self.pw = conv1d(channels, channels, 1)

        def forward(self, x):  # (B, T, C)
            return self.pw(F.gelu(self.dw(self.norm(x).transpose(1, 2)))).transpose(1, 2)

    class ConformerBlock(nn.Module):
        def __init__(self, channels: int, hidden: int, heads: int, kernel: int, sdpa: bool = False):
            super().__init__()
            self.ffn1 = FeedForward(channels, hidden)
            self.attn = MultiHeadSelfAttention(channels, heads, sdpa)
            self.conv = ConvModule(channels, kernel)
            self.ffn2 = FeedForward(channels, hidden)
            self.norm = nn.LayerNorm(channels)

        def forward(self, x):
            x = x + 0.5 * self.ffn1(x)
            x = x + self.attn(x)
            x = x + self.conv(x)
            x = x + 0.5 * self.ffn2(x)
            return self.norm(x)

    class ECGConformer(nn.Module):
        """``detjax.models.conformer.ECGConformer``; ``forward`` returns ``(logits, aux_loss)``."""

        def __init__(self, num_classes: int = 12, in_leads: int = 12, sdpa: bool = False):
            super().__init__()
            from detjax.models import conformer as c

            w, k = c.WIDTH, c.KERNEL
            self.num_classes = num_classes
            self.stem = nn.Sequential(conv1d(in_leads, c.STEM_WIDTH, k, 2), nn.GELU(),
                                      conv1d(c.STEM_WIDTH, c.STEM_WIDTH, k), nn.GELU(),
                                      conv1d(c.STEM_WIDTH, w, k), nn.GELU())
            self.pool = nn.AvgPool1d(3, 2, 1)  # count_include_pad=True, as detjax's avg_pool1d
            self.stages = nn.ModuleList(
                nn.ModuleList(BottleneckBlock(w, c.BOTTLENECK_WIDTH, k, stride if b == 0 else 1)
                              for b in range(depth))
                for depth, stride in zip(c.STAGE_DEPTHS, c.STAGE_STRIDES))
            self.down = conv1d(w, w, k, 2)
            self.blocks = nn.ModuleList(ConformerBlock(w, c.FFN_WIDTH, c.NUM_HEADS, k, sdpa)
                                        for _ in range(c.NUM_TRANSFORMER_BLOCKS))
            self.bottleneck = nn.Linear(2 * w, num_classes + 2)
            self.heads = nn.ModuleList(nn.Linear(num_classes + 2, 1) for _ in range(num_classes))
            self.aux_weight = c.AUX_WEIGHT

        def forward(self, x):  # (B, leads, T)
            x = self.pool(self.stem(x))
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            x = F.gelu(self.down(x)).transpose(1, 2)  # the transformer runs on (B, T, C)
            for block in self.blocks:
                x = block(x)
            pooled = torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)
            h = F.gelu(self.bottleneck(pooled))
            aux = self.aux_weight * h[:, self.num_classes:].square().mean()
            return torch.cat([head(h) for head in self.heads], dim=-1), aux

    # ---------------------------------------------------------------- ECG baseline CNN
    class ConvBN(nn.Module):
        """``ReLU(BN(Conv_k5(x)))``, the stem and the stage transitions."""

        def __init__(self, cin: int, cout: int, kernel: int, stride: int):
            super().__init__()
            self.conv = conv1d(cin, cout, kernel, stride)
            self.bn = nn.BatchNorm1d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    class ResBlock(ConvBN):
        """``x + ReLU(BN(Conv_k5(x)))``."""

        def __init__(self, channels: int, kernel: int):
            super().__init__(channels, channels, kernel, 1)

        def forward(self, x):
            return x + super().forward(x)

    class ECGBaselineCNN(nn.Module):
        """``detjax.models.baseline.ECGBaselineCNN``; ``forward`` returns ``(logits, 0)``."""

        def __init__(self, num_classes: int = 12, in_leads: int = 12, feature_dropout: float = 0.5,
                     hidden_dropout: float = 0.25):
            super().__init__()
            from detjax.models import baseline as m

            k = m.KERNEL
            self.stem = ConvBN(in_leads, m.STEM_WIDTH, k, 2)
            self.pool = nn.MaxPool1d(3, 2, 1)
            stages, width = [], m.STEM_WIDTH
            for out, depth in zip(m.STAGE_WIDTHS, m.STAGE_DEPTHS):
                blocks = [ConvBN(width, out, k, 2)] if out != width else []
                stages.append(nn.ModuleList(blocks + [ResBlock(out, k) for _ in range(depth)]))
                width = out
            self.stages = nn.ModuleList(stages)
            self.head = nn.Sequential(nn.Dropout(feature_dropout), nn.Linear(2 * width, m.HIDDEN), nn.ReLU(),
                                      nn.Dropout(hidden_dropout), nn.Linear(m.HIDDEN, num_classes))

        def forward(self, x):  # (B, leads, T)
            x = self.pool(self.stem(x))
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            pooled = torch.cat([x.mean(dim=-1), x.amax(dim=-1)], dim=-1)
            return self.head(pooled), x.new_zeros(())

    # ---------------------------------------------------------------------- ResNet-18
    def conv2d(cin: int, cout: int, k: int, stride: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = conv2d(cin, cout, 3, stride)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = conv2d(cout, cout, 3, 1)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        """``detjax.models.resnet.ResNet18`` (torchvision names; 3×3 stem, no max-pool).

        Numerics note (measured with ``check_model`` on this file's synthetic batch): in
        float64 both frameworks agree to ~1e-13 (logits, loss, every gradient), so the
        architecture, loss and backward pass are the same. In float32 the forward pass agrees
        to ~1e-5, but the gradients at initialisation are ill-conditioned (random labels, 2
        classes; likely cancellation between per-sample contributions) and BOTH frameworks are
        several % from the float64 gradients at batch 32 (worst tensor 6e-2 PyTorch, 5e-2
        detjax; 3e-2 and 2e-2 with ``he_normal``). At batch 2 PyTorch is closer (4e-5 vs
        detjax 3e-2) because its CPU BatchNorm accumulates statistics and backward sums in
        double, while detjax's ``layers.BatchNorm`` is float32 (moving only its statistics
        and normalisation to float64 brings detjax to 7e-5). So float32 gradients are
        reported, not asserted.
        """

        def __init__(self, num_classes: int, in_channels: int, width: int = 64):
            super().__init__()
            from detjax.models import resnet as r

            self.conv1 = conv2d(in_channels, width, 3, 1)
            self.bn1 = nn.BatchNorm2d(width)
            cin = width
            for s, (base, depth, stride) in enumerate(zip(r.STAGE_WIDTHS, r.STAGE_DEPTHS, r.STAGE_STRIDES)):
                cout = width * base // r.STEM_WIDTH
                blocks = [BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(depth)]
                setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
                cin = cout
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):  # (B, C, H, W)
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(x.mean(dim=(2, 3))), x.new_zeros(())

    return {"conformer": ECGConformer, "baseline": ECGBaselineCNN, "resnet18": ResNet18}


def build_torch_model(spec: dict[str, Any], *, sdpa: bool = False, dropout: bool = True):
    """The PyTorch model of ``spec`` (its own default init; load detjax's weights to compare)."""
    cls = torch_classes()[spec["arch"]]
    model = dict(spec["model"])
    if spec["arch"] == "resnet18":
        return cls(num_classes=spec["classes"], **model)
    if spec["arch"] == "conformer":
        return cls(num_classes=spec["classes"], sdpa=sdpa, **model)
    rates = {} if dropout else {"feature_dropout": 0.0, "hidden_dropout": 0.0}
    return cls(num_classes=spec["classes"], **model, **rates)


def torch_loss(spec: dict[str, Any], logits, y, pos_weight=None):
    """detjax's data loss of the recipe (``detjax.train.make_step_fn``) in PyTorch."""
    import torch
    import torch.nn.functional as F

    if spec["loss"] == "ce":
        return F.cross_entropy(logits, y.reshape(-1).long())
    if spec["loss"] == "bce":
        pos_weight = None
    c = spec["logit_clamp"]
    # weighted_bce_with_logits: mean over all entries of PyTorch's pos_weight BCE on clamped logits
    return F.binary_cross_entropy_with_logits(torch.clamp(logits, -c, c), y, pos_weight=pos_weight)


def torch_optimizer(spec: dict[str, Any], params):
    """``detjax.train.make_optimizer`` in ``torch.optim``, at the recipe's base learning rate.

    optax ``adam`` (ε outside the square root, bias correction) after
    ``add_decayed_weights`` is ``torch.optim.Adam`` with L2 ``weight_decay`` (not AdamW);
    ``add_decayed_weights`` + optax ``sgd(momentum)`` (trace ``t = g + μ t``, first step
    ``t = g``) is ``torch.optim.SGD(momentum, weight_decay)`` with dampening 0.
    """
    import torch

    lr, wd = spec["learning_rate"], spec["weight_decay"]
    if spec["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=spec["momentum"], weight_decay=wd)


def torch_trainable_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def torch_state_names(model) -> list[str]:
    return [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]


def load_detjax_weights(model, state_dict) -> None:
    """Load a ``to_torch_state_dict`` export (numpy) into ``model``, strictly: the names and
    shapes must be exactly the module's (``num_batches_tracked`` may be absent)."""
    import numpy as np
    import torch

    names = torch_state_names(model)
    if list(state_dict) != names:
        missing = [n for n in names if n not in state_dict]
        extra = [n for n in state_dict if n not in names]
        raise AssertionError(f"PyTorch state-dict names differ from detjax's export: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}" + ("" if missing or extra else " (order differs)"))
    own = model.state_dict()
    bad = [(n, tuple(own[n].shape), tuple(np.shape(v))) for n, v in state_dict.items()
           if tuple(own[n].shape) != tuple(np.shape(v))]
    if bad:
        raise AssertionError(f"PyTorch shapes differ from detjax's export (name, torch, detjax): {bad[:5]}")
    model.load_state_dict({n: torch.from_numpy(np.array(v)) for n, v in state_dict.items()}, strict=True)


# ---------------------------------------------------------------------- architecture check


def check_model(arch: str, *, batch: int = 2, grads: bool = True, atol: float = 1e-4,
                rtol64: float = 1e-6) -> dict[str, Any]:
    """Check that the PyTorch module of ``arch`` is detjax's model; raise ``AssertionError`` if not.

    In one process (imports jax and torch; changes no global setting of either): builds
    detjax's model with the recipe's init, initialises it, and asserts

    1. equal trainable-parameter counts, equal to the count the detjax module documents
       (BatchNorm running statistics are buffers in PyTorch and ``batch_stats`` in detjax:
       excluded on both sides);
    2. the PyTorch state-dict names, order and shapes are exactly ``to_torch_state_dict``'s
       (and ``torch_layout``'s); detjax's initial weights are then loaded into the module;
    3. float32, on a ``(batch, ...)`` input: eval-mode logits, train-mode logits (BatchNorm on
       batch statistics), the updated BatchNorm running statistics and the loss (the
       recipe's, with the Conformer's auxiliary term) agree to ``atol`` (relative to the
       largest magnitude when that exceeds 1: the baseline's eval-mode logits reach ~500).
       Train mode runs with dropout rate 0 on both sides: the masks come from different
       generators (threefry in detjax, PyTorch's own), so they cannot agree;
    4. with ``grads``: the same train-mode loss and its gradients computed in float64 on
       both sides (``jax.enable_x64`` in a context, ``model.double()``) agree to ``rtol64``
       of each tensor's largest entry. This is the exact architecture check of the backward
       pass (baseline and ResNet-18 agree to ~1e-13; the Conformer to ~3e-8 only because
       detjax's adaptive-pool matrix, ``layers.adaptive_avg_pool_matrix``, is float32
       constants such as 1/3 even under x64: with a float64 matrix it agrees to ~3e-15). Float32 gradients are compared too but only reported (``grad32_*``): they are
       not a property of the architecture but of float32 arithmetic, and on ill-conditioned
       channels they differ more (see the ResNet-18 note in ``torch_classes``).

    Returns the counts and the largest differences.
    """
    import jax
    import numpy as np
    import torch

    from detjax import train as dt
    from detjax.models import count_params, get_model
    from detjax.models.export import to_torch_state_dict, torch_layout

    spec = make_spec(arch, batch)
    x, y = synthetic_batch(spec)
    pw = pos_weights(y) if spec["loss"] == "weighted_bce" else None
    if pw is not None:
        np.testing.assert_array_equal(pw, dt.pos_weights(y))
    kwargs = dict(num_classes=spec["classes"], init=spec["init"], **spec["model"])
    model = get_model(arch, **kwargs)
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(spec["seed"]), x[:1])
    variables = jax.tree_util.tree_map(np.asarray, dict(variables))
    n_detjax = count_params(variables["params"])
    if arch == "resnet18":
        from detjax.models import resnet

        expected = resnet.param_count(spec["model"]["in_channels"], spec["classes"])
    else:
        import importlib

        expected = importlib.import_module(f"detjax.models.{arch}").NUM_PARAMS
    tmodel = build_torch_model(spec)
    n_torch = torch_trainable_count(tmodel)
    if not n_torch == n_detjax == expected:
        raise AssertionError(f"{arch}: trainable parameters differ: PyTorch {n_torch:,}, detjax {n_detjax:,}, "
                             f"documented {expected:,}")
    exported = to_torch_state_dict(arch, variables)
    if list(exported) != torch_layout(arch, spec["classes"]):
        raise AssertionError(f"{arch}: to_torch_state_dict names differ from torch_layout")
    load_detjax_weights(tmodel, exported)
    out: dict[str, Any] = {"model": arch, "batch": batch, "params_torch": n_torch, "params_detjax": n_detjax}

    def maxdiff(a, b) -> float:
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    def require(name: str, got, want, tol: float) -> None:
        diff = maxdiff(got, want)
        out[name] = diff
        bound = tol * max(1.0, float(np.max(np.abs(np.asarray(want, np.float64)))))
        if not diff <= bound:  # also catches NaN
            raise AssertionError(f"{arch}: {name} = {diff:.3g} exceeds {bound:.3g}")

    # eval mode: BatchNorm on running statistics, no dropout.
    xt = torch.from_numpy(to_channels_first(x))
    tmodel.eval()
    with torch.no_grad():
        logits_eval_t = tmodel(xt)[0].numpy()
    logits_eval_j = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    require("eval_logits_max_abs_diff", logits_eval_t, logits_eval_j, atol)
    out["eval_logits_max_abs"] = float(np.max(np.abs(logits_eval_j)))

    # train mode, dropout off: detjax's model with rate 0 (the same parameters), PyTorch's
    # Dropout modules in eval mode.
    model0 = get_model(arch, **kwargs, **({"feature_dropout": 0.0, "hidden_dropout": 0.0}
                                         if arch == "baseline" else {}))
    stats = variables.get("batch_stats")

    def loss_fn(params, x, y, w, stats):
        v = {"params": params, **({"batch_stats": stats} if stats else {})}
        logits, updated = model0.apply(v, x, train=True, mutable=["batch_stats", "losses"])
        if spec["loss"] == "ce":
            data = dt.softmax_cross_entropy(logits, y)
        else:
            data = dt.weighted_bce_with_logits(logits, y, w, spec["logit_clamp"])
        return data + dt.sown_losses(updated), (logits, updated.get("batch_stats", {}))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    if not grads:  # the forward pass only (compiles in a fraction of the time)
        grad_fn = jax.jit(lambda *a: (loss_fn(*a), None))
    w = np.ones(spec["classes"], np.float32) if pw is None else pw

    def torch_train(module, dtype, backward: bool):
        module = module.to(dtype).train()
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        xt = torch.from_numpy(to_channels_first(x)).to(dtype)
        yt = torch.from_numpy(y) if spec["loss"] == "ce" else torch.from_numpy(y).to(dtype)
        logits, aux = module(xt)
        loss = torch_loss(spec, logits, yt, None if pw is None else torch.from_numpy(pw).to(dtype)) + aux
        grads = {}
        if backward:
            loss.backward()
            grads = {n: p.grad.double().numpy() for n, p in module.named_parameters()}
        return loss.item(), logits.detach().double().numpy(), grads, module.state_dict()

    def grad_diffs(grads_t, grads_j, stats_j) -> tuple[float, float, str]:
        """(largest relative difference, largest absolute difference, worst tensor); a
        tensor's scale is its largest entry, floored at 1e-3 of the largest gradient (the
        conv biases before a BatchNorm have gradient 0: only rounding is left there)."""
        exported_grads = to_torch_state_dict(arch, {"params": grads_j, "batch_stats": stats_j})
        top = max(float(np.max(np.abs(g))) for g in exported_grads.values())
        rows = []
        for name, g_t in grads_t.items():
            diff = maxdiff(g_t, exported_grads[name])
            scale = max(float(np.max(np.abs(exported_grads[name]))), 1e-3 * top)
            rows.append((diff / scale, diff, name))
        rel, _, name = max(rows)
        return rel, max(r[1] for r in rows), name

    (loss_j, (logits_j, stats_j)), grads_j = grad_fn(variables["params"], x, y, w, stats)
    loss_t, logits_t, grads_t, state_t = torch_train(tmodel, torch.float32, grads)
    require("train_logits_max_abs_diff", logits_t, logits_j, atol)
    require("loss_abs_diff", loss_t, loss_j, atol)
    if stats:
        updated = to_torch_state_dict(arch, {"params": variables["params"], "batch_stats": stats_j})
        names = [n for n in updated if n.endswith(("running_mean", "running_var"))]
        require("running_stats_max_abs_diff", np.concatenate([state_t[n].numpy().ravel() for n in names]),
                np.concatenate([updated[n].ravel() for n in names]), atol)
    if grads:
        rel, diff, name = grad_diffs(grads_t, grads_j, stats_j)
        out.update(grad32_max_rel_diff=rel, grad32_max_abs_diff=diff, grad32_worst=name)
        f64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
        with jax.enable_x64(True):
            (loss_j, (logits_j, stats_j)), grads_j = grad_fn(
                f64(variables["params"]), x.astype(np.float64), y if spec["loss"] == "ce" else y.astype(np.float64),
                w.astype(np.float64), f64(stats) if stats else stats)
            grads_j = jax.tree_util.tree_map(np.asarray, grads_j)
        module64 = build_torch_model(spec)
        load_detjax_weights(module64, exported)
        loss_t, logits_t, grads_t, _ = torch_train(module64, torch.float64, True)
        require("f64_train_logits_max_abs_diff", logits_t, logits_j, rtol64)
        require("f64_loss_abs_diff", loss_t, loss_j, rtol64)
        rel, diff, name = grad_diffs(grads_t, grads_j, stats_j)
        out.update(f64_grad_max_rel_diff=rel, f64_grad_max_abs_diff=diff, f64_grad_worst=name)
        if not rel <= rtol64:
            raise AssertionError(f"{arch}: float64 gradients differ, worst {name}: {rel:.3g} relative")
    return out


# ---------------------------------------------------------------------------------- workers


def _pin(threads: int) -> list[int]:
    """Pin this process to its first ``threads`` allowed cores (what ``configure`` does)."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise ValueError(f"--threads {threads} but only {len(allowed)} cores are allowed: {allowed}")
    cores = allowed[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def detjax_worker(spec: dict[str, Any], steps: int, warmup: int, threads: int, xla_flags: str,
                  weights_out: str | None) -> dict[str, Any]:
    """Time detjax's jitted train step (:func:`detjax.train.make_train_step`) in this process."""
    if xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    from detjax import determinism

    determinism.configure(cpu_threads=threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)  # a real compile every time
    from detjax import train as dt
    from detjax.models import count_params, get_model
    from detjax.models.export import to_torch_state_dict

    arch = spec["arch"]
    config = recipe_config(arch, spec["batch"])
    x, y = synthetic_batch(spec)
    model = get_model(arch, num_classes=spec["classes"], init=config.init, **config.model)
    # The cosine is stepped per epoch; one huge epoch keeps the base rate, as the torch side.
    tx = dt.make_optimizer(config, steps_per_epoch=1 << 30)
    t0 = time.perf_counter()
    state = dt.create_train_state(model, tx, x[:1], config.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    n_params = count_params(state.params)
    if weights_out:
        np.savez(weights_out, **to_torch_state_dict(arch, state.variables()))
    pw = dt.pos_weights(y) if config.loss == "weighted_bce" else None
    step = dt.make_train_step(model, tx, config, pos_weight=pw)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    jax.block_until_ready(batch)
    # The first step: trace, lower, compile and run (what the first call of the jitted step
    # does); the compiled executable is then called directly, and its cost analysis is free.
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    first_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    for _ in range(max(warmup - 1, 0)):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    from flax.serialization import to_state_dict

    from detjax.hashing import tree_sha256

    return {"side": "detjax", "state_sha256": tree_sha256(to_state_dict(state)), "params": n_params, "init_s": init_s, "first_step_s": first_s,
            "step_times_s": times, "median_step_s": med, "samples_per_s": spec["batch"] / med,
            "flops_per_step": flops, "gflops_per_s": flops / med / 1e9, "loss": float(metrics["loss"]),
            "device_kind": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__}


def torch_worker(spec: dict[str, Any], steps: int, warmup: int, threads: int, weights_in: str | None,
                 sdpa: bool, fill: bool = True) -> dict[str, Any]:
    """Time the same train step in PyTorch (eager, CPU) in this process."""
    cores = _pin(threads)
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every uninitialised tensor with NaN (PyTorch's default
    # there); --torch-no-fill turns that off, to see what it costs.
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.manual_seed(spec["seed"])  # dropout masks
    x, y = synthetic_batch(spec)
    t0 = time.perf_counter()
    model = build_torch_model(spec, sdpa=sdpa)
    if weights_in:
        with np.load(weights_in) as data:
            load_detjax_weights(model, {k: data[k] for k in data.files})
    model.train()
    opt = torch_optimizer(spec, model.parameters())
    init_s = time.perf_counter() - t0
    xt, yt = torch.from_numpy(to_channels_first(x)), torch.from_numpy(y)
    pw = torch.from_numpy(pos_weights(y)) if spec["loss"] == "weighted_bce" else None

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits, aux = model(xt)
        loss = torch_loss(spec, logits, yt, pw) + aux
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"side": "torch", "params": torch_trainable_count(model), "init_s": init_s, "step_times_s": times,
            "median_step_s": med, "samples_per_s": spec["batch"] / med, "loss": float(loss),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": cores,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory}


# ----------------------------------------------------------------------------- orchestration


def _run(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args[:4])} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def measure(arch: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Alternate detjax and torch workers for ``args.rounds`` rounds; medians over rounds."""
    spec = json.dumps(make_spec(arch, args.batch))
    common = ["--spec", spec, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--threads", str(args.threads)]
    weights = tmp / f"{arch}.npz"
    rounds: dict[str, list[dict]] = {"detjax": [], "torch": []}
    for r in range(args.rounds):
        extra = ["--weights-out", str(weights)] if r == 0 else []
        rounds["detjax"].append(_run(["--worker", "detjax", *common, f"--xla-flags={args.xla_flags}", *extra]))
        rounds["torch"].append(_run(["--worker", "torch", *common, "--weights-in", str(weights),
                                     *(["--torch-sdpa"] if args.torch_sdpa else []),
                                     *(["--torch-no-fill"] if args.torch_no_fill else [])],
                                    env=_torch_env(args.threads)))
    det, tor = rounds["detjax"], rounds["torch"]
    if det[0]["params"] != tor[0]["params"]:
        raise AssertionError(f"{arch}: trainable parameters differ: detjax {det[0]['params']:,}, "
                             f"PyTorch {tor[0]['params']:,}")
    med = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    result = {
        "model": arch, "params": det[0]["params"],
        "detjax_samples_per_s": med(det, "samples_per_s"), "torch_samples_per_s": med(tor, "samples_per_s"),
        "detjax_compile_s": med(det, "first_step_s"), "detjax_init_s": med(det, "init_s"),
        "detjax_gflops_per_s": med(det, "gflops_per_s"), "flops_per_step": det[0]["flops_per_step"],
        "rounds": rounds,
    }
    result["speedup"] = result["detjax_samples_per_s"] / result["torch_samples_per_s"]
    # Every detjax round trains the same steps from the same state: its final hash must repeat.
    result["detjax_state_sha256"] = sorted({run["state_sha256"] for run in det})
    result["bit_identical_rounds"] = len(result["detjax_state_sha256"]) == 1
    return result


def check_line(check: dict[str, Any]) -> str:
    """One line summarising :func:`check_model`'s result."""
    line = (f"check {check['model']}: params torch {check['params_torch']:,} = detjax {check['params_detjax']:,}; "
            f"float32 max |diff| eval logits {check['eval_logits_max_abs_diff']:.2e} "
            f"(largest |logit| {check['eval_logits_max_abs']:.3g}), "
            f"train logits {check['train_logits_max_abs_diff']:.2e}, loss {check['loss_abs_diff']:.2e}")
    if "running_stats_max_abs_diff" in check:
        line += f", BN running stats {check['running_stats_max_abs_diff']:.2e}"
    if "f64_grad_max_rel_diff" in check:
        line += (f"; float64 grads rel {check['f64_grad_max_rel_diff']:.1e}; float32 grads rel "
                 f"{check['grad32_max_rel_diff']:.1e} (worst {check['grad32_worst']})")
    return line


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN: no cost analysis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per worker (default 10)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (default 2; detjax's first is the compile step)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (and pinned cores) per side")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating detjax/torch rounds per model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS in the detjax worker")
    parser.add_argument("--torch-sdpa", action="store_true",
                        help="PyTorch Conformer attention via F.scaled_dot_product_attention (a lever)")
    parser.add_argument("--torch-no-fill", action="store_true",
                        help="torch.utils.deterministic.fill_uninitialized_memory = False (a lever)")
    parser.add_argument("--check", action="store_true", help="only run the architecture checks")
    parser.add_argument("--no-check", action="store_true", help="skip the architecture checks")
    parser.add_argument("--check-batch", type=int, default=2)
    # internal: one worker in this process
    parser.add_argument("--worker", choices=("detjax", "torch", "check"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--weights-out", help=argparse.SUPPRESS)
    parser.add_argument("--weights-in", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # `--xla-flags "--xla_..."`: a value that starts with "--"
        if arg == "--xla-flags":
            argv[i:i + 2] = [f"--xla-flags={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)

    if args.worker == "detjax":
        result = detjax_worker(json.loads(args.spec), args.steps, args.warmup, args.threads, args.xla_flags,
                               args.weights_out)
        print(json.dumps(result))
        return 0
    if args.worker == "torch":
        print(json.dumps(torch_worker(json.loads(args.spec), args.steps, args.warmup, args.threads,
                                      args.weights_in, args.torch_sdpa, not args.torch_no_fill)))
        return 0
    if args.worker == "check":
        print(json.dumps(check_model(args.arch, batch=args.check_batch)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    for name in ("steps", "threads", "batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2

    checks = []
    if not args.no_check:
        for arch in models:  # a fresh process each: jax and torch side by side, batch --check-batch
            check = _run(["--worker", "check", "--arch", arch, "--check-batch", str(args.check_batch)])
            checks.append(check)
            print(check_line(check), flush=True)
    if args.check:
        if args.json:
            args.json.write_text(json.dumps({"checks": checks}, indent=2))
        return 0

    print(f"batch {args.batch}, {args.threads} thread(s) per side, median of {args.steps} timed steps after "
          f"{args.warmup} warm-up steps, median over {args.rounds} round(s) of fresh detjax/torch processes"
          + (f"; detjax XLA_FLAGS += {args.xla_flags!r}" if args.xla_flags else ""), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-torch-") as tmp:
        for arch in models:
            results.append(measure(arch, args, Path(tmp)))
    print()
    print("| model | detjax samples/s | torch samples/s | speedup | detjax compile s | detjax init s "
          "| detjax GFLOP/s | rounds bit-identical | final state sha256 |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['detjax_samples_per_s']:.1f} | {r['torch_samples_per_s']:.1f} "
              f"| {r['speedup']:.2f} | {r['detjax_compile_s']:.1f} | {r['detjax_init_s']:.1f} "
              f"| {_fmt(r['detjax_gflops_per_s'])} | {'yes' if r['bit_identical_rounds'] else 'NO'} "
              f"| {', '.join(h[:12] for h in r['detjax_state_sha256'])} |")
    print()
    for r in results:
        print(f"speedup {r['model']} {r['speedup']:.3f}")
        print(f"compile {r['model']} {r['detjax_compile_s']:.2f}")
        print(f"init {r['model']} {r['detjax_init_s']:.2f}")
    if args.json:
        det = results[0]["rounds"]["detjax"][0]
        tor = results[0]["rounds"]["torch"][0]
        meta = {"batch": args.batch, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                "rounds": args.rounds, "xla_flags": det["xla_flags"], "jax": det["jax"], "torch": tor["torch"],
                "device_kind": det["device_kind"], "torch_sdpa": args.torch_sdpa,
                "torch_fill_uninitialized_memory": tor["fill_uninitialized_memory"]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "checks": checks, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
