"""HTTP API on the chat server: ``POST /api/outcomes`` for integrators, ``GET /api/health``.

Business systems (CRM, checkout, helpdesk) report what happened after a chat::

    curl -X POST http://127.0.0.1:8000/api/outcomes \\
      -H "X-API-Key: $FLYWHEEL_API_KEY" -H "Content-Type: application/json" \\
      -d '{"idempotency_key": "order-1042", "session_id": "…", "name": "revenue", "value": 96}'

- ``X-API-Key`` must be an active named key (``flywheel keys create NAME``,
  stored hashed, revocable without restart, ``last_used_at`` recorded) or equal
  ``FLYWHEEL_API_KEY`` (constant-time comparison); with neither every request
  is refused (401), so the API is closed by default.
- The body is checked in this order: size (``limits.max_body_bytes`` → 413),
  JSON, then the fields (422 listing every problem). Nothing here answers 500
  for bad input.
- Delivery is at-least-once friendly: the idempotency key is unique in the
  store, a repeat is acknowledged (200, ``"duplicate"``) and stored once; a new
  outcome is acknowledged (201, ``"stored"``) only after it is committed. The
  same key with a *different* payload is a client bug: 409, naming the fields
  that differ, nothing stored.
- Every acknowledgement says whether the outcome counts (:mod:`optimizer.attribution`):
  ``attributed`` and the ``session_id`` it counts for, or the ``reason`` it does
  not (``unknown_session``, ``unused_name``, ``no_session_before``,
  ``before_session``, ``outside_window``). Unattributed outcomes are stored
  too: they show on the dashboard, and count by themselves if they become
  attributable (say, the session reaches this replica's database later).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, cast

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chatbot.runtime import Runtime
from chatbot.web.ratelimit import RateLimiter, RateLimitExceeded
from optimizer.attribution import attribute
from optimizer.store import OutcomeRecord
from optimizer.store.accounts import KEY_PREFIX, Accounts

log = logging.getLogger(__name__)

__all__ = ["API_KEY_HEADER", "ApiContext", "OutcomeIn", "api_router", "flywheel_version"]

API_KEY_HEADER = "X-API-Key"
#: The text ``occurred_at`` accepts: RFC 3339 date-time, offset optional.
_DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)
#: How far in the future ``occurred_at`` may lie (clock skew between systems).
MAX_FUTURE = timedelta(minutes=5)
#: Size of ``extra`` once serialised; it is for small annotations, not payloads.
MAX_EXTRA_BYTES = 2048


class OutcomeIn(BaseModel):
    """A business outcome reported by an integrator."""

    model_config = ConfigDict(
        extra="forbid",
        # Say in the schema what _someone checks, so clients and fuzzers know it.
        json_schema_extra={
            "anyOf": [
                {"required": ["session_id"], "properties": {"session_id": {"type": "string"}}},
                {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
            ]
        },
    )

    idempotency_key: str = Field(
        min_length=1, max_length=200, description="Unique per real-world event; repeats count once."
    )
    session_id: str | None = Field(
        None, min_length=1, max_length=100, description="Chat session (Chainlit thread id)."
    )
    user_id: str | None = Field(
        None, min_length=1, max_length=200, description="Chat user, when the session is unknown."
    )
    name: str = Field(
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Outcome name as used by the KPI, e.g. conversion, revenue, support_minutes.",
    )
    value: float = Field(1.0, allow_inf_nan=False, description="A finite number.")
    occurred_at: datetime | None = Field(
        None, description="ISO 8601 time of the event (UTC if no offset); default: now."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description=f"Small JSON object, at most {MAX_EXTRA_BYTES} bytes."
    )

    @field_validator("idempotency_key", "session_id", "user_id", "extra")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        # Refuse here what the database would refuse on insert (a 500 there).
        if (problem := _unstorable(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("value", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: Any) -> Any:
        # pydantic would store JSON true/false as 1.0/0.0; the schema says number.
        if isinstance(v, bool):
            raise ValueError(f"value must be a number, got {json.dumps(v)}")
        return v

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _iso_text_only(cls, v: Any) -> Any:
        # pydantic would read a number, or digits in a string, as Unix seconds; the schema
        # promises an RFC 3339 date-time (the offset may be left out: UTC).
        if isinstance(v, datetime) or v is None:
            return v
        if not isinstance(v, str) or not _DATE_TIME.fullmatch(v):
            raise ValueError(
                "occurred_at must be an ISO 8601 date-time such as 2026-11-25T10:00:00Z,"
                f" got {json.dumps(v)}"
            )
        return v

    @field_validator("occurred_at")
    @classmethod
    def _not_in_future(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        v = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        if v > datetime.now(UTC) + MAX_FUTURE:
            raise ValueError(f"occurred_at must not be in the future, got {v.isoformat()}")
        return v

    @field_validator("extra")
    @classmethod
    def _small_extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(v, allow_nan=False, default=str).encode())
        if size > MAX_EXTRA_BYTES:
            raise ValueError(f"extra must be at most {MAX_EXTRA_BYTES} bytes as JSON, got {size}")
        return v

    @model_validator(mode="after")
    def _someone(self) -> OutcomeIn:
        if self.session_id is None and self.user_id is None:
            raise ValueError("give a session_id or a user_id, got neither")
        return self

    def record(self) -> OutcomeRecord:
        return OutcomeRecord(
            idempotency_key=self.idempotency_key,
            name=self.name,
            value=self.value,
            session_id=self.session_id,
            user_id=self.user_id,
            occurred_at=self.occurred_at,
            source="api",
            extra=self.extra,
        )


class OutcomeAck(BaseModel):
    status: str = Field(description='"stored" (201) or "duplicate" (200).')
    idempotency_key: str
    attributed: bool = Field(description="Whether the outcome counts for a session's KPI.")
    session_id: str | None = Field(
        description="The session it counts for (or was matched to, when it does not count)."
    )
    reason: str | None = Field(
        description="Why it does not count: unknown_session, unused_name, no_session_before, "
        "before_session or outside_window; null when attributed."
    )
    detail: str = Field(description="The verdict in words.")


class Problem(BaseModel):
    detail: Any


def flywheel_version() -> str:
    try:
        return version("flywheel")
    except PackageNotFoundError:
        return "unknown"


def _problem(status: int, detail: Any, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limit: int) -> bytes | JSONResponse:
    """The request body, or a 413 once it exceeds ``limit`` bytes (without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _problem(413, f"body must be at most {limit} bytes, got {declared}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return _problem(413, f"body must be at most {limit} bytes")
    return bytes(body)


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": ["body", *err["loc"]],
            "msg": str(err["msg"]).removeprefix("Value error, "),
            "type": err["type"],
        }
        for err in exc.errors(include_url=False)
    ]


