"""Tests for apbatch.image: FITS round trip, atomic writes and cutouts."""

import numpy as np
import pytest
from apbatch.image import Image, MaskBits, read_image, write_image
from apbatch.instruments import get_instrument


def _image(ny=60, nx=80):
    rng = np.random.default_rng(3)
    wcs = get_instrument("LSSTComCam").sky_wcs(4, 53.0, -28.0, 10.0)
    img = Image(rng.normal(size=(ny, nx)), np.full((ny, nx), 2.0), np.zeros((ny, nx), np.int32), wcs,
                {"FILTER": "r_03", "exposure_time": 30.0})
    img.mask[5, 7] = MaskBits.SAT | MaskBits.BAD
    return img


def test_lossy_default_is_within_noise(tmp_path):
    img = _image(200, 300)
    write_image(img, tmp_path / "q.fits")
    back = read_image(tmp_path / "q.fits")
    assert np.abs(back.image - img.image).max() < 0.1  # noise sigma is 1
    assert np.abs(back.image - img.image).std() < 0.03
    assert back.mask[5, 7] == img.mask[5, 7]
    assert (tmp_path / "q.fits").stat().st_size < img.image.nbytes


def test_same_pixels_give_the_same_quantized_pixels(tmp_path):
    """The dither is seeded from the data, not the clock (astropy's default): a re-simulated
    night or a rerun job writes the same values, so their outputs can be compared."""
    img = _image(200, 300)
    write_image(img, tmp_path / "a.fits")
    import time

    time.sleep(1.1)  # the clock seed has a one-second resolution
    write_image(img, tmp_path / "b.fits")
    a, b = read_image(tmp_path / "a.fits"), read_image(tmp_path / "b.fits")
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, img.image)  # quantized (lossy) all the same


def test_quantization_step_follows_the_variance_plane(tmp_path):
    rng = np.random.default_rng(8)
    var = np.linspace(4.0, 400.0, 256 * 256, dtype=np.float32).reshape(256, 256)
    img = Image(rng.normal(0, np.sqrt(var)).astype(np.float32), var)
    write_image(img, tmp_path / "v.fits")
    back = read_image(tmp_path / "v.fits")
    # error <= half a step: 1/16 of the low-end sigma (~2.3 here), anywhere in the image
    step = np.sqrt(np.percentile(var, 5)) / 16
    assert np.abs(back.image - img.image).max() <= 0.51 * step + 1e-4
    assert np.abs(back.variance - var).max() <= 0.51 * np.percentile(var, 5) / 1000 + 1e-5


def test_image_without_variance_uses_the_tile_noise(tmp_path):
    rng = np.random.default_rng(9)
    img = Image(rng.normal(0, 5.0, (128, 128)).astype(np.float32))  # variance: zeros
    write_image(img, tmp_path / "n.fits")
    back = read_image(tmp_path / "n.fits")
    assert 0 < np.abs(back.image - img.image).std() < 5.0 / 16
    assert not back.variance.any()


