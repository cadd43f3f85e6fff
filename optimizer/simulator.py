"""Simulate an experiment in simulated time, driving the real assignment, store and optimizer.

The simulator is not a re-implementation of the product: sessions are assigned
by :class:`~optimizer.assignment.Assigner` (sticky users, logged propensity),
every turn, vote and outcome is written to a real :class:`~optimizer.store.Store`
with its simulated timestamp, and :func:`optimizer.refit.run_optimizer` re-fits
at every refit time. What the scenario adds is the truth: for the arm a session
got, it draws turns, errors, latency, votes, support minutes, conversions and
revenue from the arm's true rates (:mod:`optimizer.scenario`).

Time is causal. Before each refit at sim time ``now`` only the events that have
happened by ``now`` are written; a conversion three days after its session
arrives three days later, exactly as it would from a CRM. Regret is measured
against the true expected KPI of each assigned arm, so it does not depend on the
luck of the draws, only on the choices.

Writes go through ``Store.record_*`` one by one when ``bulk=False`` (a few
hundred sessions a second). The default ``bulk=True`` writes the same rows with
one ``executemany`` per table before each refit and batches the assignment rows
:class:`Assigner` records (thousands of sessions a second); a test checks that
both paths give the same result. On long runs the optimizer's refits, which
read the whole history each time as in production, dominate the run time.

>>> from optimizer.scenario import parse_scenario
>>> sc = parse_scenario({"name": "tiny", "sessions": 200, "sessions_per_day": 100,
...     "refit_every_hours": 24, "arms": [{"id": "a", "conversion": 0.02},
...                                       {"id": "b", "conversion": 0.05}]})
>>> simulate(sc, policy="oracle", seed=1).regret
0.0
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa

from optimizer.assignment import ALL_SEGMENTS, Assigner
from optimizer.config import ArmConfig, Config, ExperimentConfig, ProposerConfig
from optimizer.errors import ConfigError
from optimizer.scenario import CONVERSION_OFFSET_S, SUPPORT_OFFSET_S, Scenario
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store, TurnRecord, schema
from optimizer.store.store import assignment_row, refresh_session_counts

__all__ = ["POLICIES", "SimulationResult", "scenario_config", "simulate"]

log = logging.getLogger(__name__)

POLICIES = ("thompson", "uniform", "oracle")
Policy = Literal["thompson", "uniform", "oracle"]

#: Prompt hash of every simulated arm (there is no prompt file behind it).
SIM_PROMPT_HASH = "sim"
_TURN_GAP_S = 60.0  # a turn a minute
_VOTE_LAG_S = 20.0  # a vote shortly after the reply
_DAY_S = 86400.0


@dataclass(frozen=True)
class SimulationResult:
    """What a run did; :meth:`to_dict` is the ``--json`` object."""

    policy: str
    scenario: str
    seed: int
    sessions: int
    days: float
    refits: int
    expected_kpi_total: float
    oracle_kpi_total: float
    regret: float
    sessions_per_arm: dict[str, int]
    sessions_per_segment_arm: dict[str, dict[str, int]]
    expected_kpi_per_arm: dict[str, dict[str, float]]
    oracle_arms: dict[str, str]
    final_allocation: dict[str, dict[str, float]]
    arm_statuses: dict[str, str]
    paused_arms: list[str]
    winner: str | None
    snapshot_version: int | None
    events_written: dict[str, int]
    elapsed_s: float
    sessions_per_s: float
    timings_s: dict[str, float] = field(default_factory=dict)
    database_url: str | None = None
    #: Per arm that arrives mid-run: what happened around its arrival (see :func:`_arrivals`).
    arrivals: list[dict[str, Any]] = field(default_factory=list)
    #: Per arm: simulated spend in USD (``cost_per_turn`` × turns) and USD per session.
    cost_per_arm: dict[str, dict[str, float]] = field(default_factory=dict)
    #: With a ``[proposer]`` table: the closed loop's figures (see :func:`_closed_loop`).
    closed_loop: dict[str, Any] = field(default_factory=dict)

    @property
    def regret_per_session(self) -> float:
        """Regret per session, in KPI units."""
        return self.regret / self.sessions if self.sessions else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scenario_config(scenario: Scenario, policy: Policy, *, experiment_id: str) -> Config:
    """The Config a simulated run uses: the scenario's arms, KPI and policy settings.

    Each arm is its own prompt (prompt id = arm id, hash ``"sim"``). The oracle
    is served from a fixed snapshot, so its policy kind is irrelevant.
    """
    kind = "uniform" if policy == "uniform" else "thompson"
    proposer = ProposerConfig()
    if scenario.proposer is not None:
        spec = scenario.proposer
        proposer = ProposerConfig(
            auto_start=spec.auto_start,
            max_live=spec.max_live,
            min_new_negative=spec.min_new_negative,
            min_interval_hours=spec.every_days * 24,
            candidates=spec.candidates,
            replay_questions=spec.replay_questions,
            trial_cap=spec.trial_cap,
            trial_sessions=spec.trial_sessions,
            keep_probability=spec.keep_probability,
        )
    experiment = ExperimentConfig(
        id=experiment_id,
        salt=experiment_id,
        champion=scenario.champion_id,
        segment_by=(scenario.segment_by,) if scenario.segment_by else (),
        holdback=scenario.holdback,
        arms=tuple(ArmConfig.model_validate({"id": a.id, "prompt": a.id}) for a in scenario.arms),
    )
    return Config(
        experiment=experiment,
        kpi=scenario.kpi,
        policy=scenario.policy.model_copy(update={"kind": kind}),
        proposer=proposer,
        source=scenario.source,
    )


# -- the random draws that do not depend on the arm ---------------------------------------------
@dataclass
class _Draws:
    """Arm-independent uniforms, drawn once per run: the same seed gives every policy the
    same users, times and luck (common random numbers), so policies differ only by choice."""

    t: np.ndarray  # session start, seconds since scenario start
    user: np.ndarray  # user index
    segment: np.ndarray  # segment index
    u_conv: np.ndarray
    u_delay: np.ndarray
    u_revenue: np.ndarray
    u_support: np.ndarray
    turn_start: np.ndarray  # index of a session's first turn in the turn arrays
    n_turns: np.ndarray
    u_rate: np.ndarray  # per turn
    u_vote: np.ndarray
    u_error: np.ndarray
    z_latency: np.ndarray


def _draw(scenario: Scenario, rng: np.random.Generator) -> _Draws:
    n = scenario.sessions
    gap = _DAY_S / scenario.sessions_per_day
    t = (np.arange(n) + rng.random(n)) * gap
    new_segment = rng.choice(len(scenario.segment_shares), size=n, p=scenario.segment_shares)
    returning = rng.random(n) < scenario.returning_share
    pick = rng.random(n)
    user = np.arange(n)
    segment = new_segment.copy()
    for i in np.flatnonzero(returning):
        if i == 0:
            continue
        j = int(pick[i] * i)  # an earlier session's user comes back, in the same segment
        user[i], segment[i] = user[j], segment[j]
    n_turns = 1 + rng.poisson(scenario.turns_mean - 1, size=n)
    total_turns = int(n_turns.sum())
    turn_start = np.concatenate(([0], np.cumsum(n_turns)[:-1]))
    return _Draws(
        t=t,
        user=user,
        segment=segment,
        u_conv=rng.random(n),
        u_delay=rng.random(n),
        u_revenue=rng.random(n),
        u_support=rng.random(n),
        turn_start=turn_start,
        n_turns=n_turns,
        u_rate=rng.random(total_turns),
        u_vote=rng.random(total_turns),
        u_error=rng.random(total_turns),
        z_latency=rng.standard_normal(total_turns),
    )


# -- truth as arrays indexed [segment, arm] ---------------------------------------------------
@dataclass(frozen=True)
class _TruthArrays:
    conversion: np.ndarray
    rate: np.ndarray
    thumbs_up: np.ndarray
    support_minutes: np.ndarray
    revenue: np.ndarray
    error_rate: np.ndarray
    log_latency: np.ndarray
    latency_sigma: np.ndarray
    cost_per_turn: np.ndarray

    @classmethod
    def of(cls, scenario: Scenario) -> _TruthArrays:
        truths = scenario.truths()
        arms = scenario.arm_ids

        def grid(attr: str) -> np.ndarray:
            return np.array([[getattr(t[a], attr) for a in arms] for t in truths], dtype=float)

        return cls(
            conversion=grid("conversion"),
            rate=grid("rate"),
            thumbs_up=grid("thumbs_up"),
            support_minutes=grid("support_minutes"),
            revenue=grid("revenue"),
            error_rate=grid("error_rate"),
            log_latency=np.log(grid("latency_ms")),
            latency_sigma=grid("latency_sigma"),
            cost_per_turn=grid("cost_per_turn"),
        )


# -- writing events -------------------------------------------------------------------------
class _BatchingStore(Store):
    """The run's store with assignment rows batched until the next flush.

    :class:`Assigner` runs unchanged on top of it (its reads of snapshots and arm
    statuses go to the database); only ``record_assignment`` and the two lookups
    it does per session are served from memory, which is exact because the run
    starts with an experiment that has no assignments and is the only writer.
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.url, engine=inner.engine)
        self._by_session: dict[str, AssignmentRecord] = {}
        self._last_by_user: dict[tuple[str, str], AssignmentRecord] = {}
        self._pending: list[dict[str, Any]] = []

    def record_assignment(self, rec: AssignmentRecord) -> AssignmentRecord:
        existing = self._by_session.get(rec.session_id)
        if existing is not None:
            return existing
        self._by_session[rec.session_id] = rec
        self._last_by_user[(rec.user_id, rec.experiment_id)] = rec
        self._pending.append(assignment_row(rec))
        return rec

    def get_assignment(self, session_id: str) -> AssignmentRecord | None:
        return self._by_session.get(session_id)

    def last_assignment_for_user(self, user_id: str, experiment_id: str) -> AssignmentRecord | None:
        return self._last_by_user.get((user_id, experiment_id))

    def take_pending(self) -> list[dict[str, Any]]:
        rows, self._pending = self._pending, []
        return rows


