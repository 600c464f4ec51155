"""Is a difference image's noise as Gaussian as white noise, out in the 5-sigma tail?

Unflagged false detections at 5 sigma sit near the white-noise floor (``bench_steps.py``'s
``noise``), but a floor of ~2 per CCD is a count of a few, so eight CCDs cannot tell a real
excess from luck. Peaks of the matched-filter S/N image are counted here down to 3.5 sigma
(hundreds per CCD), away from every object the scene holds (:func:`scene_score.near_objects`:
transients within 3 FWHM, stars within a radius growing with their flux, galaxies within 4
FWHM; and saturated stars' halos), in
the real difference and in :func:`scene_score.white_noise` of it (same variance plane, mask and
detection image). A difference whose noise has heavier tails than its variance plane says (a
mixture of noise levels, structure the kernel leaves) has more peaks than white noise above
4.5-5 sigma; correlated noise (the template's, through the kernel) has fewer peaks at 3.5-4
sigma for the same spread.

One row per seed: positive/negative local extrema above each threshold, real and white, then
the detections :func:`~apbatch.job.steps.dia_detect.find_peaks` makes there (a footprint of at
least 2 px above the threshold: a smoother noise has more of its peaks pass); the last rows sum
them and give real / white. ~45 s per seed.

    python bench/bench_noise_tail.py --condition baseline --seeds 9
"""

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from scene_conditions import CONDITIONS  # noqa: E402
from scene_score import near_objects, white_noise  # noqa: E402
from steps_scene import make_scene, run_chain  # noqa: E402

THRESHOLDS = (3.5, 4.0, 4.5, 5.0)
def object_mask(truth: dict, shape, fwhm: float) -> np.ndarray:
    """Pixels :func:`scene_score.near_objects` calls near an object, as an image."""
    ny, nx = shape
    out = np.zeros(shape, bool)
    step = 4  # judged on a 4-px grid, then filled: objects' radii are >= 2 FWHM
    yy, xx = np.mgrid[0:ny:step, 0:nx:step]
    near = near_objects(truth, xx.ravel() + step / 2, yy.ravel() + step / 2, fwhm).reshape(xx.shape)
    out[:] = np.repeat(np.repeat(near, step, axis=0), step, axis=1)[:ny, :nx]
    return out


def tail_counts(diff, psf, calexp, exclude: np.ndarray, min_pixels: int = 2) -> tuple[dict, dict]:
    """Positive and negative local extrema of the detection S/N image above each threshold, and
    the detections DIA measurement would make there (footprints of at least ``min_pixels``)."""
    from apbatch.job.steps.dia_detect import detection_image, find_peaks

    s, *_rest = detection_image(copy.deepcopy(diff), psf, calexp)
    halo = _rest[2]
    ok = ~(exclude | halo | (s == 0))
    top = ndimage.maximum_filter(s, 3) == s
    bottom = ndimage.minimum_filter(s, 3) == s
    peaks = {t: (int((top & ok & (s > t)).sum()), int((bottom & ok & (s < -t)).sum())) for t in THRESHOLDS}
    found = {}
    for t in THRESHOLDS:
        peaks_t = find_peaks(s, t, min_pixels, split=halo, separation=psf.fwhm)
        kept = [sign for x, y, sign, _ in peaks_t if ok[y, x]]
        found[t] = (kept.count(1), kept.count(-1))
    return peaks, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--condition", default="baseline", help="a scene_conditions.py name")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1, help="first seed")
    args = ap.parse_args(argv)
    if args.condition not in CONDITIONS:
        print(f"--condition: unknown {args.condition} (use one of: {', '.join(CONDITIONS)})")
        return 2
    head = " ".join(f"{f'>{t}':>11s}" for t in THRESHOLDS)
    print(f"{args.condition}: peaks (+/-) of the S/N image away from objects, then detections there "
          "(footprints of >= 2 px), real / white noise")
    print(f"{'seed':>4s} {'':5s} {head}   detections: {head}")
    kinds = ("real", "white")
    total = {k: np.zeros((2, len(THRESHOLDS), 2), int) for k in kinds}
    for seed in range(args.seed, args.seed + args.seeds):
        scene = make_scene(seed=seed, **CONDITIONS[args.condition])
        res = run_chain(scene)
        exclude = object_mask(scene.truth, res["diff"].shape, float(res["psf"].fwhm))
        for kind, img in zip(kinds, (res["diff"], white_noise(res["diff"], seed)), strict=True):
            counts = np.array([[c[t] for t in THRESHOLDS]
                               for c in tail_counts(img, res["psf"], res["calexp"], exclude)])
            total[kind] += counts
            print(f"{seed:4d} {kind:5s} {_cells(counts[0])}   {'':11s} {_cells(counts[1])}", flush=True)
    for kind in kinds:
        print(f"{'sum':>4s} {kind:5s} {_cells(total[kind][0])}   {'':11s} {_cells(total[kind][1])}")
    ratio = total["real"].sum(axis=2) / np.maximum(total["white"].sum(axis=2), 1)
    print(f"{'':4s} {'ratio':5s} " + " ".join(f"{r:11.2f}" for r in ratio[0]) + f"   {'':11s} "
          + " ".join(f"{r:11.2f}" for r in ratio[1]))
    return 0


def _cells(pairs) -> str:
    return " ".join(f"{f'{p}/{n}':>11s}" for p, n in pairs)


if __name__ == "__main__":
    sys.exit(main())
