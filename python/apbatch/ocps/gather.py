"""Per-CCD metrics for OCPS: telemetry records, and the ``gather`` pipeline's group summary.

Both read the jobs' ``ap_metrics`` (`apbatch.job.task.CcdResult.to_dict`) from the butler.
``gather`` runs in the runner thread (no batch job): for one group, every detector's metrics
(the OCPS output run first, then the prompt-processing run), written as
``<root>/ocps/<request id>/gather.json`` and a focal-plane PNG (`apbatch.report.plots.focal_plane`)
beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_atomic
from ..errors import ExitCode
from ..work import CcdWork

if TYPE_CHECKING:
    from ..config import ApbatchConfig
    from ..submission import Submission

__all__ = ["TELEMETRY_FIELDS", "ccd_failure", "gather_group", "metric_runs", "read_metrics",
           "telemetry_record"]

TELEMETRY_FIELDS = ("request_id", "instrument", "visit", "detector", "detector_name", "status", "exit_code",
                    "psf_fwhm_arcsec", "zero_point", "sky_level", "n_sources", "n_dia_sources", "centroid_ra",
                    "centroid_dec", "time")


def metric_runs(cfg: ApbatchConfig, ocps_output_run: str, instrument: str, day_obs: int) -> list[str]:
    """The runs a CCD's ``ap_metrics`` may be in, first found wins: the job's configured output run,
    the OCPS output run, then prompt processing's (`apbatch.butler.datasets.output_run`)."""
    from ..butler.datasets import output_run  # noqa: PLC0415 (lsst.daf.butler: only when asked)

    return list(dict.fromkeys([cfg.job.output_run.format(instrument=instrument, day_obs=day_obs),
                               ocps_output_run.format(instrument=instrument, day_obs=day_obs),
                               output_run(instrument, day_obs)]))


def ccd_failure(row: Submission) -> str:
    """One CCD's failure for a completion event: ``<detector>: exit <code> (<name>): <reason>``."""
    code = row.exit_code
    try:
        name = f"exit {code} ({ExitCode(code).name.lower()})" if code is not None else str(row.state)
    except ValueError:
        name = f"exit {code}"
    reason = " ".join(row.reason.split())[:200]
    return f"{row.detector_name}: {name}" + (f": {reason}" if reason else "")


