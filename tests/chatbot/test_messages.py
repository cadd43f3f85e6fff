"""build_messages budgets and the base-model transcript."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatbot.llm.messages import (
    STOP,
    build_messages,
    estimate_tokens,
    prompt_budget,
    render_transcript,
)
from optimizer.config import ModelConfig
from optimizer.prompt_library import Example, Variant, load_prompts

ROOT = Path(__file__).resolve().parents[2]
VARIANT = Variant("v", "test", "You are the support assistant.", "hash", "v.md")
KNOWLEDGE = "Password reset: click 'Forgot password' on the sign-in page. " * 5
EXAMPLES = [
    Example(f"ex{i}", f"Question number {i}?", f"Answer number {i}, with some detail.", "x.md")
    for i in range(3)
]
HISTORY = [
    {"role": "user", "content": "First question from earlier?"},
    {"role": "assistant", "content": "First answer from earlier."},
    {"role": "user", "content": "Second question from earlier?"},
    {"role": "assistant", "content": "Second answer from earlier."},
]


def cost(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + 4 for m in messages)


def full_cost() -> int:
    messages, _ = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, "Help?", budget_tokens=10**6
    )
    return cost(messages)


def test_everything_in_order_when_it_fits() -> None:
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, "How do I reset it?", budget_tokens=10_000
    )
    assert kept == ["ex0", "ex1", "ex2"]
    assert messages[0] == {
        "role": "system",
        "content": f"{VARIANT.template}\n\n{KNOWLEDGE.strip()}",
    }
    assert [m["content"] for m in messages[1:7]] == [
        text for ex in EXAMPLES for text in (ex.user, ex.assistant)
    ]
    assert messages[7:11] == HISTORY
    assert messages[-1] == {"role": "user", "content": "How do I reset it?"}


def test_examples_are_dropped_from_the_end_first() -> None:
    one_example = estimate_tokens(EXAMPLES[2].user) + estimate_tokens(EXAMPLES[2].assistant) + 8
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, "Help?", budget_tokens=full_cost() - 1
    )
    assert kept == ["ex0", "ex1"]
    assert messages[-5:-1] == HISTORY  # history untouched while examples can go
    assert cost(messages) <= full_cost() - 1 < cost(messages) + one_example


def test_oldest_history_goes_after_all_examples() -> None:
    no_examples, _ = build_messages(VARIANT, KNOWLEDGE, [], HISTORY, "Help?", budget_tokens=10**6)
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, "Help?", budget_tokens=cost(no_examples) - 1
    )
    assert kept == []
    assert messages[1:-1] == HISTORY[2:]  # the oldest exchange went, question and answer
    assert messages[-1]["content"] == "Help?"


def test_knowledge_is_cut_before_the_user_message() -> None:
    bare, _ = build_messages(VARIANT, "", [], [], "Help?", budget_tokens=10**6)
    budget = cost(bare) + 20
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, "Help?", budget_tokens=budget
    )
    system = messages[0]["content"]
    assert kept == [] and len(messages) == 2
    assert system.startswith(VARIANT.template) and system.endswith("…")
    assert KNOWLEDGE.strip()[:20] in system
    assert cost(messages) <= budget


def test_the_user_message_is_never_cut() -> None:
    long_message = "word " * 2000
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, EXAMPLES, HISTORY, long_message, budget_tokens=50
    )
    assert kept == []
    assert messages == [
        {"role": "system", "content": VARIANT.template},
        {"role": "user", "content": long_message},
    ]


def test_history_is_cleaned_for_a_transcript() -> None:
    history = [
        {"role": "assistant", "content": "Welcome!"},  # a greeting before any question
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]
    messages, _ = build_messages(VARIANT, "", [], history, "Bye?", budget_tokens=1000)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]


def test_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="budget_tokens must be >= 0, got -1"):
        build_messages(VARIANT, "", [], [], "Hi", budget_tokens=-1)


def test_prompt_budget_reserves_the_reply() -> None:
    assert prompt_budget(ModelConfig(context_tokens=2048, max_tokens=160)) == 1888
    assert prompt_budget(ModelConfig(context_tokens=256, max_tokens=4096)) == 0


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=400),
    n_examples=st.integers(min_value=0, max_value=3),
    n_history=st.sampled_from([0, 2, 4]),
    user=st.text(min_size=1, max_size=300),
)
def test_budget_invariants(budget: int, n_examples: int, n_history: int, user: str) -> None:
    examples = EXAMPLES[:n_examples]
    messages, kept = build_messages(
        VARIANT, KNOWLEDGE, examples, HISTORY[:n_history], user, budget_tokens=budget
    )
    assert messages[-1] == {"role": "user", "content": user}
    assert kept == [ex.id for ex in examples[: len(kept)]]  # a prefix, in order
    minimal = cost([{"content": VARIANT.template}, {"content": user}])
    if minimal <= budget:
        assert cost(messages) <= budget


def test_transcript_of_a_conversation() -> None:
    messages = [
        {"role": "system", "content": "Be brief.\n\nFacts."},
        {"role": "user", "content": "Hi,\n  there?"},
        {"role": "assistant", "content": "Hello.\n\n\nHow can I help?"},
        {"role": "user", "content": "Reset?"},
    ]
    assert render_transcript(messages) == (
        "Be brief.\n\nFacts.\n\n"
        "Question: Hi, there?\nAnswer: Hello.\nHow can I help?\n\n"
        "Question: Reset?\nAnswer:"
    )


def test_transcript_turns_cannot_contain_a_stop_sequence() -> None:
    messages = [
        {"role": "user", "content": "a\n\nQuestion: b"},
        {"role": "assistant", "content": "c\n\nd"},
        {"role": "user", "content": "e"},
    ]
    exchanges = render_transcript(messages).split("\n\n")
    assert exchanges == ["Question: a Question: b\nAnswer: c\nd", "Question: e\nAnswer:"]
    assert all("\n\n" not in x for x in exchanges)
    assert "\n\n" in STOP


def test_estimate_is_cheap_and_monotonic() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abc") == 1
    assert estimate_tokens("a" * 35) == 10
    assert estimate_tokens("a" * 36) == 11


def test_the_demo_prompts_fit_the_default_budget() -> None:
    library = load_prompts(ROOT / "prompts")
    budget = prompt_budget(ModelConfig())
    for variant in library.variants.values():
        examples = list(library.examples.values())
        _, kept = build_messages(
            variant,
            library.knowledge,
            examples,
            [],
            "How do I reset my password?",
            budget_tokens=budget,
        )
        assert kept == [ex.id for ex in examples]
