"""Tests for apbatch.butler.images: Image <-> lsst-images VisitImage/DifferenceImage, via a real butler."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.images import (
    from_visit_image,
    make_detector,
    mask_schema,
    to_difference_image,
    to_visit_image,
)
from apbatch.butler.io import ButlerIO
from apbatch.butler.repo import create_repo, register_exposures, register_instrument, register_output_run
from apbatch.errors import BadInputError
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.raw import translate_header

HEADERS = Path(__file__).parent / "data" / "headers"
VISIT = 3110636353110000
DET = 4  # R22_S11
SIGMA = 30.0


def comcam_meta():
    header = yaml.safe_load((HEADERS / "comCam-CC_O_20241108_000266_R22_S00.yaml").read_text())
    return translate_header(header)


def ccd_image(bunit="nJy", seed=3, detector=DET, **meta):
    """A whole ComCam CCD image (noise, a star, masked pixels) with the job's metadata."""
    m = comcam_meta()
    cam = get_instrument("LSSTComCam")
    det = cam.detector(detector)
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, SIGMA, (det.ny, det.nx)).astype(np.float32)
    img[2000:2005, 1000:1005] += 5000.0
    mask = np.zeros((det.ny, det.nx), np.int32)
    mask[10, 20] = MaskBits.CR | MaskBits.INTRP
    mask[:, 3000] |= MaskBits.BAD
    mask[3999, 4071] = MaskBits.NO_DATA | MaskBits.DETECTED_NEGATIVE
    metadata = {"BUNIT": bunit, "FILTER": m.physical_filter, "BAND": m.band, "MJDBEG": m.mjd_begin,
                "MJDEND": m.mjd_end, "EXPTIME": m.exposure_time, "RA": m.ra, "DEC": m.dec,
                "ROTPA": m.rotation, "OBSID": m.obs_id, "EXPID": m.exposure_id, "PSFSIGMA": 1.9,
                "DIFFKSUM": 0.5, "SNAPS": 1} | meta
    return Image(img, np.full((det.ny, det.nx), SIGMA**2, np.float32), mask,
                 cam.sky_wcs(det, m.ra, m.dec, m.rotation), metadata)


def make_repo(path):
    """A new repository with ComCam, the visit of :func:`comcam_meta` and its output run."""
    butler = create_repo(path)
    register_instrument(butler, "LSSTComCam")
    register_exposures(butler, [comcam_meta()])
    register_output_run(butler, "LSSTComCam", 20241108)
    return butler


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("images") / "repo")


@pytest.fixture(scope="module")
def stored(repo):
    """A calexp and a diffim put by ButlerIO.put_outputs, and the images they came from."""
    calexp, diffim = ccd_image("electron", seed=1), ccd_image("nJy", seed=2)
    refs = ButlerIO(repo, "LSSTComCam").put_outputs(VISIT, DET, calexp=calexp, diffim=diffim)
    return {r.datasetType.name: r for r in refs}, calexp, diffim


def test_mask_schema_is_maskbits_with_rubin_names():
    schema = mask_schema()
    assert [p.name for p in schema] == ["BAD", "SATURATED", "INTERPOLATED", "COSMIC_RAY", "DETECTION_EDGE",
                                        "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA"]
    assert len(schema) == len(MaskBits)
    assert all(p.description for p in schema)
    assert "cosmic ray" in schema.descriptions["COSMIC_RAY"]


@pytest.mark.parametrize("dtype", ["<i4", ">i4", "<i2", "<i8", "<u2"])
def test_mask_bits_become_the_planes_of_the_same_names(dtype):
    from apbatch.butler.images import _pack_mask, _unpack_mask
    from lsst.images import Mask

    bits = np.random.default_rng(4).integers(0, 1 << len(MaskBits), (40, 60)).astype(dtype)
    mask = Mask(_pack_mask(bits), schema=mask_schema())
    for bit, plane in zip(MaskBits, mask_schema(), strict=True):
        np.testing.assert_array_equal(mask.get(plane.name), (bits & int(bit)) != 0)
    np.testing.assert_array_equal(_unpack_mask(mask.array, mask.schema), bits)