def read_metrics(butler: Any, runs: Sequence[str], instrument: str, visit: int,
                 detectors: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """``ap_metrics`` per detector of one visit, from the first of ``runs`` that has each.

    ``butler``: a `lsst.daf.butler.Butler` (or `None`: nothing is found).
    """
    out: dict[int, dict[str, Any]] = {}
    if butler is None:
        return out
    for run in runs:
        try:
            refs = butler.query_datasets("ap_metrics", collections=run, instrument=instrument, visit=visit,
                                         explain=False)
        except Exception:  # no such run (yet)
            continue
        for ref in refs:
            det = int(ref.dataId["detector"])
            if det in out or (detectors is not None and det not in detectors):
                continue
            out[det] = dict(butler.get(ref))
    return out


def _number(m: Mapping[str, Any], *path: str) -> float | None:
    cur: Any = m
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return float(cur) if isinstance(cur, int | float) and not isinstance(cur, bool) else None


def _centroid(work: CcdWork) -> tuple[float | None, float | None]:
    """Sky position of the CCD's centre from the pointing (`None` without one)."""
    if work.ra is None or work.dec is None:
        return None, None
    import numpy as np

    from ..instruments import get_instrument

    corners = np.asarray(get_instrument(work.instrument).footprint(work.detector, work.ra, work.dec,
                                                                   work.rotation or 0.0, pad_arcsec=0.0))
    xyz = np.stack([np.cos(np.radians(corners[:, 1])) * np.cos(np.radians(corners[:, 0])),
                    np.cos(np.radians(corners[:, 1])) * np.sin(np.radians(corners[:, 0])),
                    np.sin(np.radians(corners[:, 1]))]).mean(axis=1)
    ra = float(np.degrees(np.arctan2(xyz[1], xyz[0])) % 360.0)
    dec = float(np.degrees(np.arctan2(xyz[2], np.hypot(xyz[0], xyz[1]))))
    return round(ra, 6), round(dec, 6)


def telemetry_record(request_id: str, work: CcdWork, state: str, exit_code: int | None,
                     metrics: Mapping[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """One CCD's telemetry record (`apbatch.ocps.events`); `None` where the metrics lack a value."""
    m = metrics or {}
    ra, dec = _centroid(work)
    n_src = _number(m, "n_sources")
    n_dia = _number(m, "n_dia_sources")
    return {
        "request_id": request_id, "instrument": work.instrument, "visit": work.visit,
        "detector": work.detector,
        "detector_name": work.detector_name, "status": str(m.get("status") or state.lower()),
        "exit_code": exit_code,
        "psf_fwhm_arcsec": _number(m, "psf_fwhm_arcsec") or _number(m, "quality", "psf_fwhm_arcsec"),
        "zero_point": _number(m, "zero_point") or _number(m, "quality", "zero_point"),
        "sky_level": _number(m, "sky_level") or _number(m, "quality", "sky_level"),
        "n_sources": int(n_src) if n_src is not None and metrics is not None else None,
        "n_dia_sources": int(n_dia) if n_dia is not None and metrics is not None else None,
        "centroid_ra": ra, "centroid_dec": dec, "time": round(time.time() if now is None else now, 3)}


def gather_group(butler: Any, *, request_id: str, instrument: str, group_id: str, visit: int,
                 runs: Sequence[str], rows: Mapping[int, Mapping[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Summarize one group across detectors: a JSON file and a focal-plane PNG in ``out_dir``.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Where the ``ap_metrics`` are.
    rows : mapping
        Ledger rows of the group's CCDs by detector (``state``, ``exit_code``, ``detector_name``,
        ``work``), for CCDs that have no metrics.

    Returns
    -------
    results : `dict`
        ``gather_json``, ``gather_png`` (absolute paths), ``n_ccds``, ``n_with_metrics``.
    """
    from ..instruments import get_instrument
    from ..report.data import CcdInfo
    from ..report.plots import focal_plane

    metrics = read_metrics(butler, runs, instrument, visit)
    cam = get_instrument(instrument)
    ccds: dict[str, Any] = {}
    infos = []
    for det in sorted(set(metrics) | set(rows)):
        d = cam.detector(det)
        m = metrics.get(det)
        row = rows.get(det, {})
        ok = m is not None and str(m.get("status")) != "failed"
        state = "COMPLETED" if ok else str(row.get("state") or "?")
        work = row.get("work")
        if isinstance(work, CcdWork):
            rec = telemetry_record(request_id, work, state, row.get("exit_code"), m)
        else:
            rec = {"status": m.get("status") if m else state, "n_sources": m.get("n_sources") if m else None,
                   "n_dia_sources": m.get("n_dia_sources") if m else None}
        rec.update({"detector_name": d.name, "state": state, "snaps_used": (m or {}).get("snaps_used")})
        ccds[d.name] = rec
        infos.append(CcdInfo(detector=det, detector_name=d.name, state=state, exit_code=row.get("exit_code"),
                             status=(m or {}).get("status"),
                             n_dia=int(m["n_dia_sources"]) if m and "n_dia_sources" in m else None))
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"request_id": request_id, "instrument": instrument, "group_id": group_id, "visit": visit,
               "runs": list(runs), "ccds": ccds}
    js = write_atomic(out_dir / "gather.json", json.dumps(summary, indent=1, default=str))
    png = write_atomic(out_dir / "focal_plane.png",
                       focal_plane(instrument, infos, title=f"{instrument} {group_id} (visit {visit})"))
    return {"gather_json": str(Path(js).absolute()), "gather_png": str(Path(png).absolute()),
            "n_ccds": len(ccds), "n_with_metrics": len(metrics)}
