"""The proposer's rounds in Langfuse: one trace per round, its LLM calls as generations.

:class:`LangfuseProposerTrace` implements :class:`optimizer.proposer.ProposerTrace`
on a :class:`~chatbot.langfuse.tracer.LangfuseTracer`, so a round is mirrored the
way a chat turn is: off the caller's thread (the tracer's worker builds the spans,
the SDK's exporter sends them), and never raising. A round's trace
(``trace_id_for_round(key)``, named ``proposer-round:<source>``, tagged
``proposer``) holds a root span open for the round's whole length, one
``generation`` per rewrite, rationale, replay and judge call (model, scrubbed
messages and reply, cost, start and end from its latency, level ERROR on a
failed call), one ``event`` per candidate with its gates, and scores: a BOOLEAN
``proposer_candidate_passed`` per candidate (on its event) and a NUMERIC
``proposer_candidates_passed`` for the round. Texts arrive scrubbed by the
optimizer; they are sent as they are (no second masking).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from chatbot.langfuse.ids import proposer_score_id, trace_id_for_round
from optimizer.clock import as_utc, utcnow

if TYPE_CHECKING:
    from chatbot.langfuse.tracer import LangfuseTracer

__all__ = ["LangfuseProposerTrace"]

log = logging.getLogger(__name__)

#: Rounds whose close never came (a crashed job) are ended after this many open ones.
_MAX_OPEN = 32


class _Open:
    """A round's root span and what its children need (touched on the worker thread only)."""

    def __init__(self, span: Any, wrapper: Any, attrs: dict[str, Any]) -> None:
        self.span = span
        self.wrapper = wrapper
        self.attrs = attrs
        self.candidates: dict[str, str] = {}  # candidate id -> its event's observation id


