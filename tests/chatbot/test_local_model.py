"""The local llama.cpp provider: the packaged model, and one real-model run (slow)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import litellm
import pytest

from chatbot.llm.local import ModelProcess, configure, model_info, model_path, model_process
from chatbot.llm.local_worker import N_THREADS
from chatbot.llm.messages import estimate_tokens
from chatbot.llm.streaming import FRIENDLY_ERROR, Completion, stream_reply, warm_up
from optimizer.config import ModelConfig
from optimizer.prompt_library import load_prompts

ROOT = Path(__file__).resolve().parents[2]


def test_the_packaged_gguf_is_found_without_network() -> None:
    path = model_path("gemma3-270m")
    assert path.suffix == ".gguf" and path.stat().st_size > 100_000_000


def test_unknown_local_models_are_rejected_by_name() -> None:
    with pytest.raises(litellm.NotFoundError, match="unknown local model 'nope'"):
        model_path("nope")


def test_context_size_and_stall_must_be_positive() -> None:
    with pytest.raises(ValueError, match="context_tokens must be > 0, got 0"):
        configure(context_tokens=0)
    with pytest.raises(ValueError, match="stall_s must be > 0, got -1"):
        configure(context_tokens=2048, stall_s=-1)


def test_token_estimate_is_conservative_for_the_demo_prompts() -> None:
    from llama_cpp import Llama  # the tokenizer only: no weights are loaded

    vocab = Llama(model_path=str(model_path("gemma3-270m")), vocab_only=True, verbose=False)
    library = load_prompts(ROOT / "prompts")
    texts = [library.knowledge, *(v.template for v in library.variants.values())]
    texts += [t for ex in library.examples.values() for t in (ex.user, ex.assistant)]
    for text in texts:
        real = len(vocab.tokenize(text.encode("utf-8"), add_bos=False))
        assert estimate_tokens(text) >= real, text[:60]


async def test_warm_up_reports_a_bad_local_model_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await warm_up(ModelConfig(name="fake/echo", fallback="local/nope"))
    assert "could not preload local/nope" in caplog.text


@pytest.mark.slow
async def test_real_model_streams_through_litellm_one_request_at_a_time() -> None:
    """Two concurrent replies from the real model: streamed, serialised, loop kept free."""
    model = ModelConfig(max_tokens=24, temperature=0.0, timeout_s=120, retries=0)
    facts = "Password reset: click 'Forgot password' on the sign-in page; the link lasts 1 hour."
    events: list[tuple[str, str]] = []

    def ask(tag: str, question: str) -> asyncio.Task[Completion]:
        async def on_token(text: str) -> None:
            events.append((tag, text))

        messages = [
            {"role": "system", "content": f"You are a support assistant.\n\n{facts}"},
            {"role": "user", "content": question},
        ]
        return asyncio.create_task(stream_reply(messages, model=model, on_token=on_token))

    async def ticker() -> None:
        while True:
            events.append(("tick", ""))
            await asyncio.sleep(0.01)

    await warm_up(model)  # load outside the measured replies
    ticks = asyncio.create_task(ticker())
    try:
        first = ask("a", "How do I reset my password?")
        second = ask("b", "How long does the reset link work?")
        replies = await asyncio.gather(first, second)
    finally:
        ticks.cancel()

    for tag, reply in zip("ab", replies, strict=True):
        assert reply.error is None, reply.error
        tokens = [text for t, text in events if t == tag]
        assert len(tokens) >= 2, f"reply {tag} did not stream: {tokens}"
        assert "".join(tokens) == reply.text
        assert reply.prompt_tokens and reply.prompt_tokens > 10
        assert reply.completion_tokens and 1 <= reply.completion_tokens <= 24
        assert reply.cost == 0.0
        assert reply.ttft_ms is not None and reply.ttft_ms < reply.latency_ms
    order = [t for t, _ in events if t != "tick"]
    switches = sum(1 for x, y in itertools.pairwise(order) if x != y)
    assert switches == 1, f"replies interleaved: {''.join(order)}"
    first_token = next(i for i, (t, _) in enumerate(events) if t != "tick")
    last_token = max(i for i, (t, _) in enumerate(events) if t != "tick")
    assert ("tick", "") in events[first_token:last_token], "the event loop was blocked"


# --- the model's own process -------------------------------------------------------------

#: A prompt the base model answers at length (temperature 1, many tokens allowed).
LONG = "Question: Describe, step by step and in detail, how to plan a product launch.\nAnswer:"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _generate(process: ModelProcess, on_token: Any = None) -> list[tuple[str, Any]]:
    """One long reply on ``process``'s own thread; ``on_token(n)`` runs as token n arrives."""
    from chatbot.llm.local import _Job

    items: list[tuple[str, Any]] = []

    def emit(item: tuple[str, Any]) -> None:
        items.append(item)
        if item[0] == "token" and on_token is not None:
            on_token(sum(1 for kind, _ in items if kind == "token"))

    job = _Job("local/gemma3-270m", "gemma3-270m", LONG, 200, 1.0, ("\nQuestion:",))
    process.submit(process.generate, job, emit, threading.Event(), 1024).result()
    return items


