"""Langfuse mirror of turns, feedback and outcomes; a no-op until configured.

The chat path calls a :class:`Tracer` after the store has committed an event.
Every method returns within microseconds and never raises: masking, building
spans and HTTP all happen on one background thread behind a bounded queue, and
the SDK's exporter thread sends the spans. A Langfuse host that is slow,
refuses or hangs therefore never reaches a chat request; at worst the mirror
loses what the queue could not hold, while the store keeps everything.

What goes to Langfuse:

* one trace per turn, id ``create_trace_id(seed=turn_id)``: a root span
  ``chat-turn`` (user message in, reply out) holding a generation ``llm``
  (messages, model, usage, cost, start and end from the turn's latency,
  ``completion_start_time`` from its time to first token), linked to the prompt
  version recorded by the last ``flywheel langfuse sync-prompts``. Session id,
  user id, tags and metadata (experiment, arm, prompt id/hash/version, few-shot
  ids, propensity, snapshot version, segment) go through ``propagate_attributes``;
* ``user_feedback``, a BOOLEAN score on the rated turn's trace, with the
  comment. Its id is derived from turn and user, so a changed vote replaces it
  (Langfuse upserts by score id) and a withdrawn vote deletes it
  (``DELETE /api/public/scores/{id}``, sent after any pending upsert);
* one NUMERIC score per business outcome on the session, its id derived from
  the outcome's idempotency key: a redelivery, even days later from another
  process, replaces the score instead of doubling it;
* ``kpi_reward`` on the session once its attribution window has closed
  (:func:`chatbot.langfuse.scores.score_session_rewards`).

Scores are posted by our worker through the SDK's REST client (the same
``POST /api/public/scores`` JSON batches the SDK's own score thread sends) so
that an upsert and a later delete of the same score are sent in order.

Texts (user message, reply, conversation messages except the system prompt,
vote comments) are masked with the few-shot scrubber when ``[langfuse] mask``
is on; ids (session, user, turn) are sent as they are.

Enabled by ``LANGFUSE_PUBLIC_KEY`` + ``LANGFUSE_SECRET_KEY`` (and
``LANGFUSE_BASE_URL`` or ``LANGFUSE_HOST``); ``[langfuse]`` in flywheel.toml
sets masking and the timeouts.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from chatbot.langfuse.credentials import LANGFUSE_TRACING_ENVIRONMENT, LangfuseCredentials
from chatbot.langfuse.ids import (
    FEEDBACK_SCORE,
    REWARD_SCORE,
    feedback_score_id,
    outcome_score_id,
    reward_score_id,
    trace_id_for_turn,
)
from chatbot.langfuse.masking import default_mask, mask_messages
from optimizer import settings
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config, LangfuseConfig
from optimizer.store import AssignmentRecord, OutcomeRecord, TurnRecord

if TYPE_CHECKING:
    from langfuse import Langfuse

log = logging.getLogger(__name__)

__all__ = ["LangfuseTracer", "NoopTracer", "Tracer", "get_tracer", "make_tracer"]


# -- the interface ------------------------------------------------------------
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

    def score_feedback(
        self, turn_id: str, user_id: str, value: int | None, comment: str | None
    ) -> None:
        """Mirror a vote (1/0) or its deletion (None) as the ``user_feedback`` score."""

    def score_outcome(self, outcome: OutcomeRecord) -> None:
        """Mirror a business outcome as a score on the session."""

    def score_session_reward(
        self,
        experiment_id: str,
        session_id: str,
        reward: float,
        *,
        at: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Mirror a session's final KPI reward; True if it was queued."""
        return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send what is queued, waiting at most ``timeout_s``; True if all was handed over."""
        return True

    def shutdown(self) -> None:
        """Flush with a bound and stop background threads."""


class NoopTracer(Tracer):
    """Used when Langfuse is not configured."""


# -- the Langfuse implementation ----------------------------------------------
@dataclass(frozen=True)
class _Score:
    body: dict[str, Any]


@dataclass(frozen=True)
class _Delete:
    score_id: str


_STOP = object()
#: Seconds shutdown allows itself, after the flush, to stop threads and close connections.
_CLOSE_S = 1.0


class LangfuseTracer(Tracer):
    """Mirror to Langfuse through the SDK, off the request path.

    ``config`` gives masking and timeouts; ``mask`` replaces the default
    scrubber; ``prompt_versions`` maps ``(prompt_id, prompt_hash)`` to the
    Langfuse prompt version (default: the file ``sync-prompts`` writes).

    >>> tracer = LangfuseTracer(LangfuseCredentials("pk-doc", "sk", "http://127.0.0.1:9"))
    >>> tracer.enabled, tracer.flush(1.0)  # nothing queued: flushed at once
    (True, True)
    >>> tracer.shutdown()
    """

    enabled = True

    def __init__(
        self,
        credentials: LangfuseCredentials,
        config: LangfuseConfig | None = None,
        *,
        mask: Callable[[str], str] | None = None,
        prompt_versions: Callable[[str, str], int | None] | None = None,
        max_queue: int = 10_000,
    ) -> None:
        import httpx
        from langfuse import Langfuse
        from opentelemetry.sdk.trace import TracerProvider

        self.credentials = credentials
        self.config = config or LangfuseConfig()
        # Cached: every turn re-sends the whole history, and the scrubber costs ~ms per message.
        self._mask = (
            functools.lru_cache(maxsize=4096)(mask or default_mask()) if self.config.mask else None
        )
        if prompt_versions is None:
            from chatbot.langfuse.prompt_sync import PromptVersionCache

            prompt_versions = PromptVersionCache().lookup
        self._prompt_version = prompt_versions
        # Our own provider: only our spans go to Langfuse, the app's global OTel setup is
        # untouched, and no atexit hook of its own can block exit (we shut down with a bound).
        self._provider = TracerProvider(shutdown_on_exit=False)
        # Ours so that shutdown can close it (the SDK leaves its own client open).
        self._http = httpx.Client(timeout=self.config.request_timeout_s)
        self.client: Langfuse = Langfuse(
            public_key=credentials.public_key,
            secret_key=credentials.secret_key,
            base_url=credentials.base_url,
            timeout=cast(int, self.config.request_timeout_s),  # float seconds work; hint says int
            httpx_client=self._http,
            tracer_provider=self._provider,
        )
        self._request_options: Any = {
            "timeout_in_seconds": self.config.request_timeout_s,
            "max_retries": 0,  # our worker decides about retries
        }
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.dropped = 0
        self._failing = False
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="flywheel-langfuse", daemon=True)
        self._worker.start()
        # Runs before the SDK's own exit hook (LIFO) and replaces it with a bounded shutdown.
        atexit.register(self.shutdown)
        log.info("Langfuse tracing on: %s", credentials.base_url)

    # -- what the chat path calls (enqueue only) ------------------------------
    def trace_turn(
        self,
        turn: TurnRecord,
        assignment: AssignmentRecord,
        messages: Sequence[Mapping[str, Any]],
    ) -> str | None:
        """Queue the turn's trace; returns its id, or None if the queue is full."""
        try:
            trace_id = trace_id_for_turn(turn.id)
            copied = [dict(m) for m in messages]  # the caller may keep mutating its list
            ok = self._submit(lambda: self._send_turn(trace_id, turn, assignment, copied))
            return trace_id if ok else None
        except Exception:
            log.warning("could not queue the trace of turn %s", turn.id, exc_info=True)
            return None

    def score_feedback(
        self, turn_id: str, user_id: str, value: int | None, comment: str | None
    ) -> None:
        try:
            score_id = feedback_score_id(turn_id, user_id)
            if value is None:
                self._submit(_Delete(score_id))
                return
            body = {
                "id": score_id,
                "traceId": trace_id_for_turn(turn_id),
                "name": FEEDBACK_SCORE,
                "value": float(value),
                "dataType": "BOOLEAN",
                "comment": comment,
                "timestamp": utcnow().isoformat(),
                "metadata": {"turn_id": turn_id, "user_id": user_id},
            }
            self._submit(_Score(body))
        except Exception:
            log.warning("could not queue the feedback score of turn %s", turn_id, exc_info=True)

    def score_outcome(self, outcome: OutcomeRecord) -> None:
        try:
            if outcome.session_id is None or not math.isfinite(outcome.value):
                # A session-less outcome still counts in the KPI; its reward score carries it.
                log.debug("outcome %s: no session id or no finite value; not scored", outcome.name)
                return
            body = {
                "id": outcome_score_id(outcome.idempotency_key),
                "sessionId": outcome.session_id,
                "name": outcome.name,
                "value": float(outcome.value),
                "dataType": "NUMERIC",
                "timestamp": as_utc(outcome.occurred_at or utcnow()).isoformat(),
                "metadata": _present(
                    source=outcome.source,
                    idempotency_key=outcome.idempotency_key,
                    user_id=outcome.user_id,
                ),
            }
            self._submit(_Score(body))
        except Exception:
            log.warning("could not queue the score of outcome %s", outcome.name, exc_info=True)

    def score_session_reward(
        self,
        experiment_id: str,
        session_id: str,
        reward: float,
        *,
        at: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        try:
            body = {
                "id": reward_score_id(experiment_id, session_id),
                "sessionId": session_id,
                "name": REWARD_SCORE,
                "value": float(reward),
                "dataType": "NUMERIC",
                # A stable timestamp makes a re-send replace the score, never duplicate it.
                "timestamp": as_utc(at or utcnow()).isoformat(),
                "metadata": _present(experiment_id=experiment_id, **dict(metadata or {})),
            }
            return self._submit(_Score(body))
        except Exception:
            log.warning("could not queue the reward of session %s", session_id, exc_info=True)
            return False

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` ran; a closed tracer queues nothing."""
        return self._closed

    def _submit(self, item: Any) -> bool:
        if self._closed:
            return False
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("Langfuse queue full: %d items dropped so far", self.dropped)
            return False

    # -- flushing -------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait at most ``timeout_s`` (default ``flush_timeout_s``) for queued work to go out.

        True if the queue drained and the span exporter finished in time; failed
        deliveries are logged by the worker and the exporter, not reported here.
        """
        if self._closed:
            return False
        timeout = self.config.flush_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        drained = threading.Event()
        try:
            self._queue.put(drained.set, timeout=max(timeout, 0.001))
        except queue.Full:
            return False
        if not drained.wait(max(deadline - time.monotonic(), 0)):
            return False
        # The SDK's force_flush ignores its timeout (it exports until the exporter's own
        # deadline), so it runs in a helper thread that we stop waiting for.
        return _bounded(self._provider.force_flush, deadline - time.monotonic())

    def shutdown(self) -> None:
        """Flush for at most ``flush_timeout_s``, then stop within one more second.

        What is still queued then is dropped (the store has it all).
        """
        if self._closed:
            return
        atexit.unregister(self.shutdown)
        self.flush(self.config.flush_timeout_s)
        self._closed = True
        with contextlib.suppress(queue.Full):  # a full queue: the worker sees _closed anyway
            self._queue.put_nowait(_STOP)
        deadline = time.monotonic() + _CLOSE_S
        self._worker.join(max(deadline - time.monotonic(), 0))
        # The SDK's shutdown first unregisters its own exit hook, then flushes without a bound.
        _bounded(self.client.shutdown, deadline - time.monotonic())
        _bounded(self._provider.shutdown, deadline - time.monotonic())
        self._http.close()  # also ends a request still hanging in the worker
        _forget_sdk_client(self.credentials.public_key)

    # -- the worker -----------------------------------------------------------
    def _run(self) -> None:
        carry: Any = None
        while True:
            item = carry if carry is not None else self._queue.get()
            carry = None
            if item is _STOP or self._closed:
                return
            try:
                if isinstance(item, _Score):
                    batch = [item.body]
                    # Coalesce scores queued back to back into one request, keeping order.
                    while len(batch) < 100:
                        try:
                            nxt = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(nxt, _Score):
                            batch.append(nxt.body)
                        else:
                            carry = nxt
                            break
                    self._post_scores(batch)
                elif isinstance(item, _Delete):
                    self._delete_score(item.score_id)
                else:
                    item()
            except Exception:
                log.warning("Langfuse mirror task failed", exc_info=True)

    def _post_scores(self, batch: list[dict[str, Any]]) -> None:
        if self._mask is not None:
            for body in batch:
                if body.get("comment"):
                    body["comment"] = self._mask(body["comment"])
        env = settings.env(LANGFUSE_TRACING_ENVIRONMENT)
        payload = [
            {k: v for k, v in {"environment": env, **b}.items() if v is not None} for b in batch
        ]

        def post() -> None:
            result = self.client.api.scores.create(
                request=cast(Any, payload), request_options=self._request_options
            )
            if getattr(result, "rejected", 0):  # HTTP 207: some accepted, some not (not retried)
                errors = "; ".join(e.message for e in getattr(result, "errors", []))
                log.warning(
                    "Langfuse rejected %s of %d scores: %s", result.rejected, len(batch), errors
                )

        self._call(post, f"{len(batch)} score(s)")

    def _delete_score(self, score_id: str) -> None:
        from langfuse.api import NotFoundError

        def delete() -> None:
            # Not found = never created or already gone: the goal is reached either way.
            with contextlib.suppress(NotFoundError):
                self.client.api.scores.delete(score_id, request_options=self._request_options)

        self._call(delete, f"deletion of score {score_id}")

    def _call(self, fn: Callable[[], Any], what: str) -> None:
        """One attempt plus one retry for transport errors and 5xx/429; logs outages once."""
        import httpx
        from langfuse.api.core import ApiError

        for attempt in (1, 2):
            try:
                fn()
                if self._failing:
                    log.info("Langfuse reachable again")
                    self._failing = False
                return
            except (httpx.TransportError, ApiError) as exc:
                status = getattr(exc, "status_code", None)
                retryable = status is None or status >= 500 or status == 429
                if attempt == 1 and retryable and not self._closed:
                    time.sleep(0.5)
                    continue
                if not self._failing:
                    log.warning("Langfuse unavailable, dropping %s: %s", what, exc)
                    self._failing = True
                return

    def _send_turn(
        self,
        trace_id: str,
        turn: TurnRecord,
        assignment: AssignmentRecord,
        messages: list[dict[str, Any]],
    ) -> None:
        from langfuse import (
            LangfuseGeneration,
            LangfuseOtelSpanAttributes,
            LangfuseSpan,
            propagate_attributes,
        )
        from opentelemetry import trace as otel

        mask = self._mask or (lambda s: s)
        end = as_utc(turn.created_at or utcnow())
        latency = timedelta(milliseconds=max(turn.latency_ms or 0.0, 0.0))
        start = end - latency
        first_token = (
            start + timedelta(milliseconds=turn.ttft_ms) if turn.ttft_ms is not None else None
        )
        version = self._prompt_version(turn.prompt_id, turn.prompt_hash)
        metadata = {
            "experiment": turn.experiment_id,
            "arm": turn.arm_id,
            "prompt_id": turn.prompt_id,
            "prompt_hash": turn.prompt_hash,
            "prompt_version": version,
            "fewshot_ids": ",".join(turn.fewshot_ids) or None,
            "propensity": assignment.propensity,
            "snapshot_version": assignment.snapshot_version,
            "segment": assignment.segment,
            "turn_id": turn.id,
        }
        usage = _usage(turn)
        level: Literal["ERROR"] | None = "ERROR" if turn.error else None
        with propagate_attributes(
            user_id=turn.user_id,
            session_id=turn.session_id,
            tags=["flywheel", f"experiment:{turn.experiment_id}", f"arm:{turn.arm_id}"],
            metadata=_present(**metadata),
            trace_name="chat-turn",
            prompt={"name": turn.prompt_id, "version": version} if version is not None else None,
        ):
            # The SDK starts observations "now"; the turn already happened, so spans are started
            # on the SDK's tracer with the real start time and wrapped in its public classes.
            tracer = self.client._otel_tracer
            parent = otel.NonRecordingSpan(
                otel.SpanContext(
                    trace_id=int(trace_id, 16),
                    span_id=_parent_span_id(turn.id),
                    is_remote=False,
                    trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED),
                )
            )
            ctx = otel.set_span_in_context(parent)
            root_span = tracer.start_span("chat-turn", context=ctx, start_time=_ns(start))
            root_span.set_attribute(LangfuseOtelSpanAttributes.AS_ROOT, True)
            root = LangfuseSpan(
                otel_span=root_span,
                langfuse_client=self.client,
                input=mask(turn.user_message),
                output=mask(turn.reply),
                level=level,
                status_message=turn.error,
            )
            gen_span = tracer.start_span(
                "llm", context=otel.set_span_in_context(root_span, ctx), start_time=_ns(start)
            )
            generation = LangfuseGeneration(
                otel_span=gen_span,
                langfuse_client=self.client,
                input=mask_messages(messages, mask),
                output=mask(turn.reply),
                model=turn.model,
                usage_details=usage or None,
                cost_details={"total": turn.cost} if turn.cost is not None else None,
                completion_start_time=first_token,
                metadata={"fewshot_ids": list(turn.fewshot_ids), "latency_ms": turn.latency_ms},
                level=level,
                status_message=turn.error,
            )
            generation.end(end_time=_ns(end))
            root.end(end_time=_ns(end))


def _parent_span_id(turn_id: str) -> int:
    # A never-sent parent fixes the trace id; AS_ROOT makes "chat-turn" the trace's root.
    return int(hashlib.sha256(f"parent:{turn_id}".encode()).hexdigest()[:16], 16) or 1


def _forget_sdk_client(public_key: str) -> None:
    """Drop the SDK's per-key singleton once shut down.

    The SDK hands every later ``Langfuse(public_key=…)`` in the process the same
    (now shut down) resources, which would silently drop a new tracer's data.
    """
    try:
        from langfuse._client.resource_manager import LangfuseResourceManager

        with LangfuseResourceManager._lock:
            LangfuseResourceManager._instances.pop(public_key, None)
    except (ImportError, AttributeError):  # another SDK version: nothing to forget
        pass


def _usage(turn: TurnRecord) -> dict[str, int]:
    usage = {"input": turn.prompt_tokens, "output": turn.completion_tokens}
    known = {k: v for k, v in usage.items() if v is not None}
    if len(known) == 2:
        known["total"] = sum(known.values())
    return known


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1e9)


def _bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s`` for it; True if it finished."""
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except Exception:
            log.debug("%s failed", getattr(fn, "__name__", fn), exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name="flywheel-langfuse-flush", daemon=True).start()
    return done.wait(max(timeout_s, 0))


# -- construction -------------------------------------------------------------
def make_tracer(config: Config | None = None) -> Tracer:
    """A :class:`LangfuseTracer` when credentials are set, else a :class:`NoopTracer`."""
    credentials = LangfuseCredentials.from_env()
    if credentials is None:
        return NoopTracer()
    try:
        return LangfuseTracer(credentials, config.langfuse if config is not None else None)
    except Exception as exc:  # a broken SDK install must not stop the chat
        log.warning("Langfuse tracing off: could not start the client: %s", exc)
        return NoopTracer()


_tracer: Tracer | None = None
_tracer_lock = threading.Lock()


def get_tracer(config: Config | None = None) -> Tracer:
    """The process-wide tracer, made on first use (pass the config for ``[langfuse]``)."""
    global _tracer
    with _tracer_lock:
        if _tracer is None or getattr(_tracer, "closed", False):
            _tracer = make_tracer(config)
        return _tracer
