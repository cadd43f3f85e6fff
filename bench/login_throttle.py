"""How far login throttling slows a password-guessing loop, and what it costs everyone else.

    .venv/bin/python bench/login_throttle.py [--seconds 10] [--rounds 4]

Runs the whole app (``create_app``: Chainlit's ``POST /login`` behind
``chatbot.web.throttle``) in-process on a fresh SQLite store, with one database
user ``alice`` (bcrypt cost ``--rounds``) and another user ``bob``. For
``--seconds`` an attacker loops wrong passwords for ``alice`` as fast as the
server answers, while ``bob`` logs in correctly from another address every
half second. Printed: password checks per second the attacker got (401s),
refusals (429s), and bob's login latency and success rate.

Baseline, same run: the same loop with throttling effectively off
(``login_free_failures`` huge), i.e. what the issue measured before. The
throttled run uses the shipped ``[security]`` defaults (5 free failures, then
2 s doubling up to 15 min). A low bcrypt cost (default 4) stands for a fast
server, where an unthrottled loop is fastest. The ratio
``throttled / baseline`` of the attacker's checked guesses per second is the
figure to quote; bob's p50 login latency shows the throttle's cost to others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def run(seconds: float, rounds: int, security: dict[str, float]) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from chatbot.runtime import Runtime
    from chatbot.web.auth import hash_password
    from chatbot.web.server import create_app
    from optimizer.config import AuthConfig, SecurityConfig
    from optimizer.store import Store
    from optimizer.store.accounts import Accounts
    from tests.support.chat_helpers import RecordingTracer, chat_config

    home = tempfile.mkdtemp(prefix="flywheel-bench-")
    os.environ["FLYWHEEL_HOME"] = home
    os.environ.setdefault("CHAINLIT_AUTH_SECRET", "bench-secret-" + "x" * 32)
    store = Store(f"sqlite:///{home}/bench.db")
    store.upgrade()
    accounts = Accounts(store.engine)
    for name in ("alice", "bob"):
        accounts.add_user(name, hash_password(f"{name}-password", rounds=rounds), attributes={})
    config = chat_config(store.url).model_copy(
        update={"auth": AuthConfig(demo=False), "security": SecurityConfig(**security)}
    )
    app = create_app(
        runtime=Runtime.build(config, store=store, tracer=RecordingTracer(), migrate=False)
    )
    answers: list[int] = []
    bob_ms: list[float] = []
    bob_ok: list[bool] = []
    stop = threading.Event()

    def bob_loop() -> None:
        with TestClient(app, client=("10.0.0.2", 1)) as bob:
            while not stop.is_set():
                started = time.perf_counter()
                r = bob.post("/login", data={"username": "bob", "password": "bob-password"})
                bob_ms.append((time.perf_counter() - started) * 1000)
                bob_ok.append(r.status_code == 200)
                stop.wait(0.5)

    with TestClient(app, client=("10.0.0.1", 1)) as attacker:
        other = threading.Thread(target=bob_loop)
        other.start()
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            r = attacker.post("/login", data={"username": "alice", "password": "guess"})
            answers.append(r.status_code)
        elapsed = time.monotonic() - started
        stop.set()
        other.join()
    store.dispose()
    return {
        "requests": len(answers),
        "checked_per_s": answers.count(401) / elapsed,
        "refused_429": answers.count(429),
        "bob_logins": len(bob_ok),
        "bob_success": sum(bob_ok) / len(bob_ok) if bob_ok else float("nan"),
        "bob_p50_ms": statistics.median(bob_ms) if bob_ms else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=4, help="bcrypt cost of the users")
    args = parser.parse_args()
    off = {"login_free_failures": 10**9, "client_free_failures": 10**9}
    baseline = run(args.seconds, args.rounds, off)
    throttled = run(args.seconds, args.rounds, {})  # the shipped defaults
    for label, r in (("baseline (no throttle)", baseline), ("throttled (defaults)", throttled)):
        print(
            f"{label:24} requests {r['requests']:5.0f}  guesses checked {r['checked_per_s']:6.2f}/s"
            f"  429s {r['refused_429']:5.0f}  bob ok {r['bob_success']:.0%} of "
            f"{r['bob_logins']:.0f}, p50 {r['bob_p50_ms']:.0f} ms"
        )
    print(
        f"attacker's checked guesses per second, throttled / baseline: "
        f"{throttled['checked_per_s'] / baseline['checked_per_s']:.3f}"
    )


if __name__ == "__main__":
    main()
