"""The night report as one self-contained HTML page: inline CSS, PNG figures as data URIs, no script.

Sections (each an element with an ``id``, in this order): ``summary`` (the text report),
``focal-plane``, ``sky-map``, ``footprint`` (where we looked: the night's MOC), ``latency``,
``resources``, ``alerts``, ``failures``, ``gallery``.
The page loads nothing: it can be mailed, archived, or opened on a machine without network.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_atomic
from ..errors import BadInputError
from . import gallery, plots
from .data import NightData, VisitInfo

__all__ = ["SECTIONS", "check_directory", "page_path", "render_page", "write_report"]

SECTIONS = ("summary", "focal-plane", "sky-map", "footprint", "latency", "resources", "alerts", "failures",
            "gallery")
"""The ``id`` of every section of the page, in order."""

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 2em 3em 2em; color: #222;
       background: #fff; max-width: 1500px; }
h1 { margin: 0.6em 0 0.2em 0; font-size: 1.6em; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
section { margin-bottom: 1.5em; }
nav a { margin-right: 1em; color: #1f4e99; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img.plot { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
figure { margin: 0.4em 0; }
figcaption { font-size: 0.85em; color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { width: 640px; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #eee; }
.note { color: #8a4b00; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _visit_title(v: VisitInfo) -> str:
    pointing = "" if v.ra is None or v.dec is None else f", RA {v.ra:.3f} Dec {v.dec:.3f}"
    return (f"{v.instrument} visit {v.visit} ({v.group_id}), {v.intent}, {v.physical_filter or 'no filter'}"
            f"{pointing}, {len(v.ccds)} CCD(s), {v.n_alerts} alert(s)")


def _focal_planes(night: NightData, limit: int) -> str:
    shown = night.visits[:limit]
    parts = [f"<figure>{_img(plots.focal_plane(v.instrument, v.ccds, _visit_title(v)), _visit_title(v))}"
             f"</figure>" for v in shown]
    if len(night.visits) > limit:
        parts.append(f'<p class="note">{len(night.visits) - limit} more visit(s) not drawn '
                     f"(the first {limit} are shown).</p>")
    return "\n".join(parts) or "<p>No visit this night.</p>"


def _failures(night: NightData) -> str:
    body = [_img(plots.failures_by_reason(night.failures), "failures by reason")]
    if night.failures:
        head = "".join(f"<th>{h}</th>" for h in ("group", "visit", "CCD", "state", "exit", "reason", "job",
                                                  "log"))
        rows = []
        for f in night.failures:
            cells = (f.group_id, str(f.visit), f.detector_name, f.state,
                     "-" if f.exit_code is None else str(f.exit_code), f.reason[:200], f.job_id or "-")
            log = f"<code>{html.escape(f.log_path)}</code>" if f.log_path else "-"
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            rows.append(f"<tr>{tds}<td>{log}</td></tr>")
        body.append(f"<table><tr>{head}</tr>\n" + "\n".join(rows) + "</table>")
    return "\n".join(body)


def _untemplated(night: NightData) -> str:
    """The CCDs that ran without a template, and why (their job's ``prepare.no_template``)."""
    rows = [(v, c) for v in night.visits for c in v.ccds if c.has_template is False]
    if not rows:
        return ""
    items = "".join(f"<li>visit {v.visit} {html.escape(c.detector_name)}: "
                    f"{html.escape(c.no_template or 'no reason recorded')}</li>" for v, c in rows)
    return f"<p>Calibrated image only (no template):</p><ul>{items}</ul>"


def _footprint(night: NightData) -> str:
    """The coverage PNG, the areas per band, and the MOC files if they were written."""
    fp = night.footprint
    if fp is None or not fp.ccds_observed:
        return _img(plots.message("no science CCD was submitted this night"), "no footprint")
    s = fp.summary()
    rows = [(f"band {b}", a) for b, a in s["bands"].items()] + [("all", s)]
    cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{a['observed_deg2']:.2f}</td>"
                    f"<td>{a['processed_deg2']:.2f}</td></tr>" for name, a in rows)
    table = ("<table><tr><th></th><th>observed (deg²)</th><th>processed (deg²)</th></tr>"
             f"{cells}</table>")
    text = (f"<p>{s['ccds_observed']} science CCD-visit(s) submitted, {s['ccds_processed']} completed; "
            f"areas of their HEALPix MOC at order {s['order']} (overlaps counted once).</p>")
    files = "".join(f"<li><code>{html.escape(p.name)}</code></li>" for p in fp.files.values())
    return (_img(fp.image(), "where we looked") + text + table
            + (f"<p>Beside this page (<code>apbatch night footprint</code>):</p><ul>{files}</ul>"
               if files else ""))


