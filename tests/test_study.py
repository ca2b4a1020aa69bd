"""Seed studies (detjax.study, experiments/seed_study.py): configs, resumable runs, statistics, report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detjax import stats, study
from detjax.study import StudyError, StudySpec

ROOT = Path(__file__).resolve().parents[1]
SMALL_DATA = {"n_train": 32, "n_val": 24, "n_test": 24, "length": 64, "leads": 3, "num_classes": 4, "seed": 1}


def small_spec(**overrides):
    base = dict(task="synthetic", arms=("dct", "kaiming"), seeds=(2, 3), epochs=1, data=SMALL_DATA,
                train={"batch_size": 16})
    base.update(overrides)
    return StudySpec(**base)


def test_arm_configs_follow_each_tasks_protocol():
    spec = StudySpec(task="medmnist:breastmnist", arms=("dct", "kaiming"), seeds=(2,), epochs=3, model={"width": 16})
    dct, kaiming = study.arm_config(spec, "dct", 2), study.arm_config(spec, "kaiming", 7)
    assert (dct.arch, dct.init, dct.optimizer, dct.loss, dct.augment, dct.order) == (
        "resnet18", "dct", "sgd", "ce", True, "seeded")
    assert kaiming.init == "he_normal" and kaiming.seed == 7
    assert dict(dct.model) == {"in_channels": 1, "width": 16} and dct.data["flag"] == "breastmnist"
    cinc = study.arm_config(StudySpec(task="cinc2017", arms=("mixed",), seeds=(2,), epochs=4), "mixed", 2)
    assert (cinc.arch, dict(cinc.model), cinc.loss, cinc.optimizer) == ("conformer", {"in_leads": 1}, "ce", "adam")
    ptbxl = study.arm_config(StudySpec(task="ptbxl", arms=("dct",), seeds=(2,), epochs=4), "dct", 2)
    assert (ptbxl.loss, ptbxl.eval_every, dict(ptbxl.model)) == ("weighted_bce", 10, {"in_leads": 12})


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="medmnist"), "name the set"),
    (dict(task="imagenet"), "unknown study task"),
    (dict(task="cinc2017:x"), "no ':' suffix"),
])
def test_bad_tasks_are_named(kwargs, message):
    with pytest.raises(StudyError, match=message):
        study.arm_config(small_spec(**kwargs), "dct")


@pytest.mark.parametrize("kwargs, message", [
    (dict(arms=()), "arms"), (dict(arms=("dct", "dct")), "arms"), (dict(seeds=(2, 2)), "seeds"),
    (dict(mode="pmap"), "unknown mode"), (dict(epochs=0), "epochs"),
])
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(StudyError, match=message):
        small_spec(**kwargs)


def _records(scores, per_class=None):
    return [{"seed": s, "test_score": v, "per_class_auc": (per_class or {}).get(s, {}), "final_sha256": f"h{s}{v}",
             "history": []} for s, v in scores.items()]


def test_analysis_is_the_stats_module_applied_to_the_members():
    dct = {2: 0.90, 3: 0.91, 7: 0.905, 11: 0.895}
    kaiming = {2: 0.88, 3: 0.92, 7: 0.86, 11: 0.90}
    hartley = {2: 0.91, 3: 0.90, 7: 0.90, 11: 0.899}
    per_class = {2: {"A": 0.8, "B": 0.7}, 3: {"A": 0.9, "B": None}, 7: {"A": 0.85, "B": 0.75}, 11: {"A": 0.8}}
    spec = small_spec(arms=("dct", "hartley", "kaiming"), seeds=(2, 3, 7, 11))
    summary = study.analyse({"dct": _records(dct, per_class), "hartley": _records(hartley),
                             "kaiming": _records(kaiming)}, spec)
    expected = stats.compare_arms(list(dct.values()), list(kaiming.values()), delta=0.015)
    got = summary["comparisons"]["dct vs kaiming"]
    assert got["welch_t"] == expected["welch_t"] and got["tost"] == expected["tost"]
    assert got["cohens_d"] == expected["cohens_d"]
    assert summary["arms"]["dct"]["test_score"] == stats.summary(list(dct.values()))
    assert summary["friedman"]["seeds"] == [2, 3, 7, 11]
    assert summary["friedman"]["p"] == stats.friedman({"dct": list(dct.values()), "hartley": list(hartley.values()),
                                                       "kaiming": list(kaiming.values())})["p"]
    # Per-class tables skip missing classes (None / absent) instead of inventing values.
    assert summary["labels"] == ["A", "B"]
    assert summary["arms"]["dct"]["per_class"]["B"]["n"] == 2
    assert summary["arms"]["dct"]["per_class"]["A"]["range"] == pytest.approx(0.1)
    text = study.markdown_tables(summary)
    assert "| dct vs kaiming |" in text and "Friedman" in text and "| A |" in text


def test_a_single_seed_reports_why_tests_are_missing():
    summary = study.analyse({"dct": _records({2: 0.9}), "kaiming": _records({2: 0.8})},
                            small_spec(seeds=(2,)))
    assert "not_computed" in summary["comparisons"]["dct vs kaiming"]
    assert "needs at least 2" in study.markdown_tables(summary)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    log = []
    summary = study.run_study(small_spec(), out, progress=False, log=log.append)
    return out, summary, log


def test_run_study_writes_members_report_and_figures(finished_study):
    out, summary, log = finished_study
    for arm in ("dct", "kaiming"):
        for seed in (2, 3):
            result = json.loads((out / arm / f"seed-{seed}" / "result.json").read_text())
            assert result["config_hash"] == study.arm_config(small_spec(), arm, seed).hash()
            assert (out / arm / f"seed-{seed}" / "manifest.json").exists()
    written = json.loads((out / "study.json").read_text())
    assert written["arms"]["dct"]["n"] == 2 and written["spec"]["task"] == "synthetic"
    # The state's hash covers its PRNG key, derived from the seed, so every member's init differs.
    members = summary["arms"]
    assert len({m["init_sha256"] for m in members["kaiming"]["members"]}) == 2
    assert members["dct"]["distinct_final_hashes"] == 2  # the seeded order differs
    for name in ("study.md", "per_class_spread.png", "convergence.png"):
        assert (out / name).stat().st_size > 0
    assert "| dct vs kaiming |" in (out / "study.md").read_text()


def test_a_rerun_trains_nothing_and_new_seeds_are_added(finished_study, tmp_path):
    out, summary, _ = finished_study
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/result.json")}
    log = []
    again = study.run_study(small_spec(), out, progress=False, log=log.append)
    assert all("2 of 2 seeds finished" in line for line in log)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/result.json")} == before
    assert again["arms"]["kaiming"]["test_score"] == summary["arms"]["kaiming"]["test_score"]


def test_a_directory_of_another_study_is_refused(finished_study):
    out, _, _ = finished_study
    with pytest.raises(StudyError, match="epochs"):
        study.run_study(small_spec(epochs=2), out, progress=False, log=lambda *_: None)


def test_vmapped_group_members_join_the_study(finished_study, tmp_path):
    out, summary, _ = finished_study
    spec = small_spec(arms=("kaiming",), seeds=(2, 3, 7, 11), mode="vmap")
    import shutil

    shutil.copytree(out / "kaiming", tmp_path / "kaiming")
    log = []
    result = study.run_study(spec, tmp_path, progress=False, log=log.append)
    assert log == ["arm kaiming: 2 of 4 seeds finished, training [7, 11]"]
    executions = {m["seed"]: m["execution"] for m in result["arms"]["kaiming"]["members"]}
    assert executions == {2: "sequential", 3: "sequential", 7: "vmap", 11: "vmap"}
    assert (tmp_path / "kaiming" / "groups" / "7-11" / "checkpoints").is_dir()


def test_cli_report_only(finished_study):
    out, _, _ = finished_study
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "experiments" / "seed_study.py")]
    (out / "study.md").unlink()
    ok = subprocess.run(script + ["--out", str(out), "--report-only"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "| dct vs kaiming |" in ok.stdout and (out / "study.md").exists()


def test_report_of_a_directory_without_a_study_is_refused(tmp_path):
    with pytest.raises(StudyError, match="no study_spec.json"):
        study.report(tmp_path)
