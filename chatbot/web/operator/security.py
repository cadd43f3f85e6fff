"""Operator sessions: a signed cookie carrying a CSRF token.

The cookie holds ``{"user", "role", "csrf", "iat", "flash"}`` as base64 JSON followed by
an HMAC-SHA256 signature, so the server keeps no session table and replicas
only share the secret (:func:`chatbot.web.auth.ensure_auth_secret`). Every visitor
gets a session with a CSRF token before logging in, so the login form is
protected like every other form. The operator key is
derived from the auth secret with a purpose label, so an operator cookie can
never be replayed as anything else signed with the same secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["COOKIE_NAME", "MAX_AGE_S", "OperatorSession", "SessionSigner"]

COOKIE_NAME = "flywheel_operator"
#: Sessions expire after 12 hours; the operator logs in again.
MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class OperatorSession:
    """What the cookie says about the visitor. ``user`` is None before login."""

    csrf: str
    user: str | None = None
    role: str | None = None
    iat: float = 0.0
    #: One-time message for the next page (the result of an action), and whether it is an error.
    flash: str | None = None
    flash_error: bool = False

    @property
    def is_operator(self) -> bool:
        return self.user is not None and self.role == "operator"

    @classmethod
    def anonymous(cls) -> OperatorSession:
        return cls(csrf=secrets.token_urlsafe(32), iat=time.time())

    def logged_in(self, user: str, role: str) -> OperatorSession:
        # A fresh CSRF token at login: a token seen before login is worth nothing after.
        return replace(self, user=user, role=role, csrf=secrets.token_urlsafe(32), iat=time.time())

    def with_flash(self, message: str, *, error: bool = False) -> OperatorSession:
        return replace(self, flash=message[:300], flash_error=error)

    def without_flash(self) -> OperatorSession:
        return replace(self, flash=None, flash_error=False)

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())


class SessionSigner:
    """Sign and verify session cookies with a key derived from ``secret``.

    >>> signer = SessionSigner(b"secret")
    >>> value = signer.dumps(OperatorSession(csrf="t", user="op", role="operator", iat=1e12))
    >>> signer.loads(value, now=1e12).user
    'op'
    >>> signer.loads(value[:-1] + "x", now=1e12) is None
    True
    """

    def __init__(self, secret: bytes, *, max_age_s: float = MAX_AGE_S) -> None:
        if not secret:
            raise ValueError("secret must be non-empty bytes, got an empty value")
        self.key = hmac.new(secret, b"flywheel-operator-session-v1", hashlib.sha256).digest()
        self.max_age_s = max_age_s

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self.key, payload, hashlib.sha256).digest())

    def dumps(self, session: OperatorSession) -> str:
        body = json.dumps(
            {
                "csrf": session.csrf,
                "user": session.user,
                "role": session.role,
                "iat": session.iat,
                "flash": session.flash,
                "flash_error": session.flash_error,
            },
            separators=(",", ":"),
        ).encode()
        payload = _b64(body)
        return f"{payload}.{self._sign(payload.encode())}"

    def loads(self, value: str | None, *, now: float | None = None) -> OperatorSession | None:
        """The session in a cookie value, or None if missing, forged, malformed or expired."""
        if not value or value.count(".") != 1:
            return None
        payload, signature = value.split(".")
        if not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            data: dict[str, Any] = json.loads(_unb64(payload))
            session = OperatorSession(
                csrf=str(data["csrf"]),
                user=data.get("user"),
                role=data.get("role"),
                iat=float(data["iat"]),
                flash=data.get("flash"),
                flash_error=bool(data.get("flash_error")),
            )
        except (ValueError, KeyError, TypeError):
            return None
        age = (time.time() if now is None else now) - session.iat
        if age > self.max_age_s or age < -60:
            return None
        return session


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
