"""Client side of the distributor: block until a CCD's raw image(s) have arrived.

:meth:`DistributorClient.from_location` picks the transport from the location string: a
directory path reads a local :class:`~apbatch.distributor.store.DistributorStore`
directly (polling every 10-50 ms: a look costs microseconds), an ``http://host:port`` URL
talks to ``apbatch distributor serve`` (long-poll, then a streamed download with size and
SHA-256 checks into a local cache directory). Either way :meth:`wait_for_raws` returns
local paths of complete files only, or raises `~apbatch.errors.RawTimeoutError` at the
deadline; its ``on_ready`` hands over each raw that is complete before the others (the
first of two snaps), so that a job reads it while the second is still being exposed.
"""

from __future__ import annotations

import abc
import hashlib
import http.client
import json
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from ..atomic import replacing
from ..errors import BadInputError, RawTimeoutError
from .store import DistributorStore, RawEntry, check_name, group_key

__all__ = ["DistributorClient", "HttpDistributorClient", "LocalDistributorClient", "select_raws"]

log = logging.getLogger(__name__)

_FIRST_SLEEP = 0.01
_MAX_SLEEP = 0.2
_LOCAL_MAX_SLEEP = 0.05
"""Longest wait between two looks at a local distributor directory: a look costs ~20-75 us of
CPU, and with 0.2 s a raw waited ~0.1 s on average before the job saw it (on the alert path)."""
_LONG_POLL = 20.0


def select_raws(entries: Sequence[RawEntry], nimages: int, image_names: Sequence[str] = ()) -> list[RawEntry]:
    """The raws a job wants out of what has arrived, in image order.

    With ``image_names`` the wanted set is exactly those names; otherwise the first
    ``nimages`` raws of the group (by ``image_index``, then ``obs_id``).
    """
    if image_names:
        by_name = {e.obs_id: e for e in entries}
        return [by_name[n] for n in image_names if n in by_name]
    return list(entries)[:nimages]


def _wanted(nimages: int, image_names: Sequence[str]) -> int:
    return len(image_names) if image_names else nimages



class _ShortDownloadError(Exception):
    """A download that came back short or with the wrong checksum (nothing is kept)."""

