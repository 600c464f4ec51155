"""Tests for apbatch.products.embargo, apbatch.script.embargo and ``apbatch embargo release``.

The embargo repository is made once per module by the project's own code (``apbatch.script.repo``
create + register of a night plan, outputs put with ``ButlerIO.put_outputs``) and only read by the
release; every test releases into a prompt repository of its own.

Night (times TAI, each visit 30 s):
  V1  2024-11-09 06:34  day_obs 20241108  R22_S00 calexp + diffim; R22_S01 calexp only (no template)
  B   2024-11-09 02:24  day_obs 20241108  bias exposure: calib_verification of R22_S00
  V2  2024-11-11 06:34  day_obs 20241110  R22_S00 calexp + diffim + catalog + metrics
  V3  2024-11-15 06:34  day_obs 20241114  R22_S00 catalog + metrics
"""

import dataclasses
import datetime
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from apbatch import ids
from apbatch.butler import datasets as ds
from apbatch.butler.io import ButlerIO
from apbatch.cli import cli
from apbatch.config import load_config
from apbatch.errors import BadInputError
from apbatch.products.embargo import ReleaseMark, collect, purge_images, release
from apbatch.script import embargo as script
from apbatch.script import repo as repo_script
from astropy.time import Time
from click.testing import CliRunner
from lsst.daf.butler import Butler
from test_butler_images import ccd_image
from test_butler_repo import comcam_meta

INSTRUMENT = "LSSTComCam"
HOUR = datetime.timedelta(hours=1)
MINUTE = datetime.timedelta(minutes=1)


def exposure(day_obs, seq, begin, obs_type="science"):
    """A plan.yaml entry (RawMetadata fields) of a 30 s exposure beginning at ISO TAI ``begin``."""
    t = Time(begin, scale="tai")
    meta = dataclasses.asdict(comcam_meta(seq, mjd=t.mjd, group=t.isot))
    meta |= {"obs_id": f"CC_O_{day_obs}_{seq:06d}", "day_obs": day_obs,
             "exposure_id": ids.exposure_id(day_obs, seq), "visit_id": ids.visit_id_from_group(t.isot)}
    if obs_type != "science":
        meta |= {"group_id": None, "visit_id": None, "observation_type": obs_type, "ra": None, "dec": None}
    return meta


V1 = exposure(20241108, 266, "2024-11-09T06:34:00.000")
BIAS = exposure(20241108, 12, "2024-11-09T02:24:00.000", "bias")
V2 = exposure(20241110, 100, "2024-11-11T06:34:00.000")
V3 = exposure(20241114, 50, "2024-11-15T06:34:00.000")


def ended(meta):
    """When the exposure ended, as an aware UTC datetime."""
    return Time(meta["mjd_end"], format="mjd", scale="tai").utc.to_datetime(timezone=datetime.UTC)


@pytest.fixture(scope="module")
def embargo_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("embargo") / "embargo"
    night = root.parent / "night"
    night.mkdir()
    (night / "plan.yaml").write_text(yaml.safe_dump({"exposures": [V1, BIAS, V2, V3]}))
    repo_script.create(root)
    out = repo_script.register(root, INSTRUMENT, night)
    assert out["exposures"] == 4
    butler = Butler.from_config(str(root), writeable=True)
    io = ButlerIO(butler, INSTRUMENT)
    img = ccd_image(detector=0)
    cat = pd.DataFrame({"diaSourceId": [1, 2], "flux": [10.0, 20.0]})
    io.put_outputs(V1["visit_id"], 0, calexp=img, diffim=img, dia_sources=cat, metrics={"visit": 1})
    io.put_outputs(V1["visit_id"], 1, calexp=img, metrics={"visit": 1, "template": False})
    io.put_outputs(V2["visit_id"], 0, calexp=img, diffim=img, dia_sources=cat, metrics={"visit": 2})
    io.put_outputs(V3["visit_id"], 0, dia_sources=cat, metrics={"visit": 3})
    io.put_calib_verification(pd.DataFrame({"amp": ["C00"], "ok": [True]}), BIAS["exposure_id"], 0,
                              ds.output_run(INSTRUMENT, 20241108))
    return root


def refs_of(butler):
    """{(dataset type, run, data id): dataset id} of every output dataset."""
    out = {}
    for batch in collect(butler):
        for ref in batch.refs:
            out[(ref.datasetType.name, ref.run, str(ref.dataId.required))] = ref.id
    return out


