"""Webhook alerts: what an operator must hear about without watching the dashboard.

``[[alerts]]`` tables in ``flywheel.toml`` name a URL and the events it wants
(:data:`ALERT_EVENTS`)::

    [[alerts]]
    url = "https://hooks.slack.com/services/T000/B000/XXXX"
    events = ["guardrail_pause", "srm", "promotion"]     # default: all of them
    secret_env = "FLYWHEEL_ALERT_SECRET"                 # optional HMAC key, read from the env

The body is Slack-compatible JSON: ``{"text": "..."}`` plus structured fields
(``event``, ``experiment_id``, ``arm``, ``details``, ``at``, ``id``) that other
receivers read. With a secret, ``X-Flywheel-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the exact body bytes under the secret (verify with
:func:`sign` and :func:`hmac.compare_digest`); ``X-Flywheel-Event`` names the event.

Delivery never blocks the caller: :meth:`AlertDeliverer.emit` puts the alert on
a bounded queue and returns; one daemon thread posts it, retrying a failure
(connection refused, timeout, a 5xx or 429) with exponential backoff up to
``retries`` times; a 4xx other than 429 is final. Every attempt is logged and
every final outcome kept (:attr:`AlertDeliverer.outcomes`, and the ``audit``
table when a store is given: action ``alert_delivered`` or ``alert_failed``). A
full queue drops the alert with a warning rather than slow the chat or the
optimizer down.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from optimizer.clock import utcnow

__all__ = [
    "ALERT_EVENTS",
    "Alert",
    "AlertDeliverer",
    "AlertOutcome",
    "alerts_from_run",
    "sign",
]

log = logging.getLogger(__name__)

#: Events a webhook can subscribe to.
ALERT_EVENTS = (
    "candidate_waiting",
    "guardrail_pause",
    "model_restart",
    "promotion",
    "srm",
    "stop_rule",
)
_SIGNATURE_HEADER = "X-Flywheel-Signature"
_EVENT_HEADER = "X-Flywheel-Event"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=`` + hex HMAC-SHA256.

    >>> sign("k", b"{}")[:7]
    'sha256='
    """
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Alert:
    """One event to announce; ``text`` is what a person reads (Slack's ``text``)."""

    event: str
    text: str
    experiment_id: str | None = None
    arm: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=utcnow)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.event not in ALERT_EVENTS:
            raise ValueError(f"event must be one of {list(ALERT_EVENTS)}, got {self.event!r}")

    def payload(self) -> dict[str, Any]:
        """The JSON body: Slack's ``text`` plus the structured fields."""
        return {
            "text": self.text,
            "event": self.event,
            "experiment_id": self.experiment_id,
            "arm": self.arm,
            "details": dict(self.details),
            "at": self.at.isoformat(),
            "id": self.id,
        }


@dataclass(frozen=True)
class AlertOutcome:
    """How one alert fared at one receiver."""

    alert_id: str
    event: str
    url: str
    delivered: bool
    attempts: int
    status: int | None
    error: str | None
    at: datetime


