"""Tests for the simulator's raws (apbatch.sim.raws, camera, calibs): headers, WCS, layout, calibration."""

import dataclasses

import numpy as np
import pytest
from apbatch.ids import visit_id_from_group
from apbatch.instruments import get_instrument
from apbatch.raw import read_raw, translate_header
from apbatch.sim import camera
from apbatch.sim.calibs import detector_signature, make_bias, make_flat
from apbatch.sim.raws import ExposureSpec, render_exposure, simulate_ccd
from apbatch.sim.sky import SkyModel

SEED = 11


def _spec(**kw):
    base = {
        "instrument": "LSSTComCam",
        "day_obs": 20251015,
        "seq_num": 42,
        "controller": "O",
        "image_type": "OBJECT",
        "exptime": 30.0,
        "mjd_begin": 60964.05,
        "physical_filter": "r_03",
        "group_id": "2025-10-16T01:11:26.692",
        "image_index": 1,
        "images_in_sequence": 1,
        "ra": 53.0,
        "dec": -28.0,
        "ra_start": 53.0001,
        "dec_start": -27.9999,
        "rotation": 37.0,
        "seeing": 0.8,
    }
    return ExposureSpec(**(base | kw))


def assemble(raw, sig=None):
    """Reference assembly: overscan-subtract (median of the serial overscan), x gain, flip, place."""
    det = get_instrument(raw.metadata.instrument).detector(raw.metadata.detector)
    out = np.zeros((det.ny, det.nx), np.float64)
    for seg in raw.segments:
        a = seg.amp
        sx0, sx1, sy0, sy1 = a.serial_overscan
        bias = np.median(seg.data[sy0:sy1, sx0:sx1])
        x0, x1, y0, y1 = a.data
        pix = (seg.data[y0:y1, x0:x1] - bias) * a.gain
        if a.flip_x:
            pix = pix[:, ::-1]
        if a.flip_y:
            pix = pix[::-1, :]
        bx0, bx1, by0, by1 = a.bbox
        out[by0:by1, bx0:bx1] = pix
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "r.fits"
    sky = SkyModel(SEED, 60964.0)
    sim = simulate_ccd(_spec(), 4, sky, SEED, path)
    return sim, read_raw(path)


def test_header_round_trip(rendered):
    sim, raw = rendered
    m = raw.metadata
    spec = _spec()
    assert (m.instrument, m.detector, m.obs_id) == ("LSSTComCam", 4, spec.obs_id)
    assert (m.group_id, m.observation_type, m.physical_filter, m.band) == (
        spec.group_id,
        "science",
        "r_03",
        "r",
    )
    assert (m.ra, m.dec, m.rotation) == (spec.ra_start, spec.dec_start, spec.rotation)
    assert m.exposure_time == 30.0 and m.dark_time > 30.0 and m.mjd_begin == spec.mjd_begin
    assert m.visit_id == visit_id_from_group(spec.group_id) and m.exposure_id == 2025101500042
    assert m.airmass is not None and m.airmass >= 1.0
    direct = dataclasses.asdict(translate_header(sim.header))
    for key, value in dataclasses.asdict(m).items():  # FITS cards keep ~15 significant digits
        assert direct[key] == (pytest.approx(value, rel=1e-14) if isinstance(value, float) else value), key
    for key in (
        "OBSID",
        "GROUPID",
        "DAYOBS",
        "SEQNUM",
        "CAMCODE",
        "CONTRLLR",
        "IMGTYPE",
        "TESTTYPE",
        "REASON",
        "PROGRAM",
        "INSTRUME",
        "TELESCOP",
        "FILTER",
        "FILTBAND",
        "EXPTIME",
        "SHUTTIME",
        "DARKTIME",
        "RA",
        "DEC",
        "RASTART",
        "DECSTART",
        "RAEND",
        "DECEND",
        "ROTPA",
        "ROTCOORD",
        "TRACKSYS",
        "RADESYS",
        "MJD-BEG",
        "MJD-END",
        "DATE-BEG",
        "DATE-END",
        "TIMESYS",
        "AMSTART",
        "AMEND",
        "ELSTART",
        "AZSTART",
        "RAFTBAY",
        "CCDSLOT",
        "LSST_NUM",
        "CCD_MANU",
        "CURINDEX",
        "MAXINDEX",
        "VIGNETTE",
    ):
        assert key in raw.header, key
    assert (
        raw.header["INSTRUME"] == "ComCam"
        and raw.header["LSST_NUM"] == get_instrument("LSSTComCam").detector(4).serial
    )
    seg = raw.segments[0]
    assert seg.data.shape == (2048, 576) and seg.data.dtype == np.int32
    for key in (
        "CHANNEL",
        "DATASEC",
        "DETSEC",
        "DTV1",
        "DTV2",
        "DTM1_1",
        "DTM2_2",
        "DETSIZE",
        "BZERO",
        "BSCALE",
    ):
        assert key in seg.header, key


