"""The OCPS pipelines, registered by name, and how a dataId becomes per-CCD work.

=================  ==========================  ===============================================
name               dataId                      what runs
=================  ==========================  ===============================================
``ap``             obsid or group_id           ``process-ccd`` for each CCD, as a science job
                   (+ detector)                (``ocps.associate`` false by default: no APDB
                                               association, no alerts)
``calib-verify``   obsid or group_id           ``process-ccd`` with the exposure's intent
                   (+ detector)                (bias/dark/flat...); results: the verdicts
``gather``         group_id                    no batch job: the group's ``ap_metrics`` read
                                               from the butler, a JSON summary and a focal-plane
                                               PNG (`apbatch.ocps.gather`)
=================  ==========================  ===============================================

A dataId is resolved (:class:`ExposureLookup`) from the butler registry's exposure records if
the exposures were registered or ingested, else from the obsid alone
(`apbatch.ids.parse_obs_id`): no pointing nor filter, the job reads them from the raw headers,
or, if the raw never arrives, fails (exit 3 after ``job.raw_timeout``). A request is never
held back waiting for its data.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from ..ids import parse_obs_id, visit_id_from_group
from ..instruments import get_instrument, normalize_instrument
from ..work import CcdWork
from .model import DataId

__all__ = ["FIXED_KEYS", "PIPELINES", "Exposure", "ExposureLookup", "Pipeline", "check_data_id",
           "exposure_from_obsid", "get_pipeline", "plan_works", "request_config", "results_of"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A registered pipeline: what its dataId needs and whether it runs batch jobs."""

    name: str
    batch: bool
    """`True`: per-CCD batch jobs; `False`: runs in the runner thread (``gather``)."""
    needs_group: bool = False
    """The dataId must give ``group_id``."""
    intent: str | None = None
    """The jobs' intent: ``science`` (``ap``), or `None`: the exposure's own (``calib-verify``)."""


PIPELINES: dict[str, Pipeline] = {
    "ap": Pipeline("ap", batch=True, intent="science"),
    "calib-verify": Pipeline("calib-verify", batch=True, intent=None),
    "gather": Pipeline("gather", batch=False, needs_group=True),
}


def get_pipeline(name: str) -> Pipeline:
    """The pipeline called ``name``.

    Raises
    ------
    BadInputError
        Raised, naming ``pipeline``, if there is none.
    """
    try:
        return PIPELINES[name]
    except KeyError:
        raise BadInputError("pipeline", f"unknown pipeline {name!r}",
                            f"use one of {', '.join(PIPELINES)}") from None


def check_data_id(pipeline: Pipeline, data_id: DataId) -> DataId:
    """``data_id`` with its instrument normalized, if ``pipeline`` can run on it.

    Raises
    ------
    BadInputError
        Raised, naming the field, for an unknown instrument or detector, a malformed obsid,
        or a missing obsid/group_id.
    """
    inst = normalize_instrument(data_id.instrument, field="instrument")
    if data_id.obsid is not None:
        parse_obs_id(data_id.obsid, field="obsid")
    if data_id.detector is not None:
        det = get_instrument(inst).detector(data_id.detector, field="detector")
        if not det.is_science:
            raise BadInputError("detector", f"{det.name} ({det.id}) is not a science CCD",
                                "name a science CCD")
    if pipeline.needs_group and not data_id.group_id:
        raise BadInputError("group_id", f"the {pipeline.name} pipeline needs a group id", "give groupId")
    if not data_id.obsid and not data_id.group_id:
        raise BadInputError("obsid", "neither an obsid nor a group id given", "give obsid or groupId")
    return dataclasses.replace(data_id, instrument=inst)


@dataclasses.dataclass(frozen=True)
class Exposure:
    """What the jobs of one exposure need to know (from its registry record, or its obsid only)."""

    instrument: str
    obs_id: str
    exposure_id: int
    group_id: str
    visit: int
    day_obs: int
    observation_type: str | None
    exposure_time: float | None
    physical_filter: str | None = None
    ra: float | None = None
    dec: float | None = None
    rotation: float | None = None
    detectors: tuple[int, ...] = ()
    """Detectors with a raw in the repository (empty: none ingested yet)."""


def _visit_of(group: str, exposure_id: int) -> int:
    try:
        return visit_id_from_group(group)
    except BadInputError:
        return exposure_id  # a group id that is not a time: the exposure is its own visit


