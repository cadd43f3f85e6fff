"""The proposer in simulated time: same budget, records and start path, drawn truths.

:func:`simulated_round` stands in for :func:`~optimizer.proposer.rounds.run_round`
in :func:`optimizer.simulator.simulate` when the scenario has a ``[proposer]``
table. What is real: whether a round is due (:func:`~.rounds.round_due` on the
simulated thumbs-down votes in the store, ``max_live`` live proposals, the
interval), the rounds and candidates written to the store, and starting a
passing candidate as an arm (:func:`~.records.start_candidate`, the path an
approval takes) with ``auto_start``. What is drawn: each candidate's hidden
truth relative to its parent (:class:`~optimizer.scenario.ProposerSpec`) and the
replay gate's verdict, from the candidate's true error rate on
``replay_questions`` questions (the real gate fails on any error).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from optimizer.champion import champion_row
from optimizer.config import Config
from optimizer.proposer import records
from optimizer.proposer.rounds import Parent, round_due, start_waiting
from optimizer.scenario import ArmTruth, ProposerSpec
from optimizer.store import Store

__all__ = ["SimulatedProposal", "simulated_round"]


@dataclass(frozen=True)
class SimulatedProposal:
    """A drawn candidate: its truth (id = its arm id once started, else the candidate's)."""

    truth: ArmTruth
    parent: str
    candidate_id: str
    started: bool
    harmful: bool
    lift: float
    #: Started in a later round, when a slot freed (the same candidate as an earlier entry).
    delayed: bool = False


def _parent(store: Store, config: Config) -> Parent | None:
    row = champion_row(store, config)
    if row is None:
        return None
    return Parent(
        arm_id=str(row.id),
        prompt_id=str(row.prompt_id),
        prompt_text=str(getattr(row, "prompt_text", None) or f"simulated prompt of {row.id}"),
        model=getattr(row, "model", None),
    )


def simulated_round(
    store: Store,
    config: Config,
    spec: ProposerSpec,
    truths: dict[str, ArmTruth],
    *,
    rng: np.random.Generator,
    now: datetime,
    day: float,
) -> list[SimulatedProposal]:
    """A round if one is due: draw ``spec.candidates`` proposals of the champion, gate, start."""
    parent = _parent(store, config)
    if parent is None or parent.arm_id not in truths:
        return []
    delayed = [
        SimulatedProposal(
            truths[c.id].model_copy(update={"id": c.arm_id, "arrives_day": float(day)}),
            c.parent_arm_id,
            c.id,
            True,
            False,
            0.0,
            delayed=True,
        )
        for c in start_waiting(store, config, now=now)
        if c.id in truths and c.arm_id
    ]
    if delayed:
        return delayed
    if round_due(store, config, parent, now=now, hooks=None) is not None:
        return []
    base = truths[parent.arm_id]
    round_id = records.record_round(
        store,
        config.experiment.id,
        parent.arm_id,
        source="proposer",
        model="simulated",
        cost_usd=0.0,
        details={"simulated": True, "day": day},
        at=now,
    )
    out = []
    for k in range(spec.candidates):
        harmful = bool(rng.random() < spec.harmful_share)
        if harmful:
            lift = float(rng.normal(spec.harmful_lift_mean, spec.harmful_lift_sd))
        else:
            lift = float(rng.normal(spec.lift_mean, spec.lift_sd))
        lift = max(lift, -0.95)
        broken = harmful and bool(rng.random() < spec.broken_share)
        error_rate = spec.broken_error_rate if broken else base.error_rate
        thumbs = base.thumbs_up - (spec.harmful_thumbs_drop if harmful else 0.0)
        # The replay gate fails on any error among its questions.
        errors = int((rng.random(spec.replay_questions) < error_rate).sum())
        passed = errors == 0
        gates: list[dict[str, Any]] = [
            {"name": "pii", "passed": True, "detail": "", "simulated": True},
            {"name": "format", "passed": True, "detail": "", "simulated": True},
            {"name": "duplicate", "passed": True, "detail": "", "simulated": True},
            {"name": "injection", "passed": True, "detail": "", "simulated": True},
            {
                "name": "replay",
                "passed": passed,
                "detail": "" if passed else f"model error on {errors} of {spec.replay_questions}",
                "simulated": True,
            },
        ]
        text = f"simulated proposal {round_id[:8]}-{k} of {parent.arm_id}"
        cid = records.record_candidate(
            store,
            round_id=round_id,
            experiment_id=config.experiment.id,
            parent_arm_id=parent.arm_id,
            source="proposer",
            prompt_text=text,
            fewshot="none",
            fewshot_config={},
            rationale=f"hidden truth: conversion lift {lift:+.3f}"
            + (" (harmful)" if harmful else ""),
            status="waiting" if passed else "rejected",
            reason=None if passed else gates[-1]["detail"],
            gates=gates,
            at=now,
        )
        arm_id = cid
        started = False
        if passed and config.proposer.auto_start:
            from optimizer.proposer.rounds import live_proposals

            if len(live_proposals(store, config.experiment.id)) < config.proposer.max_live:
                candidate = records.get_candidate(store, cid)
                assert candidate is not None
                arm_id = records.start_candidate(
                    store,
                    candidate,
                    prompt_id=parent.prompt_id,
                    prompt_hash=f"sim-{cid[:12]}",
                    model=None,
                    actor="optimizer",
                    at=now,
                    trial_cap=config.proposer.trial_cap,
                )
                started = True
        truth = base.model_copy(
            update={
                "id": arm_id,
                "conversion": float(min(max(base.conversion * (1 + lift), 0.0), 1.0)),
                "thumbs_up": float(min(max(thumbs, 0.0), 1.0)),
                "error_rate": float(error_rate),
                "arrives_day": float(day),
                "retires_day": None,
            }
        )
        out.append(SimulatedProposal(truth, parent.arm_id, cid, started, harmful, lift))
    return out
