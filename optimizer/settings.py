"""Environment variables Flywheel reads, in one place.

Each constant is the variable's name; its default is documented beside it and
in ``.env.example``. Explicit arguments and ``flywheel.toml`` values are
overridden by these variables (environment wins, so deployments need no file
edits).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Path of the configuration file. Default: ``flywheel.toml`` in the working directory.
FLYWHEEL_CONFIG = "FLYWHEEL_CONFIG"
#: Directory for local state (SQLite file, generated secrets). Default: ``.flywheel``.
FLYWHEEL_HOME = "FLYWHEEL_HOME"
#: SQLAlchemy URL of the store. Default: ``sqlite:///.flywheel/flywheel.db``.
FLYWHEEL_DATABASE_URL = "FLYWHEEL_DATABASE_URL"
#: Any litellm model string. Default: ``local/gemma3-270m`` (in-process llama.cpp).
FLYWHEEL_MODEL = "FLYWHEEL_MODEL"
#: Model tried when the main one fails after retries. Default: none.
FLYWHEEL_FALLBACK_MODEL = "FLYWHEEL_FALLBACK_MODEL"
#: API key integrators send in ``X-API-Key`` to ``POST /api/outcomes``. Default: none (API closed).
FLYWHEEL_API_KEY = "FLYWHEEL_API_KEY"
#: Host and port of ``flywheel serve``. Defaults: ``127.0.0.1`` and ``8000``.
FLYWHEEL_HOST = "FLYWHEEL_HOST"
FLYWHEEL_PORT = "FLYWHEEL_PORT"
#: ``1`` enables demo logins (``demo``/``demo``, ``operator``/``operator``). Default: config.
FLYWHEEL_DEMO = "FLYWHEEL_DEMO"
#: ``1`` lets ``flywheel serve`` keep demo logins on a non-loopback interface (with a warning
#: at every start). Default: refuse to start.
FLYWHEEL_ALLOW_DEMO_LOGINS = "FLYWHEEL_ALLOW_DEMO_LOGINS"
#: Comma-separated sites allowed to call the server with cookies (CORS). Default: none
#: (same origin only); overrides ``security.allowed_origins``.
FLYWHEEL_ALLOWED_ORIGINS = "FLYWHEEL_ALLOWED_ORIGINS"
#: Comma-separated addresses/networks of proxies whose X-Forwarded-For/-Proto are believed.
#: Default: none; overrides ``security.trusted_proxies``.
FLYWHEEL_TRUSTED_PROXIES = "FLYWHEEL_TRUSTED_PROXIES"
#: Directory of prompt variants, examples and knowledge. Default: ``prompts``.
FLYWHEEL_PROMPTS_DIR = "FLYWHEEL_PROMPTS_DIR"
#: Seconds between background optimizer runs in the server; ``0`` disables. Default: config.
FLYWHEEL_OPTIMIZE_INTERVAL = "FLYWHEEL_OPTIMIZE_INTERVAL"

DEFAULT_HOME = ".flywheel"
DEFAULT_MODEL = "local/gemma3-270m"


def env(name: str, default: str | None = None) -> str | None:
    """Return the variable's value, or ``default`` when unset or empty."""
    value = os.environ.get(name, "")
    return value if value.strip() else default


def home_dir() -> Path:
    """Directory for local state, created on first use."""
    path = Path(env(FLYWHEEL_HOME, DEFAULT_HOME) or DEFAULT_HOME)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_database_url() -> str:
    return f"sqlite:///{home_dir() / 'flywheel.db'}"
