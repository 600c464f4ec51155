"""Create a butler repository and register what jobs need, once, before any job starts.

Without obs_lsst the dimension records are inserted by hand (dimension universe 8):
``instrument``, ``detector`` and ``physical_filter`` per camera (``band`` comes with the
physical filter and cannot be inserted), then per exposure ``day_obs`` (with its timespan),
``group``, ``exposure``, ``visit`` and ``visit_definition``. Many processes registering the
same new records or RUN collections at once fail (FIELD-NOTES), so :func:`register_instrument`,
:func:`register_exposures` and :func:`register_output_run` are meant for ``apbatch repo`` and
the daemon, ahead of the jobs; jobs only fill gaps (`apbatch.butler.io`).

Visits: every on-sky exposure belongs to the visit whose id obs_lsst derives from its group
(``RawMetadata.visit_id``); the visit's exposure time is the sum over its snaps, its
timespan the union, its sky region the convex hull of the science CCDs' corners, and each
science CCD gets a ``visit_detector_region`` record (so spatial queries work, e.g.
``butler query-dimension-records REPO visit_detector_region --where
"visit_detector_region.region OVERLAPS POINT(53.1, -28.1)"``). Calibration exposures
(``observation_type`` bias, dark, flat...) are exposures only, never visits, as in Rubin's
repositories.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from astropy.time import Time
from lsst.daf.butler import Butler, CollectionType, Config, DatasetType, Timespan

from ..errors import BadInputError
from ..instruments import get_instrument
from . import datasets as ds
from .formatters import REPO_CONFIG
from .regions import visit_regions

__all__ = [
    "CALIBRATION_TYPES",
    "create_repo",
    "day_obs_timespan",
    "exposure_records",
    "is_visit",
    "register_dataset_types",
    "register_exposures",
    "register_instrument",
    "register_output_run",
    "visit_records",
]

log = logging.getLogger(__name__)

# Ids are ~3.3e15 (visits) and ~7e12 (simulated exposures); leave headroom, stay in int64.
_ID_MAX = 2**62
_EXTRA_FILTERS = ("none", "unknown")  # what bias/dark frames and header-less raws get
_VISIT_SYSTEM = 1  # obs_lsst: 1 = by-seq-start-end (a group of snaps is one visit)


def create_repo(root: str | Path, db_url: str | None = None) -> Butler:
    """Create an empty repository with apbatch's storage classes, formatters and dataset types.

    Parameters
    ----------
    root : `str` or `Path`
        Repository directory (datastore root and, by default, the SQLite registry).
    db_url : `str`, optional
        SQLAlchemy URL of the registry database, e.g. ``postgresql://user@host/db``
        (the server needs ``CREATE EXTENSION btree_gist``); default SQLite in ``root``.

    Returns
    -------
    butler : `Butler`
        Writeable butler on the new repository.

    Raises
    ------
    BadInputError
        Raised if ``root`` already holds a repository or the database URL is unusable.
    """
    root = Path(root)
    if (root / "butler.yaml").exists():
        raise BadInputError("ROOT", f"{root} already holds a butler repository", "pick a new directory")
    config = Config(REPO_CONFIG)
    if db_url:
        if not db_url.startswith(("sqlite:", "postgresql")):
            raise BadInputError(
                "--db-url",
                f"{db_url!r} is not a SQLite or PostgreSQL URL",
                "e.g. postgresql://user@host:5432/butler",
            )
        config["registry", "db"] = db_url
    try:
        Butler.makeRepo(str(root), config=config)
    except Exception as exc:  # database driver errors have no common base class
        (root / "butler.yaml").unlink(missing_ok=True)
        raise BadInputError("--db-url" if db_url else "ROOT", f"cannot create repository: {exc}") from exc
    butler = Butler.from_config(str(root), writeable=True)
    register_dataset_types(butler)
    return butler


def register_dataset_types(butler: Butler) -> None:
    """Register every dataset type of `apbatch.butler.datasets` (idempotent)."""
    for spec in ds.DATASET_TYPES:
        dt = DatasetType(
            spec.name,
            spec.dimensions,
            spec.storage_class,
            universe=butler.dimensions,
            isCalibration=spec.is_calibration,
        )
        butler.registry.registerDatasetType(dt)


def register_instrument(butler: Butler, instrument: str) -> str:
    """Insert the instrument, its detectors and physical filters; create its collections.

    Idempotent. ``LSSTCamSim``/``LSSTComCamSim`` are registered under their own names with
    the geometry of the camera they simulate.

    Returns
    -------
    name : `str`
        The butler instrument name.

    Raises
    ------
    BadInputError
        Raised if ``instrument`` is not a known camera.
    """
    from ..raw import camera_name  # noqa: PLC0415 (fitsio only when registering)

    camera = get_instrument(camera_name(instrument))
    name = instrument if camera_name(instrument) != instrument and instrument.endswith("Sim") else camera.name
    registry = butler.registry
    registry.syncDimensionData(
        "instrument",
        {
            "name": name,
            "visit_max": _ID_MAX,
            "exposure_max": _ID_MAX,
            "detector_max": max(d.id for d in camera.detectors) + 1,
            "visit_system": _VISIT_SYSTEM,
            "class_name": f"apbatch.instruments.{camera.name}",
        },
    )
    registry.insertDimensionData(
        "detector",
        *[
            {
                "instrument": name,
                "id": d.id,
                "full_name": d.name,
                "name_in_raft": d.sensor,
                "raft": d.raft,
                "purpose": d.purpose,
            }
            for d in camera.detectors
        ],
        skip_existing=True,
    )
    filters = dict(camera.filters) | {f: f for f in _EXTRA_FILTERS}
    registry.insertDimensionData(
        "physical_filter",
        *[{"instrument": name, "name": pf, "band": band} for pf, band in filters.items()],
        skip_existing=True,
    )
    registry.insertDimensionData(
        "visit_system",
        {"instrument": name, "id": _VISIT_SYSTEM, "name": "by-seq-start-end"},
        skip_existing=True,
    )
    butler.collections.register(ds.raw_run(name), CollectionType.RUN)
    butler.collections.register(ds.calib_run(name), CollectionType.RUN)
    butler.collections.register(ds.calib_collection(name), CollectionType.CALIBRATION)
    butler.collections.register(ds.templates_run(name), CollectionType.RUN)
    butler.collections.register(ds.defaults_collection(name), CollectionType.CHAINED)
    butler.collections.redefine_chain(
        ds.defaults_collection(name), [ds.calib_collection(name), ds.templates_run(name), ds.raw_run(name)]
    )
    return name


def register_output_run(butler: Butler, instrument: str, day_obs: int) -> str:
    """Create the RUN collection of one day's job outputs (idempotent); returns its name."""
    run = ds.output_run(instrument, day_obs)
    butler.collections.register(run, CollectionType.RUN)
    return run


