"""Figure: the DCT-II basis mapped onto a 64->64 Conv1d (k=5), docs/method.md §3.

Writes docs/figures/dct_basis_64x64_conv.png (the paper's Figure 3a analogue):
(a) the 64x64 DCT-II basis, (b) the mapped weight of Conv1d(64 -> 64, k=5) in PyTorch order
as a (out=64, in*k=320) matrix (row o = row o of the 320-point basis, rescaled), and
(c) a few filters shown as (in channel x tap) images.

Usage: cd /work/main && PYTHONPATH=. python scripts/plot_dct_basis.py [--out PATH]
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import detjax.initializers as di  # noqa: E402

K, C_IN, C_OUT = 5, 64, 64
EXAMPLE_FILTERS = (0, 1, 2, 7, 31, 63)
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "docs/figures/dct_basis_64x64_conv.png"


def mapped_weight() -> np.ndarray:
    """Conv1d(64->64, k=5) DCT kernel in PyTorch order (out, in, k), float32."""
    return di.conv1d_kernel("dct", K, C_IN, C_OUT).transpose(2, 1, 0)


def plot(out: pathlib.Path) -> pathlib.Path:
    basis = di.dct(C_IN)
    w = mapped_weight()
    lim = float(np.abs(w).max())
    fig = plt.figure(figsize=(14, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.05])
    ax_a, ax_b = top.subplots(1, 2, width_ratios=[1, 2.6])
    blim = float(np.abs(basis).max())
    im = ax_a.imshow(basis, cmap="RdBu_r", vmin=-blim, vmax=blim)
    ax_a.set(title="(a) DCT-II basis, 64×64", xlabel="j (sample)", ylabel="i (frequency)")
    top.colorbar(im, ax=ax_a, shrink=0.8)
    im = ax_b.imshow(w.reshape(C_OUT, C_IN * K), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                     interpolation="nearest")
    ax_b.set(title=f"(b) Conv1d({C_IN}→{C_OUT}, k={K}) weight, PyTorch order (out, in·k) = "
                   f"({C_OUT}, {C_IN * K}); rows of the {C_IN * K}-point DCT-II, "
                   f"std 1/√(3·{C_IN * K})",
             xlabel="flat index c·k + t (channel outer, tap inner)", ylabel="filter o")
    top.colorbar(im, ax=ax_b, shrink=0.8)
    axes = bottom.subplots(1, len(EXAMPLE_FILTERS), sharey=True)
    for col, (ax, o) in enumerate(zip(axes, EXAMPLE_FILTERS)):
        ax.imshow(w[o], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set(title=f"filter o={o}", xlabel="tap t", xticks=range(K))
        if col == 0:
            ax.set_ylabel("input channel c")
    bottom.suptitle("(c) example filters W[o] as (in channel × tap) images, "
                    "same colour scale as (b)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    print(plot(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
