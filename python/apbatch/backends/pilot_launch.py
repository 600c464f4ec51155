"""Warm pilots as ordinary batch jobs: how the pilot backend starts, watches and stops a pilot
through Slurm or HTCondor (``backend.launcher``, `apbatch.backends.pilot`).

A launcher reuses its batch backend's machinery rather than repeating it: a Slurm pilot is one
``sbatch --parsable`` of a script whose ``#SBATCH`` lines are `SlurmBackend.job_directives`
(partition, account, qos, ``--export``, log directory checks), its states come from
`SlurmBackend.status` (``squeue``, then ``sacct`` or the jobcomp log, never assumed done), and
``scancel`` stops it; an HTCondor pilot is one ``schedd.submit`` of an `htcondor2.Submit`
built like `HTCondorBackend.description` (absolute executable, macro-safe arguments and
environment), with that backend's queue -> history states and ``Remove`` action.

A batch pilot learns its name from ``APBATCH_PILOT_ID`` (``slurm-<job id>`` or
``htcondor-<cluster>.<proc>``), set by its script or description, so the record the launcher
wrote at submission (state ``starting``) and the one the pilot keeps are the same file, and
every item it claims names its batch job: the pilot backend asks the batch system, not the
local process table, whether that pilot still lives.

Time limit: ``backend.max_lifetime`` plus `PILOT_GRACE_SECONDS` (the pilot takes no new work
after ``max_lifetime`` and may be running a CCD then). Memory: ``launcher.mem`` /
``launcher.request_memory``, by default ``backend.max_rss_mib`` (checked after each CCD) plus
`PILOT_MEM_HEADROOM_MIB` (one CCD's working set). A pilot is never requeued or retried by the
batch system: one that dies leaves its item FAILED ("lost", retried by the daemon), and the
pilot backend starts another for the work still queued.

Constructors do no I/O; one launcher per `PilotBackend`, not thread-safe.
"""

from __future__ import annotations

import abc
import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..config import ApbatchConfig, HTCondorBackendConfig, SlurmBackendConfig, time_limit_seconds
from ..config_backends import (
    PILOT_GRACE_SECONDS,
    PILOT_MEM_HEADROOM_MIB,
    PilotBackendConfig,
    PilotHTCondorLauncher,
    PilotSlurmLauncher,
)
from ..errors import BadInputError, SchedulerError
from .base import JobStatus, Runner, render_shell_script

__all__ = ["BatchLauncher", "HTCondorPilotLauncher", "PILOT_ID", "SlurmPilotLauncher", "make_launcher",
           "parse_pilot_id"]

_log = logging.getLogger(__name__)

PILOT_ID = re.compile(r"^(?P<kind>slurm|htcondor)-(?P<id>\d+(?:[._]\d+)?)$")
"""``APBATCH_PILOT_ID`` of a batch pilot: the launcher's kind and the batch job id."""


def parse_pilot_id(text: str | None) -> tuple[str, str] | None:
    """``("slurm", "123")`` for ``slurm-123``; `None` for no id.

    Raises
    ------
    BadInputError
        Raised if ``text`` is set but not a batch pilot id.
    """
    if not text:
        return None
    match = PILOT_ID.match(text)
    if match is None:
        raise BadInputError("APBATCH_PILOT_ID", f"{text!r} is not a batch pilot id",
                            "expected slurm-<job id> or htcondor-<cluster>.<proc> (set by the launcher)")
    return match["kind"], match["id"]


