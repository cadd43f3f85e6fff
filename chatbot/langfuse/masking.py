"""Masking of what people wrote before it leaves for Langfuse (``[langfuse] mask``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, cast

__all__ = ["default_mask", "mask_messages", "regex_scrub"]

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w+])\+?\d[\d ()./-]{7,}\d(?!\w)")


def regex_scrub(text: str) -> str:
    """Fallback masking of e-mail addresses and phone numbers.

    >>> regex_scrub("mail ana@example.com or call +1 415 555 0100")
    'mail <EMAIL> or call <PHONE>'
    """
    return _PHONE.sub("<PHONE>", _EMAIL.sub("<EMAIL>", text))


def default_mask() -> Callable[[str], str]:
    """The few-shot scrubber ``optimizer.privacy.scrub`` when present, else :func:`regex_scrub`."""
    try:
        from optimizer.privacy import scrub
    except ImportError:
        return regex_scrub
    return cast(Callable[[str], str], scrub)


def mask_messages(messages: list[dict[str, Any]], mask: Callable[[str], str]) -> list[Any]:
    """Mask what people wrote; the system message is our prompt and knowledge base."""
    return [m if m.get("role") == "system" else _mask_value(m, mask) for m in messages]


def _mask_value(value: Any, mask: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, Mapping):
        return {k: _mask_value(v, mask) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(v, mask) for v in value]
    return value
