"""proposal rounds and candidates

Challengers written from the feedback (``optimizer.proposer``): ``proposal_rounds``
(one per round: parent arm, model, cost) and ``proposal_candidates`` (every
candidate with its gate results, rationale and fate). New tables only.

Revision ID: 0007_proposer
Revises: 0006_models
Create Date: 2026-12-05 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007_proposer"
down_revision = "0006_models"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "proposal_rounds",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("experiment_id", sa.String(100), nullable=False),
        sa.Column("parent_arm_id", sa.String(200), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("details", _JSON, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_index("ix_proposal_rounds_exp", "proposal_rounds", ["experiment_id", "created_at"])
    op.create_table(
        "proposal_candidates",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("round_id", sa.String(40), nullable=False),
        sa.Column("experiment_id", sa.String(100), nullable=False),
        sa.Column("parent_arm_id", sa.String(200), nullable=False),
        sa.Column("source", sa.String(20), nullable=False),
        sa.Column("prompt_text", sa.Text, nullable=True),
        sa.Column("fewshot", sa.String(20), nullable=False),
        sa.Column("fewshot_config", _JSON, nullable=False),
        sa.Column("rationale", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("gates", _JSON, nullable=False),
        sa.Column("arm_id", sa.String(200), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("decided_at", _TS, nullable=True),
        sa.Column("decided_by", sa.String(100), nullable=True),
    )
    op.create_index(
        "ix_proposal_candidates_exp", "proposal_candidates", ["experiment_id", "status"]
    )


def downgrade() -> None:
    op.drop_index("ix_proposal_candidates_exp", table_name="proposal_candidates")
    op.drop_table("proposal_candidates")
    op.drop_index("ix_proposal_rounds_exp", table_name="proposal_rounds")
    op.drop_table("proposal_rounds")
