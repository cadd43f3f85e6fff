"""The outcomes API fuzzed from the OpenAPI schema it serves (schemathesis), in-process.

The whole server (``create_app``) is loaded over ASGI, its schema read from
``/api/openapi.json``, and schemathesis generates requests for
``POST /api/outcomes`` — bodies that follow the schema (positive), bodies and
headers that break it (negative), and requests with whatever API key it makes
up — plus ``GET /api/health``. Over 1,000 requests with fixed seeds, on PostgreSQL
when ``FLYWHEEL_TEST_POSTGRES_URL`` is set (as in CI), else on SQLite. Every answer must be:

- never a 5xx;
- a 4xx with a JSON ``detail`` that says why (a string, or a list of problems
  each with a ``msg``);
- a 201 only for a body that is stored (and then exactly once), a 200 only for
  a repeat of an idempotency key already stored;
- what the schema documents (status codes, content types, response bodies:
  schemathesis' own conformance checks).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import sqlalchemy as sa
from chainlit import data as chainlit_data
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from chatbot.web.server import create_app
from optimizer.store import Store, schema
from tests.support.chat_helpers import make_runtime
from tests.support.flywheel_process import postgres_schema

KEY = "fuzz-key"
POSTGRES_URL = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL", "")
#: Generated requests per kind: together over 1,000.
EXAMPLES = {"valid key, schema-conforming": 450, "valid key, schema-breaking": 450, "any key": 120}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture
def fuzz_store(tmp_path: Path) -> Iterator[Store]:
    """PostgreSQL when configured (what CI runs), else SQLite: the fuzzing is too slow for both."""
    with contextlib.ExitStack() as stack:
        if POSTGRES_URL:
            url = stack.enter_context(postgres_schema(POSTGRES_URL, "fuzz"))
        else:
            url = f"sqlite:///{tmp_path / 'fuzz.db'}"
        store = Store(url)
        stack.callback(store.dispose)
        store.upgrade()
        yield store


@pytest.fixture
def app(fuzz_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "test-secret-" + "x" * 32)
    monkeypatch.setenv("FLYWHEEL_API_KEY", KEY)
    monkeypatch.setattr(chainlit_data, "_data_layer", None)
    monkeypatch.setattr(chainlit_data, "_data_layer_initialized", False)
    # The rate limit has its own test; here it would only turn the fuzzing into 429s.
    return create_app(runtime=make_runtime(fuzz_store, outcomes_per_minute_per_key=100_000))


def _reason(body: Any) -> bool:
    """A rejection that says why: a non-empty message, or problems that each have one."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return bool(detail.strip())
    if isinstance(detail, list) and not all(isinstance(p, dict) for p in detail):
        return False
    return bool(detail) and all(
        isinstance(p, dict) and str(p.get("msg", "")).strip() for p in detail
    )


def test_fuzzed_requests_never_fail_the_server_and_every_rejection_says_why(
    app: Any, fuzz_store: Store
) -> None:
    api = schemathesis.openapi.from_asgi("/api/openapi.json", app)
    post = api["/api/outcomes"]["POST"]
    statuses: Counter[int] = Counter()
    created: list[str] = []

    def check(case: Any, *, headers: dict[str, str] | None = None) -> None:
        response = case.call(headers=headers)
        case.validate_response(response, checks=CHECKS, headers=headers)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert _reason(response.json()), (response.status_code, response.text)
        elif response.status_code == 201:
            created.append(case.body["idempotency_key"])
        else:
            assert response.json()["status"] in ("duplicate", "ok")

    fixed = {"X-API-Key": KEY}
    kinds = {
        "valid key, schema-conforming": post.as_strategy(GenerationMode.POSITIVE, headers=fixed),
        "valid key, schema-breaking": post.as_strategy(GenerationMode.NEGATIVE, headers=fixed),
        "any key": post.as_strategy(GenerationMode.POSITIVE),
    }
    for kind, strategy in kinds.items():

        @settings(
            max_examples=EXAMPLES[kind],
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            check(case)

        run()
    health = api["/api/health"]["GET"]

    @settings(max_examples=10, deadline=None, database=None, derandomize=True)
    @given(case=health.as_strategy())
    def run_health(case: Any) -> None:
        check(case)

    run_health()

    total = sum(statuses.values())
    assert total >= 1000, statuses
    assert statuses[201] > 50 and statuses[422] > 50 and statuses[401] > 50, statuses
    with fuzz_store.engine.connect() as conn:
        keys = conn.execute(sa.select(schema.outcomes.c.idempotency_key)).scalars().all()
    assert sorted(keys) == sorted(created) and len(set(keys)) == len(keys)
