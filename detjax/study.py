"""Seed studies: n seeds per arm (structured bases vs Kaiming), statistics, tables, figures.

A study is plain data (:class:`StudySpec`): a task, arms (initialisations), seeds, epochs and
options. :func:`run_study` trains every (arm, seed) member that is not finished yet, each in
``out/<arm>/seed-<s>/`` with its own ``result.json`` and ``manifest.json`` (so a study is
resumable: finished members are never retrained, an interrupted one continues from its last
checkpoint), then :func:`analyse` computes the paper's statistics and :func:`write_report`
writes ``study.json`` (strict JSON: no NaN or infinity), ``study.md`` and the figures.

What a seed changes in a member: the Kaiming/He draw (structured arms ignore it), the seeded
batch order (studies use ``order="seeded"``: a permutation from seed + epoch), the
augmentation keys and dropout. Members run one after another (``mode="sequential"``, each
bit-identical to ``experiments/*.py --order seeded --seed s``) or several seeds of an arm in
one compiled program (``"vmap"``, ``"unroll"``, ``"map"``; see :mod:`detjax.multiseed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detjax import manifest as manifest_lib
from detjax import stats
from detjax.train import TrainConfig

__all__ = ["PAPER_SEEDS", "StudySpec", "StudyError", "member_config", "member_dir", "stored_spec", "run_study",
           "collect", "analyse", "report", "write_report", "markdown_tables"]

#: The seeds of the paper's n = 20 studies; ``--seeds N`` takes the first N.
PAPER_SEEDS = (2, 3, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 42, 43, 47, 53, 123, 456, 789, 1337)
MODES = ("sequential", "vmap", "unroll", "map")
#: Scalar test metrics reported per arm when a task's result has them (besides test_score).
EXTRA_METRICS = ("acc", "challenge_f1")


#: Tasks whose seed studies can run under K-fold CV: the headline and extra metrics of cv.json.
CV_HEADLINES = {"ptbxl": ("macro_auc", ()), "cinc2017": ("macro_auc", ("challenge_f1",))}


class StudyError(ValueError):
    """The study directory or spec is inconsistent (nothing was overwritten)."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A seed study as data.

    ``task``: ``"medmnist:<flag>"``, ``"cinc2017"``, ``"ptbxl"`` or ``"synthetic"``.
    ``arms``: initialisations (``"kaiming"`` means He-normal for ResNet-18). ``options``:
    further named arguments of the task's recipe (:mod:`detjax.recipes`: e.g. ``data_dir``,
    ``limit``, ``leads``, ``width``, ``batch_size``, ``eval_every``, ``order``), the same
    arguments the experiment CLIs pass, so a member's config is the one the experiment would
    build with ``--order seeded --seed s``. ``baseline`` is the arm the others are tested
    against; ``delta`` the TOST equivalence margin (the paper: 0.015 AUC) and ``tost_df`` the
    TOST degrees of freedom (``"pooled"``: nₐ + n_b − 2, the paper's choice, or ``"welch"``; see
    :func:`detjax.stats.tost_equivalence`). ``mode``/``group_size`` choose how members run;
    none of these enter the members' configs.
    """

    task: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str = "kaiming"
    delta: float = 0.015
    tost_df: str = "pooled"
    mode: str = "sequential"
    group_size: int = 0
    cv: int = 0

    def __post_init__(self):
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise StudyError(f"arms must be distinct and non-empty, got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
        if self.mode not in MODES:
            raise StudyError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.tost_df not in stats.TOST_DF:
            raise StudyError(f"unknown tost_df {self.tost_df!r}; expected one of {stats.TOST_DF}")
        if not self.delta > 0:
            raise StudyError(f"delta must be positive, got {self.delta}")
        if self.epochs < 1 or self.group_size < 0:
            raise StudyError(f"epochs must be >= 1 and group_size >= 0, got {self.epochs}, {self.group_size}")
        if self.cv and not (2 <= self.cv <= 10 and self.task in CV_HEADLINES and self.mode == "sequential"):
            raise StudyError(f"cv={self.cv}: K-fold CV studies need 2 <= K <= 10, a task with folds "
                             f"({sorted(CV_HEADLINES)}) and mode 'sequential'")
        reserved = sorted({"init", "seed", "epochs"} & set(self.options))
        if reserved:
            raise StudyError(f"options may not set {reserved}: arms, seeds and epochs say that")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudySpec":
        d = dict(d)
        d["arms"], d["seeds"] = tuple(d["arms"]), tuple(int(s) for s in d["seeds"])
        # study_spec.json files written before recipes kept the options in three dicts
        legacy = {k: v for part in ("data", "model", "train") for k, v in dict(d.pop(part, None) or {}).items()}
        if legacy:
            d["options"] = {**legacy, **dict(d.get("options") or {})}
        return cls(**d)


def member_config(spec: StudySpec, arm: str, seed: int = 0) -> TrainConfig:
    """The :class:`TrainConfig` of member ``(arm, seed)``: the task's recipe with the study's
    options, seeded order unless the options choose another."""
    from detjax import recipes

    try:
        return recipes.get_config(spec.task, **{"order": "seeded", **dict(spec.options)}, init=arm,
                                  seed=int(seed), epochs=spec.epochs)
    except ValueError as exc:
        raise StudyError(str(exc)) from exc


def member_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed-{int(seed)}"


def _stored_record(out: Path, spec: StudySpec, arm: str, seed: int, name: str) -> tuple[Path, dict, str] | None:
    """``(path, record, expected config hash)`` of the member's JSON record ``name``;
    ``None`` when the member has not written it."""
    path = member_dir(out, arm, seed) / name
    if not path.exists():
        return None
    return path, json.loads(path.read_text()), member_config(spec, arm, seed).hash()


def _finished(out: Path, spec: StudySpec, arm: str, seed: int) -> dict | None:
    """The member's result if it finished with this config; ``None`` if it has not finished."""
    if spec.cv:
        return _finished_cv(out, spec, arm, seed)
    stored = _stored_record(out, spec, arm, seed, "result.json")
    if stored is None:
        return None
    path, result, expected = stored
    if result.get("config_hash") != expected:
        raise StudyError(f"{path} was trained with config hash {result.get('config_hash')}, not {expected}: "
                         "this directory holds another study; nothing was overwritten. Choose another --out")
    return result


