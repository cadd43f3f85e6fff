"""A chat client that speaks Chainlit's socket.io protocol, as the browser does.

Used by the replica and durability tests and by ``bench/load.py``; it needs a
running ``flywheel serve``. The handshake follows ``chainlit/socket.py``:

1. ``POST /login`` (form ``username``/``password``) sets the ``access_token`` cookie;
2. a socket.io connection on ``/ws/socket.io`` carries that cookie, and the
   ``connect`` auth payload names the session (``sessionId``, ``clientType``,
   ``threadId`` to resume a thread, ``userEnv``, ``chatProfile``);
3. the client emits ``connection_successful``: the server runs ``on_chat_start``
   (or ``on_chat_resume`` with a ``threadId``, answering ``resume_thread``);
4. a turn is ``client_message`` with a user step (uuid4 id, ``output`` = text);
   the server answers ``task_start``, ``stream_start`` (the assistant message,
   whose ``parentId`` is the ``on_message`` run id = Flywheel's turn id),
   ``stream_token``…, ``new_message`` (the finished reply) and ``task_end``.

Votes go over HTTP like the browser's: ``PUT /feedback`` with the cookie.

>>> Turn(turn_id="t", thread_id="s", text="hi", sent_at=0.0, done_at=0.25).latency_ms
250.0
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import socketio

__all__ = ["ChatError", "ChatSession", "Turn", "login"]

SOCKET_PATH = "/ws/socket.io"


class ChatError(Exception):
    """The server did not answer as a chat server should (refused, timed out, disconnected)."""


async def login(http: httpx.AsyncClient, user: str, password: str) -> str:
    """Log in through Chainlit's password form; returns the ``access_token`` cookie value."""
    response = await http.post("/login", data={"username": user, "password": password})
    if response.status_code != 200:
        raise ChatError(f"login as {user!r} failed: {response.status_code} {response.text}")
    token = response.cookies.get("access_token")
    if not token:
        raise ChatError(f"login as {user!r} set no access_token cookie")
    return token


@dataclass
class Turn:
    """One answered message, as the client saw it (times from ``time.perf_counter``)."""

    turn_id: str | None
    thread_id: str | None
    text: str
    sent_at: float
    done_at: float
    first_token_at: float | None = None
    tokens: list[str] = field(default_factory=list)
    is_error: bool = False
    actions: int = 0

    @property
    def latency_ms(self) -> float:
        """From the emit of ``client_message`` to the finished reply (``new_message``)."""
        return (self.done_at - self.sent_at) * 1000


