"""MedMNIST (2-D) loading, checksums, download and the official evaluation metrics.

Files are read in the official layout: one ``.npz`` per dataset and resolution, named
``{flag}.npz`` for 28×28 and ``{flag}_{size}.npz`` for 64, 128 and 224, holding

    train_images, train_labels, val_images, val_labels, test_images, test_labels

with images ``uint8`` of shape ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB) and
labels of shape ``(N, 1)`` (or ``(N, L)`` for the multi-label ChestMNIST).
:func:`load_medmnist` checks the file's MD5 against the official one, validates every
array and returns channel-last ``uint8`` images ``(N, H, W, C)`` and ``int32`` labels.
``limit`` keeps the first records of each split (:mod:`detjax.data.splits`; MedMNIST has no
data-dependent statistics: :func:`preprocess` maps each pixel alone). Downloads go through
:func:`detjax.data._download.fetch` with the official MD5.

Metadata (task, channels, class names, split sizes, MD5s) come from ``medmnist.INFO``
when the optional ``medmnist`` package is importable, and otherwise from the built-in
:data:`BUILTIN_INFO`, a transcription of ``medmnist/info.py`` of medmnist 3.0.2 (the
release whose files live in Zenodo record 10519652). The MD5s of ``breastmnist.npz``
and ``pneumoniamnist.npz`` were also checked against the real files.

:func:`evaluate` reproduces the official ``medmnist.Evaluator`` metrics (``getAUC`` and
``getACC`` of medmnist 3.0.2) for all four task types.
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from detjax.data import _download, cache
from detjax.data import splits as S
from detjax.data._download import DEFAULT_TIMEOUT, ChecksumError, DownloadError

__all__ = ["FLAGS", "SIZES", "SPLITS", "TASKS", "BUILTIN_INFO", "ZENODO_RECORD", "DatasetInfo", "MedMNIST",
           "dataset_info", "file_name", "official_url", "vendored_dir", "md5_file", "verify_md5",
           "load_medmnist", "preprocess", "download", "scores_from_logits", "evaluate", "ChecksumError",
           "DownloadError"]

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")
ZENODO_RECORD = "https://zenodo.org/records/10519652/files"

_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
    "liver", "lung-left", "lung-right", "pancreas", "spleen",
)  # fmt: skip


def _entry(python_class, task, labels, n_channels, n_samples, md5, license="CC BY 4.0"):
    return {
        "python_class": python_class,
        "task": task,
        "labels": tuple(labels),
        "n_channels": n_channels,
        "n_samples": dict(zip(SPLITS, n_samples)),
        "md5": dict(zip(SIZES, md5)),
        "license": license,
    }


# Transcribed from medmnist/info.py of medmnist 3.0.2 (MedMNIST+, Zenodo record 10519652).
# md5 tuples are for sizes (28, 64, 128, 224). breastmnist and pneumoniamnist (28) were
# verified against the real files (MD5 equal to the official table).
BUILTIN_INFO: dict[str, dict[str, Any]] = {
    "pathmnist": _entry(
        "PathMNIST", "multi-class",
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
         "normal colon mucosa", "cancer-associated stroma",
         "colorectal adenocarcinoma epithelium"),
        3, (89996, 10004, 7180),
        ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
         "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
    ),
    "chestmnist": _entry(
        "ChestMNIST", "multi-label, binary-class",
        ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
         "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
         "pleural", "hernia"),
        1, (78468, 11219, 22433),
        ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
         "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
    ),
    "dermamnist": _entry(
        "DermaMNIST", "multi-class",
        ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
         "benign keratosis-like lesions", "dermatofibroma", "melanoma",
         "melanocytic nevi", "vascular lesions"),
        3, (7007, 1003, 2005),
        ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
         "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
        license="CC BY-NC 4.0",
    ),
    "octmnist": _entry(
        "OCTMNIST", "multi-class",
        ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        1, (97477, 10832, 1000),
        ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
         "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
    ),
    "pneumoniamnist": _entry(
        "PneumoniaMNIST", "binary-class", ("normal", "pneumonia"),
        1, (4708, 524, 624),
        ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
         "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
    ),
    "retinamnist": _entry(
        "RetinaMNIST", "ordinal-regression", ("0", "1", "2", "3", "4"),
        3, (1080, 120, 400),
        ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
         "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
    ),
    "breastmnist": _entry(
        "BreastMNIST", "binary-class", ("malignant", "normal, benign"),
        1, (546, 78, 156),
        ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
         "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
    ),
    "bloodmnist": _entry(
        "BloodMNIST", "multi-class",
        ("basophil", "eosinophil", "erythroblast",
         "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
         "lymphocyte", "monocyte", "neutrophil", "platelet"),
        3, (11959, 1712, 3421),
        ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
         "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
    ),
    "tissuemnist": _entry(
        "TissueMNIST", "multi-class",
        ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
         "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
         "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
        1, (165466, 23640, 47280),
        ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
         "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
    ),
    "organamnist": _entry(
        "OrganAMNIST", "multi-class", _ORGANS,
        1, (34561, 6491, 17778),
        ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
         "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
    ),
    "organcmnist": _entry(
        "OrganCMNIST", "multi-class", _ORGANS,
        1, (12975, 2392, 8216),
        ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
         "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
    ),
    "organsmnist": _entry(
        "OrganSMNIST", "multi-class", _ORGANS,
        1, (13932, 2452, 8827),
        ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
         "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
    ),
}  # fmt: skip

FLAGS = tuple(BUILTIN_INFO)

# MedMNIST v2 (medmnist <= 2.x, Zenodo record 6496656) shipped different 28×28 Organ{A,C,S}
# files (other split sizes). They are recognised only to explain an MD5 mismatch.
_LEGACY_MD5 = {
    "866b832ed4eeba67bfb9edee1d5544e6": "organamnist.npz of MedMNIST v2 (Zenodo record 6496656)",
    "0afa5834fb105f7705a7d93372119a21": "organcmnist.npz of MedMNIST v2 (Zenodo record 6496656)",
    "e5c39f1af030238290b9557d9503af9d": "organsmnist.npz of MedMNIST v2 (Zenodo record 6496656)",
}

_VENDORED = {("breastmnist", 28)}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one 2-D MedMNIST dataset.

    Attributes:
      flag: lower-case name, e.g. ``"breastmnist"``.
      python_class: the class name in the ``medmnist`` package, e.g. ``"BreastMNIST"``.
      task: one of :data:`TASKS`.
      labels: class names (labels names for multi-label) by index.
      n_channels: 1 (grayscale) or 3 (RGB).
      n_samples: ``{"train": n, "val": n, "test": n}``.
      md5: official MD5 per image size; ``None`` where unknown.
      license: licence of the data.
      source: where the metadata came from (``"detjax built-in (medmnist 3.0.2)"`` or
        ``"medmnist <version>"``), to be recorded in manifests.
    """

    flag: str
    python_class: str
    task: str
    labels: tuple[str, ...]
    n_channels: int
    n_samples: Mapping[str, int]
    md5: Mapping[int, str | None]
    license: str
    source: str

    @property
    def n_classes(self) -> int:
        """Number of model outputs: classes, or labels for multi-label tasks."""
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.task == "multi-label, binary-class"


