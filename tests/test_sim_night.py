"""Tests for the simulated night: plan, events, rendering, templates, replay and the CLI."""

import json
import math

import numpy as np
import pytest
from apbatch.cli import cli
from apbatch.distributor.store import DistributorStore
from apbatch.errors import BadInputError
from apbatch.events import NextVisit, NextVisitCanceled, StartIntegration, parse_event
from apbatch.image import read_image
from apbatch.instruments import get_instrument
from apbatch.raw import read_raw_header, translate_header
from apbatch.sim.events import read_timeline, replay, timeline
from apbatch.sim.night import NightPlan, plan_night
from apbatch.sim.produce import night_skymap, simulate_night
from apbatch.sim.templates import render_template, template_offset
from apbatch.sim.truth import read_truth, truth_path
from apbatch.skymap import SkyMap
from click.testing import CliRunner


def _plan(**kw):
    args = {
        "instrument": "LSSTComCam",
        "n_visits": 5,
        "seed": 21,
        "detectors": ["R22_S11"],
        "calibrations": {"BIAS": 1, "FLAT": 1},
        "cancel_every": 4,
    } | kw
    return plan_night(args.pop("instrument"), args.pop("n_visits"), args.pop("seed"), **args)


def test_plan_is_reproducible_and_round_trips(tmp_path):
    a, b = _plan(), _plan()
    assert a.to_dict() == b.to_dict()
    assert _plan(seed=22).to_dict() != a.to_dict()
    a.save(tmp_path / "n.json")
    assert NightPlan.load(tmp_path / "n.json").to_dict() == a.to_dict()
    with pytest.raises(BadInputError, match="night plan"):
        NightPlan.load(tmp_path / "missing.json")
    with pytest.raises(BadInputError):
        _plan(detectors=["R99_S99"])
    with pytest.raises(BadInputError):
        _plan(snaps=(3,))


def test_event_timing_and_content():
    plan = _plan(n_visits=8)
    items = timeline(plan)
    times = [i["time"] for i in items]
    assert times == sorted(times)
    events = [parse_event(i["event"]) for i in items if i["type"] == "event"]
    nv = {e.groupId: e for e in events if isinstance(e, NextVisit)}
    starts = [e for e in events if isinstance(e, StartIntegration)]
    canceled = [e for e in events if isinstance(e, NextVisitCanceled)]
    assert len(nv) == 8 and len(canceled) == 2
    calib = [e for e in starts if e.is_calibration]
    assert [e.intent for e in calib] == ["bias", "flat"] and all(e.groupId is None for e in calib)
    assert all(e.imageController == "C" for e in calib)
    for v in plan.visits:
        snaps = [e for e in starts if e.groupId == v.group_id]
        assert len(snaps) == len(v.exposures) == (0 if v.canceled else nv[v.group_id].nimages)
        for k, s in enumerate(snaps):
            assert s.intent == "science" and s.imageIndex == k + 1 and s.imagesInSequence == len(snaps)
            assert s.exposureTime == 30.0 / len(snaps)
        if snaps:
            assert snaps[0].private_sndStamp - nv[v.group_id].private_sndStamp >= 20.0
            assert nv[v.group_id].startTime == pytest.approx(snaps[0].private_sndStamp)
            assert nv[v.group_id].position == (v.ra, v.dec) and nv[v.group_id].cameraAngle == v.rotation
    assert {len(v.exposures) for v in plan.visits if not v.canceled} == {1, 2}
    raws = [i for i in items if i["type"] == "raw"]
    assert len(raws) == sum(len(v.exposures) for v in plan.visits) + 2
    for r in raws:  # a raw arrives after its readout
        e = next(e for e in starts if e.imageName == r["obs_id"])
        assert r["time"] >= e.private_sndStamp + e.exposureTime + 2.0


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("night")
    plan = _plan(n_visits=2, snaps=(2,), calibrations={"BIAS": 1}, cancel_every=0)
    manifest = simulate_night(plan, out, templates=False)
    return plan, out, manifest


