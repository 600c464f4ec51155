"""Tests of apbatch.report.footprint and ``apbatch night footprint``: where the night looked, as MOCs.

The night is put into a real `Ledger` with its own API (claims, submissions, scheduler states):
a ComCam visit in r with one failed CCD, the same pointing again in g (a repeat: must not count
twice), a ComCam visit in i across RA 0 with four CCDs still running, a visit whose CCDs were
claimed but never submitted, and a bias without a pointing. The files are read back with mocpy
alone and compared with the CCDs' own sky polygons (`apbatch.instruments.Instrument.footprint`,
areas by spherical excess here, not by the code under test).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
import yaml
from apbatch.backends.base import JobState, JobStatus
from apbatch.cli import main
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.instruments import get_instrument
from apbatch.ledger import Ledger
from apbatch.night import night_rows
from apbatch.report.footprint import (
    DEFAULT_ORDER,
    OBSERVED_COLOUR,
    PROCESSED_COLOUR,
    check_order,
    footprint_paths,
    night_footprint,
    pointings_from_rows,
    write_footprint,
)
from apbatch.script.footprint import write_night_footprint
from apbatch.states import SubmittedJob
from apbatch.work import CcdWork
from matplotlib.colors import to_rgb
from mocpy import MOC
from PIL import Image

DAY = 20261120
OTHER_DAY = 20261118
CAM = get_instrument("LSSTComCam")
A = (10.0, -5.0, 0.0)     # r, detector 4 failed
B = A                     # g: the same pointing again
C = (0.05, 20.0, 25.0)    # i, across RA 0; detectors 0-3 still running
D = (40.0, 10.0, 0.0)     # claimed, never submitted
DETS = [d.id for d in CAM.science_detectors]


def _works(visit: int, pointing, pfilter: str | None, intent: str = "science",
           day: int = DAY) -> list[CcdWork]:
    ra, dec, rot = pointing if pointing else (None, None, None)
    return [CcdWork(instrument="LSSTComCam", detector=d, detector_name=CAM.detector(d).name,
                    group_id=f"2026-11-21T0{visit % 10}:00:00", visit=visit, day_obs=day, intent=intent,
                    exposure_time=30.0, nimages=1, distributor="/nonexistent", ra=ra, dec=dec, rotation=rot,
                    physical_filter=pfilter) for d in DETS]


def fill_ledger(ledger: Ledger) -> None:
    """The night described in the module docstring, through the ledger's own API."""
    t0, job = 1_795_000_000.0, 0
    plan = [(1, A, "r_03", "science", {4: (JobState.FAILED, 4)}, DAY),
            (2, B, "g_01", "science", {}, DAY),
            (3, C, "i_06", "science", dict.fromkeys(range(4), (JobState.RUNNING, None)), DAY),
            (5, None, None, "bias", {}, DAY),
            (6, A, "r_03", "science", {}, OTHER_DAY)]
    for visit, pointing, pfilter, intent, special, day in plan:
        works = _works(visit, pointing, pfilter, intent, day)
        ledger.claim(works, received_at=t0, now=t0)
        jobs = []
        for w in works:
            job += 1
            jobs.append(SubmittedJob(w, f"local-{job}"))
        ledger.record_submitted(jobs, "local", now=t0 + 1)
        done = (JobState.COMPLETED, 0)
        states = {j.job_id: JobStatus(j.job_id, *special.get(j.work.detector, done)) for j in jobs}
        ledger.update_states(states, "local", now=t0 + 60)
    ledger.claim(_works(4, D, "r_03"), received_at=t0, now=t0)  # never submitted


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    cfg = load_config(environ={}, overrides={"root": str(root)})
    ledger = Ledger.from_config(cfg)
    fill_ledger(ledger)
    yield cfg, ledger
    ledger.close()


@pytest.fixture(scope="module")
def written(night, tmp_path_factory):
    cfg, ledger = night
    out = tmp_path_factory.mktemp("out")
    fp = write_night_footprint(cfg, day_obs=DAY, out=out, ledger=ledger)
    return fp, out


