"""The embargo: jobs write their outputs to the embargo repository; after ``embargo.period_hours``
they are released to the public ("prompt") repository, whose images are kept ``cache_days``.

Release
-------
Every output dataset (``preliminary_visit_image``, ``difference_image``, ``dia_source_detector``,
``ap_metrics``, ``calib_verification``) of the embargo repository whose visit (or, for
``calib_verification``, exposure) ended more than the embargo period before ``now`` is
transferred, with its dimension records, into the same RUN collection of the prompt repository
(`lsst.daf.butler.Butler.transfer_from`, files copied, same dataset ids). One visit (or
exposure) is one transaction: a release killed midway leaves every visit either wholly
released or not at all, and a rerun transfers only what is missing (a dataset whose id is
already in the prompt repository is skipped), so two runs never duplicate and never lose.
A CCD whose job was rerun after its outputs were released (``night reprocess``) has new
datasets with the same data IDs: the next release replaces the released ones by them.

Each pass can start where the last one ended (a `ReleaseMark`): it then looks only at the
datasets of visits that ended after the last pass's cutoff, or that were ingested (``ingest_date``,
the registry's wall clock) after the last pass began, both less a ``margin`` for clock skew and
transactions in flight. Everything older was released by that pass, so the query stays the size
of what is new instead of growing with every night kept. Without a mark (or with ``--full``) the
pass looks at every output dataset; the mark is only ever an optimisation.

CCDs that had no template have a calibrated image but no difference image; they are released
like the others, and the summary gives, per visit, the CCDs released and how many of them had
a difference image.

Purge
-----
`purge_images` removes the files of the images (``preliminary_visit_image``,
``difference_image``) whose visit ended more than ``cache_days`` before ``now`` from the prompt
repository; catalogs and metrics stay. The registry entries stay too (``unstore`` without
``purge``, so `Butler.stored` is `False` for them): the release skips a dataset already
registered, so a purged image is never brought back from the embargo repository.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from astropy.time import Time
from lsst.daf.butler import (
    Butler,
    CollectionType,
    DatasetRef,
    MissingCollectionError,
    MissingDatasetTypeError,
)

from ..butler import datasets as ds

__all__ = [
    "IMAGE_TYPES",
    "OUTPUT_TYPES",
    "Batch",
    "ReleaseMark",
    "ReleaseSummary",
    "VisitRelease",
    "collect",
    "purge_images",
    "release",
]

log = logging.getLogger(__name__)

OUTPUT_TYPES = (ds.CALEXP, ds.DIFFIM, ds.DIA_SOURCES, ds.METRICS, ds.CALIB_VERIFICATION)
"""Dataset types the jobs write, hence released."""
IMAGE_TYPES = (ds.CALEXP, ds.DIFFIM)
"""Dataset types whose files the prompt repository keeps only ``cache_days``."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """The output datasets of one visit (or calibration exposure): released in one transaction.

    Attributes
    ----------
    element : `str`
        ``visit`` or ``exposure``.
    instrument : `str`
        Butler instrument name.
    id : `int`
        Visit or exposure id.
    end : `astropy.time.Time`
        When the visit (exposure) ended: the end of its timespan.
    refs : `tuple` [`DatasetRef`]
        Its datasets in the embargo repository.
    """

    element: str
    instrument: str
    id: int
    end: Time
    refs: tuple[DatasetRef, ...]


@dataclasses.dataclass(frozen=True)
class ReleaseMark:
    """Where a completed release pass got to; the next pass need look only past it.

    Attributes
    ----------
    cutoff : `astropy.time.Time`
        Visits (exposures) that ended before this were released by the pass.
    started : `astropy.time.Time`
        When the pass began, by the system clock: datasets ingested since may be new (a CCD rerun
        after its release), whatever their visit's time.
    """

    cutoff: Time
    started: Time

    def as_dict(self) -> dict[str, str]:
        """ISO strings (cutoff TAI, started UTC) for a JSON file."""
        return {"cutoff_tai": self.cutoff.tai.isot, "started_utc": self.started.utc.isot}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> ReleaseMark:
        """Inverse of `as_dict`."""
        return cls(Time(d["cutoff_tai"], scale="tai"), Time(d["started_utc"], scale="utc"))


@dataclasses.dataclass(frozen=True)
class VisitRelease:
    """What one release did for one visit (or calibration exposure)."""

    element: str
    instrument: str
    id: int
    end: str
    """ISO time (UTC) the visit ended."""
    datasets: int
    """Datasets transferred."""
    ccds: int
    """CCDs with at least one dataset transferred."""
    ccds_with_diffim: int
    """Of those, CCDs with a difference image transferred (the others had no template)."""


@dataclasses.dataclass
class ReleaseSummary:
    """Result of `release`: counts, and one `VisitRelease` per visit transferred."""

    now: str
    cutoff: str
    """Visits that ended before this (UTC ISO) are released."""
    dry_run: bool
    released: int = 0
    """Datasets transferred (or, in a dry run, that would be)."""
    already_public: int = 0
    """Datasets past the embargo that the prompt repository already had."""
    embargoed: int = 0
    """Datasets still under embargo."""
    replaced: int = 0
    """Released datasets replaced by a later attempt of their CCD's job (rerun after the release)."""
    visits: list[VisitRelease] = dataclasses.field(default_factory=list)
    since: dict[str, str] | None = None
    """The `ReleaseMark` the pass started from (`ReleaseMark.as_dict`); `None`: every dataset looked at."""
    mark: dict[str, str] | None = None
    """Where this pass got to, for the next one (`None` for a dry run)."""

    def as_dict(self) -> dict[str, Any]:
        """Plain types, for JSON and printing."""
        return dataclasses.asdict(self)