def test_truth_star_on_reader_wcs(rendered):
    sim, raw = rendered
    m = raw.metadata
    wcs = get_instrument(m.instrument).sky_wcs(m.detector, m.ra, m.dec, m.rotation)
    t = sim.truth
    x, y = wcs.world_to_pixel_values(t["ra"].to_numpy(), t["dec"].to_numpy())
    assert len(t) > 1000
    assert np.max(np.hypot(x - t["x"], y - t["y"])) < 0.01


def test_pixels_put_stars_where_the_wcs_says(rendered):
    """Centroids of isolated bright stars in the reference-assembled image sit on the truth (x, y)."""
    sim, raw = rendered
    img = assemble(raw)
    t = sim.truth
    stars = t[
        (t["kind"] == "star")
        & ~t["saturated"]
        & (t["flux_e"] > 2e5)
        & (t["flux_e"] < 1e6)
        & t["x"].between(20, 4050)
        & t["y"].between(20, 3980)
    ]
    xs, ys = t["x"].to_numpy(), t["y"].to_numpy()
    offsets = []
    for _, s in stars.iterrows():
        d = np.hypot(xs - s["x"], ys - s["y"])
        if np.sum((d < 15) & (t["flux_e"].to_numpy() > 0.01 * s["flux_e"])) > 1:
            continue  # a neighbour
        xi, yi = int(round(s["x"])), int(round(s["y"]))
        cut = img[yi - 8 : yi + 9, xi - 8 : xi + 9]
        cut = cut - np.median(img[yi - 20 : yi + 21, xi - 20 : xi + 21])
        gy, gx = np.mgrid[-8:9, -8:9]
        w = np.clip(cut, 0, None)
        cx, cy = (w * gx).sum() / w.sum() + xi, (w * gy).sum() / w.sum() + yi
        offsets.append((cx - s["x"], cy - s["y"]))
    off = np.array(offsets)
    assert len(off) >= 5
    # no systematic shift (a flip or half-pixel error would show here), little scatter
    assert np.all(np.abs(np.median(off, axis=0)) < 0.03), np.median(off, axis=0)
    assert np.mean(np.hypot(off[:, 0], off[:, 1]) < 0.2) > 0.9


class _ZeroRng:
    def standard_normal(self, shape, dtype=np.float64):
        return np.zeros(shape, dtype)


