"""Tests of apbatch.job.steps.isr on synthetic raws with the real LSSTComCam amplifier geometry."""

import dataclasses

import numpy as np
import pytest
from apbatch.errors import BadInputError, ExitCode
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps.isr import IsrConfig, _add_read_noise2, _read_noise2, run_isr
from steps_scene import render_psf, to_raw

INST = get_instrument("LSSTComCam")
DET = INST.detector(0)


def _truth(seed=0):
    """Noise-free assembled sky (e-): a gradient that reveals flips, plus a few stars."""
    ny, nx = DET.ny, DET.nx
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    img = 500.0 + 0.05 * x + 0.02 * y
    rng = np.random.default_rng(seed)
    for xs, ys in rng.uniform(100, 3900, (20, 2)):
        xi, yi = int(xs), int(ys)
        img[yi - 12 : yi + 13, xi - 12 : xi + 13] += 2e4 * render_psf("gauss", 1.7)
    return img.astype(np.float32)


def _raw(img, snap=0, nsnaps=1, noise=False, seed=0):
    return to_raw(img, INST, DET, np.random.default_rng(seed), snap, nsnaps, 10.0, -5.0, 0.0, noise=noise)


@pytest.fixture(scope="module")
def truth():
    return _truth()


def test_assembly_overscan_gain(truth):
    """Noise-free raw -> ISR gives back the assembled electrons (flips, overscan drift, gain)."""
    out = run_isr([_raw(truth)], INST, DET, config=IsrConfig(cr_single=False))
    assert out.shape == (DET.ny, DET.nx)
    # ADU rounding of data and overscan (<= 1 ADU * gain in all) is the only error
    gmax = max(a.gain for a in INST.amplifiers(0))
    assert np.abs(out.image - truth).max() < 1.05 * gmax
    assert abs(float(np.mean(out.image - truth))) < 0.1
    assert out.mask.max() == 0
    rn2 = {(a.bbox[0], a.bbox[2]): a.read_noise**2 for a in INST.amplifiers(0)}
    a = INST.amplifiers(0)[3]
    yy, xx = a.bbox[2] + 10, a.bbox[0] + 10
    assert out.variance[yy, xx] == pytest.approx(truth[yy, xx] + rn2[(a.bbox[0], a.bbox[2])], rel=1e-3)
    assert out.metadata["EXPTIME"] == 15.0 and out.metadata["NSNAPS"] == 1
    assert out.metadata["NJY_PER_E"] == 0.5
    ref = INST.sky_wcs(DET, 10.0, -5.0, 0.0)
    assert np.allclose(out.wcs.pixel_to_world_values(100, 200), ref.pixel_to_world_values(100, 200))


