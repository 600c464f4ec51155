"""Tests for apbatch.errors: the one-line error text shared by the prompt-products commands and TAP."""

import pytest
import sqlalchemy as sa
from apbatch.errors import BadInputError, ExitCode, first_line


def test_first_line_of_a_plain_exception():
    assert first_line(ValueError("bad value\nmore detail")) == "bad value"
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_first_line_of_a_database_error_is_the_driver_message_without_its_prefix():
    class DriverError(Exception):
        pass

    exc = sa.exc.OperationalError("SELECT 1", {}, DriverError('ERROR:  relation "x" does not exist\nLINE 1'))
    assert first_line(exc) == 'relation "x" does not exist'
    # what SQLite says through SQLAlchemy, read for real
    engine = sa.create_engine("sqlite://")
    with pytest.raises(sa.exc.OperationalError) as info, engine.connect() as conn:
        conn.execute(sa.text("SELECT * FROM missing"))
    assert first_line(info.value) == "no such table: missing"


def test_bad_input_is_a_value_error_with_the_bad_input_exit_code():
    exc = BadInputError("apdb.url", "cannot connect", "check the URL")
    assert isinstance(exc, ValueError) and ExitCode.BAD_INPUT == 2
    assert "apdb.url" in str(exc) and "check the URL" in str(exc)
