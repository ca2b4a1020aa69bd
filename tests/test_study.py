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
SMALL = {"n_train": 32, "n_val": 24, "n_test": 24, "length": 64, "leads": 3, "num_classes": 4, "data_seed": 1,
         "batch_size": 16}


def small_spec(**overrides):
    base = dict(task="synthetic", arms=("dct", "kaiming"), seeds=(2, 3), epochs=1, options=SMALL)
    base.update(overrides)
    return StudySpec(**base)


def test_member_configs_are_the_recipes(tmp_path):
    from detjax import recipes

    spec = StudySpec(task="medmnist:breastmnist", arms=("dct", "kaiming"), seeds=(2,), epochs=3, options={"width": 16})
    dct, kaiming = study.member_config(spec, "dct", 2), study.member_config(spec, "kaiming", 7)
    assert (dct.arch, dct.init, dct.optimizer, dct.loss, dct.augment, dct.order) == (
        "resnet18", "dct", "sgd", "ce", True, "seeded")
    assert kaiming.init == "he_normal" and kaiming.seed == 7
    assert dict(dct.model) == {"in_channels": 1, "width": 16} and dct.data["flag"] == "breastmnist"
    assert dct == recipes.medmnist(flag="breastmnist", init="dct", seed=2, epochs=3, order="seeded", width=16)
    cinc = study.member_config(StudySpec(task="cinc2017", arms=("mixed",), seeds=(2,), epochs=4,
                                         options={"data_dir": str(tmp_path)}), "mixed", 2)
    assert (cinc.arch, dict(cinc.model), cinc.loss, cinc.optimizer) == ("conformer", {"in_leads": 1}, "ce", "adam")
    assert cinc.hash() == recipes.cinc2017(data_dir=tmp_path, init="mixed", seed=2, epochs=4, order="seeded").hash()
    # limb leads: a 6-lead model for 6-lead data (a study once built a 4-lead one from len("limb"))
    ptbxl = study.member_config(StudySpec(task="ptbxl", arms=("dct",), seeds=(2,), epochs=4,
                                          options={"leads": "limb"}), "dct", 2)
    assert (ptbxl.loss, ptbxl.eval_every, dict(ptbxl.model)) == ("weighted_bce", 10, {"in_leads": 6})
    # the released seed keys are a recipe option too
    released = StudySpec(task="ptbxl", arms=("dct",), seeds=(2,), epochs=4, options={"order": "seeded_as_released"})
    assert study.member_config(released, "dct", 2).order == "seeded_as_released"


def test_legacy_study_spec_files_load():
    legacy = {"task": "synthetic", "arms": ["dct"], "seeds": [2], "epochs": 1, "data": {"n_train": 8},
              "model": {}, "train": {"batch_size": 4}, "baseline": "dct"}
    assert StudySpec.from_dict(legacy).options == {"n_train": 8, "batch_size": 4}


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="medmnist"), "flag|set"),
    (dict(task="imagenet"), "unknown task"),
    (dict(task="cinc2017:x"), "no ':' suffix"),
    (dict(options={"width": 3}), "takes no argument"),
])
def test_bad_tasks_are_named(kwargs, message):
    with pytest.raises(StudyError, match=message):
        study.member_config(small_spec(**kwargs), "dct")


@pytest.mark.parametrize("kwargs, message", [
    (dict(arms=()), "arms"), (dict(arms=("dct", "dct")), "arms"), (dict(seeds=(2, 2)), "seeds"),
    (dict(mode="pmap"), "unknown mode"), (dict(epochs=0), "epochs"),
])
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(StudyError, match=message):
        small_spec(**kwargs)


def _records(scores, per_class=None):
    return [{"seed": s, "test_score": v, "per_class_auc": (per_class or {}).get(s, {}), "final_sha256": f"h{s}{v}",
             "init_weights_sha256": "w", "init_sha256": f"i{s}", "history": []} for s, v in scores.items()]