class LangfuseProposerTrace:
    """See the module docstring. ``tracer`` owns the queue, the worker and the SDK client."""

    def __init__(self, tracer: LangfuseTracer) -> None:
        self.tracer = tracer
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()

    # -- the ProposerTrace protocol (enqueue only) ----------------------------
    def open_round(
        self, key: str, *, name: str, started_at: datetime, metadata: Mapping[str, Any]
    ) -> str | None:
        trace_id = trace_id_for_round(key)
        meta = {k: v for k, v in metadata.items() if v is not None}
        tags = ["flywheel", "proposer"]
        if "experiment" in meta:
            tags.append(f"experiment:{meta['experiment']}")
        attrs = {
            "trace_name": name,
            "tags": tags,
            "metadata": {k: str(v)[:180] for k, v in meta.items()},
        }
        ok = self.tracer.submit(lambda: self._send_open(key, trace_id, started_at, meta, attrs))
        return trace_id if ok else None

    def generation(
        self,
        key: str,
        name: str,
        *,
        model: str,
        messages: Sequence[Mapping[str, str]],
        output: str,
        started_at: datetime,
        latency_ms: float,
        cost_usd: float,
        error: str | None,
        metadata: Mapping[str, Any],
    ) -> None:
        copied = [dict(m) for m in messages]
        meta = dict(metadata)
        self.tracer.submit(
            lambda: self._send_generation(
                key, name, model, copied, output, started_at, latency_ms, cost_usd, error, meta
            )
        )

    def event(
        self,
        key: str,
        name: str,
        *,
        metadata: Mapping[str, Any],
        level: Literal["WARNING", "ERROR"] | None = None,
    ) -> None:
        meta = dict(metadata)
        at = utcnow()
        self.tracer.submit(lambda: self._send_event(key, name, meta, level, at))

    def score(
        self,
        key: str,
        name: str,
        value: float,
        *,
        data_type: Literal["NUMERIC", "BOOLEAN"] = "NUMERIC",
        comment: str | None = None,
        score_key: str = "",
    ) -> None:
        at = utcnow()
        # Queued behind the event it may point at, so the observation id is known by then.
        self.tracer.submit(
            lambda: self._send_score(key, name, value, data_type, comment, score_key, at)
        )

    def close_round(self, key: str, *, output: Mapping[str, Any]) -> None:
        out = dict(output)
        at = utcnow()
        self.tracer.submit(lambda: self._send_close(key, out, at))

    # -- on the tracer's worker thread ----------------------------------------
    def _context(self, key: str) -> Any:
        """The OTel context whose parent is the round's root span (None: not open)."""
        from opentelemetry import trace as otel

        with self._lock:
            opened = self._open.get(key)
        return (opened, otel.set_span_in_context(opened.span)) if opened else (None, None)

    def _send_open(
        self,
        key: str,
        trace_id: str,
        started_at: datetime,
        metadata: dict[str, Any],
        attrs: dict[str, Any],
    ) -> None:
        from langfuse import LangfuseOtelSpanAttributes, LangfuseSpan, propagate_attributes
        from opentelemetry import trace as otel

        client = self.tracer.client
        parent = otel.NonRecordingSpan(
            otel.SpanContext(
                trace_id=int(trace_id, 16),
                span_id=_parent_span_id(key),
                is_remote=False,
                trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED),
            )
        )
        with propagate_attributes(**attrs):
            span = client._otel_tracer.start_span(
                attrs["trace_name"],
                context=otel.set_span_in_context(parent),
                start_time=_ns(as_utc(started_at)),
            )
            span.set_attribute(LangfuseOtelSpanAttributes.AS_ROOT, True)
            wrapper = LangfuseSpan(otel_span=span, langfuse_client=client, input=metadata)
        stale: list[_Open] = []
        with self._lock:
            self._open[key] = _Open(span, wrapper, attrs)
            while len(self._open) > _MAX_OPEN:
                stale.append(self._open.pop(next(iter(self._open))))
        for old in stale:
            old.wrapper.update(level="WARNING", status_message="round never closed")
            old.wrapper.end()

    def _send_generation(
        self,
        key: str,
        name: str,
        model: str,
        messages: list[dict[str, Any]],
        output: str,
        started_at: datetime,
        latency_ms: float,
        cost_usd: float,
        error: str | None,
        metadata: dict[str, Any],
    ) -> None:
        from langfuse import LangfuseGeneration, propagate_attributes

        opened, ctx = self._context(key)
        if opened is None:
            log.debug("proposer trace %s: generation %s after the round closed", key, name)
            return
        start = as_utc(started_at)
        end = start + timedelta(milliseconds=max(latency_ms, 0.0))
        with propagate_attributes(**opened.attrs):
            span = self.tracer.client._otel_tracer.start_span(
                name, context=ctx, start_time=_ns(start)
            )
            LangfuseGeneration(
                otel_span=span,
                langfuse_client=self.tracer.client,
                input=messages,
                output=output,
                model=model,
                cost_details={"total": cost_usd},
                metadata={**metadata, "latency_ms": latency_ms},
                level="ERROR" if error else None,
                status_message=error,
            ).end(end_time=_ns(end))

    def _send_event(
        self,
        key: str,
        name: str,
        metadata: dict[str, Any],
        level: Literal["WARNING", "ERROR"] | None,
        at: datetime,
    ) -> None:
        from langfuse import LangfuseEvent, propagate_attributes

        opened, ctx = self._context(key)
        if opened is None:
            return
        with propagate_attributes(**opened.attrs):
            span = self.tracer.client._otel_tracer.start_span(
                name, context=ctx, start_time=_ns(as_utc(at))
            )
            event = LangfuseEvent(
                otel_span=span,
                langfuse_client=self.tracer.client,
                metadata=metadata,
                level=level,
                status_message=metadata.get("reason"),
            )
            event.end(end_time=_ns(as_utc(at)))
        candidate = metadata.get("candidate_id")
        if candidate:
            opened.candidates[str(candidate)] = event.id

    def _send_score(
        self,
        key: str,
        name: str,
        value: float,
        data_type: str,
        comment: str | None,
        score_key: str,
        at: datetime,
    ) -> None:
        with self._lock:
            opened = self._open.get(key)
        observation = opened.candidates.get(score_key) if opened is not None else None
        body = {
            "id": proposer_score_id(key, name, score_key),
            "traceId": trace_id_for_round(key),
            "observationId": observation,
            "name": name,
            "value": float(value),
            "dataType": data_type,
            "comment": comment,
            "timestamp": as_utc(at).isoformat(),
            "metadata": {"round_key": key, "key": score_key} if score_key else {"round_key": key},
        }
        # Scores go out through the tracer's own batching (ordered, retried once).
        self.tracer.post_scores([{k: v for k, v in body.items() if v is not None}])

    def _send_close(self, key: str, output: dict[str, Any], at: datetime) -> None:
        with self._lock:
            opened = self._open.pop(key, None)
        if opened is None:
            return
        opened.wrapper.update(output=output)
        opened.wrapper.end(end_time=_ns(as_utc(at)))


def _parent_span_id(key: str) -> int:
    # A never-sent parent fixes the trace id; AS_ROOT makes the round's span the trace's root.
    return int(hashlib.sha256(f"parent:proposer:{key}".encode()).hexdigest()[:16], 16) or 1


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1e9)
