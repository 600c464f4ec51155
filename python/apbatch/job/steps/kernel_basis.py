"""The Alard-Lupton kernel basis, its fit on star stamps and its FFT application (for ``subtract``).

The kernel is ``K(u, v; x, y) = sum_t sum_s c[s, t] P_s(x, y) B_t(u, v)``: separable basis
functions ``B_t`` (a Gaussian of width ``sigmas[k]`` times ``(u/h)^i (v/h)^j``, ``i + j <=
degrees[k]``) whose coefficients are polynomials ``P_s`` of degree ``spatial_degree`` (1: 3
terms, 2: 6 terms) in the CCD position scaled to [-1, 1]; a differential background of the
same spatial form is fitted with them. The template may be larger than the science image
by ``pad`` px on every side (a padded warp): its stamps and its convolution then reach
beyond the science image's edge. Plain functions; no state.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy.spatial import cKDTree

from ...image import Image, MaskBits
from . import parallel
from .kernel_residual import residual_profile

__all__ = ["STAMP_BAD", "basis_1d", "convolve_terms", "fit_kernel", "kernel_image", "select_stamps",
           "spatial_terms"]

STAMP_BAD = int(
    MaskBits.BAD | MaskBits.SAT | MaskBits.CR | MaskBits.NO_DATA | MaskBits.INTRP | MaskBits.EDGE
)


def spatial_terms(degree: int, u, v) -> list:
    """Monomials ``u**i v**j`` (``i + j <= degree``; 1, u, v, u^2, uv, v^2 order), broadcast."""
    out = []
    for d in range(degree + 1):
        for j in range(d + 1):
            out.append(u ** (d - j) * v**j if d else np.ones_like(u * v))
    return out


def basis_1d(sigmas, degrees, h: int):
    """1-d factors ``{(k, i): f}`` (``f`` of length ``2h+1``, L1-normalised) and terms ``[(k, i, j)]``."""
    u = np.arange(-h, h + 1, dtype=float)
    funcs, terms = {}, []
    for si, (s, d) in enumerate(zip(sigmas, degrees, strict=False)):
        g = np.exp(-u * u / (2 * s * s))
        for i in range(d + 1):
            f = g * (u / h) ** i
            funcs[(si, i)] = f / np.abs(f).sum()
        terms += [(si, i, j) for i in range(d + 1) for j in range(d + 1 - i)]
    return funcs, terms


def _conv_matrix(f: np.ndarray, n_in: int) -> np.ndarray:
    h = len(f) // 2
    n_out = n_in - 2 * h
    m = np.zeros((n_out, n_in))
    for q in range(-h, h + 1):
        m[np.arange(n_out), np.arange(n_out) + h - q] = f[q + h]
    return m


def select_stamps(sources: pd.DataFrame, sci: Image, tmpl: Image, h: int, pad: int, n_stamps: int,
                  margin: int, min_snr: float, isolation: float | None = None) -> list[tuple[int, int]]:
    """Science (x, y) of up to ``n_stamps`` bright isolated clean stars, spread over a 5 x 5 grid of cells.

    Isolated: no other source within ``isolation`` px (default: the stamp half-size).
    """
    ny, nx = sci.shape
    S = h + margin
    H = S + max(h - pad, 0)  # the template stamp (half S + h) must lie inside the (padded) template
    s = sources
    ok = (s["snr"] >= min_snr) & (s["flag"] == 0) & (~s["masked"])
    ok &= (s["x"] >= H + 1) & (s["x"] < nx - H - 2) & (s["y"] >= H + 1) & (s["y"] < ny - H - 2)
    xy = s[["x", "y"]].to_numpy()
    if len(xy) > 1:
        nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
        ok &= nn > (S if isolation is None else isolation)
    cand = s[ok].sort_values("snr", ascending=False)
    ncell = 5
    quota = int(np.ceil(n_stamps / ncell**2)) + 1
    cxy = cand[["x", "y"]].to_numpy()
    cell = np.minimum((cxy[:, 0] / nx * ncell).astype(int), ncell - 1) * ncell + np.minimum(
        (cxy[:, 1] / ny * ncell).astype(int), ncell - 1
    )
    picked: list[tuple[int, int]] = []
    counts: dict[int, int] = {}
    for (x, y), c in zip(cxy, cell, strict=False):
        xi, yi = int(round(x)), int(round(y))
        sbox = (slice(yi - S, yi + S + 1), slice(xi - S, xi + S + 1))
        tbox = (slice(yi + pad - S - h, yi + pad + S + h + 1), slice(xi + pad - S - h, xi + pad + S + h + 1))
        if (sci.mask[sbox] & STAMP_BAD).any() or (tmpl.mask[tbox] & STAMP_BAD).any():
            continue
        if counts.get(c, 0) >= quota:
            continue
        counts[c] = counts.get(c, 0) + 1
        picked.append((xi, yi))
        if len(picked) >= n_stamps:
            break
    return picked


def fit_kernel(sci: Image, tmpl: Image, stamps, funcs, terms, h: int, pad: int, margin: int,
               spatial_degree: int, clip_sigma: float, max_iter: int):
    """Weighted least-squares kernel coefficients, clipping stamps whose chi^2 is an outlier.

    Returns ``(coef, chi2_per_dof, n_used, n_rejected, profile)``; ``coef`` is (n_spatial,
    n_terms + 1), the last column the background; ``profile`` the radial profile of the
    residual the fit leaves on the stamps it kept
    (:func:`~apbatch.job.steps.kernel_residual.residual_profile`).
    """
    ny, nx = sci.shape
    S = h + margin
    n_in = 2 * (S + h) + 1
    T = np.array(
        [tmpl.image[y + pad - S - h : y + pad + S + h + 1, x + pad - S - h : x + pad + S + h + 1]
         for x, y in stamps], float
    )
    R = np.array([sci.image[y - S : y + S + 1, x - S : x + S + 1] for x, y in stamps], float)
    V = np.array(
        [
            sci.variance[y - S : y + S + 1, x - S : x + S + 1]
            + tmpl.variance[y + pad - S : y + pad + S + 1, x + pad - S : x + pad + S + 1]
            for x, y in stamps
        ],
        float,
    )
    W = 1.0 / np.maximum(V, 1e-3)
    mats = {k: _conv_matrix(f, n_in) for k, f in funcs.items()}
    horiz = {k: T @ m.T for k, m in mats.items()}  # (n, n_in, n_out): convolved along x
    Q = np.empty((len(stamps), 2 * S + 1, 2 * S + 1, len(terms) + 1))
    for t, (si, i, j) in enumerate(terms):
        Q[..., t] = mats[(si, j)] @ horiz[(si, i)]
    del horiz
    Q[..., -1] = 1.0
    nb = Q.shape[-1]
    Qf = Q.reshape(len(stamps), -1, nb)
    Rf, Wf = R.reshape(len(stamps), -1), W.reshape(len(stamps), -1)
    QtW = (Qf * Wf[:, :, None]).transpose(0, 2, 1)  # batched BLAS products, not einsum loops
    QtWQ = QtW @ Qf
    QtWR = (QtW @ Rf[:, :, None])[:, :, 0]
    xy = np.array(stamps, float)
    u, v = (xy[:, 0] - nx / 2) / (nx / 2), (xy[:, 1] - ny / 2) / (ny / 2)
    P = np.array(spatial_terms(spatial_degree, u, v)).T
    ns = P.shape[1]
    use = np.ones(len(stamps), bool)
    n_rej = 0
    for _ in range(max_iter + 1):
        N = np.einsum("si,sj,sab->iajb", P[use], P[use], QtWQ[use]).reshape(ns * nb, ns * nb)
        b = np.einsum("si,sa->ia", P[use], QtWR[use]).reshape(ns * nb)
        d = np.sqrt(np.maximum(np.diag(N), 1e-30))
        sol = np.linalg.lstsq(N / d[:, None] / d[None, :], b / d, rcond=1e-12)[0] / d
        coef = sol.reshape(ns, nb)
        model = (Qf @ (P @ coef)[:, :, None])[:, :, 0]
        chi2 = ((Rf - model) ** 2 * Wf).mean(axis=1)
        med = np.median(chi2[use])
        mad = 1.4826 * np.median(np.abs(chi2[use] - med))
        bad = use & (chi2 > med + clip_sigma * max(mad, 0.05 * med))
        if not bad.any() or use.sum() - bad.sum() < max(10, ns * nb // 9):
            break
        use &= ~bad
        n_rej += int(bad.sum())
    fitted = P @ coef
    star = model - fitted[:, -1:]  # the model without its background: the star's flux
    side = 2 * S + 1
    profile = residual_profile((Rf - model)[use].reshape(-1, side, side), V[use], star[use].sum(axis=1))
    return coef, float(np.median(chi2[use])), int(use.sum()), n_rej, profile


def kernel_image(coef_row, funcs, terms) -> np.ndarray:
    """The 2-d kernel ``sum_t coef_row[t] B_t``."""
    k = 0.0
    for c, (si, i, j) in zip(coef_row, terms, strict=False):
        k = k + c * np.outer(funcs[(si, j)], funcs[(si, i)])
    return np.asarray(k)


def _centred(f: np.ndarray, n: int) -> np.ndarray:
    """1-d kernel ``f`` (odd length) laid out with its centre at index 0 of a length-``n`` array."""
    h = len(f) // 2
    a = np.zeros(n)
    a[: h + 1] = f[h:]
    a[n - h :] = f[:h]
    return a


def convolve_terms(img, coefs, funcs, terms, fshape, crop: tuple[slice, slice]):
    """Yield ``(img * K_j)[crop]`` ('same' size, zero padding) for ``K_j = sum_t coefs[j, t] B_t``.

    One forward FFT of the image; each kernel's FFT is a sum of outer products of the
    separable basis' 1-d FFTs (one small complex matrix product), then one inverse FFT.
    A generator: the caller uses each CCD-sized result before the next is made. Once the
    forward FFT is taken the generator lets go of ``img`` (a caller that drops its own
    reference frees the image while the terms are made), and each inverse FFT is freed
    before its crop is handed over.
    """
    FT = sfft.rfft2(img, s=fshape, workers=parallel.threads())
    del img
    fy = np.array([np.fft.fft(_centred(funcs[(si, j)], fshape[0])) for si, i, j in terms]).T.astype(
        np.complex64
    )
    fx = np.array([np.fft.rfft(_centred(funcs[(si, i)], fshape[1])) for si, i, j in terms]).astype(
        np.complex64
    )
    for c in coefs:
        FK = fy @ (c[:, None].astype(np.complex64) * fx)
        FK *= FT
        # FK is a temporary: let the inverse transform work in its buffer
        out = sfft.irfft2(FK, s=fshape, workers=parallel.threads(), overwrite_x=True)
        del FK
        term = np.ascontiguousarray(out[crop])
        del out
        yield term
        del term
