"""``flywheel serve`` as a real subprocess: start, wait until healthy, kill -9, restart.

For the replica and durability tests and ``bench/load.py``. Each server gets
its own home folder and log; replicas of one deployment share the database
URL, the API key and the session-signing secret (``CHAINLIT_AUTH_SECRET``),
as they would behind a load balancer. :func:`write_config` makes a
configuration from the project's ``flywheel.toml`` with the fake model, test
logins (``user00`` … with password :data:`PASSWORD`; bcrypt with few rounds
so that logging in 50 users is quick) and the given limits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import tomli_w

from tests.support.pg_schema import postgres_schema

__all__ = [
    "API_KEY",
    "AUTH_SECRET",
    "PASSWORD",
    "ServerProcess",
    "free_port",
    "postgres_schema",
    "start_all",
    "user_name",
    "write_config",
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
API_KEY = "replica-test-key"
AUTH_SECRET = "flywheel-test-secret-" + "s" * 40
PASSWORD = "pw"
#: Start-up imports Chainlit and litellm and migrates the database: slow on a busy 2-core box.
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_name(i: int) -> str:
    return f"user{i:02d}"


def write_config(
    path: Path,
    *,
    model: str = "fake/echo",
    users: int = 10,
    refit_interval_s: float = 0,
    model_options: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    attributes: dict[str, dict[str, str]] | None = None,
    segment_by: list[str] | None = None,
    roles: dict[str, str] | None = None,
) -> Path:
    """The project's configuration with the fake model, ``users`` logins and given limits.

    ``attributes`` maps a login name to its segment attributes; ``segment_by`` sets
    ``experiment.segment_by``; ``roles`` maps a login name to its role (``"operator"``).
    """
    data = tomllib.loads((ROOT / "flywheel.toml").read_text(encoding="utf-8"))
    data["prompts_dir"] = str(ROOT / "prompts")
    data["model"] = {
        **data.get("model", {}),
        "name": model,
        "retries": 0,
        "timeout_s": 30,
        **(model_options or {}),
    }
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    data["auth"] = {
        "demo": False,
        "users": [
            {
                "name": user_name(i),
                "password_hash": password_hash,
                "attributes": (attributes or {}).get(user_name(i), {}),
                "role": (roles or {}).get(user_name(i), "user"),
            }
            for i in range(users)
        ],
    }
    if segment_by is not None:
        data["experiment"]["segment_by"] = segment_by
    data.setdefault("policy", {})["refit_interval_s"] = refit_interval_s
    # no holdback: these tests pin which arm the next users get (tests/optimizer/test_holdback.py)
    data.setdefault("experiment", {})["holdback"] = 0.0
    if limits:
        data["limits"] = {**data.get("limits", {}), **limits}
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


@dataclass
class ServerProcess:
    """One ``flywheel serve`` process; :meth:`start` again after :meth:`kill` to restart it."""

    name: str
    home: Path
    config: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return ARTIFACTS / f"{self.name}.log"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def start(self, *, wait: bool = True) -> ServerProcess:
        """Launch the process (same port as before); waits until ``/api/health`` is 200."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLYWHEEL_", "LANGFUSE_", "CHAINLIT_"))
        }
        env.update(
            FLYWHEEL_HOME=str(self.home),
            FLYWHEEL_DATABASE_URL=self.database_url,
            FLYWHEEL_API_KEY=API_KEY,
            CHAINLIT_AUTH_SECRET=AUTH_SECRET,
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env)
        ARTIFACTS.mkdir(exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        flywheel = Path(sys.executable).with_name("flywheel")
        mode = "a" if self.starts else "w"
        with self.log.open(mode, encoding="utf-8") as out:
            out.write(f"--- start {self.starts + 1} on port {self.port}\n")
            out.flush()
            self.proc = subprocess.Popen(
                [
                    str(flywheel),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--config",
                    str(self.config),
                ],
                cwd=ROOT,  # Chainlit reads .chainlit/config.toml and chainlit.md from here
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"{self.name} not healthy after {timeout:g} s:\n{self.log_text()[-3000:]}"
        )

    def kill(self) -> None:
        """``kill -9``: no shutdown hooks, no flushing, connections cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def start_all(servers: list[ServerProcess]) -> None:
    """Start several servers at once (start-up dominates on a small machine)."""
    for server in servers:
        server.start(wait=False)
    try:
        for server in servers:
            server.wait_healthy()
    except Exception:
        for server in servers:
            server.kill()
        raise
