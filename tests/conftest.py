"""Shared fixtures: a real store on SQLite and, when configured, on PostgreSQL.

``FLYWHEEL_TEST_POSTGRES_URL`` (set by scripts/test) enables the PostgreSQL
half of every ``store_url``-based test; each test gets its own schema so tests
never see each other's rows. When the variable is set but the server is
unreachable the tests fail rather than skip: CI must not pass by running less.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.store import Store
from tests.support.pg_schema import postgres_schema, postgres_url

ROOT = Path(__file__).resolve().parents[1]

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'flywheel.db'}"
        return
    with postgres_schema(postgres_url()) as url:
        yield url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A migrated, empty store on each backend."""
    s = Store(store_url)
    s.upgrade()
    yield s
    s.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """A migrated SQLite store, for tests that need only one backend."""
    s = Store(f"sqlite:///{tmp_path / 'flywheel.db'}")
    s.upgrade()
    yield s
    s.dispose()
