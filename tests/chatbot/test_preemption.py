"""Chat turns pre-empt the proposer's own calls on the local model.

The slow test measures it on the real model: a chat turn's time to first token
while a rewrite runs, without and with pre-emption, in the same run. The fast
tests drive the same completion function on the ``fake/slow`` provider with a
"chat waiting" signal the test controls.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from string import Template
from typing import Any

import pytest

from chatbot.llm import proposer as proposer_llm
from chatbot.llm.proposer import completion_fn, local_chat_waiting, local_idle
from chatbot.llm.streaming import stream_reply
from optimizer.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)


def test_a_call_gives_way_and_starts_over_once_the_model_is_idle() -> None:
    waiting = threading.Event()
    looks: list[float] = []

    def preempt() -> bool:
        looks.append(time.monotonic())
        return waiting.is_set()

    complete = completion_fn(
        ModelConfig(name="fake/slow", retries=0, timeout_s=30),
        preempt=preempt,
        idle=lambda: not waiting.is_set(),
    )
    result: dict[str, Any] = {}
    began = time.monotonic()
    worker = threading.Thread(
        target=lambda: result.update(
            r=complete(
                [{"role": "user", "content": "one two three four five six"}],
                model="fake/slow",
                max_tokens=50,
                temperature=0,
            )
        )
    )
    worker.start()
    time.sleep(0.2)
    waiting.set()  # a chat turn arrives: the call abandons its reply ...
    time.sleep(0.4)
    assert worker.is_alive()
    waiting.clear()  # ... and the chat turn is done: it starts over
    worker.join(10)
    done = result["r"]
    assert done.error is None and done.text == "You asked: one two three four five six"
    # the latency is the attempt that answered, not the time spent giving way
    assert done.latency_ms < (time.monotonic() - began) * 1000 - 300
    assert len(looks) > 5


def test_a_call_that_keeps_giving_way_fails_as_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proposer_llm, "MAX_PREEMPTIONS", 2)
    calls: list[int] = []

    def idle() -> bool:
        calls.append(1)
        return True  # the chat turn ends at once, and another arrives every time

    complete = completion_fn(
        ModelConfig(name="fake/slow", retries=0, timeout_s=30), preempt=lambda: True, idle=idle
    )
    done = complete(
        [{"role": "user", "content": "x"}], model="fake/slow", max_tokens=5, temperature=0
    )
    assert done.text == "" and done.error is not None and "busy" in done.error
    assert len(calls) == 2  # waited for idle between the three attempts


def test_without_preemption_a_call_runs_to_its_end() -> None:
    complete = completion_fn(ModelConfig(name="fake/slow", retries=0, timeout_s=30))
    done = complete(
        [{"role": "user", "content": "a b"}], model="fake/slow", max_tokens=5, temperature=0
    )
    assert done.error is None and done.text == "You asked: a b"


def _rewrite_request() -> str:
    template = (ROOT / "prompts" / "proposer" / "rewrite.md").read_text().split("---", 2)[2]
    return Template(template).safe_substitute(
        current_prompt="You are the support assistant of Lumen Tasks. Answer briefly.",
        failures="- User asked: How do I export? | Assistant replied: Use settings. "
        "| User's comment: which settings?",
        candidate="1",
        candidates="3",
    )


def _chat_ttft_during_a_rewrite(preempt: bool) -> tuple[float, Any, float]:
    """(chat TTFT ms, the rewrite's Completion, its wall time s) with a chat turn 2 s in."""
    base = ModelConfig(name="local/gemma3-270m", retries=0, timeout_s=300)
    complete = completion_fn(
        base, timeout_s=300, preempt=local_chat_waiting if preempt else None, idle=local_idle
    )
    out: dict[str, Any] = {}
    began = time.perf_counter()

    def rewrite() -> None:
        out["r"] = complete(
            [{"role": "user", "content": _rewrite_request()}],
            model=base.name,
            max_tokens=300,
            temperature=0.0,
        )
        out["s"] = time.perf_counter() - began

    worker = threading.Thread(target=rewrite)
    worker.start()
    time.sleep(2.0)
    chat = base.model_copy(update={"max_tokens": 16, "temperature": 0.0})
    reply = asyncio.run(
        stream_reply(
            [
                {"role": "system", "content": "You are a support assistant."},
                {"role": "user", "content": "How do I reset my password?"},
            ],
            model=chat,
        )
    )
    worker.join(300)
    assert reply.error is None and reply.ttft_ms is not None
    return float(reply.ttft_ms), out["r"], out["s"]


@pytest.mark.slow
def test_a_chat_turn_does_not_wait_behind_a_local_rewrite() -> None:
    """Same run, same rewrite (temperature 0), a chat turn 2 s into it: TTFT before/after."""
    warm = ModelConfig(name="local/gemma3-270m", retries=0, timeout_s=120, max_tokens=2)
    asyncio.run(stream_reply([{"role": "user", "content": "Hi"}], model=warm))
    before, plain, plain_s = _chat_ttft_during_a_rewrite(preempt=False)
    after, preempted, preempted_s = _chat_ttft_during_a_rewrite(preempt=True)
    log.warning(
        "chat TTFT during a rewrite: %.0f ms without pre-emption, %.0f ms with it "
        "(rewrite %.1f s -> %.1f s wall)",
        before,
        after,
        plain_s,
        preempted_s,
    )
    assert plain.error is None and preempted.error is None
    assert preempted.text == plain.text  # started over and wrote the same rewrite
    assert plain_s > 4.0, "the rewrite ended before the chat turn came: nothing to measure"
    assert after < before / 3, (before, after)
