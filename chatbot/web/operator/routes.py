"""HTTP routes of ``/operator``: login, the experiment view, drill-down, controls.

Handlers stay thin: authentication and CSRF here, numbers in
:mod:`optimizer.report`, effects in :mod:`chatbot.web.operator.actions`, layout in
the templates. Pages are server-rendered; the only script is plotly.js, served
from the installed package at ``/operator/static/plotly.min.js``.

Refusals: a page without an operator session redirects to the login form; a
state-changing request without one is answered 401; a form without the
session's CSRF token 403; a login by a chat user (role ``user``) 403; a login while
the account or address is in backoff (:mod:`chatbot.web.throttle`) 429 with ``Retry-After``.
A session issued before its user's password change or removal counts as none.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from chatbot.langfuse.credentials import LANGFUSE_BASE_URL, LANGFUSE_HOST
from chatbot.web.auth import Authenticator, ensure_auth_secret
from chatbot.web.operator import actions
from chatbot.web.operator.security import COOKIE_NAME, MAX_AGE_S, OperatorSession, SessionSigner
from chatbot.web.throttle import LoginThrottle, Throttled
from optimizer import settings
from optimizer.plots import FIGURE_TITLES, figure_divs, plotly_js
from optimizer.report import experiment_report, promotion_estimates, recent_sessions
from optimizer.report_html import environment
from optimizer.store.accounts import Accounts

log = logging.getLogger(__name__)

__all__ = ["PREFIX", "REPORT_TTL_S", "ROUTES", "OperatorContext", "ReportCache", "create_router"]

PREFIX = "/operator"
#: Forms on these pages are tiny; anything bigger is not ours.
MAX_FORM_BYTES = 4096
#: On every page: never cached, never framed (clickjacking), no referrer leaves the site.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
#: Seconds a computed experiment report is shown before it is recomputed.
REPORT_TTL_S = 30.0


def _templates() -> jinja2.Environment:
    return environment([jinja2.PackageLoader("chatbot.web.operator", "templates")])


class ReportCache:
    """The newest experiment report (and its figures), recomputed at most every ``ttl_s`` seconds.

    Building the report refreshes the kept sums and reads them (milliseconds to a
    second, whatever the history), so page views within ``ttl_s`` share one
    computation; concurrent
    requests wait for the one in flight rather than starting their own. Every
    operator action clears it, so its effect shows on the next page.
    """

    def __init__(
        self,
        compute: Callable[[], dict[str, Any]],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0 seconds, got {ttl_s}")
        self.compute, self.ttl_s, self.clock = compute, ttl_s, clock
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = -math.inf

    def get(self) -> dict[str, Any]:
        with self._lock:
            if self._value is None or self.clock() - self._at >= self.ttl_s:
                self._value, self._at = self.compute(), self.clock()
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None


class OperatorContext:
    """What the ``/operator`` handlers share: the services, the session signer, the
    login checks, the templates and the report cache (one per router)."""

    def __init__(
        self, services: actions.Services, *, secret: bytes | None, report_ttl_s: float
    ) -> None:
        self.services = services
        self.report_ttl_s = report_ttl_s
        self.reports = ReportCache(self._experiment_view, ttl_s=report_ttl_s)
        self.signer = SessionSigner(secret if secret is not None else ensure_auth_secret().encode())
        self.accounts = Accounts(services.store.engine)
        self.authenticator = Authenticator(services.config.auth, self.accounts)
        self.throttle = LoginThrottle(self.accounts, services.config.security)
        self.templates = _templates()
        self.templates.globals["available_actions"] = actions.available_actions

    def _experiment_view(self) -> dict[str, Any]:
        # From the kept sums (optimizer.report_kept): days × arms of work, not every session.
        report = experiment_report(self.services.store, self.services.config, kept=True)
        return {"report": report, "divs": figure_divs(report)}  # the figures cost as much again

    def audit(self, actor: str, action: str, details: dict[str, Any] | None = None) -> None:
        self.services.store.audit(actor, action, "operator", details or {})

    # -- sessions ------------------------------------------------------------------------------
    def current(self, request: Request) -> OperatorSession | None:
        session = self.signer.loads(request.cookies.get(COOKIE_NAME))
        if session is not None and session.user is not None:
            issued = datetime.fromtimestamp(session.iat, UTC)
            if not self.accounts.session_valid(session.user, issued):  # password changed, removed
                return None
        return session

    def with_cookie(
        self, response: Response, request: Request, session: OperatorSession
    ) -> Response:
        response.set_cookie(
            COOKIE_NAME,
            self.signer.dumps(session),
            max_age=MAX_AGE_S,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    def page(
        self,
        request: Request,
        session: OperatorSession,
        template: str,
        status: int = 200,
        **context: Any,
    ) -> Response:
        html = self.templates.get_template(f"operator/{template}").render(
            session=session, prefix=PREFIX, **context
        )
        response = HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)
        # Shown once: the cookie is re-issued without the flash message.
        return self.with_cookie(response, request, session.without_flash())

    def refuse(self, request: Request, status: int, reason: str) -> Response:
        session = self.current(request) or OperatorSession.anonymous()
        return self.page(
            request, session, "error.html", status=status, status_code=status, reason=reason
        )

    def operator_or_login(self, request: Request) -> OperatorSession | Response:
        session = self.current(request)
        if session is None or not session.is_operator:
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        return session

    async def checked_form(
        self, request: Request
    ) -> tuple[OperatorSession, dict[str, str]] | Response:
        """The operator session and form fields of a POST, or the refusal to send."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
            return self.refuse(request, 413, f"form body must be at most {MAX_FORM_BYTES} bytes")
        session = self.current(request)
        if session is None or not session.is_operator:
            return self.refuse(request, 401, "operator login required")
        form = await _form(request) or {}
        if not session.csrf_ok(form.get("csrf")):
            return self.refuse(
                request, 403, "missing or invalid CSRF token: reload the page and try again"
            )
        return session, form

    def back(
        self,
        request: Request,
        session: OperatorSession,
        to: str,
        message: str,
        *,
        error: bool = False,
    ) -> Response:
        response = RedirectResponse(to, status_code=303)
        return self.with_cookie(response, request, session.with_flash(message, error=error))

    async def act(
        self,
        request: Request,
        session: OperatorSession,
        action: Callable[..., actions.ActionResult],
        *args: Any,
        back_to: str = PREFIX,
        **kwargs: Any,
    ) -> Response:
        """Run ``action(services, actor, *args, **kwargs)`` off the event loop and go back to
        ``back_to`` with its message; a refused action is answered with its status and reason.
        The report cache is cleared, so the action's effect shows on the next page."""
        try:
            result = await run_in_threadpool(
                action, self.services, session.user or "", *args, **kwargs
            )
        except actions.ActionError as exc:
            return self.refuse(request, exc.status, str(exc))
        self.reports.clear()
        return self.back(request, session, back_to, result.message)