def test_round_trip(tmp_path):
    img = _image()
    write_image(img, tmp_path / "a.fits", lossless=True)
    back = read_image(tmp_path / "a.fits")
    np.testing.assert_array_equal(back.image, img.image)
    np.testing.assert_array_equal(back.variance, img.variance)
    assert back.mask[5, 7] == MaskBits.SAT | MaskBits.BAD
    assert back.metadata["FILTER"] == "r_03" and back.metadata["EXPOSURE_TIME"] == 30.0
    ra, dec = img.wcs.pixel_to_world_values(10.0, 20.0)
    ra2, dec2 = back.wcs.pixel_to_world_values(10.0, 20.0)
    assert abs(ra - ra2) < 1e-9 and abs(dec - dec2) < 1e-9
    assert not list(tmp_path.glob(".*tmp"))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from astropy.io import fits

    def half_write(self, name, **kw):
        with open(name, "wb") as fh:
            fh.write(b"SIMPLE  =                    T")
        raise OSError("disk full")

    write_image(_image(), tmp_path / "b.fits", lossless=True)
    before = (tmp_path / "b.fits").read_bytes()
    monkeypatch.setattr(fits.HDUList, "writeto", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_image(_image(), tmp_path / "b.fits")
    assert [p.name for p in tmp_path.iterdir()] == ["b.fits"]
    assert (tmp_path / "b.fits").read_bytes() == before


def test_cutout_inside_and_at_edge():
    img = _image()
    c = img.cutout(40, 30, 11)
    np.testing.assert_array_equal(c.image, img.image[25:36, 35:46])
    ra, dec = img.wcs.pixel_to_world_values(40, 30)
    ra2, dec2 = c.wcs.pixel_to_world_values(5, 5)
    assert abs(ra - ra2) < 1e-9 and abs(dec - dec2) < 1e-9
    edge = img.cutout(1, 1, 11)
    assert np.isnan(edge.image[0, 0]) and edge.mask[0, 0] & MaskBits.NO_DATA
    np.testing.assert_array_equal(edge.image[4:, 4:], img.image[0:7, 0:7])


@pytest.mark.parametrize("lossless", [True, False])
def test_read_bbox(tmp_path, lossless):
    img = _image(200, 300)
    write_image(img, tmp_path / "c.fits", lossless=lossless)
    part = read_image(tmp_path / "c.fits", bbox=(50, 120, 30, 90))
    assert part.shape == (60, 70)
    full = read_image(tmp_path / "c.fits")
    np.testing.assert_array_equal(part.image, full.image[30:90, 50:120])
    np.testing.assert_array_equal(part.mask, full.mask[30:90, 50:120])
    assert part.metadata["BBOX_X0"] == 50 and part.metadata["BBOX_Y0"] == 30
    assert np.allclose(part.wcs.pixel_to_world_values(0, 0), full.wcs.pixel_to_world_values(50, 30))
    clipped = read_image(tmp_path / "c.fits", bbox=(250, 400, -10, 20))
    assert clipped.shape == (20, 50)
    with pytest.raises(ValueError, match="does not overlap"):
        read_image(tmp_path / "c.fits", bbox=(400, 500, 0, 10))


def test_mask_is_stored_small_when_it_fits_and_read_back_as_int32(tmp_path):
    from astropy.io import fits

    img = _image()
    write_image(img, tmp_path / "m.fits")
    with fits.open(tmp_path / "m.fits") as hdul:
        assert hdul["MASK"].data.dtype.itemsize == 2
    back = read_image(tmp_path / "m.fits")
    assert back.mask.dtype == np.int32 and back.mask[5, 7] == MaskBits.SAT | MaskBits.BAD
    img.mask[0, 0] = 1 << 20  # a bit beyond int16 keeps int32
    write_image(img, tmp_path / "w.fits")
    assert read_image(tmp_path / "w.fits").mask[0, 0] == 1 << 20


def test_read_only_some_planes_and_refuse_unknown_ones(tmp_path):
    img = _image()
    write_image(img, tmp_path / "p.fits", lossless=True)
    back = read_image(tmp_path / "p.fits", planes=("mask",))
    assert back.mask[5, 7] == MaskBits.SAT | MaskBits.BAD
    assert back.image.shape == img.image.shape and not back.image.any() and not back.variance.any()
    box = read_image(tmp_path / "p.fits", bbox=(0, 20, 0, 10), planes=("image", "mask"))
    np.testing.assert_array_equal(box.image, img.image[:10, :20])
    # the variance not read: zeros of the right shape that take no memory and cannot be written
    assert box.variance.shape == (10, 20) and not box.variance.any() and box.variance.dtype == np.float32
    assert box.variance.strides == (0, 0) and not box.variance.flags.writeable
    with pytest.raises(ValueError, match="planes"):
        read_image(tmp_path / "p.fits", planes=("image", "weights"))
