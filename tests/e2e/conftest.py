"""Browser-test fixtures: a real ``flywheel serve`` subprocess and Debian's Chromium.

The server runs the project's own configuration (actions, arms, prompts) with
a temporary home, SQLite database and API key, the real local model with
``max_tokens = 32`` and ``temperature = 0`` (short, reproducible replies),
and the background optimizer off. Its output goes to
``test-artifacts/e2e-server.log``. Chromium is the system one (never
``playwright install``); if it is missing the tests fail, they do not skip.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Start-up imports Chainlit, litellm and migrates the database; slow on a busy 2-core box.
STARTUP_TIMEOUT_S = 180


@dataclass(frozen=True)
class Served:
    url: str
    database_url: str
    api_key: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(path: Path) -> None:
    data = tomllib.loads((ROOT / "flywheel.toml").read_text(encoding="utf-8"))
    data["prompts_dir"] = str(ROOT / "prompts")
    data.setdefault("model", {}).update(max_tokens=32, temperature=0.0)
    data["model"].pop("name", None)  # the default: the packaged local model, never a fake
    data.setdefault("policy", {})["refit_interval_s"] = 0
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``flywheel serve`` on a free port, stopped (SIGTERM, then SIGKILL) after the module."""
    home = tmp_path_factory.mktemp("flywheel-home")
    config = home / "flywheel.toml"
    _write_config(config)
    port = _free_port()
    database_url = f"sqlite:///{home / 'e2e.db'}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLYWHEEL_", "LANGFUSE_", "CHAINLIT_"))
    }
    env.update(
        FLYWHEEL_HOME=str(home),
        FLYWHEEL_DATABASE_URL=database_url,
        FLYWHEEL_API_KEY="e2e-key",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "e2e-server.log"
    flywheel = Path(sys.executable).with_name("flywheel")
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [
                str(flywheel),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--config",
                str(config),
            ],
            cwd=ROOT,  # Chainlit reads .chainlit/config.toml and chainlit.md from here
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log)
        yield Served(url, database_url, "e2e-key", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"flywheel serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"flywheel serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's Chromium driven by Playwright (sync API)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
