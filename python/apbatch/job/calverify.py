"""Raw-calibration verification (DMTN-092 section 2.3): each calibration raw, amplifier by
amplifier, against the master calibrations.

Every metric is measured on the raw amplifier segment (not on the ISR output, whose
interpolation would hide new bad columns) and judged with a threshold of
`apbatch.config.CalibVerifyConfig`:

``bias_level`` (all intents), ADU
    median of the serial overscan (its first ``overscan_skip`` columns skipped), against the
    master bias's ``OSLEV<nn>`` header (``nn`` the amplifier index); drift ``max_bias_drift``.
``read_noise`` (all), electrons
    clipped standard deviation of the overscan after each row's median is removed, x gain;
    at most ``max_read_noise_ratio`` times the master bias's ``RDNOI<nn>`` (else the camera's).
``saturated`` (all), fraction of the data pixels at or above the amplifier's saturation.
``bad_columns`` (all), count of columns whose median deviates from the amplifier's median
    column by more than ``bad_column_nsigma`` robust sigmas and that are not known defects
    (``BAD`` in the master bias's or flat's mask, the ISR defect list).
``bias_offset`` (bias), electrons: median of (data - overscan) x gain - master bias.
``dark_current`` (dark), electrons per second: the same median over the dark time.
``flat_level`` (flat): the amplifier's median of (data - overscan) x gain / master flat,
    relative to the median amplifier of the CCD; within ``max_flat_level_deviation`` of 1.
``flat_gradient`` (flat): peak-to-peak of a plane fitted to that ratio over the amplifier,
    relative to its level.

A metric without its reference (no master calibration, an older master bias without
``OSLEV<nn>``) is reported with ``passed`` `None` (not judged). A failed verification is not a
job failure: the job worked, the calibration is bad.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import CalibVerifyConfig
from ..errors import BadInputError
from ..events import CALIBRATION_INTENTS
from ..image import MaskBits

__all__ = ["AmpMetric", "Verification", "amp_arrays", "bias_level", "column_outliers", "flat_gradient",
           "merge_summaries", "read_noise_adu", "store_verification", "verify_calibration", "verify_raw"]

log = logging.getLogger(__name__)
_BAD = int(MaskBits.BAD)


@dataclasses.dataclass(frozen=True)
class AmpMetric:
    """One metric of one amplifier: value, what it is compared with, and the verdict."""

    amp: str
    metric: str
    value: float
    reference: float | None
    threshold: float
    passed: bool | None
    """`None`: not judged (no reference)."""


@dataclasses.dataclass
class Verification:
    """The verification of one calibration raw (one exposure of one CCD). Not thread-safe."""

    exposure: int
    obs_id: str
    detector: int
    intent: str
    metrics: list[AmpMetric] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """`True` unless a judged metric failed."""
        return all(m.passed is not False for m in self.metrics)

    def failed_amps(self) -> dict[str, list[str]]:
        """Failed metrics by amplifier name (only amplifiers with a failure)."""
        out: dict[str, list[str]] = {}
        for m in self.metrics:
            if m.passed is False:
                out.setdefault(m.amp, []).append(m.metric)
        return out

    def table(self):
        """One row per (amplifier, metric): the butler ``calib_verification`` dataset (a DataFrame)."""
        import pandas as pd

        rows = [dataclasses.asdict(m) for m in self.metrics]
        df = pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(AmpMetric)])
        df["passed"] = df["passed"].astype("boolean")  # nullable: None = not judged
        df["reference"] = df["reference"].astype(float)
        df.insert(0, "exposure", np.int64(self.exposure))
        df.insert(1, "detector", np.int64(self.detector))
        df.insert(2, "intent", self.intent)
        df.attrs = {"obs_id": self.obs_id, "passed": self.passed}
        return df

    def summary(self) -> dict[str, Any]:
        """Small JSON verdict for the ledger: passed, failed amplifiers, and per metric the worst
        amplifier's value with what it was compared with (`AmpMetric` ``reference`` and
        ``threshold``, as the module docstring defines each metric's rule)."""
        worst: dict[str, dict[str, Any]] = {}
        for m in self.metrics:
            relative = m.metric in ("bias_level", "flat_level")
            score = abs(m.value - (m.reference or 0.0)) if relative else m.value
            if m.metric not in worst or score > worst[m.metric]["score"]:
                ref = None if m.reference is None else round(float(m.reference), 4)
                worst[m.metric] = {"score": score, "amp": m.amp, "value": round(float(m.value), 4),
                                   "reference": ref, "threshold": m.threshold}
        for w in worst.values():
            del w["score"]
        return {"passed": self.passed, "exposures": [self.obs_id], "failed_amps": self.failed_amps(),
                "metrics": worst}


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ledger verdict for a job's raws (a calibration group of several images)."""
    if len(summaries) == 1:
        return summaries[0]
    failed: dict[str, list[str]] = {}
    metrics: dict[str, Any] = {}
    for s in summaries:
        for amp, names in s["failed_amps"].items():
            failed[amp] = sorted(set(failed.get(amp, [])) | set(names))
        metrics.update({k: v for k, v in s["metrics"].items() if k not in metrics or not s["passed"]})
    return {"passed": all(s["passed"] for s in summaries),
            "exposures": [e for s in summaries for e in s["exposures"]], "failed_amps": failed,
            "metrics": metrics}


