"""Load: N simulated chat users over Chainlit's socket.io protocol against a real server.

    .venv/bin/python bench/load.py [--users 50] [--turns 5] [--think-ms 1000]
        [--database sqlite|postgres|URL] [--url http://… --database-url URL] [--json]

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
import os
import random
import statistics
import tempfile
import time
import uuid
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

TARGET_P99_MS = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MESSAGE = "How do I export my tasks to a spreadsheet?"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--turns", type=int, default=5, help="messages per user")
    parser.add_argument("--think-ms", type=float, default=1000, help="pause after each reply")
    parser.add_argument("--model", default="fake/echo")
    parser.add_argument(
        "--database", default="postgres", help="sqlite, postgres (FLYWHEEL_TEST_POSTGRES_URL)"
    )
    parser.add_argument("--url", help="a running server (then give --database-url)")
    parser.add_argument("--database-url", help="the running server's database, for the check")
    parser.add_argument("--server-pid", type=int, help="the running server's pid, for its CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
