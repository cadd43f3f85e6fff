"""A round's trace: the proposer's own LLM calls, its candidates, gates and outcome.

The serving process hands in a :class:`~optimizer.proposer.hooks.ProposerTrace`
(Langfuse there, :mod:`chatbot.langfuse.proposer`); the optimizer never imports
it. :class:`RoundTrace` is what a round talks to: one trace per round, one
generation per rewrite, rationale, replay and judge call (model, messages,
reply, cost, latency), one event per candidate with its gates, and scores for
the candidate's verdict and the round's count of passing candidates.

Everything handed over is scrubbed first with the round's scrubber (the same
one that cleaned the failures: public knowledge and the parent's prompt are
allowed), so a reply that echoes an e-mail address does not leave as one. A
tracer that fails is logged and ignored: tracing never breaks a round.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from optimizer.clock import utcnow
from optimizer.privacy import Scrubber
from optimizer.proposer.hooks import Completion, ProposerTrace

__all__ = ["RoundTrace"]

log = logging.getLogger(__name__)

#: Score names on a round's trace.
CANDIDATE_SCORE = "proposer_candidate_passed"
ROUND_SCORE = "proposer_candidates_passed"


class RoundTrace:
    """One round's trace; every method is a no-op without a tracer and never raises.

    ``key`` identifies the round to the tracer (a fresh uuid by default; the
    Langfuse trace id derives from it); :attr:`trace_id` is what the tracer
    returned when the round opened (kept in the round's details).
    """

    def __init__(
        self,
        tracer: ProposerTrace | None,
        scrubber: Scrubber,
        *,
        experiment_id: str,
        parent_arm_id: str,
        source: str,
        model: str | None,
        key: str | None = None,
    ) -> None:
        self.tracer = tracer
        self.scrubber = scrubber
        self.key = key or uuid.uuid4().hex
        self.trace_id: str | None = None
        self.generations = 0
        if tracer is not None:
            self.trace_id = self._safe(
                "open",
                lambda: tracer.open_round(
                    self.key,
                    name=f"proposer-round:{source}",
                    started_at=utcnow(),
                    metadata={
                        "experiment": experiment_id,
                        "parent_arm": parent_arm_id,
                        "source": source,
                        "model": model,
                    },
                ),
            )

    def _safe(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:  # tracing never breaks a round
            log.warning("proposer: tracing (%s) failed", what, exc_info=True)
            return None

    def _scrub(self, text: str) -> str:
        return self.scrubber.scrub(text) if text else text

    def generation(
        self,
        name: str,
        messages: Sequence[Mapping[str, str]],
        result: Completion,
        *,
        model: str,
        started_at: datetime,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """One LLM call of the round (``name``: rewrite, rationale, replay, judge:…)."""
        tracer = self.tracer
        if tracer is None:
            return
        self.generations += 1
        scrubbed = [
            {"role": str(m.get("role", "")), "content": self._scrub(str(m.get("content", "")))}
            for m in messages
        ]
        self._safe(
            name,
            lambda: tracer.generation(
                self.key,
                name,
                model=model,
                messages=scrubbed,
                output=self._scrub(result.text),
                started_at=started_at,
                latency_ms=float(result.latency_ms),
                cost_usd=float(result.cost_usd or 0.0),
                error=result.error,
                metadata=dict(metadata or {}),
            ),
        )

    def candidate(
        self,
        candidate_id: str,
        *,
        status: str,
        reason: str | None,
        gates: Sequence[Mapping[str, Any]],
        rationale: str,
        arm_id: str | None,
    ) -> None:
        """A gated candidate: an event with its gates, and a BOOLEAN score of its verdict."""
        tracer = self.tracer
        if tracer is None:
            return
        passed = status in ("waiting", "started")
        meta = {
            "candidate_id": candidate_id,
            "status": status,
            "reason": reason,
            "arm_id": arm_id,
            "rationale": rationale,
            "gates": [
                {"name": g.get("name"), "passed": g.get("passed"), "detail": g.get("detail")}
                for g in gates
            ],
        }
        self._safe(
            "candidate",
            lambda: tracer.event(
                self.key,
                f"candidate:{status}",
                metadata=meta,
                level=None if passed else "WARNING",
            ),
        )
        self._safe(
            "candidate score",
            lambda: tracer.score(
                self.key,
                CANDIDATE_SCORE,
                1.0 if passed else 0.0,
                data_type="BOOLEAN",
                comment=reason or status,
                score_key=candidate_id,
            ),
        )

    def close(self, *, output: Mapping[str, Any], passed: int | None = None) -> None:
        """End the round's trace (``passed``: candidates that passed every gate)."""
        tracer = self.tracer
        if tracer is None:
            return
        if passed is not None:
            self._safe(
                "round score",
                lambda: tracer.score(self.key, ROUND_SCORE, float(passed), score_key="round"),
            )
        self._safe("close", lambda: tracer.close_round(self.key, output=dict(output)))
