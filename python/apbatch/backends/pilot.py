"""Pilot backend: a few long-lived *pilot* processes run the per-CCD work in-process, warm.

Why: a per-CCD process spends ~2.7 s of CPU on imports and set-up (butler, APDB, alert schema,
sink) before it does anything for its CCD, and re-reads its detector's calibrations. A pilot
pays that once and keeps it (`apbatch.script.pilot`), then takes CCD after CCD.

Design: the local backend's state-directory protocol (`apbatch.backends.local`), with pilots
in place of its runner. ``submit`` writes exactly what the local backend writes (``counter``,
``queue/<id>``, ``jobs/<id>/job.json`` with the CCD's work, argv, config files and submission
token), then makes sure ``backend.pilots`` pilots are alive. What changes is who starts a job:

* **claim** (exactly once): a pilot writes its identity (pid, process start ticks, pilot id)
  to a private file in the job dir and ``os.link``-s it to ``jobs/<id>/started.json``. A link
  fails if the name exists, so of several pilots exactly one claims a job; only then is
  ``queue/<id>`` removed. A pilot that dies before the link leaves the job queued (another
  takes it); one that dies after leaves ``started.json`` naming a dead process, which
  ``status`` reports FAILED ("lost"), never done, so the daemon's retry rules apply;
* **exit code**: the pilot writes ``jobs/<id>/exit`` with the code ``apbatch process-ccd``
  would have exited with (0/2/3/4/5, `apbatch.errors.ExitCode`), the item's log goes to
  ``jobs/<id>/out.log``, and the job records its stage marks in the ledger as a process does;
* **status/cancel** are the local backend's: ``started.json``'s pid is the pilot's, so a
  running item is RUNNING while its pilot lives. Cancelling a running item ends its pilot
  (SIGTERM to the pilot's process group: an in-process CCD cannot be stopped half-way
  safely); the next ``submit`` or ``cancel`` starts new pilots for the work left queued;
* **pilots** register in ``pilots/<pilot id>.json`` (host, pid, start ticks, state, the item
  it runs, items done/failed, RSS), written atomically by the pilot; ``apbatch status``
  shows them (:meth:`PilotBackend.pilots`). A pilot ends when idle for
  ``backend.idle_timeout`` (checking under ``queue.lock`` that nothing is queued, so a
  ``submit`` never queues work for a pilot that is just leaving), after ``backend.max_lifetime``
  (the end of the night) or when its RSS after a CCD is above ``backend.max_rss_mib``; in the
  last two cases it starts a fresh pilot if work is queued. SIGTERM ends an idle pilot cleanly
  and kills a busy one at once.

Only local pilots are implemented: a pilot is a detached process on the submitting machine
(as the local backend's jobs are). Slurm/HTCondor pilots would need the state directory on a
shared filesystem with working ``link``/``flock`` and a pilot-submit path; not wired.
Job ids are ``pilot-<n>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..config import PilotBackendConfig, time_limit_seconds
from ..errors import BadInputError
from ..jobconfig import resolve_command
from ..work import CcdWork
from .base import EXPORTED, Backend, JobStatus, SubmittedJob, check_visit, render_shell_script
from .local import LocalBackend, _kill_if_running, _locked, _proc_start_ticks, _write_atomic

__all__ = ["PilotBackend", "claim_next", "pilot_records"]

_log = logging.getLogger(__name__)


class PilotBackend(LocalBackend):
    """Queues CCDs like `LocalBackend` and keeps up to ``backend.pilots`` warm pilots on them.

    See `Backend` for the constructor; ``python`` is accepted for symmetry with the local
    backend and unused. No I/O until a method is called.
    """

    kind: ClassVar[str] = "pilot"
    id_pattern = re.compile(r"^(?P<id>pilot-\d+)$")

    def __init__(self, *args: Any, python: str | None = None, **kwargs: Any) -> None:
        Backend.__init__(self, *args, **kwargs)
        settings = self.config.backend
        if not isinstance(settings, PilotBackendConfig):
            raise BadInputError("backend.kind", f"is {settings.kind!r}, not 'pilot'",
                                "use make_backend(config)")
        self.settings: PilotBackendConfig = settings  # type: ignore[assignment]
        self.python = python or sys.executable
        self.max_workers = settings.pilots
        self._runners: list[subprocess.Popen] = []
        self._pilot_command: list[str] | None = None

    # ------------------------------------------------------------- the pilot command
    def pilot_argv(self, day_obs: int) -> list[str]:
        """The command line of one pilot: ``backend.command`` (resolved to this install),
        ``--config`` with the night's resolved config file (its state dir and settings)."""
        if self._pilot_command is None:
            command = resolve_command(self.settings.command, self.executable)
            program = shutil.which(command[0])
            if program is None:  # refused before anything is queued
                raise BadInputError("config backend.command", f"{command[0]!r} is not an executable program",
                                    "give the pilot command, e.g. [apbatch, pilot]")
            self._pilot_command = command
        return [*self._pilot_command, "--config", self.job_command(day_obs)[-1]]

    def render(self, works: Sequence[CcdWork]) -> str:
        """The pilot command (what is started) and, as comments, each CCD's work as a pilot runs it."""
        check_visit(works)
        header = [f"# apbatch pilot backend: {len(works)} CCDs queued for up to {self.settings.pilots} warm "
                  "pilot(s); the line below starts one pilot (idle ones end after "
                  f"{self.settings.idle_timeout:g} s).",
                  "# Each CCD runs in a pilot, in-process, exactly as this per-CCD command would:"]
        header += ["#   " + " ".join(shlex.quote(a) for a in self.job_argv(w)) for w in works]
        line = " ".join(shlex.quote(a) for a in self.pilot_argv(works[0].day_obs))
        return render_shell_script(self.job_env(), [line], header)

    # ------------------------------------------------------------- submit
    def _job_record(self, work: CcdWork, env: dict[str, str], token: str | None) -> dict[str, Any]:
        """The local backend's record, plus the night's config file the pilot loads for the CCD."""
        return {**super()._job_record(work, env, token), "config": self.job_command(work.day_obs)[-1]}

    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """Queue one work item per CCD (the local backend's files) and make sure pilots run."""
        check_visit(works)
        self.pilot_argv(works[0].day_obs)  # a bad pilot command is refused before anything is queued
        self._day_obs = works[0].day_obs
        return super().submit(works, token)

    def _reap(self) -> None:
        """Collect the exit of pilots this process started (a zombie would still look alive)."""
        self._runners = [p for p in self._runners if p.poll() is None]

    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self._reap()
        return super()._query_queue(job_ids)

    def _ensure_runner(self) -> None:
        """Start pilots until ``backend.pilots`` are alive (call with queue.lock held)."""
        self._reap()
        root = self.state_dir
        (root / "pilots").mkdir(exist_ok=True)
        alive = [r for r in pilot_records(root) if r["state"] not in ("ended", "lost")]
        day_obs = getattr(self, "_day_obs", None)
        if day_obs is None:  # find_submitted / cancel: the newest queued job's night
            day_obs = _queued_day_obs(root)
            if day_obs is None:
                return
        argv = self.pilot_argv(day_obs)
        base = {k: os.environ[k] for k in EXPORTED if k in os.environ}  # never the daemon's secrets
        env = {**base, **self.job_env()}
        for _ in range(self.settings.pilots - len(alive)):
            log = open(root / "pilots" / "pilots.log", "a")
            with log:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            self._runners.append(proc)
            # registered by the spawner at once, so that the next submit counts it before it starts
            register_pilot(root, {"pid": proc.pid, "ticks": _proc_start_ticks(proc.pid),
                                  "host": socket.gethostname(), "state": "starting", "item": None,
                                  "done": 0, "failed": 0, "started": time.time(), "last_active": time.time()})
            _log.info("started pilot %s: %s", pilot_id(proc.pid), shlex.join(argv))

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Mark the jobs cancelled; a running one's pilot ends (SIGTERM), and pilots are
        started again for what is still queued."""
        killed = False
        for job_id in job_ids:
            job_dir = self._job_dir(job_id)
            if not (job_dir / "job.json").exists() or (job_dir / "exit").exists():
                continue
            (job_dir / "cancel").touch()
            killed = killed or (job_dir / "started.json").exists()
            _kill_if_running(job_dir)
        if killed and (self.state_dir / "queue").is_dir():
            time.sleep(0.2)  # let the pilot die before it is counted
            self._reap()
            with _locked(self.state_dir / "queue.lock"):
                if any((self.state_dir / "queue").iterdir()):
                    self._ensure_runner()

    # ------------------------------------------------------------- what status shows
    def pilots(self, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` newest pilots of the state dir, newest first: ``pilot, host, pid, state``
        (starting, idle, running, ended, lost), ``item`` (the job id it runs), ``done``,
        ``failed``, ``rss_mib``, ``started``, ``last_active``, ``reason`` (why it ended)."""
        self._reap()
        return sorted(pilot_records(self.state_dir), key=lambda r: -float(r.get("started") or 0))[:limit]


