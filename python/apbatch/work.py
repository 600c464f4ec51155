"""`CcdWork`: everything one per-CCD job needs, and the command line that carries it.

This is the contract between the fan-out (which makes work items from events), the
backends (which turn them into batch jobs) and ``apbatch process-ccd`` (which parses the
same options back). Secrets never go on this command line.
"""

from __future__ import annotations

import dataclasses

from .errors import BadInputError

__all__ = ["MAX_NIMAGES", "CcdWork", "check_nimages"]

MAX_NIMAGES = 10
"""Most images one job waits for (``--nimages``; a visit has 1 or 2 snaps)."""


def check_nimages(value: int, field: str, lo: int = 0) -> int:
    """Return ``value`` if a job can wait for that many images, else refuse it.

    The one rule for both sides of the job command line: the event parser applies it to
    ``nimages``/``imagesInSequence`` (so no job is submitted that ``process-ccd`` would
    refuse), and ``process-ccd`` to ``--nimages``.

    Parameters
    ----------
    value : `int`
        The number of images.
    field : `str`
        Name of the field, for the error message.
    lo : `int`
        Smallest allowed value (0 for ``nimages``: unknown).

    Raises
    ------
    BadInputError
        Raised if ``value`` is not in ``[lo, MAX_NIMAGES]``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= MAX_NIMAGES:
        raise BadInputError(field, f"{value!r} is out of range",
                            f"a job waits for {lo} to {MAX_NIMAGES} images of one group")
    return value


@dataclasses.dataclass(frozen=True)
class CcdWork:
    """One CCD of one visit (or of one calibration exposure).

    ``image_names`` may be empty when the job is submitted at ``nextVisit`` (dynamic mode):
    the job then waits for ``nimages`` raws of ``group_id`` at the distributor.
    ``physical_filter`` is `None` when any filter is acceptable or unknown (bias, dark);
    ``ra``/``dec``/``rotation`` are `None` for exposures that do not look at the sky.
    """

    instrument: str
    detector: int
    detector_name: str
    group_id: str
    visit: int
    day_obs: int
    intent: str
    exposure_time: float
    nimages: int
    distributor: str
    ra: float | None = None
    dec: float | None = None
    rotation: float | None = None
    physical_filter: str | None = None
    image_names: tuple[str, ...] = ()
    survey: str = ""

    @property
    def key(self) -> tuple[str, str, int]:
        """The idempotency key: one job per (instrument, group, detector), ever."""
        return (self.instrument, self.group_id, self.detector)

    @property
    def label(self) -> str:
        """Name ops see in squeue / condor_q: ``ap-<instrument>-<visit>``."""
        return f"ap-{self.instrument}-{self.visit}"

    def job_args(self) -> list[str]:
        """Arguments of ``apbatch process-ccd`` for this CCD (without the command itself)."""
        args = [
            "--instrument", self.instrument,
            "--detector", str(self.detector),
            "--group", self.group_id,
            "--visit", str(self.visit),
            "--day-obs", str(self.day_obs),
            "--intent", self.intent,
            "--exposure-time", repr(float(self.exposure_time)),
            "--nimages", str(self.nimages),
            "--distributor", self.distributor,
        ]
        if self.ra is not None and self.dec is not None:
            args += ["--ra", repr(float(self.ra)), "--dec", repr(float(self.dec))]
        if self.rotation is not None:
            args += ["--rotation", repr(float(self.rotation))]
        if self.physical_filter:
            args += ["--filter", self.physical_filter]
        for name in self.image_names:
            args += ["--image", name]
        return args

    def to_dict(self) -> dict:
        """Plain-JSON form (for the ledger and ``--json`` output)."""
        d = dataclasses.asdict(self)
        d["image_names"] = list(self.image_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CcdWork:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["image_names"] = tuple(d.get("image_names") or ())
        return cls(**d)
