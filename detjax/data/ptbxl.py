"""PTB-XL rhythm task: loading, labels, fold splits, normalisation, cache, download.

Reads the dataset exactly as PhysioNet publishes it (``ptbxl_database.csv``,
``scp_statements.csv``, WFDB records under ``records100/`` or ``records500/``) and builds
the 12-class rhythm task of docs/method.md §8.

Labels. For record ``i`` and rhythm code ``c`` (in the order of :data:`RHYTHM_LABELS`)::

    y[i, c] = 1  if c is a key of scp_codes[i] (any likelihood, 0.0 included)
              0  otherwise

and the 12 codes must be exactly the rows of ``scp_statements.csv`` with ``rhythm == 1``,
in that order (checked; a different statements file raises).

Splits, normalisation and ``limit`` follow :mod:`detjax.data.splits` with the folds of
``strat_fold``: CV rotation ``k`` uses ``(test, val) = CV_FOLDS[k]``; train is every other
fold, restricted to records with at least one rhythm label; validation and test keep every
record of their fold. The statistics' mean is one float64 ``np.sum`` over all train values
(``chunked_mean=False``); ``limit`` keeps the first records of each split after it.

Cache (:mod:`detjax.data.cache`): ``cache_dir/ptbxl``, keyed by the bytes of both CSV
files, every record file used, the loader version, sampling rate and lead selection.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detjax.data import _download, cache
from detjax.data import splits as S
from detjax.data.splits import CV_FOLDS

__all__ = ["RHYTHM_LABELS", "LEAD_NAMES", "LEAD_PRESETS", "CV_FOLDS", "SAMPLING_RATES", "LOADER_VERSION",
           "PHYSIONET_URL", "PTBXL", "Subset", "Splits", "vendored_sample_dir", "resolve_leads",
           "read_database", "read_scp_statements", "check_rhythm_labels", "parse_scp_codes", "rhythm_targets",
           "read_record", "content_key", "load_ptbxl", "split", "normalize", "prepare_ptbxl", "download"]

#: The 12 rhythm labels of the paper's task, in output-column order (docs/method.md §8).
RHYTHM_LABELS: tuple[str, ...] = (
    "SR", "AFIB", "STACH", "SARRH", "SBRAD", "PACE",
    "SVARR", "BIGU", "AFLT", "SVTAC", "PSVT", "TRIGU",
)
#: Lead names as written in the PTB-XL WFDB headers, in header order.
LEAD_NAMES: tuple[str, ...] = (
    "I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6",
)
LEAD_PRESETS: dict[str, tuple[str, ...]] = {
    "all": LEAD_NAMES,
    "limb": LEAD_NAMES[:6],
    "precordial": LEAD_NAMES[6:],
}
#: Sampling rate -> database column holding the record path (without extension).
SAMPLING_RATES: dict[int, str] = {100: "filename_lr", 500: "filename_hr"}
RECORD_SECONDS = 10
#: Bumped whenever the arrays produced from the same files could change; part of the cache key.
LOADER_VERSION = "detjax-ptbxl-1"
PHYSIONET_URL = "https://physionet.org/files/ptb-xl/{version}/"
MANUAL_DOWNLOAD_HINT = (
    "Download PTB-XL manually on a machine with internet access, e.g. "
    "`wget -r -N -c -np https://physionet.org/files/ptb-xl/1.0.3/` "
    "(or the zip from https://physionet.org/content/ptb-xl/1.0.3/), copy the folder that "
    "contains ptbxl_database.csv here and pass it with --data-dir "
    "(load_ptbxl(data_dir=...) / prepare_ptbxl(data_dir=...))."
)

DATABASE_CSV = "ptbxl_database.csv"
SCP_CSV = "scp_statements.csv"
_DB_COLUMNS = ("ecg_id", "scp_codes", "strat_fold")
_CACHE_ARRAYS = ("x", "y", "fold", "ecg_id")


# --------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True, eq=False)
class PTBXL:
    """The loaded dataset (one row per record, in ``ptbxl_database.csv`` order).

    ``x``: ``(N, T, L)`` float32, raw mV, channel-last; ``y``: ``(N, 12)`` float32 0/1 in
    :data:`RHYTHM_LABELS` order; ``fold``: ``(N,)`` int64 ``strat_fold``; ``ecg_id``:
    ``(N,)`` int64. ``source`` records paths, the input content key and the array fingerprint.
    """

    x: np.ndarray
    y: np.ndarray
    fold: np.ndarray
    ecg_id: np.ndarray
    labels: tuple[str, ...]
    lead_names: tuple[str, ...]
    sampling_rate: int
    source: dict[str, Any]

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Subset:
    """One split: ``x (n, T, L)`` float32, ``y (n, 12)`` float32, ``ecg_id (n,)`` int64."""

    x: np.ndarray
    y: np.ndarray
    ecg_id: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Train/validation/test subsets plus the folds they came from."""

    train: Subset
    val: Subset
    test: Subset
    cv_fold: int
    folds: dict[str, tuple[int, ...]]

    def items(self) -> list[tuple[str, Subset]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


# --------------------------------------------------------------------------- small helpers


def vendored_sample_dir() -> Path:
    """Folder of the vendored 500-record, 100 Hz PTB-XL sample (CC BY 4.0, see NOTICE.md)."""
    return Path(__file__).resolve().parent / "vendored" / "ptbxl-sample"


def resolve_leads(leads: str | Sequence[str] | None) -> tuple[str, ...]:
    """Canonical lead names for a selection.

    ``None`` means all 12; a string is a preset name of :data:`LEAD_PRESETS` (``"limb"``,
    ``"precordial"``, ``"all"``) or a single lead; a sequence lists leads by name
    (case-insensitive, so ``"aVR"`` is ``"AVR"``), in the order wanted.
    """
    if leads is None:
        return LEAD_NAMES
    if isinstance(leads, str):
        if leads.lower() in LEAD_PRESETS:
            return LEAD_PRESETS[leads.lower()]
        leads = (leads,)
    names = tuple(str(name).upper() for name in leads)
    unknown = [name for name in names if name not in LEAD_NAMES]
    if unknown:
        raise ValueError(f"unknown lead name(s) {unknown}; valid names are {list(LEAD_NAMES)} "
                         f"and presets {sorted(LEAD_PRESETS)}")
    if not names:
        raise ValueError("leads must name at least one lead")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate lead names in {list(leads)}")
    return names


def _check_sampling_rate(sampling_rate: int) -> int:
    if sampling_rate not in SAMPLING_RATES:
        raise ValueError(f"sampling_rate must be one of {sorted(SAMPLING_RATES)}, got {sampling_rate!r}")
    return int(sampling_rate)


# --------------------------------------------------------------------------- CSV files


def read_database(path: str | os.PathLike[str], *, sampling_rate: int = 100) -> pd.DataFrame:
    """``ptbxl_database.csv`` as a DataFrame in file order, its key columns checked.

    Needs ``ecg_id``, ``scp_codes``, ``strat_fold`` and the path column of the sampling
    rate (``filename_lr`` for 100 Hz, ``filename_hr`` for 500 Hz). ``ecg_id`` must be
    unique integers and ``strat_fold`` integers in 1..10; otherwise ``ValueError``.
    """
    path = cache.require_file(Path(path), "PTB-XL database file")
    column = SAMPLING_RATES[_check_sampling_rate(sampling_rate)]
    frame = pd.read_csv(path)
    missing = [c for c in (*_DB_COLUMNS, column) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {list(frame.columns)})")
    for name in ("ecg_id", "strat_fold"):
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = frame.index[values.isna() | (values != np.round(values))]
        if len(bad):
            raise ValueError(f"{path}: column {name!r} must hold integers; row {int(bad[0]) + 2} "
                             f"has {frame[name].iloc[bad[0]]!s}")
        frame[name] = values.astype(np.int64)
    if frame["ecg_id"].duplicated().any():
        dup = int(frame.loc[frame["ecg_id"].duplicated(), "ecg_id"].iloc[0])
        raise ValueError(f"{path}: ecg_id {dup} occurs more than once")
    out_of_range = frame.loc[~frame["strat_fold"].between(1, 10)]
    if len(out_of_range):
        row = out_of_range.iloc[0]
        raise ValueError(f"{path}: ecg_id {int(row['ecg_id'])} has strat_fold {int(row['strat_fold'])}, "
                         f"expected 1..10")
    empty = frame.loc[frame[column].isna() | (frame[column].astype(str).str.strip() == "")]
    if len(empty):
        raise ValueError(f"{path}: ecg_id {int(empty['ecg_id'].iloc[0])} has no {column!r}")
    return frame


def read_scp_statements(path: str | os.PathLike[str]) -> pd.DataFrame:
    """``scp_statements.csv`` indexed by SCP code; needs a ``rhythm`` column."""
    path = cache.require_file(Path(path), "PTB-XL SCP statements file")
    frame = pd.read_csv(path, index_col=0)
    if "rhythm" not in frame.columns:
        raise ValueError(f"{path}: missing column 'rhythm' (has {list(frame.columns)})")
    return frame


def check_rhythm_labels(scp: pd.DataFrame, *, source: str = SCP_CSV) -> tuple[str, ...]:
    """The rows with ``rhythm == 1``, checked to equal :data:`RHYTHM_LABELS` in order."""
    codes = tuple(str(code) for code in scp.index[pd.to_numeric(scp["rhythm"], errors="coerce") == 1])
    if codes != RHYTHM_LABELS:
        raise ValueError(f"{source}: the rhythm statements (rows with rhythm == 1) are {list(codes)}, "
                         f"expected exactly {list(RHYTHM_LABELS)} in that order")
    return codes


def parse_scp_codes(text: Any, *, ecg_id: int) -> dict[str, float]:
    """Parse one ``scp_codes`` cell (a Python dict literal such as ``{'SR': 0.0}``)."""
    try:
        value = ast.literal_eval(str(text))
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"ecg_id {ecg_id}: scp_codes {text!r} is not a dict literal ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"ecg_id {ecg_id}: scp_codes {text!r} is not a dict")
    return {str(k): float(v) for k, v in value.items()}


def rhythm_targets(codes: Sequence[Mapping[str, float]], labels: Sequence[str] = RHYTHM_LABELS) -> np.ndarray:
    """``(N, len(labels))`` float32: 1 where the label is a key of the record's codes."""
    y = np.zeros((len(codes), len(labels)), dtype=np.float32)
    for i, record in enumerate(codes):
        for j, label in enumerate(labels):
            if label in record:
                y[i, j] = 1.0
    return y


# --------------------------------------------------------------------------- records


def _record_path(data_dir: Path, relative: str, *, ecg_id: int) -> Path:
    rel = Path(str(relative).strip())
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"ecg_id {ecg_id}: record path {relative!r} must be relative to the data folder")
    return data_dir / rel


