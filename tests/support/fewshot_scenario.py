"""Helpers for the few-shot and export tests: write realistic sessions into a real store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from optimizer.config import ArmConfig, Config, ExperimentConfig, load_config
from optimizer.prompt_library import PromptLibrary, load_prompts
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
#: Every KPI window (the longest is 30 days) has closed by then.
LATER = START + timedelta(days=40)

ARMS = (
    ArmConfig(id="concise", prompt="concise"),
    ArmConfig(id="concise+retrieved", prompt="concise", fewshot="retrieved", k=2),
)


def make_config(**fewshot: object) -> Config:
    base = load_config("/nonexistent.toml", environ=False)
    return base.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "experiment": ExperimentConfig(id="exp", salt="exp", champion="concise", arms=ARMS),
            "fewshot": base.fewshot.model_copy(update=fewshot),
        }
    )


def library() -> PromptLibrary:
    return load_prompts(ROOT / "prompts")


def add_session(
    store: Store,
    session_id: str,
    turns: Sequence[tuple[str, str]],
    *,
    arm_id: str = "concise",
    user_id: str | None = None,
    at: datetime = START,
    votes: Mapping[int, int] | None = None,
    outcomes: Mapping[str, float] | None = None,
    fewshot_ids: Sequence[str] = (),
    error_turns: Sequence[int] = (),
) -> list[str]:
    """One assigned session with its turns, the user's votes (turn index → 1/0) and outcomes."""
    user_id = user_id or f"user-{session_id}"
    store.record_assignment(
        AssignmentRecord(session_id, user_id, "exp", arm_id, 0.5, None, "*", {}, at)
    )
    ids = []
    for i, (question, reply) in enumerate(turns):
        turn_id = f"{session_id}-t{i}"
        store.record_turn(
            TurnRecord(
                id=turn_id,
                session_id=session_id,
                user_id=user_id,
                experiment_id="exp",
                arm_id=arm_id,
                prompt_id="concise",
                prompt_hash="h",
                model="fake/echo",
                user_message=question,
                reply=reply,
                fewshot_ids=tuple(fewshot_ids),
                latency_ms=120.0 + i,
                error="timeout" if i in error_turns else None,
                created_at=at + timedelta(minutes=i + 1),
            )
        )
        ids.append(turn_id)
    for index, value in (votes or {}).items():
        store.record_feedback(ids[index], user_id, value, at=at + timedelta(minutes=5))
    for name, value in (outcomes or {}).items():
        store.record_outcome(
            OutcomeRecord(
                f"{session_id}-{name}",
                name,
                value,
                session_id=session_id,
                occurred_at=at + timedelta(minutes=10),
                source="chat",
            ),
            received_at=at + timedelta(minutes=10),
        )
    return ids