def test_bias_flat_saturation_and_defects(truth):
    ny, nx = truth.shape
    flat = np.ones_like(truth)
    flat[:, : nx // 2] = 1.1
    bias = np.full_like(truth, 7.0)
    bias_mask = np.zeros(truth.shape, np.int32)
    bias_mask[:, 1234] = MaskBits.BAD
    raw = _raw(truth * flat + bias)
    # saturate one raw pixel of amp C10 (flip_x, flip_y): data (x=3+5, y=10) -> CCD (508-5, 3999-10)
    a = INST.amplifiers(0)[0]
    seg = next(s for s in raw.segments if s.amp.extname == a.extname)
    seg.data[10, a.data[0] + 5] = int(a.saturation) + 5
    out = run_isr([raw], INST, DET, Image(bias, None, bias_mask), Image(flat), IsrConfig(cr_single=False))
    sat = np.argwhere((out.mask & MaskBits.SAT) != 0)
    assert sat.tolist() == [[a.bbox[3] - 1 - 10, a.bbox[1] - 1 - 5]]
    assert (out.mask[:, 1234] & MaskBits.BAD).all() and (out.mask[:, 1234] & MaskBits.INTRP).all()
    good = out.mask == 0
    assert np.abs(out.image - truth)[good].max() < 1.05 * 1.1 * max(a.gain for a in INST.amplifiers(0))


def test_two_snaps_reject_cosmic_ray(truth):
    rng = np.random.default_rng(3)
    s1 = truth + rng.normal(0, np.sqrt(truth)).astype(np.float32)
    s2 = truth + rng.normal(0, np.sqrt(truth)).astype(np.float32)
    s1[2000, 1500] += 3000.0
    out = run_isr([_raw(s1, 0, 2, noise=True, seed=1), _raw(s2, 1, 2, noise=True, seed=2)], INST, DET)
    assert out.mask[2000, 1500] & MaskBits.CR
    assert out.image[2000, 1500] == pytest.approx(2 * truth[2000, 1500], abs=200)
    assert out.metadata["EXPTIME"] == 30.0 and out.metadata["NSNAPS"] == 2
    assert out.metadata["MJDMID"] > out.metadata["MJDBEG"]
    cr = (out.mask & MaskBits.CR) != 0
    # the CR (grown to 3x3) plus 4.5-sigma noise pixels (16M x 7e-6 ~ 110, grown) and never the stars
    assert cr.sum() < 9 * 200
    assert not cr[truth > 1500].any()
    resid = (out.image - 2 * truth) / np.sqrt(out.variance)
    assert 0.9 < np.std(resid[out.mask == 0]) < 1.15


def test_bad_inputs(truth):
    raw = _raw(truth)
    with pytest.raises(BadInputError, match="missing amplifier segments Segment10") as ei:
        run_isr([dataclasses.replace(raw, segments=raw.segments[1:])], INST, DET)
    assert ei.value.exit_code == ExitCode.BAD_INPUT
    segs = list(raw.segments)
    segs[2] = dataclasses.replace(segs[2], data=segs[2].data[:100])
    with pytest.raises(BadInputError, match=r"raw.segments\[Segment12\]: shape"):
        run_isr([dataclasses.replace(raw, segments=segs)], INST, DET)
    segs = list(raw.segments)
    nan = segs[4].data.astype(np.float32)
    nan[:500] = np.nan
    segs[4] = dataclasses.replace(segs[4], data=nan)
    with pytest.raises(BadInputError, match="NaN"):
        run_isr([dataclasses.replace(raw, segments=segs)], INST, DET)
    with pytest.raises(BadInputError, match="raw.detector"):
        run_isr([raw], INST, INST.detector(1))
    with pytest.raises(BadInputError, match="raws"):
        run_isr([raw, raw, raw], INST, DET)
    with pytest.raises(BadInputError, match="raws"):
        run_isr([], INST, DET)
    with pytest.raises(BadInputError, match="bias"):
        run_isr([raw], INST, DET, bias=Image(np.zeros((10, 10), np.float32)))
    with pytest.raises(BadInputError, match="twice"):
        run_isr([dataclasses.replace(raw, segments=raw.segments + raw.segments[:1])], INST, DET)


def test_few_nans_are_masked_bad(truth):
    raw = _raw(truth)
    segs = list(raw.segments)
    a = segs[0].amp
    d = segs[0].data.astype(np.float32)
    d[7, a.data[0] + 3] = np.nan
    segs[0] = dataclasses.replace(segs[0], data=d)
    out = run_isr([dataclasses.replace(raw, segments=segs)], INST, DET, config=IsrConfig(cr_single=False))
    y, x = a.bbox[3] - 1 - 7, a.bbox[1] - 1 - 3
    assert out.mask[y, x] & MaskBits.BAD and out.mask[y, x] & MaskBits.INTRP
    assert np.isfinite(out.image).all()
    assert abs(out.image[y, x] - truth[y, x]) < 5


def _noisy(truth, rng):
    return truth + rng.normal(0, np.sqrt(truth)).astype(np.float32)


def test_two_snaps_with_transparency_and_sky_change(truth):
    """Snap 2 loses 0.3 mag of transparency and its sky brightens by 0.3 mag: modelled, not flagged."""
    rng = np.random.default_rng(4)
    a, sky2 = 10 ** (-0.12), 500.0 * (10**0.12 - 1)
    t2 = (truth - 500.0) * a + 500.0 + sky2  # the gradient (sky) of _truth stays, scaled by a
    s1, s2 = _noisy(truth, rng), _noisy(t2, rng)
    s2[1000, 3000] += 2500.0
    out = run_isr([_raw(s1, 0, 2, noise=True, seed=1), _raw(s2, 1, 2, noise=True, seed=2)], INST, DET)
    md = out.metadata
    assert md["SNAPMODE"] == "model"
    assert md["SNAPRATI"] == pytest.approx(a, rel=0.03)
    assert md["AMPSBAD"] == ""
    cr = (out.mask & MaskBits.CR) != 0
    assert cr[1000, 3000] and md["SNAPNCR"] == cr.sum()
    # one CR (3x3) plus a few 4.5-sigma noise pixels; without the model every pixel differs by ~4 sigma
    assert cr.sum() < 9 * 200
    # the CR pixel holds the visit's value predicted from snap 1
    assert out.image[1000, 3000] == pytest.approx(truth[1000, 3000] + t2[1000, 3000], abs=250)
    resid = (out.image - truth - t2) / np.sqrt(out.variance)
    assert 0.9 < np.std(resid[out.mask == 0]) < 1.15
    assert abs(np.mean(resid[out.mask == 0])) < 0.1


def test_dead_amp_is_masked_not_interpolated(truth):
    """Amplifiers reading only bias and read noise, or glowing, are masked BAD | NO_DATA, named in AMPSBAD."""
    rng = np.random.default_rng(5)
    dead, hot = INST.amplifiers(0)[6], INST.amplifiers(0)[1]
    bx0, bx1, by0, by1 = dead.bbox
    hx0, hx1, hy0, hy1 = hot.bbox
    assert hx1 <= bx0 and hy0 >= by0  # the hot amp is left of the dead one, in the same row
    snaps = []
    for k in range(2):
        s = _noisy(truth, rng)
        s[by0:by1, bx0:bx1] = 0.0
        s[hy0:hy1, hx0:hx1] += 3000.0 + rng.normal(0, 55.0, (hy1 - hy0, hx1 - hx0)).astype(np.float32)
        snaps.append(_raw(s, k, 2, noise=True, seed=10 + k))
    # a defect column just outside the dead amp: interpolated from the live side only
    bias_mask = np.zeros(truth.shape, np.int32)
    bias_mask[by0:by1, bx1] = MaskBits.BAD
    out = run_isr(snaps, INST, DET, Image(np.zeros_like(truth), None, bias_mask))
    assert out.metadata["AMPSBAD"] == ",".join(sorted([f"{dead.name}:dead", f"{hot.name}:hot"]))
    hbox = out.mask[hy0:hy1, hx0:hx1]
    assert (hbox & MaskBits.NO_DATA).all() and not (hbox & (MaskBits.INTRP | MaskBits.CR)).any()
    col = out.image[by0 + 10 : by1 - 10, bx1] / (2 * truth[by0 + 10 : by1 - 10, bx1])
    assert (out.mask[by0:by1, bx1] & MaskBits.INTRP).all()
    assert 0.97 < np.median(col) < 1.03
    box = out.mask[by0:by1, bx0:bx1]
    assert (box & MaskBits.NO_DATA).all() and (box & MaskBits.BAD).all()
    assert not (box & (MaskBits.INTRP | MaskBits.CR)).any()
    assert not (out.mask & MaskBits.NO_DATA)[:, bx1:].any() and not (out.mask & MaskBits.NO_DATA)[:by0].any()
    assert out.metadata["SNAPMODE"] == "model" and out.metadata["SNAPNCR"] < 9 * 200
    # the other amplifiers are untouched: no bad columns flagged at the dead amp's edges
    assert not (out.mask[by0:by1, bx1 + 1 : bx1 + 4] & MaskBits.BAD).any()


def test_amp_check_can_be_turned_off(truth):
    raw = _raw(np.where(np.arange(truth.shape[1]) < 509, np.float32(0), truth).astype(np.float32))
    cfg = IsrConfig(cr_single=False)
    left = sorted(f"{a.name}:dead" for a in INST.amplifiers(0) if a.bbox[0] == 0)
    assert run_isr([raw], INST, DET, config=cfg).metadata["AMPSBAD"] == ",".join(left)
    off = run_isr([raw], INST, DET, config=dataclasses.replace(cfg, amp_check=False))
    assert off.metadata["AMPSBAD"] == "" and not (off.mask & MaskBits.NO_DATA).any()


def test_all_amps_saturated_is_bad_input(truth):
    """A CCD saturated everywhere (light leak) is unusable: bad input, not a job that finds nothing."""
    raw = _raw(np.full_like(truth, 4e5))
    with pytest.raises(BadInputError, match="every amplifier is bad") as ei:
        run_isr([raw], INST, DET, config=IsrConfig(cr_single=False))
    assert ei.value.exit_code == ExitCode.BAD_INPUT


def test_two_snaps_are_the_same_with_two_threads(truth):
    from apbatch.job.steps import parallel

    rng = np.random.default_rng(5)
    raws = [_raw(truth + rng.normal(0, np.sqrt(truth)).astype(np.float32), i, 2, noise=True, seed=i + 1)
            for i in range(2)]
    one = run_isr(raws, INST, DET)
    parallel.set_threads(2)
    try:
        two = run_isr(raws, INST, DET)
    finally:
        parallel.set_threads(1)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(one, plane), getattr(two, plane))


