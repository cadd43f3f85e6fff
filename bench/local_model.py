"""Time to first token and tokens/s of the local model, what our path adds, and restarts.

Both sides run the same prompt (the demo ``concise`` variant, the knowledge and
a support question, rendered as the base-model transcript) with the same
settings (greedy, the same stop sequences, ``--max-tokens``), interleaved run
by run so a busy machine slows both alike:

- **baseline**: llama-cpp-python called directly in this process,
  ``Llama.create_completion(stream=True)`` on a model loaded with the same
  options as ours (:func:`chatbot.llm.local_worker.load_llama`: without extra
  buffer types, which crash on AMX machines);
- **ours**: :func:`chatbot.llm.streaming.stream_reply`, i.e. litellm → the ``local/``
  provider → the supervisor thread → a pipe → the model process → back.

Two prompt states: **cold** (an unrelated prompt ran just before, so the whole
prompt is evaluated) and **warm** (another question with the same system prompt
and knowledge ran just before, which llama.cpp reuses: the common case in the
chat). Figures are medians over ``--runs``; ratios are ours / baseline (ttft:
> 1 is slower; tokens/s: < 1 is slower). tokens/s counts the tokens after the
first over the time after the first, both counted with the model's tokenizer.

**Restart**: the model process is killed (``SIGKILL``) while idle; the time until
the supervisor has a new process with the model loaded, and the first token of
the next reply after that, medians over ``--runs``.

Both sides use ``OMP_WAIT_POLICY`` from the environment (the model process
defaults it to ``PASSIVE``; set it to ``ACTIVE`` to measure spinning threads).

Usage::

    python bench/local_model.py [--runs 3] [--max-tokens 48] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the model process has it: same for both

from chatbot.doctor import cpu as doctor_cpu  # noqa: E402
from chatbot.llm import local as local_model  # noqa: E402
from chatbot.llm.local_worker import load_llama  # noqa: E402
from chatbot.llm.messages import STOP, build_messages, prompt_budget, render_transcript  # noqa: E402
from chatbot.llm.streaming import stream_reply  # noqa: E402
from optimizer.config import ModelConfig  # noqa: E402
from optimizer.prompt_library import load_prompts  # noqa: E402

MODEL_ID = "gemma3-270m"
QUESTIONS = [
    "How do I reset my password?",
    "How much does the Team plan cost?",
    "Can I get a refund?",
    "How do I export my data?",
]

Run = dict[str, float]


def messages_for(question: str, model: ModelConfig) -> list[dict[str, Any]]:
    library = load_prompts(ROOT / "prompts")
    messages, _ = build_messages(
        library.variant("concise"),
        library.knowledge,
        [],
        [],
        question,
        budget_tokens=prompt_budget(model),
    )
    return messages


def summarise(llama: Any, started: float, first: float | None, end: float, text: str) -> Run:
    tokens = len(llama.tokenize(text.encode("utf-8"), add_bos=False)) if text else 0
    if first is None:
        return {"ttft_ms": float("nan"), "tok_s": float("nan"), "tokens": 0}
    decode = end - first
    return {
        "ttft_ms": (first - started) * 1000,
        "tok_s": (tokens - 1) / decode if tokens > 1 and decode > 0 else float("nan"),
        "tokens": tokens,
    }


def run_direct(llama: Any, messages: list[dict[str, Any]], model: ModelConfig) -> Run:
    """The baseline: llama-cpp-python's own streaming, no litellm, no threads."""
    prompt = llama.tokenize(render_transcript(messages).encode("utf-8"), add_bos=True)
    started = time.perf_counter()
    first, text = None, ""
    for chunk in llama.create_completion(
        prompt,
        max_tokens=model.max_tokens,
        temperature=model.temperature,
        stop=list(STOP),
        stream=True,
    ):
        piece = chunk["choices"][0]["text"]
        if piece.strip() and first is None:
            first = time.perf_counter()
        text += piece
    return summarise(llama, started, first, time.perf_counter(), text.strip())


def run_ours(llama: Any, messages: list[dict[str, Any]], model: ModelConfig) -> Run:
    """stream_reply through litellm and the local provider."""
    first: float | None = None

    async def on_token(text: str) -> None:
        nonlocal first
        if first is None:
            first = time.perf_counter()

    async def go() -> tuple[float, str]:
        started = time.perf_counter()
        completion = await stream_reply(messages, model=model, on_token=on_token)
        if completion.error:
            raise SystemExit(f"local model failed: {completion.error}")
        return started, completion.text

    started, text = asyncio.run(go())
    return summarise(llama, started, first, time.perf_counter(), text)


def median(runs: list[Run], key: str) -> float:
    return statistics.median(r[key] for r in runs)


UNRELATED = [{"role": "user", "content": "Name a colour."}]


