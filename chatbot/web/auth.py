"""Password logins and the session-signing secret.

Logins come from ``[auth]`` in ``flywheel.toml`` (users with bcrypt hashes),
from the database (``flywheel users add``, :class:`optimizer.store.accounts.Accounts`),
and, when ``demo = true``, the documented demo logins ``demo``/``demo``
(role ``user``) and ``operator``/``operator`` (role ``operator``). A wrong
password and an unknown name take the same path (an unknown name is checked
against a dummy bcrypt hash), so the answer does not reveal which names exist.

Demo logins are for a laptop: :func:`demo_exposure` tells ``flywheel serve``
to refuse to start when they are on and the server listens beyond loopback.

Chainlit signs its session cookies with ``CHAINLIT_AUTH_SECRET``. When the
variable is unset, :func:`ensure_auth_secret` generates one on first run into
``$FLYWHEEL_HOME/auth_secret`` (mode 0600, never committed) and reuses it, so
logins survive restarts.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt

from optimizer import settings
from optimizer.clock import as_utc, utcnow
from optimizer.config import AuthConfig
from optimizer.store.accounts import Accounts

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_SECRET_ENV",
    "DEMO_USERS",
    "Authenticator",
    "Login",
    "demo_exposure",
    "ensure_auth_secret",
    "hash_password",
    "is_loopback",
]

AUTH_SECRET_ENV = "CHAINLIT_AUTH_SECRET"
#: Demo logins (name → (password, role)), enabled by ``auth.demo``; the README states them.
DEMO_USERS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "user"),
    "operator": ("operator", "operator"),
}
# A valid bcrypt hash of a random password: unknown names are checked against it
# so that they cost as much time as known ones.
_DUMMY_HASH = b"$2b$12$GUrqtXr9Cfr8WkJCv4klfeh1oiR8s1PFaDiIs9ky4uDPEwexhVH.y"


@dataclass(frozen=True)
class Login:
    """An authenticated person."""

    name: str
    role: str  # "user" or "operator"
    #: Free-form attributes of the login (e.g. ``{"plan": "pro"}``): its segment values.
    attributes: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


class Authenticator:
    """Check a name and password against the configured logins.

    >>> Authenticator(AuthConfig(demo=True)).check("demo", "demo")
    Login(name='demo', role='user')
    >>> Authenticator(AuthConfig(demo=False)).check("demo", "demo") is None
    True
    """

    def __init__(self, auth: AuthConfig, accounts: Accounts | None = None) -> None:
        self.auth = auth
        self.accounts = accounts
        self._users = {u.name: u for u in auth.users}

    def check(self, name: str, password: str) -> Login | None:
        """The login for a correct name and password, else None. Takes ~0.2 s (bcrypt).

        Order: ``[auth.users]`` in the file, then database users (a removed one
        stays refused, even if a demo login has its name), then demo logins.
        """
        candidate = password.encode("utf-8")
        if (user := self._users.get(name)) is not None:
            ok = _bcrypt_ok(candidate, user.password_hash.encode())
            return Login(name, user.role, dict(user.attributes)) if ok else None
        row = self.accounts.user(name) if self.accounts is not None else None
        if row is not None:
            if row.password_hash is None:  # removed
                _bcrypt_ok(candidate, _DUMMY_HASH)
                return None
            if not _bcrypt_ok(candidate, row.password_hash.encode()):
                return None
            # Sessions carry whole seconds: one issued in the second of a password change
            # would read as older than it. Wait out that second (at most 1 s, off the loop).
            wait = (as_utc(row.sessions_valid_after) - utcnow()).total_seconds()
            if 0 < wait <= 1.0:
                time.sleep(wait)
            return Login(name, row.role, dict(row.attributes))
        _bcrypt_ok(candidate, _DUMMY_HASH)  # same cost as a known name
        if self.auth.demo and name in DEMO_USERS:
            demo_password, demo_role = DEMO_USERS[name]
            if hmac.compare_digest(candidate, demo_password.encode()):
                return Login(name, demo_role)
        return None


def _bcrypt_ok(password: bytes, stored: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:72], stored)  # bcrypt reads at most 72 bytes
    except ValueError:  # a malformed hash in the config: refuse, loudly
        log.error("a password hash in [auth.users] is not a valid bcrypt hash")
        return False


def hash_password(password: str, *, rounds: int = 12) -> str:
    """A bcrypt hash for ``[auth.users]`` or the accounts table (only the first 72 bytes count)."""
    if not password:
        raise ValueError("password must not be empty")
    return bcrypt.hashpw(password.encode("utf-8")[:72], bcrypt.gensalt(rounds=rounds)).decode()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface to bind) is reachable from this machine only.

    >>> [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.1.2.3")]
    [True, True, True, False, False]
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def demo_exposure(host: str, auth: AuthConfig, *, allow: bool) -> str | None:
    """The one-line reason to refuse starting, or None when demo logins are safe (or allowed).

    >>> demo_exposure("127.0.0.1", AuthConfig(demo=True), allow=False) is None
    True
    >>> demo_exposure("0.0.0.0", AuthConfig(demo=True), allow=False)[:48]
    'refusing to serve on 0.0.0.0 with the demo login'
    >>> demo_exposure("0.0.0.0", AuthConfig(demo=True), allow=True) is None
    True
    """
    if not auth.demo or is_loopback(host) or allow:
        return None
    return (
        f"refusing to serve on {host} with the demo logins demo/demo and operator/operator on: "
        "set auth.demo = false (or FLYWHEEL_DEMO=0) and add users with `flywheel users add`, "
        "or pass --allow-demo-logins"
    )


def ensure_auth_secret(home: Path | None = None) -> str:
    """Make sure ``CHAINLIT_AUTH_SECRET`` is set, generating and storing it on first run."""
    if secret := settings.env(AUTH_SECRET_ENV):
        return secret
    path = (home or settings.home_dir()) / "auth_secret"
    try:
        # O_EXCL: two processes starting at once cannot both write a secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text(encoding="utf-8").strip()
    else:
        secret = secrets.token_urlsafe(48)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret + "\n")
        log.info("generated a session secret in %s", path)
    if not secret:
        raise RuntimeError(f"{path} is empty; delete it to generate a new session secret")
    os.environ[AUTH_SECRET_ENV] = secret
    return secret
