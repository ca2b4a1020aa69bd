#!/usr/bin/env python
"""Cross-dataset AF transfer: train on CinC 2017 or PTB-XL, test zero-shot on the other.

    python experiments/transfer.py --train cinc2017 --test ptbxl --cinc-dir data/cinc2017 \\
        --epochs 5 --limit 2048
    python experiments/transfer.py --train ptbxl --test cinc2017 --cinc-dir DIR --arch baseline

Both datasets are harmonised to one lead (CinC's single lead <-> PTB-XL lead I), 100 Hz,
10 s windows in mV, the same baseline removal (--baseline, default a 0.5 Hz high-pass) and
a scalar normalisation computed on the source's training split only. AF = CinC class A =
PTB-XL AFIB; everything else is negative; CinC's noisy class `~` is excluded by default
(--cinc-noisy negative keeps it as non-AF). The model is trained on the source's training
folds (1-8), selected on its validation fold (9) and tested on its test fold (10), then
scored zero-shot on the target's test fold (10). result.json holds the source's own test
metrics, "transfer" (target AUC with a bootstrap 95% CI, target F1 at the threshold chosen on
the source's validation split) and "floor" (the classical baseline, also transferred).
See docs/transfer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detjax.cli import (add_common_flags, check_data_dir, default_out, parse_to_config,  # noqa: E402
                        positive_int, run_experiment)

DEFAULT_EPOCHS = 5
DEFAULT_EPOCHS_NOTE = "a short CPU run; the transfer result of a 5-epoch model is a floor, not the paper's protocol"
INITS = ("mixed", "mixed_as_released", "dct", "hadamard", "hartley", "sinusoidal", "kaiming")
DATASETS = ("cinc2017", "ptbxl")
ENV_CINC = "DETJAX_CINC2017_DIR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, choices=DATASETS, help="source dataset (trained on)")
    parser.add_argument("--test", required=True, choices=DATASETS, help="target dataset (tested zero-shot)")
    parser.add_argument("--arch", choices=["conformer", "baseline"], default="conformer")
    add_common_flags(parser, inits=INITS, default_init="mixed", default_epochs=DEFAULT_EPOCHS,
                     epochs_note=DEFAULT_EPOCHS_NOTE, data_dir_help="unused here: give --cinc-dir / --ptbxl-dir")
    parser.add_argument("--cinc-dir", default=None, help=f"CinC 2017 folder (default ${ENV_CINC})")
    parser.add_argument("--ptbxl-dir", default=None, help="PTB-XL folder (default: the vendored 500-record sample)")
    parser.add_argument("--baseline", choices=["highpass", "mean", "none"], default="highpass",
                        help="baseline removal applied to every dataset (default: 0.5 Hz zero-phase high-pass)")
    parser.add_argument("--cinc-noisy", choices=["exclude", "negative"], default="exclude",
                        help="CinC's noisy class ~: left out (default) or kept as non-AF")
    parser.add_argument("--eval-every", type=positive_int, default=1, help="validate every N epochs (and at the last)")
    return parser


def config_of(args: argparse.Namespace, epochs: int):
    """The af_transfer recipe with this command line's arguments (absolute folders, so
    ``verify`` needs no environment)."""
    from detjax import recipes

    if args.data_dir is not None:
        raise ValueError("--data-dir is ambiguous here: give --cinc-dir and/or --ptbxl-dir")
    return recipes.af_transfer(source=args.train, target=args.test, cinc_dir=args.cinc_dir, ptbxl_dir=args.ptbxl_dir,
                               init=args.init, arch=args.arch, seed=args.seed, epochs=epochs, order=args.order,
                               variant=args.variant, baseline=args.baseline, cinc_noisy=args.cinc_noisy,
                               limit=args.limit, batch_size=args.batch_size, eval_every=args.eval_every)


def validate(args: argparse.Namespace, config) -> None:
    """The data folders of the recipe's ``config`` (its own checks ran first)."""
    data = config.data
    check_data_dir(data["cinc_dir"], "--cinc-dir" if args.cinc_dir else f"${ENV_CINC}")
    check_data_dir(data["ptbxl_dir"], "--ptbxl-dir")


def main(argv: list[str] | None = None) -> int:
    args, config = parse_to_config(build_parser(), argv, config_of, validate=validate)
    if args.out is None:
        args.out = str(default_out(f"transfer-{args.train}-to-{args.test}"))
    code = run_experiment(config, args)
    if code == 0:
        result = json.loads((Path(args.out) / "result.json").read_text())
        print_transfer(result)
    return code


def print_transfer(result: dict) -> None:
    t, f = result.get("transfer", {}), result.get("floor", {})
    ci = t.get("ci95") or [float("nan")] * 2
    print(f"\nsource {t.get('source')} test: AF AUC {result.get('af_auc')}  (floor {f.get('af_auc')})")
    print(f"target {t.get('target')} test (zero-shot, n={t.get('n_target')}, AF {t.get('n_target_af')}): "
          f"AF AUC {t.get('target_af_auc'):.4f} [95% CI {ci[0]:.4f}, {ci[1]:.4f}], "
          f"F1 {t.get('target_af_f1'):.4f} at threshold {t.get('threshold'):.4f}")
    ft = f.get("transfer") or {}
    if ft:
        print(f"floor transferred: AF AUC {ft.get('target_af_auc'):.4f} "
              f"[95% CI {(ft.get('ci95') or [0, 0])[0]:.4f}, {(ft.get('ci95') or [0, 0])[1]:.4f}], "
              f"F1 {ft.get('target_af_f1'):.4f}")


if __name__ == "__main__":
    sys.exit(main())
