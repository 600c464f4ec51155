"""Render a night plan into files: raws, calibrations, templates, truth, sky map, timeline.

The directory layout is described in :mod:`apbatch.sim.night`. CCDs are rendered
detector by detector (all exposures of one CCD in a row) so that the CCD's signature
(flat response, ~65 MB) is computed once.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..image import write_image
from ..instruments import get_instrument
from ..job.template_sources import template_sources, write_template_sources
from ..skymap import SkyMap
from .calibs import detector_signature, make_bias, make_flat
from .events import raw_relpath, timeline, write_timeline
from .night import NightPlan
from .raws import simulate_ccd
from .templates import render_template, write_template
from .truth import truth_path, visit_truth, write_truth

__all__ = ["night_skymap", "simulate_night"]


def night_skymap(plan: NightPlan, patch_size: int = 4000, overlap: int = 100) -> SkyMap:
    """The night's template sky map: one tract per field."""
    return SkyMap(
        f"apbatch-sim-{plan.seed}",
        plan.fields,
        patch_size=patch_size,
        overlap=overlap,
        tract_radius_deg=2.2 if plan.instrument == "LSSTCam" else 1.0,
    )


def simulate_night(
    plan: NightPlan,
    out_dir: str | Path,
    *,
    templates: bool = True,
    patch_size: int = 4000,
    compress: str | None = "RICE",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write everything a night produces into ``out_dir``.

    Parameters
    ----------
    plan : `NightPlan`
        The night.
    out_dir : `str` or `Path`
        Output directory (created).
    templates : `bool`
        Render the template patches that the simulated CCDs overlap.
    patch_size : `int`
        Template patch size in pixels (sky-map parameter).
    compress : `str` or `None`
        Raw tile compression (``RICE`` like the camera).
    progress : callable, optional
        Called with one line per file written.

    Returns
    -------
    manifest : `dict`
        Counts and timings (also written as ``manifest.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    inst = get_instrument(plan.instrument)
    plan.save(out / "night.json")
    skymap = night_skymap(plan, patch_size=patch_size)
    (out / "skymap.yaml").write_text(yaml.safe_dump(skymap.to_dict(), sort_keys=False))
    sky = plan.sky()
    counts: collections.Counter[str] = collections.Counter()
    filters = sorted(
        {v.physical_filter for v in plan.visits}
        | {c.physical_filter for c in plan.calibrations if c.image_type == "FLAT"}
    )
    needed: dict[tuple[int, int], set[str]] = collections.defaultdict(set)
    calib_entries: list[dict] = []
    template_entries: list[dict] = []
    for det_id in plan.detectors:
        det = inst.detector(det_id)
        sig = detector_signature(inst.name, det.id, plan.seed)
        bias_rel = Path(inst.name) / "bias" / f"bias_{det.name}.fits"
        write_image(make_bias(sig, plan.seed), out / "calibs" / bias_rel)
        calib_entries.append(
            {"dataset_type": "bias", "file": bias_rel.as_posix(), "data_id": {"detector": det.id}}
        )
        for f in filters:
            flat_rel = Path(inst.name) / "flat" / f / f"flat_{f}_{det.name}.fits"
            write_image(make_flat(sig, f, plan.seed), out / "calibs" / flat_rel)
            calib_entries.append({"dataset_type": "flat", "file": flat_rel.as_posix(),
                                  "data_id": {"detector": det.id, "physical_filter": f}})
        counts["calibs"] += 1 + len(filters)
        for spec in plan.calibrations:
            simulate_ccd(spec, det.id, None, plan.seed, out / raw_relpath(spec, det.name), compress)
            counts["raws"] += 1
        for v in plan.visits:
            snaps = []
            for spec in v.exposures:
                raw = simulate_ccd(spec, det.id, sky, plan.seed, out / raw_relpath(spec, det.name), compress)
                snaps.append(raw.truth)
                counts["raws"] += 1
                say(f"raw {spec.obs_id} {det.name}")
            if snaps:
                write_truth(visit_truth(snaps), truth_path(out / "truth", inst.name, v.visit_id, det.name))
                counts["truth"] += 1
                ra0, dec0, _ = v.exposures[0].pointing()
                fp = inst.footprint(det, ra0, dec0, v.rotation, 10.0)
                band = inst.filters[v.physical_filter].split("~")[0]
                for p in skymap.patches_overlapping(fp):
                    needed[(p.tract, p.patch)].add(band)
    if templates:
        for (tract, patch), bands in sorted(needed.items()):
            info = skymap.patch(tract, patch)
            for band in sorted(bands):
                img = render_template(info, band, sky, plan.seed, pixel_scale=skymap.pixel_scale)
                path = write_template(img, out / "templates", skymap.name)
                # its astrometric references, made once here rather than by every job
                sources = write_template_sources(template_sources(img), path.with_suffix(".parq"))
                del img
                data_id = {"tract": int(tract), "patch": int(patch), "band": band}
                for kind, file in (("template_coadd", path), ("template_sources", sources)):
                    template_entries.append({"dataset_type": kind, "data_id": dict(data_id),
                                             "file": file.relative_to(out / "templates").as_posix()})
                counts["templates"] += 1
                say(f"template {tract}/{patch} {band}")
    write_timeline(timeline(plan), out / "timeline.jsonl")
    # ingest manifests (format: apbatch.butler.ingest), one per directory
    _write_yaml(out / "calibs" / "manifest.yaml", {"instrument": inst.name, "datasets": calib_entries})
    if templates:
        _write_yaml(out / "templates" / "skymap.yaml", skymap.to_dict())
        _write_yaml(out / "templates" / "manifest.yaml",
                    {"instrument": inst.name, "skymap": "skymap.yaml", "datasets": template_entries})
    manifest = {
        "instrument": plan.instrument,
        "day_obs": plan.day_obs,
        "seed": plan.seed,
        "detectors": plan.detectors,
        "visits": len(plan.visits),
        "skymap": skymap.name,
        "counts": dict(counts),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _write_yaml(path: Path, data: dict) -> None:
    """Write YAML atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
