"""``apbatch ocps``: the OCS-controlled processing service (UWS over HTTP) and a small client."""

from __future__ import annotations

import json

import click

from .opt import config_option, json_option

__all__ = ["ocps"]


@click.group()
def ocps() -> None:
    """OCS-controlled processing: processData requests as UWS 1.1 jobs over HTTP."""


@ocps.command()
@config_option
@click.option("--host", default=None, help="Address to listen on [default: ocps.host, 127.0.0.1]; another "
              "address needs a bearer token (ocps.token_env / ocps.token_file).")
@click.option("--port", default=None, type=click.IntRange(0, 65535),
              help="Port [default: ocps.port, 8085]; 0 picks a free one (the URL is printed).")
@click.option("--mode", default=None, type=click.Choice(["sync", "async"]),
              help="sync: one request at a time, others get 409; async: requests queue [default: ocps.mode].")
def serve(config_paths: tuple[str, ...], host: str | None, port: int | None, mode: str | None) -> None:
    """Serve processData requests at /jobs until SIGTERM/SIGINT (prints the URL once listening)."""
    from ..config import load_config  # noqa: PLC0415 (lazy CLI)
    from ..script.ocps import serve as run  # noqa: PLC0415

    config = load_config(list(config_paths) or None, overrides={"ocps": {"mode": mode}} if mode else None)
    run(config, host=host, port=port)


@ocps.command()
@config_option
@click.option("--url", default=None, help="Service root [default: http://<ocps.host>:<ocps.port>].")
@click.option("--pipeline", required=True, help="Pipeline: ap, calib-verify or gather.")
@click.option("--instrument", required=True, help="Instrument: LATISS, LSSTComCam or LSSTCam.")
@click.option("--obsid", default=None, help="Image name, e.g. MC_O_20251015_000003.")
@click.option("--group", "group_id", default=None, help="Group id (gather needs one).")
@click.option("--detector", default=None, type=click.IntRange(min=0), help="One CCD [default: every CCD].")
@click.option("--request-config", default=None,
              help="Config file the request runs with (a path the service can read).")
@click.option("--set", "settings", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Config override for this request; repeatable.")
@click.option("--wait", is_flag=True, help="Follow the request to its end; exit non-zero unless COMPLETED.")
@click.option("--timeout", default=None, type=click.FloatRange(min=0),
              help="With --wait: give up after this many seconds.")
@json_option
def submit(config_paths: tuple[str, ...], url: str | None, pipeline: str, instrument: str, obsid: str | None,
           group_id: str | None, detector: int | None, request_config: str | None, settings: tuple[str, ...],
           wait: bool, timeout: float | None, as_json: bool) -> None:
    """Send one processData request to a running `apbatch ocps serve` and print the job."""
    from ..config import load_config  # noqa: PLC0415 (lazy CLI)
    from ..script import ocps as script  # noqa: PLC0415

    config = load_config(list(config_paths) or None)
    params = script.request_params(pipeline, instrument, obsid=obsid, group_id=group_id, detector=detector,
                                   config_file=request_config, settings=settings)
    token = script.read_token(config.ocps, config.root)
    job = script.submit(url or script.service_url(config), params, token=token, wait=wait, timeout=timeout)
    click.echo(json.dumps(job, indent=2) if as_json else script.describe(job))
    if wait:
        script.check_outcome(job)
