"""Raw images in the Rubin camera format: multi-extension FITS, one HDU per amplifier.

`RawExposure` is what readers return and ISR consumes; `RawMetadata` is what the job needs
from the primary header, translated the way obs_lsst does (see ``shared/data/headers/README.md``).

* :func:`translate_header`: primary header -> `RawMetadata` (obs_lsst's rules and its known
  header fix-ups); never fails on null values, only on a header that cannot name the image,
  the detector or the exposure time;
* :func:`read_raw` / :func:`read_raw_header`: read a raw file (plain or RICE tile-compressed),
  checking every expected segment's presence, shape, ``DATASEC`` and checksums;
* :func:`write_raw`: write one atomically (temporary file, then rename), with checksums.
"""

from .fits import read_raw, read_raw_header, segment_header, write_raw
from .header import camera_name, translate_header
from .model import RawExposure, RawMetadata, RawSegment

__all__ = [
    "RawExposure",
    "RawMetadata",
    "RawSegment",
    "camera_name",
    "read_raw",
    "read_raw_header",
    "segment_header",
    "translate_header",
    "write_raw",
]
