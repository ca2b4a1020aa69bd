"""Figures (matplotlib, the optional ``plots`` extra; the Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Training loss per epoch (left axis) and validation score where evaluated (right axis)."""
    plt = _pyplot()
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
