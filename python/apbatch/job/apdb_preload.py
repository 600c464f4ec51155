"""APDB reads done before the raw arrives: the region's DiaObjects and their history.

A job knows from nextVisit where it will look about 30 s before its raw arrives.
`PreloadingAssociation.preload` reads the DiaSource and DiaForcedSource history of every
DiaObject in the predicted (padded) region then; after the raw, association re-reads the
DiaObjects themselves (one indexed query: another visit of the field may have stored new
objects in the meantime, and missing them would split objects) and takes the history of the
objects it already knows from the preload, reading only the rest.
"""

from __future__ import annotations

import logging

import astropy.time
import numpy as np
import pandas as pd
from lsst import sphgeom

from .apdb import Association

__all__ = ["PreloadingAssociation"]

log = logging.getLogger(__name__)


class PreloadingAssociation(Association):
    """`Association` whose history reads are served from a preload where they can be.

    Lifetime: one job (the preload is for its CCD); not thread-safe.
    """

    def __init__(self, apdb, **kwargs):
        super().__init__(apdb, **kwargs)
        self._pre_ids: np.ndarray | None = None
        self._pre_sources = pd.DataFrame()
        self._pre_forced = pd.DataFrame()
        self._pre_from = self._pre_until = 0.0

    def preload(self, region: sphgeom.Region, visit_time: astropy.time.Time, slack_days: float = 1.0) -> int:
        """Read the history of every DiaObject in ``region`` up to ``visit_time`` + ``slack_days``.

        Returns
        -------
        n_objects : `int`
            How many DiaObjects the preload covers.
        """
        objects = self.load_objects(region)
        until = visit_time + astropy.time.TimeDelta(slack_days, format="jd")
        start = visit_time - astropy.time.TimeDelta(self.history_days, format="jd")
        ids = [int(i) for i in objects["diaObjectId"]]
        sources = self.apdb.getDiaSources(region, ids, until, start_time=start).reset_index(drop=True)
        forced = self.apdb.getDiaForcedSources(region, ids, until, start_time=start).reset_index(drop=True)
        self._pre_ids = np.asarray(ids, np.int64)
        self._pre_sources, self._pre_forced = sources, forced
        self._pre_from, self._pre_until = float(start.tai.mjd), float(until.tai.mjd)
        log.debug("preloaded %d DiaObjects, %d DiaSources, %d forced", len(objects), len(sources),
                  len(forced))
        return len(self._pre_ids)

    def load_history(self, object_ids, visit_time: astropy.time.Time, region: sphgeom.Region | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """As `Association.load_history`; objects covered by the preload are not read again."""
        ids = np.asarray([int(i) for i in object_ids], np.int64)
        end = float(visit_time.tai.mjd)
        start = end - self.history_days
        if self._pre_ids is None or end > self._pre_until or start < self._pre_from:
            return super().load_history(ids, visit_time, region)
        known = np.isin(ids, self._pre_ids)

        def cut(df: pd.DataFrame) -> pd.DataFrame:
            if not len(df):
                return df
            t = df["midpointMjdTai"].to_numpy(float)
            return df[df["diaObjectId"].isin(ids[known]).to_numpy() & (t >= start) & (t < end)]

        sources, forced = cut(self._pre_sources), cut(self._pre_forced)
        if not known.all():
            more_s, more_f = super().load_history(ids[~known], visit_time, region)
            sources = pd.concat([sources, more_s]) if len(more_s) else sources
            forced = pd.concat([forced, more_f]) if len(more_f) else forced
        return sources.reset_index(drop=True), forced.reset_index(drop=True)
