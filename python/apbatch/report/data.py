"""Gathering a night for the HTML report: ledger rows, job metrics, alert files. No drawing.

Everything returned is a plain dataclass or dict, so the page and the plots can be tested
without a ledger, a butler or alert files, and the gathering without drawing.

Sources:

* the ledger (`apbatch.ledger.Ledger.rows`): one `apbatch.submission.Submission` per CCD --
  state, exit code, job id, the visit's pointing (``work.ra/dec/rotation``) and the stage
  marks the job wrote (`apbatch.latency`);
* the butler's ``ap_metrics`` datasets (`apbatch.butler.datasets.METRICS`, the job's
  `apbatch.job.task.CcdResult`): status (``no_template`` when the job kept the calibrated
  image only), DIA source count, per-step ``timings`` (wall, cpu, maxrss_mib);
* the alert files (``alerts.directory``, ``<instrument>/<visit>/<detector>.avro``): alerts per
  visit and the brightest new ones (a DIAObject with one DIASource) with their cutouts;
* `apbatch.script.night.night_report`: the text report's numbers, reused as they are.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import make_backend
from ..backends.base import Backend
from ..config import ApbatchConfig
from ..latency import intervals_of
from ..ledger import Ledger
from ..night import night_rows
from ..states import SubmissionState
from ..submission import Submission

if TYPE_CHECKING:
    from .footprint import NightFootprint

__all__ = ["AlertSummary", "CcdInfo", "Failure", "GalleryAlert", "MetricsKey", "NightData", "VisitInfo",
           "butler_metrics", "gather_night", "job_log_path", "read_alerts"]

log = logging.getLogger(__name__)

MetricsKey = tuple[str, int, int]
"""(instrument, visit, detector id)."""


@dataclasses.dataclass
class CcdInfo:
    """One CCD of one visit: its ledger row and, if the job wrote them, its metrics."""

    detector: int
    detector_name: str
    state: str
    exit_code: int | None = None
    reason: str = ""
    job_id: str | None = None
    attempts: int = 0
    intervals: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per `apbatch.latency.INTERVALS` entry the job has both marks of."""
    status: str | None = None
    """The job's own status (``ap_metrics``), e.g. ``no_template``; `None` without metrics."""
    n_dia: int | None = None
    timings: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    template: str | None = None
    """What the job said about its template (``ap_metrics`` ``prepare.templates``)."""
    no_template: str | None = None
    """Why the job ran without a template (``prepare.no_template``), if it did."""
    log_path: str | None = None

    @property
    def latency(self) -> float | None:
        """Raw available -> alerts sent, seconds (`None` if the job did not get that far)."""
        return self.intervals.get("raw_to_alerts")

    @property
    def has_template(self) -> bool | None:
        """`False` if the job ran without a template, `True` if it made a difference image, else `None`."""
        if self.status == "no_template":
            return False
        return True if self.status is not None and self.n_dia is not None else None


@dataclasses.dataclass
class VisitInfo:
    """One visit (or calibration exposure) of the night, its CCDs in detector order."""

    instrument: str
    group_id: str
    visit: int
    intent: str
    physical_filter: str | None
    ra: float | None
    dec: float | None
    rotation: float | None
    ccds: list[CcdInfo]
    n_alerts: int = 0


@dataclasses.dataclass(frozen=True)
class Failure:
    """A CCD whose job did not complete: what the operator needs to find its log."""

    group_id: str
    visit: int
    detector_name: str
    state: str
    exit_code: int | None
    reason: str
    job_id: str | None
    log_path: str | None


@dataclasses.dataclass(frozen=True)
class GalleryAlert:
    """A new alert (its DIAObject has one DIASource) with its cutouts as FITS bytes."""

    dia_source_id: int
    visit: int
    detector: int
    band: str
    ra: float
    dec: float
    psf_flux: float
    snr: float | None
    cutouts: Mapping[str, bytes | None]
    """``science``, ``template``, ``difference`` -> FITS bytes (or `None` if absent)."""


@dataclasses.dataclass
class AlertSummary:
    """What the alert files hold: counts per visit and per CCD-visit, the gallery."""

    files: int = 0
    per_visit: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    per_ccd: dict[MetricsKey, int] = dataclasses.field(default_factory=dict)
    gallery: list[GalleryAlert] = dataclasses.field(default_factory=list)
    unreadable: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NightData:
    """Everything the HTML report shows about one night."""

    day_obs: int
    summary: dict[str, Any]
    """`apbatch.script.night.night_report` as it is."""
    visits: list[VisitInfo]
    failures: list[Failure]
    alerts: AlertSummary
    notes: list[str] = dataclasses.field(default_factory=list)
    """What could not be read (no butler repository, unreadable alert files...)."""
    footprint: NightFootprint | None = None
    """The sky the night covered (`apbatch.report.footprint`)."""

    @property
    def ccds(self) -> list[CcdInfo]:
        """Every CCD of the night."""
        return [c for v in self.visits for c in v.ccds]

    def stage_values(self) -> dict[str, list[float]]:
        """Per latency interval, the seconds of every science CCD that has it."""
        out: dict[str, list[float]] = collections.defaultdict(list)
        for v in self.visits:
            if v.intent != "science":
                continue
            for c in v.ccds:
                for name, sec in c.intervals.items():
                    out[name].append(sec)
        return dict(out)


