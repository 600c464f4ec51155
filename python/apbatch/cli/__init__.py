"""The ``apbatch`` command line: a click group whose commands load lazily.

Each command lives in its own module under ``apbatch.cli`` as a thin wrapper over a plain
function in ``apbatch.script``; :data:`COMMANDS` maps a command name to ``module:attribute``
so that ``apbatch --help`` and each command import only what they need (``import
lsst.daf.butler`` alone takes over a second).
"""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from ..errors import ApbatchError, ExitCode, exit_code_of

__all__ = ["COMMANDS", "cli", "main"]

COMMANDS: dict[str, str] = {
    "submit": "apbatch.cli.cmd_submit:submit",
    "daemon": "apbatch.cli.cmd_daemon:daemon",
    "status": "apbatch.cli.cmd_status:status",
    "cancel": "apbatch.cli.cmd_cancel:cancel",
    "resubmit": "apbatch.cli.cmd_resubmit:resubmit",
    "render-job": "apbatch.cli.cmd_render:render_job",
    "process-ccd": "apbatch.cli.cmd_process_ccd:process_ccd",
    "pilot": "apbatch.cli.cmd_pilot:pilot",
    "sim": "apbatch.cli.cmd_sim:sim",
    "repo": "apbatch.cli.cmd_repo:repo",
    "distributor": "apbatch.cli.cmd_distributor:distributor",
    "apdb": "apbatch.cli.cmd_apdb:apdb",
    "alerts": "apbatch.cli.cmd_alerts:alerts",
    "night": "apbatch.cli.cmd_night:night",
    "demo": "apbatch.cli.cmd_demo:demo",
    "ocps": "apbatch.cli.cmd_ocps:ocps",
    "embargo": "apbatch.cli.cmd_embargo:embargo",
    "ppdb": "apbatch.cli.cmd_ppdb:ppdb",
    "obscore": "apbatch.cli.cmd_obscore:obscore",
    "tap": "apbatch.cli.cmd_tap:tap",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # the command is planned but not built yet
                return None
            raise


@click.group(cls=_LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging level; DEBUG also shows tracebacks.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text or one JSON object each (with visit, detector and job id in a job); "
                   "default: monitoring.log_format, else text.")
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str | None) -> None:
    """Run Rubin-style Alert Production as batch jobs, one job per CCD."""
    from ..logs import configure_logging

    configure_logging(log_level, log_format, sys.stderr)
    ctx.obj = {"log_level": log_level.upper()}


def _debug(argv: list[str]) -> bool:
    """`True` if the command line asks for ``--log-level DEBUG`` (tracebacks wanted)."""
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv) and argv[i + 1].upper() == "DEBUG":
            return True
        if arg.upper() == "--LOG-LEVEL=DEBUG":
            return True
    return False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group; every failure ends as one line on stderr and a documented code.

    `ApbatchError` exits with its own code; click usage errors with 2; anything else (a bug
    or an environment failure nobody classified) with 5, "needs a person", since nobody can
    tell whether a rerun is safe. Tracebacks are logged only with ``--log-level DEBUG``.
    """
    args = list(argv if argv is not None else sys.argv[1:])
    debug = _debug(args)
    try:
        cli.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ApbatchError as exc:
        if debug:
            click.echo(traceback.format_exc(), err=True, nl=False)
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(exit_code_of(exc))
    except KeyboardInterrupt as exc:
        sys.exit(exit_code_of(exc))
    except Exception as exc:
        if debug:
            click.echo(traceback.format_exc(), err=True, nl=False)
        click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                   "(rerun with --log-level DEBUG for the traceback)", err=True)
        sys.exit(exit_code_of(exc))
    sys.exit(0)
