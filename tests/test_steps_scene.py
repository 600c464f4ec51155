"""Tests of the simulated CCD scene itself (tests/steps_scene.py, scene_render.py, scene_score.py).

Cheap: profiles on stamps, and three reduced full-CCD scenes (few stars, no cosmic rays; two
shared by the module), measured on their raws.
"""

import inspect

import numpy as np
import pandas as pd
import pytest
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps import gaussian_psf
from scene_conditions import CONDITIONS, seeing_sigma
from scene_render import (
    FWHM_PER_SIGMA,
    edge_positions,
    illumination,
    psf_field,
    radial_profile,
    render_psf,
    stamp_half,
)
from scene_score import score
from steps_scene import make_scene

KW = {
    "seed": 5,
    "n_stars": 600,
    "n_cr": 0,
    "n_galaxies": 20,
    "n_edge_transients": 40,
    "n_bright_stars": 5,
    "edge_margin": 3.0,
}
SKY_DM, TRANS_DM = 0.3, 0.3


@pytest.fixture(scope="module")
def changed():
    """Sky and transparency change between snaps, a dead and a glowing amplifier."""
    return make_scene(**KW, sky_change_mag=SKY_DM, transparency_change_mag=TRANS_DM, dead_amp=2, hot_amp=12)


@pytest.fixture(scope="module")
def steady():
    """The same sky change, but no transparency change."""
    return make_scene(**KW, sky_change_mag=SKY_DM)


def _frac_beyond(stamp, radius):
    h = stamp.shape[0] // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    return float(stamp[np.hypot(x, y) > radius].sum())


def _moments(stamp):
    h = stamp.shape[0] // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    ixx, iyy, ixy = (stamp * x * x).sum(), (stamp * y * y).sum(), (stamp * x * y).sum()
    return np.hypot(ixx - iyy, 2 * ixy) / (ixx + iyy), 0.5 * np.arctan2(2 * ixy, ixx - iyy)


@pytest.mark.parametrize("kind", ["gauss", "moffat", "atmospheric"])
@pytest.mark.parametrize("shear", [0.0, 0.1])
def test_render_psf_normalised_and_centred(kind, shear):
    st = render_psf(kind, 1.7, 30, dx=0.3, dy=-0.2, shear=shear, theta=0.7)
    assert st.sum() == pytest.approx(1.0)
    y, x = np.mgrid[-30:31, -30:31]
    assert (st * x).sum() == pytest.approx(0.3, abs=0.02)
    assert (st * y).sum() == pytest.approx(-0.2, abs=0.02)


@pytest.mark.parametrize("sigma", [1.06, 1.7, 4.25])
def test_atmospheric_profile_fwhm_and_wings(sigma):
    fwhm = FWHM_PER_SIGMA * sigma
    p0, phalf = radial_profile("atmospheric", np.array([0.0, fwhm / 2]), sigma)
    assert phalf / p0 == pytest.approx(0.5, rel=1e-4)
    r = np.linspace(0, 200 * sigma, 200001)
    total = np.trapezoid(2 * np.pi * r * radial_profile("atmospheric", r, sigma), r)
    assert total == pytest.approx(1.0, abs=0.03)  # the r^-11/3 wing converges slowly
    atm = _frac_beyond(render_psf("atmospheric", sigma, 90), 3 * fwhm)
    moffat = _frac_beyond(render_psf("moffat", sigma, 90, beta=3.0), 3 * fwhm)
    assert atm > 2.5 * moffat


def test_moffat_beta_sets_the_wings():
    wings = [
        _frac_beyond(render_psf("moffat", 1.7, 60, beta=b), 3 * FWHM_PER_SIGMA * 1.7) for b in (2.5, 3, 4.5)
    ]
    assert wings[0] > wings[1] > wings[2]


