"""Tests for apbatch.raw: header translation (every real header), FITS reading and writing."""

import math
from pathlib import Path

import fitsio
import numpy as np
import pytest
import yaml
from apbatch.errors import BadInputError
from apbatch.instruments import get_instrument
from apbatch.raw import RawSegment, read_raw, read_raw_header, segment_header, translate_header, write_raw

HEADERS = Path(__file__).parent / "data" / "headers"

# The expected-values table of shared/data/headers/README.md (obs_lsst's test_translator.py).
EXPECTED = {
    "lsstCam-MC_O_20250609_000578_R01_S01.yaml": {
        "exposure_id": 2025060900578,
        "group_id": "2025-06-10T07:31:26.692",
        "visit_id": 3294702866920000,
        "detector": 1,
        "observation_type": "science",
        "physical_filter": "z_20",
        "exposure_time": 30.000904321670532,
    },
    "lsstCam-MC_C_20250425_000031_R01_S01.yaml": {
        "exposure_id": 2025042500031,
        "group_id": "2025042500031",
        "visit_id": 2025042500031,
        "detector": 1,
        "observation_type": "unknown",
        "physical_filter": "unknown",
        "exposure_time": 2.767,
    },
    "comCam-CC_O_20241108_000266_R22_S00.yaml": {
        "exposure_id": 2024110800266,
        "group_id": "2024-11-09T06:33:55.311",
        "visit_id": 3110636353110000,
        "detector": 0,
        "observation_type": "science",
        "physical_filter": "g_01",
        "exposure_time": 30.0,
    },
    "latiss-AT_O_20240624_000106_R00_S00.yaml": {
        "exposure_id": 2024062400106,
        "group_id": "2024-06-25T01:26:31.895#1",
        "visit_id": 2992083918950001,
        "detector": 0,
        "observation_type": "cwfs",
        "physical_filter": "SDSSr_65mm~empty",
        "exposure_time": 30.0,
    },
    "lsstCamSim-MC_S_20240321_000720_R22_S11.yaml": {
        "exposure_id": 7024032100720,
        "group_id": "7024032100720",
        "visit_id": 7024032100720,
        "detector": 94,
        "observation_type": "science",
        "physical_filter": "r_57",
        "exposure_time": 30.0,
    },
    "lsstCam_MC_C_20231125_000600_R12_S10.yaml": {
        "exposure_id": 2023112500600,
        "group_id": "2023112500600",
        "visit_id": 2023112500600,
        "detector": 48,
        "observation_type": "flat",
        "physical_filter": "none",
        "exposure_time": 15.0,
    },
}


def _load(name):
    return yaml.safe_load((HEADERS / name).read_text())


