"""Tests of apbatch.job.steps.mismatch (a bright object's fitted core mismatch, as variance)."""

import numpy as np
import pytest
from apbatch.job.steps.dia_detect import filtered_snr
from apbatch.job.steps.mismatch import add_mismatch_variance, core_terms, mismatch_fit, wing_terms

SIGMA, SKY_VAR, FLUX = 2.0, 100.0, 2e5


def _star(x0, y0, sigma=SIGMA, flux=FLUX, shape=(121, 121)):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    return flux * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def _observe(model, sci, transient, x0, y0, seed):
    """(difference, science, variance): ``sci`` plus a transient ``(dx, dy, flux)`` from
    ``(x0, y0)``, less the matched template ``model``, plus noise of variance 100."""
    if transient is not None:
        dx, dy, f = transient
        sci = sci + _star(x0 + dx, y0 + dy, SIGMA, f)
    rng = np.random.default_rng(seed)
    diff = (sci - model + rng.normal(0.0, np.sqrt(SKY_VAR), model.shape)).astype(np.float32)
    return diff, (model + diff).astype(np.float32), np.full(model.shape, SKY_VAR, np.float32)


def _scene(shift=0.0, sci_sigma=SIGMA, variable=0.0, transient=None, at=(60.0, 60.0), seed=3):
    """(difference, science, variance): the matched template is a star at ``at``; the science
    is the same star moved by ``shift`` px in x, of width ``sci_sigma``, brighter by ``variable``
    e-, plus a transient ``(dx, dy, flux)`` from it, plus noise of variance 100."""
    x0, y0 = at
    model = _star(x0, y0)
    sci = _star(x0 + shift, y0, sci_sigma, FLUX + variable)
    return _observe(model, sci, transient, x0, y0, seed)


def _apply(diff, sci, var, at=(60.0, 60.0), bad=None):
    bad = np.zeros(diff.shape, bool) if bad is None else bad
    n = add_mismatch_variance(diff, sci, var, bad, np.array([at[0]]), np.array([at[1]]), SIGMA,
                              fwhm=2.3548 * SIGMA, coherence=np.pi * SIGMA**2)
    return n, var


def _peak_snr(diff, var, box=(slice(50, 71), slice(50, 71))):
    s, _, _ = filtered_snr(diff, var, np.zeros(diff.shape, bool), SIGMA, self_term=False)
    return float(np.abs(s[box]).max())


@pytest.mark.parametrize("kind", ["shift", "width"])
def test_a_mismatch_at_the_core_is_no_longer_a_detection(kind):
    # a hundredth of a pixel, half a percent of width: 7-8 sigma on a 2e5 e- star
    kwargs = {"shift": 0.012} if kind == "shift" else {"sci_sigma": 2.005}
    diff, sci, var = _scene(**kwargs)
    before = _peak_snr(diff, var.copy())
    assert before > 6.0  # the dipole / the ring would be detected
    n, var = _apply(diff, sci, var)
    assert n == 1
    assert _peak_snr(diff, var) < 4.0
    assert var[60, 64] > 300.0  # within the lobes: more than the noise variance
    assert var[60, 75] == SKY_VAR and var[10, 10] == SKY_VAR  # beyond the box: unchanged


def test_noise_and_a_variable_star_add_nothing():
    # a change of the object's own flux is the fit's "a", not a mismatch: it keeps its S/N
    for kwargs in ({}, {"variable": 4000.0}):
        diff, sci, var = _scene(**kwargs)
        n, var = _apply(diff, sci, var)
        assert n == 0, kwargs
        assert (var == SKY_VAR).all(), kwargs
    diff, sci, var = _scene(variable=4000.0)
    assert _peak_snr(diff, var) > 20.0


@pytest.mark.parametrize("where", [(3.0, 0.0), (4.0, 0.0), (3.0, 2.0)])
def test_a_transient_beside_a_bright_star_is_not_a_mismatch(where):
    # 1.5-2 sigma from the core the derivatives fit it too, but a point source fits it better
    diff, sci, var = _scene(transient=(*where, 500.0))
    before = _peak_snr(diff, var.copy())
    n, var = _apply(diff, sci, var)
    assert n == 0 and (var == SKY_VAR).all()
    assert before > 6.0


def test_a_transient_beside_a_mismatched_star_keeps_a_detection():
    # the point source stays in the fit: the star's dipole is taken down, the transient is not
    diff, sci, var = _scene(shift=0.012, transient=(6.0, 2.0, 500.0))
    n, var = _apply(diff, sci, var)
    assert n == 1
    assert _peak_snr(diff, var, (slice(60, 65), slice(64, 69))) > 5.0  # at the transient
    assert _peak_snr(diff, var, (slice(55, 66), slice(52, 60))) < 4.0  # the star's far lobe


def test_a_star_at_the_border_is_fitted_on_its_part_inside():
    diff, sci, var = _scene(shift=0.05, at=(4.0, 60.0))
    n, var = _apply(diff, sci, var, at=(4.0, 60.0))
    assert n == 1
    assert var[60, 6] > 200.0 and np.isfinite(var).all()


