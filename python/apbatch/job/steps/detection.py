"""Source detection and measurement on a calibrated, background-subtracted image (sep)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import sep

from ...image import Image, MaskBits

__all__ = ["detect_bright_sources", "detect_sources"]

_MASKED = int(MaskBits.BAD | MaskBits.SAT | MaskBits.CR | MaskBits.NO_DATA | MaskBits.INTRP)


def _gauss_kernel(sigma: float) -> np.ndarray:
    h = max(1, int(np.ceil(2.5 * sigma)))
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def detect_sources(
    img: Image,
    threshold: float = 5.0,
    minarea: int = 5,
    psf_sigma: float = 1.5,
    aperture: float = 6.0,
    max_sources: int = 20000,
) -> pd.DataFrame:
    """Detect and measure sources above ``threshold`` sigma of the per-pixel noise.

    Parameters
    ----------
    img : `Image`
        Background-subtracted image with variance and mask.
    threshold : `float`
        Detection threshold in units of the per-pixel ``sqrt(variance)``, applied to the
        image smoothed by a Gaussian of ``psf_sigma`` (sep's ``conv`` filter: its
        ``matched`` mode with a variance array costs ~8x more and only bright stars are needed).
    minarea : `int`
        Minimum number of pixels above threshold.
    psf_sigma : `float`
        Gaussian sigma (px) of the matched filter.
    aperture : `float`
        Radius (px) of the aperture flux.
    max_sources : `int`
        Keep at most this many (brightest) sources.

    Returns
    -------
    sources : `pandas.DataFrame`
        One row per source: ``x, y`` (0-based pixels), ``flux, fluxErr`` (aperture, e-),
        ``snr``, ``peak`` (e-), ``a, b, theta`` (sep shape), ``ixx, iyy, ixy``, ``npix``,
        ``flag`` (sep flags), ``masked`` (a saturated/bad/CR/interpolated pixel within 2 px).
    """
    data = np.ascontiguousarray(img.image, dtype=np.float32)
    mask = img.mask
    err = np.sqrt(np.maximum(img.variance, 1e-6)).astype(np.float32)
    nodata = (mask & int(MaskBits.NO_DATA)) != 0
    sep.set_extract_pixstack(max(300000, data.size // 20))
    sep.set_sub_object_limit(4096)
    objs = sep.extract(
        data,
        threshold,
        err=err,
        mask=nodata,
        minarea=minarea,
        filter_kernel=_gauss_kernel(psf_sigma),
        filter_type="conv",
        deblend_cont=0.005,
        clean=True,
    )
    if len(objs) > max_sources:
        objs = objs[np.argsort(objs["flux"])[::-1][:max_sources]]
    x, y = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
    flux, ferr, flag = sep.sum_circle(data, x, y, aperture, err=err, mask=nodata)
    ny, nx = data.shape
    xi = np.clip(np.round(x).astype(int), 0, nx - 1)
    yi = np.clip(np.round(y).astype(int), 0, ny - 1)
    bad = np.zeros(len(x), bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            bad |= (mask[np.clip(yi + dy, 0, ny - 1), np.clip(xi + dx, 0, nx - 1)] & _MASKED) != 0
    df = pd.DataFrame(
        {
            "x": x,
            "y": y,
            "flux": flux,
            "fluxErr": ferr,
            "snr": np.where(ferr > 0, flux / np.maximum(ferr, 1e-30), 0.0),
            "peak": objs["peak"].astype(np.float64),
            "a": objs["a"],
            "b": objs["b"],
            "theta": objs["theta"],
            "ixx": objs["x2"],
            "iyy": objs["y2"],
            "ixy": objs["xy"],
            "npix": objs["npix"],
            "flag": objs["flag"].astype(np.int32) | flag.astype(np.int32),
            "masked": bad,
        }
    )
    return df.sort_values("flux", ascending=False, ignore_index=True)


def detect_bright_sources(img: Image, threshold: float = 20.0, psf_sigma: float = 1.5) -> pd.DataFrame:
    """Positions and isophotal fluxes of bright sources, cheaply: astrometric references.

    Unlike :func:`detect_sources`: one noise level for the whole image (the median of
    ``sqrt(variance)``; a coadd's noise is nearly uniform), a light deblend (8 levels, not 32),
    no cleaning and no aperture photometry, so a template patch costs about half as much.
    ``NO_DATA`` pixels are zeroed first.

    Returns
    -------
    sources : `pandas.DataFrame`
        ``x, y`` (0-based pixels) and ``flux``, brightest first.
    """
    data = np.ascontiguousarray(img.image, dtype=np.float32)
    var = img.variance[:: max(1, img.shape[0] // 256), :: max(1, img.shape[1] // 256)]
    var = var[np.isfinite(var) & (var > 0)]
    if var.size == 0:
        return pd.DataFrame({"x": [], "y": [], "flux": []})
    rms = float(np.sqrt(np.median(var)))
    nodata = (img.mask & int(MaskBits.NO_DATA)) != 0
    if nodata.any():  # (sep's mask does not stop the filtered image from crossing it)
        data = np.where(nodata, np.float32(0), data)
    sep.set_extract_pixstack(max(300000, data.size // 20))
    objs = sep.extract(data, threshold, err=rms, minarea=5, filter_kernel=_gauss_kernel(psf_sigma),
                       filter_type="conv", deblend_nthresh=8, clean=False)
    df = pd.DataFrame({"x": objs["x"].astype(np.float64), "y": objs["y"].astype(np.float64),
                       "flux": objs["flux"].astype(np.float64)})
    return df.sort_values("flux", ascending=False, ignore_index=True)
