"""Load: simulated chat users over Chainlit's socket.io protocol against a real server.

    .venv/bin/python bench/load.py [--rounds 2] [--servers bare,flywheel]
        [--scenarios 1x20,50x5,10x25] [--no-votes] [--profile DIR] [--json]
    .venv/bin/python bench/load.py --mode mixed [--users 50] [--turns 5] [--think-ms 1000]
        [--database sqlite|postgres|URL] [--url http://… --database-url URL] [--json]

**compare** (the default; issue 18's table). Two servers run side by side:
a bare Chainlit app (``bench/bare_chainlit_app.py``: ``@cl.on_message``
streams a fixed 26-token reply with ``stream_token``, 20 ms apart, no login,
no data layer, run with ``chainlit run`` and the project's Chainlit settings)
and ``flywheel serve`` with ``fake/echo?delay_ms=20&first_ms=20`` (SQLite,
optimizer off, Langfuse off), whose reply to :data:`MESSAGE` is the same 26
tokens. The same black-box client (:mod:`tests.support.chainlit_client`)
drives both; for each round and scenario each server takes its turn, the
order alternating between rounds. A scenario ``UxM``: U users connect (and,
for Flywheel, log in), then all send M messages back to back, at once, no
votes. Per server and round: reply complete and first token p50/p99 (from
the emit of the message), replies per second, and the server's CPU per turn
(``/proc/<pid>/stat``, from the first message until the server is idle again,
so deferred work counts; logins and connections are measured apart).
Reported separately: logins (p50/p99, CPU per login — bcrypt's, by design),
and, after each Flywheel 50x5, votes on every turn and one outcome per
conversation (p50/p99, CPU per event). Lost events: a reply whose streamed
tokens or final text differ from what was sent, a turn the client saw that
is not in the store, an acknowledged vote or outcome not stored as
acknowledged, any error. Targets (Flywheel / bare, same run): server CPU per
steady-state turn (10x25) ≤ 2×; at 50 users reply-complete p99 ≤ 1.25× and
replies per second ≥ 0.8×; zero lost events. ``--profile DIR`` samples the
Flywheel server with py-spy (if installed in the venv; ``LOAD_PYSPY_ARGS``
adds options) into collapsed stacks per phase.

**mixed** (``--mode mixed``): users who think between messages, vote and convert.
Each simulated user logs in (``POST /login``), opens a chat over socket.io like
the browser (:mod:`tests.support.chainlit_client`), starts at a random moment within
``--think-ms``, sends ``--turns`` messages one after another (waiting
``--think-ms`` ± 50 % after each reply, as a person reading it), votes
thumbs up or down on every reply over HTTP, and reports a conversion for its
session through the outcomes API. Unless ``--url`` is given, the script
starts ``flywheel serve`` itself with the fast fake model (``fake/echo``) on
a fresh SQLite file or PostgreSQL schema (``--database postgres``, the
default, uses ``FLYWHEEL_TEST_POSTGRES_URL``).

Figures, per turn (``client`` = from emitting the message to the finished
reply, as the user experiences it):

- **throughput** (turns/s over the load phase) and **errors** (failed turns,
  refused votes or outcomes, exceptions);
- **overhead vs bare litellm**: client latency minus the median of a bare
  ``litellm.acompletion`` stream of the same fake model and message, timed in
  this process in the same run, one call at a time, before the load (the
  model's own latency, litellm included);
- **server overhead**: client latency minus the model time the server itself
  measured for that very turn (``turns.latency_ms``: litellm and the model on
  the server, including handing each token to the socket) — what Chainlit,
  socket.io, assignment, prompt building, the store writes and the network
  add;
- **server CPU per turn**: the server process's CPU time (user + system, all
  threads, from ``/proc/<pid>/stat``) over the load phase divided by the
  turns — votes, outcomes and connections included. Unlike the latencies,
  other jobs on a shared machine barely move it. Needs the server's pid:
  known when the script starts the server, else ``--server-pid``;
- **lost events**: afterwards every turn the clients saw, every acknowledged
  vote and outcome must be in the store exactly once.

A vote or outcome whose keep-alive connection the server closed just as it
was sent is sent once more (both are idempotent) and counted as re-sent.

Before measuring, one warm-up turn (user00, its own session) pays the fresh
server's one-off costs.

Target: server overhead p99 ≤ 5 ms at 50 concurrent users, zero lost events.
The load average is printed before and after: on a shared machine the
latencies move with it, the baseline measured in the same run less so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from optimizer.store import Store, schema  # noqa: E402
from tests.support.chainlit_client import ChatSession, login  # noqa: E402
from tests.support.flywheel_process import (  # noqa: E402
    API_KEY,
    PASSWORD,
    ServerProcess,
    postgres_schema,
    user_name,
    write_config,
)

log = logging.getLogger("bench.load")

TARGET_P99_MS = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: 23 words: with " (n)" and fake/echo's "You asked:", the reply is 26 tokens, as the bare app's.
MESSAGE = (
    "I would like to export every one of my open tasks to a spreadsheet "
    "so that my whole team can review them together"
)


@dataclass
class UserResult:
    turns: list[dict[str, Any]] = field(default_factory=list)  # turn_id, latency_ms, ttft_ms
    votes: dict[str, int] = field(default_factory=dict)  # acknowledged: turn id → value
    outcomes: list[str] = field(default_factory=list)  # acknowledged idempotency keys
    errors: list[str] = field(default_factory=list)
    retries: int = 0  # votes and outcomes re-sent after a dropped keep-alive connection


async def _send_idempotent(result: UserResult, send: Any) -> httpx.Response:
    """Send once more if the connection dropped (a keep-alive race): both requests are idempotent.

    A repeated vote sets the same value; a repeated outcome has the same key.
    """
    try:
        return await send()
    except httpx.TransportError:
        result.retries += 1
        return await send()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def bare_litellm(model: str, *, calls: int) -> list[float]:
    """Latency (ms) of streaming the same fake model directly through litellm, one at a time."""
    import litellm

    from chatbot.llm.streaming import register_providers

    register_providers()
    messages = [{"role": "user", "content": MESSAGE}]

    async def one() -> float:
        start = time.perf_counter()
        response = await litellm.acompletion(
            model=model, messages=messages, stream=True, max_tokens=160
        )
        async for _ in response:
            pass
        return (time.perf_counter() - start) * 1000

    await one()  # litellm's first call imports lazily: not part of the baseline
    return [await one() for _ in range(calls)]


async def simulate_user(
    url: str, index: int, turns: int, think_ms: float, start: asyncio.Event, ready: list[int]
) -> UserResult:
    result = UserResult()
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        try:
            token = await login(http, user_name(index), PASSWORD)
            chat = await ChatSession.open(url, token)
        except Exception as exc:
            result.errors.append(f"connect: {type(exc).__name__}: {exc}")
            return result
        ready.append(index)
        await start.wait()
        # Users arrive at random moments, not all in the same millisecond.
        await asyncio.sleep(think_ms / 1000 * rng.random())
        try:
            for t in range(turns):
                turn = await chat.ask(f"{MESSAGE} ({t + 1})", timeout=120)
                if turn.is_error or not turn.turn_id:
                    result.errors.append(f"turn failed: {turn.text[:80]}")
                    continue
                ttft = (turn.first_token_at - turn.sent_at) * 1000 if turn.first_token_at else None
                result.turns.append(
                    {"turn_id": turn.turn_id, "latency_ms": turn.latency_ms, "ttft_ms": ttft}
                )
                value = (index + t) % 2
                turn_id = turn.turn_id
                vote = await _send_idempotent(
                    result,
                    lambda: chat.vote(http, turn_id, value),  # noqa: B023
                )
                if vote.status_code == 200:
                    result.votes[turn.turn_id] = value
                else:
                    result.errors.append(f"vote {vote.status_code}: {vote.text[:80]}")
                if think_ms:
                    await asyncio.sleep(think_ms / 1000 * rng.uniform(0.5, 1.5))
            key = f"load-{uuid.uuid4().hex}"
            body = {"idempotency_key": key, "session_id": chat.thread_id, "name": "conversion"}
            response = await _send_idempotent(
                result,
                lambda: http.post("/api/outcomes", json=body, headers={"X-API-Key": API_KEY}),
            )
            if response.status_code == 201:
                result.outcomes.append(key)
            else:
                result.errors.append(f"outcome {response.status_code}: {response.text[:80]}")
        except Exception as exc:
            result.errors.append(f"{type(exc).__name__} after {len(result.turns)} turns: {exc}")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(chat.close(), 5)
    return result


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) so far; None if unknown."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def check_store(database_url: str, results: list[UserResult]) -> dict[str, Any]:
    """Every turn seen, vote and outcome acknowledged: in the store once, as acknowledged."""
    store = Store(database_url)
    turn_ids = [t["turn_id"] for r in results for t in r.turns]
    votes = {k: v for r in results for k, v in r.votes.items()}
    keys = [k for r in results for k in r.outcomes]
    t, f, o = schema.turns, schema.feedback, schema.outcomes
    with store.engine.connect() as conn:
        stored_turns = dict(
            conn.execute(sa.select(t.c.id, t.c.latency_ms).where(t.c.id.in_(turn_ids))).all()
        )
        stored_votes = dict(
            conn.execute(sa.select(f.c.turn_id, f.c.value).where(f.c.turn_id.in_(votes))).all()
        )
        stored_keys = (
            conn.execute(sa.select(o.c.idempotency_key).where(o.c.idempotency_key.in_(keys)))
            .scalars()
            .all()
        )
    store.dispose()
    lost = (
        len(set(turn_ids) - set(stored_turns))
        + sum(stored_votes.get(k) != v for k, v in votes.items())
        + len(set(keys) - set(stored_keys))
    )
    return {
        "turns": len(turn_ids),
        "votes": len(votes),
        "outcomes": len(keys),
        "lost": lost,
        "model_ms": stored_turns,
    }


async def warm_up(url: str) -> None:
    """One chat turn before measuring: the first socket.io session and turn of a fresh
    server pay one-off costs (lazy imports) that are not what this measures."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        chat = await ChatSession.open(url, await login(http, user_name(0), PASSWORD))
        await chat.ask("warm-up", timeout=120)
        await chat.close()


