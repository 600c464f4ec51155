"""Tests for apbatch.butler.io.ButlerIO: the distributor-backed raw get, calibrations, templates, outputs."""

import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from apbatch.butler import datasets as ds
from apbatch.butler.ingest import ingest_manifest
from apbatch.butler.io import ButlerIO
from apbatch.butler.repo import register_exposures, register_output_run
from apbatch.distributor.client import DistributorClient
from apbatch.distributor.store import DistributorStore
from apbatch.errors import BadInputError, RawTimeoutError
from apbatch.image import Image, write_image
from apbatch.instruments import get_instrument
from apbatch.raw import read_raw_header, translate_header
from apbatch.skymap import SkyMap
from test_butler_formatters import make_raw
from test_butler_images import ccd_image

GROUP = "2024-11-09T06:33:55.311"
VISIT = 3110636353110000
MJD = 60623.27408938669


def raw_file(directory, seq=266, det="R22_S00", index=1, n=1):
    raft, slot = det.split("_")
    return make_raw(
        Path(directory) / f"CC_O_20241108_{seq:06d}_{det}.fits",
        SEQNUM=seq,
        OBSID=f"CC_O_20241108_{seq:06d}",
        RAFTBAY=raft,
        CCDSLOT=slot,
        CURINDEX=index,
        MAXINDEX=n,
        **{"MJD-BEG": MJD + (index - 1) * 32 / 86400, "MJD-END": MJD + ((index - 1) * 32 + 30) / 86400},
    )


@pytest.fixture
def store(tmp_path):
    return DistributorStore(tmp_path / "dist")


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    d = tmp_path_factory.mktemp("raws")
    return {
        "S00": raw_file(d),
        "S01": raw_file(d, det="R22_S01"),
        "snap1": raw_file(d, 300, index=1, n=2),
        "snap2": raw_file(d, 301, index=2, n=2),
    }


def deliver(store, path):
    return store.deliver(path, translate_header(read_raw_header(path)))


def test_get_raw_blocking_registers_ingests_and_reads(butler, store, raws):
    io = ButlerIO(butler, "LSSTComCam")
    client = DistributorClient.from_location(store.root)
    threading.Timer(0.4, deliver, (store, raws["S00"])).start()
    t0 = time.monotonic()
    (raw,) = io.get_raw_blocking(GROUP, "R22_S00", 1, client, timeout=10)
    assert time.monotonic() - t0 >= 0.4
    assert raw.metadata.obs_id == "CC_O_20241108_000266" and len(raw.segments) == 16
    (exp,) = butler.registry.queryDimensionRecords("exposure", instrument="LSSTComCam")
    assert exp.id == 2024110800266 and exp.group == GROUP
    (visit,) = butler.registry.queryDimensionRecords("visit", instrument="LSSTComCam")
    assert visit.id == VISIT
    ref = butler.find_dataset(
        ds.RAW,
        instrument="LSSTComCam",
        detector=0,
        exposure=2024110800266,
        collections=ds.defaults_collection("LSSTComCam"),
    )
    stored = butler.getURI(ref).ospath
    assert stored == str(store.raw_path("LSSTComCam", GROUP, "CC_O_20241108_000266", "R22_S00"))  # direct
    # a rerun of the job gets the same dataset, not a second one
    io.get_raw_blocking(GROUP, 0, 1, client, timeout=1)
    assert len(butler.query_datasets(ds.RAW, collections=ds.raw_run("LSSTComCam"), explain=False)) == 1


def test_copy_transfer(butler, store, raws):
    deliver(store, raws["S00"])
    io = ButlerIO(butler, "LSSTComCam", transfer="copy")
    io.get_raw_blocking(GROUP, 0, 1, DistributorClient.from_location(store.root), timeout=2)
    ref = butler.find_dataset(
        ds.RAW,
        instrument="LSSTComCam",
        detector=0,
        exposure=2024110800266,
        collections=ds.raw_run("LSSTComCam"),
    )
    assert butler.getURI(ref).ospath.startswith(str(Path(butler._config.configDir.ospath)))
    with pytest.raises(BadInputError, match="transfer"):
        ButlerIO(butler, "LSSTComCam", transfer="teleport")