@dataclass
class _Pending:
    """Events drawn but not yet happened (by sim time), per kind: (time_s, row)."""

    turns: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    votes: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    outcomes: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @staticmethod
    def due(items: list[tuple[float, dict[str, Any]]], now_s: float) -> tuple[list, list]:
        ready = [row for t, row in items if t <= now_s]
        later = [(t, row) for t, row in items if t > now_s]
        return ready, later


class _Writer:
    """Writes due events, per event through ``Store.record_*`` or in bulk."""

    def __init__(self, store: Store, *, bulk: bool) -> None:
        self.store = store
        self.bulk = bulk
        self.counts: Counter[str] = Counter()

    def write(
        self,
        assignments: list[dict[str, Any]],
        turns: list[dict[str, Any]],
        votes: list[dict[str, Any]],
        outcomes: list[dict[str, Any]],
    ) -> None:
        # Order matters: a vote needs its turn (ownership check), a turn its session.
        if self.bulk:
            with self.store.engine.begin() as conn:
                if assignments:
                    conn.execute(schema.assignments.insert(), assignments)
                if turns:
                    conn.execute(schema.turns.insert(), turns)
                if votes:
                    conn.execute(
                        schema.feedback_events.insert(),
                        [{**v, "kind": "upsert", "comment": None} for v in votes],
                    )
                    conn.execute(
                        schema.feedback.insert(),
                        [
                            {
                                "turn_id": v["turn_id"],
                                "user_id": v["user_id"],
                                "session_id": v["session_id"],
                                "value": v["value"],
                                "comment": None,
                                "created_at": v["created_at"],
                                "updated_at": v["created_at"],
                            }
                            for v in votes
                        ],
                    )
                if outcomes:
                    conn.execute(schema.outcomes.insert(), outcomes)
                refresh_session_counts(conn, [r["session_id"] for r in (*turns, *votes)])
        else:
            for t in turns:
                self.store.record_turn(TurnRecord(**{**t, "fewshot_ids": tuple(t["fewshot_ids"])}))
            for v in votes:
                self.store.record_feedback(
                    v["turn_id"], v["user_id"], v["value"], at=v["created_at"]
                )
            for o in outcomes:
                self.store.record_outcome(
                    OutcomeRecord(
                        idempotency_key=o["idempotency_key"],
                        name=o["name"],
                        value=o["value"],
                        session_id=o["session_id"],
                        user_id=o["user_id"],
                        occurred_at=o["occurred_at"],
                        source=o["source"],
                    ),
                    received_at=o["received_at"],
                )
        self.counts.update(
            assignments=len(assignments), turns=len(turns), votes=len(votes), outcomes=len(outcomes)
        )


