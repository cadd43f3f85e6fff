"""Chainlit's data layer on our store: thread history, and thumbs written as feedback events.

Chainlit shows its thumbs, and people their past threads, only when a data
layer exists. :class:`FlywheelDataLayer` keeps Chainlit's users, threads,
steps and elements in our tables (``chat_users``, ``threads``, ``steps``,
``elements``; each step's full dict as JSON) and turns votes into feedback
events through :meth:`chatbot.runtime.Runtime.record_vote`.

Votes are checked against the caller named by :func:`acting_as` (the routes
in :mod:`chatbot.web.feedback` set it): a vote on someone else's turn raises
:class:`~optimizer.errors.OwnershipError`.

Feedback ids are ``"<turn id>:<user id>"``: Chainlit passes only the id to
:meth:`FlywheelDataLayer.delete_feedback`, and this id says which vote to
remove and whose it is (checked against the caller).

SQLAlchemy calls are synchronous and run in worker threads, never on the
event loop. Chainlit persists steps in fire-and-forget tasks that nobody
waits for: :class:`~chatbot.web.step_writer.StepWriter` queues them and
writes them in batches on its own thread (four step writes per chat turn
were a third of the server's CPU per turn when each had its own thread hop
and transaction); the readers of steps flush it first. Element writes, rare,
get a small thread pool of their own, so that a chat turn's store calls never
queue behind them in the default executor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import sqlalchemy as sa
from chainlit.data import get_data_layer
from chainlit.data.base import BaseDataLayer
from chainlit.data.utils import queue_until_user_message
from chainlit.types import (
    Feedback,
    FeedbackDict,
    PageInfo,
    PaginatedResponse,
    Pagination,
    ThreadDict,
    ThreadFilter,
)
from chainlit.user import PersistedUser, User
from fastapi import HTTPException
from sqlalchemy.exc import IntegrityError

from chatbot.runtime import Runtime
from chatbot.web.ratelimit import RateLimiter
from chatbot.web.step_writer import StepWriter
from optimizer import consent
from optimizer.clock import as_utc, utcnow
from optimizer.errors import OwnershipError
from optimizer.store import schema

if TYPE_CHECKING:
    from chainlit.element import Element, ElementDict
    from chainlit.step import StepDict

log = logging.getLogger(__name__)

__all__ = [
    "FlywheelDataLayer",
    "acting_as",
    "current_data_layer",
    "feedback_id",
    "parse_feedback_id",
]

T = TypeVar("T")

#: Threads writing Chainlit's elements (I/O-bound, off the turn's path).
ELEMENT_WRITERS = 2

_caller: ContextVar[str | None] = ContextVar("flywheel_feedback_caller", default=None)


@contextmanager
def acting_as(user_id: str) -> Iterator[None]:
    """Name the signed-in user for the data layer's feedback methods (HTTP routes)."""
    token = _caller.set(user_id)
    try:
        yield
    finally:
        _caller.reset(token)


def feedback_id(turn_id: str, user_id: str) -> str:
    """The id of ``user_id``'s vote on ``turn_id``.

    >>> feedback_id("0b6f", "demo")
    '0b6f:demo'
    >>> parse_feedback_id("0b6f:demo")
    ('0b6f', 'demo')
    """
    return f"{turn_id}:{user_id}"


def parse_feedback_id(value: str) -> tuple[str, str]:
    """Split a feedback id into (turn id, user id); turn ids never contain ':'."""
    turn_id, sep, user_id = value.partition(":")
    if not (sep and turn_id and user_id):
        raise ValueError(f"feedback id must look like '<turn id>:<user id>', got {value!r}")
    return turn_id, user_id


def _caller_id() -> str:
    """The signed-in user: named by our HTTP route, else taken from Chainlit's websocket session."""
    if (who := _caller.get()) is not None:
        return who
    try:
        from chainlit.context import context

        user = context.session.user
    except Exception:  # no Chainlit context: an HTTP request that did not name the caller
        user = None
    if user is None:
        raise OwnershipError("a vote needs a signed-in user")
    return user.identifier


def _iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


