"""The ``/operator`` page at 100k–1M sessions: kept sums vs every session, same run.

Builds a store with :mod:`bench.history` (not timed), builds the kept state from
scratch (timed: "cold", with its peak RSS; a stretch of days at a time,
:data:`optimizer.fewshot.state_rows.REBUILD_CHUNK_DAYS`), runs the optimizer once
with its few-shot step (the snapshot), adds an
hour of traffic with 5 late conversions and 5 changed votes, and refreshes the kept
state as the next optimizer run would (timed: "job refresh"). Then, each in a fresh
process:

- **baseline, full**: today's page computation — ``experiment_report`` reading every
  session (``kpi.session_frame``) plus the figures (``figure_divs``);
- **kept**: the same with ``experiment_report(kept=True)``, what ``/operator`` now
  does: refresh the kept sums (little: the job just did) and read days × arms rows.
  Timed twice in the process; the second is the warm figure.

And over HTTP: the real operator router served by uvicorn with the report cache off
(``report_ttl_s=0``: every view recomputes), ``GET /operator`` against
``GET /api/health``. Wall and CPU seconds and the load average are printed. Target
(issue 18): ``/operator`` warm ≤ 300 ms at 10M sessions.

``--turn-days N`` builds turns and votes only for the last N days (as ``refit.py``:
10M sessions in minutes; the page reads kept sums, not turns); ``--full-max`` skips
the full path above that size (it holds every session in memory: ~14 GB at 10M).

Usage::

    python bench/operator_page.py --sizes 100000 1000000 --dir /tmp/opbench
    python bench/operator_page.py --sizes 1000000 10000000 --turn-days 60 --dir /tmp/opbench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import history  # noqa: E402  (the builder next to this file: the script's folder is on sys.path)
from fewshot_step import add_hour  # noqa: E402

SECRET = b"bench-secret"
TARGET_S = 0.3


def _config(url: str) -> Any:
    """The bench experiment with the demo arms (prompt files of ``prompts/``)."""
    from optimizer.cli.demo import DEMO_ARMS
    from optimizer.config import Config

    return Config.model_validate(
        {
            "database_url": url,
            "prompts_dir": str(ROOT / "prompts"),
            "model": {"name": "fake/echo"},
            "policy": {"refit_interval_s": 0},
            "experiment": {
                "id": history.EXPERIMENT,
                "salt": history.EXPERIMENT,
                "champion": history.ARMS[0],
                "holdback": 0.05,
                "arms": [{"id": a, **DEMO_ARMS[a]} for a in history.ARMS],
            },
        }
    )


def make_app() -> Any:
    """The served app (in the server process): outcomes API + operator router, no cache."""
    from fastapi import FastAPI

    import optimizer.report
    from chatbot.runtime import Runtime
    from chatbot.web.operator import create_router
    from chatbot.web.outcomes_api import api_router

    # The served page's clock: the end of the synthetic history, not today (the wall clock
    # would close every KPI window of the history at once).
    now = datetime.fromisoformat(os.environ["BENCH_NOW"])
    optimizer.report.utcnow = lambda: now  # type: ignore[assignment]
    runtime = Runtime.build(_config(os.environ["BENCH_DATABASE_URL"]))
    app = FastAPI()
    app.include_router(api_router(runtime, api_key=None))
    app.include_router(create_router(runtime, secret=SECRET, report_ttl_s=0.0))
    return app


def _rss_mb() -> float:
    """Peak RSS of this process: ``VmHWM`` (``ru_maxrss`` keeps the parent's peak across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(url: str, now: datetime, kept: bool) -> dict[str, Any]:
    """In this (fresh) process: the page's report and figures, twice."""
    from optimizer.plots import figure_divs
    from optimizer.report import experiment_report
    from optimizer.store import Store

    store, config = Store(url), _config(url)
    runs = []
    for _ in range(2):
        tic, cpu = time.perf_counter(), time.process_time()
        report = experiment_report(store, config, now=now, kept=kept)
        figure_divs(report)
        runs.append((time.perf_counter() - tic, time.process_time() - cpu))
    return {
        "first_s": runs[0][0],
        "s": runs[1][0],
        "cpu_s": runs[1][1],
        "sessions": report["totals"]["sessions"],
        "rss_mb": _rss_mb(),
        "load": os.getloadavg()[0],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_http(url: str, now: datetime, repeat: int) -> dict[str, Any]:
    """``GET /operator`` (kept sums, no cache) and ``GET /api/health`` over HTTP."""
    port = _free_port()
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": url,
        "BENCH_NOW": now.isoformat(),
        "PYTHONPATH": str(ROOT / "bench"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "operator_page:make_app",
            "--app-dir",
            str(ROOT / "bench"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        with httpx.Client(timeout=600, follow_redirects=True) as client:
            page = client.get(f"{base}/operator/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token, "no CSRF token on the login page"
            first = client.post(
                f"{base}/operator/login",
                data={"csrf": token.group(1), "username": "operator", "password": "operator"},
            )
            assert first.status_code == 200 and 'id="arms"' in first.text

            def timed(path: str, n: int) -> list[float]:
                out = []
                for _ in range(n):
                    tic = time.perf_counter()
                    assert client.get(f"{base}{path}").status_code == 200
                    out.append(time.perf_counter() - tic)
                return out

            health = statistics.median(timed("/api/health", 5 * repeat))
            pages = timed("/operator", repeat)
        return {"health_s": health, "page_s": statistics.median(pages), "page_max_s": max(pages)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _subprocess(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold(url: str, now: datetime) -> dict[str, Any]:
    """In this (fresh) process: the kept state built from scratch (its first refresh)."""
    from optimizer.fewshot.state import refresh_state
    from optimizer.store import Store

    store, before = Store(url), _rss_mb()
    tic, cpu = time.perf_counter(), time.process_time()
    result = refresh_state(store, _config(url), now=now)
    assert result.rebuilt
    return {
        "s": time.perf_counter() - tic,
        "cpu_s": time.process_time() - cpu,
        "rss_mb": _rss_mb(),
        "rss_before_mb": before,
        "sessions": result.sessions,
        "load": os.getloadavg()[0],
    }


def prepare(url: str, now: datetime) -> dict[str, Any]:
    """In this (fresh) process: the optimizer run with its few-shot step (state kept)."""
    from optimizer.refit import run_optimizer
    from optimizer.store import Store

    store = Store(url)
    tic = time.perf_counter()
    run = run_optimizer(store, _config(url), now=now, random_state=0)
    assert run is not None
    return {"optimizer_s": time.perf_counter() - tic, "state": run.fewshot.get("state")}


def job_refresh(url: str, now: datetime) -> dict[str, Any]:
    """In this (fresh) process: the kept state's refresh as the next optimizer run does it."""
    from optimizer.fewshot.state import refresh_state
    from optimizer.store import Store

    tic, cpu = time.perf_counter(), time.process_time()
    result = refresh_state(Store(url), _config(url), now=now)
    return {"s": time.perf_counter() - tic, "cpu_s": time.process_time() - cpu, **result.as_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5, help="page loads over HTTP (median)")
    parser.add_argument("--dir", default=None, help="keep built stores here and reuse them")
    parser.add_argument(
        "--turn-days", type=float, default=None, help="turns and votes for the last N days only"
    )
    parser.add_argument(
        "--full-max", type=int, default=1_000_000, help="largest size run on the full path"
    )
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        kind, url, when = args.step
        now = datetime.fromisoformat(when)
        result = {
            "cold": lambda: cold(url, now),
            "prepare": lambda: prepare(url, now),
            "refresh": lambda: job_refresh(url, now),
            "full": lambda: measure(url, now, False),
            "kept": lambda: measure(url, now, True),
        }[kind]()
        print(json.dumps(result, default=str))
        return 0
    base = Path(args.dir or tempfile.mkdtemp(prefix="operator-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in args.sizes:
            tag = f"{n}-t{args.turn_days:g}" if args.turn_days else f"{n}"
            built_path, path = base / f"operator-{tag}.built.db", base / f"operator-{tag}.db"
            build_s = None
            if not (args.dir and built_path.exists()):
                built_path.unlink(missing_ok=True)
                tic = time.perf_counter()
                history.build(f"sqlite:///{built_path}", n, turn_days=args.turn_days)
                build_s = time.perf_counter() - tic
            shutil.copyfile(built_path, path)
            url = f"sqlite:///{path}"
            now0 = history.START + timedelta(days=history.days_for(n))
            cold_build = _subprocess("--step", "cold", url, now0.isoformat())
            print(json.dumps({"sessions": n, "cold": cold_build}), flush=True)
            prepared = _subprocess("--step", "prepare", url, now0.isoformat())
            now1 = now0 + timedelta(hours=1)
            add_hour(url, n, now1, 0)
            refresh = _subprocess("--step", "refresh", url, now1.isoformat())
            full = (
                _subprocess("--step", "full", url, now1.isoformat()) if n <= args.full_max else None
            )
            kept = _subprocess("--step", "kept", url, now1.isoformat())
            http = measure_http(url, now1, args.repeat)
            row = {
                "sessions": n,
                "turn_days": args.turn_days,
                "build_s": build_s,
                "cold": cold_build,
                "prepare": prepared,
                "job_refresh": refresh,
                "full": full,
                "kept": kept,
                "http": http,
                "ratio_full_over_kept": full["s"] / kept["s"] if full else None,
            }
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            path.unlink(missing_ok=True)
            if not args.dir:
                built_path.unlink(missing_ok=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(
        "| sessions | cold state: wall s (CPU s, peak RSS MB) | "
        "job refresh: wall s (CPU s, sessions) | full report+figures: wall / CPU s | "
        "kept: wall / CPU s (first) | full / kept | GET /operator (no cache) | "
        "/api/health | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, j, f, k, h = r["cold"], r["job_refresh"], r["full"], r["kept"], r["http"]
        full_cell = f"{f['s']:.2f} / {f['cpu_s']:.2f}" if f else "not run"
        ratio = f"{r['ratio_full_over_kept']:.0f}×" if f else "—"
        print(
            f"| {r['sessions']:,} | {c['s']:.1f} ({c['cpu_s']:.1f}, {c['rss_mb']:,.0f}) | "
            f"{j['s']:.2f} ({j['cpu_s']:.2f}, {j['sessions']:,}) | {full_cell} | "
            f"{k['s']:.3f} / {k['cpu_s']:.3f} ({k['first_s']:.3f}) | "
            f"{ratio} | {h['page_s'] * 1000:.0f} ms (max {h['page_max_s'] * 1000:.0f}) | "
            f"{h['health_s'] * 1000:.1f} ms | {k['load']:.2f} |"
        )
    print(f"target: /operator warm ≤ {TARGET_S * 1000:.0f} ms at 10M sessions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
