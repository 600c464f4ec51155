"""Two-snap combination with cosmic-ray rejection that allows for sky and transparency changes.

Between the two snaps of a visit the sky level and the transparency may change, so the snaps
are first modelled as ``i2 = a * i1 + b(x, y)``:

1. the sky of each snap is the median of 128x128-pixel blocks (every 4th pixel);
2. the throughput ratio ``a`` is the flux ratio (snap 2 / snap 1, above each snap's sky) of
   stars: in every 32x32 cell the brightest pixel that is bright in both snaps (a cosmic ray
   is bright in one) centres a 25x25 box (a seeing change leaves the flux inside it), boxes
   with an ignored (saturated) pixel are dropped; ``a`` is the flux-weighted ratio of the
   boxes within 5 MAD (2%-20%) of their median ratio;
3. the sky offset ``b`` is a quadratic surface (no cross term, so that it is separable;
   times the flat, if given) fitted with clipping to the block medians of
   ``(i2 - a * i1) / flat``.

A pixel is a cosmic-ray candidate if the residual ``r = i2 - a * i1 - b`` exceeds
``nsigma`` times its noise, plus 25% of the other snap's signal above the sky (a star's
core changes with the seeing). A cosmic ray in snap 1 is replaced by the visit's value
predicted from snap 2, ``i2 + (i2 - b) / a``; one in snap 2 by ``(1 + a) * i1 + b``; a pixel
hit in both is left to be interpolated.

When the snaps disagree beyond what this model explains (``a`` outside
``[min_ratio, 1 / min_ratio]``, a residual noise ``max_chi`` times its prediction, or more
than ``max_cr_fraction`` of the pixels flagged), each snap is searched on its own with
:func:`~apbatch.job.steps.defects.find_cosmic_rays` and the snaps are summed
(mode ``"single"``), rather than flag the visit away.

In both modes a column with more than ``max_column_hits`` hits is a column defect missing
from the defect list, not cosmic rays: it is left to the bad-column finder of ISR.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...image import MaskBits
from .defects import find_cosmic_rays, grow

__all__ = ["SnapConfig", "SnapModel", "SnapResult", "combine_snaps", "fit_snap_model"]

_BLOCK = 128
_SUB = 4
_CELL = 32
_APER = 12


@dataclasses.dataclass(frozen=True)
class SnapConfig:
    """Settings of :func:`combine_snaps` (see the module docstring)."""

    nsigma: float = 4.5
    seeing_allowance: float = 0.25
    min_ratio: float = 0.5
    max_chi: float = 1.5
    max_cr_fraction: float = 2e-3
    bright_nsigma: float = 20.0
    min_cells: int = 10
    max_column_hits: int = 100


@dataclasses.dataclass
class SnapResult:
    """What :func:`combine_snaps` returns; ``image``, ``variance``, ``mask`` are the visit sum."""

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    interpolate: np.ndarray
    metadata: dict


def _block_medians(sub: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """Median of every ``_BLOCK`` square of an image already subsampled by ``_SUB``.

    Ignored pixels are set alternately to -inf and +inf (they are few: the median hardly
    moves, and no NaN-aware median is needed); a block more than half ignored is NaN.
    """
    k = _BLOCK // _SUB
    sy, sx = sub.shape
    nby, nbx = max(sy // k, 1), max(sx // k, 1)
    k = min(k, sy, sx)
    sub = np.array(sub[: nby * k, : nbx * k], np.float32)
    frac = None
    if ignore is not None:
        ig = ignore[: nby * k, : nbx * k]
        if ig.any():
            sub[ig] = np.where(np.arange(int(ig.sum())) % 2 == 0, -np.inf, np.inf).astype(np.float32)
            frac = ig.reshape(nby, k, nbx, k).mean(axis=(1, 3))
    blocks = sub.reshape(nby, k, nbx, k).transpose(0, 2, 1, 3).reshape(nby, nbx, k * k)
    with np.errstate(invalid="ignore"):  # a block half -inf, half +inf: NaN, as it should
        out = np.median(blocks, axis=2)
    if frac is not None:
        out[frac > 0.5] = np.nan
    return out


def _nanmedian(a: np.ndarray) -> float:
    ok = np.isfinite(a)
    return float(np.median(a[ok])) if ok.any() else 0.0


def _block_of(y: np.ndarray, x: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(y // _BLOCK, shape[0] - 1), np.minimum(x // _BLOCK, shape[1] - 1)


def _unit(n: int, pos: np.ndarray) -> np.ndarray:
    """Pixel coordinate -> [-1, 1]."""
    return (np.asarray(pos, np.float64) + 0.5) / n * 2 - 1


@dataclasses.dataclass
class SnapModel:
    """``i2 = a * i1 + b(x, y)``, ``b = (c0 + c1 u + c2 v + c3 u^2 + c4 v^2) * flat``, u, v in [-1, 1]."""

    a: float
    coef: np.ndarray
    shape: tuple[int, int]
    flat: np.ndarray | None
    sky1: np.ndarray
    sky2: np.ndarray
    ncells: int

    def row_col(self) -> tuple[np.ndarray, np.ndarray]:
        """The separable parts of the surface: ``row(y)[:, None] + col(x)[None, :]``."""
        ny, nx = self.shape
        u, v = _unit(nx, np.arange(nx)), _unit(ny, np.arange(ny))
        c = self.coef
        row = c[0] + c[2] * v + c[4] * v * v
        return row.astype(np.float32), (c[1] * u + c[3] * u * u).astype(np.float32)

    def sky_change_at(self, idx: np.ndarray) -> np.ndarray:
        """``b`` at flat pixel indices."""
        ny, nx = self.shape
        y, x = np.divmod(idx, nx)
        u, v = _unit(nx, x), _unit(ny, y)
        c = self.coef
        out = c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * v * v
        if self.flat is not None:
            out = out * _safe_flat(self.flat.ravel()[idx])
        return out

    def fill_sky_change(self, out: np.ndarray) -> np.ndarray:
        """Write ``b`` on the full grid into ``out``."""
        row, col = self.row_col()
        np.add(row[:, None], col[None, :], out=out)
        if self.flat is not None:
            out *= _safe_flat(self.flat)
        return out


def _safe_flat(f: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(f) & (f > 0.05), f, np.float32(1.0)).astype(np.float32, copy=False)


def _fit_surface(mesh: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Clipped least-squares ``c0 + c1 u + c2 v + c3 u^2 + c4 v^2`` through the finite block values."""
    nby, nbx = mesh.shape
    v, u = np.meshgrid(
        _unit(ny, (np.arange(nby) + 0.5) * _BLOCK - 0.5),
        _unit(nx, (np.arange(nbx) + 0.5) * _BLOCK - 0.5),
        indexing="ij",
    )
    z = mesh.ravel().astype(float)
    ok = np.isfinite(z)
    coef = np.zeros(5)
    if ok.sum() < 5:
        coef[0] = float(np.median(z[ok])) if ok.any() else 0.0
        return coef
    u, v = u.ravel(), v.ravel()
    terms = np.column_stack([np.ones_like(u), u, v, u * u, v * v])
    for _ in range(4):
        coef = np.linalg.lstsq(terms[ok], z[ok], rcond=None)[0]
        res = z - terms @ coef
        s = 1.4826 * np.median(np.abs(res[ok])) + 1e-6
        new = np.isfinite(z) & (np.abs(res) < 4 * s)
        if new.sum() < 5 or (new == ok).all():
            break
        ok = new
    return coef


