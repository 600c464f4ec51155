"""Tests of apbatch.job.steps.snaps: two snaps of a full LSSTCam CCD whose sky and transparency change."""

import numpy as np
import pytest
from apbatch.image import MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps.snaps import SnapConfig, combine_snaps, fit_snap_model

INST = get_instrument("LSSTCam")
DET = INST.detector(0)
SKY = 600.0
N_CR = 300


def _stamp(sigma: float, h: int, dx: float, dy: float) -> np.ndarray:
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    p = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * sigma**2))
    return p / p.sum()


def _stars(shape, xs, ys, flux, sigma) -> np.ndarray:
    img = np.zeros(shape, np.float32)
    h = 10
    for x, y, f in zip(xs, ys, flux, strict=True):
        xi, yi = int(x), int(y)
        img[yi - h : yi + h + 1, xi - h : xi + h + 1] += f * _stamp(sigma, h, x - xi, y - yi)
    return img


@pytest.fixture(scope="module")
def field():
    """Noise-free star fields of the two snaps (seeing 1.6 then 1.75 px), a flat, read noise."""
    rng = np.random.default_rng(42)
    shape = (DET.ny, DET.nx)
    n = 2500
    xs, ys = rng.uniform(20, DET.nx - 20, n), rng.uniform(20, DET.ny - 20, n)
    flux = np.minimum(400.0 * (1 - rng.uniform(0, 1, n)) ** -1.0, 3e5)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    flat = (1.0 + 0.03 * np.sin(xx / 700.0) * np.cos(yy / 900.0)).astype(np.float32)
    gradient = (1.0 + 0.1 * (xx / shape[1] - 0.5)).astype(np.float32)  # moonlight across the CCD
    del yy, xx
    rn2 = np.full(shape, 6.3**2, np.float32)
    return {
        "stars1": _stars(shape, xs, ys, flux, 1.6),
        "stars2": _stars(shape, xs, ys, flux, 1.75),
        "flat": flat,
        "gradient": gradient,
        "rn2": rn2,
    }


def _cosmic_rays(rng, shape, n=N_CR):
    """(flat indices of every CR pixel, its amplitude, index of its brightest pixel) for n short tracks."""
    pix, amp, peak = [], [], []
    for _ in range(n):
        y, x = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        length = int(rng.integers(1, 5))
        dx, dy = (1, 0) if rng.uniform() < 0.5 else (0, 1)
        a = rng.uniform(300, 5000, length)
        idx = [(y + t * dy) * shape[1] + x + t * dx for t in range(length)]
        pix += idx
        amp += list(a)
        peak.append(idx[int(np.argmax(a))])
    return np.array(pix), np.array(amp, np.float32), np.array(peak)


def _snaps(field, sky_mag, trans_mag, seed):
    """Two noisy snaps (e-, before the flat), their noise-free sum, and the injected CRs of each."""
    rng = np.random.default_rng(seed)
    out = {"true": None, "crs": []}
    snaps = []
    truth = np.zeros_like(field["stars1"])
    for k, stars in enumerate((field["stars1"], field["stars2"])):
        sky = SKY * 10 ** (0.4 * sky_mag * k)
        tk = 10 ** (-0.4 * trans_mag * k)
        clean = (np.float32(sky) * field["gradient"] + np.float32(tk) * stars) * field["flat"]
        truth += clean
        img = clean + rng.standard_normal(clean.shape, dtype=np.float32) * np.sqrt(clean + field["rn2"])
        pix, amp, peak = _cosmic_rays(rng, img.shape)
        np.add.at(img.ravel(), pix, amp)
        out["crs"].append((pix, peak))
        snaps.append((img, np.zeros(img.shape, np.int32)))
    out["true"] = truth
    out["snaps"] = snaps
    return out


def _grown(idx, shape):
    m = np.zeros(shape, bool)
    y, x = np.divmod(idx, shape[1])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m[np.clip(y + dy, 0, shape[0] - 1), np.clip(x + dx, 0, shape[1] - 1)] = True
    return m


@pytest.mark.parametrize("sky_mag, trans_mag", [(0.0, 0.0), (0.1, 0.0), (0.3, 0.0), (0.0, 0.1), (0.0, 0.3)])
def test_sky_and_transparency_change(field, sky_mag, trans_mag):
    """Modelled snaps: only the injected CRs are flagged, >= 95% of them found, the sum is the truth's."""
    s = _snaps(field, sky_mag, trans_mag, seed=int(10 * sky_mag + 100 * trans_mag))
    (i1, m1), (i2, m2) = s["snaps"]
    true_a = 10 ** (-0.4 * trans_mag)
    res = combine_snaps(i1, m1, i2, m2, field["rn2"], field["flat"])
    md = res.metadata
    assert md["SNAPMODE"] == "model"
    assert md["SNAPRATI"] == pytest.approx(true_a, rel=0.02)
    dsky = SKY * (10 ** (0.4 * sky_mag) - 1)  # sky2 - sky1 (at the CCD's mean gradient)
    assert md["SNAPDSKY"] == pytest.approx(dsky, abs=3 + 0.02 * dsky)
    cr = (res.mask & MaskBits.CR) != 0
    assert md["SNAPNCR"] == cr.sum()
    injected = _grown(np.concatenate([s["crs"][0][0], s["crs"][1][0]]), cr.shape)
    # flagged pixels: the grown injected tracks (~2 x 300 x 12) and almost nothing else
    assert cr.sum() < injected.sum() + 200
    assert (cr & ~injected).sum() < 200
    found = cr.ravel()[np.concatenate([peaks for _, peaks in s["crs"]])].mean()
    assert found >= 0.95
    # the sum is the truth's within its noise: no negative streaks where a snap was replaced
    z = (res.image - s["true"]) / np.sqrt(res.variance)
    clean = ~res.interpolate
    assert 0.9 < np.std(z[clean & ~cr]) < 1.1
    assert abs(np.mean(z[cr & clean])) < 0.3
    assert 0.7 < np.std(z[cr & clean]) < 1.5
    assert (z[clean] < -7).sum() < 20