def job_log_path(config: ApbatchConfig, row: Submission, backend: Backend | None = None) -> str | None:
    """Where the job of ``row`` wrote its log, if it ran on the configured backend.

    The backend says (`apbatch.backends.base.Backend.log_path`: local
    ``<log_dir>/jobs/<job id>/out.log``, Slurm ``<log_dir>/<label>_<array>_<task>.out``, HTCondor
    ``<log_dir>/<label>_<cluster>.<proc>.out``). A row from another backend, or without a job id,
    has none.

    Parameters
    ----------
    backend : `Backend`, optional
        The configured backend (default: made from ``config``; constructors do no I/O).
    """
    if not row.job_id or row.backend != config.backend.kind:
        return None
    if backend is None:
        backend = make_backend(config)
    return backend.log_path(row.job_id, row.work)


def butler_metrics(repo: str | Path, runs: Iterable[tuple[str, int]]) -> dict[MetricsKey, dict]:
    """The ``ap_metrics`` of every CCD in the output runs of (instrument, day_obs), read-only.

    Raises
    ------
    FileNotFoundError
        Raised if ``repo`` is not a butler repository.
    """
    from lsst.daf.butler import Butler, MissingCollectionError

    from ..butler import datasets as ds

    if not (Path(repo) / "butler.yaml").is_file():
        raise FileNotFoundError(f"no butler repository at {repo}")
    butler = Butler.from_config(str(repo), writeable=False)
    out: dict[MetricsKey, dict] = {}
    try:
        for instrument, day_obs in sorted(set(runs)):
            run = ds.output_run(instrument, day_obs)
            try:
                refs = butler.query_datasets(ds.METRICS, collections=run, explain=False,
                                             where=f"instrument = '{instrument}'")
            except MissingCollectionError:
                continue
            for ref in refs:
                out[(instrument, int(ref.dataId["visit"]), int(ref.dataId["detector"]))] = butler.get(ref)
    finally:
        butler.close()
    return out


def _band(src: Mapping[str, Any]) -> str:
    return str(src.get("band") or "?")


def read_alerts(directory: str | Path, gallery_size: int = 12,
                visits: Iterable[tuple[str, int]] | None = None) -> AlertSummary:
    """Count the alerts in ``<directory>/<instrument>/<visit>/<detector>.avro`` and pick the gallery.

    The gallery holds the ``gallery_size`` brightest (``diaSource.psfFlux``) new alerts: those
    whose DIAObject has exactly one DIASource. Only the files of ``visits`` ((instrument, visit)
    pairs) are read, if given.
    """
    import fastavro

    summary = AlertSummary()
    heap: list[tuple[float, int, GalleryAlert]] = []
    root = Path(directory)
    wanted = None if visits is None else set(visits)
    for path in sorted(root.glob("*/*/*.avro")) if root.is_dir() else []:
        instrument, visit_dir = path.parent.parent.name, path.parent.name
        try:
            visit, detector = int(visit_dir), int(path.stem)
            if wanted is not None and (instrument, visit) not in wanted:
                continue
            with path.open("rb") as fh:
                records = list(fastavro.reader(fh))
        except (ValueError, OSError, EOFError, StopIteration) as exc:
            summary.unreadable.append(f"{path}: {exc}")
            continue
        summary.files += 1
        summary.per_visit[(instrument, visit)] = summary.per_visit.get((instrument, visit), 0) + len(records)
        summary.per_ccd[(instrument, visit, detector)] = len(records)
        for rec in records:
            if not isinstance(rec, dict):
                continue
            src, obj = rec.get("diaSource") or {}, rec.get("diaObject")
            if not isinstance(src, dict) or not isinstance(obj, dict) or obj.get("nDiaSources") != 1:
                continue
            flux = src.get("psfFlux")
            if flux is None or flux != flux:
                continue
            item = GalleryAlert(
                dia_source_id=int(rec["diaSourceId"]), visit=visit, detector=detector, band=_band(src),
                ra=float(src.get("ra", float("nan"))), dec=float(src.get("dec", float("nan"))),
                psf_flux=float(flux), snr=None if src.get("snr") is None else float(src["snr"]),
                cutouts={k: rec.get(f"cutout{k.title()}") for k in ("science", "template", "difference")})
            entry = (item.psf_flux, item.dia_source_id, item)
            if len(heap) < gallery_size:
                heapq.heappush(heap, entry)
            elif gallery_size > 0:
                heapq.heappushpop(heap, entry)
    summary.gallery = [e[2] for e in sorted(heap, key=lambda e: (-e[0], e[1]))]
    return summary


