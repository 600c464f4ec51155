"""`Image`: a CCD-sized image with mask, variance, WCS and metadata, and its FITS form.

Used for calibrations (bias, flat), templates, calibrated and difference images. The FITS
form is one file with three image HDUs ``IMAGE`` (float32), ``MASK`` (int32 bit mask, see
:class:`MaskBits`) and ``VARIANCE`` (float32); the WCS is written in the ``IMAGE`` header and
``metadata`` as header cards in the primary HDU (keys upper-cased, at most 8 characters, or
as HIERARCH cards). Files are written to a temporary name and renamed, so a reader never sees
half a file.

Compression: the mask is always tile-compressed losslessly (RICE; as int16 when its bits fit,
which decompresses ~10x faster than int32; it is read back as int32). Image and variance are
RICE-compressed with dithered quantization by default (a 4k x 4k image: 65 MB -> ~14 MB), or
stored exactly with ``lossless=True``. The quantization step comes from the variance plane,
which is the noise: 1/16 of the 5th-percentile sigma for the image (added error <= 0.02
sigma) and 1/1000 of the 5th-percentile variance for the variance (not dithered: a smooth or
constant variance stays exact to the step). Passing the step to
cfitsio's quantizer (a negative ``quantize_level``) spares it estimating each tile's noise
from pixel differences, which made writing three times slower. Without a usable variance,
the tile-noise estimate (``QUANTIZE_LEVEL``) is used.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.hdu.compressed import DITHER_SEED_CHECKSUM
from astropy.wcs import WCS

from .atomic import replacing

__all__ = ["PLANES", "QUANTIZE_LEVEL", "Image", "MaskBits", "noise_quantization_steps", "read_image",
           "write_image"]


class MaskBits(enum.IntFlag):
    """Mask plane bits (names as in LSST's afw mask planes)."""

    BAD = 1
    SAT = 2
    INTRP = 4
    CR = 8
    EDGE = 16
    DETECTED = 32
    DETECTED_NEGATIVE = 64
    SUSPECT = 128
    NO_DATA = 256


@dataclasses.dataclass(init=False)
class Image:
    """A 2-d image with its planes and sky WCS.

    Not thread-safe for writes; arrays are shared, not copied, by the constructor.
    Array axis 0 is y (rows), axis 1 is x (columns); pixel (x, y) is ``image[y, x]`` and
    the WCS takes 0-based (x, y). ``variance`` defaults to zeros and ``mask`` to no bits set,
    so both planes always exist.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None
    metadata: dict

    def __init__(self, image: np.ndarray, variance: np.ndarray | None = None, mask: np.ndarray | None = None,
                 wcs: WCS | None = None, metadata: dict | None = None):
        self.image = np.asarray(image, dtype=np.float32)
        self.variance = np.zeros_like(self.image) if variance is None else variance
        self.mask = np.zeros(self.image.shape, dtype=np.int32) if mask is None else mask
        self.wcs = wcs
        self.metadata = {} if metadata is None else metadata

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        return self.image.shape

    def cutout(self, x: float, y: float, size: int) -> Image:
        """A ``size`` x ``size`` cutout centred on pixel (x, y), padded with NaN/NO_DATA at edges."""
        half = size // 2
        x0, y0 = int(round(x)) - half, int(round(y)) - half
        ny, nx = self.image.shape
        out_img = np.full((size, size), np.nan, np.float32)
        out_var = np.full((size, size), np.nan, np.float32)
        out_msk = np.full((size, size), int(MaskBits.NO_DATA), np.int32)
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + size, nx), min(y0 + size, ny)
        if sx1 > sx0 and sy1 > sy0:
            dst = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
            src = (slice(sy0, sy1), slice(sx0, sx1))
            out_img[dst] = self.image[src]
            out_var[dst] = self.variance[src]
            out_msk[dst] = self.mask[src]
        wcs = self.wcs.slice((slice(y0, y0 + size), slice(x0, x0 + size))) if self.wcs is not None else None
        return Image(out_img, out_var, out_msk, wcs, {"CUTX0": x0, "CUTY0": y0})


def _meta_cards(metadata: dict) -> list:
    cards = []
    for key, value in metadata.items():
        if value is None or isinstance(value, dict | list | tuple):
            continue
        k = str(key).upper()
        if len(k) > 8 or not k.replace("-", "").replace("_", "").isalnum():
            k = f"HIERARCH {k}"
        if isinstance(value, np.generic):
            value = value.item()
        cards.append((k, value))
    return cards


QUANTIZE_LEVEL = 16.0
# square tiles: reading a box (a template patch's overlap with a CCD) decompresses only its tiles
TILE_SHAPE = (512, 512)


def noise_quantization_steps(variance: np.ndarray) -> tuple[float, float] | None:
    """Quantization steps (image, variance) from a variance plane: 1/:data:`QUANTIZE_LEVEL` of
    the 5th-percentile sigma and 1/1000 of the 5th-percentile variance (module docstring);
    `None` if fewer than 100 sampled pixels have a finite positive variance."""
    v = np.asarray(variance).ravel()[:: max(1, variance.size // 200_000)]
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < 100:
        return None
    low = float(np.percentile(v, 5))
    return float(np.sqrt(low)) / QUANTIZE_LEVEL, low / 1000.0


def _quantize_steps(variance: np.ndarray) -> tuple[float, float]:
    """cfitsio ``quantize_level`` for the image and variance planes (negative: an absolute step)."""
    steps = noise_quantization_steps(variance)
    if steps is None:
        return QUANTIZE_LEVEL, QUANTIZE_LEVEL
    return -steps[0], -steps[1]


def _float_hdu(data: np.ndarray, name: str, header=None, lossless: bool = False,
               level: float = QUANTIZE_LEVEL, dither: bool = True):
    data = data.astype(np.float32, copy=False)
    if lossless:
        return fits.ImageHDU(data, header=header, name=name)
    # the dither's seed from the first tile's checksum, not the clock (astropy's default): the same
    # pixels always give the same file (a re-simulated night, a rerun job)
    return fits.CompImageHDU(data, header=header, name=name, compression_type="RICE_1", quantize_level=level,
                             quantize_method=2 if dither else -1, tile_shape=TILE_SHAPE,
                             dither_seed=DITHER_SEED_CHECKSUM)


def _mask_plane(mask: np.ndarray) -> np.ndarray:
    """The mask as stored: int16 when every bit fits (RICE-decompressing int16 is ~10x faster), else int32."""
    if mask.size and 0 <= int(mask.min()) and int(mask.max()) <= np.iinfo(np.int16).max:
        return mask.astype(np.int16)
    return mask.astype(np.int32, copy=False)


def write_image(img: Image, path: str | Path, lossless: bool = False) -> None:
    """Write ``img`` to ``path`` atomically (temporary file in the same directory, then rename).

    Parameters
    ----------
    img : `Image`
        What to write.
    path : `str` or `Path`
        Destination; its directory is created.
    lossless : `bool`
        Store image and variance exactly instead of quantized to 1/16 of the noise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    primary = fits.PrimaryHDU()
    for k, v in _meta_cards(img.metadata):
        primary.header[k] = v
    hdr = img.wcs.to_header(relax=True) if img.wcs is not None else fits.Header()
    q_img, q_var = _quantize_steps(img.variance)
    hdus = fits.HDUList([
        primary,
        _float_hdu(img.image, "IMAGE", hdr, lossless, q_img),
        fits.CompImageHDU(_mask_plane(img.mask), name="MASK", compression_type="RICE_1",
                          tile_shape=TILE_SHAPE),
        _float_hdu(img.variance, "VARIANCE", None, lossless, q_var, dither=False),
    ])
    with replacing(path, durable=False) as tmp:
        hdus.writeto(tmp, overwrite=True)


PLANES = ("image", "variance", "mask")


def read_image(path: str | Path, bbox: tuple[int, int, int, int] | None = None,
               planes: tuple[str, ...] | None = None) -> Image:
    """Read an image written by :func:`write_image`, or only the box ``(x0, x1, y0, y1)`` of it.

    With ``bbox`` (0-based, end-exclusive, clipped to the image) only the compressed tiles
    that overlap the box are decompressed; the WCS is shifted so that pixel (0, 0) of the
    result is pixel (x0, y0) of the file, and metadata ``BBOX_X0``/``BBOX_Y0`` record it.
    With ``planes`` (a subset of :data:`PLANES`) only those are decompressed; the others are
    read-only zeros that take no memory (a bias or flat's variance is not needed by ISR, for one).

    Raises
    ------
    ValueError
        Raised if ``bbox`` does not overlap the image or ``planes`` names an unknown plane.
    """
    wanted = PLANES if planes is None else tuple(planes)
    if not set(wanted) <= set(PLANES):
        raise ValueError(f"planes {planes!r}: each must be one of {PLANES}")
    with fits.open(path, memmap=False) as hdul:
        skip = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "")
        meta = {k: v for k, v in hdul[0].header.items() if k not in skip}
        ihdr = hdul["IMAGE"].header
        ny, nx = hdul["IMAGE"].shape  # from the header: nothing is decompressed yet
        x0, x1, y0, y1 = (0, nx, 0, ny) if bbox is None else (
            max(int(bbox[0]), 0), min(int(bbox[1]), nx), max(int(bbox[2]), 0), min(int(bbox[3]), ny))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"bbox {bbox} does not overlap the {nx}x{ny} image in {path}")
        box = (slice(y0, y1), slice(x0, x1))
        arrays = [np.asarray(hdul[name].section[box] if bbox is not None else hdul[name].data, dtype=dt)
                  if name.lower() in wanted else None
                  for name, dt in (("IMAGE", np.float32), ("VARIANCE", np.float32), ("MASK", np.int32))]
        image = arrays[0] if arrays[0] is not None else np.zeros((y1 - y0, x1 - x0), np.float32)
        for i, dt in ((1, np.float32), (2, np.int32)):  # a plane not read: zeros that take no memory
            if arrays[i] is None:
                arrays[i] = np.broadcast_to(dt(0), image.shape)
        wcs = WCS(ihdr) if "CTYPE1" in ihdr else None
        if wcs is not None:
            if bbox is not None:
                wcs = wcs.slice(box)
                meta.update(BBOX_X0=x0, BBOX_Y0=y0)
            wcs.pixel_shape = (x1 - x0, y1 - y0)
        return Image(image, arrays[1], arrays[2], wcs, meta)
