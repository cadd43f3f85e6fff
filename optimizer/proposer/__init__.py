"""Challengers written from the feedback: propose, gate, start or wait for approval.

See :mod:`optimizer.proposer.rounds` for a round, :mod:`~.gates` for the gates,
:mod:`~.records` for what is kept and :mod:`~.hooks` for what the serving
process hands in (the optimizer never imports the chat code).
"""

from __future__ import annotations

from optimizer.proposer.hooks import Completion, CompletionFn, ProposerHooks, always_idle
from optimizer.proposer.records import Candidate, candidates, decide, get_candidate
from optimizer.proposer.rounds import (
    Parent,
    RoundResult,
    live_proposals,
    parent_of,
    round_due,
    run_round,
    submit_candidate,
)

__all__ = [
    "Candidate",
    "Completion",
    "CompletionFn",
    "Parent",
    "ProposerHooks",
    "RoundResult",
    "always_idle",
    "candidates",
    "decide",
    "get_candidate",
    "live_proposals",
    "parent_of",
    "round_due",
    "run_round",
    "submit_candidate",
]
