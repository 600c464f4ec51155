"""The gallery's cutouts: science, template and difference stamps (FITS bytes from the alerts) as one PNG."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from .plots import png

__all__ = ["cutouts", "fits_image"]


def fits_image(data: bytes | None) -> np.ndarray | None:
    """The first 2-d image of a FITS file given as bytes (`None` if there is none)."""
    from astropy.io import fits

    if not data:
        return None
    with fits.open(io.BytesIO(data)) as hdus:
        for hdu in hdus:
            if hdu.data is not None and getattr(hdu.data, "ndim", 0) == 2:
                return np.asarray(hdu.data, float)
    return None


def cutouts(stamps: Mapping[str, bytes | None], title: str = "") -> bytes:
    """Science, template and difference cutouts (FITS bytes) side by side, each with its own stretch."""
    fig = Figure(figsize=(6.3, 2.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, name in zip(axes, ("science", "template", "difference"), strict=True):
        img = fits_image(stamps.get(name))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=8)
        if img is None or not np.isfinite(img).any():
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            continue
        lo, hi = np.nanpercentile(img, [1, 99.5])
        if name == "difference":
            hi = max(abs(lo), abs(hi), 1e-9)
            ax.imshow(img, origin="lower", cmap="RdBu_r", vmin=-hi, vmax=hi)
        else:
            ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    if title:
        fig.suptitle(title, fontsize=8)
    return png(fig)