def day_obs_timespan(day_obs: int) -> Timespan:
    """The observing day as a TAI timespan: from 12:00 on ``day_obs`` to 12:00 the next day."""
    try:
        d = datetime.datetime.strptime(str(int(day_obs)), "%Y%m%d")
    except ValueError:
        raise BadInputError("day_obs", f"{day_obs!r} is not YYYYMMDD") from None
    begin = Time(d + datetime.timedelta(hours=12), scale="tai")
    return Timespan(begin, Time(d + datetime.timedelta(hours=36), scale="tai"))


def _as_dict(meta: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(meta) and not isinstance(meta, type):
        return dataclasses.asdict(meta)
    if isinstance(meta, Mapping):
        return dict(meta)
    raise BadInputError("exposure", f"expected RawMetadata or a mapping, got {type(meta).__name__}")


def _exposure_timespan(m: Mapping[str, Any]) -> Timespan | None:
    if m.get("mjd_begin") is None:
        return None
    begin = Time(m["mjd_begin"], format="mjd", scale="tai")
    end_mjd = m.get("mjd_end") or m["mjd_begin"] + (m.get("exposure_time") or 0.0) / 86400.0
    return Timespan(begin, Time(max(end_mjd, m["mjd_begin"]), format="mjd", scale="tai"))


_REQUIRED = ("instrument", "exposure_id", "obs_id", "day_obs", "seq_num", "physical_filter", "exposure_time")


def exposure_records(meta: Any) -> dict[str, dict[str, Any]]:
    """The ``day_obs``, ``group`` and ``exposure`` records of one exposure (RawMetadata or dict).

    Raises
    ------
    BadInputError
        Raised if a field the exposure record needs is missing.
    """
    m = _as_dict(meta)
    for key in _REQUIRED:
        if m.get(key) is None:
            raise BadInputError(
                f"exposure.{key}",
                f"missing for {m.get('obs_id', '?')}",
                "give it in the night plan or the raw header",
            )
    inst = m["instrument"]
    group = m.get("group_id") or str(m["exposure_id"])
    on_sky = m.get("ra") is not None and m.get("dec") is not None
    airmass = m.get("airmass")
    zenith = None
    if airmass and airmass >= 1.0:
        import math  # noqa: PLC0415

        zenith = math.degrees(math.acos(min(1.0, 1.0 / airmass)))
    return {
        "day_obs": {"instrument": inst, "id": int(m["day_obs"]), "timespan": day_obs_timespan(m["day_obs"])},
        "group": {"instrument": inst, "name": group},
        "exposure": {
            "instrument": inst,
            "id": int(m["exposure_id"]),
            "day_obs": int(m["day_obs"]),
            "group": group,
            "physical_filter": m["physical_filter"],
            "obs_id": m["obs_id"],
            "exposure_time": float(m["exposure_time"]),
            "dark_time": m.get("dark_time"),
            "observation_type": m.get("observation_type") or "unknown",
            "observation_reason": m.get("reason") or "unknown",
            "seq_num": int(m["seq_num"]),
            "seq_start": int(m["seq_num"]),
            "seq_end": int(m["seq_num"]),
            "science_program": m.get("science_program"),
            "tracking_ra": m.get("ra") if on_sky else None,
            "tracking_dec": m.get("dec") if on_sky else None,
            "sky_angle": m.get("rotation") if on_sky else None,
            "zenith_angle": zenith,
            "has_simulated": bool(m.get("has_simulated", False)),
            "can_see_sky": m.get("can_see_sky"),
            "timespan": _exposure_timespan(m),
        },
    }


# observation types of calibration exposures: exposure records, never visits
CALIBRATION_TYPES = frozenset({"bias", "dark", "flat", "spot", "ccob"})


def is_visit(meta: Any) -> bool:
    """`True` if the exposure (RawMetadata or dict) belongs to a visit: not a calibration exposure."""
    return str(_as_dict(meta).get("observation_type") or "").lower() not in CALIBRATION_TYPES


def visit_records(metas: Iterable[Any]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """``visit``, ``visit_definition``, ``visit_system_membership`` and ``visit_detector_region`` records.

    Exposures are grouped by ``visit_id`` (falling back to ``exposure_id``); calibration
    exposures (:data:`CALIBRATION_TYPES`) get none. A visit with a pointing (``ra``, ``dec``;
    ``rotation`` defaults to 0) gets its sky region, and one ``visit_detector_region`` per
    science CCD; without a pointing the regions are left empty.
    """
    by_visit: dict[tuple[str, int], list[dict]] = {}
    for meta in metas:
        m = _as_dict(meta)
        if not is_visit(m):
            continue
        visit = int(m.get("visit_id") or m["exposure_id"])
        by_visit.setdefault((m["instrument"], visit), []).append(m)
    visits, definitions, members, detector_regions = [], [], [], []
    for (inst, visit), ms in by_visit.items():
        ms.sort(key=lambda m: m["seq_num"])
        first = ms[0]
        spans = [t for t in (_exposure_timespan(m) for m in ms) if t is not None]
        begins = [t.begin for t in spans if isinstance(t.begin, Time)]
        ends = [t.end for t in spans if isinstance(t.end, Time)]
        timespan = Timespan(min(begins), max(ends)) if begins and ends else None
        region = None
        if first.get("ra") is not None and first.get("dec") is not None:
            region, ccds = visit_regions(inst, first["ra"], first["dec"], first.get("rotation") or 0.0)
            detector_regions += [
                {"instrument": inst, "visit": visit, "detector": det, "region": poly}
                for det, poly in ccds.items()
            ]
        visits.append(
            {
                "instrument": inst,
                "id": visit,
                "day_obs": int(first["day_obs"]),
                "physical_filter": first["physical_filter"],
                "name": first.get("group_id") or str(visit),
                "seq_num": int(first["seq_num"]),
                "exposure_time": float(sum(m["exposure_time"] for m in ms)),
                "observation_reason": first.get("reason") or "unknown",
                "science_program": first.get("science_program"),
                "region": region,
                "timespan": timespan,
            }
        )
        definitions += [{"instrument": inst, "exposure": int(m["exposure_id"]), "visit": visit} for m in ms]
        members.append({"instrument": inst, "visit": visit, "visit_system": _VISIT_SYSTEM})
    return visits, definitions, members, detector_regions


def register_exposures(butler: Butler, metas: Iterable[Any]) -> int:
    """Insert the exposure and visit records of many exposures in one transaction (idempotent).

    Visits get their sky regions and one ``visit_detector_region`` per science CCD; calibration
    exposures get exposure records only (see :func:`visit_records`).

    Parameters
    ----------
    butler : `Butler`
        Writeable butler; the instrument must be registered.
    metas : iterable of `apbatch.raw.RawMetadata` or `dict`
        One entry per exposure (not per CCD); same field names as `RawMetadata`
        (``group_id``, ``visit_id``, ``mjd_begin``...). Duplicates are fine.

    Returns
    -------
    n : `int`
        Number of distinct exposures given.

    Raises
    ------
    BadInputError
        Raised if an entry lacks a required field; nothing is inserted then.
    """
    metas = list({_as_dict(m)["obs_id"]: _as_dict(m) for m in metas}.values())
    recs = [exposure_records(m) for m in metas]
    visits, definitions, members, detector_regions = visit_records(metas)
    registry = butler.registry
    with registry.transaction():
        for element in ("day_obs", "group", "exposure"):
            rows = list({_key(r[element]): r[element] for r in recs}.values())
            if rows:
                registry.insertDimensionData(element, *rows, skip_existing=True)
        for element, rows in (
            ("visit", visits),
            ("visit_definition", definitions),
            ("visit_system_membership", members),
            ("visit_detector_region", detector_regions),
        ):
            if rows:
                registry.insertDimensionData(element, *rows, skip_existing=True)
    log.info("registered %d exposure(s) in %d visit(s)", len(metas), len(visits))
    return len(metas)


def _key(rec: dict) -> tuple:
    return (rec["instrument"], rec.get("id", rec.get("name")))
