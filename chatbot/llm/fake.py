"""A deterministic fake litellm provider, ``fake/…``, for tests and load benchmarks.

It sits at the boundary where a real provider would: litellm calls it through
``litellm.custom_provider_map`` and it raises the litellm exception types a
real provider raises, so callers exercise litellm's real streaming and error
paths. The model name chooses the behaviour::

    fake/echo             replies "You asked: <last user message>", word by word
    fake/slow             the same, 50 ms per token (and before the first)
    fake/empty            streams only whitespace (a model that stops at once)
    fake/429              raises litellm.RateLimitError before any token
    fake/error-<status>   raises the litellm error for that HTTP status (400, 401, 404, 500, 503…)
    fake/timeout          waits for the request's timeout (or first_ms), then raises litellm.Timeout
    fake/hang             never answers (for the caller's own deadline)
    fake/flaky-<n>        the first n calls fail with 503, then it echoes

Options follow a ``?``, e.g. ``fake/echo?delay_ms=20&first_ms=100`` (time
between tokens and before the first, in ms), ``fail_after=3&status=500`` (fail
after streaming 3 tokens), ``tag=x`` (ignored; makes a name unique, e.g. for
its own ``flaky`` counter). Calls are counted per exact name (:func:`call_count`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import litellm
from litellm.types.utils import GenericStreamingChunk

from chatbot.llm.base import StreamingProvider, stream_chunk, timeout_seconds
from chatbot.llm.messages import estimate_tokens

log = logging.getLogger(__name__)

__all__ = [
    "PROVIDER",
    "FakeBehaviour",
    "FakeProvider",
    "call_count",
    "parse_behaviour",
    "provider_error",
]

PROVIDER = "fake"

_TOKEN = re.compile(r"\s*\S+")
_HANG_S = 3600.0


@dataclass(frozen=True)
class FakeBehaviour:
    """What a ``fake/…`` model name asks for (see the module docstring)."""

    kind: str  # echo | empty | error | timeout | hang | flaky
    status: int = 500
    delay_s: float = 0.0
    first_s: float = 0.0
    fail_after: int | None = None
    flaky: int = 0


def parse_behaviour(model: str) -> FakeBehaviour:
    """Parse a fake model name (with or without the ``fake/`` prefix).

    >>> parse_behaviour("fake/error-503")
    FakeBehaviour(kind='error', status=503, delay_s=0.0, first_s=0.0, fail_after=None, flaky=0)
    >>> parse_behaviour("slow").delay_s
    0.05
    """
    name, _, query = model.removeprefix(f"{PROVIDER}/").partition("?")
    opts = dict(parse_qsl(query))
    try:
        delay_s = float(opts.get("delay_ms", 0)) / 1000
        first_s = float(opts.get("first_ms", 0)) / 1000
        fail_after = int(opts["fail_after"]) if "fail_after" in opts else None
        status = int(opts.get("status", 500))
    except ValueError:
        raise ValueError(f"fake model options must be numbers, got {query!r}") from None
    kind, flaky = "echo", 0
    if name == "slow":
        delay_s, first_s = delay_s or 0.05, first_s or 0.05
    elif name in ("timeout", "hang", "empty"):
        kind = name
    elif m := re.fullmatch(r"(?:error-)?(\d{3})", name):
        kind, status = "error", int(m.group(1))
    elif m := re.fullmatch(r"flaky-(\d+)", name):
        kind, flaky = "flaky", int(m.group(1))
    elif name != "echo":
        raise ValueError(
            f"unknown fake model {model!r}; "
            "use echo, slow, empty, 429, error-<status>, timeout, hang or flaky-<n>"
        )
    return FakeBehaviour(kind, status, delay_s, first_s, fail_after, flaky)


def provider_error(status: int, model: str, message: str) -> Exception:
    """The litellm exception a real provider's HTTP ``status`` turns into.

    >>> type(provider_error(429, "fake/429", "slow down")).__name__
    'RateLimitError'
    """
    errors: dict[int, type[Exception]] = {
        400: litellm.BadRequestError,
        401: litellm.AuthenticationError,
        404: litellm.NotFoundError,
        429: litellm.RateLimitError,
        502: litellm.BadGatewayError,
        503: litellm.ServiceUnavailableError,
    }
    if status == 408:
        return litellm.Timeout(message=message, model=model, llm_provider=PROVIDER)
    error = errors.get(status, litellm.InternalServerError)
    return error(message=message, llm_provider=PROVIDER, model=model)  # type: ignore[call-arg]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            return " ".join(str(content or "").split())
    return ""


def _reply_tokens(behaviour: FakeBehaviour, messages: list[dict[str, Any]]) -> list[str]:
    if behaviour.kind == "empty":
        return [" ", "\n"]
    return _TOKEN.findall(f"You asked: {_last_user_text(messages)}")


def _usage(messages: list[dict[str, Any]], completion_tokens: int) -> dict[str, int]:
    prompt = sum(estimate_tokens(str(m.get("content") or "")) for m in messages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


_calls: dict[str, int] = {}
_calls_lock = threading.Lock()


def call_count(model: str) -> int:
    """How many calls the fake ``model`` (exact name, prefix optional) received in this process."""
    with _calls_lock:
        return _calls.get(model.removeprefix(f"{PROVIDER}/"), 0)


def _start(model: str) -> FakeBehaviour:
    """Count the call and return its behaviour; raise what fails before any token."""
    behaviour = parse_behaviour(model)
    with _calls_lock:
        _calls[model] = calls = _calls.get(model, 0) + 1
    if behaviour.kind == "error":
        raise provider_error(behaviour.status, model, f"fake provider error {behaviour.status}")
    if behaviour.kind == "flaky" and calls <= behaviour.flaky:
        raise provider_error(503, model, f"fake provider flaky failure {calls}/{behaviour.flaky}")
    return behaviour


def _check_mid_stream(behaviour: FakeBehaviour, model: str, sent: int) -> None:
    if behaviour.fail_after is not None and sent >= behaviour.fail_after:
        raise provider_error(behaviour.status, model, f"fake provider failed after {sent} tokens")


def _wait_s(behaviour: FakeBehaviour, timeout: Any) -> float:
    """How long ``timeout``/``hang`` wait before failing: ``first_ms``, else the request timeout."""
    if behaviour.kind == "hang":
        return _HANG_S
    return behaviour.first_s or timeout_seconds(timeout) or _HANG_S


def _timed_out(model: str) -> Exception:
    return litellm.Timeout(message="fake provider timed out", model=model, llm_provider=PROVIDER)


class FakeProvider(StreamingProvider):
    """litellm custom provider for ``fake/…`` model names (sync and async, streaming or not)."""

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:  # type: ignore[override]
        model, messages = kwargs["model"], kwargs["messages"]
        behaviour = _start(model)
        if behaviour.kind in ("hang", "timeout"):
            await asyncio.sleep(_wait_s(behaviour, kwargs.get("timeout")))
            raise _timed_out(model)
        tokens = _reply_tokens(behaviour, messages)
        await asyncio.sleep(behaviour.first_s)
        for i, token in enumerate(tokens):
            _check_mid_stream(behaviour, model, i)
            if i:
                await asyncio.sleep(behaviour.delay_s)
            yield stream_chunk(token)
        _check_mid_stream(behaviour, model, len(tokens))
        yield stream_chunk("", usage=_usage(messages, len(tokens)))

    def streaming(self, *args: Any, **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        model, messages = kwargs["model"], kwargs["messages"]
        behaviour = _start(model)
        if behaviour.kind in ("hang", "timeout"):
            time.sleep(_wait_s(behaviour, kwargs.get("timeout")))
            raise _timed_out(model)
        tokens = _reply_tokens(behaviour, messages)
        time.sleep(behaviour.first_s)
        for i, token in enumerate(tokens):
            _check_mid_stream(behaviour, model, i)
            if i:
                time.sleep(behaviour.delay_s)
            yield stream_chunk(token)
        _check_mid_stream(behaviour, model, len(tokens))
        yield stream_chunk("", usage=_usage(messages, len(tokens)))
