"""chatbot.web.overload: past capacity, refuse at once (503) rather than slow everyone."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from chatbot.web.overload import Overload, OverloadMiddleware


class _Held:
    """An ASGI app whose requests stay in progress until released (a slow handler)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            self.entered.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_requests_past_capacity_get_a_503_with_a_reason_and_retry_after() -> None:
    inner, gate = _Held(), Overload(max_turns=1, max_requests=1)
    async with _client(OverloadMiddleware(inner, overload=gate)) as client:
        slow = asyncio.create_task(client.get("/slow"))
        await inner.entered.wait()

        refused = await client.post("/api/outcomes", json={})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert "overloaded" in refused.json()["detail"]
        assert "nothing was done" in refused.json()["detail"]
        # A busy server is alive, and the chat transport carries the busy message.
        assert (await client.get("/api/health")).status_code == 200
        assert (await client.get("/ws/socket.io/?EIO=4")).status_code == 200

        inner.release.set()
        assert (await slow).status_code == 200
        assert (await client.get("/other")).status_code == 200  # capacity is back
    assert (gate.requests, gate.shed_requests) == (0, 1)


async def test_a_failing_request_gives_its_place_back() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("handler bug")

    gate = Overload(max_turns=1, max_requests=1)
    async with _client(OverloadMiddleware(broken, overload=gate)) as client:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await client.get("/x")
    assert gate.requests == 0 and gate.shed_requests == 0


def test_turns_past_capacity_are_refused_and_places_come_back() -> None:
    gate = Overload(max_turns=2, max_requests=1)
    with gate.turn() as a, gate.turn() as b, gate.turn() as c:
        assert (a, b, c) == (True, True, False)
        assert gate.turns == 2
    with gate.turn() as again:
        assert again
    with pytest.raises(ValueError, match="boom"), gate.turn():
        raise ValueError("boom")
    assert (gate.turns, gate.shed_turns) == (0, 1)


@pytest.mark.parametrize(("option", "value"), [("max_turns", 0), ("max_requests", -1)])
def test_bad_limits_are_named(option: str, value: int) -> None:
    kwargs = {"max_turns": 1, "max_requests": 1, option: value}
    with pytest.raises(ValueError, match=option):
        Overload(**kwargs)
