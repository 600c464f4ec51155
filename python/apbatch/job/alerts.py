"""Alerts: Avro packets in the official ``lsst-alert-packet`` schema, with FITS cutouts.

Each alert holds the new ``diaSource``, its ``diaObject``, the object's earlier DiaSources and
DiaForcedSources (``prvDiaSources``/``prvDiaForcedSources``, within ``history_days``) and three
cutouts (science, template, difference) as FITS bytes that ``astropy.nddata.CCDData.read``
reads back: primary HDU image (float32) with the CCD's TAN-SIP WCS shifted to the cutout,
``MASK`` (int32 mask bits) and ``UNCERT`` (variance, ``UTYPE = 'VarianceUncertainty'``).

Speed: the FITS headers are built once per WCS and only the two CRPIX cards change per
cutout; the pixel stamps of all sources are gathered at once and converted to big-endian in
one numpy call. :meth:`AlertBuilder.payloads` does not go through dicts: every DiaSource,
DiaForcedSource and DiaObject row is Avro-encoded once, vectorised (`alert_avro`), and each
alert body is the concatenation of those pieces (an Avro record is its fields back to back; an
array is a count, the items and a 0), byte-identical to ``fastavro.schemaless_writer`` of the
:meth:`AlertBuilder.records` dict. Packets are framed as Rubin does on Kafka: magic byte 0, a
4-byte big-endian schema id (major*100+minor, 1101 for 11.1), then the schemaless Avro body.
The schema is the one ``alerts.schema_version`` names (`alert_schemas.alert_schema`), so a site
can write what its consumers read (lsst-alert-stream's default registry knows 11.0 only).

:func:`process_ccd_alerts` is the kill-safe per-CCD sequence: associate -> build -> spool
(atomic) -> APDB store (one transaction) -> deliver from the spool.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import struct
from collections.abc import Callable, Iterator

import fastavro
import numpy as np
import pandas as pd

from ..image import Image, MaskBits
from .alert_avro import RecordEncoder, alert_encoders, encoded_long, record_schema, records_of
from .alert_schemas import alert_schema
from .alert_sinks import AlertSink, AlertSpool, deliver
from .apdb import Association, AssociationResult, CcdVisit

__all__ = [
    "AlertBuilder",
    "CcdAlertReport",
    "CutoutWriter",
    "frame",
    "process_ccd_alerts",
    "unframe",
]

_LOG = logging.getLogger(__name__)
_BLOCK = 2880


def frame(schema_id: int, body: bytes) -> bytes:
    """Rubin's Kafka framing: magic byte 0, 4-byte big-endian schema id, Avro body."""
    return struct.pack(">bi", 0, schema_id) + body


def unframe(payload: bytes) -> tuple[int, bytes]:
    """Split a framed packet into (schema id, Avro body).

    Raises
    ------
    ValueError
        Raised if the magic byte is not 0.
    """
    magic, schema_id = struct.unpack(">bi", payload[:5])
    if magic != 0:
        raise ValueError(f"not a Rubin-framed alert (magic byte {magic})")
    return schema_id, payload[5:]


def _card(key: str, value) -> bytes:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        text = "T" if value else "F"
    elif isinstance(value, str):
        text = "'" + value.replace("'", "''").ljust(8) + "'"
        return f"{key:<8}= {text:<20}".ljust(80).encode("ascii")
    elif isinstance(value, float):
        text = repr(value).upper() if math.isfinite(value) else "0.0"
    else:
        text = str(value)
    return f"{key:<8}= {text:>20}".ljust(80).encode("ascii")


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % _BLOCK)


def _extension(bitpix: int, size: int) -> list[bytes]:
    """The leading cards of a ``size`` x ``size`` image extension."""
    return [_card("XTENSION", "IMAGE"), _card("BITPIX", bitpix), _card("NAXIS", 2), _card("NAXIS1", size),
            _card("NAXIS2", size), _card("PCOUNT", 0), _card("GCOUNT", 1)]


