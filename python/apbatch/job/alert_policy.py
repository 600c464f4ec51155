"""Which DIA sources are alerted on: the ones no pixel flag marks as an artifact's.

Every DIA source the job measures goes into the butler's ``dia_source_detector`` table with
its flags. Sources whose flags say the pixels are not to be trusted (by default: inside a
saturated star's core, bleed trail or halo, ``pixelFlags_saturated`` / ``pixelFlags_suspect``)
are left out of the APDB and get no alert, as Rubin's ``FilterDiaSourceCatalogTask`` leaves out
flagged sources; they are counted per flag in the job's metrics. The kept rows keep their
``diaSourceId`` (packed over the full table's row order), so the butler table and the APDB
still join on it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["REJECT_FLAGS", "rejected_mask", "split_alertable"]

REJECT_FLAGS: tuple[str, ...] = ("pixelFlags_saturated", "pixelFlags_suspect")


def split_alertable(
    dia: pd.DataFrame, reject_flags: tuple[str, ...] = REJECT_FLAGS
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The DIA sources to associate and alert on, and how many were left out, per flag.

    Parameters
    ----------
    dia : `pandas.DataFrame`
        The job's DIA source table (:data:`apbatch.job.steps.DIA_COLUMNS` plus ids).
    reject_flags : `tuple` [`str`]
        Boolean columns; a row with any of them set is left out. A flag the table lacks
        counts as unset.

    Returns
    -------
    alertable : `pandas.DataFrame`
        The kept rows, in their original order (index reset; ``attrs`` kept).
    rejected : `dict` [`str`, `int`]
        Rows left out per flag (a row with two flags counts under both) and ``"total"``.
    """
    hits = _flag_hits(dia, reject_flags)
    drop = _any(hits, len(dia))
    rejected = {flag: int(hit.sum()) for flag, hit in hits.items()}
    rejected["total"] = int(drop.sum())
    kept = dia[~drop].reset_index(drop=True)
    kept.attrs = dict(dia.attrs)
    return kept, rejected


def rejected_mask(dia: pd.DataFrame, reject_flags: tuple[str, ...] = REJECT_FLAGS) -> np.ndarray:
    """The rows :func:`split_alertable` leaves out, as a boolean array in the table's order."""
    return _any(_flag_hits(dia, reject_flags), len(dia))


def _flag_hits(dia: pd.DataFrame, reject_flags: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Each reject flag the table has, as booleans (a missing value is unset)."""
    return {flag: dia[flag].fillna(False).to_numpy(bool) for flag in reject_flags if flag in dia.columns}


def _any(hits: dict[str, np.ndarray], n: int) -> np.ndarray:
    drop = np.zeros(n, bool)
    for hit in hits.values():
        drop |= hit
    return drop
