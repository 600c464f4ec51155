"""HTCondor backend: one cluster per visit, one proc per CCD, through the ``htcondor2`` bindings.

The submit description is built as an `htcondor2.Submit`; per-CCD values travel as item data
(``queue ApDetector,ApDetectorName,ApArgs from (...)``; ``schedd.submit(sub, itemdata=...)``),
so a visit is one cluster whose proc ``i`` is ``works[i]``; job ids are ``<cluster>.<proc>``.
``batch_name`` is ``ap-<instrument>-<visit>`` and the custom attributes ``ApVisit``,
``ApDetector`` (per proc), ``ApDetectorName``, ``ApGroup``, ``ApInstrument`` and ``ApIntent``
make ``condor_q -batch`` and ``condor_q -af ApVisit ApDetector`` read well.

Quoting: every argument is single-quoted in HTCondor's "new" argument syntax, and every ``$``
in event data becomes ``$(DOLLAR)`` so the submit language's macro expansion leaves it alone;
the job is exec'd without a shell. A line break cannot be expressed in a submit
description at all, and is refused.

Retries belong to the daemon (exit codes 3 and 4, `apbatch.errors.ExitCode`): the description
says ``success_exit_code = 0`` and ``retry_until = ExitBySignal == false``, so HTCondor reruns
a job (up to ``backend.max_retries`` times) only when it was killed by a signal -- a lost
node, as Slurm's ``--requeue`` -- and never one that exited, whatever its code. A job running
longer than ``backend.time_limit`` is removed by ``periodic_remove`` and reported TIMEOUT.
The executable is an absolute path; a ``#!/usr/bin/env`` script (which needs a ``PATH``
that ``getenv = false`` does not give) is run by its resolved interpreter instead.
Each cluster carries the claim's submission token as ``ApSubmitToken``
(:meth:`HTCondorBackend.find_submitted`).

The schedd is an injected dependency (``schedd=`` or ``schedd_factory=``); by default
`htcondor2.Schedd` is located through the collector on first use (the constructor does no I/O).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import htcondor2

from ..config import HTCondorBackendConfig, time_limit_seconds
from ..errors import BadInputError, SchedulerError
from ..work import CcdWork
from .base import Backend, JobState, JobStatus, SubmittedJob, check_visit, checked_token

__all__ = ["HTCondorBackend", "condor_arg", "condor_string", "executable_argv"]

_log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^(?P<cluster>\d+)\.(?P<proc>\d+)$")
ITEM_KEYS = ("ApDetector", "ApDetectorName", "ApArgs")
_PROJECTION = ["ClusterId", "ProcId", "JobStatus", "ExitCode", "ExitBySignal", "ExitSignal",
               "HoldReason", "RemoveReason"]


def _no_newline(value: str, field: str) -> str:
    if "\n" in value or "\r" in value or "\x1f" in value:
        raise BadInputError(field, "holds a line break or control character, which HTCondor cannot carry",
                            "remove it from the event")
    return value


def condor_arg(value: str, field: str = "argument") -> str:
    """One argument in HTCondor's new argument syntax: single-quoted, macro-safe."""
    value = _no_newline(value, field)
    return "'" + value.replace("'", "''").replace('"', '""').replace("$", "$(DOLLAR)") + "'"


def condor_string(value: str, field: str = "attribute") -> str:
    """A ClassAd string literal for a ``+Attr`` line, macro-safe."""
    value = _no_newline(value, field)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$(DOLLAR)") + '"'


def _executable(name: str) -> str:
    """HTCondor resolves a relative executable against the submit directory, not PATH: resolve it."""
    return name if os.path.isabs(name) else (shutil.which(name) or name)


