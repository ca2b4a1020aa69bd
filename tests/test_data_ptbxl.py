"""PTB-XL pipeline: vendored sample, synthetic WFDB trees, cache, splits, download.

Expected values are built independently of the loader: labels by regex over the CSV text,
signals by decoding the format-16 bytes with numpy and the header's gain/baseline, fold
membership from the CSV, checksums with hashlib.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

with warnings.catch_warnings():
    # wfdb 4.3 uses pandas' inplace=True, deprecated in pandas 3.1 (warned at import and in wrsamp).
    warnings.filterwarnings("ignore", message="The inplace keyword")
    import wfdb

from detjax.data import _download
from detjax.data import cache as data_cache
from detjax.data import ptbxl as P
from detjax.data import splits as S

REPO = Path(__file__).resolve().parents[1]
SAMPLE = P.vendored_sample_dir()
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "ptbxl-sample"
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword")
LOAD_SECONDS: dict[str, float] = {}  # reported by test_cache_hit_returns_identical_arrays (-s)

# Counts of the vendored sample (ecg_id 1-500), from the CSVs by hand.
SAMPLE_LABEL_COUNTS = {"SR": 407, "AFIB": 13, "STACH": 5, "SARRH": 26, "SBRAD": 9, "PACE": 6,
                       "SVARR": 0, "BIGU": 0, "AFLT": 8, "SVTAC": 1, "PSVT": 0, "TRIGU": 0}
SAMPLE_FOLD_COUNTS = {1: 58, 2: 51, 3: 34, 4: 42, 5: 47, 6: 33, 7: 44, 8: 44, 9: 81, 10: 66}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ptbxl-cache")


@pytest.fixture(scope="session")
def sample(sample_cache):
    """The vendored sample, read once per session through wfdb (cache miss, cache written)."""
    start = time.perf_counter()
    data = P.load_ptbxl(cache_dir=sample_cache)
    LOAD_SECONDS["wfdb"] = time.perf_counter() - start
    return data


@pytest.fixture(scope="session")
def sample_csv():
    return pd.read_csv(SAMPLE / "ptbxl_database.csv")


@pytest.fixture
def shared_sample():
    if not SHARED_SAMPLE.is_dir():
        pytest.skip(f"{SHARED_SAMPLE} is absent")
    return SHARED_SAMPLE


def decode_format16(record: Path) -> np.ndarray:
    """Independent reader: int16 little-endian, interleaved; (d - baseline) / gain in float64."""
    lines = record.with_suffix(".hea").read_text().splitlines()
    n_sig, n_samp = int(lines[0].split()[1]), int(lines[0].split()[3])
    gains, baselines = [], []
    for line in lines[1:1 + n_sig]:
        gain_field = line.split()[2]  # e.g. "1000.0(0)/mV"
        gains.append(float(gain_field.split("(")[0]))
        baselines.append(float(gain_field.split("(")[1].split(")")[0]))
    digital = np.fromfile(record.with_suffix(".dat"), dtype="<i2").reshape(n_samp, n_sig)
    return (digital - np.array(baselines)) / np.array(gains)


# Synthetic trees in the PTB-XL layout --------------------------------------------------

# ecg_id -> (strat_fold, scp_codes); ids 4 and 12 have no rhythm code.
TINY = {
    1: (1, {"NORM": 100.0, "SR": 0.0}),
    2: (2, {"AFIB": 100.0, "PACE": 50.0}),
    3: (3, {"STACH": 80.0}),
    4: (8, {"IMI": 100.0}),
    5: (8, {"SARRH": 0.0, "SBRAD": 100.0}),
    6: (9, {"SR": 100.0}),
    7: (9, {"IMI": 15.0}),
    8: (10, {"TRIGU": 100.0, "BIGU": 0.0}),
    9: (10, {"SR": 0.0, "PSVT": 100.0}),
    10: (5, {"SVARR": 100.0, "AFLT": 100.0, "SVTAC": 0.0}),
    11: (7, {"SR": 100.0}),
    12: (6, {"LVOLT": 0.0}),
}


def tiny_signal(ecg_id: int, samples: int = 1000, leads: int = 12) -> np.ndarray:
    """Digital values d (exactly representable after /1000), distinct per record and lead."""
    rng = np.random.default_rng(ecg_id)
    return rng.integers(-3000, 3000, size=(samples, leads)).astype(np.float64)


def write_record(folder: Path, name: str, digital: np.ndarray, *, fs: int = 100,
                 sig_name=P.LEAD_NAMES, units: str = "mV") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = digital.shape[1]
    wfdb.wrsamp(name, fs=fs, units=[units] * n, sig_name=list(sig_name)[:n], p_signal=digital / 1000.0,
                fmt=["16"] * n, adc_gain=[1000.0] * n, baseline=[0] * n, write_dir=str(folder))


def make_tree(root: Path, *, rate: int = 100, records=TINY) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE / "scp_statements.csv", root / "scp_statements.csv")
    suffix = "lr" if rate == 100 else "hr"
    rows = []
    for ecg_id, (fold, codes) in records.items():
        name = f"{ecg_id:05d}_{suffix}"
        write_record(root / f"records{rate}" / "00000", name, tiny_signal(ecg_id, 10 * rate), fs=rate)
        rows.append({"ecg_id": ecg_id, "patient_id": 100.0 + ecg_id, "scp_codes": repr(codes),
                     "strat_fold": fold, "filename_lr": f"records100/00000/{ecg_id:05d}_lr",
                     "filename_hr": f"records500/00000/{ecg_id:05d}_hr"})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    return root


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tiny-template") / "ptbxl")


@pytest.fixture
def tiny(tiny_template, tmp_path):
    """A fresh, writable copy of the synthetic tree (written once per session with wfdb.wrsamp)."""
    return Path(shutil.copytree(tiny_template, tmp_path / "ptbxl"))


def tiny_expected_x(ids=TINY, leads=slice(None)) -> np.ndarray:
    return np.stack([(tiny_signal(i) / 1000.0).astype(np.float32)[:, leads] for i in ids])


# --------------------------------------------------------------------------- vendored sample


def test_vendored_sample_matches_published_sha256sums():
    sums = _download.parse_sha256sums((SAMPLE / "SHA256SUMS.txt").read_text())
    checked = {name: digest for name, digest in sums.items()
               if name.startswith("records100/") or name == "scp_statements.csv"}
    # The list covers records 1-100 (hea + dat at 100 Hz: 200 files) plus the statements csv.
    assert len(checked) == 2 * 100 + 1
    assert max(int(name[17:22]) for name in checked if name.startswith("records100/")) == 100
    for name, digest in checked.items():
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name


def test_vendored_sample_has_notice_and_licence():
    notice = (SAMPLE / "NOTICE.md").read_text()
    for needle in ("CC BY 4.0", "Wagner", "Scientific Data", "unmodified", "PhysioNet"):
        assert needle in notice
    assert (SAMPLE / "LICENSE.txt").read_text().startswith("Creative Commons Attribution 4.0")
    assert len(list((SAMPLE / "records100" / "00000").glob("*_lr.dat"))) == 500


@pytest.mark.shared_data
def test_vendored_sample_is_byte_identical_to_shared_copy(shared_sample):
    vendored = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file())
    assert "NOTICE.md" in vendored
    vendored.remove("NOTICE.md")
    shared = sorted(p.relative_to(shared_sample).as_posix() for p in shared_sample.rglob("*") if p.is_file())
    assert vendored == shared
    for name in vendored:
        assert (SAMPLE / name).read_bytes() == (shared_sample / name).read_bytes(), name


@pytest.mark.shared_data
def test_shared_copy_loads_like_vendored(shared_sample, sample, sample_cache):
    shared = P.load_ptbxl(shared_sample, cache_dir=sample_cache)
    # Same bytes, so the same content key: served from the cache the vendored load wrote.
    assert shared.source["content_sha256"] == sample.source["content_sha256"]
    assert shared.source["from_cache"]
    assert shared.source["fingerprint"] == sample.source["fingerprint"]


def test_sample_shapes_and_metadata(sample):
    assert sample.x.shape == (500, 1000, 12) and sample.x.dtype == np.float32
    assert sample.y.shape == (500, 12) and sample.y.dtype == np.float32
    assert sample.fold.dtype == np.int64 and sample.ecg_id.dtype == np.int64
    np.testing.assert_array_equal(sample.ecg_id, np.arange(1, 501))
    assert sample.labels == P.RHYTHM_LABELS
    assert sample.lead_names == ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
    assert sample.sampling_rate == 100 and len(sample) == 500
    assert sample.source["data_source"] == {"kind": "vendored"} and not sample.source["from_cache"]
    assert sample.source["fingerprint"] == data_cache.fingerprint(
        {"x": sample.x, "y": sample.y, "fold": sample.fold, "ecg_id": sample.ecg_id})


def test_sample_labels_match_csv_text(sample, sample_csv):
    # Independent construction: code keys by regex over the raw cell text.
    expected = np.zeros((500, 12), np.float32)
    for i, cell in enumerate(sample_csv["scp_codes"]):
        keys = set(re.findall(r"'([A-Z0-9_]+)'\s*:", cell))
        for j, label in enumerate(P.RHYTHM_LABELS):
            expected[i, j] = label in keys
    np.testing.assert_array_equal(sample.y, expected)
    assert S.label_counts(sample.y, P.RHYTHM_LABELS) == SAMPLE_LABEL_COUNTS
    # ecg_id 1 has {'SR': 0.0}: likelihood 0 still counts as positive.
    assert "'SR': 0.0" in sample_csv["scp_codes"][0] and sample.y[0, 0] == 1.0
    assert int((sample.y.sum(1) == 0).sum()) == 29


def test_sample_folds(sample, sample_csv):
    np.testing.assert_array_equal(sample.fold, sample_csv["strat_fold"].to_numpy())
    assert dict(zip(*np.unique(sample.fold, return_counts=True))) == SAMPLE_FOLD_COUNTS


@pytest.mark.parametrize("ecg_id", [1, 137, 500])
def test_sample_signals_equal_independent_decoding(sample, ecg_id):
    raw = decode_format16(SAMPLE / "records100" / "00000" / f"{ecg_id:05d}_lr.hea")
    np.testing.assert_array_equal(sample.x[ecg_id - 1], raw.astype(np.float32))


def test_cache_hit_returns_identical_arrays(sample, sample_cache):
    start = time.perf_counter()
    again = P.load_ptbxl(cache_dir=sample_cache)
    seconds = time.perf_counter() - start
    assert again.source["from_cache"] and Path(again.source["cache_file"]).is_file()
    assert again.source["fingerprint"] == sample.source["fingerprint"]
    for name in ("x", "y", "fold", "ecg_id"):
        assert getattr(again, name).tobytes() == getattr(sample, name).tobytes()
    print(f"\nPTB-XL sample load: {LOAD_SECONDS['wfdb']:.2f} s via wfdb, {seconds:.2f} s from cache")


def test_official_split(sample):
    splits = P.split(sample)
    fold_of = dict(zip(sample.ecg_id.tolist(), sample.fold.tolist()))
    labelled = {int(i) for i, row in zip(sample.ecg_id, sample.y) if row.any()}
    assert splits.folds == {"train": (1, 2, 3, 4, 5, 6, 7, 8), "val": (9,), "test": (10,)}
    assert set(splits.val.ecg_id.tolist()) == {i for i, f in fold_of.items() if f == 9}
    assert set(splits.test.ecg_id.tolist()) == {i for i, f in fold_of.items() if f == 10}
    assert set(splits.train.ecg_id.tolist()) == {i for i, f in fold_of.items() if f <= 8 and i in labelled}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (331, 81, 66)
    assert (splits.train.y.sum(1) > 0).all()
    # 353 records in folds 1-8, 22 of them without a rhythm label are dropped from train only.
    assert sum(SAMPLE_FOLD_COUNTS[f] for f in range(1, 9)) - len(splits.train) == 22
    assert (splits.val.y.sum(1) == 0).sum() + (splits.test.y.sum(1) == 0).sum() == 29 - 22
    np.testing.assert_array_equal(splits.train.x, sample.x[np.isin(sample.ecg_id, splits.train.ecg_id)])


@pytest.mark.parametrize("cv_fold,test_fold,val_fold", [(0, 10, 9), (1, 9, 8), (2, 8, 10)])
def test_cv_rotation(sample, cv_fold, test_fold, val_fold):
    splits = P.split(sample, cv_fold=cv_fold)
    fold_of = dict(zip(sample.ecg_id.tolist(), sample.fold.tolist()))
    assert {fold_of[i] for i in splits.test.ecg_id.tolist()} == {test_fold}
    assert {fold_of[i] for i in splits.val.ecg_id.tolist()} == {val_fold}
    assert len(splits.test) == SAMPLE_FOLD_COUNTS[test_fold] and len(splits.val) == SAMPLE_FOLD_COUNTS[val_fold]
    train_folds = {fold_of[i] for i in splits.train.ecg_id.tolist()}
    assert train_folds == set(range(1, 11)) - {test_fold, val_fold}
    assert splits.folds["train"] == tuple(sorted(train_folds))
    unlabeled_in_train_folds = sum(1 for i, row in zip(sample.ecg_id, sample.y)
                                   if fold_of[int(i)] in train_folds and not row.any())
    assert len(splits.train) == sum(SAMPLE_FOLD_COUNTS[f] for f in train_folds) - unlabeled_in_train_folds


def test_split_rejects_unknown_cv_fold(sample):
    with pytest.raises(ValueError, match="cv_fold"):
        P.split(sample, cv_fold=3)


def test_normalize_uses_train_statistics_only(sample):
    splits = P.split(sample)
    normed, stats = P.normalize(splits)
    train64 = splits.train.x.astype(np.float64)
    assert stats["count"] == train64.size == 331 * 1000 * 12
    assert stats["mean"] == pytest.approx(train64.mean(), rel=1e-12, abs=1e-15)
    assert stats["std"] == pytest.approx(train64.std(), rel=1e-12)
    # Not the statistics of all records (the val/test records would shift them).
    assert stats["std"] != pytest.approx(sample.x.astype(np.float64).std(), rel=1e-6)
    assert abs(float(normed.train.x.astype(np.float64).mean())) < 1e-6
    assert float(normed.train.x.astype(np.float64).std()) == pytest.approx(1.0, abs=1e-6)
    mu, sigma = np.float32(stats["mean"]), np.float32(stats["std"])
    for name in ("train", "val", "test"):
        before, after = getattr(splits, name), getattr(normed, name)
        assert after.x.dtype == np.float32
        assert after.x.tobytes() == ((before.x - mu) / sigma).astype(np.float32).tobytes()
        np.testing.assert_array_equal(after.ecg_id, before.ecg_id)
        np.testing.assert_array_equal(after.y, before.y)


def test_normalize_rejects_empty_or_constant_train():
    empty = P.Subset(x=np.zeros((0, 1000, 12), np.float32), y=np.zeros((0, 12), np.float32),
                     ecg_id=np.zeros(0, np.int64))
    const = P.Subset(x=np.ones((2, 1000, 12), np.float32), y=np.ones((2, 12), np.float32),
                     ecg_id=np.arange(2))
    for train in (empty, const):
        with pytest.raises(ValueError, match="cannot normalise"):
            P.normalize(P.Splits(train=train, val=empty, test=empty, cv_fold=0, folds={}))


def test_prepare_ptbxl(sample, sample_cache):
    out = P.prepare_ptbxl(cache_dir=sample_cache, cv_fold=1)
    normed, stats = P.normalize(P.split(sample, cv_fold=1))
    assert out["norm"] == stats
    assert out["n"] == {"train": len(normed.train), "val": 44, "test": 81}
    assert out["folds"] == {"train": [1, 2, 3, 4, 5, 6, 7, 10], "val": [8], "test": [9]}
    for name in ("train", "val", "test"):
        subset = getattr(normed, name)
        for part in ("x", "y", "ecg_id"):
            assert out[f"{part}_{name}"].tobytes() == getattr(subset, part).tobytes()
        assert out["counts"][name] == {l: int(subset.y[:, j].sum()) for j, l in enumerate(P.RHYTHM_LABELS)}
    assert sum(out["counts"][s]["AFIB"] for s in ("train", "val", "test")) <= SAMPLE_LABEL_COUNTS["AFIB"]
    assert out["labels"] == P.RHYTHM_LABELS and out["cv_fold"] == 1 and out["limit"] is None
    assert out["source"]["from_cache"]
    # The normalised arrays are hashed once, by TaskData.fingerprint(); not by the loader.
    assert "fingerprint" not in out and "fingerprints" not in out


def test_limit_keeps_the_first_records_after_the_full_statistics(sample_cache):
    full = P.prepare_ptbxl(cache_dir=sample_cache)
    small = P.prepare_ptbxl(cache_dir=sample_cache, limit=5)
    assert small["norm"] == full["norm"] and small["limit"] == 5
    for name in ("train", "val", "test"):
        assert small["n"][name] == 5
        for part in ("x", "y", "ecg_id"):
            assert small[f"{part}_{name}"].tobytes() == full[f"{part}_{name}"][:5].tobytes()
    with pytest.raises(ValueError, match="limit must be a positive"):
        P.prepare_ptbxl(cache_dir=sample_cache, limit=0)


# --------------------------------------------------------------------------- synthetic trees


def test_tiny_tree_values_labels_and_splits(tiny):
    data = P.load_ptbxl(tiny, use_cache=False)
    assert data.x.tobytes() == tiny_expected_x().tobytes()
    expected_y = np.array([[label in codes for label in P.RHYTHM_LABELS] for _, codes in TINY.values()],
                          np.float32)
    np.testing.assert_array_equal(data.y, expected_y)
    assert data.source["cache_file"] is None and data.source["data_source"] == {"kind": "argument"}
    ids = {k: P.split(data, cv_fold=k) for k in range(3)}
    # Hand-derived from TINY: unlabeled 4 (fold 8) and 12 (fold 6) never train.
    assert ids[0].train.ecg_id.tolist() == [1, 2, 3, 5, 10, 11]
    assert ids[0].val.ecg_id.tolist() == [6, 7] and ids[0].test.ecg_id.tolist() == [8, 9]
    assert ids[1].train.ecg_id.tolist() == [1, 2, 3, 8, 9, 10, 11]
    assert ids[1].val.ecg_id.tolist() == [4, 5] and ids[1].test.ecg_id.tolist() == [6, 7]
    assert ids[2].train.ecg_id.tolist() == [1, 2, 3, 6, 10, 11]
    assert ids[2].val.ecg_id.tolist() == [8, 9] and ids[2].test.ecg_id.tolist() == [4, 5]


@pytest.mark.parametrize("leads,columns,names", [
    ("limb", [0, 1, 2, 3, 4, 5], ("I", "II", "III", "AVR", "AVL", "AVF")),
    (("I", "II", "III", "AVR", "AVL", "AVF"), [0, 1, 2, 3, 4, 5], ("I", "II", "III", "AVR", "AVL", "AVF")),
    ("precordial", list(range(6, 12)), ("V1", "V2", "V3", "V4", "V5", "V6")),
    (("v6", "aVR", "I"), [11, 3, 0], ("V6", "AVR", "I")),
    ("II", [1], ("II",)),
])
def test_lead_subsets(tiny, leads, columns, names):
    data = P.load_ptbxl(tiny, leads=leads, use_cache=False)
    assert data.lead_names == names
    assert data.x.shape == (len(TINY), 1000, len(columns))
    assert data.x.tobytes() == tiny_expected_x(leads=columns).tobytes()


def test_prepare_tiny_limb_leads_with_progress(tiny, capsys):
    out = P.prepare_ptbxl(tiny, leads="limb", use_cache=False, progress=True, cv_fold=2)
    assert "PTB-XL records" in capsys.readouterr().err  # the tqdm bar
    assert out["lead_names"] == P.LEAD_PRESETS["limb"]
    assert out["x_train"].shape == (6, 1000, 6) and out["x_test"].shape == (2, 1000, 6)
    train = tiny_expected_x(ids=[1, 2, 3, 6, 10, 11], leads=slice(0, 6)).astype(np.float64)
    assert out["norm"]["mean"] == pytest.approx(train.mean(), rel=1e-12)
    assert out["norm"]["std"] == pytest.approx(train.std(), rel=1e-12)
    assert out["counts"]["train"]["SR"] == 3 and out["counts"]["test"]["SBRAD"] == 1


@pytest.mark.parametrize("leads,match", [
    (("I", "X1"), "unknown lead"), (("I", "i"), "duplicate"), ((), "at least one"), ("hexaxial", "unknown lead"),
])
def test_lead_selection_errors(leads, match):
    with pytest.raises(ValueError, match=match):
        P.resolve_leads(leads)


def test_500_hz_tree(tmp_path):
    records = {k: TINY[k] for k in (1, 2, 6)}
    root = make_tree(tmp_path / "hr", rate=500, records=records)
    data = P.load_ptbxl(root, sampling_rate=500, use_cache=False)
    assert data.x.shape == (3, 5000, 12) and data.sampling_rate == 500
    expected = np.stack([(tiny_signal(i, 5000) / 1000.0).astype(np.float32) for i in records])
    assert data.x.tobytes() == expected.tobytes()
    with pytest.raises(FileNotFoundError, match="ecg_id=1"):
        P.load_ptbxl(root, sampling_rate=100, use_cache=False)  # records100/ absent
    with pytest.raises(ValueError, match="sampling_rate"):
        P.load_ptbxl(root, sampling_rate=250, use_cache=False)


# Malformed inputs: each case damages record 3 and expects an error naming it.
def _drop(path):
    path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:5001])


def _append(path):
    path.write_bytes(path.read_bytes() + b"\x00\x00")


def _garbage(path):
    path.write_bytes(b"\x00\xffnot a header\n")


def _rewrite(**kwargs):
    def damage(hea):
        digital = kwargs.pop("digital", tiny_signal(3))
        write_record(hea.parent, "00003_lr", digital, **kwargs)
    return damage


def _nan(hea):
    digital = tiny_signal(3)
    digital[17, 4] = np.nan
    write_record(hea.parent, "00003_lr", digital)


BAD_RECORDS = [
    ("missing .dat", ".dat", _drop, FileNotFoundError, r"ecg_id=3.*00003_lr\.dat"),
    ("missing .hea", ".hea", _drop, FileNotFoundError, r"ecg_id=3.*00003_lr\.hea"),
    ("truncated .dat", ".dat", _truncate, ValueError, r"ecg_id=3.*00003_lr.*corrupt"),
    ("extra bytes", ".dat", _append, ValueError, r"ecg_id=3.*00003_lr\.dat has 24002 bytes, expected 24000"),
    ("garbage header", ".hea", _garbage, ValueError, r"ecg_id=3.*00003_lr.*corrupt"),
    ("500 Hz header", ".hea", _rewrite(fs=500), ValueError, r"ecg_id=3.*00003_lr\.hea.*500 Hz.*expected 100"),
    ("999 samples", ".hea", _rewrite(digital=tiny_signal(3, 999)), ValueError, r"ecg_id=3.*999 samples"),
    ("11 leads", ".hea", _rewrite(digital=tiny_signal(3, 1000, 11)), ValueError, r"ecg_id=3.*leads"),
    ("renamed lead", ".hea", _rewrite(sig_name=("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4",
                                                "V5", "V7")), ValueError, r"ecg_id=3.*V7"),
    ("microvolts", ".hea", _rewrite(units="uV"), ValueError, r"ecg_id=3.*units"),
    ("NaN sample", ".hea", _nan, ValueError, r"ecg_id=3.*00003_lr\.dat.*non-finite.*sample 17, lead AVL"),
]


@pytest.mark.parametrize("case,suffix,damage,error,match", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_raises_naming_it(tiny, tmp_path, case, suffix, damage, error, match):
    damage(tiny / "records100" / "00000" / f"00003_lr{suffix}")
    with pytest.raises(error, match=match):
        P.load_ptbxl(tiny, use_cache=False)
    with pytest.raises(error, match=match):  # same error on the cached path
        P.load_ptbxl(tiny, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npz"))


def _edit_csv(root, name, edit):
    path = root / name
    is_scp = name == "scp_statements.csv"
    frame = edit(pd.read_csv(path, index_col=0 if is_scp else None))
    frame.to_csv(path, index=is_scp)


def _set(row, column, value):
    def edit(frame):
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        return frame
    return edit


def _drop_column(column):
    return lambda frame: frame.drop(columns=column)


BAD_CSVS = [
    ("no strat_fold", "ptbxl_database.csv", _drop_column("strat_fold"),
     r"ptbxl_database\.csv: missing column\(s\) \['strat_fold'\]"),
    ("no filename_lr", "ptbxl_database.csv", _drop_column("filename_lr"), r"missing column\(s\) \['filename_lr'\]"),
    ("fold 11", "ptbxl_database.csv", _set(2, "strat_fold", 11), r"ecg_id 3 has strat_fold 11, expected 1\.\.10"),
    ("fold 2.5", "ptbxl_database.csv", _set(2, "strat_fold", 2.5), r"'strat_fold' must hold integers; row 4 has 2\.5$"),
    ("fold empty", "ptbxl_database.csv", _set(2, "strat_fold", np.nan), r"'strat_fold' must hold integers; row 4"),
    ("duplicate id", "ptbxl_database.csv", _set(3, "ecg_id", 3), r"ecg_id 3 occurs more"),
    ("bad scp_codes", "ptbxl_database.csv", _set(2, "scp_codes", "{'SR': "), r"ecg_id 3: scp_codes"),
    ("list scp_codes", "ptbxl_database.csv", _set(2, "scp_codes", "['SR']"), r"ecg_id 3: scp_codes .* not a dict"),
    ("absolute path", "ptbxl_database.csv", _set(2, "filename_lr", "/etc/passwd"), r"ecg_id 3: record path"),
    ("parent path", "ptbxl_database.csv", _set(2, "filename_lr", "../x/00003_lr"), r"ecg_id 3: record path"),
    ("no filename", "ptbxl_database.csv", _set(2, "filename_lr", np.nan), r"ecg_id 3 has no 'filename_lr'"),
    ("no rhythm column", "scp_statements.csv", _drop_column("rhythm"), r"scp_statements\.csv: missing column 'rhythm'"),
    ("BIGU not rhythm", "scp_statements.csv", _set("BIGU", "rhythm", np.nan), r"rhythm statements .*expected exactly"),
    ("extra rhythm", "scp_statements.csv", _set("NORM", "rhythm", 1.0), r"rhythm statements .*'NORM'"),
]


@pytest.mark.parametrize("case,name,edit,match", BAD_CSVS, ids=[c[0] for c in BAD_CSVS])
def test_bad_csv_raises(tiny, case, name, edit, match):
    _edit_csv(tiny, name, edit)
    with pytest.raises(ValueError, match=match):
        P.load_ptbxl(tiny, use_cache=False)


def test_reordered_rhythm_rows_raise(tiny):
    scp = pd.read_csv(tiny / "scp_statements.csv", index_col=0)
    rows = list(scp.index)
    i, j = rows.index("SR"), rows.index("AFIB")
    rows[i], rows[j] = rows[j], rows[i]
    scp.loc[rows].to_csv(tiny / "scp_statements.csv")
    with pytest.raises(ValueError, match=r"\['AFIB', 'SR',"):
        P.load_ptbxl(tiny, use_cache=False)


def test_missing_inputs_raise_file_not_found(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        P.load_ptbxl(tmp_path / "nowhere", use_cache=False)
    (tiny / "scp_statements.csv").unlink()
    with pytest.raises(FileNotFoundError, match="scp_statements.csv"):
        P.load_ptbxl(tiny, use_cache=False)


# --------------------------------------------------------------------------- cache


def _npz_files(cache):
    return sorted(cache.rglob("*.npz"))


def test_cache_invalidated_when_a_record_changes(tiny, tmp_path):
    cache = tmp_path / "cache"
    first = P.load_ptbxl(tiny, cache_dir=cache)
    assert not first.source["from_cache"] and len(_npz_files(cache)) == 1
    assert P.load_ptbxl(tiny, cache_dir=cache).source["from_cache"]
    changed = tiny_signal(3) + 1.0
    write_record(tiny / "records100" / "00000", "00003_lr", changed)
    second = P.load_ptbxl(tiny, cache_dir=cache)
    assert not second.source["from_cache"]
    assert second.source["content_sha256"] != first.source["content_sha256"]
    assert second.x[2].tobytes() == (changed / 1000.0).astype(np.float32).tobytes()
    np.testing.assert_array_equal(np.delete(second.x, 2, axis=0), np.delete(first.x, 2, axis=0))
    assert len(_npz_files(cache)) == 2


@pytest.mark.parametrize("edit", ["database", "scp", "header_comment"])
def test_cache_key_covers_csvs_and_headers(tiny, tmp_path, edit):
    cache = tmp_path / "cache"
    first = P.load_ptbxl(tiny, cache_dir=cache)
    target = {"database": tiny / "ptbxl_database.csv", "scp": tiny / "scp_statements.csv",
              "header_comment": tiny / "records100" / "00000" / "00005_lr.hea"}[edit]
    with open(target, "a") as handle:
        handle.write("# edited\n" if edit == "header_comment" else "\n")
    second = P.load_ptbxl(tiny, cache_dir=cache)
    assert not second.source["from_cache"]
    assert second.source["content_sha256"] != first.source["content_sha256"]


def test_cache_key_depends_on_leads_and_rate(tiny, tmp_path):
    cache = tmp_path / "cache"
    full = P.load_ptbxl(tiny, cache_dir=cache)
    limb = P.load_ptbxl(tiny, cache_dir=cache, leads="limb")
    assert not limb.source["from_cache"] and limb.source["content_sha256"] != full.source["content_sha256"]
    assert len(_npz_files(cache)) == 2
    records = [tiny / f"records100/00000/{i:05d}_lr" for i in TINY]
    keys = {P.content_key(tiny, records, ecg_ids=list(TINY), sampling_rate=rate, leads=P.LEAD_NAMES)
            for rate in (100, 500)}
    assert len(keys) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "other_key"])
def test_corrupt_cache_is_rebuilt(tiny, tmp_path, damage):
    cache = tmp_path / "cache"
    first = P.load_ptbxl(tiny, cache_dir=cache)
    (path,) = _npz_files(cache)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(blob[: len(blob) // 2]))
    elif damage == "flip_byte":
        offset = bytes(blob).index(b"\x93NUMPY", bytes(blob).index(b"x.npy")) + 4000
        blob[offset] ^= 0x40
        path.write_bytes(bytes(blob))
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:  # a valid npz written for different inputs
        arrays = {"x": first.x[:1], "y": first.y[:1], "fold": first.fold[:1], "ecg_id": first.ecg_id[:1]}
        np.savez(path, key=np.array("0" * 64), digest=np.array(data_cache.fingerprint(arrays)), **arrays)
    with pytest.warns(RuntimeWarning, match="cache file .* is corrupt"):
        rebuilt = P.load_ptbxl(tiny, cache_dir=cache)
    assert not rebuilt.source["from_cache"]
    assert rebuilt.x.tobytes() == first.x.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.load_ptbxl(tiny, cache_dir=cache).source["from_cache"]


def test_cache_write_is_atomic(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_savez = np.savez

    def crash(handle, **arrays):  # writes part of the file, then the disk "fills up"
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P.np, "savez", crash)
    with pytest.warns(RuntimeWarning, match="could not write PTB-XL cache"):
        data = P.load_ptbxl(tiny, cache_dir=cache)
    assert data.x.tobytes() == tiny_expected_x().tobytes()
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # neither final nor temp file

    def interrupt(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(P.np, "savez", interrupt)
    with pytest.raises(KeyboardInterrupt):
        P.load_ptbxl(tiny, cache_dir=cache)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(P.np, "savez", real_savez)
    P.load_ptbxl(tiny, cache_dir=cache)
    assert [p.name.startswith("ptbxl-100hz-") for p in cache.rglob("*") if p.is_file()] == [True]


def test_cache_dir_from_environment(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DETJAX_CACHE_DIR", str(tmp_path / "envcache"))
    assert data_cache.default_cache_dir() == tmp_path / "envcache"
    data = P.load_ptbxl(tiny)
    assert Path(data.source["cache_file"]).parent == tmp_path / "envcache" / "ptbxl"
    assert len(_npz_files(tmp_path / "envcache")) == 1
    monkeypatch.delenv("DETJAX_CACHE_DIR")
    assert data_cache.default_cache_dir() == Path.home() / ".cache" / "detjax"


def test_use_cache_false_touches_no_cache(tiny, tmp_path):
    P.load_ptbxl(tiny, cache_dir=tmp_path / "cache", use_cache=False)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- download


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class _Server:
    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def remote(tmp_path):
    """A fake PhysioNet folder: 3 real sample records (100 Hz), a stub 500 Hz file, SHA256SUMS."""
    root = tmp_path / "remote"
    (root / "records100" / "00000").mkdir(parents=True)
    (root / "records500" / "00000").mkdir(parents=True)
    for name in ("scp_statements.csv", "LICENSE.txt"):
        shutil.copy(SAMPLE / name, root / name)
    pd.read_csv(SAMPLE / "ptbxl_database.csv").head(3).to_csv(root / "ptbxl_database.csv", index=False)
    for i in (1, 2, 3):
        for ext in ("hea", "dat"):
            shutil.copy(SAMPLE / f"records100/00000/{i:05d}_lr.{ext}", root / f"records100/00000/{i:05d}_lr.{ext}")
    (root / "records500" / "00000" / "00001_hr.hea").write_text("not needed at 100 Hz\n")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    (root / "SHA256SUMS.txt").write_text(
        "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()} {f}\n" for f in files))
    server = _Server(root)
    yield root, server
    server.close()


def _leftovers(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".part") or p.name.startswith("."))]


def test_download_verifies_and_resumes(remote, tmp_path, sample):
    root, server = remote
    dest = tmp_path / "dest"
    assert P.download(dest, base_url=server.url) == dest
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == sorted(["LICENSE.txt", "SHA256SUMS.txt", "ptbxl_database.csv", "scp_statements.csv"]
                         + [f"records100/00000/{i:05d}_lr.{e}" for i in (1, 2, 3) for e in ("dat", "hea")])
    for name in got:
        assert (dest / name).read_bytes() == (root / name).read_bytes()
    loaded = P.load_ptbxl(dest, use_cache=False)
    assert loaded.x.tobytes() == sample.x[:3].tobytes()

    server.requests.clear()
    P.download(dest, base_url=server.url)
    assert server.requests == ["/SHA256SUMS.txt"]  # every file's hash matched: nothing re-fetched

    (dest / "records100/00000/00002_lr.dat").unlink()
    (dest / "records100/00000/00003_lr.hea").write_text("tampered\n")
    server.requests.clear()
    P.download(dest, base_url=server.url)
    assert sorted(server.requests) == ["/SHA256SUMS.txt", "/records100/00000/00002_lr.dat",
                                       "/records100/00000/00003_lr.hea"]
    restored = "records100/00000/00003_lr.hea"
    assert (dest / restored).read_bytes() == (root / restored).read_bytes()
    assert _leftovers(dest) == []


def test_download_500_hz_selection(remote, tmp_path):
    root, server = remote
    dest = P.download(tmp_path / "dest", base_url=server.url, sampling_rates=(500,))
    assert (dest / "records500/00000/00001_hr.hea").is_file()
    assert not (dest / "records100").exists()
    with pytest.raises(ValueError, match="sampling_rate"):
        P.download(tmp_path / "x", base_url=server.url, sampling_rates=(250,))


def test_download_checksum_mismatch_keeps_nothing(remote, tmp_path):
    root, server = remote
    sums = (root / "SHA256SUMS.txt").read_text()
    bad = "records100/00000/00002_lr.dat"
    good_digest = hashlib.sha256((root / bad).read_bytes()).hexdigest()
    (root / "SHA256SUMS.txt").write_text(sums.replace(f"{good_digest} {bad}", f"{'0' * 64} {bad}"))
    dest = tmp_path / "dest"
    with pytest.raises(_download.ChecksumError, match=rf"{re.escape(bad)}: expected sha256 0{{64}}, got {good_digest}"):
        P.download(dest, base_url=server.url)
    assert not (dest / bad).exists()
    assert not (dest / "SHA256SUMS.txt").exists()  # the completion marker is written last
    assert _leftovers(dest) == []
    assert (dest / "records100/00000/00001_lr.dat").is_file()  # verified files before it are kept


def test_download_fetch_checksum_leaves_existing_file_untouched(remote, tmp_path):
    root, server = remote
    target = tmp_path / "scp.csv"
    target.write_text("old content")
    with pytest.raises(_download.ChecksumError):
        _download.fetch(server.url + "scp_statements.csv", target, sha256="1" * 64)
    assert target.read_text() == "old content" and _leftovers(tmp_path) == []


def test_download_http_404(remote, tmp_path):
    root, server = remote
    (root / "records100/00000/00001_lr.hea").unlink()
    with pytest.raises(_download.DownloadError, match=r"00001_lr\.hea.*HTTP 404.*resume"):
        P.download(tmp_path / "dest", base_url=server.url)
    assert _leftovers(tmp_path / "dest") == []


def test_download_fails_fast_on_closed_port(tmp_path):
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(_download.DownloadError) as info:
        P.download(tmp_path / "dest", base_url=f"http://127.0.0.1:{port}/", timeout=2.0)
    message = str(info.value)
    assert "could not be downloaded" in message and "refused" in message
    assert "--data-dir" in message and "physionet.org/files/ptb-xl/1.0.3" in message


def test_download_times_out_on_silent_server(tmp_path):
    with socket.socket() as silent:  # accepts TCP connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with pytest.raises(_download.DownloadError, match="no answer .* within the timeout"):
            P.download(tmp_path / "dest", base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.3)


def test_download_reports_dns_failure(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(_download.DownloadError, match=r"'physionet\.org' could not be resolved \(DNS failure"):
        P.download(tmp_path / "dest")
    assert not list((tmp_path / "dest").iterdir())


def test_parse_sha256sums():
    digest = "ab" * 32
    text = f"# comment\n\n{digest}  a.txt\n{digest.upper()} *records100/x y.dat\n"
    assert _download.parse_sha256sums(text) == {"a.txt": digest, "records100/x y.dat": digest}
    for bad in (f"{digest}\n", "xyz a.txt\n", f"{digest} ../etc/passwd\n", f"{digest} /abs\n",
                f"{digest} a\n{'cd' * 32} a\n"):
        with pytest.raises(ValueError, match="SHA256SUMS.txt line"):
            _download.parse_sha256sums(bad)


def test_fetch_rejects_non_http(tmp_path):
    with pytest.raises(ValueError, match="only http"):
        _download.fetch("file:///etc/passwd", tmp_path / "x", sha256=None)
