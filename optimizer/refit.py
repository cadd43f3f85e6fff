"""The optimizer job: events in, a new policy snapshot out.

One run, under a lock so two processes never fit at once (:mod:`optimizer.locks`):

1. arm statuses from arm events; paused and retired arms get no traffic;
2. the sums of every session as of ``now`` (:mod:`optimizer.moments`): kept for the
   sessions whose windows closed, read for the open ones (:mod:`optimizer.refit_state`);
3. guardrails against the champion (:mod:`optimizer.guardrails`): a breached arm
   gets a ``paused_guardrail`` arm event with the evidence and leaves the allocation;
4. the policy (``config.policy.kind``) fits and allocates per segment;
5. stop rule: a ``stop_recommended`` event, or ``promoted`` with
   ``policy.auto_promote`` (an event already current is not repeated) — the
   champion in the store, for every replica and for what builds on it (guardrails,
   few-shot proposals); with ``auto_promote`` the losers below
   ``policy.retire_probability_best`` after ``retire_min_sessions`` are retired;
6. sample-ratio-mismatch check (:mod:`optimizer.srm`);
7. a versioned snapshot (``Store.save_snapshot``) that serving reads.

Snapshot format (JSON)::

    allocation = {"segments": {"*": {arm: p}, "<segment>": {arm: p}}}
    summary = {"arms": {arm: {"status", "sessions", "complete_sessions", "kpi_mean",
                              "kpi_ci", "prob_best", "expected_loss", "conversion_rate",
                              "conversion_ci", "thumbs_up_rate", "thumbs_down_rate",
                              "error_rate", "median_support_minutes", "guardrails"}},
               "segments": {segment: {arm: {...posterior fields...}}},
               "srm": {"p_value", "chi2", "warning", ...}, "stop": {...},
               "guardrails": [check, ...], "policy": "thompson", "model": "beta",
               "champion": arm, "burn_in_complete": bool, "sessions": n,
               "complete_sessions": n, "now": iso}

NaN never reaches the JSON (PostgreSQL's JSONB refuses it): it becomes null.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa

from optimizer import guardrails, kpi, srm
from optimizer.alerts import AlertDeliverer, alerts_from_run
from optimizer.assignment import ALL_SEGMENTS
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.holdback import bandit_frame, holdback_lift
from optimizer.jsonable import jsonable
from optimizer.locks import job_lock
from optimizer.policy import make_policy
from optimizer.proposer.hooks import ProposerHooks
from optimizer.refit_state import evidence_moments, refit_inputs
from optimizer.store import ACTIVE_STATUSES, Store, schema
from optimizer.store.schema import ARM_STATUS_BY_EVENT

if TYPE_CHECKING:
    from optimizer.finetune import FineTuneHooks

__all__ = ["OptimizerRun", "run_optimizer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerRun:
    """What one optimizer run did."""

    experiment_id: str
    snapshot_version: int
    policy: str
    allocation: dict[str, Any]
    summary: dict[str, Any]
    now: datetime
    duration_s: float
    sessions: int
    complete_sessions: int
    paused: tuple[str, ...] = ()
    promoted: str | None = None
    recommendation: dict[str, Any] | None = None
    srm: dict[str, Any] = field(default_factory=dict)
    #: The few-shot step: mined, demoted and proposed examples (empty when skipped).
    fewshot: dict[str, Any] = field(default_factory=dict)
    #: The proposal round (optimizer.proposer), empty when none ran.
    proposals: dict[str, Any] = field(default_factory=dict)
    #: The fine-tuning step (optimizer.finetune.finetune_step), empty without hooks.
    finetune: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for ``flywheel optimize --json``)."""
        return {
            "experiment_id": self.experiment_id,
            "snapshot_version": self.snapshot_version,
            "policy": self.policy,
            "allocation": self.allocation,
            "summary": self.summary,
            "now": self.now.isoformat(),
            "duration_s": self.duration_s,
            "sessions": self.sessions,
            "complete_sessions": self.complete_sessions,
            "paused": list(self.paused),
            "promoted": self.promoted,
            "recommendation": self.recommendation,
            "srm": self.srm,
            "fewshot": self.fewshot,
            "proposals": self.proposals,
            "finetune": self.finetune,
        }