@pytest.mark.slow
async def test_the_model_runs_in_its_own_process_without_extra_buffer_types() -> None:
    """The AMX fix, pinned: llama.cpp's extra buffer types (weight repacking) stay off."""
    info = await model_info("gemma3-270m")
    assert info["use_extra_bufts"] is False
    assert info["n_threads"] == N_THREADS and info["n_ctx"] > 0
    assert info["pid"] == model_process().pid != os.getpid()
    assert info["model"].endswith(".gguf") and info["build"]


@pytest.mark.slow
def test_a_killed_model_process_costs_one_reply_and_restarts() -> None:
    process = ModelProcess()
    try:
        first_pid = None

        def kill(n: int) -> None:
            nonlocal first_pid
            if n == 2:  # mid-reply, deterministically: between two tokens
                first_pid = process.pid
                os.kill(first_pid, signal.SIGKILL)

        failed = _generate(process, kill)
        kinds = [kind for kind, _ in failed]
        assert kinds[:2] == ["token", "token"] and kinds[-1] == "error", kinds
        error = failed[-1][1]
        assert "local model process died (killed by SIGKILL)" in str(error)
        assert process.restarts == 1 and process.state == "ready"
        assert first_pid is not None and process.pid != first_pid and not _alive(first_pid)

        again = _generate(process)
        assert again[-1][0] == "done" and any(kind == "token" for kind, _ in again)
    finally:
        process.stop()


@pytest.mark.slow
def test_a_hung_model_process_is_replaced() -> None:
    process = ModelProcess(stall_s=5.0)
    try:
        process.submit(process.info, "gemma3-270m", 1024).result()  # loaded: gaps count now
        hung_pid = None

        def freeze(n: int) -> None:
            nonlocal hung_pid
            if n == 1:
                hung_pid = process.pid
                os.kill(hung_pid, signal.SIGSTOP)  # alive, silent: a hang

        started = time.monotonic()
        failed = _generate(process, freeze)
        waited = time.monotonic() - started
        assert failed[-1][0] == "error" and "hung: no answer for 5 s" in str(failed[-1][1])
        assert 5.0 <= waited < 30, waited  # the gap deadline, not the whole reply's
        assert hung_pid is not None and not _alive(hung_pid)
        assert process.restarts == 1 and process.pid != hung_pid
        assert _generate(process)[-1][0] == "done"
    finally:
        process.stop()


@pytest.mark.slow
async def test_a_crash_mid_reply_through_litellm_says_sorry_then_the_next_reply_works() -> None:
    model = ModelConfig(max_tokens=200, temperature=1.0, timeout_s=120, retries=1)
    await warm_up(model)
    messages = [
        {"role": "system", "content": "You are a support assistant. Answer in detail."},
        {"role": "user", "content": "Describe, step by step, how to set up a project for a team."},
    ]
    seen: list[str] = []

    async def on_token(text: str) -> None:
        seen.append(text)
        if len(seen) == 2:
            os.kill(model_process().pid or 0, signal.SIGKILL)

    crashed = await stream_reply(messages, model=model, on_token=on_token)
    assert crashed.error is not None and "died (killed by SIGKILL)" in crashed.error
    assert crashed.text.endswith(FRIENDLY_ERROR) and crashed.text.startswith("".join(seen[:2]))
    after = await stream_reply(messages, model=model)
    assert after.error is None and after.text.strip()


def test_the_model_process_ends_with_the_server_even_on_kill_9(tmp_path: Path) -> None:
    """The worker reads stdin; when the server dies its pipe closes and the worker exits."""
    script = (
        "import os, signal, sys\n"
        "from chatbot.llm.local import ModelProcess\n"
        "p = ModelProcess(); p._start(); print(p.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    server = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert server.returncode == -signal.SIGKILL, server.stderr
    worker = int(server.stdout.split()[0])
    for _ in range(100):
        if not _alive(worker):
            break
        time.sleep(0.05)
    assert not _alive(worker), "the model process outlived its server"


@pytest.mark.slow
def test_a_model_process_that_dies_while_idle_is_restarted_with_its_model() -> None:
    process = ModelProcess()
    try:
        process.submit(process.info, "gemma3-270m", 1024).result()
        dead = process.pid
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        for _ in range(600):  # backoff, a new process and the model loaded again
            if process.state == "ready" and process.pid != dead:
                break
            time.sleep(0.1)
        assert process.state == "ready" and process.restarts == 1, process.status()
        assert "killed by SIGKILL" in (process.last_error or "")
        assert _generate(process)[-1][0] == "done"
    finally:
        process.stop()