def test_detector_geometry_from_the_camera():
    cam = get_instrument("LSSTComCam")
    det = cam.detector("R22_S02")
    d = make_detector(cam, "LSSTComCam", det.name, visit=VISIT)
    assert (d.id, d.name, d.instrument, d.visit) == (det.id, "R22_S02", "LSSTComCam", VISIT)
    assert d.bbox.y.size == det.ny and d.bbox.x.size == det.nx
    # the CCD's reference pixel is at its focal-plane position; one pixel is pixel_size_mm
    x, y = d.to_focal_plane.apply_forward(x=np.array([det.refpos_x, det.refpos_x + 1]),
                                          y=np.array([det.refpos_y, det.refpos_y]))
    assert x[0] == pytest.approx(det.x_mm, abs=1e-9) and y[0] == pytest.approx(det.y_mm, abs=1e-9)
    assert np.hypot(x[1] - x[0], y[1] - y[0]) == pytest.approx(det.pixel_size_mm)


def test_difference_image_round_trip_through_the_butler(repo, stored):
    from astropy.io import fits
    from lsst.images import DifferenceImage
    from lsst.images.psfs import GaussianPointSpreadFunction

    refs, _, img = stored
    ref = refs[ds.DIFFIM]
    assert ref.datasetType.storageClass.name == "DifferenceImage"
    got = repo.get(ref)
    assert isinstance(got, DifferenceImage)
    assert got.unit.to_string() == "nJy" and got.variance.unit.to_string() == "nJy2"
    # lossy: quantized to 1/16 of the noise (dithered); the star is kept to the same precision
    err = got.image.array - img.image
    assert np.abs(err).max() <= SIGMA / 16 and np.abs(err).max() > 0
    assert abs(float(np.std(err)) - SIGMA / 16 / np.sqrt(12)) < 0.3 * SIGMA / 16 / np.sqrt(12)
    np.testing.assert_allclose(got.variance.array, img.variance, rtol=1e-3)
    assert got.mask.get("COSMIC_RAY")[10, 20] and got.mask.get("INTERPOLATED")[10, 20]
    assert got.mask.get("BAD")[:, 3000].all() and got.mask.get("BAD").sum() == img.shape[0]
    assert got.mask.get("DETECTED_NEGATIVE")[3999, 4071] and got.mask.get("NO_DATA").sum() == 1
    ys, xs = np.array([0.0, 2002.0, 3999.0]), np.array([0.0, 1002.0, 4071.0])
    back = got.astropy_wcs.pixel_to_world(xs, ys)  # what a user's astropy code sees
    want = img.wcs.pixel_to_world(xs, ys)
    assert back.separation(want).arcsec.max() < 1e-5
    assert isinstance(got.psf, GaussianPointSpreadFunction) and got.psf.sigma == 1.9
    assert got.physical_filter == "g_01" and got.band == "g" and got.obs_info.visit_id == VISIT
    assert got.obs_info.exposure_time.value == 30.0 and got.detector.name == "R22_S11"
    assert got.metadata["DIFFKSUM"] == 0.5
    with fits.open(repo.getURI(ref).ospath) as hdul:  # FITS readers see the unit too
        assert hdul["IMAGE"].header["BUNIT"] == "nJy"


def test_calexp_is_a_visit_image_and_converts_back(repo, stored):
    from lsst.images import DifferenceImage, VisitImage

    refs, img, _ = stored
    got = repo.get(refs[ds.CALEXP])
    assert type(got) is VisitImage and not isinstance(got, DifferenceImage)
    assert got.unit.to_string() == "electron"
    back = from_visit_image(got)
    np.testing.assert_array_equal(back.mask, img.mask)
    assert np.abs(back.image - img.image).max() <= SIGMA / 16
    assert back.metadata["BUNIT"] == "electron" and back.metadata["FILTER"] == "g_01"
    assert back.metadata["PSFSIGMA"] == 1.9 and back.metadata["SNAPS"] == 1
    want = img.wcs.pixel_to_world(100.0, 200.0)
    assert back.wcs.pixel_to_world(100.0, 200.0).separation(want).arcsec < 1e-5


