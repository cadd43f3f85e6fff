"""Names and deterministic ids of what we send to Langfuse.

Ids derive from our own keys, so a re-send replaces rather than doubles, from any
process and days later; the prefix lets an import tell our scores from people's.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "FEEDBACK_SCORE",
    "REWARD_SCORE",
    "SCORE_ID_PREFIX",
    "feedback_score_id",
    "outcome_score_id",
    "reward_score_id",
    "trace_id_for_turn",
]

#: Name of the thumbs score on a turn's trace.
FEEDBACK_SCORE = "user_feedback"
#: Name of the session's final KPI reward score.
REWARD_SCORE = "kpi_reward"
#: Prefix of every score id we derive, so imports can tell our scores from people's.
SCORE_ID_PREFIX = "fw-"


def trace_id_for_turn(turn_id: str) -> str:
    """Langfuse trace id of a turn: ``Langfuse.create_trace_id(seed=turn_id)``.

    >>> trace_id_for_turn("run-1") == trace_id_for_turn("run-1") and len(trace_id_for_turn("x"))
    32
    """
    # Same derivation as the SDK's create_trace_id(seed=...), without importing it on the chat path.
    return hashlib.sha256(turn_id.encode("utf-8")).digest()[:16].hex()


def _derived_id(kind: str, *parts: str) -> str:
    digest = hashlib.sha256("\x1f".join((kind, *parts)).encode("utf-8")).hexdigest()[:32]
    return f"{SCORE_ID_PREFIX}{kind}-{digest}"


def feedback_score_id(turn_id: str, user_id: str) -> str:
    """Id of a user's ``user_feedback`` score on a turn: a changed vote replaces it."""
    return _derived_id("fb", turn_id, user_id)


def outcome_score_id(idempotency_key: str) -> str:
    """Id of an outcome's score: the same delivery, re-sent, replaces rather than doubles."""
    return _derived_id("oc", idempotency_key)


def reward_score_id(experiment_id: str, session_id: str) -> str:
    """Id of a session's ``kpi_reward`` score."""
    return _derived_id("kpi", experiment_id, session_id)
