"""A deterministic simulated sky: stars, galaxies and transients, the same wherever it is looked at.

The sky is cut into cells (bands of declination, each split in right ascension into cells of
about equal area). Each cell's sources are drawn from a random generator seeded by
``(seed, band, cell)``, so any two queries (two CCDs, a CCD and a template patch, two nights)
see exactly the same sources where they overlap, and nothing depends on query order.

Fluxes are kept as AB-like magnitudes in a reference band (``r``); :func:`rate` converts to
electrons per second in a band with the zero points of :data:`ZERO_POINTS`. Transients are
described by their *change* of flux with respect to the template sky:

* ``variable``: a star present in the template at ``mag``, brighter (``sign`` +1) or fainter
  (-1) by ``delta_rate`` e-/s (r band) during the night;
* ``new``: absent from the template, ``delta_rate`` e-/s from time ``t_on`` (MJD) on;
* moving objects (:class:`MovingObject`): absent from the template, moving linearly.

Transient amplitudes are drawn so that the signal-to-noise ratio of the change, under the
nominal conditions of :data:`NOMINAL`, is log-uniform between ``snr_min`` and ``snr_max``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import pandas as pd

__all__ = [
    "MovingObject",
    "NOMINAL",
    "SKY_MAG",
    "SkyConfig",
    "SkyModel",
    "ZERO_POINTS",
    "rate",
    "rate_to_mag",
    "snr_to_rate",
]

# AB magnitude of 1 nJy: 2.5 log10(3631 Jy / 1 nJy); fluxes in nJy are 10^(-0.4 (m - NJY_ZEROPOINT)).
NJY_ZEROPOINT = 31.4
# Magnitude giving 1 e-/s in the Simonyi telescope + LSST camera (per band).
ZERO_POINTS = {"u": 26.5, "g": 28.3, "r": 28.1, "i": 27.9, "z": 27.5, "y": 26.6}
# Dark-sky brightness, mag per square arcsecond.
SKY_MAG = {"u": 22.9, "g": 22.3, "r": 21.2, "i": 20.5, "z": 19.6, "y": 18.6}
# Colour terms: mag_band = mag_r + COLOR_TERMS[band] * (g-r - 0.6).
COLOR_TERMS = {"u": 2.0, "g": 1.0, "r": 0.0, "i": -0.4, "z": -0.6, "y": -0.7}


class _Nominal(TypedDict):
    band: str
    exptime: float  # s
    fwhm_arcsec: float
    pixel_scale: float  # arcsec/px
    read_noise: float  # e-


# Conditions the transient S/N range refers to: r band, 30 s, 0.8" seeing, 0.2"/px, 9 e- read noise.
NOMINAL: _Nominal = {"band": "r", "exptime": 30.0, "fwhm_arcsec": 0.8, "pixel_scale": 0.2, "read_noise": 9.0}
_KINDS = ("star", "galaxy", "variable", "new")


def rate(mag, band: str, color=0.6, zp_offset: float = 0.0):
    """Electrons per second in ``band`` of a source of reference magnitude ``mag``."""
    m = np.asarray(mag) + COLOR_TERMS[band] * (np.asarray(color) - 0.6)
    return 10.0 ** (-0.4 * (m - ZERO_POINTS[band] - zp_offset))


def rate_to_mag(r, band: str = "r"):
    """Reference magnitude of a flat-spectrum source giving ``r`` e-/s in ``band``."""
    return ZERO_POINTS[band] - 2.5 * np.log10(np.asarray(r, dtype=float))


def snr_to_rate(snr, band: str = "r", exptime: float | None = None, fwhm_arcsec: float | None = None):
    """Rate (e-/s) a point source needs for a given S/N under nominal conditions.

    Solves ``snr = F / sqrt(F + n_eff B)`` with ``n_eff = 4 pi sigma^2`` (pixels) and ``B``
    the sky plus read-noise variance per pixel.
    """
    exptime = exptime or NOMINAL["exptime"]
    scale = NOMINAL["pixel_scale"]
    sigma = (fwhm_arcsec or NOMINAL["fwhm_arcsec"]) / 2.3548 / scale
    sky = 10.0 ** (-0.4 * (SKY_MAG[band] - ZERO_POINTS[band])) * scale**2 * exptime
    b = 4.0 * math.pi * sigma**2 * (sky + NOMINAL["read_noise"] ** 2)
    snr = np.asarray(snr, dtype=float)
    flux = 0.5 * (snr**2 + np.sqrt(snr**4 + 4.0 * snr**2 * b))
    return flux / exptime


@dataclasses.dataclass(frozen=True)
class SkyConfig:
    """Densities (per square degree) and ranges of the simulated sky."""

    star_density: float = 60000.0
    mag_bright: float = 12.0
    mag_faint: float = 25.5
    slope: float = 0.25  # d log10 N / d mag (a few saturated stars per CCD)
    galaxy_density: float = 15000.0
    galaxy_mag: tuple[float, float] = (19.0, 24.5)
    galaxy_fwhm_arcsec: tuple[float, float] = (0.3, 1.5)
    variable_density: float = 120.0
    new_density: float = 120.0
    snr_range: tuple[float, float] = (3.0, 100.0)
    cell_deg: float = 0.25


@dataclasses.dataclass(frozen=True)
class MovingObject:
    """A solar-system-like object moving on a straight line (constant rate, degrees per day)."""

    id: int
    ra0: float
    dec0: float
    mjd0: float
    rate_ra: float  # on-sky (great-circle) degrees per day towards East
    rate_dec: float
    mag: float

    def position(self, mjd: float) -> tuple[float, float]:
        """(ra, dec) in degrees at ``mjd``."""
        dt = mjd - self.mjd0
        dec = self.dec0 + self.rate_dec * dt
        ra = (self.ra0 + self.rate_ra * dt / math.cos(math.radians(self.dec0))) % 360.0
        return ra, dec

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


def _angsep(ra1, dec1, ra2, dec2):
    """Angular separation in degrees (haversine)."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    a = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(a, 0, 1))))


