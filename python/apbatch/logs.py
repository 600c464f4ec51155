"""Log lines as text or as JSON, carrying the job's visit, detector, group and batch job id.

``apbatch --log-format json`` (or ``monitoring.log_format: json``, applied by the daemon and
by each job when the command line did not choose) makes every line one JSON object::

    {"time": "2026-11-26T10:21:21.123Z", "level": "INFO", "logger": "apbatch.job.task",
     "message": "...", "visit": 2024062500123, "detector": 4, "group": "...", "job_id": "1234_4"}

The job fields come from :func:`set_job_context` (``apbatch process-ccd`` sets them once per
process; a `contextvars.ContextVar` overrides them per context) through `JobContextFilter`,
which is on the handler, so every logger's lines get them; the batch job id is read from the
environment the batch system gives a job (:func:`job_id_from_env`). Text lines get the same
fields appended as ``[visit=... detector=... job=...]`` when they are set.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = ["JOB_FIELDS", "JobContextFilter", "JsonFormatter", "TextFormatter", "clear_job_context",
           "configure_logging", "job_context", "job_id_from_env", "set_job_context", "set_log_format"]

JOB_FIELDS = ("visit", "detector", "group", "job_id")
"""Fields of the job context, in the order they are written."""

_process_context: dict[str, Any] = {}
_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("apbatch_log_context",
                                                                                    default=None)
_explicit_format = False  # the command line chose the format: the config does not change it
_HANDLER_NAME = "apbatch"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_id_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The batch system's id of the job this process runs in, as apbatch's ledger writes it.

    Slurm array task: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>``, other Slurm job:
    ``SLURM_JOB_ID``; HTCondor: ``<ClusterId>.<ProcId>`` from the job ad file
    (``_CONDOR_JOB_AD``); the local backend: ``APBATCH_JOB_ID``. `None` outside a batch job.
    """
    env = os.environ if environ is None else environ
    if env.get("APBATCH_JOB_ID"):
        return env["APBATCH_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return env["SLURM_JOB_ID"]
    if env.get("_CONDOR_JOB_AD"):
        ad: dict[str, str] = {}
        try:
            with open(env["_CONDOR_JOB_AD"], encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    name, sep, value = line.partition("=")
                    if sep and name.strip() in ("ClusterId", "ProcId"):
                        ad[name.strip()] = value.strip()
        except OSError:
            return None
        if "ClusterId" in ad and "ProcId" in ad:
            return f"{ad['ClusterId']}.{ad['ProcId']}"
    return None


def set_job_context(**fields: Any) -> None:
    """Set job fields (`JOB_FIELDS`) for every later line of this process; `None` removes one."""
    for name, value in fields.items():
        if name not in JOB_FIELDS:
            raise ValueError(f"unknown log field {name!r}; one of {', '.join(JOB_FIELDS)}")
        if value is None:
            _process_context.pop(name, None)
        else:
            _process_context[name] = value


def clear_job_context() -> None:
    """Forget the process-wide job fields (a job's end, in a process that goes on)."""
    _process_context.clear()


def job_context() -> dict[str, Any]:
    """The job fields now in effect (process-wide ones, overridden by the context's)."""
    return {**_process_context, **(_context.get() or {})}


class JobContextFilter(logging.Filter):
    """Puts the job fields (:func:`job_context`) on every record as attributes (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = job_context()
        for name in JOB_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the job fields
    that are set, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
        out: dict[str, Any] = {"time": stamp, "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, with the job fields that are set appended in brackets."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{n}={getattr(record, n)}" for n in JOB_FIELDS if getattr(record, n, None) is not None]
        if not fields:
            return line
        first, nl, rest = line.partition("\n")
        return f"{first} [{' '.join(fields)}]{nl}{rest}"


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; text or json")


def configure_logging(level: str = "INFO", fmt: str | None = None, stream: TextIO | None = None, *,
                      force: bool = False) -> logging.Handler | None:
    """Give the root logger one handler with the job filter and the ``fmt`` formatter.

    Like `logging.basicConfig`, nothing is done if the root logger already has handlers that
    are not apbatch's (an application embedding apbatch, pytest's capture), unless ``force``.

    Parameters
    ----------
    level : `str`
        Root logger level.
    fmt : `str`, optional
        ``text`` or ``json``; `None`: text, and a later :func:`set_log_format` (from the
        config) may change it.
    stream : file, optional
        Default `sys.stderr`.
    force : `bool`
        Replace whatever handlers the root logger has.

    Returns
    -------
    handler : `logging.Handler` or `None`
        The handler installed, or `None` if the root logger was left alone.
    """
    global _explicit_format
    root = logging.getLogger()
    others = [h for h in root.handlers if h.get_name() != _HANDLER_NAME]
    if others and not force:
        return None
    _explicit_format = fmt is not None
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(_formatter(fmt or "text"))
    handler.set_name(_HANDLER_NAME)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def set_log_format(fmt: str) -> None:
    """Switch the handler :func:`configure_logging` installed to ``fmt`` (``monitoring.log_format``),
    unless the command line chose the format; other handlers (a library user's, pytest's) are
    left alone."""
    formatter = _formatter(fmt)
    if _explicit_format:
        return
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.setFormatter(formatter)