def _gallery(night: NightData) -> str:
    if not night.alerts.gallery:
        return _img(plots.message("no new alert this night"), "no new alert")
    figs = []
    for a in night.alerts.gallery:
        snr = "" if a.snr is None else f", S/N {a.snr:.1f}"
        caption = (f"diaSource {a.dia_source_id}: visit {a.visit} detector {a.detector}, band {a.band}, "
                   f"psfFlux {a.psf_flux:.0f} nJy{snr}, RA {a.ra:.5f} Dec {a.dec:.5f}")
        figs.append(f"<figure>{_img(gallery.cutouts(a.cutouts), caption)}"
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ('<p>Brightest new alerts (DIAObject with one DIASource), by psfFlux.</p>'
            '<div class="gallery">' + "\n".join(figs) + "</div>")


def render_page(night: NightData, *, max_focal_planes: int = 50,
                format_summary: Callable[[dict], str] | None = None) -> str:
    """The page's HTML text (figures drawn here).

    Parameters
    ----------
    night : `NightData`
        What `apbatch.report.data.gather_night` returned.
    max_focal_planes : `int`
        Visits drawn in the focal-plane section (the first ones of the night).
    format_summary : callable, optional
        The text of the summary section (default `apbatch.script.night.format_report`).
    """
    if format_summary is None:
        from ..script.night import format_report

        format_summary = format_report
    ccds = night.ccds
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in night.notes)
    summary = f"<pre>{html.escape(format_summary(night.summary))}</pre>{notes}"
    sections = [
        _section("summary", "Summary", summary),
        _section("focal-plane", "Focal plane per visit", _focal_planes(night, max_focal_planes)),
        _section("sky-map", "Sky map", _img(plots.sky_map(night.visits), "sky map") + _untemplated(night)),
        _section("footprint", "Where we looked", _footprint(night)),
        _section("latency", "Latency per stage", _img(plots.latency_histograms(night.stage_values()),
                                                      "latency per stage")),
        _section("resources", "CPU per step and peak memory", _img(plots.resources(ccds), "CPU and memory")),
        _section("alerts", "Alerts per visit and DIA sources per CCD",
                 _img(plots.alerts_per_visit(night.visits), "alerts per visit") + "\n"
                 + _img(plots.dia_per_ccd(night.visits), "DIA sources per CCD")),
        _section("failures", f"Failures ({len(night.failures)})", _failures(night)),
        _section("gallery", "Brightest new alerts", _gallery(night)),
    ]
    nav = " ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS)
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>apbatch night {night.day_obs}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>apbatch night {night.day_obs}</h1>\n<p>{len(night.visits)} visit(s), {len(ccds)} CCD(s), "
            f"{night.alerts.files} alert file(s); made {made}.</p>\n<nav>{nav}</nav>\n"
            + "\n".join(sections) + "\n</body>\n</html>\n")


def page_path(directory: str | Path, day_obs: int) -> Path:
    """Where the page of ``day_obs`` goes: ``<directory>/night-<day_obs>.html``."""
    return Path(directory) / f"night-{day_obs}.html"


def check_directory(directory: Path, field: str = "--html") -> None:
    """Create ``directory`` if needed and make sure a page can be written there.

    Raises
    ------
    BadInputError
        Raised if it is a file, cannot be created, or is not writable.
    """
    if directory.exists() and not directory.is_dir():
        raise BadInputError(field, f"{str(directory)!r} is not a directory", "give a directory for the page")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(field, f"cannot create {str(directory)!r}: {exc.strerror}",
                            "choose a writable directory") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadInputError(field, f"{str(directory)!r} is not writable", "choose a writable directory")


def write_report(night: NightData, directory: str | Path, *, field: str = "--html", **render) -> Path:
    """Draw the page and write it atomically to ``<directory>/night-<day_obs>.html``.

    The directory is created if missing. The page is drawn completely before anything is
    written, so a failure leaves no file behind.

    Returns
    -------
    path : `Path`
        The page written.

    Raises
    ------
    BadInputError
        Raised if ``directory`` is a file or cannot be written.
    """
    directory = Path(directory)
    check_directory(directory, field)
    text = render_page(night, **render)
    target = page_path(directory, night.day_obs)
    try:
        return write_atomic(target, text)
    except OSError as exc:
        raise BadInputError(field, f"cannot write {str(target)!r}: {exc.strerror}",
                            "choose a writable directory") from None