class SkyModel:
    """The simulated sky around any position.

    Immutable; generated cells are cached (per instance), so an instance is cheap to reuse
    but not meant to be shared between threads while it fills its cache.

    Parameters
    ----------
    seed : `int`
        Seed of everything (stars, galaxies, transients).
    epoch_mjd : `float`
        Reference time of the night; ``new`` transients switch on within
        ``[epoch_mjd - span_days / 2, epoch_mjd + span_days]``.
    span_days : `float`
        Length of the night (or of the simulated sequence).
    config : `SkyConfig`, optional
        Densities and ranges.
    movers : `list` [`MovingObject`], optional
        Moving objects.
    """

    def __init__(
        self,
        seed: int,
        epoch_mjd: float = 60800.0,
        span_days: float = 0.1,
        config: SkyConfig | None = None,
        movers: list[MovingObject] | tuple = (),
    ):
        self.seed = int(seed)
        self.epoch_mjd = float(epoch_mjd)
        self.span_days = float(span_days)
        self.config = config or SkyConfig()
        self.movers = tuple(movers)
        self._cell = functools.lru_cache(maxsize=256)(self._make_cell)

    # ------------------------------------------------------------ cells
    def _band_edges(self, j: int) -> tuple[float, float]:
        h = self.config.cell_deg
        return -90.0 + j * h, min(-90.0 + (j + 1) * h, 90.0)

    def _ncells(self, j: int) -> int:
        d0, d1 = self._band_edges(j)
        width = 360.0 * math.cos(math.radians(0.5 * (d0 + d1)))
        return max(1, int(width / self.config.cell_deg))

    def _make_cell(self, j: int, i: int) -> pd.DataFrame:
        cfg = self.config
        d0, d1 = self._band_edges(j)
        n = self._ncells(j)
        ra0, ra1 = 360.0 * i / n, 360.0 * (i + 1) / n
        s0, s1 = math.sin(math.radians(d0)), math.sin(math.radians(d1))
        area = (ra1 - ra0) * math.degrees(s1 - s0)  # square degrees
        rng = np.random.default_rng([self.seed, j, i])

        def positions(k):
            return rng.uniform(ra0, ra1, k), np.degrees(np.arcsin(rng.uniform(s0, s1, k)))

        frames = []
        # stars: dN/dm ~ 10^(slope m) between mag_bright and mag_faint (inverse-CDF sampling)
        k = rng.poisson(cfg.star_density * area)
        a = 10 ** (cfg.slope * cfg.mag_bright)
        b = 10 ** (cfg.slope * cfg.mag_faint)
        mags = np.log10(a + rng.uniform(0, 1, k) * (b - a)) / cfg.slope
        ra, dec = positions(k)
        frames.append(
            {
                "kind": np.full(k, 0),
                "ra": ra,
                "dec": dec,
                "mag": mags,
                "color": rng.uniform(0.2, 1.4, k),
                "size": np.zeros(k),
            }
        )
        k = rng.poisson(cfg.galaxy_density * area)
        ra, dec = positions(k)
        frames.append(
            {
                "kind": np.full(k, 1),
                "ra": ra,
                "dec": dec,
                "mag": rng.uniform(*cfg.galaxy_mag, k),
                "color": rng.uniform(0.4, 1.2, k),
                "size": rng.uniform(*cfg.galaxy_fwhm_arcsec, k),
            }
        )
        # transients: S/N of the change log-uniform in snr_range under NOMINAL conditions
        for kind, density in ((2, cfg.variable_density), (3, cfg.new_density)):
            k = rng.poisson(density * area)
            ra, dec = positions(k)
            log_lo, log_hi = np.log(cfg.snr_range)
            snr = np.exp(rng.uniform(log_lo, log_hi, k))
            frames.append(
                {
                    "kind": np.full(k, kind),
                    "ra": ra,
                    "dec": dec,
                    "mag": np.zeros(k),
                    "color": np.full(k, 0.6),
                    "size": np.zeros(k),
                    "snr_nominal": snr,
                    "delta_rate": snr_to_rate(snr),
                    "sign": rng.choice([-1, 1], k),
                    "on_frac": rng.uniform(-0.5, 1.0, k),
                    "base_factor": rng.uniform(1.5, 4.0, k),
                }
            )
        df = pd.concat([pd.DataFrame(f) for f in frames], ignore_index=True)
        for col, fill in (
            ("snr_nominal", np.nan),
            ("delta_rate", 0.0),
            ("sign", 0),
            ("on_frac", -np.inf),
            ("base_factor", 0.0),
        ):
            df[col] = df[col].fillna(fill) if col in df else fill
        var = df["kind"] == 2
        # a variable's template flux is a few times its change, so a fading star stays positive
        df.loc[var, "mag"] = rate_to_mag(df.loc[var, "delta_rate"] * df.loc[var, "base_factor"])
        new = df["kind"] == 3
        df.loc[new, "mag"] = rate_to_mag(df.loc[new, "delta_rate"])
        df["t_on"] = np.where(new, self.epoch_mjd + df["on_frac"] * self.span_days, -np.inf)
        df.loc[~df["kind"].isin([2, 3]), "sign"] = 0
        df["id"] = (np.int64(j) * 4096 + i) * 1_000_000 + np.arange(len(df), dtype=np.int64)
        return df.drop(columns=["on_frac", "base_factor"])

    def _cells_near(self, ra: float, dec: float, radius: float):
        h = self.config.cell_deg
        j0 = max(0, int((dec - radius + 90.0) // h))
        j1 = min(int(180.0 / h) - 1, int((dec + radius + 90.0) // h))
        for j in range(j0, j1 + 1):
            n = self._ncells(j)
            d0, d1 = self._band_edges(j)
            cosd = min(math.cos(math.radians(d0)), math.cos(math.radians(d1)))
            cells: Sequence[int]
            if cosd < 1e-3 or radius / cosd >= 180.0:
                cells = range(n)
            else:
                half = radius / cosd
                lo = int(math.floor((ra - half) / 360.0 * n))
                hi = int(math.floor((ra + half) / 360.0 * n))
                cells = sorted({c % n for c in range(lo, hi + 1)})
            for i in cells:
                yield j, i

    # ------------------------------------------------------------ queries
    def sources(self, ra: float, dec: float, radius: float) -> pd.DataFrame:
        """Static sources and transients within ``radius`` degrees of (ra, dec).

        Returns
        -------
        sources : `pandas.DataFrame`
            Columns ``id, kind (0 star, 1 galaxy, 2 variable, 3 new), ra, dec, mag, color,
            size (arcsec FWHM, galaxies), snr_nominal, delta_rate (e-/s, r), sign, t_on``.
        """
        parts = [self._cell(j, i) for j, i in self._cells_near(ra, dec, radius)]
        df = pd.concat(parts, ignore_index=True) if parts else self._cell(0, 0).iloc[:0]
        return df[_angsep(ra, dec, df["ra"].to_numpy(), df["dec"].to_numpy()) <= radius].reset_index(
            drop=True
        )

    def movers_near(self, ra: float, dec: float, radius: float, mjd: float) -> pd.DataFrame:
        """Moving objects within ``radius`` of (ra, dec) at ``mjd`` (same columns, kind 4)."""
        rows = []
        for m in self.movers:
            r, d = m.position(mjd)
            if _angsep(ra, dec, r, d) <= radius:
                rows.append(
                    {
                        "id": m.id,
                        "kind": 4,
                        "ra": r,
                        "dec": d,
                        "mag": m.mag,
                        "color": 0.6,
                        "size": 0.0,
                        "snr_nominal": np.nan,
                        "delta_rate": float(rate(m.mag, "r")),
                        "sign": 1,
                        "t_on": -np.inf,
                    }
                )
        return pd.DataFrame(
            rows,
            columns=[
                "id",
                "kind",
                "ra",
                "dec",
                "mag",
                "color",
                "size",
                "snr_nominal",
                "delta_rate",
                "sign",
                "t_on",
            ],
        )

    @staticmethod
    def kind_name(kind: int) -> str:
        """Name of a kind code (``star``, ``galaxy``, ``variable``, ``new``, ``moving``)."""
        return (*_KINDS, "moving")[int(kind)]

    @staticmethod
    def fluxes(
        src: pd.DataFrame,
        band: str,
        mjd: float,
        exptime: float,
        zp_offset: float = 0.0,
        template: bool = False,
    ) -> np.ndarray:
        """Electrons collected from each source in an exposure (or in the template sky if asked).

        Variables show ``base +- change`` (template: ``base``); new sources show their change
        once switched on (template: nothing); moving objects never appear in templates.
        """
        kind = src["kind"].to_numpy()
        base = rate(src["mag"].to_numpy(), band, src["color"].to_numpy(), zp_offset)
        flat = rate(rate_to_mag(src["delta_rate"].to_numpy() + 1e-30), band, 0.6, zp_offset)
        r = np.where(kind == 2, base, 0.0) if template else base.copy()
        if not template:
            r = np.where(kind == 2, base + src["sign"].to_numpy() * flat, r)
            r = np.where(kind == 3, np.where(mjd >= src["t_on"].to_numpy(), flat, 0.0), r)
        r = np.where((kind <= 1), base, r)
        if template:
            r = np.where(kind >= 3, 0.0, r)
        return r * exptime
