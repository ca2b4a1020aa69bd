"""Cross-dataset AF transfer, K-fold CV, the classical floor and OOD scores/shifts.

Small PTB-XL and CinC 2017 trees are written here in the published formats (WFDB format 16
with ``ptbxl_database.csv``; WFDB header + MATLAB v4 ``val`` with ``REFERENCE-v3.csv``), so
nothing needs ``../shared``; the real-data checks skip when it is absent. Training uses the
``tiny`` model for one epoch.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The inplace keyword")
    import wfdb

from detjax import cv, floor, ood, transfer
from detjax.data import cinc2017 as C
from detjax.data import ptbxl as P

pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")
SHARED_CINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cinc2017"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv(C.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("DETJAX_CACHE_DIR", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- small trees

PTB_IDS = list(range(1, 31))  # 3 records per strat_fold 1..10


def _ptb_codes(ecg_id: int) -> dict:
    if ecg_id % 3 == 0:  # AF in every block of folds (a validation fold without it has no AUC)
        return {"AFIB": 100.0}
    if ecg_id % 7 == 0:
        return {"LVOLT": 0.0}  # no rhythm label
    return {"SR": 100.0}


def _ecg(i: int, n: int, af: bool, leads: int = 1) -> np.ndarray:
    """A beat train (regular, or irregular for AF) plus noise and a DC offset, in mV."""
    rng = np.random.default_rng(i)
    t = np.zeros(n)
    pos = 20
    while pos < n:
        t[pos] = 1.0
        pos += int(rng.integers(40, 140)) if af else 80
    kernel = np.exp(-0.5 * ((np.arange(15) - 7) / 2.0) ** 2)
    x = np.convolve(t, kernel, mode="same") + 0.05 * rng.standard_normal(n) + 0.3
    return np.repeat(x[:, None], leads, axis=1)


def make_ptbxl(root: Path) -> Path:
    (root / "records100" / "00000").mkdir(parents=True)
    shutil.copy(P.vendored_sample_dir() / "scp_statements.csv", root / "scp_statements.csv")
    rows = []
    for ecg_id in PTB_IDS:
        name = f"{ecg_id:05d}_lr"
        codes = _ptb_codes(ecg_id)
        digital = np.round(_ecg(ecg_id, 1000, "AFIB" in codes, 12) * 1000.0)
        wfdb.wrsamp(name, fs=100, units=["mV"] * 12, sig_name=list(P.LEAD_NAMES), p_signal=digital / 1000.0,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                    write_dir=str(root / "records100" / "00000"))
        rows.append({"ecg_id": ecg_id, "scp_codes": repr(codes), "strat_fold": (ecg_id - 1) % 10 + 1,
                     "filename_lr": f"records100/00000/{name}", "filename_hr": f"records500/00000/{ecg_id:05d}_hr"})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    return root


CINC_LABELS = ["N", "A", "O", "~"] * 10  # 40 records, all classes in every fold
CINC_NAMES = [f"A{i:05d}" for i in range(1, len(CINC_LABELS) + 1)]


def make_cinc(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True)
    for i, (name, label) in enumerate(zip(CINC_NAMES, CINC_LABELS)):
        digital = np.round(_ecg(100 + i, 3300, label == "A")[:, 0] * 1000.0).astype(np.int16)
        (root / f"{name}.hea").write_text(f"{name} 1 300 {digital.size} 05:05:15 1/05/2000 \n"
                                          f"{name}.mat 16+24 1000/mV 16 0 -127 0 0 ECG \n")
        scipy.io.savemat(root / f"{name}.mat", {"val": digital[None, :]}, format="4")
    (root / "REFERENCE-v3.csv").write_text("".join(f"{n},{l}\n" for n, l in zip(CINC_NAMES, CINC_LABELS)))
    folds = root.parent / "folds.csv"
    C.write_folds(folds, CINC_NAMES, CINC_LABELS, C.stratified_folds(CINC_NAMES, CINC_LABELS))
    return root, folds


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("transfer-trees")
    ptb = make_ptbxl(base / "ptbxl")
    cinc, folds = make_cinc(base / "cinc" / "training2017")
    return {"ptbxl": ptb, "cinc": cinc, "cinc_folds": folds}


# --------------------------------------------------------------------------- K-fold CV


@pytest.mark.parametrize("k", range(2, 11))
def test_cv_splits_partition_the_folds(k):
    blocks = cv.fold_blocks(k)
    assert sorted(f for b in blocks for f in b) == list(range(1, 11))
    assert all(list(b) == sorted(b) and b == tuple(range(b[0], b[-1] + 1)) for b in blocks)  # contiguous
    splits = cv.cv_splits(k)
    assert [s["test"] for s in splits] == blocks  # every fold tested exactly once
    for s in splits:
        roles = [set(s[r]) for r in cv.ROLES]
        assert set().union(*roles) == set(range(1, 11)) and sum(map(len, roles)) == 10  # disjoint cover
        assert len(s["val"]) == 1
    if k == 10:
        assert splits[-1] == {"train": tuple(range(1, 9)), "val": (9,), "test": (10,)}  # the official split


@pytest.mark.parametrize("bad, match", [
    (1, "2 <= K"), (11, "2 <= K"), (True, "2 <= K"),
])
def test_cv_rejects_bad_k(bad, match):
    with pytest.raises(ValueError, match=match):
        cv.cv_splits(bad)


@pytest.mark.parametrize("split, match", [
    ({"train": [1], "val": [2]}, "exactly"),
    ({"train": [1, 2], "val": [2], "test": [3]}, "both train and val"),
    ({"train": [0], "val": [2], "test": [3]}, "1..10"),
    ({"train": [], "val": [2], "test": [3]}, "1..10"),
])
def test_check_split_errors(split, match):
    with pytest.raises(ValueError, match=match):
        cv.check_split(split)


def _role_ids(prepared, key):
    ids = {role: set(np.asarray(prepared[f"{key}_{role}"]).tolist()) for role in cv.ROLES}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    return ids


@pytest.mark.parametrize("k", [3, 5])
def test_no_record_in_two_roles_ptbxl_sample(k):
    """The vendored 500-record sample (always present): roles disjoint, each record tested once."""
    tested = []
    for s in cv.cv_splits(k):
        prepared = P.prepare_ptbxl(None, fold_split=s)
        ids = _role_ids(prepared, "ecg_id")
        assert prepared["folds"] == {r: list(v) for r, v in s.items()}
        tested += sorted(ids["test"])
    assert sorted(tested) == list(range(1, 501))


def test_no_record_in_two_roles_cinc(trees):
    tested = []
    for s in cv.cv_splits(5):
        d = C.load_cinc2017(trees["cinc"], folds=trees["cinc_folds"], fold_split=s)
        tested += sorted(_role_ids(d, "record")["test"])
    assert sorted(tested) == CINC_NAMES


def test_run_cv_writes_fold_runs_and_pooled_metric(trees, tmp_path):
    from detjax.train import TrainConfig

    config = TrainConfig(task="ptbxl", data={"data_dir": str(trees["ptbxl"]), "cv_fold": 0}, arch="tiny",
                         model={}, init="dct", epochs=1, batch_size=8, eval_every=1)
    summary = cv.run_cv(config, 2, tmp_path / "cv", progress=False, log=lambda *a: None)
    stored = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert stored["k"] == 2 and stored["headline"] == "macro_auc" and len(stored["folds"]) == 2
    for b, fold in enumerate(stored["folds"]):
        run = Path(fold["run_dir"])
        assert run == tmp_path / "cv" / f"fold-{b}" and (run / "manifest.json").exists()
        result = json.loads((run / "result.json").read_text())
        assert fold["macro_auc"] == result["macro_auc"] and "floor" in result
        assert json.loads((run / "manifest.json").read_text())["config"]["data"]["fold_split"] == fold["folds"]
    scores = [np.load(tmp_path / "cv" / f"fold-{b}" / cv.PREDICTIONS_FILE)["scores"] for b in range(2)]
    assert sum(s.shape[0] for s in scores) == len(PTB_IDS)  # out-of-fold predictions cover every record
    values = [f["macro_auc"] for f in stored["folds"]]
    assert stored["mean"] == pytest.approx(np.mean(values)) and stored["sd"] == pytest.approx(np.std(values, ddof=1))
    assert stored["pooled_macro_auc"] == summary["pooled"]["macro_auc"]
    again = cv.run_cv(config, 2, tmp_path / "cv", progress=False, log=lambda *a: None)  # finished folds reused
    assert again["folds"] == stored["folds"]


# --------------------------------------------------------------------------- transfer


def test_remove_baseline():
    t = np.arange(1000) / 100.0
    sig = np.sin(2 * np.pi * 10 * t)
    x = (sig + 0.7 + 0.5 * np.sin(2 * np.pi * 0.1 * t))[None, :, None].astype(np.float32)
    assert np.allclose(transfer.remove_baseline(x, "none"), x)
    m = transfer.remove_baseline(x, "mean")
    assert abs(float(m.mean())) < 1e-6
    h = transfer.remove_baseline(x, "highpass")[0, 100:-100, 0]
    assert np.max(np.abs(h - sig[100:-100])) < 0.02  # offset and 0.1 Hz wander gone, 10 Hz kept
    with pytest.raises(ValueError, match="baseline"):
        transfer.remove_baseline(x, "median")


def test_best_threshold_and_f1_by_brute_force():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.2).astype(float)
    s = np.round(rng.random(200) + 0.5 * y, 2)  # ties
    thr = transfer.best_f1_threshold(y, s)
    brute = max(transfer.f1_at(y, s, t) for t in np.unique(s))
    assert transfer.f1_at(y, s, thr) == pytest.approx(brute)
    from sklearn.metrics import f1_score

    assert transfer.f1_at(y, s, 0.7) == pytest.approx(f1_score(y, s >= 0.7))


def test_bootstrap_ci_is_seeded_and_brackets_the_auc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.1).astype(float)
    s = rng.random(300) + 0.3 * y
    a = transfer.bootstrap_auc_ci(y, s, n_boot=200, seed=3)
    assert a == transfer.bootstrap_auc_ci(y, s, n_boot=200, seed=3)
    assert a != transfer.bootstrap_auc_ci(y, s, n_boot=200, seed=4)
    assert a[0] < roc_auc_score(y, s) < a[1]
    assert transfer.bootstrap_auc_ci(np.zeros(5), np.ones(5)) is None


def test_prepare_transfer_harmonises_and_normalises_on_source_train(trees):
    kw = dict(cinc_dir=str(trees["cinc"]), ptbxl_dir=str(trees["ptbxl"]), cinc_folds=str(trees["cinc_folds"]))
    p = transfer.prepare_transfer(source="cinc2017", target="ptbxl", **kw)
    for key in ("x_train", "x_val", "x_test", "target_x"):
        assert p[key].shape[1:] == (1000, 1) and p[key].dtype == np.float32
    # CinC ~ excluded; AF labels from class A
    labels = dict(zip(CINC_NAMES, CINC_LABELS))
    for role in ("train", "val", "test"):
        assert all(labels[r] != "~" for r in p[f"id_{role}"])
        assert p[f"y_{role}"][:, 0].tolist() == [float(labels[r] == "A") for r in p[f"id_{role}"]]
    assert p["target_y"][:, 0].tolist() == [float("AFIB" in _ptb_codes(int(i))) for i in p["target_id"]]
    # normalisation: zero mean / unit sd on the source's training windows only
    assert abs(float(p["x_train"].astype(np.float64).mean())) < 1e-4
    assert float(p["x_train"].astype(np.float64).std()) == pytest.approx(1.0, abs=1e-4)
    st = p["info"]["norm"]
    raw = transfer.remove_baseline(transfer.cinc_af(trees["cinc"], folds=trees["cinc_folds"])["x_train"])
    assert st["mean"] == pytest.approx(raw.astype(np.float64).mean(), abs=1e-7)
    # the target's own statistics play no role: the target is mapped with the source's
    tgt = transfer.remove_baseline(transfer.ptbxl_af(trees["ptbxl"])["x_test"])
    expected = (tgt - np.float32(st["mean"])) / np.float32(st["std"])
    assert np.array_equal(p["target_x"], expected.astype(np.float32))
    assert {p["info"][f"{r}_loader"]["data_source"]["kind"] for r in ("source", "target")} == {"argument"}
    cut = transfer.prepare_transfer(source="cinc2017", target="ptbxl", limit=2, **kw)  # cut after the statistics
    assert cut["info"]["norm"] == st and all(np.array_equal(cut[k], p[k][:2]) for k in ("x_train", "y_val", "id_test"))
    neg = transfer.prepare_transfer(source="cinc2017", target="ptbxl", cinc_noisy="negative", **kw)
    assert neg["info"]["n"]["train"] > p["info"]["n"]["train"]
    with pytest.raises(ValueError, match="baseline"):
        transfer.prepare_transfer(source="cinc2017", target="ptbxl", baseline="x", **kw)


def test_af_transfer_run_records_transfer_and_floor(trees, tmp_path):
    from detjax import tasks
    from detjax.train import TrainConfig, train_and_evaluate

    data = {"source": "ptbxl", "target": "cinc2017", "cinc_dir": str(trees["cinc"]),
            "ptbxl_dir": str(trees["ptbxl"]), "cinc_folds": str(trees["cinc_folds"]), "baseline": "highpass"}
    config = TrainConfig(task="af_transfer", data=data, arch="tiny", model={}, init="dct", epochs=1,
                         batch_size=8, eval_every=1)
    result = train_and_evaluate(config, tasks.load_task(config), tmp_path / "run", progress=False)
    t = result["transfer"]
    assert {"source", "target", "target_af_auc", "target_af_f1", "n_target", "ci95"} <= set(t)
    assert (t["source"], t["target"]) == ("ptbxl", "cinc2017")
    assert t["n_target"] == 3 and t["n_target_af"] == 1  # CinC fold 10 without ~: one each of N, A, O
    assert result["floor"]["transfer"]["n_target"] == 3 and "af_auc" in result["floor"]
    assert t["all_target_records"]["n_target"] == 30 and t["all_target_records"]["n_target_af"] == 10
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["metrics"]["transfer"] == t and manifest["data_info"]["target_fingerprint"]
    # the OOD/robustness pass over this run (tiny model: no bottleneck, so no spare-vertex score)
    report = ood.evaluate_run(tmp_path / "run", shifts={"gaussian_noise": (10.0,), "amplitude": (2.0,)},
                              log=lambda *a: None)
    assert [r["shift"] for r in report["shifts"]] == ["gaussian_noise", "amplitude"]
    assert set(report["scores"]) == {"max_logit", "energy"}
    assert report["real_ood"]["n_noisy"] == 2 and report["real_ood"]["n_clean"] == 3


# --------------------------------------------------------------------------- floor


def test_floor_learns_rhythm_regularity_and_is_deterministic():
    x = np.stack([_ecg(i, 1000, i % 2 == 1) for i in range(80)]).astype(np.float32)
    y = (np.arange(80) % 2 == 1).astype(np.float32)[:, None]
    f = floor.ecg_features(x)
    assert f.shape[0] == 80 and np.all(np.isfinite(f))
    a, b = (floor.floor_report(x[:60], y[:60], x[60:], y[60:], transfer.af_evaluate, kind="ecg", multilabel=True,
                               num_classes=1) for _ in range(2))
    assert a["af_auc"] > 0.9 and a["af_auc"] == b["af_auc"]
    bad = floor.floor_report(x[:4], y[:4], x[:4], np.zeros((4, 1), np.float32), transfer.af_evaluate, kind="ecg",
                             multilabel=True, num_classes=1)
    assert "error" in bad or bad["af_auc"] is None  # degenerate split: reported, never raised


# --------------------------------------------------------------------------- OOD


def test_spare_vertex_is_minus_the_sum_of_the_used_ones():
    import detjax.initializers as di

    for k in (1, 4, 12):
        v = di.simplex_etf(k + 1, k + 2)
        assert np.allclose(ood.spare_vertex(k), -v[:k].sum(axis=0))
        assert np.linalg.norm(ood.spare_vertex(k)) == pytest.approx(1.0)


def test_ood_scores_formulas():
    z = np.array([[0.0, 2.0], [-1.0, -3.0]])
    h = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0]])  # K + 2 = 4 bottleneck dims
    s = ood.ood_scores(z, h, multilabel=True)
    assert np.allclose(s["max_logit"], [-2.0, 1.0])
    assert np.allclose(s["energy"], -np.log1p(np.exp(z)).sum(axis=1))
    assert np.allclose(ood.ood_scores(z, None, multilabel=False)["energy"], -np.log(np.exp(z).sum(axis=1)))
    v = ood.spare_vertex(2)
    assert np.allclose(s["spare_vertex"], h @ v / (np.linalg.norm(h, axis=1) * np.linalg.norm(v)))
    assert ood.auroc(np.array([0.0, 0.1]), np.array([0.5, 0.6])) == 1.0


def test_shifts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 1000, 12)).astype(np.float32)
    noisy = ood.apply_shift(x, "gaussian_noise", 10.0)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((noisy - x).astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.2)
    assert np.array_equal(noisy, ood.apply_shift(x, "gaussian_noise", 10.0))  # seeded
    assert np.allclose(ood.apply_shift(x, "amplitude", 2.0), 2 * x)
    flat = ood.apply_shift(x, "flatline", 3.0)
    assert all(int(np.sum(np.all(flat[i] == 0, axis=0))) == 3 for i in range(20))
    swapped = ood.apply_shift(x, "lead_swap", 1.0)
    for i in range(20):
        changed = np.flatnonzero(np.any(swapped[i] != x[i], axis=0))
        assert len(changed) == 2 and np.array_equal(swapped[i][:, changed[::-1]], x[i][:, changed])
    wander = ood.apply_shift(x, "baseline_wander", 1.0) - x
    assert np.max(np.abs(wander)) <= 1.0 + 1e-5 and np.max(np.abs(wander)) > 0.5
    with pytest.raises(ValueError, match="unknown shift"):
        ood.apply_shift(x, "gamma_rays", 1.0)


@pytest.mark.shared_data
def test_real_cinc_af_windows_in_mv():
    if not SHARED_CINC.is_dir():
        pytest.skip(f"{SHARED_CINC} is absent")
    d = transfer.cinc_af(SHARED_CINC)
    assert d["x_test"].shape == (824, 1000, 1) and int(d["y_test"].sum()) == 76  # fold 10 without its 28 ~
    w = C.preprocess(C.read_record(SHARED_CINC, str(d["id_test"][0])))
    assert np.allclose(d["x_test"][0, :, 0], w, atol=1e-6)  # the loader's mV window, to float32 rounding


def test_study_report_shows_the_floor():
    from detjax import study

    spec = study.StudySpec(task="synthetic", arms=("dct", "kaiming"), seeds=(1, 2), epochs=1)
    records = {arm: [{"seed": s, "test_score": 0.6 + 0.01 * s, "per_class_auc": {}, "floor_test_score": 0.75}
                     for s in (1, 2)] for arm in spec.arms}
    summary = study.analyse(records, spec)
    assert summary["floor_test_score"] == 0.75
    assert "Classical floor on the same split" in study.markdown_tables(summary)


def test_a_seed_study_runs_its_arms_under_k_fold_cv(trees, tmp_path):
    from detjax import study

    spec = study.StudySpec(task="ptbxl", arms=("dct", "kaiming"), seeds=(2, 3), epochs=1, cv=2,
                           options={"data_dir": str(trees["ptbxl"]), "arch": "tiny", "batch_size": 8,
                                    "eval_every": 1})
    summary = study.run_study(spec, tmp_path / "study", progress=False, log=lambda *a: None)
    for arm in spec.arms:
        for seed in spec.seeds:
            member = tmp_path / "study" / arm / f"seed-{seed}"
            stored = json.loads((member / "cv.json").read_text())
            assert stored["k"] == 2 and [Path(f["run_dir"]).parent for f in stored["folds"]] == [member] * 2
    records = study.collect(tmp_path / "study", spec)
    dct = records["dct"]
    assert len(dct) == 2 and all(r["test_score"] is not None for r in dct)
    assert dct[0]["init_weights_sha256"] == dct[1]["init_weights_sha256"]  # structured: seed-free weights
    assert json.loads((tmp_path / "study" / "study.json").read_text())
    assert summary
    # the same directory with another K is refused, nothing overwritten
    with pytest.raises(study.StudyError, match="other"):
        study.run_study(study.StudySpec(**{**spec.__dict__, "cv": 3}), tmp_path / "study", progress=False,
                        log=lambda *a: None)
    with pytest.raises(study.StudyError, match="K-fold"):
        study.StudySpec(task="synthetic", arms=("dct",), seeds=(2,), epochs=1, cv=2)