async def run_load(
    url: str, users: int, turns: int, think_ms: float, server_pid: int | None = None
) -> tuple[list[UserResult], float, float | None]:
    """All users log in and connect first; then they chat at once (the measured phase).

    Returns the results, the phase's duration (s) and the server's CPU seconds in it.
    """
    start = asyncio.Event()
    ready: list[int] = []
    tasks = [
        asyncio.create_task(simulate_user(url, i, turns, think_ms, start, ready))
        for i in range(users)
    ]
    deadline = time.monotonic() + 300
    while len(ready) < users and not all(t.done() for t in tasks):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ready)} of {users} users connected in 300 s")
        await asyncio.sleep(0.1)
    cpu_before = cpu_seconds(server_pid)
    began = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - began
    cpu_after = cpu_seconds(server_pid)
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return list(results), duration, cpu


# --- compare: Flywheel against a bare Chainlit app, same client, same run ------------------

BARE_APP = ROOT / "bench" / "bare_chainlit_app.py"
#: The fake model timed like the bare app: 20 ms to the first token, 20 ms between tokens.
COMPARE_MODEL = "fake/echo?delay_ms=20&first_ms=20"
#: Targets (issue 18), Flywheel / bare Chainlit in the same run.
TARGET_CPU_RATIO = 2.0  # server CPU per steady-state turn, at most
TARGET_P99_RATIO = 1.25  # reply complete p99 at 50 users, at most
TARGET_THROUGHPUT_RATIO = 0.8  # replies per second at 50 users, at least
#: (name, users, messages per user): the issue's table.
SCENARIOS = (("1x20", 1, 20), ("50x5", 50, 5), ("10x25", 10, 25))
#: Seconds the server's CPU must stay still to count as idle after a phase.
IDLE_S = 0.3


