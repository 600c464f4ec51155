"""Tests of apbatch.job.steps.warp."""

import numpy as np
import pytest
from apbatch.errors import BadInputError, ExitCode
from apbatch.image import Image, MaskBits
from apbatch.instruments import get_instrument
from apbatch.job.steps import parallel
from apbatch.job.steps.warp import NoTemplateOverlapError, pixel_map, warp_template
from astropy.wcs import WCS
from steps_scene import _add_stars

INST = get_instrument("LSSTComCam")
SCI = INST.sky_wcs(4, 150.0, 2.0, 0.0)
SCI.pixel_shape = (600, 500)


def _tmpl_wcs(shape, rot_deg=0.4, shift=(17.3, -9.6), ra=None):
    ny, nx = shape
    cra, cdec = SCI.pixel_to_world_values(300, 250)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra if ra is not None else cra), float(cdec)]
    w.wcs.crpix = [nx / 2 + shift[0], ny / 2 + shift[1]]
    t = np.radians(rot_deg)
    w.wcs.cd = SCI.pixel_scale_matrix @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def _smooth(x, y):
    return 100 + 20 * np.sin(x / 37.0) * np.cos(y / 23.0)


def test_pixel_map_matches_exact_transform():
    tw = _tmpl_wcs((700, 800))
    tx, ty = pixel_map(SCI, tw, (500, 600), grid=64)
    ys, xs = np.array([0, 123, 499, 250]), np.array([0, 401, 599, 77])
    ex, ey = tw.world_to_pixel_values(*SCI.pixel_to_world_values(xs, ys))
    assert np.abs(tx[ys, xs] - ex).max() < 0.01 and np.abs(ty[ys, xs] - ey).max() < 0.01


def test_smooth_image_and_stars_are_resampled():
    tshape = (700, 800)
    tw = _tmpl_wcs(tshape)
    ty, tx = np.mgrid[0 : tshape[0], 0 : tshape[1]].astype(float)
    timg = _smooth(tx, ty).astype(np.float32)
    star_sky = SCI.pixel_to_world_values(np.array([100.3, 420.8]), np.array([200.6, 333.1]))
    sx, sy = tw.world_to_pixel_values(*star_sky)
    _add_stars(timg, sx, sy, [1e4, 1e4], "gauss", 1.4)
    tvar = np.full(tshape, 4.0, np.float32)
    tmask = np.zeros(tshape, np.int32)
    tmask[int(round(sy[1])) + 20, int(round(sx[1]))] = MaskBits.BAD
    out = warp_template([Image(timg, tvar, tmask, tw)], SCI, (500, 600))
    ex, ey = tw.world_to_pixel_values(
        *SCI.pixel_to_world_values(*np.meshgrid(np.arange(600), np.arange(500)))
    )
    expect = _smooth(ex, ey)
    far = np.ones((500, 600), bool)
    for x, y in [(100.3, 200.6), (420.8, 333.1)]:
        far[int(y) - 10 : int(y) + 11, int(x) - 10 : int(x) + 11] = False
    assert np.abs(out.image - expect)[far].max() < 0.05
    assert out.metadata["COVERAGE"] == 1.0
    assert np.allclose(out.variance, 4.0)
    # stars keep flux and land on the science positions
    for x, y in [(100.3, 200.6), (420.8, 333.1)]:
        st = (
            out.image[int(y) - 8 : int(y) + 9, int(x) - 8 : int(x) + 9]
            - expect[int(y) - 8 : int(y) + 9, int(x) - 8 : int(x) + 9]
        )
        assert st.sum() == pytest.approx(1e4, rel=0.01)
        yy, xx = np.mgrid[int(y) - 8 : int(y) + 9, int(x) - 8 : int(x) + 9]
        assert (st * xx).sum() / st.sum() == pytest.approx(x, abs=0.03)
        assert (st * yy).sum() / st.sum() == pytest.approx(y, abs=0.03)
    bad = np.argwhere(out.mask & MaskBits.BAD)
    assert 1 <= len(bad) <= 9  # one template pixel, dilated by one


def test_two_patches_mosaic_and_partial_coverage():
    tshape = (700, 800)
    tw = _tmpl_wcs(tshape)
    ty, tx = np.mgrid[0 : tshape[0], 0 : tshape[1]].astype(float)
    timg = _smooth(tx, ty).astype(np.float32)
    var = np.ones(tshape, np.float32)
    msk = np.zeros(tshape, np.int32)
    whole = warp_template([Image(timg, var, msk, tw)], SCI, (500, 600))
    w2 = tw.deepcopy()
    w2.wcs.crpix = tw.wcs.crpix - np.array([380, 0])
    w2.wcs.set()
    parts = [
        Image(timg[:, :420], var[:, :420], msk[:, :420], tw),
        Image(timg[:, 380:], var[:, 380:], msk[:, 380:], w2),
    ]
    mosaic = warp_template(parts, SCI, (500, 600))
    assert np.abs(mosaic.image - whole.image).max() < 2e-3  # of a 20-amplitude signal
    # only one half: the rest is NO_DATA
    half = warp_template(parts[:1], SCI, (500, 600))
    assert 0.3 < half.metadata["COVERAGE"] < 0.9
    nod = (half.mask & MaskBits.NO_DATA) != 0
    assert nod.any() and np.all(half.image[nod] == 0)


def test_nan_in_template_is_no_data():
    tshape = (700, 800)
    tw = _tmpl_wcs(tshape)
    timg = np.full(tshape, 10.0, np.float32)
    timg[350, 400] = np.nan
    out = warp_template([Image(timg, np.ones(tshape, np.float32), None, tw)], SCI, (500, 600))
    assert np.isfinite(out.image).all()
    assert 1 <= ((out.mask & MaskBits.NO_DATA) != 0).sum() <= 9


