"""Tests for apbatch.butler.image_writes: images stored with their variance's quantization step,
ingested under lsst-images' own formatter, read back as a put would be; failures store nothing."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from apbatch.butler import datasets as ds
from apbatch.butler import image_writes
from apbatch.butler.images import to_difference_image
from apbatch.instruments import get_instrument
from astropy.io import fits
from test_butler_images import DET, SIGMA, VISIT, ccd_image, make_repo

CAM = get_instrument("LSSTComCam")
RUN = "LSSTComCam/prompt/20241108"
DATA_ID = {"instrument": "LSSTComCam", "visit": VISIT, "detector": DET}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("writes") / "repo")


@pytest.fixture(scope="module")
def diffim():
    return to_difference_image(ccd_image("nJy", seed=5), CAM, "LSSTComCam", VISIT, DET)


def _drop(repo, ref):
    repo.pruneDatasets([ref], disassociate=True, unstore=True, purge=True)


def _leftovers(repo):
    root = next(iter(repo.get_datastore_roots().values())).ospath
    return list(Path(root).glob(".apbatch-put-*"))


def test_put_image_uses_the_variance_step_and_reads_back_like_a_put(repo, diffim):
    ref = image_writes.put_image(repo, diffim, ds.DIFFIM, DATA_ID, RUN)
    try:
        got = repo.get(ds.DIFFIM, DATA_ID, collections=RUN)
        err = got.image.array - diffim.image.array
        # the step is sigma / 16 (the variance is SIGMA^2 everywhere): uniform dither error
        assert np.abs(err).max() <= SIGMA / 16 and np.abs(err).max() > 0
        assert float(np.std(err)) == pytest.approx(SIGMA / 16 / np.sqrt(12), rel=0.05)
        np.testing.assert_allclose(got.variance.array, diffim.variance.array, rtol=1e-3)
        assert got.mask.get("COSMIC_RAY")[10, 20] and got.mask.get("BAD")[:, 3000].all()
        assert type(got).__name__ == "DifferenceImage" and got.unit.to_string() == "nJy"
        with fits.open(repo.getURI(ref).ospath, disable_image_compression=True) as hdul:
            # cfitsio was handed the step: every tile's scale is exactly it
            scales = hdul["IMAGE"].data["ZSCALE"]
            assert np.allclose(scales, SIGMA / 16, rtol=1e-6)
        assert not _leftovers(repo)
    finally:
        _drop(repo, ref)


def test_the_file_is_the_one_a_put_would_write_for_readers(repo, diffim):
    """Same HDUs and butler information as butler.put's file; the same dataset reads either way."""
    ours = image_writes.put_image(repo, diffim, ds.DIFFIM, DATA_ID, RUN)
    with fits.open(repo.getURI(ours).ospath) as hdul:
        ours_hdus = [h.name for h in hdul]
    got_ours = repo.get(ours)
    _drop(repo, ours)
    theirs = repo.put(diffim, ds.DIFFIM, DATA_ID, run=RUN)
    with fits.open(repo.getURI(theirs).ospath) as hdul:
        their_hdus = [h.name for h in hdul]
    got_theirs = repo.get(theirs)
    _drop(repo, theirs)
    assert ours_hdus == their_hdus
    assert got_ours.obs_info == got_theirs.obs_info and got_ours.metadata == got_theirs.metadata
    assert np.abs(got_ours.image.array - got_theirs.image.array).max() <= 2 * SIGMA / 16


def test_a_variance_without_noise_falls_back_to_the_recipe(repo):
    img = ccd_image("nJy", seed=6)
    img.variance[:] = 0.0
    diff = to_difference_image(img, CAM, "LSSTComCam", VISIT, DET)
    assert image_writes.compression_options(diff) is None
    ref = image_writes.put_image(repo, diff, ds.DIFFIM, DATA_ID, RUN)
    try:
        with fits.open(repo.getURI(ref).ospath, disable_image_compression=True) as hdul:
            scales = hdul["IMAGE"].data["ZSCALE"]
        assert np.ptp(scales) > 0  # cfitsio measured each tile's noise (the repository's recipe)
    finally:
        _drop(repo, ref)


def test_a_failed_write_stores_nothing_and_leaves_no_file(repo, diffim, monkeypatch):
    import lsst.images.fits

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lsst.images.fits, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        image_writes.put_image(repo, diffim, ds.DIFFIM, DATA_ID, RUN)
    assert repo.find_dataset(ds.DIFFIM, DATA_ID, collections=RUN) is None
    assert not _leftovers(repo)


def test_a_killed_writers_leftover_is_removed_by_a_later_put(repo, diffim):
    root = Path(next(iter(repo.get_datastore_roots().values())).ospath)
    old, fresh = root / ".apbatch-put-killed", root / ".apbatch-put-running"
    for d in (old, fresh):
        d.mkdir()
        (d / "x.fits").write_bytes(b"half")
    os.utime(old, (0, 0))  # long ago
    ref = image_writes.put_image(repo, diffim, ds.DIFFIM, DATA_ID, RUN)
    _drop(repo, ref)
    assert not old.exists() and fresh.exists()  # another job's directory in use is left alone
    shutil.rmtree(fresh)
