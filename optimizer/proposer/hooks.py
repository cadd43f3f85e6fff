"""What the serving process hands the proposer: a completion function and an idle check.

The optimizer never imports the chat code or a litellm provider (the serving
process owns the model, its worker and its queue). It receives a
:class:`ProposerHooks`: ``complete`` runs one chat completion on a named model
and reports its text, latency and cost; ``idle`` says whether the model has no
chat turn waiting, so that proposals and replays on the local model never queue
ahead of users. ``trace`` (optional) receives each round's own LLM calls,
candidates and verdicts (:class:`ProposerTrace`; Langfuse in the serving process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from optimizer.prompt_library import Example

__all__ = ["Completion", "CompletionFn", "ProposerHooks", "ProposerTrace", "always_idle"]


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


class ProposerTrace(Protocol):
    """Where a round is traced: one trace per round (``key``), opened, filled, closed.

    Every method must return at once and never raise for a tracing backend's
    trouble (the Langfuse implementation queues to a background thread). Texts
    arrive already scrubbed (:class:`optimizer.proposer.tracing.RoundTrace`).
    """

    def open_round(
        self, key: str, *, name: str, started_at: datetime, metadata: Mapping[str, Any]
    ) -> str | None:
        """Start the round's trace; returns its trace id (kept with the round) or None."""
        ...

    def generation(
        self,
        key: str,
        name: str,
        *,
        model: str,
        messages: Sequence[Mapping[str, str]],
        output: str,
        started_at: datetime,
        latency_ms: float,
        cost_usd: float,
        error: str | None,
        metadata: Mapping[str, Any],
    ) -> None:
        """One of the round's LLM calls."""
        ...

    def event(
        self,
        key: str,
        name: str,
        *,
        metadata: Mapping[str, Any],
        level: Literal["WARNING", "ERROR"] | None = None,
    ) -> None:
        """Something the round decided (a candidate and its gates)."""
        ...

    def score(
        self,
        key: str,
        name: str,
        value: float,
        *,
        data_type: Literal["NUMERIC", "BOOLEAN"] = "NUMERIC",
        comment: str | None = None,
        score_key: str = "",
    ) -> None:
        """A score on the round's trace; ``score_key`` makes its id unique within the round."""
        ...

    def close_round(self, key: str, *, output: Mapping[str, Any]) -> None:
        """End the round's trace with what it produced."""
        ...


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
    #: Receives each round's own LLM calls, candidates and verdicts (e.g. Langfuse);
    #: a failure there is logged and ignored.
    trace: ProposerTrace | None = field(default=None)
    #: ``reply(system_prompt, question, examples)``: one reply as the chat serves it
    #: (knowledge appended, the arm's few-shot examples as user/assistant turns, the chat
    #: model and its settings), for the replay gate. None: ``complete`` with the prompt as
    #: the system message, then the examples, on ``model.name``.
    reply: Callable[[str, str, Sequence[Example]], Completion] | None = None

    def tokens(self, text: str) -> int:
        """Tokens of ``text`` for the context budget."""
        if self.count_tokens is not None:
            return int(self.count_tokens(text))
        return -(-len(text) // 4)
