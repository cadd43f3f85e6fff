"""The local llama.cpp provider: the packaged model, and one real-model run (slow)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import litellm
import pytest

from chatbot.llm import Completion, stream_reply, warm_up
from chatbot.local_model import configure, model_path
from chatbot.prompting import estimate_tokens
from optimizer.config import ModelConfig
from optimizer.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_gguf_is_found_without_network() -> None:
    path = model_path("gemma3-270m")
    assert path.suffix == ".gguf" and path.stat().st_size > 100_000_000


def test_unknown_local_models_are_rejected_by_name() -> None:
    with pytest.raises(litellm.NotFoundError, match="unknown local model 'nope'"):
        model_path("nope")


def test_context_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="context_tokens must be > 0, got 0"):
        configure(context_tokens=0)


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
