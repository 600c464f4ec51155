"""Run the image steps on a simulated scene (tests/steps_scene.py) and score them against its truth.

Not a test module. :func:`run_chain` runs every step in pipeline order; :func:`score`
matches DIA sources to the injected transients and returns completeness, false
detections, photometric and S/N ratios as a flat dict; :func:`psf_power` and
:func:`shot_noise_snr` are the optimal-S/N yardsticks the scene injects transients with.
"""

from __future__ import annotations

import numpy as np
from apbatch.image import Image, MaskBits
from scene_render import render_psf, stamp_half

__all__ = [
    "EDGE_DISTANCE",
    "NJY_PER_E",
    "near_objects",
    "noise_floor",
    "psf_power",
    "run_chain",
    "score",
    "shot_noise_snr",
    "unflagged",
    "white_noise",
]

NJY_PER_E = 0.5  # the scene's raw header calibration (tests/steps_scene.py to_raw)
EDGE_DISTANCE = 25.0  # px from the CCD border: "near the edge" in the edge completeness
_BINS = ((5, 10), (10, np.inf))
_FLAGS = ["pixelFlags_bad", "pixelFlags_saturated", "pixelFlags_cr", "pixelFlags_edge"]


def psf_power(kind: str, sigma: float, beta: float = 3.0, shear: float = 0.0, theta: float = 0.0) -> float:
    """Sum of the squared PSF on the smallest stamp a source gets (optimal S/N = flux sqrt(this / var))."""
    h = stamp_half(kind, 0.0, sigma, beta)
    return float((render_psf(kind, sigma, h, beta=beta, shear=shear, theta=theta) ** 2).sum())


def shot_noise_snr(kind, shapes, beta, flux, var, illum=1.0) -> np.ndarray:
    """Optimal S/N of point sources counting their own shot noise: sqrt(sum (F p)^2 / (var + F p / illum)).

    ``shapes`` is a list of ``(sigma, shear, theta)``; ``var`` the background variance per
    pixel and ``illum`` the relative illumination (scalars or one per source).
    """
    n = len(shapes)
    var, illum = np.broadcast_to(var, n), np.broadcast_to(illum, n)
    out = np.empty(n)
    for k, (s, g, t) in enumerate(shapes):
        fp = flux[k] * render_psf(kind, s, stamp_half(kind, 0.0, s, beta), beta=beta, shear=g, theta=t)
        out[k] = np.sqrt((fp**2 / (var[k] + fp / illum[k])).sum())
    return out


def _completeness(out: dict, name: str, found: np.ndarray, snr: np.ndarray, sel: np.ndarray) -> None:
    for lo, hi in _BINS:
        s = sel & (snr >= lo) & (snr < hi)
        out[f"completeness_{name}_{lo}_{hi}"] = float(found[s].mean()) if s.any() else float("nan")
        out[f"n_{name}_{lo}_{hi}"] = int(s.sum())


def unflagged(table) -> np.ndarray:
    """Rows of a DIA table without bad, saturated, cosmic-ray, edge or suspect flags (boolean array)."""
    if not len(table):
        return np.zeros(0, bool)
    flagged = table[_FLAGS].any(axis=1).to_numpy(bool)
    if "pixelFlags_suspect" in table:
        flagged = flagged | table["pixelFlags_suspect"].to_numpy(bool)
    return ~flagged


STAR_RADII = ((3e3, 2.0), (3e4, 6.0), (3e5, 15.0), (3e6, 40.0))
"""Stars at least this bright (e-) reach this many FWHM in :func:`near_objects`."""