def test_stamp_grows_with_seeing_and_flux():
    assert stamp_half("moffat", 0.0, 1.7) == 12
    assert stamp_half("moffat", 0.0, 4.25) >= 7 * 4.25 - 1
    assert stamp_half("moffat", 1e6, 1.7) > stamp_half("moffat", 1e3, 1.7)
    assert stamp_half("atmospheric", 0.0, 1.7) >= 30


def test_psf_field_variation_and_ellipticity():
    nx, ny = 4000, 4000
    field = psf_field(nx, ny, 1.7, 0.15, 0.08)
    s_c, _, _ = field(1999.5, 1999.5)
    s_corner, g, theta = field(3999.0, 3999.0)
    assert s_c == pytest.approx(1.7) and s_corner == pytest.approx(1.7 * 1.15, rel=1e-3)
    e, angle = _moments(render_psf("moffat", s_corner, 40, shear=g, theta=theta))
    assert e == pytest.approx(0.08, rel=0.1)
    assert angle == pytest.approx(np.pi / 4, abs=0.02)  # radial at the (+x, +y) corner
    assert psf_field(nx, ny, 1.7, 0.0, 0.0) is None


def test_edge_positions_and_illumination():
    rng = np.random.default_rng(0)
    x, y = edge_positions(rng, 500, 4072, 4000, 3.0, 25.0)
    border = np.minimum.reduce([x, y, 4071 - x, 3999 - y])
    assert border.min() >= 3.0 and border.max() <= 25.0
    # the grid's 100 are spread around the border (all four sides), never blended with each other
    from scipy.spatial import cKDTree

    x, y = edge_positions(rng, 100, 4072, 4000, 3.0, 25.0)
    assert (x < 26).any() and (x > 4045).any() and (y < 26).any() and (y > 3973).any()
    assert cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)[0][:, 1].min() > 40
    inst = get_instrument("LSSTCam")
    det = inst.detector(188)  # R43_S22, a corner of the focal plane at (+x, +y)
    ill = illumination(det, (det.ny, det.nx), 0.2)
    assert ill.max() == pytest.approx(1.0) and ill.min() == pytest.approx(0.8, abs=1e-4)
    assert ill[-1, -1] == pytest.approx(0.8, abs=1e-3) and ill[0, 0] > 0.95
    assert illumination(det, (det.ny, det.nx), 0.0) is None


def _amp_levels(raw, snap_e=True):
    """Per amplifier: median data minus median serial overscan, electrons."""
    out = []
    for seg in raw.segments:
        a = seg.amp
        x0, x1, y0, y1 = a.data
        ox0, ox1, oy0, oy1 = a.serial_overscan
        data = seg.data[y0:y1, x0:x1].astype(float)
        level = np.median(data) - np.median(seg.data[oy0:oy1, ox0:ox1])
        out.append((level * a.gain, np.std(data - np.median(data)) * a.gain if snap_e else None))
    return out


def test_sky_change_between_snaps_on_the_raws(changed, steady):
    for scene in (changed, steady):
        lev = [np.array([v for v, _ in _amp_levels(r)]) for r in scene.raws]
        live = [k for k in range(len(lev[0])) if k not in (2, 12)]
        assert np.median(lev[1][live] / lev[0][live]) == pytest.approx(10 ** (0.4 * SKY_DM), rel=0.01)
    np.testing.assert_allclose(changed.truth["sky_per_snap"], [600.0, 600.0 * 10 ** (0.4 * SKY_DM)])


def test_dead_amp_has_no_sky_and_hot_amp_glows(changed):
    amps = changed.instrument.amplifiers(changed.detector.id)
    for raw in changed.raws:
        levels = _amp_levels(raw)
        dead_level, dead_std = levels[2]
        assert abs(dead_level) < 5.0  # bias structure only (3 e- amplitude)
        assert dead_std < 2 * amps[2].read_noise + 3.0
        live = np.median([v for k, (v, _) in enumerate(levels) if k not in (2, 12)])
        assert levels[12][0] - live == pytest.approx(2000.0, rel=0.05)
    assert changed.truth["dead_amp_box"] == tuple(amps[2].bbox)


