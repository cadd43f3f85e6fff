"""The rewrite request: a template from ``prompts/proposer/``, filled to fit the budget.

``rewrite.md`` holds ``$current_prompt``, ``$failures``, ``$candidate`` and
``$candidates``; the failures are added one by one, newest thumbs-down first,
while the whole request plus the reply's ``max_tokens`` fits the proposer
model's context. The reply is parsed as the new instructions, then
``RATIONALE:`` and the paragraph; a reply without a rationale gets one from a
second, shorter request (``rationale.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from string import Template

from optimizer.errors import ConfigError
from optimizer.proposer.sample import FailureTurn

__all__ = ["fill_to_budget", "parse_rewrite"]

_RATIONALE = re.compile(r"^\s*\**\s*RATIONALE\s*\**\s*:\s*", re.IGNORECASE | re.MULTILINE)
_LEADING_LABEL = re.compile(
    r"^\s*\**\s*(NEW\s+|IMPROVED\s+)?INSTRUCTIONS\s*\**\s*:\s*", re.IGNORECASE
)
_TRAILING = re.compile(
    r"\n\s*((FAILURES|CURRENT INSTRUCTIONS|INSTRUCTIONS)\s*:|Worked example|Now the real task).*",
    re.S | re.I,
)


def fill_to_budget(
    template: str,
    *,
    fields: dict[str, str],
    failures: Sequence[FailureTurn],
    budget_tokens: int,
    tokens: Callable[[str], int],
) -> tuple[str, int]:
    """The filled template with as many failures as fit; returns (text, failures used).

    Raises :class:`ConfigError` when even the template with no failures is over budget.

    >>> fill_to_budget("$current_prompt|$failures", fields={"current_prompt": "P"},
    ...     failures=[], budget_tokens=100, tokens=len)
    ('P|(none recorded)', 0)
    """
    tpl = Template(template)

    def render(lines: list[str]) -> str:
        return tpl.safe_substitute(fields, failures="\n".join(lines) or "(none recorded)")

    lines: list[str] = []
    text = render(lines)
    if tokens(text) > budget_tokens:
        raise ConfigError(
            f"the proposer's rewrite request needs {tokens(text)} tokens without any failure, "
            f"over its budget of {budget_tokens}: raise proposer.context_tokens or shorten "
            "the champion's prompt"
        )
    for failure in failures:
        trial = render([*lines, failure.render()])
        if tokens(trial) > budget_tokens:
            break
        lines.append(failure.render())
        text = trial
    return text, len(lines)


def parse_rewrite(reply: str) -> tuple[str, str]:
    """(new instructions, rationale) from a model's reply; either may be empty.

    >>> parse_rewrite("You answer in two sentences.\\nRATIONALE:\\nUsers found replies long.")
    ('You answer in two sentences.', 'Users found replies long.')
    """
    text = reply.strip()
    text = _LEADING_LABEL.sub("", text, count=1)
    match = _RATIONALE.search(text)
    if match:
        prompt, rationale = text[: match.start()], text[match.end() :]
    else:
        prompt, rationale = text, ""
    prompt = _TRAILING.sub("", prompt).strip().strip("<>").strip()
    rationale = _TRAILING.sub("", rationale)
    rationale = " ".join(rationale.split())
    return prompt, rationale
