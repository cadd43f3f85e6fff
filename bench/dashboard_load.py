"""Operator dashboard load time with 100k sessions in the store, against ``GET /api/health``.

Builds a SQLite store with N sessions (``bench/refit.py``'s builder: five arms,
two turns a session, votes, conversions, support minutes, revenue; not timed)
and runs the optimizer once, as a server would have. Then serves the real
outcomes API and the real operator router in a separate process (uvicorn) and
times over HTTP, in the same run:

- ``GET /api/health``: the baseline, a route that does no work;
- ``GET /operator`` **cold**: the report computed for the request (cache TTL 0);
- ``GET /operator`` **warm**: the report from the router's cache (what every
  view within ``REPORT_TTL_S`` of the previous one costs);
- ``GET /operator/report.json`` cold, and where a cold load spends its time
  (``kpi.session_frame`` vs the rest of ``experiment_report``), in this process.

Prints medians and the ratios page / health.

Usage::

    python bench/dashboard_load.py                 # 100k sessions
    python bench/dashboard_load.py --sessions 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from refit import ARMS, EXPERIMENT, build  # the same synthetic store as the refit bench  # noqa: E402

SECRET = b"bench-secret"


def _config(url: str) -> Any:
    """The default flywheel.toml KPI over the bench experiment, arms on the real prompt files."""
    from optimizer.cli.demo import DEMO_ARMS
    from optimizer.config import Config

    return Config.model_validate(
        {
            "database_url": url,
            "prompts_dir": str(ROOT / "prompts"),
            "model": {"name": "fake/echo"},
            "policy": {"refit_interval_s": 0},
            "experiment": {
                "id": EXPERIMENT,
                "salt": EXPERIMENT,
                "champion": ARMS[0],
                "arms": [{"id": a, **DEMO_ARMS[a]} for a in ARMS],
            },
        }
    )


def make_app() -> Any:
    """The served app (run in the server process): outcomes API + operator router."""
    from fastapi import FastAPI  # noqa: I001

    from chatbot.web.operator import create_router
    from chatbot.web.outcomes_api import api_router
    from chatbot.runtime import Runtime

    runtime = Runtime.build(_config(os.environ["BENCH_DATABASE_URL"]))
    app = FastAPI()
    app.include_router(api_router(runtime, api_key=None))
    app.include_router(
        create_router(runtime, secret=SECRET, report_ttl_s=float(os.environ["BENCH_TTL_S"]))
    )
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(url: str, ttl_s: float) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "BENCH_DATABASE_URL": url,
        "BENCH_TTL_S": str(ttl_s),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "dashboard_load:make_app",
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
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def _login(client: httpx.Client, base: str) -> None:
    page = client.get(f"{base}/operator/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token, "no CSRF token on the login page"
    response = client.post(
        f"{base}/operator/login",
        data={"csrf": token.group(1), "username": "operator", "password": "operator"},
    )
    assert response.status_code == 200 and 'id="arms"' in response.text, response.status_code


def _timed(client: httpx.Client, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - tic)
        assert response.status_code == 200, (url, response.status_code)
    return times


def measure(url: str, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, ttl in (("cold", 0.0), ("warm", 3600.0)):
        proc, base = _serve(url, ttl)
        try:
            with httpx.Client(timeout=300, follow_redirects=True) as client:
                _login(client, base)  # the first page view also warms the cache
                _timed(client, f"{base}/api/health", 3)
                health = _timed(client, f"{base}/api/health", 5 * repeat)
                page = _timed(client, f"{base}/operator", repeat)
                out[f"health_{mode}_s"] = statistics.median(health)
                out[f"page_{mode}_s"] = statistics.median(page)
                size = len(client.get(f"{base}/operator").content)
                out["page_bytes"] = size
                if mode == "cold":
                    out["report_json_cold_s"] = statistics.median(
                        _timed(client, f"{base}/operator/report.json", repeat)
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def breakdown(url: str) -> dict[str, float]:
    """Where a cold report spends its time, in this process."""
    from optimizer import kpi
    from optimizer.report import experiment_report
    from optimizer.store import Store

    config, store = _config(url), Store(url)
    tic = time.perf_counter()
    kpi.session_frame(store, config)
    frame_s = time.perf_counter() - tic
    tic = time.perf_counter()
    experiment_report(store, config)
    report_s = time.perf_counter() - tic
    store.dispose()
    return {"session_frame_s": frame_s, "experiment_report_s": report_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="page loads per measurement (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flywheel-dash-") as tmp:
        path = Path(tmp) / "dash.db"
        counts = build(path, args.sessions)
        url = f"sqlite:///{path}"
        from optimizer.refit import run_optimizer
        from optimizer.store import Store

        store = Store(url)
        run_optimizer(store, _config(url), random_state=0)
        store.dispose()
        result = {"store": counts, **measure(url, args.repeat), **breakdown(url)}
    result["ratio_cold"] = result["page_cold_s"] / result["health_cold_s"]
    result["ratio_warm"] = result["page_warm_s"] / result["health_warm_s"]
    print(json.dumps(result, indent=2))
    print(
        f"{args.sessions:,} sessions: /operator cold {result['page_cold_s'] * 1000:.0f} ms "
        f"({result['ratio_cold']:.0f}x /api/health {result['health_cold_s'] * 1000:.1f} ms), "
        f"warm {result['page_warm_s'] * 1000:.0f} ms ({result['ratio_warm']:.0f}x /api/health "
        f"{result['health_warm_s'] * 1000:.1f} ms); cold report: session_frame "
        f"{result['session_frame_s']:.2f} s of {result['experiment_report_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
