"""A recording OpenAI-compatible endpoint on 127.0.0.1: files, fine-tuning jobs, chat.

Fakes the provider at the boundary (HTTP), so litellm and our code run for real.
It records every request (``requests``: method, path, body bytes), keeps uploaded
files, plays a scripted life for each fine-tuning job (``script``: one status per
poll, the last one stays) and answers chat completions, streamed (SSE) or not,
with ``reply`` and the requested model name echoed.
"""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FT_MODEL", "Recorder"]

FT_MODEL = "ft:gpt-4o-mini-2024-07-18:flywheel::abc123"


class Recorder(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint that records requests and scripts job states."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        #: statuses a new job goes through, one per poll; the last one stays
        self.script: list[str] = ["running", "succeeded"]
        self.fail_create = False
        self.reply = "Tuned hello."
        #: what a succeeded job reports as ``trained_tokens`` (the bill)
        self.trained_tokens = 1234

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def paths(self) -> list[str]:
        return [f"{r['method']} {r['path']}" for r in self.requests]


def _job_body(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "model": job["model"],
        "created_at": 1_767_600_000,
        "finished_at": None,
        "fine_tuned_model": FT_MODEL if job["status"] == "succeeded" else None,
        "organization_id": "org-test",
        "result_files": [],
        "status": job["status"],
        "validation_file": None,
        "training_file": job["training_file"],
        "hyperparameters": job["hyperparameters"],
        "method": job["method"],
        "trained_tokens": job["trained_tokens"] if job["status"] == "succeeded" else None,
        "error": (
            {"code": "invalid_training_file", "message": "too few examples", "param": None}
            if job["status"] == "failed"
            else None
        ),
        "seed": 1,
    }


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        srv = self.server
        srv.requests.append(
            {"method": "POST", "path": self.path, "body": body, "headers": dict(self.headers)}
        )
        if self.path.endswith("/files"):
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            message = BytesParser(policy=HTTP).parsebytes(head + body)
            content, purpose, name = b"", None, None
            for part in message.iter_parts():
                field = part.get_param("name", header="content-disposition")
                if field == "file":
                    content = bytes(part.get_payload(decode=True) or b"")
                    name = part.get_filename()
                elif field == "purpose":
                    purpose = bytes(part.get_payload(decode=True) or b"").decode()
            file_id = f"file-{len(srv.files) + 1}"
            srv.files[file_id] = content
            self._send(
                200,
                {
                    "id": file_id,
                    "object": "file",
                    "bytes": len(content),
                    "created_at": 1_767_600_000,
                    "filename": name or "upload.jsonl",
                    "purpose": purpose or "fine-tune",
                    "status": "processed",
                },
            )
        elif self.path.endswith("/fine_tuning/jobs"):
            data = json.loads(body)
            if srv.fail_create or data.get("training_file") not in srv.files:
                self._send(400, {"error": {"message": "invalid training file", "type": "x"}})
                return
            job = {
                "id": f"ftjob-{len(srv.jobs) + 1}",
                "model": data["model"],
                "training_file": data["training_file"],
                "hyperparameters": data.get("hyperparameters") or {},
                "method": data.get("method")
                or {"type": "supervised", "supervised": {"hyperparameters": {}}},
                "suffix": data.get("suffix"),
                "trained_tokens": srv.trained_tokens,
                "status": "validating_files",
                "script": list(srv.script),
            }
            srv.jobs[job["id"]] = job
            self._send(200, _job_body(job))
        elif self.path.endswith("/chat/completions"):
            self._chat(json.loads(body))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def _chat(self, data: dict[str, Any]) -> None:
        model, reply = data["model"], self.server.reply
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        if not data.get("stream"):
            self._send(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1_767_600_000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": reply},
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
            body = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1_767_600_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(body)}\n\n".encode()

        words = reply.split(" ")
        for i, word in enumerate(words):
            self.wfile.write(chunk({"content": word if i == 0 else " " + word}, None))
        self.wfile.write(chunk({}, "stop", usage=usage))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append({"method": "GET", "path": self.path, "body": b""})
        job_id = self.path.rstrip("/").rsplit("/", 1)[-1]
        job = srv.jobs.get(job_id)
        if job is None:
            self._send(404, {"error": {"message": "no such job"}})
            return
        if job["script"]:
            job["status"] = job["script"].pop(0) if len(job["script"]) > 1 else job["script"][0]
        self._send(200, _job_body(job))
