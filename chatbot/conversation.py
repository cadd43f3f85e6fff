"""One chat session's turn logic, shared by the Chainlit app and ``flywheel chat``.

A :class:`Conversation` is bound to a session (the Chainlit thread id) and
its user. It is assigned an arm once (sticky, with the propensity recorded),
when the first message is sent — the app opens it in ``on_message``, not at
page load, so a visit without a question is not a session and never enters the
KPI — then each :meth:`Conversation.reply`:

0. moves the conversation to the champion if its arm was paused or retired
   since (:meth:`optimizer.assignment.Assigner.ensure_serving`: the old
   assignment is closed with the reason, a new one continues the thread);
1. refuses a message over ``limits.max_message_chars`` with a clear message
   (nothing sent to the model, nothing recorded);
2. selects the arm's few-shot examples and builds the prompt within budget;
3. streams the reply through :func:`chatbot.llm.streaming.stream_reply` (which never
   raises for provider trouble: a failed reply carries the friendly text and
   an error);
4. records the turn (prompt id and hash, few-shot ids kept, model, latency,
   time to first token, tokens, cost, error), then traces it and stores the
   trace id.

Call-to-action clicks (:meth:`Conversation.click`) and "my issue is solved"
(:meth:`Conversation.resolve`) record outcomes keyed by session and action, so
a double click counts once. Store calls run in worker threads: the event loop
never waits on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from chatbot.llm.messages import build_messages, prompt_budget
from chatbot.llm.streaming import Completion, stream_reply
from chatbot.runtime import Runtime, best_effort, storable_text
from optimizer.clock import utcnow
from optimizer.config import ActionConfig, ModelConfig
from optimizer.prompt_library import Example, Variant
from optimizer.store import AssignmentRecord, OutcomeRecord, TurnRecord, schema

log = logging.getLogger(__name__)

__all__ = ["TOKEN_BATCH_S", "ActionResult", "Conversation", "Reply", "TokenBatcher"]

OnToken = Callable[[str], Awaitable[None]]

#: Streamed text arriving within this many seconds of the last send goes out together.
TOKEN_BATCH_S = 0.02


class TokenBatcher:
    """Hands streamed text to ``send`` in fewer, larger pieces: one socket emit per batch.

    The first piece goes out at once (the time to first token is unchanged).
    A piece arriving less than ``interval_s`` after the last send waits, at most
    ``interval_s``, and goes out with those arriving meanwhile. Sends never
    overlap, so the text arrives in order. Call :meth:`close` when the stream
    has ended: it sends what is left (and raises what a send raised).

    >>> import asyncio
    >>> sent = []
    >>> async def send(text): sent.append(text)
    >>> async def stream():
    ...     batcher = TokenBatcher(send, interval_s=60)
    ...     for token in ["You", " asked", ":", " hi"]:
    ...         await batcher(token)
    ...     await batcher.close()
    >>> asyncio.run(stream())
    >>> sent
    ['You', ' asked: hi']
    """

    def __init__(self, send: OnToken, *, interval_s: float = TOKEN_BATCH_S) -> None:
        if not (interval_s >= 0 and math.isfinite(interval_s)):
            raise ValueError(f"interval_s must be a finite number ≥ 0, got {interval_s!r}")
        self.send = send
        self.interval_s = interval_s
        self._pending: list[str] = []
        self._sent_at = -math.inf
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    async def __call__(self, text: str) -> None:
        if self._timer is not None and self._timer.done():
            timer, self._timer = self._timer, None
            timer.result()  # a failed timed send fails the stream here
        self._pending.append(text)
        wait = self._sent_at + self.interval_s - time.perf_counter()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_after(wait))

    async def _flush_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        await self.flush()

    async def flush(self) -> None:
        """Send what is pending now, as one piece."""
        async with self._lock:
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            self._sent_at = time.perf_counter()
            await self.send(text)

    async def close(self) -> None:
        """Send the rest; a failed timed send is raised here."""
        timer, self._timer = self._timer, None
        if timer is not None:
            if not timer.done():
                timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        await self.flush()


@dataclass(frozen=True)
class Reply:
    """What the user is shown for one message.

    ``turn`` is the recorded turn, or None when the message was refused
    (``refused`` then says why, and ``text`` is that explanation).
    """

    text: str
    turn: TurnRecord | None = None
    completion: Completion | None = None
    refused: str | None = None

    @property
    def failed(self) -> bool:
        return self.turn is not None and self.turn.error is not None


@dataclass(frozen=True)
class ActionResult:
    """What a click recorded (``stored`` False: counted before) and what to tell the user."""

    stored: bool
    message: str
    outcomes: tuple[OutcomeRecord, ...] = ()


@dataclass
class Conversation:
    """A session's assignment and history. Create with :meth:`start`."""

    runtime: Runtime
    assignment: AssignmentRecord
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def session_id(self) -> str:
        return self.assignment.session_id

    @property
    def user_id(self) -> str:
        return self.assignment.user_id

    @property
    def thread_id(self) -> str:
        """The Chainlit thread: the first assignment's session id, whatever came after."""
        return self.assignment.thread

    @classmethod
    async def start(
        cls,
        runtime: Runtime,
        session_id: str,
        user_id: str,
        context: Mapping[str, Any] | None = None,
    ) -> Conversation:
        """Assign the session (or find its assignment) and load its earlier turns.

        Resuming a session therefore keeps its arm (its current one, after a move
        away from a paused arm) and its history.
        """

        def current_or_new() -> AssignmentRecord:
            current = runtime.store.current_assignment(session_id)
            if current is not None:
                return current
            return runtime.assigner.assign(session_id, user_id, dict(context or {}))

        assignment = await asyncio.to_thread(current_or_new)
        if assignment.user_id != user_id:
            # Session ids are unguessable UUIDs; a mismatch is a bug, not a user error.
            raise ValueError(f"session {session_id!r} belongs to another user, not {user_id!r}")
        history = await asyncio.to_thread(_history, runtime, session_id)
        return cls(runtime, assignment, history)

    # -- turns ----------------------------------------------------------------------
    async def reply(self, turn_id: str, text: str, *, on_token: OnToken | None = None) -> Reply:
        """Answer ``text`` as turn ``turn_id``, streaming tokens to ``on_token``."""
        rt = self.runtime
        limit = rt.config.limits.max_message_chars
        text = storable_text(text).strip()
        if not text:
            return Reply("Please type a question.", refused="empty message")
        if len(text) > limit:
            reason = f"message is {len(text):,} characters; the limit is {limit:,}"
            return Reply(f"Your {reason}. Please shorten it and send it again.", refused=reason)

        began = time.perf_counter()
        self.assignment = await asyncio.to_thread(rt.assigner.ensure_serving, self.assignment)
        variant, examples, model, api_base = await asyncio.to_thread(
            _prepare, rt, self.assignment.arm_id, text
        )
        selected = time.perf_counter()
        messages, kept = build_messages(
            variant,
            rt.prompts.knowledge,
            examples,
            self.history,
            text,
            budget_tokens=prompt_budget(model),
        )
        completion = await stream_reply(messages, model=model, on_token=on_token, api_base=api_base)
        turn = TurnRecord(
            id=turn_id,
            session_id=self.session_id,
            user_id=self.user_id,
            experiment_id=self.assignment.experiment_id,
            arm_id=self.assignment.arm_id,
            prompt_id=variant.id,
            prompt_hash=variant.hash,
            model=completion.model,
            user_message=text,
            reply=completion.text,
            fewshot_ids=tuple(kept),
            latency_ms=completion.latency_ms,
            ttft_ms=completion.ttft_ms,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cost=completion.cost,
            error=completion.error,
            fallback=completion.fallback,  # still the arm's turn: ``model`` says who answered
        )
        streamed = time.perf_counter()
        if not await rt.record_turn(turn):  # committed before the reply is acknowledged
            log.warning("turn %s was already recorded; keeping the first", turn_id)
        recorded = time.perf_counter()
        if completion.error is None:
            # Failed replies stay out of the history: the model should not imitate an apology.
            self.history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": completion.text},
            ]
        trace_id = best_effort(rt.tracer.trace_turn, turn, self.assignment, messages)
        if trace_id:
            await asyncio.to_thread(rt.store.set_turn_trace_id, turn_id, trace_id)
        if log.isEnabledFor(logging.DEBUG):  # where a turn's time goes (bench/load.py)
            log.debug(
                "turn %s: few-shot %.1f ms, prompt+model %.1f ms (model %.1f), "
                "record %.1f ms, trace %.1f ms",
                turn_id,
                (selected - began) * 1000,
                (streamed - selected) * 1000,
                completion.latency_ms,
                (recorded - streamed) * 1000,
                (time.perf_counter() - recorded) * 1000,
            )
        return Reply(completion.text, turn, completion)

    async def vote(self, turn_id: str, value: int | None, comment: str | None = None) -> None:
        """The session user's thumbs (1 up, 0 down, None removes the vote) on one of their turns."""
        await self.runtime.record_vote(turn_id, self.user_id, value, comment)

    # -- outcomes ---------------------------------------------------------------------
    async def click(self, action: ActionConfig, *, turn_id: str | None = None) -> ActionResult:
        """Record a call-to-action click as its configured outcome, once per session."""
        outcome = self._outcome(action.name, action.outcome, action.value, turn_id=turn_id)
        stored = await self.runtime.record_outcome(outcome)
        message = (
            f"Done: “{action.label}” is recorded."
            if stored
            else f"“{action.label}” was already recorded for this conversation."
        )
        return ActionResult(stored, message, (outcome,))

    async def resolve(
        self, *, turn_id: str | None = None, now: datetime | None = None
    ) -> ActionResult:
        """Record ``resolved`` = 1 and ``support_minutes`` since the session began (once)."""
        seconds = max(((now or utcnow()) - self.assignment.assigned_at).total_seconds(), 0.0)
        extra = {"seconds": round(seconds, 3)}
        outcomes = (
            self._outcome("resolved", "resolved", 1.0, turn_id=turn_id, extra=extra),
            self._outcome(
                "resolved", "support_minutes", seconds / 60, turn_id=turn_id, extra=extra
            ),
        )
        stored = [await self.runtime.record_outcome(o) for o in outcomes]
        if any(stored):
            minutes = seconds / 60
            return ActionResult(
                True, f"Glad it's solved! (Support time recorded: {minutes:.1f} min.)", outcomes
            )
        return ActionResult(False, "This conversation is already marked as solved.", outcomes)

    def _outcome(
        self,
        action: str,
        name: str,
        value: float,
        *,
        turn_id: str | None,
        extra: Mapping[str, Any] | None = None,
    ) -> OutcomeRecord:
        return OutcomeRecord(
            # Per conversation and outcome: a double click, a second tab or a retry count once.
            idempotency_key=f"chat:{self.thread_id}:{action}:{name}",
            name=name,
            value=value,
            session_id=self.session_id,
            user_id=self.user_id,
            source="chat",
            extra={"action": action, "turn_id": turn_id, **(extra or {})},
        )


def _history(runtime: Runtime, session_id: str) -> list[dict[str, str]]:
    """The thread's successful turns as chat messages, oldest first (across reassignments)."""
    t, a = schema.turns, schema.assignments
    sessions = sa.select(a.c.session_id).where(
        sa.or_(a.c.session_id == session_id, a.c.thread_id == session_id)
    )
    with runtime.store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.user_message, t.c.reply)
            .where(t.c.session_id.in_(sessions), t.c.error.is_(None))
            .order_by(t.c.created_at, t.c.id)
        ).all()
    history: list[dict[str, str]] = []
    for row in rows:
        history += [
            {"role": "user", "content": row.user_message},
            {"role": "assistant", "content": row.reply},
        ]
    return history


def _prepare(
    rt: Runtime, arm_id: str, text: str
) -> tuple[Variant, list[Example], ModelConfig, str | None]:
    """The served arm's prompt, few-shot examples for ``text`` and model (one thread hop)."""
    arm, variant = rt.serve(arm_id)
    model, api_base = rt.serve_model(arm_id)
    return variant, rt.selector.select(arm, text), model, api_base