def test_timeout_writes_nothing(butler, store):
    io = ButlerIO(butler, "LSSTComCam")
    t0 = time.monotonic()
    with pytest.raises(RawTimeoutError):
        io.get_raw_blocking(GROUP, 0, 1, DistributorClient.from_location(store.root), timeout=0.8)
    assert abs(time.monotonic() - t0 - 0.8) < 0.3
    assert not list(butler.registry.queryDimensionRecords("exposure", instrument="LSSTComCam"))
    assert not butler.query_datasets(ds.RAW, collections=ds.raw_run("LSSTComCam"), explain=False)


def test_two_snaps_by_image_name(butler, store, raws):
    deliver(store, raws["snap2"])
    deliver(store, raws["snap1"])
    io = ButlerIO(butler, "LSSTComCam")
    out = io.get_raw_blocking(
        ["CC_O_20241108_000300", "CC_O_20241108_000301"],
        0,
        2,
        DistributorClient.from_location(store.root),
        timeout=2,
        group_id=GROUP,
    )
    assert [r.metadata.seq_num for r in out] == [300, 301]
    (visit,) = butler.registry.queryDimensionRecords("visit", instrument="LSSTComCam")
    assert visit.exposure_time == 30.0  # first job to see the visit defines it from its own snap
    with pytest.raises(BadInputError, match="group"):
        io.get_raw_blocking(["CC_O_20241108_000300"], 0, 1, DistributorClient.from_location(store.root), 1)


def test_first_snap_is_read_while_the_second_is_awaited(butler, store, raws):
    """Two snaps, partial accepted (a job's case): snap 1 is ingested and read before snap 2 arrives."""
    io = ButlerIO(butler, "LSSTComCam")
    deliver(store, raws["snap1"])
    reads = []
    real_get = butler.get

    def get(ref, *args, **kwargs):
        reads.append((ref.dataId["exposure"], time.monotonic()))
        return real_get(ref, *args, **kwargs)

    butler.get = get
    arrived = []
    threading.Timer(0.6, lambda: arrived.append((deliver(store, raws["snap2"]), time.monotonic()))).start()
    out = io.get_raw_blocking(GROUP, 0, 2, DistributorClient.from_location(store.root), timeout=5,
                              allow_partial=True)
    assert [r.metadata.seq_num for r in out] == [300, 301]
    assert [e for e, _ in reads] == [2024110800300, 2024110800301]  # each read once
    assert reads[0][1] < arrived[0][1] <= reads[1][1]
    assert io.raw_delivered_at == arrived[0][0].delivered


def test_timeout_without_partial_writes_nothing_even_if_one_snap_arrived(butler, store, raws):
    deliver(store, raws["snap1"])
    io = ButlerIO(butler, "LSSTComCam")
    with pytest.raises(RawTimeoutError, match="1 of 2"):
        io.get_raw_blocking(GROUP, 0, 2, DistributorClient.from_location(store.root), timeout=0.5)
    assert not butler.query_datasets(ds.RAW, collections=ds.raw_run("LSSTComCam"), explain=False)


def test_preregistered_exposure_is_left_alone(butler, store, raws):
    planned = translate_header(read_raw_header(raws["S00"]))
    import dataclasses

    planned = dataclasses.asdict(planned) | {"mjd_begin": MJD - 5 / 86400, "mjd_end": MJD + 25 / 86400}
    register_exposures(butler, [planned])
    deliver(store, raws["S00"])
    io = ButlerIO(butler, "LSSTComCam")
    io.get_raw_blocking(GROUP, 0, 1, DistributorClient.from_location(store.root), timeout=2)
    (exp,) = butler.registry.queryDimensionRecords("exposure", instrument="LSSTComCam")
    assert exp.timespan.begin.mjd == pytest.approx(MJD - 5 / 86400, abs=1e-9)


