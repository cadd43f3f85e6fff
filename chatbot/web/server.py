"""The web server: our FastAPI app with the Chainlit UI mounted at ``/``.

Routes, in matching order (first match wins)::

    /api/outcomes, /api/health      chatbot.web.outcomes_api (/api/openapi.json, /api/docs)
    PUT/DELETE /feedback            chatbot.web.feedback.feedback_router (ownership-checked thumbs)
    GET/PUT /privacy, DELETE /project/thread
                                    chatbot.web.privacy.privacy_router (opt-out, own deletes)
    /operator…                      the operator dashboard (chatbot.web.operator)
    /  (everything else)            Chainlit: UI, login, websocket

Every request first passes :mod:`chatbot.web.security` (trusted proxies and
Secure cookies, the origin allow-list instead of Chainlit's CORS wildcard,
sessions ended by a password change). Chainlit's app ends with a catch-all
``GET /{path}`` that would hide routes added after it, so we build our own app
and mount Chainlit last, at ``/``.
A background task runs the optimizer every ``policy.refit_interval_s``
seconds (0 disables it) in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from chatbot.runtime import Runtime, best_effort, set_runtime
from chatbot.web.auth import ensure_auth_secret
from chatbot.web.bodylimit import BodyLimitMiddleware
from chatbot.web.feedback import feedback_router
from chatbot.web.operator import create_router as operator_router
from chatbot.web.outcomes_api import api_router, flywheel_version
from chatbot.web.overload import Overload, OverloadMiddleware
from chatbot.web.overload import install as install_overload
from chatbot.web.privacy import privacy_router
from chatbot.web.security import (
    DATABASE_DOWN,
    OriginMiddleware,
    SessionEndMiddleware,
    TrustedProxyMiddleware,
)
from chatbot.web.throttle import ChatLoginThrottleMiddleware, LoginThrottle
from optimizer import settings
from optimizer.config import Config, load_config
from optimizer.store.accounts import Accounts

log = logging.getLogger(__name__)

__all__ = ["CHAINLIT_APP", "DATABASE_UNAVAILABLE", "create_app", "run_optimizer_periodically"]

#: The Chainlit handlers module, loaded by Chainlit from its file.
CHAINLIT_APP = Path(__file__).with_name("app.py")

_chainlit_loaded = False


def create_app(config: Config | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """The whole server: outcomes API, health, feedback, operator pages and the chat UI.

    Builds a :class:`Runtime` from ``config`` (default: :func:`load_config`)
    unless one is given, installs it for the Chainlit handlers, and makes sure
    the session-signing secret exists. ``FLYWHEEL_API_KEY`` opens the outcomes API.
    """
    if runtime is None:
        runtime = Runtime.build(config or load_config())
    set_runtime(runtime)
    ensure_auth_secret()
    app = FastAPI(
        title="Flywheel",
        version=flywheel_version(),
        summary="A chatbot that learns from its users: outcomes API and health.",
        lifespan=_lifespan(runtime),
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.runtime = runtime
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.config.limits.max_body_bytes)
    # Added innermost first: proxies resolved, then origins, then ended sessions.
    security = runtime.config.security
    accounts = Accounts(runtime.store.engine)
    app.add_middleware(
        ChatLoginThrottleMiddleware,
        throttle=LoginThrottle(accounts, runtime.config.security),
        max_bytes=runtime.config.limits.max_body_bytes,
    )
    app.add_middleware(SessionEndMiddleware, accounts=accounts)
    app.add_middleware(OriginMiddleware, allowed=security.allowed_origins)
    app.add_middleware(TrustedProxyMiddleware, trusted=security.trusted_proxies)
    # Outermost: a request past capacity is refused before any other work.
    limits = runtime.config.limits
    gate = Overload(
        max_turns=limits.max_concurrent_turns, max_requests=limits.max_concurrent_requests
    )
    install_overload(gate)
    app.state.overload = gate
    app.add_middleware(OverloadMiddleware, overload=gate)
    app.include_router(api_router(runtime, api_key=settings.env(settings.FLYWHEEL_API_KEY)))
    app.include_router(feedback_router)
    app.include_router(privacy_router)
    app.include_router(operator_router(runtime))
    _mount_chat(app)  # last: its catch-all GET would hide any route added after it
    return app


#: Database errors that mean "unreachable right now" (a restart, a failover, a full pool).
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = DATABASE_DOWN


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with a reason, not 500: the client should retry (duplicates count once)."""
    log.warning(
        "database unavailable for %s %s: %s", request.method, request.url.path, type(exc).__name__
    )
    return JSONResponse(
        {"detail": "the database is unavailable; nothing was acknowledged, retry shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def _mount_chat(app: FastAPI) -> None:
    """Mount Chainlit at ``/``: what ``chainlit.utils.mount_chainlit`` does, minus its guard.

    That guard is a ``BaseHTTPMiddleware`` that only matters for a mount below
    ``/``, and it logs "No response returned" each time a browser drops a
    socket.io long-poll request. Chainlit keeps its handlers, config and
    sessions in module globals, so the handlers are loaded once per process
    and a second app (tests build several) mounts the same Chainlit app.
    """
    from chainlit.auth import ensure_jwt_secret
    from chainlit.config import config as chainlit_config
    from chainlit.config import load_module
    from chainlit.server import app as chainlit_app

    from chatbot.web import chainlit_fixes

    global _chainlit_loaded
    if not _chainlit_loaded:
        chainlit_fixes.install()  # no 1 ms event-loop stall per Chainlit message or step
        chainlit_config.run.module_name = str(CHAINLIT_APP)
        load_module(str(CHAINLIT_APP))
        _chainlit_loaded = True
    ensure_jwt_secret()
    app.mount("/", chainlit_app)


def _lifespan(runtime: Runtime) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Load the local model in the background so the first user does not pay for it.
        warm = asyncio.create_task(_warm_up(runtime))
        interval = runtime.config.policy.refit_interval_s
        task = (
            asyncio.create_task(run_optimizer_periodically(runtime, interval))
            if interval > 0
            else None
        )
        try:
            yield
        finally:
            warm.cancel()
            if task is not None:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            best_effort(runtime.tracer.shutdown)
            if runtime.alerts is not None:
                best_effort(runtime.alerts.close)

    return lifespan


async def _warm_up(runtime: Runtime) -> None:
    from chatbot.llm.streaming import stream_reply, warm_up
    from optimizer.config import ModelConfig

    try:
        # litellm imports much of itself on its first call (a second or more on a busy
        # machine): pay that now with the built-in fake model (local, free), not on a reply.
        fake = ModelConfig(name="fake/echo", retries=0, timeout_s=30)
        await stream_reply([{"role": "user", "content": "warm-up"}], model=fake)
        await warm_up(runtime.config.model)
    except Exception:  # the first turn will load it (and report a failure) instead
        log.warning("could not pre-load model %s", runtime.config.model.name, exc_info=True)


async def run_optimizer_periodically(runtime: Runtime, interval_s: float) -> None:
    """Run the optimizer job every ``interval_s`` seconds in a worker thread, forever.

    After each run, sessions whose attribution window closed get their KPI
    reward score in Langfuse (a no-op without Langfuse). A failed run is
    logged and retried at the next interval; it never stops the server. With
    several replicas the job's own lock lets one run at a time.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            result = await asyncio.to_thread(_optimize_once, runtime)
        except Exception:
            log.exception("background optimizer run failed; next try in %g s", interval_s)
            continue
        if result is None:
            log.info("optimizer skipped: another process holds its lock")
        runtime.assigner.invalidate()  # serve the new snapshot from the next assignment


def _optimize_once(runtime: Runtime) -> object:
    from chatbot.langfuse.scores import score_session_rewards
    from optimizer.refit import run_optimizer  # heavy (pandas, scipy): imported when it runs

    result = run_optimizer(
        runtime.store,
        runtime.config,
        alerts=runtime.alerts,
        proposer=runtime.proposer_hooks,
        finetune=runtime.finetune_hooks,
    )
    score_session_rewards(runtime.store, runtime.config, runtime.tracer)
    return result