def near_objects(truth: dict, x, y, fwhm: float) -> np.ndarray:
    """Which positions lie near something the scene put there (boolean per position).

    Within 3 FWHM of a transient, 4 FWHM of a galaxy, or of a star a radius growing with its
    flux (:data:`STAR_RADII`: 2 FWHM from 3e3 e- to 40 FWHM from 3e6 e-). A false detection
    elsewhere is a noise peak; near an object it may be the object's residual.
    """
    from scipy.spatial import cKDTree

    xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    near = np.zeros(len(xy), bool)
    if not len(xy):
        return near
    def get(key):
        return np.asarray(truth.get(key, ()), float)

    groups = [(get("x"), get("y"), 3.0), (get("galaxy_x"), get("galaxy_y"), 4.0)]
    flux = get("star_flux")
    bounds = [f for f, _ in STAR_RADII] + [np.inf]
    for (lo, k), hi in zip(STAR_RADII, bounds[1:], strict=True):
        sel = (flux >= lo) & (flux < hi)
        groups.append((get("star_x")[sel], get("star_y")[sel], k))
    for gx, gy, k in groups:
        if len(gx):
            d, _ = cKDTree(np.column_stack([gx, gy])).query(xy)
            near |= d <= k * fwhm
    return near


def white_noise(diff: Image, seed: int = 0) -> Image:
    """A perfect subtraction of ``diff``: Gaussian noise drawn from its variance plane.

    The variance plane then gets each pixel's own noise added, as ISR's Poisson variance holds
    it (and as :func:`apbatch.job.steps.dia_detect.filtered_snr`'s ``self_term`` expects); the
    mask keeps the data-quality bits (bad, saturated, interpolated, cosmic-ray, edge and
    no-data; not the bits DIA detection sets).
    """
    rng = np.random.default_rng(1_000_003 + seed)
    quality = MaskBits.BAD | MaskBits.SAT | MaskBits.INTRP | MaskBits.CR | MaskBits.EDGE | MaskBits.NO_DATA
    sd = np.sqrt(np.maximum(diff.variance, 0.0, dtype=np.float32))
    pixels = rng.standard_normal(diff.shape, dtype=np.float32) * sd
    var = np.add(diff.variance, pixels, dtype=np.float32)
    return Image(pixels, var, (diff.mask & int(quality)).astype(diff.mask.dtype), diff.wcs)


def noise_floor(result: dict, seed: int = 0, truth: dict | None = None) -> dict:
    """False detections of a perfect subtraction: white noise through the same DIA detection.

    :func:`white_noise` of the run's difference, measured by ``measure_dia_sources`` with the
    run's PSF and science image (so the same saturated-star halos are flagged). What is
    detected is noise alone: the floor under ``false_unflagged`` at the same threshold.

    Returns
    -------
    scores : `dict`
        ``noise_unflagged`` (detections without bad/saturated/cr/edge/suspect flags),
        ``noise_pos`` and ``noise_neg`` (unflagged positive and negative ones); with the
        scene's ``truth``, ``noise_isolated``: those not :func:`near_objects` (the floor under
        ``false_isolated``).
    """
    from apbatch.job.steps import measure_dia_sources

    dia = measure_dia_sources(white_noise(result["diff"], seed), result["psf"], result["calexp"])
    clean = dia[unflagged(dia)] if len(dia) else dia
    neg = int((clean["psfFlux"] < 0).sum()) if len(clean) else 0
    out = {"noise_unflagged": int(len(clean)), "noise_pos": int(len(clean)) - neg, "noise_neg": neg}
    if truth is not None:
        near = near_objects(truth, clean["x"], clean["y"], float(result["psf"].fwhm)) if len(clean) else []
        out["noise_isolated"] = int(len(clean) - np.sum(near))
    return out


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def run_chain(scene, timer=None) -> dict:
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
    from apbatch.job.steps.apcorr import apply_aperture_correction, measure_aperture_correction
    from apbatch.job.steps.subtract import template_pad
    from apbatch.job.steps.template_psf import template_psf_sigma
    from apbatch.job.steps.warp import crop_to_science

    t = timer or (lambda name: contextlib.nullcontext())
    out: dict = {}
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
        # padded by the kernel half-size: the difference is valid up to the CCD edge
        warped = warp_template(scene.templates, wcs, calexp.shape, pad=template_pad(psf))
    with t("subtract"):
        # measured on the warped template, as the job does (the scene's coadds carry no PSF description)
        tmpl_sigma = template_psf_sigma(scene.templates, warped, sources, scene.instrument.pixel_scale_arcsec)
        diff, sres = subtract_images(calexp, warped, psf, tmpl_sigma, sources)
    warped = crop_to_science(warped)
    with t("measure"):
        dia = measure_dia_sources(diff, psf, calexp)
        apcorr = measure_aperture_correction(calexp, psf, sources)
        dia = apply_aperture_correction(dia, apcorr)
    out.update(
        calexp=calexp,
        sources=sources,
        psf=psf,
        astro=astro,
        warped=warped,
        diff=diff,
        sres=sres,
        dia=dia,
        apcorr=apcorr,
    )
    return out


