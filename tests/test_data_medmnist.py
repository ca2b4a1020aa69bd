"""Tests of detjax.data.medmnist: loader (real and synthetic files), checksums, download,
preprocessing and the official evaluator metrics."""

import contextlib
import functools
import hashlib
import http.server
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from detjax.data import _download
from detjax.data import medmnist as mm

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist"
VENDORED = mm.vendored_dir() / "breastmnist.npz"
BREAST_MD5 = "750601b1f35ba3300ea97c75c52ff8f6"
PNEUMONIA_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"


@pytest.fixture(scope="module")
def shared_dir():
    if not (SHARED / "pneumoniamnist.npz").is_file():
        pytest.skip(f"shared MedMNIST data not found at {SHARED}")
    return SHARED


def _write_npz(folder, flag, size=28, n=(6, 3, 4), seed=0, drop=(), **override):
    """A synthetic file in the official layout for ``flag`` (grayscale (N,H,W), RGB (N,H,W,3))."""
    info = mm.dataset_info(flag)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(mm.SPLITS, n):
        shape = (count, size, size) + ((3,) if info.n_channels == 3 else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if info.multi_label:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, info.n_classes), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(count) % info.n_classes).astype(np.uint8)[:, None]
    arrays.update(override)
    for key in drop:
        del arrays[key]
    path = Path(folder) / mm.file_name(flag, size)
    np.savez_compressed(path, **arrays)
    return path, arrays


# ----------------------------------------------------------------------------- metadata
def test_builtin_table_facts():
    assert mm.FLAGS == (
        "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
        "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
    )  # fmt: skip
    n_classes = dict(pathmnist=9, chestmnist=14, dermamnist=7, octmnist=4, pneumoniamnist=2, retinamnist=5,
                     breastmnist=2, bloodmnist=8, tissuemnist=8, organamnist=11, organcmnist=11, organsmnist=11)
    rgb = {"pathmnist", "dermamnist", "retinamnist", "bloodmnist"}
    for flag in mm.FLAGS:
        info = mm.dataset_info(flag, source="builtin")
        assert info.flag == flag and info.n_classes == n_classes[flag]
        assert info.n_channels == (3 if flag in rgb else 1)
        assert info.task in mm.TASKS
        assert set(info.n_samples) == set(mm.SPLITS)
        assert set(info.md5) == set(mm.SIZES)
        assert all(len(h) == 32 and int(h, 16) >= 0 for h in info.md5.values())
    tasks = {f: mm.dataset_info(f, source="builtin").task for f in mm.FLAGS}
    assert tasks["chestmnist"] == "multi-label, binary-class"
    assert tasks["retinamnist"] == "ordinal-regression"
    assert {f for f, t in tasks.items() if t == "binary-class"} == {"pneumoniamnist", "breastmnist"}
    all_md5 = [h for f in mm.FLAGS for h in mm.dataset_info(f, source="builtin").md5.values()]
    assert len(set(all_md5)) == len(all_md5) == 48
    breast = mm.dataset_info("BreastMNIST", source="builtin")
    assert breast.labels == ("malignant", "normal, benign")
    assert dict(breast.n_samples) == {"train": 546, "val": 78, "test": 156}
    assert breast.md5[28] == BREAST_MD5
    assert mm.dataset_info("pneumoniamnist", source="builtin").md5[28] == PNEUMONIA_MD5


def test_file_names_and_urls():
    assert mm.file_name("breastmnist") == "breastmnist.npz"
    assert mm.file_name("pathmnist", 224) == "pathmnist_224.npz"
    assert mm.official_url("chestmnist", 64) == "https://zenodo.org/records/10519652/files/chestmnist_64.npz?download=1"
    with pytest.raises(ValueError, match="unknown MedMNIST image size 32"):
        mm.file_name("breastmnist", 32)
    with pytest.raises(ValueError, match="unknown MedMNIST flag 'organmnist3d'"):
        mm.dataset_info("organmnist3d")


