"""The ``apbatch`` command line: a click group whose commands load lazily.

Each command lives in its own module under ``apbatch.cli`` as a thin wrapper over a plain
function in ``apbatch.script``; :data:`COMMANDS` maps a command name to ``module:attribute``
so that ``apbatch --help`` and each command import only what they need (``import
lsst.daf.butler`` alone takes over a second).
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ..errors import ApbatchError, ExitCode

__all__ = ["COMMANDS", "cli", "main"]

COMMANDS: dict[str, str] = {
    "submit": "apbatch.cli.cmd_submit:submit",
    "daemon": "apbatch.cli.cmd_daemon:daemon",
    "status": "apbatch.cli.cmd_status:status",
    "cancel": "apbatch.cli.cmd_cancel:cancel",
    "render-job": "apbatch.cli.cmd_render:render_job",
    "process-ccd": "apbatch.cli.cmd_process_ccd:process_ccd",
    "sim": "apbatch.cli.cmd_sim:sim",
    "repo": "apbatch.cli.cmd_repo:repo",
    "distributor": "apbatch.cli.cmd_distributor:distributor",
    "apdb": "apbatch.cli.cmd_apdb:apdb",
    "alerts": "apbatch.cli.cmd_alerts:alerts",
    "night": "apbatch.cli.cmd_night:night",
    "demo": "apbatch.cli.cmd_demo:demo",
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


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging level; DEBUG also shows tracebacks.")
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """Run Rubin-style Alert Production as batch jobs, one job per CCD."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = {"log_level": log_level.upper()}


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group, turning apbatch errors into one line and an exit code."""
    debug = "DEBUG" in [a.upper() for a in (argv if argv is not None else sys.argv[1:])]
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.BAD_INPUT if exc.exit_code == 2 else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except ApbatchError as exc:
        if debug:
            logging.getLogger("apbatch").exception("failed")
        click.echo(f"error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
