"""``flywheel serve`` (the web server) and ``flywheel chat`` (a REPL on the same code path).

Heavy imports (Chainlit, litellm, uvicorn) happen inside the commands so
``flywheel --help`` stays fast.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from typing import TYPE_CHECKING

import typer

from optimizer import settings
from optimizer.cli.common import (
    ConfigOption,
    JsonOption,
    console,
    err_console,
    fail,
    get_config,
    print_json,
)
from optimizer.errors import FlywheelError

if TYPE_CHECKING:
    from chatbot.conversation import Conversation, Reply
    from chatbot.runtime import Runtime

__all__ = ["chat", "doctor", "register", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _log_to_console() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("chatbot", "optimizer"):
        logging.getLogger(name).setLevel(logging.INFO)


def _build_runtime(config: str | None) -> Runtime:
    from chatbot.runtime import Runtime

    cfg = get_config(config)
    try:
        with console.status("Migrating the database and loading prompts…"):
            return Runtime.build(cfg)
    except FlywheelError as exc:
        fail(str(exc), 2)


def serve(
    host: str | None = typer.Option(
        None, "--host", help=f"Interface to bind (default: $FLYWHEEL_HOST or {DEFAULT_HOST})."
    ),
    port: int | None = typer.Option(
        None, "--port", min=1, max=65535, help=f"Port (default: $FLYWHEEL_PORT or {DEFAULT_PORT})."
    ),
    allow_demo_logins: bool = typer.Option(
        False,
        "--allow-demo-logins",
        help="Keep demo logins on a non-loopback interface (logs a warning at every start).",
        envvar=settings.FLYWHEEL_ALLOW_DEMO_LOGINS,
    ),
    config: str | None = ConfigOption,
    skip_model_check: bool = typer.Option(
        False, "--skip-model-check", help="Serve even if the model gives no tokens at start."
    ),
) -> None:
    """Serve the chat UI, the outcomes API and the operator pages; migrates the database first.

    Demo logins (``auth.demo``) work only on 127.0.0.1/localhost: with them on,
    any other ``--host`` refuses to start unless ``--allow-demo-logins``.
    """
    from chatbot.web.auth import demo_exposure, is_loopback

    host = host or settings.env(settings.FLYWHEEL_HOST, DEFAULT_HOST) or DEFAULT_HOST
    if port is None:
        raw = settings.env(settings.FLYWHEEL_PORT, str(DEFAULT_PORT)) or str(DEFAULT_PORT)
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            fail(f"{settings.FLYWHEEL_PORT} must be a port number 1-65535, got {raw!r}", 2)
        port = int(raw)
    _log_to_console()
    cfg = get_config(config)
    if (reason := demo_exposure(host, cfg.auth, allow=allow_demo_logins)) is not None:
        typer.echo(f"error: {reason}", err=True)  # one line, never wrapped
        raise typer.Exit(2)
    if cfg.auth.demo and not is_loopback(host):
        logging.getLogger("chatbot.serve").warning(
            "demo logins demo/demo and operator/operator are ON on %s (--allow-demo-logins): "
            "anyone who can reach this address can use the chat and the operator controls",
            host,
        )
    runtime = _build_runtime(config)
    if not skip_model_check:
        _check_model(runtime)

    import uvicorn

    from chatbot.web.server import create_app

    app = create_app(runtime=runtime)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(f"Flywheel chat at [bold]http://{shown}:{port}/[/bold]  (API docs: /api/docs)")
    if runtime.config.auth.demo:
        console.print(
            "Demo logins: [bold]demo[/bold]/demo (chat), [bold]operator[/bold]/operator (operator)"
        )
    interval = runtime.config.policy.refit_interval_s
    console.print(
        f"model {runtime.config.model.name} · experiment {runtime.config.experiment.id} "
        f"({len(runtime.arms)} arms) · optimizer {f'every {interval:g} s' if interval else 'off'}"
    )
    # The ~600k objects of the imports live as long as the server: kept out of the garbage
    # collector's full passes, which otherwise stop every reply for ~0.2 s now and then
    # (the p99 tail of 50 users at once, issue 18).
    gc.freeze()
    # Chainlit expects the plain asyncio loop (it patches it with nest_asyncio).
    # proxy_headers=False: uvicorn would believe X-Forwarded-* from 127.0.0.1; ours believe
    # only security.trusted_proxies (chatbot.web.security).
    uvicorn.run(app, host=host, port=port, log_level="warning", loop="asyncio", proxy_headers=False)


def _check_model(runtime: Runtime) -> None:
    """A few tokens from the model before taking users; else one line on what to do, exit 1."""
    from chatbot.doctor import failure_line, self_test

    model = runtime.config.model
    with console.status(f"Checking the model ({model.name})…"):
        reply = asyncio.run(self_test(model))
    if reply.error is not None:
        runtime.close()
        fail(failure_line(model, reply.error), 1)


def doctor(
    config: str | None = ConfigOption,
    max_tokens: int = typer.Option(48, "--max-tokens", min=2, max=512, help="Tokens to time."),
    as_json: bool = JsonOption,
) -> None:
    """What the model runs on (CPU, llama.cpp build, options) and its speed: for bug reports."""
    from chatbot.doctor import diagnose

    cfg = get_config(config)
    with console.status(f"Loading and timing {cfg.model.name}…"):
        report = asyncio.run(diagnose(cfg.model, max_tokens=max_tokens))
    if as_json:
        print_json(report)
    else:
        local = report.pop("local", {})
        for key, value in [*report.items(), *local.items()]:
            console.print(f"[bold]{key:>18}[/bold]  {value}", highlight=False)
    if report.get("error"):
        raise typer.Exit(1)


HELP = r"""Commands: /up, /down \[comment] rate the last reply · /solved marks the issue solved ·
/<action> clicks a call-to-action (e.g. {actions}) · /help · /quit"""


def chat(
    user: str = typer.Option("operator", "--user", help="User id the session is recorded under."),
    config: str | None = ConfigOption,
) -> None:
    """Chat in the terminal on the web UI's code path: assignment, prompt, streaming, recording."""
    runtime = _build_runtime(config)
    _check_model(runtime)
    try:
        asyncio.run(_repl(runtime, user))
    finally:
        runtime.close()