# ------------------------------------------------------------------ metrics on arrays
def _field(amp) -> str:
    return f"raw.segments[{amp.extname}]"


def amp_arrays(data: np.ndarray | None, amp, overscan_skip: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The data box and the serial overscan of one raw segment, float32, raw orientation.

    Raises
    ------
    BadInputError
        Raised, naming ``raw.segments[<extname>]``, if the segment has the wrong shape, no
        serial overscan (or none left after ``overscan_skip``), or NaN/infinite pixels.
    """
    field = _field(amp)
    shape = None if data is None else np.shape(data)
    if shape != (amp.raw_ny, amp.raw_nx):
        raise BadInputError(field, f"shape {shape} but {amp.raw_ny}x{amp.raw_nx} expected",
                            "the raw is for another detector type or is corrupt")
    ox0, ox1, oy0, oy1 = amp.serial_overscan
    if ox1 - ox0 - overscan_skip < 1 or oy1 <= oy0:
        raise BadInputError(f"{field}.serial_overscan", "the segment has no serial overscan",
                            "verification needs the overscan; check the camera geometry and the raw")
    x0, x1, y0, y1 = amp.data
    arr = np.asarray(data)
    ovs = arr[oy0:oy1, ox0 + overscan_skip : ox1].astype(np.float32)
    img = arr[y0:y1, x0:x1].astype(np.float32)
    for name, a in (("serial overscan", ovs), ("data", img)):
        if not np.isfinite(a).all():
            raise BadInputError(field, f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite pixels",
                                "the raw is corrupt; re-fetch it")
    return img, ovs


def bias_level(ovs: np.ndarray) -> float:
    """Bias level (ADU): median of the overscan."""
    return float(np.median(ovs))


def read_noise_adu(ovs: np.ndarray, clip: float = 5.0) -> float:
    """Read noise (ADU) of an overscan box: each row's median removed, then a standard deviation
    clipped at ``clip`` robust sigmas (cosmic rays, hot pixels)."""
    res = ovs - np.median(ovs, axis=1, keepdims=True)
    mad = float(np.median(np.abs(res)))
    sigma = 1.4826 * mad if mad > 0 else float(np.std(res))
    if sigma == 0:
        return 0.0
    keep = np.abs(res) <= clip * sigma
    # the row medians take a small share of the variance: ~ (1 - 0.43 / n) for n columns
    n = ovs.shape[1]
    return float(np.std(res[keep]) / np.sqrt(max(1.0 - 0.43 / n, 0.5)))


def column_outliers(img: np.ndarray, nsigma: float, known: np.ndarray | None = None) -> np.ndarray:
    """Columns of ``img`` whose median deviates from the median column by > ``nsigma`` robust sigmas.

    Parameters
    ----------
    img : `numpy.ndarray`
        One amplifier's image (rows, columns).
    nsigma : `float`
        Threshold in sigmas of the column medians' robust spread (1.4826 x MAD).
    known : `numpy.ndarray` of `bool`, optional
        Per column: a known defect, never reported.

    Returns
    -------
    columns : `numpy.ndarray` of `int`
        Indices of the new bad columns.
    """
    cols = np.median(img, axis=0)
    centre = np.median(cols)
    sigma = 1.4826 * float(np.median(np.abs(cols - centre)))
    sigma = max(sigma, 1e-6 * max(abs(float(centre)), 1.0))
    bad = np.abs(cols - centre) > nsigma * sigma
    if known is not None:
        bad &= ~known
    return np.flatnonzero(bad)


def flat_gradient(ratio: np.ndarray, block: int = 64) -> float:
    """Peak-to-peak, relative to the level, of a plane fitted to block medians of ``ratio``."""
    ny, nx = ratio.shape
    by, bx = max(ny // block, 1), max(nx // block, 1)
    h, w = ny // by, nx // bx
    med = np.median(ratio[: by * h, : bx * w].reshape(by, h, bx, w), axis=(1, 3))
    yy, xx = np.mgrid[0:by, 0:bx]
    yy, xx = (yy + 0.5) * h, (xx + 0.5) * w
    design = np.column_stack([np.ones(med.size), xx.ravel(), yy.ravel()])
    (c, gx, gy), *_ = np.linalg.lstsq(design, med.ravel(), rcond=None)
    if c == 0:
        return float("inf")
    level = c + gx * nx / 2 + gy * ny / 2
    return float((abs(gx) * nx + abs(gy) * ny) / abs(level))


def _judge(amp: str, metric: str, value: float, reference: float | None, threshold: float,
           ok: bool | None) -> AmpMetric:
    return AmpMetric(amp, metric, float(value), None if reference is None else float(reference),
                     float(threshold), ok)


# ------------------------------------------------------------------ one raw
def verify_raw(raw, instrument, detector, intent: str, bias=None, flat=None,
               config: CalibVerifyConfig | None = None) -> Verification:
    """Verify one calibration raw against the master bias and flat.

    Parameters
    ----------
    raw : `apbatch.raw.RawExposure`
        The calibration raw (segments with their overscans).
    instrument : `apbatch.instruments.Instrument`
        Camera definition.
    detector : `apbatch.instruments.Detector`
        The raw's CCD.
    intent : `str`
        ``bias``, ``dark``, ``flat`` (other calibration intents get the common metrics).
    bias, flat : `apbatch.image.Image`, optional
        Master calibrations of this CCD (assembled; bias in electrons, flat mean ~1).
    config : `apbatch.config.CalibVerifyConfig`, optional
        Thresholds.

    Raises
    ------
    BadInputError
        Raised if a segment is missing, mis-shaped, has no overscan or has NaN pixels, if a
        master calibration does not fit the CCD, or a dark has no positive dark time.
    """
    cfg = config or CalibVerifyConfig()
    amps = instrument.amplifiers(detector.id)
    segs = {s.amp.extname: s for s in raw.segments if s.amp is not None}
    missing = [a.extname for a in amps if a.extname not in segs]
    if missing:
        raise BadInputError("raw.segments", f"missing amplifier segments {', '.join(missing)}",
                            "the raw file is truncated or incomplete; re-fetch it")
    for name, cal in (("bias", bias), ("flat", flat)):
        if cal is not None and cal.image.shape != (detector.ny, detector.nx):
            raise BadInputError(name, f"shape {cal.image.shape} but {(detector.ny, detector.nx)} expected",
                                f"use the {name} of this detector")
    meta = raw.metadata
    dark_time = meta.dark_time if meta.dark_time is not None else meta.exposure_time
    if intent == "dark" and not (dark_time and dark_time > 0):
        raise BadInputError("raw.header[DARKTIME]", f"dark time {dark_time!r}",
                            "a dark needs a positive dark time")
    bmeta = bias.metadata if bias is not None else {}
    out = Verification(int(meta.exposure_id), meta.obs_id, detector.id, intent)
    levels: dict[str, tuple[float, np.ndarray]] = {}
    for a in amps:
        img, ovs = amp_arrays(segs[a.extname].data, a, cfg.overscan_skip)
        m = out.metrics
        lvl = bias_level(ovs)
        ref = bmeta.get(f"OSLEV{a.index:02d}")
        m.append(_judge(a.name, "bias_level", lvl, ref, cfg.max_bias_drift,
                        None if ref is None else abs(lvl - float(ref)) <= cfg.max_bias_drift))
        rn = read_noise_adu(ovs) * a.gain
        rn_ref = float(bmeta.get(f"RDNOI{a.index:02d}", a.read_noise))
        m.append(_judge(a.name, "read_noise", rn, rn_ref, cfg.max_read_noise_ratio,
                        rn <= cfg.max_read_noise_ratio * rn_ref))
        sat = float(np.mean(img >= a.saturation))
        m.append(_judge(a.name, "saturated", sat, None, cfg.max_saturated_fraction,
                        sat <= cfg.max_saturated_fraction))
        # electrons above the bias: overscan row by row, then the master bias
        oy0 = a.serial_overscan[2]  # overscan and data rows are the same rows of the segment
        img -= np.median(ovs, axis=1)[a.data[2] - oy0 : a.data[3] - oy0, None]
        img *= np.float32(a.gain)
        known = np.zeros(img.shape[1], bool)
        if bias is not None:
            img -= a.segment_view(bias.image)
            known |= (a.segment_view(bias.mask) & _BAD).any(axis=0)
        if flat is not None:
            known |= (a.segment_view(flat.mask) & _BAD).any(axis=0)
        resid = float(np.median(img))
        if intent == "bias":
            judged = bias is not None
            m.append(_judge(a.name, "bias_offset", resid, 0.0 if judged else None, cfg.max_bias_offset,
                            abs(resid) <= cfg.max_bias_offset if judged else None))
        elif intent == "dark":
            rate = resid / float(dark_time)
            m.append(_judge(a.name, "dark_current", rate, None, cfg.max_dark_current,
                            rate <= cfg.max_dark_current if bias is not None else None))
        elif intent == "flat" and flat is not None:
            f = a.segment_view(flat.image)
            good = np.isfinite(f) & (f > 0.05)
            img = np.where(good, img / np.where(good, f, 1), np.float32(np.median(img)))
            levels[a.name] = (float(np.median(img[good])), img)
        n_bad = len(column_outliers(img, cfg.bad_column_nsigma, known))
        m.append(_judge(a.name, "bad_columns", n_bad, None, cfg.max_new_bad_columns,
                        n_bad <= cfg.max_new_bad_columns))
    if levels:  # flat level relative to the CCD's median amplifier (the lamp's level is not known)
        ccd = float(np.median([lv for lv, _ in levels.values()]))
        for name, (lv, ratio) in levels.items():
            rel = lv / ccd if ccd else float("nan")
            out.metrics.append(_judge(name, "flat_level", rel, 1.0, cfg.max_flat_level_deviation,
                                      abs(rel - 1.0) <= cfg.max_flat_level_deviation))
            grad = flat_gradient(ratio)
            out.metrics.append(_judge(name, "flat_gradient", grad, None, cfg.max_flat_gradient,
                                      grad <= cfg.max_flat_gradient))
    return out


def verify_calibration(raws, instrument, detector, intent: str, calibs: dict[str, Any],
                       config: CalibVerifyConfig | None = None) -> list[Verification]:
    """Verify every raw of a calibration job (`verify_raw`); an intent that is not a calibration
    (``cwfs``, ``acq``, ...) gives an empty list.

    Raises
    ------
    BadInputError
        See `verify_raw`.
    """
    if intent not in CALIBRATION_INTENTS:
        return []
    return [verify_raw(r, instrument, detector, intent, calibs.get("bias"), calibs.get("flat"), config)
            for r in raws]


def store_verification(butler_io, work, output_run: str | None,
                       checks: Sequence[Verification]) -> dict[str, Any]:
    """Put each raw's table into the butler (``calib_verification``); return the job's verdict.

    A failed verification is not a failed job (the job worked, the calibration is bad): it is
    logged as a warning, and the verdict goes to the ledger (`Ledger.record_verification`).
    """
    from ..butler.datasets import output_run as default_run

    verdict = merge_summaries([v.summary() for v in checks])
    if not verdict["passed"]:
        log.warning("calibration verification failed: %s",
                    "; ".join(f"{amp}: {', '.join(m)}" for amp, m in verdict["failed_amps"].items()))
    run = output_run or default_run(work.instrument, work.day_obs)
    for v in checks:
        butler_io.put_calib_verification(v.table(), v.exposure, work.detector, run)
    return verdict