class ApiContext:
    """What the ``/api`` handlers share: the runtime, the per-key rate limiter and the keys."""

    def __init__(self, runtime: Runtime, *, api_key: str | None) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter(runtime.config.limits.outcomes_per_minute_per_key)
        self.expected = api_key.encode() if api_key else None
        self.accounts = Accounts(runtime.store.engine)

    def key_problem(self, request: Request) -> JSONResponse | None:
        """None when the request carries a valid key (named on ``request.state``), else the 401."""
        given = request.headers.get(API_KEY_HEADER)
        if self.expected is None and not any(
            k.revoked_at is None for k in self.accounts.api_keys()
        ):
            return _problem(
                401,
                "the outcomes API is closed: the server has no FLYWHEEL_API_KEY and no key "
                "from `flywheel keys create NAME`",
            )
        if not given:
            return _problem(401, f"missing {API_KEY_HEADER} header")
        if given.startswith(KEY_PREFIX) and (name := self.accounts.verify_key(given)) is not None:
            request.state.api_key_name = name
            return None
        if self.expected is not None and hmac.compare_digest(given.encode(), self.expected):
            request.state.api_key_name = API_KEY_HEADER
            return None
        return _problem(401, f"wrong {API_KEY_HEADER}")


def _context(request: Request) -> ApiContext:
    """The router's :class:`ApiContext` (bound to the request by :func:`api_router`)."""
    return cast(ApiContext, request.state.api)


Ctx = Annotated[ApiContext, Depends(_context)]