async def _repl(runtime: Runtime, user: str) -> None:
    from chatbot.conversation import Conversation

    conversation = await Conversation.start(runtime, str(uuid.uuid4()), user, {"channel": "cli"})
    a = conversation.assignment
    arm = runtime.arm(a.arm_id)
    console.print(
        f"session [bold]{a.session_id}[/bold] · arm [bold]{arm.id}[/bold] "
        f"(prompt {arm.prompt}, few-shot {arm.fewshot}) · propensity {a.propensity:.3f} · "
        f"model {runtime.config.model.name}"
    )
    console.print(
        HELP.format(actions=", ".join(f"/{x.name}" for x in runtime.config.actions) or "none")
    )
    last_turn: str | None = None
    while True:
        try:
            line = (await asyncio.to_thread(console.input, "[bold cyan]you>[/bold cyan] ")).strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line.startswith("/"):
            if not await _command(conversation, line, last_turn):
                break
            continue
        console.print("[bold green]bot>[/bold green] ", end="")
        reply = await conversation.reply(str(uuid.uuid4()), line, on_token=_show)
        if reply.completion is None or reply.completion.ttft_ms is None:  # nothing was streamed
            console.print(reply.text, markup=False, highlight=False, end="")
        console.print()
        _print_stats(reply)
        if reply.turn is not None:
            last_turn = reply.turn.id


async def _show(token: str) -> None:
    console.print(token, end="", markup=False, highlight=False, soft_wrap=True)


def _print_stats(reply: Reply) -> None:
    c, t = reply.completion, reply.turn
    if c is None or t is None:
        return
    ttft = f"{c.ttft_ms:.0f} ms" if c.ttft_ms is not None else "-"
    tokens = c.completion_tokens if c.completion_tokens is not None else "?"
    line = f"  [dim]{c.model} · first token {ttft} · {c.latency_ms:.0f} ms · {tokens} tokens"
    if t.fewshot_ids:
        line += f" · examples {', '.join(t.fewshot_ids)}"
    console.print(line + "[/dim]")
    if t.error:
        err_console.print(f"  [red]error recorded:[/red] {t.error}", markup=True, highlight=False)


async def _command(conversation: Conversation, line: str, last_turn: str | None) -> bool:
    """Run a /command; False means quit."""
    name, _, arg = line[1:].partition(" ")
    name = name.lower()
    if name in ("quit", "exit", "q"):
        return False
    if name == "help":
        actions = ", ".join(f"/{x.name}" for x in conversation.runtime.config.actions) or "none"
        console.print(HELP.format(actions=actions))
        return True
    try:
        if name in ("up", "down"):
            if last_turn is None:
                err_console.print("nothing to rate yet: ask something first")
                return True
            await conversation.vote(last_turn, 1 if name == "up" else 0, arg.strip() or None)
            console.print(f"[dim]recorded thumbs {name} on turn {last_turn}[/dim]")
            return True
        if name in ("solved", "resolved"):
            console.print((await conversation.resolve(turn_id=last_turn)).message)
            return True
        configured = conversation.runtime.config.actions
        matches = [x for x in configured if x.name == name] or [
            x for x in configured if name in x.name
        ]
        if len(matches) == 1:
            console.print((await conversation.click(matches[0], turn_id=last_turn)).message)
            return True
    except (FlywheelError, ValueError) as exc:
        err_console.print(f"[red]refused:[/red] {exc}")
        return True
    err_console.print(f"unknown command /{name}; /help lists them")
    return True


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``chat`` and ``doctor`` to ``app``."""
    app.command()(serve)
    app.command()(chat)
    app.command()(doctor)
