"""Association with the Alert Production Database (APDB, ``lsst-dax-apdb``).

The per-CCD job loads the DiaObjects of the CCD's padded sky region, associates its new
DiaSources with them (nearest neighbour, one-to-one, within a radius), creates DiaObjects for
the rest, recomputes the summaries of every touched object from its recent history, measures
forced photometry of every object on the difference and science images, and stores all of it
with ``Apdb.store`` in one transaction, in DPDD form (``lsst-sdm-schemas`` ``apdb.yaml``).
Nothing is written before :meth:`Association.store`; a retry first asks
``containsVisitDetector`` (see :mod:`apbatch.job.alerts` for the whole sequence).

Identifiers
-----------
``diaSourceId``, ``diaForcedSourceId`` and new ``diaObjectId`` values are packed from visit,
detector and a per-CCD index; see :mod:`apbatch.job.apdb_ids` for the bit layout. Creating
and opening the database: :mod:`apbatch.job.apdb_setup`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import astropy.time
import numpy as np
import pandas as pd
from lsst import sphgeom
from scipy.spatial import cKDTree

from ..butler.regions import sky_polygon
from ..errors import BadInputError, NonRetriableError, RetriableError
from ..image import Image, MaskBits
from .apdb_ids import pack_id, unpack_id
from .apdb_setup import create_apdb, open_apdb

Photometry = Callable[[Image, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Forced photometry at positions: ``(image, x, y) -> (flux, err)`` in the image's units."""

__all__ = [
    "Association",
    "AssociationResult",
    "BANDS",
    "CcdVisit",
    "create_apdb",
    "forced_photometry",
    "open_apdb",
    "pack_id",
    "unpack_id",
]

_LOG = logging.getLogger(__name__)
BANDS = ("u", "g", "r", "i", "z", "y")
_REQUIRED = ("x", "y", "ra", "dec", "psfFlux", "psfFluxErr")
_BAD_PIXELS = int(MaskBits.BAD | MaskBits.NO_DATA | MaskBits.SAT)


# ------------------------------------------------------------------ the CCD-visit
@dataclasses.dataclass(frozen=True)
class CcdVisit:
    """What association needs to know about one CCD of one visit.

    ``corners`` are the CCD's padded sky corners, (4, 2) degrees, e.g. from
    ``get_instrument(i).footprint(det, ra, dec, rot, pad_arcsec)``.
    """

    instrument: str
    visit: int
    detector: int
    band: str
    midpoint_mjd_tai: float
    corners: tuple[tuple[float, float], ...]
    exposure_time: float | None = None

    @property
    def region(self) -> sphgeom.ConvexPolygon:
        """The padded CCD region as a sphgeom polygon."""
        return sky_polygon(self.corners)

    @property
    def visit_time(self) -> astropy.time.Time:
        """Visit midpoint as an astropy time (TAI)."""
        return astropy.time.Time(self.midpoint_mjd_tai, format="mjd", scale="tai")

    @property
    def name(self) -> str:
        """``<instrument>/<visit>/<detector:03d>``: names spool and alert files."""
        return f"{self.instrument}/{self.visit}/{self.detector:03d}"


@dataclasses.dataclass
class AssociationResult:
    """Everything one CCD-visit contributes to the APDB, plus the history alerts need.

    ``objects`` holds one updated (or new) DiaObject per DiaSource's object, ``sources`` the
    new DiaSources (``diaObjectId`` set), ``forced`` this visit's DiaForcedSources,
    ``prv_sources``/``prv_forced`` the earlier history of the touched objects.
    """

    ccd: CcdVisit
    objects: pd.DataFrame
    sources: pd.DataFrame
    forced: pd.DataFrame
    prv_sources: pd.DataFrame
    prv_forced: pd.DataFrame
    n_new_objects: int = 0


def _now_mjd_tai() -> float:
    return float(astropy.time.Time.now().tai.mjd)


