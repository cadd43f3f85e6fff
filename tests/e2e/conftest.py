"""Browser-test fixtures: a real ``flywheel serve`` subprocess and Debian's Chromium.

The server runs the project's own configuration (actions, arms, prompts) with
a temporary home, SQLite database and API key, the real local model with
``max_tokens = 32`` and ``temperature = 0`` (short, reproducible replies),
and the background optimizer off (started by :class:`tests.support.flywheel_process.ServerProcess`;
output in ``test-artifacts/e2e-server.log``). Chromium is the system one (never
``playwright install``); if it is missing the tests fail, they do not skip.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.support.flywheel_process import API_KEY, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
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


@dataclass(frozen=True)
class Served:
    url: str
    database_url: str
    api_key: str
    log: Path
    pid: int


def _write_config(path: Path, **model: Any) -> None:
    data = tomllib.loads((ROOT / "flywheel.toml").read_text(encoding="utf-8"))
    data["prompts_dir"] = str(ROOT / "prompts")
    data.setdefault("model", {}).update(model)
    data["model"].pop("name", None)  # the default: the packaged local model, never a fake
    data.setdefault("policy", {})["refit_interval_s"] = 0
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


def serve(factory: pytest.TempPathFactory, name: str, **model: Any) -> Iterator[Served]:
    """``flywheel serve`` on a free port with these ``[model]`` settings, stopped afterwards."""
    home = factory.mktemp(name)
    config = home / "flywheel.toml"
    _write_config(config, **model)
    server = ServerProcess(name, home, config, f"sqlite:///{home / 'e2e.db'}")
    try:
        server.start()
        assert server.proc is not None
        yield Served(server.url, server.database_url, API_KEY, server.log, server.proc.pid)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The local model with short, reproducible replies (SIGTERM, then SIGKILL after)."""
    yield from serve(tmp_path_factory, "e2e-server", max_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Long replies (so a test can cut one mid-stream) and a 10 s gap deadline: short enough
    for the hang test, long enough for a first token on a busy 2-core machine."""
    yield from serve(
        tmp_path_factory, "e2e-model-failures", max_tokens=200, temperature=1.0, stall_s=10
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