class CutoutWriter:
    """Writes ``size`` x ``size`` FITS cutouts of one `Image` at many positions.

    Build one per image per CCD (the header template is made here, or taken from ``like``, a
    writer of an image with the very same WCS object); not thread-safe.
    """

    image: Image
    size: int

    def __init__(self, image: Image, size: int, like: CutoutWriter | None = None):
        if like is not None and like.size == size and like.image.wcs is image.wcs:
            self.__dict__.update(like.__dict__)  # header template only; fits() never mutates it
            self.image = image
            return
        self.image, self.size = image, size
        head = [_card("SIMPLE", True), _card("BITPIX", -32), _card("NAXIS", 2), _card("NAXIS1", size),
                _card("NAXIS2", size), _card("EXTEND", True)]
        self._crpix = (0.0, 0.0)
        if image.wcs is not None:
            hdr = image.wcs.to_header(relax=True)
            self._crpix = (float(hdr["CRPIX1"]), float(hdr["CRPIX2"]))
            for key, value in hdr.items():
                if key not in ("WCSAXES", "DATE-OBS", "MJD-OBS", "DATEREF", "MJDREFI", "MJDREFF") and key:
                    head.append(_card(key, value))
        head.append(_card("BUNIT", "nJy"))
        self._crpix_at = [i for i, c in enumerate(head) if c[:8] in (b"CRPIX1  ", b"CRPIX2  ")]
        self._head = head
        end = [b"END".ljust(80)]
        mask_cards = _extension(32, size) + [_card("EXTNAME", "MASK")]
        self._mask_hdr = _pad(b"".join(mask_cards + end), b" ")
        var_cards = _extension(-32, size) + [_card("EXTNAME", "UNCERT"),
                                             _card("UTYPE", "VarianceUncertainty")]
        self._var_hdr = _pad(b"".join(var_cards + end), b" ")
        self._end = end
        self._pad_bytes = b"\0" * (-(size * size * 4) % _BLOCK)

    def stamps(self, x: np.ndarray, y: np.ndarray):
        """Big-endian image, mask and variance stamps centred on (x, y); NaN/NO_DATA off the image."""
        n, s = len(x), self.size
        x0 = np.rint(np.asarray(x, float)).astype(np.int64) - s // 2
        y0 = np.rint(np.asarray(y, float)).astype(np.int64) - s // 2
        off = np.arange(s)
        xs, ys = x0[:, None, None] + off[None, None, :], y0[:, None, None] + off[None, :, None]
        ny, nx = self.image.shape
        inside = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        xi, yi = np.clip(xs, 0, nx - 1), np.clip(ys, 0, ny - 1)
        img = np.where(inside, self.image.image[yi, xi], np.float32(np.nan)).astype(">f4")
        var = np.where(inside, self.image.variance[yi, xi], np.float32(np.nan)).astype(">f4")
        msk = np.where(inside, self.image.mask[yi, xi], np.int32(MaskBits.NO_DATA)).astype(">i4")
        # (n, s*s), not (n, -1): a CCD-visit without a source to alert on has n = 0
        return x0, y0, img.reshape(n, s * s), msk.reshape(n, s * s), var.reshape(n, s * s)

    def fits(self, x0: int, y0: int, img: np.ndarray, msk: np.ndarray, var: np.ndarray) -> bytes:
        """One cutout's FITS bytes from its stamp rows (from :meth:`stamps`)."""
        head = list(self._head)
        if self._crpix_at:
            head[self._crpix_at[0]] = _card("CRPIX1", self._crpix[0] - float(x0))
            head[self._crpix_at[1]] = _card("CRPIX2", self._crpix[1] - float(y0))
        primary = b"".join(head + self._end)
        pad = self._pad_bytes
        return b"".join((primary, b" " * (-len(primary) % _BLOCK), img.tobytes(), pad,
                         self._mask_hdr, msk.tobytes(), pad, self._var_hdr, var.tobytes(), pad))

    def all(self, x: np.ndarray, y: np.ndarray) -> list[bytes]:
        """FITS bytes of the cutouts at every (x, y)."""
        x0, y0, img, msk, var = self.stamps(x, y)
        return [self.fits(x0[i], y0[i], img[i], msk[i], var[i]) for i in range(len(x0))]


