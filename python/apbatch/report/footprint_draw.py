"""The night footprint's PNG: processed (green) over observed (blue) coverage, one panel per field.

Split from `apbatch.report.footprint` (the MOCs and their files); `NightFootprint.image` calls
:func:`draw` once and keeps the bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from .footprint import OBSERVED_COLOUR, PROCESSED_COLOUR, area_deg2
from .plots import message, panel_figure, png

if TYPE_CHECKING:
    from .footprint import NightFootprint

__all__ = ["draw"]

_FIELD_ORDER = 7  # cells of 0.46 deg: CCDs, chip gaps and dithers of one field join into one piece
_MAX_PANELS = 6


def _fields(observed: Any) -> list:
    """The observed MOC's separate pieces at order 7 (coarse: intersect with ``observed``), largest first."""
    coarse = observed.degrade_to_order(min(_FIELD_ORDER, observed.max_order))
    return sorted(coarse.split(include_indirect_neighbours=True), key=lambda m: -m.sky_fraction)


def _wcs(projection: str, centre: tuple[float, float], shape: tuple[int, int], scale: float):
    """A celestial WCS (east to the left), ``scale`` degrees per pixel."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = [f"RA---{projection}", f"DEC--{projection}"]
    w.wcs.crval = list(centre)
    w.wcs.crpix = [shape[0] / 2 + 0.5, shape[1] / 2 + 0.5]
    w.wcs.cdelt = [-scale, scale]
    w.pixel_shape = shape
    return w


def _field_wcs(field: Any, npix: int = 500):
    centre = field.barycenter()
    radius = float(field.largest_distance_from_coo_to_vertices(centre).to_value("deg"))
    scale = 2.3 * max(radius, 0.05) / npix
    return _wcs("TAN", (float(centre.ra.deg), float(centre.dec.deg)), (npix, npix), scale)


def _raster(w, observed: Any, processed: Any) -> np.ndarray:
    """RGBA image of the MOCs on the pixels of ``w``: 0 outside, 1 observed, 2 processed (by pixel centre)."""
    import astropy.units as u

    nx, ny = w.pixel_shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny))
    lon, lat = w.pixel_to_world_values(x.ravel(), y.ravel())
    ok = np.isfinite(lon) & np.isfinite(lat)
    code = np.zeros(x.size, dtype=np.uint8)
    for value, moc in ((1, observed), (2, processed)):
        if moc.sky_fraction > 0 and ok.any():
            inside = moc.contains_lonlat(lon[ok] % 360.0 * u.deg, lat[ok] * u.deg)
            code[np.flatnonzero(ok)[inside]] = value
    colours = np.array([to_rgba("white", 0.0), to_rgba(OBSERVED_COLOUR), to_rgba(PROCESSED_COLOUR)])
    return colours[code.reshape(ny, nx)]


def _axes(ax) -> None:
    ax.coords.grid(color="#888888", alpha=0.4, linestyle=":")
    for coord, name in zip(ax.coords, ("RA", "Dec"), strict=False):
        coord.set_axislabel(name, fontsize=8)
        coord.set_ticklabel(size=7)


def draw(fp: NightFootprint) -> bytes:
    """The night's coverage as PNG bytes: processed (green) over observed (blue), one panel per field.

    Each panel is the MOCs sampled at its pixel centres (``MOC.contains_lonlat``): what the files
    hold (mocpy's ``fill`` would need cdshealpix). Fields are the observed MOC's separate pieces
    (joined at order 7, 0.46 deg); with more than one, a whole-sky map of their centres comes
    first, then the `_MAX_PANELS` largest fields.
    """
    if fp.observed.sky_fraction == 0:
        return message(f"no science CCD observed on night {fp.day_obs}")
    fields = _fields(fp.observed)
    shown = fields[:_MAX_PANELS]
    npanel = len(shown) + (len(fields) > 1)
    fig, nrow, ncol = panel_figure(npanel, (8, 7), 4.8)
    i = 1
    if len(fields) > 1:  # where the fields are: their centres, numbered as their panels
        w = _wcs("AIT", (180.0, 0.0), (720, 360), 0.5 * 1.13)  # the whole sky in 720 x 360 pixels
        ax = fig.add_subplot(nrow, ncol, i, projection=w)
        ax.set(xlim=(-0.5, 719.5), ylim=(-0.5, 359.5))
        centres = [f.barycenter() for f in fields]
        ax.scatter([c.ra.deg for c in centres], [c.dec.deg for c in centres], s=30, c=PROCESSED_COLOUR,
                   edgecolor="black", linewidth=0.4, transform=ax.get_transform("world"))
        for n, c in enumerate(centres[:_MAX_PANELS], 1):
            ax.text(c.ra.deg, c.dec.deg, f" {n}", fontsize=8, transform=ax.get_transform("world"))
        _axes(ax)
        ax.set_title(f"whole sky: {len(fields)} field(s)", fontsize=10)
        i += 1
    for n, piece in enumerate(shown, 1):
        field = fp.observed.intersection(piece)
        w = _field_wcs(field)
        ax = fig.add_subplot(nrow, ncol, i, projection=w)
        mine = fp.processed.intersection(field)
        ax.imshow(_raster(w, field, mine), origin="lower", interpolation="nearest")
        _axes(ax)
        name = f"field {n}: " if len(fields) > 1 else ""
        ax.set_title(f"{name}{area_deg2(field):.2f} deg² observed, {area_deg2(mine):.2f} processed",
                     fontsize=10)
        i += 1
    s = fp.summary()
    fig.legend(handles=[Patch(facecolor=OBSERVED_COLOUR, label=f"observed ({s['ccds_observed']} CCDs, "
                              f"{s['observed_deg2']:.2f} deg²)"),
                        Patch(facecolor=PROCESSED_COLOUR, label=f"processed ({s['ccds_processed']} CCDs, "
                              f"{s['processed_deg2']:.2f} deg²)")],
               fontsize=9, loc="outside lower center", ncol=2)
    if len(fields) > _MAX_PANELS:
        fig.suptitle(f"{len(fields) - _MAX_PANELS} smaller field(s) not drawn in detail", fontsize=9)
    return png(fig)
