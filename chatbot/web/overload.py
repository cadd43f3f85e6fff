"""Shed load instead of slowing every reply: at most so many chat turns and HTTP requests at once.

A server past its capacity that accepts everything makes every user wait
longer, until every reply is late. :class:`Overload` counts what one process
is doing and refuses what would go past ``limits.max_concurrent_turns`` (chat
replies being generated) or ``limits.max_concurrent_requests`` (HTTP
requests): the refused user gets an answer at once, and those already being
served keep their pace.

- A chat message over the limit gets :data:`BUSY_MESSAGE` in the chat right
  away; nothing is sent to the model, no turn is recorded (nothing was
  acknowledged, so nothing is lost) and the user can send it again.
- An HTTP request over the limit gets a **503** with a JSON ``detail`` and
  ``Retry-After`` (:class:`OverloadMiddleware`); nothing was done, so the
  client retries (votes and outcomes are idempotent). ``/api/health`` and the
  socket.io transport (``/ws/``) are never refused: a busy server is alive,
  and refusing the transport would hide the busy message itself.

The counts are per process; several replicas each protect themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "BUSY_MESSAGE",
    "Overload",
    "OverloadMiddleware",
    "current",
    "install",
]

#: What a user reads when their message was not taken (the chat's 503).
BUSY_MESSAGE = (
    "Sorry — I'm answering a lot of people right now and couldn't take your message. "
    "Please send it again in a few seconds."
)
#: Seconds a refused HTTP client is told to wait (``Retry-After``).
RETRY_AFTER_S = 2

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Overload:
    """Counts of chat turns and HTTP requests in progress, with their limits.

    >>> gate = Overload(max_turns=1, max_requests=10)
    >>> with gate.turn() as first, gate.turn() as second:
    ...     first, second
    (True, False)
    >>> gate.turns, gate.shed_turns
    (0, 1)
    """

    def __init__(self, *, max_turns: int, max_requests: int) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be ≥ 1, got {max_turns}")
        if max_requests < 1:
            raise ValueError(f"max_requests must be ≥ 1, got {max_requests}")
        self.max_turns = max_turns
        self.max_requests = max_requests
        self.turns = 0
        self.requests = 0
        self.shed_turns = 0
        self.shed_requests = 0
        self._lock = (
            threading.Lock()
        )  # the counts change on the event loop; reads come from anywhere

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        """Hold a place for one chat turn; yields False (and holds nothing) when full."""
        with self._lock:
            admitted = self.turns < self.max_turns
            if admitted:
                self.turns += 1
            else:
                self.shed_turns += 1
        if not admitted:
            log.warning("overloaded: %d chat turns in progress; a message was refused", self.turns)
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self.turns -= 1

    @contextlib.contextmanager
    def request(self) -> Iterator[bool]:
        """Hold a place for one HTTP request; yields False (and holds nothing) when full."""
        with self._lock:
            admitted = self.requests < self.max_requests
            if admitted:
                self.requests += 1
            else:
                self.shed_requests += 1
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self.requests -= 1


class OverloadMiddleware:
    """Pure ASGI middleware: 503 for HTTP requests past ``overload.max_requests``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        overload: Overload,
        exempt: tuple[str, ...] = ("/ws/", "/api/health"),
    ) -> None:
        self.app = app
        self.overload = overload
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        with self.overload.request() as admitted:
            if admitted:
                await self.app(scope, receive, send)
                return
        log.warning("overloaded: %s %s refused with 503", scope["method"], scope["path"])
        body = json.dumps(
            {
                "detail": (
                    f"the server is overloaded ({self.overload.max_requests} requests in "
                    f"progress); nothing was done, retry in {RETRY_AFTER_S} s"
                )
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


_current: Overload | None = None


def install(overload: Overload) -> None:
    """Make ``overload`` the process's gate (``create_app`` does this; the chat handlers use it)."""
    global _current
    _current = overload


def current() -> Overload:
    """The gate installed by :func:`install`; raises RuntimeError before that."""
    if _current is None:
        raise RuntimeError("no overload gate installed: build the app with create_app")
    return _current