def _check_flag(flag: str) -> str:
    if not isinstance(flag, str) or flag.lower() not in BUILTIN_INFO:
        raise ValueError(f"unknown MedMNIST flag {flag!r}; the 2-D datasets are {', '.join(FLAGS)}")
    return flag.lower()


def _check_size(size: int) -> int:
    if size not in SIZES:
        raise ValueError(f"unknown MedMNIST image size {size!r}; expected one of {SIZES}")
    return int(size)


def _builtin_info(flag: str) -> DatasetInfo:
    entry = dict(BUILTIN_INFO[flag])
    for key in ("n_samples", "md5"):  # read-only copies: callers cannot edit the table
        entry[key] = types.MappingProxyType(dict(entry[key]))
    return DatasetInfo(flag=flag, source="detjax built-in (medmnist 3.0.2)", **entry)


def _info_from_medmnist(flag: str, medmnist: Any) -> DatasetInfo:
    raw = medmnist.INFO[flag]
    labels = tuple(raw["label"][str(i)] for i in range(len(raw["label"])))
    md5 = {s: raw.get("MD5" if s == 28 else f"MD5_{s}") for s in SIZES}
    return DatasetInfo(
        flag=flag,
        python_class=raw["python_class"],
        task=raw["task"],
        labels=labels,
        n_channels=int(raw["n_channels"]),
        n_samples=types.MappingProxyType({k: int(raw["n_samples"][k]) for k in SPLITS}),
        md5=types.MappingProxyType(md5),
        license=raw.get("license", ""),
        source=f"medmnist {getattr(medmnist, '__version__', '?')}",
    )


