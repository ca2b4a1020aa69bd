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

from detjax.cli import (add_common_flags, check_data_dir, default_out, parse_and_configure,  # noqa: E402
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
    parser.add_argument("--eval-every", type=positive_int, default=10, help="validate every N epochs (and at the last)")
    return parser


def validate(args: argparse.Namespace) -> None:
    """Checks that need more than argparse (before any data is loaded)."""
    from detjax.data.cinc2017 import window_length

    data = data_options(args)
    check_data_dir(data["data_dir"], "--data-dir" if args.data_dir else f"${ENV_DATA_DIR}")
    window_length(args.window_seconds, args.sampling_rate)
    if args.transformer_fixup and args.arch != "conformer":
        raise ValueError(f"--transformer-fixup applies to the conformer only, not --arch {args.arch}")


def data_options(args: argparse.Namespace, environ=None) -> dict:
    """The task's ``config.data`` with ``data_dir`` made absolute (from --data-dir or the
    environment), so the manifest names the folder and ``verify`` re-runs need no environment."""
    import os

    environ = os.environ if environ is None else environ
    data_dir = args.data_dir or environ.get(ENV_DATA_DIR)
    if not data_dir:
        raise ValueError(f"no CinC 2017 data folder: pass --data-dir DIR or set {ENV_DATA_DIR}=DIR "
                         f"(get the data with `python -m detjax.data.cinc2017 download DEST`)")
    return {"data_dir": str(Path(data_dir).expanduser().absolute()), "window_seconds": args.window_seconds,
            "sampling_rate": args.sampling_rate, "reference": args.reference, "cv_fold": args.cv_fold,
            "limit": args.limit}


def main(argv: list[str] | None = None) -> int:
    args, epochs = parse_and_configure(build_parser(), argv, default_epochs=DEFAULT_EPOCHS,
                                       epochs_note=DEFAULT_EPOCHS_NOTE, validate=validate)
    from detjax.train import TrainConfig

    try:
        data = data_options(args)
        if args.transformer_fixup and args.arch != "conformer":
            raise ValueError(f"--transformer-fixup applies to the conformer only, not --arch {args.arch}")
        model = {"in_leads": 1, **({"transformer_fixup": True} if args.transformer_fixup else {})}
        config = TrainConfig(task="cinc2017", data=data, arch=args.arch, model=model, init=args.init,
                             variant=args.variant, order=args.order, seed=args.seed, epochs=epochs,
                             batch_size=args.batch_size, optimizer="adam", learning_rate=1e-3, loss="ce",
                             eval_every=args.eval_every)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
