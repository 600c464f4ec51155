"""Tests for apbatch.job.template_sources, and the job's use of the stored catalogues
(apbatch.job.prepare.read_templates): references from the butler, detection only without them."""

import numpy as np
import pandas as pd
import pytest
from apbatch.image import Image, read_image, write_image
from apbatch.instruments import get_instrument
from apbatch.job import prepare
from apbatch.job.template_sources import (
    COLUMNS,
    sources_in_box,
    template_sources,
    write_template_sources,
)

CAM = get_instrument("LSSTComCam")
DET = CAM.detector(4)


def patch_with_stars(n=12, shape=(300, 400), seed=3, ra=53.0):
    """A noisy patch with ``n`` Gaussian stars; returns the image and their true (x, y, flux)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    truth = np.column_stack([rng.uniform(15, nx - 15, n), rng.uniform(15, ny - 15, n),
                             rng.uniform(2e3, 2e4, n)])
    yy, xx = np.mgrid[0:ny, 0:nx]
    img = rng.normal(0.0, 1.0, shape).astype(np.float32)
    for x, y, f in truth:
        img += (f / (2 * np.pi * 1.5**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))).astype(
            np.float32)
    wcs = CAM.sky_wcs(DET, ra, -28.0, 10.0)
    return Image(img, np.ones(shape, np.float32), wcs=wcs, metadata={"BUNIT": "nJy"}), truth


def test_template_sources_finds_the_stars_at_their_sky_positions():
    img, truth = patch_with_stars()
    cat = template_sources(img)
    assert tuple(cat.columns) == COLUMNS and len(cat) == len(truth)
    assert np.all(np.diff(cat["flux"].to_numpy()) <= 0)  # brightest first
    x, y = img.wcs.world_to_pixel_values(cat["ra"].to_numpy(), cat["dec"].to_numpy())
    for tx, ty, tf in truth:
        k = np.argmin(np.hypot(x - tx, y - ty))
        assert np.hypot(x[k] - tx, y[k] - ty) < 0.1 and cat["flux"][k] == pytest.approx(tf, rel=0.1)


def test_template_sources_of_a_blank_patch_and_without_wcs():
    blank = Image(np.zeros((50, 60), np.float32), np.ones((50, 60), np.float32),
                  wcs=CAM.sky_wcs(DET, 53, -28, 0))
    cat = template_sources(blank)
    assert cat.empty and tuple(cat.columns) == COLUMNS
    with pytest.raises(ValueError, match="WCS"):
        template_sources(Image(np.zeros((5, 5), np.float32)))


def test_sources_in_box_keeps_what_the_part_read_covers(tmp_path):
    img, truth = patch_with_stars()
    cat = template_sources(img)
    write_image(img, tmp_path / "t.fits", lossless=True)
    part = read_image(tmp_path / "t.fits", bbox=(100, 300, 50, 250))  # as a job reads a patch
    got = sources_in_box(cat, part)
    inside = (truth[:, 0] >= 99.5) & (truth[:, 0] < 299.5) & (truth[:, 1] >= 49.5) & (truth[:, 1] < 249.5)
    assert got is not None and got.shape == (int(inside.sum()), 3)
    assert sources_in_box(cat, read_image(tmp_path / "t.fits", bbox=(0, 10, 0, 10))) is None
    with pytest.raises(ValueError, match="flux"):
        sources_in_box(cat.drop(columns="flux"), part)


def test_write_template_sources_round_trips(tmp_path):
    cat = pd.DataFrame({"ra": [1.5], "dec": [-2.0], "flux": [3.0]})
    path = write_template_sources(cat, tmp_path / "a" / "t.parq")
    assert pd.read_parquet(path).to_dict("list") == cat.to_dict("list")
    assert [p.name for p in path.parent.iterdir()] == ["t.parq"]  # no temporary left


class PatchesIO:
    """A butler I/O stand-in giving patches with (or without) their stored catalogues."""

    def __init__(self, patches, catalogues):
        self.patches, self.catalogues = patches, catalogues

    def iter_template_patches(self, corners, band):
        yield from zip(self.patches, self.catalogues, strict=True)


def test_read_templates_takes_references_from_the_catalogues(monkeypatch):
    patches = [patch_with_stars(seed=s, ra=53.0 + 0.01 * s)[0] for s in (1, 2)]
    cats = [template_sources(p) for p in patches]
    want = prepare.reference_catalog(patches)  # what detecting in the job gives

    def no_detection(*a, **k):
        raise AssertionError("the job detected sources although the catalogue was stored")

    monkeypatch.setattr(prepare, "detect_references", no_detection)
    got = prepare.read_templates(PatchesIO(patches, cats), CAM, DET, (53.0, -28.0, 10.0), "r", 20.0)
    assert got.references is not None and got.references.shape == want.shape
    np.testing.assert_allclose(got.references, want, atol=1e-9)


def test_read_templates_detects_where_a_patch_has_no_catalogue():
    patches = [patch_with_stars(seed=s, ra=53.0 + 0.01 * s)[0] for s in (1, 2)]
    got = prepare.read_templates(PatchesIO(patches, [template_sources(patches[0]), None]), CAM, DET,
                                 (53.0, -28.0, 10.0), "r", 20.0)
    np.testing.assert_allclose(got.references, prepare.reference_catalog(patches), atol=1e-9)