def executable_argv(command: Sequence[str]) -> list[str]:
    """``command`` with an absolute program that runs without ``PATH``.

    A script starting ``#!/usr/bin/env prog [args]`` would look ``prog`` up in a ``PATH`` that a
    ``getenv = false`` job does not have: it becomes ``/abs/prog [args] script ...``.
    """
    program = _executable(command[0])
    try:
        with open(program, "rb") as f:
            first = f.readline(512)
    except OSError:
        return [program, *command[1:]]
    if not first.startswith(b"#!"):
        return [program, *command[1:]]
    words = shlex.split(first[2:].decode(errors="replace"))
    if len(words) >= 2 and os.path.basename(words[0]) == "env" and not words[1].startswith("-"):
        interpreter = shutil.which(words[1])
        if interpreter is None:
            raise BadInputError("config job.command", f"{program} needs {words[1]!r}, which is not on PATH",
                                "use an absolute interpreter in its #! line")
        return [os.path.abspath(interpreter), *words[2:], program, *command[1:]]
    return [program, *command[1:]]


def _default_schedd(settings) -> Any:
    if settings.collector or settings.schedd_name:
        collector = htcondor2.Collector(settings.collector) if settings.collector else htcondor2.Collector()
        if settings.schedd_name:
            return htcondor2.Schedd(collector.locate(htcondor2.DaemonType.Schedd, settings.schedd_name))
        return htcondor2.Schedd(collector.locate(htcondor2.DaemonType.Schedd))
    return htcondor2.Schedd()


