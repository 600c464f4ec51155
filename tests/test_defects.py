"""Tests of apbatch.job.steps.defects (cosmic rays, bad columns, interpolation)."""

import numpy as np
from apbatch.image import MaskBits
from apbatch.job.steps.defects import detect_bad_columns, find_cosmic_rays, grow, interpolate_masked
from steps_scene import render_psf


def test_single_snap_cosmic_rays_and_stars():
    rng = np.random.default_rng(5)
    img = np.full((300, 300), 800.0, np.float32)
    img[140:165, 140:165] += 5e4 * render_psf("moffat", 1.7)
    img += rng.normal(0, np.sqrt(img)).astype(np.float32)
    img[50, 60] += 2000.0
    img[200, 100:104] += 1500.0  # a short track
    var = np.maximum(img, 0) + 40.0
    cr = find_cosmic_rays(img, var, np.zeros(img.shape, np.int32))
    assert cr[50, 60] and cr[200, 101]
    assert not cr[140:165, 140:165].any()
    assert cr.sum() < 12


def test_bad_columns_detected_and_interpolated():
    rng = np.random.default_rng(7)
    img = rng.normal(1000, 30, (400, 300)).astype(np.float32)
    img[:, 77] += 150.0
    img[200:, 150] *= 0.3
    bad = detect_bad_columns(img, np.zeros(img.shape, np.int32), half_rows=200)
    assert bad[:, 77].all() and bad[200:, 150].all()
    assert bad.sum() == 400 + 200
    var = np.full_like(img, 900.0)
    interpolate_masked(img, var, bad)
    assert abs(img[:, 77].mean() - 1000) < 5 and abs(img[200:, 150].mean() - 1000) < 5


def test_cosmic_rays_skip_saturated_pixels_and_edges():
    img = np.full((50, 60), 500.0, np.float32)
    var = np.full_like(img, 500.0)
    mask = np.zeros(img.shape, np.int32)
    img[10, 10] += 3000.0
    img[20, 20] += 3000.0
    mask[20, 20] = MaskBits.SAT
    img[0, 30] += 3000.0  # an edge pixel has no four neighbours
    cr = find_cosmic_rays(img, var, mask)
    assert cr[10, 10] and not cr[20, 20] and not cr[0, 30]
    assert cr.sum() == 1
    assert not find_cosmic_rays(np.full((2, 2), 9.0, np.float32), np.ones((2, 2), np.float32),
                                np.zeros((2, 2), np.int32)).any()


def test_grow_is_a_3x3_dilation_clipped_at_edges():
    m = np.zeros((5, 6), bool)
    m[0, 0] = m[3, 3] = True
    g = grow(m)
    assert g[:2, :2].all() and g[2:5, 2:5].all()
    assert g.sum() == 4 + 9
    assert grow(np.zeros((3, 3), bool)).sum() == 0


def test_saturation_halos_grow_with_the_saturated_core():
    from apbatch.job.steps.defects import saturation_halos

    mask = np.zeros((300, 400), np.int32)
    mask[49:52, 49:52] = MaskBits.SAT  # a small core (radius 1.5 px): 3 FWHM wins
    mask[140:200, 296:305] = MaskBits.SAT  # a bright star with a vertical bleed trail, core 9 px wide
    halos = saturation_halos(mask, fwhm=4.0)
    assert halos[50, 50 + 12] and not halos[50, 50 + 13]  # 3 x 4 px about the centre
    cy, cx = 169.5, 300.0
    r = 6.0 * 4.5  # 6 x half the narrower side
    assert halos[int(cy), int(cx + r - 1)] and not halos[int(cy), int(cx + r + 2)]
    assert halos[int(cy + r - 1), int(cx)] and not halos[int(cy + r + 2), int(cx)]
    assert not saturation_halos(np.zeros((10, 10), np.int32), 4.0).any()


def test_cosmic_rays_do_not_depend_on_the_row_blocks():
    rng = np.random.default_rng(11)
    img = rng.normal(700, 26, (97, 83)).astype(np.float32)
    img[rng.integers(1, 96, 25), rng.integers(1, 82, 25)] += 2500.0
    var = np.full_like(img, 700.0)
    mask = np.zeros(img.shape, np.int32)
    ref = find_cosmic_rays(img, var, mask, rows_per_block=1000)
    assert ref.sum() >= 20
    for rows in (1, 2, 5, 32):
        assert (find_cosmic_rays(img, var, mask, rows_per_block=rows) == ref).all()