def bare_reply() -> str:
    from bare_chainlit_app import REPLY

    return REPLY


@dataclass
class Target:
    """A server under test: Flywheel (login, a store to check) or the bare Chainlit app."""

    name: str
    url: str
    pid: int | None
    database_url: str | None = None  # None: no login, no store (the bare app)

    @property
    def logins(self) -> bool:
        return self.database_url is not None

    def expected(self, text: str) -> str:
        return f"You asked: {text}" if self.logins else bare_reply()


class BareChainlit:
    """``chainlit run bench/bare_chainlit_app.py`` in a scratch folder with the project's
    Chainlit settings (``.chainlit/config.toml``, ``chainlit.md``): only the app differs."""

    def __init__(self, root: Path) -> None:
        from tests.support.flywheel_process import ARTIFACTS, free_port

        self.root = root
        self.port = free_port()
        self.log = ARTIFACTS / "load-bare-chainlit.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> None:
        (self.root / ".chainlit").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / ".chainlit" / "config.toml", self.root / ".chainlit" / "config.toml")
        shutil.copy(ROOT / "chainlit.md", self.root / "chainlit.md")
        shutil.copy(BARE_APP, self.root / "app.py")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLYWHEEL_", "LANGFUSE_", "CHAINLIT_", "LITERAL_"))
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.log.parent.mkdir(exist_ok=True)
        chainlit = Path(sys.executable).with_name("chainlit")
        with self.log.open("w", encoding="utf-8") as out:
            self.proc = subprocess.Popen(
                [
                    str(chainlit),
                    "run",
                    "app.py",
                    "--headless",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bare Chainlit exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/project/settings", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"bare Chainlit not up after {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Phase:
    """One scenario on one server: every user connects, then all chat at once, back to back."""

    server: str
    scenario: str
    users: int
    messages: int
    latency_ms: list[float] = field(default_factory=list)  # emit → finished reply
    ttft_ms: list[float] = field(default_factory=list)  # emit → first streamed text
    duration_s: float = float("nan")  # all users' chats, first emit to last reply
    cpu_s: float | None = None  # the server's CPU over the chats (and until idle again)
    login_ms: list[float] = field(default_factory=list)
    login_cpu_s: float | None = None
    connect_cpu_s: float | None = None  # socket.io connections and chat starts
    turn_ids: list[list[str]] = field(default_factory=list)  # per user
    chats: list[ChatSession] = field(default_factory=list)
    incomplete: int = 0  # replies that arrived other than sent (lost or changed tokens)
    errors: list[str] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.latency_ms)

    def cpu_ms_per(self, cpu_s: float | None, count: int) -> float | None:
        return None if cpu_s is None or not count else cpu_s * 1000 / count


async def settle(pid: int | None, *, limit_s: float = 15) -> float | None:
    """The server's CPU seconds once it has gone idle: work it deferred (step writes) counts."""
    last = cpu_seconds(pid)
    if last is None:
        return None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        await asyncio.sleep(IDLE_S)
        now = cpu_seconds(pid)
        if now is None or now - last < 0.015:  # a tick or so: the event loop's own wake-ups
            return now
        last = now
    return last


async def _login_timed(url: str, index: int) -> tuple[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        began = time.perf_counter()
        token = await login(http, user_name(index), PASSWORD)
        return token, (time.perf_counter() - began) * 1000


async def _converse(target: Target, chat: ChatSession, messages: int, phase: Phase) -> list[str]:
    turn_ids: list[str] = []
    for n in range(1, messages + 1):
        text = f"{MESSAGE} ({n})"
        try:
            turn = await chat.ask(text, timeout=120)
        except Exception as exc:
            phase.errors.append(f"{type(exc).__name__}: {exc}")
            return turn_ids
        if turn.is_error:
            phase.errors.append(f"error reply: {turn.text[:80]}")
            continue
        phase.latency_ms.append(turn.latency_ms)
        if turn.first_token_at is not None:
            phase.ttft_ms.append((turn.first_token_at - turn.sent_at) * 1000)
        if turn.text != target.expected(text) or "".join(turn.tokens) != turn.text:
            phase.incomplete += 1
        if turn.turn_id:
            turn_ids.append(turn.turn_id)
    return turn_ids


async def run_phase(target: Target, scenario: str, users: int, messages: int) -> Phase:
    """Log in (Flywheel) and connect every user, then all send ``messages`` back to back."""
    phase = Phase(target.name, scenario, users, messages)
    before = cpu_seconds(target.pid)
    if target.logins:
        logged = await asyncio.gather(*(_login_timed(target.url, i) for i in range(users)))
        tokens = [token for token, _ in logged]
        phase.login_ms = [ms for _, ms in logged]
    else:
        tokens = [""] * users  # no login: the bare app needs none
    logged_in = await settle(target.pid)
    phase.chats = list(
        await asyncio.gather(*(ChatSession.open(target.url, token) for token in tokens))
    )
    connected = await settle(target.pid)
    began = time.perf_counter()
    phase.turn_ids = list(
        await asyncio.gather(*(_converse(target, c, messages, phase) for c in phase.chats))
    )
    phase.duration_s = time.perf_counter() - began
    done = await settle(target.pid)
    for chat in phase.chats:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(chat.close(), 5)
    if None not in (before, logged_in, connected, done):
        phase.login_cpu_s = logged_in - before  # type: ignore[operator]
        phase.connect_cpu_s = connected - logged_in  # type: ignore[operator]
        phase.cpu_s = done - connected  # type: ignore[operator]
    return phase


@dataclass
class Feedback:
    """Votes on every turn of a phase and one outcome per conversation (Flywheel only)."""

    vote_ms: list[float] = field(default_factory=list)  # on a connection already open
    first_vote_ms: list[float] = field(default_factory=list)  # opens the user's connection
    outcome_ms: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    votes: dict[str, int] = field(default_factory=dict)  # acknowledged
    outcomes: list[str] = field(default_factory=list)  # acknowledged keys
    errors: list[str] = field(default_factory=list)


async def run_feedback(target: Target, phase: Phase) -> Feedback:
    """Each user votes on each of its turns, then reports a conversion; all users at once."""
    result = Feedback()
    before = cpu_seconds(target.pid)

    async def one_user(chat: ChatSession, turn_ids: list[str], http: httpx.AsyncClient) -> None:
        for i, turn_id in enumerate(turn_ids):
            began = time.perf_counter()
            response = await chat.vote(http, turn_id, i % 2)
            # A user's first vote opens its connection, all fifty at once; a browser
            # already holds one (page, socket.io), so the two are reported apart.
            (result.vote_ms if i else result.first_vote_ms).append(
                (time.perf_counter() - began) * 1000
            )
            if response.status_code == 200:
                result.votes[turn_id] = i % 2
            else:
                result.errors.append(f"vote {response.status_code}: {response.text[:80]}")
        key = f"load-{uuid.uuid4().hex}"
        body = {"idempotency_key": key, "session_id": chat.thread_id, "name": "conversion"}
        began = time.perf_counter()
        response = await http.post("/api/outcomes", json=body, headers={"X-API-Key": API_KEY})
        result.outcome_ms.append((time.perf_counter() - began) * 1000)
        if response.status_code == 201:
            result.outcomes.append(key)
        else:
            result.errors.append(f"outcome {response.status_code}: {response.text[:80]}")

    # The clients first: building one (its TLS context) takes ~40 ms of the event loop's
    # time, and fifty built inside the timed burst delayed every first vote by seconds.
    clients = [httpx.AsyncClient(base_url=target.url, timeout=60) for _ in phase.chats]
    try:
        await asyncio.gather(
            *(
                one_user(c, ids, http)
                for c, ids, http in zip(phase.chats, phase.turn_ids, clients, strict=True)
            )
        )
    finally:
        await asyncio.gather(*(http.aclose() for http in clients))
    after = await settle(target.pid)
    if before is not None and after is not None:
        result.cpu_s = after - before
    return result


def lost_in_store(database_url: str, turn_ids: list[str], feedback: list[Feedback]) -> int:
    """Turns the clients saw, votes and outcomes acknowledged, missing from the store."""
    votes = {k: v for f in feedback for k, v in f.votes.items()}
    keys = [k for f in feedback for k in f.outcomes]
    t, fb, o = schema.turns, schema.feedback, schema.outcomes
    store = Store(database_url)
    try:
        with store.engine.connect() as conn:
            stored_turns = set(
                conn.execute(sa.select(t.c.id).where(t.c.id.in_(turn_ids))).scalars()
            )
            stored_votes = {
                turn_id: value
                for turn_id, value in conn.execute(
                    sa.select(fb.c.turn_id, fb.c.value).where(fb.c.turn_id.in_(votes))
                )
            }
            stored_keys = set(
                conn.execute(
                    sa.select(o.c.idempotency_key).where(o.c.idempotency_key.in_(keys))
                ).scalars()
            )
    finally:
        store.dispose()
    return (
        len(set(turn_ids) - stored_turns)
        + sum(stored_votes.get(k) != v for k, v in votes.items())
        + len(set(keys) - stored_keys)
    )


@contextlib.contextmanager
def profiling(pid: int | None, path: Path | None) -> Iterator[None]:
    """Sample the server with py-spy (if installed) into ``path`` (collapsed stacks)."""
    spy = Path(sys.executable).with_name("py-spy")
    if path is None or pid is None or not spy.exists():
        if path is not None:
            log.warning("no profile: py-spy is not installed in this venv")
        yield
        return
    proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Both servers up; for each round and scenario, each server in turn (order alternating)."""
    load_before = os.getloadavg()
    phases: list[Phase] = []
    feedback: list[Feedback] = []
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flywheel-load-")))
        bare = BareChainlit(root / "bare")
        stack.callback(bare.stop)
        config = write_config(
            root / "flywheel.toml",
            model=args.model or COMPARE_MODEL,
            users=max(users for _, users, _ in SCENARIOS),
            limits={"votes_per_minute_per_user": 100_000, "outcomes_per_minute_per_key": 100_000},
        )
        database_url = f"sqlite:///{root / 'load.db'}"
        server = ServerProcess("load-server", root / "home", config, database_url)
        stack.callback(server.stop)
        server.start(wait=False)
        bare.start()
        server.wait_healthy()
        targets = {
            "bare": Target("bare Chainlit", bare.url, bare.proc.pid if bare.proc else None),
            "flywheel": Target(
                "Flywheel", server.url, server.proc.pid if server.proc else None, database_url
            ),
        }
        chosen = [targets[name] for name in args.servers]
        for target in chosen:
            asyncio.run(_warm(target))
        scenarios = [s for s in SCENARIOS if s[0] in args.scenarios]
        for round_ in range(args.rounds):
            for name, users, messages in scenarios:
                order = chosen if round_ % 2 == 0 else chosen[::-1]
                for target in order:
                    prof = (
                        args.profile / f"{name}-round{round_ + 1}.txt"
                        if args.profile and target.logins
                        else None
                    )
                    with profiling(target.pid, prof):
                        phase = asyncio.run(run_phase(target, name, users, messages))
                    log.info(
                        "round %d %s %s: %d turns, p99 %.0f ms, %.1f replies/s, cpu %s ms/turn",
                        round_ + 1,
                        name,
                        target.name,
                        phase.turns,
                        _pct(phase.latency_ms, 99),
                        phase.turns / phase.duration_s,
                        phase.cpu_ms_per(phase.cpu_s, phase.turns),
                    )
                    phases.append(phase)
                    if target.logins and name == "50x5" and not args.no_votes:
                        feedback.append(asyncio.run(run_feedback(target, phase)))
        turn_ids = [t for p in phases if p.server == "Flywheel" for ids in p.turn_ids for t in ids]
        lost_store = (
            lost_in_store(database_url, turn_ids, feedback) if "flywheel" in args.servers else 0
        )
    load_after = os.getloadavg()
    return _compare_figures(phases, feedback, lost_store, load_before, load_after)


async def _warm(target: Target) -> None:
    """One turn on a fresh server: lazy imports and first connections are not what we measure."""
    token = ""
    if target.logins:
        token, _ = await _login_timed(target.url, 0)
    chat = await ChatSession.open(target.url, token)
    await chat.ask("warm-up", timeout=120)
    await chat.close()


def _per_round(phases: list[Phase], server: str, scenario: str, fn: Any) -> list[float]:
    values = [fn(p) for p in phases if p.server == server and p.scenario == scenario]
    return [v for v in values if v is not None and not math.isnan(v)]


def _compare_figures(
    phases: list[Phase],
    feedback: list[Feedback],
    lost_store: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> dict[str, Any]:
    rows: dict[str, dict[str, list[float]]] = {}

    def row(label: str, scenario: str, fn: Any) -> None:
        rows[label] = {
            server: _per_round(phases, server, scenario, fn)
            for server in ("bare Chainlit", "Flywheel")
        }

    row("1 user x 20, reply complete p50 (ms)", "1x20", lambda p: _pct(p.latency_ms, 50))
    row("1 user x 20, reply complete p99 (ms)", "1x20", lambda p: _pct(p.latency_ms, 99))
    row("50 users x 5, first token p50 (ms)", "50x5", lambda p: _pct(p.ttft_ms, 50))
    row("50 users x 5, first token p99 (ms)", "50x5", lambda p: _pct(p.ttft_ms, 99))
    row("50 users x 5, reply complete p50 (ms)", "50x5", lambda p: _pct(p.latency_ms, 50))
    row("50 users x 5, reply complete p99 (ms)", "50x5", lambda p: _pct(p.latency_ms, 99))
    row("50 users x 5, replies per second", "50x5", lambda p: p.turns / p.duration_s)
    row(
        "server CPU per turn, 10 users x 25 (steady, ms)",
        "10x25",
        lambda p: p.cpu_ms_per(p.cpu_s, p.turns),
    )
    row(
        "server CPU per turn, 50 users x 5 (ms)",
        "50x5",
        lambda p: p.cpu_ms_per(p.cpu_s, p.turns),
    )
    row(
        "server CPU per connection, 50 users (ms)",
        "50x5",
        lambda p: p.cpu_ms_per(p.connect_cpu_s, p.users),
    )
    logins = [p for p in phases if p.login_ms and p.scenario == "50x5"]
    votes = [ms for f in feedback for ms in f.vote_ms]
    first_votes = [ms for f in feedback for ms in f.first_vote_ms]
    outcomes = [ms for f in feedback for ms in f.outcome_ms]
    events = sum(len(f.vote_ms) + len(f.first_vote_ms) + len(f.outcome_ms) for f in feedback)
    feedback_cpu = [f.cpu_s for f in feedback if f.cpu_s is not None]
    separate = {
        "login p50 / p99 (ms), 50 at once": [
            (_pct(p.login_ms, 50), _pct(p.login_ms, 99)) for p in logins
        ],
        "login CPU (ms per login)": [p.cpu_ms_per(p.login_cpu_s, p.users) for p in logins],
        "vote p50 / p99 (ms), connection open": (
            [(_pct(votes, 50), _pct(votes, 99))] if votes else []
        ),
        "first vote p50 / p99 (ms), 50 new connections at once": (
            [(_pct(first_votes, 50), _pct(first_votes, 99))] if first_votes else []
        ),
        "outcome p50 / p99 (ms)": [(_pct(outcomes, 50), _pct(outcomes, 99))] if outcomes else [],
        "CPU per vote or outcome (ms)": (
            [sum(feedback_cpu) * 1000 / events] if events and feedback_cpu else []
        ),
    }
    incomplete = sum(p.incomplete for p in phases)
    errors = [e for p in phases for e in p.errors] + [e for f in feedback for e in f.errors]
    return {
        "rows": rows,
        "separate": separate,
        "turns": {
            s: sum(p.turns for p in phases if p.server == s) for s in ("bare Chainlit", "Flywheel")
        },
        "votes": sum(len(f.votes) for f in feedback),
        "outcomes": sum(len(f.outcomes) for f in feedback),
        "lost_events": incomplete + lost_store + len(errors),
        "incomplete_replies": incomplete,
        "missing_in_store": lost_store,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "load_average_before": load_before[0],
        "load_average_after": load_after[0],
        "cpus": os.cpu_count(),
    }


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"


def _verdicts(f: dict[str, Any]) -> list[tuple[str, float, bool]]:
    rows = f["rows"]

    def ratio(label: str) -> float:
        r = rows[label]
        return _mean(r["Flywheel"]) / _mean(r["bare Chainlit"])

    cpu = ratio("server CPU per turn, 10 users x 25 (steady, ms)")
    p99 = ratio("50 users x 5, reply complete p99 (ms)")
    rate = ratio("50 users x 5, replies per second")
    return [
        (f"server CPU per steady turn ≤ {TARGET_CPU_RATIO:g}× bare", cpu, cpu <= TARGET_CPU_RATIO),
        (f"50 users reply complete p99 ≤ {TARGET_P99_RATIO:g}× bare", p99, p99 <= TARGET_P99_RATIO),
        (
            f"50 users replies/s ≥ {TARGET_THROUGHPUT_RATIO:g}× bare",
            rate,
            rate >= TARGET_THROUGHPUT_RATIO,
        ),
        ("zero lost events", float(f["lost_events"]), f["lost_events"] == 0),
    ]


def _print_compare(f: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="chat turns: bare Chainlit vs Flywheel, same client, same run (ranges over rounds)"
    )
    table.add_column("load")
    table.add_column("bare Chainlit", justify="right")
    table.add_column("Flywheel", justify="right")
    table.add_column("ratio", justify="right")
    for label, r in f["rows"].items():
        fmt = ".1f" if "CPU" in label or "per second" in label else ".0f"
        bare, ours = r["bare Chainlit"], r["Flywheel"]
        ratio = _mean(ours) / _mean(bare) if bare and ours else float("nan")
        table.add_row(label, _span(bare, fmt), _span(ours, fmt), f"{ratio:.2f}×")
    console = Console(width=150)
    console.print(table)
    for label, values in f["separate"].items():
        shown = ", ".join(
            " / ".join(f"{x:.1f}" for x in v) if isinstance(v, tuple) else f"{v:.1f}"
            for v in values
            if v is not None
        )
        console.print(f"Flywheel {label}: {shown or '–'}")
    for label, value, ok in _verdicts(f):
        console.print(f"target {label}: {'met' if ok else 'NOT met'} ({value:.2f})")
    console.print(
        f"turns: {f['turns']}; votes {f['votes']}, outcomes {f['outcomes']}; "
        f"incomplete replies {f['incomplete_replies']}, missing in store {f['missing_in_store']}, "
        f"errors {f['errors']} {f['error_examples'] or ''}\n"
        f"load average {f['load_average_before']:.1f} before, {f['load_average_after']:.1f} "
        f"after, on {f['cpus']} CPUs"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode",
        choices=("compare", "mixed"),
        default="compare",
        help="compare: Flywheel vs a bare Chainlit app (the issue-18 table); "
        "mixed: users who think, vote and convert (server overhead vs bare litellm)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="compare: rounds per server")
    parser.add_argument(
        "--servers", default="bare,flywheel", help="compare: which servers (bare, flywheel)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(name for name, _, _ in SCENARIOS),
        help="compare: which of " + ", ".join(name for name, _, _ in SCENARIOS),
    )
    parser.add_argument("--no-votes", action="store_true", help="compare: skip votes/outcomes")
    parser.add_argument(
        "--profile", type=Path, help="compare: py-spy samples of Flywheel per phase into DIR"
    )
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--turns", type=int, default=5, help="messages per user")
    parser.add_argument("--think-ms", type=float, default=1000, help="pause after each reply")
    parser.add_argument("--model", help=f"default {COMPARE_MODEL} (compare), fake/echo (mixed)")
    parser.add_argument(
        "--database", default="postgres", help="sqlite, postgres (FLYWHEEL_TEST_POSTGRES_URL)"
    )
    parser.add_argument("--url", help="a running server (then give --database-url)")
    parser.add_argument("--database-url", help="the running server's database, for the check")
    parser.add_argument("--server-pid", type=int, help="the running server's pid, for its CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.mode == "compare":
        args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
        args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        known = {name for name, _, _ in SCENARIOS}
        if not set(args.servers) <= {"bare", "flywheel"} or not args.servers:
            parser.error(f"--servers must name bare and/or flywheel, got {args.servers}")
        if not set(args.scenarios) <= known or not args.scenarios:
            parser.error(f"--scenarios must be among {sorted(known)}, got {args.scenarios}")
        if args.rounds < 1:
            parser.error(f"--rounds must be ≥ 1, got {args.rounds}")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        figures = compare(args)
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            _print_compare(figures)
        return 0 if figures["lost_events"] == 0 else 1
    args.model = args.model or "fake/echo"
    if args.users < 1 or args.turns < 1:
        parser.error(f"--users and --turns must be ≥ 1, got {args.users} and {args.turns}")

    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if args.url:
            if not args.database_url:
                parser.error("--url needs --database-url (to check the store afterwards)")
            url, database_url = args.url.rstrip("/"), args.database_url
            server_pid = args.server_pid
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flywheel-load-")))
            if args.database == "sqlite":
                database_url = f"sqlite:///{root / 'load.db'}"
            else:
                base = (
                    os.environ.get("FLYWHEEL_TEST_POSTGRES_URL")
                    if args.database == "postgres"
                    else args.database
                )
                if not base:
                    parser.error("--database postgres needs FLYWHEEL_TEST_POSTGRES_URL")
                database_url = stack.enter_context(postgres_schema(base, "load"))
            config = write_config(
                root / "flywheel.toml",
                model=args.model,
                users=args.users,
                limits={
                    "votes_per_minute_per_user": 100_000,
                    "outcomes_per_minute_per_key": 100_000,
                },
            )
            server = ServerProcess("load-server", root / "home", config, database_url)
            stack.callback(server.stop)
            server.start()
            url = server.url
            server_pid = server.proc.pid if server.proc is not None else None

        asyncio.run(warm_up(url))
        bare = asyncio.run(bare_litellm(args.model, calls=100))
        results, duration, server_cpu_s = asyncio.run(
            run_load(url, args.users, args.turns, args.think_ms, server_pid)
        )
        stored = check_store(database_url, results)
    load_after = os.getloadavg()

    latencies = [t["latency_ms"] for r in results for t in r.turns]
    ttfts = [t["ttft_ms"] for r in results for t in r.turns if t["ttft_ms"] is not None]
    bare_p50 = statistics.median(bare)
    overhead = [x - bare_p50 for x in latencies]
    server_overhead = [
        t["latency_ms"] - stored["model_ms"][t["turn_id"]]
        for r in results
        for t in r.turns
        if stored["model_ms"].get(t["turn_id"]) is not None
    ]
    errors = [e for r in results for e in r.errors]
    figures = {
        "users": args.users,
        "turns_per_user": args.turns,
        "think_ms": args.think_ms,
        "model": args.model,
        "database": database_url.split(":")[0].split("+")[0],
        "turns": len(latencies),
        "duration_s": duration,
        "throughput_turns_per_s": len(latencies) / duration if duration else float("nan"),
        "client_p50_ms": _pct(latencies, 50),
        "client_p99_ms": _pct(latencies, 99),
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p99_ms": _pct(ttfts, 99),
        "bare_litellm_p50_ms": bare_p50,
        "bare_litellm_p99_ms": _pct(bare, 99),
        "overhead_vs_bare_p50_ms": _pct(overhead, 50),
        "overhead_vs_bare_p99_ms": _pct(overhead, 99),
        "server_overhead_p50_ms": _pct(server_overhead, 50),
        "server_overhead_p99_ms": _pct(server_overhead, 99),
        "server_model_p50_ms": _pct(list(stored["model_ms"].values()), 50),
        "server_cpu_ms_per_turn": (
            server_cpu_s * 1000 / len(latencies) if server_cpu_s is not None and latencies else None
        ),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "http_retries": sum(r.retries for r in results),
        "events_checked": {k: stored[k] for k in ("turns", "votes", "outcomes")},
        "lost_events": stored["lost"],
        "load_average_before": load_before[0],
        "load_average_after": load_after[0],
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0 if figures["lost_events"] == 0 else 1
    _print(figures)
    return 0 if figures["lost_events"] == 0 else 1


def _print(f: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"{f['users']} users × {f['turns_per_user']} turns, think {f['think_ms']:g} ms, "
            f"{f['model']}, {f['database']}"
        )
    )
    table.add_column("figure")
    table.add_column("p50 (ms)", justify="right")
    table.add_column("p99 (ms)", justify="right")
    for label, key in (
        ("client latency per turn", "client"),
        ("time to first token (client)", "ttft"),
        ("bare litellm, same model (baseline)", "bare_litellm"),
        ("overhead vs bare litellm", "overhead_vs_bare"),
        ("server overhead (client − server's model time)", "server_overhead"),
    ):
        table.add_row(label, f"{f[key + '_p50_ms']:.1f}", f"{f[key + '_p99_ms']:.1f}")
    console = Console(width=140)
    console.print(table)
    console.print(
        f"client latency / bare litellm (p50): {f['client_p50_ms'] / f['bare_litellm_p50_ms']:.1f}×"
    )
    checked = f["events_checked"]
    verdict = "met" if f["server_overhead_p99_ms"] <= TARGET_P99_MS else "MISSED"
    cpu = f["server_cpu_ms_per_turn"]
    console.print(
        f"server CPU per turn (votes, outcomes included): "
        f"{'unknown (give --server-pid)' if cpu is None else f'{cpu:.1f} ms'}"
    )
    console.print(
        f"{f['turns']} turns in {f['duration_s']:.1f} s = "
        f"{f['throughput_turns_per_s']:.1f} turns/s; "
        f"errors {f['errors']} {f['error_examples'] or ''}; "
        f"votes/outcomes re-sent after a dropped connection: {f['http_retries']}\n"
        f"store check: {checked['turns']} turns, {checked['votes']} votes, "
        f"{checked['outcomes']} outcomes — lost {f['lost_events']}\n"
        f"target server overhead p99 ≤ {TARGET_P99_MS:g} ms: {verdict} "
        f"({f['server_overhead_p99_ms']:.1f} ms)\n"
        f"load average {f['load_average_before']:.1f} before, {f['load_average_after']:.1f} "
        f"after, on {f['cpus']} CPUs"
    )


if __name__ == "__main__":
    raise SystemExit(main())