def score(scene, result: dict, match_radius: float | None = None) -> dict:
    """Truth scores of a :func:`steps_scene.run_chain` result.

    Parameters
    ----------
    scene : `steps_scene.Scene`
        The simulated visit (its ``truth`` dict).
    result : `dict`
        ``run_chain`` output (``dia``, ``diff``, ``psf``).
    match_radius : `float`, optional
        Largest distance (px) of a DIA source from a transient that finds it; default
        ``max(2.5, 0.5 FWHM)`` of the measured PSF: a centroid's error grows with the PSF
        (``~sqrt(2) sigma / snr`` per axis: 1.1 px at S/N 6 in 2" seeing, where a fixed 2.5 px
        counted 7% of the S/N 5-10 transients found as missed). A DIA source farther than
        ``match_radius + 0.5`` px from every transient is a false detection.

    Returns
    -------
    scores : `dict`
        - ``completeness_{measured,true}_{5_10,10_inf}`` (and ``n_...``): fraction found per
          bin of *measured* S/N (forced PSF photometry on the difference at the true position,
          with the detection's noise rescaling) and of true (injected) S/N;
        - ``completeness_valid_*``: by true S/N, over transients whose pixel in the
          difference has neither ``EDGE`` nor ``NO_DATA``; ``completeness_edge_*``: the same,
          for those within :data:`EDGE_DISTANCE` px of the CCD border;
          ``completeness_alertable_*``: the same as ``valid``, counting only transients found
          by a DIA source the alert policy keeps (no saturated or suspect flag, e.g. not in a
          saturated star's halo); ``valid_fraction``: fraction of CCD pixels valid in the
          difference; ``halo_fraction``: fraction of the valid ones in saturated stars' halos;
        - ``false``: DIA sources farther than ``match_radius + 0.5`` px from every transient;
          ``false_clean``: those without bad/saturated/cr/edge flags and with reliability >= 0.5;
          ``false_unflagged``: those without bad/saturated/cr/edge/suspect flags;
          ``false_isolated``: of those, the ones not :func:`near_objects` (noise peaks);
          ``false_list``: ``[x, y, snr, reliability, near]`` of each unflagged one;
          ``false_pos``/``false_neg`` (and ``pos_neg``, the pair): positive and negative ones;
        - ``flux_ratio``: median DIA ``psfFlux`` / true flux (nJy) of found transients with
          true S/N >= 20; ``snr_ratio``: median ``|snr|`` / true S/N of found transients with
          true S/N >= 10 (the true S/N is the background-limited optimum: the transient's own
          shot noise lowers the reachable S/N by a few % at S/N 20-50); ``snr_ratio_shot``: the
          same against the optimum with the shot noise (truth ``snr_shot``);
        - ``true_reliability_ge_0.5``: fraction of real detections with reliability >= 0.5.
    """
    from apbatch.job.steps import psf_flux
    from scipy.spatial import cKDTree

    dia, tr = result["dia"], scene.truth
    diff = result["diff"]
    txy = np.column_stack([tr["x"], tr["y"]])
    if len(dia):
        d, idx = cKDTree(dia[["x", "y"]].to_numpy()).query(txy)
        d2, _ = cKDTree(txy).query(dia[["x", "y"]].to_numpy())
    else:
        d, idx, d2 = np.full(len(txy), np.inf), np.zeros(len(txy), int), np.zeros(0)
    if match_radius is None:
        match_radius = max(2.5, 0.5 * float(result["psf"].fwhm))
    found = d <= match_radius
    f, e = psf_flux(diff, result["psf"], tr["x"], tr["y"], dia.attrs.get("noise_scale", 1.0))
    msnr = f / e
    usable = np.isfinite(msnr)
    out: dict = {"n_injected": len(txy), "n_dia": len(dia)}
    for name, s in (("measured", msnr), ("true", tr["snr"])):
        _completeness(out, name, found, s, usable)
    # validity of each transient's pixel in the difference, and distance to the CCD border
    ny, nx = diff.shape
    ix = np.clip(np.round(tr["x"]).astype(int), 0, nx - 1)
    iy = np.clip(np.round(tr["y"]).astype(int), 0, ny - 1)
    invalid_bits = int(MaskBits.EDGE | MaskBits.NO_DATA)
    valid_map = (diff.mask & invalid_bits) == 0
    valid = valid_map[iy, ix]
    border = np.minimum.reduce([tr["x"], tr["y"], nx - 1 - tr["x"], ny - 1 - tr["y"]])
    _completeness(out, "valid", found, tr["snr"], valid)
    _completeness(out, "edge", found, tr["snr"], valid & (border <= EDGE_DISTANCE))
    # found by a DIA source the alert policy keeps (no saturated/suspect flag): what brokers see
    if len(dia):
        from apbatch.job.alert_policy import rejected_mask

        _completeness(out, "alertable", found & ~rejected_mask(dia)[idx], tr["snr"], valid)
    else:
        _completeness(out, "alertable", found, tr["snr"], valid)
    out["valid_fraction"] = float(valid_map.mean())
    out["halo_fraction"] = float(((diff.mask & int(MaskBits.SUSPECT)) != 0)[valid_map].mean())
    false = dia[d2 > match_radius + 0.5] if len(dia) else dia
    out["false"] = int(len(false))
    if len(false):
        flagged = false[_FLAGS].any(axis=1)
        out["false_clean"] = int(((~flagged) & (false["reliability"] >= 0.5)).sum())
        clean = false[unflagged(false)]
        out["false_unflagged"] = int(len(clean))
        near = near_objects(tr, clean["x"], clean["y"], float(result["psf"].fwhm))
        out["false_isolated"] = int((~near).sum())
        cols = zip(clean["x"], clean["y"], clean["snr"], clean["reliability"], near, strict=True)
        out["false_list"] = [[round(float(x), 1), round(float(y), 1), round(float(snr), 2),
                              round(float(rel), 2), bool(n)] for x, y, snr, rel, n in cols]
        neg = false["psfFlux"] < 0
        out["false_pos"], out["false_neg"] = int((~neg).sum()), int(neg.sum())
    else:
        out["false_clean"] = out["false_unflagged"] = out["false_pos"] = out["false_neg"] = 0
        out["false_isolated"], out["false_list"] = 0, []
    out["pos_neg"] = (out["false_pos"], out["false_neg"])
    real = dia[d2 <= match_radius + 0.5] if len(dia) else dia
    out["true_reliability_ge_0.5"] = float((real["reliability"] >= 0.5).mean()) if len(real) else float("nan")
    # photometry of the found transients
    if len(dia) and found.any():
        m = dia.iloc[idx[found]]
        njy_per_e = scene.raws[0].header.get("NJY_PER_E", NJY_PER_E) if scene.raws else NJY_PER_E
        true_njy = tr["flux"][found] * njy_per_e
        snr_true = tr["snr"][found]
        ratio = m["psfFlux"].to_numpy() / true_njy
        sratio = np.abs(m["snr"].to_numpy()) / snr_true
        out["flux_ratio"] = _median(ratio[snr_true >= 20])
        out["snr_ratio"] = _median(sratio[snr_true >= 10])
        if "snr_shot" in tr:
            shot = np.abs(m["snr"].to_numpy()) / tr["snr_shot"][found]
            out["snr_ratio_shot"] = _median(shot[snr_true >= 10])
    else:
        out["flux_ratio"] = out["snr_ratio"] = out["snr_ratio_shot"] = float("nan")
    return out