def _missing(path: Path, *, ecg_id: int, record: Path) -> FileNotFoundError:
    return FileNotFoundError(2, f"PTB-XL record ecg_id={ecg_id} ({record}): missing file", str(path))


def _read_wfdb(record: Path, *, ecg_id: int):
    for path in cache.wfdb_files(record, ".dat"):
        if not path.is_file():
            raise _missing(path, ecg_id=ecg_id, record=record)
    try:
        with warnings.catch_warnings():
            # wfdb 4.3 calls pandas with inplace=True, deprecated in pandas 3.1: not our users' concern.
            warnings.filterwarnings("ignore", message="The inplace keyword", module="wfdb")
            import wfdb  # imported lazily: only needed on a cache miss

            return wfdb.rdrecord(str(record))
    except FileNotFoundError as exc:
        raise _missing(Path(exc.filename or record), ecg_id=ecg_id, record=record) from exc
    except Exception as exc:  # wfdb raises many types (HeaderSyntaxError, IndexError, ...)
        raise ValueError(f"PTB-XL record ecg_id={ecg_id} ({record}.hea/.dat) is corrupt: wfdb could not "
                         f"read it ({type(exc).__name__}: {exc})") from exc


def _check_dat_sizes(rec, record: Path, *, ecg_id: int) -> None:
    """Format-16 files must hold exactly ``channels * samples * 2`` bytes (wfdb ignores extra bytes)."""
    by_file: dict[str, list[int]] = {}
    for channel, name in enumerate(rec.file_name):
        by_file.setdefault(name, []).append(channel)
    for name, channels in by_file.items():
        fmts = {rec.fmt[c] for c in channels}
        offsets = {(rec.byte_offset or [None] * rec.n_sig)[c] or 0 for c in channels}
        if fmts != {"16"} or offsets != {0}:
            continue
        path = record.parent / name
        expected = len(channels) * rec.sig_len * 2
        size = path.stat().st_size
        if size != expected:
            raise ValueError(f"PTB-XL record ecg_id={ecg_id}: {path} has {size} bytes, expected {expected} "
                             f"({len(channels)} channels x {rec.sig_len} samples x 2 bytes, format 16)")