def _finished_cv(out: Path, spec: StudySpec, arm: str, seed: int) -> dict | None:
    """A CV member's record from its ``cv.json`` (K runs in ``fold-<b>/``): the test score is
    the mean over the K splits, per-class AUCs are those of the pooled out-of-fold predictions,
    the final hash is the SHA-256 of the K final hashes in split order."""
    import hashlib

    stored = _stored_record(out, spec, arm, seed, "cv.json")
    if stored is None:
        return None
    path, cv, expected = stored
    if TrainConfig.from_dict(cv["base_config"]).hash() != expected or cv.get("k") != spec.cv:
        raise StudyError(f"{path} holds a CV run of another config or K; this directory holds another study; "
                         "nothing was overwritten. Choose another --out")
    folds = cv["folds"]
    first = json.loads((Path(folds[0]["run_dir"]) / "result.json").read_text())
    scores = [f.get("test_score") for f in folds]
    finite = [float(v) for v in scores if isinstance(v, (int, float)) and math.isfinite(v)]
    _, extra = CV_HEADLINES[spec.task]
    return {
        "config_hash": expected,
        "test_score": float(np.mean(finite)) if len(finite) == len(scores) else float("nan"),
        **{m: cv.get(f"{m}_mean") for m in extra},
        "per_class_auc": (cv.get("pooled") or {}).get("per_class_auc") or {},
        "floor": {"test_score": float(np.mean([f.get("floor_" + CV_HEADLINES[spec.task][0]) or np.nan
                                               for f in folds]))},
        "init_weights_sha256": first.get("init_weights_sha256"),
        "init_sha256": first.get("init_sha256"),
        "final_sha256": hashlib.sha256("".join(f["final_sha256"] for f in folds).encode()).hexdigest(),
        "history": [],
        "cv": {"k": cv["k"], "mean": cv.get("mean"), "sd": cv.get("sd"),
               "pooled": cv.get(f"pooled_{CV_HEADLINES[spec.task][0]}")},
    }


def stored_spec(out: str | Path) -> StudySpec | None:
    """The :class:`StudySpec` the study in ``out`` recorded (``study_spec.json``); ``None`` if none."""
    path = Path(out) / "study_spec.json"
    return StudySpec.from_dict(json.loads(path.read_text())) if path.exists() else None


