"""Tests for apbatch.butler.formatters: Image, raw and metrics datasets through a real butler."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.formatters import REPO_CONFIG, ImageFormatter, RawFormatter
from apbatch.butler.repo import create_repo, register_exposures, register_instrument, register_output_run
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.raw import RawSegment, read_raw, segment_header, translate_header, write_raw

HEADERS = Path(__file__).parent / "data" / "headers"
_SEGMENT_KEYS = (
    "EXTNAME",
    "DATASEC",
    "DETSEC",
    "DETSIZE",
    "DTV",
    "DTM",
    "CHANNEL",
    "ZNAXIS",
    "CTYPE",
    "CRVAL",
    "CRPIX",
    "CD",
    "PC",
    "WCS",
    "CUNIT",
    "A_",
    "B_",
    "AP_",
    "BP_",
    "CCDSUM",
    "BSCALE",
    "BZERO",
    "BUNIT",
)


def make_raw(path, **overrides):
    """A ComCam R22_S00 raw with the real header of CC_O_20241108_000266 (plus ``overrides``)."""
    hdr = yaml.safe_load((HEADERS / "comCam-CC_O_20241108_000266_R22_S00.yaml").read_text())
    hdr = {k: v for k, v in hdr.items() if not k.startswith(_SEGMENT_KEYS)} | overrides
    inst = get_instrument("LSSTComCam")
    det = inst.detector(f"{hdr['RAFTBAY']}_{hdr['CCDSLOT']}")
    rng = np.random.default_rng(hdr["SEQNUM"])
    segs = [
        RawSegment(
            a,
            (20000 + 10 * a.index + rng.integers(0, 4, (a.raw_ny, a.raw_nx))).astype(np.int32),
            segment_header(a, det),
        )
        for a in inst.amplifiers(det.id)
    ]
    return write_raw((hdr, segs), path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "butler"
    butler = create_repo(root)
    register_instrument(butler, "LSSTComCam")
    return butler


def image():
    rng = np.random.default_rng(5)
    wcs = get_instrument("LSSTComCam").sky_wcs(4, 53.0, -28.0, 10.0)
    img = Image(rng.normal(size=(50, 70)), np.full((50, 70), 3.0), None, wcs, {"BUNIT": "electron"})
    img.mask[4, 6] = MaskBits.CR
    return img


def test_repo_config_is_written_to_butler_yaml(repo):
    from lsst.images import DifferenceImage, VisitImage

    cfg = yaml.safe_load((Path(repo._config.configDir.ospath) / "butler.yaml").read_text())
    assert cfg["storageClasses"] == REPO_CONFIG["storageClasses"]
    formatters = cfg["datastore"]["formatters"]
    assert formatters[ds.IMAGE_STORAGE_CLASS].endswith("ImageFormatter")
    for name in (ds.BIAS, ds.FLAT, ds.TEMPLATE):  # sub-box and plane reads stay with ImageFormatter
        assert repo.get_dataset_type(name).storageClass.pytype is Image
    # calibrated and difference images: daf_butler's storage classes, lsst-images' formatter
    assert repo.get_dataset_type(ds.CALEXP).storageClass.pytype is VisitImage
    assert repo.get_dataset_type(ds.DIFFIM).storageClass.pytype is DifferenceImage
    for sc in (ds.VISIT_IMAGE_STORAGE_CLASS, ds.DIFFERENCE_IMAGE_STORAGE_CLASS):
        assert formatters[sc] == {"formatter": "lsst.images.formatters.GenericFormatter",
                                  "parameters": {"recipe": "lossy"}}
    assert "apbatch" not in yaml.safe_dump(formatters["write_recipes"])


def visit_run(repo):
    """Register the visit of the ComCam header (idempotent); return its output run."""
    register_exposures(
        repo,
        [
            translate_header(
                yaml.safe_load((HEADERS / "comCam-CC_O_20241108_000266_R22_S00.yaml").read_text())
            )
        ],
    )
    return register_output_run(repo, "LSSTComCam", 20241108)


def test_image_put_get_round_trip(repo):
    run = visit_run(repo)
    img = image()
    ref = repo.put(img, ds.BIAS, instrument="LSSTComCam", detector=0, run=run)
    assert repo.getURI(ref).ospath.endswith(".fits")
    back = repo.get(ref)
    # image and variance are quantized to 1/16 of the noise (apbatch.image); the mask is exact
    assert np.abs(back.image - img.image).max() <= 0.1 * float(np.std(img.image)) + 1e-6
    assert np.abs(back.variance - img.variance).max() <= 0.1 * float(np.std(img.variance)) + 1e-6
    np.testing.assert_array_equal(back.mask, img.mask)
    assert back.mask[4, 6] == MaskBits.CR and back.metadata["BUNIT"] == "electron"
    assert np.allclose(back.wcs.pixel_to_world_values(3.0, 4.0), img.wcs.pixel_to_world_values(3.0, 4.0))


def test_metrics_are_json(repo):
    run = visit_run(repo)
    metrics = {"isr": {"seconds": 1.25}, "n_dia_sources": 17}
    ref = repo.put(metrics, ds.METRICS, instrument="LSSTComCam", visit=3110636353110000, detector=0, run=run)
    assert repo.getURI(ref).ospath.endswith(".json")
    assert repo.get(ref) == metrics


def test_raw_ingest_and_read(repo, tmp_path):
    from lsst.daf.butler import DatasetRef, FileDataset

    path = make_raw(tmp_path / "raw.fits")
    meta = read_raw(path).metadata
    register_exposures(repo, [meta])
    ref = DatasetRef(
        repo.get_dataset_type(ds.RAW),
        repo.registry.expandDataId(instrument="LSSTComCam", detector=0, exposure=meta.exposure_id),
        run=ds.raw_run("LSSTComCam"),
    )
    repo.ingest(FileDataset(str(path), ref), transfer="direct")
    raw = repo.get(ref)
    assert raw.metadata == meta and len(raw.segments) == 16
    assert raw.segments[3].data.dtype == np.int32 and raw.segments[3].data.min() >= 20030
    assert repo.getURI(ref).ospath == str(path)  # direct: the repository points at the file


def test_formatters_work_in_a_fresh_process(repo, tmp_path):
    """The formatters are named in butler.yaml: any process opening the repo must find them."""
    repo.put(image(), ds.BIAS, instrument="LSSTComCam", detector=1, run=visit_run(repo))
    code = (
        "import sys; from lsst.daf.butler import Butler; b = Butler.from_config(sys.argv[1]);"
        "img = b.get('bias', instrument='LSSTComCam', detector=1,"
        " collections='LSSTComCam/prompt/20241108'); print(type(img).__name__, img.image.shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, repo._config.configDir.ospath],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Image", "(50,", "70)"]


def test_formatter_extensions():
    assert ImageFormatter.default_extension == ".fits"
    assert {".fits", ".fz"} <= RawFormatter.supported_extensions