class ChatSession:
    """One browser tab: a socket.io connection for a signed-in user.

    Use :meth:`open` (connects and waits for the chat to start), :meth:`ask`,
    :meth:`vote`, :meth:`close`.
    """

    def __init__(self, base_url: str, token: str, *, thread_id: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.session_id = str(uuid.uuid4())
        self.thread_id = thread_id
        self.resumed: dict[str, Any] | None = None
        self.events: list[tuple[str, Any]] = []
        self.arrivals: list[float] = []  # perf_counter time of each event, for latencies
        self._sio = socketio.AsyncClient(reconnection=False)
        self._changed = asyncio.Event()
        self._sio.on("*", self._record)

    async def _record(self, event: str, data: Any = None) -> None:
        self.arrivals.append(time.perf_counter())
        self.events.append((event, data))
        if event == "first_interaction" and isinstance(data, dict):
            self.thread_id = data.get("thread_id") or self.thread_id
        elif event == "resume_thread" and isinstance(data, dict):
            self.resumed = data
        self._changed.set()

    @classmethod
    async def open(
        cls, base_url: str, token: str, *, thread_id: str | None = None, timeout: float = 30
    ) -> ChatSession:
        """Connect (resuming ``thread_id`` if given) and start the chat."""
        session = cls(base_url, token, thread_id=thread_id)
        try:
            await session._sio.connect(
                session.base_url,
                headers={"Cookie": f"access_token={token}"},
                auth={
                    "sessionId": session.session_id,
                    "clientType": "webapp",
                    "threadId": thread_id,
                    "userEnv": "{}",
                    "chatProfile": None,
                },
                transports=["websocket"],
                socketio_path=SOCKET_PATH,
                wait_timeout=timeout,
            )
        except socketio.exceptions.ConnectionError as exc:
            raise ChatError(f"socket.io connection refused: {exc}") from exc
        await session._sio.emit("connection_successful")
        if thread_id is not None:
            await session._wait(lambda: session.resumed is not None, timeout, "resume_thread")
        return session

    async def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if not self._sio.connected:
                raise ChatError(f"disconnected while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChatError(f"no {what} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def ask(self, text: str, *, timeout: float = 60) -> Turn:
        """Send a message and wait until the reply is complete (the turn's ``task_end``)."""
        start, sent_at = await self.send(text)
        answer: dict[str, Any] = {}
        turn = Turn(None, self.thread_id, "", sent_at, 0.0)
        await self._wait(self._scan(start, turn, answer), timeout, "reply")
        final = answer["final"]
        turn.text = final.get("output") or ""
        turn.turn_id = final.get("parentId")
        turn.thread_id = self.thread_id or final.get("threadId")
        turn.is_error = bool(final.get("isError")) or final.get("type") == "error_message"
        turn.actions = sum(1 for name, _ in self.events[start:] if name == "action")
        return turn

    async def wait_for_event(self, name: str, count: int = 1, *, timeout: float = 30) -> None:
        """Wait until ``count`` events called ``name`` have arrived in this session."""
        await self._wait(
            lambda: sum(1 for n, _ in self.events if n == name) >= count, timeout, name
        )

    async def send(self, text: str) -> tuple[int, float]:
        """Emit a user message without waiting; returns (event cursor, send time)."""
        start = len(self.events)
        message_id = str(uuid.uuid4())
        payload = {
            "message": {
                "id": message_id,
                "threadId": self.thread_id or "",
                "name": "user",
                "type": "user_message",
                "output": text,
                "createdAt": datetime.now(UTC).isoformat(),
            },
            "fileReferences": [],
        }
        sent_at = time.perf_counter()
        await self._sio.emit("client_message", payload)
        return start, sent_at

    def _scan(self, start: int, turn: Turn, answer: dict[str, Any]) -> Any:
        """A predicate that consumes new events of one turn and says whether it is complete."""
        cursor = [start]

        def complete() -> bool:
            events = self.events
            while cursor[0] < len(events):
                name, data = events[cursor[0]]
                at = self.arrivals[cursor[0]]
                cursor[0] += 1
                data = data if isinstance(data, dict) else {}
                if name == "stream_start" and data.get("type") == "assistant_message":
                    turn.first_token_at = turn.first_token_at or at
                    answer["id"] = data.get("id")
                    turn.tokens.append(data.get("output") or "")
                elif name == "stream_token" and data.get("id") == answer.get("id"):
                    turn.tokens.append(data.get("token") or "")
                elif (
                    name == "new_message"
                    and data.get("type") in ("assistant_message", "error_message")
                    and "final" not in answer
                ):
                    answer["final"] = data
                    turn.done_at = at
                elif name == "task_end" and "final" in answer:
                    return True
            return False

        return complete

    async def vote(
        self, http: httpx.AsyncClient, turn_id: str, value: int, comment: str | None = None
    ) -> httpx.Response:
        """Thumbs (1 up, 0 down) on a turn, over HTTP like the browser, to ``http``'s server."""
        body: dict[str, Any] = {"forId": turn_id, "value": value}
        if comment is not None:
            body["comment"] = comment
        return await http.put(
            "/feedback",
            json={"sessionId": self.session_id, "feedback": body},
            headers={"Cookie": f"access_token={self.token}"},
        )

    async def close(self) -> None:
        if self._sio.connected:
            await self._sio.disconnect()