def _check_spec(out: Path, spec: StudySpec) -> None:
    """Refuses a directory of a study with another task/epochs/options (seeds and arms may grow)."""
    stored = stored_spec(out)
    if stored is None:
        return
    previous = stored.to_dict()
    fixed = ("task", "epochs", "options", "cv")
    now = spec.to_dict()
    changed = [k for k in fixed if previous.get(k) != now.get(k)]
    if changed:
        raise StudyError(f"{out} holds a study with other {', '.join(changed)} "
                         f"({ {k: previous.get(k) for k in changed} }); nothing was overwritten. Choose another --out")


def run_study(spec: StudySpec, out: str | Path, *, environment: dict | None = None, progress: bool = True,
              log=print) -> dict[str, Any]:
    """Trains the unfinished members of ``spec`` into ``out``; returns :func:`analyse`'s summary
    (also written by :func:`write_report`)."""
    from detjax import multiseed, tasks
    from detjax.train import train_and_evaluate

    out = Path(out).absolute()
    _check_spec(out, spec)
    configs = {arm: member_config(spec, arm) for arm in spec.arms}  # validates every arm before training
    out.mkdir(parents=True, exist_ok=True)
    manifest_lib.write_json_atomic(out / "study_spec.json", spec.to_dict())
    if environment is None:
        from detjax.determinism import environment_fingerprint
        environment = environment_fingerprint()

    data = None
    for arm in spec.arms:
        pending = [s for s in spec.seeds if _finished(out, spec, arm, s) is None]
        log(f"arm {arm}: {len(spec.seeds) - len(pending)} of {len(spec.seeds)} seeds finished"
            + (f", training {pending}" if pending else ""))
        if not pending:
            continue
        if data is None and not spec.cv:  # the same data for every arm and seed (seed-free options)
            data = tasks.load_task(configs[arm])
        if spec.cv:  # each member: K runs over the task's folds (detjax.cv), one cv.json
            from detjax import cv

            headline, extra = CV_HEADLINES[spec.task]
            for seed in pending:
                cv.run_cv(member_config(spec, arm, seed), spec.cv, member_dir(out, arm, seed), headline=headline,
                          extra_metrics=extra, environment=environment, progress=progress, log=log)
            continue
        if spec.mode == "sequential":
            for seed in pending:
                train_and_evaluate(member_config(spec, arm, seed), data, member_dir(out, arm, seed), resume=True,
                                   environment=environment, progress=progress)
            continue
        size = spec.group_size or len(pending)
        for g in range(0, len(pending), size):
            group = pending[g:g + size]
            group_dir = out / arm / "groups" / "-".join(str(s) for s in group)
            multiseed.train_seeds(configs[arm], data, group, group_dir, mode=spec.mode,
                                  member_dirs=[member_dir(out, arm, s) for s in group],
                                  environment=environment, progress=progress)
    summary = analyse(collect(out, spec), spec)
    write_report(summary, out)
    return summary


def report(out: str | Path) -> dict[str, Any]:
    """Re-analyses the study in ``out`` (its ``study_spec.json`` and finished members) and
    rewrites the report; no training."""
    out = Path(out)
    spec = stored_spec(out)
    if spec is None:
        raise StudyError(f"{out} holds no study (no study_spec.json)")
    summary = analyse(collect(out, spec), spec)
    write_report(summary, out)
    return summary


# ------------------------------------------------------------------------ analysis


def _failure(result: Mapping[str, Any]) -> str | None:
    """Why a finished member cannot enter the statistics (``None``: it can)."""
    score = result.get("test_score")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        return f"result.json has no numeric test_score (got {score!r})"
    if not math.isfinite(score):
        reason = f"test_score is {score!r}"
        if result.get("best_epoch") == -1:
            reason += " and no validation epoch was ever best (best_epoch -1, validation scores not finite)"
        return reason
    return None


def _history_entry(h: Mapping[str, Any]) -> dict[str, Any]:
    """Epoch, training loss and validation score of one history record; a value that is not a
    finite number is left out (the figures skip what is absent)."""
    values = {"train_loss": h.get("train_loss"), "val_score": (h.get("val") or {}).get("score")}
    return {"epoch": h["epoch"], **{k: float(v) for k, v in values.items()
                                    if isinstance(v, (int, float)) and math.isfinite(v)}}


