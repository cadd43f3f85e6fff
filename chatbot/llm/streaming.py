"""One streamed LLM reply through litellm, with retries, fallback and a deadline.

:func:`stream_reply` is the only way the chat path calls a model. It never
raises for provider trouble (HTTP errors, 429s, timeouts, a dead local
model): the returned :class:`Completion` carries a short technical ``error``
for the store and a ``text`` the user can read.

Failure policy, per model (``model.name``, then ``model.fallback``):

- every attempt is bounded by ``model.timeout_s`` as a whole (connect, queue
  and the full stream), passed to litellm and enforced with
  :func:`asyncio.wait_for`; a timed-out model is not retried (it just used the
  whole budget), the fallback gets its own ``timeout_s``;
- 429s, 5xx and connection errors are retried up to ``model.retries`` times
  with a short backoff; other errors (400, 401…) go straight to the fallback;
- nothing is retried once a token reached the user: the streamed text is kept,
  :data:`FRIENDLY_ERROR` appended, and the error recorded;
- an empty reply (whitespace only) counts as a retryable failure: a small
  base model sometimes stops at once, and sampling again usually answers.

Leading whitespace is not streamed: ``on_token`` and ``ttft_ms`` start at the
first visible text. Our own litellm providers (``local/…`` in
:mod:`chatbot.llm.local`, ``fake/…`` in :mod:`chatbot.llm.fake`, both built on
:mod:`chatbot.llm.base`) are registered by :func:`register_providers`.

The chat path iterates those two providers' chunks itself, without
``litellm.acompletion``: they run in this process, already raise litellm's
exception types and hand out usage, so litellm would only translate our
chunks into its own. That translation — ``CustomStreamWrapper`` building and
validating a pydantic ``ModelResponseStream`` per chunk, then re-assembling
and pricing the whole reply for logging callbacks we do not use — cost about
8 ms of CPU per 26-token reply, 50× the provider itself (``bench/load.py``;
bench/README.md has the upstream fix we would propose). Every other model
(any remote provider) goes through ``litellm.acompletion`` as before; litellm
can still call our providers too (``litellm.custom_provider_map``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import litellm  # chatbot/__init__ has set LITELLM_LOCAL_MODEL_COST_MAP: no network at import
from litellm.exceptions import MidStreamFallbackError
from litellm.types.utils import GenericStreamingChunk

from chatbot.llm import fake, local
from chatbot.llm.base import StreamingProvider
from optimizer.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "FRIENDLY_ERROR",
    "Completion",
    "EmptyReplyError",
    "register_providers",
    "stream_reply",
    "warm_up",
]

#: What the user reads when no model could answer.
FRIENDLY_ERROR = "Sorry — I couldn't answer just now. Please try again in a moment."
#: Seconds before the first retry; doubled for each further one.
RETRY_BACKOFF_S = 0.25
#: Providers that run here and cost nothing.
FREE_PROVIDERS = frozenset({"local", "fake"})


class EmptyReplyError(Exception):
    """A reply with no text (a base model can stop at once); retried like a 5xx."""


_RETRYABLE: tuple[type[Exception], ...] = (
    EmptyReplyError,
    litellm.RateLimitError,
    litellm.InternalServerError,
    litellm.ServiceUnavailableError,
    litellm.BadGatewayError,
    litellm.APIConnectionError,
)
_MAX_ERROR_CHARS = 300

OnToken = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Completion:
    """The outcome of one reply.

    ``error`` set means the reply failed: ``text`` is then :data:`FRIENDLY_ERROR`,
    after the text already streamed when there was some (``partial``): the
    final message the user sees. ``ttft_ms`` (time to first token) and ``latency_ms`` count
    from the call, across retries and fallback; ``model`` is the model that
    answered (or was tried last). ``cost`` is in USD, ``0.0`` for models run
    here, ``None`` when litellm does not know the price. ``fallback``: the
    main model failed and ``model.fallback`` answered (or was tried last).
    """

    text: str
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None
    ttft_ms: float | None
    latency_ms: float
    error: str | None
    fallback: bool = False

    @property
    def partial(self) -> bool:
        """True when the reply failed after some tokens had reached the user."""
        return self.error is not None and self.ttft_ms is not None


# --- stream_reply ------------------------------------------------------------------------

_registered = False
#: Our providers by prefix, the instances litellm knows too: the chat path calls them directly.
_own: dict[str, StreamingProvider] = {}


def register_providers() -> None:
    """Register the ``local/…`` and ``fake/…`` litellm providers (idempotent, cheap)."""
    global _registered
    if _registered:
        return
    present: dict[str, Any] = {
        item["provider"]: item["custom_handler"] for item in litellm.custom_provider_map
    }
    for name, handler in (
        (local.PROVIDER, local.LocalModelProvider),
        (fake.PROVIDER, fake.FakeProvider),
    ):
        if name not in present:
            present[name] = handler()
            litellm.custom_provider_map.append({"provider": name, "custom_handler": present[name]})
        if isinstance(present[name], StreamingProvider):
            _own[name] = present[name]
    _registered = True


@dataclass
class _Stream:
    """What has been received so far, across attempts."""

    started: float
    on_token: OnToken | None
    parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    usage: Any = None

    async def token(self, text: str) -> None:
        if self.first_token_at is None:
            text = text.lstrip()  # leading whitespace shows nothing: the reply starts later
            if not text:
                return
            self.first_token_at = time.perf_counter()
        self.parts.append(text)
        if self.on_token is not None:
            try:
                await self.on_token(text)
            except Exception as exc:  # the caller's bug, not the provider's: let it out
                raise _CallbackError(exc) from exc


class _CallbackError(Exception):
    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


def _provider(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else ""


def _cost(name: str, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    if _provider(name) in FREE_PROVIDERS:
        return 0.0
    if prompt_tokens is None or completion_tokens is None:
        return None
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=name, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # litellm raises for models missing from its price map
        return None
    return float(prompt_cost + completion_cost)


def _unwrap(exc: BaseException) -> BaseException:
    """The provider's own error: litellm wraps errors raised while streaming."""
    while isinstance(exc, MidStreamFallbackError) and exc.original_exception is not None:
        exc = exc.original_exception
    return exc


