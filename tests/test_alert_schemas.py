"""Tests of apbatch.job.alert_schemas: which shipped alert schema versions apbatch can write."""

from __future__ import annotations

import pytest
from apbatch.errors import BadInputError
from apbatch.job.alert_schemas import ALERT_FIELDS, alert_schema, schema_by_id, schema_versions
from lsst.alert.packet import get_latest_schema_version


def _key(version: str) -> tuple[int, ...]:
    return tuple(map(int, version.split(".")))


def test_versions_are_writable_ones_oldest_first():
    versions = schema_versions()
    assert {"11.0", "11.1"} <= set(versions) and "8.0" not in versions  # 8.0 needs time_processed
    assert versions == sorted(versions, key=_key)


def test_default_is_the_newest_shipped():
    newest = "{}.{}".format(*get_latest_schema_version())
    assert alert_schema().get_schema_id() == alert_schema(newest).get_schema_id()
    assert alert_schema(" 11.0 ").get_schema_id() == 1100  # surrounding blanks are ignored


def test_every_field_a_writable_schema_requires_is_one_apbatch_fills():
    for version in schema_versions():
        fields = alert_schema(version).definition["fields"]
        required = {f["name"] for f in fields
                    if not (isinstance(f["type"], list) and "null" in f["type"]) and "default" not in f}
        assert required <= set(ALERT_FIELDS), version


def test_schema_by_id_finds_the_framed_version():
    for version in schema_versions():
        schema = alert_schema(version)
        major, minor = _key(version)
        assert schema_by_id(major * 100 + minor) is schema
    with pytest.raises(KeyError, match="no shipped alert schema has id 9999"):
        schema_by_id(9999)


@pytest.mark.parametrize("version, problem", [("12.0", "no alert schema '12.0'"), ("8.0", "requires fields"),
                                              ("eleven", "no alert schema")])
def test_bad_schema_version_is_one_line_naming_the_versions(version, problem):
    with pytest.raises(BadInputError) as info:
        alert_schema(version)
    msg = str(info.value)
    assert msg.startswith("alerts.schema_version: ") and problem in msg and "\n" not in msg
    assert "11.0, 11.1" in msg
