"""Tests of apbatch.job.steps.dia_detect (residual background, matched filter, peaks)."""

import numpy as np
import pytest
from apbatch.job.steps import gaussian_psf
from apbatch.job.steps.dia_detect import difference_background, filtered_snr, find_peaks, source_free_spread
from scipy import ndimage
from steps_scene import _add_stars

SIG = 1.7


def test_background_removes_a_smooth_level_and_ignores_excluded_pixels():
    rng = np.random.default_rng(1)
    ny, nx = 512, 640
    yy, xx = np.mgrid[0:ny, 0:nx]
    level = 1.5 + 1.0 * xx / nx  # e-, under a noise of 30 e-
    img = (rng.normal(0, 30.0, (ny, nx)) + level).astype(np.float32)
    exclude = np.zeros((ny, nx), bool)
    img[100:200, 100:200] += 500.0  # a residual the fit must not see
    exclude[100:200, 100:200] = True
    bkg = difference_background(img, exclude)
    assert bkg.shape == img.shape and bkg.dtype == np.float32
    inner = (slice(64, -64), slice(64, -64))
    assert np.abs(bkg - level)[inner][~exclude[inner]].max() < 1.0  # 0.03 sigma
    assert bkg[:, -160:].mean() - bkg[:, :160].mean() == pytest.approx(0.75, abs=0.25)


def test_matched_filter_is_normalised_and_centred():
    rng = np.random.default_rng(2)
    img = (rng.normal(0, 20.0, (600, 600)) + 0.8).astype(np.float32)  # a +0.04 sigma per pixel level
    var = np.full(img.shape, 400.0, np.float32)
    zero = np.zeros(img.shape, bool)
    zero[:, 300] = True
    s, scale, offset = filtered_snr(img, var, zero, SIG)
    assert offset == pytest.approx(0.04 * np.sqrt(4 * np.pi) * SIG, abs=0.05)
    assert scale == pytest.approx(1.0, abs=0.03)
    assert abs(np.median(s[~zero])) < 0.01 and (s[zero] == 0).all()
    # the peak S/N of isolated sources is their optimal (PSF-weighted) S/N, within 2 %
    img = rng.normal(0, 20.0, (800, 800)).astype(np.float32)
    p = gaussian_psf(SIG).image
    flux = 30.0 * 20.0 / np.sqrt((p**2).sum())
    xy = [(x, y) for x in range(50, 800, 100) for y in range(50, 800, 100)]
    _add_stars(img, [q[0] for q in xy], [q[1] for q in xy], [flux] * len(xy), "gauss", SIG)
    # (a constant variance plane holds no pixel's own noise: nothing to take off)
    flat_var = np.full(img.shape, 400.0, np.float32)
    s, _, _ = filtered_snr(img, flat_var, np.zeros(img.shape, bool), SIG, self_term=False)
    peaks = [s[y - 1 : y + 2, x - 1 : x + 2].max() for x, y in xy]
    assert np.median(peaks) == pytest.approx(30.0, rel=0.02)


def test_poisson_variance_gives_the_noise_its_own_sign_balance():
    # ISR's variance is the pixels' own value: 1000 e- of sky, Poisson. Without the self term
    # a pixel that fluctuated low has a smaller variance, so negative excursions gain S/N;
    # with it the balance is that of the noise under its true (constant) variance: Poisson's
    # own skew makes positive excursions a little more common
    rng = np.random.default_rng(5)
    sky = rng.poisson(1000.0, (3000, 3000)).astype(np.float32)
    zero = np.zeros(sky.shape, bool)

    def sign_ratio(variance, self_term):
        s, _, _ = filtered_snr(sky - np.float32(1000.0), variance, zero, SIG, self_term=self_term)
        return float((s < -3.0).sum() / (s > 3.0).sum())

    exact = sign_ratio(np.full(sky.shape, 1000.0, np.float32), False)
    assert sign_ratio(sky, True) == pytest.approx(exact, abs=0.04)
    assert sign_ratio(sky, False) > exact + 0.12


def test_noise_spread_leaves_sources_out():
    # sources are not noise: with many of them on a broad PSF (a 2" seeing difference holds 400
    # transients) the filter's spread over every pixel is too high; without them it is the noise's
    rng = np.random.default_rng(4)
    sig, n = 4.0, 900
    noise = rng.normal(0, 20.0, (n, n)).astype(np.float32)
    var = np.full((n, n), 400.0, np.float32)
    zero = np.zeros((n, n), bool)
    img = noise.copy()
    p = gaussian_psf(sig, size=41).image
    x, y = rng.uniform(20, n - 20, 150), rng.uniform(20, n - 20, 150)
    _add_stars(img, x, y, rng.uniform(15, 40, 150) * 20.0 / np.sqrt((p**2).sum()), "gauss", sig)
    s, everything, _ = filtered_snr(img, var, zero, sig)
    s_alone, alone, _ = filtered_snr(noise, var, zero, sig)
    assert everything > 1.05 * alone  # the sources inflate the spread over every pixel
    assert everything * source_free_spread(s, zero, sig) == pytest.approx(alone, rel=0.01)
    # on noise alone nothing is left out (nothing reaches 5 sigma): the plain spread, 1
    assert source_free_spread(s_alone, zero, sig) == pytest.approx(1.0, abs=0.002)
    # excluded pixels are not measured; with too few left the answer is 1
    assert source_free_spread(s, np.ones((n, n), bool), sig) == 1.0


def test_matched_filter_does_not_reflect_the_image_border():
    rng = np.random.default_rng(3)
    n = 300
    hits = 0
    for _ in range(20):
        img = rng.normal(0, 1.0, (n, n)).astype(np.float32)
        s, _, _ = filtered_snr(img, np.ones((n, n), np.float32), np.zeros((n, n), bool), SIG, self_term=False)
        edge = np.concatenate([s[0], s[-1], s[:, 0], s[:, -1]])
        hits += int(edge.std() > 1.15)
    assert hits <= 2


def test_blended_peaks_are_split_by_their_saddle_and_every_maximum_in_halos():
    s = np.zeros((100, 100), np.float32)
    s[40:60, 10:90] = 6.0  # a long ridge above threshold
    s[50, 30] = s[50, 70] = 9.0  # two maxima 3 sigma above the saddle between them: two sources
    s[45, 50] = 7.0  # a bump 1 sigma above the ridge: noise on one footprint, not a source
    s[10, 10] = -7.0
    s[10:12, 11] = -6.0
    plain = find_peaks(s, 5.0, 3)
    pos = sorted((x, y) for x, y, sign, _ in plain if sign > 0)
    assert pos == [(30, 50), (70, 50)]
    assert sum(1 for p in plain if p[2] < 0) == 1
    # a higher prominence keeps only the highest maximum of the footprint
    assert sum(1 for p in find_peaks(s, 5.0, 3, prominence=4.0) if p[2] > 0) == 1
    halo = np.zeros(s.shape, bool)
    halo[30:70, :] = True
    split = find_peaks(s, 5.0, 3, split=halo, separation=4.0)
    pos = sorted((x, y) for x, y, sign, _ in split if sign > 0)
    assert (30, 50) in pos and (70, 50) in pos and (50, 45) in pos  # in a halo: every maximum
    assert sum(1 for p in split if p[2] < 0) == 1
    assert ndimage.label(s > 5)[1] == 1
