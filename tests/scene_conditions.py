"""The condition grid of issue 10: named ``make_scene`` keyword sets (tests/steps_scene.py).

Not a test module. Each entry of :data:`CONDITIONS` changes one thing from the baseline
scene (LSSTCam R01_S00, Moffat beta 3 PSF of FWHM 0.80", 3000 stars, 300 transients at true
S/N 3-50), and every entry but ``default`` puts transients as close as 3 px to the CCD
border, plus 100 more within 3-25 px of it, so that edge completeness is measured.
``default`` is exactly ``make_scene()`` (the scene of tests/test_steps_truth.py, transients
>= 40 px from the border).

Seeing is converted at LSSTCam's 0.2"/px: ``sci_sigma = FWHM / 2.3548 / 0.2``; the template
PSF is then min(1.35, 0.8 sci_sigma) px wide (make_scene's default).
"""

from __future__ import annotations

__all__ = ["CONDITIONS", "PIXEL_SCALE", "seeing_sigma"]

PIXEL_SCALE = 0.2  # arcsec per pixel, LSSTCam
_EDGE = {"edge_margin": 3.0, "n_edge_transients": 100}


def seeing_sigma(fwhm_arcsec: float) -> float:
    """Gaussian-equivalent PSF width in LSSTCam pixels of a seeing FWHM in arcsec."""
    return fwhm_arcsec / 2.3548 / PIXEL_SCALE


CONDITIONS: dict[str, dict] = {
    "default": {},
    "baseline": {**_EDGE},
    **{f"seeing_{s:.1f}": {**_EDGE, "sci_sigma": seeing_sigma(s)} for s in (0.5, 0.7, 1.2, 1.6, 2.0)},
    "moffat_beta_2.5": {**_EDGE, "beta": 2.5},
    "moffat_beta_4.5": {**_EDGE, "beta": 4.5},
    "atmospheric": {**_EDGE, "psf": "atmospheric"},
    "atmospheric_varying": {**_EDGE, "psf": "atmospheric", "psf_variation": 0.15, "ellipticity": 0.08},
    "saturated_rich": {**_EDGE, "n_bright_stars": 60},
    "crowded": {**_EDGE, "n_stars": 12000},
    "galaxy_rich": {**_EDGE, "n_galaxies": 1500},
    "sky_change_0.1": {**_EDGE, "sky_change_mag": 0.1},
    "sky_change_0.3": {**_EDGE, "sky_change_mag": 0.3},
    "transparency_0.1": {**_EDGE, "transparency_change_mag": 0.1},
    "transparency_0.3": {**_EDGE, "transparency_change_mag": 0.3},
    "dead_amp": {**_EDGE, "dead_amp": 5},
    "hot_amp": {**_EDGE, "hot_amp": 10},
    "sky_gradient": {**_EDGE, "sky_gradient": 0.2},
    # the far corners of LSSTCam's science area (R01_S00, the default, is one too), vignetted
    "corner_R43_S22": {**_EDGE, "detector": 188, "vignetting": 0.2, "psf_variation": 0.05},
    "corner_R34_S22_e2v": {**_EDGE, "detector": 161, "vignetting": 0.2, "psf_variation": 0.05},
}