def run_optimizer(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    random_state: int | np.random.Generator | None = None,
    actor: str = "optimizer",
    fewshot: bool = True,
    incremental: bool = True,
    alerts: AlertDeliverer | None = None,
    proposer: ProposerHooks | None = None,
    finetune: FineTuneHooks | None = None,
) -> OptimizerRun | None:
    """Fit the policy on the events up to ``now`` and write a snapshot.

    ``alerts`` (optional) receives the run's guardrail pauses, SRM warnings (when
    one starts), stop recommendations (when new) and promotions, delivered in the
    background (:mod:`optimizer.alerts`). ``proposer`` (optional) carries the
    completion function that lets the run write challengers from the feedback
    (:mod:`optimizer.proposer`); without it no proposal round runs. ``finetune``
    (optional) lets the run follow fine-tuning jobs and retrain on schedule
    (:func:`optimizer.finetune.finetune_step`).

    With ``fewshot`` the run then turns the flywheel (:func:`fewshot_step`):
    mines good turns into the example bank, demotes examples that drag the KPI
    down and proposes a challenger arm when the bank grew. ``incremental``
    (the default) refits from the kept sums of closed sessions plus the open
    ones (:mod:`optimizer.refit_state`); False recomputes from every session —
    the same result, at a cost that grows with history. Returns None,
    without doing anything, if another run holds the lock. Raises
    :class:`~optimizer.errors.PolicyError` when no arm is active.

    >>> from optimizer.config import load_config
    >>> from optimizer.store import ArmSpec
    >>> config = load_config("/nonexistent.toml", environ=False)
    >>> store = Store("sqlite:///:memory:"); store.create_all()
    >>> arms = [ArmSpec("a", "p", "h"), ArmSpec("b", "p", "h")]
    >>> store.sync_experiment(config.experiment.id, "salt", arms)
    >>> run = run_optimizer(store, config, random_state=0, fewshot=False)
    >>> run.snapshot_version, run.allocation["segments"]["*"]
    (1, {'a': 0.5, 'b': 0.5})
    """
    now = as_utc(now) if now is not None else utcnow()
    with job_lock(store, f"optimizer:{config.experiment.id}") as held:
        if not held:
            log.info("optimizer: another run holds the lock for %r; skipping", config.experiment.id)
            return None
        run, new_stop, srm_new = _run(
            store, config, now, np.random.default_rng(random_state), actor, incremental
        )
        if alerts is not None:
            for alert in alerts_from_run(run, new_stop=new_stop, srm_new=srm_new):
                alerts.emit(alert)
        if config.proposer.enabled:
            trace = proposer.trace if proposer is not None else None
            run = replace(
                run, proposals={"trials": trial_step(store, config, run, now=now, trace=trace)}
            )
        if fewshot:
            run = replace(
                run, fewshot=fewshot_step(store, config, now=now, actor=actor, hooks=proposer)
            )
        if proposer is not None:
            run = replace(
                run,
                proposals={
                    **run.proposals,
                    **proposal_step(store, config, proposer, now=now, alerts=alerts),
                },
            )
        if finetune is not None:
            from optimizer.finetune import finetune_step  # export's sklearn: only when hooked

            run = replace(run, finetune=finetune_step(store, config, finetune, now=now))
        return run


def trial_step(
    store: Store, config: Config, run: OptimizerRun, *, now: datetime, trace: Any | None = None
) -> dict[str, Any]:
    """End the proposed arms' trials that are due (:mod:`optimizer.proposer.trials`)."""
    from optimizer.proposer.trials import manage_trials

    try:
        return manage_trials(store, config, run.summary, now=now, trace=trace)
    except Exception:  # logged with its traceback; the next run tries again
        log.exception("optimizer: proposal trials failed")
        return {"error": "proposal trials failed; see the log"}


def proposal_step(
    store: Store,
    config: Config,
    hooks: ProposerHooks,
    *,
    now: datetime,
    alerts: AlertDeliverer | None = None,
) -> dict[str, Any]:
    """A proposal round when it is due; a failure here never loses the snapshot."""
    from optimizer.proposer import run_round

    try:
        result = run_round(store, config, hooks, now=now, alerts=alerts)
    except Exception:  # logged with its traceback; the next run tries again
        log.exception("optimizer: proposal round failed")
        return {"error": "proposal round failed; see the log"}
    return result.as_dict() if result is not None else {}


