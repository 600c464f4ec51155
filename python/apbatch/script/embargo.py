"""``apbatch embargo release``: release the outputs whose embargo ended to the prompt repository.

The embargo repository is ``job.repo`` (where jobs read and write); the public one is
``embargo.prompt_repo``, created like any other with ``apbatch repo create``. See
`apbatch.products.embargo`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ApbatchConfig, load_config
from ..errors import BadInputError, RetriableError

__all__ = ["MARK_FILE", "open_repo", "parse_now", "release"]


def parse_now(value: str | None, clock: Callable[[], datetime.datetime] | None = None) -> datetime.datetime:
    """``--now``: an ISO time (UTC unless it says otherwise); `None` is the clock's time.

    Raises
    ------
    BadInputError
        Raised if ``value`` is not an ISO 8601 time.
    """
    if value is None:
        return (clock or (lambda: datetime.datetime.now(datetime.UTC)))()
    try:
        when = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadInputError("--now", f"{value!r} is not an ISO 8601 time",
                            "e.g. --now 2024-11-12T18:00:00Z") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def open_repo(path: Path, field: str):
    """A writeable butler on ``path``; bad input if there is no repository there."""
    import sqlalchemy.exc  # noqa: PLC0415
    from lsst.daf.butler import Butler  # noqa: PLC0415 (1 s import: only when needed)

    if not (path / "butler.yaml").exists():
        raise BadInputError(field, f"no butler repository at {str(path)!r}",
                            "create it with: apbatch repo create")
    try:
        return Butler.from_config(str(path), writeable=True)
    except (sqlalchemy.exc.OperationalError, TimeoutError, ConnectionError) as exc:
        raise RetriableError(f"cannot reach the registry of {path}: {' '.join(str(exc).split())}") from exc


MARK_FILE = "embargo/release-mark.json"
"""Where (under the config's ``root``) the last completed pass's `ReleaseMark` is kept."""


def _load_mark(path: Path, repos: dict[str, str]) -> Any:
    """The `ReleaseMark` saved at ``path`` for these two repositories; `None` if none (or unreadable)."""
    import json  # noqa: PLC0415

    from ..products.embargo import ReleaseMark  # noqa: PLC0415

    try:
        saved = json.loads(path.read_text())
        return ReleaseMark.from_dict(saved) if saved.get("repos") == repos else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no mark, or a damaged one: a full pass, which is always right


def release(
    cfg: ApbatchConfig | None = None,
    now: str | datetime.datetime | None = None,
    *,
    dry_run: bool = False,
    purge: bool = False,
    config_paths: list[str] | tuple[str, ...] = (),
    clock: Callable[[], datetime.datetime] | None = None,
    progress: Callable[[str], None] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Release what the embargo period allows; with ``purge``, then drop old images.

    Parameters
    ----------
    cfg : `ApbatchConfig`, optional
        Configuration; default: loaded from ``config_paths`` (or ``$APBATCH_CONFIG``).
    now : `str` or `datetime.datetime`, optional
        The current time (ISO string or aware datetime); default: ``clock()``.
    dry_run : `bool`
        Report what would be released (and purged); change nothing.
    purge : `bool`
        Also remove the prompt repository's images older than ``embargo.cache_days``.
    config_paths : sequence of `str`
        YAML config files, when ``cfg`` is not given.
    clock : callable, optional
        Returns the current aware `datetime.datetime` (default: the system clock, UTC).
    progress : callable, optional
        Called with one line per visit released.
    full : `bool`
        Look at every output dataset, not only those new since the last completed pass (whose
        `~apbatch.products.embargo.ReleaseMark` is kept in ``<root>/embargo/release-mark.json``).

    Returns
    -------
    summary : `dict`
        `apbatch.products.embargo.ReleaseSummary` as a dict, plus ``purged`` (images removed,
        `None` without ``purge``).

    Raises
    ------
    BadInputError
        Raised if ``embargo.prompt_repo`` is unset or not a repository, is the embargo repository
        itself, or ``now`` is not a time.
    """
    from ..products.embargo import purge_images  # noqa: PLC0415
    from ..products.embargo import release as run  # noqa: PLC0415

    cfg = cfg if cfg is not None else load_config(list(config_paths) or None)
    when = now if isinstance(now, datetime.datetime) else parse_now(now, clock)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    if not cfg.embargo.prompt_repo:
        raise BadInputError("embargo.prompt_repo", "not set",
                            "set it to the public repository (create it with: apbatch repo create)")
    embargo_path, prompt_path = cfg.path(cfg.job.repo), cfg.path(cfg.embargo.prompt_repo)
    if embargo_path.resolve() == prompt_path.resolve():
        raise BadInputError("embargo.prompt_repo", "is job.repo, the embargo repository itself",
                            "give the public repository")
    prompt = open_repo(prompt_path, "embargo.prompt_repo")
    embargo = open_repo(embargo_path, "job.repo")

    def step(item) -> None:
        if progress is not None:
            progress(f"{item.element} {item.id}: {item.datasets} dataset(s), "
                     f"{item.ccds_with_diffim}/{item.ccds} CCDs with a difference image")

    mark_path = cfg.path(MARK_FILE)
    repos = {"embargo": str(embargo_path.resolve()), "prompt": str(prompt_path.resolve())}
    since = None if full else _load_mark(mark_path, repos)
    summary = run(embargo, prompt, when, cfg.embargo.period_hours, dry_run=dry_run, after_batch=step,
                  since=since)
    if summary.mark is not None:
        import json  # noqa: PLC0415

        from ..atomic import write_atomic  # noqa: PLC0415

        mark_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(mark_path, json.dumps({"repos": repos, **summary.mark}, indent=1) + "\n")
    out = summary.as_dict()
    out["purged"] = purge_images(prompt, when, cfg.embargo.cache_days, dry_run=dry_run) if purge else None
    return out
