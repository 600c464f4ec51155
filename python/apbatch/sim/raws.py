"""Simulated raw CCD exposures: the pixels and truth of one exposure (:class:`ExposureSpec`
and its primary header live in `apbatch.sim.exposure` and are re-exported here).

The pointing in the header (``RASTART``/``DECSTART``/``ROTPA``) and the detector name are
all a reader needs to rebuild the WCS the simulator used
(:meth:`apbatch.instruments.Instrument.sky_wcs`): the simulator never derives a WCS itself.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..instruments import get_instrument
from ..raw import RawSegment, write_raw
from . import camera
from .calibs import detector_signature
from .exposure import ExposureSpec, primary_header
from .sky import NJY_ZEROPOINT, SKY_MAG, ZERO_POINTS, SkyModel

__all__ = ["ExposureSpec", "SimulatedRaw", "primary_header", "render_exposure", "simulate_ccd"]

_ZP_OFFSET = {"LSSTCam": 0.0, "LSSTComCam": 0.0, "LATISS": -4.2}  # 1.2 m vs 6.4 m effective aperture
_BETA = camera.BETA
HOT_AMP_E = 1000.0
"""Electrons a hot amplifier (``ExposureSpec.hot_amps``) adds to every pixel, besides ``HOT_AMP_RATE``."""
HOT_AMP_RATE = 50.0
"""Electrons per second of dark time a hot amplifier adds."""


@dataclasses.dataclass
class SimulatedRaw:
    """A rendered raw: header, segments (HDU order) and the truth of this exposure."""

    header: dict
    segments: list[RawSegment]
    truth: pd.DataFrame


def _truth(
    src: pd.DataFrame,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    tflux: np.ndarray,
    fwhm: np.ndarray,
    noise_var: np.ndarray,
    saturated: np.ndarray,
    njy_per_e: float = np.nan,
) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "id": src["id"].to_numpy(),
            "kind": [SkyModel.kind_name(k) for k in src["kind"]],
            "ra": src["ra"].to_numpy(),
            "dec": src["dec"].to_numpy(),
            "x": x,
            "y": y,
            "mag": src["mag"].to_numpy(),
            "flux_e": flux,
            "template_flux_e": tflux,
            "diff_flux_e": flux - tflux,
            "fwhm_px": fwhm,
            "noise_var_e": noise_var,
            "saturated": saturated,
        }
    )
    out["snr"] = out["flux_e"] / np.sqrt(out["flux_e"].clip(lower=0) + out["noise_var_e"])
    out["diff_snr"] = out["diff_flux_e"] / np.sqrt(out["flux_e"].clip(lower=0) + out["noise_var_e"])
    for col in ("flux", "template_flux", "diff_flux"):
        out[f"{col}_njy"] = out[f"{col}_e"] * njy_per_e
    return out


def render_exposure(
    spec: ExposureSpec, detector: int | str, sky: SkyModel | None, seed: int, cosmic_rays: bool = True
) -> SimulatedRaw:
    """Render one CCD of one exposure.

    Parameters
    ----------
    spec : `ExposureSpec`
        The exposure.
    detector : `int` or `str`
        The CCD.
    sky : `SkyModel` or `None`
        The sky (needed for on-sky images).
    seed : `int`
        Seed of the camera signature and of the noise (with the image name and detector).
    cosmic_rays : `bool`
        Add cosmic rays.

    Returns
    -------
    raw : `SimulatedRaw`
        Header, segments and truth (sources whose centre is on the CCD; empty off-sky).
    """
    inst = get_instrument(spec.instrument)
    det = inst.detector(detector)
    sig = detector_signature(inst.name, det.id, seed)
    rng = np.random.default_rng([int(seed), 3, spec.day_obs, spec.seq_num, det.id])
    img = np.zeros((det.ny, det.nx), np.float32)
    empty = np.zeros(0)
    truth = _truth(
        pd.DataFrame({"id": [], "kind": [], "ra": [], "dec": [], "mag": []}),
        empty, empty, empty, empty, empty, empty,
        np.zeros(0, bool),
    )
    bright = []
    t_open = spec.shutter_time
    if spec.on_sky:
        if sky is None or spec.ra_start is None:
            raise ValueError("an on-sky exposure needs a sky and a pointing")
        band, scale, zp = spec.band or "r", inst.pixel_scale_arcsec, _ZP_OFFSET[inst.name] + spec.transparency
        wcs = inst.sky_wcs(det, *spec.pointing())
        cra, cdec = wcs.pixel_to_world_values((det.nx - 1) / 2, (det.ny - 1) / 2)
        radius = math.hypot(det.nx, det.ny) / 2 * scale / 3600 + 0.01
        mjd_mid = spec.mjd_begin + t_open / 2 / 86400
        src = sky.sources(float(cra), float(cdec), radius)
        movers = sky.movers_near(float(cra), float(cdec), radius, mjd_mid)
        if len(movers):
            src = pd.concat([src, movers], ignore_index=True)
        x, y = wcs.world_to_pixel_values(src["ra"].to_numpy(), src["dec"].to_numpy())
        flux = SkyModel.fluxes(src, band, mjd_mid, t_open, zp)
        tflux = SkyModel.fluxes(src, band, mjd_mid, t_open, zp, template=True)
        fp_r = math.hypot(det.x_mm, det.y_mm) / 330.0
        fwhm = camera.psf_fwhm(spec.seeing / scale, x, y, det.nx, det.ny, fp_r)
        fwhm_src = np.sqrt(fwhm**2 + (src["size"].to_numpy() / scale) ** 2)
        extent = src["size"].to_numpy() / scale / 2.3548
        camera.render_stamps(img, x, y, flux, fwhm, _BETA, extent_sigma=extent)
        sky_e = 10 ** (-0.4 * (SKY_MAG[band] + spec.sky_offset - ZERO_POINTS[band] - zp)) * scale**2 * t_open
        img += np.float32(sky_e)
        on = (x >= -0.5) & (x < det.nx - 0.5) & (y >= -0.5) & (y < det.ny - 0.5)
        rn2 = float(np.mean([a.read_noise for a in sig.amps])) ** 2
        neff = camera.stamp_neff(float(np.median(fwhm)), _BETA) * (fwhm / np.median(fwhm)) ** 2
        full_well = min(a.saturation * g for a, g in zip(sig.amps, sig.gain_true, strict=False))
        peak = flux / (neff / 2.0)  # generous estimate of the peak pixel
        bright = [(x[k], y[k], k) for k in np.nonzero(on & (peak > 0.5 * full_well))[0]]
        truth = _truth(
            src[on],
            x[on],
            y[on],
            flux[on],
            tflux[on],
            fwhm_src[on],
            neff[on] * (sky_e + rn2),
            np.zeros(on.sum(), bool),
            # the true calibration of this snap: electrons collected in t_open -> nJy
            10 ** (-0.4 * (ZERO_POINTS[band] + zp - NJY_ZEROPOINT)) / t_open,
        )
    elif spec.image_type == "FLAT":
        img += np.float32(spec.flat_level)
    img *= sig.response
    img += np.float32(0.002 * spec.dark_time)
    sig.add_hot_columns(img, spec.dark_time)
    for amp in _amps_named(sig, spec.hot_amps, "hot_amps"):
        x0, x1, y0, y1 = amp.bbox
        img[y0:y1, x0:x1] += np.float32(HOT_AMP_E + HOT_AMP_RATE * spec.dark_time)
    camera.add_noise(img, rng)
    if cosmic_rays and spec.dark_time > 1:
        camera.add_cosmic_rays(img, int(rng.poisson(0.6 * spec.dark_time)), rng)
    sat = np.zeros(len(truth), bool)
    for xb, yb, _k in bright:
        amp = next(
            a for a in sig.amps if a.bbox[0] <= round(xb) < a.bbox[1] and a.bbox[2] <= round(yb) < a.bbox[3]
        )
        fw = amp.saturation * float(sig.gain_true[amp.index])
        if camera.bleed_saturation(img, fw, xb, yb, 12):
            sat |= (np.abs(truth["x"] - xb) < 0.01) & (np.abs(truth["y"] - yb) < 0.01)
    truth["saturated"] = sat
    segments = camera.to_segments(img, sig, rng)
    drift = dict(spec.bias_drift)
    _amps_named(sig, drift, "bias_drift")
    for seg in segments:  # in the order of sig.amps
        if seg.amp.name in drift:
            seg.data += np.int32(round(drift[seg.amp.name]))
    return SimulatedRaw(primary_header(spec, det.id), segments, truth)


def _amps_named(sig, names, field: str) -> list:
    """The signature's amplifiers called ``names``.

    Raises
    ------
    ValueError
        Raised if a name is not an amplifier of the CCD.
    """
    by_name = {a.name: a for a in sig.amps}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"{field}: no amplifier {', '.join(unknown)} (amplifiers: {', '.join(by_name)})")
    return [by_name[n] for n in names]


def simulate_ccd(
    spec: ExposureSpec,
    detector: int | str,
    sky: SkyModel | None,
    seed: int,
    out_path: str | Path,
    compress: str | None = "RICE",
) -> SimulatedRaw:
    """Render one CCD and write its raw file atomically; return the rendered raw."""
    raw = render_exposure(spec, detector, sky, seed)
    write_raw((raw.header, raw.segments), out_path, compress=compress)
    return raw