def _context(request: Request) -> OperatorContext:
    """The router's :class:`OperatorContext` (bound to the request by :func:`create_router`)."""
    return cast(OperatorContext, request.state.operator)


Ctx = Annotated[OperatorContext, Depends(_context)]


def create_router(
    services: actions.Services, *, secret: bytes | None = None, report_ttl_s: float = REPORT_TTL_S
) -> APIRouter:
    """The ``/operator`` routes over a process's services (a ``chatbot.runtime.Runtime``).

    ``secret`` signs the session cookie; by default the shared auth secret
    (``CHAINLIT_AUTH_SECRET`` or the generated one in ``FLYWHEEL_HOME``).
    ``report_ttl_s``: how long a computed experiment report is reused.
    """
    context = OperatorContext(services, secret=secret, report_ttl_s=report_ttl_s)

    def bind(request: Request) -> None:  # router dependencies run before the handlers' own
        request.state.operator = context

    router = APIRouter(prefix=PREFIX, include_in_schema=False, dependencies=[Depends(bind)])
    for path, methods, handler in ROUTES:
        router.add_api_route(path, handler, methods=list(methods))
    return router


# -- login -----------------------------------------------------------------------------------
def login_form(request: Request, ctx: Ctx) -> Response:
    session = ctx.current(request)
    if session is not None and session.is_operator:
        return RedirectResponse(PREFIX, status_code=303)
    return ctx.page(request, session or OperatorSession.anonymous(), "login.html")


