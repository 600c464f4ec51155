"""Amplifier health: find the dead, hot and saturated amplifiers of one CCD.

Used by :mod:`apbatch.job.steps.isr` on every assembled, bias-subtracted snap. Each
amplifier's sky level (median of its pixels divided by the flat), its noise (robust spread of
differences between horizontally adjacent pixels, which stars and gradients barely affect)
and its fraction of ``SAT`` pixels are compared with the other amplifiers of the CCD and
with the noise its own level and read noise predict:

``dead``
    no light where the others see sky: level below ``dead_fraction`` of the CCD's median
    amplifier level, noise not above ``dead_noise_factor`` times the read noise, and the
    CCD's median level at least ``dead_min_snr`` read-noise sigmas (so a dark CCD --
    twilight flat field off, very short exposure -- is never "all dead");
``hot``
    level above the CCD's median by more than ``hot_nsigma`` times the sky noise and
    ``hot_fraction`` of the sky, or noise ``hot_noise_factor`` times what its level predicts;
``saturated``
    more than ``sat_fraction`` of its pixels ``SAT``.

Only every ``step``-th row (and column, or pair of columns) is read: ~3 ms per amplifier
segment, ~0.05 s CPU per LSSTCam snap.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...image import MaskBits

__all__ = ["AmpHealthConfig", "AmpStats", "amp_statistics", "classify_amps", "format_bad_amps", "mask_amps"]

_BAD_AMP = int(MaskBits.BAD | MaskBits.NO_DATA)


@dataclasses.dataclass(frozen=True)
class AmpHealthConfig:
    """Thresholds of :func:`classify_amps` (see the module docstring for their meaning)."""

    dead_fraction: float = 0.1
    dead_noise_factor: float = 2.0
    dead_min_snr: float = 5.0
    hot_nsigma: float = 10.0
    hot_fraction: float = 0.5
    hot_noise_factor: float = 2.0
    sat_fraction: float = 0.5
    step: int = 8


@dataclasses.dataclass(frozen=True)
class AmpStats:
    """Statistics of one amplifier segment of one snap (electrons)."""

    name: str
    level: float
    noise: float
    predicted_noise: float
    read_noise: float
    sat_fraction: float


def amp_statistics(
    img: np.ndarray, mask: np.ndarray, amps, flat: np.ndarray | None = None, step: int = 8
) -> list[AmpStats]:
    """Level, noise and saturated fraction of every amplifier of an assembled image.

    Parameters
    ----------
    img, mask : `numpy.ndarray`
        Assembled, bias-subtracted image (electrons, before the flat) and its mask.
    amps : `list` [`apbatch.instruments.Amplifier`]
        The CCD's amplifiers; ``bbox`` locates each in ``img``.
    flat : `numpy.ndarray`, optional
        The flat; levels are divided by the amplifier's median flat so that they compare
        across amplifiers, noise is measured before it.
    step : `int`
        Every ``step``-th row and column pair is read.

    Returns
    -------
    stats : `list` [`AmpStats`]
        In the order of ``amps``.
    """
    out = []
    for a in amps:
        bx0, bx1, by0, by1 = a.bbox
        sub = img[by0:by1:step, bx0:bx1:step]
        msub = mask[by0:by1:step, bx0:bx1:step]
        good = (msub & int(MaskBits.BAD)) == 0
        vals = sub[good] if good.any() else sub.ravel()
        raw_level = float(np.median(vals))
        fl = 1.0
        if flat is not None:
            fsub = flat[by0:by1:step, bx0:bx1:step]
            fl = float(np.median(fsub[np.isfinite(fsub) & (fsub > 0.05)])) if (fsub > 0.05).any() else 1.0
        # adjacent-pixel differences: a star or a gradient adds little, the noise adds sqrt(2)
        d = img[by0:by1:step, bx0 : bx1 - 1 : 2] - img[by0:by1:step, bx0 + 1 : bx1 : 2]
        med = np.median(d)
        noise = float(1.4826 * np.median(np.abs(d - med)) / np.sqrt(2.0))
        out.append(
            AmpStats(
                name=a.name,
                level=raw_level / fl,
                noise=noise,
                predicted_noise=float(np.sqrt(max(raw_level, 0.0) + a.read_noise**2)),
                read_noise=float(a.read_noise),
                sat_fraction=float(((msub & int(MaskBits.SAT)) != 0).mean()),
            )
        )
    return out


def classify_amps(stats: list[AmpStats], config: AmpHealthConfig | None = None) -> dict[str, str]:
    """Name the bad amplifiers of a CCD from their :func:`amp_statistics`.

    Parameters
    ----------
    stats : `list` [`AmpStats`]
        One entry per amplifier of the CCD.
    config : `AmpHealthConfig`, optional
        Thresholds.

    Returns
    -------
    bad : `dict` [`str`, `str`]
        Amplifier name -> ``"dead"``, ``"hot"`` or ``"saturated"``; empty if all are healthy.
    """
    cfg = config or AmpHealthConfig()
    if not stats:
        return {}
    ref = float(np.median([s.level for s in stats]))
    rn = float(np.median([s.read_noise for s in stats]))
    sky_noise = float(np.sqrt(max(ref, 0.0) + rn**2))
    sees_sky = ref > cfg.dead_min_snr * rn
    bad = {}
    for s in stats:
        if s.sat_fraction > cfg.sat_fraction:
            bad[s.name] = "saturated"
        elif (
            sees_sky
            and s.level < cfg.dead_fraction * ref
            and s.noise < cfg.dead_noise_factor * max(s.read_noise, 1e-3)
        ):
            bad[s.name] = "dead"
        elif (s.level - ref > max(cfg.hot_nsigma * sky_noise, cfg.hot_fraction * max(ref, 0.0))) or (
            s.noise > cfg.hot_noise_factor * s.predicted_noise
        ):
            bad[s.name] = "hot"
    return bad


def mask_amps(mask: np.ndarray, amps, bad: dict[str, str]) -> np.ndarray:
    """Set ``BAD | NO_DATA`` on the bad amplifiers' pixels; return them as a boolean array."""
    out = np.zeros(mask.shape, bool)
    for a in amps:
        if a.name in bad:
            bx0, bx1, by0, by1 = a.bbox
            mask[by0:by1, bx0:bx1] |= _BAD_AMP
            out[by0:by1, bx0:bx1] = True
    return out


def format_bad_amps(bad: dict[str, str]) -> str:
    """``{"C10": "dead", "C14": "hot"}`` -> ``"C10:dead,C14:hot"`` (the ``AMPSBAD`` header value)."""
    return ",".join(f"{k}:{v}" for k, v in sorted(bad.items()))
