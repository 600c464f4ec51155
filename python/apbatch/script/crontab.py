"""``apbatch night crontab``: the crontab that runs apbatch's day with this install.

After the night: ``night reprocess`` (what failed or was missed), then ``night footprint`` and
``night report`` (text with the page beside it, and JSON). With ``products``, the prompt products
too: ``ppdb replicate`` every 10 minutes, hourly ``embargo release`` then ``obscore update``, and
a weekly ``embargo release --purge`` then ``obscore update``. Every command is idempotent (a run
skipped or killed is done by the next); ``flock -n`` keeps a slow run from overlapping the next.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from ..errors import BadInputError

__all__ = ["crontab_text", "install_paths"]


def _cron_word(text: str | Path) -> str:
    return shlex.quote(str(text)).replace("%", "\\%")  # cron turns a bare % into a newline


def _times(**fields: str) -> dict[str, str]:
    """``{field: "M H"}`` of each ``--name-at`` HH:MM value."""
    out = {}
    for field, value in fields.items():
        m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value)
        if not m:
            raise BadInputError(field, f"{value!r} is not a time HH:MM", "e.g. 10:00")
        out[field] = f"{int(m[2])} {int(m[1])}"
    return out


def crontab_text(*, python: str, apbatch: str, config: str, log_dir: str, report_dir: str,
                 reprocess_at: str = "10:00", report_at: str = "10:30", products: bool = False) -> str:
    """The crontab: ``night reprocess``, then ``night footprint`` and ``night report``; with
    ``products``, the PPDB replication, the embargo release and ObsCore (module docstring).

    Parameters
    ----------
    python, apbatch : `str`
        Absolute paths of the interpreter and the ``apbatch`` command (`install_paths`).
    config : `str`
        Absolute path of the one config file every command reads.
    log_dir, report_dir : `str`
        Absolute directories for the commands' output and for the reports, page and MOCs.
    reprocess_at, report_at : `str`
        HH:MM (the cron daemon's time zone).
    products : `bool`
        Also the prompt products' lines.

    Raises
    ------
    BadInputError
        Raised if a time is not HH:MM or a path is not absolute (cron has no working directory).
    """
    times = _times(**{"--reprocess-at": reprocess_at, "--report-at": report_at})
    for field, value in (("python", python), ("apbatch", apbatch), ("--config", config),
                         ("--log-dir", log_dir), ("--report-dir", report_dir)):
        if not os.path.isabs(value):
            raise BadInputError(field, f"{value!r} is not an absolute path", "cron needs absolute paths")
    cfg, log, out = f"--config {_cron_word(config)}", Path(log_dir), Path(report_dir)

    def cmd(args: str, log_name: str) -> str:
        return f"{_cron_word(python)} {_cron_word(apbatch)} {args} {cfg} >> {_cron_word(log / log_name)} 2>&1"

    def lock(name: str) -> str:
        return f"flock -n {_cron_word(log / name)}"

    report = out / "night-{day_obs}"
    reprocess_at, report_at = times["--reprocess-at"], times["--report-at"]
    lines = [
        "# apbatch's day (install with `crontab FILE`; times are the cron daemon's time zone).",
        "# reprocess: refresh job states, resubmit retriable (exit 3/4) and lost jobs, submit missed CCDs",
        "# of the night that ended (default --day-obs: yesterday's UTC date, the night that ended this",
        "# morning in Chile); then where it looked (MOC + PNG) and its report (text with the page beside",
        "# it, and JSON), written atomically, one file per day_obs; a report exit 6 (CCDs need",
        "# attention) makes cron mail its output. flock keeps two runs from overlapping; every command",
        "# is idempotent. Create the log directory first.",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        f"{reprocess_at} * * * {lock('night.lock')} {cmd('night reprocess', 'night-reprocess.log')}",
        f"{report_at} * * * {cmd(f'night footprint --out {_cron_word(out)}', 'night-report.log')}; "
        + cmd(f"night report --out {_cron_word(str(report) + '.txt')} --html {_cron_word(out)}",
              "night-report.log"),
        f"{report_at} * * * "
        + cmd(f"night report --json --out {_cron_word(str(report) + '.json')}", "night-report.log"),
    ]
    if products:
        lines += [
            "# prompt products: APDB -> PPDB every 10 minutes (or run `apbatch ppdb replicate --follow` as a",
            "# service); hourly, release what left the embargo and record the released images in ObsCore;",
            "# weekly, purge images older than embargo.cache_days; then ObsCore drops them (--full).",
            f"*/10 * * * * {lock('ppdb.lock')} {cmd('ppdb replicate', 'ppdb.log')}",
            f"5 * * * * {lock('embargo.lock')} {cmd('embargo release', 'embargo.log')} && "
            + cmd("obscore update", "embargo.log"),
            f"35 14 * * 0 {lock('embargo.lock')} {cmd('embargo release --purge', 'embargo.log')} && "
            + cmd("obscore update --full", "embargo.log"),
        ]
    return "\n".join(lines) + "\n"


def install_paths() -> tuple[str, str]:
    """The Python interpreter running now and the ``bin/apbatch`` shim of this install, absolute.

    Raises
    ------
    BadInputError
        Raised if no ``apbatch`` command can be found (neither the shim nor one on ``PATH``).
    """
    import shutil  # noqa: PLC0415

    import apbatch  # noqa: PLC0415

    shim = Path(apbatch.__file__).resolve().parents[2] / "bin" / "apbatch"
    found = str(shim) if shim.is_file() else shutil.which("apbatch")
    if not found:
        raise BadInputError("apbatch", "cannot find the apbatch command of this install",
                            "put bin/apbatch on PATH")
    return os.path.abspath(sys.executable), os.path.abspath(found)