def fewshot_step(
    store: Store,
    config: Config,
    *,
    now: datetime,
    actor: str = "optimizer",
    hooks: ProposerHooks | None = None,
    incremental: bool = True,
) -> dict[str, Any]:
    """Mine, credit and propose few-shot examples; a failure here never loses the snapshot.

    ``incremental``: rank from the state kept up to date since the last run
    (:mod:`optimizer.fewshot.state`, same result) rather than from every turn."""
    from optimizer.fewshot import credit_examples, mine_examples, propose_challenger
    from optimizer.fewshot.state import refresh_state

    try:
        state = refresh_state(store, config, now=now).as_dict() if incremental else None
        mined = mine_examples(store, config, now=now, actor=actor, incremental=incremental)
        credit = credit_examples(store, config, now=now, actor=actor, incremental=incremental)
        proposal = propose_challenger(store, config, actor=actor, hooks=hooks)
    except Exception:  # logged with its traceback; the next run tries again
        log.exception("optimizer: few-shot step failed")
        return {"error": "few-shot step failed; see the log"}
    return {
        "mined": list(mined.added),
        "demoted": list(credit.demoted),
        "proposal": proposal.as_dict() if proposal is not None else None,
        **({"state": state} if state is not None else {}),
    }


def _run(
    store: Store,
    config: Config,
    now: datetime,
    rng: np.random.Generator,
    actor: str,
    incremental: bool = True,
) -> tuple[OptimizerRun, bool, bool]:
    """The run, whether its stop recommendation is new, and whether an SRM warning began."""
    started = time.perf_counter()
    exp, pol = config.experiment, config.policy
    statuses = store.arm_statuses(exp.id) or {a.id: "active" for a in exp.arms}
    champion = next((a for a, s in statuses.items() if s == "champion"), None)
    if champion is None and exp.champion is not None and statuses.get(exp.champion) == "active":
        champion = exp.champion
    active = sorted(a for a, s in statuses.items() if s in ACTIVE_STATUSES)
    if exp.arms:  # an arm dropped from the configuration gets no more traffic
        active = _configured(store, exp.id, {a.id for a in exp.arms}, active)
    # Sums of every session (optimizer.moments), kept for closed sessions (optimizer.refit_state).
    inputs = refit_inputs(store, config, now=now, incremental=incremental)
    # The holdback is outside the bandit: no policy, guardrail or SRM sees it (optimizer.holdback).
    frame = bandit_frame(inputs.moments)

    # An arm an operator resumed is judged on what happened since, not re-paused on old data.
    resumed = {a: t for a, t in _resumed_at(store, exp.id).items() if a != champion}
    latencies = None
    if any(g.metric == "latency_p95_ms" for g in config.kpi.guardrails) and champion is not None:
        latencies = kpi.turn_latencies(store, exp.id, active, now=now, since=resumed)
    checks = guardrails.check_guardrails(
        evidence_moments(store, config, inputs, resumed, now=now),
        config.kpi.guardrails,
        champion=champion,
        arms=active,
        pause_probability=pol.pause_probability,
        latencies=latencies,
        samples=pol.samples,
        random_state=rng,
        rule=pol.guardrail_rule,
    )
    paused: list[str] = []
    breached = {c.arm for c in checks if c.breached} if pol.guardrail_action == "pause" else set()
    for arm in sorted(breached):
        evidence = {"checks": [c.evidence() for c in checks if c.arm == arm and c.breached]}
        store.record_arm_event(
            exp.id, arm, "paused_guardrail", actor=actor, evidence=evidence, at=now
        )
        statuses[arm] = "paused_guardrail"
        paused.append(arm)
        log.warning("optimizer: paused arm %r (guardrail breach): %s", arm, evidence["checks"])
    active = [a for a in active if a not in paused]

    suspects = sorted({c.arm for c in checks if c.suspect and c.arm in active})
    policy = make_policy(pol, random_state=rng).fit(
        frame,
        active,
        champion=champion,
        caps=_operator_caps(store, exp.id),
        guardrail_suspects=suspects,
    )
    recommendation = policy.recommendation_
    promoted = None
    new_stop = False
    retired: list[str] = []
    if recommendation is not None:
        promoted, new_stop = _record_stop(store, config, recommendation, champion, actor, now)
        if promoted:
            statuses = {a: ("active" if s == "champion" else s) for a, s in statuses.items()}
            statuses[promoted] = "champion"
            champion = promoted
        if pol.auto_promote:
            retired = _retire_losers(store, config, policy.summary_, recommendation, actor, now)
            statuses.update(dict.fromkeys(retired, "retired"))

    groups = inputs.srm_groups
    versions = (
        groups.loc[groups["version"] >= 0, "version"].unique().tolist() if len(groups) else []
    )
    srm_result = srm.srm_from_groups(
        groups,
        srm.load_allocations(store, exp.id, versions),
        activity=srm.arm_activity(store, exp.id),
    ).to_dict()

    by_arm: dict[str, dict[str, Any]] = {}
    for c in checks:
        by_arm.setdefault(c.arm, {})[c.metric] = c.evidence()
    sessions = round(float(frame["n"].sum())) if len(frame) else 0
    complete = round(float(frame["complete"].sum())) if len(frame) else 0
    summary: dict[str, Any] = {
        "arms": {
            arm: {
                "status": _status(statuses.get(arm), arm, champion),
                **s,
                "guardrails": by_arm.get(arm, {}),
            }
            for arm, s in policy.summary_.items()
        },
        "segments": {k: v for k, v in policy.segment_summary_.items() if k != ALL_SEGMENTS},
        "srm": srm_result,
        "stop": {
            "recommended": recommendation["arm"] if recommendation else None,
            "promoted": promoted,
            "retired": retired,
            "details": recommendation,
            "stop_probability_best": pol.stop_probability_best,
            "stop_expected_loss": pol.stop_expected_loss,
            "rule": pol.stop_rule,
            "candidates": {
                rule: (rec["arm"] if rec else None) for rule, rec in policy.stop_candidates_.items()
            },
        },
        "guardrails": [c.evidence() for c in checks],
        # Arms keeping policy.guardrail_floor: guardrail suspects and the champion.
        "guardrail_held": list(policy.guardrail_held_),
        "policy": policy.name,
        "model": policy.model_,
        "delay": pol.delay,
        "champion": champion,
        "burn_in_complete": policy.burn_in_complete_,
        "sessions": sessions,
        "complete_sessions": complete,
        "holdback": holdback_lift(
            inputs.moments,
            share=exp.holdback,
            delay=pol.delay,
            samples=pol.samples,
            random_state=rng,
        ),
        "now": now.isoformat(),
    }
    summary = jsonable(summary)
    allocation = jsonable(policy.snapshot_allocation())
    previous = store.latest_snapshot(exp.id)
    was_warning = (
        bool(((previous.summary or {}).get("srm") or {}).get("warning")) if previous else False
    )
    srm_new = bool(srm_result.get("warning")) and not was_warning
    version = store.save_snapshot(exp.id, policy.name, allocation, summary, at=now)
    duration = time.perf_counter() - started
    log.info(
        "optimizer: snapshot %d for %r from %d sessions in %.2fs",
        version,
        exp.id,
        sessions,
        duration,
    )
    run = OptimizerRun(
        experiment_id=exp.id,
        snapshot_version=version,
        policy=policy.name,
        allocation=allocation,
        summary=summary,
        now=now,
        duration_s=duration,
        sessions=sessions,
        complete_sessions=complete,
        paused=tuple(paused),
        promoted=promoted,
        recommendation=recommendation,
        srm=srm_result,
    )
    return run, new_stop, srm_new


