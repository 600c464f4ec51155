"""Template coadds: deeper images of the same simulated sky on sky-map patches.

A template differs from a science image the way real ones do: it is deeper (noise of
``depth_visits`` 30-s visits), has a different and smaller PSF (Gaussian, ``fwhm_arcsec``),
is background-subtracted, contains neither new transients nor moving objects, shows
variable stars at their base flux, and its sources sit a small, fixed astrometric offset
(``offset_arcsec``, direction drawn per tract) away from where its WCS puts them.

Units are nJy per pixel (AB): ``mag = 31.4 - 2.5 log10(flux)``; ``ZEROPT`` = 31.4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..image import Image, write_image
from ..skymap import PatchInfo
from . import camera
from .sky import NJY_ZEROPOINT, SKY_MAG, ZERO_POINTS, SkyModel

__all__ = ["NJY_ZEROPOINT", "render_template", "template_offset", "write_template"]



def template_offset(seed: int, tract: int, offset_arcsec: float) -> tuple[float, float]:
    """Astrometric error (dra*cos(dec), ddec) in degrees of a tract's templates."""
    ang = np.random.default_rng([int(seed), 17, int(tract)]).uniform(0, 2 * math.pi)
    return offset_arcsec / 3600 * math.cos(ang), offset_arcsec / 3600 * math.sin(ang)


def render_template(
    patch: PatchInfo,
    band: str,
    sky: SkyModel,
    seed: int,
    fwhm_arcsec: float = 0.6,
    depth_visits: int = 20,
    offset_arcsec: float = 0.04,
    pixel_scale: float = 0.2,
) -> Image:
    """Render the template of one patch in one band.

    Returns
    -------
    template : `apbatch.image.Image`
        nJy per pixel, with variance, the patch WCS and metadata (``BAND``, ``TRACT``,
        ``PATCH``, ``PSFFWHM`` arcsec and ``PSFBETA`` (the coadd's Moffat PSF), ``ZEROPT``, ``BUNIT``).
    """
    ny, nx = patch.shape
    corners = patch.corners
    cra, cdec = patch.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    radius = math.hypot(nx, ny) / 2 * pixel_scale / 3600 + 0.01
    src = sky.sources(float(cra), float(cdec), radius)
    dra, ddec = template_offset(seed, patch.tract, offset_arcsec)
    ra = src["ra"].to_numpy() + dra / math.cos(math.radians(float(cdec)))
    x, y = patch.wcs.world_to_pixel_values(ra, src["dec"].to_numpy() + ddec)
    texp = 30.0 * depth_visits
    electrons = SkyModel.fluxes(src, band, 0.0, texp, template=True)
    img = np.zeros((ny, nx), np.float32)
    # a coadd PSF has wings too: the same Moffat family as the science images, narrower;
    # galaxies are their intrinsic Gaussian convolved with it (as in the science images)
    camera.render_stamps(img, x, y, electrons, np.full(len(x), fwhm_arcsec / pixel_scale), beta=camera.BETA,
                         extent_sigma=src["size"].to_numpy() / pixel_scale / 2.3548)
    sky_e = 10 ** (-0.4 * (SKY_MAG[band] - ZERO_POINTS[band])) * pixel_scale**2 * texp
    rng = np.random.default_rng([int(seed), 19, patch.tract, patch.patch, ord(band)])
    var_e = img + np.float32(sky_e + depth_visits * 81.0)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(var_e)
    # electrons in texp -> nJy: 1 e-/s in band corresponds to 10^(-0.4 (ZP - 31.4)) nJy
    to_njy = np.float32(10 ** (-0.4 * (ZERO_POINTS[band] - NJY_ZEROPOINT)) / texp)
    img *= to_njy
    var = var_e * to_njy**2
    meta = {
        "BAND": band,
        "TRACT": patch.tract,
        "PATCH": patch.patch,
        "PSFFWHM": fwhm_arcsec,
        "PSFBETA": camera.BETA,
        "ZEROPT": NJY_ZEROPOINT,
        "BUNIT": "nJy",
        "NVISITS": depth_visits,
        "SIMSEED": int(seed),
        "CORNERS": ",".join(f"{v:.6f}" for v in corners.ravel()),
    }
    return Image(img, var, None, patch.wcs, meta)


def write_template(img: Image, root: str | Path, skymap_name: str) -> Path:
    """Write a template as ``<root>/<skymap>/<tract>/<patch>/template_<band>.fits`` (atomic)."""
    m = img.metadata
    path = Path(root) / skymap_name / str(m["TRACT"]) / str(m["PATCH"]) / f"template_{m['BAND']}.fits"
    write_image(img, path)
    return path
