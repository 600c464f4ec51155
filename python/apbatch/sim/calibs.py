"""Per-detector instrument signature (bias, gains, flat response, defects) and calibration products.

One :class:`DetectorSignature` per (seed, instrument, detector) fixes everything the camera
adds to a raw: per-amplifier bias level and a small bias structure, the *true* gain of each
amplifier (within ~1% of the nominal ``Amplifier.gain``), a smooth illumination pattern,
dead and hot columns. The raw renderer and the calibration products both use it, so the
products calibrate the raws exactly:

* raw ADU = (sky + sources) x ``response`` / ``gain_true`` + bias level + bias structure
  + read noise (+ hot-column dark current);
* ISR (overscan subtraction, x nominal gain, - bias, / flat) then gives back sky + sources.

Calibration products (:class:`apbatch.image.Image`, assembled and trimmed):

* **bias**: the bias structure left after overscan subtraction, in electrons (ADU x nominal
  gain), ``BUNIT = electron``; headers ``OSLEV<nn>`` (overscan level, ADU) and ``RDNOI<nn>``
  (read noise, e-) per amplifier index ``nn``, which raw verification compares with;
* **flat**: ``illumination x nominal/true gain`` per amplifier, mean 1, dimensionless;
  dead and hot columns carry ``MaskBits.BAD`` in its mask.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..image import Image, MaskBits
from ..instruments import Amplifier, Detector, get_instrument

__all__ = ["DetectorSignature", "assembled_view", "detector_signature", "make_bias", "make_flat"]

_HOT_RATE = 25.0  # e-/s of dark current in a hot column


def assembled_view(arr: np.ndarray, amp: Amplifier) -> np.ndarray:
    """The amplifier's data box of an assembled image, flipped into raw-segment orientation."""
    return amp.segment_view(arr)


@dataclasses.dataclass
class DetectorSignature:
    """The fixed imperfections of one CCD. Arrays are shared: treat them as read-only."""

    instrument: str
    detector: Detector
    amps: tuple[Amplifier, ...]
    bias_level: np.ndarray  # ADU per amplifier
    gain_true: np.ndarray  # e-/ADU per amplifier
    bias_amplitude: np.ndarray  # ADU of the bias structure per amplifier
    flat: np.ndarray  # (ny, nx) float32, mean 1
    response: np.ndarray  # (ny, nx) float32: flat / (nominal/true gain)
    bad_columns: list[tuple[int, int, int, str]]  # (x, y0, y1, "dead"|"hot")

    def bias_structure(self, amp: Amplifier) -> np.ndarray:
        """Bias structure (ADU) of the amplifier's raw data box, raw-segment orientation.

        An offset plus a decaying ramp along the serial direction, as real ITL/E2V
        amplifiers show near the start of each row.
        """
        x0, x1, y0, y1 = amp.data
        k = amp.index
        cols = np.arange(x1 - x0, dtype=np.float32)
        row = self.bias_amplitude[k] * (0.5 + np.exp(-cols / 30.0))
        return np.broadcast_to(row[None, :], (y1 - y0, x1 - x0))

    def add_hot_columns(self, image: np.ndarray, dark_time: float) -> None:
        """Add the hot columns' dark current (electrons) to an assembled image, in place."""
        for x, y0, y1, kind in self.bad_columns:
            if kind == "hot" and dark_time > 0:
                image[y0:y1, x] += np.float32(_HOT_RATE * dark_time)

    def mask(self) -> np.ndarray:
        """Defect mask (``MaskBits.BAD``) of the assembled CCD."""
        m = np.zeros((self.detector.ny, self.detector.nx), np.int32)
        for x, y0, y1, _ in self.bad_columns:
            m[y0:y1, x] |= int(MaskBits.BAD)
        return m


def _illumination(det: Detector, rng: np.random.Generator) -> np.ndarray:
    """Smooth response: radial vignetting in the focal plane, a small tilt and a CCD-level QE.

    With the CCD's pixel offsets (x, y) in mm rotated by its yaw into the focal plane,
    ``r^2 = c^2 + x^2 + y^2 + a x + b y`` is a sum of a row term and a column term.
    """
    p = det.pixel_size_mm
    yaw = np.radians(det.yaw_deg)
    x = (np.arange(det.nx, dtype=np.float64) - det.refpos_x) * p
    y = (np.arange(det.ny, dtype=np.float64) - det.refpos_y) * p
    cx, cy = det.x_mm, det.y_mm
    a = 2 * (cx * np.cos(yaw) + cy * np.sin(yaw))
    b = 2 * (-cx * np.sin(yaw) + cy * np.cos(yaw))
    k = 0.06 / 330.0**2  # 6% vignetting at the edge of the LSSTCam focal plane
    tx, ty = rng.normal(0, 0.01, 2) / 40.0  # +-1% tilt across a CCD
    col = -k * (x**2 + a * x) + tx * x
    row = -k * (y**2 + b * y) + ty * y + 1.0 - k * (cx**2 + cy**2) + rng.normal(0, 0.02)
    out = np.empty((det.ny, det.nx), np.float32)
    np.add(row.astype(np.float32)[:, None], col.astype(np.float32)[None, :], out=out)
    return out


