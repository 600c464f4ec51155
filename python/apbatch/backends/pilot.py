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

**Launchers** (``backend.launcher``): ``local`` (default) starts a pilot as a detached process
on the submitting machine, as the local backend starts its jobs; ``slurm`` and ``htcondor``
submit each pilot as one ordinary batch job (`apbatch.backends.pilot_launch`: time limit
``max_lifetime`` plus a grace for the last CCD, memory ``max_rss_mib`` plus one CCD's working
set, a job name ``ap-pilot-<day_obs>`` that reads well in ``squeue``). A batch pilot's record
is ``pilots/<kind>-<batch id>.json`` and its claims carry that batch id, so whether it lives is
the batch system's job state (queue, then history), never the local process table: an item
claimed by a pilot that Slurm ended (time limit, ``scancel``, node failure) reads FAILED
"lost", never done, and :meth:`PilotBackend.status` starts a new pilot when work is queued
and fewer than ``backend.pilots`` live. Cancelling a running item cancels its pilot's batch job.

Multi-host sites: the state directory (``backend.log_dir``) must be on a filesystem that the
submitting host and every pilot node share, with working ``link`` (the exactly-once claim)
and ``flock`` (``queue.lock``), and close-to-open consistency (NFSv4, Lustre, GPFS: yes;
NFS with attribute caching on ``jobs/``, a pilot's ``exit`` may be seen late, which delays a
state but never turns a lost item into a done one). Here Slurm runs on this machine, so
the state directory is trivially shared.
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
from ..errors import BadInputError, SchedulerError
from ..jobconfig import resolve_command
from ..work import CcdWork
from .base import EXPORTED, Backend, JobState, JobStatus, SubmittedJob, check_visit, render_shell_script
from .local import LocalBackend, _kill_if_running, _locked, _proc_start_ticks, _write_atomic
from .pilot_launch import BatchLauncher, make_launcher
from .pilot_registry import _how, pilot_id, pilot_records, register_pilot

__all__ = ["PilotBackend", "claim_next", "pilot_records", "register_pilot"]

_log = logging.getLogger(__name__)


