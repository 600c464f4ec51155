"""Tests for apbatch.work.CcdWork: the job command line it carries."""

from apbatch.work import CcdWork


def _work(**kw):
    base = {
        "instrument": "LSSTComCam", "detector": 4, "detector_name": "R22_S11",
        "group_id": "2026-11-22T01:02:03.456", "visit": 3, "day_obs": 20261121, "intent": "science",
        "exposure_time": 30.0, "nimages": 2, "distributor": "/data/dist", "ra": 53.1, "dec": -28.2,
        "rotation": 12.5, "physical_filter": "r_03",
    }
    base.update(kw)
    return CcdWork(**base)


def test_job_args_carry_every_field():
    args = _work(image_names=("CC_O_20261121_000001",)).job_args()
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--detector"] == "4" and pairs["--group"] == "2026-11-22T01:02:03.456"
    assert float(pairs["--ra"]) == 53.1 and float(pairs["--rotation"]) == 12.5
    assert pairs["--filter"] == "r_03" and pairs["--image"] == "CC_O_20261121_000001"


def test_calibration_has_no_pointing():
    args = _work(intent="bias", ra=None, dec=None, rotation=None, physical_filter=None).job_args()
    assert "--ra" not in args and "--filter" not in args and "--rotation" not in args


def test_round_trip_and_key():
    w = _work(image_names=("a", "b"))
    assert CcdWork.from_dict(w.to_dict()) == w
    assert w.key == ("LSSTComCam", "2026-11-22T01:02:03.456", 4)
    assert w.label == "ap-LSSTComCam-3"


def test_metacharacters_stay_one_argument():
    evil = "2026-11-22T01:02:03.456; rm -rf / $(touch /tmp/x)"
    args = _work(group_id=evil).job_args()
    assert args[args.index("--group") + 1] == evil