def test_builtin_table_agrees_with_medmnist_package():
    medmnist = pytest.importorskip("medmnist")
    for flag in mm.FLAGS:
        ours, theirs = mm.dataset_info(flag, source="builtin"), mm.dataset_info(flag, source="medmnist")
        assert theirs.source.startswith("medmnist")
        for field in ("python_class", "task", "labels", "n_channels"):
            assert getattr(ours, field) == getattr(theirs, field), (flag, field)
        if medmnist.__version__.startswith("3."):  # v2 had other Organ{A,C,S} files
            assert dict(ours.n_samples) == dict(theirs.n_samples), flag
            assert dict(ours.md5) == dict(theirs.md5), flag


# ----------------------------------------------------------------------------- real files
def test_vendored_breastmnist():
    assert mm.md5_file(VENDORED) == BREAST_MD5
    data = mm.load_medmnist("breastmnist")
    assert data.path == VENDORED and data.md5 == BREAST_MD5 and data.size == 28
    assert data.task == "binary-class" and data.n_classes == 2 and data.n_channels == 1
    for split, n in {"train": 546, "val": 78, "test": 156}.items():
        images, labels = data.split(split)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n, 1) and labels.dtype == np.int32
        assert set(np.unique(labels)) == {0, 1}
    raw = np.load(VENDORED)
    np.testing.assert_array_equal(data.train_images[..., 0], raw["train_images"])
    np.testing.assert_array_equal(data.test_labels, raw["test_labels"])


def test_load_records_the_folder_kind_and_digests(tmp_path):
    data = mm.load_medmnist("breastmnist")
    assert data.data_source == {"kind": "vendored"}
    assert data.sha256 == hashlib.sha256(VENDORED.read_bytes()).hexdigest()
    shutil.copy(VENDORED, tmp_path / "breastmnist.npz")
    given = mm.load_medmnist("breastmnist", tmp_path)
    assert given.data_source == {"kind": "argument"} and (given.md5, given.sha256) == (data.md5, data.sha256)


def test_limit_keeps_the_first_records_of_each_split():
    full, small = mm.load_medmnist("breastmnist"), mm.load_medmnist("breastmnist", limit=4)
    for split in mm.SPLITS:
        for part in (0, 1):
            assert small.split(split)[part].tobytes() == full.split(split)[part][:4].tobytes()
    assert small.md5 == full.md5  # the whole file is still verified
    with pytest.raises(ValueError, match="limit must be a positive"):
        mm.load_medmnist("breastmnist", limit=0)


@pytest.mark.shared_data
def test_vendored_copy_is_the_shared_file(shared_dir):
    assert VENDORED.read_bytes() == (shared_dir / "breastmnist.npz").read_bytes()


@pytest.mark.shared_data
def test_shared_pneumoniamnist(shared_dir):
    data = mm.load_medmnist("pneumoniamnist", shared_dir)
    assert data.md5 == PNEUMONIA_MD5
    sizes = {s: data.split(s)[0].shape for s in mm.SPLITS}
    assert sizes == {"train": (4708, 28, 28, 1), "val": (524, 28, 28, 1), "test": (624, 28, 28, 1)}
    assert {s: data.split(s)[1].shape[0] for s in mm.SPLITS} == dict(data.info.n_samples)
    assert set(np.unique(data.train_labels)) == {0, 1}


def test_no_vendored_copy_of_other_flags():
    with pytest.raises(ValueError, match=r"pneumoniamnist\.npz is not shipped.*--data-dir.*e\.g\. data/medmnist"):
        mm.load_medmnist("pneumoniamnist")
    with pytest.raises(ValueError, match="breastmnist_64.npz is not shipped"):
        mm.load_medmnist("breastmnist", size=64)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/dermamnist.npz"):
        mm.load_medmnist("dermamnist", tmp_path)


# ----------------------------------------------------------------------------- synthetic files
def test_synthetic_multiclass_rgb(tmp_path):
    path, arrays = _write_npz(tmp_path, "dermamnist")
    data = mm.load_medmnist("dermamnist", tmp_path, verify=False)
    assert data.train_images.shape == (6, 28, 28, 3)  # RGB kept channel-last
    np.testing.assert_array_equal(data.train_images, arrays["train_images"])
    np.testing.assert_array_equal(data.val_labels, arrays["val_labels"].astype(np.int32))
    assert data.task == "multi-class" and data.n_classes == 7 and data.md5 == mm.md5_file(path)


