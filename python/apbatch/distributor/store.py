"""The local-directory image distributor: raws land here as the camera reads them out.

Layout
------
::

    <root>/<instrument>/<group_key>/<obs_id>_<detector_name>.fits   the raw, as the camera wrote it
    <root>/<instrument>/<group_key>/<obs_id>_<detector_name>.json   its sidecar, written after the raw

``group_key`` is the group id with every character outside ``[A-Za-z0-9._-]`` replaced by
``_`` (group ids are ISO times with ``:`` and may carry ``#1``/``+1``), so a job that knows
only the group (dynamic mode: image names unknown when it was submitted) lists one
directory, and a job that knows the image name can also find it by ``obs_id``.

Both files are written to a temporary name in the same directory and renamed, the raw
first. A raw counts as *delivered* only when its sidecar exists; it counts as *complete*
only when the file's size (and, if asked, SHA-256) matches the sidecar. Readers therefore
never see half a file, and a raw truncated or altered after delivery is never returned.

Sidecar fields: ``obs_id``, ``group``, ``instrument``, ``detector``, ``detector_name``,
``image_index``, ``images_in_sequence``, ``size`` (bytes), ``sha256`` (hex), ``delivered``
(Unix time the sidecar was written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from ..atomic import replacing, write_atomic
from ..errors import BadInputError

__all__ = ["DistributorStore", "RawEntry", "check_name", "file_sha256", "group_key"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 4 * 1024 * 1024


def group_key(group_id: str) -> str:
    """Directory name of a group: ``2025-06-10T07:31:26.692#1`` -> ``2025-06-10T07_31_26.692_1``."""
    if not group_id:
        raise BadInputError(
            "group", "empty group id", "pass the GROUPID (or the exposure id if there is none)"
        )
    return _SAFE.sub("_", group_id)


def check_name(value: str, field: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise `BadInputError`."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise BadInputError(field, f"{value!r} is not a valid name", "use letters, digits, '.', '_' or '-'")
    return value


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class RawEntry:
    """One delivered raw: its path and its sidecar."""

    path: Path
    obs_id: str
    group: str
    instrument: str
    detector: int | None
    detector_name: str
    size: int
    sha256: str
    image_index: int | None = None
    images_in_sequence: int | None = None
    delivered: float | None = None

    @classmethod
    def from_sidecar(cls, sidecar: Path) -> RawEntry:
        """Read a sidecar; the raw is the ``.fits`` next to it."""
        d = json.loads(sidecar.read_text())
        fields = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(path=sidecar.with_suffix(".fits"), **{k: d.get(k) for k in fields})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what the HTTP service returns); ``path`` is relative to nothing."""
        d = dataclasses.asdict(self)
        d["file"] = self.path.name
        del d["path"]
        return d

    def is_complete(self, verify_checksum: bool = False) -> bool:
        """`True` if the file exists with the sidecar's size (and SHA-256 if asked)."""
        try:
            if self.path.stat().st_size != self.size:
                return False
        except FileNotFoundError:
            return False
        return not verify_checksum or file_sha256(self.path) == self.sha256