@functools.lru_cache(maxsize=2)
def detector_signature(instrument: str, detector: int | str, seed: int) -> DetectorSignature:
    """The signature of one CCD, reproducible from ``seed`` (cached for the last two CCDs)."""
    inst = get_instrument(instrument)
    det = inst.detector(detector)
    amps = inst.amplifiers(det.id)
    rng = np.random.default_rng([int(seed), 7, det.id])
    n = len(amps)
    nominal = np.array([a.gain for a in amps])
    gain_true = nominal * (1.0 + rng.normal(0, 0.01, n))
    bias_level = rng.uniform(15000, 25000, n).round()
    bias_amp = rng.uniform(1.0, 4.0, n)

    illum = _illumination(det, rng)
    bad = []
    for kind in ("dead", "dead", "hot", "hot"):
        x = int(rng.integers(10, det.nx - 10))
        y0 = int(rng.integers(0, det.ny // 2))
        bad.append((x, y0, det.ny if rng.uniform() < 0.5 else int(rng.integers(det.ny // 2, det.ny)), kind))
    for x, y0, y1, kind in bad:
        if kind == "dead":
            illum[y0:y1, x] *= 0.05
    # flat = illumination x nominal/true gain, normalised to mean 1; response = flat / (nominal/true)
    ratio = nominal / gain_true
    total = sum(
        ratio[k] * float(illum[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]].sum(dtype=np.float64))
        for k, a in enumerate(amps)
    )
    response = illum
    response *= np.float32(illum.size / total)
    flat = response.copy()
    for k, a in enumerate(amps):
        flat[a.bbox[2] : a.bbox[3], a.bbox[0] : a.bbox[1]] *= np.float32(ratio[k])
    return DetectorSignature(
        instrument=inst.name,
        detector=det,
        amps=amps,
        bias_level=bias_level,
        gain_true=gain_true,
        bias_amplitude=bias_amp,
        flat=flat,
        response=response,
        bad_columns=bad,
    )


def _calib_metadata(sig: DetectorSignature, kind: str, seed: int) -> dict:
    return {
        "CALIBTYP": kind,
        "INSTRUME": sig.instrument,
        "DETECTOR": sig.detector.id,
        "DETNAME": sig.detector.name,
        "SIMSEED": int(seed),
    }


def make_bias(sig: DetectorSignature, seed: int, nframes: int = 20) -> Image:
    """Combined bias (electrons, overscan-subtracted, assembled) with its variance."""
    det = sig.detector
    img = np.zeros((det.ny, det.nx), np.float32)
    var = np.zeros_like(img)
    for _k, amp in enumerate(sig.amps):
        view = assembled_view(img, amp)
        view[...] = sig.bias_structure(amp) * amp.gain
        assembled_view(var, amp)[...] = amp.read_noise**2 / nframes
    rng = np.random.default_rng([int(seed), 11, det.id])
    img += (rng.standard_normal(img.shape, dtype=np.float32) * np.sqrt(var)).astype(np.float32)
    meta = _calib_metadata(sig, "bias", seed) | {"BUNIT": "electron", "NCOMBINE": nframes}
    # what raw verification compares with (apbatch.job.calverify): each amplifier's overscan
    # level (ADU) and read noise (e-) when the master was made
    for k, amp in enumerate(sig.amps):  # bias_level is in the order of sig.amps, as camera.to_segments
        meta[f"OSLEV{amp.index:02d}"] = float(sig.bias_level[k])
        meta[f"RDNOI{amp.index:02d}"] = float(amp.read_noise)
    return Image(img, var, sig.mask(), None, meta)


def make_flat(sig: DetectorSignature, physical_filter: str, seed: int, electrons: float = 1.0e6) -> Image:
    """Combined flat for one filter (dimensionless, mean 1), noise of ``electrons`` per pixel."""
    rng = np.random.default_rng([int(seed), 13, sig.detector.id])
    var = (sig.flat**2 / electrons).astype(np.float32)
    img = sig.flat + rng.standard_normal(sig.flat.shape, dtype=np.float32) * np.sqrt(var)
    meta = _calib_metadata(sig, "flat", seed) | {"BUNIT": "", "FILTER": physical_filter}
    return Image(img, var, sig.mask(), None, meta)
