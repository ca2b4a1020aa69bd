#!/usr/bin/env python
"""OOD scores from the spare ETF vertex, and robustness under synthetic shifts.

    python experiments/ood.py --run RUN_DIR                  # writes RUN_DIR/ood.json, ood.md, ood.png
    python experiments/ood.py --run RUN_DIR --cinc-dir data/cinc2017   # + CinC `~` as real OOD
    python experiments/ood.py --study STUDY_DIR              # robustness per init arm of a seed study

For a finished run: restores its best-validation weights (checked against result.json),
re-loads its test split, and for every shift (Gaussian noise at several SNRs, baseline
wander, powerline hum, flat-lined leads, lead swaps, amplitude scaling) and severity
computes the test metric on the shifted copies and the AUROC of three OOD scores (cosine of
the bottleneck feature with the unused simplex-ETF vertex; max-logit; energy) for shifted vs
clean records. With a CinC 2017 folder, CinC's noisy class `~` is scored as real OOD. For a
study: every finished member gets its ood.json, and STUDY_DIR gets robustness.json,
robustness.md and robustness.png (test score under each shift, mean ± sd per arm).
See docs/transfer.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detjax.cli import (add_compile_cache_flag, check_compile_cache, check_data_dir, configure_process,  # noqa: E402
                        error_exit, positive_int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a finished run directory (ECG task)")
    where.add_argument("--study", help="a seed-study directory (robustness per arm)")
    parser.add_argument("--cinc-dir", default=None,
                        help="CinC 2017 folder for the real-OOD check (default: the run's own, or "
                             "$DETJAX_CINC2017_DIR; skipped when neither is known)")
    parser.add_argument("--cpu-threads", type=positive_int, default=None)
    add_compile_cache_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = Path(args.run or args.study)
    try:
        check_data_dir(target, "--run" if args.run else "--study")
        check_data_dir(args.cinc_dir, "--cinc-dir")
        check_compile_cache(args.compile_cache)
        if args.run and not (target / "manifest.json").exists():
            raise ValueError(f"--run {target}: no manifest.json (not a run directory)")
        if args.study and not (target / "study_spec.json").exists():
            raise ValueError(f"--study {target}: no study_spec.json (not a study directory)")
    except ValueError as exc:
        error_exit(str(exc))
    configure_process(args.cpu_threads, None, compile_cache=args.compile_cache)
    from detjax import ood

    try:
        if args.run:
            result = ood.evaluate_run(target, cinc_dir=args.cinc_dir)
            (target / "ood.json").write_text(json.dumps(result, indent=2, sort_keys=True))
            (target / "ood.md").write_text(ood.markdown(result))
            ood.plot(result, target / "ood.png")
            print(ood.markdown(result))
            print(f"wrote {target / 'ood.json'}, ood.md, ood.png")
        else:
            table = ood.study_robustness(target)
            (target / "robustness.json").write_text(json.dumps(table, indent=2, sort_keys=True))
            text = ood.robustness_markdown(table)
            (target / "robustness.md").write_text(text)
            ood.plot_robustness(table, target / "robustness.png")
            print(text)
            print(f"wrote {target / 'robustness.json'}, robustness.md, robustness.png")
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
