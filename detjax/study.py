"""Seed studies: n seeds per arm (structured bases vs Kaiming), statistics, tables, figures.

A study is plain data (:class:`StudySpec`): a task, arms (initialisations), seeds, epochs and
options. :func:`run_study` trains every (arm, seed) member that is not finished yet, each in
``out/<arm>/seed-<s>/`` with its own ``result.json`` and ``manifest.json`` (so a study is
resumable: finished members are never retrained, an interrupted one continues from its last
checkpoint), then :func:`analyse` computes what METHOD.md §7–8 reports and :func:`write_report`
writes ``study.json``, ``study.md`` and the figures.

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

__all__ = ["PAPER_SEEDS", "StudySpec", "StudyError", "arm_config", "member_dir", "run_study",
           "collect", "analyse", "report", "write_report", "markdown_tables"]

#: METHOD.md §7: the seeds of the paper's n = 20 studies; ``--seeds N`` takes the first N.
PAPER_SEEDS = (2, 3, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 42, 43, 47, 53, 123, 456, 789, 1337)
MODES = ("sequential", "vmap", "unroll", "map")
#: Scalar test metrics reported per arm when a task's result has them (besides test_score).
EXTRA_METRICS = ("acc", "challenge_f1")


class StudyError(ValueError):
    """The study directory or spec is inconsistent (nothing was overwritten)."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A seed study as data.

    ``task``: ``"medmnist:<flag>"``, ``"cinc2017"``, ``"ptbxl"`` or ``"synthetic"``.
    ``arms``: initialisations (``"kaiming"`` means He-normal for ResNet-18). ``data``,
    ``model`` and ``train`` are options passed to the task, the model and
    :class:`~detjax.train.TrainConfig`. ``baseline`` is the arm the others are tested
    against; ``delta`` the TOST equivalence margin (METHOD: 0.015 AUC).
    ``mode``/``group_size`` choose how members run; they do not enter the members' configs.
    """

    task: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str = "kaiming"
    delta: float = 0.015
    mode: str = "sequential"
    group_size: int = 0

    def __post_init__(self):
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise StudyError(f"arms must be distinct and non-empty, got {list(self.arms)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
        if self.mode not in MODES:
            raise StudyError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.epochs < 1 or self.group_size < 0:
            raise StudyError(f"epochs must be >= 1 and group_size >= 0, got {self.epochs}, {self.group_size}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StudySpec":
        d = dict(d)
        d["arms"], d["seeds"] = tuple(d["arms"]), tuple(int(s) for s in d["seeds"])
        return cls(**d)


def arm_config(spec: StudySpec, arm: str, seed: int = 0) -> TrainConfig:
    """The :class:`TrainConfig` of member ``(arm, seed)``: the task's protocol, seeded order."""
    task, _, flag = spec.task.partition(":")
    train = {"order": "seeded", **dict(spec.train)}
    common = dict(epochs=spec.epochs, seed=int(seed), **train)
    if task == "medmnist":
        from detjax.data.medmnist import dataset_info

        if not flag:
            raise StudyError("medmnist studies name the set: --task medmnist:breastmnist")
        flag = flag.lower()
        loss = "bce" if flag == "chestmnist" else "ce"
        model = {"in_channels": dataset_info(flag).n_channels, **dict(spec.model)}
        base = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, loss=loss,
                    eval_every=1, augment=True)
        return TrainConfig(task="medmnist", data={"flag": flag, **dict(spec.data)}, arch="resnet18", model=model,
                           init="he_normal" if arm == "kaiming" else arm, **{**base, **common})
    if flag:
        raise StudyError(f"task {task!r} takes no ':' suffix, got {spec.task!r}")
    if task == "cinc2017":
        base = dict(optimizer="adam", learning_rate=1e-3, loss="ce", eval_every=1)
        return TrainConfig(task="cinc2017", data=dict(spec.data), arch="conformer",
                           model={"in_leads": 1, **dict(spec.model)}, init=arm, **{**base, **common})
    if task == "ptbxl":
        base = dict(optimizer="adam", learning_rate=1e-3, loss="weighted_bce", eval_every=10)
        leads = len(spec.data.get("leads") or ()) or 12
        return TrainConfig(task="ptbxl", data=dict(spec.data), arch="conformer",
                           model={"in_leads": leads, **dict(spec.model)}, init=arm, **{**base, **common})
    if task == "synthetic":
        base = dict(optimizer="adam", learning_rate=1e-3, loss="weighted_bce", eval_every=1, batch_size=32)
        return TrainConfig(task="synthetic", data=dict(spec.data), arch="tiny", model=dict(spec.model),
                           init=arm, **{**base, **common})
    raise StudyError(f"unknown study task {spec.task!r}; expected medmnist:<flag>, cinc2017, ptbxl or synthetic")


