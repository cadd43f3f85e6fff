"""The few-shot step at 100k–1M sessions: kept state vs a full re-ranking, same run.

Builds a store per size with :mod:`bench.history` (texts on, so turns can be mined;
the retrieved arm's turns name the examples they showed, so credit has work), then,
each in a fresh process so the peak RSS is the measured work's own:

- **cold**: ``fewshot_step`` with no kept state at the end of the history — it
  builds the state once (as slow as the full path, once);
- an hour of new traffic (sessions, turns, votes, outcomes), 5 late conversions and
  5 changed votes on old sessions, then a copy of the store;
- **baseline, full**: ``fewshot_step(incremental=False)`` on the copy — today's full
  re-ranking of every turn and every session;
- **warm**: ``fewshot_step`` (kept state) on the original at the same ``now`` — the
  steady state, what every run costs.

The two must mine and demote the same examples (printed: ``equal``). Wall and CPU
seconds, peak RSS and the load average are printed. Target (issue 18): warm ≤ 5 s at
1M sessions.

Usage::

    python bench/fewshot_step.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import history

TARGET_S = 5.0


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(url: str, now: datetime, incremental: bool) -> dict[str, Any]:
    """In this (fresh) process: one few-shot step."""
    from optimizer.refit import fewshot_step
    from optimizer.store import Store

    store = Store(url)
    before = _rss_mb()
    tic, cpu = time.perf_counter(), time.process_time()
    step = fewshot_step(store, history.config(), now=now, incremental=incremental)
    out = {
        "s": time.perf_counter() - tic,
        "cpu_s": time.process_time() - cpu,
        "rss_mb": _rss_mb(),
        "rss_before_mb": before,
        "load": os.getloadavg()[0],
        "mined": step.get("mined"),
        "demoted": step.get("demoted"),
        "state": step.get("state"),
        "error": step.get("error"),
    }
    return out


def add_hour(url: str, n: int, now: datetime, hour: int) -> None:
    """An hour of new traffic up to ``now``, 5 late conversions and 5 changed votes."""
    from optimizer.store import OutcomeRecord, Store, schema

    rng = np.random.default_rng(100 + hour)
    vocab = history._vocabulary(np.random.default_rng(1))
    per_hour = int(history.PER_DAY / 24)
    end = (now - history.START).total_seconds()
    lo = n + hour * per_hour
    rows = history.session_rows(
        rng, vocab, lo, lo + per_hour, end - 3600, end - 300, texts=True, prefix="h"
    )
    history.write(url, iter([rows]))
    store = Store(url)
    old = rng.integers(0, n // 2, 5)
    for i in old:  # late conversions of old sessions
        store.record_outcome(
            OutcomeRecord(
                f"late-{hour}-{i}",
                "conversion",
                1.0,
                session_id=f"s{i}",
                occurred_at=history.START + timedelta(days=float(i) / history.PER_DAY, hours=2),
            ),
            received_at=now,
        )
    t = schema.turns
    with store.engine.connect() as conn:
        turns = conn.execute(
            t.select()
            .with_only_columns(t.c.id, t.c.user_id)
            .where(t.c.session_id.in_([f"s{i}" for i in old]))
        ).all()
    for turn_id, user_id in turns[:5]:  # votes changed long after the chat
        store.record_feedback(turn_id, user_id, int(rng.integers(2)), at=now)
    store.dispose()


def _subprocess(url: str, now: datetime, incremental: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url, now.isoformat(), str(int(incremental))],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--dir",
        default=None,
        help="keep the built stores here and reuse them on the next run (default: a temp dir)",
    )
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        url, now, inc = args.measure
        print(json.dumps(measure(url, datetime.fromisoformat(now), inc == "1")))
        return 0
    base = Path(args.dir or tempfile.mkdtemp(prefix="fewshot-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            path = base / f"fewshot-{n}.db"
            built_path = base / f"fewshot-{n}.built.db"
            url = f"sqlite:///{path}"
            tic = time.perf_counter()
            if args.dir and built_path.exists():  # a kept build: start from a copy of it
                counts = {"turns": 2 * n}
                built = float("nan")
            else:
                built_path.unlink(missing_ok=True)
                counts = history.build(f"sqlite:///{built_path}", n, texts=True)
                built = time.perf_counter() - tic
            shutil.copyfile(built_path, path)
            now0 = history.START + timedelta(days=history.days_for(n))
            cold = _subprocess(url, now0, True)
            now1 = now0 + timedelta(hours=1)
            add_hour(url, n, now1, 0)
            copy = base / f"fewshot-{n}-full.db"
            shutil.copyfile(path, copy)
            full = _subprocess(f"sqlite:///{copy}", now1, False)
            warm = _subprocess(url, now1, True)
            equal = (full["mined"], full["demoted"]) == (warm["mined"], warm["demoted"])
            row = {
                "sessions": n,
                "turns": counts["turns"],
                "build_s": built,
                "cold": cold,
                "warm": warm,
                "full": full,
                "ratio_full_over_warm": full["s"] / warm["s"],
                "equal": equal,
            }
            rows.append(row)
            brief = {
                k: ({**v, "mined": len(v["mined"] or [])} if isinstance(v, dict) else v)
                for k, v in row.items()
            }
            print(json.dumps(brief, default=str), flush=True)
            copy.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            if not args.dir:
                built_path.unlink(missing_ok=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(
        "| sessions | build s | cold s | full: wall s / CPU s / RSS MB | "
        "warm: wall s / CPU s / RSS MB | full / warm | touched | equal | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, w = r["full"], r["warm"]
        print(
            f"| {r['sessions']:,} | {r['build_s']:.0f} | {r['cold']['s']:.1f} | "
            f"{f['s']:.2f} / {f['cpu_s']:.2f} / {f['rss_mb']:.0f} | "
            f"{w['s']:.2f} / {w['cpu_s']:.2f} / {w['rss_mb']:.0f} | "
            f"{r['ratio_full_over_warm']:.1f}× | {(w['state'] or {}).get('sessions')} | "
            f"{r['equal']} | {w['load']:.2f} |"
        )
    print(f"target: warm ≤ {TARGET_S} s at 1M sessions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