def test_every_header_file_has_expectations():
    assert sorted(p.name for p in HEADERS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_translate_real_header(name):
    meta = translate_header(_load(name))
    for key, want in EXPECTED[name].items():
        got = getattr(meta, key)
        if isinstance(want, float):
            assert math.isclose(got, want, rel_tol=1e-12), (key, got, want)
        else:
            assert got == want, (key, got, want)


def test_translate_details():
    comcam = translate_header(_load("comCam-CC_O_20241108_000266_R22_S00.yaml"))
    assert (comcam.instrument, comcam.detector_name, comcam.band) == ("LSSTComCam", "R22_S00", "g")
    assert (comcam.ra, comcam.dec) == (53.312407782266014, -27.994761670941685)  # RASTART, not RA
    assert comcam.rotation == pytest.approx(102.79926387330579)
    assert comcam.image_index == 1 and comcam.science_program == "PP-SURVEY" and comcam.can_see_sky
    fixed = translate_header(_load("lsstCam-MC_O_20250609_000578_R01_S01.yaml"))
    assert fixed.band == "z"  # FILTBAND says y, obs_lsst's correction says z
    flat = translate_header(_load("lsstCam_MC_C_20231125_000600_R12_S10.yaml"))
    assert flat.ra is None and flat.band is None and flat.detector_name == "R12_S10"
    unknown = translate_header(_load("lsstCam-MC_C_20250425_000031_R01_S01.yaml"))
    assert unknown.ra is None and unknown.rotation is None and unknown.dark_time == 1469.57
    sim = translate_header(_load("lsstCamSim-MC_S_20240321_000720_R22_S11.yaml"))
    assert sim.instrument == "LSSTCamSim" and sim.mjd_end > sim.mjd_begin  # computed from EXPTIME


def test_tracking_and_instrument_override():
    h = _load("comCam-CC_O_20241108_000266_R22_S00.yaml")
    assert translate_header({**h, "TRACKSYS": "AZEL"}).ra is None
    assert translate_header({**h, "RASTART": None, "DECSTART": None}).ra == pytest.approx(53.1255)
    assert translate_header({**h, "IMGTYPE": "BIAS"}).ra is None
    assert translate_header({**h, "INSTRUME": None}).instrument == "LSSTComCam"  # from CAMCODE
    assert translate_header({**h, "SHUTTIME": 0.0, "EXPTIME": 15.0}).exposure_time == 15.0
    assert translate_header({**h, "VIGNETTE": "FULLY"}).can_see_sky is False


@pytest.mark.parametrize(
    "change, field",
    [
        ({"RAFTBAY": None}, "RAFTBAY/CCDSLOT"),
        ({"CCDSLOT": "S99"}, "RAFTBAY/CCDSLOT"),
        ({"EXPTIME": None}, "EXPTIME"),
        ({"EXPTIME": "thirty"}, "EXPTIME"),
        ({"INSTRUME": "HSC"}, "INSTRUME"),
        ({"OBSID": None, "DAYOBS": None}, "DAYOBS/SEQNUM"),
    ],
)
def test_translate_bad_headers(change, field):
    h = {**_load("comCam-CC_O_20241108_000266_R22_S00.yaml"), **change}
    with pytest.raises(BadInputError) as exc:
        translate_header(h)
    assert exc.value.field == field


# ------------------------------------------------------------------ FITS
def _parts(value=100):
    inst = get_instrument("LSSTComCam")
    det = inst.detector(4)
    header = {**_load("comCam-CC_O_20241108_000266_R22_S00.yaml"), "RAFTBAY": "R22", "CCDSLOT": "S11"}
    header = {
        k: v
        for k, v in header.items()
        if k.isupper()
        and " " not in k
        and k
        not in (
            "XTENSION",
            "BITPIX",
            "NAXIS",
            "NAXIS1",
            "NAXIS2",
            "PCOUNT",
            "GCOUNT",
            "TFIELDS",
            "TTYPE1",
            "TFORM1",
        )
        and not k.startswith("Z")
        and k not in ("EXTNAME", "CHANNEL", "DATASEC", "DETSEC", "DETSIZE")
    }
    segs = []
    for amp in inst.amplifiers(det.id):
        data = np.full((amp.raw_ny, amp.raw_nx), value + amp.index, np.int32)
        data[5, 7] = 12345
        segs.append(RawSegment(amp, data, segment_header(amp, det)))
    return header, segs


@pytest.mark.parametrize("compress", [None, "RICE"])
def test_write_read_round_trip(tmp_path, compress):
    header, segs = _parts()
    path = write_raw((header, segs), tmp_path / "r.fits", compress=compress)
    raw = read_raw(path)
    assert raw.metadata.detector == 4 and raw.metadata.obs_id == "CC_O_20241108_000266"
    assert [s.amp.extname for s in raw.segments] == [s.amp.extname for s in segs]
    for got, want in zip(raw.segments, segs, strict=False):
        assert got.data.dtype == np.int32
        np.testing.assert_array_equal(got.data, want.data)
        assert got.header["DETSEC"] == want.amp.hdr_detsec
    assert read_raw_header(path)["GROUPID"] == "2024-11-09T06:33:55.311"
    assert read_raw_header(path)["SEEING"] is None
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_file(tmp_path):
    header, segs = _parts()
    path = write_raw((header, segs), tmp_path / "r.fits", compress=None)
    data = path.read_bytes()
    (tmp_path / "t.fits").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(BadInputError) as exc:
        read_raw(tmp_path / "t.fits")
    assert "t.fits" in str(exc.value) and "Segment" in str(exc.value)


def test_corrupt_bytes_fail_checksum(tmp_path):
    header, segs = _parts()
    path = write_raw((header, segs), tmp_path / "r.fits", compress=None)
    with fitsio.FITS(str(path)) as f:
        offset = f[3].get_offsets()["data_start"]  # the third segment
    buf = bytearray(path.read_bytes())
    buf[offset + 1000] ^= 0xFF
    path.write_bytes(bytes(buf))
    with pytest.raises(BadInputError, match=r"HDU 3 Segment12"):
        read_raw(path)
    read_raw(path, verify_checksum=False)  # the pixels are still readable without the check


def test_missing_segment_and_bad_datasec(tmp_path):
    header, segs = _parts()
    write_raw((header, segs[:-1]), tmp_path / "m.fits")
    with pytest.raises(BadInputError, match="Segment00.*missing"):
        read_raw(tmp_path / "m.fits")
    segs[2].header["DATASEC"] = "[1:512,1:2000]"
    write_raw((header, segs), tmp_path / "d.fits")
    with pytest.raises(BadInputError, match="DATASEC"):
        read_raw(tmp_path / "d.fits")
    header2, segs2 = _parts()
    segs2[0] = RawSegment(segs2[0].amp, segs2[0].data[:100], segs2[0].header)
    write_raw((header2, segs2), tmp_path / "s.fits")
    with pytest.raises(BadInputError, match="shape"):
        read_raw(tmp_path / "s.fits")


def test_not_fits(tmp_path):
    (tmp_path / "x.fits").write_text("hello")
    with pytest.raises(BadInputError, match="x.fits"):
        read_raw(tmp_path / "x.fits")
    with pytest.raises(BadInputError, match="nope.fits"):
        read_raw_header(tmp_path / "nope.fits")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    header, segs = _parts()

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fitsio.FITS, "write", boom)
    with pytest.raises(OSError):
        write_raw((header, segs), tmp_path / "r.fits")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_pixels_are_refused(tmp_path):
    # a float raw with NaN (a broken writer): cast to int32 the NaNs would become arbitrary ADU
    header, segs = _parts()
    path = write_raw((header, segs), tmp_path / "r.fits", compress=None)
    bad_path = tmp_path / "n.fits"
    with fitsio.FITS(str(path)) as src, fitsio.FITS(str(bad_path), "rw", clobber=True) as dst:
        dst.write(None, header=src[0].read_header())
        for k in range(1, len(src)):
            data = src[k].read().astype(np.float32)
            if k == 2:
                data[10:20, 30] = np.nan
            dst.write(data, header=src[k].read_header(), extname=src[k].get_extname())
    with pytest.raises(BadInputError, match=r"n.fits.*Segment.*10 non-finite pixel"):
        read_raw(bad_path, verify_checksum=False)