class DistributorStore:
    """A distributor directory: deliver raws into it, list what has arrived.

    Stateless apart from ``root``; safe to use from many threads and processes at once
    (every write is temp file + rename, every read re-lists the directory).

    Parameters
    ----------
    root : `str` or `Path`
        Top directory; created on first delivery.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def group_dir(self, instrument: str, group_id: str) -> Path:
        """Directory holding every raw of one group."""
        return self.root / check_name(instrument, "instrument") / group_key(group_id)

    def raw_path(self, instrument: str, group_id: str, obs_id: str, detector_name: str) -> Path:
        """Path a raw is (or will be) delivered to."""
        check_name(obs_id, "obs_id")
        check_name(detector_name, "detector_name")
        return self.group_dir(instrument, group_id) / f"{obs_id}_{detector_name}.fits"

    def deliver(self, src_path: str | Path, metadata: Any = None, *, move: bool = False) -> RawEntry:
        """Put a raw into the store: copy (or move) the file, then write its sidecar.

        Parameters
        ----------
        src_path : `str` or `Path`
            The raw FITS file.
        metadata : `apbatch.raw.RawMetadata` or `dict`, optional
            Needs ``instrument``, ``obs_id``, ``detector_name`` and ``group_id`` (or
            ``group``); ``detector``, ``image_index`` and ``images_in_sequence`` are kept if
            present. Read from the file's header (``apbatch.raw``) when not given.
        move : `bool`
            Rename ``src_path`` into place instead of copying (same file system only).

        Returns
        -------
        entry : `RawEntry`
            The delivered raw.

        Raises
        ------
        BadInputError
            Raised if ``src_path`` does not exist or the metadata lacks a field.
        """
        src = Path(src_path)
        if not src.is_file():
            raise BadInputError("src_path", f"no such file {str(src)!r}", "deliver an existing raw FITS file")
        meta = _metadata_dict(src, metadata)
        dest = self.raw_path(meta["instrument"], meta["group"], meta["obs_id"], meta["detector_name"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            digest, size = file_sha256(src), src.stat().st_size
            os.replace(src, dest)
        else:
            digest, size = _copy_atomic(src, dest)
        entry = RawEntry(path=dest, size=size, sha256=digest, delivered=time.time(), **meta)
        _write_json_atomic(dest.with_suffix(".json"), entry.to_dict())
        return entry

    def list_group(self, instrument: str, group_id: str, detector_name: str | None = None) -> list[RawEntry]:
        """Delivered raws of a group (sidecar present), optionally of one detector, by obs_id."""
        gdir = self.group_dir(instrument, group_id)
        pattern = f"*_{check_name(detector_name, 'detector_name')}.json" if detector_name else "*.json"
        return sorted((_read(p) for p in gdir.glob(pattern)), key=_order)

    def find(self, instrument: str, obs_id: str, detector_name: str) -> RawEntry | None:
        """The delivered raw with this image name and detector, in whichever group it is."""
        check_name(obs_id, "obs_id")
        check_name(detector_name, "detector_name")
        hits = sorted(
            (self.root / check_name(instrument, "instrument")).glob(f"*/{obs_id}_{detector_name}.json")
        )
        return _read(hits[0]) if hits else None


def _order(e: RawEntry) -> tuple:
    return (e.image_index if e.image_index is not None else 0, e.obs_id)


def _read(sidecar: Path) -> RawEntry:
    return RawEntry.from_sidecar(sidecar)


def _metadata_dict(src: Path, metadata: Any) -> dict[str, Any]:
    if metadata is None:
        from ..raw import read_raw_header, translate_header  # noqa: PLC0415 (heavy, rarely needed)

        metadata = translate_header(read_raw_header(src))
    if dataclasses.is_dataclass(metadata) and not isinstance(metadata, type):
        metadata = dataclasses.asdict(metadata)
    if not isinstance(metadata, dict):
        raise BadInputError("metadata", f"expected RawMetadata or dict, got {type(metadata).__name__}")
    group = metadata.get("group_id") or metadata.get("group")
    out = {
        "instrument": metadata.get("instrument"),
        "obs_id": metadata.get("obs_id"),
        "detector_name": metadata.get("detector_name"),
        "group": group,
        "detector": metadata.get("detector"),
        "image_index": metadata.get("image_index"),
        "images_in_sequence": metadata.get("images_in_sequence"),
    }
    for key in ("instrument", "obs_id", "detector_name", "group"):
        if not out[key]:
            raise BadInputError(f"metadata.{key}", "missing", "give it in the metadata or the raw header")
    return out


def _copy_atomic(src: Path, dest: Path) -> tuple[str, int]:
    """Copy ``src`` to a temporary file next to ``dest``, hashing on the way, then rename."""
    h = hashlib.sha256()
    size = 0
    mode = stat.S_IMODE(os.stat(src).st_mode)
    with replacing(dest, mode=mode, durable=False) as tmp:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
        shutil.copystat(src, tmp)
    return h.hexdigest(), size


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1), durable=False)
