"""Tests for apbatch.butler.ingest: calibrations with validity ranges, templates and their sky map,
from manifests, into a repository in tmp_path."""

import numpy as np
import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.ingest import ingest_manifest, load_manifest
from apbatch.butler.repo import create_repo
from apbatch.errors import BadInputError
from apbatch.image import Image, write_image
from apbatch.skymap import SkyMap


def small_image(value):
    return Image(np.full((20, 30), value, np.float32), np.ones((20, 30), np.float32))


def write_calibs(directory, entries=None):
    directory.mkdir(parents=True, exist_ok=True)
    write_image(small_image(1.0), directory / "bias_old.fits", lossless=True)
    write_image(small_image(2.0), directory / "bias_new.fits", lossless=True)
    write_image(small_image(0.9), directory / "flat_g.fits", lossless=True)
    entries = (
        entries
        if entries is not None
        else [
            {
                "dataset_type": "bias",
                "file": "bias_old.fits",
                "data_id": {"detector": 4},
                "valid_from": None,
                "valid_to": "2024-11-01T00:00:00",
            },
            {
                "dataset_type": "bias",
                "file": "bias_new.fits",
                "data_id": {"detector": "R22_S11"},
                "valid_from": "2024-11-01T00:00:00",
            },
            {
                "dataset_type": "flat",
                "file": "flat_g.fits",
                "data_id": {"detector": 4, "physical_filter": "g_01"},
                "valid_from": 60000.0,
                "valid_to": None,
            },
        ]
    )
    (directory / "manifest.yaml").write_text(
        yaml.safe_dump({"instrument": "LSSTComCam", "datasets": entries})
    )
    return directory


SKYMAP = SkyMap(
    "apbatch_sim", [(10.0, -5.0), (53.0, -28.0)], patch_size=400, overlap=20, tract_radius_deg=0.05
)  # 5 x 5 patches per tract


def template_image(patch, stars=()):
    """A 20 x 30 template of patch ``patch`` of tract 1 (with its WCS), ``stars`` ((x, y) px) drawn in."""
    img = small_image(float(patch))
    img.wcs = SKYMAP.patch(1, patch).wcs
    yy, xx = np.mgrid[0:20, 0:30]
    for x, y in stars:
        img.image += 500.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)).astype(np.float32)
    return img


def write_templates(directory, stars=()):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "skymap.yaml").write_text(yaml.safe_dump(SKYMAP.to_dict()))
    for patch in (5, 6):
        write_image(template_image(patch, stars), directory / f"t1_p{patch}_g.fits", lossless=True)
    (directory / "manifest.yaml").write_text(
        yaml.safe_dump(
            {
                "instrument": "LSSTComCam",
                "skymap": "skymap.yaml",
                "datasets": [
                    {
                        "dataset_type": "template_coadd",
                        "file": f"t1_p{p}_g.fits",
                        "data_id": {"tract": 1, "patch": p, "band": "g"},
                    }
                    for p in (5, 6)
                ],
            }
        )
    )
    return directory


def test_ingest_calibs_with_validity_ranges(butler, tmp_path):
    from apbatch.butler.ingest import _time
    from lsst.daf.butler import Timespan

    assert ingest_manifest(butler, write_calibs(tmp_path / "calibs")) == 3
    coll = ds.calib_collection("LSSTComCam")

    def bias_at(iso):
        ref = butler.find_dataset(
            "bias",
            instrument="LSSTComCam",
            detector=4,
            collections=coll,
            timespan=Timespan.fromInstant(_time(iso, "t")),
        )
        return None if ref is None else float(butler.get(ref).image[0, 0])

    assert bias_at("2024-10-01T00:00:00") == 1.0
    assert bias_at("2024-11-08T00:00:00") == 2.0
    flat = butler.find_dataset(
        "flat",
        instrument="LSSTComCam",
        detector=4,
        physical_filter="g_01",
        collections=coll,
        timespan=Timespan.fromInstant(_time(60623.0, "t")),
    )
    assert flat is not None and butler.get(flat).image[0, 0] == pytest.approx(0.9)


