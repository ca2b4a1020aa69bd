"""Data sets in their published formats.

:mod:`detjax.data.ptbxl` loads PTB-XL (WFDB records + CSV metadata) for the 12-class
rhythm task; ``load_ptbxl(data_dir=None)`` reads the vendored 500-record sample
(``detjax/data/vendored/ptbxl-sample``, CC BY 4.0, see its NOTICE.md).
:mod:`~detjax.data.cinc2017` and :mod:`~detjax.data.medmnist` load the other sets. The
loaders share :mod:`~detjax.data.splits` (folds, train-only z-normalisation, ``limit``),
:mod:`~detjax.data.cache` (data folders, the content-keyed cache) and
:mod:`~detjax.data._download` (checksum-verified downloads).
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