def _describe(name: str, exc: BaseException) -> str:
    """``"<model>: <ErrorType> <status>: <message>"``, short, for the store."""
    status = getattr(exc, "status_code", None)
    message = " ".join(str(getattr(exc, "message", None) or exc).split())
    while message.startswith("litellm.") and ": " in message:  # litellm prefixes its class names
        message = message.split(": ", 1)[1]
    label = f"{type(exc).__name__} {status}" if status else type(exc).__name__
    return f"{name}: {label}: {message}"[:_MAX_ERROR_CHARS]


def _summary(errors: list[str]) -> str:
    """Join attempt errors, counting repeats: ``"x: … (2 attempts); y: …"``."""
    counts = dict.fromkeys(errors, 0)
    for error in errors:
        counts[error] += 1
    return "; ".join(f"{e} ({n} attempts)" if n > 1 else e for e, n in counts.items())


@dataclass(frozen=True)
class _Usage:
    """Token counts of a reply from one of our providers (litellm's ``Usage`` has more)."""

    prompt_tokens: int | None
    completion_tokens: int | None


async def _attempt(
    name: str,
    messages: list[dict[str, Any]],
    model: ModelConfig,
    stream: _Stream,
    api_base: str | None = None,
) -> None:
    provider = _own.get(_provider(name))
    if provider is not None:
        await _attempt_own(provider, name, messages, model, stream)
    else:
        await _attempt_litellm(name, messages, model, stream, api_base)
    if stream.first_token_at is None:
        raise EmptyReplyError("the model returned an empty reply")


async def _attempt_own(
    provider: StreamingProvider,
    name: str,
    messages: list[dict[str, Any]],
    model: ModelConfig,
    stream: _Stream,
) -> None:
    """Stream from a provider of ours with the arguments litellm would pass it."""
    chunks = cast(
        AsyncGenerator[GenericStreamingChunk, None],
        cast(Any, provider).astreaming(  # litellm types it as a coroutine; it is a generator
            model=name.split("/", 1)[1],
            messages=messages,
            optional_params={"max_tokens": model.max_tokens, "temperature": model.temperature},
            timeout=model.timeout_s,
        ),
    )
    try:
        async for chunk in chunks:
            if text := chunk["text"]:
                await stream.token(text)
            if usage := chunk["usage"]:
                stream.usage = _Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
    finally:
        await chunks.aclose()


async def _attempt_litellm(
    name: str,
    messages: list[dict[str, Any]],
    model: ModelConfig,
    stream: _Stream,
    api_base: str | None = None,
) -> None:
    extra = {"api_base": api_base} if api_base else {}
    response = await litellm.acompletion(
        **extra,
        model=name,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=model.max_tokens,
        temperature=model.temperature,
        timeout=model.timeout_s,
        max_retries=0,  # retries are ours (counted, and never after a token was streamed)
        drop_params=True,  # e.g. stream_options or temperature where a provider lacks them
    )
    try:
        async for chunk in response:
            if chunk.choices and (text := chunk.choices[0].delta.content):
                await stream.token(text)
            if getattr(chunk, "usage", None):
                stream.usage = chunk.usage
                if not chunk.choices or chunk.choices[0].finish_reason:
                    # The reply is complete. Iterating on would only make litellm
                    # assemble and price it once more for its logging callbacks
                    # (Flywheel uses none): about half its CPU per call.
                    break
    finally:
        await response.aclose()