@contextmanager
def _run_store(database_url: str | None) -> Iterator[tuple[Store, str | None]]:
    """The given store, or a throw-away SQLite file without fsync (it dies with the run)."""
    if database_url:
        store = Store(database_url)
        store.upgrade()
        try:
            yield store, database_url
        finally:
            store.dispose()
        return
    with tempfile.TemporaryDirectory(prefix="flywheel-sim-") as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'sim.db'}")

        @sa.event.listens_for(store.engine, "connect")
        def _no_fsync(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA synchronous=OFF")
            cur.close()

        store.upgrade()
        try:
            yield store, None
        finally:
            store.dispose()


# -- the run ----------------------------------------------------------------------------------
def simulate(
    scenario: Scenario,
    *,
    policy: Policy = "thompson",
    seed: int = 0,
    database_url: str | None = None,
    bulk: bool = True,
    progress: Callable[[int, int], None] | None = None,
    specs: Mapping[str, ArmSpec] | None = None,
) -> SimulationResult:
    """Run ``scenario`` under ``policy`` and measure its regret against the oracle.

    ``database_url`` keeps the events (the experiment ``sim-<scenario>-<policy>-<seed>``
    must not exist there yet); by default a temporary SQLite file is used.
    ``specs`` says what an arm serves (``flywheel demo``: the shipped prompt files,
    so that a server on the demo data serves the same arm versions); by default
    each arm is a simulated prompt of its own.
    ``progress(done, total)`` is called after every refit. Raises
    :class:`ConfigError` if the experiment already has data in the store.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if scenario.proposer is not None and policy == "oracle":
        raise ValueError("a scenario with a [proposer] table runs under thompson or uniform")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    started = time.perf_counter()
    timings: dict[str, float] = defaultdict(float)
    rng = np.random.default_rng(seed)
    draws = _draw(scenario, rng)
    job_rng = np.random.default_rng([seed, 1])
    truth = _TruthArrays.of(scenario)
    arms = scenario.arm_ids
    seg_keys = scenario.segment_keys
    exp_rewards = scenario.expected_rewards()
    oracle_arms = scenario.oracle_arms()
    experiment_id = f"sim-{scenario.name}-{policy}-{seed}"
    config = scenario_config(scenario, policy, experiment_id=experiment_id)
    start = scenario.start
    arm_index = {a: i for i, a in enumerate(arms)}
    delay_days_max = scenario.delay_max_days
    needs = {t.source for t in scenario.kpi.terms}
    write_support = "outcome:support_minutes" in needs or bool(truth.support_minutes.any())
    write_revenue = "outcome:revenue" in needs or bool(truth.revenue.any())

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=float(seconds))

    def served(arm: str) -> ArmSpec:
        return (specs or {}).get(arm) or ArmSpec(arm, arm, SIM_PROMPT_HASH)

    with _run_store(database_url) as (base_store, kept_url):
        _require_fresh(base_store, experiment_id)
        base_store.sync_experiment(
            experiment_id,
            experiment_id,
            [served(a.id) for a in scenario.arms if a.arrives_day == 0],
            at=start,
        )
        events = _lifecycle(scenario)
        store: Store = _BatchingStore(base_store) if bulk else base_store
        assigner = Assigner(
            store,
            experiment_id,
            salt=experiment_id,
            segment_by=config.experiment.segment_by,
            snapshot_ttl_s=math.inf,  # refreshed by invalidate() after each refit
            holdback=scenario.holdback,
            baseline=scenario.champion_id,
        )
        if policy == "oracle":
            base_store.save_snapshot(
                experiment_id,
                "oracle",
                _oracle_allocation(scenario, scenario.present(np.zeros(1))[0]),
                {"policy": "oracle"},
                at=start,
            )

        def apply_events(until_s: float) -> None:
            """Arms arrive (created) and retire (an operator's event) at their times."""
            while events and events[0][0] <= until_s:
                t_s, kind, arm = events.pop(0)
                if kind == "arrives":
                    base_store.sync_experiment(
                        experiment_id,
                        experiment_id,
                        [served(arm)],
                        at=at(t_s),
                    )
                else:
                    base_store.record_arm_event(
                        experiment_id, arm, "retired", actor="operator", at=at(t_s)
                    )
                if policy == "oracle":
                    base_store.save_snapshot(
                        experiment_id,
                        "oracle",
                        _oracle_allocation(scenario, scenario.present(np.array([t_s / _DAY_S]))[0]),
                        {"policy": "oracle"},
                        at=at(t_s),
                    )
                assigner.invalidate()

        run_optimizer = _optimizer_entry() if policy != "oracle" else None
        writer = _Writer(base_store, bulk=bulk)
        pending = _Pending()

        refit_s = scenario.refit_every_hours * 3600
        end_s = float(draws.t[-1])
        n_refits = max(1, math.ceil(end_s / refit_s))
        assigned_arm = np.empty(scenario.sessions, dtype=np.int64)
        in_holdback = np.zeros(scenario.sessions, dtype=bool)
        proposals: list[Any] = []
        proposer_rng = np.random.default_rng([seed, 2])
        session_ids = [f"{experiment_id}:s{i}" for i in range(scenario.sessions)]
        user_ids = [f"{experiment_id}:u{u}" for u in draws.user]
        contexts = [
            {scenario.segment_by: scenario.segments[s].value} if scenario.segment_by else {}
            for s in range(len(seg_keys))
        ]
        bounds = np.searchsorted(draws.t, np.arange(1, n_refits + 1) * refit_s, side="left")
        lo = 0
        last_run: Any = None
        for k in range(n_refits):
            hi = int(bounds[k]) if k < n_refits - 1 else scenario.sessions
            now_s = (k + 1) * refit_s
            tic = time.perf_counter()
            for i in range(lo, hi):
                if events and events[0][0] <= draws.t[i]:
                    apply_events(float(draws.t[i]))
                rec = assigner.assign(
                    session_ids[i],
                    user_ids[i],
                    contexts[draws.segment[i]],
                    at=at(draws.t[i]),
                    simulated=True,
                )
                assigned_arm[i] = arm_index[rec.arm_id]
                in_holdback[i] = rec.holdback
            timings["assign"] += time.perf_counter() - tic
            if not bulk:
                writer.counts["assignments"] += hi - lo
            tic = time.perf_counter()
            _generate(
                lo,
                hi,
                draws=draws,
                truth=truth,
                arms=arms,
                assigned=assigned_arm,
                session_ids=session_ids,
                user_ids=user_ids,
                experiment_id=experiment_id,
                pending=pending,
                at=at,
                delay=functools.partial(_delay_s, scenario.delay, delay_days_max),
                write_support=write_support,
                write_revenue=write_revenue,
            )
            timings["generate"] += time.perf_counter() - tic
            tic = time.perf_counter()
            turns, pending.turns = _Pending.due(pending.turns, now_s)
            votes, pending.votes = _Pending.due(pending.votes, now_s)
            outcomes, pending.outcomes = _Pending.due(pending.outcomes, now_s)
            batched = store.take_pending() if isinstance(store, _BatchingStore) else []
            writer.write(batched, turns, votes, outcomes)
            timings["write"] += time.perf_counter() - tic
            if run_optimizer is not None:
                tic = time.perf_counter()
                last_run = run_optimizer(
                    base_store, config, now=at(now_s), random_state=job_rng, fewshot=False
                )  # simulated turns carry no text to mine
                assigner.invalidate()
                timings["refit"] += time.perf_counter() - tic
                if scenario.proposer is not None:
                    tic = time.perf_counter()
                    new = _propose(base_store, config, scenario, proposer_rng, at(now_s), now_s)
                    if new:
                        proposals.extend(new)
                        scenario = scenario.model_copy(
                            update={"arms": (*scenario.arms, *[p.truth for p in new])}
                        )
                        arms = scenario.arm_ids
                        arm_index = {a: i for i, a in enumerate(arms)}
                        truth = _TruthArrays.of(scenario)
                        exp_rewards = scenario.expected_rewards()
                        assigner.invalidate()
                    timings["propose"] += time.perf_counter() - tic
            lo = hi
            if progress is not None:
                progress(hi, scenario.sessions)

        # -- what the run did -----------------------------------------------------------------
        seg = draws.segment
        chosen = exp_rewards[seg, assigned_arm]
        present = scenario.present(draws.t / _DAY_S)
        allowed = np.array([a in scenario.allowed_arms() for a in arms])
        best = np.where(present & allowed[None, :], exp_rewards[seg], -np.inf).max(axis=1)
        expected_total = float(chosen.sum())
        oracle_total = float(best.sum())
        per_arm = Counter(arms[i] for i in assigned_arm)
        per_segment: dict[str, dict[str, int]] = {}
        for s, key in enumerate(seg_keys):
            counts = np.bincount(assigned_arm[seg == s], minlength=len(arms))
            per_segment[key] = {a: int(c) for a, c in zip(arms, counts, strict=True)}
        assigner.invalidate()
        final = {
            key: {a: round(float(p), 6) for a, p in sorted(alloc.items())}
            for key, alloc in assigner.allocation().segments.items()
        }
        statuses = base_store.arm_statuses(experiment_id)
        snapshot = base_store.latest_snapshot(experiment_id)
        elapsed = time.perf_counter() - started
        log.info(
            "simulated %s under %s (seed %d): %d sessions, regret %.3f, %.1f s",
            scenario.name,
            policy,
            seed,
            scenario.sessions,
            oracle_total - expected_total,
            elapsed,
        )
        return SimulationResult(
            policy=policy,
            scenario=scenario.name,
            seed=seed,
            sessions=scenario.sessions,
            days=round(scenario.days, 3),
            refits=n_refits if run_optimizer is not None else 0,
            expected_kpi_total=round(expected_total, 6),
            oracle_kpi_total=round(oracle_total, 6),
            regret=round(oracle_total - expected_total, 6),
            sessions_per_arm={a: int(per_arm.get(a, 0)) for a in arms},
            sessions_per_segment_arm=per_segment,
            expected_kpi_per_arm={
                key: {a: round(float(exp_rewards[s, j]), 6) for j, a in enumerate(arms)}
                for s, key in enumerate(seg_keys)
            },
            oracle_arms=dict(zip(seg_keys, oracle_arms, strict=True)),
            final_allocation=final,
            arm_statuses=dict(sorted(statuses.items())),
            paused_arms=sorted(a for a, s in statuses.items() if s.startswith("paused")),
            winner=_winner(last_run, snapshot),
            snapshot_version=snapshot.version if snapshot is not None else None,
            events_written=dict(writer.counts),
            elapsed_s=round(elapsed, 3),
            sessions_per_s=round(scenario.sessions / elapsed, 1) if elapsed > 0 else 0.0,
            timings_s={k: round(v, 3) for k, v in sorted(timings.items())},
            database_url=kept_url,
            arrivals=(
                _arrivals(scenario, draws.t / _DAY_S, assigned_arm, chosen, best)
                if scenario.proposer is None
                else []
            ),
            cost_per_arm=_costs(base_store, experiment_id, per_arm),
            closed_loop=(
                _closed_loop(
                    base_store,
                    experiment_id,
                    scenario,
                    proposals,
                    assigned_arm,
                    in_holdback,
                    chosen,
                    best,
                    exp_rewards[seg, arms.index(scenario.champion_id)],
                    last_run,
                )
                if scenario.proposer is not None
                else {}
            ),
        )


def _costs(
    store: Store, experiment_id: str, per_arm: Mapping[str, Any]
) -> dict[str, dict[str, float]]:
    """Spend per arm from the turns written (only arms that cost something)."""
    t = schema.turns
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.arm_id, sa.func.sum(t.c.cost))
            .where(t.c.experiment_id == experiment_id)
            .group_by(t.c.arm_id)
        ).all()
    out = {}
    for arm, total in rows:
        if total:
            n = int(per_arm.get(arm, 0))
            out[str(arm)] = {
                "usd": round(float(total), 6),
                "usd_per_session": round(float(total) / n, 8) if n else 0.0,
            }
    return dict(sorted(out.items()))