def test_synthetic_binary_grayscale_size_64(tmp_path):
    _, arrays = _write_npz(tmp_path, "pneumoniamnist", size=64)
    data = mm.load_medmnist("pneumoniamnist", tmp_path, size=64, verify=False)
    assert data.test_images.shape == (4, 64, 64, 1)  # channel axis added
    np.testing.assert_array_equal(data.test_images[..., 0], arrays["test_images"])
    assert data.test_labels.tolist() == [[0], [1], [0], [1]]


def test_synthetic_multilabel_and_ordinal(tmp_path):
    _, arrays = _write_npz(tmp_path, "chestmnist")
    data = mm.load_medmnist("chestmnist", tmp_path, verify=False)
    assert data.train_labels.shape == (6, 14) and data.task == "multi-label, binary-class"
    np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])
    _write_npz(tmp_path, "retinamnist")
    assert mm.load_medmnist("retinamnist", tmp_path, verify=False).train_labels.max() == 4


def test_md5_mismatch_names_both_digests(tmp_path):
    path, _ = _write_npz(tmp_path, "breastmnist")
    actual = mm.md5_file(path)
    with pytest.raises(mm.ChecksumError, match=f"MD5 mismatch for {path}: expected {BREAST_MD5}, got {actual}"):
        mm.load_medmnist("breastmnist", tmp_path)
    assert mm.load_medmnist("breastmnist", tmp_path, verify=False).md5 == actual


def test_md5_mismatch_recognises_a_known_other_release(tmp_path, monkeypatch):
    path, _ = _write_npz(tmp_path, "organamnist")
    monkeypatch.setitem(mm._LEGACY_MD5, mm.md5_file(path), "organamnist.npz of a test release")
    with pytest.raises(ValueError, match="this is the organamnist.npz of a test release"):
        mm.load_medmnist("organamnist", tmp_path)


def test_unknown_md5_warns_and_skips(tmp_path):
    path, _ = _write_npz(tmp_path, "breastmnist")
    with pytest.warns(UserWarning, match="no official MD5 known"):
        assert mm.verify_md5(path, None) == hashlib.md5(path.read_bytes()).hexdigest()


def test_wrong_keys_are_named(tmp_path):
    _write_npz(tmp_path, "bloodmnist", drop=("val_labels", "test_images"))
    with pytest.raises(ValueError, match=r"missing key\(s\) val_labels, test_images;"):
        mm.load_medmnist("bloodmnist", tmp_path, verify=False)


@pytest.mark.parametrize(
    "flag,override,message",
    [
        ("breastmnist", {"train_images": np.zeros((6, 28, 28), np.float32)}, "train_images has dtype float32, expected uint8"),
        ("breastmnist", {"val_images": np.zeros((3, 32, 32), np.uint8)}, r"val_images has shape \(3, 32, 32\), expected \(N, 28, 28\)"),
        ("breastmnist", {"test_images": np.zeros((4, 28, 28, 3), np.uint8)}, r"test_images has shape \(4, 28, 28, 3\)"),
        ("bloodmnist", {"train_images": np.zeros((6, 28, 28), np.uint8)}, r"expected \(N, 28, 28, 3\)"),
        ("breastmnist", {"train_labels": np.zeros((5, 1), np.uint8)}, r"train_labels has shape \(5, 1\), expected \(6, 1\)"),
        ("breastmnist", {"val_labels": np.zeros((3, 1), np.float64)}, "val_labels has dtype float64"),
        ("dermamnist", {"test_labels": np.array([[0], [7], [1], [2]], np.uint8)}, r"test_labels holds \[7\] at row 1, outside 0..6"),
        ("dermamnist", {"test_labels": np.array([[0], [-1], [1], [2]], np.int64)}, r"holds \[-1\] at row 1"),
        ("chestmnist", {"val_labels": np.full((3, 14), 2, np.uint8)}, r"val_labels holds .* at row 0, outside 0..1"),
        ("chestmnist", {"val_labels": np.zeros((3, 1), np.uint8)}, r"val_labels has shape \(3, 1\), expected \(3, 14\)"),
    ],
)
def test_bad_arrays_are_rejected(tmp_path, flag, override, message):
    _write_npz(tmp_path, flag, **override)
    with pytest.raises(ValueError, match=message):
        mm.load_medmnist(flag, tmp_path, verify=False)