def test_compact_calibrations_and_released_raws_give_the_same_image(truth):
    """What a job holds in less memory changes nothing: calibrations with a uint16 mask and a
    zero-stride variance (`ButlerIO.read_calib`), raw segments released after assembly, and the
    read noise added per amplifier give the same planes bit for bit."""
    rng = np.random.default_rng(3)
    flat = (1.0 + 0.02 * rng.standard_normal(truth.shape)).astype(np.float32)
    bias_mask = np.zeros(truth.shape, np.int32)
    bias_mask[:, 1234] = MaskBits.BAD
    bias = np.full_like(truth, 7.0)
    noisy = (truth * flat + bias + rng.normal(0, 20, truth.shape)).astype(np.float32)
    flat[5, 7] = np.nan  # a bad flat pixel: masked BAD, divided by 1
    full = run_isr([_raw(noisy, noise=True, seed=4)], INST, DET, Image(bias, None, bias_mask), Image(flat))
    zero = np.broadcast_to(np.float32(0), truth.shape)
    raw = _raw(noisy, noise=True, seed=4)
    compact = run_isr([raw], INST, DET, Image(bias, zero, bias_mask.astype(np.uint16)),
                      Image(flat, zero, np.zeros(truth.shape, np.uint16)), release_raws=True)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(full, plane), getattr(compact, plane))
    assert raw.segments == [] and raw.metadata.detector == DET.id  # pixels dropped, metadata kept
    assert (compact.mask[5, 7] & MaskBits.BAD) and (compact.mask[:, 1234] & MaskBits.BAD).all()
    # the read noise added amplifier by amplifier is the sum with the CCD-sized read-noise array
    var = rng.uniform(0, 1e4, truth.shape).astype(np.float32)
    expected = var + _read_noise2(INST.amplifiers(0), DET)
    _add_read_noise2(var, INST.amplifiers(0))
    np.testing.assert_array_equal(var, expected)
