"""The shared part of every batch backend; a backend subclass declares only what differs.

Public API (used by the dispatcher, ``apbatch status``/``cancel``/``render-job``):

* ``Backend.render(works) -> str``: the exact script / submit description, without submitting;
* ``Backend.submit(works, token) -> list[SubmittedJob]``: one visit's CCDs as one batch
  submission (a Slurm array, an HTCondor cluster, a set of local processes); one
  `SubmittedJob` per CCD, in the order of ``works``; the claim's submission token is written
  with the jobs (Slurm ``--comment``, HTCondor ``ApSubmitToken``, the local ``job.json``);
* ``Backend.find_submitted(works, token, since)``: the jobs the scheduler accepted under a
  token (a submitter that died before recording them), so that they are recorded, not
  submitted twice;
* ``Backend.status(job_ids) -> dict[str, JobStatus]``: batched state query; jobs that left
  the queue are looked up in history, never assumed done;
* ``Backend.cancel(job_ids)``;
* ``Backend.log_path(job_id, work) -> str | None``: where that job's stdout and stderr are
  written (each backend knows its own naming); `None` where it cannot tell.

Shared machinery for subclasses (STYLE.md section 2):

* :func:`run_command`, the one seam through which scheduler commands run (an argument list,
  never a shell); it raises `SchedulerError` carrying the command, exit code, stdout and
  stderr. Backends take it as the ``runner`` constructor argument so tests can fake it;
* ``id_pattern`` + :meth:`Backend.parse_job_id`;
* ``state_table`` + :meth:`Backend.map_state` (unknown code -> UNKNOWN with a warning,
  COMPLETED with a non-zero exit code -> FAILED);
* :meth:`Backend.status` as a template: ``_query_queue`` in batches, then ``_query_history``
  for what left the queue, then UNKNOWN for what neither knows;
* :meth:`Backend.job_command` / :meth:`Backend.job_argv` / :meth:`Backend.job_env` (the
  per-CCD command line -- ``job.command`` resolved to this install, ``--config`` with the
  night's resolved config file, the CCD's arguments -- and the only environment a backend
  passes on), :meth:`Backend.prepare` (writes that config file; every ``submit`` calls it)
  and :func:`render_shell_script`.

`JobState`, `JobStatus` and `SubmittedJob` live in `apbatch.states` and are re-exported here.

Constructors do no I/O.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from ..config import ApbatchConfig
from ..errors import BadInputError, SchedulerError
from ..jobconfig import config_snapshot_path, resolve_command, write_config_snapshot
from ..states import JobState, JobStatus, SubmittedJob
from ..work import CcdWork

if TYPE_CHECKING:
    from ..submission import Submission

__all__ = [
    "Backend",
    "CommandResult",
    "EXPORTED",
    "JobState",
    "JobStatus",
    "Runner",
    "SubmittedJob",
    "check_visit",
    "checked_token",
    "compress_ids",
    "new_token",
    "render_shell_script",
    "run_command",
]

_log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

EXPORTED = ("PATH", "HOME", "LANG")
"""The only variables of the submitter's environment a job gets (Slurm ``--export``, the local
backend's processes); ``job.env`` comes on top. Secrets in the daemon's environment (a Kafka
password) never reach a job: jobs read them from files."""


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a successful scheduler command printed."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[..., CommandResult]
"""Signature of :func:`run_command`: ``(argv, timeout, input=None, check=True) -> CommandResult``."""


def run_command(argv: Sequence[str], timeout: float, input: str | None = None,
                check: bool = True) -> CommandResult:
    """Run one scheduler command (never through a shell).

    Parameters
    ----------
    argv : `list` [`str`]
        The command and its arguments.
    timeout : `float`
        Seconds before the command is killed.
    input : `str`, optional
        Text fed to its standard input (e.g. a job script for ``sbatch``).
    check : `bool`
        If `False`, a non-zero exit is returned rather than raised (the caller inspects it).

    Raises
    ------
    SchedulerError
        Raised if the command cannot be started (exit code 127), times out (exit code -1)
        or, with ``check``, exits non-zero.
    """
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise SchedulerError(argv, 127, "", f"command not found: {exc.filename or argv[0]}") from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise SchedulerError(argv, -1, out, f"timed out after {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise SchedulerError(argv, proc.returncode, proc.stdout, proc.stderr)
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def new_token() -> str:
    """A new submission token: 20 hex digits, unique per claim of one visit, safe in any
    scheduler field (Slurm comment, ClassAd string, file content)."""
    return uuid.uuid4().hex[:20]


_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")


def checked_token(token: str) -> str:
    """``token`` if it looks like one `new_token` made (it reaches scheduler queries).

    Raises
    ------
    BadInputError
        Raised if it does not.
    """
    if not _TOKEN.match(str(token)):
        raise BadInputError("submit_token", f"{token!r} is not a submission token", "expected hex digits")
    return str(token)


def check_visit(works: Sequence[CcdWork]) -> None:
    """Check that ``works`` is one non-empty visit (one group) of distinct detectors.

    Raises
    ------
    BadInputError
        Raised if ``works`` is empty, mixes groups or instruments, or repeats a detector.
    """
    if not works:
        raise BadInputError("works", "no CCDs to submit", "fan out an event first")
    first = works[0]
    seen: set[int] = set()
    for w in works:
        if (w.instrument, w.group_id, w.visit) != (first.instrument, first.group_id, first.visit):
            raise BadInputError("works", f"mixes visits ({first.label} and {w.label})",
                                "submit one visit at a time")
        if w.detector in seen:
            raise BadInputError("works", f"detector {w.detector} appears twice", "de-duplicate the works")
        seen.add(w.detector)


def render_shell_script(env: dict[str, str], lines: Iterable[str], header: Iterable[str] = ()) -> str:
    """A bash script: shebang, ``header`` lines, strict mode, quoted exports, then ``lines``.

    Every value is `shlex.quote`-d here; ``lines`` must already be quoted by the caller.
    """
    out = ["#!/bin/bash", *header, "set -euo pipefail"]
    out += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    out += list(lines)
    return "\n".join(out) + "\n"


def compress_ids(ids: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (Slurm's ``--array`` syntax, readable by ops)."""
    ranges: list[list[int]] = []
    for i in sorted(set(ids)):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


