"""Tests for apbatch.sim.sky: a deterministic, consistent sky with transients."""

import numpy as np
import pandas as pd
import pytest
from apbatch.sim.sky import NOMINAL, SKY_MAG, ZERO_POINTS, MovingObject, SkyConfig, SkyModel, snr_to_rate


def test_same_seed_same_sky_other_seed_other_sky():
    a = SkyModel(4).sources(150.0, 2.0, 0.1)
    b = SkyModel(4).sources(150.0, 2.0, 0.1)
    pd.testing.assert_frame_equal(a, b)
    c = SkyModel(5).sources(150.0, 2.0, 0.1)
    assert len(set(a["id"]) & set(c["id"])) < len(a)  # ids are cell-based; positions differ
    assert not np.allclose(a["ra"].to_numpy()[:50], c["ra"].to_numpy()[:50])


def test_overlapping_queries_agree():
    sky = SkyModel(9)
    big = sky.sources(10.0, -30.0, 0.3).set_index("id")
    small = SkyModel(9).sources(10.2, -30.1, 0.1).set_index("id")  # a fresh instance, other cells first
    assert len(small) > 100
    pd.testing.assert_frame_equal(small, big.loc[small.index])


def test_wraps_ra_zero_and_pole():
    sky = SkyModel(2)
    s = sky.sources(0.02, 0.0, 0.1)
    assert (s["ra"] > 359).any() and (s["ra"] < 1).any()
    p = sky.sources(0.0, -89.95, 0.1)
    assert len(p) > 100


def test_density_and_kinds():
    s = SkyModel(1).sources(200.0, -20.0, 0.25)
    area = np.pi * 0.25**2
    ccd_area = 4072 * 4000 * (0.2 / 3600) ** 2
    stars_per_ccd = (s["kind"] == 0).sum() / area * ccd_area
    assert 2000 < stars_per_ccd < 4500
    assert {0, 1, 2, 3} <= set(s["kind"])
    mags = s.loc[s["kind"] == 0, "mag"]
    assert mags.min() < 16 and mags.max() > 24


def test_transient_snr_range_and_fluxes():
    cfg = SkyConfig(variable_density=3000, new_density=3000)
    sky = SkyModel(3, epoch_mjd=60000.0, span_days=0.1, config=cfg)
    s = sky.sources(30.0, -10.0, 0.2)
    tr = s[s["kind"] >= 2]
    assert tr["snr_nominal"].between(3, 100).all()
    assert tr["snr_nominal"].min() < 5 and tr["snr_nominal"].max() > 50
    # the S/N actually reached under nominal conditions matches
    sigma = NOMINAL["fwhm_arcsec"] / 2.3548 / NOMINAL["pixel_scale"]
    sky_e = (
        10 ** (-0.4 * (SKY_MAG["r"] - ZERO_POINTS["r"])) * NOMINAL["pixel_scale"] ** 2 * NOMINAL["exptime"]
    )
    f = snr_to_rate(np.array([3.0, 30.0])) * NOMINAL["exptime"]
    snr = f / np.sqrt(f + 4 * np.pi * sigma**2 * (sky_e + NOMINAL["read_noise"] ** 2))
    np.testing.assert_allclose(snr, [3.0, 30.0])

    late, early = 60000.05, 59999.9
    now = SkyModel.fluxes(s, "r", late, 30.0)
    before = SkyModel.fluxes(s, "r", early, 30.0)
    tmpl = SkyModel.fluxes(s, "r", late, 30.0, template=True)
    var, new = (s["kind"] == 2).to_numpy(), (s["kind"] == 3).to_numpy()
    assert (now[var] > 0).all() and (tmpl[var] > 0).all()  # fading stars stay positive
    assert (np.sign(now[var] - tmpl[var]) == s["sign"].to_numpy()[var]).all()
    assert set(s.loc[var, "sign"]) == {-1, 1}
    assert (tmpl[new] == 0).all()
    on_late = s["t_on"].to_numpy()[new] <= late
    assert (now[new][on_late] > 0).all() and (now[new][~on_late] == 0).all()
    assert (before[new] == 0).sum() > (now[new] == 0).sum()  # some switch on during the night
    static = (s["kind"] <= 1).to_numpy()
    np.testing.assert_array_equal(now[static], tmpl[static])


def test_moving_object():
    m = MovingObject(id=1, ra0=100.0, dec0=-30.0, mjd0=60000.0, rate_ra=1.0, rate_dec=-0.5, mag=21.0)
    sky = SkyModel(1, movers=[m])
    r0, d0 = m.position(60000.0)
    r1, d1 = m.position(60000.1)
    assert (r0, d0) == (100.0, -30.0)
    assert d1 == pytest.approx(-30.05) and (r1 - r0) * np.cos(np.radians(-30)) == pytest.approx(0.1)
    near = sky.movers_near(100.0, -30.0, 0.01, 60000.0)
    assert len(near) == 1 and near["kind"].iloc[0] == 4
    assert len(sky.movers_near(100.0, -30.0, 0.01, 60000.1)) == 0
    assert SkyModel.fluxes(near, "r", 60000.0, 30.0)[0] > 0
    assert SkyModel.fluxes(near, "r", 60000.0, 30.0, template=True)[0] == 0
