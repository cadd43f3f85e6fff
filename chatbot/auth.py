"""Password logins and the session-signing secret.

Logins come from ``[auth]`` in ``flywheel.toml``: users with bcrypt hashes,
plus, when ``demo = true``, the documented demo logins ``demo``/``demo``
(role ``user``) and ``operator``/``operator`` (role ``operator``). A wrong
password and an unknown name take the same path (an unknown name is checked
against a dummy bcrypt hash), so the answer does not reveal which names exist.

Chainlit signs its session cookies with ``CHAINLIT_AUTH_SECRET``. When the
variable is unset, :func:`ensure_auth_secret` generates one on first run into
``$FLYWHEEL_HOME/auth_secret`` (mode 0600, never committed) and reuses it, so
logins survive restarts.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from optimizer import settings
from optimizer.config import AuthConfig

log = logging.getLogger(__name__)

__all__ = ["AUTH_SECRET_ENV", "DEMO_USERS", "Authenticator", "Login", "ensure_auth_secret"]

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


class Authenticator:
    """Check a name and password against the configured logins.

    >>> Authenticator(AuthConfig(demo=True)).check("demo", "demo")
    Login(name='demo', role='user')
    >>> Authenticator(AuthConfig(demo=False)).check("demo", "demo") is None
    True
    """

    def __init__(self, auth: AuthConfig) -> None:
        self.auth = auth
        self._hashes = {u.name: (u.password_hash.encode(), u.role) for u in auth.users}

    def check(self, name: str, password: str) -> Login | None:
        """The login for a correct name and password, else None. Takes ~0.2 s (bcrypt)."""
        candidate = password.encode("utf-8")
        if name in self._hashes:
            stored, role = self._hashes[name]
            return Login(name, role) if _bcrypt_ok(candidate, stored) else None
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