def test_corrupt_file(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match="cannot read .*breastmnist.npz as an .npz archive"):
        mm.load_medmnist("breastmnist", tmp_path, verify=False)
    with pytest.raises(ValueError, match="MD5 mismatch"):
        mm.load_medmnist("breastmnist", tmp_path)


# ----------------------------------------------------------------------------- preprocess
def test_preprocess_matches_totensor_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    y = mm.preprocess(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() == -1.0 and y.max() == 1.0 and y.flat[0] == -1.0
    # float32 ops in torchvision's order: ToTensor (x/255), Normalize ((t - .5)/.5)
    t = np.float32(128) / np.float32(255)
    assert y.flat[128] == (t - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_allclose(y.ravel(), np.arange(256) / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 images, got dtype float32"):
        mm.preprocess(y)


# ----------------------------------------------------------------------------- download
def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(directory):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_fails_fast_without_network(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/breastmnist.npz"
    start = time.monotonic()
    with pytest.raises(mm.DownloadError, match=r"cannot download breastmnist .*127\.0\.0\.1.*--data-dir"):
        mm.download("breastmnist", tmp_path, url=url, timeout=5)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_download_md5_mismatch_keeps_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    path, _ = _write_npz(served, "breastmnist")
    dest = tmp_path / "dest"
    with _serve(served) as base:
        with pytest.raises(mm.ChecksumError, match=f"expected {BREAST_MD5}, got {mm.md5_file(path)}"):
            mm.download("breastmnist", dest, url=f"{base}/breastmnist.npz")
        with pytest.raises(mm.DownloadError, match="HTTP 404"):
            mm.download("breastmnist", dest, url=f"{base}/missing.npz")
    assert list(dest.iterdir()) == []


def test_shared_fetch_checks_an_md5_or_a_sha256(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(VENDORED, served / "breastmnist.npz")
    sha = hashlib.sha256(VENDORED.read_bytes()).hexdigest()
    with _serve(served) as base:
        url = f"{base}/breastmnist.npz"
        assert _download.fetch(url, tmp_path / "a.npz", md5=BREAST_MD5.upper()).read_bytes() == VENDORED.read_bytes()
        assert _download.fetch(url, tmp_path / "b.npz", sha256=sha).is_file()
        with pytest.raises(_download.ChecksumError, match=f"expected md5 {'0' * 32}, got {BREAST_MD5}") as info:
            _download.fetch(url, tmp_path / "c.npz", md5="0" * 32)
        assert (info.value.algorithm, info.value.actual) == ("md5", BREAST_MD5)
        with pytest.raises(ValueError, match="not both"):
            _download.fetch(url, tmp_path / "d.npz", md5=BREAST_MD5, sha256=sha)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "served"]
    assert _download.verified(tmp_path / "a.npz", md5=BREAST_MD5) and not _download.verified(tmp_path / "a.npz")
    assert _download.file_digests(tmp_path / "b.npz", ("md5", "sha256")) == {"md5": BREAST_MD5, "sha256": sha}


def test_download_verifies_and_renames(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(VENDORED, served / "breastmnist.npz")
    dest = tmp_path / "dest"
    with _serve(served) as base:
        out = mm.download("breastmnist", dest, url=f"{base}/breastmnist.npz")
    assert out == dest / "breastmnist.npz" and [p.name for p in dest.iterdir()] == ["breastmnist.npz"]
    assert mm.md5_file(out) == BREAST_MD5
    # already present and verified: no network needed
    assert mm.download("breastmnist", dest, url=f"http://127.0.0.1:{_closed_port()}/x") == out
    assert mm.load_medmnist("breastmnist", dest).md5 == BREAST_MD5


# ----------------------------------------------------------------------------- evaluator
def test_evaluate_binary_hand_computed():
    y = np.array([[0], [0], [1], [1]])
    p = np.array([0.1, 0.6, 0.4, 0.8])
    scores = np.stack([1 - p, p], axis=1)
    # AUC: positive/negative pairs ranked right: (0.4>0.1), (0.8>0.1), (0.8>0.6) = 3 of 4
    # ACC: predictions p > 0.5 = [0, 1, 0, 1] -> 2 of 4 right
    assert mm.evaluate(y, scores, "binary-class") == {"auc": 0.75, "acc": 0.5}
    assert mm.evaluate(y.ravel(), p, "binary-class") == {"auc": 0.75, "acc": 0.5}
    # the threshold is strict: a score of exactly 0.5 predicts class 0
    assert mm.evaluate(np.array([0, 1]), np.array([0.5, 0.9]), "binary-class")["acc"] == 1.0


def test_evaluate_multiclass_hand_computed():
    y = np.array([0, 1, 2, 1])
    s = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
    # class 0: pos {0.7} vs neg {0.3, 0.2, 0.5}: 3/3 = 1
    # class 1: pos {0.4, 0.3} vs neg {0.2, 0.3}: 0.4>0.2, 0.4>0.3, 0.3>0.2, 0.3=0.3 (½) -> 3.5/4
    # class 2: pos {0.5} vs neg {0.1, 0.3, 0.2}: 1
    # argmax = [0, 1, 2, 0] -> 3 of 4 right
    expected = {"auc": (1 + 0.875 + 1) / 3, "acc": 0.75}
    for task in ("multi-class", "ordinal-regression"):
        got = mm.evaluate(y[:, None], s, task)
        assert got["acc"] == expected["acc"] and math.isclose(got["auc"], expected["auc"], rel_tol=1e-12)


def test_evaluate_multilabel_hand_computed():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.4, 0.6], [0.3, 0.5], [0.1, 0.7]])
    # label 0: pos {0.9, 0.3} vs neg {0.4, 0.1}: 0.9>0.4, 0.9>0.1, 0.3>0.1 -> 3/4
    # label 1: pos {0.6, 0.5} vs neg {0.2, 0.7}: 0.6>0.2, 0.5>0.2 -> 2/4
    # acc label 0: preds [1,0,0,0] vs [1,0,1,0] -> 3/4; label 1: preds [0,1,0,1] (0.5 not > 0.5)
    # vs [0,1,1,0] -> 2/4
    assert mm.evaluate(y, s, "multi-label, binary-class") == {"auc": 0.625, "acc": 0.625}


def _auc_by_pairs(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))


def test_evaluate_multiclass_random_against_pair_counting():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 200)
    y[:5] = np.arange(5)
    logits = rng.normal(size=(200, 5)) + np.eye(5)[y]
    s = mm.scores_from_logits(logits, "multi-class")
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    got = mm.evaluate(y, s, "multi-class")
    assert math.isclose(got["auc"], np.mean([_auc_by_pairs((y == k).astype(int), s[:, k]) for k in range(5)]), rel_tol=1e-12)
    assert got["acc"] == np.mean(np.argmax(logits, axis=1) == y)


def test_scores_from_logits_sigmoid_for_multilabel():
    z = np.array([[0.0, 2.0, -800.0]])
    np.testing.assert_allclose(mm.scores_from_logits(z, "multi-label, binary-class"), [[0.5, 1 / (1 + math.exp(-2)), 0.0]])


def test_evaluate_undefined_auc_is_nan_with_warning():
    with pytest.warns(UserWarning, match="class 2"):
        got = mm.evaluate(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), "multi-class")
    assert math.isnan(got["auc"]) and got["acc"] == 0.5


def test_evaluate_bad_input():
    with pytest.raises(ValueError, match="unknown MedMNIST task 'binary'"):
        mm.evaluate(np.zeros(2), np.zeros((2, 2)), "binary")
    with pytest.raises(ValueError, match=r"must have shape \(3,\) or \(3, 1\)"):
        mm.evaluate(np.zeros((3, 2)), np.zeros((3, 2)), "multi-class")
    with pytest.raises(ValueError, match=r"shape \(3, 4\) like y_score"):
        mm.evaluate(np.zeros((3, 2)), np.zeros((3, 4)), "multi-label, binary-class")
