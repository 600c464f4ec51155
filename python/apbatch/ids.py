"""Rubin identifiers: image names (obs ids), exposure ids and visit ids.

The rules follow obs_lsst's metadata translators (see ``shared/data/headers/README.md``):

* obs id ``<CAMCODE>_<CONTRLLR>_<DAYOBS>_<SEQNUM:06d>``, e.g. ``MC_O_20250609_000578``;
* ``exposure_id = int(DAYOBS + "%05d" % SEQNUM)``, plus ``index * 1000`` years for the
  simulation/test controllers in ``"OCHPQS"`` (``S`` -> 7000 years, as imSim data have);
* ``visit_id`` = whole seconds from 2015-01-01T00:00 (TAI) to the GROUPID time, then its three
  millisecond digits, then a ``#N``/``+N`` suffix as four digits.

Several strings map to one visit id (``...26.692``, ``...26.692000``, ``...26.692#0``,
``...26.692+0``); the ledger keys a submission on the group string, so events must carry one
spelling per visit: :func:`check_group_id` accepts only the canonical one
(``YYYY-MM-DDTHH:MM:SS.fff``, then ``#N`` with 1 <= N <= 9999 and no leading zero).
"""

from __future__ import annotations

import dataclasses
import datetime
import re

from .errors import BadInputError

__all__ = ["ObsId", "check_group_id", "day_obs_of", "exposure_id", "group_day_obs", "parse_obs_id",
           "visit_id_from_group"]

_OBS_ID_RE = re.compile(
    r"(?P<camcode>[A-Z]{2})_(?P<controller>[A-Z])_(?P<day_obs>\d{8})_(?P<seq_num>\d{6})", re.ASCII
)
# ASCII digits only (\d would take any Unicode digit, another spelling of the same visit).
_GROUP_RE = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})T(?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,6}))?(?:[#+](?P<suffix>\d{1,4}))?",
    re.ASCII,
)
# A group id that starts like this is meant as a time, and must be a canonical one.
_TIME_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}T", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EPOCH = datetime.datetime(2015, 1, 1)
# Controllers whose counters are offset by multiples of 1000 years (obs_lsst: "OCHPQS".index * 1e7).
_CONTROLLER_OFFSETS = "OCHPQS"


@dataclasses.dataclass(frozen=True)
class ObsId:
    """The four parts of a Rubin image name."""

    camcode: str
    controller: str
    day_obs: int
    seq_num: int

    def __str__(self) -> str:
        return f"{self.camcode}_{self.controller}_{self.day_obs:08d}_{self.seq_num:06d}"

    @property
    def exposure_id(self) -> int:
        """Butler exposure id of this image."""
        return exposure_id(self.day_obs, self.seq_num, self.controller)


def parse_obs_id(obs_id: str, field: str = "imageName") -> ObsId:
    """Split an image name into its parts.

    Raises
    ------
    BadInputError
        Raised if ``obs_id`` is not of the form ``MC_O_20250609_000578``.
    """
    m = _OBS_ID_RE.fullmatch(obs_id or "")
    if not m:
        raise BadInputError(field, f"{obs_id!r} is not an image name", "expected e.g. MC_O_20250609_000578")
    return ObsId(m["camcode"], m["controller"], int(m["day_obs"]), int(m["seq_num"]))


def exposure_id(day_obs: int, seq_num: int, controller: str = "O") -> int:
    """Exposure id from day_obs, sequence number and controller (obs_lsst rules, current era)."""
    base = int(f"{day_obs:08d}{seq_num:05d}")
    # O and C share the on-sky counter; H is always shifted, P/Q/S were until 2025-04-17.
    shifted = controller == "H" or (controller in "PQS" and day_obs < 20250417)
    if shifted:
        base += _CONTROLLER_OFFSETS.index(controller) * 10_000_000 * 100_000
    return base


