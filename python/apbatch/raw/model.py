"""The raw-image data model: `RawMetadata`, `RawSegment`, `RawExposure`."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..instruments import Amplifier

__all__ = ["RawExposure", "RawMetadata", "RawSegment"]


@dataclasses.dataclass(frozen=True)
class RawMetadata:
    """Primary-header facts, translated (obs_lsst rules). `None` where the header has nothing."""

    instrument: str
    detector: int
    detector_name: str
    obs_id: str
    exposure_id: int
    group_id: str
    visit_id: int
    day_obs: int
    seq_num: int
    observation_type: str
    physical_filter: str
    band: str | None
    exposure_time: float
    dark_time: float | None
    requested_exposure_time: float | None
    mjd_begin: float | None
    mjd_end: float | None
    ra: float | None
    dec: float | None
    rotation: float | None
    airmass: float | None
    image_index: int | None
    images_in_sequence: int | None
    science_program: str | None
    reason: str | None
    can_see_sky: bool | None


@dataclasses.dataclass
class RawSegment:
    """One amplifier's raw pixels (``data[y, x]``, integer ADU, with prescan and overscan)."""

    amp: Amplifier
    data: np.ndarray
    header: dict


@dataclasses.dataclass
class RawExposure:
    """A raw CCD image: primary header, translated metadata and the amplifier segments (HDU order)."""

    header: dict
    metadata: RawMetadata
    segments: list[RawSegment]
