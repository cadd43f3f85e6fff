"""A request-body size limit for every HTTP route of the server (``limits.max_body_bytes``).

Uvicorn and Chainlit read bodies of any size; our routes (outcomes, votes,
operator forms) and Chainlit's (login, thread actions) all take small JSON or
form bodies. The socket.io path is left alone: Engine.IO has its own limit
(``max_http_buffer_size``) and chat messages have ``limits.max_message_chars``.

A declared ``Content-Length`` over the limit is refused before reading; a
chunked body is read up to the limit, then refused. The refusal is a 413 with
a JSON ``detail`` saying the limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["BodyLimitMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over ``max_bytes`` (paths under ``exempt`` excepted).

    >>> BodyLimitMiddleware(None, max_bytes=0)  # type: ignore[arg-type]
    Traceback (most recent call last):
    ...
    ValueError: max_bytes must be > 0, got 0
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, exempt: tuple[str, ...] = ("/ws/",)
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in _WITH_BODY
            or scope["path"].startswith(self.exempt)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f", got {declared}")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, "")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as the app expects

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, got: str) -> None:
        detail = f"body must be at most {self.max_bytes} bytes{got}"
        payload = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