class DistributorClient(abc.ABC):
    """Blocking access to raws at a distributor; see the module docstring.

    Instances hold no open connections and are safe to share between threads. An HTTP client
    without a ``cache_dir`` downloads into a temporary directory of its own, removed by
    :meth:`close` (or when the client is garbage-collected, or at interpreter exit): close it
    once the raws it returned are no longer read (a warm pilot does, after each CCD).
    """

    def close(self) -> None:  # noqa: B027 -- most clients create nothing: not abstract
        """Remove what this client created for itself (nothing for most clients)."""

    def __enter__(self) -> DistributorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def from_location(
        location: str | Path, *, cache_dir: str | Path | None = None, verify_checksum: bool = True
    ) -> DistributorClient:
        """Client for a directory path or an ``http://`` URL.

        Parameters
        ----------
        location : `str` or `Path`
            Distributor directory, or base URL of ``apbatch distributor serve``.
        cache_dir : `str` or `Path`, optional
            HTTP only: where downloaded raws are kept (default: a new temporary directory).
        verify_checksum : `bool`
            Check each raw's SHA-256 against its sidecar before returning it (a 65 MB raw
            costs ~50 ms); the size is always checked.

        Raises
        ------
        BadInputError
            Raised if ``location`` is an URL with a scheme other than http/https.
        """
        loc = str(location)
        if "://" in loc:
            scheme = loc.split("://", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise BadInputError(
                    "--distributor",
                    f"unsupported URL scheme {scheme!r}",
                    "give a directory or an http://host:port URL",
                )
            return HttpDistributorClient(loc, cache_dir=cache_dir, verify_checksum=verify_checksum)
        return LocalDistributorClient(loc, verify_checksum=verify_checksum)

    @abc.abstractmethod
    def wait_for_raws(
        self,
        instrument: str,
        group_id: str,
        detector_name: str,
        nimages: int = 1,
        image_names: Sequence[str] = (),
        timeout: float = 120.0,
        allow_partial: bool = False,
        on_ready: Callable[[Path], None] | None = None,
    ) -> list[Path]:
        """Block until the raw(s) of one CCD of one group are complete; return local paths.

        Parameters
        ----------
        instrument : `str`
            Butler instrument name (``LSSTComCam``).
        group_id : `str`
            The group (``GROUPID``) the images belong to.
        detector_name : `str`
            Detector, e.g. ``R22_S11``.
        nimages : `int`
            How many raws (snaps) to wait for when ``image_names`` is empty.
        image_names : `tuple` [`str`], optional
            Exact image names (obs ids) to wait for; overrides ``nimages``.
        timeout : `float`
            Seconds to wait in all.
        allow_partial : `bool`
            At the deadline return whatever complete raws arrived (at least one) instead of
            raising.
        on_ready : callable, optional
            Called once with the (local) path of each wanted raw as soon as it is complete
            (over HTTP: downloaded) while the others are still awaited; the last one is only
            returned. A job ingests and reads the first snap here, so that only the last one
            is read after the last raw arrived.
            An exception it raises ends the wait and propagates.

        Returns
        -------
        paths : `list` [`Path`]
            Complete raw files, in image order.

        Raises
        ------
        RawTimeoutError
            Raised if the raws are not all complete by the deadline (or, with
            ``allow_partial``, if none is).
        BadInputError
            Raised if an argument is not a valid name or ``nimages`` < 1.
        """

    _delivered: dict[Path, float | None]

    def delivered_at(self, paths: Sequence[Path]) -> float | None:
        """When the distributor had the last of ``paths`` (UTC unix seconds, from its records).

        ``paths`` are what :meth:`wait_for_raws` returned; `None` if the distributor did not say.
        This is the start of the raw -> alert latency (`apbatch.latency`), not when the job
        first looked.
        """
        times = [self._delivered.get(Path(p)) for p in paths]
        known = [t for t in times if t is not None]
        return max(known) if known and len(known) == len(times) else None

    @staticmethod
    def _check_args(instrument, group_id, detector_name, nimages, image_names) -> None:
        check_name(instrument, "instrument")
        check_name(detector_name, "detector")
        group_key(group_id)
        for name in image_names:
            check_name(name, "image name")
        if not image_names and nimages < 1:
            raise BadInputError("nimages", f"{nimages} is not a positive number of images", "pass >= 1")

    @staticmethod
    def _timeout_error(instrument, group_id, detector_name, got, want, timeout) -> RawTimeoutError:
        return RawTimeoutError(
            f"raw for {instrument} group {group_id} detector {detector_name}: {got} of {want} image(s) "
            f"complete after {timeout:g} s"
        )


class LocalDistributorClient(DistributorClient):
    """Reads a distributor directory on a shared or local file system.

    Parameters
    ----------
    root : `str` or `Path`
        The distributor directory.
    verify_checksum : `bool`
        See `DistributorClient.from_location`.
    """

    def __init__(self, root: str | Path, *, verify_checksum: bool = True):
        self.store = DistributorStore(root)
        self.verify_checksum = verify_checksum
        self._delivered: dict[Path, float | None] = {}

    def wait_for_raws(
        self,
        instrument: str,
        group_id: str,
        detector_name: str,
        nimages: int = 1,
        image_names: Sequence[str] = (),
        timeout: float = 120.0,
        allow_partial: bool = False,
        on_ready: Callable[[Path], None] | None = None,
    ) -> list[Path]:
        self._check_args(instrument, group_id, detector_name, nimages, image_names)
        image_names = tuple(image_names)
        want = _wanted(nimages, image_names)
        deadline = time.monotonic() + timeout
        verified: dict[tuple, bool] = {}
        notified: set[Path] = set()
        sleep = _FIRST_SLEEP
        while True:
            ready = [
                e
                for e in self._arrived(instrument, group_id, detector_name, image_names)
                if self._complete(e, verified)
            ]
            chosen = select_raws(ready, nimages, image_names)
            if len(chosen) >= want:
                return self._note(chosen)
            if on_ready is not None:
                for e in chosen:  # the early ones: read while the rest are on their way
                    if e.path not in notified:
                        notified.add(e.path)
                        on_ready(e.path)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if allow_partial and chosen:
                    return self._note(chosen)
                raise self._timeout_error(instrument, group_id, detector_name, len(chosen), want, timeout)
            time.sleep(min(sleep, remaining))
            sleep = min(sleep * 1.5, _LOCAL_MAX_SLEEP)

    def _note(self, chosen: list[RawEntry]) -> list[Path]:
        for e in chosen:
            self._delivered[e.path] = e.delivered
        return [e.path for e in chosen]

    def _arrived(self, instrument, group_id, detector_name, image_names) -> list[RawEntry]:
        entries = self.store.list_group(instrument, group_id, detector_name)
        if image_names:
            have = {e.obs_id for e in entries}
            for name in image_names:
                if name not in have:  # delivered under another group id?
                    found = self.store.find(instrument, name, detector_name)
                    if found is not None:
                        entries.append(found)
        return entries

    def _complete(self, entry: RawEntry, verified: dict) -> bool:
        try:
            st = entry.path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != entry.size:
            return False
        if not self.verify_checksum:
            return True
        key = (str(entry.path), entry.sha256, st.st_size, st.st_mtime_ns)
        if key not in verified:
            verified[key] = entry.is_complete(verify_checksum=True)
            if not verified[key]:
                log.warning("%s: SHA-256 differs from its sidecar; waiting for a good copy", entry.path)
        return verified[key]


class HttpDistributorClient(DistributorClient):
    """Talks to ``apbatch distributor serve``: long-poll for the listing, then download.

    Parameters
    ----------
    base_url : `str`
        ``http://host:port`` of the service.
    cache_dir : `str` or `Path`, optional
        Where downloads go (``<cache>/<instrument>/<group_key>/<file>``).
    verify_checksum : `bool`
        Compare each download's SHA-256 with the one the server sent.
    """

    def __init__(self, base_url: str, *, cache_dir: str | Path | None = None, verify_checksum: bool = True):
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="apbatch-raws-"))
        # only a directory it made itself is removed, never a cache_dir it was given
        self._cleanup = None if cache_dir else weakref.finalize(self, shutil.rmtree, self.cache_dir, True)
        self.verify_checksum = verify_checksum
        self._delivered: dict[Path, float | None] = {}

    def close(self) -> None:
        """Remove the temporary download directory this client made (and the raws in it)."""
        if self._cleanup is not None:
            self._cleanup()

    def wait_for_raws(
        self,
        instrument: str,
        group_id: str,
        detector_name: str,
        nimages: int = 1,
        image_names: Sequence[str] = (),
        timeout: float = 120.0,
        allow_partial: bool = False,
        on_ready: Callable[[Path], None] | None = None,
    ) -> list[Path]:
        self._check_args(instrument, group_id, detector_name, nimages, image_names)
        image_names = tuple(image_names)
        want = _wanted(nimages, image_names)
        deadline = time.monotonic() + timeout
        chosen: list[dict] = []
        early: dict[str, Path] = {}  # obs_id -> path of a raw downloaded and handed to on_ready
        sleep = _FIRST_SLEEP
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # with on_ready, the long poll answers at each new raw, not only at the last
            n = min(len(early) + 1, want) if on_ready is not None else want
            try:
                listing = self._list(
                    instrument, group_id, detector_name, n, image_names, wait=min(remaining, _LONG_POLL)
                )
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                log.warning("distributor %s: %s; retrying", self.base_url, exc)
                time.sleep(min(sleep, max(deadline - time.monotonic(), 0)))
                sleep = min(sleep * 2, 1.0)
                continue
            chosen = self._select(listing, nimages, image_names)
            if on_ready is not None and len(chosen) < want:
                for d in chosen:
                    if d["obs_id"] in early:
                        continue
                    p = self._download(instrument, group_id, d)
                    if p is None:  # short or corrupt: ask again a little later
                        time.sleep(min(_MAX_SLEEP, max(deadline - time.monotonic(), 0)))
                        break
                    early[d["obs_id"]] = p
                    on_ready(p)
                continue
            if len(chosen) >= want:
                paths = self._download_all(instrument, group_id, chosen, early)
                if paths is not None:
                    return self._note(chosen, paths)
                time.sleep(min(_MAX_SLEEP, max(deadline - time.monotonic(), 0)))
        if allow_partial and chosen:
            paths = self._download_all(instrument, group_id, chosen, early)
            if paths:
                return self._note(chosen, paths)
        raise self._timeout_error(instrument, group_id, detector_name, len(chosen), want, timeout)

    def _note(self, chosen: list[dict], paths: list[Path]) -> list[Path]:
        for d, p in zip(chosen, paths, strict=True):
            self._delivered[Path(p)] = d.get("delivered")
        return paths

    @staticmethod
    def _select(listing: list[dict], nimages: int, image_names: Sequence[str]) -> list[dict]:
        if image_names:
            by_name = {d["obs_id"]: d for d in listing}
            return [by_name[n] for n in image_names if n in by_name]
        return listing[:nimages]

    def _list(self, instrument, group_id, detector_name, want, image_names, wait) -> list[dict]:
        q = {"n": str(want), "wait": f"{wait:.3f}"}
        if image_names:
            q["names"] = ",".join(image_names)
        url = (
            f"{self.base_url}/raw/{instrument}/{urllib.parse.quote(group_id, safe='')}/{detector_name}?"
            + urllib.parse.urlencode(q)
        )
        with urllib.request.urlopen(url, timeout=wait + 10) as resp:  # noqa: S310 (http only, checked)
            return json.loads(resp.read())["raws"]

    def _download_all(
        self, instrument, group_id, entries: list[dict], have: dict[str, Path]
    ) -> list[Path] | None:
        paths = []
        for d in entries:
            p = have.get(d["obs_id"]) or self._download(instrument, group_id, d)
            if p is None:
                return None
            paths.append(p)
        return paths

    def _download(self, instrument: str, group_id: str, d: dict) -> Path | None:
        """Fetch one raw into the cache; `None` if it came back short or with the wrong checksum."""
        dest = self.cache_dir / instrument / group_key(group_id) / check_name(d["file"], "file")
        if dest.exists() and dest.stat().st_size == d["size"]:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = f"{self.base_url}/file/{instrument}/{group_key(group_id)}/{d['file']}"
        h = hashlib.sha256()
        try:
            with replacing(dest, durable=False) as tmp:
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:  # noqa: S310
                    expected = resp.headers.get("X-Checksum-SHA256", d["sha256"])
                    size = 0
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                if size != d["size"] or (self.verify_checksum and h.hexdigest() != expected):
                    raise _ShortDownloadError(f"got {size} bytes (want {d['size']}) or bad SHA-256")
        except (urllib.error.URLError, http.client.HTTPException, OSError, _ShortDownloadError) as exc:
            log.warning("%s: download failed (%s); will retry", url, exc)
            return None
        return dest
