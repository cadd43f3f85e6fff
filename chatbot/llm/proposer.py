"""The serving process's side of the proposer: the completion function it hands in.

The optimizer never imports the chat code; :func:`make_hooks` gives it a
:class:`~optimizer.proposer.ProposerHooks` whose ``complete`` goes through
:func:`chatbot.llm.stream_reply` (litellm, retries, our ``local/…`` provider),
whose ``reply`` answers a replay question exactly as the chat would (the
candidate's text, then the knowledge, fitted to the budget), and whose ``idle``
is false while the local model has a chat reply running or waiting, so that
proposals and replays never queue ahead of users. A paid model is always "idle"
(there is no local queue to protect); its spending is capped by the proposer.
The proposer's own LLM calls are logged (``chatbot.proposer``), one line each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from chatbot.llm.messages import build_messages, prompt_budget
from chatbot.llm.streaming import stream_reply
from optimizer.config import Config, ModelConfig
from optimizer.prompt_library import Variant
from optimizer.proposer import Completion, CompletionFn, ProposerHooks

__all__ = ["completion_fn", "local_idle", "make_hooks"]

log = logging.getLogger("chatbot.proposer")
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from the optimizer's worker thread (it has no event loop)."""
    return asyncio.run(coro)


def completion_fn(base: ModelConfig, *, timeout_s: float | None = None) -> CompletionFn:
    """A completion function on ``stream_reply`` with ``base``'s retries; ``timeout_s``
    (default ``base.timeout_s``) bounds each whole call."""

    def complete(
        messages: Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int,
        temperature: float,
    ) -> Completion:
        settings = base.model_copy(
            update={
                "name": model,
                "fallback": None,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "timeout_s": timeout_s or base.timeout_s,
                # a long rewrite request takes a small local model a while to read
                "stall_s": max(base.stall_s, min(timeout_s or base.timeout_s, 120.0)),
            }
        )
        result = _run(stream_reply(list(messages), model=settings))
        log.info(
            "proposer call to %s: %.0f ms, cost %s, error %s",
            model,
            result.latency_ms,
            result.cost,
            result.error,
        )
        return Completion(
            text="" if result.error else result.text,
            latency_ms=float(result.latency_ms),
            cost_usd=float(result.cost or 0.0),
            error=result.error,
        )

    return complete


def local_idle() -> bool:
    """True when the local model process has no reply running or waiting."""
    from chatbot.llm import local as local_model

    return local_model.model_process().in_flight == 0


def make_hooks(
    config: Config,
    *,
    knowledge: str = "",
    idle: Callable[[], bool] | None = None,
) -> ProposerHooks:
    """Hooks for ``config``: the proposer model (``proposer.model`` or the chat model)."""
    complete = completion_fn(config.model, timeout_s=config.proposer.timeout_s)
    chat = completion_fn(config.model)
    uses_local = (config.proposer.model or config.model.name).startswith("local/") or (
        config.model.name.startswith("local/")
    )
    if idle is None:
        idle = local_idle if uses_local else (lambda: True)

    def reply(system_prompt: str, question: str) -> Completion:
        variant = Variant("candidate", "", system_prompt, "", "")
        messages, _ = build_messages(
            variant, knowledge, [], [], question, budget_tokens=prompt_budget(config.model)
        )
        return chat(
            messages,
            model=config.model.name,
            max_tokens=config.model.max_tokens,
            temperature=config.model.temperature,
        )

    return ProposerHooks(complete=complete, idle=idle, reply=reply)
