"""Login throttling: backoff per account and per client address, shared through the database.

Each failed login is a row in ``login_attempts`` (one for the account name, one
for the client address), so all replicas see the same count. After
``security.login_free_failures`` failures of an account (``client_free_failures``
from one address) within ``login_window_s``, the next attempt must wait
``login_backoff_s`` after the newest failure, doubling per further failure up
to ``login_max_backoff_s``; a success clears the account's count. A throttled
attempt is answered 429 with ``Retry-After`` *before* the password is checked,
so guessing costs no bcrypt work and learns nothing.

Chainlit's ``POST /login`` cannot answer 429 itself (its wrapper turns any
exception of the password callback into "no user", 401), so
:class:`ChatLoginThrottleMiddleware` stands in front of it; the operator login
calls :class:`LoginThrottle` directly.

What the account's owner sees while someone guesses their password: the same
429 "too many failed logins for this account; try again in N s", even with the
right password, until the backoff has passed (at most ``login_max_backoff_s``,
15 minutes by default). Other accounts, and the owner from another address
after the wait, are unaffected; the per-address limit is higher so that people
behind one office NAT are not locked out by a colleague.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatbot.web.security import DATABASE_DOWN, database_unavailable
from optimizer.config import SecurityConfig
from optimizer.store.accounts import Accounts

log = logging.getLogger(__name__)

__all__ = ["ChatLoginThrottleMiddleware", "LoginThrottle", "Throttled"]


class Throttled(Exception):
    """A login attempt refused before its password was checked; says when to retry."""

    def __init__(self, reason: str, retry_after_s: int) -> None:
        super().__init__(f"{reason}; try again in {retry_after_s} s")
        self.reason = reason
        self.retry_after_s = retry_after_s


class LoginThrottle:
    """Check before a login, record after it.

    >>> from optimizer.store import Store
    >>> store = Store("sqlite://"); store.create_all()
    >>> clock = [1_000_000.0]
    >>> throttle = LoginThrottle(Accounts(store.engine), SecurityConfig(login_free_failures=2),
    ...                          clock=lambda: clock[0])
    >>> for _ in range(2): throttle.record("eve", "10.0.0.9", ok=False)
    >>> throttle.check("eve", "10.0.0.9")
    Traceback (most recent call last):
    ...
    chatbot.web.throttle.Throttled: too many failed logins for this account; try again in 2 s
    >>> clock[0] += 2; throttle.check("eve", "10.0.0.9")  # the backoff has passed
    """

    def __init__(
        self,
        accounts: Accounts,
        security: SecurityConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.accounts = accounts
        self.security = security
        self.clock = clock
        self._last_cleanup = -math.inf

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def wait_s(self, failures: int, free: int) -> float:
        """Seconds the attempt after ``failures`` failures must wait after the newest one."""
        if failures < free:
            return 0.0
        s = self.security
        return float(min(s.login_max_backoff_s, s.login_backoff_s * 2 ** (failures - free)))

    def check(self, account: str, client: str | None) -> None:
        """Raise :class:`Throttled` if this account or client must wait."""
        now = self._now()
        since = now - timedelta(seconds=self.security.login_window_s)
        subjects = [("account", account.lower(), self.security.login_free_failures, "account")]
        if client:
            subjects.append(("client", client, self.security.client_free_failures, "address"))
        for scope, subject, free, label in subjects:
            failures, newest = self.accounts.recent_failures(scope, subject, since=since)
            if newest is None:
                continue
            wait = self.wait_s(failures, free) - (now - newest).total_seconds()
            if wait > 0:
                raise Throttled(f"too many failed logins for this {label}", math.ceil(wait))

    def record(self, account: str, client: str | None, *, ok: bool) -> None:
        """Count an attempt whose password was checked."""
        now = self._now()
        self.accounts.record_attempt("account", account.lower(), succeeded=ok, at=now)
        if client:
            self.accounts.record_attempt("client", client, succeeded=ok, at=now)
        if ok and self.clock() - self._last_cleanup > 3600:
            self._last_cleanup = self.clock()
            window = timedelta(seconds=self.security.login_window_s)
            removed = self.accounts.forget_attempts(before=now - 2 * window)
            if removed:
                log.info("forgot %d old login attempts", removed)


class ChatLoginThrottleMiddleware:
    """Throttle Chainlit's ``POST /login``: refuse in backoff, count what Chainlit answers.

    The form (urlencoded or multipart, as Chainlit's page sends it) is read
    here for the user name and replayed unchanged to Chainlit; a 200 counts
    as a success, a 401 as a failure. Install it inside the trusted-proxy
    middleware so the client address is the real one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        throttle: LoginThrottle,
        path: str = "/login",
        max_bytes: int = 16_384,
    ) -> None:
        self.app = app
        self.throttle = throttle
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_bytes:  # a login form is tiny: never buffer a flood
                await _send_json(
                    send, 413, {"detail": f"body must be at most {self.max_bytes} bytes"}, []
                )
                return
            if not message.get("more_body"):
                break
        name = await _username(scope, body)
        client = scope["client"][0] if scope.get("client") else None
        if name:
            try:
                await asyncio.to_thread(self.throttle.check, name, client)
            except Throttled as exc:
                await _refuse(send, exc)
                return
            except DATABASE_DOWN:
                await database_unavailable(scope, send)
                return
        status: list[int] = []

        async def replay() -> Message:
            nonlocal body
            chunk, body = body, b""
            return {"type": "http.request", "body": chunk, "more_body": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, replay, watch)
        if name and status and status[0] in (200, 401):
            try:
                await asyncio.to_thread(self.throttle.record, name, client, ok=status[0] == 200)
            except DATABASE_DOWN:  # the answer is sent; one uncounted attempt is the lesser harm
                log.warning("could not count a login attempt: the database is unavailable")


async def _username(scope: Scope, body: bytes) -> str | None:
    sent = False

    async def once() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, once).form(max_files=0, max_fields=10)
    except Exception:  # not a form: Chainlit answers it (422)
        return None
    name = form.get("username")
    return name.strip()[:200] if isinstance(name, str) and name.strip() else None


async def _refuse(send: Send, exc: Throttled) -> None:
    retry = [(b"retry-after", str(exc.retry_after_s).encode())]
    await _send_json(send, 429, {"detail": str(exc)}, retry)


async def _send_json(
    send: Send, status: int, data: dict[str, str], extra: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})
