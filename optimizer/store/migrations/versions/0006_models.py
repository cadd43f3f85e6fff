"""models as arms, fine-tuning, opt-outs

``model_params`` and ``manifest`` on ``arms`` (an arm's model parameters and,
for a fine-tuned model, the dataset manifest); ``fallback`` on ``turns`` (the
arm's model failed and the fallback answered); ``privacy_opt_outs`` (users
whose conversations never become data) and ``finetune_jobs``. Added nullable
columns and new tables only: no rewrite of the big tables.

Revision ID: 0006_models
Revises: 0005_arm_versions
Create Date: 2026-12-05 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_models"
down_revision = "0005_arm_versions"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("arms", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_params", _JSON, nullable=True))
        batch_op.add_column(sa.Column("manifest", _JSON, nullable=True))
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback", sa.Boolean(), nullable=True))
    op.create_table(
        "privacy_opt_outs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("opted_out", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_opt_outs")),
    )
    op.create_index("ix_privacy_opt_outs_user", "privacy_opt_outs", ["user_id", "id"])
    op.create_table(
        "finetune_jobs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("experiment_id", sa.String(100), nullable=False),
        sa.Column("provider", sa.String(40), nullable=False),
        sa.Column("format", sa.String(20), nullable=False),
        sa.Column("base_model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("provider_file_id", sa.String(200), nullable=True),
        sa.Column("provider_job_id", sa.String(200), nullable=True),
        sa.Column("fine_tuned_model", sa.String(200), nullable=True),
        sa.Column("arm_id", sa.String(200), nullable=True),
        sa.Column("parent_arm_id", sa.String(200), nullable=True),
        sa.Column("estimated_cost_usd", sa.Float(), nullable=False),
        sa.Column("manifest", _JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_finetune_jobs")),
    )
    op.create_index("ix_finetune_jobs_exp", "finetune_jobs", ["experiment_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_finetune_jobs_exp", table_name="finetune_jobs")
    op.drop_table("finetune_jobs")
    op.drop_index("ix_privacy_opt_outs_user", table_name="privacy_opt_outs")
    op.drop_table("privacy_opt_outs")
    with op.batch_alter_table("turns", schema=None) as batch_op:
        batch_op.drop_column("fallback")
    with op.batch_alter_table("arms", schema=None) as batch_op:
        batch_op.drop_column("manifest")
        batch_op.drop_column("model_params")
