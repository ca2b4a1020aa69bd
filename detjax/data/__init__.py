"""Data sets in their published formats.

:mod:`detjax.data.ptbxl` loads PTB-XL (WFDB records + CSV metadata) for the 12-class
rhythm task, with fold splits, train-only z-normalisation, a content-keyed cache and a
checksum-verified downloader. ``load_ptbxl(data_dir=None)`` reads the vendored
500-record sample (``detjax/data/vendored/ptbxl-sample``, CC BY 4.0, see its NOTICE.md).
"""

from detjax.data.ptbxl import (
    PTBXL,
    RHYTHM_LABELS,
    Splits,
    Subset,
    download,
    load_ptbxl,
    normalize,
    prepare_ptbxl,
    split,
)

__all__ = [
    "PTBXL",
    "RHYTHM_LABELS",
    "Splits",
    "Subset",
    "download",
    "load_ptbxl",
    "normalize",
    "prepare_ptbxl",
    "split",
]
