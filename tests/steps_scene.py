"""Synthetic science/template scene with truth, for the step tests and bench/bench_steps.py.

Not a test module. A CCD of a real camera (amplifier geometry from apbatch.instruments):
stars with a power-law flux distribution (some saturated, with bleed trails), a science PSF
(a Moffat of index ``beta``, 3 by default, or an atmospheric Kolmogorov-like profile, see
tests/scene_render.py; wings drawn out to 0.5 e- per pixel, up to 60 px) broader than the
template PSF, transients injected at known S/N in the science image only, cosmic rays in
each snap, hot/dead columns (one listed in the bias mask as a defect), a flat and a bias
with structure, and a header WCS off by ~1.4 arcsec. The template is a low-noise coadd on
its own grid (rotated 0.3 deg, shifted), optionally split into two patches.

Conditions beyond the defaults (all off by default; the default scene of a seed is
bit-identical to the one before they existed, because every new feature draws its random
numbers from a second generator): PSF variation and ellipticity across the CCD, Sersic
galaxies, extra bright (saturated) stars, sky and transparency changes between snaps, a
dead or a glowing amplifier, a sky gradient, vignetting, transients near the CCD edge.
tests/scene_conditions.py names a grid of them.

The template PSF is of the science PSF's family (same kind and ``beta``: a coadd of
atmospheric PSFs keeps their wings) at width ``tmpl_sigma``, without variation or
ellipticity; ``tmpl_sigma`` defaults to min(1.35, 0.8 ``sci_sigma``) so that the
template stays sharper than the science in good seeing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.raw import RawExposure, RawMetadata, RawSegment
from scene_galaxies import random_galaxies
from scene_render import (
    FULL_WELL,
    FWHM_PER_SIGMA,
    add_stars,
    edge_positions,
    illumination,
    make_template,
    psf_field,
    render_galaxies,
    render_psf,
)
from scene_score import psf_power, run_chain, score, shot_noise_snr

__all__ = ["Scene", "make_scene", "to_raw", "render_psf", "run_chain", "score"]

_add_stars = add_stars  # the name the step tests import


@dataclasses.dataclass
class Scene:
    """A simulated visit of one CCD: raws, calibrations, template patches and the truth."""

    instrument: object
    detector: object
    raws: list
    bias: Image
    flat: Image
    templates: list
    truth: dict
    true_wcs: object


def _amp_box(amps, index):
    if index is None:
        return None
    return tuple(int(v) for v in amps[index].bbox)


def make_scene(
    seed: int = 1,
    instrument: str = "LSSTCam",
    detector: int = 0,
    n_stars: int = 3000,
    n_transients: int = 300,
    n_cr: int = 500,
    snaps: int = 2,
    sky: float = 600.0,
    sci_sigma: float = 1.7,
    tmpl_sigma: float | None = None,
    wcs_error_arcsec=(1.2, -0.8),
    two_patches: bool = True,
    template_depth: float = 9.0,
    psf: str = "moffat",
    beta: float = 3.0,
    psf_variation: float = 0.0,
    ellipticity: float = 0.0,
    n_galaxies: int = 0,
    n_bright_stars: int = 0,
    sky_change_mag: float = 0.0,
    transparency_change_mag: float = 0.0,
    dead_amp: int | None = None,
    hot_amp: int | None = None,
    hot_amp_level: float = 2000.0,
    sky_gradient: float = 0.0,
    vignetting: float = 0.0,
    edge_margin: float = 40.0,
    n_edge_transients: int = 0,
) -> Scene:
    """Simulate one CCD visit (raws of each snap, bias, flat, template patches) with its truth.

    Parameters
    ----------
    seed : `int`
        Random seed; the default scene of a seed never changes.
    instrument, detector : `str`, `int`
        Camera and CCD (geometry and amplifiers from `apbatch.instruments`).
    n_stars, n_transients, n_cr, snaps : `int`
        Stars (dN/dF ~ F^-2 from 400 e- per snap), injected transients (true S/N
        log-uniform 3-50 in the difference), cosmic rays per snap, snaps per visit.
    sky : `float`
        Sky per snap, e- per pixel.
    sci_sigma, tmpl_sigma : `float`
        Gaussian-equivalent PSF widths (FWHM / 2.3548), pixels; ``tmpl_sigma`` defaults to
        min(1.35, 0.8 ``sci_sigma``).
    wcs_error_arcsec, two_patches, template_depth
        Header WCS error, template split in two patches, template depth in visits.
    psf : `str`
        ``"moffat"`` or ``"atmospheric"`` (the science and template PSF family).
    beta : `float`
        Moffat index.
    psf_variation, ellipticity : `float`
        Fractional FWHM change from CCD centre to corner; PSF shear at the corners.
    n_galaxies, n_bright_stars : `int`
        Sersic galaxies (in science and template; not transients); extra stars of 2e5-3e7
        e- per snap (saturated, most with bleed trails).
    sky_change_mag, transparency_change_mag : `float`
        Per snap after the first: sky brighter, sources fainter by this many magnitudes.
    dead_amp, hot_amp : `int`, optional
        Amplifier index reading bias and read noise only; amplifier with ``hot_amp_level``
        extra e- (and its shot noise).
    sky_gradient : `float`
        Fractional sky change from one corner of the CCD to the opposite one.
    vignetting : `float`
        Fractional illumination drop (sky and sources, and the flat) towards the CCD point
        farthest from the optical axis.
    edge_margin : `float`
        Transients are at least this far (pixels) from the CCD edges.
    n_edge_transients : `int`
        Extra transients (same S/N law) between ``edge_margin`` and 25 px from a CCD edge.

    Returns
    -------
    scene : `Scene`
        ``truth`` holds the transients (``x``, ``y``, total ``flux`` in e- summed over snaps,
        true ``snr``, local ``fwhm`` in px), stars, galaxies, defects and the conditions.
    """
    rng = np.random.default_rng(seed)
    side = np.random.default_rng([seed, 10])  # the draws of every non-default condition
    inst = get_instrument(instrument)
    det = inst.detector(detector)
    amps = inst.amplifiers(det.id)
    ny, nx = det.ny, det.nx
    tmpl_sigma = min(1.35, 0.8 * sci_sigma) if tmpl_sigma is None else tmpl_sigma
    ra0, dec0, rot = 150.0, 2.0, 30.0
    wcs = inst.sky_wcs(det, ra0, dec0, rot)
    # stars over a slightly larger area than the CCD
    pad = 60
    sx = rng.uniform(-pad, nx + pad, n_stars)
    sy = rng.uniform(-pad, ny + pad, n_stars)
    flux = 400.0 * (1 - rng.uniform(0, 1, n_stars)) ** -1.0  # dN/dF ~ F^-2, per snap, e-
    flux = np.minimum(flux, 3e7)
    if n_bright_stars:
        sx = np.concatenate([sx, side.uniform(0, nx, n_bright_stars)])
        sy = np.concatenate([sy, side.uniform(0, ny, n_bright_stars)])
        flux = np.concatenate([flux, np.exp(side.uniform(np.log(2e5), np.log(3e7), n_bright_stars))])
    sra, sdec = wcs.pixel_to_world_values(sx, sy)
    field = psf_field(nx, ny, sci_sigma, psf_variation, ellipticity)
    sky_k = 10 ** (0.4 * sky_change_mag * np.arange(snaps))
    trans_k = 10 ** (-0.4 * transparency_change_mag * np.arange(snaps))
    illum = illumination(det, (ny, nx), vignetting)
    gmap = None
    if sky_gradient:
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
        gmap = (1 + sky_gradient * ((xx / (nx - 1) + yy / (ny - 1)) / 2 - 0.5)).astype(np.float32)
        del yy, xx
    # transients: true S/N log-uniform 3-50 in the difference (both snaps)
    rn2 = np.mean([a.read_noise**2 for a in amps])
    tsnr = np.exp(rng.uniform(np.log(3), np.log(50), n_transients))
    tx = rng.uniform(edge_margin, nx - edge_margin, n_transients)
    ty = rng.uniform(edge_margin, ny - edge_margin, n_transients)
    if n_edge_transients:
        ex, ey = edge_positions(side, n_edge_transients, nx, ny, edge_margin, 25.0)
        tsnr = np.concatenate([tsnr, np.exp(side.uniform(np.log(3), np.log(50), n_edge_transients))])
        tx, ty = np.concatenate([tx, ex]), np.concatenate([ty, ey])
    tshape = [field(x, y) if field else (sci_sigma, 0.0, 0.0) for x, y in zip(tx, ty, strict=True)]
    sum_p2 = np.array([psf_power(psf, s, beta, g, t) for s, g, t in tshape])
    ix = np.clip(np.round(tx).astype(int), 0, nx - 1)
    iy = np.clip(np.round(ty).astype(int), 0, ny - 1)
    t_ill = illum[iy, ix].astype(float) if illum is not None else 1.0
    t_sky = sky * gmap[iy, ix].astype(float) if gmap is not None else sky
    # variance of the difference in flat-fielded e-; the template's part is taken at its own
    # scale (not rescaled by a transparency change), so that the transients of a seed are the
    # same whatever the transparency
    var_diff = sum((t_sky * s * t_ill + rn2) / t_ill**2 for s in sky_k) + snaps * sky / template_depth
    tflux_total = tsnr * np.sqrt(var_diff / sum_p2)
    snr_shot = shot_noise_snr(psf, tshape, beta, tflux_total, var_diff, t_ill)
    # galaxies: rendered once per image, through the local PSF
    gal = None
    if n_galaxies:
        gx, gy, gflux, gpar = random_galaxies(side, n_galaxies, nx, ny)

        def sci_psf(x, y, h, scale=1):
            s, g, t = field(x, y) if field else (sci_sigma, 0.0, 0.0)
            return render_psf(psf, s * scale, h, beta=beta, shear=g, theta=t)

        gal = render_galaxies((ny, nx), gx, gy, gflux, gpar, sci_psf)
    else:
        gx = gy = gflux = np.zeros(0)
        gpar = np.zeros((0, 4))
    # flat and bias (electrons)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    flat = (1.0 + 0.03 * np.sin(xx / 700.0) * np.cos(yy / 900.0)).astype(np.float32)
    biasimg = (3.0 * np.sin(yy / 300.0)).astype(np.float32)
    del yy, xx
    defect_col, hot_cols, dead_cols = 1500, [(700, 0, ny), (2900, 2600, 4000)], [(3333, 0, 2000)]
    bias_mask = np.zeros((ny, nx), np.int32)
    bias_mask[:, defect_col] = MaskBits.BAD
    dead_box, hot_box = _amp_box(amps, dead_amp), _amp_box(amps, hot_amp)
    psf0 = render_psf(psf, sci_sigma, beta=beta)
    saturated = flux * psf0.max() > FULL_WELL
    raws = []
    for k in range(snaps):
        if gmap is None:
            img = np.full((ny, nx), sky * sky_k[k], np.float32)
        else:
            img = gmap * np.float32(sky * sky_k[k])
        add_stars(img, sx, sy, flux * trans_k[k], psf, sci_sigma, beta=beta, shape=field)
        tflux_k = tflux_total * trans_k[k] / trans_k.sum()
        add_stars(img, tx, ty, tflux_k, psf, sci_sigma, beta=beta, shape=field)
        if gal is not None:
            img += gal * np.float32(trans_k[k])
        if illum is not None:
            img *= illum
        img *= flat
        img = img + rng.standard_normal((ny, nx), dtype=np.float32) * np.sqrt(np.maximum(img, 0))
        # bleed trails of saturated stars along columns
        for x, y, f in zip(sx, sy, flux * trans_k[k], strict=False):
            if f * psf0.max() > FULL_WELL and 0 <= x < nx and 0 <= y < ny:
                half = int(min(f / FULL_WELL / 6, 400))
                xi, yi = int(round(x)), int(round(y))
                img[max(yi - half, 0) : yi + half + 1, max(xi - 1, 0) : xi + 2] = FULL_WELL * 1.2
        for x0, y0, y1 in hot_cols:
            img[y0:y1, x0] += 300.0
        img[:, defect_col] += 250.0
        for x0, y0, y1 in dead_cols:
            img[y0:y1, x0] *= 0.2
        # cosmic rays: short tracks
        for _ in range(n_cr):
            cx, cy = rng.uniform(0, nx - 8), rng.uniform(0, ny - 8)
            length = rng.integers(1, 7)
            ang = rng.uniform(0, np.pi)
            amp = rng.uniform(300, 5000)
            for t in range(length):
                img[int(cy + t * np.sin(ang)), int(cx + t * np.cos(ang))] += amp
        if hot_box is not None:
            x0, x1, y0, y1 = hot_box
            glow = side.standard_normal((y1 - y0, x1 - x0), dtype=np.float32) * np.sqrt(hot_amp_level)
            img[y0:y1, x0:x1] += hot_amp_level + glow
        img += biasimg
        if dead_box is not None:
            x0, x1, y0, y1 = dead_box
            img[y0:y1, x0:x1] = biasimg[y0:y1, x0:x1]
        meta_ra = ra0 + wcs_error_arcsec[0] / 3600.0 / np.cos(np.radians(dec0))
        meta_dec = dec0 + wcs_error_arcsec[1] / 3600.0
        raws.append(to_raw(img, inst, det, rng, k, snaps, meta_ra, meta_dec, rot))
        del img
    gra, gdec = wcs.pixel_to_world_values(gx, gy)
    templates = make_template(
        rng, wcs, nx, ny, (sra, sdec, flux), (gra, gdec, gflux, gpar), snaps, sky, template_depth,
        psf, beta, tmpl_sigma, two_patches,
    )
    truth = {
        "x": tx,
        "y": ty,
        "flux": tflux_total,
        "snr": tsnr,
        "snr_shot": snr_shot,
        "fwhm": np.array([FWHM_PER_SIGMA * s for s, _, _ in tshape]),
        "star_x": sx,
        "star_y": sy,
        "star_flux": flux,
        "star_saturated": saturated,
        "galaxy_x": gx,
        "galaxy_y": gy,
        "galaxy_flux": gflux,
        "galaxy_params": gpar,
        "hot_cols": hot_cols,
        "dead_cols": dead_cols,
        "defect_col": defect_col,
        "dead_amp_box": dead_box,
        "hot_amp_box": hot_box,
        "psf": psf,
        "beta": beta,
        "sci_sigma": sci_sigma,
        "tmpl_sigma": tmpl_sigma,
        "tmpl_fwhm": FWHM_PER_SIGMA * tmpl_sigma,
        "psf_fwhm_center": FWHM_PER_SIGMA * sci_sigma,
        "sky_per_snap": sky * sky_k,
        "transparency_per_snap": trans_k,
        "edge_margin": edge_margin,
    }
    flat_img = flat * illum if illum is not None else flat
    return Scene(inst, det, raws, Image(biasimg, None, bias_mask), Image(flat_img), templates, truth, wcs)


def to_raw(
    img_e: np.ndarray,
    inst,
    det,
    rng,
    snap: int,
    nsnaps: int,
    ra: float,
    dec: float,
    rot: float,
    overscan_level: float = 15000.0,
    noise: bool = True,
) -> RawExposure:
    """Electrons on the assembled CCD -> RawExposure (ADU segments with overscan, read noise, saturation)."""
    segs = []
    for a in inst.amplifiers(det.id):
        bx0, bx1, by0, by1 = a.bbox
        sec = img_e[by0:by1, bx0:bx1]
        if a.flip_y:
            sec = sec[::-1]
        if a.flip_x:
            sec = sec[:, ::-1]
        raw = np.zeros((a.raw_ny, a.raw_nx), np.float32)
        drift = overscan_level + 5.0 * np.sin(np.arange(a.raw_ny) / 150.0)[:, None]
        raw += drift
        if noise:
            raw += rng.standard_normal(raw.shape, dtype=np.float32) * (a.read_noise / a.gain)
        x0, x1, y0, y1 = a.data
        raw[y0:y1, x0:x1] += sec / a.gain
        raw = np.minimum(raw, a.saturation + 10)
        segs.append(RawSegment(a, np.round(raw).astype(np.int32), {"EXTNAME": a.extname}))
    md = RawMetadata(
        instrument=inst.name,
        detector=det.id,
        detector_name=det.name,
        obs_id=f"MC_O_20260101_00001{snap}",
        exposure_id=2026010100001 + snap,
        group_id="2026-01-01T00:00:00",
        visit_id=2026010100001,
        day_obs=20260101,
        seq_num=1 + snap,
        observation_type="science",
        physical_filter="r_57",
        band="r",
        exposure_time=15.0,
        dark_time=15.0,
        requested_exposure_time=15.0,
        mjd_begin=61041.0 + snap * 17 / 86400,
        mjd_end=61041.0 + (snap * 17 + 15) / 86400,
        ra=ra,
        dec=dec,
        rotation=rot,
        airmass=1.2,
        image_index=snap + 1,
        images_in_sequence=nsnaps,
        science_program="test",
        reason="test",
        can_see_sky=True,
    )
    return RawExposure({"NJY_PER_E": 0.5}, md, segs)
