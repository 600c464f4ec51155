"""Sky background: a sep (SExtractor) mesh background, subtracted in place."""

from __future__ import annotations

import dataclasses

import numpy as np
import sep

from ...errors import BadInputError
from ...image import Image, MaskBits

__all__ = ["BackgroundResult", "subtract_background"]

_IGNORE = int(MaskBits.BAD | MaskBits.SAT | MaskBits.CR | MaskBits.NO_DATA)


@dataclasses.dataclass
class BackgroundResult:
    """The background that was removed: mean level and global RMS (electrons)."""

    level: float
    rms: float
    box: int


def subtract_background(img: Image, box: int = 128, filter_size: int = 3) -> BackgroundResult:
    """Fit a mesh background (``box`` px cells, median-filtered over ``filter_size`` cells) and subtract it.

    ``img.image`` is changed in place; masked ``BAD``/``SAT``/``CR``/``NO_DATA`` pixels are
    ignored by the fit.

    Raises
    ------
    BadInputError
        Raised if the image has non-finite pixels outside ``NO_DATA``.
    """
    data = img.image
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    ignore = (img.mask & _IGNORE) != 0
    if not np.isfinite(data[~ignore]).all():
        raise BadInputError(
            "image", "non-finite pixels outside NO_DATA", "mask them (NO_DATA) before background"
        )
    bkg = sep.Background(data, mask=ignore, bw=box, bh=box, fw=filter_size, fh=filter_size)
    bkg.subfrom(data)
    img.image = data
    return BackgroundResult(level=float(bkg.globalback), rms=float(bkg.globalrms), box=box)
