"""Errors and the documented exit codes of every apbatch command.

Exit codes
----------
=====  ===================  ==========================================================
code   name                 meaning
=====  ===================  ==========================================================
0      SUCCESS              the command did what it was asked
2      BAD_INPUT            bad arguments, event, config or data; retrying will not help
3      RAW_TIMEOUT          the raw image(s) did not arrive before ``--timeout``;
                            nothing was written
4      RETRIABLE            failed before anything was stored in the APDB; safe to rerun
5      NON_RETRIABLE        failed after (or while) storing in the APDB, or for a
                            reason a rerun cannot fix; needs a person
6      NEEDS_ATTENTION      ``apbatch status`` / ``night report`` only: the command
                            worked and found CCDs that need a person (listed)
=====  ===================  ==========================================================

Anything unexpected (a bug) ends with ``NON_RETRIABLE`` and one line; the traceback only
with ``--log-level DEBUG``.

The daemon and the nightly reprocessing resubmit only jobs that ended with
``RAW_TIMEOUT`` or ``RETRIABLE``.
"""

from __future__ import annotations

import enum

__all__ = [
    "ApbatchError",
    "BadInputError",
    "ExitCode",
    "NonRetriableError",
    "RETRIABLE_EXIT_CODES",
    "RawTimeoutError",
    "RetriableError",
    "SchedulerError",
    "exit_code_of",
    "first_line",
]


class ExitCode(enum.IntEnum):
    """Documented process exit codes (see module docstring)."""

    SUCCESS = 0
    BAD_INPUT = 2
    RAW_TIMEOUT = 3
    RETRIABLE = 4
    NON_RETRIABLE = 5
    NEEDS_ATTENTION = 6

    @property
    def retriable(self) -> bool:
        """`True` if a job that ended with this code may be resubmitted."""
        return self in (ExitCode.RAW_TIMEOUT, ExitCode.RETRIABLE)


RETRIABLE_EXIT_CODES: frozenset[int] = frozenset(int(c) for c in ExitCode if c.retriable)
"""Exit codes of jobs that may be resubmitted (as plain ints, for ledger rows and SQL)."""


class ApbatchError(Exception):
    """Base class of every error apbatch raises on purpose.

    Subclasses fix the exit code; the message is one line meant for a person.
    """

    exit_code: ExitCode = ExitCode.NON_RETRIABLE


class BadInputError(ApbatchError, ValueError):
    """Raised if an argument, event, config value or input file is invalid.

    Parameters
    ----------
    field : `str`
        Name of the offending field (``"event.groupId"``, ``"--ccd"``...).
    problem : `str`
        What is wrong with it.
    fix : `str`, optional
        What the user should do instead.
    """

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class RawTimeoutError(ApbatchError, TimeoutError):
    """Raised if a raw image did not arrive at the distributor in time."""

    exit_code = ExitCode.RAW_TIMEOUT


class RetriableError(ApbatchError):
    """Raised for a failure before anything was stored; rerunning is safe."""

    exit_code = ExitCode.RETRIABLE


class NonRetriableError(ApbatchError):
    """Raised for a failure a rerun cannot fix, or after the APDB store began."""

    exit_code = ExitCode.NON_RETRIABLE


class SchedulerError(RetriableError):
    """Raised if a batch-system command fails.

    Parameters
    ----------
    argv : `list` [`str`]
        The command that was run.
    returncode : `int`
        Its exit code.
    stdout, stderr : `str`
        What it printed.
    """

    def __init__(self, argv: list[str], returncode: int, stdout: str = "", stderr: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip().splitlines()
        tail = detail[-1] if detail else "no output"
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}")


def exit_code_of(exc: BaseException | None) -> int:
    """The exit code a command ends with after ``exc`` (`None`: success), the one rule
    `apbatch.cli.main` and a warm pilot's items (`apbatch.script.pilot`) share: an
    `ApbatchError`'s own code, ``SystemExit``'s code, 130 for an interrupt, anything else 5
    ("needs a person": nobody can tell whether a rerun is safe)."""
    if exc is None:
        return int(ExitCode.SUCCESS)
    if isinstance(exc, ApbatchError):
        return int(exc.exit_code)
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return int(ExitCode.NON_RETRIABLE)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line error; the exception's type if empty.

    A SQLAlchemy error is described by the driver's own error (``exc.orig``), without the
    server's ``ERROR:`` prefix (PostgreSQL's).
    """
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.removeprefix("ERROR:").strip()
