"""Fixtures of the chat-side tests: the whole app on a test store, through FastAPI's client.

A test module that needs another runtime (operator roles, the proposer) defines its own
``runtime`` and ``client``, which take precedence over these.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chainlit import data as chainlit_data
from fastapi.testclient import TestClient

from chatbot.runtime import Runtime
from chatbot.web.server import create_app
from optimizer.store import Store
from tests.support.chat_helpers import make_runtime


@pytest.fixture
def runtime(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "test-secret-" + "x" * 32)
    monkeypatch.setenv("FLYWHEEL_API_KEY", "k")
    # Chainlit caches its data layer per process; each test app has its own store.
    monkeypatch.setattr(chainlit_data, "_data_layer", None)
    monkeypatch.setattr(chainlit_data, "_data_layer_initialized", False)
    yield make_runtime(store)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime=runtime)) as c:
        yield c