def test_analysis_is_the_stats_module_applied_to_the_members():
    dct = {2: 0.90, 3: 0.91, 7: 0.905, 11: 0.895}
    kaiming = {2: 0.88, 3: 0.92, 7: 0.86, 11: 0.90}
    hartley = {2: 0.91, 3: 0.90, 7: 0.90, 11: 0.899}
    per_class = {2: {"A": 0.8, "B": 0.7}, 3: {"A": 0.9, "B": None}, 7: {"A": 0.85, "B": 0.75}, 11: {"A": 0.8}}
    spec = small_spec(arms=("dct", "hartley", "kaiming"), seeds=(2, 3, 7, 11))
    summary = study.analyse({"dct": _records(dct, per_class), "hartley": _records(hartley),
                             "kaiming": _records(kaiming)}, spec)
    expected = stats.compare_arms(list(dct.values()), list(kaiming.values()), delta=0.015, tost_df="pooled")
    got = summary["comparisons"]["dct vs kaiming"]
    assert got["welch_t"] == expected["welch_t"] and got["tost"] == expected["tost"]
    assert got["tost"]["df_method"] == "pooled" and summary["tost_df"] == "pooled"  # the study default
    assert got["cohens_d"] == expected["cohens_d"] and got["sd_ratio"] == expected["sd_ratio"]
    assert summary["arms"]["dct"]["test_score"] == stats.summary(list(dct.values()))
    assert summary["arms"]["dct"]["distinct_init_weights_hashes"] == 1
    assert summary["arms"]["dct"]["distinct_init_hashes"] == 4
    assert summary["friedman"]["seeds"] == [2, 3, 7, 11]
    assert summary["friedman"]["p"] == stats.friedman({"dct": dct, "hartley": hartley, "kaiming": kaiming})["p"]
    welch = study.analyse({"dct": _records(dct), "kaiming": _records(kaiming)}, small_spec(tost_df="welch"))
    assert welch["comparisons"]["dct vs kaiming"]["tost"] == stats.tost_equivalence(
        list(dct.values()), list(kaiming.values()), df="welch")
    # Per-class tables skip missing classes (None / absent) instead of inventing values.
    assert summary["labels"] == ["A", "B"]
    assert summary["arms"]["dct"]["per_class"]["B"]["n"] == 2
    assert summary["arms"]["dct"]["per_class"]["A"]["range"] == pytest.approx(0.1)
    text = study.markdown_tables(summary)
    assert "| dct vs kaiming |" in text and "Friedman" in text and "| A |" in text


def test_a_single_seed_reports_why_tests_are_missing():
    summary = study.analyse({"dct": _records({2: 0.9}), "kaiming": _records({2: 0.8})},
                            small_spec(seeds=(2,)))
    c = summary["comparisons"]["dct vs kaiming"]
    assert c["welch_t"] is None and "at least 3 values per arm" in c["not_computed"]["welch_t"]
    assert c["a"]["sd"] is None  # one seed: no sd, and no NaN in the report
    assert "Welch's t-test needs at least 3" in study.markdown_tables(summary)
    json.dumps(summary, allow_nan=False)


def test_zero_variance_arms_give_null_and_a_reason():
    seeds = (2, 3, 7, 11)
    arms = ("dct", "hadamard", "kaiming")
    summary = study.analyse({arm: _records(dict.fromkeys(seeds, 0.9)) for arm in arms},
                            small_spec(arms=arms, seeds=seeds))
    c = summary["comparisons"]["dct vs kaiming"]
    for test in ("welch_t", "levene", "mann_whitney", "cohens_d", "sd_ratio", "tost"):
        assert c[test] is None and c["not_computed"][test]
    assert summary["friedman"]["chi2"] is None and "tied within every seed" in summary["friedman"]["not_computed"]
    text = json.dumps(summary, allow_nan=False)  # strict JSON: no Infinity, NaN or placeholder df
    assert "Infinity" not in text and "NaN" not in text
    md = study.markdown_tables(summary)
    assert "both arms have zero variance" in md and "tied within every seed" in md


def test_a_failed_member_is_reported_and_left_out():
    records = {"dct": _records({2: 0.90, 3: 0.91, 7: 0.92, 11: 0.93}),
               "kaiming": _records({2: 0.88, 3: 0.92, 7: 0.86, 11: 0.90})}
    records["dct"][1].update(test_score=None, failed="test_score is nan")
    summary = study.analyse(records, small_spec(seeds=(2, 3, 7, 11)))
    dct = summary["arms"]["dct"]
    assert dct["n"] == 3 and dct["seeds"] == [2, 7, 11]
    assert dct["failed"] == [{"seed": 3, "reason": "test_score is nan", "init_weights_sha256": "w",
                              "init_sha256": "i3", "final_sha256": "h30.91"}]
    assert summary["comparisons"]["dct vs kaiming"]["a"] == stats.summary([0.90, 0.92, 0.93])
    assert "dct seed 3: test_score is nan" in study.markdown_tables(summary)


