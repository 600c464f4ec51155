"""What every batch job is started with: the resolved job command and the night's config file.

* :func:`resolve_command`: the default ``job.command: [apbatch, process-ccd]`` names the
  ``apbatch`` console script; at submission it becomes the absolute path of the script of
  *this* install (next to `sys.executable`), or ``[sys.executable, -m, apbatch]`` when that
  script is missing, so a job on another node runs the same install, never whatever
  ``apbatch`` is first on its ``PATH``. Another bare command name is looked up on ``PATH``
  (HTCondor would otherwise resolve it against the submit directory).
* :func:`write_config_snapshot`: the submitting process's resolved configuration (all
  ``--config`` files and ``APBATCH_*`` overrides applied, ``root`` made absolute), written
  once per night as ``<root>/<job.config_dir>/<day_obs>.yaml`` (mode 0640, created whole and
  never replaced; a second, different configuration submitting the same night -- e.g. an
  operator's ``apbatch resubmit`` with other settings -- gets ``<day_obs>-<hash>.yaml``).
  Every job gets ``--config`` with its file, so a job never runs on defaults alone, and reads
  the configuration it was submitted with.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from .atomic import create_exclusive
from .config import ApbatchConfig
from .errors import BadInputError

__all__ = ["config_snapshot_path", "config_snapshot_text", "resolve_command", "write_config_snapshot"]


def resolve_command(command: Sequence[str], executable: str | None = None) -> list[str]:
    """The job command with its program made absolute (see the module docstring).

    Parameters
    ----------
    command : sequence of `str`
        ``job.command``.
    executable : `str`, optional
        The interpreter of this install (default `sys.executable`).

    Raises
    ------
    BadInputError
        Raised if the command is empty.
    """
    if not command:
        raise BadInputError("config job.command", "is empty", "e.g. [apbatch, process-ccd]")
    program, rest = str(command[0]), [str(a) for a in command[1:]]
    if os.sep in program:
        return [os.path.abspath(program), *rest]
    if program == "apbatch":
        python = Path(os.path.abspath(executable or sys.executable))
        script = python.parent / "apbatch"
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script), *rest]
        return [str(python), "-m", "apbatch", *rest]
    found = shutil.which(program)
    return [os.path.abspath(found) if found else program, *rest]


def config_snapshot_text(config: ApbatchConfig) -> str:
    """The resolved configuration as YAML, with ``root`` absolute (jobs run in other directories)."""
    data = config.model_dump(mode="json")
    data["root"] = str(Path(config.root).absolute())
    header = "# written by apbatch at submission: the resolved configuration the jobs of this night read\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def _candidates(config: ApbatchConfig, day_obs: int, text: str) -> tuple[Path, Path]:
    folder = config.path(config.job.config_dir).absolute()
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return folder / f"{int(day_obs)}.yaml", folder / f"{int(day_obs)}-{digest}.yaml"


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text(encoding="utf-8") == text
    except FileNotFoundError:
        return False


def config_snapshot_path(config: ApbatchConfig, day_obs: int) -> Path:
    """Where the jobs of night ``day_obs`` find this configuration (absolute; nothing is written).

    ``<day_obs>.yaml`` if it is free or holds this configuration; else (another configuration
    submitted jobs that night first) ``<day_obs>-<hash>.yaml``.
    """
    text = config_snapshot_text(config)
    plain, hashed = _candidates(config, day_obs, text)
    return plain if not plain.exists() or _holds(plain, text) else hashed


def write_config_snapshot(config: ApbatchConfig, day_obs: int) -> Path:
    """Write the night's config file unless it is there already; return its path.

    Files are created whole (atomically, mode 0640) and never replaced, so a job (or a job
    requeued hours later) reads exactly the configuration it was submitted with; a different
    configuration the same night gets its own file (:func:`config_snapshot_path`).

    Raises
    ------
    BadInputError
        Raised if the file cannot be written.
    """
    text = config_snapshot_text(config)
    candidates = _candidates(config, day_obs, text)
    try:
        for path in candidates:
            if _holds(path, text) or create_exclusive(path, text, mode=0o640) or _holds(path, text):
                return path
    except OSError as exc:
        raise BadInputError("config job.config_dir",
                            f"cannot write {str(candidates[0].parent)!r}: {exc.strerror or exc}",
                            "make the directory writable or change job.config_dir") from None
    raise BadInputError("config job.config_dir", f"{candidates[1]} holds another configuration",
                        "remove the stray file")