def read_record(
    record: str | os.PathLike[str],
    *,
    ecg_id: int,
    sampling_rate: int = 100,
    leads: str | Sequence[str] | None = None,
) -> np.ndarray:
    """One WFDB record as ``(sampling_rate * 10, len(leads))`` float32 mV, leads in the order given.

    Values are wfdb's physical signal ``(digital - baseline) / gain`` (float64), cast once to
    float32. Checks, each a ``ValueError`` naming ``ecg_id`` and the file: readable header and
    signal, sampling rate, number of samples and leads, the 12 standard lead names, units
    ``mV``, format-16 file sizes, finite values. Missing files raise ``FileNotFoundError``.
    """
    record = Path(record)
    rate = _check_sampling_rate(sampling_rate)
    leads = resolve_leads(leads)
    rec = _read_wfdb(record, ecg_id=ecg_id)
    where = f"PTB-XL record ecg_id={ecg_id} ({record}.hea)"
    if not math.isclose(float(rec.fs), rate):
        raise ValueError(f"{where}: sampling rate {rec.fs:g} Hz in the header, expected {rate} Hz")
    if rec.sig_len != rate * RECORD_SECONDS:
        raise ValueError(f"{where}: {rec.sig_len} samples, expected {rate * RECORD_SECONDS}")
    names = [str(n).upper() for n in rec.sig_name]
    if rec.n_sig != len(LEAD_NAMES) or sorted(names) != sorted(LEAD_NAMES):
        raise ValueError(f"{where}: leads {list(rec.sig_name)} ({rec.n_sig}), expected the 12 leads "
                         f"{list(LEAD_NAMES)}")
    units = {str(u) for u in rec.units}
    if {u.lower() for u in units} != {"mv"}:
        raise ValueError(f"{where}: units {sorted(units)}, expected mV")
    _check_dat_sizes(rec, record, ecg_id=ecg_id)
    signal = rec.p_signal
    if signal is None or signal.shape != (rec.sig_len, rec.n_sig):
        raise ValueError(f"{where}: signal of shape {None if signal is None else signal.shape}, "
                         f"expected {(rec.sig_len, rec.n_sig)}")
    bad = ~np.isfinite(signal)
    if bad.any():
        t, c = np.argwhere(bad)[0]
        raise ValueError(f"PTB-XL record ecg_id={ecg_id} ({record}.dat): {int(bad.sum())} non-finite values "
                         f"(NaN or inf; first at sample {t}, lead {rec.sig_name[c]})")
    columns = [names.index(name) for name in leads]
    return np.ascontiguousarray(signal[:, columns], dtype=np.float32)