def pilot_id(pid: int, host: str | None = None) -> str:
    """``<host>-<pid>``: names a pilot's record file."""
    return f"{host or socket.gethostname()}-{pid}"


def register_pilot(state_dir: Path, record: dict[str, Any]) -> Path:
    """Write a pilot's record (atomically) to ``pilots/<pilot id>.json``; returns its path."""
    path = state_dir / "pilots" / f"{pilot_id(record['pid'], record.get('host'))}.json"
    _write_atomic(path, json.dumps({**record, "pilot": path.stem}))
    return path


def pilot_records(state_dir: Path) -> list[dict[str, Any]]:
    """The pilots' records; one whose process is gone without saying so is ``lost``."""
    out: list[dict[str, Any]] = []
    folder = state_dir / "pilots"
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("state") not in ("ended", "lost") and rec.get("host") == socket.gethostname() \
                and _proc_start_ticks(int(rec["pid"])) != rec.get("ticks"):
            rec = {**rec, "state": "lost", "reason": "process gone without ending (killed?)"}
        out.append(rec)
    return out


def _queued_day_obs(root: Path) -> int | None:
    """The night of the newest queued job, or `None` if nothing is queued."""
    queued = sorted((p.name for p in (root / "queue").iterdir()), key=lambda n: -int(n.split("-")[1])) \
        if (root / "queue").is_dir() else []
    for job_id in queued:
        try:
            return int(json.loads((root / "jobs" / job_id / "job.json").read_text())["work"]["day_obs"])
        except (OSError, ValueError, KeyError):
            continue
    return None


