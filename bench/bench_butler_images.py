"""Butler put/get per CCD: apbatch ``Image`` files (old) vs lsst-images VisitImage/DifferenceImage (new).

Run: ``.venv/bin/python bench/bench_butler_images.py [--runs 5]`` (about 1-2 minutes on 2 cores).
One LSSTCam-size CCD (4000 x 4072 float32 image and variance with sky noise and a few
hundred stars, a sparse mask, the CCD's TAN-SIP WCS, the job's metadata in nJy) is put and
read back through a real SQLite butler made by ``apbatch.butler.repo.create_repo``:

* old: storage class ``ApbatchImage`` (apbatch's ``ImageFormatter``, RICE, quantized to 1/16
  of the variance-plane noise);
* new: ``VisitImage``/``DifferenceImage`` (lsst-images' ``GenericFormatter``, the repository's
  lossy recipe), put time including the conversion of `apbatch.butler.images`, which is also
  shown on its own; get time is the butler get (conversion back to an apbatch ``Image`` shown
  apart: nothing in apbatch needs it on the job's path);
* template sub-box read: a 4200 x 4200 patch, a 2300 x 2300 box of it read with the ``bbox``
  parameter, as `apbatch.butler.io.ButlerIO.get_templates` does: ``ApbatchImage`` (512 x 512
  tiles) vs lsst-images ``MaskedImageV2`` with the same lossy recipe and 512 x 512 tiles.

* write_outputs, as the job does it: `apbatch.butler.io.ButlerIO.put_outputs` of a calibrated
  and a difference image (conversion, quantization, compression, butler put), CPU and wall
  seconds, with the conversion to lsst-images types timed apart;
  then what users read back: quantization error over the pixel noise, file sizes.
  ``--write-only`` runs just this part.

The images are ISR-like: sky-subtracted noise of a 400 e- sky plus stars in nJy (57.5 nJy/e-);
the variance computed from the pixels (so it is noisy, as ISR's is); a mask with detections.
Medians (and min) over ``--runs`` runs are printed; the machine is shared and noisy.
"""

import os

for _k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_k] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

VISIT, DAY_OBS, RA, DEC, ROT = 2025050100292, 20250501, 53.1, -28.1, 30.0
DETECTOR = 94  # R22_S11


SKY_E, READ_NOISE_E, NJY_PER_E = 400.0, 9.0, 57.5


def _ccd_image(cam, seed: int, difference: bool = False):
    """An ISR-like CCD in nJy: noise, stars (or dipoles), a variance from the pixels, a mask."""
    from apbatch.image import Image, MaskBits

    det = cam.detector(DETECTOR)
    rng = np.random.default_rng(seed)
    shape = (det.ny, det.nx)
    stars = np.zeros(shape, np.float32)
    yy, xx = rng.integers(20, det.ny - 20, 400), rng.integers(20, det.nx - 20, 400)
    g = np.exp(-((np.arange(-10, 11)[:, None]) ** 2 + np.arange(-10, 11)[None, :] ** 2) / (2 * 1.7**2))
    for y, x, f in zip(yy, xx, rng.uniform(500, 50000, 400), strict=True):
        stamp = f * g / g.sum()
        if difference:  # a residual dipole a few % of the star
            stamp = 0.03 * (stamp - np.roll(stamp, 1, axis=1))
        stars[y - 10 : y + 11, x - 10 : x + 11] += stamp.astype(np.float32)
    var = np.maximum(stars + SKY_E + rng.normal(0.0, np.sqrt(SKY_E), shape), 0) + READ_NOISE_E**2
    if difference:  # plus the (smooth) warped template variance
        var += 0.3 * SKY_E
    img = stars + rng.normal(0.0, 1.0, shape) * np.sqrt(var)
    mask = np.zeros(shape, np.int32)
    mask[:, 1200] |= MaskBits.BAD
    for y, x in zip(yy, xx, strict=True):
        mask[y - 4 : y + 5, x - 4 : x + 5] |= MaskBits.DETECTED
    mask[yy[:20], xx[:20]] |= MaskBits.SAT
    meta = {"BUNIT": "nJy", "FILTER": "r_57", "BAND": "r", "MJDBEG": 60796.1, "MJDEND": 60796.10035,
            "EXPTIME": 30.0, "RA": RA, "DEC": DEC, "ROTPA": ROT, "PSFSIGMA": 1.7, "NJY_PER_E": NJY_PER_E}
    return Image((img * NJY_PER_E).astype(np.float32), (var * NJY_PER_E**2).astype(np.float32), mask,
                 cam.sky_wcs(det, RA, DEC, ROT), meta)


