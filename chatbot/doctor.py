"""Is the model usable here? The start-up self-test and ``flywheel doctor``.

``flywheel serve`` and ``flywheel chat`` call :func:`self_test` before they
take users: a few tokens from the configured model. When that fails they stop
with one line from :func:`failure_line`, saying what failed and what to do,
instead of dying silently on the first message. :func:`diagnose` gathers what
a bug report needs: the CPU, how llama.cpp was built and loaded, and the speed
of a short generation.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from chatbot.llm.streaming import Completion, stream_reply
from optimizer.config import ModelConfig

__all__ = ["cpu", "diagnose", "failure_line", "self_test"]

_CHECK = [{"role": "user", "content": "Say hello."}]
_BENCH = [{"role": "user", "content": "Describe the steps to reset a password."}]


async def self_test(model: ModelConfig) -> Completion:
    """A few tokens from ``model.name`` (no fallback): ``error`` says whether it works.

    Empty replies are retried (a base model may stop at once); the first call
    also loads a local model, so the first user does not wait for it.
    """
    check = model.model_copy(update={"max_tokens": 8, "retries": 2, "fallback": None})
    return await stream_reply(_CHECK, model=check)


def failure_line(model: ModelConfig, error: str) -> str:
    """One line: what failed, and what to do about it.

    >>> line = failure_line(ModelConfig(name="local/gemma3-270m"), "died (killed by SIGILL)")
    >>> line.startswith("model check failed for local/gemma3-270m: died (killed by SIGILL).")
    True
    >>> "compiled for another CPU" in line
    True
    """
    if "SIGILL" in error:
        advice = (
            "llama-cpp-python was compiled for another CPU; rebuild it for this one: "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install --force-reinstall '
            "--no-cache-dir --no-deps llama-cpp-python"
        )
    elif "killed by" in error or "died" in error:
        advice = (
            "The local model process crashed; run `flywheel doctor` and attach its output to a "
            "bug report, or choose another model with FLYWHEEL_MODEL"
        )
    elif "NotFoundError" in error:
        advice = "Check [model] name in flywheel.toml or FLYWHEEL_MODEL"
    elif "AuthenticationError" in error or " 401" in error or " 403" in error:
        advice = (
            "Set the provider's API key (e.g. OPENAI_API_KEY) or choose another model "
            "with FLYWHEEL_MODEL"
        )
    elif "timeout" in error.lower() or "hung" in error:
        advice = (
            f"The model gave no answer in time; check it is reachable, or raise "
            f"[model] timeout_s ({model.timeout_s:g}) / stall_s ({model.stall_s:g})"
        )
    else:
        advice = "Check [model] in flywheel.toml and FLYWHEEL_MODEL; `flywheel doctor` tells more"
    return f"model check failed for {model.name}: {error}. {advice}."


def cpu() -> dict[str, Any]:
    """The CPU's model name, the machine type and Python's version."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "machine": platform.machine(), "python": platform.python_version()}


async def diagnose(model: ModelConfig, *, max_tokens: int = 48) -> dict[str, Any]:
    """What the model runs on and how fast: CPU, build, load parameters, TTFT, tokens/s."""
    report: dict[str, Any] = {"model": model.name, **cpu()}
    if model.name.startswith("local/"):
        from chatbot.llm.local import configure, model_info

        configure(context_tokens=model.context_tokens, stall_s=model.stall_s)
        started = time.perf_counter()
        report["local"] = await model_info(model.name.split("/", 1)[1])
        report["local"]["load_s"] = round(time.perf_counter() - started, 2)
    await self_test(model)  # warm: the figures below are for a loaded model
    bench = model.model_copy(update={"max_tokens": max_tokens, "temperature": 0.0, "retries": 2})
    reply = await stream_reply(_BENCH, model=bench)
    report["error"] = reply.error
    if reply.error is None and reply.ttft_ms is not None and reply.completion_tokens:
        generating_s = (reply.latency_ms - reply.ttft_ms) / 1000
        report["ttft_ms"] = round(reply.ttft_ms, 1)
        report["completion_tokens"] = reply.completion_tokens
        report["tokens_per_s"] = (
            round((reply.completion_tokens - 1) / generating_s, 1) if generating_s > 0 else None
        )
    return report
