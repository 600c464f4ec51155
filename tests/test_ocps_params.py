"""Tests for apbatch.ocps.params: the parameters of OCPS requests, case-insensitive where UWS says
so, and one-line errors naming the parameter (the HTTP side is tests/test_ocps_app.py)."""

import pytest
from apbatch.errors import BadInputError
from apbatch.ocps.params import Params, parse_job_parameters


def test_parse_job_parameters_is_case_insensitive_for_uws_names():
    p = parse_job_parameters([("PIPELINE", "ap"), ("Instrument", "LATISS"), ("GROUPID", "g"),
                              ("phase", "run"), ("config.job.raw_timeout", "5"), ("CONFIG", "/etc/o.yaml")])
    assert (p.pipeline, p.data_id.instrument, p.data_id.group_id, p.run, p.config_file) == \
        ("ap", "LATISS", "g", True, "/etc/o.yaml")
    assert p.overrides == {"job.raw_timeout": "5"}
    assert parse_job_parameters([("pipeline", "ap"), ("instrument", "LATISS")]).run is False


@pytest.mark.parametrize(("items", "field"), [
    ([("instrument", "LATISS")], "pipeline"),
    ([("pipeline", "ap")], "instrument"),
    ([("pipeline", "ap"), ("instrument", "LATISS"), ("detector", "four")], "detector"),
    ([("pipeline", "ap"), ("instrument", "LATISS"), ("detector", "-1")], "detector"),
    ([("pipeline", "ap"), ("instrument", "LATISS"), ("PHASE", "ABORT")], "PHASE"),
    ([("pipeline", "ap"), ("instrument", "LATISS"), ("colour", "red")], "colour"),
    ([("pipeline", "ap"), ("pipeline", "gather"), ("instrument", "LATISS")], "pipeline"),
    ([("pipeline", "ap"), ("instrument", "LATISS"), ("config.job.raw_timeout", "5"),
      ("config.job.raw_timeout", "6")], "config.job.raw_timeout"),
])
def test_bad_parameters_name_the_field(items, field):
    with pytest.raises(BadInputError) as info:
        parse_job_parameters(items)
    msg = str(info.value)
    assert msg.startswith(f"{field}: ") and "\n" not in msg


def test_params_lookup():
    p = Params([("WAIT", "5"), ("phase", "EXECUTING"), ("Phase", "QUEUED"), ("empty", " ")])
    assert p.one("wait") == "5" and p.all("PHASE") == ["EXECUTING", "QUEUED"] and p.one("last") is None
    with pytest.raises(BadInputError, match="^PHASE: given 2 times"):
        p.one("phase", label="PHASE")
    with pytest.raises(BadInputError, match="^empty: is empty"):
        p.one("empty")
    with pytest.raises(BadInputError, match="^empty: unknown parameter"):
        p.unknown(["WAIT", "PHASE"])