def _utc(now: datetime.datetime) -> Time:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return Time(now.astimezone(datetime.UTC).replace(tzinfo=None), scale="utc")


def _iso(t: Time) -> str:
    return t.utc.isot[:19] + "Z"


def _output_runs(butler: Butler) -> list[str]:
    return sorted(butler.collections.query("*", collection_types={CollectionType.RUN}))


def _since(element: str, mark: ReleaseMark | None, margin: datetime.timedelta) -> str:
    """The query's ``where``: datasets that can be new since ``mark`` (empty: all)."""
    if mark is None:
        return ""
    ended = (mark.cutoff - margin).tai.isot
    ingested = (mark.started - margin).utc.isot
    return f"{element}.timespan.end > T'{ended}/tai' OR ingest_date > T'{ingested}/utc'"


def collect(butler: Butler, since: ReleaseMark | None = None,
            margin: datetime.timedelta = datetime.timedelta(minutes=10)) -> list[Batch]:
    """The output datasets of ``butler`` grouped by visit or exposure, oldest first.

    Parameters
    ----------
    butler : `Butler`
        The embargo repository.
    since : `ReleaseMark`, optional
        Only datasets whose visit ended after ``since.cutoff`` or that were ingested after
        ``since.started`` (each less ``margin``); default: all.
    margin : `datetime.timedelta`
        Allowance for clock skew between this host and the registry, and for datasets whose
        transaction was in flight when the last pass queried.

    Returns
    -------
    batches : `list` [`Batch`]
        One per visit (or exposure) with output datasets, sorted by end time.
    """
    runs = _output_runs(butler)
    groups: dict[tuple[str, str, int], list[DatasetRef]] = defaultdict(list)
    ends: dict[tuple[str, str, int], Time] = {}
    if not runs:
        return []
    for name in OUTPUT_TYPES:
        where = _since("exposure" if name == ds.CALIB_VERIFICATION else "visit", since, margin)
        try:
            refs = butler.query_datasets(name, collections=runs, find_first=False, where=where,
                                         with_dimension_records=True, limit=None, explain=False)
        except MissingDatasetTypeError:  # a repository older than the dataset type
            continue
        for ref in refs:
            element = "visit" if "visit" in ref.dataId.dimensions.names else "exposure"
            key = (element, str(ref.dataId["instrument"]), int(ref.dataId[element]))
            record = ref.dataId.records[element]
            if record is None or record.timespan is None or record.timespan.end is None:
                log.warning("%s %s has no end time: kept under embargo", element, key[2])
                continue
            groups[key].append(ref)
            ends[key] = record.timespan.end
    return sorted(
        (Batch(k[0], k[1], k[2], ends[k], tuple(v)) for k, v in groups.items()),
        key=lambda b: (b.end.tai.mjd, b.element, b.id),
    )


def _describe(batch: Batch, refs: list[DatasetRef]) -> VisitRelease:
    ccds = {int(r.dataId["detector"]) for r in refs}
    diffim = {int(r.dataId["detector"]) for r in refs if r.datasetType.name == ds.DIFFIM}
    return VisitRelease(batch.element, batch.instrument, batch.id, _iso(batch.end), len(refs), len(ccds),
                        len(diffim))


def _superseded(prompt: Butler, batch: Batch, refs: list[DatasetRef]) -> list[DatasetRef]:
    """Datasets of ``prompt`` in the run and with the data ID of one of ``refs``, but another id:
    what an earlier attempt of a CCD's job put, when the job was rerun after the release."""
    wanted = {(r.datasetType.name, r.run, r.dataId.required_values): r.id for r in refs}
    old: list[DatasetRef] = []
    for name, run in sorted({(r.datasetType.name, r.run) for r in refs}):
        try:
            found = prompt.query_datasets(name, collections=run, data_id={"instrument": batch.instrument,
                                                                          batch.element: batch.id},
                                          limit=None, explain=False)
        except (MissingCollectionError, MissingDatasetTypeError):
            continue
        old += [f for f in found if wanted.get((name, run, f.dataId.required_values), f.id) != f.id]
    return old