def test_night_files(night):
    plan, out, manifest = night
    filters = {v.physical_filter for v in plan.visits}
    assert filters == {"r_03", "g_01"}
    assert manifest["counts"] == {"calibs": 1 + len(filters), "raws": 5, "truth": 2}
    inst = get_instrument("LSSTComCam")
    for v in plan.visits:
        for e in v.exposures:
            h = read_raw_header(out / "raw" / "LSSTComCam" / e.obs_id / f"{e.obs_id}_R22_S11.fits")
            m = translate_header(h)
            assert (m.group_id, m.visit_id, m.image_index, m.images_in_sequence) == (
                v.group_id,
                v.visit_id,
                e.image_index,
                2,
            )
        t = read_truth(truth_path(out / "truth", "LSSTComCam", v.visit_id, "R22_S11"))
        assert (t["nsnaps"] == 2).mean() > 0.99
        assert {"star", "galaxy"} <= set(t["kind"])
    flat = read_image(out / "calibs" / "LSSTComCam" / "flat" / "r_03" / "flat_r_03_R22_S11.fits")
    assert flat.image.shape == (4000, 4072) and abs(float(np.mean(flat.image)) - 1) < 1e-3
    assert (
        read_image(out / "calibs" / "LSSTComCam" / "bias" / "bias_R22_S11.fits").metadata["BUNIT"]
        == "electron"
    )
    assert (
        SkyMap.from_dict(__import__("yaml").safe_load((out / "skymap.yaml").read_text())).name
        == night_skymap(plan).name
    )
    assert inst.name == plan.instrument


def test_moving_object_moves_across_visits(night):
    plan, out, _ = night
    seen = []
    for v in plan.visits:
        t = read_truth(truth_path(out / "truth", "LSSTComCam", v.visit_id, "R22_S11"))
        seen.append(t[t["kind"] == "moving"][["id", "x", "y", "ra", "dec"]])
    # the mover was placed on this CCD in its field's first visit
    first_field = plan.visits[0].field
    assert len(seen[0]) == 1 and seen[0]["id"].iloc[0] == plan.movers[first_field].id


