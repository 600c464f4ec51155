"""Tests for apbatch.ids against the values obs_lsst's translators give for real headers."""

import datetime

import pytest
from apbatch.errors import BadInputError
from apbatch.ids import (
    check_group_id,
    day_obs_of,
    exposure_id,
    group_day_obs,
    parse_obs_id,
    visit_id_from_group,
)


@pytest.mark.parametrize(
    "group, visit",
    [
        ("2025-06-10T07:31:26.692", 3294702866920000),
        ("2024-11-09T06:33:55.311", 3110636353110000),
        ("2024-06-25T01:26:31.895#1", 2992083918950001),
        ("2024-06-25T01:26:31.895+12", 2992083918950012),
    ],
)
def test_visit_id_from_group(group, visit):
    assert visit_id_from_group(group) == visit


@pytest.mark.parametrize("bad", ["", "yesterday", "2025-13-40T99:99:99", "2025-06-10T07:31:26.692; rm -rf /",
                                 "2025-06-10T07:31:26.692\n", "2025-06-10T07:31:26.\u0666\u0669\u0662",
                                 "2014-12-31T23:59:59.999"])
def test_visit_id_rejects_bad_groups(bad):
    with pytest.raises(BadInputError, match="groupId"):
        visit_id_from_group(bad)


@pytest.mark.parametrize(
    "obs_id, expected",
    [
        ("MC_O_20250609_000578", 2025060900578),
        ("CC_O_20241108_000266", 2024110800266),
        ("MC_S_20240321_000720", 7024032100720),  # imSim, before the shared counter
        ("MC_C_20250425_000031", 2025042500031),
    ],
)
def test_exposure_ids(obs_id, expected):
    parsed = parse_obs_id(obs_id)
    assert parsed.exposure_id == expected
    assert str(parsed) == obs_id


def test_exposure_id_direct():
    assert exposure_id(20250609, 578) == 2025060900578


@pytest.mark.parametrize("bad", ["MC_O_2025060_000578", "mc_o_20250609_000578", "MC_O_20250609_578", None])
def test_parse_obs_id_rejects(bad):
    with pytest.raises(BadInputError, match="imageName"):
        parse_obs_id(bad)


def test_day_obs_rolls_over_at_noon():
    assert day_obs_of(datetime.datetime(2025, 6, 10, 7, 31)) == 20250609
    assert day_obs_of(datetime.datetime(2025, 6, 10, 12, 0, 1)) == 20250610


@pytest.mark.parametrize(("group", "day_obs"), [
    ("2025-06-10T07:31:26.692", 20250609), ("2024-06-25T01:26:31.895#1", 20240624),
    ("2025-06-10T12:00:01.000", 20250610),
    ("20250425_bias_0001", None), ("", None), ("2025-13-40T07:31:26.692", None)])
def test_group_day_obs(group, day_obs):
    """A group named for a time has that time's day_obs; other group names have none."""
    assert group_day_obs(group) == day_obs


@pytest.mark.parametrize("spelling", ["2025-06-10T07:31:26.692000", "2025-06-10T07:31:26.692#0",
                                      "2025-06-10T07:31:26.692+0", "2025-06-10T07:31:26.6925"])
def test_one_canonical_spelling_per_visit(spelling):
    canonical = "2025-06-10T07:31:26.692"
    assert visit_id_from_group(spelling) == visit_id_from_group(canonical)  # why the rule is needed
    assert check_group_id(canonical) == canonical
    with pytest.raises(BadInputError, match=f"send '{canonical}'"):
        check_group_id(spelling)


def test_check_group_id_keeps_other_groups_unless_a_time_is_required():
    assert check_group_id("bias-seq-7") == "bias-seq-7"
    assert check_group_id("2024-06-25T01:26:31.895#12") == "2024-06-25T01:26:31.895#12"
    with pytest.raises(BadInputError, match="not an ISO-time group id"):
        check_group_id("bias-seq-7", time_required=True)
    with pytest.raises(BadInputError, match="white space or control characters"):
        check_group_id("bias-seq-7 ")
