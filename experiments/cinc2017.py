#!/usr/bin/env python
"""PhysioNet/CinC 2017 AF classification (4 classes N, A, O, ~) with the single-lead ECG Conformer.

    python experiments/cinc2017.py --data-dir /data/cinc2017/training2017 --init mixed
    DETJAX_CINC2017_DIR=/data/cinc2017/training2017 python experiments/cinc2017.py --init kaiming --seed 7
    python experiments/cinc2017.py --data-dir DIR --cv-fold 1 --window-seconds 20 --limit 256

Each recording (300 Hz, 9-61 s) is resampled to 100 Hz and cut to its centred 10 s window,
so the model input is (B, 1000, 1): PTB-XL's length with one lead (`in_leads=1`). Folds are
the vendored class-stratified 10-fold assignment (train 1-8 / val 9 / test 10 by default).
Loss: softmax cross-entropy; Adam 1e-3, cosine per epoch, batch 128 (the PTB-XL recipe).
Selection on validation macro AUC; the test report adds the challenge F1 (mean of F1 over
N, A, O). There is no vendored copy of the records: give --data-dir or $DETJAX_CINC2017_DIR
(`python -m detjax.data.cinc2017 download DEST` fetches and verifies them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detjax.cli import (add_common_flags, check_data_dir, default_out, parse_to_config,  # noqa: E402
                        positive_float, positive_int, run_experiment)

DEFAULT_EPOCHS = 85
DEFAULT_EPOCHS_NOTE = ("the PTB-XL protocol's length; the full training folds are ~6,800 records (54 batches "
                       "of 128) per epoch, so use --epochs/--limit for a quick CPU run")
INITS = ("mixed", "mixed_as_released", "dct", "hadamard", "hartley", "sinusoidal", "kaiming")
ENV_DATA_DIR = "DETJAX_CINC2017_DIR"  # same name as detjax.data.cinc2017.ENV_DATA_DIR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["conformer", "baseline"], default="conformer")
    add_common_flags(parser, inits=INITS, default_init="mixed", default_epochs=DEFAULT_EPOCHS,
                     epochs_note=DEFAULT_EPOCHS_NOTE,
                     data_dir_help=(f"folder with the A*.hea/A*.mat records and REFERENCE-v3.csv "
                                    f"(default: ${ENV_DATA_DIR}; one of the two is required)"))
    parser.add_argument("--window-seconds", type=positive_float, default=10.0,
                        help="centred window per record in seconds (default 10: 1000 samples at 100 Hz)")
    parser.add_argument("--sampling-rate", type=positive_int, default=100, help="resample 300 Hz to this rate (default 100)")
    parser.add_argument("--reference", default="REFERENCE-v3.csv", help="label file inside the data folder")
    parser.add_argument("--transformer-fixup", action="store_true",
                        help="conformer: also scale the transformer blocks' attention out-projection and "
                             "pointwise conv by 0.01 (a wider reading of the fixup rule; the released code "
                             "scales only the bottleneck blocks' conv3, the default)")
    parser.add_argument("--cv-fold", type=int, choices=[0, 1, 2], default=0,
                        help="3-fold CV rotation: test folds 10, 9, 8 with validation folds 9, 8, 10")
    parser.add_argument("--cv", type=positive_int, default=None, metavar="K",
                        help="K-fold CV: the 10 folds grouped into K blocks (2 <= K <= 10), each the test set "
                             "once; one run directory per split under --out plus cv.json (see docs/transfer.md)")
    parser.add_argument("--eval-every", type=positive_int, default=10, help="validate every N epochs (and at the last)")
    return parser


def config_of(args: argparse.Namespace, epochs: int):
    """The cinc2017 recipe with this command line's arguments (the data folder from --data-dir
    or ``$DETJAX_CINC2017_DIR``, recorded absolute, so ``verify`` needs no environment)."""
    from detjax import recipes

    return recipes.cinc2017(data_dir=args.data_dir, init=args.init, arch=args.arch, seed=args.seed, epochs=epochs,
                            order=args.order, variant=args.variant, window_seconds=args.window_seconds,
                            sampling_rate=args.sampling_rate, reference=args.reference, cv_fold=args.cv_fold,
                            limit=args.limit, batch_size=args.batch_size, eval_every=args.eval_every,
                            transformer_fixup=args.transformer_fixup)


def validate(args: argparse.Namespace, config) -> None:
    """The data folder and the window of the recipe's ``config`` (its own checks ran first)."""
    from detjax.data.cinc2017 import window_length

    check_data_dir(config.data["data_dir"], "--data-dir" if args.data_dir else f"${ENV_DATA_DIR}")
    window_length(args.window_seconds, args.sampling_rate)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_to_config(build_parser(), argv, config_of, validate=validate)
    if args.cv:
        from detjax.cv import cv_main

        return cv_main(config, args, headline="macro_auc", extra_metrics=("challenge_f1",))
    if args.out is None:  # fixed here so the challenge F1 can be read back from result.json
        args.out = str(default_out("cinc2017"))
    code = run_experiment(config, args)
    if code == 0:
        result = json.loads((Path(args.out) / "result.json").read_text())
        print("test F1     " + "  ".join(f"{k} {v:.4f}" for k, v in result["f1"].items()))
        print(f"challenge_f1 {result['challenge_f1']:.4f}  (mean F1 of N, A, O; the 2017 winners scored 0.83)")
    return code


if __name__ == "__main__":
    sys.exit(main())
