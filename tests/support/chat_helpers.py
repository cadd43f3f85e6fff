"""Helpers for the chat-side tests: a runtime on a test store with the fake LLM provider.

The fake provider (``fake/…``, chatbot.llm.fake) sits where a real provider
would, behind litellm; :class:`RecordingTracer` sits where Langfuse would,
behind the :class:`~chatbot.langfuse.tracer.Tracer` interface, and records what the
chat path asked it to mirror.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from chatbot.langfuse.tracer import Tracer
from chatbot.runtime import Runtime
from optimizer.config import (
    ArmConfig,
    Config,
    ExperimentConfig,
    LimitsConfig,
    ModelConfig,
    PolicyConfig,
)
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord

ROOT = Path(__file__).resolve().parents[2]

CONCISE = ArmConfig(id="concise", prompt="concise")
CONCISE_FIXED = ArmConfig(
    id="concise+fixed", prompt="concise", fewshot="fixed", examples=("trial", "export")
)


class RecordingTracer(Tracer):
    """A Langfuse stand-in that records calls and returns a trace id per turn."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def trace_turn(
        self,
        turn: TurnRecord,
        assignment: AssignmentRecord,
        messages: Sequence[Mapping[str, Any]],
    ) -> str | None:
        self.calls.append(("trace_turn", turn.id))
        return f"trace-{turn.id}"

    def score_feedback(
        self, turn_id: str, user_id: str, value: int | None, comment: str | None
    ) -> None:
        self.calls.append(("score_feedback", (turn_id, user_id, value, comment)))

    def score_outcome(self, outcome: OutcomeRecord) -> None:
        self.calls.append(("score_outcome", outcome.idempotency_key))


def chat_config(
    database_url: str,
    *,
    model: str = "fake/echo",
    arms: Sequence[ArmConfig] = (CONCISE,),
    champion: str | None = "concise",
    **limits: Any,
) -> Config:
    """A small configuration: the repo's prompts, the fake model, the optimizer off."""
    return Config(
        database_url=database_url,
        prompts_dir=str(ROOT / "prompts"),
        model=ModelConfig(name=model, retries=0, timeout_s=10),
        # no holdback: these tests pin which arm the next users get (test_holdback.py)
        experiment=ExperimentConfig(
            id="exp", salt="salt", champion=champion, arms=tuple(arms), holdback=0.0
        ),
        policy=PolicyConfig(refit_interval_s=0),
        limits=LimitsConfig(**limits),
        source="test",
    )


def make_runtime(store: Store, *, tracer: Tracer | None = None, **config: Any) -> Runtime:
    """A runtime over an already migrated test store."""
    return Runtime.build(
        chat_config(store.url, **config),
        store=store,
        tracer=tracer if tracer is not None else RecordingTracer(),
        migrate=False,
    )


def commit_counter(engine: sa.Engine) -> list[int]:
    """A counter of committed transactions (SQLAlchemy's own event, at the boundary)."""
    count = [0]

    @sa.event.listens_for(engine, "commit")
    def on_commit(_conn: Any) -> None:
        count[0] += 1

    return count
