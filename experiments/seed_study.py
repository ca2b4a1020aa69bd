#!/usr/bin/env python
"""Seed study: n seeds per arm, structured initialisation vs Kaiming, with the paper's statistics.

    python experiments/seed_study.py --task medmnist:breastmnist --arms dct,kaiming --seeds 20 --epochs 200
    python experiments/seed_study.py --task cinc2017 --data-dir data/cinc2017 \\
        --arms mixed,kaiming --seeds 20 --epochs 85
    python experiments/seed_study.py --task ptbxl --arms dct,hadamard,hartley,sinusoidal --seeds 20

Seeds are the first N of the paper's list (2 3 7 11 13 …) or --seed-list. Members use the
seeded batch order (a permutation from seed + epoch); structured arms differ between seeds
only through it (and augmentation), Kaiming arms also through the draw. Writes --out/study.json
(per arm and seed: test metrics, per-class AUC, hashes; the test statistics), study.md (tables),
per_class_spread.png, convergence.png and one run directory per member. Re-running the same
command continues: finished members are not retrained. `--out DIR --report-only` recomputes
the report of the study in DIR from its members.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detjax.cli import (add_compile_cache_flag, add_cpu_kernels_flag, add_print_config_flag,  # noqa: E402
                        check_compile_cache, check_data_dir, check_out_dir, configure_process, default_out,
                        error_exit, nonnegative_int, positive_float, positive_int, print_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task",
                        help="medmnist:<flag> (e.g. medmnist:breastmnist), cinc2017, ptbxl or synthetic")
    parser.add_argument("--arms", default="dct,kaiming",
                        help="comma list of initialisations (dct, hadamard, hartley, sinusoidal, mixed, "
                             "mixed_as_released, kaiming)")
    parser.add_argument("--baseline", default="kaiming", help="the arm the others are tested against")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=positive_int, default=5, help="the first N of the paper's 20 seeds (default 5)")
    seeds.add_argument("--seed-list", default=None, help="explicit comma list of seeds")
    parser.add_argument("--epochs", type=positive_int, help="epochs per member (paper: 200 MedMNIST, 85 ECG)")
    parser.add_argument("--out", default=None, help="study directory (default runs/study-<task>-<timestamp>)")
    parser.add_argument("--data-dir", default=None, help="dataset directory (task default otherwise)")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N records of each split")
    parser.add_argument("--leads", default=None,
                        help="ptbxl: lead subset, 'limb' (I, II, III, AVR, AVL, AVF) or a comma list; default all 12")
    parser.add_argument("--width", type=positive_int, default=None, help="ResNet-18 width (64 is the paper's; reduced studies)")
    parser.add_argument("--window-seconds", type=positive_float, default=None, help="cinc2017: window length in seconds")
    parser.add_argument("--batch-size", type=positive_int, default=None)
    parser.add_argument("--eval-every", type=positive_int, default=None, help="validate every N epochs (and at the last)")
    parser.add_argument("--order", choices=["seeded", "seeded_as_released"], default="seeded",
                        help="members' batch order: a key of its own per (seed, epoch) (default), or the "
                             "released code's keys seed+epoch, under which seeds share most permutations")
    parser.add_argument("--cv", type=nonnegative_int, default=0, metavar="K",
                        help="ptbxl/cinc2017: run every member under K-fold CV over the dataset's own folds "
                             "(2 <= K <= 10; each member is K runs and a cv.json; its score is the mean over "
                             "the K test blocks). 0 (default): the task's fixed split")
    parser.add_argument("--mode", choices=["sequential", "vmap", "unroll", "map"], default="sequential",
                        help="sequential runs (default), or several seeds in one compiled program "
                             "(see docs/seed_studies.md for which modes equal the solo run bit for bit)")
    parser.add_argument("--group-size", type=nonnegative_int, default=0, help="seeds per compiled group (0: all pending)")
    parser.add_argument("--delta", type=positive_float, default=0.015, help="TOST equivalence margin (AUC)")
    parser.add_argument("--tost-df", choices=["pooled", "welch"], default="pooled",
                        help="TOST degrees of freedom with the Welch standard error: n_a + n_b - 2 (default; "
                             "gives the paper's printed p) or the Welch-Satterthwaite df")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute study.json/md and figures of the study in --out (no training)")
    parser.add_argument("--cpu-threads", type=positive_int, default=None, help="pin the CPU backend to N threads")
    parser.add_argument("--no-progress", action="store_true")
    add_print_config_flag(parser)
    add_cpu_kernels_flag(parser)
    add_compile_cache_flag(parser, note="; members of a study run the same programs, so only the first compiles")
    return parser


def validate(args) -> None:
    """Every check that needs no data (before the process is configured and anything is loaded)."""
    if args.report_only:
        if not args.out:
            raise ValueError("--report-only needs --out, the study directory")
        if not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out}: no such study directory")
        return
    if not args.task or args.epochs is None:
        raise ValueError("--task and --epochs are required (except with --report-only)")
    _seed_list(args)
    if not [a for a in args.arms.split(",") if a.strip()]:
        raise ValueError("--arms is empty; give a comma list of initialisations")
    check_out_dir(args.out if args.out else "runs")
    check_data_dir(args.data_dir)
    check_compile_cache(args.compile_cache)


def _seed_list(args) -> tuple[int, ...] | None:
    if not args.seed_list:
        return None
    try:
        seeds = tuple(int(s) for s in args.seed_list.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seed-list must be a comma list of integers, got {args.seed_list!r}") from None
    if not seeds or any(not 0 <= s < 2 ** 32 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed-list must hold distinct seeds in [0, 2**32), got {args.seed_list!r}")
    return seeds


def spec_from_args(args):
    from detjax.study import PAPER_SEEDS, StudySpec

    if args.seed_list:
        seeds = _seed_list(args)
    else:
        if not 1 <= args.seeds <= len(PAPER_SEEDS):
            raise ValueError(f"--seeds must be 1..{len(PAPER_SEEDS)} (the paper's list); use --seed-list for others")
        seeds = PAPER_SEEDS[:args.seeds]
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    # The recipe's own arguments (detjax.recipes), exactly as the experiment CLIs pass them;
    # flags left unset keep the recipe's defaults.
    options = {"data_dir": args.data_dir and str(Path(args.data_dir).absolute()), "limit": args.limit,
               "window_seconds": args.window_seconds, "width": args.width, "leads": args.leads,
               "batch_size": args.batch_size, "eval_every": args.eval_every,
               "order": None if args.order == "seeded" else args.order}
    options = {k: v for k, v in options.items() if v is not None}
    return StudySpec(task=args.task, arms=arms, seeds=seeds, epochs=args.epochs, options=options,
                     baseline=args.baseline, delta=args.delta, tost_df=args.tost_df, mode=args.mode,
                     group_size=args.group_size, cv=args.cv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        if not args.report_only:
            from detjax import study

            spec = spec_from_args(args)  # --seeds range and the spec's own checks (no data, no computation)
            members = [(study.member_config(spec, arm, seed), {"arm": arm, "seed": seed})
                       for arm in spec.arms for seed in spec.seeds]  # unknown inits/tasks/options fail here
            if args.print_config:
                return print_config(members)
    except (ValueError, OSError) as exc:
        error_exit(str(exc))
    arch = members[0][0].arch if not args.report_only else None  # every arm trains the same model
    try:
        environment = configure_process(args.cpu_threads, None, arch=arch, cpu_kernels=args.cpu_kernels,
                                        allocator=args.allocator, compile_cache=args.compile_cache)
    except ValueError as exc:  # --allocator jemalloc without the library
        error_exit(str(exc))
    from detjax import study

    try:
        if args.report_only:
            if not args.out:
                raise ValueError("--report-only needs --out, the study directory")
            out = Path(args.out)
            summary = study.report(out)
        else:
            if not args.task or args.epochs is None:
                raise ValueError("--task and --epochs are required (except with --report-only)")
            spec = spec_from_args(args)
            for arm in spec.arms:
                study.member_config(spec, arm)  # unknown inits/tasks fail here, before any training
            out = Path(args.out) if args.out else default_out("study-" + args.task.replace(":", "-"))
            print(f"study {spec.task}: arms {list(spec.arms)}, seeds {list(spec.seeds)}, {spec.epochs} epochs, "
                  f"mode {spec.mode} -> {out}", flush=True)
            summary = study.run_study(spec, out, environment=environment, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, OSError, FloatingPointError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print()
    print(study.markdown_tables(summary))
    print(f"study directory: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
