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

import numpy as np  # noqa: E402

VISIT, DAY_OBS, RA, DEC, ROT = 2025050100292, 20250501, 53.1, -28.1, 30.0
DETECTOR = 94  # R22_S11


def _ccd_image(cam, seed: int):
    from apbatch.image import Image, MaskBits

    det = cam.detector(DETECTOR)
    rng = np.random.default_rng(seed)
    var = np.full((det.ny, det.nx), 900.0, np.float32)
    img = rng.normal(0.0, 30.0, (det.ny, det.nx)).astype(np.float32)
    yy, xx = rng.integers(20, det.ny - 20, 400), rng.integers(20, det.nx - 20, 400)
    for y, x, f in zip(yy, xx, rng.uniform(500, 50000, 400), strict=True):
        g = np.exp(-((np.arange(-10, 11)[:, None]) ** 2 + np.arange(-10, 11)[None, :] ** 2) / (2 * 1.7**2))
        img[y - 10 : y + 11, x - 10 : x + 11] += np.float32(f * g / g.sum())
    mask = np.zeros((det.ny, det.nx), np.int32)
    mask[:, 1200] |= MaskBits.BAD
    mask[yy, xx] |= MaskBits.DETECTED
    meta = {"BUNIT": "nJy", "FILTER": "r_57", "BAND": "r", "MJDBEG": 60796.1, "MJDEND": 60796.10035,
            "EXPTIME": 30.0, "RA": RA, "DEC": DEC, "ROTPA": ROT, "PSFSIGMA": 1.7, "NJY_PER_E": 57.5}
    return Image(img, var, mask, cam.sky_wcs(det, RA, DEC, ROT), meta)


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


def _timed(fn, runs: int) -> tuple[list[float], object]:
    out, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
    return out, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    import lsst.images  # noqa: F401  (import cost is not per-CCD)
    from apbatch.butler import datasets as ds
    from apbatch.butler.images import from_visit_image, to_difference_image, to_visit_image
    from apbatch.instruments import get_instrument
    from lsst.images import SkyProjection

    cam = get_instrument("LSSTCam")
    img = _ccd_image(cam, 1)
    kw = {"instrument": "LSSTCam", "visit": VISIT, "detector": DETECTOR}
    rows = []
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
            rows.append((f"{label} put, new (convert + put)", t))
            t, got = _timed(lambda r=ref: butler.get(r), args.runs)
            rows.append((f"{label} get, new (lsst-images)", t))
            t, _ = _timed(lambda g=got: from_visit_image(g), args.runs)
            rows.append((f"{label} convert lsst-images -> Image", t))
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
    print(f"\n{'per CCD (seconds)':52s} {'median':>8s} {'min':>8s}   ({args.runs} runs)")
    for name, t in rows:
        if t is None:
            print(f"{name}")
        else:
            print(f"{name:52s} {statistics.median(t):8.3f} {min(t):8.3f}")
    return 0


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
