"""``apbatch night footprint``: where the night looked, as MOC files and a PNG."""

from __future__ import annotations

from pathlib import Path

from ..config import ApbatchConfig
from ..errors import BadInputError
from ..ledger import Ledger
from ..night import night_rows
from ..report.footprint import (
    NightFootprint,
    check_order,
    night_footprint,
    pointings_from_rows,
    write_footprint,
)

__all__ = ["write_night_footprint"]


def write_night_footprint(config: ApbatchConfig, *, day_obs: int, out: str | Path | None = None,
                          order: int | None = None, ledger: Ledger | None = None) -> NightFootprint:
    """Write the night's coverage: ``<out>/night-<day_obs>.moc.fits`` (observed science CCDs),
    ``night-<day_obs>-processed.moc.fits`` (their jobs COMPLETED) and ``night-<day_obs>-footprint.png``.

    Each file is written to a temporary name and renamed; the PNG is drawn before anything is written.

    Parameters
    ----------
    config : `ApbatchConfig`
        Where the ledger is; ``<root>/reports`` is the default ``out``.
    day_obs : `int`
        The night, YYYYMMDD.
    out : path, optional
        The directory (created if missing).
    order : `int`, optional
        HEALPix order (default `apbatch.report.footprint.DEFAULT_ORDER`).
    ledger : `Ledger`, optional
        Injected for tests (default: the configured one, not created if missing).

    Returns
    -------
    footprint : `apbatch.report.footprint.NightFootprint`
        With ``files`` set (``observed``, ``processed``, ``png`` -> path).

    Raises
    ------
    BadInputError
        Raised if ``order`` is out of range, ``out`` cannot be written, there is no ledger, or the
        night has no submitted science CCD (the message names the ledger's latest nights).
    """
    from ..report.html import check_directory

    order = check_order(order)
    own = ledger is None
    ledger = ledger or Ledger.from_config(config, create=False)
    try:
        ccds = pointings_from_rows(night_rows(ledger, day_obs))
        others = ledger.nights(limit=6) if not ccds else {}
    finally:
        if own:
            ledger.close()
    if not ccds:
        latest = ", ".join(f"{d} ({n} CCDs)" for d, n in others.items() if d != day_obs)
        raise BadInputError("--day-obs", f"night {day_obs} has no submitted science CCD",
                            f"the ledger's latest nights: {latest}" if latest else
                            "the ledger has no night yet")
    directory = Path(out) if out is not None else Path(config.path("reports"))
    check_directory(directory, "--out")
    fp = night_footprint(ccds, day_obs=day_obs, order=order)
    write_footprint(fp, directory)
    return fp