@pytest.fixture
def repos(embargo_repo, tmp_path):
    prompt = tmp_path / "prompt"
    repo_script.create(prompt)  # empty: instrument, visits and runs come with the transfer
    return (Butler.from_config(str(embargo_repo), writeable=False),
            Butler.from_config(str(prompt), writeable=True), prompt)


def test_nothing_before_80_hours_everything_after(repos):
    embargo, prompt, root = repos
    everything = refs_of(embargo)
    assert len(everything) == 13

    s = release(embargo, prompt, ended(BIAS) + 80 * HOUR - MINUTE, 80)
    assert (s.released, s.embargoed) == (0, 13) and refs_of(prompt) == {}

    s = release(embargo, prompt, ended(V1) + 80 * HOUR + MINUTE, 80)  # the bias and V1, not V2
    assert [(v.element, v.id) for v in s.visits] == [("exposure", BIAS["exposure_id"]),
                                                     ("visit", V1["visit_id"])]
    v1 = s.visits[1]
    assert (v1.datasets, v1.ccds, v1.ccds_with_diffim) == (6, 2, 1)  # R22_S01 had no template
    assert (s.released, s.embargoed) == (7, 6)

    s = release(embargo, prompt, ended(V3) + 80 * HOUR + MINUTE, 80)
    assert s.released == 6 and s.already_public == 7 and s.embargoed == 0
    assert refs_of(prompt) == everything  # same ids, same RUN collections, nothing else

    again = release(embargo, prompt, ended(V3) + 200 * HOUR, 80)
    assert (again.released, again.already_public, again.visits) == (0, 13, [])


def test_released_datasets_read_back_with_a_plain_butler_and_the_butler_cli(repos):
    embargo, prompt, root = repos
    release(embargo, prompt, ended(V3) + 81 * HOUR, 80)
    public = Butler.from_config(str(root))  # a plain reader, as a user would open it
    kw = {"instrument": INSTRUMENT, "visit": V1["visit_id"], "detector": 0,
          "collections": ds.output_run(INSTRUMENT, 20241108)}
    np.testing.assert_array_equal(public.get(ds.DIFFIM, **kw).image.array,
                                  embargo.get(ds.DIFFIM, **kw).image.array)
    assert public.get(ds.CALEXP, **kw).image.array.shape == (4000, 4072)
    assert list(public.get(ds.DIA_SOURCES, **kw)["flux"]) == [10.0, 20.0]
    assert public.get(ds.METRICS, **(kw | {"detector": 1})) == {"visit": 1, "template": False}
    verification = public.get(ds.CALIB_VERIFICATION, instrument=INSTRUMENT, exposure=BIAS["exposure_id"],
                              detector=0, collections=ds.output_run(INSTRUMENT, 20241108))
    assert list(verification["amp"]) == ["C00"]
    (visit,) = public.query_dimension_records("visit", instrument=INSTRUMENT, visit=V2["visit_id"])
    assert visit.day_obs == 20241110  # dimension records came along

    exe = Path(sys.executable).parent / "butler"
    out = subprocess.run([str(exe), "query-datasets", str(root), ds.DIFFIM, "--collections", "*"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(ds.DIFFIM)]
    assert sorted(r[1] for r in rows) == [ds.output_run(INSTRUMENT, 20241108),
                                          ds.output_run(INSTRUMENT, 20241110)]


def test_killed_midway_then_rerun_loses_nothing_and_duplicates_nothing(repos, monkeypatch):
    embargo, prompt, root = repos
    now = ended(V3) + 81 * HOUR

    def killed(item):
        raise KeyboardInterrupt(f"killed after {item.element} {item.id}")

    with pytest.raises(KeyboardInterrupt):
        release(embargo, prompt, now, 80, after_batch=killed)
    assert len(refs_of(prompt)) == 1  # the bias exposure's table, committed before the kill

    # killed inside the next visit's transaction, after its files were copied: rolled back whole
    original = prompt._datastore.transfer_from

    def dies_after_copying(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("killed while transferring")

    monkeypatch.setattr(prompt._datastore, "transfer_from", dies_after_copying)
    with pytest.raises(KeyboardInterrupt):
        release(embargo, prompt, now, 80)
    assert len(refs_of(prompt)) == 1
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".fits", ".parq", ".json")]
    assert [f.name.split("_LSSTComCam")[0] for f in files] == [ds.CALIB_VERIFICATION]  # no orphan files
    monkeypatch.undo()

    s = release(embargo, prompt, now, 80)
    assert (s.released, s.already_public) == (12, 1)
    assert refs_of(prompt) == refs_of(embargo)
    kw = {"instrument": INSTRUMENT, "visit": V1["visit_id"], "detector": 0,
          "collections": ds.output_run(INSTRUMENT, 20241108)}
    assert prompt.get(ds.DIFFIM, **kw).image.array.shape == (4000, 4072)
    for name in ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS:
        n = len(prompt.query_datasets(name, collections="*", find_first=False, explain=False))
        assert n == len(embargo.query_datasets(name, collections="*", find_first=False, explain=False))