# The published per-seed test AUCs (n = 20 per arm) of arXiv 2603.28040 and the statistics the
# paper prints for them; each printed value is pinned to the digits printed.
PAPER = json.loads((Path(__file__).parent / "data" / "paper_seed_aucs.json").read_text())


def _printed(value, as_printed):
    """``value`` rounded to the decimal places of ``as_printed`` (0.0155: 4, 8e-05: 5) equals it."""
    from decimal import Decimal

    return round(value, -Decimal(repr(as_printed)).as_tuple().exponent) == as_printed


def _paper_summary(arms):
    """study.analyse on the published AUCs of ``arms`` (study arm name -> fixture arm name)."""
    auc = PAPER["auc"]
    records = {arm: _records({int(s): v for s, v in auc[key].items()}) for arm, key in arms.items()}
    return study.analyse(records, small_spec(arms=tuple(arms), seeds=study.PAPER_SEEDS))


def test_the_study_statistics_reproduce_every_value_the_paper_prints():
    printed = PAPER["paper_statistics"]
    assert all(tuple(int(s) for s in v) == study.PAPER_SEEDS for v in PAPER["auc"].values())
    cases = {"conformer_mixed_vs_kaiming": {"mixed": "conformer_mixed", "kaiming": "conformer_kaiming"},
             "baseline_dct_vs_kaiming": {"dct": "baseline_dct", "kaiming": "baseline_kaiming"}}
    pinned = []
    for name, arms in cases.items():
        summary = _paper_summary(arms)
        (c,) = summary["comparisons"].values()
        assert "not_computed" not in c and c["tost"]["df_method"] == "pooled"
        got = {"welch_p": c["welch_t"]["p"], "welch_p_below": c["welch_t"]["p"], "levene_median_p": c["levene"]["p"],
               "mann_whitney_p": c["mann_whitney"]["p"], "cohens_d": c["cohens_d"],
               "sd_ratio_kaiming_over_structured": c["sd_ratio"], "tost_p_delta_0.015": c["tost"]["p"]}
        for key, value in printed[name].items():
            if key == "welch_p_below":
                assert got[key] < value, (name, key, got[key])
            else:
                assert _printed(got[key], value), (name, key, got[key], value)
            pinned.append((name, key))
        json.dumps(summary, allow_nan=False)
    # Conformer mixed vs Kaiming: Welch p 0.0155, Levene 0.031, MW 0.028, d 0.82, sd ratio 1.99, TOST 0.0004.
    conf = _paper_summary(cases["conformer_mixed_vs_kaiming"])["comparisons"]["mixed vs kaiming"]
    assert (round(conf["welch_t"]["p"], 4), round(conf["levene"]["p"], 3), round(conf["mann_whitney"]["p"], 3),
            round(conf["cohens_d"], 2), round(conf["sd_ratio"], 2), round(conf["tost"]["p"], 4)) == (
        0.0155, 0.031, 0.028, 0.82, 1.99, 0.0004)
    assert conf["tost"]["df"] == 38 and conf["tost"]["equivalent"]
    # Baseline DCT vs Kaiming: Welch p < 0.001, Levene 0.023, MW 8e-05, d 1.6, sd ratio 1.66.
    base = _paper_summary(cases["baseline_dct_vs_kaiming"])["comparisons"]["dct vs kaiming"]
    assert base["welch_t"]["p"] < 0.001
    assert (round(base["levene"]["p"], 3), round(base["mann_whitney"]["p"], 5), round(base["cohens_d"], 1),
            round(base["sd_ratio"], 2)) == (0.023, 8e-05, 1.6, 1.66)
    # Friedman over the four single-basis Conformer arms, paired by seed: chi2 2.46, p 0.48.
    bases = {b: f"basis_{b}" for b in ("dct", "hadamard", "hartley", "sinusoidal")}
    f = _paper_summary(bases)["friedman"]
    assert f["arms"] == list(bases) and f["seeds"] == list(study.PAPER_SEEDS) and f["dropped"] == {}
    assert (round(f["chi2"], 2), round(f["p"], 2)) == (2.46, 0.48)
    key = "friedman_basis_dct_hadamard_hartley_sinusoidal"
    assert _printed(f["chi2"], printed[key]["chi2"]) and _printed(f["p"], printed[key]["p"])
    assert len(pinned) == 11


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
            assert result["config_hash"] == study.member_config(small_spec(), arm, seed).hash()
            assert (out / arm / f"seed-{seed}" / "manifest.json").exists()
    written = json.loads((out / "study.json").read_text())
    assert written["arms"]["dct"]["n"] == 2 and written["spec"]["task"] == "synthetic"
    # The state's hash covers its PRNG key, derived from the seed, so every member's init differs.
    members = summary["arms"]
    assert len({m["init_sha256"] for m in members["kaiming"]["members"]}) == 2
    assert written["tost_df"] == "pooled" and written["spec"]["tost_df"] == "pooled"
    json.dumps(written, allow_nan=False)
    assert members["dct"]["distinct_final_hashes"] == 2  # the seeded order differs
    for name in ("study.md", "per_class_spread.png", "convergence.png"):
        assert (out / name).stat().st_size > 0
    assert "| dct vs kaiming |" in (out / "study.md").read_text()


