"""Langfuse mirror of turns, feedback and outcomes (interface; no-op until configured).

The chat path calls these methods after the store has committed the event;
they must return quickly and never raise (Langfuse being down never blocks a
chat). The Langfuse-backed implementation replaces :class:`NoopTracer` when
``LANGFUSE_PUBLIC_KEY`` and ``LANGFUSE_SECRET_KEY`` are set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from optimizer.store import AssignmentRecord, OutcomeRecord, TurnRecord

log = logging.getLogger(__name__)

__all__ = ["NoopTracer", "Tracer", "get_tracer"]


class Tracer:
    """What the chat path calls. Every method is best-effort and non-blocking."""

    enabled = False

    def trace_turn(
        self,
        turn: TurnRecord,
        assignment: AssignmentRecord,
        messages: Sequence[Mapping[str, Any]],
    ) -> str | None:
        """Send one trace for the turn; returns the trace id (to store on the turn) or None."""
        return None

    def score_feedback(self, turn_id: str, user_id: str, value: int | None, comment: str | None) -> None:
        """Mirror a vote (1/0) or its deletion (None) as the ``user_feedback`` score."""

    def score_outcome(self, outcome: OutcomeRecord) -> None:
        """Mirror a business outcome as a score on the session."""

    def flush(self, timeout_s: float | None = None) -> None:
        """Send what is queued, waiting at most ``timeout_s``."""

    def shutdown(self) -> None:
        """Flush with a bound and stop background threads."""


class NoopTracer(Tracer):
    """Used when Langfuse is not configured."""


_tracer: Tracer | None = None


def get_tracer() -> Tracer:
    """The process-wide tracer (a no-op until Langfuse support is configured)."""
    global _tracer
    if _tracer is None:
        _tracer = NoopTracer()
    return _tracer