class PilotBackend(LocalBackend):
    """Queues CCDs like `LocalBackend` and keeps up to ``backend.pilots`` warm pilots on them.

    See `Backend` for the constructor; ``python`` is accepted for symmetry with the local
    backend and unused; ``schedd`` / ``schedd_factory`` go to an HTCondor launcher. No I/O
    until a method is called.
    """

    kind: ClassVar[str] = "pilot"
    id_pattern = re.compile(r"^(?P<id>pilot-\d+)$")

    def __init__(self, *args: Any, python: str | None = None, schedd: Any = None,
                 schedd_factory: Any = None, **kwargs: Any) -> None:
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
        self._launcher_deps = {"runner": kwargs.get("runner"), "schedd": schedd,
                               "schedd_factory": schedd_factory}
        self._launcher: BatchLauncher | None = None
        self._batch_now: dict[str, JobStatus] = {}

    @property
    def launcher(self) -> BatchLauncher | None:
        """The batch launcher of ``backend.launcher`` (made on first use); `None` for local pilots."""
        if self._launcher is None and self.settings.launcher.kind != "local":
            self._launcher = make_launcher(self.config, self.state_dir, **self._launcher_deps)
        return self._launcher

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
        """What starts one pilot (its command line, or its batch script / submit description) and,
        as comments, each CCD's work as a pilot runs it."""
        check_visit(works)
        s, launcher = self.settings, self.launcher
        how = f"each one {launcher.kind} job as below" if launcher else "the line below starts one"
        header = [f"# apbatch pilot backend: {len(works)} CCDs queued for up to {s.pilots} warm pilot(s), "
                  f"{how} (idle ones end after {s.idle_timeout:g} s).",
                  "# Each CCD runs in a pilot, in-process, exactly as this per-CCD command would:"]
        header += ["#   " + " ".join(shlex.quote(a) for a in self.job_argv(w)) for w in works]
        argv = self.pilot_argv(works[0].day_obs)
        if launcher is not None:
            # after the script: a batch script must start with its #! line and #SBATCH lines
            return launcher.render(argv, self.job_env(), works[0].day_obs) + "\n".join(header) + "\n"
        return render_shell_script(self.job_env(), [" ".join(shlex.quote(a) for a in argv)], header)

    # ------------------------------------------------------------- submit
    def _job_record(self, work: CcdWork, env: dict[str, str], token: str | None) -> dict[str, Any]:
        """The local backend's record, plus the night's config file the pilot loads for the CCD."""
        return {**super()._job_record(work, env, token), "config": self.job_command(work.day_obs)[-1]}

    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """Queue one work item per CCD (the local backend's files) and make sure pilots run.

        Batch pilots are submitted first: if the batch system refuses them (`SchedulerError`),
        nothing is queued, so the daemon's retry of the visit cannot run a CCD twice.
        """
        check_visit(works)
        self.pilot_argv(works[0].day_obs)  # a bad pilot command is refused before anything is queued
        self._day_obs = works[0].day_obs
        if self.launcher is not None:
            self.prepare(works)  # the night's config file, which the pilots read, before they can start
            (self.state_dir / "queue").mkdir(parents=True, exist_ok=True)
            with _locked(self.state_dir / "queue.lock"):
                self._ensure_runner()
        return super().submit(works, token)

    def _reap(self) -> None:
        """Collect the exit of pilots this process started (a zombie would still look alive)."""
        self._runners = [p for p in self._runners if p.poll() is None]

    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The local backend's states, a batch pilot's liveness from its batch system; if work is
        queued and fewer than ``backend.pilots`` pilots live (one was killed), a new one starts."""
        out = super().status(job_ids)
        if any(s.state is JobState.PENDING for s in out.values()):
            try:
                with _locked(self.state_dir / "queue.lock"):
                    self._ensure_runner()
            except SchedulerError as exc:  # the states stand; the next status tries again
                _log.warning("cannot start a pilot for the queued CCDs (will retry): %s", exc)
        return out

    def observe(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """`status` without starting a pilot (``apbatch status`` only looks)."""
        return super().status(job_ids)

    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        self._reap()
        self._batch_now = {}
        if self.launcher is not None:  # one batch query for every pilot that holds one of these items
            claims = (_claim_of(self._job_dir(j)) for j in job_ids)
            held = {str(c["batch_id"]) for c in claims if c and c.get("batch_id")}
            self._batch_now = self.launcher.states(sorted(held))
        try:
            return super()._query_queue(job_ids)
        finally:
            self._batch_now = {}

    def _read_state(self, job_id: str, retry: bool = True) -> JobStatus | None:
        """A batch pilot's item: RUNNING while its batch job is queued or running; when that job
        has ended without the item's ``exit``, FAILED "lost" (or CANCELLED, if asked)."""
        job_dir = self._job_dir(job_id)
        claim = _claim_of(job_dir)
        if claim is None or not claim.get("batch_id") or (job_dir / "exit").exists():
            return super()._read_state(job_id, retry)
        batch_id = str(claim["batch_id"])
        pilot = self._batch_now.get(batch_id)
        if pilot is None and self.launcher is not None:
            pilot = self.launcher.states([batch_id]).get(batch_id)
        cancelled = (job_dir / "cancel").exists()
        if pilot is not None and not pilot.state.finished and pilot.state is not JobState.UNKNOWN:
            return self.map_state(job_id, "running", None, "being cancelled" if cancelled else "")
        if (job_dir / "exit").exists():  # the pilot wrote it, then ended, between our two looks
            return super()._read_state(job_id, retry)
        if cancelled:
            return self.map_state(job_id, "cancelled")
        how = _how(pilot)
        return self.map_state(job_id, "lost", None, f"pilot {claim.get('pilot')} ({claim.get('batch')} job "
                              f"{batch_id}, {how}) ended without an exit status for this item")

    def _ensure_runner(self) -> None:
        """Start pilots until ``backend.pilots`` are alive (call with queue.lock held)."""
        self._reap()
        root = self.state_dir
        (root / "pilots").mkdir(exist_ok=True)
        alive = [r for r in self._pilot_records() if r["state"] not in ("ended", "lost")]
        missing = self.settings.pilots - len(alive)
        if missing <= 0:
            return
        day_obs = getattr(self, "_day_obs", None)
        if day_obs is None:  # find_submitted / cancel / status: the newest queued job's night
            day_obs = _queued_day_obs(root)
            if day_obs is None:
                return
        argv = self.pilot_argv(day_obs)
        launcher = self.launcher
        for _ in range(missing):
            now = time.time()
            if launcher is not None:  # an ordinary batch job; its record, until the pilot writes its own
                batch_id = launcher.submit(argv, self.job_env(), day_obs)
                if (root / "pilots" / f"{launcher.kind}-{batch_id}.json").exists():
                    continue  # the pilot started already and wrote its own record
                register_pilot(root, {"pilot": f"{launcher.kind}-{batch_id}", "batch": launcher.kind,
                                      "batch_id": batch_id, "pid": None, "host": None, "state": "starting",
                                      "item": None, "done": 0, "failed": 0, "started": now,
                                      "last_active": now})
                continue
            base = {k: os.environ[k] for k in EXPORTED if k in os.environ}  # never the daemon's secrets
            env = {**base, **self.job_env()}
            env.pop("APBATCH_PILOT_ID", None)
            log = open(root / "pilots" / "pilots.log", "a")
            with log:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            self._runners.append(proc)
            # registered by the spawner at once, so that the next submit counts it before it starts
            register_pilot(root, {"pid": proc.pid, "ticks": _proc_start_ticks(proc.pid),
                                  "host": socket.gethostname(), "state": "starting", "item": None,
                                  "done": 0, "failed": 0, "started": now, "last_active": now})
            _log.info("started pilot %s: %s", pilot_id(proc.pid), shlex.join(argv))

    def _pilot_records(self) -> list[dict[str, Any]]:
        """`pilot_records`, with each batch pilot's liveness asked of its batch system (one query)."""
        launcher = self.launcher
        if launcher is None:
            return pilot_records(self.state_dir)
        return pilot_records(self.state_dir, launcher.states)

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
            claim = _claim_of(job_dir)
            if claim is not None and claim.get("batch_id") and self.launcher is not None:
                self.launcher.cancel([str(claim["batch_id"])])  # its pilot's batch job
            else:
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
        ``failed``, ``rss_mib``, ``peak_rss_mib``, ``started``, ``last_active``, ``reason`` (why it
        ended); a batch pilot also ``batch`` (slurm, htcondor) and ``batch_id`` (its job id)."""
        self._reap()
        return sorted(self._pilot_records(), key=lambda r: -float(r.get("started") or 0))[:limit]


def _claim_of(job_dir: Path) -> dict[str, Any] | None:
    """The item's ``started.json`` (who claimed it), or `None` if not claimed (or unreadable)."""
    try:
        return json.loads((job_dir / "started.json").read_text())
    except (OSError, ValueError):
        return None


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
