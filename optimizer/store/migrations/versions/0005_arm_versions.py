"""arm versions and the holdback

Arms become data, versioned by the content hash of what they serve: columns
``base_id``, ``version``, ``content_hash``, ``prompt_text``, ``model`` and
``origin`` on ``arms`` (existing rows are version 1 of themselves, so their
data and ids stay as they are). ``holdback`` on ``assignments`` marks sessions
of the holdback (the experiment's baseline arm, outside the bandit). Cheap:
added columns with defaults, no rewrite of the big tables on PostgreSQL 11+.

Revision ID: 0005_arm_versions
Revises: 0004_integrity
Create Date: 2026-12-02 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_arm_versions"
down_revision = "0004_integrity"
branch_labels = None
depends_on = None

ARM_COLUMNS = ("base_id", "version", "content_hash", "prompt_text", "model", "origin")


def upgrade() -> None:
    with op.batch_alter_table("arms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_id", sa.String(200), nullable=True))
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("content_hash", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("prompt_text", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("model", sa.String(200), nullable=True))
        batch_op.add_column(
            sa.Column("origin", sa.String(20), nullable=False, server_default="config")
        )
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("holdback", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("holdback")
    with op.batch_alter_table("arms", schema=None) as batch_op:
        for name in reversed(ARM_COLUMNS):
            batch_op.drop_column(name)