def _setup(root: Path):
    from apbatch.butler import datasets as ds
    from apbatch.butler.formatters import LOSSY_RECIPE, LSST_IMAGES_FORMATTER
    from apbatch.butler.repo import create_repo, register_exposures, register_instrument, register_output_run
    from lsst.daf.butler import Butler, DatasetType

    butler = create_repo(root)
    # templates as lsst-images MaskedImage (square tiles so a box read decompresses only its tiles)
    tiled = {k: v | {"tile_shape": [512, 512]} for k, v in LOSSY_RECIPE.items()}
    import yaml

    data = yaml.safe_load((root / "butler.yaml").read_text())
    data["datastore"]["formatters"]["MaskedImageV2"] = {
        "formatter": LSST_IMAGES_FORMATTER, "parameters": {"recipe": "tiled"}}
    data["datastore"]["formatters"]["write_recipes"][LSST_IMAGES_FORMATTER]["tiled"] = tiled
    (root / "butler.yaml").write_text(yaml.safe_dump(data))
    butler = Butler.from_config(str(root), writeable=True)
    register_instrument(butler, "LSSTCam")
    register_exposures(butler, [{
        "instrument": "LSSTCam", "exposure_id": VISIT, "visit_id": VISIT, "obs_id": "MC_O_20250501_000292",
        "day_obs": DAY_OBS, "seq_num": 292, "physical_filter": "r_57", "exposure_time": 30.0,
        "observation_type": "science", "mjd_begin": 60796.1, "mjd_end": 60796.10035, "ra": RA, "dec": DEC,
        "rotation": ROT}])
    run = register_output_run(butler, "LSSTCam", DAY_OBS)
    dims = ("instrument", "visit", "detector")
    for name, sc in (("old_calexp", ds.IMAGE_STORAGE_CLASS), ("old_diffim", ds.IMAGE_STORAGE_CLASS)):
        butler.registry.registerDatasetType(DatasetType(name, dims, sc, universe=butler.dimensions))
    for name, sc in (("tmpl_old", ds.IMAGE_STORAGE_CLASS), ("tmpl_new", "MaskedImageV2")):
        butler.registry.registerDatasetType(DatasetType(name, dims, sc, universe=butler.dimensions))
    return butler, run


def _timed(fn, runs: int) -> tuple[list[float], Any]:
    out, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
    return out, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--write-only", action="store_true", help="only the job's write_outputs step")
    args = ap.parse_args(argv)
    if args.write_only:
        return _main_write(args.runs)
    import lsst.images  # noqa: F401  (import cost is not per-CCD)
    from apbatch.butler import datasets as ds
    from apbatch.butler.images import from_visit_image, to_difference_image, to_visit_image
    from apbatch.instruments import get_instrument
    from lsst.images import SkyProjection

    cam = get_instrument("LSSTCam")
    img = _ccd_image(cam, 1)
    kw = {"instrument": "LSSTCam", "visit": VISIT, "detector": DETECTOR}
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        butler, run = _setup(Path(tmp) / "repo")

        def put(name, obj):
            old = butler.find_dataset(name, kw, collections=run)
            if old is not None:
                butler.pruneDatasets([old], disassociate=True, unstore=True, purge=True)
            return butler.put(obj, name, kw, run=run)

        for label, old_name, new_name, convert in (
            ("calexp", "old_calexp", ds.CALEXP, to_visit_image),
            ("diffim", "old_diffim", ds.DIFFIM, to_difference_image),
        ):
            t, ref = _timed(lambda n=old_name: put(n, img), args.runs)
            rows.append((f"{label} put, old (ApbatchImage)", t))
            t, _ = _timed(lambda r=ref: butler.get(r), args.runs)
            rows.append((f"{label} get, old (ApbatchImage)", t))
            t, _ = _timed(lambda c=convert: c(img, cam, "LSSTCam", VISIT, DETECTOR), args.runs)
            rows.append((f"{label} convert Image -> lsst-images", t))
            t, ref = _timed(lambda n=new_name, c=convert: put(n, c(img, cam, "LSSTCam", VISIT, DETECTOR)),
                            args.runs)
            rows.append((f"{label} put, new (convert + butler.put)", t))
            t, got = _timed(lambda r=ref: butler.get(r), args.runs)
            rows.append((f"{label} get, new (lsst-images)", t))
            t, _ = _timed(lambda g=got: from_visit_image(g), args.runs)
            rows.append((f"{label} convert lsst-images -> Image", t))
            del got
            size_old = butler.getURI(butler.find_dataset(old_name, kw, collections=run)).size()
            size_new = butler.getURI(ref).size()
            rows.append((f"{label} file MB old / new: {size_old / 1e6:.1f} / {size_new / 1e6:.1f}", None))

        # templates: one 4200 x 4200 patch, a 2300 x 2300 box of it (a CCD plus margins)
        from apbatch.image import Image

        rng = np.random.default_rng(2)
        n = 4200
        patch = Image(rng.normal(0, 10, (n, n)).astype(np.float32), np.full((n, n), 100.0, np.float32),
                      None, cam.sky_wcs(DETECTOR, RA, DEC, ROT), {"BUNIT": "nJy"})
        ref_old = put("tmpl_old", patch)
        frame = to_visit_image(img, cam, "LSSTCam", VISIT, DETECTOR).sky_projection.pixel_frame
        from lsst.images import Box

        bbox = Box.factory[0:n, 0:n]
        frame = frame.model_copy(update={"bbox": bbox})
        proj = SkyProjection.from_fits_wcs(patch.wcs, frame, pixel_bounds=bbox)
        mi = _masked(patch, proj)
        ref_new = put("tmpl_new", mi)
        box = (1000, 3300, 1200, 3500)
        t, a = _timed(lambda: butler.get(ref_old, parameters={"bbox": box}), args.runs)
        rows.append(("template 2300x2300 box get, old (ApbatchImage)", t))
        t, b = _timed(lambda: butler.get(ref_new, parameters={"bbox": Box.factory[1200:3500, 1000:3300]}),
                      args.runs)
        rows.append(("template 2300x2300 box get, new (MaskedImageV2)", t))
        assert a.image.shape == b.image.array.shape == (2300, 2300)
    rows.append(("import lsst.images (once per job process)", [_import_cost() for _ in range(args.runs)]))
    _print(rows, args.runs)
    return _main_write(args.runs)


