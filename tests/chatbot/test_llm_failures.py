"""Provider failures from the chat turn to the guardrail, with the fake provider behind litellm.

``tests/chatbot/test_llm.py`` covers :func:`chatbot.llm.streaming.stream_reply` on its own
(retry counts, backoff, mid-stream failures). Here the whole chain:

- a 429, a 5xx, a provider timeout or a model that never answers, on a turn:
  retried as configured, then answered by the configured fallback model
  (``model.fallback`` / ``FLYWHEEL_FALLBACK_MODEL``); without a fallback the
  user reads the friendly message and the stored turn carries the error;
- the failed turns raise the arm's error rate in :func:`optimizer.kpi.session_frame`,
  the error-rate guardrail pauses the arm in :func:`optimizer.refit.run_optimizer`,
  and new sessions no longer get it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatbot.conversation import Conversation
from chatbot.llm.fake import call_count
from chatbot.llm.streaming import FRIENDLY_ERROR, stream_reply
from chatbot.runtime import Runtime
from optimizer import kpi
from optimizer.config import ArmConfig, GuardrailConfig, KPIConfig, ModelConfig, load_config
from optimizer.refit import run_optimizer
from optimizer.store import Store
from tests.support.chat_helpers import RecordingTracer, chat_config

CHAMPION, CHALLENGER = "concise", "empathetic"
ARMS = (ArmConfig(id=CHAMPION, prompt=CHAMPION), ArmConfig(id=CHALLENGER, prompt=CHALLENGER))


def _runtime(store: Store, model: ModelConfig) -> Runtime:
    config = chat_config(store.url, arms=ARMS, champion=CHAMPION)
    config = config.model_copy(
        update={
            "model": model,
            "kpi": KPIConfig(guardrails=(GuardrailConfig(metric="error_rate", max_delta=0.05),)),
        }
    )
    return Runtime.build(config, store=store, tracer=RecordingTracer(), migrate=False)


def _unique(name: str) -> str:
    """A fake model name of its own, so that its call count is this test's alone."""
    sep = "&" if "?" in name else "?"
    return f"{name}{sep}tag={uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", autouse=True)
def _litellm_warmed_up() -> None:
    """litellm's first call in a process is slow (lazy imports): not what is measured here."""
    asyncio.run(
        stream_reply([{"role": "user", "content": "hi"}], model=ModelConfig(name="fake/echo"))
    )


FAILURES = [
    # (primary model, expected error text, calls to the primary with retries=2)
    ("fake/429", "RateLimitError 429", 3),
    ("fake/error-500", "InternalServerError 500", 3),
    ("fake/error-503", "ServiceUnavailableError 503", 3),
    ("fake/timeout?first_ms=50", "Timeout", 1),  # the provider's own timeout: not retried
    ("fake/hang", "timeout after 2 s", 1),  # our deadline (model.timeout_s)
]


@pytest.mark.parametrize(("primary", "expected", "calls"), FAILURES)
@pytest.mark.parametrize("fallback", [None, "fake/echo"])
async def test_a_failing_provider_is_retried_then_falls_back_or_says_sorry(
    store: Store, primary: str, expected: str, calls: int, fallback: str | None
) -> None:
    primary = _unique(primary)
    model = ModelConfig(name=primary, fallback=fallback, retries=2, timeout_s=2)
    runtime = _runtime(store, model)
    conversation = await Conversation.start(runtime, "s-1", "ana")
    streamed: list[str] = []

    async def on_token(token: str) -> None:
        streamed.append(token)

    reply = await conversation.reply("t-1", "Can I pay by invoice?", on_token=on_token)

    turn = store.get_turn("t-1")
    assert call_count(primary) == calls
    if fallback is None:
        assert reply.failed and reply.text == FRIENDLY_ERROR and streamed == []
        assert turn.reply == FRIENDLY_ERROR and turn.model == primary
        assert turn.error is not None and expected in turn.error
        assert turn.ttft_ms is None and turn.latency_ms > 0
    else:
        assert not reply.failed and reply.text == "You asked: Can I pay by invoice?"
        assert "".join(streamed) == reply.text  # the user saw the fallback's reply stream
        assert turn.error is None and turn.model == fallback and turn.reply == reply.text


def test_the_fallback_model_is_configurable_by_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_MODEL", "fake/error-503")
    monkeypatch.setenv("FLYWHEEL_FALLBACK_MODEL", "fake/echo")
    config = load_config("/nonexistent.toml")
    assert (config.model.name, config.model.fallback) == ("fake/error-503", "fake/echo")


async def test_an_arm_whose_replies_fail_is_paused_by_the_error_rate_guardrail(
    store: Store,
) -> None:
    # Two processes' worth of serving on one store: the challenger's replies all fail.
    healthy = _runtime(store, ModelConfig(name="fake/echo", retries=0))
    broken = _runtime(store, ModelConfig(name=_unique("fake/error-503"), retries=1))
    sessions = {CHAMPION: (healthy, 0), CHALLENGER: (broken, 0)}
    for arm, (runtime, _) in sessions.items():
        store.save_snapshot("exp", "test", {"segments": {"*": {arm: 1.0}}}, {"arms": {}})
        runtime.assigner.invalidate()
        failed = 0
        for i in range(30):
            conversation = await Conversation.start(runtime, f"s-{arm}-{i}", f"u-{arm}-{i}")
            assert conversation.assignment.arm_id == arm
            reply = await conversation.reply(f"t-{arm}-{i}", "Hello?")
            failed += reply.failed
        sessions[arm] = (runtime, failed)
    assert sessions[CHAMPION][1] == 0 and sessions[CHALLENGER][1] == 30

    metrics = kpi.arm_metrics(kpi.session_frame(store, healthy.config))
    assert metrics.loc[CHALLENGER, "error_rate"] == 1.0
    assert metrics.loc[CHAMPION, "error_rate"] == 0.0

    run = run_optimizer(store, healthy.config, random_state=0)
    assert run is not None and run.paused == (CHALLENGER,)
    (check,) = [c for c in run.summary["guardrails"] if c["arm"] == CHALLENGER]
    assert check["metric"] == "error_rate" and check["breached"] and check["arm_value"] > 0.9
    assert store.arm_statuses("exp")[CHALLENGER] == "paused_guardrail"
    assert run.allocation["segments"]["*"].get(CHALLENGER, 0) == 0
    healthy.assigner.invalidate()
    after = await Conversation.start(healthy, "s-after", "u-after")
    assert after.assignment.arm_id == CHAMPION