def _aperture(raw, x, y, r=10):
    """Background-subtracted aperture sum (e-) at (x, y) of the assembled raw of one snap."""
    for seg in raw.segments:
        a = seg.amp
        bx0, bx1, by0, by1 = a.bbox
        if bx0 + r <= x < bx1 - r and by0 + r <= y < by1 - r:
            x0, x1, y0, y1 = a.data
            sec = seg.data[y0:y1, x0:x1].astype(float) * a.gain
            if a.flip_y:
                sec = sec[::-1]
            if a.flip_x:
                sec = sec[:, ::-1]
            yy, xx = np.mgrid[by0:by1, bx0:bx1]
            d = np.hypot(xx - x, yy - y)
            bg = np.median(sec[(d > 2 * r) & (d < 3 * r)])
            return float((sec[d <= r] - bg).sum())
    return float("nan")


def test_transparency_dims_snap_two_but_keeps_truth_flux(changed, steady):
    tr, st = changed.truth, steady.truth
    np.testing.assert_array_equal(tr["flux"], st["flux"])
    np.testing.assert_array_equal(tr["snr"], st["snr"])
    t2 = 10 ** (-0.4 * TRANS_DM)
    # bright unsaturated, isolated stars: snap 2 / snap 1
    sx, sy, sf = tr["star_x"], tr["star_y"], tr["star_flux"]
    pick = (sf > 2e4) & (sf < 3e5) & (sx > 100) & (sx < 3900) & (sy > 100) & (sy < 3900)
    ratios = {}
    for name, scene in (("changed", changed), ("steady", steady)):
        ratios[name] = []
        for x, y in zip(sx[pick], sy[pick], strict=True):
            if np.hypot(sx - x, sy - y)[np.hypot(sx - x, sy - y) > 0].min() > 40:
                ratios[name].append(_aperture(scene.raws[1], x, y) / _aperture(scene.raws[0], x, y))
    assert len(ratios["changed"]) >= 3
    assert np.nanmedian(ratios["changed"]) == pytest.approx(t2, rel=0.03)
    assert np.nanmedian(ratios["steady"]) == pytest.approx(1.0, rel=0.03)
    # the brightest transients: the snaps' sum is the truth flux (98% of a Moffat within 10 px)
    top = np.argsort(tr["flux"])[-12:]
    sums = [sum(_aperture(r, tr["x"][k], tr["y"][k]) for r in changed.raws) / tr["flux"][k] for k in top]
    assert np.nanmedian(sums) == pytest.approx(0.98, abs=0.04)


def test_galaxies_in_science_and_template(changed):
    tr = changed.truth
    assert len(tr["galaxy_x"]) == 20 and tr["galaxy_params"].shape == (20, 4)
    inside = (
        (tr["galaxy_x"] > 200) & (tr["galaxy_x"] < 3800) & (tr["galaxy_y"] > 200) & (tr["galaxy_y"] < 3800)
    )
    surface = tr["galaxy_flux"] / tr["galaxy_params"][:, 1] ** 2
    k = np.flatnonzero(inside)[np.argmax(surface[inside])]
    assert (
        sum(_aperture(r, tr["galaxy_x"][k], tr["galaxy_y"][k]) for r in changed.raws)
        > 0.3 * tr["galaxy_flux"][k]
    )
    ra, dec = changed.true_wcs.pixel_to_world_values(tr["galaxy_x"][k], tr["galaxy_y"][k])
    for t in changed.templates:
        px, py = t.wcs.world_to_pixel_values(ra, dec)
        xi, yi = int(round(float(px))), int(round(float(py)))
        if 10 <= xi < t.shape[1] - 10 and 10 <= yi < t.shape[0] - 10:
            assert t.image[yi, xi] - 5.0 > 5 * np.sqrt(t.variance[yi, xi])
            break
    else:
        pytest.fail("galaxy not on any template patch")


