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

**Chat turns pre-empt the proposer.** A round starts only when the local model is
idle, but a rewrite takes a 270M model tens of seconds, and a chat turn arriving
meanwhile would wait behind it (the model runs one reply at a time). So every
proposer call on the local model watches the model's queue every
:data:`PREEMPT_POLL_S`: when a chat reply is waiting it abandons its own reply (the
worker stops between tokens, see :mod:`chatbot.llm.local`), waits until the model
is idle again, and starts over — at most :data:`MAX_PREEMPTIONS` times, then it
fails with a "busy" error and the round ends (the next one tries again). A chat
turn then waits at most for the token in progress (or for the prompt read the
worker has begun), not for the whole rewrite; ``tests/chatbot/test_preemption.py``
measures it on the real model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from chatbot.llm.messages import build_messages, prompt_budget
from chatbot.llm.streaming import stream_reply
from optimizer.config import Config, ModelConfig
from optimizer.prompt_library import Example, Variant
from optimizer.proposer import Completion, CompletionFn, ProposerHooks, ProposerTrace

__all__ = [
    "MAX_PREEMPTIONS",
    "PREEMPT_POLL_S",
    "completion_fn",
    "local_chat_waiting",
    "local_idle",
    "make_hooks",
]

log = logging.getLogger("chatbot.proposer")
T = TypeVar("T")

#: Seconds between two looks at the local model's queue while a proposer call runs.
PREEMPT_POLL_S = 0.05
#: Times one proposer call may give way to chat turns before it fails as "busy".
MAX_PREEMPTIONS = 5
#: Seconds a pre-empted call waits for the model to be idle before it fails as "busy".
IDLE_WAIT_S = 120.0


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from the optimizer's worker thread (it has no event loop)."""
    return asyncio.run(coro)


async def _preemptible(
    messages: list[dict[str, Any]], settings: ModelConfig, preempt: Callable[[], bool] | None
) -> Any:
    """``stream_reply``, abandoned as soon as ``preempt()`` says a chat turn waits (None)."""
    if preempt is None:
        return await stream_reply(messages, model=settings)
    task = asyncio.ensure_future(stream_reply(messages, model=settings))
    while True:
        done, _ = await asyncio.wait({task}, timeout=PREEMPT_POLL_S)
        if done:
            return task.result()
        if preempt():
            task.cancel()  # the local provider then cancels the reply in the worker
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


def _wait_until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(PREEMPT_POLL_S)
    return True


def completion_fn(
    base: ModelConfig,
    *,
    timeout_s: float | None = None,
    preempt: Callable[[], bool] | None = None,
    idle: Callable[[], bool] | None = None,
) -> CompletionFn:
    """A completion function on ``stream_reply`` with ``base``'s retries; ``timeout_s``
    (default ``base.timeout_s``) bounds each whole call.

    ``preempt`` (the local model: :func:`local_chat_waiting`) makes each call give way
    to chat turns: abandoned when it says true, retried once ``idle()`` (see the module
    docstring).
    """

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
        began = time.perf_counter()
        result = None
        for attempt in range(MAX_PREEMPTIONS + 1):
            result = _run(_preemptible(list(messages), settings, preempt))
            if result is not None:
                break
            log.info("proposer call to %s gave way to a chat turn (%d)", model, attempt + 1)
            if attempt == MAX_PREEMPTIONS or not _wait_until(idle or (lambda: True), IDLE_WAIT_S):
                break
        if result is None:
            return Completion(
                text="",
                latency_ms=(time.perf_counter() - began) * 1000,
                error=f"the model stayed busy with chat turns (gave way {MAX_PREEMPTIONS + 1} "
                "times or waited too long)",
            )
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


def local_chat_waiting() -> bool:
    """True, during a proposer call on the local model, when another reply waits behind it."""
    from chatbot.llm import local as local_model

    return local_model.model_process().in_flight > 1


def make_hooks(
    config: Config,
    *,
    knowledge: str = "",
    idle: Callable[[], bool] | None = None,
    trace: ProposerTrace | None = None,
) -> ProposerHooks:
    """Hooks for ``config``: the proposer model (``proposer.model`` or the chat model).

    ``trace``: where rounds are traced (the runtime passes its Langfuse tracer's).
    """
    proposer_local = (config.proposer.model or config.model.name).startswith("local/")
    chat_local = config.model.name.startswith("local/")
    if idle is None:
        idle = local_idle if proposer_local or chat_local else (lambda: True)
    # Only a call on the local model holds the local queue, so only such a call gives way.
    complete = completion_fn(
        config.model,
        timeout_s=config.proposer.timeout_s,
        preempt=local_chat_waiting if proposer_local else None,
        idle=idle,
    )
    chat = completion_fn(
        config.model, preempt=local_chat_waiting if chat_local else None, idle=idle
    )

    def reply(system_prompt: str, question: str, examples: Sequence[Example] = ()) -> Completion:
        variant = Variant("candidate", "", system_prompt, "", "")
        messages, _ = build_messages(
            variant, knowledge, examples, [], question, budget_tokens=prompt_budget(config.model)
        )
        return chat(
            messages,
            model=config.model.name,
            max_tokens=config.model.max_tokens,
            temperature=config.model.temperature,
        )

    return ProposerHooks(complete=complete, idle=idle, reply=reply, trace=trace)
