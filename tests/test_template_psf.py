"""Tests of apbatch.job.steps.template_psf (the warped template's PSF size: measured vs header)."""

import numpy as np
import pytest
from apbatch.image import Image
from apbatch.job.steps import detect_sources, moffat_psf, subtract_background
from apbatch.job.steps.template_psf import header_psf_sigma, template_psf_sigma
from steps_scene import _add_stars

SCALE = 0.2


def _field(sigma, pad=0, seed=3, n=80):
    """Science catalogue (science pixels) and a 'warped' template of the same stars with PSF ``sigma``."""
    rng = np.random.default_rng(seed)
    size = 600
    xs, ys = rng.uniform(30, size - 30, n), rng.uniform(30, size - 30, n)
    fl = rng.uniform(2e4, 3e5, n)
    sci = np.full((size, size), 100.0, np.float32)
    _add_stars(sci, xs, ys, fl, "gauss", 2.0)
    sci += rng.normal(0, 10, sci.shape).astype(np.float32)
    sci_im = Image(sci, np.full(sci.shape, 100.0, np.float32))
    subtract_background(sci_im, box=64)
    src = detect_sources(sci_im, psf_sigma=2.0)
    tmpl = np.zeros((size + 2 * pad, size + 2 * pad), np.float32)
    _add_stars(tmpl, xs + pad, ys + pad, fl, "gauss", sigma)
    tmpl += rng.normal(0, 3, tmpl.shape).astype(np.float32)
    warped = Image(tmpl, np.full(tmpl.shape, 9.0, np.float32), None, None, {"WARPPAD": pad})
    return src, warped


def _patch(fwhm_arcsec=None, beta=None):
    meta = {}
    if fwhm_arcsec is not None:
        meta["PSFFWHM"] = fwhm_arcsec
    if beta is not None:
        meta["PSFBETA"] = beta
    return Image(np.zeros((4, 4), np.float32), None, None, None, meta)


def test_header_sigma_needs_every_patch():
    assert header_psf_sigma([_patch(0.6), _patch()], SCALE) is None
    assert header_psf_sigma([], SCALE) is None
    assert header_psf_sigma([_patch(0.6)], SCALE) == pytest.approx(3.0 / 2.3548)
    assert header_psf_sigma([_patch(0.6, 3.5)], SCALE) == pytest.approx(moffat_psf(3.0, 3.5).sigma)


@pytest.mark.parametrize("pad", [0, 20])
def test_measured_on_the_science_stars_without_a_header(pad):
    src, warped = _field(1.4, pad=pad)
    sig = template_psf_sigma([_patch()], warped, src, SCALE)
    assert sig == pytest.approx(1.4, rel=0.04)
    assert warped.metadata["TPSFSRC"] == "measured" and warped.metadata["TPSFSIG"] == sig


def test_header_used_only_when_it_agrees():
    src, warped = _field(1.4)
    agree = 1.42 * 2.3548 * SCALE  # 1.5% off
    assert template_psf_sigma([_patch(agree)], warped, src, SCALE) == pytest.approx(1.42)
    assert warped.metadata["TPSFSRC"] == "header"
    stale = 1.9 * 2.3548 * SCALE  # a description 35% too broad
    assert template_psf_sigma([_patch(stale)], warped, src, SCALE) == pytest.approx(1.4, rel=0.04)
    assert warped.metadata["TPSFSRC"] == "measured"


def test_header_unverified_when_the_stars_are_too_few():
    src, warped = _field(1.4)
    sig = template_psf_sigma([_patch(0.7)], warped, src.head(3), SCALE)
    assert sig == pytest.approx(3.5 / 2.3548) and warped.metadata["TPSFSRC"] == "header-unverified"
