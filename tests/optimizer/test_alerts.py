"""Webhook alerts against a recording HTTP server on 127.0.0.1."""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from optimizer.alerts import ALERT_EVENTS, Alert, AlertDeliverer, sign
from optimizer.config import AlertConfig, load_config
from optimizer.errors import ConfigError
from optimizer.refit import run_optimizer
from optimizer.store import Store
from tests.support.optimizer_events import EXPERIMENT, add_sessions, make_config, register


class Recorder:
    """An HTTP receiver that records every POST and answers with scripted statuses."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.requests.append({"headers": dict(self.headers), "body": body})
                status = recorder.statuses.pop(0) if recorder.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_delivers_slack_json_signed_with_the_secret_from_the_environment(
    recorder: Recorder,
) -> None:
    target = AlertConfig(url=recorder.url, secret_env="HOOK_SECRET", backoff_s=0)
    deliverer = AlertDeliverer([target], environ={"HOOK_SECRET": "s3cret"})
    try:
        assert deliverer.emit(Alert("promotion", "arm b promoted", "exp", "b", {"p": 0.97})) == 1
        assert deliverer.flush(5)
    finally:
        deliverer.close()
    [req] = recorder.requests
    payload = json.loads(req["body"])
    assert payload["text"] == "arm b promoted"
    assert payload["event"] == "promotion" and payload["arm"] == "b"
    assert payload["details"] == {"p": 0.97}
    assert req["headers"]["X-Flywheel-Event"] == "promotion"
    assert hmac.compare_digest(req["headers"]["X-Flywheel-Signature"], sign("s3cret", req["body"]))
    assert not hmac.compare_digest(
        req["headers"]["X-Flywheel-Signature"], sign("other", req["body"])
    )
    [outcome] = deliverer.outcomes
    assert outcome.delivered and outcome.attempts == 1 and outcome.status == 200


def test_only_subscribed_events_are_sent(recorder: Recorder) -> None:
    deliverer = AlertDeliverer([AlertConfig(url=recorder.url, events=("srm",))])
    try:
        assert deliverer.emit(Alert("promotion", "not wanted")) == 0
        assert deliverer.emit(Alert("srm", "wanted")) == 1
        assert deliverer.flush(5)
    finally:
        deliverer.close()
    assert [json.loads(r["body"])["text"] for r in recorder.requests] == ["wanted"]
    assert "X-Flywheel-Signature" not in recorder.requests[0]["headers"]


def test_a_5xx_is_retried_with_backoff_and_then_delivered() -> None:
    recorder = Recorder(statuses=[503, 500])
    waits: list[float] = []
    deliverer = AlertDeliverer(
        [AlertConfig(url=recorder.url, retries=3, backoff_s=0.5)], sleep=waits.append
    )
    try:
        deliverer.emit(Alert("stop_rule", "stop"))
        assert deliverer.flush(5)
    finally:
        deliverer.close()
        recorder.close()
    assert len(recorder.requests) == 3
    assert waits == [0.5, 1.0]  # exponential backoff
    [outcome] = deliverer.outcomes
    assert outcome.delivered and outcome.attempts == 3


def test_a_4xx_is_final() -> None:
    recorder = Recorder(statuses=[404])
    deliverer = AlertDeliverer([AlertConfig(url=recorder.url, retries=3, backoff_s=0)])
    try:
        deliverer.emit(Alert("srm", "srm"))
        assert deliverer.flush(5)
    finally:
        deliverer.close()
        recorder.close()
    [outcome] = deliverer.outcomes
    assert not outcome.delivered and outcome.attempts == 1 and outcome.error == "HTTP 404"


def test_receiver_down_never_blocks_the_caller_and_the_failure_is_kept(
    sqlite_store: Store,
) -> None:
    url = f"http://127.0.0.1:{_free_port()}/hook"  # nothing listens there
    waits: list[float] = []
    deliverer = AlertDeliverer(
        [AlertConfig(url=url, retries=2, backoff_s=0.2, timeout_s=1)],
        store=sqlite_store,
        sleep=lambda s: (waits.append(s), time.sleep(0.05)),
    )
    try:
        started = time.perf_counter()
        for _ in range(20):
            deliverer.emit(Alert("guardrail_pause", "paused", "exp", "b"))
        assert time.perf_counter() - started < 0.2  # emit only queues
        assert deliverer.flush(30)
    finally:
        deliverer.close()
    assert len(deliverer.outcomes) == 20
    assert all(not o.delivered and o.attempts == 3 for o in deliverer.outcomes)
    assert "ConnectError" in (deliverer.outcomes[0].error or "")
    rows = sqlite_store.frame("audit_events")
    failed = rows[rows["action"] == "alert_failed"]
    assert len(failed) == 20 and set(failed["target"]) == {url}


def test_a_full_queue_drops_rather_than_blocks() -> None:
    gate = threading.Event()
    deliverer = AlertDeliverer(
        [AlertConfig(url="http://127.0.0.1:9/x", retries=1, backoff_s=1)],
        max_queue=2,
        sleep=lambda s: gate.wait(5),
    )
    try:
        results = [deliverer.emit(Alert("srm", str(i))) for i in range(10)]
        assert sum(results) < 10 and deliverer.dropped == 10 - sum(results)
    finally:
        gate.set()
        deliverer.close()


def test_config_reads_alert_tables(tmp_path: Any) -> None:
    path = tmp_path / "flywheel.toml"
    path.write_text(
        '[[alerts]]\nurl = "https://hooks.example.com/x"\nevents = ["srm", "promotion"]\n'
        'secret_env = "FLYWHEEL_ALERT_SECRET"\n'
    )
    config = load_config(path, environ=False)
    assert config.alerts[0].events == ("srm", "promotion")
    assert set(AlertConfig(url="http://x").events) == set(ALERT_EVENTS)
    path.write_text('[[alerts]]\nurl = "https://x"\nevents = ["lunch"]\n')
    with pytest.raises(ConfigError, match=r"alerts\.0\.events"):
        load_config(path, environ=False)
    path.write_text('[[alerts]]\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError, match=r"alerts\.0\.url"):
        load_config(path, environ=False)


def test_the_optimizer_job_alerts_a_promotion_once(store: Store, recorder: Recorder) -> None:
    from datetime import timedelta

    from tests.support.optimizer_events import T0

    cfg = make_config(("a", "b"), champion="b", stop_expected_loss=0.01, auto_promote=True)
    register(store, cfg)
    add_sessions(store, "a", 300, conversions=90)
    add_sessions(store, "b", 300, conversions=15)
    deliverer = AlertDeliverer([AlertConfig(url=recorder.url, backoff_s=0)])
    now = T0 + timedelta(days=30)
    try:
        run = run_optimizer(store, cfg, now=now, random_state=0, alerts=deliverer, fewshot=False)
        again = run_optimizer(
            store,
            cfg,
            now=now + timedelta(hours=1),
            random_state=0,
            alerts=deliverer,
            fewshot=False,
        )
        assert deliverer.flush(5)
    finally:
        deliverer.close()
    assert run is not None and run.promoted == "a" and again is not None
    events = [json.loads(r["body"]) for r in recorder.requests]
    assert [(e["event"], e["arm"], e["experiment_id"]) for e in events] == [
        ("promotion", "a", EXPERIMENT)
    ]


def test_the_stop_rule_alerts_once_without_auto_promote(
    sqlite_store: Store, recorder: Recorder
) -> None:
    from datetime import timedelta

    from tests.support.optimizer_events import T0

    cfg = make_config(("a", "b"), champion="b", stop_expected_loss=0.01)
    register(sqlite_store, cfg)
    add_sessions(sqlite_store, "a", 300, conversions=90)
    add_sessions(sqlite_store, "b", 300, conversions=15)
    deliverer = AlertDeliverer([AlertConfig(url=recorder.url, backoff_s=0)])
    now = T0 + timedelta(days=30)
    try:
        for hours in (0, 1):
            run_optimizer(
                sqlite_store,
                cfg,
                now=now + timedelta(hours=hours),
                random_state=0,
                alerts=deliverer,
                fewshot=False,
            )
        assert deliverer.flush(5)
    finally:
        deliverer.close()
    events = [json.loads(r["body"]) for r in recorder.requests]
    assert [(e["event"], e["arm"]) for e in events] == [("stop_rule", "a")]
    assert "recommends arm 'a'" in events[0]["text"]


def test_alerts_from_a_run_cover_pauses_and_srm_episodes() -> None:
    from datetime import UTC, datetime

    from optimizer.alerts import alerts_from_run
    from optimizer.refit import OptimizerRun

    run = OptimizerRun(
        experiment_id="exp",
        snapshot_version=3,
        policy="thompson",
        allocation={},
        summary={"champion": "a", "arms": {"b": {"guardrails": {"error_rate": {"delta": 0.2}}}}},
        now=datetime(2025, 1, 1, tzinfo=UTC),
        duration_s=0.1,
        sessions=10,
        complete_sessions=10,
        paused=("b",),
        srm={"p_value": 1e-9, "warning": True},
    )
    first = alerts_from_run(run, new_stop=False, srm_new=True)
    assert [(a.event, a.arm) for a in first] == [("guardrail_pause", "b"), ("srm", None)]
    assert first[0].details == {"guardrails": {"error_rate": {"delta": 0.2}}}
    ongoing = alerts_from_run(run, new_stop=False, srm_new=False)
    assert [a.event for a in ongoing] == ["guardrail_pause"]  # the SRM episode was announced