class HTCondorBackend(Backend):
    """Submits one visit as one HTCondor cluster; states from the queue, then the history.

    Parameters
    ----------
    config : `ApbatchConfig`
        As for `Backend`.
    schedd : object, optional
        Something with ``submit``/``query``/``history``/``act`` like `htcondor2.Schedd`.
    schedd_factory : callable, optional
        Called once, on first use, to make the schedd when ``schedd`` is not given.
    **kwargs
        ``runner``, ``executable`` as for `Backend`.
    """

    kind: ClassVar[str] = "htcondor"
    id_pattern = re.compile(r"^(?P<id>\d+\.\d+)$")
    concurrent_status = False  # one schedd client; its thread safety is not documented
    state_table = {
        "1": JobState.PENDING,    # Idle
        "2": JobState.RUNNING,    # Running
        "3": JobState.CANCELLED,  # Removed
        "4": JobState.COMPLETED,  # Completed (non-zero exit -> FAILED)
        "5": JobState.HELD,       # Held (HoldReason says why)
        "6": JobState.RUNNING,    # Transferring output
        "7": JobState.HELD,       # Suspended
    }

    def __init__(self, *args: Any, schedd: Any = None, schedd_factory: Callable[[], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.config.backend
        if not isinstance(settings, HTCondorBackendConfig):
            raise BadInputError("backend.kind", f"is {settings.kind!r}, not 'htcondor'",
                                "use make_backend(config)")
        self.settings: HTCondorBackendConfig = settings
        self._schedd = schedd
        self._schedd_factory = schedd_factory or (lambda: _default_schedd(self.settings))

    @property
    def schedd(self) -> Any:
        """The schedd client, made on first use."""
        if self._schedd is None:
            self._schedd = self._call("htcondor2.Schedd", self._schedd_factory)
        return self._schedd

    def _call(self, what: str, func: Callable, *args, **kwargs) -> Any:
        """Call the bindings; their errors become `SchedulerError` naming the call."""
        try:
            return func(*args, **kwargs)
        except (htcondor2.HTCondorException, RuntimeError, OSError, ValueError) as exc:
            raise SchedulerError([what], 1, "", f"{type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------- description
    def log_path(self, job_id: str | None, work: Any = None) -> str | None:
        """``<log_dir>/<label>_<ClusterId>.<ProcId>.out`` (stdout and stderr); `None` without the
        CCD (the label) or for an id not ``<cluster>.<proc>``."""
        work = getattr(work, "work", work)  # a ledger row or a CcdWork
        if work is None or not job_id or not _JOB_ID.match(str(job_id)):
            return None
        return f"{self.config.path(self.settings.log_dir).absolute()}/{work.label}_{job_id}.out"

    def description(self, works: Sequence[CcdWork], token: str | None = None) -> dict[str, str]:
        """The submit description of one visit (without its queue statement); ``token``: the
        claim's submission token (``+ApSubmitToken``)."""
        check_visit(works)
        s, first = self.settings, works[0]
        command = executable_argv(self.job_command(first.day_obs))
        limit = time_limit_seconds(s.time_limit)
        log_dir = self.config.path(s.log_dir).absolute()
        _no_newline(str(log_dir), "config backend.log_dir")
        fixed_args = " ".join(condor_arg(a, "config job.command") for a in command[1:])
        env = " ".join(condor_arg(f"{k}={v}", f"config job.env.{k}") for k, v in self.job_env().items())
        desc = {
            "universe": "vanilla",
            "executable": _no_newline(_executable(command[0]), "config job.command"),
            "arguments": f'"{fixed_args} $(ApArgs)"' if fixed_args else '"$(ApArgs)"',
            "environment": f'"{env}"',
            "getenv": "false",
            "transfer_executable": "false",
            "should_transfer_files": "IF_NEEDED",
            "batch_name": first.label,
            "request_memory": s.request_memory,
            "request_cpus": str(s.request_cpus),
            "max_retries": str(s.max_retries),
            "success_exit_code": "0",
            "retry_until": "ExitBySignal == false",
            "periodic_remove": f"JobStatus == 2 && time() - JobCurrentStartDate > {limit}",
            "output": f"{log_dir}/{first.label}_$(ClusterId).$(ProcId).out",
            "error": f"{log_dir}/{first.label}_$(ClusterId).$(ProcId).out",
            "log": f"{log_dir}/{first.label}.log",
            "+ApVisit": str(int(first.visit)),
            "+ApDayObs": str(int(first.day_obs)),
            "+ApGroup": condor_string(first.group_id, "group_id"),
            "+ApInstrument": condor_string(first.instrument, "instrument"),
            "+ApIntent": condor_string(first.intent, "intent"),
            "+ApDetector": "$(ApDetector)",
            "+ApDetectorName": '"$(ApDetectorName)"',
        }
        if token is not None:
            desc["+ApSubmitToken"] = f'"{checked_token(token)}"'
        for name, value in s.extra_attributes.items():
            desc[name if name.startswith("+") else f"+{name}"] = _no_newline(value, f"config backend.{name}")
        return desc

    def itemdata(self, works: Sequence[CcdWork]) -> list[dict[str, str]]:
        """One item per CCD, in the order of ``works`` (proc ``i`` is ``works[i]``)."""
        items = []
        for w in works:
            if not re.fullmatch(r"[A-Za-z0-9_]+", w.detector_name):
                raise BadInputError("detector_name", f"{w.detector_name!r} is not a detector name")
            args = " ".join(condor_arg(a, "job argument") for a in w.job_args())
            items.append({"ApDetector": str(int(w.detector)), "ApDetectorName": w.detector_name,
                          "ApArgs": args})
        return items

    def render(self, works: Sequence[CcdWork], token: str | None = None) -> str:
        """The submit description with its inline item data, as ``condor_submit`` would read it."""
        desc = self.description(works, token)
        lines = [f"{k} = {v}" for k, v in desc.items()]
        lines.append(f"queue {','.join(ITEM_KEYS)} from (")
        lines += [f"  {i['ApDetector']}, {i['ApDetectorName']}, {i['ApArgs']}" for i in self.itemdata(works)]
        lines.append(")")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------- submit / cancel
    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """One ``schedd.submit`` of the visit's cluster with one item per CCD."""
        self.prepare(works)
        sub = htcondor2.Submit(self.description(works, token))
        items = self.itemdata(works)
        log_dir = self.config.path(self.settings.log_dir)
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        log_dir.chmod(0o750)  # the job logs: not for everyone on the cluster
        result = self._call("htcondor2.Schedd.submit", self.schedd.submit, sub, itemdata=iter(items))
        cluster, first_proc, count = int(result.cluster()), int(result.first_proc()), int(result.num_procs())
        if count != len(works):
            raise SchedulerError(["htcondor2.Schedd.submit"], 1, str(result),
                                 f"asked for {len(works)} jobs, the schedd made {count}")
        _log.info("submitted %s (%d CCDs) as HTCondor cluster %d", works[0].label, len(works), cluster)
        return [SubmittedJob(w, f"{cluster}.{first_proc + i}") for i, w in enumerate(works)]

    def find_submitted(self, works: Sequence[CcdWork], token: str, since: float) -> list[SubmittedJob]:
        """The procs with ``ApSubmitToken == token``: ``schedd.query``, then ``schedd.history``
        (only if the queue has none of them); matched to ``works`` by ``ApDetector``."""
        check_visit(works)
        constraint = f'ApSubmitToken =?= "{checked_token(token)}"'  # never UNDEFINED
        projection = ["ClusterId", "ProcId", "ApDetector"]
        ads = self._call("htcondor2.Schedd.query", self.schedd.query, constraint=constraint,
                         projection=projection)
        if not ads:
            ads = self._call("htcondor2.Schedd.history", self.schedd.history, constraint=constraint,
                             projection=projection)
        by_detector = {w.detector: w for w in works}
        found: dict[int, SubmittedJob] = {}
        for ad in ads:
            det = ad.get("ApDetector")
            if isinstance(det, int) and det in by_detector and det not in found:
                found[det] = SubmittedJob(by_detector[det], f"{int(ad['ClusterId'])}.{int(ad['ProcId'])}")
        return [found[w.detector] for w in works if w.detector in found]

    def cancel(self, job_ids: Sequence[str]) -> None:
        """``condor_rm`` the given jobs (one ``schedd.act(Remove, ids)``)."""
        ids = [_checked_id(j) for j in job_ids]
        if ids:
            self._call("htcondor2.Schedd.act", self.schedd.act, htcondor2.JobAction.Remove, ids,
                       reason="apbatch cancel")

    # ------------------------------------------------------------- status
    def _constraint(self, job_ids: Sequence[str]) -> tuple[str, set[str]]:
        ids = {_checked_id(j) for j in job_ids}
        # every id matched _JOB_ID in _checked_id: the cluster id is what precedes "."
        clusters = sorted({int(j.split(".", 1)[0]) for j in ids})
        return " || ".join(f"ClusterId == {c}" for c in clusters), ids

    def _to_status(self, ads, wanted: set[str]) -> dict[str, JobStatus]:
        out = {}
        for ad in ads:
            job_id = f"{ad.get('ClusterId')}.{ad.get('ProcId')}"
            if job_id not in wanted or job_id in out:  # history lists the newest record first
                continue
            code = str(ad.get("JobStatus"))
            exit_code = None
            if code == "4":
                if ad.get("ExitBySignal"):
                    exit_code = 128 + int(ad.get("ExitSignal") or 0)
                else:
                    exit_code = ad.get("ExitCode")
            reason = ad.get("HoldReason") if code == "5" else ad.get("RemoveReason") if code == "3" else ""
            if code == "3" and "PeriodicRemove" in str(reason or ""):  # our wall-time limit
                out[job_id] = JobStatus(job_id, JobState.TIMEOUT, None, f"time limit: {reason}")
                continue
            out[job_id] = self.map_state(job_id, code, exit_code, str(reason or ""))
        return out

    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        constraint, wanted = self._constraint(job_ids)
        ads = self._call("htcondor2.Schedd.query", self.schedd.query, constraint=constraint,
                         projection=_PROJECTION)
        return self._to_status(ads, wanted)

    def _query_history(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        constraint, wanted = self._constraint(job_ids)
        ads = self._call("htcondor2.Schedd.history", self.schedd.history, constraint=constraint,
                         projection=_PROJECTION)
        return self._to_status(ads, wanted)


def _checked_id(job_id: str) -> str:
    if not _JOB_ID.match(str(job_id)):
        raise BadInputError("job id", f"{job_id!r} is not an HTCondor job id", "expected <cluster>.<proc>")
    return str(job_id)
