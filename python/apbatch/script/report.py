"""``apbatch night report --html``: the night's HTML page (gather -> draw -> write atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ApbatchConfig
from ..ledger import Ledger

__all__ = ["write_night_html"]


def write_night_html(config: ApbatchConfig, *, day_obs: int, directory: str | Path,
                     ledger: Ledger | None = None, summary: dict[str, Any] | None = None,
                     **gather) -> Path:
    """Write ``<directory>/night-<day_obs>.html``, the self-contained report page of one night.

    The page names the night's coverage files found beside it (``apbatch night footprint --out``
    the same directory writes them); it does not write them: a full night's MOCs are hundreds of MB.

    Parameters
    ----------
    config : `ApbatchConfig`
        Where the ledger, butler repository, alert files and job logs are.
    day_obs : `int`
        The night, YYYYMMDD.
    directory : path
        Where the page goes (created if missing).
    ledger : `Ledger`, optional
        Injected for tests (default: the configured one).
    summary : `dict`, optional
        The night's `apbatch.script.night.night_report`, if already made.
    **gather
        More arguments of `apbatch.report.data.gather_night` (``metrics``, ``alerts_dir``...).

    Returns
    -------
    path : `Path`
        The page written.

    Raises
    ------
    BadInputError
        Raised if ``directory`` is a file or not writable (checked before anything is drawn;
        nothing is written then).
    """
    from ..report.data import gather_night
    from ..report.footprint import footprint_paths
    from ..report.html import check_directory, write_report

    check_directory(Path(directory))
    night = gather_night(config, day_obs=day_obs, ledger=ledger, summary=summary, **gather)
    if night.footprint is not None:
        night.footprint.files = {k: p for k, p in footprint_paths(directory, day_obs).items() if p.is_file()}
    return write_report(night, directory)
