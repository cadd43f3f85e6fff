"""Fine-tuning through litellm's files and fine-tuning API (OpenAI, Azure, Vertex AI).

The optimizer's fine-tuning loop (:mod:`optimizer.finetune`) is handed this
provider; it uploads exactly the file it is given and reports job states in
OpenAI's words. ``api_base`` must be one of ``model.allowed_api_bases`` (the
CLI checks it through the configuration); the key comes from the provider's
usual environment variable (``OPENAI_API_KEY`` …) unless given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimizer.finetune import JobState

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map

__all__ = ["PROVIDERS", "LiteLLMFineTuneProvider"]

#: Providers litellm's fine-tuning API supports.
PROVIDERS = ("openai", "azure", "vertex_ai")


class LiteLLMFineTuneProvider:
    """:class:`optimizer.finetune.FineTuneProvider` on litellm.

    >>> LiteLLMFineTuneProvider("openai", api_base="http://127.0.0.1:9/v1").name
    'openai'
    """

    def __init__(
        self,
        name: str = "openai",
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if name not in PROVIDERS:
            raise ValueError(f"provider must be one of {list(PROVIDERS)}, got {name!r}")
        self.name = name
        self.api_base = api_base
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _common(self) -> dict[str, Any]:
        out: dict[str, Any] = {"custom_llm_provider": self.name, "timeout": self.timeout_s}
        if self.api_base:
            out["api_base"] = self.api_base
        if self.api_key:
            out["api_key"] = self.api_key
        return out

    def upload(self, path: Path) -> str:
        import litellm

        with Path(path).open("rb") as fh:
            created = litellm.create_file(file=fh, purpose="fine-tune", **self._common())
        return str(created.id)

    def create_job(self, *, training_file: str, base_model: str, suffix: str, epochs: int) -> str:
        import litellm

        job = litellm.create_fine_tuning_job(
            model=base_model,
            training_file=training_file,
            hyperparameters={"n_epochs": epochs},
            suffix=suffix,
            **self._common(),
        )
        return str(job.id)

    def retrieve(self, job_id: str) -> JobState:
        import litellm

        job = litellm.retrieve_fine_tuning_job(fine_tuning_job_id=job_id, **self._common())
        error = getattr(job, "error", None)
        message = None
        if error:
            message = getattr(error, "message", None) or (
                error.get("message") if isinstance(error, dict) else str(error)
            )
        return JobState(
            status=str(job.status),
            fine_tuned_model=getattr(job, "fine_tuned_model", None),
            error=message,
            trained_tokens=getattr(job, "trained_tokens", None),
        )
