"""Slurm backend: one job array per visit, through the Slurm command-line tools.

One visit's CCDs become ONE ``sbatch`` of an array whose task ids are the detector ids
(``--array=0-188`` for a full LSSTCam visit, ``0-8`` for LSSTComCam, a list for a partial
focal plane), so ``squeue`` shows ``<arrayjob>_<detector>`` next to the job name
``ap-<instrument>-<visit>``; the per-CCD job id returned is that ``<arrayjob>_<detector>``.
The script picks its CCD's argument line from ``SLURM_ARRAY_TASK_ID`` in a bash ``case``; every
argument is `shlex.quote`-d, so an event field holding shell syntax stays data.

Status: ``squeue -r -t all`` with an explicit ``-O`` format (the default NAME column is cut
at 8 characters), then, for jobs that left the queue, ``sacct``; where accounting is disabled
(``sacct`` says so) the jobcomp/filetxt log named by ``backend.jobcomp_log`` is read
from its end.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from ..config import SlurmBackendConfig
from ..errors import BadInputError, SchedulerError
from ..work import CcdWork
from .base import (
    EXPORTED,
    Backend,
    JobState,
    JobStatus,
    SubmittedJob,
    check_visit,
    checked_token,
    compress_ids,
    render_shell_script,
)

__all__ = ["SlurmBackend", "parse_exit_code", "read_jobcomp"]

_log = logging.getLogger(__name__)

_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/%+=@:,-]+$")
_UNSAFE_COMMENT_CHARS = re.compile(r"[^A-Za-z0-9._:+-]")
_SLURM_ID = re.compile(r"^(?P<job>\d+)(?:_(?P<task>\d+))?$")
_JOBCOMP_FIELDS = {
    "job": re.compile(r"(?:^|\s)JobId=(\d+)"),
    "state": re.compile(r"(?:^|\s)JobState=(\S+)"),
    "array_job": re.compile(r"(?:^|\s)ArrayJobId=(\d+)"),
    "array_task": re.compile(r"(?:^|\s)ArrayTaskId=(\d+)"),
    "exit": re.compile(r"(?:^|\s)ExitCode=(\d+:\d+)"),
    "name": re.compile(r"(?:^|\s)Name=(\S+)"),
    "submitted": re.compile(r"(?:^|\s)SubmitTime=(\S+)"),
    "ended": re.compile(r"(?:^|\s)EndTime=(\S+)"),
}
_LABEL = re.compile(r"^[A-Za-z0-9._-]+$")

S = JobState
_STATES: dict[str, JobState] = {
    "PD": S.PENDING, "PENDING": S.PENDING, "CF": S.PENDING, "CONFIGURING": S.PENDING,
    "RQ": S.PENDING, "REQUEUED": S.PENDING, "RF": S.PENDING, "REQUEUE_FED": S.PENDING,
    "R": S.RUNNING, "RUNNING": S.RUNNING, "CG": S.RUNNING, "COMPLETING": S.RUNNING,
    "RS": S.RUNNING, "RESIZING": S.RUNNING, "SI": S.RUNNING, "SIGNALING": S.RUNNING,
    "SO": S.RUNNING, "STAGE_OUT": S.RUNNING,
    "S": S.HELD, "SUSPENDED": S.HELD, "ST": S.HELD, "STOPPED": S.HELD,
    "RH": S.HELD, "REQUEUE_HOLD": S.HELD, "RD": S.HELD, "RESV_DEL_HOLD": S.HELD,
    "CD": S.COMPLETED, "COMPLETED": S.COMPLETED,
    "F": S.FAILED, "FAILED": S.FAILED, "NF": S.FAILED, "NODE_FAIL": S.FAILED,
    "OOM": S.FAILED, "OUT_OF_MEMORY": S.FAILED, "BF": S.FAILED, "BOOT_FAIL": S.FAILED,
    "PR": S.FAILED, "PREEMPTED": S.FAILED, "SE": S.FAILED, "SPECIAL_EXIT": S.FAILED,
    "CA": S.CANCELLED, "CANCELLED": S.CANCELLED, "RV": S.CANCELLED, "REVOKED": S.CANCELLED,
    "TO": S.TIMEOUT, "TIMEOUT": S.TIMEOUT, "DL": S.TIMEOUT, "DEADLINE": S.TIMEOUT,
}
del S

_SQUEUE_FORMAT = "JobArrayID:48|,StateCompact:8|,exit_code:16|,Reason:200"


def parse_exit_code(text: str) -> int | None:
    """Exit code from Slurm's ``code:signal`` (sacct, jobcomp) or a raw wait status (squeue).

    A job killed by a signal gets ``128 + signal``, as a shell reports it.
    """
    text = text.strip()
    if not text:
        return None
    try:
        if ":" in text:
            code, sig = (int(x) for x in text.split(":", 1))
            return 128 + sig if sig else code
        status = int(text)
    except ValueError:
        return None
    return status >> 8 if status & 0x7F == 0 else 128 + (status & 0x7F)


def _reverse_lines(path: Path, block: int = 1 << 16) -> Iterator[str]:
    """The lines of a file, last first, reading blocks from its end."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos, tail = f.tell(), b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + tail).split(b"\n")
            tail = lines.pop(0)
            for line in reversed(lines):
                if line.strip():
                    yield line.decode(errors="replace")
        if tail.strip():
            yield tail.decode(errors="replace")


