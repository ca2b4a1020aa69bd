"""Out-of-distribution scores from the spare simplex-ETF vertex, synthetic shifts, robustness.

The Conformer's ``K`` heads start at ``K`` of the ``K + 1`` vertices of a simplex ETF in
``K + 2`` dimensions (``di.simplex_etf(K + 1, K + 2)``; 12 of 13 for PTB-XL). Vertex ``K`` is
never used. Because the vertices of a simplex sum to zero, :math:`v_K = -\\sum_{k<K} v_k`:
a bottleneck feature ``h`` aligned with the spare vertex is one that points away from every
class vertex at once. The OOD scores (higher = more out-of-distribution) are

* ``spare_vertex``: :math:`\\cos(h, v_K) = h \\cdot v_K / (\\lVert h \\rVert \\lVert v_K \\rVert)`
  (``h`` is the sown intermediate ``"hidden"``; Conformer only);
* ``max_logit``: :math:`-\\max_k z_k`;
* ``energy``: :math:`-\\log\\sum_k e^{z_k}` negated, i.e. :math:`-\\mathrm{LSE}(z)` for softmax
  tasks and :math:`-\\sum_k \\log(1 + e^{z_k})` (the joint energy of independent sigmoids) for
  multi-label and binary tasks.

AUROC of "shifted/OOD = positive" against the in-distribution test records; 0.5 is chance,
below 0.5 means the score ranks the shifted records as *more* typical.

Shifts (:data:`SHIFTS`), applied in millivolts (a run's inputs are mapped back with its
recorded normalisation ``x_mV = x' sigma + mu`` and forward again afterwards), each with its
own numpy PCG64 stream (seed from the shift's name and severity):

* ``gaussian_noise``: white noise per record and lead at SNR ``s`` dB,
  :math:`\\sigma_n = \\mathrm{rms}(x - \\bar x) \\cdot 10^{-s/20}`;
* ``baseline_wander``: :math:`a \\sin(2\\pi\\, 0.3\\,t + \\phi)` mV, phase per record;
* ``powerline``: 50 Hz hum :math:`a \\cos(2\\pi\\, 50\\, t + \\phi)` mV (at 100 Hz sampling it is the
  Nyquist tone :math:`a \\cos\\phi\\,(-1)^n`), phase per record;
* ``flatline``: ``s`` randomly chosen leads of each record set to 0 mV;
* ``lead_swap``: ``s`` random pairs of leads exchanged per record (12-lead runs only);
* ``amplitude``: every value times ``s``.

Robustness (:func:`evaluate_run`) is the task's own test metric under each shift and
severity, next to the clean one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detjax import manifest as manifest_lib
from detjax.data.splits import normalise
from detjax.plots import pyplot, save_figure

__all__ = ["SHIFTS", "SCORES", "apply_shift", "spare_vertex", "ood_scores", "auroc", "load_run",
           "make_forward", "evaluate_run", "robustness_table", "robustness_markdown", "markdown", "plot",
           "plot_robustness", "study_robustness"]

#: shift -> severities, mildest first.
SHIFTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (20.0, 10.0, 5.0, 0.0),   # SNR dB
    "baseline_wander": (0.1, 0.5, 1.0, 2.0),    # mV at 0.3 Hz
    "powerline": (0.05, 0.1, 0.5, 1.0),         # mV at 50 Hz
    "flatline": (1.0, 3.0, 6.0, 12.0),          # leads set to 0 mV
    "lead_swap": (1.0, 3.0, 6.0),               # random lead pairs exchanged
    "amplitude": (0.25, 0.5, 2.0, 4.0),         # gain factor
}
UNITS = {"gaussian_noise": "dB SNR", "baseline_wander": "mV", "powerline": "mV", "flatline": "leads",
         "lead_swap": "pairs", "amplitude": "x"}
SCORES = ("spare_vertex", "max_logit", "energy")
FS = 100.0


def _rng(shift: str, severity: float) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{shift}:{severity!r}".encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(seed))


def apply_shift(x_mv: np.ndarray, shift: str, severity: float, fs: float = FS) -> np.ndarray:
    """``x_mv (n, T, L)`` with ``shift`` at ``severity`` (see the module docstring), float32."""
    x = np.asarray(x_mv, dtype=np.float64)
    n, t_len, leads = x.shape
    rng = _rng(shift, severity)
    t = np.arange(t_len) / fs
    if shift == "gaussian_noise":
        rms = np.sqrt(np.mean((x - x.mean(axis=1, keepdims=True)) ** 2, axis=1, keepdims=True))
        out = x + rng.standard_normal(x.shape) * rms * 10.0 ** (-severity / 20.0)
    elif shift in ("baseline_wander", "powerline"):
        freq = 0.3 if shift == "baseline_wander" else 50.0
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        wave = np.sin if shift == "baseline_wander" else np.cos
        out = x + severity * wave(2 * np.pi * freq * t[None, :, None] + phase)
    elif shift == "flatline":
        k = min(int(severity), leads)
        out = x.copy()
        for i in range(n):
            out[i, :, rng.permutation(leads)[:k]] = 0.0
    elif shift == "lead_swap":
        if leads < 2:
            raise ValueError("lead_swap needs at least two leads")
        out = x.copy()
        for i in range(n):
            for _ in range(int(severity)):
                a, b = rng.choice(leads, 2, replace=False)
                out[i, :, [a, b]] = out[i, :, [b, a]]
    elif shift == "amplitude":
        out = x * severity
    else:
        raise ValueError(f"unknown shift {shift!r}; known: {sorted(SHIFTS)}")
    return out.astype(np.float32)


def spare_vertex(num_classes: int) -> np.ndarray:
    """Vertex ``K`` of ``simplex_etf(K + 1, K + 2)``, the one no head uses (float64, unit norm)."""
    import detjax.initializers as di

    return di.simplex_etf(num_classes + 1, num_classes + 2)[num_classes]


def ood_scores(logits: np.ndarray, hidden: np.ndarray | None, *, multilabel: bool) -> dict[str, np.ndarray]:
    """The three OOD scores per record (higher = more OOD); ``spare_vertex`` only with ``hidden``."""
    z = np.asarray(logits, dtype=np.float64)
    if multilabel:
        energy = -np.sum(np.logaddexp(0.0, z), axis=1)
    else:
        m = z.max(axis=1, keepdims=True)
        energy = -(m[:, 0] + np.log(np.sum(np.exp(z - m), axis=1)))
    out = {"max_logit": -z.max(axis=1), "energy": energy}
    if hidden is not None:
        h = np.asarray(hidden, dtype=np.float64)
        v = spare_vertex(z.shape[1])
        out["spare_vertex"] = (h @ v) / (np.linalg.norm(h, axis=1) * np.linalg.norm(v) + 1e-12)
    return out


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float | None:
    """ROC AUC with the OOD records as positives (``None`` if either side is empty)."""
    from sklearn.metrics import roc_auc_score

    if len(in_scores) == 0 or len(out_scores) == 0:
        return None
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


# ---------------------------------------------------------------------------- a trained run


def load_run(run_dir: str | Path):
    """``(config, model, variables, manifest)`` of a finished run: the best-validation weights
    restored from its final checkpoint and checked against ``result.json``'s
    ``best_params_sha256``."""
    from detjax.manifest import read_manifest
    from detjax.train import TrainConfig, restore_final_checkpoint, weights_sha256

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "finished":
        raise ValueError(f"{run_dir} holds no finished run (status {manifest.get('status')!r})")
    config = TrainConfig.from_dict(manifest["config"])
    model, _, best, _ = restore_final_checkpoint(run_dir, manifest, config)
    digest = weights_sha256(best)
    if digest != manifest["metrics"].get("best_params_sha256"):
        raise ValueError(f"{run_dir}: restored best weights hash to {digest}, result.json records "
                         f"{manifest['metrics'].get('best_params_sha256')}")
    variables = {"params": best["params"]}
    if best["batch_stats"]:
        variables["batch_stats"] = best["batch_stats"]
    return config, model, variables, manifest


def make_forward(model, variables, batch_size: int = 256) -> Callable[[np.ndarray], tuple[np.ndarray, Any]]:
    """``forward(x) -> (logits, hidden | None)`` in padded batches of ``batch_size`` (one compile)."""
    import jax

    @jax.jit
    def apply(x):
        logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
        hidden = state.get("intermediates", {}).get("hidden")
        return logits, (hidden[0] if hidden is not None else None)

    def forward(x):
        from detjax.train import predict

        return predict(lambda _, chunk: apply(chunk), None, np.asarray(x), batch_size)

    return forward


def _norm(manifest: Mapping[str, Any]) -> dict[str, float]:
    norm = (manifest.get("data_info") or {}).get("norm") or {}
    if "mean" not in norm or "std" not in norm:
        raise ValueError("the run's manifest records no normalisation (data_info.norm): not an ECG run")
    return {"mean": float(norm["mean"]), "std": float(norm["std"])}


def _headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"test_score": metrics.get("score"), "macro_auc": metrics.get("macro_auc"),
            **({"challenge_f1": metrics["challenge_f1"]} if "challenge_f1" in metrics else {})}


def _cinc_noisy_inputs(config, manifest, n_leads: int, cinc_dir: str | None = None) -> dict[str, Any] | None:
    """CinC 2017 records of folds 9-10 in the run's input format: ``{"noisy", "clean", "note"}``.

    ``noisy``: class ``~`` (folds 9 and 10); ``clean``: classes N/A/O of fold 10. Lead I is the
    CinC lead, other leads 0 mV; an ``af_transfer`` run's baseline removal is applied first.
    ``None`` when the run trained on ``~`` (task ``cinc2017``, or a CinC-source ``af_transfer``
    run with ``cinc_noisy="negative"``) or no CinC folder is known.
    """
    from detjax import transfer
    from detjax.data import cinc2017

    data = dict(config.data)
    if config.task == "cinc2017" or (config.task == "af_transfer" and data.get("source") == "cinc2017"
                                     and data.get("cinc_noisy") == "negative"):
        return None
    cinc_dir = cinc_dir or data.get("cinc_dir")
    try:
        d = cinc2017.load_cinc2017(cinc_dir, folds=data.get("cinc_folds"))
    except ValueError:
        return None  # no CinC folder known (no $DETJAX_CINC2017_DIR)
    tilde = cinc2017.CLASSES.index("~")
    raw = {"noisy": np.concatenate([d["x_val"][d["y_val"] == tilde], d["x_test"][d["y_test"] == tilde]]),
           "clean": d["x_test"][d["y_test"] != tilde]}
    norm = _norm(manifest)
    out: dict[str, Any] = {}
    for name, x in raw.items():
        mv = transfer._millivolts(x, d["norm"])
        if config.task == "af_transfer":
            mv = transfer.remove_baseline(mv, data.get("baseline", transfer.DEFAULT_BASELINE))
        full = np.zeros((mv.shape[0], mv.shape[1], n_leads), np.float32)
        full[:, :, :1] = mv
        out[name] = normalise(full, norm)
    out["note"] = ("CinC `~` of folds 9-10 vs CinC N/A/O of fold 10" + (", in lead I with the other leads at 0 mV"
                                                                       if n_leads > 1 else ""))
    return out


def evaluate_run(run_dir: str | Path, *, shifts: Mapping[str, Sequence[float]] | None = None,
                 real_ood: bool = True, cinc_dir: str | None = None, log=print) -> dict[str, Any]:
    """OOD AUROCs and robustness of the finished run in ``run_dir`` (the ``ood.json`` object).

    In-distribution: the run's own test split, re-loaded from its config and checked against
    the manifest's data fingerprint. For each shift and severity: AUROC of every score
    (shifted copies vs clean test records) and the task's test metrics on the shifted copies.
    Real OOD (``real_ood``): CinC 2017 ``~`` records (see :func:`_cinc_noisy_inputs`).
    """
    from detjax import tasks

    shifts = SHIFTS if shifts is None else shifts
    config, model, variables, manifest = load_run(run_dir)
    data = tasks.load_task(config)
    if data.fingerprint()["sha256"] != manifest["data_fingerprint"]["sha256"]:
        raise ValueError(f"{run_dir}: the task data re-loaded from the config differ from the run's "
                         "(data fingerprint mismatch)")
    if data.test_x.ndim != 3:
        raise ValueError(f"{run_dir}: OOD shifts are defined for ECG runs, not {config.task}")
    norm = _norm(manifest)
    multilabel = config.loss != "ce"
    forward = make_forward(model, variables, min(config.eval_batch_size, data.test_x.shape[0]))  # little padding
    to_scores = (lambda z: 1 / (1 + np.exp(-z))) if multilabel else (
        lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))

    def run(x):
        z, h = forward(x)
        return ood_scores(z, h, multilabel=multilabel), dict(data.evaluate(data.test_y, to_scores(z)))

    clean_scores, clean_metrics = run(data.test_x)
    n_leads = data.test_x.shape[2]
    x_mv = data.test_x.astype(np.float64) * norm["std"] + norm["mean"]
    rows = []
    for shift, severities in shifts.items():
        if shift == "lead_swap" and n_leads < 2:
            continue
        for sev in severities:
            if shift == "flatline" and sev > n_leads:
                continue  # no more leads to flatten
            scores, metrics = run(normalise(apply_shift(x_mv, shift, sev), norm))
            rows.append({"shift": shift, "severity": sev, "unit": UNITS[shift],
                         "auroc": {k: auroc(clean_scores[k], scores[k]) for k in clean_scores}, **_headline(metrics)})
            log(f"  {shift} {sev:g} {UNITS[shift]}: test {metrics.get('score'):.4f}, AUROC "
                + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1]["auroc"].items() if v is not None))
    real = None
    if real_ood:
        inputs = _cinc_noisy_inputs(config, manifest, n_leads, cinc_dir)
        if inputs is None:
            real = {"skipped": "the run trained on CinC's ~ class (or no CinC folder is known)"}
        else:
            s_noisy = ood_scores(*forward(inputs["noisy"]), multilabel=multilabel)
            s_clean = ood_scores(*forward(inputs["clean"]), multilabel=multilabel)
            real = {"note": inputs["note"], "n_noisy": int(inputs["noisy"].shape[0]),
                    "n_clean": int(inputs["clean"].shape[0]), "n_in_distribution": int(data.test_x.shape[0]),
                    "auroc_noisy_vs_clean_cinc": {k: auroc(s_clean[k], s_noisy[k]) for k in s_noisy},
                    "auroc_noisy_vs_in_distribution": {k: auroc(clean_scores[k], s_noisy[k]) for k in s_noisy}}
    return manifest_lib.strict_json({
        "run_dir": str(Path(run_dir).absolute()), "task": config.task, "arch": config.arch, "init": config.init,
        "config_hash": manifest["config_hash"], "best_params_sha256": manifest["metrics"]["best_params_sha256"],
        "n_test": int(data.test_x.shape[0]), "scores": [s for s in SCORES if s in clean_scores],
        "score_definitions": {"spare_vertex": "cos(h, v_K), v_K the unused ETF vertex",
                              "max_logit": "-max_k z_k",
                              "energy": "-sum_k softplus(z_k) (sigmoid tasks) or -logsumexp(z) (softmax)"},
        "clean": _headline(clean_metrics), "shifts": rows, "real_ood": real,
    })


# ---------------------------------------------------------------------------- reports


def _f(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: Mapping[str, Any]) -> str:
    """``ood.json`` as markdown: one row per shift and severity (test metric, AUROC per score)."""
    scores = result["scores"]
    lines = [f"# OOD and robustness: {result['task']} {result['arch']} init={result['init']}", "",
             f"Clean test score {_f(result['clean']['test_score'], 4)} on {result['n_test']} records. "
             "AUROC: shifted copies (positive) vs the clean test records; 0.5 = chance.", "",
             "| shift | severity | test score | " + " | ".join(f"AUROC {s}" for s in scores) + " |",
             "|---|---|---|" + "---|" * len(scores)]
    for r in result["shifts"]:
        lines.append(f"| {r['shift']} | {r['severity']:g} {r['unit']} | {_f(r['test_score'], 4)} | "
                     + " | ".join(_f(r['auroc'].get(s)) for s in scores) + " |")
    real = result.get("real_ood")
    if real and "skipped" not in real:
        lines += ["", f"Real OOD, CinC 2017 `~` ({real['n_noisy']} records): {real['note']}", "",
                  "| comparison | " + " | ".join(scores) + " |", "|---|" + "---|" * len(scores),
                  "| `~` vs clean CinC | " + " | ".join(_f(real['auroc_noisy_vs_clean_cinc'].get(s)) for s in scores)
                  + " |",
                  "| `~` vs in-distribution test | "
                  + " | ".join(_f(real['auroc_noisy_vs_in_distribution'].get(s)) for s in scores) + " |"]
    elif real:
        lines += ["", f"Real OOD: skipped ({real['skipped']})."]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: str | Path) -> Path | None:
    """Two panels per shift: test score vs severity, AUROC of each score vs severity."""
    plt = pyplot()
    if plt is None:
        return None
    shifts = list(dict.fromkeys(r["shift"] for r in result["shifts"]))
    fig, axes = plt.subplots(2, len(shifts), figsize=(3.2 * len(shifts), 6), squeeze=False)
    for j, shift in enumerate(shifts):
        rows = [r for r in result["shifts"] if r["shift"] == shift]
        xs = list(range(len(rows)))
        labels = [f"{r['severity']:g}" for r in rows]
        ax = axes[0, j]
        ax.plot(xs, [r["test_score"] for r in rows], "o-", color="k")
        ax.axhline(result["clean"]["test_score"], ls="--", color="gray", lw=1)
        ax.set_title(shift, fontsize=9)
        ax.set_xticks(xs, labels)
        if j == 0:
            ax.set_ylabel("test score (clean dashed)")
        ax = axes[1, j]
        for s in result["scores"]:
            ax.plot(xs, [r["auroc"].get(s) if r["auroc"].get(s) is not None else np.nan for r in rows], "o-", label=s)
        ax.axhline(0.5, ls=":", color="gray", lw=1)
        ax.set_ylim(0, 1)
        ax.set_xticks(xs, labels)
        ax.set_xlabel(rows[0]["unit"])
        if j == 0:
            ax.set_ylabel("OOD AUROC")
            ax.legend(fontsize=7)
    fig.suptitle(f"{result['task']} {result['arch']} init={result['init']}", fontsize=10)
    return save_figure(fig, path, dpi=110)


def robustness_table(per_arm: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per arm, per (shift, severity): mean and sd over members of the shifted test score, the
    drop from clean, and the mean AUROC of each score. ``per_arm``: arm -> list of ood.json objects."""
    out: dict[str, Any] = {}
    for arm, results in per_arm.items():
        clean = [r["clean"]["test_score"] for r in results]
        rows = {}
        for r in results:
            for row in r["shifts"]:
                key = f"{row['shift']}@{row['severity']:g}"
                rows.setdefault(key, {"shift": row["shift"], "severity": row["severity"], "unit": row["unit"],
                                      "test": [], "drop": [], "auroc": {}})
                rows[key]["test"].append(row["test_score"])
                rows[key]["drop"].append(r["clean"]["test_score"] - row["test_score"])
                for s, v in row["auroc"].items():
                    rows[key]["auroc"].setdefault(s, []).append(v)
        summary = []
        for row in rows.values():
            summary.append({"shift": row["shift"], "severity": row["severity"], "unit": row["unit"],
                            "n": len(row["test"]), "test_mean": float(np.mean(row["test"])),
                            "test_sd": float(np.std(row["test"], ddof=1)) if len(row["test"]) > 1 else None,
                            "drop_mean": float(np.mean(row["drop"])),
                            "auroc_mean": {s: float(np.mean([v for v in vs if v is not None]))
                                           for s, vs in row["auroc"].items() if any(v is not None for v in vs)}})
        out[arm] = {"n": len(results), "clean_mean": float(np.mean(clean)),
                    "clean_sd": float(np.std(clean, ddof=1)) if len(clean) > 1 else None, "rows": summary}
    return manifest_lib.strict_json(out)