def _centre(pointing, det) -> tuple[float, float]:
    d = CAM.detector(det)
    r, dec = CAM.sky_wcs(d, *pointing).pixel_to_world_values((d.nx - 1) / 2, (d.ny - 1) / 2)
    return float(r) % 360.0, float(dec)


def _contains(moc: MOC, points) -> np.ndarray:
    pts = np.array(points, float)
    return np.asarray(moc.contains_lonlat(pts[:, 0] * u.deg, pts[:, 1] * u.deg))


def _xyz(lon, lat) -> np.ndarray:
    lon, lat = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _polygon_area(corners: np.ndarray) -> float:
    """Spherical excess of a convex polygon (triangle fan, Van Oosterom & Strackee), deg^2."""
    v = _xyz(corners[:, 0], corners[:, 1])
    total = 0.0
    for b, c in zip(v[1:-1], v[2:], strict=True):
        total += 2 * math.atan2(abs(v[0] @ np.cross(b, c)), 1 + v[0] @ b + b @ c + c @ v[0])
    return math.degrees(math.degrees(total))


def _visit_area(pointing) -> float:
    return sum(_polygon_area(CAM.footprint(d, *pointing)) for d in DETS)


def _area(moc: MOC) -> float:
    return moc.sky_fraction * 4 * math.pi * (180 / math.pi) ** 2


def test_files_are_mocs_of_the_ccds(written):
    fp, out = written
    paths = footprint_paths(out, DAY)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # no temp files
    observed, processed = MOC.from_fits(str(paths["observed"])), MOC.from_fits(str(paths["processed"]))
    assert observed.max_order == processed.max_order == DEFAULT_ORDER == 14
    centres = {(p, d): _centre(p, d) for p in (A, C) for d in DETS}
    assert _contains(observed, list(centres.values())).all()
    # the never-submitted visit and the other night's visit (same pointing as A: covered) are not in it
    assert not _contains(observed, [_centre(D, d) for d in DETS]).any()
    # points 1.6 deg from a boresight are > 1 deg from every CCD (ComCam: 0.35 deg half-width + 0.16)
    far = [((ra + 1.6 * math.cos(t) / math.cos(math.radians(dec))) % 360.0, dec + 1.6 * math.sin(t))
           for ra, dec, _ in (A, C) for t in np.linspace(0, 2 * math.pi, 16, endpoint=False)]
    assert not _contains(observed, far).any() and not _contains(processed, far).any()
    # observed: the r/g field once plus the i field, both within 5% of the CCDs' own polygons
    # (order 14 cells of 12.9" along the CCD edges: measured +4.2-4.6%; order 16: test below)
    truth = _visit_area(A) + _visit_area(C)
    assert _area(observed) == pytest.approx(truth, rel=0.05)
    assert _area(observed) > truth  # a MOC covers every cell a CCD touches
    assert fp.summary()["observed_deg2"] == pytest.approx(_area(observed), abs=1e-4)


def test_a_repeated_pointing_is_counted_once(written):
    fp, _ = written
    s = fp.summary()
    r, g, i = (s["bands"][b]["observed_deg2"] for b in "rgi")
    assert r == g == pytest.approx(_visit_area(A), rel=0.06)  # measured +5.0% at order 14
    assert s["observed_deg2"] == pytest.approx(r + i, abs=1e-3)  # A and C do not overlap
    assert s["observed_deg2"] < r + g + i - 0.4
    assert s["ccds_observed"] == 27 and s["ccds_processed"] == 27 - 1 - 4


def test_processed_is_the_completed_subset(written):
    fp, out = written
    paths = footprint_paths(out, DAY)
    observed, processed = MOC.from_fits(str(paths["observed"])), MOC.from_fits(str(paths["processed"]))
    assert processed.intersection(observed) == processed and processed != observed
    # detector 4 of A failed but the g repeat completed it; C's running CCDs are not processed
    assert _contains(processed, [_centre(A, 4)]).all()
    assert not _contains(processed, [_centre(C, d) for d in range(4)]).any()
    assert _contains(processed, [_centre(C, d) for d in range(4, 9)]).all()
    s = fp.summary()
    assert s["processed_deg2"] == pytest.approx(s["observed_deg2"] - 4 / 9 * s["bands"]["i"]["observed_deg2"],
                                                rel=0.02)
    assert s["bands"]["i"]["processed_deg2"] == pytest.approx(5 / 9 * _visit_area(C), rel=0.06)