def _fields(schema: dict, name: str) -> list[str]:
    return [g["name"] for g in record_schema(schema, name)["fields"]]


def _object_ids(df: pd.DataFrame) -> list[int | None]:
    col = df["diaObjectId"]
    null = col.isna().to_numpy(bool)
    values = col.to_numpy(dtype=np.int64, na_value=0).tolist()
    return [None if n else v for v, n in zip(values, null.tolist(), strict=True)] if null.any() else values


class AlertBuilder:
    """Builds and serialises the alerts of one CCD-visit.

    Parameters
    ----------
    schema : `lsst.alert.packet.Schema`, optional
        The schema alerts are written with (``alert_schemas.alert_schema(alerts.schema_version)``);
        default: the newest shipped. Packets are framed with its id.
    cutout_size : `int`
        Cutout side, pixels.
    history_days : `float`
        Window of ``prvDiaSources``/``prvDiaForcedSources`` before the visit.

    Notes
    -----
    Immutable after construction; safe to reuse across CCD-visits in one thread.
    """

    def __init__(self, schema=None, cutout_size: int = 30, history_days: float = 365.0):
        self.schema = schema = alert_schema() if schema is None else schema
        self.schema_id = int(schema.get_schema_id())
        self._parsed = fastavro.parse_schema(schema.definition)
        self.cutout_size, self.history_days = int(cutout_size), float(history_days)
        d = schema.definition
        self._top_fields = [f["name"] for f in d["fields"]]
        self._src_fields, self._obj_fields = _fields(d, "diaSource"), _fields(d, "diaObject")
        self._frc_fields = _fields(d, "prvDiaForcedSources")
        self._encoders = alert_encoders(d)

    def _history(self, df: pd.DataFrame, ccd: CcdVisit) -> pd.DataFrame:
        """Rows of ``df`` within the history window before ``ccd``, oldest first (stable)."""
        mjd = df["midpointMjdTai"]
        df = df[(mjd >= ccd.midpoint_mjd_tai - self.history_days) & (mjd < ccd.midpoint_mjd_tai)]
        return df.sort_values("midpointMjdTai", kind="stable")

    def _cutouts(self, src: pd.DataFrame, science: Image, template: Image, difference: Image
                 ) -> dict[str, list[bytes]]:
        x, y = src["x"].to_numpy(float), src["y"].to_numpy(float)
        first = CutoutWriter(science, self.cutout_size)
        return {"Science": first.all(x, y),
                "Template": CutoutWriter(template, self.cutout_size, first).all(x, y),
                "Difference": CutoutWriter(difference, self.cutout_size, first).all(x, y)}

    def records(self, result: AssociationResult, science: Image, template: Image, difference: Image
                ) -> Iterator[dict]:
        """Alert dicts, one per DiaSource of ``result``, in DiaSource order."""
        src = result.sources

        def by_object(df: pd.DataFrame, fields: list[str]) -> dict[int, list[dict]]:
            df = self._history(df, result.ccd)
            out: dict[int, list[dict]] = {}
            for oid, rec in zip(df["diaObjectId"].to_numpy(np.int64), records_of(df, fields), strict=False):
                out.setdefault(int(oid), []).append(rec)
            return out

        prv_src = by_object(result.prv_sources, self._src_fields)
        prv_frc = by_object(result.prv_forced, self._frc_fields)
        objects = {r["diaObjectId"]: r for r in records_of(result.objects, self._obj_fields)}
        cut = self._cutouts(src, science, template, difference)
        for i, rec in enumerate(records_of(src, self._src_fields)):
            oid = rec["diaObjectId"]
            values = {
                "diaSourceId": rec["diaSourceId"], "alertId": rec["diaSourceId"], "diaSource": rec,
                "prvDiaSources": prv_src.get(oid, []), "prvDiaForcedSources": prv_frc.get(oid, []),
                "diaObject": objects.get(oid), "cutoutDifference": cut["Difference"][i],
                "cutoutScience": cut["Science"][i], "cutoutTemplate": cut["Template"][i],
            }
            # exactly the schema's fields: what an older schema lacks is dropped, the rest null
            yield {name: values.get(name) for name in self._top_fields}

    def _history_arrays(self, encoder: RecordEncoder, df: pd.DataFrame, ccd: CcdVisit) -> dict[int, bytes]:
        """Per DiaObject id: the Avro array body (count, records, end) of its history rows."""
        df = self._history(df, ccd)
        if len(df) == 0:
            return {}
        oids = df["diaObjectId"].to_numpy(np.int64)
        order = np.argsort(oids, kind="stable")  # by object, oldest first within each
        buf, off = encoder.encode(df.iloc[order])
        uniq, first, count = np.unique(oids[order], return_index=True, return_counts=True)
        return {oid: encoded_long(n) + buf[off[s]:off[s + n]] + b"\0"
                for oid, s, n in zip(uniq.tolist(), first.tolist(), count.tolist(), strict=True)}

    def _bodies(self, encoders: tuple[RecordEncoder, RecordEncoder, RecordEncoder], result: AssociationResult,
                science: Image, template: Image, difference: Image) -> list[tuple[int, bytes]]:
        """:meth:`payloads` assembled from per-row encodings (Avro concatenates record fields);
        ``encoders`` are the DiaSource, DiaForcedSource and DiaObject ones."""
        enc_src, enc_frc, enc_obj = encoders
        src = result.sources
        buf, off = enc_src.encode(src)
        obuf, ooff = enc_obj.encode(result.objects)
        objects = {oid: b"\2" + obuf[a:b] for oid, a, b in zip(
            result.objects["diaObjectId"].tolist(), ooff[:-1].tolist(), ooff[1:].tolist(), strict=True)}
        prv_src = self._history_arrays(enc_src, result.prv_sources, result.ccd)
        prv_frc = self._history_arrays(enc_frc, result.prv_forced, result.ccd)
        cut = self._cutouts(src, science, template, difference)
        head, null2, empty = struct.pack(">bi", 0, self.schema_id), b"\0\0", b"\0"
        out = []
        ids = src["diaSourceId"].tolist()
        rows = zip(ids, _object_ids(src), off[:-1].tolist(), off[1:].tolist(), strict=True)
        for i, (sid, oid, a, b) in enumerate(rows):
            # an unassociated source (null diaObjectId) has no history and no DiaObject
            src_hist = empty if oid is None else prv_src.get(oid, empty)
            frc_hist = empty if oid is None else prv_frc.get(oid, empty)
            parts = [head, encoded_long(sid), null2, buf[a:b], b"\2", src_hist, b"\2", frc_hist,
                     objects.get(oid, empty), null2]
            for name in ("Difference", "Science", "Template"):
                blob = cut[name][i]
                parts += (b"\2", encoded_long(len(blob)), blob)
            out.append((sid, b"".join(parts)))
        return out

    def serialize(self, record: dict) -> bytes:
        """Rubin-framed Avro bytes of one alert."""
        buf = io.BytesIO()
        buf.write(struct.pack(">bi", 0, self.schema_id))
        fastavro.schemaless_writer(buf, self._parsed, record)
        return buf.getvalue()

    def payloads(self, result: AssociationResult, science: Image, template: Image, difference: Image
                 ) -> list[tuple[int, bytes]]:
        """(diaSourceId, framed packet) for every alert of the CCD-visit.

        Same bytes as :meth:`serialize` of each of :meth:`records`, built faster: each record is
        encoded once, vectorised, and the alert body is assembled from the pieces.
        """
        if self._encoders is not None:
            return self._bodies(self._encoders, result, science, template, difference)
        return [(r["diaSource"]["diaSourceId"], self.serialize(r))
                for r in self.records(result, science, template, difference)]

    def deserialize(self, payload: bytes) -> dict:
        """Decode a framed packet (checks the schema id)."""
        schema_id, body = unframe(payload)
        if schema_id != self.schema_id:
            raise ValueError(f"packet has schema id {schema_id}, this builder {self.schema_id}")
        record = fastavro.schemaless_reader(io.BytesIO(body), self._parsed)
        if not isinstance(record, dict):  # an alert schema is a record: always a dict
            raise ValueError(f"packet decodes to {type(record).__name__}, not an alert record")
        return record