def study_robustness(study_dir: str | Path, *, shifts=None, log=print) -> dict[str, Any]:
    """:func:`evaluate_run` for every finished member ``study_dir/<arm>/seed-<s>`` (writing each
    member's ``ood.json``), then :func:`robustness_table` per arm."""
    from detjax.study import member_dir, stored_spec

    study_dir = Path(study_dir)
    spec = stored_spec(study_dir)
    if spec is None:
        raise FileNotFoundError(2, "no seed study here (no study_spec.json)", str(study_dir))
    per_arm: dict[str, list] = {}
    for arm in spec.arms:
        for seed in spec.seeds:
            member = member_dir(study_dir, arm, seed)
            if not (member / "result.json").exists():
                continue
            path = member / "ood.json"
            if path.exists():
                result = json.loads(path.read_text())
            else:
                log(f"{arm} seed {seed}")
                result = evaluate_run(member, shifts=shifts, real_ood=False, log=log)
                path.write_text(json.dumps(result, indent=2, sort_keys=True))
            per_arm.setdefault(arm, []).append(result)
    return robustness_table(per_arm)


def robustness_markdown(table: Mapping[str, Any]) -> str:
    """The per-arm robustness table as markdown (test score mean ± sd under each shift)."""
    arms = list(table)
    lines = ["| shift | severity | " + " | ".join(f"{a} test (mean ± sd)" for a in arms) + " |",
             "|---|---|" + "---|" * len(arms),
             "| clean | – | " + " | ".join(f"{_f(table[a]['clean_mean'], 4)} ± {_f(table[a]['clean_sd'], 4)}"
                                          for a in arms) + " |"]
    keys = list(dict.fromkeys((r["shift"], r["severity"], r["unit"]) for a in arms for r in table[a]["rows"]))
    for shift, sev, unit in keys:
        cells = []
        for a in arms:
            row = next((r for r in table[a]["rows"] if r["shift"] == shift and r["severity"] == sev), None)
            cells.append("–" if row is None else f"{_f(row['test_mean'], 4)} ± {_f(row['test_sd'], 4)}")
        lines.append(f"| {shift} | {sev:g} {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_robustness(table: Mapping[str, Any], path: str | Path) -> Path | None:
    """Per shift, the mean test score over members vs severity, one line per arm."""
    plt = pyplot()
    if plt is None:
        return None
    arms = list(table)
    shifts = list(dict.fromkeys(r["shift"] for a in arms for r in table[a]["rows"]))
    fig, axes = plt.subplots(1, len(shifts), figsize=(3.2 * len(shifts), 3.2), squeeze=False)
    for j, shift in enumerate(shifts):
        ax = axes[0, j]
        for a in arms:
            rows = [r for r in table[a]["rows"] if r["shift"] == shift]
            xs = list(range(len(rows)))
            ax.errorbar(xs, [r["test_mean"] for r in rows], yerr=[r["test_sd"] or 0 for r in rows], marker="o",
                        label=f"{a} (clean {table[a]['clean_mean']:.3f})", capsize=2)
            ax.set_xticks(xs, [f"{r['severity']:g}" for r in rows])
            ax.set_xlabel(rows[0]["unit"] if rows else "")
        ax.set_title(shift, fontsize=9)
        if j == 0:
            ax.set_ylabel("test score")
            ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)
