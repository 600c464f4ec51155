"""Fit the DIA reliability model on simulated scenes and validate it on held-out conditions.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/fit_reliability.py [--quick] [--no-write] [--any-code]``
(14 scenes, 3-5 min CPU when none is cached; ``--quick``: 5 scenes).

Each scene (``tests/steps_scene.py``: ``make_scene`` then ``run_chain``, 15-30 s CPU) gives a
table of DIA sources, labelled real when within 2.5 px of an injected transient and bogus
otherwise (saturated-star residuals, cosmic rays, bad columns, noise peaks, PSF mismatch...).
Tables are cached as Parquet under ``$APBATCH_RELIABILITY_CACHE`` (default
``/tmp/apbatch_reliability_cache``), keyed by condition, seed, scene keyword arguments and a
hash of the step code and the scene generator, so a refit is cheap and a code change
recomputes the scenes (``--any-code`` reuses tables of an older code version instead).

The model (:mod:`apbatch.job.steps.reliability`) is an L2-penalised logistic regression
fitted on the TRAIN scenes, then Platt-recalibrated on its leave-one-scene-out logits over
the same scenes; the weights' sample (all detections down to 4 sigma, or the pipeline's
only) and penalty are chosen by the leave-one-scene-out log loss (:data:`CANDIDATES`). The
HELD-OUT scenes (other seeds and other conditions) are used only to report: a reliability
diagram (5 bins of predicted probability: mean predicted vs observed fraction real), the
expected calibration error, the Brier score, ROC AUC and the precision/recall of "real" at
0.5. The coefficients, feature names, conditions, seeds, date and these figures are written
atomically to ``python/apbatch/data/reliability.json``.

Conditions are ``make_scene`` keyword arguments; ``tests/scene_conditions.py``'s
``CONDITIONS`` dict, when present, is merged over the built-in ones, and ``--train`` /
``--heldout`` take ``name:seed`` lists.
"""

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from apbatch.atomic import replacing  # noqa: E402
from apbatch.errors import BadInputError  # noqa: E402
from apbatch.job.steps import reliability as rel  # noqa: E402
from apbatch.job.steps import reliability_fit as relfit  # noqa: E402

CACHE = Path(os.environ.get("APBATCH_RELIABILITY_CACHE", "/tmp/apbatch_reliability_cache"))
MATCH_RADIUS = 2.5
EXTRA_THRESHOLD = 4.0
TABLE_FORMAT = 2
OUTPUT = ROOT / "python" / "apbatch" / "data" / "reliability.json"

# make_scene keyword arguments per condition (tests/scene_conditions.py may add or override)
BUILTIN_CONDITIONS: dict[str, dict] = {
    "baseline": {},
    "seeing_good": {"sci_sigma": 1.5},
    "seeing_poor": {"sci_sigma": 2.1},
    "seeing_bad": {"sci_sigma": 2.6},
    "crowded": {"n_stars": 6000},
    "crowded_cr": {"n_stars": 9000, "n_cr": 1500},
    "cosmic_rays": {"n_cr": 1200},
    "bright_sky": {"sky": 1500.0},
}
# Informative prior (MAP) and sign bounds of the raw coefficients: the scenes hold too few
# flagged artifacts to learn the flags (the pipeline already zeroes detections beside defects),
# so those keep the hand-set score's penalties unless the data say otherwise, and may never
# raise the score; a brighter source may never lower it.
PRIOR_MEAN = {
    "isDipole": -2.0,
    "pixelFlags_bad": -3.0,
    "pixelFlags_saturated": -3.0,
    "pixelFlags_cr": -3.0,
    "pixelFlags_edge": -3.0,
    "pixelFlags_suspect": -1.0,
}
NOT_POSITIVE = ("isDipole", "pixelFlags_")
# grid names (tests/scene_conditions.py); held-out conditions differ from every training one
TRAIN = (
    "baseline:11,seeing_0.7:12,seeing_1.2:13,atmospheric:14,galaxy_rich:15,saturated_rich:16,"
    "sky_change_0.1:17,dead_amp:18"
)
HELDOUT = (
    "seeing_1.6:21,atmospheric_varying:22,crowded:23,transparency_0.3:24,hot_amp:25,corner_R34_S22_e2v:26"
)
QUICK_TRAIN = "baseline:11,seeing_1.2:13,galaxy_rich:15"
QUICK_HELDOUT = "seeing_1.6:21,atmospheric_varying:22"