@dataclasses.dataclass
class CcdAlertReport:
    """What :func:`process_ccd_alerts` did for one CCD-visit."""

    name: str
    stored: bool  # stored by this run (False: a retry found it already stored)
    alerts: int
    delivered: int
    pending: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def process_ccd_alerts(ccd: CcdVisit, dia_sources: pd.DataFrame, science: Image, template: Image,
                       difference: Image, *, psf_fwhm_pix: float, association: Association,
                       builder: AlertBuilder, spool: AlertSpool, sink: AlertSink, send_timeout: float = 30.0,
                       checkpoint: Callable[[str], None] | None = None,
                       photometry: Callable | None = None) -> CcdAlertReport:
    """Associate, store and alert one CCD-visit; safe to rerun after a crash at any point.

    Order: if the APDB already holds the CCD-visit, only deliver what its spool still owes.
    Otherwise associate, build the alerts, write them to the spool (atomically, replacing any
    spool of an attempt that never reached the APDB), store in one transaction, then deliver
    from the spool; entries are marked sent only after the sink confirmed them. Alerts the
    sink could not deliver within ``send_timeout`` stay spooled for ``apbatch alerts flush``.

    Parameters
    ----------
    checkpoint : callable, optional
        Called with ``"associated"``, ``"spooled"`` (the APDB store comes next), ``"stored"``,
        ``"delivered"``, and ``"already_stored"`` instead of the first three on a rerun; tests
        inject crashes here, the job boundary learns from it whether the APDB was reached.
    photometry : callable, optional
        Forced photometry of the DiaObjects (`apbatch.job.apdb.Association.run`).

    Raises
    ------
    BadInputError, RetriableError
        Raised before anything was stored.
    NonRetriableError
        Raised if the store failed, or the CCD-visit is stored but its spool is gone.
    """
    from ..errors import NonRetriableError

    hook = checkpoint or (lambda point: None)
    name = ccd.name
    stored = False
    if association.contains(ccd):
        if not spool.exists(name):
            raise NonRetriableError(f"{name} is in the APDB but its alert spool is missing; "
                                    "alerts cannot be rebuilt without changing the APDB")
        _LOG.info("%s already stored; delivering what its spool still owes", name)
        hook("already_stored")
    else:
        result = association.run(ccd, dia_sources, difference, science, psf_fwhm_pix, photometry=photometry)
        hook("associated")
        spool.write(name, builder.payloads(result, science, template, difference), builder.schema_id)
        hook("spooled")
        association.store(result)
        stored = True
        hook("stored")
    total, delivered = deliver(spool, name, sink, send_timeout)
    hook("delivered")
    if delivered < total:
        _LOG.warning("%s: %d of %d alerts still spooled; run 'apbatch alerts flush'", name,
                     total - delivered, total)
    return CcdAlertReport(name, stored, total, delivered, total - delivered)