def _record_stop(
    store: Store,
    config: Config,
    recommendation: Mapping[str, Any],
    champion: str | None,
    actor: str,
    now: datetime,
) -> tuple[str | None, bool]:
    """Record the stop recommendation (or promotion) unless it is already the current one.

    Returns the promoted arm (or None) and whether a new recommendation was recorded."""
    exp = config.experiment
    arm = recommendation["arm"]
    evidence = jsonable(dict(recommendation))
    if config.policy.auto_promote and arm != champion:
        store.record_arm_event(exp.id, arm, "promoted", actor=actor, evidence=evidence, at=now)
        log.info("optimizer: promoted %r (stop rule)", arm)
        return arm, True
    if _last_event_kind(store, exp.id, arm) != "stop_recommended":
        store.record_arm_event(
            exp.id, arm, "stop_recommended", actor=actor, evidence=evidence, at=now
        )
        log.info("optimizer: stop rule recommends %r", arm)
        return None, True
    return None, False


def _retire_losers(
    store: Store,
    config: Config,
    summary: Mapping[str, Mapping[str, Any]],
    recommendation: Mapping[str, Any],
    actor: str,
    now: datetime,
) -> list[str]:
    """Retire the active arms the stop rule left behind: P(best) below
    ``policy.retire_probability_best`` after ``policy.retire_min_sessions`` effective sessions.
    The winner is never retired; a retired arm's history stays."""
    pol, exp = config.policy, config.experiment
    if pol.retire_probability_best <= 0:
        return []
    out = []
    for arm, s in sorted(summary.items()):
        p_best = s.get("prob_best")
        if arm == recommendation["arm"] or p_best is None:
            continue
        if p_best < pol.retire_probability_best and (
            s.get("effective_sessions", 0) >= pol.retire_min_sessions
        ):
            evidence = {
                "prob_best": p_best,
                "effective_sessions": s.get("effective_sessions"),
                "winner": recommendation["arm"],
                "retire_probability_best": pol.retire_probability_best,
            }
            store.record_arm_event(exp.id, arm, "retired", actor=actor, evidence=evidence, at=now)
            log.info("optimizer: retired %r (P(best) %.4f after the stop rule)", arm, p_best)
            out.append(arm)
    return out