def conditions() -> dict[str, dict]:
    """Built-in conditions, updated with ``tests/scene_conditions.py``'s ``CONDITIONS`` if it exists."""
    out = dict(BUILTIN_CONDITIONS)
    try:
        import scene_conditions
    except ImportError:
        return out
    out.update({k: dict(v) for k, v in getattr(scene_conditions, "CONDITIONS", {}).items()})
    return out


def parse_runs(text: str, known: dict[str, dict]) -> list[tuple[str, int]]:
    """``"name:seed,name:seed"`` -> ``[(name, seed), ...]``; names must be known conditions."""
    runs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, seed = item.partition(":")
        if name not in known:
            raise SystemExit(f"unknown condition {name!r}; known: {', '.join(sorted(known))}")
        if not seed.isdigit():
            raise SystemExit(f"{item!r}: expected name:seed with an integer seed")
        runs.append((name, int(seed)))
    return runs


@functools.cache
def code_version() -> str:
    """Hash of the step code and the scene generator: a change invalidates the cached tables.

    Taken once, at import (the steps are imported then too), so that it describes the code run.
    """
    h = hashlib.sha256()
    files = sorted((ROOT / "python" / "apbatch" / "job" / "steps").glob("*.py"))
    files += [ROOT / "tests" / "steps_scene.py"]
    for f in files:
        if f.name not in ("reliability.py", "reliability_fit.py"):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def scene_table(
    name: str, kwargs: dict, seed: int, refresh: bool = False, any_code: bool = False
) -> pd.DataFrame:
    """Labelled DIA sources of one scene (cached).

    Rows are the pipeline's detections (``pipeline`` true) followed by a second measurement of
    the same difference image at ``EXTRA_THRESHOLD`` sigma (``pipeline`` false); columns are the
    DIA columns plus ``psf_sigma``, ``dist`` (to the nearest injected transient), ``real``,
    ``truth_snr``, ``star_dist``, ``star_flux`` (nearest star), ``condition`` and ``seed``.
    ``any_code`` reuses the newest cached table made by any version of the code.
    """
    key = hashlib.sha256(json.dumps([kwargs, seed, TABLE_FORMAT, EXTRA_THRESHOLD], sort_keys=True).encode())
    stem = f"{name}-s{seed}-{key.hexdigest()[:10]}"
    path = CACHE / f"{stem}-{code_version()}.parquet"
    if any_code and not path.exists():
        older = sorted(CACHE.glob(f"{stem}-*.parquet"), key=lambda f: f.stat().st_mtime)
        path = older[-1] if older else path
    if path.exists() and not refresh:
        return pd.read_parquet(path).assign(code_version=path.stem.rsplit("-", 1)[1])
    from scipy.spatial import cKDTree
    from steps_scene import make_scene, run_chain

    t0 = time.process_time()
    scene = make_scene(seed=seed, **kwargs)
    result = run_chain(scene)
    # the pipeline's detections, plus those between EXTRA_THRESHOLD and its threshold (more
    # noise peaks and faint artifacts for the fit of the features' weights)
    from apbatch.job.steps import measure_dia_sources

    low = measure_dia_sources(result["diff"], result["psf"], result["calexp"], threshold=EXTRA_THRESHOLD)
    dia = pd.concat([result["dia"].assign(pipeline=True), low.assign(pipeline=False)], ignore_index=True)
    tr = scene.truth
    xy = dia[["x", "y"]].to_numpy()
    if len(dia):
        d, i = cKDTree(np.column_stack([tr["x"], tr["y"]])).query(xy)
        sd, si = cKDTree(np.column_stack([tr["star_x"], tr["star_y"]])).query(xy)
    else:
        d = i = sd = si = np.zeros(0, int)
    dia["psf_sigma"] = float(result["psf"].sigma)
    dia["dist"] = d
    dia["real"] = d <= MATCH_RADIUS
    dia["truth_snr"] = np.asarray(tr["snr"])[i] if len(dia) else np.zeros(0)
    dia["star_dist"] = sd
    dia["star_flux"] = np.asarray(tr["star_flux"])[si] if len(dia) else np.zeros(0)
    dia["condition"] = name
    dia["seed"] = seed
    dia.attrs = {}
    with replacing(path, durable=False) as tmp:
        dia.to_parquet(tmp)
    pipe = dia[dia["pipeline"]]
    n_real, n_low = int(pipe["real"].sum()), int((~dia["pipeline"]).sum())
    print(
        f"  scene {name}:{seed} {kwargs}: {len(pipe)} DIA sources, {n_real} real, "
        f"{len(pipe) - n_real} bogus; {n_low} at >= {EXTRA_THRESHOLD} sigma "
        f"({time.process_time() - t0:.0f} s CPU)",
        flush=True,
    )
    return dia.assign(code_version=code_version())