def api_router(runtime: Runtime, *, api_key: str | None) -> APIRouter:
    """The ``/api`` routes, bound to ``runtime``; ``api_key`` None closes the outcomes API."""
    context = ApiContext(runtime, api_key=api_key)

    def bind(request: Request) -> None:  # router dependencies run before the handlers' own
        request.state.api = context

    router = APIRouter(prefix="/api", tags=["api"], dependencies=[Depends(bind)])
    router.add_api_route(
        "/outcomes",
        post_outcome,
        methods=["POST"],
        status_code=201,
        response_model=OutcomeAck,
        summary="Report a business outcome",
        responses={
            200: {"model": OutcomeAck, "description": "Duplicate: already stored, counted once."},
            401: {"model": Problem, "description": "Missing or wrong API key."},
            409: {
                "model": Problem,
                "description": "The idempotency key was used for a different outcome.",
            },
            413: {"model": Problem, "description": "Body too large."},
            422: {"model": Problem, "description": "Invalid body; `detail` lists the problems."},
            429: {"model": Problem, "description": "Too many requests for this key."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": OutcomeIn.model_json_schema()}},
            },
            "parameters": [
                {
                    "name": API_KEY_HEADER,
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
        },
    )
    router.add_api_route(
        "/health", health, methods=["GET"], summary="Liveness and database reachability"
    )
    return router


async def post_outcome(request: Request, ctx: Ctx) -> JSONResponse:
    """Authenticate, rate-limit, parse, attribute, then commit before acknowledging."""
    # Order matters: authenticate before reading or parsing anything.
    if (problem := ctx.key_problem(request)) is not None:
        return problem
    try:
        ctx.limiter.hit(request.state.api_key_name)  # one bucket per key
    except RateLimitExceeded as exc:
        return _problem(429, str(exc), **{"Retry-After": f"{exc.retry_after_s:.0f}"})
    outcome = await _parse(request, ctx.runtime.config.limits.max_body_bytes)
    if isinstance(outcome, JSONResponse):
        return outcome
    runtime = ctx.runtime
    record = outcome.record()
    verdict = await asyncio.to_thread(
        attribute,
        runtime.store,
        runtime.config,
        session_id=record.session_id,
        user_id=record.user_id,
        name=record.name,
        occurred_at=record.occurred_at,
    )
    record = replace(record, attribution=verdict.code, attributed_session_id=verdict.session_id)
    stored = await runtime.record_outcome(record)
    if not stored:
        conflict = await asyncio.to_thread(runtime.store.outcome_conflict, record)
        if conflict is not None:
            return _problem(
                409,
                f"idempotency_key {record.idempotency_key!r} was already used for a "
                f"different outcome ({conflict}); use a new key for a new event",
            )
    ack = OutcomeAck(
        status="stored" if stored else "duplicate",
        idempotency_key=outcome.idempotency_key,
        **verdict.as_dict(),
    )
    return JSONResponse(ack.model_dump(), status_code=201 if stored else 200)


async def _parse(request: Request, limit: int) -> OutcomeIn | JSONResponse:
    """The outcome in the body, or the 413/422 that says what is wrong with it."""
    body = await _read_body(request, limit)
    if isinstance(body, JSONResponse):
        return body
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        problem = {"loc": ["body"], "msg": f"body is not valid JSON: {exc}", "type": "json_invalid"}
        return _problem(422, [problem])
    try:
        return OutcomeIn.model_validate(data)
    except ValidationError as exc:
        return _problem(422, _validation_detail(exc))


async def health(ctx: Ctx) -> JSONResponse:
    runtime = ctx.runtime

    def ping() -> None:
        with runtime.store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        await asyncio.wait_for(asyncio.to_thread(ping), timeout=5)
        database = "ok"
    except Exception as exc:  # report, do not crash: this is what health checks are for
        log.warning("health check: database unreachable: %s", exc)
        database = f"unreachable: {type(exc).__name__}"
    ok = database == "ok"
    body: dict[str, Any] = {}
    model = runtime.config.model.name
    if model.startswith("local/"):
        from chatbot.llm.local import model_process

        # Down or restarting: chats say sorry meanwhile, votes and outcomes still work,
        # so the replica stays in the load balancer (200) but says so.
        body["model_process"] = process = model_process().status()
        ok_model = process["state"] in ("ready", "not started")
    else:
        ok_model = True
    return JSONResponse(
        {
            "status": "ok" if ok and ok_model else "degraded",
            "database": database,
            **body,
            "model": model,
            "experiment": runtime.config.experiment.id,
            "version": flywheel_version(),
        },
        status_code=200 if ok else 503,
    )


def _unstorable(value: Any) -> str | None:
    """Why a string, or a key or string inside a JSON value, cannot be stored; None if it can.

    PostgreSQL keeps no NUL character in text or JSON, and neither database
    takes a lone UTF-16 surrogate (JSON's ``"\\ud800"``), which is not UTF-8.
    """
    if isinstance(value, str):
        if "\x00" in value:
            return "must not contain NUL characters (\\u0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text (no lone surrogates such as \\ud800)"
        return None
    if isinstance(value, dict):
        parts = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        parts = value
    else:
        return None
    return next((p for p in map(_unstorable, parts) if p is not None), None)


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity, which are not JSON; say so precisely.
    raise ValueError(f"{name} is not a JSON number")