def collect(out: str | Path, spec: StudySpec) -> dict[str, list[dict[str, Any]]]:
    """Per arm, the finished members' records (seed order): metrics, per-class AUC, the init
    hashes (weights only and full state), final hash, history.

    A member whose test score is missing, NaN or infinite is kept with ``failed`` set to the
    reason and ``test_score`` ``None``; :func:`analyse` reports it and leaves it out of the
    statistics. Non-finite floats elsewhere (e.g. a history entry) become ``None``.
    """
    out = Path(out)
    records: dict[str, list[dict[str, Any]]] = {}
    for arm in spec.arms:
        records[arm] = []
        for seed in spec.seeds:
            result = _finished(out, spec, arm, seed)
            if result is None:
                continue
            history = result.get("history")
            if history is None:  # sequential members keep their history in the manifest
                manifest = json.loads((member_dir(out, arm, seed) / "manifest.json").read_text())
                history = manifest.get("history", [])
            failed = _failure(result)
            record = {
                "seed": int(seed),
                "test_score": None if failed else float(result["test_score"]),
                **{m: float(result[m]) for m in EXTRA_METRICS
                   if isinstance(result.get(m), (int, float)) and math.isfinite(result[m])},
                "per_class_auc": result.get("per_class_auc") or {},
                "best_epoch": result.get("best_epoch"),
                "best_val_score": result.get("best_val_score"),
                "floor_test_score": (result.get("floor") or {}).get("test_score"),
                "init_weights_sha256": result.get("init_weights_sha256"),
                "init_sha256": result.get("init_sha256"),
                "final_sha256": result.get("final_sha256"),
                "execution": (result.get("execution") or {}).get("mode", "sequential"),
                "history": [_history_entry(h) for h in history],
            }
            if failed:
                record["failed"] = failed
            records[arm].append(manifest_lib.strict_json(record))
    return records


def _per_class_matrix(records: Sequence[dict], labels: Sequence[str]) -> np.ndarray:
    return np.array([[np.nan if r["per_class_auc"].get(c) is None else r["per_class_auc"][c] for c in labels]
                     for r in records], dtype=np.float64).reshape(len(records), len(labels))


def _distinct(records: Sequence[dict], key: str) -> int | None:
    """How many distinct values of hash ``key`` the members have (``None``: no member records it)."""
    values = {r.get(key) for r in records} - {None}
    return len(values) if values else None


