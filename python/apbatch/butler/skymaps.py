"""Put a sky map into the repository: its ``skymap``/``tract``/``patch`` records and its definition.

The definition (`apbatch.skymap.SkyMap.to_dict`) is stored as the ``skyMap`` dataset (a
``StructuredDataDict``) so jobs rebuild the same `SkyMap` with ``from_dict`` and look up the
patches a CCD overlaps. Patch ids are ``cell_y * patch_nx + cell_x`` (row-major); patch
records carry their sky polygon as region.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from lsst.daf.butler import Butler

from ..errors import BadInputError
from . import datasets as ds

__all__ = ["load_skymap_dict", "register_skymap", "skymap_grid"]


def load_skymap_dict(path: str | Path) -> dict[str, Any]:
    """Read a sky-map definition written as YAML or JSON.

    Raises
    ------
    BadInputError
        Raised if the file is unreadable or lacks ``name``.
    """
    try:
        d = yaml.safe_load(Path(path).read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(str(path), f"cannot read sky map: {exc}") from None
    if not isinstance(d, dict) or not d.get("name"):
        raise BadInputError(f"{path}: name", "missing", "the sky map definition must name the sky map")
    return d


def skymap_grid(d: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(tract_max, patch_nx, patch_ny)`` of a sky-map definition.

    Raises
    ------
    BadInputError
        Raised if the definition is not a valid `apbatch.skymap.SkyMap` description.
    """
    from ..skymap import SkyMap  # noqa: PLC0415

    sm = SkyMap.from_dict(dict(d))
    nx, ny = sm.tract(0).n_patches
    return sm.n_tracts, int(nx), int(ny)


def _region(corners) -> Any:
    """A sphgeom polygon from (N, 2) RA/Dec corners (degrees)."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d  # noqa: PLC0415

    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in corners])


def register_skymap(
    butler: Butler,
    source: str | Path | Mapping[str, Any],
    run: str,
    tract_patches: Iterable[tuple[int, int]] | None = None,
) -> str:
    """Insert the sky map's dimension records and store its definition; returns its name.

    Parameters
    ----------
    butler : `Butler`
        Writeable butler.
    source : `str`, `Path` or `dict`
        The definition (``SkyMap.to_dict()``) or a YAML/JSON file holding it.
    run : `str`
        RUN collection for the ``skyMap`` dataset.
    tract_patches : iterable of (`int`, `int`), optional
        (tract, patch) pairs to register; default every patch of every tract.

    Raises
    ------
    BadInputError
        Raised if the definition is unusable, or a sky map of the same name but a different
        definition is already registered.
    """
    d = dict(source) if isinstance(source, Mapping) else load_skymap_dict(source)
    name = str(d["name"])
    tract_max, nx, ny = skymap_grid(d)
    digest = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).digest()
    registry = butler.registry
    try:
        registry.syncDimensionData(
            "skymap",
            {"name": name, "hash": digest, "tract_max": tract_max, "patch_nx_max": nx, "patch_ny_max": ny},
        )
    except Exception as exc:  # ConflictingDefinitionError: same name, other definition
        raise BadInputError(
            "skymap",
            f"{name!r} is already registered with another definition: {exc}",
            "give the new sky map a new name",
        ) from None
    pairs = (
        sorted(set(tract_patches))
        if tract_patches is not None
        else [(t, p) for t in range(tract_max) for p in range(nx * ny)]
    )
    tracts = sorted({t for t, _ in pairs})
    registry.insertDimensionData("tract", *[{"skymap": name, "id": t} for t in tracts], skip_existing=True)
    from ..skymap import SkyMap  # noqa: PLC0415

    sm = SkyMap.from_dict(d)
    rows = []
    for t, p in pairs:
        info = sm.patch(t, p)  # raises BadInputError for a patch the sky map does not have
        rows.append(
            {
                "skymap": name,
                "tract": t,
                "id": p,
                "cell_x": info.index[0],
                "cell_y": info.index[1],
                "region": _region(info.corners),
            }
        )
    registry.insertDimensionData("patch", *rows, skip_existing=True)
    butler.collections.register(run)
    if butler.find_dataset(ds.SKYMAP, skymap=name, collections=run) is None:
        butler.put(d, ds.SKYMAP, skymap=name, run=run)
    return name
