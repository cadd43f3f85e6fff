"""ASGI guards in front of every route: proxies, origins, ended sessions.

Order, outermost first (``chatbot.web.server.create_app`` installs them)::

    TrustedProxyMiddleware   believe X-Forwarded-For/-Proto from security.trusted_proxies only;
                             mark every cookie Secure when the request came over https
    OriginMiddleware         same origin or security.allowed_origins; nothing else gets
                             CORS headers, preflights are refused, state-changing requests
                             and websockets from another origin are refused (403)
    SessionEndMiddleware     a chat session (Chainlit's JWT) issued before its user's password
                             change or removal is refused (401) and its cookie cleared

Pure ASGI (no ``BaseHTTPMiddleware``): websockets pass through them too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import Any

from sqlalchemy import exc as sa_exc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from optimizer.store.accounts import Accounts

log = logging.getLogger(__name__)

__all__ = [
    "DATABASE_DOWN",
    "OriginMiddleware",
    "SessionEndMiddleware",
    "TrustedProxyMiddleware",
    "database_unavailable",
]

#: Database errors that mean "unreachable right now"
#: (also ``chatbot.web.server.DATABASE_UNAVAILABLE``).
DATABASE_DOWN: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _in(networks: Iterable[Network], host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


class TrustedProxyMiddleware:
    """Take client address, scheme and host from ``X-Forwarded-*`` of trusted proxies only.

    The client is the right-most ``X-Forwarded-For`` entry that is not itself
    a trusted proxy (left-most entries are whatever the client claimed). When
    the resulting scheme is https, every ``Set-Cookie`` gets ``Secure``.
    """

    def __init__(self, app: ASGIApp, *, trusted: Iterable[str] = ()) -> None:
        self.app = app
        self.trusted = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else None
        if host is not None and self.trusted and _in(self.trusted, host):
            scope = dict(scope)
            if forwarded := _header(scope, b"x-forwarded-for"):
                hops = [h.strip() for h in forwarded.split(",") if h.strip()]
                for hop in reversed(hops):
                    host = hop
                    if not _in(self.trusted, hop):
                        break
                scope["client"] = (host, 0)
            if forwarded_host := _header(scope, b"x-forwarded-host"):
                # The public host name: same-origin checks compare the browser's Origin with it.
                public = forwarded_host.split(",")[-1].strip().encode("latin-1")
                scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k != b"host"] + [
                    (b"host", public)
                ]
            if proto := _header(scope, b"x-forwarded-proto"):
                proto = proto.split(",")[-1].strip().lower()
                if proto in ("http", "https"):
                    ws = scope["type"] == "websocket"
                    scope["scheme"] = {"http": "ws", "https": "wss"}[proto] if ws else proto
        if scope.get("scheme") in ("https", "wss"):
            await self.app(scope, receive, _secure_cookies(send))
        else:
            await self.app(scope, receive, send)


def _secure_cookies(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = []
            for key, value in message.get("headers", []):
                if key.lower() == b"set-cookie" and b"secure" not in value.lower():
                    value = value + b"; Secure"
                headers.append((key, value))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class OriginMiddleware:
    """CORS by allow-list, never a wildcard with credentials; cross-origin writes refused.

    A request without ``Origin`` (curl, server-to-server, same-origin GETs)
    passes. With one: same origin (``Origin``'s host equals ``Host``) or a
    listed origin passes, and only a listed one gets CORS headers; any other
    origin gets no CORS headers (the browser will not let its page read the
    answer), a 403 for preflights and state-changing methods, and a closed
    websocket.
    """

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(a.rstrip("/").lower() for a in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        origin = origin.rstrip("/").lower()
        same = origin.split("://", 1)[-1] == (_header(scope, b"host") or "").lower()
        listed = origin in self.allowed
        if scope["type"] == "websocket":
            if same or listed:
                await self.app(scope, receive, send)
            else:
                log.warning("refused a websocket from origin %s", origin)
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope.get("method", "GET")
        preflight = method == "OPTIONS" and _header(scope, b"access-control-request-method")
        if not (same or listed) and (preflight or method not in _SAFE_METHODS):
            await _json(send, 403, {"detail": f"origin {origin} is not allowed"})
            return
        if listed and preflight:
            await _respond(send, 204, b"", _cors_headers(origin, preflight=True))
            return
        await self.app(scope, receive, _with_cors(send, origin if listed else None))


def _cors_headers(origin: str, *, preflight: bool = False) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]
    if preflight:
        headers += [
            (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, PATCH, OPTIONS"),
            (b"access-control-allow-headers", b"content-type, x-api-key, authorization"),
            (b"access-control-max-age", b"600"),
        ]
    return headers


def _with_cors(send: Send, origin: str | None) -> Send:
    """Drop whatever CORS headers an inner app (Chainlit's) set; add ours for a listed origin."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [
                (k, v)
                for k, v in message.get("headers", [])
                if not k.lower().startswith(b"access-control-")
            ]
            if origin is not None:
                headers += _cors_headers(origin)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(
    send: Send,
    status: int,
    data: dict[str, Any],
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await _respond(send, status, body, headers + list(extra))


class SessionEndMiddleware:
    """Refuse Chainlit sessions issued before their user's password change or removal.

    Chainlit's session is a signed JWT with the user's identifier and ``iat``;
    it has no server-side record to delete, so each request that carries one
    is checked against :meth:`Accounts.session_valid` (one primary-key read).
    """

    def __init__(self, app: ASGIApp, *, accounts: Accounts, cookie: str = "access_token") -> None:
        self.app = app
        self.accounts = accounts
        self.cookie = cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path", "").startswith(
            ("/operator", "/api/")
        ):
            await self.app(scope, receive, send)
            return
        token = self._token(scope)
        claims = _claims(token) if token else None
        try:
            valid = claims is None or await asyncio.to_thread(self._valid, claims)
        except DATABASE_DOWN:
            await database_unavailable(scope, send)
            return
        if not valid:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            clear = f"{self.cookie}=; Max-Age=0; Path=/; HttpOnly; SameSite=lax".encode()
            await _json(
                send,
                401,
                {"detail": "this session has ended (password changed or user removed)"},
                [(b"set-cookie", clear)],
            )
            return
        await self.app(scope, receive, send)

    def _token(self, scope: Scope) -> str | None:
        if raw := _header(scope, b"cookie"):
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw)
            except Exception:  # a malformed cookie header: Chainlit will refuse it
                return None
            if self.cookie in jar:
                return jar[self.cookie].value
        auth = _header(scope, b"authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _valid(self, claims: dict[str, Any]) -> bool:
        name, iat = claims.get("identifier"), claims.get("iat")
        if not isinstance(name, str) or not isinstance(iat, int | float):
            return True  # not ours to judge: Chainlit validates its own tokens
        return self.accounts.session_valid(name, datetime.fromtimestamp(iat, UTC))


def _claims(token: str) -> dict[str, Any] | None:
    """The verified claims of a Chainlit JWT, or None if it is not a valid one."""
    import jwt
    from chainlit.auth.jwt import get_jwt_secret

    secret = get_jwt_secret()
    if not secret:
        return None
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


async def database_unavailable(scope: Scope, send: Send) -> None:
    """The server's 503 for a guard that needed the database (websockets: closed, 1011)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1011})
        return
    await _json(
        send,
        503,
        {"detail": "the database is unavailable; nothing was acknowledged, retry shortly"},
        [(b"retry-after", b"1")],
    )
