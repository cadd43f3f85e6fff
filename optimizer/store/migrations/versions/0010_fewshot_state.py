"""few-shot step state

The few-shot step's incremental state (``optimizer.fewshot.state``): a watermark per
experiment (``fewshot_state``), per session what credit counted (``fewshot_sessions``),
the qualifying turns with their ranking keys (``fewshot_turns``) and the credit sums per
example and arm (``fewshot_credit``), and the operator report's figures per hour and day
of assignment, arm and segment (``report_buckets``) with a histogram of support minutes
per arm (``report_support``). New tables only; all of it is rebuilt from the
events when missing, so a downgrade loses nothing.

Revision ID: 0010_fewshot_state
Revises: 0009_refit
Create Date: 2026-12-05 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010_fewshot_state"
down_revision = "0009_refit"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)
BUCKET_FIGURES = (
    "sessions",
    "complete",
    "reward",
    "conversion_known",
    "conversions",
    "turns",
    "errors",
    "rated",
    "thumbs_up",
    "thumbs_down",
    "cost",
    "users",
)


def upgrade() -> None:
    op.create_table(
        "fewshot_state",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("now_at", _TS, nullable=False),
        sa.Column("marks", _JSON, nullable=False),
        sa.Column("excluded", _JSON, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "fewshot_sessions",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("session_id", sa.String(100), primary_key=True),
        sa.Column("arm_id", sa.String(200), nullable=False),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("reward", sa.Float, nullable=True),
        sa.Column("examples", _JSON, nullable=False),
        sa.Column("figures", _JSON, nullable=True),
    )
    op.create_table(
        "fewshot_turns",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("turn_id", sa.String(100), primary_key=True),
        sa.Column("session_id", sa.String(100), nullable=False),
        sa.Column("arm_id", sa.String(200), nullable=False),
        sa.Column("prompt_id", sa.String(100), nullable=False),
        sa.Column("reasons", sa.String(400), nullable=False),
        sa.Column("reward", sa.Float, nullable=True),
        sa.Column("complete", sa.Boolean, nullable=False),
        sa.Column("reward_so_far", sa.Float, nullable=False),
        sa.Column("rank_reward", sa.Float, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("shortest", sa.Integer, nullable=False),
        sa.Column("longest", sa.Integer, nullable=False),
        sa.Column("mined", sa.Boolean, nullable=False),
    )
    op.create_index("ix_fewshot_turns_session", "fewshot_turns", ["experiment_id", "session_id"])
    op.create_index(
        "ix_fewshot_turns_rank",
        "fewshot_turns",
        ["experiment_id", "rank_reward", "reward_so_far", "created_at", "turn_id"],
    )
    op.create_table(
        "fewshot_credit",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("example_id", sa.String(100), primary_key=True),
        sa.Column("arm_id", sa.String(200), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("s", sa.Float, nullable=False),
        sa.Column("q", sa.Float, nullable=False),
    )

    op.create_table(
        "report_buckets",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("kind", sa.String(1), primary_key=True),
        sa.Column("bucket", sa.String(13), primary_key=True),
        sa.Column("arm_id", sa.String(200), primary_key=True),
        sa.Column("segment", sa.String(200), primary_key=True),
        *(sa.Column(name, sa.Float, nullable=False) for name in BUCKET_FIGURES),
    )
    op.create_table(
        "report_support",
        sa.Column("experiment_id", sa.String(100), primary_key=True),
        sa.Column("arm_id", sa.String(200), primary_key=True),
        sa.Column("bin", sa.Integer, primary_key=True),
        sa.Column("n", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("report_support")
    op.drop_table("report_buckets")
    op.drop_table("fewshot_credit")
    op.drop_index("ix_fewshot_turns_rank", table_name="fewshot_turns")
    op.drop_index("ix_fewshot_turns_session", table_name="fewshot_turns")
    op.drop_table("fewshot_turns")
    op.drop_table("fewshot_sessions")
    op.drop_table("fewshot_state")
