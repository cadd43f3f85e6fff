"""stream_reply through real litellm against the fake provider at the boundary."""

from __future__ import annotations

import asyncio
import uuid

import litellm
import pytest

from chatbot.llm.fake import call_count
from chatbot.llm.streaming import FRIENDLY_ERROR, Completion, register_providers, stream_reply
from optimizer.config import ModelConfig

QUESTION = "How do I reset my password?"
MESSAGES = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": QUESTION},
]
ECHO = f"You asked: {QUESTION}"
# Generous: the first litellm call imports lazily, on a loaded 2-core machine.
GENEROUS_S = 60.0


def unique(name: str) -> str:
    """A fake model name of its own, so call counts don't leak between tests."""
    sep = "&" if "?" in name else "?"
    return f"{name}{sep}tag={uuid.uuid4().hex[:8]}"


def config(name: str, **kwargs: object) -> ModelConfig:
    options: dict[str, object] = {"timeout_s": GENEROUS_S, "retries": 1, "max_tokens": 32}
    options.update(kwargs)
    return ModelConfig(name=name, **options)  # type: ignore[arg-type]


async def collect(model: ModelConfig) -> tuple[Completion, list[str]]:
    tokens: list[str] = []

    async def on_token(text: str) -> None:
        tokens.append(text)

    return await stream_reply(MESSAGES, model=model, on_token=on_token), tokens


async def test_streams_tokens_in_order_with_usage_and_timings() -> None:
    completion, tokens = await collect(config("fake/echo?delay_ms=5"))

    assert completion.error is None
    assert len(tokens) == len(ECHO.split()) > 1
    assert "".join(tokens) == completion.text == ECHO
    assert completion.model == "fake/echo?delay_ms=5"
    assert completion.completion_tokens == len(tokens)
    assert completion.prompt_tokens is not None and completion.prompt_tokens > 0
    assert completion.cost == 0.0
    assert completion.ttft_ms is not None
    # Seven 5 ms pauses separate the first token from the last one.
    assert 0 < completion.ttft_ms < completion.latency_ms
    assert not completion.partial


async def test_event_loop_keeps_running_while_tokens_stream() -> None:
    events: list[str] = []

    async def ticker() -> None:
        while True:
            events.append("tick")
            await asyncio.sleep(0.005)

    async def on_token(text: str) -> None:
        events.append("token")

    task = asyncio.create_task(ticker())
    try:
        completion = await stream_reply(
            MESSAGES, model=config("fake/echo?delay_ms=30"), on_token=on_token
        )
    finally:
        task.cancel()
    assert completion.error is None
    first, last = events.index("token"), len(events) - 1 - events[::-1].index("token")
    assert "tick" in events[first:last], "the ticker never ran while the reply streamed"


async def test_retries_before_the_first_token_then_answers() -> None:
    name = unique("fake/flaky-1")
    completion, tokens = await collect(config(name, retries=1))

    assert completion.error is None
    assert "".join(tokens) == completion.text == ECHO
    assert call_count(name) == 2


async def test_falls_back_after_retries_are_spent() -> None:
    name = unique("fake/flaky-9")
    completion, _ = await collect(config(name, retries=2, fallback="fake/echo"))

    assert completion.error is None
    assert completion.model == "fake/echo"
    assert completion.text == ECHO
    assert call_count(name) == 3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fake/429", "RateLimitError 429"),
        ("fake/error-500", "InternalServerError 500"),
        ("fake/error-503", "ServiceUnavailableError 503"),
    ],
)
async def test_retryable_errors_end_in_the_friendly_message(name: str, expected: str) -> None:
    name = unique(name)
    completion, tokens = await collect(config(name, retries=1))

    assert tokens == []
    assert completion.text == FRIENDLY_ERROR
    assert completion.error is not None and expected in completion.error
    assert "(2 attempts)" in completion.error
    assert completion.ttft_ms is None and completion.cost is None
    assert call_count(name) == 2


async def test_an_empty_reply_is_retried_then_reported() -> None:
    name = unique("fake/empty")
    completion, _ = await collect(config(name, retries=1))

    assert call_count(name) == 2
    assert completion.text == FRIENDLY_ERROR
    assert completion.error is not None and "EmptyReplyError" in completion.error

    rescued, _ = await collect(config(unique("fake/empty"), retries=0, fallback="fake/echo"))
    assert rescued.error is None and rescued.text == ECHO


async def test_client_errors_are_not_retried_but_fall_back() -> None:
    name = unique("fake/error-400")
    completion, _ = await collect(config(name, retries=3, fallback=unique("fake/error-401")))

    assert call_count(name) == 1
    assert completion.text == FRIENDLY_ERROR
    assert completion.error is not None
    assert "BadRequestError 400" in completion.error
    assert "AuthenticationError 401" in completion.error


async def test_a_model_that_never_answers_times_out_politely() -> None:
    name = unique("fake/hang")
    completion, tokens = await collect(config(name, timeout_s=0.3, retries=2))

    assert tokens == []
    assert completion.text == FRIENDLY_ERROR
    assert completion.error is not None and "timeout after 0.3 s" in completion.error
    assert completion.latency_ms >= 300
    assert call_count(name) == 1  # a timeout used the whole budget: no retry


async def test_provider_timeout_is_reported_and_falls_back() -> None:
    completion, _ = await collect(config("fake/timeout?first_ms=20", fallback="fake/echo"))

    assert completion.error is None
    assert completion.model == "fake/echo"

    failed, _ = await collect(config("fake/timeout?first_ms=20"))
    assert failed.error is not None and "Timeout" in failed.error
    assert failed.text == FRIENDLY_ERROR


async def test_error_after_some_tokens_keeps_what_the_user_saw() -> None:
    name = unique("fake/echo?fail_after=3&status=502")
    completion, tokens = await collect(config(name, retries=2, fallback="fake/echo"))

    assert tokens == ECHO.split(" ")[:1] + [" " + w for w in ECHO.split(" ")[1:3]]
    assert completion.text == "".join(tokens) + "\n\n" + FRIENDLY_ERROR  # the cut is said
    assert completion.partial
    assert completion.error is not None and "BadGatewayError 502" in completion.error
    assert call_count(name) == 1  # never retried (nor fallen back) once the user saw tokens


async def test_errors_raised_by_on_token_propagate() -> None:
    async def on_token(text: str) -> None:
        raise RuntimeError("the UI went away")

    with pytest.raises(RuntimeError, match="the UI went away"):
        await stream_reply(MESSAGES, model=config("fake/echo"), on_token=on_token)


def test_register_providers_is_idempotent() -> None:
    register_providers()
    register_providers()
    providers = [item["provider"] for item in litellm.custom_provider_map]
    assert providers.count("fake") == 1
    assert providers.count("local") == 1


def test_the_fake_provider_serves_litellm_sync_and_async_calls() -> None:
    register_providers()
    response = litellm.completion(model="fake/echo", messages=MESSAGES)
    assert response.choices[0].message.content == ECHO
    assert response.usage.completion_tokens == len(ECHO.split())

    streamed = litellm.completion(model="fake/echo", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ECHO

    response = asyncio.run(litellm.acompletion(model="fake/echo", messages=MESSAGES))
    assert response.choices[0].message.content == ECHO

    with pytest.raises(litellm.RateLimitError):
        litellm.completion(model="fake/429", messages=MESSAGES)


def test_unknown_fake_models_are_named_in_the_error() -> None:
    completion = asyncio.run(stream_reply(MESSAGES, model=config("fake/nonsense")))
    assert completion.text == FRIENDLY_ERROR
    assert completion.error is not None and "unknown fake model" in completion.error
