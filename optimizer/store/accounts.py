"""Logins, outcome-API keys and login attempts, kept in the store so every replica agrees.

The store holds hashes only: bcrypt hashes of passwords (made by
``chatbot.web.auth``) and SHA-256 digests of API keys (a key is 32 random bytes, so
a fast hash cannot be brute-forced). A password change or a removal moves the
account's ``sessions_valid_after`` forward; session checks refuse anything
issued before it, which is how those sessions end without a session table.

>>> from optimizer.store import Store
>>> store = Store("sqlite://"); store.create_all()
>>> accounts = Accounts(store.engine)
>>> key = accounts.create_key("crm")
>>> accounts.verify_key(key.secret)
'crm'
>>> accounts.revoke_key("crm"); accounts.verify_key(key.secret) is None
True
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from optimizer.clock import as_utc, utcnow
from optimizer.errors import StoreError
from optimizer.store import schema

__all__ = ["KEY_PREFIX", "Accounts", "ApiKey", "NewKey", "UserRow"]

#: Every generated key starts with this, so scanners (and our scrubber) recognise it.
KEY_PREFIX = "fwk_"
ROLES = ("user", "operator")


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    attributes: dict[str, Any]
    password_hash: str | None
    sessions_valid_after: datetime
    removed: bool


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``secret`` is shown once and never stored."""

    id: str
    name: str
    secret: str