def test_a_masked_or_outside_star_is_skipped():
    diff, sci, var = _scene(shift=0.05)
    bad = np.zeros(diff.shape, bool)
    bad[52:69, 52:69] = True
    n, var = _apply(diff, sci, var, bad=bad)
    assert n == 0 and (var == SKY_VAR).all()
    n = add_mismatch_variance(diff, sci, var, np.zeros(diff.shape, bool), np.array([-40.0]),
                              np.array([60.0]), SIGMA, 2.3548 * SIGMA, 10.0)
    assert n == 0 and (var == SKY_VAR).all()


def test_mismatch_fit_separates_a_flux_change_from_a_shift():
    diff, sci, var = _scene(shift=0.05, variable=2000.0)
    box, inner = (slice(50, 71), slice(50, 71)), (slice(52, 69), slice(52, 69))
    model = (sci - diff).astype(float)
    fit = mismatch_fit(diff[inner].astype(float), model[inner], core_terms(model[box]),
                       var[inner].astype(float), np.ones((17, 17), bool), SIGMA)
    assert fit.flux_change == pytest.approx(2000.0 / FLUX, rel=0.1)
    assert fit.dchi2 > 100.0 and fit.point_dchi2 < 16.0
    # the fitted shift term is the dipole itself: what is left is noise
    assert np.std(fit.resid) < 1.3 * np.sqrt(SKY_VAR)
    assert np.abs(fit.mismatch).max() > 10 * np.sqrt(SKY_VAR)


def _winged(x0=60.0, y0=60.0, lopsided=0.0, transient=None, seed=3):
    """(difference, science, variance) of a 1e6 e- star with a power-law wing whose science copy
    is brighter by ``lopsided`` x (1 + cos phi) on one side, plus a transient ``(dx, dy, flux)``."""
    yy, xx = np.mgrid[0:121, 0:121].astype(float)
    r2 = (xx - x0) ** 2 + (yy - y0) ** 2
    wing = (1 + r2 / 16.0) ** -2.0
    wing *= 0.2e6 / wing.sum()
    model = _star(x0, y0, flux=0.8e6) + wing
    # the wing alone (beyond 2 FWHM) differs, on one side
    sci = model + lopsided * np.where(r2 > 64.0, wing, 0.0) * (1 + np.cos(np.arctan2(yy - y0, xx - x0)))
    return _observe(model, sci, transient, x0, y0, seed)


def test_a_lopsided_wing_is_no_longer_a_detection():
    diff, sci, var = _winged(lopsided=0.06)
    lobe = (slice(54, 67), slice(68, 80))  # 8-20 px out, on the bright side
    before = _peak_snr(diff, var.copy(), lobe)
    assert before > 5.5
    n, var = _apply(diff, sci, var)
    assert n == 1
    assert _peak_snr(diff, var, lobe) < 4.0
    assert var[60, 72] > SKY_VAR and var[60, 100] == SKY_VAR


def test_a_transient_in_a_clean_wing_keeps_its_snr():
    diff, sci, var = _winged(transient=(12.0, 3.0, 600.0))
    where = (slice(60, 66), slice(69, 75))
    before = _peak_snr(diff, var.copy(), where)
    n, var = _apply(diff, sci, var)
    assert n == 0 and (var == SKY_VAR).all()
    assert before > 6.0


def test_wing_terms_are_zero_inside_the_core_and_follow_the_model():
    model = _star(10.0, 10.0, shape=(21, 21))
    terms = wing_terms(model, 0.0, 0.0, r_in=4.0)
    assert len(terms) == 10
    assert all(t[10, 8:13].sum() == 0 for t in terms)  # within 4 px of the centre
    np.testing.assert_allclose(terms[0][10, 16], model[10, 16])  # the level: M itself
    assert terms[4][16, 10] == pytest.approx(model[16, 10])  # sin(phi) = 1 straight up
    assert terms[5][16, 10] == pytest.approx(model[16, 10] * 6 / 10)  # ... times r / half-size


def test_a_transient_on_a_lopsided_wing_keeps_a_detection():
    diff, sci, var = _winged(lopsided=0.06, transient=(12.0, 3.0, 600.0))
    n, var = _apply(diff, sci, var)
    assert n == 1  # the wing's mismatch is added, with the transient fitted apart
    assert _peak_snr(diff, var, (slice(60, 66), slice(69, 75))) > 6.0


def test_a_transient_brighter_than_a_faint_star_beside_it_is_not_its_mismatch():
    # 7000 e- 1.9 px from an 8500 e- star: flux change plus derivatives fit it, but only with a
    # shift of a pixel; a mismatch is a fraction of one (two such transients at S/N 38 were lost)
    model = _star(60.0, 60.0, flux=8500.0)
    diff, sci, var = _observe(model, model, (1.9, 0.0, 7000.0), 60.0, 60.0, 3)
    n, var = _apply(diff, sci, var)
    assert n == 0 and (var == SKY_VAR).all()
    assert _peak_snr(diff, var) > 30.0