def member_dir(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / arm / f"seed-{int(seed)}"


def _finished(out: Path, spec: StudySpec, arm: str, seed: int) -> dict | None:
    """The member's result if it finished with this config; ``None`` if it has not finished."""
    path = member_dir(out, arm, seed) / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    expected = arm_config(spec, arm, seed).hash()
    if result.get("config_hash") != expected:
        raise StudyError(f"{path} was trained with config hash {result.get('config_hash')}, not {expected}: "
                         "this directory holds another study; nothing was overwritten. Choose another --out")
    return result


def _check_spec(out: Path, spec: StudySpec) -> None:
    """Refuses a directory of a study with another task/epochs/options (seeds and arms may grow)."""
    path = out / "study_spec.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    fixed = ("task", "epochs", "data", "model", "train")
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
    configs = {arm: arm_config(spec, arm) for arm in spec.arms}  # validates every arm before training
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
        if data is None:  # the data are the same for every arm and seed (only the seed-free options)
            data = tasks.load_task(configs[arm])
        if spec.mode == "sequential":
            for seed in pending:
                train_and_evaluate(arm_config(spec, arm, seed), data, member_dir(out, arm, seed), resume=True,
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
    path = out / "study_spec.json"
    if not path.exists():
        raise StudyError(f"{out} holds no study (no study_spec.json)")
    spec = StudySpec.from_dict(json.loads(path.read_text()))
    summary = analyse(collect(out, spec), spec)
    write_report(summary, out)
    return summary


# ------------------------------------------------------------------------ analysis


def collect(out: str | Path, spec: StudySpec) -> dict[str, list[dict[str, Any]]]:
    """Per arm, the finished members' records (seed order): metrics, per-class AUC, hashes, history."""
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
            records[arm].append({
                "seed": int(seed),
                "test_score": float(result["test_score"]),
                **{m: float(result[m]) for m in EXTRA_METRICS if isinstance(result.get(m), (int, float))},
                "per_class_auc": result.get("per_class_auc") or {},
                "best_epoch": result.get("best_epoch"),
                "best_val_score": result.get("best_val_score"),
                "init_sha256": result.get("init_sha256"),
                "final_sha256": result.get("final_sha256"),
                "execution": (result.get("execution") or {}).get("mode", "sequential"),
                "history": [{"epoch": h["epoch"], "train_loss": h["train_loss"],
                             **({"val_score": h["val"]["score"]} if "val" in h else {})} for h in history],
            })
    return records


def _per_class_matrix(records: Sequence[dict], labels: Sequence[str]) -> np.ndarray:
    return np.array([[np.nan if r["per_class_auc"].get(c) is None else r["per_class_auc"][c] for c in labels]
                     for r in records], dtype=np.float64).reshape(len(records), len(labels))


def _safe(fn, *args, **kwargs):
    """A statistic, or the reason it cannot be computed (e.g. fewer than 2 seeds)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        return {"not_computed": str(exc)}


def analyse(records: Mapping[str, Sequence[dict]], spec: StudySpec) -> dict[str, Any]:
    """The study's statistics (METHOD.md §7–8), from :func:`collect`'s records.

    Per arm: summary (n, mean, sd, min, max, range) of ``test_score`` (macro AUC) and the
    task's other scalar metrics, per-class AUC tables, and whether all members' final hashes
    are distinct. Against ``spec.baseline``: Welch t, Levene, Mann–Whitney U, Cohen's d and
    TOST (margin ``spec.delta``) on ``test_score``. Across all arms with three or more arms:
    Friedman on the seeds every arm finished (paired by seed).
    """
    arms: dict[str, Any] = {}
    labels: list[str] = []
    for recs in records.values():
        for r in recs:
            labels += [c for c in r["per_class_auc"] if c not in labels]
    for arm, recs in records.items():
        entry: dict[str, Any] = {"n": len(recs), "seeds": [r["seed"] for r in recs], "members": list(recs)}
        if recs:
            entry["test_score"] = stats.summary([r["test_score"] for r in recs])
            for m in EXTRA_METRICS:
                if all(m in r for r in recs):
                    entry[m] = stats.summary([r[m] for r in recs])
            if labels:
                entry["per_class"] = stats.per_class_table(_per_class_matrix(recs, labels), labels)
            hashes = [r["final_sha256"] for r in recs]
            entry["distinct_final_hashes"] = len(set(hashes))
        arms[arm] = entry
    comparisons = {}
    base = records.get(spec.baseline, [])
    for arm, recs in records.items():
        if arm == spec.baseline or not base:
            continue
        a, b = [r["test_score"] for r in recs], [r["test_score"] for r in base]
        comparisons[f"{arm} vs {spec.baseline}"] = {
            "metric": "test_score",
            **_safe(stats.compare_arms, a, b, delta=spec.delta),
            **({"challenge_f1": _safe(stats.compare_arms, [r["challenge_f1"] for r in recs],
                                      [r["challenge_f1"] for r in base], delta=spec.delta)}
               if all("challenge_f1" in r for r in list(recs) + list(base)) else {}),
        }
    friedman = None
    if len(records) >= 3:
        common = sorted(set.intersection(*[{r["seed"] for r in recs} for recs in records.values()]))
        paired = {arm: [next(r["test_score"] for r in recs if r["seed"] == s) for s in common]
                  for arm, recs in records.items()}
        friedman = {"arms": list(records), "seeds": common, **_safe(stats.friedman, paired)}
    return {"spec": spec.to_dict(), "labels": labels, "arms": arms, "comparisons": comparisons,
            "friedman": friedman}


# ------------------------------------------------------------------------- reports


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def markdown_tables(summary: Mapping[str, Any]) -> str:
    """The study as markdown: per-arm table, tests against the baseline, Friedman, per-class ranges."""
    spec = summary["spec"]
    lines = [f"# Seed study: {spec['task']}, {len(spec['seeds'])} seeds, {spec['epochs']} epochs", "",
             "test_score is the test macro AUC at the best-validation epoch.", "",
             "| arm | n | test_score mean ± sd | min – max | range |"
             + "".join(f" {m} mean ± sd |" for m in EXTRA_METRICS if any(m in a for a in summary["arms"].values()))
             + " distinct final hashes |",
             "|---|---|---|---|---|" + "".join("---|" for m in EXTRA_METRICS
                                                  if any(m in a for a in summary["arms"].values())) + "---|"]
    for arm, a in summary["arms"].items():
        if not a["n"]:
            lines.append(f"| {arm} | 0 | – | – | – |")
            continue
        s = a["test_score"]
        row = f"| {arm} | {s['n']} | {_fmt(s['mean'])} ± {_fmt(s['sd'])} | {_fmt(s['min'])} – {_fmt(s['max'])} | {_fmt(s['range'])} |"
        for m in EXTRA_METRICS:
            if any(m in x for x in summary["arms"].values()):
                row += f" {_fmt(a[m]['mean'])} ± {_fmt(a[m]['sd'])} |" if m in a else " – |"
        lines.append(row + f" {a['distinct_final_hashes']} of {a['n']} |")
    if summary["comparisons"]:
        lines += ["", "| comparison (test_score) | Δ mean | Welch p | Levene p | Mann–Whitney p | Cohen's d | "
                  f"TOST p (δ={spec['delta']}) | equivalent |", "|---|---|---|---|---|---|---|---|"]
        for name, c in summary["comparisons"].items():
            if "not_computed" in c:
                lines.append(f"| {name} | {c['not_computed']} | | | | | | |")
                continue
            lines.append(f"| {name} | {_fmt(c['a']['mean'] - c['b']['mean'])} | {_fmt(c['welch_t']['p'])} | "
                         f"{_fmt(c['levene']['p'])} | {_fmt(c['mann_whitney']['p'])} | {_fmt(c['cohens_d'], 2)} | "
                         f"{_fmt(c['tost']['p'])} | {_fmt(c['tost']['equivalent'])} |")
    if summary.get("friedman"):
        f = summary["friedman"]
        lines += ["", "Basis comparison (Friedman, paired by seed over " + ", ".join(f["arms"]) + "): "
                  + (f"χ² = {_fmt(f['chi2'], 3)}, p = {_fmt(f['p'])}, n = {f['n_seeds']} seeds"
                     if "chi2" in f else f["not_computed"])]
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
    return "\n".join(lines) + "\n"


def write_report(summary: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """Writes ``study.json``, ``study.md`` and (with matplotlib) the figures into ``out``."""
    out = Path(out)
    paths = {"json": out / "study.json", "markdown": out / "study.md"}
    manifest_lib.write_json_atomic(paths["json"], summary)
    text = markdown_tables(summary)
    tmp = paths["markdown"].with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(paths["markdown"])
    try:
        from detjax import plots
    except ImportError:  # pragma: no cover - matplotlib is the optional `plots` extra
        return paths
    members = {arm: a["members"] for arm, a in summary["arms"].items() if a["n"]}
    if members:
        paths["spread"] = plots.plot_per_class_spread(members, summary["labels"], out / "per_class_spread.png",
                                                      title=f"{summary['spec']['task']}: test AUC over seeds")
        paths["convergence"] = plots.plot_convergence(members, out / "convergence.png",
                                                      title=f"{summary['spec']['task']}: mean ± 1 sd over seeds")
    return paths
