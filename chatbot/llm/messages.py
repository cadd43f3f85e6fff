"""Turn a variant, knowledge, few-shot examples and history into model input.

Two shapes of the same conversation:

- :func:`build_messages` gives OpenAI-style chat messages for litellm (any
  provider), fitted to a token budget.
- :func:`render_transcript` flattens those messages into the plain-text
  transcript a *base* model continues (the local Gemma 3 270M has no chat
  template worth using), ending with ``"Answer:"``; :data:`STOP` ends the
  reply after one turn.

Token counts are estimated, not tokenised: ``ceil(chars / 3.5)`` plus
:data:`MESSAGE_OVERHEAD_TOKENS` per message. The demo prompts run at 3.9–4.9
characters per Gemma token (the knowledge file: 4.0), so the estimate errs on
the large side for English support text (a test pins this); it costs nothing
and needs no tokenizer for remote models. Text dense in digits or non-Latin
scripts can run below 3.5 characters per token: the local provider then still
counts exactly and fails cleanly if the prompt outgrows the context.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from optimizer.config import ModelConfig
from optimizer.prompt_library import Example, Variant

log = logging.getLogger(__name__)

__all__ = [
    "ASSISTANT_LABEL",
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD_TOKENS",
    "STOP",
    "USER_LABEL",
    "build_messages",
    "estimate_tokens",
    "prompt_budget",
    "render_transcript",
]

#: Characters per token of the estimate (conservative for English; see the module docstring).
CHARS_PER_TOKEN = 3.5
#: Tokens counted per message for role labels and separators.
MESSAGE_OVERHEAD_TOKENS = 4
#: Labels of the user's and the assistant's lines in a base-model transcript.
USER_LABEL = "Question"
ASSISTANT_LABEL = "Answer"
#: Stop sequences that end a base model's reply after one answer: the next
#: turn's label, a blank line (one paragraph per answer: the 270M model
#: rambles after it), and the start of a Markdown list or heading (it likes to
#: copy the knowledge's bullet list instead of answering).
STOP = (f"\n{USER_LABEL}:", f"\n{ASSISTANT_LABEL}:", "\n\n", "\n- ", "\n#")

_TRUNCATED = "\n…"
_ROLE_LABELS = {"user": USER_LABEL, "assistant": ASSISTANT_LABEL}


def estimate_tokens(text: str) -> int:
    """Cheap, conservative token estimate of ``text``.

    >>> estimate_tokens("How do I reset my password?")
    8
    >>> estimate_tokens("")
    0
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _cost(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(
        estimate_tokens(str(m.get("content") or "")) + MESSAGE_OVERHEAD_TOKENS for m in messages
    )


def prompt_budget(model: ModelConfig) -> int:
    """Tokens left for the prompt once the reply's ``max_tokens`` are reserved.

    >>> prompt_budget(ModelConfig(context_tokens=2048, max_tokens=160))
    1888
    """
    return max(model.context_tokens - model.max_tokens, 0)


def _system_text(variant: Variant, knowledge: str) -> str:
    knowledge = knowledge.strip()
    return f"{variant.template.strip()}\n\n{knowledge}" if knowledge else variant.template.strip()


def _drop_oldest_turn(history: list[dict[str, Any]]) -> None:
    """Drop the oldest message, and the assistant replies that answered it."""
    history.pop(0)
    while history and history[0].get("role") == "assistant":
        history.pop(0)


def build_messages(
    variant: Variant,
    knowledge: str,
    examples: Sequence[Example],
    history: Sequence[Mapping[str, Any]],
    user_message: str,
    *,
    budget_tokens: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Chat messages for one reply, fitted to ``budget_tokens`` (estimated).

    Order: a system message (the variant's text, then the knowledge), the
    examples as user/assistant pairs, the history (OpenAI-style dicts with
    ``role`` and ``content``; system messages in it are ignored), then the
    user's message. To fit the budget it drops examples from the end first,
    then the oldest history turns, then cuts the knowledge's tail; the user's
    message is never cut, even when it alone exceeds the budget (the model
    then fails with a clear error rather than answering a different question).

    Returns the messages and the ids of the examples kept, in order.

    >>> v = Variant("v", "d", "Be brief.", "h", "v.md")
    >>> ex = [Example("a", "Hi?", "Hello.", "a.md"), Example("b", "Bye?", "Bye.", "b.md")]
    >>> msgs, kept = build_messages(v, "Facts.", ex, [], "Help?", budget_tokens=1000)
    >>> [m["role"] for m in msgs], kept
    (['system', 'user', 'assistant', 'user', 'assistant', 'user'], ['a', 'b'])
    >>> build_messages(v, "Facts.", ex, [], "Help?", budget_tokens=30)[1]
    ['a']
    """
    if budget_tokens < 0:
        raise ValueError(f"budget_tokens must be >= 0, got {budget_tokens}")
    kept = list(examples)
    turns = [
        {"role": m["role"], "content": str(m.get("content") or "")}
        for m in history
        if m.get("role") in _ROLE_LABELS
    ]
    while turns and turns[0]["role"] == "assistant":  # a transcript starts with the user
        turns.pop(0)
    user = {"role": "user", "content": user_message}

    def assemble(system: str) -> list[dict[str, Any]]:
        shots: list[dict[str, Any]] = []
        for ex in kept:
            shots += [
                {"role": "user", "content": ex.user},
                {"role": "assistant", "content": ex.assistant},
            ]
        return [{"role": "system", "content": system}, *shots, *turns, user]

    system = _system_text(variant, knowledge)
    messages = assemble(system)
    while _cost(messages) > budget_tokens and kept:
        kept.pop()
        messages = assemble(system)
    while _cost(messages) > budget_tokens and turns:
        _drop_oldest_turn(turns)
        messages = assemble(system)
    if _cost(messages) > budget_tokens and knowledge.strip():
        spare = budget_tokens - _cost(assemble(_system_text(variant, "")))
        chars = int((spare - estimate_tokens(_TRUNCATED) - 1) * CHARS_PER_TOKEN)
        cut = knowledge.strip()[: max(chars, 0)].rstrip()
        system = _system_text(variant, cut + _TRUNCATED) if cut else _system_text(variant, "")
        messages = assemble(system)
        log.warning("prompt over budget: knowledge cut to %d characters", len(cut))
    if _cost(messages) > budget_tokens:
        log.warning(
            "prompt over budget even without examples, history and knowledge: "
            "%d estimated tokens > budget %d (user message kept whole)",
            _cost(messages),
            budget_tokens,
        )
    if len(kept) < len(examples):
        log.info("prompt budget: kept %d of %d examples", len(kept), len(examples))
    return messages, [ex.id for ex in kept]


def render_transcript(messages: Sequence[Mapping[str, Any]]) -> str:
    """Flatten chat messages into the transcript a base model continues.

    System messages come first as plain text; then each user message becomes a
    ``Question: …`` line and each assistant message an ``Answer: …`` line, one
    exchange per paragraph; the transcript ends with ``Answer:`` for the model
    to continue. Question/Answer labels kept the 270M base model on the facts
    more often than User/Assistant or Gemma's chat-template tokens (tried on the
    demo knowledge). Messages are collapsed to one paragraph each, matching
    :data:`STOP`, which ends the reply at its first blank line.

    >>> print(render_transcript([
    ...     {"role": "system", "content": "Be brief."},
    ...     {"role": "user", "content": "Hi?"},
    ...     {"role": "assistant", "content": "Hello."},
    ...     {"role": "user", "content": "Bye?"},
    ... ]))
    Be brief.
    <BLANKLINE>
    Question: Hi?
    Answer: Hello.
    <BLANKLINE>
    Question: Bye?
    Answer:
    """
    paragraphs = [
        str(m.get("content") or "").strip() for m in messages if m.get("role") == "system"
    ]
    exchange: list[str] = []  # the lines of one question and its answer
    for m in messages:
        label = _ROLE_LABELS.get(str(m.get("role")))
        if label is None:
            continue
        text = str(m.get("content") or "")
        if label == USER_LABEL:
            if exchange:
                paragraphs.append("\n".join(exchange))
            exchange = [f"{label}: {' '.join(text.split())}"]
        else:
            exchange.append(f"{label}: {_one_paragraph(text)}")
    paragraphs.append("\n".join([*exchange, f"{ASSISTANT_LABEL}:"]))
    return "\n\n".join(p for p in paragraphs if p)


def _one_paragraph(text: str) -> str:
    """Blank lines would end the reply early in a few-shot answer: keep single newlines only."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)