def fit_snap_model(
    i1: np.ndarray,
    i2: np.ndarray,
    var: np.ndarray,
    ignore: np.ndarray,
    flat: np.ndarray | None = None,
    config: SnapConfig | None = None,
) -> SnapModel:
    """Fit ``i2 = a * i1 + b(x, y)``.

    Parameters
    ----------
    i1, i2 : `numpy.ndarray`
        The two snaps (electrons, bias subtracted, before the flat).
    var : `numpy.ndarray`
        ``max(i1, 0) + max(i2, 0) + 2 * read_noise**2`` (the variance of the sum).
    ignore : `numpy.ndarray`
        Boolean: pixels to leave out (saturated, bad, bad amplifiers).
    flat : `numpy.ndarray`, optional
        The flat; ``b`` is fitted as a smooth sky change times the flat.
    config : `SnapConfig`, optional
        Settings.

    Returns
    -------
    model : `SnapModel`
        ``a`` is 1.0 if fewer than ``min_cells`` cells hold pixels bright in both snaps.
    """
    cfg = config or SnapConfig()
    ny, nx = i1.shape
    ig = ignore[::_SUB, ::_SUB]
    sub1, sub2 = i1[::_SUB, ::_SUB], i2[::_SUB, ::_SUB]
    sky1 = _block_medians(sub1, ig)
    sky2 = _block_medians(sub2, ig)
    s1g, s2g = _nanmedian(sky1), _nanmedian(sky2)
    # bright pixels: a loose cut on var (~ i1 + i2 + 2 rn^2, already there), then each snap's
    # local sky off; a source is bright in both snaps, a cosmic ray in only one
    v0 = float(np.median(var[::64, ::64]))
    idx = np.flatnonzero(var.ravel() > v0 + cfg.bright_nsigma * np.sqrt(max(v0, 1.0)))
    idx = idx[~ignore.ravel()[idx]]
    a, ncells = 1.0, 0
    if idx.size:
        y, x = np.divmod(idx, nx)
        by, bx = _block_of(y, x, sky1.shape)
        d1 = i1.ravel()[idx] - np.nan_to_num(sky1[by, bx])
        d2 = i2.ravel()[idx] - np.nan_to_num(sky2[by, bx])
        both = (d1 > 0.5 * cfg.bright_nsigma * np.sqrt(max(s1g, 1.0))) & (
            d2 > 0.5 * cfg.bright_nsigma * np.sqrt(max(s2g, 1.0))
        )
        h = _APER
        both &= (y >= h) & (y < ny - h) & (x >= h) & (x < nx - h)
        y, x, dsum = y[both], x[both], (d1 + d2)[both]
        # the brightest pixel of each cell, a star's total in a box about it in each snap
        # (a box wide enough that a seeing change does not move flux out of it)
        cell = (y // _CELL) * ((nx + _CELL - 1) // _CELL) + x // _CELL
        order = np.lexsort((-dsum, cell))
        first = order[np.unique(cell[order], return_index=True)[1]]
        py, px = y[first], x[first]
        ncells = int(py.size)
        if ncells >= cfg.min_cells:
            oy, ox = np.mgrid[-h : h + 1, -h : h + 1]
            box = (py[:, None] + oy.ravel()[None, :]) * nx + (px[:, None] + ox.ravel()[None, :])
            clean = ~ignore.ravel()[box].any(axis=1)
            bsy, bsx = _block_of(py, px, sky1.shape)
            f1 = i1.ravel()[box].sum(axis=1, dtype=np.float64) - np.nan_to_num(sky1[bsy, bsx]) * box.shape[1]
            f2 = i2.ravel()[box].sum(axis=1, dtype=np.float64) - np.nan_to_num(sky2[bsy, bsx]) * box.shape[1]
            ok = clean & (f1 > 0) & (f2 > 0)
            ncells = int(ok.sum())
            if ncells >= cfg.min_cells:
                ratio = f2[ok] / f1[ok]
                a0 = float(np.median(ratio))
                mad = 1.4826 * float(np.median(np.abs(ratio - a0)))
                near = np.abs(ratio - a0) < min(max(5 * mad, 0.02 * a0), 0.2 * a0)
                a = float(f2[ok][near].sum() / f1[ok][near].sum())
    # sky offset: block medians of (i2 - a i1) / flat, a quadratic surface (times the flat)
    sub = sub2 - np.float32(a) * sub1
    if flat is not None:
        sub /= _safe_flat(flat[::_SUB, ::_SUB])
    coef = _fit_surface(_block_medians(sub, ig), ny, nx)
    return SnapModel(a, coef, (ny, nx), flat, sky1, sky2, ncells)


def _grow_idx(idx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Flat indices of the 3x3 neighbourhoods of ``idx`` (sorted, unique)."""
    ny, nx = shape
    y, x = np.divmod(idx, nx)
    out = [
        np.clip(y + dy, 0, ny - 1) * nx + np.clip(x + dx, 0, nx - 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    return np.unique(np.concatenate(out))


def _drop_columns(hit: np.ndarray, cfg: SnapConfig) -> np.ndarray:
    """Clear the columns with more than ``max_column_hits`` hits (defects, for the bad-column finder)."""
    cols = np.flatnonzero(hit.sum(axis=0) > cfg.max_column_hits)
    hit[:, cols] = False
    return hit


def _single(i1, i2, rn2, cfg, mask, ignore, meta) -> SnapResult:
    """Fallback: each snap's own sharp-pixel cosmic rays, interpolated in the plain sum."""
    var1 = np.maximum(i1, 0)
    var1 += rn2
    var2 = np.maximum(i2, 0)
    var2 += rn2
    cr1, cr2 = (
        _drop_columns(find_cosmic_rays(im, v, mask, cfg.nsigma), cfg) for im, v in ((i1, var1), (i2, var2))
    )
    cr1, cr2 = grow(cr1), grow(cr2)
    crmask = np.logical_or(cr1, cr2, out=cr1)
    if ignore is not None:
        crmask &= ~ignore
    var1 += var2
    img = np.add(i1, i2, out=i1)
    mask[crmask] |= MaskBits.CR
    meta.update(SNAPMODE="single", SNAPNCR=int(crmask.sum()))
    return SnapResult(img, var1, mask, crmask, meta)


def combine_snaps(
    i1: np.ndarray,
    m1: np.ndarray,
    i2: np.ndarray,
    m2: np.ndarray,
    rn2: np.ndarray,
    flat: np.ndarray | None = None,
    ignore: np.ndarray | None = None,
    config: SnapConfig | None = None,
) -> SnapResult:
    """Sum two snaps of a visit, replacing the cosmic rays of one by the other (see module docstring).

    Parameters
    ----------
    i1, m1, i2, m2 : `numpy.ndarray`
        Images (electrons, bias subtracted, before the flat) and masks of the two snaps;
        the buffers of ``i1`` and ``m1`` are reused for the output.
    rn2 : `numpy.ndarray`
        Read noise squared of every pixel (e-^2).
    flat : `numpy.ndarray`, optional
        The flat (only to shape the sky-offset model).
    ignore : `numpy.ndarray`, optional
        Boolean: pixels not to model nor search (e.g. bad amplifiers).
    config : `SnapConfig`, optional
        Settings.

    Returns
    -------
    result : `SnapResult`
        Sum, its variance and mask (``CR`` set), the pixels to interpolate (hit in both
        snaps, or every cosmic ray in mode ``"single"``), and metadata ``SNAPMODE``
        (``"model"`` or ``"single"``), ``SNAPRATI`` (``a``), ``SNAPDSKY`` (median sky
        change, snap 2 - snap 1, e- before the flat), ``SNAPNCR`` (pixels flagged ``CR``),
        ``SNAPRCHI`` (noise of the residual over its prediction).
    """
    cfg = config or SnapConfig()
    shape = i1.shape
    mask = np.bitwise_or(m1, m2, out=m1)
    skip = (mask & int(MaskBits.SAT | MaskBits.BAD)) != 0
    if ignore is not None:
        skip |= ignore
    var = np.maximum(i1, 0)
    tmp = np.maximum(i2, 0)
    var += tmp
    np.multiply(rn2, np.float32(2.0), out=tmp)
    var += tmp
    model = fit_snap_model(i1, i2, var, skip, flat, cfg)
    a = model.a
    # scaled residual r' = (i2 - b) / a - i1 = r / a, in the scratch buffer
    r = model.fill_sky_change(tmp)
    np.subtract(i2, r, out=r)
    r *= np.float32(1.0 / a)
    r -= i1
    meta: dict[str, Any] = {
        "SNAPRATI": round(a, 5),
        "SNAPDSKY": round(_nanmedian(model.sky2 - model.sky1), 3),
    }
    # robust noise of the residual against its prediction, on every 8th pixel off sources;
    # var = v1 + v2 and var(r) = v2 + a^2 v1 ~ var (1 + a^2) / 2
    keep = ~skip[::8, ::8]
    z = r[::8, ::8][keep] * np.float32(a) / np.sqrt(var[::8, ::8][keep] * np.float32((1 + a * a) / 2))
    chi = float(1.4826 * np.median(np.abs(z - np.median(z)))) if z.size else 1.0
    meta["SNAPRCHI"] = round(chi, 3)
    if not (cfg.min_ratio <= a <= 1.0 / cfg.min_ratio) or chi > cfg.max_chi:
        return _single(i1, i2, rn2, cfg, mask, ignore, meta)
    # candidates on the whole image against a lower bound of the residual's variance,
    # min(1, a^2) (v1 + v2) <= v2 + a^2 v1, r'^2 a^2 > n^2 min(1, a^2) var
    np.square(r, out=r)
    r *= np.float32(a * a / (cfg.nsigma**2 * min(1.0, a * a)))
    cand = np.flatnonzero((r > var).ravel())
    del r, tmp
    cand = cand[~skip.ravel()[cand]]
    y, x = np.divmod(cand, shape[1])
    by, bx = _block_of(y, x, model.sky1.shape)
    c1, c2, rn = i1.ravel()[cand], i2.ravel()[cand], rn2.ravel()[cand]
    rc = c2 - a * c1 - model.sky_change_at(cand)
    thr = cfg.nsigma * np.sqrt(np.maximum(c2, 0) + rn + a * a * (np.maximum(c1, 0) + rn))
    hit2 = rc > thr + cfg.seeing_allowance * a * np.abs(c1 - np.nan_to_num(model.sky1[by, bx]))
    hit1 = -rc > thr + cfg.seeing_allowance * np.abs(c2 - np.nan_to_num(model.sky2[by, bx]))
    # a column defect that is not in the defect list is no cosmic ray: left to the bad-column finder
    for hit in (hit1, hit2):
        if hit.any():
            many = np.bincount(x[hit], minlength=shape[1]) > cfg.max_column_hits
            hit &= ~many[x]
    ncr = int(hit1.sum() + hit2.sum())
    if ncr > cfg.max_cr_fraction * i1.size:
        meta["SNAPNCRM"] = ncr
        return _single(i1, i2, rn2, cfg, mask, ignore, meta)
    g1, g2 = (_grow_idx(cand[h], shape) for h in (hit1, hit2))
    g1, g2 = g1[~skip.ravel()[g1]], g2[~skip.ravel()[g2]]
    both = np.intersect1d(g1, g2, assume_unique=True)
    fixes = []
    for idx, k in ((np.setdiff1d(g1, both, True), 1), (np.setdiff1d(g2, both, True), 2)):
        o1, o2, rr = i1.ravel()[idx], i2.ravel()[idx], rn2.ravel()[idx]
        bb = model.sky_change_at(idx)
        if k == 1:  # snap 1 hit: the visit from snap 2
            fixes.append((idx, o2 + (o2 - bb) / a, (1 + 1 / a) ** 2 * (np.maximum(o2, 0) + rr)))
        else:
            fixes.append((idx, (1 + a) * o1 + bb, (1 + a) ** 2 * (np.maximum(o1, 0) + rr)))
    img = np.add(i1, i2, out=i1)
    for idx, val, v in fixes:
        img.ravel()[idx] = val
        var.ravel()[idx] = v
    crs = np.union1d(g1, g2)
    mask.ravel()[crs] |= MaskBits.CR
    interp = np.zeros(shape, bool)
    interp.ravel()[both] = True
    meta.update(SNAPMODE="model", SNAPNCR=int(crs.size))
    return SnapResult(img, var, mask, interp, meta)
