"""Tests of apbatch.script.crontab (``apbatch night crontab``): the example file is what the command
prints, every line's commands parse as apbatch commands, and the nightly lines run under cron's sh."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import click
import pytest
from apbatch.cli import cli
from apbatch.errors import BadInputError
from apbatch.script.crontab import crontab_text
from test_night import env, run  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parent.parent
INSTALL = {"python": "/opt/apbatch/.venv/bin/python", "apbatch": "/opt/apbatch/bin/apbatch",
           "config": "/opt/apbatch/etc/apbatch.yaml", "log_dir": "/var/log/apbatch",
           "report_dir": "/var/lib/apbatch/reports"}


def jobs(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#") and "=" not in line[:6]]


def apbatch_commands(job: str) -> list[list[str]]:
    """The apbatch argument lists of a cron line (``python apbatch ARGS >> log 2>&1``, joined by ; or &&)."""
    words = shlex.split(job.split(None, 5)[5].replace("\\%", "%"))
    out, cur = [], None
    for w in words:
        if w == INSTALL["apbatch"]:
            cur = []
            out.append(cur)
        elif w == ">>":  # the redirection and what follows it up to the next command are not arguments
            cur = None
        elif cur is not None:
            cur.append(w)
    return out


def parse(args: list[str]) -> click.Context:
    """Parse ``args`` as the apbatch CLI would (options checked), without running anything."""
    cmd: click.Command | None = cli
    names = []
    while isinstance(cmd, click.Group):
        names.append(args[0])
        cmd, args = cmd.get_command(click.Context(cmd), args[0]), args[1:]
        assert cmd is not None, names
    return cmd.make_context(" ".join(names), list(args))  # raises a UsageError on a bad option


def test_example_matches_command_and_every_line_parses(env, capsys):  # noqa: F811
    expected = crontab_text(**INSTALL, products=True)
    assert (ROOT / "config" / "crontab.example").read_text() == expected
    lines = jobs(expected)
    assert [j.split()[:5] for j in lines] == [
        ["0", "10", "*", "*", "*"], ["30", "10", "*", "*", "*"], ["30", "10", "*", "*", "*"],
        ["*/10", "*", "*", "*", "*"], ["5", "*", "*", "*", "*"], ["35", "14", "*", "*", "0"]]
    commands = [cmd for job in lines for cmd in apbatch_commands(job)]
    assert [c[:2] for c in commands] == [
        ["night", "reprocess"], ["night", "footprint"], ["night", "report"], ["night", "report"],
        ["ppdb", "replicate"], ["embargo", "release"], ["obscore", "update"], ["embargo", "release"],
        ["obscore", "update"]]
    for args in commands:
        ctx = parse(args)
        assert ctx.params["config_paths"] == (INSTALL["config"],)
    assert jobs(crontab_text(**INSTALL)) == lines[:3]  # without products: the nightly lines only
    code, _, err = run(capsys, "night", "crontab")
    assert code == 2 and "--config" in err


@pytest.mark.parametrize("kw, field", [({"report_at": "25:00"}, "--report-at"),
                                       ({"reprocess_at": "9"}, "--reprocess-at"),
                                       ({"config": "c.yaml"}, "--config"),
                                       ({"log_dir": "logs"}, "--log-dir")])
def test_bad_times_and_relative_paths_are_refused(kw, field):
    with pytest.raises(BadInputError, match=f"^{field}: "):
        crontab_text(**{**INSTALL, **kw})


def test_nightly_lines_run_under_sh(env, capsys, tmp_path):  # noqa: F811
    """Each rendered cron command runs as cron would run it (sh -c, cron's PATH, no environment)."""
    code, out, _ = run(capsys, "night", "crontab", "--config", env.config, "--reprocess-at", "9:05",
                       "--log-dir", str(tmp_path / "logs"), "--products")
    assert code == 0
    lines = jobs(out)
    assert [j.split()[:2] for j in lines[:3]] == [["5", "9"], ["30", "10"], ["30", "10"]] and len(lines) == 6
    (tmp_path / "logs").mkdir()
    for job in lines[:2]:
        command = job.split(None, 5)[5].replace("\\%", "%")
        proc = subprocess.run(["/bin/sh", "-c", command], env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
                              timeout=180, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
    assert "polled 0 job(s)" in (tmp_path / "logs" / "night-reprocess.log").read_text()
    # a night without CCDs: no footprint (one line saying so, in the log), the report and its page
    log = (tmp_path / "logs" / "night-report.log").read_text()
    assert "error: " in log and "Traceback" not in log
    reports = sorted(p.name for p in (env.root / "reports").iterdir())
    assert len(reports) == 2 and reports[0].endswith(".html") and reports[1].endswith(".txt")
    assert (env.root / "reports" / reports[1]).read_text().startswith("night ")