def test_disassembly_reverses_assembly():
    sig = detector_signature("LSSTComCam", 2, SEED)
    det = sig.detector
    yy, xx = np.mgrid[0 : det.ny, 0 : det.nx]
    electrons = (1000 + 3 * xx + 7 * yy).astype(np.float32)  # distinct everywhere: any flip shows
    segs = camera.to_segments(electrons, sig, _ZeroRng())
    back = np.zeros_like(electrons, dtype=np.float64)
    for k, seg in enumerate(segs):
        a = seg.amp
        x0, x1, y0, y1 = a.data
        assert np.all(seg.data[:, a.serial_overscan[0] : a.serial_overscan[1]] == sig.bias_level[k])
        assert np.all(seg.data[a.parallel_overscan[2] : a.parallel_overscan[3], :] == sig.bias_level[k])
        pix = (seg.data[y0:y1, x0:x1] - sig.bias_level[k] - sig.bias_structure(a)) * sig.gain_true[k]
        pix = pix[:, ::-1] if a.flip_x else pix
        pix = pix[::-1, :] if a.flip_y else pix
        back[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]] = pix
    assert np.max(np.abs(back - electrons) / np.array([s.gain_true for s in [sig]][0]).max()) <= 1.0


def test_calibration_products_flatten_the_raw(tmp_path):
    """overscan -> x nominal gain -> - bias -> / flat gives a flat image: no amp steps, no vignetting."""
    spec = _spec(
        image_type="FLAT",
        controller="C",
        group_id=None,
        exptime=5.0,
        ra=None,
        dec=None,
        ra_start=None,
        dec_start=None,
        rotation=None,
        flat_level=20000.0,
    )
    sim = render_exposure(spec, 4, None, SEED, cosmic_rays=False)
    from apbatch.raw import RawExposure

    raw = RawExposure(sim.header, translate_header(sim.header), sim.segments)
    assert raw.metadata.observation_type == "flat" and raw.metadata.group_id == str(raw.metadata.exposure_id)
    sig = detector_signature("LSSTComCam", 4, SEED)
    img = assemble(raw)
    corrected = (img - make_bias(sig, SEED).image) / make_flat(sig, "r_03", SEED).image
    good = sig.mask() == 0
    amp_medians = [
        np.median(
            corrected[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]][
                good[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]]
            ]
        )
        for a in sig.amps
    ]
    level = 20000.0 + 0.002 * spec.dark_time
    assert np.allclose(amp_medians, level, rtol=2e-3)
    raw_medians = [np.median(img[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]]) for a in sig.amps]
    assert np.ptp(raw_medians) / level > 0.01  # the uncorrected image does show the gain steps


def test_saturation_cosmic_rays_and_bad_columns(rendered):
    sim, raw = rendered
    assert sim.truth["saturated"].any()
    seg_max = max(int(s.data.max()) - int(np.median(s.data)) for s in raw.segments)
    assert seg_max > 100000  # saturated cores reach the ADC limit region
    img = np.zeros((50, 50), np.float32)
    hits = camera.add_cosmic_rays(img, 3, np.random.default_rng(1))
    assert len(hits) == 3 and img.sum() == pytest.approx(sum(h[2] for h in hits), rel=1e-5)
    sig = detector_signature("LSSTComCam", 4, SEED)
    assert {c[3] for c in sig.bad_columns} == {"dead", "hot"} and sig.mask().any()


def test_kinds_and_snr_in_truth(rendered):
    t = rendered[0].truth
    assert {"star", "galaxy"} <= set(t["kind"])
    assert 2000 < (t["kind"] == "star").sum() < 5000
    assert (t["flux_e"] >= 0).all() and (t["noise_var_e"] > 0).all()


def test_noise_statistics():
    rng = np.random.default_rng(3)
    for lam in (5.0, 150.0, 5000.0):
        x = camera.add_noise(np.full((400, 400), lam, np.float32), rng)
        assert x.mean() == pytest.approx(lam, rel=0.01) and x.var() == pytest.approx(lam, rel=0.03)
        assert np.all(x == np.rint(x))


def test_deterministic():
    a = render_exposure(_spec(exptime=1.0), 4, SkyModel(SEED, 60964.0), SEED)
    b = render_exposure(_spec(exptime=1.0), 4, SkyModel(SEED, 60964.0), SEED)
    for sa, sb in zip(a.segments, b.segments, strict=False):
        np.testing.assert_array_equal(sa.data, sb.data)