def test_a_higher_order_is_closer(night):
    cfg, ledger = night
    ccds = pointings_from_rows(night_rows(ledger, DAY))
    truth = _visit_area(A) + _visit_area(C)
    errs = {k: night_footprint(ccds, day_obs=DAY, order=k).summary()["observed_deg2"] / truth - 1
            for k in (14, 15, 16)}
    assert 0 < errs[16] < 0.012 < errs[15] < 0.025 < errs[14] < 0.05  # measured 1.07%, 2.13%, 4.2%


def test_png_draws_the_coverage(written):
    fp, out = written
    img = np.asarray(Image.open(footprint_paths(out, DAY)["png"]).convert("RGB"), dtype=int)
    assert img.shape[1] > 800
    for colour, least in ((PROCESSED_COLOUR, 20000), (OBSERVED_COLOUR, 2000)):
        rgb = np.array([round(255 * c) for c in to_rgb(colour)])
        assert (np.abs(img - rgb).sum(axis=-1) < 6).sum() > least, colour
    assert Image.open(io.BytesIO(fp.image())).format == "PNG"


def test_empty_night_draws_a_message_and_bad_orders_are_refused():
    fp = night_footprint([], day_obs=DAY)
    assert fp.ccds_observed == 0 and fp.summary()["observed_deg2"] == 0.0
    assert Image.open(io.BytesIO(fp.image())).size[0] > 200
    for bad in (7, 21, "x", "", True, -1, "15.5"):
        with pytest.raises(BadInputError, match="--order"):
            check_order(bad)
    assert check_order("16") == 16 and check_order(None) == DEFAULT_ORDER == 14


def test_a_failed_write_leaves_nothing_partial(night, tmp_path):
    cfg, ledger = night
    fp = night_footprint(pointings_from_rows(night_rows(ledger, DAY)), day_obs=DAY)
    footprint_paths(tmp_path, DAY)["processed"].mkdir()  # the rename onto it fails
    with pytest.raises(BadInputError, match="cannot write"):
        write_footprint(fp, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f"night-{DAY}.moc.fits", f"night-{DAY}-processed.moc.fits"])  # no temp file


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def config_file(night, tmp_path_factory):
    cfg, _ = night
    path = tmp_path_factory.mktemp("cfg") / "apbatch.yaml"
    path.write_text(yaml.safe_dump({"root": str(cfg.root)}))
    return str(path)


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_writes_and_prints(config_file, capsys, tmp_path):
    out = tmp_path / "fp"
    code, text, err = run(capsys, "night", "footprint", "--config", config_file, "--day-obs", str(DAY),
                          "--out", str(out))
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].startswith(f"night {DAY}: ") and "(27 CCDs)" in lines[0]
    assert "(22 CCDs), order 14" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == ["  band g", "  band i", "  band r"]
    assert lines[4:] == [f"wrote {p}" for p in footprint_paths(out, DAY).values()]
    code, text, _ = run(capsys, "night", "footprint", "--config", config_file, "--day-obs", str(DAY),
                        "--out", str(out), "--order", "15", "--json")
    res = json.loads(text)
    assert code == 0 and res["order"] == 15 and res["ccds_processed"] == 22
    assert MOC.from_fits(res["files"]["observed"]).max_order == 15
    assert res["observed_deg2"] == pytest.approx(_visit_area(A) + _visit_area(C), rel=0.025)


