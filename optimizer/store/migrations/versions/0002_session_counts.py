"""session counts on assignments

Turn and vote counts per session, kept by the store, so a refit reads one row
per session (optimizer.kpi); indexes that tell whether anything happened after
a given time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 23:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COUNTS = ("turns", "errors", "rated", "thumbs_up", "thumbs_down")

BACKFILL = """
UPDATE assignments SET
  turns = (SELECT count(*) FROM turns t WHERE t.session_id = assignments.session_id),
  errors = (SELECT count(*) FROM turns t
            WHERE t.session_id = assignments.session_id AND t.error IS NOT NULL),
  rated = (SELECT count(*) FROM feedback f
           WHERE f.session_id = assignments.session_id AND f.value IS NOT NULL),
  thumbs_up = (SELECT count(*) FROM feedback f
               WHERE f.session_id = assignments.session_id AND f.value = 1),
  thumbs_down = (SELECT count(*) FROM feedback f
                 WHERE f.session_id = assignments.session_id AND f.value = 0)
"""


def upgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        for name in COUNTS:
            batch_op.add_column(sa.Column(name, sa.Integer(), server_default="0", nullable=False))
    op.execute(BACKFILL)
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.create_index("ix_turns_created", ["created_at"], unique=False)
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index("ix_feedback_updated", ["updated_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_updated")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_index("ix_turns_created")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        for name in reversed(COUNTS):
            batch_op.drop_column(name)
