"""Helpers for the optimizer tests: configs and bulk events written into a real store.

Bulk inserts go straight into the store's tables (one transaction per call) so
that tests with thousands of sessions stay fast on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from optimizer.config import (
    ArmConfig,
    Config,
    ExperimentConfig,
    GuardrailConfig,
    KPIConfig,
    KPITermConfig,
    load_config,
)
from optimizer.store import ArmSpec, Store, schema
from optimizer.store.store import refresh_session_counts

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
EXPERIMENT = "exp"
_ids = itertools.count()


def make_config(
    arms: Sequence[str] = ("a", "b"),
    *,
    champion: str | None = "a",
    terms: Sequence[KPITermConfig] | None = None,
    guardrails: Sequence[GuardrailConfig] = (),
    segment_by: Sequence[str] = (),
    **policy: Any,
) -> Config:
    """A config for experiment ``exp``; the KPI defaults to conversion within 7 days."""
    base = load_config("/nonexistent.toml", environ=False)
    if terms is None:
        terms = (
            KPITermConfig(
                name="conversion", source="outcome:conversion", weight=1.0, window_days=7
            ),
        )
    return base.model_copy(
        update={
            "experiment": ExperimentConfig(
                id=EXPERIMENT,
                salt=EXPERIMENT,
                champion=champion,
                segment_by=tuple(segment_by),
                arms=tuple(ArmConfig(id=a, prompt=a) for a in arms),
            ),
            "kpi": KPIConfig(terms=tuple(terms), guardrails=tuple(guardrails)),
            "policy": base.policy.model_copy(update=policy),
        }
    )


def register(store: Store, config: Config, *, at: datetime = T0) -> None:
    arms = [ArmSpec(a.id, a.prompt, "hash") for a in config.experiment.arms]
    store.sync_experiment(config.experiment.id, config.experiment.salt, arms, at=at)


def add_sessions(
    store: Store,
    arm: str,
    n: int,
    *,
    at: datetime = T0,
    spread: timedelta = timedelta(0),
    conversions: int = 0,
    conversion_delay: timedelta = timedelta(hours=1),
    turns: int = 0,
    downs: int = 0,
    ups: int = 0,
    errors: int = 0,
    latency_ms: float | Sequence[float] = 500.0,
    segment: str = "*",
    version: int | None = None,
    propensity: float = 0.5,
    users: Sequence[str] | None = None,
) -> list[str]:
    """``n`` sessions of ``arm``; the first ``conversions`` convert, with ``turns`` turns each.

    ``ups``/``downs`` votes and ``errors`` are spread over the first turns of the
    first sessions. Returns the session ids.
    """
    batch = next(_ids)
    sids = [f"{arm}-{batch}-{i}" for i in range(n)]
    uids = list(users) if users is not None else [f"user-{arm}-{batch}-{i}" for i in range(n)]
    step = spread / n if n else timedelta(0)
    times = [at + i * step for i in range(n)]
    assignments = [
        dict(
            session_id=sid,
            user_id=uid,
            experiment_id=EXPERIMENT,
            arm_id=arm,
            propensity=propensity,
            snapshot_version=version,
            segment=segment,
            context={},
            simulated=False,
            assigned_at=t,
        )
        for sid, uid, t in zip(sids, uids, times, strict=True)
    ]
    outcomes = [
        dict(
            idempotency_key=f"conv-{sid}",
            session_id=sid,
            user_id=None,
            name="conversion",
            value=1.0,
            occurred_at=t + conversion_delay,
            received_at=t + conversion_delay,
            source="api",
            extra={},
        )
        for sid, t in list(zip(sids, times, strict=True))[:conversions]
    ]
    turn_rows, votes = [], []
    latencies = (
        [latency_ms] * (n * turns) if isinstance(latency_ms, int | float) else list(latency_ms)
    )
    k = 0
    for sid, uid, t in zip(sids, uids, times, strict=True):
        for j in range(turns):
            tid = f"{sid}-t{j}"
            turn_rows.append(
                dict(
                    id=tid,
                    session_id=sid,
                    user_id=uid,
                    experiment_id=EXPERIMENT,
                    arm_id=arm,
                    prompt_id=arm,
                    prompt_hash="hash",
                    fewshot_ids=[],
                    model="fake",
                    user_message="q",
                    reply="a",
                    latency_ms=latencies[k % len(latencies)],
                    error="boom" if k < errors else None,
                    created_at=t + timedelta(seconds=j),
                )
            )
            if k < ups + downs:
                votes.append(
                    dict(
                        turn_id=tid,
                        user_id=uid,
                        session_id=sid,
                        value=1 if k < ups else 0,
                        comment=None,
                        created_at=t + timedelta(seconds=j + 1),
                        updated_at=t + timedelta(seconds=j + 1),
                    )
                )
            k += 1
    with store.engine.begin() as conn:
        conn.execute(schema.assignments.insert(), assignments)
        if outcomes:
            conn.execute(schema.outcomes.insert(), outcomes)
        if turn_rows:
            conn.execute(schema.turns.insert(), turn_rows)
        if votes:
            conn.execute(schema.feedback.insert(), votes)
        refresh_session_counts(conn, sids)
    return sids