def forced_photometry(image: Image, x: np.ndarray, y: np.ndarray, fwhm_pix: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """PSF-weighted flux of a Gaussian PSF at (x, y), all positions at once.

    flux = sum(P D / V) / sum(P^2 / V), err = 1 / sqrt(sum(P^2 / V)), with P the unit-sum
    Gaussian centred at the sub-pixel position; pixels that are masked BAD/SAT/NO_DATA or have
    no positive variance get zero weight. Units are those of the image (nJy for apbatch).
    """
    n = len(x)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    sigma = fwhm_pix / 2.3548
    half = max(2, int(np.ceil(3 * sigma)))
    offs = np.arange(-half, half + 1)
    xc, yc = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    ny, nx = image.shape
    xs = xc[:, None, None] + offs[None, None, :]
    ys = yc[:, None, None] + offs[None, :, None]
    inside = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    xi, yi = np.clip(xs, 0, nx - 1), np.clip(ys, 0, ny - 1)
    data = image.image[yi, xi].astype(np.float64)
    var = image.variance[yi, xi].astype(np.float64)
    good = inside & np.isfinite(data) & (var > 0) & ((image.mask[yi, xi] & _BAD_PIXELS) == 0)
    dx, dy = xs - x[:, None, None], ys - y[:, None, None]
    psf = np.exp(-0.5 * (dx * dx + dy * dy) / sigma**2)
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    w = np.where(good, psf / np.where(good, var, 1.0), 0.0)
    denom = (w * psf).sum(axis=(1, 2))
    num = (w * np.where(good, data, 0.0)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, num / denom, np.nan), np.where(denom > 0, 1.0 / np.sqrt(denom), np.nan)


def _wmean(values: pd.Series, errors: pd.Series, keys: list) -> pd.DataFrame:
    """Inverse-variance weighted mean and its error per group (NaN where no valid point)."""
    w = 1.0 / errors.astype(float) ** 2
    ok = np.isfinite(w) & np.isfinite(values.astype(float)) & (w > 0)
    frame = pd.DataFrame({"w": w.where(ok, 0.0), "wv": (w * values).where(ok, 0.0)})
    sums = frame.groupby(keys).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame({"mean": sums["wv"] / sums["w"], "err": 1.0 / np.sqrt(sums["w"])}).replace(
            [np.inf, -np.inf], np.nan)


def _empty_like(df: pd.DataFrame | None) -> pd.DataFrame:
    return pd.DataFrame() if df is None else df.iloc[:0]


class Association:
    """Loads, associates and stores one CCD-visit at a time in an injected APDB.

    Parameters
    ----------
    apdb : `lsst.dax.apdb.Apdb`
        An open APDB (``last_object_table`` index mode).
    history_days : `float`
        How far back DiaSource/DiaForcedSource history is read (summaries and alerts).
    radius_arcsec : `float`
        Default association radius.

    Notes
    -----
    Holds no per-visit state; safe to reuse across visits, not across threads (the APDB's
    engine is shared).
    """

    def __init__(self, apdb, *, history_days: float = 365.0, radius_arcsec: float = 1.0):
        self.apdb = apdb
        self.history_days = float(history_days)
        self.radius_arcsec = float(radius_arcsec)

    # ---------------------------------------------------------------- reading
    def load_objects(self, region: sphgeom.Region) -> pd.DataFrame:
        """Latest DiaObjects inside ``region`` (the APDB may return a superset; trimmed here)."""
        objects = self.apdb.getDiaObjects(region)
        if len(objects):
            keep = region.contains(np.radians(objects["ra"].to_numpy(float)),
                                   np.radians(objects["dec"].to_numpy(float)))
            objects = objects[np.asarray(keep, bool)]
        return objects.reset_index(drop=True)

    def load_history(self, object_ids, visit_time: astropy.time.Time, region: sphgeom.Region | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Recent DiaSources and DiaForcedSources of the given objects (``history_days`` back)."""
        start = visit_time - astropy.time.TimeDelta(self.history_days, format="jd")
        ids = [int(i) for i in object_ids]
        region = region if region is not None else sphgeom.Box.full()
        sources = self.apdb.getDiaSources(region, ids, visit_time, start_time=start)
        forced = self.apdb.getDiaForcedSources(region, ids, visit_time, start_time=start)
        return sources.reset_index(drop=True), forced.reset_index(drop=True)

    def load(self, region: sphgeom.Region, visit_time: astropy.time.Time
             ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """DiaObjects in ``region`` and their recent DiaSources and DiaForcedSources."""
        objects = self.load_objects(region)
        sources, forced = self.load_history(objects["diaObjectId"], visit_time, region)
        return objects, sources, forced

    # ---------------------------------------------------------------- matching
    @staticmethod
    def associate(dia_sources: pd.DataFrame, objects: pd.DataFrame, radius_arcsec: float) -> np.ndarray:
        """One-to-one nearest-neighbour match of sources to objects within ``radius_arcsec``.

        Candidate pairs are taken closest first, each source and object at most once.

        Returns
        -------
        match : `numpy.ndarray`
            For each source, the row of ``objects`` it belongs to, or -1 if none.
        """
        match = np.full(len(dia_sources), -1, dtype=np.int64)
        if len(dia_sources) == 0 or len(objects) == 0:
            return match

        def unit(df):
            ra, dec = np.radians(df["ra"].to_numpy(float)), np.radians(df["dec"].to_numpy(float))
            return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])

        chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
        pairs = cKDTree(unit(dia_sources)).sparse_distance_matrix(
            cKDTree(unit(objects)), chord, output_type="ndarray")
        used = np.zeros(len(objects), dtype=bool)
        for k in np.argsort(pairs["v"], kind="stable"):
            i, j = pairs["i"][k], pairs["j"][k]
            if match[i] < 0 and not used[j]:
                match[i], used[j] = j, True
        return match

    # ---------------------------------------------------------------- the whole CCD
    def run(self, ccd: CcdVisit, dia_sources: pd.DataFrame, difference: Image, science: Image,
            psf_fwhm_pix: float, radius_arcsec: float | None = None, *,
            photometry: Photometry | None = None) -> AssociationResult:
        """Load, associate, summarise and measure one CCD-visit; stores nothing.

        ``photometry(image, x, y) -> (flux, err)`` measures the forced sources (the job passes
        `apbatch.job.forced.ForcedPhotometry`: its PSF model, aperture-corrected, as the DIA
        sources are measured); by default a Gaussian of ``psf_fwhm_pix`` (:func:`forced_photometry`).

        Raises
        ------
        BadInputError
            Raised if ``dia_sources`` lacks a required column or ``psf_fwhm_pix`` is not positive.
        RetriableError
            Raised if the APDB cannot be read.
        """
        missing = [c for c in _REQUIRED if c not in dia_sources.columns]
        if missing:
            raise BadInputError(f"dia_sources.{missing[0]}", "column missing", "measure it in the DIA step")
        if not psf_fwhm_pix or psf_fwhm_pix <= 0:
            raise BadInputError("psf_fwhm_pix", f"{psf_fwhm_pix!r} is not a positive PSF FWHM")
        radius = self.radius_arcsec if radius_arcsec is None else radius_arcsec
        region, visit_time = ccd.region, ccd.visit_time
        try:
            objects = self.load_objects(region)
            match = self.associate(dia_sources, objects, radius)
            matched_ids = objects["diaObjectId"].to_numpy(np.int64)[match[match >= 0]]
            prv_sources, prv_forced = self.load_history(matched_ids, visit_time, region)
        except BadInputError:
            raise
        except Exception as exc:
            raise RetriableError(f"APDB read failed: {exc}") from exc
        now = _now_mjd_tai()
        sources = self._dpdd_sources(ccd, dia_sources, now)
        obj_ids = sources["diaSourceId"].to_numpy(np.int64).copy()
        obj_ids[match >= 0] = matched_ids
        sources["diaObjectId"] = obj_ids
        prev = objects.set_index("diaObjectId")
        new_objects = pd.DataFrame({"diaObjectId": sources["diaObjectId"][match < 0],
                                    "ra": sources["ra"][match < 0], "dec": sources["dec"][match < 0]})
        on_ccd = pd.concat([objects[["diaObjectId", "ra", "dec"]], new_objects], ignore_index=True)
        if photometry is None:
            def photometry(img, x, y):
                return forced_photometry(img, x, y, psf_fwhm_pix)
        forced = self._forced(ccd, on_ccd, difference, science, photometry, now)
        summaries = self._summaries(ccd, sources, prv_sources, prv_forced, forced, prev)
        return AssociationResult(ccd, summaries, sources, forced, prv_sources, prv_forced,
                                 int((match < 0).sum()))

    def _dpdd_sources(self, ccd: CcdVisit, cat: pd.DataFrame, now: float) -> pd.DataFrame:
        from lsst.dax.apdb import ApdbTables

        columns = [c.name for c in self.apdb.tableDef(ApdbTables.DiaSource).columns]
        out = cat[[c for c in cat.columns if c in columns]].reset_index(drop=True).copy()
        n = len(out)
        # the job gives its table's ids (the butler's): kept when flagged rows were left out
        if "diaSourceId" not in out:
            out["diaSourceId"] = pack_id(ccd.visit, ccd.detector, np.arange(n))
        out["visit"], out["detector"] = ccd.visit, ccd.detector
        out["band"], out["midpointMjdTai"], out["timeProcessedMjdTai"] = ccd.band, ccd.midpoint_mjd_tai, now
        if ccd.exposure_time is not None:
            out["exposureTime"] = ccd.exposure_time
        for col in ("psfNdata", "trailNdata", "dipoleNdata", "bboxSize"):
            out[col] = out[col].fillna(0).astype(np.int64) if col in out else 0
        flags = [c for c in out.columns if c.startswith("pixelFlags_")]
        if flags:
            out["pixelFlags"] = out[flags].fillna(False).astype(bool).any(axis=1)
        return out

    def _forced(self, ccd, objects, difference, science, photometry, now) -> pd.DataFrame:
        objects = objects.sort_values("diaObjectId", kind="stable").reset_index(drop=True)
        if len(objects):
            x, y = difference.wcs.world_to_pixel_values(objects["ra"].to_numpy(float),
                                                        objects["dec"].to_numpy(float))
            ny, nx = difference.shape
            on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
            objects, x, y = objects[on].reset_index(drop=True), x[on], y[on]
        else:
            x = y = np.zeros(0)
        flux, err = photometry(difference, x, y)
        sflux, serr = photometry(science, x, y)
        return pd.DataFrame({
            "diaForcedSourceId": pack_id(ccd.visit, ccd.detector, np.arange(len(objects)), forced=True),
            "diaObjectId": objects["diaObjectId"].to_numpy(np.int64),
            "ra": objects["ra"].to_numpy(float), "dec": objects["dec"].to_numpy(float),
            "visit": ccd.visit, "detector": ccd.detector, "psfFlux": flux, "psfFluxErr": err,
            "midpointMjdTai": ccd.midpoint_mjd_tai, "scienceFlux": sflux, "scienceFluxErr": serr,
            "band": ccd.band, "timeProcessedMjdTai": now,
        })

    def _summaries(self, ccd, sources, prv_sources, prv_forced, forced, prev) -> pd.DataFrame:
        """DiaObject rows for every object with a source in this visit, from its history."""
        ids = sources["diaObjectId"].to_numpy(np.int64)
        hist = pd.concat([prv_sources[prv_sources["diaObjectId"].isin(ids)], sources], ignore_index=True)
        hist = hist.sort_values(["diaObjectId", "midpointMjdTai"], kind="stable")
        g = hist.groupby("diaObjectId")
        out = pd.DataFrame(index=pd.Index(ids, name="diaObjectId"))
        # position: weighted mean about the first source (RA wrap-safe)
        ra0 = g["ra"].transform("first")
        dra = (hist["ra"] - ra0 + 180.0) % 360.0 - 180.0
        ra_m, dec_m = _wmean(dra, hist["raErr"], hist["diaObjectId"]), _wmean(
            hist["dec"], hist["decErr"], hist["diaObjectId"])
        plain = pd.DataFrame({"dra": dra, "dec": hist["dec"], "id": hist["diaObjectId"]}).groupby("id").mean()
        ra_first = g["ra"].first()
        out["ra"] = ((ra_first + ra_m["mean"].fillna(plain["dra"])) % 360.0).reindex(ids).to_numpy()
        out["dec"] = dec_m["mean"].fillna(plain["dec"]).reindex(ids).to_numpy()
        out["raErr"] = ra_m["err"].reindex(ids).to_numpy()
        out["decErr"] = dec_m["err"].reindex(ids).to_numpy()
        if "ra_dec_Cov" in hist:
            w_ra, w_dec = 1.0 / hist["raErr"].astype(float) ** 2, 1.0 / hist["decErr"].astype(float) ** 2
            cov = w_ra * w_dec * hist["ra_dec_Cov"].astype(float)
            num = cov.groupby(hist["diaObjectId"]).sum(min_count=1)
            den = w_ra.groupby(hist["diaObjectId"]).sum() * w_dec.groupby(hist["diaObjectId"]).sum()
            out["ra_dec_Cov"] = (num / den).reindex(ids).to_numpy()
        else:
            out["ra_dec_Cov"] = np.nan
        fhist = pd.concat([prv_forced[prv_forced["diaObjectId"].isin(ids)],
                           forced[forced["diaObjectId"].isin(ids)]], ignore_index=True)
        for band in BANDS:
            self._band_stats(out, band, hist[hist["band"] == band], fhist[fhist["band"] == band], ids)
        prev_n = prev["nDiaSources"].reindex(ids) if len(prev) else pd.Series(np.nan, index=ids)
        out["nDiaSources"] = (prev_n.fillna(0).astype(np.int64) + 1).to_numpy()
        prev_first = prev["firstDiaSourceMjdTai"].reindex(ids) if len(prev) else pd.Series(np.nan, index=ids)
        out["firstDiaSourceMjdTai"] = prev_first.fillna(g["midpointMjdTai"].min().reindex(ids)).to_numpy()
        out["lastDiaSourceMjdTai"] = ccd.midpoint_mjd_tai
        out["validityStartMjdTai"] = ccd.midpoint_mjd_tai
        return out.reset_index()

    @staticmethod
    def _band_stats(out, band, hist, fhist, ids) -> None:
        key = hist["diaObjectId"]
        flux = hist["psfFlux"].astype(float)
        g = flux.groupby(key)
        psf = _wmean(flux, hist["psfFluxErr"], key)
        sci = _wmean(hist["scienceFlux"], hist["scienceFluxErr"], key) if "scienceFlux" in hist else None
        fp = _wmean(fhist["psfFlux"], fhist["psfFluxErr"], fhist["diaObjectId"])
        dt = hist["midpointMjdTai"].groupby(key).diff()
        slope = (flux.groupby(key).diff() / dt).where(dt > 0).abs().groupby(key).max()
        cols = {
            "psfFluxMean": psf["mean"], "psfFluxMeanErr": psf["err"], "psfFluxSigma": g.std(ddof=1),
            "psfFluxMin": g.min(), "psfFluxMax": g.max(), "psfFluxMaxSlope": slope,
            "psfFluxErrMean": hist["psfFluxErr"].astype(float).groupby(key).mean(),
            "fpFluxMean": fp["mean"], "fpFluxMeanErr": fp["err"],
            "scienceFluxMean": sci["mean"] if sci is not None else None,
            "scienceFluxMeanErr": sci["err"] if sci is not None else None,
        }
        for name, series in cols.items():
            out[f"{band}_{name}"] = np.nan if series is None else series.reindex(ids).to_numpy(float)
        out[f"{band}_psfFluxNdata"] = g.count().reindex(ids).fillna(0).astype(np.int64).to_numpy()

    # ---------------------------------------------------------------- writing
    def contains(self, ccd: CcdVisit) -> bool:
        """`True` if this CCD-visit is already in the APDB (a retry after a successful store)."""
        try:
            return bool(self.apdb.containsVisitDetector(ccd.visit, ccd.detector))
        except Exception as exc:
            raise RetriableError(f"APDB query failed: {exc}") from exc

    def store(self, result: AssociationResult) -> None:
        """Store objects, sources and forced sources in one transaction.

        Raises
        ------
        NonRetriableError
            Raised if the store failed (the transaction was rolled back).
        """
        objects = result.objects.drop(columns=["validityStartMjdTai"], errors="ignore")
        try:
            self.apdb.store(result.ccd.visit_time, objects, result.sources, result.forced)
        except Exception as exc:
            raise NonRetriableError(f"APDB store of {result.ccd.name} failed: {exc}") from exc
