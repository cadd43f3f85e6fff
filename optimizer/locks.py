"""Named, non-blocking job locks so that only one optimizer run happens at a time.

- PostgreSQL: ``pg_try_advisory_lock`` on a dedicated connection, keyed by a hash
  of the lock name and the current schema (a schema is a separate store). The
  lock dies with the connection, so a crashed holder never blocks anyone.
- SQLite: a row in ``job_locks`` with an expiry, taken by one atomic
  ``INSERT … ON CONFLICT DO UPDATE … WHERE expires_at < now`` (SQLite serialises
  writers) and read back; an expired row (a crashed holder) is taken over.

>>> from optimizer.store import Store
>>> store = Store("sqlite:///:memory:"); store.create_all()
>>> with job_lock(store, "demo") as first:
...     with job_lock(store, "demo") as second:
...         (first, second)
(True, False)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from optimizer.clock import utcnow
from optimizer.store import Store, is_postgres, schema

__all__ = ["DEFAULT_TTL_S", "job_lock"]

log = logging.getLogger(__name__)

#: A SQLite lock row older than this is considered abandoned by a crashed process.
DEFAULT_TTL_S = 900.0


@contextmanager
def job_lock(store: Store, name: str, *, ttl_s: float = DEFAULT_TTL_S) -> Iterator[bool]:
    """Try to take the lock ``name``; yields True if this caller holds it, False if another does.

    Never waits for the other holder. Released on exit.
    """
    if not name:
        raise ValueError("lock name must be a non-empty string, got ''")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0 seconds, got {ttl_s!r}")
    if is_postgres(store.engine):
        with _advisory_lock(store, name) as held:
            yield held
    else:
        with _row_lock(store, name, ttl_s) as held:
            yield held


@contextmanager
def _advisory_lock(store: Store, name: str) -> Iterator[bool]:
    conn = store.engine.connect()
    held = False
    try:
        schema_name = conn.execute(sa.text("SELECT current_schema()")).scalar() or ""
        digest = hashlib.blake2b(f"{schema_name}:{name}".encode(), digest_size=8).digest()
        key = int.from_bytes(digest, "big", signed=True)
        held = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()  # the lock is session-level: don't sit idle in a transaction meanwhile
        yield held
    finally:
        try:
            if held:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        except sa.exc.DBAPIError:
            log.warning("could not release advisory lock %r; dropping the connection", name)
            conn.invalidate()  # closing the session releases the lock
        finally:
            conn.close()


@contextmanager
def _row_lock(store: Store, name: str, ttl_s: float) -> Iterator[bool]:
    holder = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    locks = schema.job_locks
    now = utcnow()
    insert = sqlite_dialect.insert(locks).values(
        name=name, holder=holder, expires_at=now + timedelta(seconds=ttl_s)
    )
    take = insert.on_conflict_do_update(
        index_elements=[locks.c.name],
        set_={"holder": insert.excluded.holder, "expires_at": insert.excluded.expires_at},
        where=locks.c.expires_at < now,
    )
    with store.engine.begin() as conn:
        conn.execute(take)
        current = conn.execute(sa.select(locks.c.holder).where(locks.c.name == name)).scalar()
    held = current == holder
    try:
        yield held
    finally:
        if held:
            with store.engine.begin() as conn:
                conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder))