_FAILED = frozenset({SubmissionState.FAILED, SubmissionState.TIMEOUT, SubmissionState.CANCELLED,
                     SubmissionState.SUBMIT_FAILED})

MetricsReader = Callable[[Iterable[tuple[str, int]]], Mapping[MetricsKey, dict]]


def _ccd(row: Submission, metrics: Mapping[str, Any] | None, log_path: str | None) -> CcdInfo:
    m = metrics or {}
    prepare = m.get("prepare") or {}
    return CcdInfo(
        detector=row.detector, detector_name=row.detector_name, state=str(row.state),
        exit_code=row.exit_code, reason=row.reason, job_id=row.job_id, attempts=row.attempts,
        intervals=intervals_of(row.stages or m.get("stages") or {}),
        status=m.get("status") if metrics is not None else None,
        n_dia=int(m["n_dia_sources"]) if metrics is not None and "n_dia_sources" in m else None,
        timings=dict(m.get("timings") or {}),
        template=prepare.get("templates") if isinstance(prepare, dict) else None,
        no_template=prepare.get("no_template") if isinstance(prepare, dict) else None,
        log_path=log_path)


def gather_night(config: ApbatchConfig, *, day_obs: int, ledger: Ledger | None = None,
                 metrics: MetricsReader | None = None, alerts_dir: str | Path | None = None,
                 gallery_size: int = 12, summary: dict[str, Any] | None = None) -> NightData:
    """Everything the HTML report shows about the night ``day_obs``.

    Parameters
    ----------
    config : `ApbatchConfig`
        Where the ledger, butler repository, alert files and job logs are.
    day_obs : `int`
        The night, YYYYMMDD.
    ledger : `Ledger`, optional
        Injected for tests (default: the configured one, not created if missing).
    metrics : callable, optional
        ``metrics(runs)`` -> mapping (instrument, visit, detector) -> ``ap_metrics`` dict, for
        ``runs`` = (instrument, day_obs) pairs; default :func:`butler_metrics` on ``job.repo``.
    alerts_dir : path, optional
        The alert files (default ``alerts.directory``).
    gallery_size : `int`
        How many new alerts the gallery shows.
    summary : `dict`, optional
        The night's `apbatch.script.night.night_report` if the caller already has it.

    Returns
    -------
    night : `NightData`
        Visits in ledger claim order, their CCDs by detector id.
    """
    from ..script.night import night_report

    own = ledger is None
    ledger = ledger or Ledger.from_config(config, create=False)
    try:
        rows = night_rows(ledger, day_obs)
        summary = summary if summary is not None else night_report(config, day_obs=day_obs, ledger=ledger)
    finally:
        if own:
            ledger.close()
    notes: list[str] = []
    runs = {(r.instrument, r.work.day_obs) for r in rows}
    repo = config.path(config.job.repo)
    reader: MetricsReader = metrics or (lambda runs: butler_metrics(repo, runs))
    try:
        found: Mapping[MetricsKey, dict] = reader(runs) if rows else {}
    except (FileNotFoundError, OSError) as exc:
        notes.append(f"job metrics not read: {exc}")
        found = {}
    alerts = read_alerts(config.path(config.alerts.directory) if alerts_dir is None else alerts_dir,
                         gallery_size=gallery_size, visits={(r.instrument, r.visit) for r in rows})
    notes += [f"alert file not read: {u}" for u in alerts.unreadable]
    visits: dict[tuple[str, str], VisitInfo] = {}
    failures = []
    backend = make_backend(config)
    for r in rows:
        w = r.work
        v = visits.setdefault((r.instrument, r.group_id), VisitInfo(
            instrument=r.instrument, group_id=r.group_id, visit=r.visit, intent=r.intent,
            physical_filter=w.physical_filter, ra=w.ra, dec=w.dec, rotation=w.rotation, ccds=[],
            n_alerts=alerts.per_visit.get((r.instrument, r.visit), 0)))
        ccd = _ccd(r, found.get((r.instrument, r.visit, r.detector)), job_log_path(config, r, backend))
        if ccd.n_dia is None and (r.instrument, r.visit, r.detector) in alerts.per_ccd and ccd.status is None:
            ccd.n_dia = alerts.per_ccd[(r.instrument, r.visit, r.detector)]  # no metrics: count its alerts
        v.ccds.append(ccd)
        if r.state in _FAILED:
            failures.append(Failure(r.group_id, r.visit, r.detector_name, str(r.state), r.exit_code,
                                    r.reason, r.job_id, ccd.log_path))
    for v in visits.values():
        v.ccds.sort(key=lambda c: c.detector)
    from .footprint import night_footprint, pointings_from_visits

    return NightData(day_obs=day_obs, summary=summary, visits=list(visits.values()), failures=failures,
                     alerts=alerts, notes=notes,
                     footprint=night_footprint(pointings_from_visits(visits.values()), day_obs=day_obs))