def test_fit_snap_model_recovers_ratio_and_sky(field):
    """The fitted model alone: throughput ratio and sky change of a cloudy, brightening snap."""
    s = _snaps(field, 0.2, 0.2, seed=7)
    (i1, _), (i2, _) = s["snaps"]
    var = np.maximum(i1, 0) + np.maximum(i2, 0) + 2 * field["rn2"]
    model = fit_snap_model(i1, i2, var, np.zeros(i1.shape, bool), field["flat"])
    a = 10 ** (-0.08)
    assert model.a == pytest.approx(a, rel=0.02)
    assert model.ncells > 50
    # b at a few pixels: sky2 - a sky1 times the gradient and the flat
    idx = np.array([0, 123456, i1.size // 2, i1.size - 1])
    b = model.sky_change_at(idx)
    expect = SKY * (10**0.08 - a) * field["gradient"].ravel()[idx] * field["flat"].ravel()[idx]
    assert np.allclose(b, expect, atol=4.0)
    full = model.fill_sky_change(np.empty(i1.shape, np.float32))
    assert np.allclose(full.ravel()[idx], b, atol=1e-2)


def test_disagreeing_snaps_fall_back_to_single(field):
    """A 1.2 mag drop of throughput (clouds) is not modelled: each snap is searched on its own."""
    s = _snaps(field, 0.0, 1.2, seed=5)
    (i1, m1), (i2, m2) = s["snaps"]
    ignore = np.zeros(i1.shape, bool)
    ignore[:2000, :509] = True  # a bad amplifier's box
    res = combine_snaps(i1, m1, i2, m2, field["rn2"], field["flat"], ignore)
    assert res.metadata["SNAPMODE"] == "single"
    cr = (res.mask & MaskBits.CR) != 0
    assert not cr[ignore].any()
    injected = _grown(np.concatenate([s["crs"][0][0], s["crs"][1][0]]), cr.shape)
    assert (cr & ~injected).sum() < 500
    peaks = np.concatenate([peaks for _, peaks in s["crs"]])
    peaks = peaks[~ignore.ravel()[peaks]]
    assert cr.ravel()[peaks].mean() >= 0.9
    assert res.interpolate.sum() == cr.sum()  # single-snap CRs are interpolated
    z = (res.image - s["true"]) / np.sqrt(res.variance)
    assert 0.9 < np.std(z[~cr]) < 1.1


def test_ignored_pixels_are_not_searched(field):
    """Pixels given as ``ignore`` (a dead amplifier) are neither modelled nor flagged."""
    s = _snaps(field, 0.3, 0.0, seed=9)
    (i1, m1), (i2, m2) = s["snaps"]
    a = INST.amplifiers(DET.id)[5]
    bx0, bx1, by0, by1 = a.bbox
    i1[by0:by1, bx0:bx1] = 0.0
    i2[by0:by1, bx0:bx1] = 0.0
    ignore = np.zeros(i1.shape, bool)
    ignore[by0:by1, bx0:bx1] = True
    res = combine_snaps(i1, m1, i2, m2, field["rn2"], field["flat"], ignore, SnapConfig())
    assert res.metadata["SNAPMODE"] == "model"
    cr = (res.mask & MaskBits.CR) != 0
    assert not cr[ignore].any()
    assert cr.sum() < 2 * N_CR * 16


@pytest.mark.parametrize("trans_mag", [0.3, 1.2])
def test_column_defect_is_not_cosmic_rays(field, trans_mag):
    """A low-response column missing from the defect list differs between snaps that change: not CRs."""
    s = _snaps(field, 0.3, trans_mag, seed=11)
    (i1, m1), (i2, m2) = s["snaps"]
    i1[:, 2222] *= 0.2
    i2[:, 2222] *= 0.2
    res = combine_snaps(i1, m1, i2, m2, field["rn2"], field["flat"])
    assert res.metadata["SNAPMODE"] == ("model" if trans_mag < 1 else "single")
    cr = (res.mask & MaskBits.CR) != 0
    assert cr[:, 2222].sum() < 30
    assert res.metadata["SNAPNCR"] < 2 * N_CR * 16
