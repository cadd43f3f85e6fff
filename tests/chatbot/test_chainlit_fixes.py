"""chatbot.web.chainlit_fixes: Chainlit's constructors no longer stall the event loop."""

from __future__ import annotations

import importlib
import itertools
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from types import FrameType
from typing import Any

import pytest
from chainlit.context import ChainlitContext, context_var
from chainlit.message import Message
from chainlit.session import HTTPSession
from chainlit.step import Step

from chatbot.web import chainlit_fixes


@pytest.fixture
async def chainlit_context() -> AsyncIterator[None]:
    token = context_var.set(
        ChainlitContext(HTTPSession(id="s", thread_id="t", client_type="webapp"))
    )
    yield
    context_var.reset(token)


def _sleeps_during(make: Any) -> list[float]:
    """The ``time.sleep`` calls made while ``make()`` runs (Python's profiler hook sees C calls)."""
    seen: list[float] = []

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and arg is time.sleep:
            seen.append(1.0)

    sys.setprofile(hook)
    try:
        make()
    finally:
        sys.setprofile(None)
    return seen


async def test_messages_and_steps_are_made_without_sleeping(chainlit_context: None) -> None:
    assert chainlit_fixes.install()
    assert chainlit_fixes.install()  # idempotent
    assert _sleeps_during(lambda: Message(content="hi")) == []
    assert _sleeps_during(lambda: Step(name="on_message", type="run")) == []


def test_other_sleeps_in_those_modules_still_sleep() -> None:
    chainlit_fixes.install()
    shimmed = importlib.import_module("chainlit.message").time
    assert _sleeps_during(lambda: shimmed.sleep(0.002)) != []
    assert shimmed.monotonic is time.monotonic  # the rest of ``time`` is the real one


async def test_steps_made_in_a_tight_loop_keep_distinct_increasing_timestamps(
    chainlit_context: None,
) -> None:
    chainlit_fixes.install()
    steps = [Step(name=f"s{i}", type="run") for i in range(200)]
    stamps = [datetime.fromisoformat(s.created_at.rstrip("Z")) for s in steps if s.created_at]
    assert len(stamps) == 200
    assert all(a < b for a, b in itertools.pairwise(stamps))


def test_the_clock_is_strictly_increasing_across_threads() -> None:
    import threading

    clock = chainlit_fixes.MonotonicClock()
    stamps: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(500):
            value = clock()
            with lock:
                stamps.append(value)

    workers = [threading.Thread(target=take) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(stamps)) == 2000  # no two callers got the same time
