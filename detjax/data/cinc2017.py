"""PhysioNet/CinC Challenge 2017 AF task: records, labels, folds, windows, cache, download.

Reads the challenge's training set exactly as PhysioNet publishes it: per record a WFDB
header ``Axxxxx.hea`` and a MATLAB v4 file ``Axxxxx.mat`` holding the int16 variable ``val``
(shape ``(1, n)``, one lead, 300 Hz, 9-61 s), and a label file ``REFERENCE-v3.csv``
(no header; ``record,label`` with label in ``N`` normal, ``A`` AF, ``O`` other rhythm,
``~`` too noisy). Classes are indices into :data:`CLASSES` = ``("N", "A", "O", "~")``.

Signal. For record samples ``d[t]`` (int16) and header gain ``g`` (ADC units per mV) and
baseline ``b``::

    x[t] = float32((d[t] - b) / g)     mV, computed in float64, cast once   (challenge: g = 1000, b = 0)

Preprocessing (per record, in this order):

1. resample the whole record from 300 Hz to ``sampling_rate`` (default 100 Hz) with
   :func:`resample` (polyphase, Kaiser-windowed FIR; see there), float64 then float32;
2. cut the centred window of ``L = window_seconds * sampling_rate`` samples (default
   10 s x 100 Hz = 1000, PTB-XL's length) with :func:`fixed_window`; shorter records are
   zero-padded symmetrically (the odd extra sample at the end);
3. normalise with one scalar mean and standard deviation of the TRAIN windows (padding
   included), :func:`detjax.data.splits.train_statistics` (float64 sums in chunks of 256
   records, population ``sigma``)::

       x' = (x - float32(mu)) / float32(sigma)      (float32 arithmetic, all splits)

Model input is ``(B, L, 1)``: the single-lead ECG Conformer (``in_leads=1``).

Folds. Ten folds stratified by class with :func:`stratified_folds` (SHA-256 order within
each class, dealt round-robin) were computed ONCE from ``REFERENCE-v3.csv`` and are vendored
as ``detjax/data/vendored/cinc2017/folds.csv``. The loader reads that fixed file (it does not
recompute it), checks that it covers exactly the reference's records with the same labels,
and splits like PTB-XL (:mod:`detjax.data.splits`): CV rotation ``k`` uses ``(test, val) =
CV_FOLDS[k]`` = ``(10, 9), (9, 8), (8, 10)``; train is the other eight folds. ``limit`` keeps
the first records of each split, after the statistics of the whole training split.

Cache (:mod:`detjax.data.cache`). The preprocessed (not yet normalised) windows of every
record in a split are stored under ``cache_dir/cinc2017``, keyed by the loader version, the
settings, the scipy version (it designs the filter) and the bytes of every record file read.

Data licence: Open Data Commons Attribution License v1.0; cite Clifford et al., "AF
classification from a short single lead ECG recording: the PhysioNet/Computing in
Cardiology Challenge 2017", Computing in Cardiology 44 (2017), and PhysioNet.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from detjax.data import _download, cache
from detjax.data import splits as S
from detjax.data.splits import CV_FOLDS, N_FOLDS, train_statistics

__all__ = ["CLASSES", "CLASS_NAMES", "NATIVE_RATE", "N_FOLDS", "CV_FOLDS", "DEFAULT_REFERENCE",
           "LOADER_VERSION", "PHYSIONET_URL", "ENV_DATA_DIR", "Header", "vendored_folds_path", "parse_header",
           "read_header", "read_record", "read_reference", "resample", "fixed_window", "window_length",
           "preprocess", "stratified_folds", "write_folds", "read_folds", "check_folds", "content_key",
           "load_cinc2017", "evaluate", "download_cinc2017"]

#: Class letters of REFERENCE-v3.csv in output (logit) order.
CLASSES: tuple[str, ...] = ("N", "A", "O", "~")
CLASS_NAMES: dict[str, str] = {"N": "normal sinus rhythm", "A": "atrial fibrillation",
                               "O": "other rhythm", "~": "too noisy to classify"}
#: Sampling rate of every challenge record (Hz).
NATIVE_RATE = 300
DEFAULT_REFERENCE = "REFERENCE-v3.csv"
#: Bumped whenever the arrays produced from the same files could change; part of the cache key.
LOADER_VERSION = "detjax-cinc2017-1"
PHYSIONET_URL = "https://physionet.org/files/challenge-2017/1.0.0/"
TRAINING_ZIP = "training2017.zip"
TRAINING_FOLDER = "training2017"
ENV_DATA_DIR = "DETJAX_CINC2017_DIR"
#: The resample_poly window; part of the cache key.
RESAMPLE_WINDOW = ("kaiser", 5.0)
FOLDS_HEADER = ("record", "label", "fold")
MANUAL_DOWNLOAD_HINT = (
    f"Download the CinC 2017 training set by hand on a machine with internet access: "
    f"{PHYSIONET_URL}{TRAINING_ZIP} and {PHYSIONET_URL}{DEFAULT_REFERENCE}; unzip the archive and put "
    f"{DEFAULT_REFERENCE} into the unzipped {TRAINING_FOLDER}/ folder, then pass that folder with "
    f"--data-dir or ${ENV_DATA_DIR} (or run `python -m detjax.data.cinc2017 download DEST`)."
)

_RECORD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CACHE_ARRAYS = ("x", "record", "n_samples")


# --------------------------------------------------------------------------- paths


def vendored_folds_path() -> Path:
    """The committed fold assignment ``detjax/data/vendored/cinc2017/folds.csv``."""
    return Path(__file__).resolve().parent / "vendored" / "cinc2017" / "folds.csv"


def _check_record_name(name: str, *, where: str) -> str:
    # Record names become file names: no path separators, no "..".
    if not isinstance(name, str) or not _RECORD_NAME.match(name):
        raise ValueError(f"{where}: invalid record name {name!r} (expected letters, digits, '_' or '-', "
                         f"e.g. 'A00001')")
    return name


def _missing(path: Path, *, record: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(2, f"CinC 2017 record {record}: missing {what}", str(path))


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Header:
    """The fields of a one-signal WFDB header that the loader uses.

    ``gain`` is ADC units per ``units``; ``baseline`` the ADC value of 0 physical units
    (WFDB: the ``(baseline)`` after the gain, else the ADC zero).
    """

    record: str
    fs: float
    n_samples: int
    file_name: str
    fmt: str
    gain: float
    baseline: int
    units: str


def parse_header(text: str, *, record: str, path: str = "") -> Header:
    """Parse a WFDB header such as::

        A00001 1 300 9000 05:05:15 1/05/2000
        A00001.mat 16+24 1000/mV 16 0 -127 0 0 ECG

    Checks (``ValueError`` naming the record and the file): the record line names
    ``record``, one signal, 300 Hz, a positive sample count; the signal line names a
    ``.mat`` file in the same folder, format 16 (int16, optionally ``+byte offset``), a
    positive finite gain in ``mV``. WFDB comment lines (``#``) are ignored.
    """
    where = f"CinC 2017 record {record} ({path or record + '.hea'})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) < 2:
        raise ValueError(f"{where}: header has {len(lines)} non-comment line(s), expected a record line "
                         f"and one signal line")
    fields = lines[0].split()
    if len(fields) < 4:
        raise ValueError(f"{where}: record line {lines[0]!r} lacks the sample count")
    if fields[0] != record:
        raise ValueError(f"{where}: header names record {fields[0]!r}, expected {record!r}")
    try:
        n_signals = int(fields[1])
        fs = float(re.split(r"[/(]", fields[2])[0])  # "300", "300/1000" (counter freq), "300(0)"
        n_samples = int(fields[3])
    except ValueError:
        raise ValueError(f"{where}: cannot parse the record line {lines[0]!r}") from None
    if n_signals != 1 or len(lines) != 2:
        raise ValueError(f"{where}: {n_signals} signal(s) declared and {len(lines) - 1} signal line(s), "
                         f"expected exactly 1 (single-lead ECG)")
    if not math.isclose(fs, NATIVE_RATE):
        raise ValueError(f"{where}: sampling rate {fs:g} Hz in the header, expected {NATIVE_RATE} Hz")
    if n_samples < 1:
        raise ValueError(f"{where}: sample count {n_samples}, expected a positive number")
    sig = lines[1].split()
    if len(sig) < 3:
        raise ValueError(f"{where}: signal line {lines[1]!r} lacks file name, format and gain")
    file_name, fmt, gain_field = sig[0], sig[1], sig[2]
    if PurePosixPath(file_name).name != file_name or "\\" in file_name or not file_name.endswith(".mat"):
        raise ValueError(f"{where}: signal file {file_name!r} must be a .mat file in the record's folder")
    if re.split(r"[x:+]", fmt)[0] != "16":
        raise ValueError(f"{where}: storage format {fmt!r}, expected 16 (int16)")
    match = re.fullmatch(r"([-+0-9.eE]+)(?:\(([-+]?\d+)\))?(?:/(\S+))?", gain_field)
    if match is None:
        raise ValueError(f"{where}: cannot parse gain {gain_field!r}")
    gain = float(match.group(1))
    units = match.group(3) or "mV"  # WFDB's default unit
    if not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"{where}: gain {gain_field!r} must be positive and finite")
    if units.lower() != "mv":
        raise ValueError(f"{where}: units {units!r}, expected mV")
    if match.group(2) is not None:
        baseline = int(match.group(2))
    else:
        try:  # WFDB: without "(baseline)" the baseline is the ADC zero (5th field), default 0
            baseline = int(sig[4]) if len(sig) > 4 else 0
        except ValueError:
            raise ValueError(f"{where}: cannot parse the ADC zero {sig[4]!r}") from None
    return Header(record=record, fs=fs, n_samples=n_samples, file_name=file_name, fmt=fmt,
                  gain=gain, baseline=baseline, units=units)


def read_header(data_dir: str | os.PathLike[str], name: str) -> Header:
    """:func:`parse_header` of ``data_dir/<name>.hea``; ``FileNotFoundError`` if it is missing."""
    _check_record_name(name, where="read_header")
    path = Path(data_dir) / f"{name}.hea"
    if not path.is_file():
        raise _missing(path, record=name, what="header file")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"CinC 2017 record {name} ({path}): header is not ASCII text ({exc})") from None
    return parse_header(text, record=name, path=str(path))


def _read_val(path: Path, *, record: str, n_samples: int) -> np.ndarray:
    """The int16 ``val`` of a MATLAB file as ``(n,)``; shape, dtype and length checked."""
    import scipy.io  # lazily: only needed on a cache miss

    try:
        contents = scipy.io.loadmat(str(path), variable_names=["val"])
    except Exception as exc:  # scipy raises ValueError, TypeError, EOFError, ... on damaged files
        raise ValueError(f"CinC 2017 record {record} ({path}) is corrupt: scipy.io.loadmat could not read it "
                         f"({type(exc).__name__}: {exc})") from exc
    if "val" not in contents:
        names = sorted(name for name, _, _ in scipy.io.whosmat(str(path)))
        raise ValueError(f"CinC 2017 record {record} ({path}): no variable 'val' (has {names})")
    val = np.asarray(contents["val"])
    if val.dtype != np.int16:
        raise ValueError(f"CinC 2017 record {record} ({path}): 'val' has dtype {val.dtype}, expected int16")
    if val.ndim != 2 or val.shape[0] != 1:
        raise ValueError(f"CinC 2017 record {record} ({path}): 'val' has shape {val.shape}, expected (1, n)")
    if val.shape[1] != n_samples:
        raise ValueError(f"CinC 2017 record {record} ({path}): {val.shape[1]} samples in 'val', but the "
                         f"header declares {n_samples}")
    return val[0]


def read_record(data_dir: str | os.PathLike[str], name: str) -> np.ndarray:
    """One record as float32 ``(n,)`` in mV: ``(val - baseline) / gain`` in float64, cast once.

    Reads ``<name>.hea`` (checked by :func:`parse_header`) and the ``.mat`` it names with
    ``scipy.io.loadmat``; ``val`` must be int16 of shape ``(1, n)`` with ``n`` the header's
    sample count, and the result finite. Missing files raise ``FileNotFoundError``, every
    other problem ``ValueError``; both name the record and the file.
    """
    header = read_header(data_dir, name)
    mat = Path(data_dir) / header.file_name
    if not mat.is_file():
        raise _missing(mat, record=name, what="signal file")
    digital = _read_val(mat, record=name, n_samples=header.n_samples)
    signal = (digital.astype(np.float64) - header.baseline) / header.gain
    if not np.all(np.isfinite(signal)):
        raise ValueError(f"CinC 2017 record {name} ({mat}): non-finite values after scaling")
    return signal.astype(np.float32)


# --------------------------------------------------------------------------- labels


def _labelled_rows(path: Path, rows: Iterable[tuple[int, Sequence[str]]],
                   fields: str) -> list[tuple[int, list[str]]]:
    """The non-empty ``(line number, fields)`` rows, checked: the fields named by ``fields``
    (stripped), a valid record name first, a label of :data:`CLASSES` second, each record
    once; a ``ValueError`` names the file and line."""
    out, first_line = [], {}
    for lineno, row in rows:
        if not row:
            continue
        row = [c.strip() for c in row]
        if len(row) != len(fields.split(",")):
            raise ValueError(f"{path} line {lineno}: expected '{fields}', got {','.join(row)!r}")
        name, label = row[:2]
        _check_record_name(name, where=f"{path} line {lineno}")
        if label not in CLASSES:
            raise ValueError(f"{path} line {lineno}: record {name} has label {label!r}; expected one of "
                             f"{', '.join(CLASSES)}")
        if name in first_line:
            raise ValueError(f"{path} line {lineno}: record {name} is listed again (first on line "
                             f"{first_line[name]})")
        first_line[name] = lineno
        out.append((lineno, row))
    return out


def read_reference(
    path: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(records, labels)`` from a challenge label file, in file order.

    The file has no header; each line is ``record,label`` with ``label`` one of
    :data:`CLASSES`. Raises ``ValueError`` naming the file and line for a malformed line,
    an unknown label or a record listed twice; with ``check_files`` (default) raises
    ``FileNotFoundError`` naming the records whose ``.hea`` or ``.mat`` is missing from
    ``data_dir`` (default: the label file's folder).
    """
    path = cache.require_file(Path(path), "CinC 2017 label file")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # tolerate a BOM
    rows = _labelled_rows(path, enumerate((ln.split(",") if ln.strip() else [] for ln in lines), start=1),
                          "record,label")
    if not rows:
        raise ValueError(f"{path}: no records")
    records, labels = (tuple(row[i] for _, row in rows) for i in (0, 1))
    if check_files:
        root = Path(data_dir) if data_dir is not None else path.parent
        missing = [f"{name} ({p.name})" for name in records
                   for p in cache.wfdb_files(root / name, ".mat") if not p.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FileNotFoundError(2, f"{path} lists {len(missing)} record file(s) missing from {root}: {shown}",
                                    str(root))
    return tuple(records), tuple(labels)


# --------------------------------------------------------------------------- preprocessing


def resample(signal: np.ndarray, *, orig_rate: int = NATIVE_RATE, target_rate: int = 100) -> np.ndarray:
    r"""Rational-rate resampling with ``scipy.signal.resample_poly``, float64 in, float32 out.

    With ``g = gcd(orig, target)``, ``up = target/g``, ``down = orig/g`` (300 -> 100 Hz:
    ``up = 1``, ``down = 3``) and ``M = max(up, down)``, scipy designs the linear-phase
    low-pass FIR ``h`` of ``2*10*M + 1`` taps (61 for 300 -> 100) by the window method
    (``scipy.signal.firwin``)::

        s[k] = sinc((k - 10M) / M) * w[k],     k = 0 .. 20M,   sinc(t) = sin(pi t) / (pi t)
        w    = Kaiser window of 20M + 1 points, beta = 5.0     (window ("kaiser", 5.0))
        h[k] = up * s[k] / sum_j s[j]                           (DC gain up, i.e. 1 after the zeros)

    i.e. cutoff ``1/M`` of the input Nyquist frequency (50 Hz for 300 -> 100), and computes
    the polyphase form of "insert ``up - 1`` zeros, filter, keep every ``down``-th sample",
    centred on the filter's delay and with zeros outside the signal::

        y[m] = sum_k h[k] * u[m*down + 10M - k],   u[j] = x[j/up] if up divides j else 0
        len(y) = ceil(len(x) * up / down)

    The arithmetic is float64; the result is cast to float32 once. Equal rates return a
    float32 copy. The anti-alias filter removes what the new rate cannot represent (above
    ``target/2``) instead of folding it into the band.
    """
    orig_rate, target_rate = S.positive_int(orig_rate, "orig_rate"), S.positive_int(target_rate, "target_rate")
    x = np.asarray(signal)
    if x.ndim != 1:
        raise ValueError(f"resample expects a 1-D signal, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("resample got an empty signal")
    if orig_rate == target_rate:
        return x.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(orig_rate, target_rate)
    y = resample_poly(x.astype(np.float64), target_rate // g, orig_rate // g, window=RESAMPLE_WINDOW)
    return y.astype(np.float32)


def fixed_window(signal: np.ndarray, length: int) -> np.ndarray:
    """The centred window of ``length`` samples (a copy, same dtype).

    For ``n = len(signal)``: if ``n >= length`` it is ``signal[s : s + length]`` with
    ``s = (n - length) // 2`` (an odd surplus drops one sample more at the end); otherwise
    ``p = length - n`` zeros are added, ``p // 2`` before and ``p - p // 2`` after (an odd
    pad puts the extra zero at the end).
    """
    length = S.positive_int(length, "length")
    x = np.asarray(signal)
    if x.ndim != 1:
        raise ValueError(f"fixed_window expects a 1-D signal, got shape {x.shape}")
    n = x.shape[0]
    if n >= length:
        start = (n - length) // 2
        return x[start:start + length].copy()
    out = np.zeros(length, dtype=x.dtype)
    left = (length - n) // 2
    out[left:left + n] = x
    return out


def window_length(window_seconds: float, sampling_rate: int) -> int:
    """``window_seconds * sampling_rate`` as a positive integer number of samples.

    ``ValueError`` if the product is not a whole number (e.g. 2.5 s at 1 Hz) or not positive.
    """
    rate = S.positive_int(sampling_rate, "sampling_rate")
    try:
        seconds = float(window_seconds)
    except (TypeError, ValueError):
        raise ValueError(f"window_seconds must be a number, got {window_seconds!r}") from None
    samples = seconds * rate
    if not (math.isfinite(samples) and samples >= 1 and abs(samples - round(samples)) < 1e-9):
        raise ValueError(f"window_seconds={window_seconds!r} at {rate} Hz gives {samples:g} samples; "
                         f"expected a whole positive number")
    return int(round(samples))


def preprocess(signal: np.ndarray, *, sampling_rate: int = 100, length: int = 1000) -> np.ndarray:
    """``fixed_window(resample(signal, 300 -> sampling_rate), length)``: float32 ``(length,)``.

    The whole record is resampled before the window is cut, so the filter's zero padding
    only touches the record's own ends, never the inside of a long record's window.
    """
    return fixed_window(resample(signal, target_rate=sampling_rate), length)


# --------------------------------------------------------------------------- folds


def _name_digest(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def stratified_folds(records: Sequence[str], labels: Sequence[str], n_folds: int = N_FOLDS) -> dict[str, int]:
    """Deterministic, platform-independent class-stratified folds ``{record: fold}``, folds ``1..n_folds``.

    For each class in :data:`CLASSES` order, its records are sorted by the SHA-256 hex digest
    of the UTF-8 record name (ties, impossible for distinct names in practice, by name) and
    dealt round-robin: the ``j``-th record dealt overall gets fold ``j mod n_folds + 1``. The
    deal carries on from one class to the next (it does not restart at fold 1), so every
    class has ``floor`` or ``ceil`` of ``n_c / n_folds`` records in each fold AND the fold
    sizes differ by at most one. Only the names and labels matter: no RNG, no float.
    Returned in the order of ``records``.
    """
    n_folds = S.positive_int(n_folds, "n_folds")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    records, labels = list(records), list(labels)
    if len(records) != len(labels):
        raise ValueError(f"{len(records)} records but {len(labels)} labels")
    seen: set[str] = set()
    for name, label in zip(records, labels):
        if name in seen:
            raise ValueError(f"record {name!r} occurs more than once")
        seen.add(name)
        if label not in CLASSES:
            raise ValueError(f"record {name!r} has label {label!r}; expected one of {', '.join(CLASSES)}")
    fold: dict[str, int] = {}
    dealt = 0
    for cls in CLASSES:
        members = sorted((name for name, label in zip(records, labels) if label == cls),
                         key=lambda name: (_name_digest(name), name))
        for name in members:
            fold[name] = dealt % n_folds + 1
            dealt += 1
    return {name: fold[name] for name in records}


def write_folds(path: str | os.PathLike[str], records: Sequence[str], labels: Sequence[str],
                folds: Mapping[str, int]) -> Path:
    """Write ``record,label,fold`` rows (with that header, ``\\n`` line ends) atomically."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FOLDS_HEADER)
    for name, label in zip(records, labels):
        writer.writerow((name, label, int(folds[name])))
    with _download.atomic_file(path, suffix=".tmp") as handle:
        handle.write(buffer.getvalue().encode("utf-8"))
    return path


def read_folds(path: str | os.PathLike[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...],
                                                                    tuple[int, ...]]:
    """``(records, labels, folds)`` from a folds file (default: the vendored one).

    The header must be ``record,label,fold``; labels in :data:`CLASSES`, folds integers
    ``1..10``, records unique (``ValueError`` naming the file and line otherwise).
    """
    path = cache.require_file(vendored_folds_path() if path is None else Path(path), "CinC 2017 folds file")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(c.strip() for c in rows[0]) != FOLDS_HEADER:
        raise ValueError(f"{path}: header must be {','.join(FOLDS_HEADER)}, got {rows[0] if rows else 'nothing'}")
    rows = _labelled_rows(path, enumerate(rows[1:], start=2), ",".join(FOLDS_HEADER))
    for lineno, (name, _, fold_text) in rows:
        if not fold_text.isdigit() or not 1 <= int(fold_text) <= N_FOLDS:
            raise ValueError(f"{path} line {lineno}: record {name} has fold {fold_text!r}, expected 1..{N_FOLDS}")
    return tuple(row[0] for _, row in rows), tuple(row[1] for _, row in rows), tuple(int(r[2]) for _, r in rows)


def check_folds(fold_records: Sequence[str], fold_labels: Sequence[str], records: Sequence[str],
                labels: Sequence[str], *, folds_source: str = "folds file",
                reference_source: str = "reference") -> None:
    """Raise ``ValueError`` unless the folds file lists exactly the reference's records with
    the same labels; the message names the first few mismatches of each kind."""
    in_folds = dict(zip(fold_records, fold_labels))
    in_reference = dict(zip(records, labels))
    problems = []
    missing = [r for r in records if r not in in_folds]
    extra = [r for r in fold_records if r not in in_reference]
    relabelled = [f"{r} ({in_folds[r]} in folds, {in_reference[r]} in reference)"
                  for r in records if r in in_folds and in_folds[r] != in_reference[r]]
    for what, items in (("records of the reference missing from the folds file", missing),
                        ("records in the folds file but not in the reference", extra),
                        ("records whose label differs", relabelled)):
        if items:
            problems.append(f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    if problems:
        raise ValueError(f"{folds_source} does not match {reference_source}: " + "; ".join(problems)
                         + ". The vendored folds were stratified on REFERENCE-v3.csv; for another label "
                           "file make a folds file with `python -m detjax.data.cinc2017 make-folds "
                           "--reference FILE --out FOLDS.csv` and pass it as folds=")


# --------------------------------------------------------------------------- cache


def content_key(data_dir: Path, records: Sequence[str], *, sampling_rate: int, window_seconds: float,
                length: int) -> str:
    """SHA-256 naming a cache entry: loader version, settings, scipy version, record list and
    the ``(file name, sha256 of bytes)`` of every record's header and signal file, so any
    changed byte selects another entry. ``FileNotFoundError`` names a record with a missing file."""
    import scipy

    files = []
    for name in records:
        for path in cache.wfdb_files(data_dir / name, ".mat"):
            if not path.is_file():
                raise _missing(path, record=name, what="file")
            files.append((path.name, path))
    spec = {
        "loader": LOADER_VERSION,
        "native_rate": NATIVE_RATE,
        "sampling_rate": int(sampling_rate),
        "window_seconds": float(window_seconds),
        "length": int(length),
        "resample_window": list(RESAMPLE_WINDOW),
        "scipy": scipy.__version__,
        "records": list(records),
    }
    return cache.content_key(spec, files)


# --------------------------------------------------------------------------- loading


def _read_windows(root: Path, records: Sequence[str], *, sampling_rate: int, length: int,
                  progress: bool) -> dict[str, np.ndarray]:
    iterator: Any = records
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(records, desc="CinC 2017 records", unit="rec")
    x = np.empty((len(records), length), dtype=np.float32)
    n_samples = np.empty(len(records), dtype=np.int64)
    for i, name in enumerate(iterator):
        signal = read_record(root, name)
        n_samples[i] = signal.shape[0]
        x[i] = preprocess(signal, sampling_rate=sampling_rate, length=length)
    return {"x": x, "record": np.array(list(records), dtype=str), "n_samples": n_samples}


def _labelled_records(root: Path, reference: str | os.PathLike[str], folds: str | os.PathLike[str] | None,
                     roles: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The reference's records whose fold has a role, with labels and folds (reference order),
    after checking the folds file against the reference; plus both files and the total."""
    ref_path = Path(reference).expanduser()
    ref_path = ref_path if ref_path.is_absolute() else root / ref_path
    records, labels = read_reference(ref_path, data_dir=root)
    folds_path = vendored_folds_path() if folds is None else Path(folds).expanduser().resolve()
    fold_records, fold_labels, fold_numbers = read_folds(folds_path)
    check_folds(fold_records, fold_labels, records, labels, folds_source=str(folds_path),
                reference_source=str(ref_path))
    fold_of = dict(zip(fold_records, fold_numbers))
    used = set().union(*roles.values())
    keep = [i for i, r in enumerate(records) if fold_of[r] in used]
    return {"records": [records[i] for i in keep], "y": np.array([CLASSES.index(labels[i]) for i in keep], np.int32),
            "fold": np.array([fold_of[records[i]] for i in keep], np.int64), "reference": ref_path,
            "folds_file": folds_path, "n_records": len(records)}


def _windows(root: Path, records: Sequence[str], *, rate: int, length: int, window_seconds: float,
             cache_dir: str | os.PathLike[str] | None, use_cache: bool, progress: bool) -> dict[str, Any]:
    """The un-normalised windows of ``records`` from the cache or the files, checked, with
    the cache's key, file and digest (:func:`detjax.data.cache.load_or_build`)."""
    key = content_key(root, records, sampling_rate=rate, window_seconds=window_seconds, length=length)
    path = cache.cache_root(cache_dir) / "cinc2017" / f"cinc2017-{rate}hz-{length}-{key}.npz"
    arrays, digest, hit = cache.load_or_build(
        path, key, _CACHE_ARRAYS, use_cache=use_cache, what="CinC 2017",
        build=lambda: _read_windows(root, records, sampling_rate=rate, length=length, progress=progress))
    if hit:
        names = [str(r) for r in arrays["record"]]
        cache.check_cached_signals(arrays["x"], shape=(len(records), length), path=path, what="CinC 2017",
                                   names=names if len(names) == len(records) else records)
    if arrays["record"].tolist() != list(records) or arrays["x"].shape != (len(records), length):
        raise ValueError(f"cache file {path}: records or shape disagree with the label file; delete the file")
    return {**arrays, "key": key, "digest": digest, "path": path, "hit": hit}


def _split_and_normalise(x: np.ndarray, labelled: Mapping[str, Any], roles: Mapping[str, Sequence[int]],
                         limit: int | None) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, members, norm)``: statistics of the whole train split, then each split's
    first ``limit`` records normalised (:mod:`detjax.data.splits`)."""
    members = S.split_indices(labelled["fold"], roles)
    norm = train_statistics(x[members["train"]][..., None])
    members = S.first_records(members, limit)
    out: dict[str, Any] = {}
    for name, idx in members.items():
        out[f"x_{name}"] = S.normalise(x[idx][..., None], norm)
        out[f"y_{name}"] = labelled["y"][idx]
        out[f"record_{name}"] = np.array([labelled["records"][i] for i in idx], dtype=str)
    return out, members, norm


def load_cinc2017(
    data_dir: str | os.PathLike[str] | None,
    *,
    window_seconds: float = 10,
    sampling_rate: int = 100,
    reference: str | os.PathLike[str] = DEFAULT_REFERENCE,
    cv_fold: int = 0,
    folds: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
    fold_split: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Load, window, split and normalise the challenge training set for one CV rotation.

    Args:
      data_dir: folder with the ``.hea``/``.mat`` records and the label file; ``None`` reads
        ``$DETJAX_CINC2017_DIR`` (there is no vendored default: ``ValueError`` if unset).
      window_seconds, sampling_rate: window ``L = window_seconds * sampling_rate`` samples
        at ``sampling_rate`` Hz (default 10 s at 100 Hz: ``L = 1000``).
      reference: label file name inside ``data_dir`` (or a path); default ``REFERENCE-v3.csv``.
      cv_fold: 0, 1, 2: ``(test, val)`` folds ``(10, 9), (9, 8), (8, 10)``, train the rest.
      folds: folds CSV (``record,label,fold``); default the vendored file. Must cover exactly
        the reference's records with the same labels.
      limit: keep the first ``limit`` records (reference order) of each split, cut after the
        normalisation statistics of the whole training split (so every record is read).
      cache_dir, use_cache: the ``.npz`` cache of the windows (see the module docstring).
      progress: a tqdm bar while reading records.
      fold_split: ``{"train", "val", "test"}`` fold lists replacing the rotation's folds
        (K-fold CV, see :mod:`detjax.cv`).

    Returns a dict: ``x_train (n, L, 1)`` float32 normalised, ``y_train (n,)`` int32 indices
    into :data:`CLASSES`, ``record_train (n,)`` str (and ``_val``, ``_test``); ``labels``,
    ``sampling_rate``, ``window_seconds``, ``window_length``, ``cv_fold``, ``folds`` (fold
    numbers per split), ``n`` and ``counts`` (per split, per class), ``padded`` (records per
    split shorter than the window), ``norm`` (``mean``, ``std`` float64, ``count``), ``limit``
    and ``source`` (``data_source`` kind, ``content_sha256``, ``windows_fingerprint``, ...).
    """
    rate = S.positive_int(sampling_rate, "sampling_rate")
    length = window_length(window_seconds, rate)
    roles = S.fold_roles(cv_fold, fold_split, N_FOLDS)
    limit = S.check_limit(limit)
    root, data_source = cache.resolve_data_dir(data_dir, what="CinC 2017", hint=MANUAL_DOWNLOAD_HINT,
                                               env=ENV_DATA_DIR)
    labelled = _labelled_records(root, reference, folds, roles)
    windows = _windows(root, labelled["records"], rate=rate, length=length, window_seconds=float(window_seconds),
                       cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    out, members, norm = _split_and_normalise(windows["x"], labelled, roles, limit)
    # resample() gives ceil(n * rate / 300) samples; fewer than the window means zero padding.
    padded = -(-windows["n_samples"] * rate // NATIVE_RATE) < length
    out.update(
        labels=CLASSES, sampling_rate=rate, window_seconds=float(window_seconds), window_length=length,
        cv_fold=int(cv_fold), folds={k: list(v) for k, v in roles.items()},
        n={name: len(idx) for name, idx in members.items()},
        counts={name: S.label_counts(out[f"y_{name}"], CLASSES) for name in members},
        padded={name: int(padded[idx].sum()) for name, idx in members.items()}, norm=norm, limit=limit,
        source={
            "dataset": "PhysioNet/CinC Challenge 2017 training set", "data_dir": str(root),
            "data_source": data_source, "reference": str(labelled["reference"]),
            "reference_sha256": _download.file_sha256(labelled["reference"]),
            "folds_file": str(labelled["folds_file"]), "folds_sha256": _download.file_sha256(labelled["folds_file"]),
            "n_records": labelled["n_records"], "n_read": len(labelled["records"]), "loader_version": LOADER_VERSION,
            "content_sha256": windows["key"], "windows_fingerprint": windows["digest"],
            "cache_file": str(windows["path"]) if use_cache else None, "from_cache": windows["hit"],
        },
    )
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    r"""Metrics of the 4-class task from class indices ``y_true (n,)`` and scores ``probs (n, 4)``.

    * ``per_class_auc``: one-vs-rest ROC AUC of column ``c`` against ``y_true == c``;
      ``None`` for a class without positives or without negatives (as :mod:`detjax.metrics`).
    * ``macro_auc`` = ``score``: mean of the defined per-class AUCs (the selection metric).
    * ``confusion[i][j]``: records of true class ``i`` predicted ``j = argmax_c probs[:, c]``
      (ties go to the lowest index).
    * ``f1`` per class: :math:`F1_c = 2 C_{cc} / (\sum_j C_{cj} + \sum_i C_{ic})`, 0 when
      the class is neither present nor predicted.
    * ``challenge_f1`` = :math:`(F1_N + F1_A + F1_O) / 3`, the 2017 challenge score (the noisy
      class is not scored; winners reached 0.83 on the hidden test set).
    * ``acc``: fraction of correct argmax predictions.
    """
    from detjax import metrics  # lazily: scikit-learn takes a second to import, loading does not need it

    y = np.asarray(y_true)
    scores = np.asarray(probs)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    k = len(CLASSES)
    if y.ndim != 1 or scores.shape != (y.shape[0], k):
        raise ValueError(f"y_true {np.asarray(y_true).shape} must be (n,) and probs {scores.shape} (n, {k})")
    if y.shape[0] == 0:
        raise ValueError("cannot evaluate zero records")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true must hold class indices 0..{k - 1} ({', '.join(CLASSES)}), "
                         f"got dtype {y.dtype}, values {sorted(set(np.unique(y).tolist()))[:8]}")
    one_hot = (y[:, None] == np.arange(k)[None, :]).astype(np.float32)
    aucs = metrics.multilabel_auc_report(one_hot, scores, CLASSES)  # also rejects NaN/inf scores
    pred = np.argmax(scores, axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    f1 = {}
    for c, name in enumerate(CLASSES):
        denominator = int(confusion[c, :].sum() + confusion[:, c].sum())
        f1[name] = 2.0 * float(confusion[c, c]) / denominator if denominator else 0.0
    return {
        **aucs,
        "f1": f1,
        "challenge_f1": (f1["N"] + f1["A"] + f1["O"]) / 3.0,
        "acc": float(np.trace(confusion)) / float(y.shape[0]),
        "confusion": confusion.tolist(),
    }


# --------------------------------------------------------------------------- download


def _extract(zip_path: Path, dest: Path) -> Path:
    """Unpack ``training2017.zip`` into ``dest/training2017`` via a temporary folder + rename.

    Members must lie under ``training2017/`` (no absolute paths, no ``..``); zipfile checks
    each member's CRC. A ``.detjax-extracted`` file holding the zip's SHA-256 marks a
    complete extraction, so a second call with the same archive does nothing.
    """
    target = dest / TRAINING_FOLDER
    marker = target / ".detjax-extracted"
    digest = _download.file_sha256(zip_path)
    if marker.is_file() and marker.read_text().strip() == digest:
        return target
    if target.exists():
        raise FileExistsError(2, f"{target} exists but is not a complete extraction of {zip_path}; move it away "
                                 f"and run again", str(target))
    tmp = Path(tempfile.mkdtemp(prefix=".training2017.", dir=dest))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename \
                        or not name.parts or name.parts[0] != TRAINING_FOLDER:
                    raise ValueError(f"{zip_path}: unexpected member {info.filename!r} (expected paths under "
                                     f"{TRAINING_FOLDER}/)")
                if info.is_dir():
                    continue
                out = tmp.joinpath(*name.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        extracted = tmp / TRAINING_FOLDER
        if not extracted.is_dir():
            raise ValueError(f"{zip_path}: no {TRAINING_FOLDER}/ folder in the archive")
        (extracted / marker.name).write_text(digest + "\n")
        os.replace(extracted, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_cinc2017(
    dest: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    timeout: float = _download.DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Path:
    """Fetch the training set from PhysioNet into ``dest``; returns the folder to load.

    ``training2017.zip`` and ``REFERENCE-v3.csv`` from ``base_url`` (default
    ``https://physionet.org/files/challenge-2017/1.0.0/``), each verified against its
    ``SHA256SUMS.txt`` by :func:`detjax.data._download.fetch_release` (resumable; without
    network a ``DownloadError`` within ``timeout`` says how to download by hand). The archive
    is unpacked to ``dest/training2017`` and the label file copied into it before
    ``SHA256SUMS.txt`` is written. Returns ``dest/training2017``, ready for :func:`load_cinc2017`.
    """
    dest = Path(dest).expanduser()

    def unpack(sums: Mapping[str, str]) -> Path:
        folder = _extract(dest / TRAINING_ZIP, dest)
        if not _download.verified(folder / DEFAULT_REFERENCE, sha256=sums[DEFAULT_REFERENCE]):
            with _download.atomic_file(folder / DEFAULT_REFERENCE) as out:
                out.write((dest / DEFAULT_REFERENCE).read_bytes())
        return folder

    wanted = (TRAINING_ZIP, DEFAULT_REFERENCE)
    return _download.fetch_release(base_url if base_url is not None else PHYSIONET_URL, dest,
                                   select=lambda name: name in wanted, required=wanted, what="CinC 2017",
                                   hint=MANUAL_DOWNLOAD_HINT, timeout=timeout, progress=progress, finish=unpack)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m detjax.data.cinc2017 make-folds|download ...`` (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m detjax.data.cinc2017", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-folds", help="write record,label,fold from a label file (stratified_folds)")
    make.add_argument("--reference", required=True, help="label file, e.g. DATA/REFERENCE-v3.csv")
    make.add_argument("--out", default=None, help="output CSV (default: the vendored folds.csv)")
    make.add_argument("--n-folds", type=int, default=N_FOLDS)
    get = commands.add_parser("download", help="download and verify the training set from PhysioNet")
    get.add_argument("dest", help="destination folder")
    get.add_argument("--base-url", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "make-folds":
            records, labels = read_reference(args.reference, check_files=False)
            folds = stratified_folds(records, labels, n_folds=args.n_folds)
            out = write_folds(args.out or vendored_folds_path(), records, labels, folds)
            print(f"wrote {out} ({len(records)} records, {args.n_folds} folds)")
        else:
            folder = download_cinc2017(args.dest, base_url=args.base_url, progress=True)
            print(f"CinC 2017 training set ready in {folder}; pass it with --data-dir or ${ENV_DATA_DIR}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