def _configured(
    store: Store, experiment_id: str, configured: set[str], active: list[str]
) -> list[str]:
    """Active arms still wanted: the configured ones (any version) and those created at run
    time (by an operator, the CLI or the optimizer), which the file does not list."""
    rows = {r.id: r for r in store.arms(experiment_id)}

    def wanted(arm: str) -> bool:
        row = rows.get(arm)
        if row is None:
            return arm in configured
        return row.origin != "config" or (row.base_id or row.id) in configured

    return [a for a in active if wanted(a)]


def _operator_caps(store: Store, experiment_id: str) -> dict[str, float]:
    """Newest operator cap per arm (``cap_set`` events); a cap of 1 lifts it."""
    ev = schema.arm_events
    query = (
        sa.select(ev.c.arm_id, ev.c.evidence)
        .where(ev.c.experiment_id == experiment_id, ev.c.kind == "cap_set")
        .order_by(ev.c.id)
    )
    with store.engine.connect() as conn:
        latest = {arm: evidence for arm, evidence in conn.execute(query)}
    caps = {arm: float((evidence or {}).get("cap", 1.0)) for arm, evidence in latest.items()}
    return {arm: cap for arm, cap in caps.items() if 0 < cap < 1}


def _resumed_at(store: Store, experiment_id: str) -> dict[str, datetime]:
    """Arms whose current status comes from a ``resumed`` event, with its time."""
    ev = schema.arm_events
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ev.c.arm_id, ev.c.kind, ev.c.created_at)
            .where(ev.c.experiment_id == experiment_id, ev.c.kind.in_(list(ARM_STATUS_BY_EVENT)))
            .order_by(ev.c.id)
        ).all()
    latest = {r.arm_id: r for r in rows}  # status events are few
    return {a: as_utc(r.created_at) for a, r in latest.items() if r.kind == "resumed"}


def _last_event_kind(store: Store, experiment_id: str, arm: str) -> str | None:
    ev = schema.arm_events
    with store.engine.connect() as conn:
        return conn.execute(
            sa.select(ev.c.kind)
            .where(ev.c.experiment_id == experiment_id, ev.c.arm_id == arm)
            .order_by(ev.c.id.desc())
            .limit(1)
        ).scalar()


def _status(status: str | None, arm: str, champion: str | None) -> str:
    if arm == champion:
        return "champion"
    return status or "unknown"
