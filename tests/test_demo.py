"""End to end: simulated night -> daemon -> local backend -> per-CCD jobs -> APDB -> Kafka ->
a separate consumer process decoding every alert with the official schema (lsst-alert-stream)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apbatch.errors import BadInputError
from apbatch.script.demo import run_demo

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.kafka
def test_night_end_to_end_to_kafka(tmp_path, kafka_broker):
    topic = "e2e-alerts"
    lines: list[str] = []
    summary = run_demo(tmp_path / "night", instrument="LSSTComCam", visits=2, detectors=("4",), seed=7,
                       speed=20.0, workers=2, timeout=900,
                       extra_config={"alerts": {"sink": "kafka", "topic": topic, "send_timeout": 30.0},
                                     "kafka": {"bootstrap_servers": kafka_broker}},
                       say=lines.append)
    # 2 science visits + 1 bias exposure, one CCD each: every job completed
    assert summary["jobs"] == {"COMPLETED": 3}, "\n".join(lines)
    n = summary["dia_sources"]
    assert n > 0
    consumer = subprocess.run(
        [sys.executable, str(HERE / "alert_synth.py"), "consume", "--bootstrap", kafka_broker, "--topic", topic,
         "--expect", str(n), "--timeout", "90"],
        capture_output=True, text=True, timeout=180)
    assert consumer.returncode == 0, consumer.stderr
    alerts = [json.loads(x) for x in consumer.stdout.splitlines() if x.startswith("{")]
    assert all(a["valid"] for a in alerts)
    assert all(a["key"] == str(a["diaSourceId"]) for a in alerts)
    # every DiaSource in the APDB was alerted on, each exactly once (nothing was retried here)
    assert len({a["diaSourceId"] for a in alerts}) == n == len(alerts)
    assert any("night 2" in x for x in lines) and any("COMPLETED" in x for x in lines)
    # against the simulator's truth: injected transients found, few false detections (the
    # simulated stars have Moffat wings, the case a fixed 21-px kernel failed on)
    for visit, scores in _truth_scores(tmp_path / "night").items():
        assert scores["recovered"] >= 0.9 * scores["injected"], (visit, scores)
        assert scores["false"] <= 6, (visit, scores)


def _truth_scores(out: Path) -> dict:
    """Per CCD-visit: transients with |difference S/N| >= 10 injected and recovered, false detections."""
    import numpy as np
    import pandas as pd
    from apbatch.instruments import get_instrument
    from lsst.daf.butler import Butler
    from scipy.spatial import cKDTree

    butler = Butler.from_config(str(out / "work" / "butler"))
    runs = list(butler.collections.query("LSSTComCam/prompt/*"))
    scores = {}
    for ref in butler.query_datasets("dia_source_detector", collections=runs):
        visit, det = ref.dataId["visit"], ref.dataId["detector"]
        name = get_instrument("LSSTComCam").detector(det).name
        truth_dir = out / "night" / "truth" / "LSSTComCam" / str(visit)
        truth = pd.read_parquet(truth_dir / f"truth_{visit}_{name}.parquet")
        dia = butler.get(ref)
        var = truth[truth["kind"].isin(["new", "variable", "moving"])]
        strong = var[var["diff_snr"].abs() >= 10]
        dia_xy, var_xy = dia[["x", "y"]].to_numpy(), var[["x", "y"]].to_numpy()
        near_var = cKDTree(var_xy).query(dia_xy)[0] if len(var) else np.full(len(dia), np.inf)
        found = cKDTree(dia_xy).query(strong[["x", "y"]].to_numpy())[0] if len(dia) else []
        scores[(visit, det)] = {"injected": len(strong), "recovered": int((np.asarray(found) < 3).sum()),
                                "false": int((np.asarray(near_var) >= 3).sum())}
    assert scores
    return scores


def test_demo_refuses_a_used_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(BadInputError, match="--out"):
        run_demo(tmp_path, say=lambda _: None)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_demo_rejects_unknown_detector(tmp_path):
    with pytest.raises(BadInputError, match="--detectors"):
        run_demo(tmp_path / "d", detectors=("R99_S99",), say=lambda _: None)
    assert not (tmp_path / "d").exists()
