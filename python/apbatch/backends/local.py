"""Local backend: a process pool on this machine that behaves like a tiny batch system.

Each CCD runs as its own process with the command line a batch job would use
(``job.command`` + `CcdWork.job_args`, environment: `apbatch.backends.base.EXPORTED` of the
runner's + ``job.env``), at most ``max_workers``
(default: the number of cores) at once. Everything lives in a state directory
(``backend.log_dir``), written atomically, so any process can ask for states and cancel, and
a restarted daemon loses nothing::

    counter                  last job number issued (under queue.lock)
    queue/<id>               present while the job waits for a slot
    jobs/<id>/job.json       argv, env, work, submission token (written at submit)
    jobs/<id>/started.json   pid, process start time (written when it starts)
    jobs/<id>/exit           exit code (written when it ends)
    jobs/<id>/reason         why it could not start (exit 127: not found, 126: not executable)
    jobs/<id>/cancel         cancel requested
    jobs/<id>/out.log        the job's stdout + stderr (mode 0640)

Jobs are started and reaped by a detached runner process (``python -m
apbatch.backends.local STATE_DIR``), spawned by :meth:`LocalBackend.submit` when none holds
``runner.lock``; it exits when nothing is queued or running. Job ids are ``local-<n>``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..atomic import write_atomic
from ..config import LocalBackendConfig
from ..errors import BadInputError
from ..states import start_failure_reason
from ..work import CcdWork
from .base import (
    EXPORTED,
    Backend,
    JobState,
    JobStatus,
    SubmittedJob,
    check_visit,
    checked_token,
    render_shell_script,
)

__all__ = ["LocalBackend", "run_queue"]

_log = logging.getLogger(__name__)


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text, durable=False)  # queue state: many small files, a rename suffices


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True):
    """Hold an exclusive `fcntl.flock` on ``path``; yields `False` if not blocking and busy."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), or `None` if it does not exist.

    Recorded next to the pid so that a recycled pid is not mistaken for the job.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _exit_status(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class LocalBackend(Backend):
    """Runs a visit's CCDs as local processes through a persistent, file-based queue.

    See `Backend` for the constructor; ``python`` (default `sys.executable`) runs the
    runner. No I/O until a method is called; instances in different processes share the
    state directory safely (locks + atomic renames).
    """

    kind: ClassVar[str] = "local"
    id_pattern = re.compile(r"^(?P<id>local-\d+)$")
    state_table = {
        "queued": JobState.PENDING,
        "running": JobState.RUNNING,
        "exited": JobState.COMPLETED,  # non-zero exit -> FAILED in map_state
        "cancelled": JobState.CANCELLED,
        "lost": JobState.FAILED,
    }

    def __init__(self, *args: Any, python: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.config.backend
        if not isinstance(settings, LocalBackendConfig):
            raise BadInputError("backend.kind", f"is {settings.kind!r}, not 'local'",
                                "use make_backend(config)")
        self.settings: LocalBackendConfig = settings
        self.python = python or sys.executable
        self.max_workers = self.settings.max_workers or os.cpu_count() or 1
        self._runners: list[subprocess.Popen] = []

    @property
    def state_dir(self) -> Path:
        """Where the queue and every job's files live."""
        return self.config.path(self.settings.log_dir).absolute()

    def log_path(self, job_id: str | None, work: Any = None) -> str | None:
        """``<log_dir>/jobs/<id>/out.log`` (stdout and stderr); `None` for an id not ``local-<n>``."""
        if not job_id or not self.id_pattern.match(str(job_id)):
            return None
        return str(self._job_dir(job_id) / "out.log")

    def _job_dir(self, job_id: str) -> Path:
        if not self.id_pattern.match(str(job_id)):
            raise BadInputError("job id", f"{job_id!r} is not a local job id", "expected local-<n>")
        return self.state_dir / "jobs" / job_id

    # ------------------------------------------------------------- render / submit
    def render(self, works: Sequence[CcdWork]) -> str:
        """A bash script with exactly the command lines the job processes run (one per CCD)."""
        check_visit(works)
        header = [f"# apbatch local backend: {len(works)} processes, at most {self.max_workers} at once",
                  "# (each line below is one job's command line; they run concurrently)"]
        lines = [" ".join(shlex.quote(a) for a in self.job_argv(w)) for w in works]
        return render_shell_script(self.job_env(), lines, header)

    def _job_record(self, work: CcdWork, env: dict[str, str], token: str | None) -> dict[str, Any]:
        """What ``jobs/<id>/job.json`` holds: the command, its environment, the work, the claim's token."""
        return {"argv": self.job_argv(work), "env": env, "work": work.to_dict(), "submitted": time.time(),
                "token": token}

    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """Queue one process per CCD (job ids ``<kind>-<n>``); make sure a runner works on the queue."""
        check_visit(works)
        if token is not None:
            checked_token(token)
        self.prepare(works)
        env = self.job_env()
        root = self.state_dir
        (root / "queue").mkdir(parents=True, exist_ok=True)
        (root / "jobs").mkdir(exist_ok=True)
        submitted = []
        with _locked(root / "queue.lock"):
            counter = root / "counter"
            first = int(counter.read_text()) + 1 if counter.exists() else 1
            _write_atomic(counter, str(first + len(works) - 1))
            for n, work in enumerate(works, start=first):
                job_id = f"{self.kind}-{n}"
                job_dir = root / "jobs" / job_id
                job_dir.mkdir()
                _write_atomic(job_dir / "job.json", json.dumps(self._job_record(work, env, token)))
                (root / "queue" / job_id).touch()
                submitted.append(SubmittedJob(work, job_id))
            self._ensure_runner()
        _log.info("queued %s (%d CCDs) as %s..%s", works[0].label, len(works),
                  submitted[0].job_id, submitted[-1].job_id)
        return submitted

    def find_submitted(self, works: Sequence[CcdWork], token: str, since: float) -> list[SubmittedJob]:
        """The jobs whose ``job.json`` carries ``token``, newest job first back to ``since``.

        A job written but not yet queued when its submitter died is queued now (it would
        otherwise wait forever); only CCDs of ``works`` found are returned.
        """
        checked_token(token)
        wanted = {w.key: w for w in works}
        jobs = self.state_dir / "jobs"
        found: list[SubmittedJob] = []
        if not jobs.is_dir():
            return found
        with _locked(self.state_dir / "queue.lock"):
            names = sorted((p.name for p in jobs.iterdir() if self.id_pattern.match(p.name)),
                           key=lambda n: -int(n.split("-")[1]))
            requeued = False
            for job_id in names:
                try:
                    spec = json.loads((jobs / job_id / "job.json").read_text())
                except (OSError, ValueError):
                    continue  # a job dir whose job.json was never written: nothing was queued
                if spec.get("submitted", 0) < since - 1:
                    break
                work = CcdWork.from_dict(spec["work"])
                if spec.get("token") != token or work.key not in wanted:
                    continue
                found.append(SubmittedJob(wanted[work.key], job_id))
                job_dir = jobs / job_id
                if not any(p.exists() for p in (self.state_dir / "queue" / job_id, job_dir / "started.json",
                                                 job_dir / "exit", job_dir / "cancel")):
                    (self.state_dir / "queue" / job_id).touch()
                    requeued = True
            if requeued:
                self._ensure_runner()
        order = {w.key: i for i, w in enumerate(works)}
        return sorted(found, key=lambda j: order[j.work.key])

    def _ensure_runner(self) -> None:
        """Start a detached runner unless one holds runner.lock (call with queue.lock held)."""
        self._runners = [p for p in self._runners if p.poll() is None]  # reap finished runners
        with _locked(self.state_dir / "runner.lock", blocking=False) as free:
            if not free:
                return
        log = open(self.state_dir / "runner.log", "a")
        with log:
            self._runners.append(subprocess.Popen(
                [self.python, "-m", "apbatch.backends.local", str(self.state_dir),
                 "--max-workers", str(self.max_workers)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    # ------------------------------------------------------------- status / cancel
    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        out = {}
        for job_id in job_ids:
            status = self._read_state(job_id)
            if status is not None:
                out[job_id] = status
        return out

    def _read_state(self, job_id: str, retry: bool = True) -> JobStatus | None:
        job_dir = self._job_dir(job_id)
        if not (job_dir / "job.json").exists():
            return None
        cancelled = (job_dir / "cancel").exists()
        if (job_dir / "exit").exists():
            code = int((job_dir / "exit").read_text())
            reason = (job_dir / "reason").read_text().strip() if (job_dir / "reason").exists() else ""
            return self.map_state(job_id, "cancelled" if cancelled else "exited", code, reason)
        if (job_dir / "started.json").exists():
            started = json.loads((job_dir / "started.json").read_text())
            if _proc_start_ticks(started["pid"]) == started["ticks"]:
                return self.map_state(job_id, "running", None, "being cancelled" if cancelled else "")
            if retry:  # the runner may be between reaping it and writing its exit code
                time.sleep(0.05)
                return self._read_state(job_id, retry=False)
            if cancelled:
                return self.map_state(job_id, "cancelled")
            return self.map_state(job_id, "lost", None,
                                  "process ended without an exit status (runner killed?)")
        if cancelled:
            return self.map_state(job_id, "cancelled")
        return self.map_state(job_id, "queued")

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Mark the jobs cancelled; a running job's whole process group gets SIGTERM."""
        for job_id in job_ids:
            job_dir = self._job_dir(job_id)
            if not (job_dir / "job.json").exists() or (job_dir / "exit").exists():
                continue
            (job_dir / "cancel").touch()
            _kill_if_running(job_dir)


def _kill_if_running(job_dir: Path) -> None:
    try:
        started = json.loads((job_dir / "started.json").read_text())
    except FileNotFoundError:
        return
    if _proc_start_ticks(started["pid"]) == started["ticks"]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started["pid"], signal.SIGTERM)  # the job is its own session / group leader


def run_queue(state_dir: Path, max_workers: int, poll: float = 0.05) -> None:
    """The runner: start queued jobs (lowest number first) up to ``max_workers``, record exits.

    Returns when nothing is queued or running. Only one runner works on a state dir at a time.
    """
    queue, jobs = state_dir / "queue", state_dir / "jobs"
    running: dict[str, subprocess.Popen] = {}

    def queued() -> list[str]:
        return sorted((p.name for p in queue.iterdir()), key=lambda n: int(n.split("-")[1]))

    with _locked(state_dir / "runner.lock"):
        while True:
            for job_id, proc in list(running.items()):
                if proc.poll() is not None:
                    _write_atomic(jobs / job_id / "exit", str(_exit_status(proc.returncode)))
                    del running[job_id]
            waiting = queued()
            for job_id in waiting[:max(0, max_workers - len(running))]:
                job_dir = jobs / job_id
                if not (job_dir / "cancel").exists() and (started := _start(job_dir)) is not None:
                    running[job_id] = started
                (queue / job_id).unlink()
                if (job_dir / "cancel").exists():  # cancel() may have missed started.json
                    _kill_if_running(job_dir)
            if not running and not waiting:
                with _locked(state_dir / "queue.lock"):
                    if not queued():
                        return
            time.sleep(poll)


def _start(job_dir: Path) -> subprocess.Popen | None:
    """Start one job in its own session; `None` (exit code 127 recorded) if it cannot start."""
    spec = json.loads((job_dir / "job.json").read_text())
    fd = os.open(job_dir / "out.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)  # job logs: not for all
    with open(fd, "ab") as log:
        try:
            base = {k: os.environ[k] for k in EXPORTED if k in os.environ}  # never the daemon's secrets
            env = {**base, **spec["env"], "APBATCH_JOB_ID": job_dir.name}  # for the job's log lines
            proc = subprocess.Popen(spec["argv"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:  # the job fails as a shell's would: 127 not found, 126 cannot execute
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            why = start_failure_reason(code)
            log.write(f"apbatch: {why}: {spec['argv'][0]!r}: {exc.strerror or exc}\n".encode())
            _write_atomic(job_dir / "reason", f"{why}: {spec['argv'][0]}: {exc.strerror or exc}")
            _write_atomic(job_dir / "exit", str(code))
            return None
    _write_atomic(job_dir / "started.json",
                  json.dumps({"pid": proc.pid, "ticks": _proc_start_ticks(proc.pid), "started": time.time()}))
    return proc


def main(argv: list[str] | None = None) -> None:
    """Entry point of the detached runner process."""
    parser = argparse.ArgumentParser(prog="python -m apbatch.backends.local", description=run_queue.__doc__)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_queue(args.state_dir, max(1, args.max_workers))


if __name__ == "__main__":
    main()