def dataset_info(flag: str, *, source: str = "auto") -> DatasetInfo:
    """Metadata of a 2-D MedMNIST dataset.

    Args:
      flag: one of :data:`FLAGS` (case-insensitive).
      source: ``"auto"`` (``medmnist.INFO`` when the package imports, else built-in),
        ``"builtin"`` or ``"medmnist"`` (raises ``ImportError`` when it is missing).
    """
    flag = _check_flag(flag)
    if source not in ("auto", "builtin", "medmnist"):
        raise ValueError(f"unknown metadata source {source!r}; expected 'auto', 'builtin' or 'medmnist'")
    if source != "builtin":
        try:
            import medmnist  # optional extra; pulls torch
        except ImportError:
            if source == "medmnist":
                raise
        else:
            # A module named medmnist that lacks INFO is not the package (e.g. a script
            # called medmnist.py on sys.path): use the built-in table.
            if hasattr(medmnist, "INFO"):
                return _info_from_medmnist(flag, medmnist)
            if source == "medmnist":
                raise ImportError(f"the imported module {getattr(medmnist, '__file__', medmnist)} is not the medmnist package")
    return _builtin_info(flag)


def file_name(flag: str, size: int = 28) -> str:
    """Official file name: ``{flag}.npz`` for 28×28, ``{flag}_{size}.npz`` otherwise."""
    flag, size = _check_flag(flag), _check_size(size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def official_url(flag: str, size: int = 28) -> str:
    """Download URL of the official file (MedMNIST+, Zenodo record 10519652)."""
    return f"{ZENODO_RECORD}/{file_name(flag, size)}?download=1"


def vendored_dir() -> Path:
    """Folder of the data shipped with detjax (BreastMNIST 28×28)."""
    return Path(__file__).resolve().parent / "vendored" / "medmnist"


def md5_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file's bytes, read in chunks."""
    return _download.file_digests(path, ("md5",), chunk=chunk_size)["md5"]


def _mismatch_message(path: Any, expected: str, actual: str) -> str:
    message = f"MD5 mismatch for {path}: expected {expected}, got {actual}"
    if actual in _LEGACY_MD5:
        message += f" (this is the {_LEGACY_MD5[actual]}; detjax uses the current files of {ZENODO_RECORD})"
    else:
        message += " (the file is corrupt, truncated, or not the official one)"
    return message


def verify_md5(path: str | os.PathLike, expected: str | None) -> str:
    """Check a file against an official MD5; return the actual MD5.

    ``expected=None`` (checksum unknown) skips the check with a ``UserWarning``.

    Raises:
      ChecksumError (a ``ValueError``): the digests differ; the message names the path
        and both digests.
    """
    return _check_md5(path, expected, md5_file(path))


def _check_md5(path: Any, expected: str | None, actual: str) -> str:
    if expected is None:
        warnings.warn(
            f"no official MD5 known for {path}; its content is not verified (MD5 {actual})", stacklevel=2
        )
    elif actual != expected.lower():
        raise ChecksumError(_mismatch_message(path, expected, actual))
    return actual


@dataclasses.dataclass(frozen=True, eq=False)
class MedMNIST:
    """One MedMNIST dataset, all three splits, as loaded from its official ``.npz``.

    Images are ``uint8 (N, H, W, C)`` channel-last (a channel axis is added for grayscale
    sets); labels are ``int32 (N, 1)``, or ``(N, L)`` of 0/1 for multi-label tasks.
    ``md5`` and ``sha256`` are digests of the file that was read; ``data_source`` says how its
    folder was given (:func:`detjax.data.cache.resolve_data_dir`).
    """

    flag: str
    size: int
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    info: DatasetInfo
    path: Path
    md5: str
    sha256: str = ""
    data_source: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def n_classes(self) -> int:
        return self.info.n_classes

    @property
    def n_channels(self) -> int:
        return self.info.n_channels

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images, labels)`` of split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def _resolve_path(flag: str, data_dir: str | os.PathLike | None, size: int) -> tuple[Path, dict[str, str]]:
    fetch = f"detjax.data.medmnist.download({flag!r}, {str(data_dir or 'dest_dir')!r}, size={size})"
    if data_dir is None and (flag, size) not in _VENDORED:
        raise ValueError(f"{file_name(flag, size)} is not shipped with detjax (only breastmnist.npz is): pass "
                         f"data_dir (CLI: --data-dir), e.g. data/medmnist, or fetch it with {fetch}")
    folder, data_source = cache.resolve_data_dir(data_dir, what="MedMNIST", vendored=vendored_dir(),
                                                 hint=f"Fetch the file with {fetch}")
    path = folder / file_name(flag, size)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path} (download it with {fetch} "
                                f"or from {official_url(flag, size)})")
    return path, data_source


