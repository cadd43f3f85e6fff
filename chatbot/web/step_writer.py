"""Chainlit's step bookkeeping, written in batches by one thread (group commit).

Chainlit persists every message and run step through the data layer in
fire-and-forget tasks: four writes per chat turn (the user's message, the run
step's start and end, the reply). Nothing waits for them and nobody is told
they happened, so they need not be committed one by one: :class:`StepWriter`
takes them off the event loop with a lock and a list append (no thread hop per
write), and its thread writes whatever has piled up in one transaction — one
``SELECT`` of the rows that exist, one ``executemany`` insert and one update,
one commit. With one user a turn's writes still reach the database within
milliseconds (``linger_s``); with fifty, a batch holds many turns.

What *is* acknowledged — turns, votes, outcomes — never goes through here:
those are committed by the store before the user sees them.

Readers that must see the steps (resuming a thread, listing threads, deleting
one) call :meth:`StepWriter.flush` first, so a process always reads its own
writes; another replica sees them a few milliseconds later. A batch that fails (the database is
briefly down) is retried once, then dropped with an error in the log: the turn
itself is in the store; the thread view would miss those messages.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from optimizer.clock import as_utc, utcnow
from optimizer.store import schema

log = logging.getLogger(__name__)

__all__ = ["StepWriter"]

#: Seconds the writer waits after the first pending write, so that writes made together
#: (a turn's user message and run step) share a transaction.
LINGER_S = 0.005
#: Writes per transaction at most.
MAX_BATCH = 1000
#: Thread ids remembered as existing; past this many the memory starts over.
KNOWN_THREADS_MAX = 100_000


def _parse_time(value: Any) -> datetime:
    if isinstance(value, str) and value:
        try:
            return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            pass
    return utcnow()


class StepWriter:
    """Queue Chainlit step upserts and deletes; one thread writes them in batches.

    >>> import sqlalchemy as sa
    >>> from optimizer.store import schema
    >>> engine = sa.create_engine(
    ...     "sqlite://", poolclass=sa.pool.StaticPool, connect_args={"check_same_thread": False}
    ... )
    >>> schema.metadata.create_all(engine)
    >>> writer = StepWriter(engine)
    >>> writer.upsert({"id": "s1", "threadId": "t1", "type": "run", "output": ""})
    >>> writer.upsert({"id": "s1", "threadId": "t1", "output": "done"})
    >>> writer.flush()
    >>> with engine.connect() as conn:
    ...     conn.execute(sa.select(schema.steps.c.data)).scalar()["output"]
    'done'
    >>> writer.close()
    """

    def __init__(
        self, engine: sa.Engine, *, linger_s: float = LINGER_S, max_batch: int = MAX_BATCH
    ) -> None:
        if not linger_s >= 0:
            raise ValueError(f"linger_s must be ≥ 0, got {linger_s!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch!r}")
        self.engine = engine
        self.linger_s = linger_s
        self.max_batch = max_batch
        self._ops: list[tuple[str, Any]] = []  # ("upsert", step dict) | ("delete", step id)
        self._queued = 0  # writes ever queued …
        self._done = 0  # … and ever written (or given up): flush waits for done ≥ queued
        self._closed = False
        self._cond = threading.Condition()
        self._known_threads: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="flywheel-steps", daemon=True)
        self._thread.start()
        # A server stopping (SIGTERM) writes what is queued before the process ends.
        atexit.register(self.close)

    # -- the event loop's side: cheap, never blocks on the database -------------------------
    def upsert(self, step: dict[str, Any]) -> None:
        """Create or update a step (a field set to None never overwrites a stored value)."""
        step = dict(step)
        step.pop("feedback", None)  # votes live in the feedback tables
        if not step.get("threadId") or not step.get("id"):
            log.warning("step without id or thread id not stored: %r", step.get("name"))
            return
        self._put(("upsert", step))

    def delete(self, step_id: str) -> None:
        self._put(("delete", step_id))

    def _put(self, op: tuple[str, Any]) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the step writer is closed")
            self._ops.append(op)
            self._queued += 1
            self._cond.notify_all()

    # -- readers -------------------------------------------------------------------------------
    def flush(self, timeout: float = 30) -> None:
        """Block until every write queued so far is in the database (or given up)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._queued
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("step writes not flushed within %g s", timeout)
                    return
                self._cond.wait(left)

    def close(self, timeout: float = 30) -> None:
        """Write what is queued and stop the thread."""
        atexit.unregister(self.close)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if not self._ops and self._closed:
                    return
            if self.linger_s and not self._closed:
                time.sleep(self.linger_s)
            with self._cond:
                batch, self._ops = self._ops[: self.max_batch], self._ops[self.max_batch :]
            self._write_batch(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _write_batch(self, batch: list[tuple[str, Any]]) -> None:
        for attempt in (1, 2):
            try:
                self._write(batch)
                return
            except SQLAlchemyError:
                # IntegrityError: a thread row inserted meanwhile (update_thread); else the
                # database is briefly unavailable. The second attempt sees the new state.
                if attempt == 2:
                    log.exception("%d Chainlit step writes dropped", len(batch))
                self._known_threads.clear()

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        s, t = schema.steps, schema.threads
        upserts: dict[str, dict[str, Any]] = {}
        deletes: set[str] = set()
        for kind, value in batch:
            if kind == "delete":
                upserts.pop(value, None)
                deletes.add(value)
            else:
                merged = upserts.setdefault(value["id"], {})
                merged.update({k: v for k, v in value.items() if v is not None or k not in merged})
        threads = {step["threadId"] for step in upserts.values()} - self._known_threads
        with self.engine.begin() as conn:
            if threads:
                present = set(conn.execute(sa.select(t.c.id).where(t.c.id.in_(threads))).scalars())
                missing = [{"id": i, "created_at": utcnow()} for i in sorted(threads - present)]
                if missing:
                    conn.execute(t.insert(), missing)
            if deletes:
                conn.execute(s.delete().where(s.c.id.in_(deletes)))
            stored: dict[str, Any] = {}
            if upserts:
                stored = dict(
                    conn.execute(sa.select(s.c.id, s.c.data).where(s.c.id.in_(upserts))).all()
                )
            inserts = [
                {
                    "id": step_id,
                    "thread_id": step["threadId"],
                    "parent_id": step.get("parentId"),
                    "type": str(step.get("type") or "undefined"),
                    "data": step,
                    "created_at": _parse_time(step.get("createdAt")),
                }
                for step_id, step in upserts.items()
                if step_id not in stored
            ]
            updates = [
                # Tasks may land out of order: a field never goes back to None.
                {"b_id": step_id, "b_data": _merge(stored[step_id], step)}
                for step_id, step in upserts.items()
                if step_id in stored
            ]
            if inserts:
                conn.execute(s.insert(), inserts)
            if updates:
                conn.execute(
                    s.update().where(s.c.id == sa.bindparam("b_id")),
                    [{"b_id": u["b_id"], "data": u["b_data"]} for u in updates],
                )
        if len(self._known_threads) >= KNOWN_THREADS_MAX:
            self._known_threads.clear()  # a cache: a long-lived process must not grow
        self._known_threads.update(step["threadId"] for step in upserts.values())


def _merge(stored: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    data = dict(stored)
    data.update({k: v for k, v in step.items() if v is not None})
    return data
