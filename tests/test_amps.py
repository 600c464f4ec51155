"""Tests of apbatch.job.steps.amps on assembled CCD images of the real camera geometries."""

import numpy as np
import pytest
from apbatch.image import MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps.amps import (
    AmpHealthConfig,
    amp_statistics,
    classify_amps,
    format_bad_amps,
    mask_amps,
)


def _ccd(inst_name, sky, seed=0, stars=True):
    """Assembled e- image: sky + a few bright stars + Poisson and each amplifier's read noise."""
    inst = get_instrument(inst_name)
    det = inst.detector(0)
    amps = inst.amplifiers(det.id)
    rng = np.random.default_rng(seed)
    img = np.full((det.ny, det.nx), sky, np.float32)
    if stars:
        y, x = np.mgrid[-8:9, -8:9]
        psf = np.exp(-(x**2 + y**2) / (2 * 1.7**2))
        for xs, ys in rng.uniform(20, min(det.nx, det.ny) - 20, (200, 2)):
            img[int(ys) - 8 : int(ys) + 9, int(xs) - 8 : int(xs) + 9] += 3e3 * psf
    rn = np.zeros_like(img)
    for a in amps:
        bx0, bx1, by0, by1 = a.bbox
        rn[by0:by1, bx0:bx1] = a.read_noise
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(np.maximum(img, 0) + rn**2)
    return inst, amps, img, np.zeros(img.shape, np.int32), rng


@pytest.mark.parametrize("inst_name", ["LSSTCam", "LSSTComCam", "LATISS"])
def test_healthy_ccd_has_no_bad_amp(inst_name):
    inst, amps, img, mask, _ = _ccd(inst_name, 600.0)
    stats = amp_statistics(img, mask, amps)
    assert len(stats) == len(amps)
    for s, a in zip(stats, amps, strict=True):
        assert s.level == pytest.approx(600.0, abs=5)
        assert s.noise == pytest.approx(s.predicted_noise, rel=0.1)
        assert s.read_noise == a.read_noise
    assert classify_amps(stats) == {}


@pytest.mark.parametrize("inst_name", ["LSSTCam", "LSSTComCam", "LATISS"])
def test_dead_hot_and_saturated_amps(inst_name):
    """One amp reads bias only, one glows 2000 e-, one has 100 e- rms of pickup noise, one is saturated."""
    inst, amps, img, mask, rng = _ccd(inst_name, 600.0, seed=1)
    dead, hot, noisy, sat = amps[2], amps[9], amps[12], amps[15]
    bx0, bx1, by0, by1 = dead.bbox
    img[by0:by1, bx0:bx1] = rng.standard_normal((by1 - by0, bx1 - bx0)) * dead.read_noise
    bx0, bx1, by0, by1 = hot.bbox
    img[by0:by1, bx0:bx1] += 2000.0 + rng.standard_normal((by1 - by0, bx1 - bx0)) * np.sqrt(2000.0)
    bx0, bx1, by0, by1 = noisy.bbox
    img[by0:by1, bx0:bx1] += rng.standard_normal((by1 - by0, bx1 - bx0)) * 100.0
    bx0, bx1, by0, by1 = sat.bbox
    mask[by0 : by0 + int(0.8 * (by1 - by0)), bx0:bx1] |= MaskBits.SAT
    bad = classify_amps(amp_statistics(img, mask, amps))
    assert bad == {dead.name: "dead", hot.name: "hot", noisy.name: "hot", sat.name: "saturated"}
    out = mask_amps(mask, amps, bad)
    for a in amps:
        bx0, bx1, by0, by1 = a.bbox
        box = mask[by0:by1, bx0:bx1]
        flagged = (box & (MaskBits.BAD | MaskBits.NO_DATA)) == (MaskBits.BAD | MaskBits.NO_DATA)
        assert flagged.all() == (a.name in bad)
        assert out[by0:by1, bx0:bx1].all() == (a.name in bad)
    assert out.sum() == sum((a.bbox[1] - a.bbox[0]) * (a.bbox[3] - a.bbox[2]) for a in amps if a.name in bad)
    assert format_bad_amps(bad) == ",".join(f"{n}:{bad[n]}" for n in sorted(bad))


@pytest.mark.parametrize("sky", [0.5, 3.0, 20.0])
def test_dark_ccd_is_not_dead(sky):
    """Twilight / short exposure: every amp sees little light; none is dead, nor hot."""
    inst, amps, img, mask, _ = _ccd("LSSTCam", sky, seed=2, stars=False)
    assert classify_amps(amp_statistics(img, mask, amps)) == {}


def test_dead_amp_on_a_faint_sky_and_the_thresholds():
    """A dead amp is found once the others see 5 read-noise sigmas of sky; the threshold is a setting."""
    inst, amps, img, mask, rng = _ccd("LSSTCam", 60.0, seed=3, stars=False)
    a = amps[4]
    bx0, bx1, by0, by1 = a.bbox
    img[by0:by1, bx0:bx1] = rng.standard_normal((by1 - by0, bx1 - bx0)) * a.read_noise
    stats = amp_statistics(img, mask, amps)
    assert classify_amps(stats) == {a.name: "dead"}
    assert classify_amps(stats, AmpHealthConfig(dead_min_snr=20.0)) == {}


def test_flat_corrects_levels():
    """A vignetted CCD (flat 0.6 at one end) is not read as a dead or hot amp once the flat is given."""
    inst, amps, img, mask, _ = _ccd("LSSTCam", 600.0, seed=4, stars=False)
    ny, nx = img.shape
    flat = np.broadcast_to(np.linspace(1.3, 0.06, nx, dtype=np.float32), (ny, nx))
    img *= flat
    assert classify_amps(amp_statistics(img, mask, amps)) != {}
    assert classify_amps(amp_statistics(img, mask, amps, flat)) == {}