def _image_array(images: np.ndarray, key: str, info: DatasetInfo, size: int, path: Path) -> np.ndarray:
    grayscale = (size, size)
    rgb = (size, size, 3)
    expected = grayscale if info.n_channels == 1 else rgb
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {key} has dtype {images.dtype}, expected uint8")
    if images.shape[1:] != expected:
        raise ValueError(
            f"{path}: {key} has shape {images.shape}, expected (N, {', '.join(map(str, expected))}) "
            f"for {info.flag} ({info.n_channels} channel(s)) at size {size}"
        )
    return images[..., None] if info.n_channels == 1 else images


def _label_array(labels: np.ndarray, key: str, info: DatasetInfo, n: int, path: Path) -> np.ndarray:
    width = info.n_classes if info.multi_label else 1
    if labels.shape != (n, width):
        raise ValueError(f"{path}: {key} has shape {labels.shape}, expected ({n}, {width}) for {info.flag}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"{path}: {key} has dtype {labels.dtype}, expected an integer type")
    labels = labels.astype(np.int64)
    high = 2 if info.multi_label else info.n_classes
    bad = (labels < 0) | (labels >= high)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"{path}: {key} holds {labels[row].tolist()} at row {row}, outside 0..{high - 1} "
            f"for {info.flag} ({info.task}, {info.n_classes} classes)"
        )
    return labels.astype(np.int32)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    required = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {path} as an .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with keys {', '.join(required)}")
    with archive:
        names = set(archive.files)
        missing = [k for k in required if k not in names]
        if missing:
            raise ValueError(
                f"{path} is missing key(s) {', '.join(missing)}; it holds {sorted(names)} "
                f"(expected the official layout {', '.join(required)})"
            )
        try:
            return {k: archive[k] for k in required}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"cannot read the arrays of {path}: {err}") from err