def claim_next(state_dir: Path, identity: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Claim the lowest-numbered queued job for this pilot; `None` if none could be claimed.

    The claim is ``os.link`` of a private file to ``jobs/<id>/started.json`` (fails if another
    pilot got there first); a cancelled job is taken off the queue, never run. Returns
    ``(job_id, job.json contents)``.
    """
    queue, jobs = state_dir / "queue", state_dir / "jobs"
    try:
        names = sorted((p.name for p in queue.iterdir()), key=lambda n: int(n.split("-")[1]))
    except FileNotFoundError:
        return None
    for job_id in names:
        job_dir = jobs / job_id
        if (job_dir / "started.json").exists() or (job_dir / "exit").exists():
            continue  # claimed by another pilot that has not unqueued it yet
        if (job_dir / "cancel").exists():
            (queue / job_id).unlink(missing_ok=True)
            continue
        mine = job_dir / f".claim-{identity['pilot']}"
        _write_atomic(mine, json.dumps({**identity, "started": time.time()}))
        try:
            os.link(mine, job_dir / "started.json")
        except FileExistsError:
            continue
        finally:
            mine.unlink(missing_ok=True)
        (queue / job_id).unlink(missing_ok=True)
        try:
            return job_id, json.loads((job_dir / "job.json").read_text())
        except (OSError, ValueError) as exc:  # claimed but unreadable: ends as a bad-input job
            return job_id, {"error": f"cannot read {job_dir / 'job.json'}: {exc}"}
    return None


def lifetime_seconds(settings: PilotBackendConfig) -> int:
    """``backend.max_lifetime`` in seconds."""
    return time_limit_seconds(settings.max_lifetime)
