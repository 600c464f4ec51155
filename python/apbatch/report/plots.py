"""The night report's figures, drawn with matplotlib (Agg) into PNG bytes.

Each function takes the plain data of `apbatch.report.data` and returns one PNG. Figures
are `matplotlib.figure.Figure` objects, never pyplot's global state, so drawing is safe in
any thread and leaves nothing behind.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Polygon, Rectangle
from matplotlib.ticker import MaxNLocator

from ..errors import ExitCode
from ..instruments import get_instrument
from ..latency import INTERVALS, REQUIREMENT
from .data import CcdInfo, Failure, VisitInfo

__all__ = ["BAND_COLOURS", "NO_TEMPLATE_COLOUR", "STATE_COLOURS", "alerts_per_visit", "dia_per_ccd",
           "failures_by_reason", "focal_plane", "latency_histograms", "message", "panel_figure", "png",
           "resources", "sky_map"]

STATE_COLOURS = {
    "COMPLETED": "#2e9e44", "FAILED": "#d62728", "TIMEOUT": "#ff7f0e", "CANCELLED": "#8c8c8c",
    "SUBMIT_FAILED": "#9467bd", "UNKNOWN": "#333333", "RUNNING": "#1f77b4", "PENDING": "#9ecae1",
    "HELD": "#e6c800", "CLAIMED": "#c7c7c7",
}
"""Fill colour of a CCD per ledger state."""

BAND_COLOURS = {"u": "#56b4e9", "g": "#008060", "r": "#ff4000", "i": "#850000", "z": "#6600cc",
                "y": "#000000", "?": "#999999"}
"""Rubin's band colours (sky map)."""

NO_TEMPLATE_COLOUR = "#e8000b"
"""Edge and hatching of a CCD that ran without a template (sky map)."""

