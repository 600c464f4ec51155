"""Tests of apbatch.report.html and ``apbatch night report --html``: the self-contained page.

The page of a small night (two 9-CCD ComCam visits, a partial 189-CCD LSSTCam visit, failures,
alerts) is rendered, checked as HTML (every section, every figure inline, nothing from the
network), and rendered in headless Chromium (``scripts/chromium-local.sh``): the screenshot
must show every section's figures drawn. Without Chromium that test skips, or fails under CI=true.
"""

from __future__ import annotations

import base64
import html.parser
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from apbatch.errors import BadInputError
from apbatch.report.data import gather_night
from apbatch.report.html import SECTIONS, page_path, render_page, write_report
from conftest import service_unavailable
from PIL import Image
from test_report_data import DAY, build_night

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_SCRIPT = ROOT / "scripts" / "chromium-local.sh"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    night = build_night(tmp_path_factory.mktemp("night"))
    yield night
    night.ledger.close()


@pytest.fixture(scope="module")
def night(built):
    return gather_night(built.cfg, day_obs=DAY, ledger=built.ledger, metrics=lambda runs: built.metrics,
                        alerts_dir=built.alerts_dir, gallery_size=6)


@pytest.fixture(scope="module")
def page(night, tmp_path_factory):
    return write_report(night, tmp_path_factory.mktemp("report"))


class _Sections(html.parser.HTMLParser):
    """Images (PNG bytes) per section id, and every src/href of the page."""

    def __init__(self):
        super().__init__()
        self.section: str | None = None
        self.images: dict[str, list[bytes]] = {}
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
            self.images[self.section or ""] = []
        self.links += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "img" and self.section is not None:
            src = a.get("src") or ""
            assert src.startswith("data:image/png;base64,"), src[:40]
            self.images[self.section].append(base64.b64decode(src.split(",", 1)[1]))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None


def parse(text: str) -> _Sections:
    p = _Sections()
    p.feed(text)
    return p


def test_every_section_has_its_figures_inline(page, night):
    assert page == page_path(page.parent, DAY) and page.name == f"night-{DAY}.html"
    text = page.read_text()
    p = parse(text)
    assert list(p.images) == list(SECTIONS)
    assert len(p.images["focal-plane"]) == len(night.visits) == 3  # 9, 9 and 189 CCDs
    assert len(p.images["gallery"]) == len(night.alerts.gallery) == 6
    assert len(p.images["alerts"]) == 2
    for sid in SECTIONS[1:]:
        for png in p.images[sid]:
            assert Image.open(io.BytesIO(png)).size[0] > 200
    for f in night.failures:  # failures by reason with exit code and the job's log
        assert f.log_path and f.log_path in text
    assert "needs attention" in text  # the text report, reused
    # the CCDs that ran without a template are listed with the job's reason
    untemplated = sum(c.has_template is False for v in night.visits for c in v.ccds)
    assert untemplated > 0 and text.count(": no template covers this CCD in band r") == untemplated


def test_footprint_section_shows_the_coverage_and_areas(page, night):
    """"Where we looked": the coverage PNG and the areas per band of the night's MOC."""
    text = page.read_text()
    section = text[text.index('<section id="footprint">'):]
    section = section[:section.index("</section>")]
    assert "<h2>Where we looked</h2>" in section
    s = night.footprint.summary()
    assert s["ccds_observed"] == 9 + 9 + 189 and s["ccds_processed"] == 8 + 8 + 150
    for band, a in s["bands"].items():
        cells = f"<td>{a['observed_deg2']:.2f}</td><td>{a['processed_deg2']:.2f}</td>"
        assert f"<td>band {band}</td>{cells}" in section
    assert f"<td>all</td><td>{s['observed_deg2']:.2f}</td><td>{s['processed_deg2']:.2f}</td>" in section
    # the ComCam r visit overlaps the LSSTCam i visit: the total counts the overlap once
    assert s["observed_deg2"] < sum(a["observed_deg2"] for a in s["bands"].values()) - 0.2
    png = parse(text).images["footprint"][0]
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    assert (np.abs(rgb - (46, 158, 68)).sum(axis=-1) < 6).sum() > 20000  # processed, green
    assert "Beside this page" not in section  # no MOC file was written


def test_page_loads_nothing_from_the_network(page):
    text = page.read_text()
    links = parse(text).links
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    assert not re.search(r"https?://", text.replace("http://www.w3.org", ""))
    assert "<script" not in text.lower()


