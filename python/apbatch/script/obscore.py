"""``apbatch obscore``: the ObsCore records of the images released to the prompt repository.

The repository is ``embargo.prompt_repo``; the table (``obscore.schema_name``.``obscore.table``)
is in the PostgreSQL database of ``obscore.url``, or else of ``ppdb.url`` (SQLite paths resolved
against ``root`` as ``apbatch ppdb`` does, then refused: ObsCore needs pg_sphere). See
`apbatch.products.obscore`.

Cron order: ``apbatch ppdb replicate`` -> ``apbatch embargo release [--purge]`` ->
``apbatch obscore update`` (the update records what the release brought and forgets what the
purge removed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..config import ApbatchConfig, load_config
from ..errors import BadInputError

__all__ = ["create", "database_url", "update"]


def database_url(cfg: ApbatchConfig, url: str | None = None) -> tuple[str, str]:
    """The ObsCore database's URL and the config field it came from.

    Parameters
    ----------
    cfg : `ApbatchConfig`
        Configuration: ``obscore.url``, else ``ppdb.url``.
    url : `str`, optional
        Overrides both (``--url``).

    Returns
    -------
    url, field : `str`
        SQLAlchemy URL (SQLite paths made absolute under ``root``) and ``obscore.url``,
        ``ppdb.url`` or ``--url``.
    """
    if url is not None:
        return cfg.sqlalchemy_url(url), "--url"
    if cfg.obscore.url:
        return cfg.sqlalchemy_url(cfg.obscore.url), "obscore.url"
    return cfg.sqlalchemy_url(cfg.ppdb.url), "ppdb.url"


def create(cfg: ApbatchConfig, url: str | None = None) -> str:
    """Create the ObsCore table (with its schema and pg_sphere) unless it exists.

    Returns
    -------
    where : `str`
        ``schema.table at URL`` (password hidden).

    Raises
    ------
    BadInputError
        Raised if the database is not PostgreSQL, unreachable, or lacks pg_sphere.
    """
    from ..products.obscore import create_obscore_table  # noqa: PLC0415 (butler import: 1 s)

    db_url, field = database_url(cfg, url)
    shown = create_obscore_table(db_url, cfg.obscore.schema_name, cfg.obscore.table, field=field,
                                 connect_timeout=cfg.ppdb.connection_timeout)
    return f"{cfg.obscore.schema_name}.{cfg.obscore.table} at {shown}"


def update(
    cfg: ApbatchConfig | None = None,
    *,
    url: str | None = None,
    dry_run: bool = False,
    config_paths: list[str] | tuple[str, ...] = (),
    progress: Callable[[str], None] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Record the stored images of the prompt repository, forget the purged ones (one transaction).

    From the second run on, only the images ingested since the last run began are looked at
    (their start kept in ``<root>/obscore/update-mark.json``); ``full`` (and a missing or damaged
    mark) compares every stored image with the table, which is what notices purged images.

    Parameters
    ----------
    cfg : `ApbatchConfig`, optional
        Configuration; default: loaded from ``config_paths`` (or ``$APBATCH_CONFIG``).
    url : `str`, optional
        Database URL overriding ``obscore.url`` and ``ppdb.url``.
    dry_run : `bool`
        Count what would change; change nothing (nor create the table).
    config_paths : sequence of `str`
        YAML config files, when ``cfg`` is not given.
    progress : callable, optional
        Called with one line per visit changed (before the commit).
    full : `bool`
        Compare every stored image with the table (after ``embargo release --purge``).

    Returns
    -------
    summary : `dict`
        `apbatch.products.obscore.ObscoreUpdate` as a dict.

    Raises
    ------
    BadInputError
        Raised if ``embargo.prompt_repo`` is unset or not a repository, or the database is not
        PostgreSQL, unreachable, or lacks pg_sphere.
    """
    from ..products.obscore import VisitChange, obscore_url, update_obscore  # noqa: PLC0415
    from .embargo import open_repo  # noqa: PLC0415 (the one place that opens a configured repository)

    cfg = cfg if cfg is not None else load_config(list(config_paths) or None)
    if not cfg.embargo.prompt_repo:
        raise BadInputError("embargo.prompt_repo", "not set",
                            "set it to the public repository that `apbatch embargo release` fills")
    db_url, field = database_url(cfg, url)
    obscore_url(db_url, field)  # a SQLite URL is refused before the repository is opened
    prompt = open_repo(cfg.path(cfg.embargo.prompt_repo), "embargo.prompt_repo")

    def step(change: VisitChange) -> None:
        if progress is not None:
            progress(f"{change.instrument} visit {change.visit}: +{change.added} -{change.removed}")

    mark_path = cfg.path(MARK_FILE)
    key = {"prompt": str(cfg.path(cfg.embargo.prompt_repo).resolve()),
           "table": f"{cfg.obscore.schema_name}.{cfg.obscore.table}", "url": obscore_url(db_url, field)[1]}
    since = None if full else _load_mark(mark_path, key)
    summary = update_obscore(prompt, db_url, cfg.obscore.schema_name, cfg.obscore.table,
                             obs_collection=cfg.obscore.obs_collection,
                             publisher_did=cfg.obscore.publisher_did, dry_run=dry_run, field=field,
                             connect_timeout=cfg.ppdb.connection_timeout, after_visit=step, since=since)
    if summary.started is not None:
        mark_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(mark_path, json.dumps({**key, "started_utc": summary.started}, indent=1) + "\n")
    return summary.as_dict()


MARK_FILE = "obscore/update-mark.json"
"""Where (under the config's ``root``) the start of the last completed update is kept."""


def _load_mark(path: Path, key: dict[str, str]) -> Any:
    """The start (`astropy.time.Time`) of the last update saved at ``path`` for this repository
    and table; `None` if none or damaged (then a full update, which is always right)."""
    from astropy.time import Time  # noqa: PLC0415

    try:
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in key} != key:
            return None
        return Time(saved["started_utc"], scale="utc")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
