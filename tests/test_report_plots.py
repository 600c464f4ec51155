"""Tests of apbatch.report.plots: every figure is a real PNG that shows what its data says.

Figures are checked from their pixels: a state or a missing template shows up in its colour
exactly when the data has it, and a figure with data has far more colours than an empty one.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from apbatch.report import gallery, plots
from apbatch.report.data import CcdInfo, Failure, gather_night
from matplotlib.colors import to_rgb
from PIL import Image
from test_report_data import DAY, build_night


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    built = build_night(tmp_path_factory.mktemp("night"))
    try:
        yield gather_night(built.cfg, day_obs=DAY, ledger=built.ledger, metrics=lambda runs: built.metrics,
                           alerts_dir=built.alerts_dir)
    finally:
        built.ledger.close()


def pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)


def near(img: np.ndarray, colour: str, tol: int = 12) -> int:
    """How many pixels are within ``tol`` (per channel) of ``colour``."""
    rgb = np.array([round(255 * c) for c in to_rgb(colour)])
    return int((np.abs(img - rgb) <= tol).all(axis=-1).sum())


def n_colours(img: np.ndarray) -> int:
    """Distinct colours of the chromatic pixels (text and axes are grey: they do not count)."""
    chroma = img.max(axis=-1) - img.min(axis=-1) > 40
    return len(np.unique(img[chroma], axis=0))


def ink(img: np.ndarray) -> float:
    """Fraction of pixels that are not white."""
    return float((img.min(axis=-1) < 250).mean())


def state_panel(img: np.ndarray) -> np.ndarray:
    """The first of the focal plane's three panels (the others have colour bars with red in them)."""
    return img[:, : img.shape[1] // 3]


def test_focal_plane_of_189_ccds_shows_each_state(night):
    lsst = night.visits[2]
    img = pixels(plots.focal_plane("LSSTCam", lsst.ccds, "LSSTCam"))
    assert img.shape[1] >= 1200 and n_colours(img) > 200  # three panels, two colour maps
    running = sum(c.state == "RUNNING" for c in lsst.ccds)
    assert near(img, plots.STATE_COLOURS["RUNNING"]) > 100 * running  # each running CCD is a filled box
    assert near(state_panel(img), plots.STATE_COLOURS["FAILED"], tol=4) == 0  # no CCD of this visit failed
    failed = [dataclasses.replace(c, state="FAILED") if c.detector == 94 else c for c in lsst.ccds]
    assert near(state_panel(pixels(plots.focal_plane("LSSTCam", failed))), plots.STATE_COLOURS["FAILED"],
                tol=4) > 100


def test_focal_plane_of_9_ccds(night):
    comcam = night.visits[0]
    img = pixels(plots.focal_plane("LSSTComCam", comcam.ccds))
    assert near(state_panel(img), plots.STATE_COLOURS["FAILED"], tol=4) > 500  # the centre CCD failed
    assert near(img, plots.STATE_COLOURS["COMPLETED"], tol=4) > 8 * 500
    only_some = comcam.ccds[:3]  # CCDs without a ledger row are drawn white, not dropped
    assert near(pixels(plots.focal_plane("LSSTComCam", only_some)), plots.STATE_COLOURS["COMPLETED"],
                tol=4) < near(img, plots.STATE_COLOURS["COMPLETED"], tol=4)


def test_sky_map_marks_ccds_without_template(night):
    img = pixels(plots.sky_map(night.visits))
    assert n_colours(img) > 100
    with_none = near(img, plots.NO_TEMPLATE_COLOUR, tol=30)
    assert with_none > 200
    every = [dataclasses.replace(v, ccds=[dataclasses.replace(c, status="done") for c in v.ccds])
             for v in night.visits]
    legend_only = near(pixels(plots.sky_map(every)), plots.NO_TEMPLATE_COLOUR, tol=30)
    assert legend_only < with_none / 4  # only the legend's swatch is left


def test_sky_map_without_pointing_says_so(night):
    blind = [dataclasses.replace(v, ra=None, dec=None) for v in night.visits]
    assert n_colours(pixels(plots.sky_map(blind))) == 0


def test_latency_histograms_draw_the_requirement(night):
    values = night.stage_values()
    img = pixels(plots.latency_histograms(values))
    assert n_colours(img) > 50 and near(img, "#d62728", tol=6) > 50
    others = {k: v for k, v in values.items() if k != "raw_to_alerts"}
    assert near(pixels(plots.latency_histograms(others)), "#d62728", tol=6) == 0
    assert n_colours(pixels(plots.latency_histograms({}))) == 0


def test_resources_needs_timings(night):
    img = pixels(plots.resources(night.ccds))
    assert n_colours(img) > 10 and ink(img) > 0.15
    assert n_colours(pixels(plots.resources([CcdInfo(1, "R22_S01", "FAILED")]))) == 0


def test_alerts_and_dia_figures(night):
    bars = pixels(plots.alerts_per_visit(night.visits))
    assert n_colours(bars) >= 1 and ink(bars) > 0.1
    dia = pixels(plots.dia_per_ccd(night.visits))
    assert n_colours(dia) > 5 and ink(dia) > 0.15
    assert n_colours(pixels(plots.dia_per_ccd([]))) == 0


def test_failures_by_reason_has_one_bar_per_reason(night):
    one = pixels(plots.failures_by_reason(night.failures[:1]))
    two = pixels(plots.failures_by_reason(night.failures))
    assert {f.exit_code for f in night.failures} == {3, 5}
    assert two.shape[0] > one.shape[0] and near(two, "#d62728", tol=40) > near(one, "#d62728", tol=40)
    same = [Failure("g", 1, f"R22_S0{i}", "FAILED", 3, "", None, None) for i in range(3)]
    assert pixels(plots.failures_by_reason(same)).shape == one.shape  # one reason, one bar


def test_cutouts_decode_the_fits_bytes(night):
    alert = night.alerts.gallery[0]
    img = pixels(gallery.cutouts(alert.cutouts, "brightest"))
    assert n_colours(img) > 10 and ink(img) > 0.5  # three filled stamps, the difference in colour
    blank = pixels(gallery.cutouts({"science": None, "template": None, "difference": None}))
    assert n_colours(blank) == 0 and ink(blank) < 0.1


@pytest.mark.parametrize("npanel, shape, size", [(1, (1, 1), (8.0, 7.0)), (3, (1, 3), (15.6, 4.8)),
                                                 (7, (3, 3), (15.6, 14.4))])
def test_panel_figure_lays_out_rows_of_three(npanel, shape, size):
    from apbatch.report.plots import panel_figure

    fig, nrow, ncol = panel_figure(npanel, (8, 7), 4.8)
    assert (nrow, ncol) == shape and nrow * ncol >= npanel
    assert tuple(fig.get_size_inches()) == pytest.approx(size)