def read_jobcomp(path: Path, job_ids: Sequence[str]) -> dict[str, tuple[str, int | None]]:
    """``{job id: (JobState, exit code)}`` for the wanted ids, from a jobcomp/filetxt log.

    The log is read from its end (recent jobs first) and reading stops once every id was
    found; an array task is matched as ``<ArrayJobId>_<ArrayTaskId>``. The last record of a
    job wins (a requeued job is logged once per run).
    """
    wanted = set(job_ids)
    found: dict[str, tuple[str, int | None]] = {}
    if not path.exists():
        return found
    for line in _reverse_lines(path):
        fields = {k: (m.group(1) if (m := rx.search(line)) else None) for k, rx in _JOBCOMP_FIELDS.items()}
        key: str | None
        if fields["array_job"] is not None and fields["array_task"] is not None:
            key = f"{fields['array_job']}_{fields['array_task']}"
        else:
            key = fields["job"]
        if key is not None and key in wanted and key not in found and fields["state"]:
            found[key] = (fields["state"], parse_exit_code(fields["exit"] or ""))
            if len(found) == len(wanted):
                break
    return found


class SlurmBackend(Backend):
    """Submits one visit as one Slurm job array; reads states back from squeue and history.

    See `Backend` for the constructor. Holds no connection; one instance per process.
    """

    kind: ClassVar[str] = "slurm"
    id_pattern = re.compile(r"^(?P<id>\d+)(?:;\S+)?$")  # sbatch --parsable: "id" or "id;cluster"
    state_table = _STATES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.config.backend
        if not isinstance(settings, SlurmBackendConfig):
            raise BadInputError("backend.kind", f"is {settings.kind!r}, not 'slurm'",
                                "use make_backend(config)")
        self.settings: SlurmBackendConfig = settings
        self._sacct_disabled = False

    # ------------------------------------------------------------- script
    def _log_dir(self) -> Path:
        path = self.config.path(self.settings.log_dir).absolute()
        if not _SAFE_PATH.match(str(path)):
            raise BadInputError("config backend.log_dir",
                                f"{str(path)!r} has characters unsafe in #SBATCH lines",
                                "use letters, digits and ._-/ only")
        return path

    def log_path(self, job_id: str | None, work: Any = None) -> str | None:
        """``<log_dir>/<label>_<array job>_<task>.out`` (``--output=%x_%A_%a.out``; the task is the
        detector); `None` without the CCD (the label) or for an id not ``<array>_<task>``."""
        work = getattr(work, "work", work)  # a ledger row or a CcdWork
        match = re.fullmatch(r"(\d+)_(\d+)", str(job_id or ""))
        if match is None or work is None:
            return None
        return f"{self.config.path(self.settings.log_dir).absolute()}/{work.label}_{match[1]}_{match[2]}.out"

    def directives(self, works: Sequence[CcdWork], token: str | None = None) -> list[str]:
        """The ``#SBATCH`` options of one visit's array (also shown by ``render``); the comment
        carries the submission ``token`` (:meth:`find_submitted`)."""
        s = self.settings
        first = works[0]
        detectors = compress_ids(w.detector for w in works)
        array = detectors + (f"%{s.max_array_parallel}" if s.max_array_parallel else "")
        group = _UNSAFE_COMMENT_CHARS.sub("_", first.group_id)[:80]
        comment = f"apbatch group={group} visit={first.visit} detectors={detectors} n={len(works)}"
        if token is not None:
            comment += f" token={checked_token(token)}"
        out = self.job_directives(first.label, comment, "%x_%A_%a.out")
        out.insert(1, f"--array={array}")
        return out

    def job_directives(self, name: str, comment: str, output: str) -> list[str]:
        """The ``#SBATCH`` options of any job this backend submits (a visit's array, a warm pilot):
        name, comment, ``--export``, time limit, requeue, ``--output`` (``output`` in the log
        directory), CPUs, then partition, account, qos, mem and ``extra_directives``. ``name``
        and ``comment`` must already be safe in an ``#SBATCH`` line (the callers build them)."""
        s = self.settings
        out = [
            f"--job-name={name}",
            f'--comment="{comment}"',
            f"--export={','.join(EXPORTED)}",
            f"--time={s.time_limit}",
            "--requeue" if s.requeue else "--no-requeue",
            f"--output={self._log_dir()}/{output}",
            f"--cpus-per-task={s.cpus_per_task}",
        ]
        optional = (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("mem", s.mem))
        for flag, value in optional:
            if value:
                if not _SAFE_PATH.match(value):
                    raise BadInputError(f"config backend.{flag}", f"{value!r} is not a valid Slurm value")
                out.append(f"--{flag}={value}")
        for extra in s.extra_directives:
            if "\n" in extra or "\r" in extra:
                raise BadInputError("config backend.extra_directives", "an entry holds a line break",
                                    "one option per entry")
            out.append(extra)
        return out

    def render(self, works: Sequence[CcdWork], token: str | None = None) -> str:
        """The exact batch script :meth:`submit` feeds to ``sbatch``.

        The job's log (``--output``) is made 0640 and the job's own files get ``umask 027``;
        the log directory is 0750.
        """
        check_visit(works)
        header = [f"#SBATCH {d}" for d in self.directives(works, token)]
        task = "${SLURM_JOB_NAME:-}_${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}"
        log = f"{self._log_dir()}/{task}.out"
        cmd = " ".join(shlex.quote(a) for a in self.job_command(works[0].day_obs))
        lines = ["umask 027", f'chmod 0640 "{log}" 2>/dev/null || true',
                 'case "${SLURM_ARRAY_TASK_ID:?not a Slurm array task}" in']
        for w in works:
            lines.append(f"  {w.detector}) args=({' '.join(shlex.quote(a) for a in w.job_args())}) ;;")
        lines += [
            '  *) echo "apbatch: no CCD for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            "esac",
            f'exec {cmd} "${{args[@]}}"',
        ]
        return render_shell_script(self.job_env(), lines, header)

    # ------------------------------------------------------------- submit / cancel
    def submit(self, works: Sequence[CcdWork], token: str | None = None) -> list[SubmittedJob]:
        """One ``sbatch --parsable`` of the rendered array script (on stdin)."""
        self.prepare(works)
        script = self.render(works, token)
        log_dir = self._log_dir()
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        log_dir.chmod(0o750)
        argv = ["sbatch", "--parsable"]
        result = self.run(argv, input=script)
        array_id = self.parse_job_id(argv, result.stdout)
        _log.info("submitted %s (%d CCDs) as Slurm array %s", works[0].label, len(works), array_id)
        return [SubmittedJob(w, f"{array_id}_{w.detector}") for w in works]

    def find_submitted(self, works: Sequence[CcdWork], token: str, since: float) -> list[SubmittedJob]:
        """The visit's array that carries ``token`` in its comment: ``squeue`` (by job name),
        then ``sacct`` (``--name``, from ``since``; the comment is kept with
        ``AccountingStoreFlags=job_comment``), then, where accounting is off, the jobcomp
        log, which has no comment: there the array named like the visit, submitted at or
        after ``since`` and holding one of these detectors is taken (no other process can
        hold a claim on them since then).
        """
        check_visit(works)
        mark = f"token={checked_token(token)}"
        since = min(since, time.time())  # a claim "in the future" is clock skew: search from now
        label = works[0].label
        if not _LABEL.match(label):
            raise BadInputError("instrument", f"{label!r} is not a valid Slurm job name",
                                "letters, digits, ._-")
        argv = ["squeue", "-h", "-r", "-t", "all", "-n", label, "-O", "JobArrayID:48|,Comment:400"]
        arrays = {line.split("|", 1)[0].strip().split("_", 1)[0]
                  for line in self.run(argv).stdout.splitlines() if mark in line.split("|", 1)[-1].split()}
        if not arrays and not self._sacct_disabled:
            start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
            argv = ["sacct", "-n", "-P", "-X", "--name", label, "-S", start, "-o", "JobID,Comment"]
            result = self.run(argv, check=False)
            if result.returncode == 0:
                arrays = {line.split("|", 1)[0].split("_", 1)[0] for line in result.stdout.splitlines()
                          if mark in line.split("|", 1)[-1].split()}
            elif "accounting storage is disabled" in (result.stderr + result.stdout).lower():
                self._sacct_disabled = True
            else:
                raise SchedulerError(argv, result.returncode, result.stdout, result.stderr)
        if not arrays and self._sacct_disabled and self.settings.jobcomp_log:
            arrays = _jobcomp_arrays(self.config.path(self.settings.jobcomp_log), label, since,
                                     {w.detector for w in works})
        if not arrays:
            return []
        if len(arrays) > 1:
            _log.error("%s: %d Slurm arrays carry submission token %s: %s", label, len(arrays), token,
                       ", ".join(sorted(arrays)))
        array_id = min(arrays, key=int)
        return [SubmittedJob(w, f"{array_id}_{w.detector}") for w in works]

    def cancel(self, job_ids: Sequence[str]) -> None:
        """``scancel`` the given array tasks (or whole jobs), in batches."""
        ids = [_checked_id(j) for j in job_ids]
        for start in range(0, len(ids), self.batch_size):
            self.run(["scancel", *ids[start:start + self.batch_size]])

    # ------------------------------------------------------------- status
    def _query_queue(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        wanted = {_checked_id(j) for j in job_ids}
        # every id matched _SLURM_ID in _checked_id: the array job id is what precedes "_"
        jobs = sorted({j.split("_", 1)[0] for j in wanted}, key=int)
        argv = ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs), "-O", _SQUEUE_FORMAT]
        result = self.run(argv, check=False)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # none of them is known any more
                return {}
            raise SchedulerError(argv, result.returncode, result.stdout, result.stderr)
        out = {}
        for line in result.stdout.splitlines():
            parts = [p.strip() for p in line.split("|", 3)]
            if len(parts) < 2 or parts[0] not in wanted:
                continue
            job_id, code = parts[0], parts[1]
            reason = parts[3] if len(parts) > 3 and parts[3] not in ("None", "(null)") else ""
            state = self.state_table.get(code)
            exit_code = parse_exit_code(parts[2]) if state is not None and state.finished else None
            if state is JobState.PENDING and reason.startswith("JobHeld"):
                out[job_id] = JobStatus(job_id, JobState.HELD, None, reason)
            else:
                out[job_id] = self.map_state(job_id, code, exit_code, reason)
        return out

    def _query_history(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        ids = [_checked_id(j) for j in job_ids]
        found: dict[str, JobStatus] = {}
        if not self._sacct_disabled:
            found.update(self._query_sacct(ids))
        missing = [j for j in ids if j not in found]
        if missing and self.settings.jobcomp_log:
            path = self.config.path(self.settings.jobcomp_log)
            for job_id, (code, exit_code) in read_jobcomp(path, missing).items():
                found[job_id] = self.map_state(job_id, code, exit_code)
        return found

    def _query_sacct(self, ids: list[str]) -> dict[str, JobStatus]:
        argv = ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State,ExitCode"]
        result = self.run(argv, check=False)
        if result.returncode != 0:
            if "accounting storage is disabled" in (result.stderr + result.stdout).lower():
                _log.info("sacct: accounting disabled; using the jobcomp log %s", self.settings.jobcomp_log)
                self._sacct_disabled = True
                return {}
            raise SchedulerError(argv, result.returncode, result.stdout, result.stderr)
        wanted, out = set(ids), {}
        for line in result.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0] in wanted:
                code = parts[1].split()[0] if parts[1].strip() else ""  # "CANCELLED by 0"
                out[parts[0]] = self.map_state(parts[0], code, parse_exit_code(parts[2]))
        return out