def test_saturated_stars_are_sat_in_the_template(steady):
    tr = steady.truth
    sat = np.flatnonzero(tr["star_saturated"])
    assert len(sat) > 0
    ra, dec = steady.true_wcs.pixel_to_world_values(tr["star_x"][sat], tr["star_y"][sat])
    for r, d in zip(ra, dec, strict=True):
        hit = False
        for t in steady.templates:
            px, py = t.wcs.world_to_pixel_values(r, d)
            xi, yi = int(round(float(px))), int(round(float(py)))
            if 2 <= xi < t.shape[1] - 2 and 2 <= yi < t.shape[0] - 2:
                hit |= bool((t.mask[yi - 2 : yi + 3, xi - 2 : xi + 3] & MaskBits.SAT).any())
        assert hit


def test_transient_placement_and_truth(changed):
    tr = changed.truth
    n = 300 + 40
    assert len(tr["x"]) == len(tr["flux"]) == len(tr["fwhm"]) == n
    # the source's own shot noise costs S/N, more for bright transients
    loss = tr["snr_shot"] / tr["snr"]
    assert (loss < 1).all() and loss.min() > 0.8
    assert loss[tr["snr"] > 30].mean() < loss[tr["snr"] < 6].mean()
    nx, ny = changed.detector.nx, changed.detector.ny
    border = np.minimum.reduce([tr["x"], tr["y"], nx - tr["x"], ny - tr["y"]])  # pixel centres 0 .. n - 1
    assert border.min() >= 3.0 and (border <= 26).sum() >= 40
    assert tr["tmpl_sigma"] == pytest.approx(1.35) and tr["psf_fwhm_center"] == pytest.approx(
        1.7 * FWHM_PER_SIGMA
    )


def test_good_seeing_vignetted_corner_scene():
    sigma = seeing_sigma(0.5)
    scene = make_scene(
        seed=2, n_stars=50, n_transients=10, n_cr=0, snaps=1, sci_sigma=sigma, detector=188, vignetting=0.2
    )
    assert sigma == pytest.approx(1.0617, rel=1e-3)
    assert scene.truth["tmpl_sigma"] == pytest.approx(0.8 * sigma)  # the template stays sharper
    assert scene.truth["tmpl_fwhm"] < scene.truth["psf_fwhm_center"]
    # the flat carries the vignetting (its own structure is +-3%): 20% darker at the far corner
    flat = scene.flat.image
    assert flat[-20:, -20:].mean() / flat[:20, :20].mean() == pytest.approx(0.8, abs=0.04)
    assert scene.detector.name == "R43_S22"


def test_conditions_are_valid_make_scene_arguments():
    params = inspect.signature(make_scene).parameters
    assert 18 <= len(CONDITIONS) <= 24
    for name, kw in CONDITIONS.items():
        assert set(kw) <= set(params), name
    fwhm = sorted(
        round(kw["sci_sigma"] * FWHM_PER_SIGMA * 0.2, 2) for kw in CONDITIONS.values() if "sci_sigma" in kw
    )
    assert fwhm == [0.5, 0.7, 1.2, 1.6, 2.0]


class _Scene:
    def __init__(self, truth):
        self.truth, self.raws = truth, []