class AlertDeliverer:
    """Posts alerts to the configured webhooks from a background thread.

    ``targets`` are :class:`~optimizer.config.AlertConfig` objects (or anything
    with ``url``, ``events``, ``secret_env``, ``timeout_s``, ``retries``,
    ``backoff_s``). ``store`` (optional) receives one audit row per outcome.
    ``environ`` is where secrets are read (default ``os.environ``).

    >>> d = AlertDeliverer([])
    >>> d.emit(Alert("promotion", "arm b promoted"))
    0
    >>> d.close()
    """

    def __init__(
        self,
        targets: Iterable[Any],
        *,
        store: Any | None = None,
        environ: Mapping[str, str] | None = None,
        max_queue: int = 1000,
        keep_outcomes: int = 500,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.targets = tuple(targets)
        self.store = store
        self.environ = environ if environ is not None else os.environ
        self.max_queue = max_queue
        self.outcomes: deque[AlertOutcome] = deque(maxlen=keep_outcomes)
        self.dropped = 0
        self._sleep = sleep
        self._queue: queue.Queue[tuple[Any, Alert] | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- the caller's side: never blocks --------------------------------------------------
    def emit(self, alert: Alert) -> int:
        """Queue ``alert`` for every target subscribed to its event; returns how many."""
        wanted = [t for t in self.targets if alert.event in t.events]
        queued = 0
        for target in wanted:
            try:
                self._queue.put_nowait((target, alert))
                queued += 1
            except queue.Full:
                self.dropped += 1
                log.warning("alerts: queue full, dropped %s alert for %s", alert.event, target.url)
        if queued:
            self._ensure_thread()
        return queued

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is delivered or given up (tests, CLI exit)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after what is queued (waiting at most ``timeout_s``)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    # -- the thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._work, name="flywheel-alerts", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        with httpx.Client() as client:
            while True:
                item = self._queue.get()
                try:
                    if item is None:
                        return
                    target, alert = item
                    outcome = self._deliver(client, target, alert)
                    self._keep(outcome)
                except Exception:  # the thread must outlive any one bad alert
                    log.exception("alerts: delivery crashed")
                finally:
                    self._queue.task_done()

    def _deliver(self, client: httpx.Client, target: Any, alert: Alert) -> AlertOutcome:
        body = json.dumps(alert.payload(), separators=(",", ":"), sort_keys=True).encode("utf-8")
        headers = {"Content-Type": "application/json", _EVENT_HEADER: alert.event}
        if target.secret_env:
            secret = self.environ.get(target.secret_env, "")
            if not secret:
                log.warning(
                    "alerts: %s is not set; sending %s to %s unsigned",
                    target.secret_env,
                    alert.event,
                    target.url,
                )
            else:
                headers[_SIGNATURE_HEADER] = sign(secret, body)
        status: int | None = None
        error: str | None = None
        attempts = 0
        for attempt in range(target.retries + 1):
            attempts = attempt + 1
            try:
                response = client.post(
                    target.url, content=body, headers=headers, timeout=target.timeout_s
                )
                status = response.status_code
                if 200 <= status < 300:
                    log.info(
                        "alerts: %s delivered to %s (HTTP %d, attempt %d)",
                        alert.event,
                        target.url,
                        status,
                        attempts,
                    )
                    return AlertOutcome(
                        alert.id, alert.event, target.url, True, attempts, status, None, utcnow()
                    )
                error = f"HTTP {status}"
                if 400 <= status < 500 and status != 429:
                    break  # the receiver refuses this alert: retrying will not help
            except httpx.HTTPError as exc:
                status, error = None, f"{type(exc).__name__}: {exc}"
            log.warning(
                "alerts: %s to %s failed (attempt %d of %d): %s",
                alert.event,
                target.url,
                attempts,
                target.retries + 1,
                error,
            )
            if attempt < target.retries:
                self._sleep(target.backoff_s * 2**attempt)
        log.error(
            "alerts: gave up on %s to %s after %d attempts", alert.event, target.url, attempts
        )
        return AlertOutcome(
            alert.id, alert.event, target.url, False, attempts, status, error, utcnow()
        )

    def _keep(self, outcome: AlertOutcome) -> None:
        self.outcomes.append(outcome)
        if self.store is None:
            return
        try:
            self.store.audit(
                "alerts",
                "alert_delivered" if outcome.delivered else "alert_failed",
                outcome.url,
                {
                    "alert_id": outcome.alert_id,
                    "event": outcome.event,
                    "attempts": outcome.attempts,
                    "status": outcome.status,
                    "error": outcome.error,
                },
            )
        except Exception:  # a store outage must not stop alerting
            log.exception("alerts: could not record the outcome of %s", outcome.alert_id)


def alerts_from_run(run: Any, *, new_stop: bool, srm_new: bool) -> list[Alert]:
    """The alerts an optimizer run raises (:class:`~optimizer.refit.OptimizerRun`).

    ``new_stop``: the stop recommendation was recorded in this run (not repeated);
    ``srm_new``: the SRM warning switched on in this run (an alert per episode, not per run).
    """
    exp = run.experiment_id
    out = [
        Alert(
            "guardrail_pause",
            f"Flywheel {exp}: arm {arm!r} paused by a guardrail",
            exp,
            arm,
            {"guardrails": run.summary.get("arms", {}).get(arm, {}).get("guardrails", {})},
            at=run.now,
        )
        for arm in run.paused
    ]
    if run.promoted:
        out.append(
            Alert(
                "promotion",
                f"Flywheel {exp}: arm {run.promoted!r} promoted to champion (stop rule)",
                exp,
                run.promoted,
                {"recommendation": run.recommendation or {}},
                at=run.now,
            )
        )
    elif (
        run.recommendation is not None
        and new_stop
        and run.recommendation.get("arm") != run.summary.get("champion")
    ):  # the stop rule confirming the champion needs nobody's attention
        arm = run.recommendation.get("arm")
        out.append(
            Alert(
                "stop_rule",
                f"Flywheel {exp}: the stop rule recommends arm {arm!r} (promote it to act)",
                exp,
                arm,
                {"recommendation": run.recommendation},
                at=run.now,
            )
        )
    if srm_new:
        out.append(
            Alert(
                "srm",
                f"Flywheel {exp}: sample ratio mismatch (p = {run.srm.get('p_value')}): "
                "check assignment, logging and bot filtering",
                exp,
                None,
                {"srm": run.srm},
                at=run.now,
            )
        )
    return out