_NO_ROW = "#ffffff"
_DPI = 100


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (white background, tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def panel_figure(npanel: int, single: tuple[float, float], panel_height: float,
                 max_cols: int = 3) -> tuple[Figure, int, int]:
    """A constrained-layout figure for ``npanel`` panels, at most ``max_cols`` per row: ``(fig, nrow, ncol)``.

    One panel gets the ``single`` size (inches); several get 5.2 x ``panel_height`` each.
    """
    ncol = min(max_cols, npanel)
    nrow = math.ceil(npanel / ncol)
    size = (5.2 * ncol, panel_height * nrow) if npanel > 1 else single
    return Figure(figsize=size, layout="constrained"), nrow, ncol


def message(text: str) -> bytes:
    """A small figure that only says ``text`` (a section without data)."""
    fig = Figure(figsize=(6, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555555")
    return png(fig)


def _ccd_patch(det, x: float = 0.0) -> Rectangle:
    w, h = det.nx * det.pixel_size_mm, det.ny * det.pixel_size_mm
    return Rectangle((det.x_mm - w / 2 + x, det.y_mm - h / 2), w, h, angle=det.yaw_deg,
                     rotation_point="center")


def focal_plane(instrument: str, ccds: Sequence[CcdInfo], title: str = "") -> bytes:
    """Three views of one visit's focal plane: CCD state, raw -> alert latency, DIA sources.

    CCDs are drawn at their real positions (mm, yaw); science CCDs without a ledger row are
    white. With more than 16 CCDs only the rafts are labelled.
    """
    cam = get_instrument(instrument)
    dets = cam.science_detectors
    by_id = {c.detector: c for c in ccds}
    fig = Figure(figsize=(15, 5.2))
    axes = fig.subplots(1, 3)
    rows = [by_id.get(d.id) for d in dets]
    lat = np.array([np.nan if c is None or c.latency is None else c.latency for c in rows], float)
    dia = np.array([np.nan if c is None or c.n_dia is None else c.n_dia for c in rows], float)
    states = [by_id[d.id].state if d.id in by_id else None for d in dets]
    top = max(2 * REQUIREMENT, float(np.nanmax(lat)) if np.isfinite(lat).any() else 0.0)
    most = max(1.0, float(np.nanmax(dia)) if np.isfinite(dia).any() else 0.0)
    views: tuple[tuple[str, str | None, Normalize | None], ...] = (
        ("state", None, None),
        (f"raw \u2192 alert latency (s; {REQUIREMENT:.0f} s required)", "RdYlGn_r", Normalize(0, top)),
        ("DIA sources", "viridis", Normalize(0, most)),
    )
    for ax, (name, cmap, norm), values in zip(axes, views, (None, lat, dia), strict=True):
        patches = [_ccd_patch(d) for d in dets]
        if values is None:
            fill = [STATE_COLOURS.get(s, "#333333") if s else _NO_ROW for s in states]
            coll = PatchCollection(patches, edgecolor="#444444", linewidth=0.5, facecolor=fill)
        else:
            grey_if_none = colormaps[cmap or "viridis"].with_extremes(bad="#eeeeee")
            coll = PatchCollection(patches, edgecolor="#444444", linewidth=0.5, norm=norm, cmap=grey_if_none)
            coll.set_array(np.ma.masked_invalid(values))
            fig.colorbar(coll, ax=ax, shrink=0.8)
            if len(dets) <= 16:  # few CCDs: their values too
                for d, val in zip(dets, values, strict=True):
                    if np.isfinite(val):
                        ax.text(d.x_mm, d.y_mm, f"{val:.3g}", ha="center", va="center", fontsize=8,
                                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
        ax.add_collection(coll)
        ax.autoscale_view()
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
    _label(axes[0], dets)
    seen = sorted({s for s in states if s})
    handles = [Patch(facecolor=STATE_COLOURS.get(s, "#333333"), edgecolor="#444444", label=s) for s in seen]
    if None in states:
        handles.append(Patch(facecolor=_NO_ROW, edgecolor="#444444", label="no job"))
    axes[0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=3,
                   frameon=False)
    axes[0].set_ylabel("y (mm)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return png(fig)


def _label(ax, dets) -> None:
    """Detector names on a few CCDs, raft names on many (readable at 189 CCDs)."""
    if len(dets) <= 16:
        for d in dets:
            ax.text(d.x_mm, d.y_mm, d.name, ha="center", va="center", fontsize=7)
        return
    rafts: dict[str, list] = {}
    for d in dets:
        rafts.setdefault(d.raft, []).append(d)
    for raft, ds in rafts.items():
        ax.text(float(np.mean([d.x_mm for d in ds])), float(np.mean([d.y_mm for d in ds])), raft,
                ha="center", va="center", fontsize=6, color="black", alpha=0.8,
                bbox={"facecolor": "white", "alpha": 0.6, "edgecolor": "none", "pad": 0.5})


def _band(instrument: str, physical_filter: str | None) -> str:
    if not physical_filter:
        return "?"
    try:
        return get_instrument(instrument).band_of(physical_filter)
    except ValueError:
        return "?"


def _clusters(visits: Sequence[VisitInfo], radius_deg: float) -> list[list[VisitInfo]]:
    """Visits grouped by pointing: each within ``radius_deg`` of its group's first visit."""
    groups: list[list[VisitInfo]] = []
    for v in visits:
        for g in groups:
            c = g[0]
            cos = (math.sin(math.radians(v.dec)) * math.sin(math.radians(c.dec))  # type: ignore[arg-type]
                   + math.cos(math.radians(v.dec)) * math.cos(math.radians(c.dec))  # type: ignore[arg-type]
                   * math.cos(math.radians(v.ra - c.ra)))  # type: ignore[operator]
            if math.degrees(math.acos(max(-1.0, min(1.0, cos)))) <= radius_deg:
                g.append(v)
                break
        else:
            groups.append([v])
    return groups


def _unwrap(ra: np.ndarray, ra0: float) -> np.ndarray:
    return (ra - ra0 + 180.0) % 360.0 - 180.0 + ra0  # keep a field on one side of RA 0


def _footprints(ax, visits: Sequence[VisitInfo], counts: dict[str, int]) -> None:
    ra0 = float(visits[0].ra)  # type: ignore[arg-type]
    for v in visits:
        cam = get_instrument(v.instrument)
        band = _band(v.instrument, v.physical_filter)
        counts.setdefault(f"band {band}", 0)
        for c in v.ccds:
            xy = cam.footprint(c.detector, float(v.ra), float(v.dec), float(v.rotation or 0.0))  # type: ignore[arg-type]
            xy[:, 0] = _unwrap(xy[:, 0], ra0)
            style: dict = {"facecolor": to_rgba(BAND_COLOURS.get(band, "#999999"), 0.45),
                           "edgecolor": "#333333", "linewidth": 0.4}
            if c.has_template is False:  # opaque red hatching over the band colour
                counts["no template"] = counts.get("no template", 0) + 1
                style.update(edgecolor=NO_TEMPLATE_COLOUR, hatch="////", linewidth=1.2)
            elif c.has_template is None:
                counts["no job metrics"] = counts.get("no job metrics", 0) + 1
                style.update(facecolor=to_rgba(BAND_COLOURS.get(band, "#999999"), 0.15), linestyle="--")
            ax.add_patch(Polygon(xy, closed=True, **style))
    _sky_axes(ax, float(np.mean([float(v.dec or 0.0) for v in visits])))


def _sky_axes(ax, dec_mid: float) -> None:
    ax.autoscale_view()
    ax.set_aspect(1.0 / max(math.cos(math.radians(dec_mid)), 0.05), adjustable="datalim")
    if not ax.xaxis_inverted():
        ax.invert_xaxis()  # east to the left, as on the sky
    ax.set_xlabel("RA (deg)", fontsize=8)
    ax.set_ylabel("Dec (deg)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def sky_map(visits: Sequence[VisitInfo], max_fields: int = 5, field_radius_deg: float = 4.0) -> bytes:
    """The night's CCD footprints on the sky, filled by band; CCDs that ran without a template hatched red.

    Visits are grouped into fields (pointings within ``field_radius_deg``); with more than one
    field, an overview of the visit centres comes first, then one panel per field (the
    ``max_fields`` with most visits), so footprints stay visible however far apart the fields are.
    """
    on_sky = [v for v in visits if v.ra is not None and v.dec is not None and v.ccds]
    if not on_sky:
        return message("no visit of this night has a pointing")
    fields = sorted(_clusters(on_sky, field_radius_deg), key=len, reverse=True)
    shown = fields[:max_fields]
    npanel = len(shown) + (len(fields) > 1)
    fig, nrow, ncol = panel_figure(npanel, (9, 7), 4.6)
    axes = list(np.atleast_1d(fig.subplots(nrow, ncol)).ravel())
    counts: dict[str, int] = {}
    if len(fields) > 1:
        ax = axes.pop(0)
        ra0 = float(on_sky[0].ra)  # type: ignore[arg-type]
        for i, f in enumerate(fields):
            ras = _unwrap(np.array([v.ra for v in f], float), ra0)
            decs = np.array([v.dec for v in f], float)
            ax.scatter(ras, decs, s=25, c=[BAND_COLOURS.get(_band(v.instrument, v.physical_filter), "#999")
                                           for v in f], edgecolor="black", linewidth=0.3)
            if i < max_fields:
                ax.annotate(f"field {i + 1}", (float(ras.mean()), float(decs.mean())), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
        _sky_axes(ax, float(np.mean([float(v.dec or 0.0) for v in on_sky])))
        ax.set_title(f"{len(on_sky)} visit(s) in {len(fields)} field(s)", fontsize=10)
    for i, (ax, f) in enumerate(zip(axes, shown, strict=False)):
        _footprints(ax, f, counts)
        what = f"{len(f)} visit(s), {sum(len(v.ccds) for v in f)} CCD footprints"
        ax.set_title(f"field {i + 1}: {what}" if len(fields) > 1 else what, fontsize=10)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles: list = [Patch(facecolor=BAND_COLOURS.get(k[5:], "#999999"), alpha=0.6, label=k)
                     for k in sorted(counts) if k.startswith("band ")]
    handles.append(Patch(facecolor="white", edgecolor=NO_TEMPLATE_COLOUR, hatch="////",
                         label=f"no template ({counts.get('no template', 0)} CCDs)"))
    if counts.get("no job metrics"):
        handles.append(Patch(facecolor="white", edgecolor="#333333", linestyle="--",
                             label=f"no job metrics ({counts['no job metrics']} CCDs)"))
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=len(handles))
    if len(fields) > max_fields:
        fig.suptitle(f"{len(fields) - max_fields} smaller field(s) not drawn", fontsize=9)
    return png(fig)


def latency_histograms(values: Mapping[str, Sequence[float]]) -> bytes:
    """One histogram per stage interval (`apbatch.latency.INTERVALS`), with p50, p95 and the 60 s line."""
    order = ["raw_to_alerts", *(n for n in INTERVALS if n != "raw_to_alerts")]  # the requirement first
    names = [n for n in order if values.get(n)]
    if not names:
        return message("no science job recorded stage times")
    ncol = min(4, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig = Figure(figsize=(3.6 * ncol, 2.9 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax, name in zip(axes, names, strict=False):
        v = np.asarray(values[name], float)
        p50, p95 = np.percentile(v, [50, 95])
        ax.hist(v, bins=min(40, max(5, len(v) // 2)), color="#4c72b0", alpha=0.85)
        ax.axvline(p50, color="black", linestyle="--", linewidth=1, label=f"p50 {p50:.3g} s")
        ax.axvline(p95, color="black", linestyle=":", linewidth=1.2, label=f"p95 {p95:.3g} s")
        title = f"{name} (n={len(v)})"
        if name == "raw_to_alerts":
            ax.axvline(REQUIREMENT, color="#d62728", linewidth=2, label=f"{REQUIREMENT:.0f} s requirement")
            if v.max() > REQUIREMENT:
                ax.axvspan(REQUIREMENT, v.max(), color="#d62728", alpha=0.08)
            title += f", {(v <= REQUIREMENT).mean():.0%} within {REQUIREMENT:.0f} s"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return png(fig)


def resources(ccds: Sequence[CcdInfo]) -> bytes:
    """CPU seconds per pipeline step (box per step, over the CCDs) and each job's peak memory."""
    steps: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    peaks: list[float] = []
    for c in ccds:
        for step, t in c.timings.items():
            steps.setdefault(step, []).append(float(t.get("cpu", np.nan)))
            walls.setdefault(step, []).append(float(t.get("wall", np.nan)))
        rss = [float(t["maxrss_mib"]) for t in c.timings.values() if t.get("maxrss_mib") is not None]
        if rss:
            peaks.append(max(rss))
    if not steps:
        return message("no job metrics with step timings")
    fig = Figure(figsize=(13, max(3.5, 0.32 * len(steps) + 1.5)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    names = list(steps)[::-1]  # pipeline order from the top
    ax.boxplot([steps[n] for n in names], orientation="horizontal", tick_labels=names, widths=0.6,
               patch_artist=True, boxprops={"facecolor": "#a6cee3"}, medianprops={"color": "black"})
    ax.scatter([np.nanmedian(walls[n]) for n in names], range(1, len(names) + 1), marker="|", s=120,
               color="#d62728", zorder=3)
    ax.legend(handles=[Patch(facecolor="#a6cee3", label="CPU s per CCD"),
                       Line2D([], [], color="#d62728", marker="|", linestyle="", markersize=12,
                              label="median wall s")], fontsize=8, loc="lower right")
    ax.set_xlabel("seconds")
    ax.set_title("CPU per step", fontsize=10)
    ax.tick_params(labelsize=8)
    ax2.hist(peaks, bins=min(30, max(5, len(peaks))), color="#fb9a99", edgecolor="#a33")
    ax2.set_xlabel("peak RSS per job (MiB)")
    ax2.set_ylabel("jobs")
    ax2.set_title(f"peak memory (max {max(peaks):.0f} MiB)" if peaks else "peak memory", fontsize=10)
    return png(fig)


def alerts_per_visit(visits: Sequence[VisitInfo]) -> bytes:
    """Alerts written per science visit, in the order of the night."""
    sci = [v for v in visits if v.intent == "science"]
    if not sci:
        return message("no science visit this night")
    fig = Figure(figsize=(max(6, min(14, 0.5 * len(sci) + 3)), 3.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(sci))
    colours = [BAND_COLOURS.get(_band(v.instrument, v.physical_filter), "#999999") for v in sci]
    ax.bar(x, [v.n_alerts for v in sci], color=colours, alpha=0.8)
    if len(sci) <= 30:
        ax.set_xticks(x, [f"{v.instrument}\n{v.visit}" for v in sci], fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("alerts")
    ax.set_xlabel("visit (bar colour: band)")
    ax.set_title(f"alerts per visit ({sum(v.n_alerts for v in sci)} in all)", fontsize=10)
    return png(fig)


def dia_per_ccd(visits: Sequence[VisitInfo]) -> bytes:
    """DIA sources per CCD-visit: their distribution, and the total per detector."""
    per_det: dict[str, list[int]] = {}
    several = len({v.instrument for v in visits}) > 1
    for v in visits:
        for c in v.ccds:
            if c.n_dia is not None:
                name = f"{v.instrument} {c.detector_name}" if several else c.detector_name
                per_det.setdefault(name, []).append(c.n_dia)
    if not per_det:
        return message("no CCD reported DIA sources")
    counts = [n for ns in per_det.values() for n in ns]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ax.hist(counts, bins=min(40, max(5, len(counts) // 2)), color="#6a3d9a", alpha=0.8)
    ax.set_xlabel("DIA sources per CCD-visit")
    ax.set_ylabel("CCD-visits")
    ax.set_title(f"{len(counts)} CCD-visits, median {np.median(counts):.0f}", fontsize=10)
    names = sorted(per_det, key=lambda k: -sum(per_det[k]))[:40]
    ax2.bar(range(len(names)), [sum(per_det[n]) for n in names], color="#cab2d6", edgecolor="#6a3d9a")
    ax2.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax2.set_title("DIA sources per detector (night total" + (", top 40)" if len(per_det) > 40 else ")"),
                  fontsize=10)
    return png(fig)


def _reason(f: Failure) -> str:
    if f.exit_code is None:
        return f"{f.state}, no exit code"
    try:
        return f"{f.state} exit {f.exit_code} ({ExitCode(f.exit_code).name.lower()})"
    except ValueError:
        return f"{f.state} exit {f.exit_code}"


def failures_by_reason(failures: Sequence[Failure]) -> bytes:
    """CCDs that did not complete, counted by state and exit code."""
    if not failures:
        return message("no failed CCD this night")
    by: dict[str, int] = {}
    for f in failures:
        by[_reason(f)] = by.get(_reason(f), 0) + 1
    names = sorted(by, key=lambda k: -by[k])
    fig = Figure(figsize=(9, 0.45 * len(names) + 1.4), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(names)), [by[n] for n in names], color="#d62728", alpha=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("CCDs")
    ax.set_title("failures by reason", fontsize=10)
    return png(fig)