def _generate(
    lo: int,
    hi: int,
    *,
    draws: _Draws,
    truth: _TruthArrays,
    arms: list[str],
    assigned: np.ndarray,
    session_ids: list[str],
    user_ids: list[str],
    experiment_id: str,
    pending: _Pending,
    at: Callable[[float], datetime],
    delay: Callable[[np.ndarray], np.ndarray],
    write_support: bool,
    write_revenue: bool,
) -> None:
    """Draw the turns, votes and outcomes of sessions ``lo:hi`` from their arms' truth."""
    if hi <= lo:
        return
    idx = np.arange(lo, hi)
    seg, arm = draws.segment[idx], assigned[idx]
    t0 = draws.t[idx]

    # Turns and votes, vectorised over all turns of these sessions.
    n_turns = draws.n_turns[idx]
    first = draws.turn_start[idx]
    owner = np.repeat(idx, n_turns)  # session of each turn
    k = np.arange(int(n_turns.sum())) - np.repeat(np.cumsum(n_turns) - n_turns, n_turns)
    tix = np.repeat(first, n_turns) + k  # global turn index
    tseg, tarm = draws.segment[owner], assigned[owner]
    t_turn = draws.t[owner] + (k + 1) * _TURN_GAP_S
    error = draws.u_error[tix] < truth.error_rate[tseg, tarm]
    latency = np.exp(
        truth.log_latency[tseg, tarm] + truth.latency_sigma[tseg, tarm] * draws.z_latency[tix]
    )
    cost = truth.cost_per_turn[tseg, tarm]
    rated = draws.u_rate[tix] < truth.rate[tseg, tarm]
    up = draws.u_vote[tix] < truth.thumbs_up[tseg, tarm]
    for j in range(len(owner)):
        i = int(owner[j])
        arm_id = arms[int(tarm[j])]
        turn_id = f"{session_ids[i]}:t{int(k[j])}"
        created = at(t_turn[j])
        pending.turns.append(
            (
                float(t_turn[j]),
                {
                    "id": turn_id,
                    "session_id": session_ids[i],
                    "user_id": user_ids[i],
                    "experiment_id": experiment_id,
                    "arm_id": arm_id,
                    "prompt_id": arm_id,
                    "prompt_hash": SIM_PROMPT_HASH,
                    "fewshot_ids": [],
                    "model": "sim",
                    "user_message": "",
                    "reply": "",
                    "latency_ms": float(latency[j]),
                    "ttft_ms": None,
                    "prompt_tokens": None,
                    "completion_tokens": None,
                    "cost": float(cost[j]),
                    "error": "simulated error" if error[j] else None,
                    "trace_id": None,
                    "created_at": created,
                },
            )
        )
        if rated[j] and not error[j]:
            t_vote = float(t_turn[j]) + _VOTE_LAG_S
            pending.votes.append(
                (
                    t_vote,
                    {
                        "turn_id": turn_id,
                        "session_id": session_ids[i],
                        "user_id": user_ids[i],
                        "value": int(up[j]),
                        "created_at": at(t_vote),
                    },
                )
            )

    # Outcomes: a conversion after its delay (with revenue), support minutes after the chat.
    converted = draws.u_conv[idx] < truth.conversion[seg, arm]
    delays = delay(draws.u_delay[idx])
    revenue = -truth.revenue[seg, arm] * np.log1p(-draws.u_revenue[idx])
    support = -truth.support_minutes[seg, arm] * np.log1p(-draws.u_support[idx])

    def outcome(i: int, name: str, value: float, t: float) -> None:
        when = at(t)
        pending.outcomes.append(
            (
                t,
                {
                    "idempotency_key": f"{session_ids[i]}:{name}",
                    "session_id": session_ids[i],
                    "user_id": user_ids[i],
                    "name": name,
                    "value": value,
                    "occurred_at": when,
                    "received_at": when,
                    "source": "simulator",
                    "extra": {},
                },
            )
        )

    for c in np.flatnonzero(converted):
        i = int(idx[c])
        t_conv = float(t0[c]) + CONVERSION_OFFSET_S + float(delays[c])
        outcome(i, "conversion", 1.0, t_conv)
        if write_revenue and revenue[c] > 0:
            outcome(i, "revenue", float(revenue[c]), t_conv)
    if write_support:
        for c in np.flatnonzero(support > 0):
            outcome(
                int(idx[c]), "support_minutes", float(support[c]), float(t0[c]) + SUPPORT_OFFSET_S
            )