def test_read_without_apbatch(repo, stored, tmp_path):
    """A user with only daf_butler and lsst-images: `import apbatch` fails, the difference image reads."""
    code = f"""
import sys
from pathlib import Path
root = Path({str(Path(__file__).resolve().parents[1] / "python")!r})
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != root]
try:
    import apbatch
except ModuleNotFoundError:
    print("no apbatch")
from lsst.daf.butler import Butler
b = Butler.from_config(sys.argv[1])
img = b.get("difference_image", instrument="LSSTComCam", visit={VISIT}, detector={DET},
            collections="LSSTComCam/prompt/20241108")
print(type(img).__name__, img.unit.to_string(), img.image.array.shape, img.mask.get("COSMIC_RAY")[10, 20])
print("apbatch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-I", "-c", code, repo._config.configDir.ospath],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["no apbatch", "DifferenceImage nJy (4000, 4072) True", "False"]
    butler_yaml = yaml.safe_load((Path(repo._config.configDir.ospath) / "butler.yaml").read_text())
    formatters = butler_yaml["datastore"]["formatters"]
    for sc in ("VisitImage", "DifferenceImage"):
        assert formatters[sc]["formatter"] == "lsst.images.formatters.GenericFormatter"
        assert sc not in butler_yaml.get("storageClasses", {})  # daf_butler's own definition


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"BUNIT": "adu"}, "BUNIT"),
        ({"BUNIT": None}, "BUNIT"),
        ({"FILTER": None}, "FILTER"),
        ({"wcs": None}, "wcs"),
        ({"mask": 1 << 20}, "mask"),
        ({"shape": (100, 100)}, "shape"),
    ],
)
def test_bad_images_are_refused(repo, change, field):
    img = ccd_image()
    if "wcs" in change:
        img.wcs = None
    elif "mask" in change:
        img.mask[5, 5] = change["mask"]
    elif "shape" in change:
        img = Image(np.zeros(change["shape"], np.float32), wcs=img.wcs, metadata=img.metadata)
    else:
        img.metadata.update(change)
        img.metadata = {k: v for k, v in img.metadata.items() if v is not None}
    cam = get_instrument("LSSTComCam")
    with pytest.raises(BadInputError, match=field):
        to_visit_image(img, cam, "LSSTComCam", VISIT, DET)
    before = len(repo.query_datasets(ds.CALEXP, collections="*", find_first=False, explain=False))
    with pytest.raises(BadInputError, match=field):
        ButlerIO(repo, "LSSTComCam").put_outputs(VISIT, DET, calexp=img, metrics={"n": 1})
    assert len(repo.query_datasets(ds.CALEXP, collections="*", find_first=False, explain=False)) == before


def test_missing_psf_sigma_stores_a_nominal_psf_and_says_so():
    img = ccd_image()
    del img.metadata["PSFSIGMA"]
    cam = get_instrument("LSSTComCam")
    got = to_difference_image(img, cam, "LSSTComCam", VISIT, DET)
    fwhm_arcsec = got.psf.sigma * 2.3548 * cam.pixel_scale_arcsec
    assert fwhm_arcsec == pytest.approx(0.7, rel=1e-3) and got.metadata["PSFNOMNL"] is True


def test_rerun_replaces_outputs(repo, stored):
    io = ButlerIO(repo, "LSSTComCam")
    io.put_outputs(VISIT, DET, diffim=_zeros())
    run = "LSSTComCam/prompt/20241108"
    kw = {"instrument": "LSSTComCam", "visit": VISIT, "detector": DET, "collections": run}
    assert float(np.abs(repo.get(ds.DIFFIM, **kw).image.array).max()) == 0.0
    assert len(repo.query_datasets(ds.DIFFIM, collections=kw["collections"], explain=False)) == 1


def _zeros():
    img = ccd_image()
    img.image[:] = 0.0
    return img