def test_score_counts_on_a_constructed_result():
    x, y = np.tile(np.linspace(40, 160, 8), 5), np.repeat(np.linspace(40, 160, 5), 8)
    x[:3] = [2.0, 10.0, 15.0]  # near the border
    snr = np.r_[np.full(20, 25.0), np.full(20, 7.0)]
    flux = snr * 100.0
    # a 5e3 e- star 2.8 px from the second false detection: that one is near an object
    truth = {"x": x, "y": y, "snr": snr, "flux": flux,
             "star_x": [312.0], "star_y": [312.0], "star_flux": [5e3]}
    mask = np.zeros((200, 200), np.int32)
    mask[:, :8] = MaskBits.EDGE  # the first transient (x = 2) is outside the valid region
    diff = Image(np.zeros((200, 200), np.float32), np.ones((200, 200), np.float32), mask)
    found = np.r_[np.arange(1, 20), np.arange(20, 30)]  # all S/N 25 but the invalid one; half the S/N 7
    cols = [
        "pixelFlags_bad",
        "pixelFlags_saturated",
        "pixelFlags_cr",
        "pixelFlags_edge",
        "pixelFlags_suspect",
    ]
    dia = pd.DataFrame(
        {
            "x": x[found] + 0.5,
            "y": y[found],
            "psfFlux": 0.5 * flux[found] * 1.02,
            "snr": snr[found] * 0.9,
            "reliability": 0.9,
        }
    )
    false = pd.DataFrame(
        {
            "x": [300.0, 310.0, 320.0],
            "y": [300.0, 310.0, 320.0],
            "psfFlux": [50.0, -50.0, 60.0],
            "snr": [6.0, -6.0, 6.0],
            "reliability": [0.9, 0.9, 0.2],
        }
    )
    dia = pd.concat([dia, false], ignore_index=True)
    for c in cols:
        dia[c] = False
    dia.loc[len(dia) - 1, "pixelFlags_suspect"] = True
    s = score(_Scene(truth), {"dia": dia, "diff": diff, "psf": gaussian_psf(1.5)})
    assert s["completeness_valid_10_inf"] == 1.0 and s["n_valid_10_inf"] == 19
    assert s["completeness_true_10_inf"] == pytest.approx(19 / 20)
    assert s["completeness_valid_5_10"] == pytest.approx(0.5)
    assert s["n_edge_10_inf"] == 2  # x = 10 and 15 (x = 2 is invalid)
    assert s["false"] == 3 and s["false_unflagged"] == 2 and s["false_clean"] == 2
    assert s["false_isolated"] == 1 and [row[4] for row in s["false_list"]] == [False, True]
    assert s["completeness_alertable_10_inf"] == 1.0 and s["halo_fraction"] == 0.0
    assert s["pos_neg"] == (2, 1)
    assert s["flux_ratio"] == pytest.approx(1.02)
    assert s["snr_ratio"] == pytest.approx(0.9)
    assert s["valid_fraction"] == pytest.approx(192 / 200)


@pytest.mark.parametrize("phase", [(0.47, 0.49), (0.25, -0.3)])
def test_a_compact_galaxy_is_rendered_where_it_is_at_any_sub_pixel_phase(phase):
    # against the same galaxy convolved on a 7-times finer grid and integrated over each pixel:
    # a discrete convolution with the pixel-sampled PSF moved it by 0.03-0.04 px
    from scene_galaxies import sersic_raw
    from scene_render import render_galaxies
    from scipy.signal import fftconvolve

    def psf_at(x, y, h, scale=1):
        return render_psf("moffat", 1.35 * scale, h, beta=3.0)

    n, re, q, th, h, k = 2.9, 1.6, 0.35, 1.0, 14, 7
    dx, dy = phase
    gal = sersic_raw(n, re * k, q, th, h * k + 3, dx * k, dy * k)
    fine = fftconvolve(gal, psf_at(0, 0, 10 * k, k), mode="same")
    ref = fine.reshape(2 * h + 1, k, 2 * h + 1, k).mean(axis=(1, 3))
    img = render_galaxies((61, 61), [30 + dx], [30 + dy], [1.0], np.array([[n, re, q, th]]), psf_at)
    img = img[30 - h : 30 + h + 1, 30 - h : 30 + h + 1].astype(float)
    g = np.arange(-h, h + 1)
    d = img / img.sum() - ref / ref.sum()
    assert abs((d.sum(axis=0) * g).sum()) < 0.005 and abs((d.sum(axis=1) * g).sum()) < 0.005
    assert np.abs(d).max() < 0.005 * ref.max() / ref.sum()
