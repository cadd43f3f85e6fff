"""What the serving process hands the proposer: a completion function and an idle check.

The optimizer never imports the chat code or a litellm provider (the serving
process owns the model, its worker and its queue). It receives a
:class:`ProposerHooks`: ``complete`` runs one chat completion on a named model
and reports its text, latency and cost; ``idle`` says whether the model has no
chat turn waiting, so that proposals and replays on the local model never queue
ahead of users.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Completion", "CompletionFn", "ProposerHooks", "always_idle"]


@dataclass(frozen=True)
class Completion:
    """One completion's reply; ``error`` set (and ``text`` empty) when it failed."""

    text: str
    latency_ms: float
    cost_usd: float = 0.0
    error: str | None = None


class CompletionFn(Protocol):
    """``complete(messages, model=..., max_tokens=..., temperature=...) -> Completion``.

    ``messages`` are OpenAI-style ``{"role", "content"}`` dicts. It must not raise for
    a model failure: it returns a :class:`Completion` with ``error`` set.
    """

    def __call__(
        self,
        messages: Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int,
        temperature: float,
    ) -> Completion: ...


def always_idle() -> bool:
    """The idle check of a paid provider: there is no local queue to protect."""
    return True


@dataclass(frozen=True)
class ProposerHooks:
    """The proposer's link to a model: see the module docstring.

    ``count_tokens`` (optional) measures a text in the proposer model's tokens; by
    default a text counts one token per four characters, rounded up.
    """

    complete: CompletionFn
    idle: Callable[[], bool] = always_idle
    count_tokens: Callable[[str], int] | None = None
    #: Called after each of the proposer's own LLM calls (name, data), e.g. to trace it in
    #: Langfuse; a failure here is logged and ignored.
    trace: Callable[[str, dict[str, object]], None] | None = field(default=None)
    #: ``reply(system_prompt, question)``: one reply as the chat serves it (knowledge
    #: appended, the chat model and its settings), for the replay gate. None: ``complete``
    #: with the prompt as the system message on ``model.name``.
    reply: Callable[[str, str], Completion] | None = None

    def tokens(self, text: str) -> int:
        """Tokens of ``text`` for the context budget."""
        if self.count_tokens is not None:
            return int(self.count_tokens(text))
        return -(-len(text) // 4)