def load_medmnist(
    flag: str,
    data_dir: str | os.PathLike | None = None,
    *,
    size: int = 28,
    verify: bool = True,
    limit: int | None = None,
) -> MedMNIST:
    """Load all splits of a 2-D MedMNIST dataset from its official ``.npz`` file.

    Args:
      flag: dataset name, one of :data:`FLAGS`.
      data_dir: folder holding ``{flag}.npz`` / ``{flag}_{size}.npz``. ``None`` means the
        copy shipped with detjax, which exists for BreastMNIST 28×28 only.
      size: image side, one of 28, 64, 128, 224.
      verify: check the file's MD5 against the official one (``ValueError`` on mismatch;
        a ``UserWarning`` when no official MD5 is known).
      limit: keep the first ``limit`` records of each split (all for ``None``); the whole
        file is still read and verified.

    Returns:
      a :class:`MedMNIST` with ``uint8 (N, size, size, C)`` images and ``int32`` labels.

    Raises:
      FileNotFoundError: the file does not exist.
      ChecksumError (a ``ValueError``): the MD5 differs from the official one.
      ValueError: unknown flag/size, no vendored copy, missing keys, or arrays with the
        wrong shape, dtype or label values (the message names them).
    """
    flag, size = _check_flag(flag), _check_size(size)
    info = dataset_info(flag)
    path, data_source = _resolve_path(flag, data_dir, size)
    digests = _download.file_digests(path, ("md5", "sha256"))  # one read for both
    if verify:
        _check_md5(path, info.md5.get(size), digests["md5"])
    raw = _read_npz(path)
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        images = _image_array(raw[f"{split}_images"], f"{split}_images", info, size, path)
        labels = _label_array(raw[f"{split}_labels"], f"{split}_labels", info, images.shape[0], path)
        arrays.update(S.first_records({f"{split}_images": images, f"{split}_labels": labels}, limit))
    return MedMNIST(flag=flag, size=size, info=info, path=path, data_source=data_source, **digests, **arrays)


