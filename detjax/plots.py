"""Figures (matplotlib, the optional ``plots`` extra; the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` without the optional ``plots`` extra
    (every figure function then returns ``None`` and writes nothing)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: float | None = None) -> Path:
    """Lays out, writes and closes ``fig``; returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_training_curve(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path | None:
    """Training loss per epoch (left axis) and validation score where evaluated (right axis)."""
    plt = pyplot()
    if plt is None:
        return None
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    evaluated = [h for h in history if "val" in h]
    if evaluated:
        ax2 = ax.twinx()
        ax2.plot([h["epoch"] for h in evaluated], [h["val"]["score"] for h in evaluated],
                 "o-", color="tab:red", label="validation score")
        ax2.set_ylabel("validation score (macro AUC)", color="tab:red")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _arm_colors(arms: Sequence[str]) -> dict[str, Any]:
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {arm: cycle[i % len(cycle)] for i, arm in enumerate(arms)}


def plot_per_class_spread(members: dict[str, Sequence[dict[str, Any]]], labels: Sequence[str],
                          path: str | Path, *, title: str = "") -> Path | None:
    """Box plus strip plot of test AUC over seeds: per class (and the macro AUC), one box per arm.

    ``members[arm]`` are the seed records of :func:`detjax.study.collect` (``per_class_auc``
    and ``test_score``). Points are jittered deterministically (evenly spaced offsets), so the
    figure is the same bytes-wise input → same picture.
    """
    import numpy as np

    plt = pyplot()
    if plt is None:
        return None
    arms = list(members)
    groups = list(labels) + ["macro"]
    colors = _arm_colors(arms)
    width = 0.8 / max(len(arms), 1)
    boxes = len(groups) * max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.3 * boxes + 2.0)), 4.2), dpi=120)
    for a, arm in enumerate(arms):
        for g, group in enumerate(groups):
            if group == "macro":
                values = [r["test_score"] for r in members[arm]]
            else:
                values = [r["per_class_auc"].get(group) for r in members[arm]]
            values = [v for v in values if v is not None and np.isfinite(v)]
            if not values:
                continue
            x = g + (a - (len(arms) - 1) / 2) * width
            ax.boxplot([values], positions=[x], widths=width * 0.8, showfliers=False, manage_ticks=False,
                       patch_artist=True, boxprops={"facecolor": colors[arm], "alpha": 0.25},
                       medianprops={"color": colors[arm]})
            jitter = np.linspace(-0.25, 0.25, len(values)) * width if len(values) > 1 else np.zeros(1)
            ax.plot(x + jitter, values, "o", ms=3, color=colors[arm], label=arm if g == 0 else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=45 if len(groups) > 6 else 0)
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_convergence(members: dict[str, Sequence[dict[str, Any]]], path: str | Path, *, title: str = "") -> Path | None:
    """Training loss and validation score per epoch: mean over seeds with a ±1 sd band, per arm."""
    import numpy as np

    plt = pyplot()
    if plt is None:
        return None
    colors = _arm_colors(list(members))
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    for arm, recs in members.items():
        for ax, key in zip(axes, ("train_loss", "val_score")):
            by_epoch: dict[int, list[float]] = {}
            for r in recs:
                for h in r["history"]:
                    if key in h:
                        by_epoch.setdefault(h["epoch"], []).append(h[key])
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            mean = np.array([np.mean(by_epoch[e]) for e in epochs])
            sd = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])
            ax.plot(epochs, mean, "o-" if len(epochs) < 15 else "-", ms=3, color=colors[arm],
                    label=f"{arm} (n={len(recs)})")
            ax.fill_between(epochs, mean - sd, mean + sd, color=colors[arm], alpha=0.2)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("validation score (macro AUC)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. CV members, whose K runs have K histories (each in its fold's manifest)
            ax.text(0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