def _delay_s(spec: Any, max_days: float, u: np.ndarray) -> np.ndarray:
    """Conversion delays in seconds for the uniforms ``u``."""
    return np.asarray(spec.sample(u, max_days)) * _DAY_S


def _propose(
    store: Store,
    config: Config,
    scenario: Scenario,
    rng: np.random.Generator,
    now: datetime,
    now_s: float,
) -> list[Any]:
    """A simulated proposal round when one is due (:mod:`optimizer.proposer.simulated`)."""
    from optimizer.proposer.simulated import simulated_round

    assert scenario.proposer is not None
    return simulated_round(
        store,
        config,
        scenario.proposer,
        {a.id: a for a in scenario.arms},
        rng=rng,
        now=now,
        day=now_s / _DAY_S,
    )


def _closed_loop(
    store: Store,
    experiment_id: str,
    scenario: Scenario,
    proposals: list[Any],
    assigned: np.ndarray,
    in_holdback: np.ndarray,
    chosen: np.ndarray,
    best: np.ndarray,
    champion_alone: np.ndarray,
    last_run: Any,
) -> dict[str, Any]:
    """The closed loop's figures: proposals' fates, harm served, lift over the holdback.

    ``worse_than_parent_share``: share of all sessions served by a proposal whose true
    expected KPI is below its parent's. ``manual_steps``: arm events and candidate
    decisions by anyone but the optimizer and the configuration (0 when no hand moved).
    """
    arms = scenario.arm_ids
    pooled = scenario.segment_shares @ scenario.expected_rewards()
    reward = dict(zip(arms, pooled, strict=True))
    drawn = [p for p in proposals if not p.delayed]  # one entry per candidate
    worse = {
        arms.index(p.truth.id)
        for p in proposals
        if p.started and reward[p.truth.id] < reward[p.parent]
    }
    served_worse = float(np.isin(assigned, list(worse)).mean()) if worse else 0.0
    started = {p.truth.id for p in proposals if p.started}
    ev, pc = schema.arm_events, schema.proposal_candidates
    with store.engine.connect() as conn:
        events = conn.execute(
            sa.select(ev.c.arm_id, ev.c.kind, ev.c.actor).where(ev.c.experiment_id == experiment_id)
        ).all()
        statuses: dict[str, int] = dict(
            conn.execute(
                sa.select(pc.c.status, sa.func.count())
                .where(pc.c.experiment_id == experiment_id)
                .group_by(pc.c.status)
            ).all()
        )
        decided_by_hand = conn.execute(
            sa.select(sa.func.count())
            .select_from(pc)
            .where(
                pc.c.experiment_id == experiment_id,
                pc.c.decided_by.is_not(None),
                pc.c.decided_by != "optimizer",
            )
        ).scalar()
    manual = sum(1 for e in events if e.actor not in ("optimizer", "config")) + int(
        decided_by_hand or 0
    )
    promoted = {e.arm_id for e in events if e.kind == "promoted" and e.arm_id in started}
    retired = {e.arm_id for e in events if e.kind == "retired" and e.arm_id in started}
    paused = {e.arm_id for e in events if e.kind == "paused_guardrail" and e.arm_id in started}
    optimised = chosen[~in_holdback]
    held = chosen[in_holdback]
    lift = float(optimised.mean() - held.mean()) if len(held) and len(optimised) else None
    measured = (last_run.summary.get("holdback") if last_run is not None else None) or {}
    return {
        "proposals_made": len(drawn),
        "gated_out": statuses.get("rejected", 0) + statuses.get("duplicate", 0),
        "waiting": statuses.get("waiting", 0),
        "started": len(started),
        "promoted": len(promoted),
        "retired": len(retired),
        "paused_guardrail": len(paused),
        "harmful_drawn": sum(1 for p in drawn if p.harmful),
        "worse_than_parent_started": len(worse),
        "worse_than_parent_share": round(served_worse, 5),
        "holdback_sessions": int(in_holdback.sum()),
        "true_kpi_optimised": round(float(optimised.mean()), 6) if len(optimised) else None,
        "true_kpi_holdback": round(float(held.mean()), 6) if len(held) else None,
        "true_lift_over_holdback": round(lift, 6) if lift is not None else None,
        "true_relative_lift": (
            round(lift / float(held.mean()), 4) if lift is not None and held.mean() > 0 else None
        ),
        "measured_holdback": measured,
        "regret": round(float((best - chosen).sum()), 3),
        # the same-run baseline: every session on the starting champion (no proposer)
        "baseline_regret": round(float((best - champion_alone).sum()), 3),
        "oracle_kpi_per_session": round(float(best.mean()), 6),
        "final_champion": (
            last_run.summary.get("champion") if last_run is not None else scenario.champion_id
        ),
        "manual_steps": manual,
    }