def test_structured_members_share_the_weights_hash_not_the_state_hash(finished_study):
    out, summary, _ = finished_study
    dct, kaiming = summary["arms"]["dct"], summary["arms"]["kaiming"]
    weights = {m["init_weights_sha256"] for m in dct["members"]}
    states = {m["init_sha256"] for m in dct["members"]}
    # The structured init does not depend on the seed; the PRNG key in the state does.
    assert len(weights) == 1 and None not in weights and len(states) == 2
    assert (dct["distinct_init_weights_hashes"], dct["distinct_init_hashes"]) == (1, 2)
    assert len({m["init_weights_sha256"] for m in kaiming["members"]}) == 2  # He draws differ per seed
    (weights_hash,) = weights
    for seed in (2, 3):
        run = out / "dct" / f"seed-{seed}"
        result = json.loads((run / "result.json").read_text())
        manifest = json.loads((run / "manifest.json").read_text())
        assert result["init_weights_sha256"] == manifest["init_weights_sha256"] == weights_hash
        assert result["init_sha256"] == manifest["init_digests"]["sha256"] != weights_hash
    text = (out / "study.md").read_text()
    assert "init weights sha256" in text and f"`{dct['members'][0]['init_weights_sha256'][:12]}`" in text


def test_a_member_with_a_nan_test_score_fails_and_the_report_is_still_written(finished_study, tmp_path):
    import shutil

    out, _, _ = finished_study
    copy = tmp_path / "study"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    path = copy / "dct" / "seed-3" / "result.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "test_score": float("nan")}))  # non-strict JSON, as json writes NaN
    summary = study.report(copy)
    written = json.loads((copy / "study.json").read_text())
    json.dumps(written, allow_nan=False)
    assert written["arms"]["dct"]["n"] == 1 and written["arms"]["dct"]["seeds"] == [2]
    assert written["arms"]["dct"]["failed"][0]["seed"] == 3
    assert written["arms"]["dct"]["failed"][0]["reason"].startswith("test_score is nan")
    assert written["arms"]["kaiming"]["n"] == 2 and summary["comparisons"]["dct vs kaiming"]["a"]["n"] == 1
    assert "dct seed 3: test_score is nan" in (copy / "study.md").read_text()


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
    spec = small_spec(arms=("dct",), seeds=(2, 3, 7, 11), mode="vmap")
    import shutil

    shutil.copytree(out / "dct", tmp_path / "dct")
    log = []
    result = study.run_study(spec, tmp_path, progress=False, log=log.append)
    assert log == ["arm dct: 2 of 4 seeds finished, training [7, 11]"]
    members = result["arms"]["dct"]["members"]
    executions = {m["seed"]: m["execution"] for m in members}
    assert executions == {2: "sequential", 3: "sequential", 7: "vmap", 11: "vmap"}
    assert (tmp_path / "dct" / "groups" / "7-11" / "checkpoints").is_dir()
    # The vmapped members' initial weights are those of the sequential members (a structured arm).
    assert len({m["init_weights_sha256"] for m in members}) == 1
    assert len({m["init_sha256"] for m in members}) == 4


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


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    """matplotlib is an optional extra: without it every figure function writes nothing and
    returns None (a finished run must not fail at its curve after writing result.json)."""
    from detjax import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    history = [{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5, "val": {"score": 0.7}}]
    assert plots.pyplot() is None
    assert plots.plot_training_curve(history, tmp_path / "curve.png") is None
    assert plots.plot_convergence({"a": [{"history": history}]}, tmp_path / "conv.png") is None
    assert not list(tmp_path.iterdir())