class Backend(abc.ABC):
    """Base of the batch backends. Subclasses: ``LocalBackend``, ``SlurmBackend``, ``HTCondorBackend``.

    Parameters
    ----------
    config : `ApbatchConfig`
        The whole configuration (``config.backend`` is this backend's section).
    runner : callable, optional
        Replaces :func:`run_command` (tests pass a fake that records calls).
    executable : `str`, optional
        The interpreter whose install the jobs run (default `sys.executable`); see
        `apbatch.jobconfig.resolve_command`.

    Notes
    -----
    One instance per process; methods are not meant to be called from several threads at once.
    """

    kind: ClassVar[str] = ""
    id_pattern: ClassVar[re.Pattern[str]] = re.compile(r"^(?P<id>\S+)$")
    state_table: ClassVar[dict[str, JobState]] = {}
    batch_size: ClassVar[int] = 200
    """Job ids per status query (keeps command lines short)."""
    concurrent_status: ClassVar[bool] = True
    """:meth:`status` may run in one thread while :meth:`submit` runs in another (the daemon
    polls in a background thread); `False` where the scheduler client is not known to allow it."""

    def __init__(self, config: ApbatchConfig, *, runner: Runner | None = None,
                 executable: str | None = None):
        if config.backend.kind != self.kind:
            raise BadInputError("backend.kind", f"is {config.backend.kind!r}, not {self.kind!r}",
                                "use make_backend(config)")
        self.config = config
        self.settings = config.backend
        self.runner: Runner = runner or run_command
        self.executable = executable
        self._command: list[str] | None = None
        self._config_files: dict[int, str] = {}

    # ------------------------------------------------------------- shared helpers
    def job_command(self, day_obs: int) -> list[str]:
        """The command every job of night ``day_obs`` starts with (before its CCD's arguments).

        ``job.command`` with its program resolved to this install (resolved once, on first
        use), then ``--config`` and the night's config file (written by :meth:`prepare`).
        """
        if self._command is None:
            self._command = resolve_command(self.config.job.command, self.executable)
        if day_obs not in self._config_files:
            self._config_files[day_obs] = str(config_snapshot_path(self.config, day_obs))
        return [*self._command, "--config", self._config_files[day_obs]]

    def job_argv(self, work: CcdWork) -> list[str]:
        """The per-CCD command line: :meth:`job_command` followed by the work's arguments."""
        return [*self.job_command(work.day_obs), *work.job_args()]

    def prepare(self, works: Sequence[CcdWork]) -> None:
        """Write the config file(s) the jobs of ``works`` read; every ``submit`` calls this before
        building the job command lines.

        Raises
        ------
        BadInputError
            Raised if a config file cannot be written.
        """
        for day_obs in sorted({w.day_obs for w in works}):
            self._config_files[day_obs] = str(write_config_snapshot(self.config, day_obs))

    def job_env(self) -> dict[str, str]:
        """The only environment a backend writes into a job: ``job.env``.

        Secrets are never in it: jobs read them from their own environment or from files.
        The configuration travels as ``--config`` on the command line (:meth:`job_command`).

        Raises
        ------
        BadInputError
            Raised if a variable name is not a valid shell identifier.
        """
        env = dict(self.config.job.env)
        for name in env:
            if not _ENV_NAME.match(name):
                raise BadInputError(f"config job.env.{name}", "is not a valid environment variable name",
                                    "use letters, digits and underscores")
        return env

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> CommandResult:
        """Run a scheduler command through the injected runner with the configured timeout."""
        timeout = float(getattr(self.settings, "command_timeout", 30.0))
        return self.runner(list(argv), timeout, input=input, check=check)

    @classmethod
    def parse_job_id(cls, argv: Sequence[str], output: str) -> str:
        """The job id in a submit command's output, by ``id_pattern``.

        Raises
        ------
        SchedulerError
            Raised if the output holds no job id (the command "succeeded" but said nothing usable).
        """
        for line in output.strip().splitlines():
            match = cls.id_pattern.match(line.strip())
            if match:
                return match.group("id")
        raise SchedulerError(list(argv), 0, output, f"no job id in the output of {argv[0]}")

    def map_state(self, job_id: str, code: str, exit_code: int | None = None, reason: str = "") -> JobStatus:
        """Translate a scheduler state code through ``state_table``.

        An unknown code gives UNKNOWN (with a warning), never success; COMPLETED with a
        non-zero exit code gives FAILED.
        """
        state = self.state_table.get(code)
        if state is None:
            _log.warning("%s job %s: unknown scheduler state %r, reported as UNKNOWN",
                         self.kind, job_id, code)
            return JobStatus(job_id, JobState.UNKNOWN, exit_code, reason or f"unknown state code {code!r}")
        return JobStatus(job_id, state, exit_code, reason).settled()

    # ------------------------------------------------------------- status template
    def status(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of the given jobs: queue first, then history; UNKNOWN if neither knows them."""
        wanted = list(dict.fromkeys(job_ids))
        found: dict[str, JobStatus] = {}
        for start in range(0, len(wanted), self.batch_size):
            found.update(self._query_queue(wanted[start:start + self.batch_size]))
        missing = [j for j in wanted if j not in found]
        for start in range(0, len(missing), self.batch_size):
            found.update(self._query_history(missing[start:start + self.batch_size]))
        return {j: found.get(j) or JobStatus(j, JobState.UNKNOWN, None, "not in the queue nor in history")
                for j in wanted}

    def observe(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The states `status` gives, for a viewer (``apbatch status``): a backend whose `status`
        also repairs (the pilot backend starts a pilot for queued work) does not repair here."""
        return self.status(job_ids)

    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of those jobs the scheduler still lists (batch of at most ``batch_size``)."""
        return {}

    def _query_history(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """States of jobs that left the queue, from the scheduler's history."""
        return {}

    # ------------------------------------------------------------- what a backend declares
    @abc.abstractmethod
    def render(self, works: Sequence[CcdWork]) -> str:
        """The exact script or submit description that :meth:`submit` would use."""

    @abc.abstractmethod
    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """Submit one visit's CCDs as one batch; one `SubmittedJob` per work item, same order.

        ``token`` (the claim's submission token, `new_token`) is written with the jobs where
        the scheduler keeps it, for :meth:`find_submitted`.
        """

    def find_submitted(self, works: Sequence[CcdWork], token: str, since: float) -> list[SubmittedJob]:
        """The jobs of ``works`` that the scheduler accepted under ``token`` (submitted after
        ``since``, UTC unix time), queue and history; ``[]`` if it has none.

        The base class cannot ask anyone and answers ``[]``: a backend that does not override
        this has the old behaviour (a claim whose process died is submitted again).

        Raises
        ------
        SchedulerError
            Raised if the scheduler cannot be asked; the caller must then not resubmit.
        """
        return []

    @abc.abstractmethod
    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel the given jobs."""

    def log_path(self, job_id: str | None, work: CcdWork | Submission | None = None) -> str | None:
        """The file the job's stdout and stderr are written to (absolute), or `None` if unknown.

        Parameters
        ----------
        job_id : `str`, optional
            The scheduler's id of the job, as the ledger holds it.
        work : `CcdWork` or `apbatch.submission.Submission`, optional
            The CCD (a ledger row is taken for its ``work``); some schedulers name the file
            after the visit's label.

        Notes
        -----
        The base class cannot tell and returns `None`; no I/O is done (the file may not
        exist yet, or any more).
        """
        return None