def _print(rows, runs: int) -> None:
    print(f"\n{'per CCD (seconds)':56s} {'median':>8s} {'min':>8s}   ({runs} runs)")
    for name, t in rows:
        if t is None:
            print(f"{name}")
        else:
            print(f"{name:56s} {statistics.median(t):8.3f} {min(t):8.3f}")


def _main_write(runs: int) -> int:
    """The job's write_outputs step: put_outputs of a calibrated and a difference image."""
    import lsst.images  # noqa: F401  (import cost is not per-CCD)
    from apbatch.butler import datasets as ds
    from apbatch.butler.images import to_difference_image, to_visit_image
    from apbatch.butler.io import ButlerIO
    from apbatch.instruments import get_instrument

    cam = get_instrument("LSSTCam")
    calexp, diffim = _ccd_image(cam, 1), _ccd_image(cam, 2, difference=True)
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        butler, run = _setup(Path(tmp) / "repo")
        io = ButlerIO(butler, "LSSTCam")

        def convert():
            return (to_visit_image(calexp, cam, "LSSTCam", VISIT, DETECTOR),
                    to_difference_image(diffim, cam, "LSSTCam", VISIT, DETECTOR))

        rows.append(("write_outputs parts: convert calexp + diffim, CPU", _cpu(convert, runs)))
        put = lambda: io.put_outputs(VISIT, DETECTOR, calexp=calexp, diffim=diffim, run=run)  # noqa: E731
        rows.append(("write_outputs: put_outputs(calexp, diffim), CPU", _cpu(put, runs)))
        rows.append(("write_outputs: put_outputs(calexp, diffim), wall", _timed(put, runs)[0]))
        for name, img in ((ds.CALEXP, calexp), (ds.DIFFIM, diffim)):
            ref = butler.find_dataset(name, {"instrument": "LSSTCam", "visit": VISIT, "detector": DETECTOR},
                                      collections=run)
            got = butler.get(ref)
            err = got.image.array - img.image
            sigma = np.sqrt(img.variance)
            verr = got.variance.array / img.variance - 1
            rows.append((f"{name}: {butler.getURI(ref).size() / 1e6:.1f} MB; image error rms/sigma "
                         f"{np.std(err / sigma):.4f} max/sigma {np.abs(err / sigma).max():.3f}; variance "
                         f"relative error rms {np.std(verr):.2e}, max {np.abs(verr).max():.2e}", None))
    _print(rows, runs)
    return 0


def _cpu(fn, runs: int) -> list[float]:
    """Process CPU seconds (user + system) of ``fn``, per run."""
    out = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def _import_cost() -> float:
    """Seconds a fresh process spends importing lsst-images once daf_butler and astropy are in."""
    import subprocess
    import sys

    code = ("import time, lsst.daf.butler, astropy.wcs, astropy.io.fits, astropy.coordinates\n"
            "t = time.perf_counter(); import lsst.images.formatters, starlink.Ast\n"
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def _masked(patch, proj):
    """A template patch as an lsst-images `MaskedImage` (nJy, MaskBits planes, its sky projection)."""
    import astropy.units as u
    from apbatch.butler.images import mask_schema
    from lsst.images import Image as LImage
    from lsst.images import MaskedImage

    return MaskedImage(LImage(patch.image, unit=u.nJy), variance=LImage(patch.variance, unit=u.nJy**2),
                       mask_schema=mask_schema(), sky_projection=proj)


if __name__ == "__main__":
    raise SystemExit(main())