def _jobcomp_arrays(path: Path, label: str, since: float, detectors: set[int]) -> set[str]:
    """Array job ids in a jobcomp log named ``label``, submitted at or after ``since`` (the log's
    whole seconds, local time) with a task among ``detectors``; read from the end, back to the
    first job that ended before ``since``."""
    out: set[str] = set()
    if not path.exists():
        return out
    for line in _reverse_lines(path):
        f = {k: (m.group(1) if (m := rx.search(line)) else None) for k, rx in _JOBCOMP_FIELDS.items()}
        try:
            ended = datetime.fromisoformat(f["ended"] or "").timestamp()
            submitted = datetime.fromisoformat(f["submitted"] or "").timestamp()
        except ValueError:
            continue
        if ended < int(since) - 1:
            break  # the log is in order of job end: everything before ended before the claim
        if f["name"] != label or f["array_job"] is None or f["array_task"] is None:
            continue
        if submitted >= int(since) - 1 and int(f["array_task"]) in detectors:
            out.add(f["array_job"])
    return out


def _checked_id(job_id: str) -> str:
    """A Slurm job id (``123`` or ``123_4``); anything else is refused before reaching a command."""
    if not _SLURM_ID.match(str(job_id)):
        raise BadInputError("job id", f"{job_id!r} is not a Slurm job id",
                            "expected <job> or <arrayjob>_<task>")
    return str(job_id)