def test_no_overlap_is_a_clear_error():
    tshape = (300, 300)
    far = _tmpl_wcs(tshape, ra=151.0)
    with pytest.raises(NoTemplateOverlapError) as ei:
        warp_template([Image(np.zeros(tshape, np.float32), None, None, far)], SCI, (500, 600))
    assert ei.value.field == "template" and ei.value.exit_code == ExitCode.BAD_INPUT
    with pytest.raises(NoTemplateOverlapError):
        warp_template([], SCI, (500, 600))


def test_shift_wcs_moves_the_pixel_origin():
    from apbatch.job.steps.warp import shift_wcs

    w = shift_wcs(SCI, 25)
    xs, ys = np.array([0.0, 123.4, 599.0]), np.array([0.0, 77.7, 499.0])
    ra0, dec0 = SCI.pixel_to_world_values(xs, ys)
    ra1, dec1 = w.pixel_to_world_values(xs + 25, ys + 25)
    assert np.allclose(ra0, ra1, atol=1e-10) and np.allclose(dec0, dec1, atol=1e-10)
    assert w.pixel_shape == (650, 550)


def _smooth_template():
    tshape = (700, 800)
    tw = _tmpl_wcs(tshape)
    ty, tx = np.mgrid[0 : tshape[0], 0 : tshape[1]].astype(float)
    timg = _smooth(tx, ty).astype(np.float32)
    return Image(timg, np.full(tshape, 4.0, np.float32), np.zeros(tshape, np.int32), tw), tw


def test_padded_warp_covers_beyond_the_ccd_and_crops_back():
    from apbatch.job.steps.warp import crop_to_science

    tmpl, tw = _smooth_template()
    plain = warp_template([tmpl], SCI, (500, 600))
    padded = warp_template([tmpl], SCI, (500, 600), pad=30)
    assert padded.shape == (560, 660) and padded.metadata["WARPPAD"] == 30 and plain.metadata["WARPPAD"] == 0
    assert padded.metadata["COVERAGE"] == plain.metadata["COVERAGE"] == 1.0
    # the pad holds real template pixels: the smooth function continued beyond the CCD
    ys, xs = np.mgrid[-30:530, -30:630]
    ex, ey = tw.world_to_pixel_values(*SCI.pixel_to_world_values(xs, ys))
    assert np.abs(padded.image - _smooth(ex, ey)).max() < 0.05
    assert not (padded.mask & MaskBits.NO_DATA).any()
    cropped = crop_to_science(padded)
    assert cropped.shape == (500, 600) and cropped.metadata["WARPPAD"] == 0
    assert np.abs(cropped.image - plain.image).max() < 2e-3
    ra, dec = cropped.wcs.pixel_to_world_values(12.0, 34.0)
    assert np.allclose((ra, dec), SCI.pixel_to_world_values(12.0, 34.0), atol=1e-10)
    assert crop_to_science(plain) is plain


def test_pad_beyond_the_template_is_no_data():
    tmpl, tw = _smooth_template()
    small = Image(tmpl.image[100:600, 100:700], tmpl.variance[100:600, 100:700], tmpl.mask[100:600, 100:700],
                  tw[100:600, 100:700])
    out = warp_template([small], SCI, (500, 600), pad=60)
    nod = (out.mask & MaskBits.NO_DATA) != 0
    assert nod[:5].all() and nod[-5:].all()  # the template ends inside the pad
    assert np.all(out.image[nod] == 0)
    with pytest.raises(BadInputError, match="pad"):
        warp_template([small], SCI, (500, 600), pad=-1)


def test_bands_of_rows_give_the_same_warp(monkeypatch):
    """Resampling a band of rows at a time (bounded memory) is the one-piece warp bit for bit:
    two overlapping patches, partial coverage, a masked pixel and a padded grid."""
    from apbatch.job.steps import warp

    tshape = (700, 800)
    tw = _tmpl_wcs(tshape)
    ty, tx = np.mgrid[0 : tshape[0], 0 : tshape[1]].astype(float)
    timg = _smooth(tx, ty).astype(np.float32)
    var = (1.0 + tx / 800).astype(np.float32)
    msk = np.zeros(tshape, np.int32)
    msk[300, 400] = int(MaskBits.SAT)
    w2 = tw.deepcopy()
    w2.wcs.crpix = tw.wcs.crpix - np.array([380, 0])
    w2.wcs.set()
    parts = warp.prepare_warp([Image(timg[:, :420], var[:, :420], msk[:, :420], tw),
                               Image(timg[:, 380:], var[:, 380:], msk[:, 380:], w2)])
    assert parts[0].mask.dtype == parts[1].mask.dtype == np.uint16  # MaskBits fit in 16 bits
    assert warp.prepare_warp([Image(timg, var, None, tw)])[0].mask is None  # nothing masked
    monkeypatch.setattr(warp, "_BAND_ROWS", 10**6)
    whole = warp.warp_template(parts, SCI, (500, 600), pad=7)
    monkeypatch.setattr(warp, "_BAND_ROWS", 37)
    bands = warp.warp_template(parts, SCI, (500, 600), pad=7)
    parallel.set_threads(2)  # bands spread over two threads (disjoint rows)
    try:
        threaded = warp.warp_template(parts, SCI, (500, 600), pad=7)
    finally:
        parallel.set_threads(1)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(whole, plane), getattr(bands, plane))
        np.testing.assert_array_equal(getattr(whole, plane), getattr(threaded, plane))
    assert bands.metadata == whole.metadata and bands.mask.dtype == np.int32
    assert ((bands.mask & MaskBits.SAT) != 0).sum() >= 4  # the SAT pixel, dilated, reaches the output
