"""Truth-scored image steps on skies they were not tuned on (issue 10's condition grid).

Five conditions of ``tests/scene_conditions.py`` (a full LSSTCam CCD each, ~30 s on one core):
two snaps whose sky differs by 0.3 mag, a dead amplifier, an atmospheric (non-Moffat) PSF that
varies across the CCD, a galaxy-rich field and 2" seeing. Each is scored against its truth as
``bench/bench_steps.py`` does (completeness by TRUE S/N over the difference's valid region,
sources near the edge included). The asserted bounds are the issue's targets (S/N >= 10: 98%,
S/N 5-10: 80%, flux within 5%), except for unflagged false detections: a regression guard of 5
per CCD against the target of 3 (a mean over CCDs in the bench), and no more than 3 above
the noise floor: what white noise of the difference's variance gives through the same detection
(README, "Skies it was not tuned on").
"""

import numpy as np
import pytest
from apbatch.job.steps.psf import moffat_psf
from scene_conditions import CONDITIONS
from scene_score import noise_floor
from steps_scene import make_scene, run_chain, score

CASES = ["sky_change_0.3", "dead_amp", "atmospheric_varying", "galaxy_rich", "seeing_2.0"]


@pytest.fixture(scope="module", params=CASES)
def scored(request):
    scene = make_scene(seed=1, **CONDITIONS[request.param])
    result = run_chain(scene)
    return request.param, scene, result, score(scene, result)


def test_completeness_flux_and_false_detections(scored):
    name, _, _, s = scored
    assert s["n_true_10_inf"] >= 100 and s["n_valid_5_10"] >= 60, name
    assert s["completeness_valid_10_inf"] >= 0.98, (name, s)
    assert s["completeness_edge_10_inf"] >= 0.95, (name, s)
    assert s["completeness_valid_5_10"] >= 0.80, (name, s)
    assert s["false_unflagged"] <= 5, (name, s)
    assert s["flux_ratio"] == pytest.approx(1.0, abs=0.05), (name, s)
    assert s["valid_fraction"] > 0.9, (name, s)


def test_what_each_condition_exercises(scored):
    name, scene, result, _ = scored
    meta, tr = result["calexp"].metadata, scene.truth
    if name == "sky_change_0.3":
        # the snaps are modelled (sky change), not flagged away as cosmic rays
        assert meta["SNAPMODE"] == "model"
        assert meta["SNAPDSKY"] > 0.25 * np.mean(tr["sky_per_snap"])
        assert meta["SNAPNCR"] < 40_000
    elif name == "dead_amp":
        assert "dead" in meta["AMPSBAD"]
        x0, x1, y0, y1 = tr["dead_amp_box"]
        assert (result["diff"].mask[y0:y1, x0:x1] & 256).all()  # NO_DATA: no source, no alert
        assert result["dia"]["pixelFlags_edge"].sum() < len(result["dia"])
    elif name == "atmospheric_varying":
        assert result["sres"].spatial_degree == 2  # the kernel follows the PSF across the CCD
    elif name == "galaxy_rich":
        # the PSF is built from stars, not galaxies: its size is the stars' (same measure)
        ref = moffat_psf(tr["psf_fwhm_center"], 3.0, size=result["psf"].image.shape[0]).fwhm
        assert result["psf"].fwhm == pytest.approx(ref, rel=0.05)
    elif name == "seeing_2.0":
        assert result["sres"].kernel_size >= 45


def test_false_detections_against_the_noise_floor(scored):
    """The subtraction adds few false detections to those white noise alone gives at 5 sigma."""
    name, _, result, s = scored
    floor = noise_floor(result, seed=1, truth=scored[1].truth)
    assert floor["noise_unflagged"] == floor["noise_pos"] + floor["noise_neg"]
    assert 0 <= floor["noise_isolated"] <= floor["noise_unflagged"]
    # near an object (its residual, or noise there): at most 2 per CCD on these seeds
    assert s["false_unflagged"] - s["false_isolated"] <= 2, (name, s["false_list"])
    # ~1-3 peaks per 4k x 4k CCD at 5 sigma, by the grid's bench; never dozens
    assert floor["noise_unflagged"] <= 8, (name, floor)
    assert s["false_unflagged"] <= floor["noise_unflagged"] + 3, (name, s, floor)
