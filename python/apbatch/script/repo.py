"""``apbatch repo ...``: create the butler repository, register a night, ingest calibrations/templates.

Night plan (``apbatch repo register --night DIR``)
--------------------------------------------------
``DIR/plan.yaml`` lists the night's exposures, one entry per exposure (not per CCD), with
the field names of `apbatch.raw.RawMetadata`::

    exposures:
      - {instrument: LSSTComCam, obs_id: CC_O_20241108_000266, exposure_id: 2024110800266,
         group_id: "2024-11-09T06:33:55.311", visit_id: 3110636353110000, day_obs: 20241108,
         seq_num: 266, physical_filter: g_01, exposure_time: 30.0, mjd_begin: 60623.274,
         mjd_end: 60623.2744, observation_type: science, ra: 53.31, dec: -27.99, rotation: 102.8}

Without ``plan.yaml``, a simulator night's ``night.json`` (`apbatch.sim.night.NightPlan`) is
used: each exposure's header is built as the simulator writes it and translated. Without
either, the raws under ``DIR`` (``*.fits``, e.g. a distributor directory or
the simulator's output) are read instead, one header per image name. Either way the output
RUN ``<instrument>/prompt/<day_obs>`` of every day seen is created too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..errors import BadInputError

__all__ = ["create", "ingest", "load_night_plan", "register"]

log = logging.getLogger(__name__)

_RAW_NAME = re.compile(r"^(?P<obs_id>[A-Z]{2}_[A-Z]_\d{8}_\d{6})_")


def _butler(root: str | Path):
    from lsst.daf.butler import Butler  # noqa: PLC0415 (1 s import: only when needed)

    if not (Path(root) / "butler.yaml").exists():
        raise BadInputError("ROOT", f"{root} is not a butler repository", "run apbatch repo create first")
    return Butler.from_config(str(root), writeable=True)


def create(root: str | Path, db_url: str | None = None) -> dict[str, Any]:
    """Create an empty repository (see `apbatch.butler.repo.create_repo`); returns a summary."""
    from lsst.daf.butler.direct_butler import DirectButler  # noqa: PLC0415

    from ..butler.repo import create_repo  # noqa: PLC0415

    butler = create_repo(root, db_url)
    if not isinstance(butler, DirectButler):  # a repository on a local root always gives one
        raise TypeError(f"{root}: expected a DirectButler, got {type(butler).__name__}")
    return {
        "root": str(root),
        "registry": str(butler._config["registry", "db"]),
        "dataset_types": sorted(dt.name for dt in butler.registry.queryDatasetTypes()),
    }


def load_night_plan(directory: str | Path) -> list[dict[str, Any]]:
    """Exposures of a night: ``plan.yaml`` if present, else one raw header per image name.

    Raises
    ------
    BadInputError
        Raised if the directory does not exist, the plan is malformed, or there is nothing in it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BadInputError("--night", f"{directory} is not a directory", "give the night's directory")
    plan = directory / "plan.yaml"
    if plan.exists():
        try:
            data = yaml.safe_load(plan.read_text())
        except yaml.YAMLError as exc:
            raise BadInputError(str(plan), f"not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("exposures"), list):
            raise BadInputError(f"{plan}: exposures", "missing or not a list", "see apbatch.script.repo")
        exposures = data["exposures"]
    elif (directory / "night.json").exists():
        exposures = _sim_night(directory / "night.json")
    else:
        from ..raw import read_raw_header, translate_header  # noqa: PLC0415

        seen: dict[str, Path] = {}
        for path in sorted(directory.rglob("*.fits")):
            m = _RAW_NAME.match(path.name)
            key = m["obs_id"] if m else str(path)
            seen.setdefault(key, path)
        exposures = [dataclasses.asdict(translate_header(read_raw_header(p))) for p in seen.values()]
    if not exposures:
        raise BadInputError("--night", f"no exposures in {directory}", "give plan.yaml or raw files")
    return exposures


def _sim_night(path: Path) -> list[dict[str, Any]]:
    """Exposures of a simulated night, translated from the headers the simulator writes."""
    from ..raw import translate_header  # noqa: PLC0415
    from ..sim.night import NightPlan  # noqa: PLC0415
    from ..sim.raws import primary_header  # noqa: PLC0415

    plan = NightPlan.load(path)
    specs = list(plan.calibrations) + [e for v in plan.visits if not v.canceled for e in v.exposures]
    return [dataclasses.asdict(translate_header(primary_header(s, plan.detectors[0]))) for s in specs]


def register(
    root: str | Path, instrument: str, night: str | Path | None = None, day_obs: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Register an instrument (and optionally a night's exposures and output runs), once.

    Parameters
    ----------
    root : `str` or `Path`
        Repository.
    instrument : `str`
        Instrument to register (``LSSTComCam``...).
    night : `str` or `Path`, optional
        Night directory (see module docstring).
    day_obs : `tuple` [`int`]
        Extra observing days whose output RUN to create.

    Raises
    ------
    BadInputError
        Raised if the repository, instrument or night is invalid, or the night holds another
        instrument's exposures.
    """
    from ..butler.repo import register_exposures, register_instrument, register_output_run  # noqa: PLC0415

    butler = _butler(root)
    name = register_instrument(butler, instrument)
    exposures = load_night_plan(night) if night is not None else []
    others = sorted({str(e.get("instrument")) for e in exposures} - {name})
    if others:
        raise BadInputError(
            "--night",
            f"holds exposures of {', '.join(map(str, others))}, not {name}",
            "register each instrument with its own night",
        )
    n = register_exposures(butler, exposures) if exposures else 0
    days = sorted({int(e["day_obs"]) for e in exposures} | {int(d) for d in day_obs})
    runs = [register_output_run(butler, name, d) for d in days]
    return {"instrument": name, "exposures": n, "runs": runs}


def ingest(
    root: str | Path,
    calibs: str | Path | None = None,
    templates: str | Path | None = None,
    transfer: str = "copy",
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Ingest the calibrations and/or templates listed in each directory's ``manifest.yaml``.

    ``progress(message)`` is called once per directory ingested.

    Raises
    ------
    BadInputError
        Raised if neither directory is given or a manifest is invalid (nothing is ingested
        from an invalid manifest).
    """
    from ..butler.ingest import ingest_manifest  # noqa: PLC0415

    if calibs is None and templates is None:
        raise BadInputError("--calibs/--templates", "nothing to ingest", "give at least one directory")
    butler = _butler(root)
    out = {}
    for label, directory in (("calibs", calibs), ("templates", templates)):
        if directory is not None:
            out[label] = ingest_manifest(butler, directory, transfer=transfer)
            if progress:
                progress(f"{label}: {out[label]} file(s)")
    return out