def measure(
    llama: Any, model: ModelConfig, runs: int, *, warm: bool
) -> dict[str, dict[str, float]]:
    results: dict[str, list[Run]] = {"baseline": [], "ours": []}
    sides: list[tuple[str, Callable[[Any, list[dict[str, Any]], ModelConfig], Run]]] = [
        ("baseline", run_direct),
        ("ours", run_ours),
    ]
    prime = model.model_copy(update={"max_tokens": 1})
    for i in range(runs):
        for side, run in sides if i % 2 == 0 else sides[::-1]:
            question = QUESTIONS[i % len(QUESTIONS)]
            messages = messages_for(question, model)
            # What ran just before decides what llama.cpp can reuse from its cache.
            before = messages_for(QUESTIONS[(i + 1) % len(QUESTIONS)], model) if warm else UNRELATED
            run(llama, before, prime)
            results[side].append(run(llama, messages, model))
    return {
        side: {key: median(rs, key) for key in ("ttft_ms", "tok_s", "tokens")}
        for side, rs in results.items()
    }


def measure_restarts(llama: Any, model: ModelConfig, runs: int) -> dict[str, float]:
    """Kill the idle model process; time to a new one with the model loaded, and its first token."""
    process = local_model.model_process()
    restart_s, ttft_ms = [], []
    for i in range(runs):
        dead = process.pid
        assert dead is not None
        killed = time.perf_counter()
        os.kill(dead, signal.SIGKILL)
        while not (process.state == "ready" and process.pid not in (None, dead)):
            time.sleep(0.005)
        restart_s.append(time.perf_counter() - killed)
        ttft_ms.append(
            run_ours(llama, messages_for(QUESTIONS[i % len(QUESTIONS)], model), model)["ttft_ms"]
        )
    return {
        "restart_s": statistics.median(restart_s),
        "first_ttft_ms": statistics.median(ttft_ms),
        "backoff_s": local_model.RESTART_BACKOFF_S[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per side and state (median)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    model = ModelConfig(
        name=f"local/{MODEL_ID}", max_tokens=args.max_tokens, temperature=0.0, timeout_s=600
    )
    local_model.configure(context_tokens=model.context_tokens, stall_s=model.stall_s)
    started = time.perf_counter()
    llama = load_llama(MODEL_ID, n_ctx=model.context_tokens)  # the baseline's own model
    load_s = time.perf_counter() - started
    info = asyncio.run(local_model.model_info(MODEL_ID))  # ours: the model process loads it
    # litellm imports lazily on its first call: keep that out of the first measured run.
    run_ours(llama, messages_for(QUESTIONS[0], model), model.model_copy(update={"max_tokens": 1}))
    prompt_tokens = len(
        llama.tokenize(render_transcript(messages_for(QUESTIONS[0], model)).encode(), add_bos=True)
    )
    report: dict[str, Any] = {
        "model": model.name,
        "load_s": round(load_s, 2),
        "prompt_tokens": prompt_tokens,
        "runs": args.runs,
        "cpu_load_1min": round(os.getloadavg()[0], 2),
        "cpu": doctor_cpu()["cpu"],
        "cpu_flags": info["cpu_flags"],
        "build": info["build"],
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
    }
    for state in ("cold", "warm"):
        figures = measure(llama, model, args.runs, warm=state == "warm")
        base, ours = figures["baseline"], figures["ours"]
        report[state] = {
            **{f"{side}_{k}": round(v, 1) for side, f in figures.items() for k, v in f.items()},
            "ttft_ratio": round(ours["ttft_ms"] / base["ttft_ms"], 3),
            "tok_s_ratio": round(ours["tok_s"] / base["tok_s"], 3),
        }
    report["restart"] = {
        k: round(v, 3) for k, v in measure_restarts(llama, model, args.runs).items()
    }
    report["cpu_load_1min_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    flags = ", ".join(report["cpu_flags"])
    print(f"{report['cpu']} ({flags}); OMP_WAIT_POLICY={report['omp_wait_policy']}")
    print(f"llama.cpp build: {report['build']}")
    print(
        f"{report['model']}: loaded in {report['load_s']} s; prompt {prompt_tokens} tokens; "
        f"median of {args.runs} runs; 1-min load average {report['cpu_load_1min']}"
        f"-{report['cpu_load_1min_end']}"
    )
    print(f"{'':6} {'':9} {'ttft ms':>9} {'tok/s':>7} {'tokens':>7}")
    for state in ("cold", "warm"):
        r = report[state]
        for side in ("baseline", "ours"):
            print(
                f"{state:6} {side:9} {r[f'{side}_ttft_ms']:9.0f} {r[f'{side}_tok_s']:7.1f} "
                f"{r[f'{side}_tokens']:7.0f}"
            )
        print(
            f"{state:6} {'ratio':9} {r['ttft_ratio']:9.2f} {r['tok_s_ratio']:7.2f}"
            "   (ours / baseline)"
        )
    r = report["restart"]
    print(
        f"restart after kill -9: {r['restart_s']:.2f} s to a loaded model "
        f"(backoff {r['backoff_s']:g} s included); first token after it {r['first_ttft_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
