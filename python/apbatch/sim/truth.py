"""Truth files: what the simulator put on each CCD of each visit.

One Parquet file per visit and CCD, one row per source whose centre is on the CCD:
``id, kind (star|galaxy|variable|new|moving), ra, dec (deg, true), x, y (0-based pixels of
the assembled CCD, mean over the snaps), mag (reference r-band), flux_e (electrons in the
visit, all snaps, as a flat-fielded image measures them), template_flux_e (the same source
in the template sky, scaled to the visit), diff_flux_e, fwhm_px, noise_var_e (sky + read
noise variance under the PSF, all snaps), snr and diff_snr (expected point-source S/N of the
source and of its change), saturated, nsnaps``, and ``flux_njy``, ``template_flux_njy``,
``diff_flux_njy``: the same fluxes in nJy through the snap's true zero point (a flux density:
a visit's value is the mean over its snaps, not the sum).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import replacing

__all__ = ["read_truth", "truth_path", "visit_truth", "write_truth"]

_SUMMED = ["flux_e", "template_flux_e", "diff_flux_e", "noise_var_e"]


def visit_truth(snaps: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Combine the truth of a visit's snaps (same CCD) into the visit's truth.

    A source on the CCD in any snap is kept; fluxes and noise add; positions average.
    """
    snaps = [s for s in snaps if s is not None]
    if not snaps:
        raise ValueError("no snaps to combine")
    df = pd.concat(snaps, ignore_index=True)
    agg = dict.fromkeys(_SUMMED, "sum")
    agg |= dict.fromkeys(("kind", "ra", "dec", "mag", "fwhm_px"), "first")
    agg |= {"x": "mean", "y": "mean", "saturated": "any"}
    agg |= {c: "mean" for c in ("flux_njy", "template_flux_njy", "diff_flux_njy") if c in df}
    out = df.groupby("id", sort=True).agg(agg)
    out["nsnaps"] = df.groupby("id", sort=True).size()
    out = out.reset_index()
    denom = np.sqrt(out["flux_e"].clip(lower=0) + out["noise_var_e"])
    out["snr"] = out["flux_e"] / denom
    out["diff_snr"] = out["diff_flux_e"] / denom
    return out


def truth_path(root: str | Path, instrument: str, visit: int, detector_name: str) -> Path:
    """``<root>/<instrument>/<visit>/truth_<visit>_<detector_name>.parquet``."""
    return Path(root) / instrument / str(visit) / f"truth_{visit}_{detector_name}.parquet"


def write_truth(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a truth table as Parquet, atomically."""
    path = Path(path)
    with replacing(path, durable=False) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_truth(path: str | Path) -> pd.DataFrame:
    """Read a truth table."""
    return pd.read_parquet(path)
