"""The event store: schema, migrations, writes and reads (SQLite or PostgreSQL)."""

from __future__ import annotations

from optimizer.store.engine import is_postgres, make_engine, normalise_url
from optimizer.store.schema import ACTIVE_STATUSES
from optimizer.store.store import (
    ArmSpec,
    AssignmentRecord,
    OutcomeRecord,
    Store,
    TurnRecord,
    VoteRecord,
)

__all__ = [
    "ACTIVE_STATUSES",
    "ArmSpec",
    "AssignmentRecord",
    "OutcomeRecord",
    "Store",
    "TurnRecord",
    "VoteRecord",
    "is_postgres",
    "make_engine",
    "normalise_url",
]