def _friedman(records: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """Friedman's test over all arms on ``test_score``, paired by seed; seeds missing from an
    arm (unfinished or failed there) are dropped from every arm and named."""
    arms = {arm: {r["seed"]: r["test_score"] for r in recs} for arm, recs in records.items()}
    try:
        return {"arms": list(records), **stats.friedman(arms, mismatch="intersect")}
    except ValueError as exc:
        common = [s for s in next(iter(arms.values())) if all(s in v for v in arms.values())]
        return {"arms": list(records), "seeds": common, "chi2": None, "p": None, "not_computed": str(exc)}


def analyse(records: Mapping[str, Sequence[dict]], spec: StudySpec) -> dict[str, Any]:
    """The study's statistics, from :func:`collect`'s records.

    Per arm: the members that succeeded (``members``) and those that failed (``failed``: seed
    and reason; left out of every statistic); summary (n, mean, sd, min, max, range) of
    ``test_score`` (macro AUC) and the task's other scalar metrics, per-class AUC tables, and
    how many distinct init-weights, init-state and final hashes the members have. Against
    ``spec.baseline``: :func:`detjax.stats.compare_arms` on ``test_score`` (Welch t, Levene,
    Mann–Whitney U, Cohen's d, sd ratio, TOST with margin ``spec.delta`` and df
    ``spec.tost_df``). Across three or more arms: Friedman paired by seed on the seeds every
    arm has. A statistic that cannot be computed is ``None`` with the reason.
    """
    ok = {arm: [r for r in recs if not r.get("failed")] for arm, recs in records.items()}
    arms: dict[str, Any] = {}
    labels: list[str] = []
    for recs in ok.values():
        for r in recs:
            labels += [c for c in r["per_class_auc"] if c not in labels]
    for arm, recs in ok.items():
        failed = [{"seed": r["seed"], "reason": r["failed"], "init_weights_sha256": r.get("init_weights_sha256"),
                   "init_sha256": r.get("init_sha256"), "final_sha256": r.get("final_sha256")}
                  for r in records[arm] if r.get("failed")]
        entry: dict[str, Any] = {"n": len(recs), "seeds": [r["seed"] for r in recs], "members": list(recs),
                                 "failed": failed}
        if recs:
            entry["test_score"] = stats.summary([r["test_score"] for r in recs])
            for m in EXTRA_METRICS:
                if all(m in r for r in recs):
                    entry[m] = stats.summary([r[m] for r in recs])
            if labels:
                entry["per_class"] = stats.per_class_table(_per_class_matrix(recs, labels), labels)
            entry["distinct_init_weights_hashes"] = _distinct(recs, "init_weights_sha256")
            entry["distinct_init_hashes"] = _distinct(recs, "init_sha256")
            entry["distinct_final_hashes"] = _distinct(recs, "final_sha256")
        arms[arm] = entry
    comparisons = {}
    base = ok.get(spec.baseline)
    for arm, recs in ok.items():
        if arm == spec.baseline or base is None:
            continue
        a, b = [r["test_score"] for r in recs], [r["test_score"] for r in base]
        comparisons[f"{arm} vs {spec.baseline}"] = {
            "metric": "test_score",
            **stats.compare_arms(a, b, delta=spec.delta, tost_df=spec.tost_df),
            **({"challenge_f1": stats.compare_arms([r["challenge_f1"] for r in recs],
                                                   [r["challenge_f1"] for r in base],
                                                   delta=spec.delta, tost_df=spec.tost_df)}
               if all("challenge_f1" in r for r in list(recs) + list(base)) else {}),
        }
    friedman = _friedman(ok) if len(ok) >= 3 else None
    # The classical floor (detjax.floor) is trained on the members' common split: one value per study.
    floors = sorted({r["floor_test_score"] for recs in ok.values() for r in recs
                     if isinstance(r.get("floor_test_score"), float)})
    return manifest_lib.strict_json({"spec": spec.to_dict(), "tost_df": spec.tost_df, "labels": labels, "arms": arms,
                                     "comparisons": comparisons, "friedman": friedman,
                                     "floor_test_score": floors[0] if len(floors) == 1 else (floors or None)})


# ------------------------------------------------------------------------- reports


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def _get(c: Mapping[str, Any], test: str, key: str | None = None) -> Any:
    """``c[test][key]`` (or ``c[test]``), ``None`` when the test was not computed."""
    value = c.get(test)
    return value if key is None or value is None else value.get(key)


def _short(h: str | None) -> str:
    return f"`{h[:12]}`" if h else "–"


def markdown_tables(summary: Mapping[str, Any]) -> str:
    """The study as markdown: per-arm table, tests against the baseline, Friedman, failed
    members and why, per-class ranges, and per member the init-weights, init-state and final
    hashes (first 12 hex digits; ``study.json`` has them in full)."""
    spec = summary["spec"]
    tost_df = summary.get("tost_df", spec.get("tost_df", "welch"))
    extra = [m for m in EXTRA_METRICS if any(m in a for a in summary["arms"].values())]
    lines = [f"# Seed study: {spec['task']}, {len(spec['seeds'])} seeds, {spec['epochs']} epochs", "",
             "test_score is the test macro AUC at the best-validation epoch. Distinct hashes: of the "
             "initial weights (parameters and BatchNorm statistics), of the whole initial state (also "
             "PRNG key and optimiser state), and of the final state.", ""]
    floor = summary.get("floor_test_score")
    if floor is not None:
        lines += [f"Classical floor on the same split (spectral + autocorrelation features, logistic regression; "
                  f"docs/transfer.md): test_score {_fmt(floor) if not isinstance(floor, list) else floor}. "
                  "An arm below it has not learned more than hand-made features give.", ""]
    lines += ["| arm | n | test_score mean ± sd | min – max | range |" + "".join(f" {m} mean ± sd |" for m in extra)
             + " distinct init weights / init state / final hashes | failed |",
             "|---|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for arm, a in summary["arms"].items():
        failed = len(a.get("failed", []))
        if not a["n"]:
            lines.append(f"| {arm} | 0 | – | – | – |" + " – |" * len(extra) + f" – | {failed} |")
            continue
        s = a["test_score"]
        row = (f"| {arm} | {s['n']} | {_fmt(s['mean'])} ± {_fmt(s['sd'])} | {_fmt(s['min'])} – {_fmt(s['max'])} "
               f"| {_fmt(s['range'])} |")
        for m in extra:
            row += f" {_fmt(a[m]['mean'])} ± {_fmt(a[m]['sd'])} |" if m in a else " – |"
        hashes = " / ".join(_fmt(a.get(k)) for k in ("distinct_init_weights_hashes", "distinct_init_hashes",
                                                     "distinct_final_hashes"))
        lines.append(row + f" {hashes} of {a['n']} | {failed} |")
    reasons: list[str] = []
    if summary["comparisons"]:
        lines += ["", "| comparison (test_score) | Δ mean | Welch p | Levene p | Mann–Whitney p | Cohen's d | "
                  f"sd ratio (baseline / arm) | TOST p (δ={spec['delta']}, {tost_df} df) | equivalent |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, c in summary["comparisons"].items():
            means = (_get(c, "a", "mean"), _get(c, "b", "mean"))
            delta = None if None in means else means[0] - means[1]
            lines.append(f"| {name} | {_fmt(delta)} | {_fmt(_get(c, 'welch_t', 'p'))} | "
                         f"{_fmt(_get(c, 'levene', 'p'))} | {_fmt(_get(c, 'mann_whitney', 'p'))} | "
                         f"{_fmt(_get(c, 'cohens_d'), 2)} | {_fmt(_get(c, 'sd_ratio'), 2)} | "
                         f"{_fmt(_get(c, 'tost', 'p'))} | {_fmt(_get(c, 'tost', 'equivalent'))} |")
            reasons += [f"- {name}, {test}: {why}" for test, why in c.get("not_computed", {}).items()]
    if reasons:
        lines += ["", "Not computed (n/a above):", ""] + reasons
    if summary.get("friedman"):
        f = summary["friedman"]
        text = (f"χ² = {_fmt(f['chi2'], 3)}, p = {_fmt(f['p'])}, n = {f['n_seeds']} seeds"
                if f.get("chi2") is not None else f"not computed: {f['not_computed']}")
        dropped = f.get("dropped") or {}
        lines += ["", "Basis comparison (Friedman, paired by seed over " + ", ".join(f["arms"]) + "): " + text
                  + (f"; seeds used: {', '.join(str(s) for s in f['seeds'])}" if f.get("seeds") else "")
                  + (f"; dropped (not in every arm): {dropped}" if dropped else "")]
    failed = [(arm, x) for arm, a in summary["arms"].items() for x in a.get("failed", [])]
    if failed:
        lines += ["", "Failed members (left out of every statistic):", ""]
        lines += [f"- {arm} seed {x['seed']}: {x['reason']}" for arm, x in failed]
    if summary["labels"]:
        arms = [a for a, v in summary["arms"].items() if v.get("per_class")]
        lines += ["", "Per-class test AUC over seeds: mean ± sd [range in percentage points]", "",
                  "| class | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for c in summary["labels"]:
            cells = []
            for arm in arms:
                t = summary["arms"][arm]["per_class"].get(c, {"n": 0})
                cells.append("n/a" if not t.get("n") else
                             f"{_fmt(t['mean'], 3)} ± {_fmt(t['sd'], 3)} [{100 * t['range']:.1f} pp]")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    members = [(arm, m) for arm, a in summary["arms"].items() for m in a["members"]]
    if members:
        lines += ["", "| arm | seed | test_score | init weights sha256 | init state sha256 | final sha256 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {arm} | {m['seed']} | {_fmt(m['test_score'])} | {_short(m.get('init_weights_sha256'))} | "
                  f"{_short(m.get('init_sha256'))} | {_short(m.get('final_sha256'))} |" for arm, m in members]
    return "\n".join(lines) + "\n"


def write_report(summary: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Writes ``study.json`` (strict JSON; a NaN or infinity is refused with ``ValueError``),
    ``study.md`` and (with matplotlib) the figures into ``out``."""
    out = Path(out)
    paths = {"json": out / "study.json", "markdown": out / "study.md"}
    json.dumps(summary, allow_nan=False, default=str)  # raises before anything is written
    manifest_lib.write_json_atomic(paths["json"], summary)
    text = markdown_tables(summary)
    with manifest_lib.atomic_file(paths["markdown"], suffix=".tmp") as f:
        f.write(text.encode())
    from detjax import plots

    members = {arm: a["members"] for arm, a in summary["arms"].items() if a["n"]}
    if members and plots.pyplot() is not None:
        paths["spread"] = plots.plot_per_class_spread(members, summary["labels"], out / "per_class_spread.png",
                                                      title=f"{summary['spec']['task']}: test AUC over seeds")
        paths["convergence"] = plots.plot_convergence(members, out / "convergence.png",
                                                      title=f"{summary['spec']['task']}: mean ± 1 sd over seeds")
    return paths