def test_purge_removes_only_images_older_than_the_cache(repos):
    embargo, prompt, root = repos
    release(embargo, prompt, ended(V3) + 81 * HOUR, 80)
    now = ended(V1) + datetime.timedelta(days=30, hours=1)  # V1 is 30 days old, V2 28
    assert purge_images(prompt, now, 30, dry_run=True) == 3
    assert purge_images(prompt, now, 30) == 3
    stored = {(r.datasetType.name, r.dataId["visit"], r.dataId["detector"]): prompt.stored(r)
              for name in (ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS)
              for r in prompt.query_datasets(name, collections="*", find_first=False, explain=False)}
    v1, v2 = V1["visit_id"], V2["visit_id"]
    assert {k for k, here in stored.items() if not here} == {(ds.CALEXP, v1, 0), (ds.DIFFIM, v1, 0),
                                                              (ds.CALEXP, v1, 1)}
    assert stored[(ds.CALEXP, v2, 0)] and stored[(ds.DIA_SOURCES, v1, 0)] and stored[(ds.METRICS, v1, 1)]
    assert purge_images(prompt, now, 30) == 0
    # a later release does not bring the purged images back from the embargo repository
    assert release(embargo, prompt, now, 80).released == 0
    kw = {"instrument": INSTRUMENT, "visit": v1, "detector": 0,
          "collections": ds.output_run(INSTRUMENT, 20241108)}
    assert list(prompt.get(ds.DIA_SOURCES, **kw)["flux"]) == [10.0, 20.0]


def test_a_ccd_rerun_after_its_release_replaces_the_released_outputs(embargo_repo, tmp_path):
    shutil.copytree(embargo_repo, tmp_path / "embargo")  # this test writes to its embargo repository
    embargo = Butler.from_config(str(tmp_path / "embargo"), writeable=True)
    repo_script.create(tmp_path / "prompt")
    prompt = Butler.from_config(str(tmp_path / "prompt"), writeable=True)
    now = ended(V3) + 81 * HOUR
    assert release(embargo, prompt, now, 80).released == 13
    ButlerIO(embargo, INSTRUMENT).put_outputs(V2["visit_id"], 0, metrics={"visit": 2, "attempt": 2})
    s = release(embargo, prompt, now, 80)
    assert (s.released, s.replaced, s.already_public) == (1, 1, 12)
    kw = {"instrument": INSTRUMENT, "visit": V2["visit_id"], "detector": 0,
          "collections": ds.output_run(INSTRUMENT, 20241110)}
    assert prompt.get(ds.METRICS, **kw) == {"visit": 2, "attempt": 2}
    assert refs_of(prompt) == refs_of(embargo)
    assert release(embargo, prompt, now, 80).released == 0


def test_a_pass_from_the_last_mark_looks_only_at_what_can_be_new(embargo_repo, tmp_path):
    shutil.copytree(embargo_repo, tmp_path / "embargo")  # this test writes to its embargo repository
    embargo = Butler.from_config(str(tmp_path / "embargo"), writeable=True)
    repo_script.create(tmp_path / "prompt")
    prompt = Butler.from_config(str(tmp_path / "prompt"), writeable=True)
    first = release(embargo, prompt, ended(V1) + 81 * HOUR, 80)
    assert first.released == 7 and first.since is None
    mark = ReleaseMark.from_dict(first.mark)
    assert mark.cutoff.tai.isot == Time(ended(V1) + 1 * HOUR).tai.isot
    no_margin = datetime.timedelta(0)
    # everything was ingested before the pass began: only the visits ending after its cutoff remain
    assert [b.id for b in collect(embargo, mark, no_margin)] == [V2["visit_id"], V3["visit_id"]]
    # a CCD of V1 rerun after the release: ingested after the mark, so looked at again, alone
    ButlerIO(embargo, INSTRUMENT).put_outputs(V1["visit_id"], 0, metrics={"visit": 1, "attempt": 2})
    batches = collect(embargo, mark, no_margin)
    assert [(b.id, len(b.refs)) for b in batches] == [(V1["visit_id"], 1), (V2["visit_id"], 4),
                                                      (V3["visit_id"], 2)]
    second = release(embargo, prompt, ended(V3) + 81 * HOUR, 80, since=mark, margin=no_margin)
    assert (second.released, second.replaced, second.already_public) == (7, 1, 0)
    assert second.since == first.mark
    assert refs_of(prompt) == refs_of(embargo)  # the same as a full pass would have left
    third = release(embargo, prompt, ended(V3) + 81 * HOUR, 80, since=ReleaseMark.from_dict(second.mark),
                    margin=no_margin)
    assert (third.released, third.already_public, third.visits) == (0, 0, [])  # nothing looked at


