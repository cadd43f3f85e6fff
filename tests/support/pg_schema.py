"""PostgreSQL URLs scoped to one schema, so tests never see each other's rows.

A module of its own (not conftest) because tests/ and tests/e2e/ both have a
conftest, and ``from conftest import …`` would pick whichever was imported first.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from optimizer.store import make_engine


def postgres_url() -> str:
    """``FLYWHEEL_TEST_POSTGRES_URL``; a PostgreSQL test without it fails rather than skip, so
    a run can never look green without its PostgreSQL half. ``scripts/test`` (so CI) starts
    PostgreSQL and sets it; a local run without PostgreSQL deselects: ``-m "not postgres"``."""
    url = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL", "")
    if not url:
        pytest.fail(
            "FLYWHEEL_TEST_POSTGRES_URL is not set: run `bash scripts/test`, which starts "
            'PostgreSQL and sets it, or deselect these tests with -m "not postgres"',
            pytrace=False,
        )
    return url


def postgres_schema_url(base: str, schema_name: str) -> str:
    """``base`` with ``search_path`` set to ``schema_name`` on every connection."""
    url = sa.engine.make_url(make_engine(base).url)
    return url.update_query_dict({"options": f"-csearch_path={schema_name}"}).render_as_string(
        hide_password=False
    )


@contextmanager
def postgres_schema(base_url: str, prefix: str = "t") -> Iterator[str]:
    """A fresh PostgreSQL schema (dropped afterwards); yields a URL whose search_path is it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    try:
        yield postgres_schema_url(base_url, name)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
        admin.dispose()