def test_notes_are_shown(night):
    night2 = type(night)(**{**night.__dict__, "notes": ["job metrics not read: no butler repository at /x"]})
    assert "job metrics not read: no butler repository at /x" in render_page(night2, max_focal_planes=1)


def test_focal_planes_beyond_the_limit_are_counted_not_drawn(night):
    p = parse(render_page(night, max_focal_planes=1))
    assert len(p.images["focal-plane"]) == 1
    assert "2 more visit(s) not drawn" in render_page(night, max_focal_planes=1)


def test_a_file_or_an_unwritable_directory_is_refused(night, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(BadInputError, match="is not a directory"):
        write_report(night, afile)
    with pytest.raises(BadInputError, match="cannot create"):
        write_report(night, afile / "sub")
    if os.geteuid() == 0:
        ro = Path("/proc/sys")  # root may write anywhere but here
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
    with pytest.raises(BadInputError, match="not writable"):
        write_report(night, ro)
    assert afile.read_text() == "x"


def test_a_failed_write_leaves_nothing(night, tmp_path):
    page_path(tmp_path, DAY).mkdir()  # the page's name is taken by a directory: the rename fails
    with pytest.raises(BadInputError, match="cannot write"):
        write_report(night, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"night-{DAY}.html"]  # no temporary file left


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apbatch", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_the_page_or_refuses_in_one_line(built, tmp_path):
    cfg = tmp_path / "apbatch.yaml"
    cfg.write_text(yaml.safe_dump({"root": str(built.cfg.root)}))
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = _cli("night", "report", "--config", str(cfg), "--day-obs", str(DAY), "--html", str(afile))
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "--html" in bad.stderr
    out = tmp_path / "pages"
    good = _cli("night", "report", "--config", str(cfg), "--day-obs", str(DAY), "--html", str(out))
    assert good.returncode == 6, good.stderr  # written, and CCDs need attention (exit 5: failed for good)
    assert f"night {DAY}" in good.stdout and str(page_path(out, DAY)) in good.stderr
    text = page_path(out, DAY).read_text()
    assert list(parse(text).images) == list(SECTIONS)
    assert "job metrics not read" in text  # this night has no butler repository



# ----------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def chromium():
    if not os.access("/usr/bin/chromium", os.X_OK) and os.geteuid() == 0:
        subprocess.run(["bash", str(CHROMIUM_SCRIPT), "install"], capture_output=True, timeout=900)
    if not os.access("/usr/bin/chromium", os.X_OK):
        service_unavailable("chromium", "/usr/bin/chromium is missing (scripts/chromium-local.sh install)")
    if shutil.which("bash") is None:
        service_unavailable("chromium", "bash is not installed")


def _sections_in(shot: np.ndarray) -> list[tuple[int, int]]:
    """Row spans of the sections: each starts at its heading's rule (2 px of #ccc across the page)."""
    rule = ((shot == (204, 204, 204)).all(axis=-1).sum(axis=1)) > 0.7 * shot.shape[1]
    starts = [int(i) for i in np.flatnonzero(rule) if i == 0 or not rule[i - 1]]
    ink = np.flatnonzero((shot.min(axis=-1) < 250).any(axis=1))
    return list(zip(starts, [*starts[1:], int(ink.max()) + 1], strict=True))


def test_chromium_draws_every_section(chromium, page, tmp_path):
    out = tmp_path / "page.png"
    res = subprocess.run(["bash", str(CHROMIUM_SCRIPT), "screenshot", page.as_uri(), str(out), "1400x16000"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    shot = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    if os.environ.get("APBATCH_KEEP_SCREENSHOT"):  # to look at it
        shutil.copy(out, os.environ["APBATCH_KEEP_SCREENSHOT"])
    assert (shot[-200:] == 255).all(), "the page is longer than the screenshot"
    spans = _sections_in(shot)
    assert len(spans) == len(SECTIONS)
    for sid, (a, b) in zip(SECTIONS, spans, strict=True):
        region = shot[a + 3:b]
        chroma = region.max(axis=-1) - region.min(axis=-1) > 40
        colours = len(np.unique(region[chroma], axis=0))
        if sid == "summary":  # the text report
            assert (region.min(axis=-1) < 128).sum() > 5000, sid
            continue
        if sid == "footprint":  # the processed coverage, green, drawn in the browser
            assert (np.abs(region - (46, 158, 68)).sum(axis=-1) < 30).sum() > 10000, sid
        # bar charts may be one colour; maps, histograms and cutouts have several
        want = 1 if sid == "failures" else 5
        assert chroma.sum() > 3000 and colours >= want, (sid, int(chroma.sum()), colours)
