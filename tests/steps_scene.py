"""Synthetic science/template scene with truth, for the step tests and bench/bench_steps.py.

Not a test module. A CCD of a real camera (amplifier geometry from apbatch.instruments):
stars with a power-law flux distribution (some saturated, with bleed trails), a Moffat (beta 3,
wings drawn out to 0.5 e- per pixel, up to 60 px)
science PSF broader than the Gaussian-core template PSF, transients injected at known
S/N in the science image only, cosmic rays in each snap, hot/dead columns (one listed in
the bias mask as a defect), a flat and a bias with structure, and a header WCS off by
~1.4 arcsec. The template is a low-noise coadd on its own grid (rotated 0.3 deg, shifted),
optionally split into two patches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.raw import RawExposure, RawMetadata, RawSegment

__all__ = ["Scene", "make_scene", "to_raw", "render_psf"]


@dataclasses.dataclass
class Scene:
    instrument: object
    detector: object
    raws: list
    bias: Image
    flat: Image
    templates: list
    truth: dict
    true_wcs: object


def render_psf(kind: str, sigma: float, h: int = 12, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    r2 = (x - dx) ** 2 + (y - dy) ** 2
    if kind == "moffat":  # Moffat beta=3 with a core width matched to sigma
        alpha = sigma * 2.3548 / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
        p = (1 + r2 / alpha**2) ** -3.0
    else:
        p = np.exp(-r2 / (2 * sigma**2))
    return p / p.sum()


def _wing_half(flux: float, sigma: float) -> int:
    """Half-size at which a Moffat (beta=3) star of ``flux`` e- drops below 0.5 e- per pixel (12-60 px)."""
    alpha = sigma * 2.3548 / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
    peak = flux * 2.0 / (np.pi * alpha**2)
    r = alpha * np.sqrt(max((peak / 0.5) ** (1 / 3.0) - 1.0, 0.0))
    return int(min(max(np.ceil(r), 12), 60))


def _add_stars(img, xs, ys, fluxes, kind, sigma, h=None):
    """Add stars; ``h`` is the stamp half-size (default: 12 for Gaussians, to the wings' end for Moffats)."""
    ny, nx = img.shape
    fixed = h
    for x, y, f in zip(xs, ys, fluxes, strict=False):
        h = fixed if fixed is not None else (_wing_half(f, sigma) if kind == "moffat" else 12)
        xi, yi = int(round(x)), int(round(y))
        if xi < -h or yi < -h or xi >= nx + h or yi >= ny + h:
            continue
        st = f * render_psf(kind, sigma, h, x - xi, y - yi)
        y0, y1, x0, x1 = yi - h, yi + h + 1, xi - h, xi + h + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = st.shape[0] - max(0, y1 - ny), st.shape[1] - max(0, x1 - nx)
        img[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += st[sy0:sy1, sx0:sx1]


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
    tmpl_sigma: float = 1.35,
    wcs_error_arcsec=(1.2, -0.8),
    two_patches: bool = True,
    template_depth: float = 9.0,
) -> Scene:
    rng = np.random.default_rng(seed)
    inst = get_instrument(instrument)
    det = inst.detector(detector)
    amps = inst.amplifiers(det.id)
    ny, nx = det.ny, det.nx
    ra0, dec0, rot = 150.0, 2.0, 30.0
    wcs = inst.sky_wcs(det, ra0, dec0, rot)
    # stars over a slightly larger area than the CCD
    pad = 60
    sx = rng.uniform(-pad, nx + pad, n_stars)
    sy = rng.uniform(-pad, ny + pad, n_stars)
    flux = 400.0 * (1 - rng.uniform(0, 1, n_stars)) ** -1.0  # dN/dF ~ F^-2, per snap, e-
    flux = np.minimum(flux, 3e7)
    sra, sdec = wcs.pixel_to_world_values(sx, sy)
    # transients: true S/N log-uniform 3-50 in the difference (both snaps)
    psf = render_psf("moffat", sci_sigma)
    sum_p2 = (psf**2).sum()
    rn2 = np.mean([a.read_noise**2 for a in amps])
    var_diff = snaps * (sky + rn2) + snaps * sky / template_depth
    tsnr = np.exp(rng.uniform(np.log(3), np.log(50), n_transients))
    tflux_total = tsnr * np.sqrt(var_diff / sum_p2)
    tx = rng.uniform(40, nx - 40, n_transients)
    ty = rng.uniform(40, ny - 40, n_transients)
    # flat and bias (electrons)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    flat = (1.0 + 0.03 * np.sin(xx / 700.0) * np.cos(yy / 900.0)).astype(np.float32)
    biasimg = (3.0 * np.sin(yy / 300.0)).astype(np.float32)
    del yy, xx
    defect_col, hot_cols, dead_cols = 1500, [(700, 0, ny), (2900, 2600, 4000)], [(3333, 0, 2000)]
    bias_mask = np.zeros((ny, nx), np.int32)
    bias_mask[:, defect_col] = MaskBits.BAD
    raws = []
    for k in range(snaps):
        img = np.full((ny, nx), sky, np.float32)
        _add_stars(img, sx, sy, flux, "moffat", sci_sigma)
        _add_stars(img, tx, ty, tflux_total / snaps, "moffat", sci_sigma)
        img *= flat
        img = img + rng.standard_normal((ny, nx), dtype=np.float32) * np.sqrt(np.maximum(img, 0))
        # bleed trails of saturated stars along columns
        full_well = 180000.0
        for x, y, f in zip(sx, sy, flux, strict=False):
            if f * psf.max() > full_well and 0 <= x < nx and 0 <= y < ny:
                half = int(min(f / full_well / 6, 400))
                xi, yi = int(round(x)), int(round(y))
                img[max(yi - half, 0) : yi + half + 1, max(xi - 1, 0) : xi + 2] = full_well * 1.2
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
        img += biasimg
        meta_ra = ra0 + wcs_error_arcsec[0] / 3600.0 / np.cos(np.radians(dec0))
        meta_dec = dec0 + wcs_error_arcsec[1] / 3600.0
        raws.append(to_raw(img, inst, det, rng, k, snaps, meta_ra, meta_dec, rot))
        del img
    # template: its own grid (rotated and shifted), low noise, sharper PSF
    from astropy.wcs import WCS

    tny, tnx = ny + 120, nx + 120
    cra, cdec = wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    th = np.radians(0.3)
    rmat = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    twcs = WCS(naxis=2)
    twcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    twcs.wcs.crval = [float(cra), float(cdec)]
    twcs.wcs.crpix = [(tnx - 1) / 2.0 + 1 + 37.3, (tny - 1) / 2.0 + 1 - 21.6]
    twcs.wcs.cd = wcs.pixel_scale_matrix @ rmat
    twcs.wcs.set()
    tpx, tpy = twcs.world_to_pixel_values(sra, sdec)
    timg = np.zeros((tny, tnx), np.float32)
    _add_stars(timg, tpx, tpy, flux * snaps, "moffat", tmpl_sigma)
    tvar = (snaps * sky / template_depth + timg / template_depth).astype(np.float32)
    timg += rng.standard_normal((tny, tnx), dtype=np.float32) * np.sqrt(tvar) + 5.0
    tmask = np.zeros((tny, tnx), np.int32)
    tmask[timg > 0.9 * 180000 * snaps] = MaskBits.SAT
    if two_patches:
        cut = tnx // 2
        w1 = twcs.deepcopy()
        w2 = twcs.deepcopy()
        w2.wcs.crpix = twcs.wcs.crpix - np.array([cut - 50, 0])
        w2.wcs.set()
        templates = [
            Image(timg[:, : cut + 50], tvar[:, : cut + 50], tmask[:, : cut + 50], w1),
            Image(timg[:, cut - 50 :], tvar[:, cut - 50 :], tmask[:, cut - 50 :], w2),
        ]
    else:
        templates = [Image(timg, tvar, tmask, twcs)]
    truth = {
        "x": tx,
        "y": ty,
        "flux": tflux_total,
        "snr": tsnr,
        "star_x": sx,
        "star_y": sy,
        "star_flux": flux,
        "hot_cols": hot_cols,
        "dead_cols": dead_cols,
        "defect_col": defect_col,
    }
    return Scene(inst, det, raws, Image(biasimg, None, bias_mask), Image(flat), templates, truth, wcs)


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


def run_chain(scene: Scene, timer=None) -> dict:
    """Run every step on a scene, in pipeline order; ``timer(name)`` is a context manager or None."""
    import contextlib

    from apbatch.job.steps import (
        detect_sources,
        fit_wcs,
        measure_dia_sources,
        measure_psf,
        run_isr,
        subtract_background,
        subtract_images,
        warp_template,
    )

    t = timer or (lambda name: contextlib.nullcontext())
    out = {}
    with t("isr"):
        calexp = run_isr(scene.raws, scene.instrument, scene.detector, scene.bias, scene.flat)
    with t("background"):
        subtract_background(calexp)
    with t("detection"):
        sources = detect_sources(calexp, threshold=10.0)
    with t("psf"):
        psf = measure_psf(calexp, sources)
    with t("astrometry"):
        refs = []
        for tp in scene.templates:
            tb = Image(tp.image.copy(), tp.variance, tp.mask, tp.wcs)
            subtract_background(tb)
            ts = detect_sources(tb, threshold=20.0, psf_sigma=1.3).head(800)
            refs.append(np.column_stack(tp.wcs.pixel_to_world_values(ts["x"], ts["y"])))
        wcs, astro = fit_wcs(calexp.wcs, sources[["x", "y"]].to_numpy(), np.concatenate(refs))
        calexp.wcs = wcs
    with t("warp"):
        warped = warp_template(scene.templates, wcs, calexp.shape)
    with t("subtract"):
        # the template PSF (a property of the coadd) is known to the scene, not measured here
        diff, sres = subtract_images(calexp, warped, psf.sigma, 1.35, sources)
    with t("measure"):
        dia = measure_dia_sources(diff, psf, calexp)
    out.update(
        calexp=calexp, sources=sources, psf=psf, astro=astro, warped=warped, diff=diff, sres=sres, dia=dia
    )
    return out


def score(scene: Scene, result: dict, match_radius: float = 2.5) -> dict:
    """Truth scores of a :func:`run_chain` result.

    Completeness is given per bin of *measured* S/N (forced PSF photometry on the
    difference image at the true position, with the detection's noise rescaling) and per
    bin of true (injected) S/N. False detections: DIA sources farther than 3 px from every
    injected transient; ``false_clean`` counts those without bad/saturated/cr/edge flags and
    with reliability >= 0.5.
    """
    from apbatch.job.steps import psf_flux
    from scipy.spatial import cKDTree

    dia, tr = result["dia"], scene.truth
    txy = np.column_stack([tr["x"], tr["y"]])
    if len(dia):
        d, _ = cKDTree(dia[["x", "y"]].to_numpy()).query(txy)
        d2, _ = cKDTree(txy).query(dia[["x", "y"]].to_numpy())
    else:
        d, d2 = np.full(len(txy), np.inf), np.zeros(0)
    found = d <= match_radius
    f, e = psf_flux(result["diff"], result["psf"], tr["x"], tr["y"], dia.attrs.get("noise_scale", 1.0))
    msnr = f / e
    usable = np.isfinite(msnr)
    out = {"n_injected": len(txy), "n_dia": len(dia)}
    for name, s in (("measured", msnr), ("true", tr["snr"])):
        for lo, hi in ((5, 10), (10, np.inf)):
            sel = usable & (s >= lo) & (s < hi)
            out[f"completeness_{name}_{lo}_{hi}"] = float(found[sel].mean()) if sel.any() else float("nan")
            out[f"n_{name}_{lo}_{hi}"] = int(sel.sum())
    false = dia[d2 > 3.0] if len(dia) else dia
    out["false"] = int(len(false))
    if len(false):
        flagged = false[["pixelFlags_bad", "pixelFlags_saturated", "pixelFlags_cr", "pixelFlags_edge"]].any(
            axis=1
        )
        out["false_clean"] = int(((~flagged) & (false["reliability"] >= 0.5)).sum())
    else:
        out["false_clean"] = 0
    real = dia[d2 <= 3.0] if len(dia) else dia
    out["true_reliability_ge_0.5"] = float((real["reliability"] >= 0.5).mean()) if len(real) else float("nan")
    return out