def _duration(seconds: int) -> str:
    """Seconds as Slurm's ``D-HH:MM:SS``."""
    days, rest = divmod(seconds, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


class BatchLauncher(abc.ABC):
    """Starts pilots as batch jobs; tells which still live; stops them.

    Parameters
    ----------
    config : `ApbatchConfig`
        The whole configuration; ``config.backend`` is the pilot backend's.
    state_dir : `pathlib.Path`
        The pilot backend's state directory; pilot logs go to its ``pilots/``.
    """

    kind: ClassVar[str] = ""
    backend: Any
    """The batch backend (`SlurmBackend`, `HTCondorBackend`) a subclass submits through."""

    def __init__(self, config: ApbatchConfig, state_dir: Path) -> None:
        settings = config.backend
        assert isinstance(settings, PilotBackendConfig)
        self.config, self.settings, self.state_dir = config, settings, state_dir

    @property
    def limit_seconds(self) -> int:
        """The batch time limit of a pilot: ``max_lifetime`` plus the grace for its last CCD."""
        return time_limit_seconds(self.settings.max_lifetime) + PILOT_GRACE_SECONDS

    @property
    def memory_mib(self) -> int:
        """The default memory request: ``max_rss_mib`` plus one CCD's working set."""
        return int(self.settings.max_rss_mib + PILOT_MEM_HEADROOM_MIB)

    def job_name(self, day_obs: int) -> str:
        """``ap-pilot-<day_obs>``: what ``squeue`` / ``condor_q -batch`` show."""
        return f"ap-pilot-{int(day_obs)}"

    @abc.abstractmethod
    def render(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        """The exact script / submit description of one pilot."""

    @abc.abstractmethod
    def submit(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        """Submit one pilot running ``argv`` with ``env``; returns its batch job id.

        Raises
        ------
        SchedulerError
            Raised if the batch system refuses it.
        """

    def states(self, batch_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The batch states of those pilot jobs (queue, then history, else UNKNOWN): the
        subclass's batch ``backend`` answers, as it does for per-CCD jobs."""
        return self.backend.status(batch_ids) if batch_ids else {}

    def cancel(self, batch_ids: Sequence[str]) -> None:
        """Stop those pilot jobs (the batch ``backend``'s cancel)."""
        if batch_ids:
            self.backend.cancel(batch_ids)


class SlurmPilotLauncher(BatchLauncher):
    """Pilots as Slurm jobs through `SlurmBackend` (``runner`` as for `Backend`)."""

    kind: ClassVar[str] = "slurm"

    def __init__(self, config: ApbatchConfig, state_dir: Path, runner: Runner | None = None) -> None:
        from .slurm import SlurmBackend

        super().__init__(config, state_dir)
        launcher = self.settings.launcher
        assert isinstance(launcher, PilotSlurmLauncher)
        slurm = SlurmBackendConfig(
            partition=launcher.partition, account=launcher.account, qos=launcher.qos,
            time_limit=_duration(self.limit_seconds), mem=launcher.mem or f"{self.memory_mib}M",
            cpus_per_task=launcher.cpus_per_task, requeue=False, extra_directives=launcher.extra_directives,
            log_dir=str(state_dir / "pilots"), jobcomp_log=launcher.jobcomp_log,
            command_timeout=launcher.command_timeout)
        self.backend = SlurmBackend(config.model_copy(update={"backend": slurm}), runner=runner)

    def render(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        """The pilot's batch script: ``#SBATCH`` lines, ``job.env``, its pilot id, ``exec`` the pilot."""
        comment = f"apbatch pilot day_obs={int(day_obs)} of {self.settings.pilots}"
        try:
            header = [f"#SBATCH {d}" for d in self.backend.job_directives(self.job_name(day_obs), comment,
                                                                           "%x_%j.out")]
        except BadInputError as exc:  # name the pilot's own field, not the slurm backend's
            field = exc.field.replace("config backend.", "config backend.launcher.")
            raise BadInputError(field, exc.problem, exc.fix) from None
        lines = ["umask 027", 'export APBATCH_PILOT_ID="slurm-${SLURM_JOB_ID:?not a Slurm job}"',
                 "exec " + " ".join(shlex.quote(a) for a in argv)]
        return render_shell_script(env, lines, header)

    def submit(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        script = self.render(argv, env, day_obs)
        log_dir = self.state_dir / "pilots"
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        command = ["sbatch", "--parsable"]
        job_id = self.backend.parse_job_id(command, self.backend.run(command, input=script).stdout)
        _log.info("submitted pilot %s as Slurm job %s", self.job_name(day_obs), job_id)
        return job_id


class HTCondorPilotLauncher(BatchLauncher):
    """Pilots as HTCondor jobs through `HTCondorBackend` (``schedd`` / ``schedd_factory`` as there)."""

    kind: ClassVar[str] = "htcondor"

    def __init__(self, config: ApbatchConfig, state_dir: Path, schedd: Any = None,
                 schedd_factory: Any = None) -> None:
        from .htcondor import HTCondorBackend

        super().__init__(config, state_dir)
        launcher = self.settings.launcher
        assert isinstance(launcher, PilotHTCondorLauncher)
        self.launcher = launcher
        condor = HTCondorBackendConfig(
            schedd_name=launcher.schedd_name, collector=launcher.collector,
            request_memory=launcher.request_memory or f"{self.memory_mib}MB",
            request_cpus=launcher.request_cpus, max_retries=0, time_limit=_duration(self.limit_seconds),
            extra_attributes=launcher.extra_attributes, log_dir=str(state_dir / "pilots"))
        self.backend = HTCondorBackend(config.model_copy(update={"backend": condor}), schedd=schedd,
                                       schedd_factory=schedd_factory)

    def description(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> dict[str, str]:
        """The submit description of one pilot (``queue 1``)."""
        from .htcondor import _executable, _no_newline, condor_arg, executable_argv

        s = self.backend.settings
        command = executable_argv(list(argv))
        log_dir = str(self.state_dir / "pilots")
        _no_newline(log_dir, "config backend.log_dir")
        name = self.job_name(day_obs)
        env = {**env, "APBATCH_PILOT_ID": "htcondor-$(ClusterId).$(ProcId)"}
        # the pilot id's macros must expand: quoted without condor_arg's $ -> $(DOLLAR)
        environ = " ".join(condor_arg(f"{k}={v}", f"config job.env.{k}") for k, v in env.items()
                           if k != "APBATCH_PILOT_ID") + " 'APBATCH_PILOT_ID=htcondor-$(ClusterId).$(ProcId)'"
        desc = {
            "universe": "vanilla",
            "executable": _no_newline(_executable(command[0]), "config backend.command"),
            "arguments": '"' + " ".join(condor_arg(a, "config backend.command") for a in command[1:]) + '"',
            "environment": f'"{environ.strip()}"',
            "getenv": "false",
            "transfer_executable": "false",
            "should_transfer_files": "IF_NEEDED",
            "batch_name": name,
            "request_memory": s.request_memory,
            "request_cpus": str(s.request_cpus),
            "max_retries": "0",
            "periodic_remove": f"JobStatus == 2 && time() - JobCurrentStartDate > {self.limit_seconds}",
            "output": f"{log_dir}/{name}_$(ClusterId).$(ProcId).out",
            "error": f"{log_dir}/{name}_$(ClusterId).$(ProcId).out",
            "log": f"{log_dir}/{name}.log",
            "+ApPilot": "true",
            "+ApDayObs": str(int(day_obs)),
        }
        for key, value in s.extra_attributes.items():
            desc[key if key.startswith("+") else f"+{key}"] = _no_newline(
                value, f"config backend.launcher.extra_attributes.{key}")
        return desc

    def render(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        desc = self.description(argv, env, day_obs)
        return "\n".join(f"{k} = {v}" for k, v in desc.items()) + "\nqueue 1\n"

    def submit(self, argv: Sequence[str], env: dict[str, str], day_obs: int) -> str:
        import htcondor2

        sub = htcondor2.Submit(self.description(argv, env, day_obs))
        (self.state_dir / "pilots").mkdir(mode=0o750, parents=True, exist_ok=True)
        b = self.backend
        result = b._call("htcondor2.Schedd.submit", b.schedd.submit, sub, count=1)
        if int(result.num_procs()) != 1:
            raise SchedulerError(["htcondor2.Schedd.submit"], 1, str(result),
                                 f"asked for 1 pilot, the schedd made {result.num_procs()}")
        job_id = f"{int(result.cluster())}.{int(result.first_proc())}"
        _log.info("submitted pilot %s as HTCondor job %s", self.job_name(day_obs), job_id)
        return job_id


def make_launcher(config: ApbatchConfig, state_dir: Path, **deps: Any) -> BatchLauncher | None:
    """The batch launcher of ``backend.launcher``; `None` for local pilots. ``deps``: ``runner``
    (slurm), ``schedd`` / ``schedd_factory`` (htcondor); others are ignored."""
    settings = config.backend
    assert isinstance(settings, PilotBackendConfig)
    kind = settings.launcher.kind
    if kind == "slurm":
        return SlurmPilotLauncher(config, state_dir, runner=deps.get("runner"))
    if kind == "htcondor":
        return HTCondorPilotLauncher(config, state_dir, schedd=deps.get("schedd"),
                                     schedd_factory=deps.get("schedd_factory"))
    return None