def test_ingest_templates_and_skymap(butler, tmp_path):
    # two templates (and the template_sources the ingest made for each, not counted: none listed)
    assert ingest_manifest(butler, write_templates(tmp_path / "templates")) == 2
    run = ds.templates_run("LSSTComCam")
    ref = butler.find_dataset(
        "template_coadd",
        skymap="apbatch_sim",
        tract=1,
        patch=6,
        band="g",
        collections=ds.defaults_collection("LSSTComCam"),
    )
    assert ref is not None and butler.get(ref).image[0, 0] == 6.0
    assert (
        SkyMap.from_dict(butler.get(ds.SKYMAP, skymap="apbatch_sim", collections=run)).to_dict()
        == SKYMAP.to_dict()
    )
    (sm,) = butler.registry.queryDimensionRecords("skymap", skymap="apbatch_sim")
    assert (sm.tract_max, sm.patch_nx_max, sm.patch_ny_max) == (2, 5, 5)
    (patch,) = butler.registry.queryDimensionRecords("patch", skymap="apbatch_sim", tract=1, patch=6)
    assert (patch.cell_x, patch.cell_y) == (1, 1)
    ra, dec = SKYMAP.patch(1, 6).wcs.pixel_to_world_values(200.0, 200.0)
    from lsst.sphgeom import LonLat, UnitVector3d

    assert patch.region.contains(UnitVector3d(LonLat.fromDegrees(float(ra), float(dec))))
    # the same sky map name with another definition is refused
    other = SkyMap("apbatch_sim", [(10.0, -5.0)], patch_size=400, overlap=20, tract_radius_deg=0.05)
    (tmp_path / "templates" / "skymap.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(BadInputError, match="another definition"):
        ingest_manifest(butler, tmp_path / "templates")


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"dataset_type": "dark", "file": "bias_old.fits", "data_id": {"detector": 4}}, "dataset_type"),
        ({"dataset_type": "bias", "file": "missing.fits", "data_id": {"detector": 4}}, "file"),
        ({"dataset_type": "flat", "file": "flat_g.fits", "data_id": {"detector": 4}}, "physical_filter"),
        ({"dataset_type": "bias", "file": "bias_old.fits", "data_id": {"detector": 99}}, "detector"),
        (
            {
                "dataset_type": "bias",
                "file": "bias_old.fits",
                "data_id": {"detector": 4},
                "valid_from": "soon",
            },
            "valid_from",
        ),
    ],
)
def test_bad_manifest_ingests_nothing(butler, tmp_path, entry, field):
    good = {"dataset_type": "bias", "file": "bias_new.fits", "data_id": {"detector": 4}}
    directory = write_calibs(tmp_path / "calibs", [good, entry])
    with pytest.raises(BadInputError, match=field):
        ingest_manifest(butler, directory)
    assert not butler.query_datasets(
        "bias", collections="LSSTComCam/calib/run/*", find_first=False, explain=False
    )
    assert not butler.collections.query("LSSTComCam/calib/run/*")


def test_reingest_is_refused_and_rolled_back(butler, tmp_path):
    directory = write_calibs(tmp_path / "calibs")
    ingest_manifest(butler, directory)
    write_image(small_image(3.0), directory / "bias_newer.fits", lossless=True)
    manifest = yaml.safe_load((directory / "manifest.yaml").read_text())
    manifest["datasets"].insert(
        0,
        {
            "dataset_type": "bias",
            "file": "bias_newer.fits",
            "data_id": {"detector": 4},
            "valid_from": "2024-12-01T00:00:00",
        },
    )
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BadInputError, match="already ingested"):
        ingest_manifest(butler, directory)
    refs = butler.query_datasets(
        "bias", collections="LSSTComCam/calib/run/*", find_first=False, explain=False
    )
    assert len(refs) == 2  # the new bias of the failed ingest is not there