def _lifecycle(scenario: Scenario) -> list[tuple[float, str, str]]:
    """(time s, "arrives" | "retires", arm) of the arms' mid-run changes, in time order."""
    events = [(a.arrives_day * _DAY_S, "arrives", a.id) for a in scenario.arms if a.arrives_day > 0]
    events += [
        (a.retires_day * _DAY_S, "retires", a.id)
        for a in scenario.arms
        if a.retires_day is not None
    ]
    return sorted(events)


def _arrivals(
    scenario: Scenario,
    days: np.ndarray,
    assigned: np.ndarray,
    chosen: np.ndarray,
    best: np.ndarray,
    *,
    window_days: float = 2.0,
) -> list[dict[str, Any]]:
    """What each newcomer did to the others, in the ``window_days`` before and after it came.

    ``incumbent`` is the best arm present just before the arrival (by true KPI,
    among guardrail-respecting arms); its share of traffic and the regret per
    session before and after say whether the newcomer reset what was learnt.
    """
    arms = scenario.arm_ids
    rewards = scenario.expected_rewards()
    allowed = np.array([a in scenario.allowed_arms() for a in arms])
    pooled = scenario.segment_shares @ rewards
    out = []
    for arm in scenario.arms:
        if arm.arrives_day <= 0:
            continue
        day = arm.arrives_day
        before_present = scenario.present(np.array([day - 1e-9]))[0] & allowed
        incumbent = int(np.where(before_present, pooled, -np.inf).argmax())
        before = (days >= day - window_days) & (days < day)
        after = (days >= day) & (days < day + window_days)
        newcomer = arms.index(arm.id)

        def share(mask: np.ndarray, j: int) -> float | None:
            return round(float((assigned[mask] == j).mean()), 4) if mask.any() else None

        def regret(mask: np.ndarray) -> float | None:
            return round(float((best[mask] - chosen[mask]).mean()), 6) if mask.any() else None

        out.append(
            {
                "arm": arm.id,
                "day": day,
                "incumbent": arms[incumbent],
                "incumbent_share_before": share(before, incumbent),
                "incumbent_share_after": share(after, incumbent),
                "newcomer_share_after": share(after, newcomer),
                "regret_per_session_before": regret(before),
                "regret_per_session_after": regret(after),
            }
        )
    return out