class ExposureLookup:
    """Finds exposures and metrics in the butler registry, opened on first use and kept.

    Parameters
    ----------
    repo : path
        The butler repository (``job.repo``).

    Notes
    -----
    Lifetime: the runner's. Thread-safe (one lock around the butler).
    """

    def __init__(self, repo: str | Path):
        self.repo = Path(repo)
        self._butler: Any = None
        self._lock = threading.Lock()

    def butler(self) -> Any:
        """The butler (`None` if there is no repository); writes only RUN collections."""
        if self._butler is None and (self.repo / "butler.yaml").is_file():
            from lsst.daf.butler import Butler

            self._butler = Butler.from_config(str(self.repo), writeable=True)
        return self._butler

    def register_run(self, run: str) -> None:
        """Create the RUN collection ``run`` (idempotent) before jobs write into it."""
        with self._lock:
            butler = self.butler()
            if butler is not None:
                from lsst.daf.butler import CollectionType

                butler.collections.register(run, CollectionType.RUN)

    def find(self, data_id: DataId) -> list[Exposure]:
        """The registered exposures of ``data_id`` (by obsid, else every one of its group)."""
        with self._lock:
            butler = self.butler()
            if butler is None:
                return []
            bind: dict[str, Any]
            if data_id.obsid:
                where, bind = "exposure.obs_id = obs", {"obs": data_id.obsid}
            else:
                where, bind = "exposure.group = grp", {"grp": data_id.group_id}
            try:
                butler.registry.refresh()
                recs = list(butler.query_dimension_records("exposure", instrument=data_id.instrument,
                                                           where=where, bind=bind, explain=False))
            except Exception as exc:  # no such instrument registered: nothing known
                _log.info("no exposure record for %s: %s", data_id, exc)
                return []
            out = []
            for r in sorted(recs, key=lambda r: r.id):
                dets: tuple[int, ...] = ()
                try:
                    refs = butler.query_datasets("raw", collections=f"{data_id.instrument}/raw/all",
                                                 instrument=data_id.instrument, exposure=r.id, explain=False)
                    dets = tuple(sorted({int(x.dataId["detector"]) for x in refs}))
                except Exception:  # no raw collection yet
                    dets = ()
                out.append(Exposure(
                    instrument=data_id.instrument, obs_id=r.obs_id, exposure_id=int(r.id), group_id=r.group,
                    visit=_visit_of(r.group, int(r.id)), day_obs=int(r.day_obs),
                    observation_type=r.observation_type, exposure_time=r.exposure_time,
                    physical_filter=r.physical_filter, ra=r.tracking_ra, dec=r.tracking_dec,
                    rotation=r.sky_angle, detectors=dets))
            return out

    def close(self) -> None:
        """Release the butler."""
        with self._lock:
            if self._butler is not None:
                self._butler.close()
                self._butler = None


def exposure_from_obsid(instrument: str, obsid: str) -> Exposure:
    """What the obsid alone tells (an image never registered): no pointing, filter or type."""
    o = parse_obs_id(obsid, field="obsid")
    return Exposure(instrument=instrument, obs_id=obsid, exposure_id=o.exposure_id, group_id=obsid,
                    visit=o.exposure_id, day_obs=o.day_obs, observation_type=None, exposure_time=None)


def _intent(pipeline: Pipeline, exp: Exposure) -> str:
    if pipeline.intent is not None:
        return pipeline.intent
    from ..events import CALIBRATION_INTENTS, intent_of

    intent = intent_of(exp.observation_type)
    if intent not in CALIBRATION_INTENTS:
        raise BadInputError("obsid", f"{exp.obs_id} is a {exp.observation_type or 'unknown'} exposure, "
                            "not a calibration", "calib-verify takes bias, dark, flat or cbp exposures")
    return intent