def test_replay_scales_time_and_delivers(night, tmp_path):
    plan, out, _ = night
    now = [1000.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    delivered = []
    summary = replay(
        out,
        tmp_path / "spool",
        speed=10.0,
        clock=lambda: now[0],
        sleep=sleep,
        deliver=lambda p, o, d: delivered.append((p.name, o, d)),
    )
    items = read_timeline(out / "timeline.jsonl")
    assert summary["events"] == sum(i["type"] == "event" for i in items) and summary["raws"] == 5
    assert sum(slept) == pytest.approx((items[-1]["time"] - items[0]["time"]) / 10.0)
    assert [d[1] for d in delivered] == [i["obs_id"] for i in items if i["type"] == "raw"]
    files = sorted((tmp_path / "spool").glob("*.json"))
    assert len(files) == summary["events"] and not list((tmp_path / "spool").glob(".*"))
    evs = [parse_event(f.read_text()) for f in files]
    assert abs(evs[0].private_sndStamp - (1000.0 + 37.0)) < 1e-6  # retimed to "now" (TAI)
    event_times = [i["time"] for i in items if i["type"] == "event"]
    assert evs[-1].private_sndStamp - evs[0].private_sndStamp == pytest.approx(
        (event_times[-1] - event_times[0]) / 10.0, abs=1e-3
    )


def test_replay_into_distributor(night, tmp_path):
    plan, out, _ = night
    summary = replay(out, tmp_path / "spool", tmp_path / "dist", speed=1e6)
    store = DistributorStore(tmp_path / "dist")
    v = plan.visits[0]
    got = store.list_group("LSSTComCam", v.group_id, "R22_S11")
    assert [e.obs_id for e in got] == [e.obs_id for e in v.exposures] and all(e.is_complete() for e in got)
    assert summary["raws"] == 5


def test_replay_errors(night, tmp_path):
    _, out, _ = night
    with pytest.raises(BadInputError, match="--speed"):
        replay(out, tmp_path / "s", tmp_path / "d", speed=0)
    with pytest.raises(BadInputError, match="--distributor"):
        replay(out, tmp_path / "s", None)
    with pytest.raises(BadInputError, match="timeline"):
        replay(tmp_path, tmp_path / "s", tmp_path / "d")


def test_template_differs_from_science_as_it_should():
    plan = _plan(n_visits=1, calibrations={})
    sky = plan.sky()
    sm = SkyMap("t", plan.fields, patch_size=800, overlap=50, tract_radius_deg=0.2)
    patch = sm.patch(0, 12)
    img = render_template(patch, "r", sky, plan.seed, fwhm_arcsec=0.6, offset_arcsec=0.05)
    assert img.metadata["BUNIT"] == "nJy" and img.metadata["PSFFWHM"] == 0.6
    assert img.wcs is patch.wcs and img.image.shape == (800, 800)
    # the brightest isolated star sits offset_arcsec away from where the WCS says
    src = sky.sources(*patch.wcs.pixel_to_world_values(399.5, 399.5), 0.08)
    x, y = patch.wcs.world_to_pixel_values(src["ra"].to_numpy(), src["dec"].to_numpy())
    inside = (x > 20) & (x < 780) & (y > 20) & (y < 780) & (src["kind"] == 0).to_numpy()
    order = np.argsort(src["mag"].to_numpy()[inside])
    k = np.nonzero(inside)[0][order[0]]
    xi, yi = int(round(x[k])), int(round(y[k]))
    cut = np.clip(img.image[yi - 6 : yi + 7, xi - 6 : xi + 7], 0, None)
    gy, gx = np.mgrid[-6:7, -6:7]
    dx, dy = (cut * gx).sum() / cut.sum() + xi - x[k], (cut * gy).sum() / cut.sum() + yi - y[k]
    ora, odec = template_offset(plan.seed, 0, 0.05)
    assert dx == pytest.approx(-ora * 3600 / 0.2, abs=0.05) and dy == pytest.approx(
        odec * 3600 / 0.2, abs=0.05
    )
    assert math.hypot(dx, dy) == pytest.approx(0.25, abs=0.06)


def test_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "sim",
            "night",
            "--out",
            str(tmp_path / "n"),
            "--visits",
            "1",
            "--snaps",
            "1",
            "--detectors",
            "R22_S11",
            "--no-templates",
            "--calibrations",
            "BIAS=1",
        ],
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.stdout.strip().splitlines()[-1])
    assert manifest["counts"]["raws"] == 2 and manifest["detectors"] == [4]
    res = runner.invoke(
        cli,
        [
            "sim",
            "replay",
            "--night",
            str(tmp_path / "n"),
            "--spool",
            str(tmp_path / "s"),
            "--distributor",
            str(tmp_path / "d"),
            "--speed",
            "100000",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["raws"] == 2
    res = runner.invoke(cli, ["sim", "night", "--out", str(tmp_path / "x"), "--snaps", "one"])
    assert res.exit_code != 0 and "--snaps" in str(res.exception or res.output)
    res = runner.invoke(cli, ["sim", "night", "--out", str(tmp_path / "x"), "--calibrations", "SKY=2"])
    assert res.exit_code != 0 and "--calibrations" in str(res.exception or res.output)
    assert not (tmp_path / "x").exists()


def test_cli_injects_calibration_faults(tmp_path):
    """--hot-amp / --bias-drift reach the calibration raws' plan; a bad drift is one line, no output."""
    runner = CliRunner()
    res = runner.invoke(cli, ["sim", "night", "--out", str(tmp_path / "n"), "--instrument", "LATISS",
                              "--visits", "0", "--no-templates", "--calibrations", "BIAS=1",
                              "--hot-amp", "C10", "--bias-drift", "C13=40"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "n" / "night.json").read_text())
    (bias,) = plan["calibrations"]
    assert bias["hot_amps"] == ["C10"] and [list(x) for x in bias["bias_drift"]] == [["C13", 40.0]]
    res = runner.invoke(cli, ["sim", "night", "--out", str(tmp_path / "x"), "--bias-drift", "C13"])
    assert res.exit_code != 0 and "--bias-drift" in str(res.exception or res.output)
    assert not (tmp_path / "x").exists()
    for option, value in (("--hot-amp", "XX"), ("--bias-drift", "C99=5")):
        res = runner.invoke(cli, ["sim", "night", "--out", str(tmp_path / "y"), "--instrument", "LATISS",
                                  "--visits", "0", "--no-templates", option, value])
        assert res.exit_code != 0 and option in str(res.exception or res.output)
        assert "has no amplifier" in str(res.exception or res.output)
        assert not (tmp_path / "y").exists()  # refused before anything is written