def release(
    embargo: Butler,
    prompt: Butler,
    now: datetime.datetime,
    period_hours: float,
    *,
    dry_run: bool = False,
    after_batch: Callable[[VisitRelease], None] | None = None,
    since: ReleaseMark | None = None,
    margin: datetime.timedelta = datetime.timedelta(minutes=10),
) -> ReleaseSummary:
    """Transfer the output datasets whose embargo has ended from ``embargo`` to ``prompt``.

    Parameters
    ----------
    embargo : `Butler`
        Where the jobs write.
    prompt : `Butler`
        The public repository (writeable).
    now : `datetime.datetime`
        The current time (timezone-aware); injected so that tests and replays choose it.
    period_hours : `float`
        The embargo: a visit is released once it ended this long before ``now``.
    dry_run : `bool`
        Count what would be transferred; change nothing.
    after_batch : callable, optional
        Called with each visit's `VisitRelease` once its transaction committed (progress).
    since : `ReleaseMark`, optional
        Where the last completed pass got to (its ``summary.mark``): look only past it.
    margin : `datetime.timedelta`
        See `collect`.

    Returns
    -------
    summary : `ReleaseSummary`
        With ``mark``, the `ReleaseMark` of this pass (dict form) for the next.
    """
    started = Time.now()
    t_now = _utc(now)
    cutoff = t_now - datetime.timedelta(hours=period_hours)
    summary = ReleaseSummary(now=_iso(t_now), cutoff=_iso(cutoff), dry_run=dry_run,
                             since=since.as_dict() if since is not None else None)
    if since is not None and since.cutoff > cutoff:  # a clock set back: keep the later cutoff
        cutoff_mark = since.cutoff
    else:
        cutoff_mark = cutoff
    for batch in collect(embargo, since, margin):
        if batch.end > cutoff:
            summary.embargoed += len(batch.refs)
            continue
        present = {r.id for r in prompt.get_many_datasets([r.id for r in batch.refs])}
        todo = [r for r in batch.refs if r.id not in present]
        summary.already_public += len(present)
        if not todo:
            continue
        old = _superseded(prompt, batch, todo)
        summary.replaced += len(old)
        if old and not dry_run:
            log.warning("%s %d: replacing %d released dataset(s) by a later attempt's",
                        batch.element, batch.id, len(old))
            prompt.pruneDatasets(old, disassociate=True, unstore=True, purge=True)
        if not dry_run:
            done = prompt.transfer_from(embargo, todo, transfer="copy", register_dataset_types=True,
                                        transfer_dimensions=True)
            if len(done) != len(todo):
                log.warning("%s %d: %d of %d datasets transferred (files missing in the embargo repo?)",
                            batch.element, batch.id, len(done), len(todo))
            todo = list(done)
        item = _describe(batch, todo)
        summary.released += item.datasets
        summary.visits.append(item)
        log.info("%s %d: released %d dataset(s), %d CCD(s), %d with a difference image",
                 batch.element, batch.id, item.datasets, item.ccds, item.ccds_with_diffim)
        if after_batch is not None:
            after_batch(item)
    if not dry_run:
        summary.mark = ReleaseMark(cutoff_mark, started).as_dict()
    return summary


def purge_images(prompt: Butler, now: datetime.datetime, cache_days: float, *, dry_run: bool = False,
                 types: Iterable[str] = IMAGE_TYPES) -> int:
    """Remove the files of the images whose visit ended more than ``cache_days`` before ``now``.

    The registry entries stay (see the module docstring); images already removed are not
    counted again.

    Parameters
    ----------
    prompt : `Butler`
        The public repository (writeable).
    now : `datetime.datetime`
        The current time (timezone-aware).
    cache_days : `float`
        How long the prompt repository keeps images.
    dry_run : `bool`
        Count only.
    types : iterable of `str`
        Dataset types to purge (images only, by default).

    Returns
    -------
    n : `int`
        Images removed (or, in a dry run, that would be).
    """
    cutoff = _utc(now) - datetime.timedelta(days=cache_days)
    runs = _output_runs(prompt)
    old: list[DatasetRef] = []
    for name in types if runs else ():
        try:
            refs = prompt.query_datasets(name, collections=runs, find_first=False,
                                         with_dimension_records=True, limit=None, explain=False)
        except MissingDatasetTypeError:
            continue
        for ref in refs:
            record = ref.dataId.records["visit"]
            if record is not None and record.timespan is not None and record.timespan.end < cutoff:
                old.append(ref)
    stored = [ref for ref, here in prompt.stored_many(old).items() if here]
    if stored and not dry_run:
        prompt.pruneDatasets(stored, disassociate=False, unstore=True, purge=False)
        log.info("purged %d image(s) whose visit ended before %s", len(stored), _iso(cutoff))
    return len(stored)
