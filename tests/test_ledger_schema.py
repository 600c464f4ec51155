"""Tests of apbatch.ledger_schema (the ledger's tables), for the dialect not run here."""

import apbatch.ledger_schema as schema
import sqlalchemy as sa
from apbatch.ledger import Ledger
from sqlalchemy.dialects import postgresql


def test_postgresql_schema_and_claim_statement_compile():
    """No PostgreSQL driver/server here: check the DDL and the claim's ON CONFLICT for that dialect."""
    ddl = []
    engine = sa.create_mock_engine("postgresql+psycopg2://", lambda sql, *a, **k: ddl.append(
        str(sql.compile(dialect=engine.dialect))))
    schema.metadata.create_all(engine, checkfirst=False)
    text = "\n".join(ddl)
    assert "CONSTRAINT uq_submissions_ccd UNIQUE (instrument, group_id, detector)" in text
    assert "visit BIGINT NOT NULL" in text
    c = schema.submissions.c
    stmt = (postgresql.insert(schema.submissions)
            .on_conflict_do_nothing(index_elements=["instrument", "group_id", "detector"])
            .returning(c.instrument, c.group_id, c.detector))
    sql = str(stmt.compile(dialect=postgresql.dialect()))
    assert "ON CONFLICT (instrument, group_id, detector) DO NOTHING RETURNING" in sql
    assert Ledger(engine)._insert is postgresql.insert
