"""indexes for the latency guardrail's window

``ix_turns_arm`` (experiment, arm) becomes ``ix_turns_arm_time`` (experiment, arm,
time, latency, session): an arm's newest turns are a backward walk of the index, not
a sort of all of the arm's turns, and the walk reads latency and session from the
index (SQLite always; PostgreSQL for pages vacuum marked all-visible). Two partial
indexes on the holdback sessions of ``assignments`` (a few percent of the rows):
``ix_assignments_holdback_arm`` says which arms have any, ``ix_assignments_holdback``
whether a session is one (optimizer.latencies). Indexes only; building
``ix_turns_arm_time`` reads every turn once (5 s for 3M turns on PostgreSQL).

Revision ID: 0011_latency
Revises: 0010_fewshot_state
Create Date: 2026-12-05 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_latency"
down_revision = "0010_fewshot_state"
branch_labels = None
depends_on = None

_PG_HELD = sa.text("holdback")
_SQLITE_HELD = sa.text("holdback = 1")


def upgrade() -> None:
    op.create_index(
        "ix_turns_arm_time",
        "turns",
        ["experiment_id", "arm_id", "created_at", "latency_ms", "session_id"],
    )
    op.drop_index("ix_turns_arm", table_name="turns")
    op.create_index(
        "ix_assignments_holdback_arm",
        "assignments",
        ["experiment_id", "arm_id"],
        postgresql_where=_PG_HELD,
        sqlite_where=_SQLITE_HELD,
    )
    op.create_index(
        "ix_assignments_holdback",
        "assignments",
        ["session_id"],
        postgresql_where=_PG_HELD,
        sqlite_where=_SQLITE_HELD,
    )


def downgrade() -> None:
    op.drop_index("ix_assignments_holdback", table_name="assignments")
    op.drop_index("ix_assignments_holdback_arm", table_name="assignments")
    op.create_index("ix_turns_arm", "turns", ["experiment_id", "arm_id"])
    op.drop_index("ix_turns_arm_time", table_name="turns")
