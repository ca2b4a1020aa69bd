"""CinC 2017 pipeline: records, labels, resampling, windows, folds, cache, evaluation, download, task.

Expected values are built independently of the loader: signals by decoding the MATLAB v4
bytes with numpy (int16 after the 24-byte header), the anti-alias filter from np.sinc and
np.kaiser with a plain convolution, fold membership from hashlib, metrics with scikit-learn
or by hand. Synthetic records are written in the published formats (WFDB header text and
``scipy.io.savemat(..., format="4")`` with int16 ``val``; a test shows this reproduces the
real files byte for byte).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import importlib.util
import io
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from detjax.data import _download
from detjax.data import cache as data_cache
from detjax.data import cinc2017 as C
from detjax.data import splits as S

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cinc2017"
REFERENCE_COUNTS = {"N": 5076, "A": 758, "O": 2415, "~": 279}


@pytest.fixture
def shared():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv(C.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("DETJAX_CACHE_DIR", str(tmp_path / "default-cache"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- synthetic records


def header_text(name: str, n: int, *, fs="300", gain="1000/mV", adc_zero="0", n_sig=1, mat=None) -> str:
    """A header in the published layout (e.g. 'A00001 1 300 9000 05:05:15 1/05/2000')."""
    mat = mat or f"{name}.mat"
    return (f"{name} {n_sig} {fs} {n} 05:05:15 1/05/2000 \n"
            f"{mat} 16+24 {gain} 16 {adc_zero} -127 0 0 ECG \n")


def write_record(folder: Path, name: str, digital: np.ndarray, **header) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    digital = np.asarray(digital, dtype=np.int16)
    (folder / f"{name}.hea").write_text(header_text(name, digital.size, **header))
    scipy.io.savemat(folder / f"{name}.mat", {"val": digital[None, :]}, format="4")


def digital_signal(i: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    return rng.integers(-2000, 2000, size=n).astype(np.int16)


def decode_mat4(path: Path) -> np.ndarray:
    """Independent reader: MATLAB v4 int16 row vector = 20-byte header, 'val\\0', then little-endian int16."""
    blob = path.read_bytes()
    mopt, mrows, ncols, imagf, namlen = np.frombuffer(blob[:20], "<i4")
    assert (mopt, mrows, imagf, namlen) == (30, 1, 0, 4) and blob[20:24] == b"val\x00"
    return np.frombuffer(blob[24:], "<i2").astype(np.int64)


# 30 records (3 per fold at 10 folds), all four classes; lengths chosen so that records
# 3, 11 and 20 are shorter than 10 s (padded) and the others longer (cropped).
TINY_LABELS = ["N", "N", "A", "O", "~", "N", "A", "O", "N", "O", "N", "A", "~", "O", "N",
               "N", "O", "A", "N", "~", "O", "N", "A", "N", "O", "N", "~", "O", "A", "N"]
TINY_NAMES = [f"A{i:05d}" for i in range(1, len(TINY_LABELS) + 1)]
SHORT = {"A00003": 2714, "A00011": 2950, "A00020": 2996}  # 905, 984, 999 samples at 100 Hz


def tiny_length(name: str) -> int:
    return SHORT.get(name, 3000 + 37 * int(name[1:]))


def make_tree(root: Path) -> Path:
    for i, name in enumerate(TINY_NAMES):
        write_record(root, name, digital_signal(i, tiny_length(name)))
    (root / "REFERENCE-v3.csv").write_text("".join(f"{n},{l}\n" for n, l in zip(TINY_NAMES, TINY_LABELS)))
    (root / "RECORDS").write_text("".join(f"{n}\n" for n in TINY_NAMES))
    folds = C.stratified_folds(TINY_NAMES, TINY_LABELS)
    C.write_folds(root.parent / "folds.csv", TINY_NAMES, TINY_LABELS, folds)
    return root


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("cinc-template") / "training2017")


@pytest.fixture
def tiny(tiny_template, tmp_path):
    """A writable copy: ``(data_dir, folds_csv)``."""
    root = Path(shutil.copytree(tiny_template, tmp_path / "training2017"))
    shutil.copy(tiny_template.parent / "folds.csv", tmp_path / "folds.csv")
    return root, tmp_path / "folds.csv"


def expected_window(digital: np.ndarray, rate: int = 100, length: int = 1000) -> np.ndarray:
    """Independent pipeline: mV, Kaiser-windowed sinc by hand, convolution, explicit centring."""
    x = digital.astype(np.float64) / 1000.0
    g = math.gcd(300, rate)
    up, down = rate // g, 300 // g
    m = max(up, down)
    k = np.arange(20 * m + 1)
    s = np.sinc((k - 10 * m) / m) * np.kaiser(20 * m + 1, 5.0)
    h = up * s / s.sum()
    u = np.zeros(x.size * up)
    u[::up] = x
    y = np.convolve(u, h)[10 * m::down][:-(-x.size * up // down)]
    out = np.zeros(length)
    if y.size >= length:
        out[:] = y[(y.size - length) // 2:][:length]
    else:
        left = (length - y.size) // 2
        out[left:left + y.size] = y
    return out


# --------------------------------------------------------------------------- records


@pytest.mark.shared_data
@pytest.mark.parametrize("record", ["A00001", "A00100", "A08528"])
def test_savemat_v4_reproduces_the_published_files(shared, record):
    val = scipy.io.loadmat(shared / f"{record}.mat")["val"]
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"val": val}, format="4")
    assert buffer.getvalue() == (shared / f"{record}.mat").read_bytes()


@pytest.mark.shared_data
@pytest.mark.parametrize("record,n", [("A00001", 9000), ("A00100", None), ("A08528", 9000)])
def test_real_records_equal_independent_decoding(shared, record, n):
    signal = C.read_record(shared, record)
    digital = decode_mat4(shared / f"{record}.mat")
    header = (shared / f"{record}.hea").read_text().split()
    assert header[2] == "300" and int(header[3]) == digital.size and header[8] == "1000/mV"
    assert signal.dtype == np.float32 and signal.shape == (digital.size,)
    assert n is None or signal.size == n
    assert signal.tobytes() == (digital / 1000.0).astype(np.float32).tobytes()


@pytest.mark.shared_data
def test_real_reference_counts_and_order(shared):
    records, labels = C.read_reference(shared / "REFERENCE-v3.csv")
    assert records == tuple((shared / "RECORDS").read_text().split())
    assert records[0] == "A00001" and records[-1] == "A08528" and len(records) == 8528
    assert dict(collections.Counter(labels)) == REFERENCE_COUNTS


@pytest.mark.parametrize("gain,adc_zero,baseline", [("1000/mV", "0", 0), ("200(5)/mV", "0", 5),
                                                   ("500/mV", "-7", -7), ("1000(0)", "3", 0)])
def test_read_record_applies_gain_and_baseline(tmp_path, gain, adc_zero, baseline):
    digital = digital_signal(0, 400)
    write_record(tmp_path, "X1", digital, gain=gain, adc_zero=adc_zero)
    g = float(gain.split("(")[0].split("/")[0])
    expected = ((decode_mat4(tmp_path / "X1.mat") - baseline) / g).astype(np.float32)
    assert C.read_record(tmp_path, "X1").tobytes() == expected.tobytes()


BAD_HEADERS = [
    ("rate", dict(fs="500"), r"X1 \(.*X1\.hea\): sampling rate 500 Hz .* expected 300"),
    ("two signals", dict(n_sig=2), r"X1 .*2 signal\(s\) declared"),
    ("units", dict(gain="1000/uV"), r"X1 .*units 'uV', expected mV"),
    ("zero gain", dict(gain="0/mV"), r"X1 .*gain '0/mV' must be positive"),
    ("path in file name", dict(mat="../X1.mat"), r"X1 .*must be a \.mat file in the record's folder"),
    ("dat file", dict(mat="X1.dat"), r"X1 .*must be a \.mat file"),
]


@pytest.mark.parametrize("case,header,match", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_header_raises(tmp_path, case, header, match):
    write_record(tmp_path, "X1", digital_signal(0, 300), **header)
    with pytest.raises(ValueError, match=match):
        C.read_record(tmp_path, "X1")


@pytest.mark.parametrize("text,match", [
    ("X2 1 300 300\nX2.mat 16+24 1000/mV 16 0 0 0 0 ECG\n", r"names record 'X2', expected 'X1'"),
    ("X1 1 300\nX1.mat 16+24 1000/mV\n", r"lacks the sample count"),
    ("X1 1 300 300\n", r"1 non-comment line"),
    ("X1 1 300 300\nX1.mat 212 1000/mV\n", r"storage format '212'"),
    ("X1 1 300 abc\nX1.mat 16 1000/mV\n", r"cannot parse the record line"),
])
def test_parse_header_errors(text, match):
    with pytest.raises(ValueError, match=rf"CinC 2017 record X1 .*{match}"):
        C.parse_header(text, record="X1")


def test_parse_header_published_layout():
    h = C.parse_header("# comment\nA00001 1 300 9000 05:05:15 1/05/2000 \n"
                       "A00001.mat 16+24 1000/mV 16 0 -127 0 0 ECG \n", record="A00001")
    assert (h.fs, h.n_samples, h.file_name, h.fmt, h.gain, h.baseline, h.units) == \
           (300.0, 9000, "A00001.mat", "16+24", 1000.0, 0, "mV")


def test_missing_files_raise_file_not_found(tmp_path):
    write_record(tmp_path, "X1", digital_signal(0, 300))
    (tmp_path / "X1.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"record X1: missing signal file") as info:
        C.read_record(tmp_path, "X1")
    assert info.value.filename == str(tmp_path / "X1.mat")
    with pytest.raises(FileNotFoundError, match=r"record X9: missing header file"):
        C.read_record(tmp_path, "X9")
    with pytest.raises(ValueError, match="invalid record name '../X1'"):
        C.read_record(tmp_path, "../X1")


def _mat_bytes(**variables) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables, format="4")
    return buffer.getvalue()


@pytest.mark.parametrize("case,content,match", [
    ("truncated", lambda good: good[:17], r"X1 \(.*X1\.mat\) is corrupt: scipy\.io\.loadmat"),
    ("garbage", lambda good: b"\xff" * 64, r"X1 .*is corrupt"),
    ("other variable", lambda good: _mat_bytes(sig=np.zeros((1, 300), np.int16)), r"no variable 'val' \(has \['sig'\]\)"),
    ("float values", lambda good: _mat_bytes(val=np.zeros((1, 300))), r"'val' has dtype float64, expected int16"),
    ("column vector", lambda good: _mat_bytes(val=np.zeros((300, 1), np.int16)), r"shape \(300, 1\), expected \(1, n\)"),
    ("length", lambda good: _mat_bytes(val=np.zeros((1, 299), np.int16)), r"299 samples in 'val', but the header declares 300"),
])
def test_corrupt_or_mismatched_mat_raises(tmp_path, case, content, match):
    write_record(tmp_path, "X1", digital_signal(0, 300))
    (tmp_path / "X1.mat").write_bytes(content((tmp_path / "X1.mat").read_bytes()))
    with pytest.raises(ValueError, match=match):
        C.read_record(tmp_path, "X1")


# --------------------------------------------------------------------------- labels


def test_read_reference_tiny(tiny):
    root, _ = tiny
    assert C.read_reference(root / "REFERENCE-v3.csv") == (tuple(TINY_NAMES), tuple(TINY_LABELS))
    (root / "crlf.csv").write_bytes(b"\xef\xbb\xbfA00001,N\r\nA00002,~\r\n\r\n")
    assert C.read_reference(root / "crlf.csv") == (("A00001", "A00002"), ("N", "~"))


@pytest.mark.parametrize("text,match", [
    ("A00001,N\nA00002,X\n", r"line 2: record A00002 has label 'X'; expected one of N, A, O, ~"),
    ("A00001,N\nA00002,A\nA00001,O\n", r"line 3: record A00001 is listed again \(first on line 1\)"),
    ("A00001,N,extra\n", r"line 1: expected 'record,label'"),
    ("A00001\n", r"line 1: expected 'record,label'"),
    ("../A00001,N\n", r"line 1: invalid record name"),
    ("\n\n", r"no records"),
])
def test_read_reference_rejects_bad_lines(tiny, text, match):
    root, _ = tiny
    (root / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        C.read_reference(root / "bad.csv")


def test_read_reference_names_records_missing_on_disk(tiny):
    root, _ = tiny
    (root / "A00004.mat").unlink()
    (root / "A00007.hea").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 2 record file\(s\) missing .*A00004 \(A00004\.mat\), "
                                                r"A00007 \(A00007\.hea\)"):
        C.read_reference(root / "REFERENCE-v3.csv")
    assert len(C.read_reference(root / "REFERENCE-v3.csv", check_files=False)[0]) == 30
    with pytest.raises(FileNotFoundError, match="label file not found"):
        C.read_reference(root / "nope.csv")


# --------------------------------------------------------------------------- resampling and windows


@pytest.mark.parametrize("rate,n", [(100, 9000), (100, 9001), (100, 2714), (200, 3001), (250, 1200), (400, 900)])
def test_resample_equals_kaiser_sinc_convolution(rate, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    g = math.gcd(300, rate)
    up, down = rate // g, 300 // g
    m = max(up, down)
    k = np.arange(20 * m + 1)
    s = np.sinc((k - 10 * m) / m) * np.kaiser(20 * m + 1, 5.0)
    h = up * s / s.sum()
    u = np.zeros(n * up)
    u[::up] = x
    expected = np.convolve(u, h)[10 * m::down][:math.ceil(n * up / down)]
    out = C.resample(x, target_rate=rate)
    assert out.dtype == np.float32 and out.shape == (math.ceil(n * rate / 300),)
    # float64 sums in another order: equal after the float32 cast up to one unit in the last place
    np.testing.assert_array_max_ulp(out, expected.astype(np.float32), maxulp=1)


def test_resample_keeps_the_band_and_removes_aliases():
    t = np.arange(30 * 300) / 300.0
    mid = slice(500, 2500)  # away from the zero-padded ends
    tone = C.resample(np.sin(2 * np.pi * 5.0 * t), target_rate=100)
    t100 = np.arange(tone.size) / 100.0
    np.testing.assert_allclose(tone[mid], np.sin(2 * np.pi * 5.0 * t100)[mid], atol=2e-3)
    # 120 Hz would fold to 20 Hz at 100 Hz sampling; the Kaiser(5) stop band suppresses it.
    alias = C.resample(np.sin(2 * np.pi * 120.0 * t), target_rate=100)
    assert np.abs(alias[mid]).max() < 0.01
    assert np.abs(np.sin(2 * np.pi * 120.0 * t)[::3][mid]).max() > 0.9  # plain decimation would alias


def test_resample_identity_and_errors():
    x = np.arange(10, dtype=np.float64)
    out = C.resample(x, target_rate=300)
    assert out.dtype == np.float32 and np.array_equal(out, x) and out is not x
    with pytest.raises(ValueError, match="1-D signal"):
        C.resample(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="target_rate must be a positive integer"):
        C.resample(x, target_rate=0)
    with pytest.raises(ValueError, match="empty"):
        C.resample(np.zeros(0))


def test_fixed_window_by_hand():
    assert C.fixed_window(np.arange(9), 5).tolist() == [2, 3, 4, 5, 6]
    assert C.fixed_window(np.arange(8), 5).tolist() == [1, 2, 3, 4, 5]  # odd surplus: one more dropped at the end
    assert C.fixed_window(np.arange(1, 4), 6).tolist() == [0, 1, 2, 3, 0, 0]  # odd pad: extra zero at the end
    assert C.fixed_window(np.arange(1, 3), 4).tolist() == [0, 1, 2, 0]
    assert C.fixed_window(np.arange(5.0, dtype=np.float32), 5).dtype == np.float32
    with pytest.raises(ValueError, match="length must be a positive integer"):
        C.fixed_window(np.arange(3), 0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), length=st.integers(1, 60))
def test_fixed_window_is_centred(n, length):
    x = np.arange(1, n + 1)
    w = C.fixed_window(x, length)
    assert w.shape == (length,)
    nonzero = np.flatnonzero(w)
    before, after = nonzero[0], length - 1 - nonzero[-1]
    assert np.array_equal(w[before:length - after], np.arange(w[before], w[length - 1 - after] + 1))
    if n >= length:  # a contiguous slice, the drop balanced (extra at the end)
        dropped_front, dropped_back = w[0] - 1, n - w[-1]
        assert before == after == 0 and 0 <= dropped_back - dropped_front <= 1
    else:  # the whole signal, the padding balanced (extra at the end)
        assert w[before] == 1 and w[length - 1 - after] == n and 0 <= after - before <= 1


def test_window_length():
    assert C.window_length(10, 100) == 1000 and C.window_length(2.5, 100) == 250
    assert C.window_length(30, 300) == 9000
    for seconds, rate in ((2.5, 1), (0, 100), (-1, 100), ("ten", 100)):
        with pytest.raises(ValueError, match="window_seconds"):
            C.window_length(seconds, rate)


# --------------------------------------------------------------------------- folds


def _by_hash_folds(records, labels, n_folds):
    """The documented rule, written out: sha256 order within each class, one deal across classes."""
    out, dealt = {}, 0
    for cls in ("N", "A", "O", "~"):
        names = [r for r, l in zip(records, labels) if l == cls]
        for name in sorted(names, key=lambda r: hashlib.sha256(r.encode()).hexdigest()):
            out[name] = dealt % n_folds + 1
            dealt += 1
    return out


def test_stratified_folds_follow_the_rule_and_balance():
    folds = C.stratified_folds(TINY_NAMES, TINY_LABELS, n_folds=10)
    assert list(folds) == TINY_NAMES
    assert folds == _by_hash_folds(TINY_NAMES, TINY_LABELS, 10)
    sizes = collections.Counter(folds.values())
    assert sorted(sizes) == list(range(1, 11)) and set(sizes.values()) == {3}
    # Input order does not matter.
    order = np.random.default_rng(0).permutation(len(TINY_NAMES))
    shuffled = C.stratified_folds([TINY_NAMES[i] for i in order], [TINY_LABELS[i] for i in order])
    assert shuffled == folds
    # First N record by hash gets fold 1, the deal continues into class A where N stopped.
    n_names = sorted((r for r, l in zip(TINY_NAMES, TINY_LABELS) if l == "N"),
                     key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    assert folds[n_names[0]] == 1 and folds[n_names[-1]] == len(n_names) % 10


def test_stratified_folds_errors():
    with pytest.raises(ValueError, match="2 records but 1 labels"):
        C.stratified_folds(["a", "b"], ["N"])
    with pytest.raises(ValueError, match="record 'a' occurs more than once"):
        C.stratified_folds(["a", "a"], ["N", "N"])
    with pytest.raises(ValueError, match="record 'b' has label 'X'"):
        C.stratified_folds(["a", "b"], ["N", "X"])
    with pytest.raises(ValueError, match="n_folds must be at least 2"):
        C.stratified_folds(["a"], ["N"], n_folds=1)


@pytest.mark.shared_data
def test_committed_folds_equal_stratified_folds_of_reference(shared, tmp_path):
    records, labels = C.read_reference(shared / "REFERENCE-v3.csv", check_files=False)
    fold_records, fold_labels, fold_numbers = C.read_folds()
    assert fold_records == records and fold_labels == labels
    assert dict(zip(fold_records, fold_numbers)) == C.stratified_folds(records, labels)
    # Byte-identical to what `make-folds` writes now.
    assert C.main(["make-folds", "--reference", str(shared / "REFERENCE-v3.csv"),
                   "--out", str(tmp_path / "folds.csv")]) == 0
    assert (tmp_path / "folds.csv").read_bytes() == C.vendored_folds_path().read_bytes()


def test_committed_folds_are_stratified():
    records, labels, folds = C.read_folds()
    assert len(records) == 8528 and dict(collections.Counter(labels)) == REFERENCE_COUNTS
    per = collections.Counter(zip(folds, labels))
    for fold in range(1, 11):
        for cls, total in REFERENCE_COUNTS.items():
            assert abs(per[(fold, cls)] - total / 10) < 1, (fold, cls, per[(fold, cls)])
        assert sum(per[(fold, c)] for c in REFERENCE_COUNTS) in (852, 853)


def test_committed_folds_have_a_notice():
    folder = C.vendored_folds_path().parent
    notice = (folder / "NOTICE.md").read_text()
    for needle in ("Open Data Commons Attribution", "Clifford", "REFERENCE-v3.csv", "make-folds",
                   "SHA-256", "physionet.org/content/challenge-2017/1.0.0"):
        assert needle in notice, needle


@pytest.mark.parametrize("text,match", [
    ("rec,label,fold\nA00001,N,1\n", r"header must be record,label,fold"),
    ("record,label,fold\nA00001,N,11\n", r"line 2: record A00001 has fold '11', expected 1..10"),
    ("record,label,fold\nA00001,N,x\n", r"fold 'x'"),
    ("record,label,fold\nA00001,Q,1\n", r"label 'Q'"),
    ("record,label,fold\nA00001,N,1\nA00001,N,2\n", r"line 3: record A00001 is listed again \(first on line 2\)"),
    ("record,label,fold\nA00001,N\n", r"line 2: expected 'record,label,fold'"),
])
def test_read_folds_errors(tmp_path, text, match):
    (tmp_path / "f.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        C.read_folds(tmp_path / "f.csv")


def test_check_folds_names_mismatches():
    C.check_folds(["a", "b"], ["N", "A"], ["b", "a"], ["A", "N"])  # order does not matter
    with pytest.raises(ValueError) as info:
        C.check_folds(["a", "b", "x"], ["N", "A", "O"], ["a", "b", "c"], ["N", "O", "~"],
                      folds_source="F.csv", reference_source="R.csv")
    message = str(info.value)
    assert "F.csv does not match R.csv" in message
    assert "1 records of the reference missing from the folds file: c" in message
    assert "1 records in the folds file but not in the reference: x" in message
    assert "b (A in folds, O in reference)" in message and "make-folds" in message


@pytest.mark.parametrize("cv_fold,expected", [(0, ((1, 2, 3, 4, 5, 6, 7, 8), (9,), (10,))),
                                              (1, ((1, 2, 3, 4, 5, 6, 7, 10), (8,), (9,))),
                                              (2, ((1, 2, 3, 4, 5, 6, 7, 9), (10,), (8,)))])
def test_fold_roles(cv_fold, expected):
    assert tuple(S.fold_roles(cv_fold).values()) == expected
    assert list(S.fold_roles(cv_fold)) == ["train", "val", "test"]


# --------------------------------------------------------------------------- loading


def _load(tiny, **kwargs):
    root, folds = tiny
    kwargs.setdefault("use_cache", False)
    return C.load_cinc2017(root, folds=folds, **kwargs)


@pytest.mark.parametrize("cv_fold", [0, 1, 2])
def test_load_tiny_values_splits_and_normalisation(tiny, cv_fold):
    out = _load(tiny, cv_fold=cv_fold)
    fold_of = C.stratified_folds(TINY_NAMES, TINY_LABELS)
    test_fold, val_fold = [(10, 9), (9, 8), (8, 10)][cv_fold]
    expected_members = {"train": [n for n in TINY_NAMES if fold_of[n] not in (test_fold, val_fold)],
                        "val": [n for n in TINY_NAMES if fold_of[n] == val_fold],
                        "test": [n for n in TINY_NAMES if fold_of[n] == test_fold]}
    raw = {name: np.stack([expected_window(decode_mat4(tiny[0] / f"{r}.mat")) for r in rs])
           for name, rs in expected_members.items()}
    mean, std = raw["train"].mean(), raw["train"].std()
    assert out["norm"]["mean"] == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert out["norm"]["std"] == pytest.approx(std, rel=1e-6)
    assert out["norm"]["count"] == raw["train"].size
    for name, records in expected_members.items():
        assert out[f"record_{name}"].tolist() == records
        assert out[f"y_{name}"].dtype == np.int32
        assert out[f"y_{name}"].tolist() == [C.CLASSES.index(TINY_LABELS[TINY_NAMES.index(r)]) for r in records]
        x = out[f"x_{name}"]
        assert x.dtype == np.float32 and x.shape == (len(records), 1000, 1)
        np.testing.assert_allclose(x[..., 0], (raw[name] - mean) / std, rtol=0, atol=2e-5)
        assert out["counts"][name] == {c: sum(TINY_LABELS[TINY_NAMES.index(r)] == c for r in records)
                                       for c in C.CLASSES}
        assert out["padded"][name] == sum(r in SHORT for r in records)
    assert out["n"] == {k: len(v) for k, v in expected_members.items()}
    assert out["folds"] == {"train": [f for f in range(1, 11) if f not in (test_fold, val_fold)],
                            "val": [val_fold], "test": [test_fold]}
    assert out["labels"] == ("N", "A", "O", "~") and out["window_length"] == 1000
    assert "fingerprint" not in out  # the arrays are hashed once, by TaskData.fingerprint()


def _digest(out):
    """SHA-256 of the nine split arrays of a load."""
    return data_cache.fingerprint({f"{p}_{s}": out[f"{p}_{s}"] for p in ("x", "y", "record")
                                   for s in ("train", "val", "test")})


def test_normalisation_is_exactly_float32_of_train_statistics(tiny):
    out = _load(tiny)
    assert _load(tiny)["x_train"].tobytes() == out["x_train"].tobytes()  # a second load: the same bits
    # Un-normalised windows via the public pieces, then the documented float32 formula.
    records = out["record_train"].tolist()
    windows = np.stack([C.preprocess(C.read_record(tiny[0], r)) for r in records])[..., None]
    stats = C.train_statistics(windows)
    assert stats == out["norm"]
    expected = (windows - np.float32(stats["mean"])) / np.float32(stats["std"])
    assert out["x_train"].tobytes() == expected.astype(np.float32).tobytes()


def test_load_other_window_and_rate(tiny):
    out = _load(tiny, window_seconds=4, sampling_rate=250)
    assert out["x_train"].shape[1:] == (1000, 1) and out["window_length"] == 1000 and out["padded"]["train"] == 0
    record = out["record_val"][0]
    windows = expected_window(decode_mat4(tiny[0] / f"{record}.mat"), rate=250, length=1000)
    mu, sigma = out["norm"]["mean"], out["norm"]["std"]
    np.testing.assert_allclose(out["x_val"][0, :, 0], (windows - mu) / sigma, atol=2e-5)


def test_limit_keeps_the_first_records_after_the_full_statistics(tiny):
    full = _load(tiny)
    small = _load(tiny, limit=2)
    assert small["norm"] == full["norm"] and small["limit"] == 2 and full["limit"] is None
    for name in ("train", "val", "test"):
        for part in ("x", "y", "record"):
            assert small[f"{part}_{name}"].tobytes() == full[f"{part}_{name}"][:2].tobytes()
        assert small["n"][name] == 2 and small["padded"][name] == sum(r in SHORT for r in small[f"record_{name}"])
    assert small["source"]["n_read"] == full["source"]["n_read"] == full["source"]["n_records"] == 30
    with pytest.raises(ValueError, match="limit must be a positive"):
        _load(tiny, limit=0)


def test_data_dir_from_environment_or_a_clear_error(tiny, monkeypatch):
    root, folds = tiny
    with pytest.raises(ValueError, match=r"pass data_dir \(--data-dir .*\) or set .*DETJAX_CINC2017_DIR"):
        C.load_cinc2017(None, folds=folds, use_cache=False)
    monkeypatch.setenv("DETJAX_CINC2017_DIR", str(root))
    out = C.load_cinc2017(None, folds=folds, use_cache=False)
    assert out["source"]["data_dir"] == str(root.resolve())
    assert out["source"]["data_source"] == {"kind": "environment", "variable": "DETJAX_CINC2017_DIR"}
    given = C.load_cinc2017(root, folds=folds, use_cache=False)["source"]
    assert given["data_source"] == {"kind": "argument"} and given["content_sha256"] == out["source"]["content_sha256"]
    with pytest.raises(FileNotFoundError, match="data folder not found") as info:
        C.load_cinc2017(root / "nowhere", folds=folds)
    assert info.value.filename == str(root / "nowhere")


def test_load_rejects_folds_that_disagree_with_the_reference(tiny):
    root, folds = tiny
    text = (root / "REFERENCE-v3.csv").read_text().replace("A00005,~", "A00005,N")
    (root / "REFERENCE-v3.csv").write_text(text)
    with pytest.raises(ValueError, match=r"records whose label differs: A00005 \(~ in folds, N in reference\)"):
        _load(tiny)
    # The vendored folds are for the 8,528 real records, not these 30.
    with pytest.raises(ValueError, match=r"8498 records in the folds file but not in the reference"):
        C.load_cinc2017(root, use_cache=False)


def test_load_argument_errors(tiny):
    for kwargs, match in (({"cv_fold": 3}, "cv_fold must be 0, 1 or 2"),
                          ({"window_seconds": 0.001}, "window_seconds"),
                          ({"sampling_rate": 0}, "sampling_rate must be a positive integer"),
                          ({"reference": "nope.csv"}, "label file not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            _load(tiny, **kwargs)


def test_make_folds_command(tiny, tmp_path, capsys):
    root, folds = tiny
    assert C.main(["make-folds", "--reference", str(root / "REFERENCE-v3.csv"), "--out", str(tmp_path / "f.csv")]) == 0
    assert "30 records" in capsys.readouterr().out
    assert (tmp_path / "f.csv").read_bytes() == folds.read_bytes()
    lines = (tmp_path / "f.csv").read_text().splitlines()
    fold_of = _by_hash_folds(TINY_NAMES, TINY_LABELS, 10)
    assert lines[0] == "record,label,fold" and lines[1:] == [f"{n},{l},{fold_of[n]}" for n, l in
                                                             zip(TINY_NAMES, TINY_LABELS)]
    assert C.main(["make-folds", "--reference", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "g")]) == 2
    assert "label file not found" in capsys.readouterr().err


@pytest.mark.shared_data
def test_real_subset_load(shared, tmp_path):
    out = C.load_cinc2017(shared, limit=8, cache_dir=tmp_path)
    fold_of = dict(zip(*C.read_folds()[::2]))
    for name, folds in out["folds"].items():
        assert out[f"x_{name}"].shape == (8, 1000, 1)
        assert {fold_of[r] for r in out[f"record_{name}"]} <= set(folds)
    record = out["record_test"][3]
    window = expected_window(decode_mat4(shared / f"{record}.mat"))
    np.testing.assert_allclose(out["x_test"][3, :, 0],
                               (window - out["norm"]["mean"]) / out["norm"]["std"], atol=2e-5)
    again = C.load_cinc2017(shared, limit=8, cache_dir=tmp_path)
    assert again["source"]["from_cache"] and _digest(again) == _digest(out)


# --------------------------------------------------------------------------- cache


def _npz_files(cache: Path):
    return sorted(cache.rglob("*.npz"))


def test_cache_hit_and_invalidation(tiny, tmp_path):
    root, folds = tiny
    cache = tmp_path / "cache"
    first = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    assert not first["source"]["from_cache"] and len(_npz_files(cache)) == 1
    again = C.load_cinc2017(root, folds=folds, cache_dir=cache, cv_fold=2)  # same windows, other split
    assert again["source"]["from_cache"] and again["source"]["content_sha256"] == first["source"]["content_sha256"]
    warm = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    assert _digest(warm) == _digest(first) and warm["x_test"].tobytes() == first["x_test"].tobytes()
    # One changed sample of one record selects a new entry and changes exactly that record.
    digital = digital_signal(TINY_NAMES.index("A00010"), tiny_length("A00010"))
    digital[1500] += 1
    write_record(root, "A00010", digital)
    changed = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    assert not changed["source"]["from_cache"] and len(_npz_files(cache)) == 2
    assert changed["source"]["content_sha256"] != first["source"]["content_sha256"]
    assert _digest(changed) != _digest(first)
    # A header edit (a comment) also changes the key; settings do too.
    with open(root / "A00002.hea", "a") as handle:
        handle.write("# edited\n")
    assert not C.load_cinc2017(root, folds=folds, cache_dir=cache)["source"]["from_cache"]
    assert not C.load_cinc2017(root, folds=folds, cache_dir=cache, window_seconds=5)["source"]["from_cache"]
    assert len(_npz_files(cache)) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_corrupt_cache_is_rebuilt(tiny, tmp_path, damage):
    root, folds = tiny
    cache = tmp_path / "cache"
    first = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    (path,) = _npz_files(cache)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        arrays = {"x": np.zeros((1, 1000), np.float32), "record": np.array(["A00001"]),
                  "n_samples": np.array([3000])}
        np.savez(path, key=np.array("0" * 64), digest=np.array(data_cache.fingerprint(arrays)), **arrays)
    with pytest.warns(RuntimeWarning, match="CinC 2017 cache file .* is corrupt"):
        rebuilt = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    assert not rebuilt["source"]["from_cache"] and _digest(rebuilt) == _digest(first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.load_cinc2017(root, folds=folds, cache_dir=cache)["source"]["from_cache"]


def test_cache_write_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    root, folds = tiny
    cache = tmp_path / "cache"

    def crash(handle, **arrays):  # a partial write, then the disk is full
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.np, "savez", crash)
    with pytest.warns(RuntimeWarning, match="could not write CinC 2017 cache"):
        out = C.load_cinc2017(root, folds=folds, cache_dir=cache)
    assert out["x_train"].shape == (24, 1000, 1)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_default_cache_dir_and_use_cache_false(tiny, tmp_path):
    root, folds = tiny
    out = C.load_cinc2017(root, folds=folds)
    assert Path(out["source"]["cache_file"]).parent == tmp_path / "default-cache" / "cinc2017"
    assert len(_npz_files(tmp_path / "default-cache")) == 1
    C.load_cinc2017(root, folds=folds, cache_dir=tmp_path / "unused", use_cache=False)
    assert not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------- evaluation


def test_evaluate_by_hand():
    # 6 records; argmax predictions N, N, A, O, O, N against truth N, A, A, O, ~, N.
    y = np.array([0, 1, 1, 2, 3, 0])
    probs = np.array([[.7, .1, .1, .1], [.5, .3, .1, .1], [.1, .8, .05, .05],
                      [.1, .1, .7, .1], [.2, .1, .4, .3], [.6, .2, .1, .1]])
    out = C.evaluate(y, probs)
    assert out["confusion"] == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    # F1 = 2 TP / (true + predicted): N 4/5, A 2/3, O 2/3, ~ 0/1.
    assert out["f1"] == pytest.approx({"N": 0.8, "A": 2 / 3, "O": 2 / 3, "~": 0.0})
    assert out["challenge_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert out["acc"] == pytest.approx(4 / 6)
    # AUC of N: positives {0.7, 0.6} vs negatives {0.5, 0.1, 0.1, 0.2}: all 8 pairs ordered.
    assert out["per_class_auc"]["N"] == 1.0
    # AUC of ~: positive 0.3 vs negatives {.1, .1, .05, .1, .1}: 1.0; O: 0.7 vs {.1,.1,.05,.4,.1}: 1.0
    assert out["per_class_auc"]["~"] == 1.0 and out["per_class_auc"]["O"] == 1.0
    # A: positives {.3, .8} vs negatives {.1, .1, .1, .2}: 8/8.
    assert out["score"] == out["macro_auc"] == 1.0


def test_evaluate_matches_sklearn():
    rng = np.random.default_rng(7)
    y = rng.choice(4, size=300, p=[.6, .1, .25, .05]).astype(np.int32)
    logits = rng.standard_normal((300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = C.evaluate(y[:, None], probs.astype(np.float32))  # (n, 1) labels are accepted too
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in range(4)]
    assert list(out["per_class_auc"].values()) == pytest.approx(aucs, abs=1e-6)
    assert out["macro_auc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    pred = probs.argmax(1)
    assert list(out["f1"].values()) == pytest.approx(f1_score(y, pred, labels=[0, 1, 2, 3], average=None))
    assert out["challenge_f1"] == pytest.approx(f1_score(y, pred, labels=[0, 1, 2], average="macro"))
    assert out["acc"] == pytest.approx(accuracy_score(y, pred))
    assert out["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2, 3]).tolist()


def test_evaluate_skips_classes_without_positives_or_negatives():
    y = np.array([0, 0, 2, 2, 0])
    probs = np.array([[.9, 0, .1, 0], [.6, 0, .4, 0], [.2, 0, .8, 0], [.7, 0, .3, 0], [.5, .5, 0, 0]])
    out = C.evaluate(y, probs)
    assert out["per_class_auc"]["A"] is None and out["per_class_auc"]["~"] is None
    # N: positives {.9,.6,.5} vs negatives {.2,.7}: pairs won 2 + 1 + 1 = 4 of 6.
    assert out["per_class_auc"]["N"] == pytest.approx(4 / 6)
    # O: positives {.8, .3} vs negatives {.1, .4, 0}: 3 + 2 = 5 of 6.
    assert out["per_class_auc"]["O"] == pytest.approx(5 / 6)
    assert out["macro_auc"] == pytest.approx((4 / 6 + 5 / 6) / 2)
    # A never true but predicted once (ties go to the lower index: record 4 -> N): F1_A = 0.
    assert out["confusion"][0] == [3, 0, 0, 0] and out["f1"]["A"] == 0.0


@pytest.mark.parametrize("y,probs,match", [
    (np.array([0, 1]), np.zeros((2, 3)), r"probs \(2, 3\) \(n, 4\)"),
    (np.array([0, 4]), np.zeros((2, 4)), r"class indices 0\.\.3"),
    (np.array([0.0, 1.0]), np.zeros((2, 4)), r"class indices"),
    (np.array([0, 1]), np.full((2, 4), np.nan), r"NaN or inf"),
])
def test_evaluate_errors(y, probs, match):
    with pytest.raises(ValueError, match=match):
        C.evaluate(y, probs)


# --------------------------------------------------------------------------- task and model


def _config(**kwargs):
    from detjax.train import TrainConfig

    base = dict(task="cinc2017", arch="conformer", model={"in_leads": 1}, loss="ce", epochs=1)
    return TrainConfig(**{**base, **kwargs})


def test_task_data(tiny):
    from detjax import ordering, tasks

    root, folds = tiny
    data = tasks.load_task(_config(data={"data_dir": str(root), "folds": str(folds), "cv_fold": 1}))
    direct = C.load_cinc2017(root, folds=folds, cv_fold=1)
    assert data.labels == ("N", "A", "O", "~") and data.evaluate is C.evaluate and data.augment is None
    for split in ("train", "val", "test"):
        assert getattr(data, f"{split}_x").tobytes() == direct[f"x_{split}"].tobytes()
        assert getattr(data, f"{split}_y").tobytes() == direct[f"y_{split}"].tobytes()
    expected_keys = ordering.golden_content_keys(direct["x_train"])
    assert np.array_equal(np.asarray(data.order_keys.to_uint64()), np.asarray(expected_keys.to_uint64()))
    assert "fingerprint" not in data.info and data.info["counts"] == direct["counts"]
    assert data.info["source"]["dataset"].startswith("PhysioNet/CinC") and data.info["limit"] is None
    import json

    json.dumps(data.info)  # goes into the manifest


def test_task_errors(tiny, monkeypatch):
    from detjax import tasks

    root, folds = tiny
    with pytest.raises(ValueError, match="use loss='ce', not 'weighted_bce'"):
        tasks.load_task(_config(loss="weighted_bce", data={"data_dir": str(root)}))
    with pytest.raises(ValueError, match=r"unknown cinc2017 data options \['leads'\]"):
        tasks.load_task(_config(data={"data_dir": str(root), "leads": "II"}))
    with pytest.raises(ValueError, match="DETJAX_CINC2017_DIR"):
        tasks.load_task(_config(data={"folds": str(folds)}))
    monkeypatch.setenv("DETJAX_CINC2017_DIR", str(root))
    data = tasks.load_task(_config(data={"folds": str(folds), "limit": 2}))
    assert data.train_x.shape == (2, 1000, 1) and data.info["limit"] == 2


def test_single_lead_conformer_parameter_count():
    import jax
    import jax.numpy as jnp

    from detjax.models import count_params, get_model

    model = get_model("conformer", num_classes=4, in_leads=1, init="mixed")
    variables = jax.eval_shape(lambda key: model.init(key, jnp.zeros((2, 1000, 1), jnp.float32)),
                               jax.random.key(0))
    # From docs/method.md §7's 1,827,634 (12 leads, 12 classes): the first conv loses 11*40*5 weights;
    # the bottleneck Dense(320 -> K+2) and the K heads Dense(K+2 -> 1) shrink from K = 12 to 4.
    expected = 1_827_634 - 11 * 40 * 5 - (320 + 1) * (14 - 6) - (12 * 15 - 4 * 7)
    assert expected == 1_822_714
    assert count_params(variables["params"]) == expected
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                            jax.ShapeDtypeStruct((3, 1000, 1), jnp.float32))
    assert logits.shape == (3, 4)


# --------------------------------------------------------------------------- experiment CLI


def _experiment_module():
    spec = importlib.util.spec_from_file_location("cinc2017_experiment", REPO / "experiments" / "cinc2017.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_config_records_the_data_folder(tmp_path, monkeypatch):
    exp = _experiment_module()
    assert exp.ENV_DATA_DIR == C.ENV_DATA_DIR
    parser = exp.build_parser()
    args = parser.parse_args([])
    monkeypatch.delenv("DETJAX_CINC2017_DIR", raising=False)
    with pytest.raises(ValueError, match=r"--data-dir DIR or set DETJAX_CINC2017_DIR"):
        exp.config_of(args, 1)
    monkeypatch.setenv("DETJAX_CINC2017_DIR", "rel/dir")
    data = dict(exp.config_of(args, 1).data)
    assert data == {"data_dir": str(Path("rel/dir").absolute()), "window_seconds": 10.0, "sampling_rate": 100,
                    "reference": "REFERENCE-v3.csv", "cv_fold": 0, "limit": None}
    args = parser.parse_args(["--data-dir", str(tmp_path), "--window-seconds", "20", "--cv-fold", "2",
                              "--init", "hartley", "--limit", "5"])
    monkeypatch.setenv("DETJAX_CINC2017_DIR", "ignored")
    data = exp.config_of(args, 1).data
    assert (data["data_dir"], data["window_seconds"], data["cv_fold"], data["limit"]) == (str(tmp_path), 20.0, 2, 5)
    data_dir_help = next(a.help for a in parser._actions if "--data-dir" in a.option_strings)
    assert "DETJAX_CINC2017_DIR" in data_dir_help and "vendored" not in data_dir_help


def test_experiment_without_data_dir_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DETJAX_CINC2017_DIR"}
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "cinc2017.py"), "--epochs", "1",
                           "--out", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "--data-dir" in proc.stderr and "DETJAX_CINC2017_DIR" in proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- download


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
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _sha256sums(root: Path) -> None:
    files = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != "SHA256SUMS.txt")
    (root / "SHA256SUMS.txt").write_text(
        "".join(f"{hashlib.sha256((root / f).read_bytes()).hexdigest()} {f}\n" for f in files))


@pytest.fixture
def remote(tiny, tmp_path):
    """A fake PhysioNet folder: training2017.zip (the tiny records, RECORDS, an older REFERENCE.csv),
    REFERENCE-v3.csv, an unrelated file, SHA256SUMS.txt."""
    root_data, _ = tiny
    remote = tmp_path / "remote"
    remote.mkdir()
    with zipfile.ZipFile(remote / "training2017.zip", "w") as archive:
        archive.writestr("training2017/", "")
        for path in sorted(root_data.iterdir()):
            if path.name != "REFERENCE-v3.csv":
                archive.write(path, f"training2017/{path.name}")
        archive.writestr("training2017/REFERENCE.csv", "A00001,A\n")
    shutil.copy(root_data / "REFERENCE-v3.csv", remote / "REFERENCE-v3.csv")
    (remote / "sample2017.zip").write_bytes(b"not wanted")
    _sha256sums(remote)
    server = _Server(remote)
    yield remote, server
    server.close()


def _leftovers(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and (p.name.endswith((".part", ".tmp")))]


def test_download_verifies_extracts_and_resumes(remote, tiny, tmp_path):
    root, server = remote
    dest = tmp_path / "dest"
    folder = C.download_cinc2017(dest, base_url=server.url)
    assert folder == dest / "training2017"
    assert sorted(p.name for p in dest.iterdir()) == ["REFERENCE-v3.csv", "SHA256SUMS.txt", "training2017",
                                                     "training2017.zip"]
    assert (folder / "REFERENCE-v3.csv").read_bytes() == (root / "REFERENCE-v3.csv").read_bytes()
    assert (folder / "A00017.mat").read_bytes() == (tiny[0] / "A00017.mat").read_bytes()
    loaded = C.load_cinc2017(folder, folds=tiny[1], use_cache=False)
    assert _digest(loaded) == _digest(C.load_cinc2017(tiny[0], folds=tiny[1], use_cache=False))
    assert "/sample2017.zip" not in server.requests

    server.requests.clear()
    assert C.download_cinc2017(dest, base_url=server.url) == folder
    assert server.requests == ["/SHA256SUMS.txt"]  # both files verified on disk: nothing fetched

    (dest / "REFERENCE-v3.csv").write_text("tampered\n")
    server.requests.clear()
    C.download_cinc2017(dest, base_url=server.url)
    assert sorted(server.requests) == ["/REFERENCE-v3.csv", "/SHA256SUMS.txt"]
    assert _leftovers(dest) == []


def test_download_checksum_mismatch_keeps_nothing(remote, tmp_path):
    root, server = remote
    good = hashlib.sha256((root / "training2017.zip").read_bytes()).hexdigest()
    sums = (root / "SHA256SUMS.txt").read_text()
    (root / "SHA256SUMS.txt").write_text(sums.replace(f"{good} training2017.zip", f"{'0' * 64} training2017.zip"))
    dest = tmp_path / "dest"
    with pytest.raises(_download.ChecksumError, match=rf"training2017\.zip: expected sha256 0{{64}}, got {good}"):
        C.download_cinc2017(dest, base_url=server.url)
    assert not (dest / "training2017.zip").exists() and not (dest / "training2017").exists()
    assert not (dest / "SHA256SUMS.txt").exists() and _leftovers(dest) == []


def test_download_rejects_unsafe_archive_members(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    with zipfile.ZipFile(remote / "training2017.zip", "w") as archive:
        archive.writestr("training2017/A00001.hea", "x")
        archive.writestr("training2017/../../evil.txt", "x")
    (remote / "REFERENCE-v3.csv").write_text("A00001,N\n")
    _sha256sums(remote)
    server = _Server(remote)
    try:
        with pytest.raises(ValueError, match=r"unexpected member 'training2017/\.\./\.\./evil\.txt'"):
            C.download_cinc2017(tmp_path / "dest", base_url=server.url)
    finally:
        server.close()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "dest" / "training2017").exists()
    assert [p.name for p in (tmp_path / "dest").iterdir() if p.name.startswith(".training2017")] == []


def test_download_requires_listed_files(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "REFERENCE-v3.csv").write_text("A00001,N\n")
    _sha256sums(remote)
    server = _Server(remote)
    try:
        with pytest.raises(ValueError, match=r"does not list training2017\.zip"):
            C.download_cinc2017(tmp_path / "dest", base_url=server.url)
    finally:
        server.close()


def test_download_fails_fast_without_network(tmp_path):
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(_download.DownloadError) as info:
        C.download_cinc2017(tmp_path / "dest", base_url=f"http://127.0.0.1:{port}/", timeout=2.0)
    message = str(info.value)
    assert "CinC 2017 could not be downloaded" in message and "refused" in message
    assert "physionet.org/files/challenge-2017/1.0.0/training2017.zip" in message and "--data-dir" in message