def preprocess(images: np.ndarray) -> np.ndarray:
    """Map ``uint8`` pixels to ``float32`` in [-1, 1]: ``(x / 255 - 0.5) / 0.5``.

    Computed in float32 in the order of torchvision's ``ToTensor()`` followed by
    ``Normalize(0.5, 0.5)``, so the values are bit-identical to that pipeline.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"preprocess expects uint8 images, got dtype {images.dtype} (shape {images.shape})")
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def download(
    flag: str,
    dest_dir: str | os.PathLike,
    size: int = 28,
    *,
    url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download an official MedMNIST file into ``dest_dir`` and verify its MD5.

    The bytes go to a temporary file in ``dest_dir`` that is renamed to
    ``{flag}.npz`` / ``{flag}_{size}.npz`` only once its MD5 equals the official one, so
    an interrupted or corrupt download never leaves a file under the final name. A file
    already present with the right MD5 is kept and not downloaded again.

    Args:
      flag, size: the dataset and resolution.
      dest_dir: target folder (created if needed).
      url: source; default :func:`official_url` (Zenodo record 10519652).
      timeout: seconds for the connection and for each read (short, so that a machine
        without network fails in seconds).

    Returns:
      the path of the verified file.

    Raises:
      DownloadError (an ``OSError``): the source cannot be reached (e.g. no network).
      ChecksumError (a ``ValueError``): the downloaded bytes do not have the official MD5.
    """
    flag, size = _check_flag(flag), _check_size(size)
    expected = dataset_info(flag).md5.get(size)
    url = url or official_url(flag, size)
    final = Path(dest_dir) / file_name(flag, size)
    if expected is not None and _download.verified(final, md5=expected):
        return final
    if expected is None:
        warnings.warn(f"no official MD5 known for {final.name}; the downloaded file is not verified", stacklevel=2)
    try:
        return _download.fetch(url, final, md5=expected, timeout=timeout)
    except DownloadError as err:
        raise DownloadError(f"cannot download {flag} ({final.name}): {err}. If this machine is offline, fetch the "
                            f"file elsewhere, put it in a folder and pass that folder as data_dir (CLI: --data-dir)"
                            ) from err
    except ChecksumError as err:
        raise ChecksumError(_mismatch_message(f"{final.name} downloaded from {url}", expected, err.actual),
                            algorithm="md5", expected=expected, actual=err.actual) from err


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Scores the official evaluator expects: ``sigmoid`` for multi-label, else ``softmax``.

    Computed in float64 on the host (the official training script applies
    ``softmax(dim=-1)`` / ``sigmoid`` to the logits before ``Evaluator.evaluate``).
    """
    _check_task(task)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if task == "multi-label, binary-class":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+exp(-z)) without overflow
    return _softmax(z)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown MedMNIST task {task!r}; expected one of {TASKS}")


def _auc(y: np.ndarray, s: np.ndarray, what: str) -> float:
    from sklearn.metrics import roc_auc_score

    if y.min() == y.max():
        # sklearn >= 1.6 returns nan with a warning, older versions raise: pin nan.
        warnings.warn(
            f"AUC undefined for {what}: only one class present in y_true; counted as nan", stacklevel=3
        )
        return float("nan")
    return float(roc_auc_score(y, s))


def evaluate(
    y_true: np.ndarray, y_score: np.ndarray, task: str, *, threshold: float = 0.5
) -> dict[str, float]:
    """AUC and ACC exactly as the official MedMNIST evaluator (``getAUC``, ``getACC``).

    Let ``s`` be ``y_score`` (probabilities: softmax, or sigmoid for multi-label; see
    :func:`scores_from_logits`), ``y`` the labels, ``C`` the number of score columns.

    * binary-class: ``p = s[:, -1]``; ``auc = AUC(y, p)``; ``acc = mean(y == (p > t))``.
    * multi-class and ordinal-regression: ``auc = (1/C) Σ_c AUC(y == c, s[:, c])``
      (one-vs-rest, unweighted mean over all C columns); ``acc = mean(y == argmax s)``
      (ties go to the first maximum).
    * multi-label, binary-class: ``auc = (1/L) Σ_l AUC(y[:, l], s[:, l])``;
      ``acc = (1/L) Σ_l mean(y[:, l] == (s[:, l] > t))``.

    ``t`` = ``threshold`` = 0.5, strict ``>`` as in medmnist 3.x. A column whose labels
    are all equal has no AUC: it counts as nan (with a warning), so the mean is nan.

    Args:
      y_true: ``(N,)`` or ``(N, 1)`` integer labels; ``(N, L)`` 0/1 for multi-label.
      y_score: ``(N, C)`` scores; for binary-class also ``(N,)`` (positive-class score).
      task: one of :data:`TASKS`.

    Returns:
      ``{"auc": float, "acc": float}``.
    """
    _check_task(task)
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 1 and task == "binary-class":
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"y_score must be (N, C) with N > 0, got shape {np.shape(y_score)}")
    n, c = s.shape

    if task == "multi-label, binary-class":
        if y.shape != (n, c):
            raise ValueError(f"multi-label y_true must have shape {(n, c)} like y_score, got {y.shape}")
        aucs = [_auc(y[:, j], s[:, j], f"label {j}") for j in range(c)]
        accs = [float(np.mean(y[:, j] == (s[:, j] > threshold))) for j in range(c)]
        return {"auc": float(np.mean(aucs)), "acc": float(np.mean(accs))}

    if y.shape not in ((n,), (n, 1)):
        raise ValueError(f"{task} y_true must have shape ({n},) or ({n}, 1), got {y.shape}")
    y = y.reshape(n)
    if task == "binary-class":
        p = s[:, -1]
        return {"auc": _auc(y, p, "the positive class"), "acc": float(np.mean(y == (p > threshold)))}
    aucs = [_auc((y == k).astype(np.int64), s[:, k], f"class {k}") for k in range(c)]
    return {"auc": float(np.mean(aucs)), "acc": float(np.mean(y == np.argmax(s, axis=-1)))}