async def login(request: Request, ctx: Ctx) -> Response:
    session = ctx.current(request)
    form = await _form(request)
    if session is None or form is None or not session.csrf_ok(form.get("csrf")):
        return ctx.refuse(request, 403, "missing or invalid CSRF token: reload the login page")
    name, password = form.get("username", "").strip(), form.get("password", "")
    if not name or not password or len(name) > 100 or len(password) > 200:
        return ctx.page(
            request,
            session,
            "login.html",
            status=400,
            error="enter a name and a password",
            name=name[:100],
        )
    client = request.client.host if request.client else None
    try:
        await run_in_threadpool(ctx.throttle.check, name, client)
    except Throttled as exc:
        await run_in_threadpool(ctx.audit, name, "operator.login_throttled")
        response = ctx.page(
            request, session, "login.html", status=429, error=str(exc), name=name[:100]
        )
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    who = await run_in_threadpool(ctx.authenticator.check, name, password)
    await run_in_threadpool(ctx.throttle.record, name, client, ok=who is not None)
    if who is None:
        await run_in_threadpool(
            ctx.audit, name, "operator.login_failed", {"reason": "bad credentials"}
        )
        return ctx.page(
            request, session, "login.html", status=401, error="wrong name or password", name=name
        )
    if who.role != "operator":
        await run_in_threadpool(ctx.audit, name, "operator.login_refused", {"role": who.role})
        return ctx.page(
            request,
            session,
            "login.html",
            status=403,
            error="this login is a chat user; the dashboard needs the operator role",
            name=name,
        )
    await run_in_threadpool(ctx.audit, who.name, "operator.login")
    return ctx.with_cookie(
        RedirectResponse(PREFIX, status_code=303), request, session.logged_in(who.name, who.role)
    )