# --------------------------------------------------------------------------- cache


def content_key(
    data_dir: Path,
    record_paths: Sequence[Path],
    *,
    ecg_ids: Sequence[int],
    sampling_rate: int,
    leads: Sequence[str],
) -> str:
    """SHA-256 naming the cache entry: loader version, settings and every input file's bytes.

    Hashes ``(relative path, sha256 of bytes)`` for both CSV files and each record's header
    and signal files, so editing any of them changes the key. Raises ``FileNotFoundError``
    naming the record when one of its files is missing.
    """
    files = [(name, data_dir / name) for name in (DATABASE_CSV, SCP_CSV)]
    for record, ecg_id in zip(record_paths, ecg_ids):
        for path in cache.wfdb_files(record, ".dat"):
            if not path.is_file():
                raise _missing(path, ecg_id=int(ecg_id), record=record)
            files.append((Path(os.path.relpath(path, data_dir)).as_posix(), path))
    spec = {"loader": LOADER_VERSION, "sampling_rate": int(sampling_rate), "leads": list(leads),
            "labels": list(RHYTHM_LABELS)}
    return cache.content_key(spec, files)


# --------------------------------------------------------------------------- loading


def _read_signals(records: Sequence[Path], ecg_ids: np.ndarray, shape: tuple[int, int, int], *, rate: int,
                  leads: tuple[str, ...], progress: bool) -> np.ndarray:
    iterator: Any = zip(records, ecg_ids)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(records), desc="PTB-XL records", unit="rec")
    x = np.empty(shape, dtype=np.float32)
    for i, (record, ecg_id) in enumerate(iterator):
        x[i] = read_record(record, ecg_id=int(ecg_id), sampling_rate=rate, leads=leads)
    return x