async def warm_up(model: ModelConfig) -> None:
    """Load a ``local/…`` model (main or fallback) ahead of the first reply; no-op otherwise.

    Loading takes a few seconds on the model's worker thread; the event loop
    stays free. Failures are logged, not raised: the first reply reports them.
    """
    for name in (model.name, model.fallback):
        if name and _provider(name) == "local":
            local.configure(context_tokens=model.context_tokens, stall_s=model.stall_s)
            try:
                await local.preload(name.split("/", 1)[1])
            except Exception:
                log.exception("could not preload %s", name)


async def stream_reply(
    messages: list[dict[str, Any]],
    *,
    model: ModelConfig,
    on_token: OnToken | None = None,
    api_base: str | None = None,
) -> Completion:
    """Stream one reply, calling ``on_token`` with each piece of text as it arrives.

    ``api_base`` is where ``model.name`` lives (an arm's own model, checked
    against ``model.allowed_api_bases`` by :func:`optimizer.models.resolve`);
    the fallback is called at its provider's default.

    Never raises for provider errors or timeouts (see the module docstring);
    exceptions raised by ``on_token`` itself propagate. After the call, show
    ``completion.text`` (the friendly message when nothing was streamed).

    >>> import asyncio
    >>> question = [{"role": "user", "content": "Hi?"}]
    >>> reply = asyncio.run(stream_reply(question, model=ModelConfig(name="fake/echo")))
    >>> reply.text, reply.error, reply.completion_tokens
    ('You asked: Hi?', None, 3)
    >>> failed = asyncio.run(stream_reply(question, model=ModelConfig(name="fake/error-400")))
    >>> failed.text == FRIENDLY_ERROR, failed.error
    (True, 'fake/error-400: BadRequestError 400: fake provider error 400')
    """
    register_providers()
    stream = _Stream(time.perf_counter(), on_token)
    errors: list[str] = []
    name = model.name
    candidates = [model.name] + (
        [model.fallback] if model.fallback and model.fallback != model.name else []
    )
    for name in candidates:
        base = api_base if name == model.name else None
        if await _try_model(name, messages, model, stream, errors, base):
            return _finish(stream, name, None, fallback=name != model.name)
        if stream.first_token_at is not None:
            break  # the user saw part of this reply: a fallback would start another one
    return _finish(stream, name, _summary(errors), fallback=name != model.name)


async def _try_model(
    name: str,
    messages: list[dict[str, Any]],
    model: ModelConfig,
    stream: _Stream,
    errors: list[str],
    api_base: str | None = None,
) -> bool:
    """Stream from ``name`` with retries; True on success, else errors appended."""
    if _provider(name) == "local":
        local.configure(context_tokens=model.context_tokens, stall_s=model.stall_s)
    for attempt in range(model.retries + 1):
        try:
            await asyncio.wait_for(
                _attempt(name, messages, model, stream, api_base), model.timeout_s
            )
            return True
        except _CallbackError as exc:
            raise exc.original from None
        except TimeoutError:
            errors.append(f"{name}: timeout after {model.timeout_s:g} s")
            retryable = False  # it used the whole budget; another try would too
        except Exception as raised:
            cause = _unwrap(raised)
            errors.append(_describe(name, cause))
            retryable = isinstance(cause, _RETRYABLE)
        log.warning("LLM %s failed (attempt %d): %s", name, attempt + 1, errors[-1])
        if stream.first_token_at is not None or not retryable or attempt == model.retries:
            return False
        await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
    return False


def _finish(stream: _Stream, name: str, error: str | None, *, fallback: bool = False) -> Completion:
    now = time.perf_counter()
    usage = stream.usage
    prompt_tokens = getattr(usage, "prompt_tokens", None)
    completion_tokens = getattr(usage, "completion_tokens", None)
    text = "".join(stream.parts)
    if error is not None:
        # Cut off mid-reply: the user must not take the fragment for a whole answer.
        text = f"{text}\n\n{FRIENDLY_ERROR}" if text else FRIENDLY_ERROR
    return Completion(
        text=text,
        model=name,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=_cost(name, prompt_tokens, completion_tokens) if error is None or usage else None,
        ttft_ms=None
        if stream.first_token_at is None
        else (stream.first_token_at - stream.started) * 1000,
        latency_ms=(now - stream.started) * 1000,
        error=error,
        fallback=fallback,
    )