def load_runs(runs, known, refresh=False, any_code=False) -> pd.DataFrame:
    """Concatenated :func:`scene_table` of ``[(name, seed), ...]``."""
    return pd.concat([scene_table(n, known[n], s, refresh, any_code) for n, s in runs], ignore_index=True)


def design(table: pd.DataFrame) -> np.ndarray:
    """Feature matrix of a multi-scene table (each scene with its own PSF sigma)."""
    parts = [rel.features(g, float(g["psf_sigma"].iloc[0])) for _, g in table.groupby(["condition", "seed"])]
    return np.concatenate(parts) if parts else np.zeros((0, len(rel.FEATURE_NAMES)))


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` in the row order :func:`design` produces."""
    return pd.concat([g for _, g in table.groupby(["condition", "seed"])], ignore_index=True)


# candidate fits, chosen by leave-one-scene-out log loss on the training scenes only: which
# detections the weights are fitted on ("extra": all down to EXTRA_THRESHOLD, "pipeline": the
# pipeline's only) and the L2 strength
CANDIDATES = (("extra", 1.0), ("extra", 10.0), ("pipeline", 1.0), ("pipeline", 10.0), ("pipeline", 100.0))


def _fit_candidate(x, y, pipe, scene, rows, l2):
    prior = np.array([PRIOR_MEAN.get(n, 0.0) for n in rel.FEATURE_NAMES])
    bounds = [
        (0.0, None) if n == "log_snr" else (None, 0.0) if n.startswith(NOT_POSITIVE) else (None, None)
        for n in rel.FEATURE_NAMES
    ]
    z_oof = np.full(len(x), np.nan)
    for s in np.unique(scene):
        held = scene == s
        coef, icpt = relfit.fit_logistic(x[rows & ~held], y[rows & ~held], l2, None, prior, bounds)
        z_oof[held] = x[held] @ coef + icpt
    a, b = relfit.fit_platt(z_oof[pipe], y[pipe])
    p_oof = np.clip(0.5 * (1 + np.tanh(0.5 * (a * z_oof[pipe] + b))), 1e-12, 1 - 1e-12)
    yp = y[pipe]
    log_loss = float(-np.mean(yp * np.log(p_oof) + (1 - yp) * np.log(1 - p_oof)))
    coef, icpt = relfit.fit_logistic(x[rows], y[rows], l2, None, prior, bounds)
    return rel.ReliabilityModel(coef, icpt, (a, b), float(yp.mean())), p_oof, log_loss


def fit_model(train: pd.DataFrame, l2: float | None = None) -> tuple[rel.ReliabilityModel, np.ndarray, dict]:
    """Fit the logistic weights, then the Platt terms on leave-one-scene-out logits of the
    pipeline's detections; the weights' sample and L2 (``l2`` forces it) are chosen among
    :data:`CANDIDATES` by the leave-one-scene-out log loss of the calibrated probabilities.

    Returns the model (without provenance), the out-of-fold calibrated probabilities of
    ``train``'s pipeline rows (in their order) and the log loss of every candidate.
    """
    x, y = design(train), train["real"].to_numpy()
    pipe = train["pipeline"].to_numpy()
    scene = (train["condition"] + ":" + train["seed"].astype(str)).to_numpy()
    best, losses = None, {}
    for sample, cand_l2 in CANDIDATES if l2 is None else (("extra", l2), ("pipeline", l2)):
        rows = pipe if sample == "pipeline" else ~pipe
        model, p_oof, loss = _fit_candidate(x, y, pipe, scene, rows, cand_l2)
        losses[f"{sample}/l2={cand_l2:g}"] = loss
        if best is None or loss < best[2]:
            best = (model, p_oof, loss, f"{sample}/l2={cand_l2:g}")
    assert best is not None
    print(
        "leave-one-scene-out log loss per candidate: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
    )
    print(f"chosen: {best[3]}")
    return best[0], best[1], {"chosen": best[3], "log_loss": losses}


def figures(p: np.ndarray, y, prior: float | None = None) -> dict:
    """Validation figures of probabilities ``p`` against labels ``y``; ``prior``: also the Brier
    score of that constant probability (the reference a useful score must beat)."""
    y = np.asarray(y, bool)
    hit = p >= 0.5
    return {
        "brier_constant_prior": relfit.brier_score(np.full(len(y), prior), y) if prior else None,
        "n": int(len(y)),
        "n_real": int(y.sum()),
        "n_bogus": int((~y).sum()),
        "ece": relfit.expected_calibration_error(p, y),
        "brier": relfit.brier_score(p, y),
        "auc": relfit.roc_auc(p, y),
        "precision_at_0.5": float(y[hit].mean()) if hit.any() else float("nan"),
        "recall_at_0.5": float(hit[y].mean()) if y.any() else float("nan"),
        "bogus_rejected_at_0.5": float((~hit[~y]).mean()) if (~y).any() else float("nan"),
        "diagram": [
            {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
            for r in relfit.calibration_table(p, y).to_dict("records")
        ],
    }


def artifact_kind(t: pd.DataFrame) -> np.ndarray:
    """Rough kind of each bogus detection (for the report): from flags and the nearest star."""
    kind = np.full(len(t), "other/noise", dtype=object)
    near_star = (t["star_dist"] < 3 * 2.3548 * t["psf_sigma"]) & (t["star_flux"] > 2e4)
    kind[near_star.to_numpy()] = "bright-star residual"
    kind[t["isDipole"].to_numpy(bool)] = "dipole"
    kind[t["pixelFlags_cr"].to_numpy(bool)] = "cosmic ray"
    kind[(t["pixelFlags_bad"] | t["pixelFlags_interpolated"]).to_numpy(bool)] = "bad column/interp"
    kind[t["pixelFlags_saturated"].to_numpy(bool)] = "saturated"
    kind[t["pixelFlags_edge"].to_numpy(bool)] = "edge"
    return kind


def print_figures(title: str, f: dict, hand: dict | None = None) -> None:
    print(f"\n{title}: {f['n']} sources ({f['n_real']} real, {f['n_bogus']} bogus)")
    print(f"  {'bin':>9s} {'n':>6s} {'mean p':>7s} {'frac real':>9s}")
    for r in f["diagram"]:
        mp = "-" if r["mean_predicted"] is None else f"{r['mean_predicted']:.3f}"
        fr = "-" if r["fraction_real"] is None else f"{r['fraction_real']:.3f}"
        print(f"  {r['lo']:.1f}-{r['hi']:.1f} {r['n']:6d} {mp:>7s} {fr:>9s}")
    keys = ["ece", "brier", "auc", "precision_at_0.5", "recall_at_0.5", "bogus_rejected_at_0.5"]
    print("  fitted:   " + "  ".join(f"{k}={f[k]:.4f}" for k in keys))
    if f["brier_constant_prior"] is not None:
        print(f"  (Brier of the constant training fraction real: {f['brier_constant_prior']:.4f})")
    if hand is not None:
        print("  hand-set: " + "  ".join(f"{k}={hand[k]:.4f}" for k in keys))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _placeholder_if_unloadable() -> None:
    """Let the scenes run when the shipped model no longer loads (features changed): once
    measure_dia_sources calls :func:`rel.score`, it would fail before the refit could fix it.
    The ``reliability`` column is not a feature, so a placeholder does not change the fit."""
    try:
        rel.default_model()
    except BadInputError as exc:
        print(f"shipped model unusable ({exc}); the scenes' reliability column uses a placeholder")
        placeholder = rel.ReliabilityModel(np.zeros(len(rel.FEATURE_NAMES)), 0.0)
        rel.default_model = lambda: placeholder  # type: ignore[assignment]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"train {QUICK_TRAIN}; held out {QUICK_HELDOUT}")
    ap.add_argument("--train", help=f"name:seed list (default {TRAIN})")
    ap.add_argument("--heldout", help=f"name:seed list (default {HELDOUT})")
    ap.add_argument("--l2", type=float, help="force this L2 penalty (default: chosen by cross-validation)")
    ap.add_argument("--refresh", action="store_true", help="recompute the cached scene tables")
    ap.add_argument(
        "--any-code", action="store_true", help="reuse scene tables cached by other versions of the step code"
    )
    ap.add_argument("--no-write", action="store_true", help="print the validation only")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    args = ap.parse_args(argv)
    known = conditions()
    train_runs = parse_runs(args.train or (QUICK_TRAIN if args.quick else TRAIN), known)
    held_runs = parse_runs(args.heldout or (QUICK_HELDOUT if args.quick else HELDOUT), known)
    overlap = set(train_runs) & set(held_runs)
    if overlap:
        raise SystemExit(f"held-out scenes also in training: {sorted(overlap)}")
    print(f"scene tables: {CACHE} (code {code_version()})", flush=True)
    _placeholder_if_unloadable()
    train = ordered(load_runs(train_runs, known, args.refresh, args.any_code))
    held = ordered(load_runs(held_runs, known, args.refresh, args.any_code))
    t0 = time.process_time()
    model, p_oof, selection = fit_model(train, args.l2)
    fit_cpu = time.process_time() - t0
    tp = train[train["pipeline"]]
    hp = held[held["pipeline"]].reset_index(drop=True)
    t0 = time.process_time()
    p_held = np.concatenate(
        [rel.score(g, float(g["psf_sigma"].iloc[0]), model) for _, g in hp.groupby(["condition", "seed"])]
    )
    score_ms = 1e3 * (time.process_time() - t0) / max(hp.groupby(["condition", "seed"]).ngroups, 1)
    # the bogus-rich EXTRA_THRESHOLD sample, with the prior moved to its training fraction real
    low_prior = float(train.loc[~train["pipeline"], "real"].mean())
    hl = held[~held["pipeline"]].reset_index(drop=True)
    p_low = np.concatenate(
        [
            rel.score(g, float(g["psf_sigma"].iloc[0]), model, low_prior)
            for _, g in hl.groupby(["condition", "seed"])
        ]
    )
    validation = {
        "train_out_of_fold": figures(p_oof, tp["real"], model.train_prior),
        "heldout": figures(p_held, hp["real"], model.train_prior),
        "heldout_hand_set": figures(hp["reliability"].to_numpy(), hp["real"]),
        f"heldout_down_to_{EXTRA_THRESHOLD}_sigma_prior_{low_prior:.3f}": figures(p_low, hl["real"]),
        "heldout_by_condition": {
            name: figures(p_held[(hp["condition"] == name).to_numpy()], g["real"])
            for name, g in hp.groupby("condition")
        },
    }
    print(f"\ntrain: {', '.join(f'{n}:{s}' for n, s in train_runs)}")
    print(f"held out: {', '.join(f'{n}:{s}' for n, s in held_runs)}")
    print(
        f"fit {fit_cpu:.2f} s CPU; scoring {score_ms:.2f} ms CPU per CCD; train prior {model.train_prior:.4f}"
    )
    print_figures("TRAIN (leave-one-scene-out)", validation["train_out_of_fold"])
    print_figures(
        "HELD-OUT (fitted vs hand-set measure.py score)",
        validation["heldout"],
        validation["heldout_hand_set"],
    )
    print_figures(
        f"HELD-OUT down to {EXTRA_THRESHOLD} sigma (prior moved to {low_prior:.3f}, its training value)",
        validation[f"heldout_down_to_{EXTRA_THRESHOLD}_sigma_prior_{low_prior:.3f}"],
    )
    print("\nHELD-OUT pipeline detections by condition:")
    for name, f in validation["heldout_by_condition"].items():
        keys = ["ece", "brier", "auc", "precision_at_0.5", "recall_at_0.5", "bogus_rejected_at_0.5"]
        print(
            f"  {name:14s} n={f['n']:4d} bogus={f['n_bogus']:3d} " + " ".join(f"{k}={f[k]:.3f}" for k in keys)
        )
    bogus = hp[~hp["real"]]
    if len(bogus):
        kinds = pd.Series(artifact_kind(bogus), index=bogus.index)
        pb = pd.Series(p_held, index=hp.index)[bogus.index]
        print("\nheld-out bogus detections by kind: n, mean p, rejected at 0.5")
        for k, idx in kinds.groupby(kinds).groups.items():
            print(f"  {k:22s} {len(idx):4d} {pb[idx].mean():.3f} {(pb[idx] < 0.5).mean():.2f}")
    print("\ncoefficients (raw features):")
    for name, c in zip(rel.FEATURE_NAMES, model.coef, strict=True):
        print(f"  {name:24s} {c:+.3f}")
    print(
        f"  {'intercept':24s} {model.intercept:+.3f}   platt a={model.platt[0]:.3f} b={model.platt[1]:+.3f}"
    )
    provenance = {
        "fitted_by": "bench/fit_reliability.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "scene_code_versions": sorted(set(train["code_version"]) | set(held["code_version"])),
        "label": f"real = within {MATCH_RADIUS} px of an injected transient; every other detection is bogus",
        "weights_fitted_on": (
            f"{selection['chosen']} ('extra': training detections down to {EXTRA_THRESHOLD} sigma, "
            "'pipeline': the pipeline's detections), chosen by leave-one-scene-out log loss"
        ),
        "model_selection": selection,
        "prior_mean": PRIOR_MEAN,
        "sign_bounds": "log_snr >= 0; isDipole, pixelFlags_* <= 0",
        "platt_fitted_on": "leave-one-scene-out logits of the training scenes' pipeline detections",
        "train": [{"condition": n, "seed": s, "make_scene": known[n]} for n, s in train_runs],
        "heldout": [{"condition": n, "seed": s, "make_scene": known[n]} for n, s in held_runs],
        "validation": validation,
    }
    model = dataclasses.replace(model, provenance=_jsonable(provenance))
    if not args.no_write:
        rel.save_model(model, args.output)
        rel.load_model(args.output)  # the file must read back
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