def plan_works(pipeline: Pipeline, data_id: DataId, exposures: Sequence[Exposure], *, distributor: str,
               default_detectors: Sequence[int] = (), default_exposure_time: float = 30.0) -> list[CcdWork]:
    """The per-CCD work of a request: one `CcdWork` per detector of its group.

    ``exposures``: those found (:meth:`ExposureLookup.find`), or, for an obsid never
    registered, `exposure_from_obsid` (a group id never registered is an error). The snaps of
    one group are one job per detector (``image_names`` lists them).

    Raises
    ------
    BadInputError
        Raised if nothing is known of a group id, or calib-verify is asked for a science
        exposure (or one whose type is unknown).
    """
    if not exposures:
        if not data_id.obsid:
            raise BadInputError("group_id", f"no exposure of group {data_id.group_id} is registered",
                                "ingest or register the group's raws first")
        exposures = [exposure_from_obsid(data_id.instrument, data_id.obsid)]
    inst = get_instrument(data_id.instrument)
    groups: dict[str, list[Exposure]] = {}
    for e in exposures:
        groups.setdefault(e.group_id, []).append(e)
    works = []
    for snaps in groups.values():
        first = snaps[0]
        intent = _intent(pipeline, first)
        if data_id.detector is not None:
            dets = [data_id.detector]
        else:
            dets = sorted({d for e in snaps for d in e.detectors}) or list(default_detectors) or [
                d.id for d in inst.science_detectors]
        for d in dets:
            det = inst.detector(d)
            works.append(CcdWork(
                instrument=data_id.instrument, detector=det.id, detector_name=det.name,
                group_id=first.group_id, visit=first.visit, day_obs=first.day_obs, intent=intent,
                exposure_time=float(first.exposure_time if first.exposure_time is not None
                                    else default_exposure_time),
                nimages=len(snaps), distributor=distributor, ra=first.ra, dec=first.dec,
                rotation=first.rotation,
                physical_filter=first.physical_filter if intent == "science" else None,
                image_names=tuple(e.obs_id for e in snaps)))
    return works


def results_of(pipeline: Pipeline, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The UWS results of a batch pipeline from its CCD records (ledger rows as dicts)."""
    ccds = {str(r["detector_name"]): {"state": r.get("state"), "exit_code": r.get("exit_code"),
                                      "job_id": r.get("job_id")} for r in rows}
    out: dict[str, Any] = {"ccds": ccds}
    if pipeline.name == "calib-verify":
        out["verification"] = {str(r["detector_name"]): r.get("verification") for r in rows}
    return out


FIXED_KEYS = frozenset({"root", "ledger", "backend.kind", "backend.log_dir", "job.command", "job.env",
                        "job.config_dir", "job.repo", "job.distributor", "kafka", "monitoring", "ocps"})
"""Config keys (or whole sections) a request may not override: the runner must find its jobs where
it put them, and a request never chooses what a job runs nor where its secrets go."""


def _fixed(key: str) -> bool:
    return key in FIXED_KEYS or key.split(".")[0] in FIXED_KEYS


def _nested(overrides: Mapping[str, str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for key, text in overrides.items():
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts) or _fixed(key):
            why = "is fixed by the service" if _fixed(key) else "is not of the form section.field"
            raise BadInputError(f"overrides.{key}", why, "override job.*, calib_verify.*, apdb.* ... fields")
        try:
            value = yaml.safe_load(text) if isinstance(text, str) else text
        except yaml.YAMLError:
            value = text
        cur = out
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise BadInputError(f"overrides.{key}", "conflicts with another override",
                                    "give each key once")
        cur[parts[-1]] = value
    return out


def request_config(base: Any, overrides: Mapping[str, str] = {}, config_file: str | None = None) -> Any:
    """The configuration a request's jobs get: ``base`` with the OCPS settings, then the request's.

    The OCPS ledger (``ocps.ledger_url``), output run (``ocps.output_run``) and association
    switch (``ocps.associate``) replace the prompt-processing ones; the request's config file
    and overrides come last (`FIXED_KEYS` excepted).

    Raises
    ------
    BadInputError
        Raised, naming ``overrides.<key>`` or ``config_file``, for an unknown key, a bad value
        or an unreadable file.
    """
    from pydantic import ValidationError

    from ..config import ApbatchConfig
    from ..config_sources import deep_merge, read_yaml

    data = base.model_dump(mode="json")
    data["ledger"]["url"] = base.sqlalchemy_url(base.ocps.ledger_url)
    data["job"]["output_run"] = base.ocps.output_run
    data["job"]["associate"] = base.ocps.associate
    extra: dict[str, Any] = {}
    if config_file:
        try:
            extra = read_yaml(config_file)
        except BadInputError as exc:
            raise BadInputError("config_file", exc.problem, exc.fix) from None
        for section, values in extra.items():
            for name in values if isinstance(values, dict) else [""]:
                key = f"{section}.{name}" if name else section
                if _fixed(key):
                    raise BadInputError(f"config_file {key}", "is fixed by the service",
                                        "remove it from the file")
    extra = deep_merge(extra, _nested(overrides))
    try:
        return ApbatchConfig.model_validate(deep_merge(data, extra))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        where = f"config_file {field}" if config_file and field not in overrides else f"overrides.{field}"
        raise BadInputError(where, " ".join(str(err["msg"]).split()), "fix or remove that override") from None
