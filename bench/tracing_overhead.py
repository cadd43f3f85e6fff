"""What tracing to Langfuse costs a chat turn, with Langfuse up, refusing and hanging.

    .venv/bin/python bench/tracing_overhead.py [--turns 300] [--skip-sdk] [--json]

A chat turn calls the tracer after the store committed: ``trace_turn`` (then
``set_turn_trace_id``), and for votes and outcomes ``score_feedback`` and
``score_outcome``. For each mode this runs ``--turns`` turns back to back (no
pause: the background worker competes for the GIL as hard as it can) on a
fresh SQLite store, with the default masking (the few-shot scrubber) on, and
times

* ``tracer``: the tracer calls of a turn (what the request path pays for
  Langfuse);
* ``turn``: the store writes of a turn plus those calls (record_turn,
  trace_turn, set_turn_trace_id, record_feedback, score_feedback,
  record_outcome, score_outcome);

against the baseline measured in the same run: Langfuse absent
(``NoopTracer``). Modes use the recording server of the tests: ``up``
(answers), ``refuse`` (closed port), ``hang`` (accepts, never answers).
``shutdown`` is how long ``Tracer.shutdown()`` took after the turns (bounded
by ``[langfuse] flush_timeout_s``), ``delivered`` what reached the server.

For contrast, unless ``--skip-sdk``: the SDK used directly with its defaults
— ``Langfuse.flush()`` after one generation and one score, and a prompt fetch
(``get_prompt``) — which is what must never run on the request path.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from langfuse_recorder import LangfuseRecorder  # noqa: E402

from chatbot.tracing import LangfuseCredentials, LangfuseTracer, NoopTracer, Tracer  # noqa: E402
from optimizer.config import LangfuseConfig  # noqa: E402
from optimizer.prompts import load_prompts  # noqa: E402
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord  # noqa: E402

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


def run_mode(mode: str, turns: int, config: LangfuseConfig) -> dict[str, Any]:
    server_mode = {"absent": "normal", "up": "normal"}.get(mode, mode)
    recorder = LangfuseRecorder(server_mode, public_key=f"pk-bench-{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    recorder.start()
    tracer: Tracer = NoopTracer()
    if mode != "absent":
        creds = LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url)
        tracer = LangfuseTracer(creds, config)
    tmp = Path(tempfile.mkdtemp())
    store = Store(f"sqlite:///{tmp / 'bench.db'}")
    store.upgrade()
    tracer_ms: list[float] = []
    turn_ms: list[float] = []
    msgs = [messages(i) for i in range(turns)]
    for i in range(turns):
        session = f"s-{i}"
        a = store.record_assignment(
            AssignmentRecord(session, "anna", "exp", "concise", 0.5, 3, "*", {}, datetime.now(UTC))
        )
        t = TurnRecord(
            f"run-{uuid.uuid4().hex}",
            session,
            "anna",
            "exp",
            "concise",
            "concise",
            "h",
            "fake/echo",
            msgs[i][-1]["content"],
            "Sure, we will call you.",
            ("password-reset",),
            900.0,
            120.0,
            300,
            20,
            0.0002,
            created_at=datetime.now(UTC),
        )
        outcome = OutcomeRecord(f"o-{t.id}", "conversion", 1.0, session_id=session)
        start = time.perf_counter()
        store.record_turn(t)
        t0 = time.perf_counter()
        trace_id = tracer.trace_turn(t, a, msgs[i])
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
        tracer_ms.append(((t1 - t0) + (t3 - t2) + (end - t4)) * 1000)
        turn_ms.append((end - start) * 1000)
    start = time.perf_counter()
    tracer.shutdown()
    shutdown_s = time.perf_counter() - start
    delivered = len(recorder.spans) + len(list(recorder.iter_score_bodies()))
    recorder.stop()
    store.dispose()
    return {
        "mode": mode,
        "tracer_p50_ms": statistics.median(tracer_ms),
        "tracer_p99_ms": percentile(tracer_ms, 0.99),
        "turn_p50_ms": statistics.median(turn_ms),
        "turn_p99_ms": percentile(turn_ms, 0.99),
        "shutdown_s": shutdown_s,
        "delivered": delivered,
        "expected": 0 if mode == "absent" else turns * 4,
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
        try:
            client.get_prompt("concise", cache_ttl_seconds=0)
        except Exception:
            pass
        prompt_s = time.perf_counter() - start
        client.shutdown()
    return {"mode": mode, "flush_s": flush_s, "get_prompt_s": prompt_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--skip-sdk", action="store_true", help="skip the raw-SDK contrast (~40 s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # outages are expected here; the SDK would log each one
    config = LangfuseConfig(request_timeout_s=3.0, flush_timeout_s=2.0)
    run_mode("up", 20, config)  # warm-up: imports, the scrubber's name lists, SQLite
    rows = [run_mode(mode, args.turns, config) for mode in MODES]
    base = rows[0]
    for row in rows:
        row["turn_p50_ratio"] = row["turn_p50_ms"] / base["turn_p50_ms"]
        row["turn_p99_ratio"] = row["turn_p99_ms"] / base["turn_p99_ms"]
    sdk = [] if args.skip_sdk else [sdk_defaults(m) for m in ("normal", "refuse", "hang")]
    if args.json:
        json.dump({"turns": args.turns, "modes": rows, "sdk_defaults": sdk}, sys.stdout, indent=2)
        print()
        return
    print(f"{args.turns} turns per mode, back to back; masking on; ratio = turn vs Langfuse absent")
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
    if sdk:
        print("\nThe SDK alone, default settings (never on the request path):")
        print(f"{'mode':<8}{'flush()':>10}{'get_prompt()':>14}")
        for s in sdk:
            print(f"{s['mode']:<8}{s['flush_s']:>9.1f}s{s['get_prompt_s']:>13.1f}s")


if __name__ == "__main__":
    main()
