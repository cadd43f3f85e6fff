"""A recording stand-in for a Langfuse server, on 127.0.0.1, for tests and benches.

It speaks the parts of the Langfuse HTTP API that Flywheel uses, as the SDK
(5.x) sends them, and records what arrived so tests can assert on the wire:

* ``POST /api/public/otel/v1/traces``: OTLP/HTTP protobuf (gzip or plain) →
  :attr:`LangfuseRecorder.spans` (:class:`RecordedSpan`, attributes decoded);
* ``POST /api/public/scores`` (a JSON list) and ``DELETE /api/public/scores/{id}``
  → :attr:`score_posts`, :attr:`score_deletes`, and :meth:`scores` (the current
  state after upserts by id and deletions, as Langfuse keeps it);
* ``GET /api/public/v3/scores``: serves :attr:`remote_scores` (scores "created
  in Langfuse" by people or evaluators) with ``source``/``fromTimestamp``
  filters and cursor pagination;
* ``GET /api/public/v2/observations?traceId=…``: built from the recorded spans;
* prompts: ``GET /api/public/v2/prompts/{name}`` (``label``/``version``),
  ``POST /api/public/v2/prompts`` (new version; labels unique across versions,
  ``latest`` managed by the server) and ``PATCH …/versions/{n}`` (labels added);
* ``GET /api/public/projects`` (the SDK's ``auth_check``).

Requests must carry the Basic credentials the recorder was made with (401
otherwise). Modes: ``normal``; ``refuse`` (nothing listens: connections are
refused); ``hang`` (connections are accepted by the kernel and never
answered, like a wedged host).

Run as a script it serves in its own process (so its work does not compete
with the code under measurement), prints its base URL, and answers ``stats``
lines on stdin with a JSON line of counts; it stops at end of input::

    python -m tests.support.langfuse_recorder --mode normal --public-key pk --secret-key sk

>>> with LangfuseRecorder() as rec:
...     rec.base_url.startswith("http://127.0.0.1:")
True
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

Mode = Literal["normal", "refuse", "hang"]

__all__ = ["LangfuseRecorder", "Mode", "RecordedSpan"]


@dataclass(frozen=True)
class RecordedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    scope: str
    scope_attributes: dict[str, Any] = field(default_factory=dict)

    def json_attr(self, key: str) -> Any:
        """An attribute the SDK stores JSON-encoded (input, output, metadata values)."""
        value = self.attributes.get(key)
        return json.loads(value) if isinstance(value, str) else value


def _any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _decode_spans(body: bytes) -> list[RecordedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            scope_attrs = {kv.key: _any_value(kv.value) for kv in scope_spans.scope.attributes}
            for span in scope_spans.spans:
                spans.append(
                    RecordedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={kv.key: _any_value(kv.value) for kv in span.attributes},
                        scope=scope_spans.scope.name,
                        scope_attributes=scope_attrs,
                    )
                )
    return spans


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class LangfuseRecorder:
    """The recording server. Use as a context manager; it stops on exit."""

    def __init__(
        self,
        mode: Mode = "normal",
        *,
        public_key: str = "pk-lf-test",
        secret_key: str = "sk-lf-test",
    ) -> None:
        if mode not in ("normal", "refuse", "hang"):
            raise ValueError(f"mode must be 'normal', 'refuse' or 'hang', got {mode!r}")
        self.mode = mode
        self.public_key = public_key
        self.secret_key = secret_key
        self._auth = "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.spans: list[RecordedSpan] = []
        self.score_posts: list[list[dict[str, Any]]] = []
        self.score_deletes: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.prompts: dict[str, list[dict[str, Any]]] = {}
        #: Scores "made in Langfuse" (API v3 shape) served by GET /api/public/v3/scores.
        self.remote_scores: list[dict[str, Any]] = []
        #: Score upserts and deletions in arrival order (what :meth:`scores` replays).
        self._score_events: list[tuple[int, str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._hang_socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LangfuseRecorder:
        if self.mode == "refuse":
            self.port = _free_port()  # bound and released: nothing listens there
        elif self.mode == "hang":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)  # the kernel completes handshakes; nobody ever reads or answers
            self._hang_socket = sock
            self.port = int(sock.getsockname()[1])
        else:
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
            self._server.daemon_threads = True
            self.port = int(self._server.server_address[1])
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="langfuse-recorder", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._hang_socket is not None:
            self._hang_socket.close()
            self._hang_socket = None

    def __enter__(self) -> LangfuseRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading what arrived -------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` holds (re-checked whenever something arrives)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.1))
        return True

    def spans_of(self, trace_id: str) -> list[RecordedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def scores(self) -> dict[str, dict[str, Any]]:
        """Current scores by id: posts upsert (later fields win), deletes remove."""
        with self._lock:
            events = list(self._score_events)
        state: dict[str, dict[str, Any]] = {}
        for _, kind, payload in events:
            if kind == "upsert":
                state[payload["id"]] = {**state.get(payload["id"], {}), **payload}
            else:
                state.pop(payload, None)
        return state

    def _record(self, fn: Callable[[], None]) -> None:
        with self._changed:
            fn()
            self._changed.notify_all()

    # -- HTTP -----------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    data = gzip.decompress(data)
                return data

            def _send(
                self, status: int, payload: Any = None, *, content_type: str = "application/json"
            ) -> None:
                if isinstance(payload, bytes):
                    body = payload
                else:
                    body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _dispatch(self, method: str) -> None:
                parsed = urllib.parse.urlsplit(self.path)
                path = parsed.path
                query = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
                body = self._body()
                recorder._record(lambda: recorder.requests.append((method, path)))
                if self.headers.get("Authorization") != recorder._auth:
                    self._send(401, {"message": "Invalid credentials"})
                    return
                try:
                    status, payload, ctype = recorder._route(method, path, query, body)
                except _HTTPError as exc:
                    status, payload, ctype = (
                        exc.status,
                        {"message": exc.message},
                        "application/json",
                    )
                self._send(status, payload, content_type=ctype)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_PATCH(self) -> None:
                self._dispatch("PATCH")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

        return Handler

    def _route(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, Any, str]:
        json_type = "application/json"
        if method == "POST" and path == "/api/public/otel/v1/traces":
            spans = _decode_spans(body)
            self._record(lambda: self.spans.extend(spans))
            return 200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"
        if method == "POST" and path == "/api/public/scores":
            batch = json.loads(body)
            batch = batch if isinstance(batch, list) else [batch]

            def add() -> None:
                self.score_posts.append(batch)
                for score in batch:
                    self._score_events.append((len(self._score_events), "upsert", score))

            self._record(add)
            return 202, {"message": "Accepted"}, json_type
        if method == "DELETE" and path.startswith("/api/public/scores/"):
            score_id = urllib.parse.unquote(path.rsplit("/", 1)[1])

            def delete() -> None:
                self.score_deletes.append(score_id)
                self._score_events.append((len(self._score_events), "delete", score_id))

            self._record(delete)
            return 204, None, json_type
        if method == "GET" and path == "/api/public/v3/scores":
            return 200, self._scores_page(query), json_type
        if method == "GET" and path == "/api/public/v2/observations":
            return 200, self._observations(query), json_type
        if method == "GET" and path == "/api/public/projects":
            org = {"id": "org-1", "name": "recorder"}
            return (
                200,
                {
                    "data": [
                        {"id": "project-1", "name": "recorder", "organization": org, "metadata": {}}
                    ]
                },
                json_type,
            )
        if path.startswith("/api/public/v2/prompts"):
            return self._prompts(method, path, query, body)
        raise _HTTPError(404, f"no route for {method} {path}")

    # -- scores made in Langfuse ----------------------------------------------
    def _scores_page(self, query: dict[str, str]) -> dict[str, Any]:
        limit = int(query.get("limit", 50))
        if limit > 100:
            raise _HTTPError(400, "limit must be at most 100")
        rows = list(self.remote_scores)
        if sources := query.get("source"):
            wanted = {s.strip().upper() for s in sources.split(",")}
            rows = [r for r in rows if r["source"].upper() in wanted]
        if since := query.get("fromTimestamp"):
            start = datetime.fromisoformat(since.replace("Z", "+00:00"))
            rows = [
                r
                for r in rows
                if datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) >= start
            ]
        offset = (
            int(base64.urlsafe_b64decode(query["cursor"]).decode()) if query.get("cursor") else 0
        )
        page = rows[offset : offset + limit]
        meta: dict[str, Any] = {"limit": limit}
        if offset + limit < len(rows):
            meta["cursor"] = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
        return {"data": page, "meta": meta}

    def _observations(self, query: dict[str, str]) -> dict[str, Any]:
        trace_id = query.get("traceId")
        rows = []
        for span in self.spans:
            if trace_id and span.trace_id != trace_id:
                continue
            rows.append(
                {
                    "id": span.span_id,
                    "traceId": span.trace_id,
                    "startTime": _iso(datetime.fromtimestamp(span.start_ns / 1e9, UTC)),
                    "projectId": "project-1",
                    "type": str(span.attributes.get("langfuse.observation.type", "span")).upper(),
                    "name": span.name,
                    "sessionId": span.attributes.get("session.id"),
                    "userId": span.attributes.get("user.id"),
                }
            )
        return {"data": rows[: int(query.get("limit", 50))], "meta": {}}

    # -- prompt management ----------------------------------------------------
    def _prompts(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, Any, str]:
        parts = [
            urllib.parse.unquote(p)
            for p in path.removeprefix("/api/public/v2/prompts").split("/")
            if p
        ]
        with self._lock:
            if method == "POST" and not parts:
                return 200, self._create_prompt(json.loads(body)), "application/json"
            if method == "GET" and len(parts) == 1:
                return 200, self._get_prompt(parts[0], query), "application/json"
            if method == "PATCH" and len(parts) == 3 and parts[1] == "versions":
                labels = json.loads(body).get("newLabels", [])
                return 200, self._label_prompt(parts[0], int(parts[2]), labels), "application/json"
        raise _HTTPError(404, f"no route for {method} {path}")

    def _create_prompt(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req["name"]
        versions = self.prompts.setdefault(name, [])
        labels = sorted({*req.get("labels", []), "latest"})
        for older in versions:
            older["labels"] = [lbl for lbl in older["labels"] if lbl not in labels]
        tags = req.get("tags")
        if tags is None:
            tags = versions[-1]["tags"] if versions else []
        for older in versions:
            older["tags"] = list(tags)
        prompt = {
            "type": req.get("type") or "text",
            "name": name,
            "version": len(versions) + 1,
            "prompt": req["prompt"],
            "config": req.get("config") or {},
            "labels": labels,
            "tags": list(tags),
            "commitMessage": req.get("commitMessage"),
        }
        versions.append(prompt)
        return dict(prompt)

    def _get_prompt(self, name: str, query: dict[str, str]) -> dict[str, Any]:
        versions = self.prompts.get(name, [])
        if "version" in query:
            found = [p for p in versions if p["version"] == int(query["version"])]
        else:
            label = query.get("label", "production")
            found = [p for p in versions if label in p["labels"]]
        if not found:
            raise _HTTPError(404, f"Prompt not found: {name}")
        return dict(found[-1])

    def _label_prompt(self, name: str, version: int, new_labels: list[str]) -> dict[str, Any]:
        if "latest" in new_labels:
            raise _HTTPError(400, "Label 'latest' is always assigned to the latest prompt version")
        versions = self.prompts.get(name, [])
        target = next((p for p in versions if p["version"] == version), None)
        if target is None:
            raise _HTTPError(404, f"Prompt not found: {name}")
        for other in versions:
            if other is not target:
                other["labels"] = [lbl for lbl in other["labels"] if lbl not in new_labels]
        target["labels"] = sorted({*target["labels"], *new_labels})
        return dict(target)

    def prompt_versions(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self.prompts.get(name, [])]

    def iter_score_bodies(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            batches = list(self.score_posts)
        for batch in batches:
            yield from batch


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _serve_stdin() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Serve a recording Langfuse stand-in.")
    parser.add_argument("--mode", default="normal", choices=["normal", "refuse", "hang"])
    parser.add_argument("--public-key", default="pk-lf-test")
    parser.add_argument("--secret-key", default="sk-lf-test")
    args = parser.parse_args()
    with LangfuseRecorder(args.mode, public_key=args.public_key, secret_key=args.secret_key) as rec:
        print(rec.base_url, flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                counts = {"spans": len(rec.spans), "scores": len(list(rec.iter_score_bodies()))}
                print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    _serve_stdin()