def _oracle_allocation(scenario: Scenario, present: np.ndarray) -> dict[str, Any]:
    """All traffic to the best allowed present arm of each segment ("*": over the mix)."""
    rewards = scenario.expected_rewards()
    allowed = np.array([a in scenario.allowed_arms() for a in scenario.arm_ids]) & present
    pooled = np.where(allowed, scenario.segment_shares @ rewards, -np.inf)
    segments: dict[str, dict[str, float]] = {
        ALL_SEGMENTS: {scenario.arm_ids[int(pooled.argmax())]: 1.0}
    }
    if scenario.segments:
        masked = np.where(allowed[None, :], rewards, -np.inf)
        for key, j in zip(scenario.segment_keys, masked.argmax(axis=1), strict=True):
            segments[key] = {scenario.arm_ids[int(j)]: 1.0}
    return {"segments": segments}


def _optimizer_entry() -> Callable[..., Any]:
    from optimizer.refit import run_optimizer  # heavy (pandas, scipy): only when refitting

    return run_optimizer


def _require_fresh(store: Store, experiment_id: str) -> None:
    with store.engine.connect() as conn:
        used = conn.execute(
            sa.select(sa.func.count())
            .select_from(schema.assignments)
            .where(schema.assignments.c.experiment_id == experiment_id)
        ).scalar()
    if used:
        raise ConfigError(
            f"experiment {experiment_id!r} already has {used} assignments in {store.url}; "
            "simulate into a fresh database (or another seed)"
        )


def _winner(run: Any, snapshot: Any) -> str | None:
    """The arm the stop rule promoted or recommends at the end (None if none)."""
    if run is not None:
        if run.promoted:
            return str(run.promoted)
        if run.recommendation:
            return str(run.recommendation["arm"])
        return None
    if snapshot is None:
        return None
    stop = (snapshot.summary or {}).get("stop") or {}
    winner = stop.get("promoted") or stop.get("recommended")
    return winner if isinstance(winner, str) else None
