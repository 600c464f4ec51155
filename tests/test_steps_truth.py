"""Truth-scored test of the image steps on a simulated LSSTCam CCD.

One full 4072 x 4000 CCD (two snaps, cosmic rays, hot/dead columns, saturated stars with
bleed trails, header WCS off by ~1.4 arcsec, a two-patch template on a rotated grid, 300
transients injected at true S/N 3-50): raw -> ISR -> ... -> DIA sources, scored against
the truth. Takes ~20 s on one core.
"""

import numpy as np
import pytest
from apbatch.job.steps import DIA_COLUMNS
from steps_scene import make_scene, run_chain, score


@pytest.fixture(scope="module")
def scored():
    scene = make_scene(seed=11)
    result = run_chain(scene)
    return scene, result, score(scene, result)


def test_completeness_by_measured_snr(scored):
    _, _, s = scored
    assert s["n_measured_10_inf"] >= 100 and s["n_measured_5_10"] >= 40
    assert s["completeness_measured_10_inf"] >= 0.98
    assert s["completeness_measured_5_10"] >= 0.80


def test_false_detections_per_ccd(scored):
    _, _, s = scored
    assert s["false"] <= 3
    assert s["true_reliability_ge_0.5"] >= 0.8


def test_astrometry_and_calibration(scored):
    scene, result, _ = scored
    # the fitted WCS puts the injected transients where they are (header WCS was ~7 px off)
    dia = result["dia"]
    ra, dec = scene.true_wcs.pixel_to_world_values(scene.truth["x"], scene.truth["y"])
    px, py = result["calexp"].wcs.world_to_pixel_values(ra, dec)
    assert np.hypot(px - scene.truth["x"], py - scene.truth["y"]).max() < 0.1
    assert list(dia.columns) == DIA_COLUMNS
    # fluxes of bright detections agree with the injected ones (nJy = 0.5 x electrons)
    from scipy.spatial import cKDTree

    d, i = cKDTree(dia[["x", "y"]].to_numpy()).query(np.column_stack([scene.truth["x"], scene.truth["y"]]))
    ok = (d < 2) & (scene.truth["snr"] > 20)
    ratio = dia["psfFlux"].to_numpy()[i[ok]] / (0.5 * scene.truth["flux"][ok])
    assert np.median(ratio) == pytest.approx(1.0, abs=0.05)
    # the cosmic rays and bad columns were masked, not detected
    m = result["calexp"].mask
    for x0, y0, y1 in scene.truth["hot_cols"] + scene.truth["dead_cols"]:
        assert np.mean(m[y0:y1, x0] & 1) > 0.9
    assert 0.9 < result["sres"].noise_scale < 1.2