def _second(at: datetime) -> datetime:
    # Chainlit's JWT ``iat`` has whole seconds: compare at that resolution.
    return at.replace(microsecond=0)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Accounts:
    """Reads and writes of ``accounts``, ``api_keys`` and ``login_attempts``."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # -- users ----------------------------------------------------------------------------
    def user(self, name: str) -> UserRow | None:
        """The account (also a removed one), or None if the database never had it."""
        t = schema.accounts
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.name == name)).first()
        return _user(row) if row is not None else None

    def users(self) -> list[UserRow]:
        """Current (not removed) accounts, by name."""
        t = schema.accounts
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(t).where(t.c.removed_at.is_(None)).order_by(t.c.name)
            ).all()
        return [_user(row) for row in rows]

    def add_user(
        self, name: str, password_hash: str, *, role: str = "user", attributes: dict[str, Any]
    ) -> None:
        """Create a login (or bring back a removed one). Raises StoreError if it exists."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {role!r}")
        if not name or len(name) > 100:
            raise ValueError(f"name must be 1-100 characters, got {len(name)}")
        existing = self.user(name)
        if existing is not None and not existing.removed:
            raise StoreError(f"user {name!r} already exists: use `flywheel users passwd`")
        now = utcnow()
        values = {
            "password_hash": password_hash,
            "role": role,
            "attributes": dict(attributes),
            "sessions_valid_after": _second(now),
            "updated_at": now,
            "removed_at": None,
        }
        t = schema.accounts
        with self.engine.begin() as conn:
            if existing is None:
                conn.execute(t.insert().values(name=name, created_at=now, **values))
            else:
                conn.execute(t.update().where(t.c.name == name).values(**values))

    def set_password(self, name: str, password_hash: str) -> None:
        """New password; every session issued before now ends."""
        self._update(name, password_hash=password_hash)

    def remove_user(self, name: str) -> None:
        """No more logins; every session of the user ends."""
        self._update(name, password_hash=None, removed_at=utcnow())

    def _update(self, name: str, **values: Any) -> None:
        t = schema.accounts
        now = utcnow()
        with self.engine.begin() as conn:
            done = conn.execute(
                t.update()
                .where(t.c.name == name, t.c.removed_at.is_(None))
                .values(sessions_valid_after=_second(now) + timedelta(seconds=1), updated_at=now)
                .values(**values)
            ).rowcount
        if not done:
            raise StoreError(f"no user {name!r} in the database (`flywheel users list`)")

    def session_valid(self, name: str, issued_at: datetime) -> bool:
        """Whether a session issued at ``issued_at`` for ``name`` still stands.

        Logins the database never had (``[auth.users]`` in the file, demo
        logins) are not managed here and stay valid.
        """
        row = self.user(name)
        if row is None:
            return True
        return not row.removed and as_utc(issued_at) >= row.sessions_valid_after

    # -- API keys --------------------------------------------------------------------------
    def create_key(self, name: str) -> NewKey:
        """A new named key; raises StoreError if the name is taken (revoked names too)."""
        if not name or len(name) > 100:
            raise ValueError(f"key name must be 1-100 characters, got {len(name)}")
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        t = schema.api_keys
        with self.engine.begin() as conn:
            if conn.execute(sa.select(t.c.id).where(t.c.name == name)).first() is not None:
                raise StoreError(f"a key named {name!r} exists already: choose another name")
            conn.execute(
                t.insert().values(
                    id=key_id, name=name, key_hash=_digest(secret), created_at=utcnow()
                )
            )
        return NewKey(key_id, name, secret)

    def api_keys(self) -> list[ApiKey]:
        t = schema.api_keys
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.created_at)).all()
        return [
            ApiKey(
                r.id,
                r.name,
                as_utc(r.created_at),
                as_utc(r.revoked_at) if r.revoked_at else None,
                as_utc(r.last_used_at) if r.last_used_at else None,
            )
            for r in rows
        ]

    def revoke_key(self, name_or_id: str) -> None:
        """The key stops working on the next request of every replica."""
        t = schema.api_keys
        with self.engine.begin() as conn:
            done = conn.execute(
                t.update()
                .where(sa.or_(t.c.name == name_or_id, t.c.id == name_or_id))
                .where(t.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            ).rowcount
        if not done:
            raise StoreError(f"no active key named {name_or_id!r} (`flywheel keys list`)")

    def verify_key(self, secret: str) -> str | None:
        """The name of the active key ``secret`` is, recording its use; else None."""
        if not secret.startswith(KEY_PREFIX) or secret.count("_") < 2:
            return None
        key_id = secret[len(KEY_PREFIX) :].split("_", 1)[0]
        t = schema.api_keys
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t).where(t.c.id == key_id, t.c.revoked_at.is_(None))
            ).first()
        if row is None or not hmac.compare_digest(row.key_hash, _digest(secret)):
            return None
        now = utcnow()
        with self.engine.begin() as conn:  # at most one write a minute per key
            conn.execute(
                t.update()
                .where(t.c.id == key_id)
                .where(
                    sa.or_(
                        t.c.last_used_at.is_(None), t.c.last_used_at < now - timedelta(minutes=1)
                    )
                )
                .values(last_used_at=now)
            )
        return str(row.name)

    # -- login attempts ----------------------------------------------------------------------
    def record_attempt(
        self, scope: str, subject: str, *, succeeded: bool, at: datetime | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                schema.login_attempts.insert().values(
                    scope=scope,
                    subject=subject[:200],
                    succeeded=succeeded,
                    created_at=at or utcnow(),
                )
            )

    def recent_failures(
        self, scope: str, subject: str, *, since: datetime
    ) -> tuple[int, datetime | None]:
        """Failures after ``since`` and after the last success: (count, time of the newest)."""
        t = schema.login_attempts
        where = (t.c.scope == scope, t.c.subject == subject[:200], t.c.created_at >= since)
        with self.engine.connect() as conn:
            last_ok = conn.execute(
                sa.select(sa.func.max(t.c.created_at)).where(*where, t.c.succeeded.is_(True))
            ).scalar()
            query = sa.select(sa.func.count(), sa.func.max(t.c.created_at)).where(
                *where, t.c.succeeded.is_(False)
            )
            if last_ok is not None:
                query = query.where(t.c.created_at > last_ok)
            count, newest = conn.execute(query).one()
        return int(count), as_utc(newest) if newest is not None else None

    def forget_attempts(self, *, before: datetime) -> int:
        """Delete attempts older than ``before`` (the optimizer job calls it); rows deleted."""
        t = schema.login_attempts
        with self.engine.begin() as conn:
            return int(conn.execute(t.delete().where(t.c.created_at < before)).rowcount)


def _user(row: sa.Row[Any]) -> UserRow:
    return UserRow(
        name=row.name,
        role=row.role,
        attributes=dict(row.attributes or {}),
        password_hash=row.password_hash,
        sessions_valid_after=as_utc(row.sessions_valid_after),
        removed=row.removed_at is not None,
    )