def test_raw_of_another_detector_is_refused(butler, raws):
    io = ButlerIO(butler, "LSSTComCam")
    with pytest.raises(BadInputError, match="detector 1, expected LSSTComCam detector 0"):
        io.ingest_raw(raws["S01"], 0)


def _job(repo, dist, det, queue):
    from lsst.daf.butler import Butler

    try:
        io = ButlerIO(Butler.from_config(repo, writeable=True), "LSSTComCam")
        (raw,) = io.get_raw_blocking(GROUP, det, 1, DistributorClient.from_location(dist), timeout=30)
        queue.put((det, raw.metadata.detector_name))
    except Exception as exc:  # reported to the parent
        queue.put((det, f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_concurrent_jobs_register_the_same_exposure(butler, store, tmp_path):
    """Four CCD jobs of one new visit, in four processes, all register its records at once."""
    dets = ["R22_S00", "R22_S01", "R22_S02", "R22_S10"]
    for det in dets:
        deliver(store, raw_file(tmp_path / "raws", det=det))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_job, args=(butler._config.configDir.ospath, str(store.root), d, queue))
        for d in dets
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == {d: d for d in dets}
    assert len(list(butler.registry.queryDimensionRecords("exposure", instrument="LSSTComCam"))) == 1
    assert len(butler.query_datasets(ds.RAW, collections=ds.raw_run("LSSTComCam"), explain=False)) == 4


# ---------------------------------------------------------------- calibrations and templates
def test_get_calib_by_validity(butler, tmp_path):
    d = tmp_path / "calibs"
    d.mkdir()
    for name, value in (("bias.fits", 5.0), ("flat.fits", 0.95)):
        mask = np.zeros((10, 12), np.int32)
        mask[1, 2] = 1
        plane = np.full((10, 12), value, np.float32)
        write_image(Image(plane, np.full((10, 12), 3.0, np.float32), mask), d / name, lossless=True)
    (d / "manifest.yaml").write_text(
        yaml.safe_dump(
            {
                "instrument": "LSSTComCam",
                "datasets": [
                    {
                        "dataset_type": "bias",
                        "file": "bias.fits",
                        "data_id": {"detector": 0},
                        "valid_from": "2024-11-01T00:00:00",
                        "valid_to": "2024-12-01T00:00:00",
                    },
                    {
                        "dataset_type": "flat",
                        "file": "flat.fits",
                        "data_id": {"detector": 0, "physical_filter": "g_01"},
                    },
                ],
            }
        )
    )
    ingest_manifest(butler, d)
    io = ButlerIO(butler, "LSSTComCam")
    bias = io.get_calib("bias", "R22_S00", MJD)
    assert bias.image[0, 0] == pytest.approx(5.0, abs=0.06)  # quantized at 1/16 of sqrt(3)
    assert bias.mask[1, 2] == 1 and not bias.variance.any()  # ISR reads image and mask only
    # held from before the raw to ISR: a uint16 mask (MaskBits fit) and a variance with no memory
    assert bias.mask.dtype == np.uint16 and int(bias.mask.sum()) == 1
    assert bias.variance.shape == (10, 12) and bias.variance.strides == (0, 0)
    assert not bias.variance.flags.writeable
    assert io.get_calib("bias", 0, "2024-11-20T03:00:00").image[0, 0] == pytest.approx(5.0, abs=0.06)
    assert io.get_calib("bias", 0, "2024-12-02T00:00:00") is None
    assert io.get_calib("bias", 1, MJD) is None
    assert io.get_calib("flat", 0, MJD, physical_filter="g_01").image[0, 0] == pytest.approx(0.95)
    assert io.get_calib("flat", 0, MJD, physical_filter="r_03") is None
    with pytest.raises(BadInputError, match="physical_filter"):
        io.get_calib("flat", 0, MJD)
    with pytest.raises(BadInputError, match="kind"):
        io.get_calib("dark", 0, MJD)


def test_get_calib_from_a_repository_without_the_planes_parameter(butler):
    """Repositories created before ``planes`` existed: the whole calibration is read.

    (The storage-class definition is process-wide in daf_butler, so the old definition is
    stood in for by the dataset ref's storage class rather than a second repository.)
    """
    import types

    calls = []
    sc = types.SimpleNamespace(parameters=frozenset({"bbox"}))
    ref = types.SimpleNamespace(datasetType=types.SimpleNamespace(storageClass=sc))
    io = ButlerIO(butler, "LSSTComCam")
    io.butler = types.SimpleNamespace(find_dataset=lambda *a, **k: ref,
                                      get=lambda r, **kw: calls.append(kw) or "bias")
    assert io.get_calib("bias", 0, MJD) == "bias"
    sc.parameters = frozenset({"bbox", "planes"})
    io.get_calib("bias", 0, MJD)
    assert calls == [{}, {"parameters": {"planes": ("image", "mask")}}]


def test_get_templates(butler, tmp_path):
    inst = get_instrument("LSSTComCam")
    corners = inst.footprint(inst.detector(4), 53.0, -28.0, 0.0, 10.0)
    sm = SkyMap("sim", [(53.0, -28.0)], patch_size=2000, overlap=100, tract_radius_deg=0.5)
    patches = sm.patches_overlapping(corners)
    assert patches
    d = tmp_path / "templates"
    d.mkdir()
    (d / "skymap.yaml").write_text(yaml.safe_dump(sm.to_dict()))
    entries = []
    for p in patches:
        patch_image = Image(np.full(p.shape, p.patch, np.float32), wcs=p.wcs)
        write_image(patch_image, d / f"t{p.patch}.fits", lossless=True)
        entries.append(
            {
                "dataset_type": "template_coadd",
                "file": f"t{p.patch}.fits",
                "data_id": {"tract": p.tract, "patch": p.patch, "band": "r"},
            }
        )
    (d / "manifest.yaml").write_text(
        yaml.safe_dump({"instrument": "LSSTComCam", "skymap": "skymap.yaml", "datasets": entries})
    )
    assert ButlerIO(butler, "LSSTComCam").get_templates(corners, "r") == []  # nothing ingested yet
    ingest_manifest(butler, d)
    io = ButlerIO(butler, "LSSTComCam")
    got = io.get_templates(corners, "r")
    assert sorted(t.image[0, 0] for t in got) == sorted(float(p.patch) for p in patches)
    # only the part of each patch that covers the CCD (plus a margin) is read, with a shifted WCS
    by_patch = {int(t.image[0, 0]): t for t in got}
    for p in patches:
        t = by_patch[p.patch]
        assert t.shape[0] <= p.shape[0] and t.shape[1] <= p.shape[1]
        x0, y0 = t.metadata["BBOX_X0"], t.metadata["BBOX_Y0"]
        want = p.wcs.pixel_to_world_values(x0 + 5.0, y0 + 7.0)
        assert np.allclose(t.wcs.pixel_to_world_values(5.0, 7.0), want)
    assert sum(t.image.size for t in got) < sum(p.shape[0] * p.shape[1] for p in patches)
    assert io.get_templates(corners, "g") == []
    far = inst.footprint(inst.detector(4), 200.0, 30.0, 0.0, 10.0)
    assert io.get_templates(far, "r") == []
    # with each patch, its template_sources (made at ingest; these flat patches have no sources)
    pairs = list(io.iter_template_patches(corners, "r"))
    assert sorted(t.image[0, 0] for t, _ in pairs) == sorted(float(p.patch) for p in patches)
    assert all(list(cat.columns) == ["ra", "dec", "flux"] and cat.empty for _, cat in pairs)
    # a repository from before template_sources existed: the patches come without catalogues
    butler.pruneDatasets(butler.query_datasets(ds.TEMPLATE_SOURCES, collections="*", find_first=False,
                                              explain=False),
                         disassociate=True, unstore=True, purge=True)
    butler.registry.removeDatasetType(ds.TEMPLATE_SOURCES)
    old = ButlerIO(butler, "LSSTComCam")
    assert [cat for _, cat in old.iter_template_patches(corners, "r")] == [None] * len(patches)


# ---------------------------------------------------------------- outputs
def test_put_outputs_and_rerun(butler, raws):
    register_exposures(butler, [translate_header(read_raw_header(raws["S00"]))])
    run = register_output_run(butler, "LSSTComCam", 20241108)
    io = ButlerIO(butler, "LSSTComCam")
    img = ccd_image(detector=0)
    refs = io.put_outputs(
        VISIT,
        "R22_S00",
        calexp=img,
        diffim=img,
        dia_sources=pd.DataFrame({"flux": [1.0, 2.0]}),
        metrics={"n": 2},
    )
    assert {r.datasetType.name for r in refs} == {ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS}
    assert {r.run for r in refs} == {run}
    img.image[:] = 0.0
    io.put_outputs(VISIT, 0, diffim=img, metrics={"n": 3})  # a rerun
    kw = {"instrument": "LSSTComCam", "visit": VISIT, "detector": 0, "collections": run}
    assert butler.get(ds.METRICS, **kw) == {"n": 3}
    assert butler.get(ds.DIFFIM, **kw).image.array.max() == 0.0
    assert butler.get(ds.CALEXP, **kw).image.array.max() > 0.0
    assert list(butler.get(ds.DIA_SOURCES, **kw)["flux"]) == [1.0, 2.0]
    assert len(butler.query_datasets(ds.DIFFIM, collections=run, explain=False)) == 1


def test_discard_outputs_removes_what_a_failed_attempt_put(butler, raws):
    register_exposures(butler, [translate_header(read_raw_header(raws["S00"]))])
    run = register_output_run(butler, "LSSTComCam", 20241108)
    io = ButlerIO(butler, "LSSTComCam")
    io.put_outputs(VISIT, 0, dia_sources=pd.DataFrame({"flux": [1.0]}), metrics={"n": 1})
    io.put_outputs(VISIT, 1, metrics={"other": "CCD"})
    assert io.discard_outputs(VISIT, "R22_S00", run) == 2
    for name in (ds.DIA_SOURCES, ds.METRICS):
        assert butler.find_dataset(name, instrument="LSSTComCam", visit=VISIT, detector=0,
                                   collections=run) is None
    # the neighbouring CCD keeps its outputs; a run that does not exist yet has nothing to remove
    metrics = butler.get(ds.METRICS, instrument="LSSTComCam", visit=VISIT, detector=1, collections=run)
    assert metrics == {"other": "CCD"}
    assert io.discard_outputs(VISIT, 0, run) == 0
    assert io.discard_outputs(VISIT, 0, "LSSTComCam/prompt/never") == 0


def test_put_outputs_creates_missing_run_and_rejects_unknown_visit(butler, raws):
    register_exposures(butler, [translate_header(read_raw_header(raws["S00"]))])
    io = ButlerIO(butler, "LSSTComCam")
    io.put_outputs(VISIT, 0, metrics={"ok": True}, run="LSSTComCam/prompt/custom")
    assert butler.collections.query("LSSTComCam/prompt/custom")
    with pytest.raises(BadInputError, match="visit"):
        io.put_outputs(123, 0, metrics={"ok": True})


def test_compact_calib_keeps_a_mask_whose_bits_do_not_fit():
    """A mask with bits beyond 16 (not MaskBits) stays int32: nothing is lost by the compaction."""
    from apbatch.butler.io import _compact_calib

    mask = np.zeros((4, 5), np.int32)
    mask[2, 3] = 1 << 20
    out = _compact_calib(Image(np.ones((4, 5), np.float32), np.ones((4, 5), np.float32), mask))
    assert out.mask.dtype == np.int32 and out.mask[2, 3] == 1 << 20
    assert not out.variance.any() and out.variance.strides == (0, 0)
    assert _compact_calib("not an image") == "not an image"