def test_manifest_errors(tmp_path):
    with pytest.raises(BadInputError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("datasets: {}\n")
    with pytest.raises(BadInputError, match="datasets"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.yaml").write_text("datasets: []\n")
    with pytest.raises(BadInputError, match="instrument"):
        load_manifest(tmp_path)
    write_templates(tmp_path / "t")
    (tmp_path / "t" / "skymap.yaml").unlink()
    with pytest.raises(BadInputError, match="skymap"):
        load_manifest(tmp_path / "t")


def test_ingest_requires_registered_instrument(tmp_path):
    b = create_repo(tmp_path / "repo")
    with pytest.raises(BadInputError, match="not registered"):
        ingest_manifest(b, write_calibs(tmp_path / "calibs"))


# ---------------------------------------------------------------- command line


def test_ingest_catalogues_template_sources(butler, tmp_path):
    """Each template gets its astrometric references at ingest: its stars at their sky positions."""
    ingest_manifest(butler, write_templates(tmp_path / "templates", stars=[(8.0, 7.0), (21.0, 12.0)]))
    coll = ds.defaults_collection("LSSTComCam")
    cat = butler.get(ds.TEMPLATE_SOURCES, skymap="apbatch_sim", tract=1, patch=6, band="g", collections=coll)
    assert list(cat.columns) == ["ra", "dec", "flux"] and len(cat) == 2
    x, y = SKYMAP.patch(1, 6).wcs.world_to_pixel_values(cat["ra"].to_numpy(), cat["dec"].to_numpy())
    assert sorted(zip(np.round(x, 1), np.round(y, 1), strict=True)) == [(8.0, 7.0), (21.0, 12.0)]
    assert cat["flux"].to_numpy() == pytest.approx([500 * 2 * np.pi * 1.5**2] * 2, rel=0.1)


def test_listed_template_sources_are_ingested_as_given(butler, tmp_path):
    import pandas as pd
    from apbatch.job.template_sources import write_template_sources

    directory = write_templates(tmp_path / "templates", stars=[(8.0, 7.0)])
    given = pd.DataFrame({"ra": [1.0], "dec": [2.0], "flux": [3.0]})
    write_template_sources(given, directory / "t1_p5_g.parq")
    manifest = yaml.safe_load((directory / "manifest.yaml").read_text())
    manifest["datasets"].append({"dataset_type": "template_sources", "file": "t1_p5_g.parq",
                                 "data_id": {"tract": 1, "patch": 5, "band": "g"}})
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    assert ingest_manifest(butler, directory) == 3  # 2 templates and 1 listed catalogue (1 made)
    coll = ds.defaults_collection("LSSTComCam")
    got = butler.get(ds.TEMPLATE_SOURCES, skymap="apbatch_sim", tract=1, patch=5, band="g", collections=coll)
    assert got.to_dict("list") == given.to_dict("list")
    made = butler.get(ds.TEMPLATE_SOURCES, skymap="apbatch_sim", tract=1, patch=6, band="g", collections=coll)
    assert len(made) == 1


def test_template_without_wcs_is_refused_and_nothing_ingested(butler, tmp_path):
    directory = write_templates(tmp_path / "templates")
    write_image(small_image(6.0), directory / "t1_p6_g.fits", lossless=True)  # no WCS
    with pytest.raises(BadInputError, match=r"template .*patch.*: has no WCS"):
        ingest_manifest(butler, directory)
    assert not butler.query_datasets(ds.TEMPLATE, collections=ds.templates_run("LSSTComCam"),
                                     find_first=False, explain=False)
    assert not list((tmp_path / "repo").rglob("t1_p5_g*.fits"))  # the copied file went with the rollback


@pytest.mark.parametrize("content, message", [
    ("not parquet", r"datasets\[2\]\.file: t1_p5_g\.parq is not a Parquet file"),
    ({"ra": [1.0], "dec": [2.0]}, r"datasets\[2\]\.file: t1_p5_g\.parq lacks numeric column\(s\) flux"),
    ({"ra": [1.0], "dec": ["x"], "flux": [3.0]}, r"lacks numeric column\(s\) dec"),
])
def test_bad_template_sources_file_is_refused_before_anything_is_written(butler, tmp_path, content, message):
    """A listed catalogue every job would fail on is refused at ingest, naming the entry; nothing ingested."""
    import pandas as pd

    directory = write_templates(tmp_path / "templates")
    path = directory / "t1_p5_g.parq"
    if isinstance(content, str):
        path.write_text(content)
    else:
        pd.DataFrame(content).to_parquet(path, index=False)
    manifest = yaml.safe_load((directory / "manifest.yaml").read_text())
    manifest["datasets"].append({"dataset_type": "template_sources", "file": "t1_p5_g.parq",
                                 "data_id": {"tract": 1, "patch": 5, "band": "g"}})
    (directory / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(BadInputError, match=message) as info:
        ingest_manifest(butler, directory)
    assert "\n" not in str(info.value)
    fix = "write_template_sources" if isinstance(content, str) else "columns ra, dec, flux"
    assert fix in str(info.value)
    assert not butler.query_datasets(ds.TEMPLATE, collections=ds.templates_run("LSSTComCam"),
                                     find_first=False, explain=False)