def visit_id_from_group(group_id: str, field: str = "groupId") -> int:
    """Visit id from a group id that is an ISO TAI time (obs_lsst's rule).

    Raises
    ------
    BadInputError
        Raised if ``group_id`` is not an ISO time with an optional ``#N``/``+N`` suffix.
    """
    # fullmatch: a "$" would match before a trailing newline, and "...692\n" is not a group id.
    m = _GROUP_RE.fullmatch(group_id or "")
    if not m:
        raise BadInputError(field, f"{group_id!r} is not an ISO-time group id",
                            "expected e.g. 2025-06-10T07:31:26.692 or 2024-06-25T01:26:31.895#1")
    try:
        t = datetime.datetime.fromisoformat(f"{m['date']}T{m['time']}")
    except ValueError as exc:
        raise BadInputError(field, f"{group_id!r} is not a valid time: {exc}") from None
    frac = (m["frac"] or "0").ljust(3, "0")[:3]
    seconds = int((t - _EPOCH).total_seconds())
    if seconds < 0:
        raise BadInputError(field, f"{group_id!r} is before 2015-01-01", "group ids are times of this survey")
    suffix = int(m["suffix"] or 0)
    return int(f"{seconds}{frac}{suffix:04d}")


def group_day_obs(group_id: str) -> int | None:
    """Observing day (YYYYMMDD) of a group id that is an ISO TAI time, else `None`.

    A visit's group is named for the time it was planned, just before its first exposure, so its
    day_obs is the visit's: replays that retime the events (``apbatch sim replay``) keep the
    simulated night's day_obs, which the image names (``imageDate``) carry too.
    """
    m = _GROUP_RE.fullmatch(group_id or "")
    if not m:
        return None
    try:
        t = datetime.datetime.fromisoformat(f"{m['date']}T{m['time']}")
    except ValueError:
        return None
    return day_obs_of(t)


def check_group_id(group_id: str, field: str = "groupId", time_required: bool = False) -> str:
    """Return ``group_id`` if it is the one spelling of its visit's group, else refuse it.

    A group id that looks like a time (``YYYY-MM-DDT...``) must be canonical:
    ``YYYY-MM-DDTHH:MM:SS.fff`` with exactly three millisecond digits, then optionally ``#N``
    (``1 <= N <= 9999``, no leading zero). Other strings (calibration groups such as
    ``bias-seq-7``) are kept verbatim, but never with white space around them or control
    characters in them.

    Parameters
    ----------
    group_id : `str`
        The group id as received.
    field : `str`
        Name of the field, for the error message.
    time_required : `bool`
        If `True` (nextVisit), the group id must be a time: its visit id comes from it.

    Raises
    ------
    BadInputError
        Raised if ``group_id`` has surrounding white space or control characters, is not a
        time when one is required, or is a non-canonical spelling of a time group (the
        message gives the canonical one).
    """
    if group_id != group_id.strip() or _CONTROL.search(group_id):
        raise BadInputError(field, f"{group_id!r} has surrounding white space or control characters",
                            "send the group id exactly as the camera writes GROUPID")
    if not time_required and not _TIME_LIKE.match(group_id):
        return group_id
    visit = visit_id_from_group(group_id, field)
    m = _GROUP_RE.fullmatch(group_id)
    assert m is not None  # visit_id_from_group matched it
    suffix = visit % 10_000
    millis = (m["frac"] or "").ljust(3, "0")[:3]
    canonical = f"{m['date']}T{m['time']}.{millis}" + (f"#{suffix}" if suffix else "")
    if group_id != canonical:
        raise BadInputError(field, f"{group_id!r} is not the canonical spelling of its group (visit {visit})",
                            f"send {canonical!r}: 3 millisecond digits, a '#N' counter only if N >= 1")
    return group_id


def day_obs_of(t: datetime.datetime) -> int:
    """Observing day (YYYYMMDD) of a TAI time: the date of ``t - 12 h``."""
    d = (t - datetime.timedelta(hours=12)).date()
    return int(d.strftime("%Y%m%d"))