def test_cli_refuses_bad_input_in_one_line(config_file, capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["--day-obs", "2026-11-20"], "--day-obs: '2026-11-20' is not a date YYYYMMDD"),
             (["--day-obs", str(DAY), "--order", "3"], "--order: 3 is not a MOC order from 8 to 20"),
             (["--day-obs", str(DAY), "--order", "fifteen"], "--order: 'fifteen' is not a MOC order"),
             (["--day-obs", str(DAY), "--out", str(afile)], "--out: "),
             (["--day-obs", "20261119"], f"--day-obs: night 20261119 has no submitted science CCD (the "
                                         f"ledger's latest nights: {DAY} (45 CCDs), {OTHER_DAY} (9 CCDs))")]
    for args, msg in cases:
        code, out, err = run(capsys, "night", "footprint", "--config", config_file, *args)
        assert code == 2 and out == "", (args, err)
        assert len(err.strip().splitlines()) == 1 and msg in err, (args, err)
    assert afile.read_text() == "x"


def test_cli_without_ledger_exits_2_and_writes_nothing(capsys, tmp_path):
    cfg = tmp_path / "apbatch.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(tmp_path / "work")}))
    code, out, err = run(capsys, "night", "footprint", "--config", str(cfg), "--day-obs", str(DAY))
    assert code == 2 and out == "" and "ledger.url: no ledger at" in err
    assert not (tmp_path / "work").exists()


def test_text_and_json_report_carry_the_area(night):
    from apbatch.script.night import format_report, night_report

    cfg, ledger = night
    rep = night_report(cfg, day_obs=DAY, ledger=ledger)
    fp = rep["footprint"]
    assert fp["ccds_observed"] == 27 and fp["order"] == DEFAULT_ORDER
    line = (f"  sky covered     {fp['observed_deg2']:.2f} deg^2 observed, {fp['processed_deg2']:.2f} deg^2 "
            "processed")
    assert line in format_report(rep).splitlines()
    assert json.loads(json.dumps(rep)) == rep
    empty = night_report(cfg, day_obs=20261119, ledger=ledger)
    assert empty["footprint"] is None and "sky covered" not in format_report(empty)


def test_the_html_page_names_the_files_written_beside_it(night, tmp_path):
    from apbatch.script.report import write_night_html

    cfg, ledger = night

    def page_text() -> str:
        return write_night_html(cfg, day_obs=DAY, directory=tmp_path, ledger=ledger, metrics=lambda runs: {},
                                alerts_dir=tmp_path / "no-alerts").read_text()

    # the page and the text report select the same CCDs (so one run computes the MOCs once)
    from apbatch.report.data import gather_night
    from apbatch.report.footprint import pointings_from_visits

    visits = gather_night(cfg, day_obs=DAY, ledger=ledger, metrics=lambda runs: {},
                          alerts_dir=tmp_path / "no-alerts").visits
    assert pointings_from_visits(visits) == pointings_from_rows(night_rows(ledger, DAY))
    names = [p.name for p in footprint_paths(tmp_path, DAY).values()]
    text = page_text()
    assert "<h2>Where we looked</h2>" in text and not any(f"<code>{n}</code>" in text for n in names)
    assert [p.name for p in tmp_path.iterdir()] == [f"night-{DAY}.html"]  # the page writes no MOC
    write_night_footprint(cfg, day_obs=DAY, out=tmp_path, ledger=ledger)
    text = page_text()
    assert all(f"<code>{n}</code>" in text for n in names)
    s = write_night_footprint(cfg, day_obs=DAY, out=tmp_path / "again", ledger=ledger).summary()
    i, both = s["bands"]["i"], s
    assert f"<td>band i</td><td>{i['observed_deg2']:.2f}</td><td>{i['processed_deg2']:.2f}</td>" in text
    assert f"<td>all</td><td>{both['observed_deg2']:.2f}</td><td>{both['processed_deg2']:.2f}</td>" in text
    assert 0.44 < i["observed_deg2"] < 0.49 and 0.88 < both["observed_deg2"] < 0.97  # the CCDs' area +4-5%


def test_paths_are_documented_names(tmp_path):
    assert {k: p.name for k, p in footprint_paths(Path("x"), DAY).items()} == {
        "observed": f"night-{DAY}.moc.fits", "processed": f"night-{DAY}-processed.moc.fits",
        "png": f"night-{DAY}-footprint.png"}
