"""The example bank: few-shot examples with their status and provenance.

The ``examples`` table holds the current state, ``example_events`` every change
(``added``, ``approved``, ``rejected``, ``pinned``, ``demoted``, ``updated``),
both written in one transaction. Statuses:

- ``candidate`` — mined, waiting for an operator (or auto-approved);
- ``approved`` — retrieval may use it; ``pinned`` — always included first;
- ``rejected`` — never served, and never mined again: its content hash stays in
  the table, so the same text cannot be inserted twice, and mining compares new
  candidates with rejected ones too;
- ``demoted`` — taken out of retrieval by credit assignment (it dragged the KPI).

Seed examples (``prompts/examples``) enter as ``source='seed'``, ``approved``;
they are authored text and are not scrubbed. Mined ones must be scrubbed
before :meth:`ExampleBank.add` (see :mod:`optimizer.fewshot.mining`).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from optimizer.clock import as_utc, utcnow
from optimizer.errors import StoreError
from optimizer.prompt_library import Example, PromptLibrary
from optimizer.store import Store, schema

__all__ = [
    "SERVABLE",
    "STATUSES",
    "BankExample",
    "ExampleBank",
    "example_hash",
]

log = logging.getLogger(__name__)

STATUSES = ("candidate", "approved", "rejected", "pinned", "demoted")
#: Statuses retrieval draws from.
SERVABLE = ("approved", "pinned")
_EVENT_BY_STATUS = {
    "approved": "approved",
    "rejected": "rejected",
    "pinned": "pinned",
    "demoted": "demoted",
    "candidate": "updated",
}


def example_hash(user_text: str, assistant_text: str) -> str:
    """SHA-256 of the case- and whitespace-normalised pair (the bank's uniqueness key).

    >>> example_hash("Hi  there", "Hello") == example_hash("hi there ", "hello")
    True
    """
    norm = "\x00".join(re.sub(r"\s+", " ", t).strip().lower() for t in (user_text, assistant_text))
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BankExample:
    id: str
    status: str
    user_text: str
    assistant_text: str
    source: str
    content_hash: str
    session_id: str | None = None
    turn_id: str | None = None
    reward: float | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def as_example(self) -> Example:
        """The prompt-side view used by selection and ``build_messages``."""
        return Example(self.id, self.user_text, self.assistant_text, f"bank:{self.id}")


def _row(row: sa.Row[Any]) -> BankExample:
    return BankExample(
        id=row.id,
        status=row.status,
        user_text=row.user_text,
        assistant_text=row.assistant_text,
        source=row.source,
        content_hash=row.content_hash,
        session_id=row.session_id,
        turn_id=row.turn_id,
        reward=row.reward,
        provenance=row.provenance or {},
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


class ExampleBank:
    """Reads and writes of the example bank on a :class:`~optimizer.store.Store`.

    >>> store = Store("sqlite:///:memory:"); store.create_all()
    >>> bank = ExampleBank(store)
    >>> q, a = "How do I export my projects?", "Settings > Data > Export."
    >>> ex_id = bank.add(q, a, source="mined")
    >>> bank.get(ex_id).status
    'candidate'
    >>> bank.set_status(ex_id, "rejected", actor="alice").status
    'rejected'
    >>> bank.add(q, a, source="mined") is None
    True
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- reading ------------------------------------------------------------
    def get(self, example_id: str) -> BankExample | None:
        row = self._first(sa.select(schema.examples).where(schema.examples.c.id == example_id))
        return _row(row) if row is not None else None

    def list(self, status: str | Iterable[str] | None = None) -> list[BankExample]:
        """Examples (optionally of some statuses), oldest first."""
        ex = schema.examples
        query = sa.select(ex).order_by(ex.c.created_at, ex.c.id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            _check_statuses(wanted)
            query = query.where(ex.c.status.in_(wanted))
        with self.store.engine.connect() as conn:
            return [_row(r) for r in conn.execute(query)]

    def version(self) -> int:
        """Id of the newest example event: changes whenever the bank does (cheap to poll)."""
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.max(schema.example_events.c.id))).scalar() or 0
            )

    def events(self, example_id: str | None = None) -> builtins.list[sa.Row[Any]]:
        ev = schema.example_events
        query = sa.select(ev).order_by(ev.c.id)
        if example_id is not None:
            query = query.where(ev.c.example_id == example_id)
        with self.store.engine.connect() as conn:
            return list(conn.execute(query))

    def mined_turn_ids(self) -> set[str]:
        ex = schema.examples
        with self.store.engine.connect() as conn:
            return {
                r[0] for r in conn.execute(sa.select(ex.c.turn_id).where(ex.c.turn_id.is_not(None)))
            }

    # -- writing ------------------------------------------------------------
    def add(
        self,
        user_text: str,
        assistant_text: str,
        *,
        source: str,
        status: str = "candidate",
        example_id: str | None = None,
        session_id: str | None = None,
        turn_id: str | None = None,
        reward: float | None = None,
        provenance: Mapping[str, Any] | None = None,
        actor: str = "miner",
        at: datetime | None = None,
    ) -> str | None:
        """Insert an example with an ``added`` event; ``None`` if the same text is already banked.

        The caller scrubs mined text first; this method stores what it gets.
        """
        _check_statuses([status])
        if source not in ("seed", "mined"):
            raise ValueError(f"source must be 'seed' or 'mined', got {source!r}")
        if not user_text.strip() or not assistant_text.strip():
            raise ValueError("user_text and assistant_text must be non-empty")
        digest = example_hash(user_text, assistant_text)
        example_id = example_id or f"ex-{digest[:12]}"
        now = at or utcnow()
        details = {
            "status": status,
            "source": source,
            "session_id": session_id,
            "turn_id": turn_id,
            "reward": reward,
        }
        try:
            with self.store.engine.begin() as conn:
                conn.execute(
                    schema.examples.insert().values(
                        id=example_id,
                        status=status,
                        user_text=user_text,
                        assistant_text=assistant_text,
                        source=source,
                        content_hash=digest,
                        session_id=session_id,
                        turn_id=turn_id,
                        reward=reward,
                        provenance=dict(provenance or {}),
                        created_at=now,
                        updated_at=now,
                    )
                )
                self._event(conn, example_id, "added", actor, details, now)
        except IntegrityError:
            return None
        return example_id

    def set_status(
        self,
        example_id: str,
        status: str,
        *,
        actor: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> BankExample:
        """Change an example's status and append the event; :class:`StoreError` if unknown."""
        _check_statuses([status])
        now = at or utcnow()
        ex = schema.examples
        with self.store.engine.begin() as conn:
            row = conn.execute(sa.select(ex.c.status).where(ex.c.id == example_id)).first()
            if row is None:
                raise StoreError(f"no example {example_id!r} in the bank")
            conn.execute(
                ex.update().where(ex.c.id == example_id).values(status=status, updated_at=now)
            )
            payload = {
                "from": row.status,
                "to": status,
                **({"reason": reason} if reason else {}),
                **dict(details or {}),
            }
            self._event(conn, example_id, _EVENT_BY_STATUS[status], actor, payload, now)
        updated = self.get(example_id)
        assert updated is not None
        log.info("example %s: %s -> %s by %s", example_id, row.status, status, actor)
        return updated

    def sync_seeds(
        self, library: PromptLibrary, *, actor: str = "seed", at: datetime | None = None
    ) -> builtins.list[str]:
        """Put the library's seed examples in the bank (``approved``); returns the ids added.

        An edited seed file updates the text in place (``updated`` event) and
        keeps the status an operator gave it.
        """
        added: list[str] = []
        ex = schema.examples
        for seed in library.examples.values():
            current = self.get(seed.id)
            if current is None:
                if (
                    self.add(
                        seed.user,
                        seed.assistant,
                        source="seed",
                        status="approved",
                        example_id=seed.id,
                        provenance={"path": seed.path},
                        actor=actor,
                        at=at,
                    )
                    is not None
                ):
                    added.append(seed.id)
                else:
                    log.warning("seed example %s duplicates a banked example; not added", seed.id)
            elif (current.user_text, current.assistant_text) != (
                seed.user,
                seed.assistant,
            ) and current.source == "seed":
                now = at or utcnow()
                try:
                    with self.store.engine.begin() as conn:
                        conn.execute(
                            ex.update()
                            .where(ex.c.id == seed.id)
                            .values(
                                user_text=seed.user,
                                assistant_text=seed.assistant,
                                content_hash=example_hash(seed.user, seed.assistant),
                                updated_at=now,
                            )
                        )
                        self._event(conn, seed.id, "updated", actor, {"path": seed.path}, now)
                except IntegrityError:
                    log.warning(
                        "edited seed example %s duplicates a banked example; kept the old text",
                        seed.id,
                    )
        return added

    # -- internals ------------------------------------------------------------
    @staticmethod
    def _event(
        conn: sa.Connection,
        example_id: str,
        kind: str,
        actor: str,
        details: dict[str, Any],
        at: datetime,
    ) -> None:
        conn.execute(
            schema.example_events.insert().values(
                example_id=example_id, kind=kind, actor=actor, details=details, created_at=at
            )
        )

    def _first(self, query: sa.Select[Any]) -> sa.Row[Any] | None:
        with self.store.engine.connect() as conn:
            return conn.execute(query).first()


def _check_statuses(statuses: Iterable[str]) -> None:
    bad = [s for s in statuses if s not in STATUSES]
    if bad:
        raise ValueError(f"status must be one of {list(STATUSES)}, got {bad[0]!r}")
