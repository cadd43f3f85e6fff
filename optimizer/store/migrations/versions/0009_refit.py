"""the incremental refit's kept sums

Table ``refit_state`` (optimizer.refit_state): per experiment and part, the sums of
the sessions whose KPI windows have closed, and the watermarks up to which events
were folded in. A cache: dropping its rows costs one full recomputation.

Revision ID: 0009_refit
Revises: 0008_models2
Create Date: 2026-12-05 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009_refit"
down_revision = "0008_models2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "refit_state",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("part", sa.String(40), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("meta", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("refit_state")
