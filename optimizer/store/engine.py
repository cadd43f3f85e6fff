"""Create SQLAlchemy engines for SQLite (WAL) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (SQLAlchemy defaults to psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in {"postgresql", "postgres"}:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


#: How long a writer waits for SQLite's write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30
#: Statements that open pysqlite's implicit transaction (its legacy transaction control).
_WRITES = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


def make_engine(url: str, **kwargs: Any) -> sa.Engine:
    """Engine with the settings the store relies on.

    SQLite: WAL journal (readers never block the writer), ``busy_timeout`` so a
    second process waits instead of failing, foreign keys on. The parent folder
    of the database file is created.
    """
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000:.0f}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        _queue_writers(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return sa.create_engine(url, **kwargs)


def _queue_writers(engine: sa.Engine) -> None:
    """Threads of one process take turns at SQLite's one write lock in a queue.

    SQLite lets one transaction write at a time; the others wait in its busy
    handler, which polls with sleeps growing to 100 ms and favours no one: under
    a burst (fifty votes and outcomes at once) a waiter kept missing its turn and
    a vote took seconds. Here a transaction takes a process-wide lock at its
    first write — when pysqlite opens it — and gives it back at commit or
    rollback, so writers queue in order; other processes still meet the busy
    handler. Reads never take the lock (WAL: they never block a writer).
    """
    lock = threading.Lock()

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(conn: sa.Connection, _cur: Any, statement: str, *_args: Any) -> None:
        if "write_lock" in conn.info or not _WRITES.match(statement):
            return
        if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_S):
            raise sa.exc.OperationalError(statement, None, TimeoutError("database is locked"))
        conn.info["write_lock"] = True

    def _release(conn: sa.Connection) -> None:
        if conn.info.pop("write_lock", False):
            lock.release()

    sa.event.listen(engine, "commit", _release)
    sa.event.listen(engine, "rollback", _release)

    # A connection given back or dropped without either (an error mid-transaction).
    @sa.event.listens_for(engine, "reset")
    def _reset(_dbapi_connection: Any, connection_record: Any, _reset_state: Any) -> None:
        if connection_record is not None and connection_record.info.pop("write_lock", False):
            lock.release()

    @sa.event.listens_for(engine, "invalidate")
    def _invalidate(_dbapi_connection: Any, connection_record: Any, _exception: Any) -> None:
        if connection_record is not None and connection_record.info.pop("write_lock", False):
            lock.release()


def is_postgres(engine: sa.Engine) -> bool:
    return engine.dialect.name == "postgresql"
