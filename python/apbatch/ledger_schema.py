"""The ledger's tables (SQLAlchemy Core); the queries are in `apbatch.ledger`.

``submissions``: one row per CCD of a group, unique on (instrument, group_id, detector);
``events``: every event received; ``dead_letters``: events that could not be parsed.
Row states are `apbatch.states.SubmissionState`; the tuples below are their string values
for SQL filters.
"""

from __future__ import annotations

import sqlalchemy as sa

from .states import SubmissionState

__all__ = ["ADDED_COLUMNS", "CLAIMED", "NOT_STARTED", "SUBMIT_FAILED", "UNFINISHED", "dead_letters", "events",
           "metadata", "submissions"]

CLAIMED = SubmissionState.CLAIMED.value
SUBMIT_FAILED = SubmissionState.SUBMIT_FAILED.value
NOT_STARTED = tuple(s.value for s in SubmissionState if s.not_started)
UNFINISHED = tuple(s.value for s in SubmissionState if s.unfinished)

metadata = sa.MetaData()
submissions = sa.Table(
    "submissions", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("instrument", sa.String(32), nullable=False),
    sa.Column("group_id", sa.String(256), nullable=False),
    sa.Column("detector", sa.Integer, nullable=False),
    sa.Column("detector_name", sa.String(32), nullable=False),
    sa.Column("visit", sa.BigInteger, nullable=False, index=True),
    sa.Column("day_obs", sa.Integer, nullable=False),
    sa.Column("intent", sa.String(32), nullable=False),
    sa.Column("backend", sa.String(32)),
    sa.Column("job_id", sa.String(128), index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("retry", sa.Boolean, nullable=False, default=True),
    sa.Column("job_history", sa.Text, nullable=False, default="[]"),
    sa.Column("work", sa.Text, nullable=False),
    sa.Column("command", sa.Text),  # JSON list: the job command of the latest submission
    # unique per claim of one visit, written before the scheduler call and given to the scheduler
    # with the jobs (Slurm --comment, HTCondor ApSubmitToken, local job.json): a claim whose
    # process died before recording the outcome is found at the scheduler by it, not resubmitted
    sa.Column("submit_token", sa.String(64)),
    sa.Column("event_received_at", sa.Float),
    sa.Column("claimed_at", sa.Float, nullable=False),
    sa.Column("submitted_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("last_polled_at", sa.Float),
    # JSON {stage: UTC unix seconds} written by the job itself (apbatch.latency.STAGES)
    sa.Column("stages", sa.Text),
    # JSON {"passed", "exposures", "failed_amps", "metrics"}: a calibration job's verification verdict
    sa.Column("verification", sa.Text),
    sa.UniqueConstraint("instrument", "group_id", "detector", name="uq_submissions_ccd"),
)
ADDED_COLUMNS = {"events": ("day_obs",), "submissions": ("command", "submit_token", "stages", "verification")}
"""Nullable columns added after the first release: `Ledger.open` adds them to older ledgers."""

events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("instrument", sa.String(32), nullable=False, default=""),
    sa.Column("group_id", sa.String(256), nullable=False, default="", index=True),
    sa.Column("source", sa.Text, nullable=False, default=""),
    sa.Column("accepted", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("day_obs", sa.Integer, index=True),  # the event's night (`apbatch.fanout.event_day_obs`)
)
dead_letters = sa.Table(
    "dead_letters", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("source", sa.Text, nullable=False, default=""),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
)
