"""Reviewing candidates: what the dashboard's candidates page and ``flywheel candidates`` share.

:func:`review_items` lists candidates with their parent's text and a unified diff
to it; :func:`find_candidate` resolves a full id or a unique prefix (the CLI and
the page show the first eight characters); :func:`decide_candidate` approves
(starts the arm at the trial cap, with the parent's prompt id and model) or
declines a waiting candidate. Both front ends then refresh the policy their own
way (the dashboard also drops its Assigner cache).
"""

from __future__ import annotations

import difflib
from typing import Any

from optimizer.config import Config
from optimizer.errors import StoreError
from optimizer.proposer.records import Candidate, candidates, decide, get_candidate
from optimizer.store import Store

__all__ = [
    "DECISIONS",
    "CandidateNotFound",
    "candidate_diff",
    "decide_candidate",
    "find_candidate",
    "review_items",
]

#: What a reviewer can do with a waiting candidate.
DECISIONS = ("approve", "decline")


class CandidateNotFound(StoreError):
    """No candidate of this experiment has that id (or the prefix is ambiguous)."""


def candidate_diff(parent_text: str, candidate: Candidate) -> list[str]:
    """Unified diff lines from the parent's prompt to the candidate's.

    >>> c = Candidate("c1", "r", "e", "p", "proposer", "B", "none", {}, "", "waiting",
    ...               None, [], None, None, None, None)
    >>> candidate_diff("A", c)[-2:]
    ['-A', '+B']
    """
    return list(
        difflib.unified_diff(
            parent_text.splitlines(),
            (candidate.prompt_text or "").splitlines(),
            fromfile=candidate.parent_arm_id,
            tofile="candidate",
            lineterm="",
        )
    )


def review_items(store: Store, experiment_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` candidates, each ``{"c", "parent", "diff"}`` (parent's text)."""
    texts = {r.id: r.prompt_text or "" for r in store.arms(experiment_id)}
    items = []
    for c in candidates(store, experiment_id)[:limit]:
        parent = texts.get(c.parent_arm_id, "")
        items.append({"c": c, "parent": parent, "diff": candidate_diff(parent, c)})
    return items


def find_candidate(store: Store, experiment_id: str, ref: str) -> Candidate:
    """The candidate ``ref`` names: its full id or a unique prefix (at least 4 characters)."""
    exact = get_candidate(store, ref)
    if exact is not None and exact.experiment_id == experiment_id:
        return exact
    if len(ref) >= 4:
        matches = [c for c in candidates(store, experiment_id) if c.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CandidateNotFound(
                f"candidate prefix {ref!r} is ambiguous: {sorted(c.id[:12] for c in matches)}"
            )
    raise CandidateNotFound(f"no candidate {ref!r} in experiment {experiment_id!r}")


def decide_candidate(
    store: Store, config: Config, ref: str, decision: str, *, actor: str
) -> Candidate:
    """Approve or decline a waiting candidate of ``config``'s experiment.

    Raises :class:`ValueError` for an unknown decision, :class:`CandidateNotFound`
    for an unknown candidate and :class:`StoreError` for one that is not waiting.
    """
    from optimizer.prompt_library import content_hash

    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {list(DECISIONS)}, got {decision!r}")
    candidate = find_candidate(store, config.experiment.id, ref)
    start: dict[str, Any] = {}
    if decision == "approve":
        parent = next(
            (r for r in store.arms(candidate.experiment_id) if r.id == candidate.parent_arm_id),
            None,
        )
        start = {
            "prompt_id": parent.prompt_id if parent is not None else candidate.parent_arm_id,
            "prompt_hash": content_hash(candidate.prompt_text or ""),
            "model": parent.model if parent is not None else None,
            "trial_cap": config.proposer.trial_cap,
        }
    return decide(store, candidate.id, approve=decision == "approve", actor=actor, **start)
