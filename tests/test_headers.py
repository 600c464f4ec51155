"""Tests for apbatch.job.headers: what in a raw's header stops a job, what is only reported."""

from __future__ import annotations

import pytest
from apbatch.errors import BadInputError
from apbatch.job.headers import check_headers, header_pointing, separation_arcsec
from test_task import _raw, _work


def test_header_mismatches_are_reported_not_fatal():
    raws = [_raw(physical_filter="y_04", requested_exposure_time=20.0, ra=53.1)]
    out = check_headers(raws, _work())
    assert any("FILTER 'y_04'" in m and "r_03" in m for m in out)
    assert any("EXPTIME 20.000" in m for m in out)
    assert any("arcsec from the job's boresight" in m for m in out)
    assert check_headers([_raw()], _work()) == []


def test_two_snaps_of_half_the_visit_time_match():
    raws = [_raw(requested_exposure_time=15.0, images_in_sequence=2, image_index=i) for i in (1, 2)]
    assert check_headers(raws, _work(nimages=2)) == []


@pytest.mark.parametrize("field, value, match", [
    ("instrument", "LSSTCam", "is from LSSTCam"),
    ("detector", 5, "is detector 5"),
    ("group_id", "2025-10-16T01:00:00.000", "GROUPID"),
])
def test_wrong_raw_is_bad_input(field, value, match):
    with pytest.raises(BadInputError, match=match):
        check_headers([_raw(**{field: value})], _work())


def test_separation_wraps_ra_and_scales_by_declination():
    assert separation_arcsec(359.99, 0.0, 0.01, 0.0) == pytest.approx(72.0)
    assert separation_arcsec(10.0, 60.0, 10.02, 60.0) == pytest.approx(36.0, rel=1e-3)  # cos 60 = 0.5
    assert separation_arcsec(10.0, -28.0, 10.0, -27.99) == pytest.approx(36.0)


def test_pointing_comes_from_the_header_else_the_job():
    assert header_pointing(_raw(ra=53.5), _work()) == (53.5, -28.0, 10.0)
    assert header_pointing(_raw(ra=None, dec=None, rotation=None), _work()) == (53.0, -28.0, 10.0)
    with pytest.raises(BadInputError, match="no pointing"):
        header_pointing(_raw(ra=None, dec=None, rotation=None), _work(ra=None, dec=None, rotation=None))
