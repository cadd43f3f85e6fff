"""what finished fine-tuning jobs were billed

``finetune_jobs.trained_tokens`` (the provider's count of billable tokens, e.g.
OpenAI's ``trained_tokens``) and ``finetune_jobs.actual_cost_usd`` (those tokens
at ``finetune.usd_per_mtok_trained``). The spending cap counts a finished job's
actual cost instead of its estimate. Nullable columns only.

Revision ID: 0008_models2
Revises: 0007_proposer
Create Date: 2026-12-05 17:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_models2"
down_revision = "0007_proposer"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("finetune_jobs") as batch:
        batch.add_column(sa.Column("trained_tokens", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("actual_cost_usd", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("finetune_jobs") as batch:
        batch.drop_column("actual_cost_usd")
        batch.drop_column("trained_tokens")