async def logout(request: Request, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    await run_in_threadpool(ctx.audit, session.user or "", "operator.logout")
    return ctx.with_cookie(
        RedirectResponse(f"{PREFIX}/login", status_code=303), request, OperatorSession.anonymous()
    )


# -- pages -----------------------------------------------------------------------------------
def experiment(request: Request, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    view = ctx.reports.get()
    return ctx.page(
        request,
        session,
        "experiment.html",
        r=view["report"],
        divs=view["divs"],
        titles=FIGURE_TITLES,
        report_ttl_s=ctx.report_ttl_s,
    )


def arm(request: Request, arm_id: str, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    store, experiment_id = ctx.services.store, ctx.services.config.experiment.id
    if arm_id not in {row.id for row in store.arms(experiment_id)}:
        return ctx.refuse(request, 404, f"no arm {arm_id!r} in experiment {experiment_id!r}")
    sessions = recent_sessions(store, ctx.services.config, arm_id, limit=20)
    return ctx.page(
        request, session, "arm.html", arm_id=arm_id, sessions=sessions, trace_url=_trace_url()
    )


def report_json(request: Request, ctx: Ctx) -> Response:
    session = ctx.current(request)
    if session is None or not session.is_operator:
        return JSONResponse({"detail": "operator login required"}, status_code=401)
    return JSONResponse(ctx.reports.get()["report"])


def plotly() -> Response:
    return Response(
        plotly_js(),
        media_type="application/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


# -- controls --------------------------------------------------------------------------------
async def arm_control(request: Request, arm_id: str, action: str, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    cap: float | None = None
    if action == "cap":
        try:
            cap = float(form.get("cap", "")) / 100  # the form asks for a percentage
        except ValueError:
            return ctx.refuse(
                request, 400, f"cap must be a percentage between 0 and 100, got {form.get('cap')!r}"
            )
    return await ctx.act(request, session, actions.arm_action, arm_id, action, cap=cap)


async def new_variant(request: Request, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    try:
        k = int(form.get("k") or 3)
    except ValueError:
        return ctx.refuse(request, 400, f"k must be a whole number, got {form.get('k')!r}")
    return await ctx.act(
        request,
        session,
        actions.add_variant,
        form.get("arm_id", ""),
        form.get("prompt", ""),
        fewshot=form.get("fewshot", "none"),
        k=k,
        model=(form.get("model") or "").strip() or None,
        api_base=(form.get("api_base") or "").strip() or None,
    )


async def optimize(request: Request, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    return await ctx.act(request, session, actions.run_optimizer_now)


# -- few-shot review and off-policy estimates --------------------------------------------------
def examples(request: Request, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    return ctx.page(request, session, "examples.html", **_bank_view(ctx.services))


async def example_review(request: Request, example_id: str, decision: str, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    reason = form.get("reason", "").strip()[:500]
    return await ctx.act(
        request,
        session,
        actions.review_example,
        example_id,
        decision,
        reason=reason,
        back_to=f"{PREFIX}/examples",
    )


def candidates_page(request: Request, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    return ctx.page(request, session, "candidates.html", **actions.candidates_view(ctx.services))


async def candidate_decision(
    request: Request, candidate_id: str, decision: str, ctx: Ctx
) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    return await ctx.act(
        request,
        session,
        actions.decide_candidate,
        candidate_id,
        decision,
        back_to=f"{PREFIX}/candidates",
    )


def ope(request: Request, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    estimates = promotion_estimates(ctx.services.store, ctx.services.config)
    return ctx.page(request, session, "ope.html", ope=estimates)


def outcomes(request: Request, ctx: Ctx) -> Response:
    session = ctx.operator_or_login(request)
    if isinstance(session, Response):
        return session
    from optimizer.attribution import unattributed

    found = unattributed(ctx.services.store, limit=OUTCOMES_LISTED)
    return ctx.page(request, session, "outcomes.html", found=found)


async def reattribute(request: Request, ctx: Ctx) -> Response:
    checked = await ctx.checked_form(request)
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    return await ctx.act(
        request, session, actions.reattribute_outcomes, back_to=f"{PREFIX}/outcomes"
    )


#: Unattributed outcomes listed on ``/operator/outcomes`` (the counts cover all).
OUTCOMES_LISTED = 100

#: Every route of the dashboard: (path under ``/operator``, methods, handler), matched in order.
ROUTES: tuple[tuple[str, tuple[str, ...], Callable[..., Any]], ...] = (
    ("/login", ("GET",), login_form),
    ("/login", ("POST",), login),
    ("/logout", ("POST",), logout),
    ("", ("GET",), experiment),
    ("/", ("GET",), experiment),
    ("/arms/{arm_id:path}", ("GET",), arm),
    ("/report.json", ("GET",), report_json),
    ("/static/plotly.min.js", ("GET",), plotly),
    ("/arms/{arm_id:path}/{action}", ("POST",), arm_control),
    ("/variants", ("POST",), new_variant),
    ("/optimize", ("POST",), optimize),
    ("/examples", ("GET",), examples),
    ("/examples/{example_id}/{decision}", ("POST",), example_review),
    ("/ope", ("GET",), ope),
    ("/outcomes", ("GET",), outcomes),
    ("/outcomes/reattribute", ("POST",), reattribute),
    ("/candidates", ("GET",), candidates_page),
    ("/candidates/{candidate_id}/{decision}", ("POST",), candidate_decision),
)


async def _form(request: Request) -> dict[str, str] | None:
    """Text fields of an urlencoded or multipart form; None for any other body."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return None
    try:
        form = await request.form(max_files=0, max_fields=20)
    except Exception:  # malformed body: the client's fault, answered 400 by the caller
        return None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _trace_url() -> Callable[[str | None], str | None]:
    """``{host}/trace/{trace_id}`` when Langfuse is configured, else no links."""
    host = settings.env(LANGFUSE_BASE_URL) or settings.env(LANGFUSE_HOST)

    def url(trace_id: str | None) -> str | None:
        return f"{host.rstrip('/')}/trace/{trace_id}" if host and trace_id else None

    return url


def _bank_view(services: actions.Services) -> dict[str, Any]:
    """Examples waiting for review, the servable ones, and the bank's challenger proposals."""
    import sqlalchemy as sa

    from optimizer.fewshot import ExampleBank
    from optimizer.fewshot.proposal import AUDIT_ACTION
    from optimizer.store import schema

    bank = ExampleBank(services.store)
    au = schema.audit_events
    with services.store.engine.connect() as conn:
        proposals = conn.execute(
            sa.select(au).where(au.c.action == AUDIT_ACTION).order_by(au.c.id.desc()).limit(5)
        ).all()
    return {
        "candidates": bank.list("candidate")[::-1],
        "servable": bank.list(("approved", "pinned"))[::-1],
        "proposals": proposals,
    }