# ---------------------------------------------------------------- script and CLI
def write_config(tmp_path, embargo_repo, prompt="prompt", **embargo):
    path = tmp_path / "apbatch.yaml"
    section = {"prompt_repo": prompt} | embargo if prompt is not None else embargo
    path.write_text(yaml.safe_dump({"root": str(tmp_path), "job": {"repo": str(embargo_repo)},
                                    "embargo": section}))
    return path


def test_script_uses_the_configured_period_and_injected_clock(repos, tmp_path, embargo_repo):
    embargo, prompt, root = repos
    cfg = load_config(write_config(tmp_path, embargo_repo, period_hours=24, cache_days=1))
    clock = lambda: ended(V1) + 25 * HOUR  # noqa: E731
    lines = []
    out = script.release(cfg, clock=clock, progress=lines.append, purge=True, dry_run=True)
    assert out["released"] == 7 and out["purged"] == 0 and refs_of(prompt) == {}  # dry run: nothing
    out = script.release(cfg, clock=clock, progress=lines.append)
    assert out["released"] == 7 and out["purged"] is None and len(refs_of(prompt)) == 7
    assert f"visit {V1['visit_id']}: 6 dataset(s), 1/2 CCDs with a difference image" in lines
    out = script.release(cfg, "2024-11-15T06:00:00", purge=True)  # naive --now is UTC
    assert out["released"] == 4 and out["purged"] == 5  # V2 released; its and V1's images > 1 day old
    mark = root.parent / script.MARK_FILE
    assert out["mark"] is not None
    assert yaml.safe_load(mark.read_text())["cutoff_tai"] == out["mark"]["cutoff_tai"]
    assert script.release(cfg, "2024-11-15T06:00:00")["since"] == out["mark"]  # the next pass starts there
    assert script.release(cfg, "2024-11-15T06:00:00", full=True)["since"] is None
    mark.write_text("{not json")  # a damaged mark: a full pass, which is always right
    again = script.release(cfg, "2024-11-15T06:00:00")
    assert again["since"] is None and again["already_public"] == 11 and again["released"] == 0


def test_cli_release(repos, tmp_path, embargo_repo):
    config = write_config(tmp_path, embargo_repo)
    now = (ended(V3) + 81 * HOUR).isoformat()
    res = CliRunner().invoke(cli, ["embargo", "release", "--config", str(config), "--now", now, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "would release 13 dataset(s) of 4 visit(s)" in res.output and "1/2 CCDs" in res.output
    res = CliRunner().invoke(cli, ["embargo", "release", "--config", str(config), "--now", now, "--json"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["released"] == 13
    res = CliRunner().invoke(cli, ["embargo", "release", "--config", str(config), "--now", now])
    assert "released 0 dataset(s) of 0 visit(s); 13 already public, 0 still embargoed" in res.output


@pytest.mark.parametrize("case", ["unset", "missing", "same", "bad-now"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, embargo_repo, case):
    prompt = {"unset": None, "missing": "nowhere", "same": str(embargo_repo)}.get(case, "prompt")
    if case == "bad-now":
        repo_script.create(tmp_path / "prompt")
    config = write_config(tmp_path, embargo_repo, prompt)
    out = subprocess.run([sys.executable, "-m", "apbatch", "embargo", "release", "--config", str(config),
                          "--now", "yesterday-ish" if case == "bad-now" else "2024-12-01T00:00:00Z"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and ("--now" if case == "bad-now" else "embargo.prompt_repo") in line
    with pytest.raises(BadInputError):
        script.parse_now("2024-13-45")