def load_ptbxl(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    sampling_rate: int = 100,
    leads: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> PTBXL:
    """Load every record of ``ptbxl_database.csv`` with its rhythm labels and fold.

    Args:
      data_dir: folder holding ``ptbxl_database.csv``, ``scp_statements.csv`` and the
        ``records100/`` (or ``records500/``) tree; ``None`` is the vendored 500-record sample.
      sampling_rate: 100 (``filename_lr``, 1000 samples) or 500 (``filename_hr``, 5000).
      leads: ``None`` (all 12), a preset (``"limb"``, ``"precordial"``) or lead names.
      cache_dir: cache root; default ``$DETJAX_CACHE_DIR`` or ``~/.cache/detjax``.
      use_cache: read and write the content-keyed ``.npz`` cache.
      progress: show a tqdm bar while reading records.

    Returns:
      :class:`PTBXL`; ``source`` holds ``data_dir`` (a hint), ``data_source`` (``{"kind":
      "argument" | "vendored"}``), ``content_sha256`` (input files), ``fingerprint`` (sha256
      of ``x, y, fold, ecg_id``), the cache file and whether it was hit.
    """
    rate = _check_sampling_rate(sampling_rate)
    lead_names = resolve_leads(leads)
    root, data_source = cache.resolve_data_dir(data_dir, what="PTB-XL", hint=MANUAL_DOWNLOAD_HINT,
                                               vendored=vendored_sample_dir())
    database = read_database(root / DATABASE_CSV, sampling_rate=rate)
    labels = check_rhythm_labels(read_scp_statements(root / SCP_CSV), source=str(root / SCP_CSV))
    ecg_ids = database["ecg_id"].to_numpy(np.int64)
    records = [_record_path(root, rel, ecg_id=int(i)) for rel, i in zip(database[SAMPLING_RATES[rate]], ecg_ids)]
    codes = [parse_scp_codes(text, ecg_id=int(i)) for text, i in zip(database["scp_codes"], ecg_ids)]
    # Labels and folds come from the CSVs (hashed into the key); a mismatch means a bad cache.
    from_csv = {"y": rhythm_targets(codes, labels), "fold": database["strat_fold"].to_numpy(np.int64),
                "ecg_id": ecg_ids}
    key = content_key(root, records, ecg_ids=ecg_ids, sampling_rate=rate, leads=lead_names)
    cache_path = cache.cache_root(cache_dir) / "ptbxl" / f"ptbxl-{rate}hz-{key}.npz"
    shape = (len(records), rate * RECORD_SECONDS, len(lead_names))
    arrays, digest, hit = cache.load_or_build(
        cache_path, key, _CACHE_ARRAYS, use_cache=use_cache, what="PTB-XL",
        build=lambda: {"x": _read_signals(records, ecg_ids, shape, rate=rate, leads=lead_names, progress=progress),
                       **from_csv})
    if hit:
        cache.check_cached_signals(arrays["x"], shape=shape, names=[f"ecg_id={int(i)}" for i in ecg_ids],
                                   path=cache_path, what="PTB-XL")
    for name, expected in from_csv.items():
        if not np.array_equal(arrays[name], expected):
            raise ValueError(f"cache file {cache_path}: {name!r} disagrees with {root / DATABASE_CSV}; "
                             f"delete the file")
    source = {"data_dir": str(root), "data_source": data_source, "n_records": len(records),
              "loader_version": LOADER_VERSION, "content_sha256": key, "fingerprint": digest,
              "cache_file": str(cache_path) if use_cache else None, "from_cache": hit}
    return PTBXL(x=arrays["x"], y=arrays["y"], fold=arrays["fold"], ecg_id=arrays["ecg_id"],
                 labels=labels, lead_names=lead_names, sampling_rate=rate, source=source)


# --------------------------------------------------------------------------- splits


def split(data: PTBXL, *, cv_fold: int = 0, fold_split: Mapping[str, Sequence[int]] | None = None) -> Splits:
    """Fold split of docs/method.md §8 for CV rotation ``cv_fold`` (0, 1 or 2), or the folds
    of ``fold_split`` (:func:`detjax.data.splits.fold_roles`); train keeps only records with
    at least one rhythm label. Record order within each split is the database order.
    """
    folds = S.fold_roles(cv_fold, fold_split)
    members = S.split_indices(data.fold, folds, train_mask=data.y.sum(axis=1) > 0)
    subsets = {name: Subset(x=data.x[i], y=data.y[i], ecg_id=data.ecg_id[i]) for name, i in members.items()}
    return Splits(**subsets, cv_fold=cv_fold, folds=folds)


def normalize(splits: Splits, *, limit: int | None = None) -> tuple[Splits, dict[str, float]]:
    """Global scalar z-normalisation with statistics of the whole training split.

    ``(splits, {"mean", "std", "count"})``: :func:`detjax.data.splits.train_statistics`
    (``chunked_mean=False``), then every split, cut to its first ``limit`` records, becomes
    ``(x - float32(mu)) / float32(sigma)`` in float32.
    """
    stats = S.train_statistics(splits.train.x, chunked_mean=False)

    def apply(subset: Subset) -> Subset:
        cut = S.first_records({"x": subset.x, "y": subset.y, "ecg_id": subset.ecg_id}, limit)
        return Subset(x=S.normalise(cut["x"], stats), y=cut["y"], ecg_id=cut["ecg_id"])

    out = Splits(train=apply(splits.train), val=apply(splits.val), test=apply(splits.test),
                 cv_fold=splits.cv_fold, folds=splits.folds)
    return out, stats


def prepare_ptbxl(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cv_fold: int = 0,
    leads: str | Sequence[str] | None = None,
    sampling_rate: int = 100,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
    fold_split: Mapping[str, Sequence[int]] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load, split and normalise: everything an experiment needs, as one dict.

    ``limit``: the first ``limit`` records of each split, cut after the statistics of the
    whole training split (:mod:`detjax.data.splits`); ``None`` keeps all.

    Keys: ``x_train, y_train, ecg_id_train`` (and ``_val``, ``_test``), ``labels``,
    ``lead_names``, ``sampling_rate``, ``cv_fold``, ``folds``, ``n`` (records per split),
    ``counts`` (positives per label per split), ``norm`` (``mean``, ``std``, ``count``),
    ``limit`` and ``source`` (see :func:`load_ptbxl`).
    """
    data = load_ptbxl(data_dir, sampling_rate=sampling_rate, leads=leads, cache_dir=cache_dir,
                      use_cache=use_cache, progress=progress)
    splits, stats = normalize(split(data, cv_fold=cv_fold, fold_split=fold_split), limit=S.check_limit(limit))
    out: dict[str, Any] = {}
    for name, subset in splits.items():
        out[f"x_{name}"], out[f"y_{name}"], out[f"ecg_id_{name}"] = subset.x, subset.y, subset.ecg_id
    out.update(
        labels=data.labels,
        lead_names=data.lead_names,
        sampling_rate=data.sampling_rate,
        cv_fold=cv_fold,
        folds={k: list(v) for k, v in splits.folds.items()},
        n={name: len(subset) for name, subset in splits.items()},
        counts={name: S.label_counts(subset.y, data.labels) for name, subset in splits.items()},
        norm=stats,
        limit=S.check_limit(limit),
        source=data.source,
    )
    return out


# --------------------------------------------------------------------------- download


def _wanted(name: str, sampling_rates: Sequence[int]) -> bool:
    """Top-level files (CSVs, licence, ...) and the record folders of the chosen rates."""
    if "/" not in name:
        return True
    folders = {f"records{rate}" for rate in sampling_rates}
    return name.split("/", 1)[0] in folders


def download(
    dest_dir: str | os.PathLike[str],
    *,
    version: str = "1.0.3",
    sampling_rates: Sequence[int] = (100,),
    base_url: str | None = None,
    timeout: float = _download.DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Path:
    """Fetch PTB-XL from PhysioNet into ``dest_dir``; every file verified against SHA256SUMS.txt.

    ``base_url`` defaults to ``https://physionet.org/files/ptb-xl/<version>/``; the files of
    the chosen sampling rates are fetched by :func:`detjax.data._download.fetch_release`
    (verified, resumable; without network a ``DownloadError`` within ``timeout`` explains how
    to download by hand). Returns ``dest_dir``, ready for ``load_ptbxl``.
    """
    rates = tuple(_check_sampling_rate(rate) for rate in sampling_rates)
    if not rates:
        raise ValueError("sampling_rates must name at least one of 100, 500")
    base = base_url if base_url is not None else PHYSIONET_URL.format(version=version)
    _download.fetch_release(base, dest_dir, select=lambda name: _wanted(name, rates), required=(DATABASE_CSV, SCP_CSV),
                            what=f"PTB-XL {version}", hint=MANUAL_DOWNLOAD_HINT, timeout=timeout, progress=progress)
    return Path(dest_dir).expanduser()
