"""What tracing to Langfuse costs a chat turn, with Langfuse up, refusing and hanging.

    .venv/bin/python bench/tracing_overhead.py [--turns 300] [--rounds 5]
        [--pace-ms 0] [--skip-sdk] [--json]

A chat turn calls the tracer after the store committed: ``trace_turn`` (then
``set_turn_trace_id``), and for votes and outcomes ``score_feedback`` and
``score_outcome``. For each mode this runs ``--turns`` turns back to back
(unless ``--pace-ms``): the background worker then competes for the GIL as
hard as it can, a worst case. The store is a fresh SQLite file, masking is on
(the few-shot scrubber, the default), and it times

* ``tracer``: the tracer calls of a turn (what the request path pays for
  Langfuse);
* ``turn``: the store writes of a turn plus those calls (record_turn,
  trace_turn, set_turn_trace_id, record_feedback, score_feedback,
  record_outcome, score_outcome);

against the baseline measured in the same run: Langfuse absent
(``NoopTracer``). Modes use the recording server of the tests: ``up``
(answers), ``refuse`` (closed port), ``hang`` (accepts, never answers).
``shutdown`` is how long ``Tracer.shutdown()`` took after the turns (bounded
by ``[langfuse] flush_timeout_s``), ``delivered`` what reached the server. The
server runs in a child process and the store on tmpfs, so neither the
server's work nor disk jitter is counted; modes take turns in rounds so that
load drifting on the machine hits all of them alike.

For contrast, unless ``--skip-sdk``: the SDK used directly with its defaults
— ``Langfuse.flush()`` after one generation and one score, and a prompt fetch
(``get_prompt``) — which is what must never run on the request path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from chatbot.langfuse.credentials import LangfuseCredentials  # noqa: E402
from chatbot.langfuse.tracer import LangfuseTracer, NoopTracer, Tracer  # noqa: E402
from optimizer.config import LangfuseConfig  # noqa: E402
from optimizer.prompt_library import load_prompts  # noqa: E402
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord  # noqa: E402
from tests.support.langfuse_recorder import LangfuseRecorder  # noqa: E402

MODES = ("absent", "up", "refuse", "hang")


def messages(i: int) -> list[dict[str, str]]:
    library = load_prompts(ROOT / "prompts")
    variant = library.variant("concise")
    ex = library.examples["password-reset"]
    return [
        {"role": "system", "content": variant.template + "\n\n" + library.knowledge},
        {"role": "user", "content": ex.user},
        {"role": "assistant", "content": ex.assistant},
        {"role": "user", "content": "Hi, I'm Anna Schmidt (anna.schmidt@example.org)."},
        {"role": "assistant", "content": "Hello Anna, how can I help?"},
        {
            "role": "user",
            "content": f"Question {i}: can you call me on +49 30 901820 about my invoice?",
        },
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Server:
    """The recording server in a child process, so its work is not counted against ours."""

    def __init__(self, mode: str) -> None:
        self.public_key = f"pk-bench-{uuid.uuid4().hex[:8]}"
        self.secret_key = "sk-bench"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests/support/langfuse_recorder.py"), "--mode", mode,
             "--public-key", self.public_key, "--secret-key", self.secret_key],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()

    def delivered(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        counts = json.loads(self.proc.stdout.readline())
        return int(counts["spans"] + counts["scores"])

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Mode:
    """One way Langfuse can be: a tracer, the server it talks to, the timings so far."""

    def __init__(self, name: str, config: LangfuseConfig) -> None:
        self.name = name
        self.server = Server("normal" if name in ("absent", "up") else name)
        self.tracer: Tracer = NoopTracer()
        if name != "absent":
            creds = LangfuseCredentials(
                self.server.public_key, self.server.secret_key, self.server.base_url
            )
            self.tracer = LangfuseTracer(creds, config)
        # On tmpfs when there is one: disk flush jitter would drown the differences measured.
        self.tmp = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        self.store = Store(f"sqlite:///{self.tmp / 'bench.db'}")
        self.store.upgrade()
        self.tracer_ms: list[float] = []
        self.turn_ms: list[float] = []
        self.turns = 0

    def run(self, turns: int, pace_s: float) -> None:
        store, tracer = self.store, self.tracer
        for _ in range(turns):
            i = self.turns
            self.turns += 1
            msgs = messages(i)
            session = f"s-{i}"
            a = store.record_assignment(
                AssignmentRecord(
                    session, "anna", "exp", "concise", 0.5, 3, "*", {}, datetime.now(UTC)
                )
            )
            t = TurnRecord(
                f"run-{uuid.uuid4().hex}", session, "anna", "exp", "concise", "concise", "h",
                "fake/echo", msgs[-1]["content"], "Sure, we will call you.", ("password-reset",),
                900.0, 120.0, 300, 20, 0.0002, created_at=datetime.now(UTC),
            )  # fmt: skip
            outcome = OutcomeRecord(f"o-{t.id}", "conversion", 1.0, session_id=session)
            start = time.perf_counter()
            store.record_turn(t)
            t0 = time.perf_counter()
            trace_id = tracer.trace_turn(t, a, msgs)
            t1 = time.perf_counter()
            if trace_id:
                store.set_turn_trace_id(t.id, trace_id)
            store.record_feedback(t.id, "anna", 1, "thanks")
            t2 = time.perf_counter()
            tracer.score_feedback(t.id, "anna", 1, "thanks")
            t3 = time.perf_counter()
            store.record_outcome(outcome)
            t4 = time.perf_counter()
            tracer.score_outcome(outcome)
            end = time.perf_counter()
            self.tracer_ms.append(((t1 - t0) + (t3 - t2) + (end - t4)) * 1000)
            self.turn_ms.append((end - start) * 1000)
            if pace_s:
                time.sleep(pace_s)
        if self.name == "up":
            # Let the backlog go out before another mode is timed: its CPU work is ours to
            # pay, but not during someone else's turns. (Down modes only wait on sockets.)
            tracer.flush(60)

    def finish(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.tracer.shutdown()
        shutdown_s = time.perf_counter() - start
        delivered = self.server.delivered()
        self.server.stop()
        self.store.dispose()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return {
            "mode": self.name,
            "tracer_p50_ms": statistics.median(self.tracer_ms),
            "tracer_p99_ms": percentile(self.tracer_ms, 0.99),
            "turn_p50_ms": statistics.median(self.turn_ms),
            "turn_p99_ms": percentile(self.turn_ms, 0.99),
            "shutdown_s": shutdown_s,
            "delivered": delivered,
            "expected": 0 if self.name == "absent" else self.turns * 4,
        }


def sdk_defaults(mode: str) -> dict[str, Any]:
    """The SDK on its own defaults (timeout 5 s): what a naive integration would wait for."""
    from langfuse import Langfuse

    with LangfuseRecorder(mode, public_key=f"pk-sdk-{uuid.uuid4().hex[:8]}") as rec:
        client = Langfuse(
            public_key=rec.public_key, secret_key=rec.secret_key, base_url=rec.base_url
        )
        with client.start_as_current_observation(name="turn", as_type="generation") as gen:
            gen.update(output="hello")
        client.create_score(
            name="user_feedback", value=1, trace_id=client.create_trace_id(seed="x")
        )
        start = time.perf_counter()
        client.flush()
        flush_s = time.perf_counter() - start
        start = time.perf_counter()
        with contextlib.suppress(
            Exception
        ):  # not found / refused / timed out: the wait is the point
            client.get_prompt("concise", cache_ttl_seconds=0)
        prompt_s = time.perf_counter() - start
        client.shutdown()
    return {"mode": mode, "flush_s": flush_s, "get_prompt_s": prompt_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5, help="modes take turns this many times")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="pause between turns")
    parser.add_argument("--skip-sdk", action="store_true", help="skip the raw-SDK contrast (~40 s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # outages are expected here; the SDK would log each one
    config = LangfuseConfig(request_timeout_s=3.0, flush_timeout_s=2.0)
    modes = [Mode(name, config) for name in MODES]
    for mode in modes:  # warm-up: imports, the scrubber's name lists, SQLite, connections
        mode.run(10, 0)
        mode.tracer_ms.clear()
        mode.turn_ms.clear()
    per_round = max(args.turns // args.rounds, 1)
    for r in range(args.rounds):  # rotate the order so machine load drifts hit all modes alike
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            mode.run(per_round, args.pace_ms / 1000)
    rows = [m.finish() for m in modes]
    base = rows[0]
    for row in rows:
        row["turn_p50_ratio"] = row["turn_p50_ms"] / base["turn_p50_ms"]
        row["turn_p99_ratio"] = row["turn_p99_ms"] / base["turn_p99_ms"]
    sdk = [] if args.skip_sdk else [sdk_defaults(m) for m in ("normal", "refuse", "hang")]
    if args.json:
        json.dump({"turns": args.turns, "modes": rows, "sdk_defaults": sdk}, sys.stdout, indent=2)
        print()
        return
    pace = f"{args.pace_ms:g} ms apart" if args.pace_ms else "back to back"
    print(
        f"{per_round * args.rounds} turns per mode in {args.rounds} interleaved rounds, {pace}; "
        "masking on; ratio = turn vs Langfuse absent"
    )
    header = (
        f"{'mode':<8}{'tracer p50':>12}{'tracer p99':>12}{'turn p50':>10}{'turn p99':>10}"
        f"{'p50 ratio':>11}{'p99 ratio':>11}{'shutdown':>10}{'delivered':>12}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['mode']:<8}{r['tracer_p50_ms']:>10.3f}ms{r['tracer_p99_ms']:>10.3f}ms"
            f"{r['turn_p50_ms']:>8.2f}ms{r['turn_p99_ms']:>8.2f}ms{r['turn_p50_ratio']:>11.2f}"
            f"{r['turn_p99_ratio']:>11.2f}{r['shutdown_s']:>9.2f}s{r['delivered']:>7}/{r['expected']:<4}"
        )
    print("* spans + scores that reached the server, of those sent (incl. 10 warm-up turns)")
    if sdk:
        print("\nThe SDK alone, default settings (never on the request path):")
        print(f"{'mode':<8}{'flush()':>10}{'get_prompt()':>14}")
        for s in sdk:
            print(f"{s['mode']:<8}{s['flush_s']:>9.1f}s{s['get_prompt_s']:>13.1f}s")


if __name__ == "__main__":
    main()
