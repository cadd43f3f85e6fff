"""exact propensities and reassignment: assignments.sticky, thread_id, closed_at/_reason

``sticky`` says whether a returning user kept their previous arm (propensity 1.0,
no draw) or the arm was drawn with ``propensity``. Rows logged before this
revision stay NULL: their propensity for a kept arm was the arm's share at the
time, not 1. Nothing is rewritten; readers derive the flag from
``context.returning`` (which those rows carry) and use the propensity of the
unit's draw, which was logged exactly (optimizer.ope.logs).

``thread_id``, ``closed_at`` and ``closed_reason``: a conversation whose arm was
paused moves to the champion at its next message; the old assignment is closed
with the reason and a new one continues the thread (optimizer.assignment).

``outcomes.attribution`` / ``attributed_session_id``: the verdict given when the
outcome was received (optimizer.attribution); NULL for older rows.

Revision ID: 0004_integrity
Revises: 0003_security
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_integrity"
down_revision = "0003_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sticky", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("thread_id", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("closed_reason", sa.String(length=200), nullable=True))
        batch_op.create_index("ix_assignments_thread", ["thread_id"], unique=False)
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attribution", sa.String(length=40), nullable=True))
        batch_op.add_column(
            sa.Column("attributed_session_id", sa.String(length=100), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.drop_column("attributed_session_id")
        batch_op.drop_column("attribution")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_index("ix_assignments_thread")
        for name in ("closed_reason", "closed_at", "thread_id", "sticky"):
            batch_op.drop_column(name)