class FlywheelDataLayer(BaseDataLayer):
    """Chainlit persistence on the Flywheel store (see the module docstring)."""

    def __init__(self, runtime: Runtime, *, thread_limit: int = 1000) -> None:
        self.runtime = runtime
        self.engine = runtime.store.engine
        self.thread_limit = thread_limit
        self.votes = RateLimiter(runtime.config.limits.votes_per_minute_per_user)
        self._writer = ThreadPoolExecutor(ELEMENT_WRITERS, thread_name_prefix="flywheel-elements")
        self.steps = StepWriter(self.engine)

    async def _write(self, fn: Callable[..., None], *args: Any) -> None:
        """Run an element write on the writer threads."""
        await asyncio.get_running_loop().run_in_executor(self._writer, functools.partial(fn, *args))

    # -- users ------------------------------------------------------------------------
    async def get_user(self, identifier: str) -> PersistedUser | None:
        return await asyncio.to_thread(self._get_user, identifier)

    def _get_user(self, identifier: str) -> PersistedUser | None:
        u = schema.chat_users
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(u).where(u.c.identifier == identifier)).first()
        if row is None:
            return None
        return PersistedUser(
            id=row.id,
            identifier=row.identifier,
            createdAt=_iso(row.created_at) or "",
            metadata=dict(row.metadata or {}),
        )

    async def create_user(self, user: User) -> PersistedUser | None:
        return await asyncio.to_thread(self._create_user, user)

    def _create_user(self, user: User) -> PersistedUser | None:
        u = schema.chat_users
        metadata = dict(user.metadata or {})
        for _ in range(2):  # a concurrent first login may insert the same user: then update
            try:
                with self.engine.begin() as conn:
                    updated = conn.execute(
                        u.update()
                        .where(u.c.identifier == user.identifier)
                        .values(metadata=metadata)
                    ).rowcount
                    if not updated:
                        conn.execute(
                            u.insert().values(
                                id=str(uuid.uuid4()),
                                identifier=user.identifier,
                                metadata=metadata,
                                created_at=utcnow(),
                            )
                        )
                break
            except IntegrityError:
                continue
        return self._get_user(user.identifier)

    def _identifier_of(self, conn: sa.Connection, user_id: str) -> str | None:
        u = schema.chat_users
        return conn.execute(sa.select(u.c.identifier).where(u.c.id == user_id)).scalar()

    # -- threads ------------------------------------------------------------------------
    async def get_thread_author(self, thread_id: str) -> str:
        t = schema.threads
        query = sa.select(t.c.user_identifier).where(t.c.id == thread_id, t.c.deleted_at.is_(None))
        return await asyncio.to_thread(self._scalar, query) or ""

    def _scalar(self, query: sa.Select[Any]) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    async def update_thread(
        self,
        thread_id: str,
        name: str | None = None,
        user_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> None:
        await asyncio.to_thread(self._update_thread, thread_id, name, user_id, metadata, tags)

    def _update_thread(
        self,
        thread_id: str,
        name: str | None,
        user_id: str | None,
        metadata: Mapping[str, Any] | None,
        tags: list[str] | None,
    ) -> None:
        t = schema.threads
        for _ in range(2):  # create_step and the first-message update may both create it
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(sa.select(t).where(t.c.id == thread_id)).first()
                    values: dict[str, Any] = {}
                    if name is not None:
                        values["name"] = name
                    if tags is not None:
                        values["tags"] = list(tags)
                    if user_id is not None:
                        values["user_identifier"] = self._identifier_of(conn, user_id)
                    if metadata is not None:
                        # Chainlit's convention: a key set to None is removed.
                        merged = dict((row.metadata if row is not None else None) or {})
                        merged.update(metadata)
                        values["metadata"] = {k: v for k, v in merged.items() if v is not None}
                    if row is None:
                        conn.execute(t.insert().values(id=thread_id, created_at=utcnow(), **values))
                    elif values:
                        conn.execute(t.update().where(t.c.id == thread_id).values(**values))
                return
            except IntegrityError:
                continue

    async def delete_thread(self, thread_id: str) -> None:
        """Hide the thread, drop its steps, and keep it out of every dataset from now on.

        The turns and votes stay in the event log (the KPI still counts the
        session); the conversation is marked deleted through
        :func:`optimizer.consent.delete_conversation` (audited, never a training
        set, an export or the few-shot bank; examples mined from it are
        withdrawn). Who may delete is checked before (``chatbot.web.privacy``:
        the author only).
        """
        await asyncio.to_thread(self._delete_thread, thread_id, _caller.get())

    def _delete_thread(self, thread_id: str, caller: str | None) -> None:
        self.steps.flush()  # else a queued step would come back after the delete
        t = schema.threads
        with self.engine.begin() as conn:
            conn.execute(schema.steps.delete().where(schema.steps.c.thread_id == thread_id))
            conn.execute(schema.elements.delete().where(schema.elements.c.thread_id == thread_id))
            author = conn.execute(
                sa.select(t.c.user_identifier).where(t.c.id == thread_id)
            ).scalar()
        owner = author or caller or ""
        consent.delete_conversation(
            self.runtime.store, thread_id, user_id=owner, actor=caller or owner or "chat"
        )

    async def list_threads(
        self, pagination: Pagination, filters: ThreadFilter
    ) -> PaginatedResponse[ThreadDict]:
        return await asyncio.to_thread(self._list_threads, pagination, filters)

    def _list_threads(
        self, pagination: Pagination, filters: ThreadFilter
    ) -> PaginatedResponse[ThreadDict]:
        self.steps.flush()  # the sidebar orders threads by their newest step
        if not filters.userId:
            raise ValueError("listing threads needs filters.userId, got none")
        t, s, turns, fb = schema.threads, schema.steps, schema.turns, schema.feedback
        with self.engine.connect() as conn:
            identifier = self._identifier_of(conn, filters.userId)
            if identifier is None:
                return PaginatedResponse(PageInfo(False, None, None), [])
            last = sa.func.coalesce(sa.func.max(s.c.created_at), t.c.created_at).label("last")
            query = (
                sa.select(t, last)
                .outerjoin(s, s.c.thread_id == t.c.id)
                .where(t.c.user_identifier == identifier, t.c.deleted_at.is_(None))
                .group_by(t.c.id)  # the primary key: its other columns follow
                .order_by(last.desc(), t.c.id)
                .limit(self.thread_limit)
            )
            if filters.search:
                needle = f"%{filters.search.lower()}%"
                in_turns = sa.select(turns.c.id).where(
                    turns.c.session_id == t.c.id,
                    sa.or_(
                        sa.func.lower(turns.c.user_message).like(needle),
                        sa.func.lower(turns.c.reply).like(needle),
                    ),
                )
                query = query.where(
                    sa.or_(sa.func.lower(t.c.name).like(needle), sa.exists(in_turns))
                )
            if filters.feedback is not None:
                voted = sa.select(fb.c.turn_id).where(
                    fb.c.session_id == t.c.id,
                    fb.c.user_id == identifier,
                    fb.c.value == int(filters.feedback),
                )
                query = query.where(sa.exists(voted))
            rows = conn.execute(query).all()
        start = 0
        if pagination.cursor:
            ids = [r.id for r in rows]
            start = ids.index(pagination.cursor) + 1 if pagination.cursor in ids else len(ids)
        page = rows[start : start + pagination.first]
        data = [
            ThreadDict(
                id=r.id,
                createdAt=_iso(r.last) or "",  # the sidebar groups threads by last activity
                name=r.name,
                userId=filters.userId,
                userIdentifier=r.user_identifier,
                tags=r.tags,
                metadata=r.metadata or {},
                steps=[],
                elements=[],
            )
            for r in page
        ]
        return PaginatedResponse(
            pageInfo=PageInfo(
                hasNextPage=len(rows) > start + pagination.first,
                startCursor=data[0]["id"] if data else None,
                endCursor=data[-1]["id"] if data else None,
            ),
            data=data,
        )

    async def get_thread(self, thread_id: str) -> ThreadDict | None:
        return await asyncio.to_thread(self._get_thread, thread_id)

    def _get_thread(self, thread_id: str) -> ThreadDict | None:
        self.steps.flush()  # every message so far, those still queued included
        t, s, e, fb, u = (
            schema.threads,
            schema.steps,
            schema.elements,
            schema.feedback,
            schema.chat_users,
        )
        with self.engine.connect() as conn:
            thread = conn.execute(
                sa.select(t, u.c.id.label("user_id"))
                .outerjoin(u, u.c.identifier == t.c.user_identifier)
                .where(t.c.id == thread_id, t.c.deleted_at.is_(None))
            ).first()
            if thread is None:
                return None
            steps = conn.execute(
                sa.select(s).where(s.c.thread_id == thread_id).order_by(s.c.created_at, s.c.id)
            ).all()
            votes = {
                row.turn_id: row
                for row in conn.execute(
                    sa.select(fb).where(
                        fb.c.session_id == thread_id,
                        fb.c.user_id == thread.user_identifier,
                        fb.c.value.is_not(None),
                    )
                )
            }
            elements = conn.execute(sa.select(e.c.data).where(e.c.thread_id == thread_id)).all()
        step_dicts: list[StepDict] = []
        for row in steps:
            step = cast("StepDict", dict(row.data))
            if (vote := votes.get(row.id)) is not None:
                step["feedback"] = FeedbackDict(
                    forId=row.id,
                    id=feedback_id(row.id, vote.user_id),
                    value=vote.value,
                    comment=vote.comment,
                )
            step_dicts.append(step)
        return ThreadDict(
            id=thread.id,
            createdAt=_iso(thread.created_at) or "",
            name=thread.name,
            userId=thread.user_id,
            userIdentifier=thread.user_identifier,
            tags=thread.tags,
            metadata=thread.metadata or {},
            steps=step_dicts,
            elements=[cast("ElementDict", dict(r.data)) for r in elements],
        )

    # -- steps ---------------------------------------------------------------------------
    @queue_until_user_message()
    async def create_step(self, step_dict: StepDict) -> None:
        self.steps.upsert(dict(step_dict))  # queued: Chainlit waits for no one here

    @queue_until_user_message()
    async def update_step(self, step_dict: StepDict) -> None:
        self.steps.upsert(dict(step_dict))

    @queue_until_user_message()
    async def delete_step(self, step_id: str) -> None:
        self.steps.delete(step_id)

    async def get_favorite_steps(self, user_id: str) -> list[StepDict]:
        def favorites() -> list[StepDict]:
            self.steps.flush()
            t, s = schema.threads, schema.steps
            with self.engine.connect() as conn:
                identifier = self._identifier_of(conn, user_id)
                rows = conn.execute(
                    sa.select(s.c.data)
                    .join(t, t.c.id == s.c.thread_id)
                    .where(t.c.user_identifier == identifier, t.c.deleted_at.is_(None))
                    .order_by(s.c.created_at.desc())
                ).all()
            return [
                cast("StepDict", dict(r.data))
                for r in rows
                if (r.data.get("metadata") or {}).get("favorite")
            ]

        return await asyncio.to_thread(favorites)

    # -- elements ---------------------------------------------------------------------------
    @queue_until_user_message()
    async def create_element(self, element: Element) -> None:
        """Keep the element's description (URL, name, props); file contents are not stored."""
        data = {k: v for k, v in element.to_dict().items() if v is not None}

        def upsert() -> None:
            e = schema.elements
            with self.engine.begin() as conn:
                conn.execute(e.delete().where(e.c.id == element.id))
                conn.execute(
                    e.insert().values(
                        id=element.id, thread_id=element.thread_id, data=data, created_at=utcnow()
                    )
                )

        await self._write(upsert)

    async def get_element(self, thread_id: str, element_id: str) -> ElementDict | None:
        e = schema.elements
        data = await asyncio.to_thread(
            self._scalar,
            sa.select(e.c.data).where(e.c.id == element_id, e.c.thread_id == thread_id),
        )
        return cast("ElementDict", dict(data)) if data is not None else None

    @queue_until_user_message()
    async def delete_element(self, element_id: str, thread_id: str | None = None) -> None:
        def delete() -> None:
            e = schema.elements
            query = e.delete().where(e.c.id == element_id)
            if thread_id is not None:
                query = query.where(e.c.thread_id == thread_id)
            with self.engine.begin() as conn:
                conn.execute(query)

        await self._write(delete)

    # -- feedback ----------------------------------------------------------------------------
    async def upsert_feedback(self, feedback: Feedback) -> str:
        """Record the caller's thumbs on a turn of theirs; returns the vote's id.

        Raises :class:`OwnershipError` when ``feedback.forId`` is not a turn of
        the caller, ``ValueError`` for a bad value or an over-long comment,
        :class:`RateLimitExceeded` past ``limits.votes_per_minute_per_user``.
        """
        caller = _caller_id()
        if feedback.value not in (0, 1):
            raise ValueError(f"feedback value must be 0 or 1, got {feedback.value!r}")
        self.votes.hit(caller)
        await self.runtime.record_vote(
            feedback.forId, caller, int(feedback.value), feedback.comment
        )
        return feedback_id(feedback.forId, caller)

    async def delete_feedback(self, feedback_id: str) -> bool:
        """Remove the caller's vote (recorded as a delete event)."""
        caller = _caller_id()
        turn_id, owner = parse_feedback_id(feedback_id)
        if owner != caller:
            raise OwnershipError(f"user {caller!r} cannot remove a vote of another user")
        self.votes.hit(caller)
        await self.runtime.record_vote(turn_id, caller, None)
        return True

    # -- the rest of Chainlit's interface -------------------------------------------------------
    async def build_debug_url(self) -> str:
        return ""

    async def close(self) -> None:
        """Let the queued step writes finish; the runtime owns the store."""
        await asyncio.to_thread(self.steps.close)
        await asyncio.to_thread(self._writer.shutdown)


def current_data_layer() -> FlywheelDataLayer:
    """This server's data layer, for the routes that replace Chainlit's (503 without one)."""
    layer = get_data_layer()
    if not isinstance(layer, FlywheelDataLayer):
        raise HTTPException(503, "chat history is not enabled on this server")
    return layer
