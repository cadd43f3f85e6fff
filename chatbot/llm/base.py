"""The base of our own litellm providers (``local/…``, ``fake/…``).

A provider streams :func:`stream_chunk` pieces; :class:`StreamingProvider` makes
the non-streaming calls collect that stream, so every path runs the same code.
The providers depend on this module, never on :mod:`chatbot.llm.streaming`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk, ModelResponse

__all__ = ["StreamingProvider", "stream_chunk", "timeout_seconds"]


def stream_chunk(
    text: str, *, usage: Mapping[str, int] | None = None, finish: str = "stop"
) -> GenericStreamingChunk:
    """One streamed piece for litellm; with ``usage`` it is the last one (``finish`` reason)."""
    return {
        "text": text,
        "is_finished": usage is not None,
        "finish_reason": finish if usage is not None else "",
        "usage": cast(Any, dict(usage) if usage is not None else None),
        "index": 0,
        "tool_use": None,
    }


def timeout_seconds(timeout: Any) -> float | None:
    """The seconds in litellm's ``timeout`` argument (a number or an ``httpx.Timeout``)."""
    if isinstance(timeout, int | float):
        return float(timeout)
    read = getattr(timeout, "read", None)
    return float(read) if isinstance(read, int | float) else None


class StreamingProvider(CustomLLM):
    """A litellm custom provider: subclasses implement ``streaming`` and ``astreaming``
    (litellm types the latter as a coroutine but iterates it as an async generator).

    The non-streaming calls collect the stream, so every path runs the same code.
    litellm calls these methods with keyword arguments (``model`` without the
    provider prefix, ``messages``, ``optional_params``, ``timeout``, ``model_response``…).
    """

    def completion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        chunks = list(self.streaming(*args, **kwargs))
        return _collect(kwargs, chunks)

    async def acompletion(self, *args: Any, **kwargs: Any) -> ModelResponse:
        stream = cast(AsyncIterator[GenericStreamingChunk], self.astreaming(*args, **kwargs))
        chunks = [chunk async for chunk in stream]
        return _collect(kwargs, chunks)


def _collect(kwargs: Mapping[str, Any], chunks: list[GenericStreamingChunk]) -> ModelResponse:
    """Fill litellm's response object from the chunks, as built-in providers do."""
    response: ModelResponse = kwargs["model_response"]
    choice = cast(Any, response.choices[0])
    choice.message.content = "".join(c["text"] for c in chunks)
    choice.finish_reason = next((c["finish_reason"] for c in chunks if c["is_finished"]), "stop")
    response.model = str(kwargs["model"])
    usage = next((c["usage"] for c in chunks if c["usage"]), None)
    if usage is not None:
        response.usage = litellm.Usage(  # type: ignore[attr-defined]
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            total_tokens=usage["total_tokens"],
        )
    return response
