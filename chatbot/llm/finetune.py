"""Fine-tuning through litellm's files and fine-tuning API (OpenAI, Azure, Vertex AI).

The optimizer's fine-tuning loop (:mod:`optimizer.finetune`) is handed this
provider; it uploads exactly the file it is given and reports job states in
OpenAI's words. ``api_base`` must be one of ``model.allowed_api_bases`` (the
CLI checks it through the configuration); the key comes from the provider's
usual environment variable (``OPENAI_API_KEY`` …) unless given.

Preference (DPO) jobs: litellm 1.110's ``create_fine_tuning_job`` builds the
request body from a fixed model (model, training_file, hyperparameters, suffix,
validation_file, integrations, seed) and, for OpenAI, drops ``extra_body``, so
it cannot send OpenAI's ``method`` field. That one request goes to OpenAI's
documented ``POST {api_base}/fine_tuning/jobs`` directly (httpx, same key, same
base, same timeout); the upload and the polling stay on litellm. The upstream
fix: a ``method: dict | None`` field on ``FineTuningJobCreate`` passed through
``create_fine_tuning_job`` / ``_build_fine_tuning_job_data`` (and ``extra_body``
forwarded to ``client.fine_tuning.jobs.create`` for OpenAI as it is for Azure);
then :meth:`LiteLLMFineTuneProvider.create_job` can call litellm for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimizer.config import Config
from optimizer.finetune import FineTuneHooks, JobState

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map

__all__ = ["PROVIDERS", "LiteLLMFineTuneProvider", "make_hooks"]

#: Providers litellm's fine-tuning API supports.
PROVIDERS = ("openai", "azure", "vertex_ai")

#: Training-set formats each provider takes here (DPO: OpenAI's ``method`` API only).
FORMATS = {
    "openai": frozenset({"openai-sft", "dpo"}),
    "azure": frozenset({"openai-sft"}),
    "vertex_ai": frozenset({"openai-sft"}),
}

#: Where OpenAI's API lives when neither ``api_base`` nor the environment says.
OPENAI_API_BASE = "https://api.openai.com/v1"


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
        self.formats = FORMATS[name]
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

    def create_job(
        self,
        *,
        training_file: str,
        base_model: str,
        suffix: str,
        epochs: int,
        fmt: str = "openai-sft",
        dpo_beta: float | None = None,
    ) -> str:
        if fmt not in self.formats:
            raise ValueError(
                f"provider {self.name!r} takes formats {sorted(self.formats)}, got {fmt!r}"
            )
        if fmt == "dpo":
            return self._create_dpo_job(training_file, base_model, suffix, epochs, dpo_beta)
        import litellm

        job = litellm.create_fine_tuning_job(
            model=base_model,
            training_file=training_file,
            hyperparameters={"n_epochs": epochs},
            suffix=suffix,
            **self._common(),
        )
        return str(job.id)

    def _create_dpo_job(
        self,
        training_file: str,
        base_model: str,
        suffix: str,
        epochs: int,
        dpo_beta: float | None,
    ) -> str:
        """OpenAI's preference fine-tuning job (see the module docstring for why not litellm)."""
        import httpx

        hyperparameters: dict[str, Any] = {"n_epochs": epochs}
        if dpo_beta is not None:
            hyperparameters["beta"] = dpo_beta
        body = {
            "model": base_model.removeprefix("openai/"),
            "training_file": training_file,
            "suffix": suffix,
            "method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}},
        }
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("no API key: set OPENAI_API_KEY (or pass api_key)")
        headers = {"Authorization": f"Bearer {key}"}
        if os.environ.get("OPENAI_ORGANIZATION"):
            headers["OpenAI-Organization"] = os.environ["OPENAI_ORGANIZATION"]
        base = (
            self.api_base
            or os.environ.get("OPENAI_BASE_URL")
            or os.environ.get("OPENAI_API_BASE")
            or OPENAI_API_BASE
        )
        url = f"{base.rstrip('/')}/fine_tuning/jobs"
        response = httpx.post(url, json=body, headers=headers, timeout=self.timeout_s)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise RuntimeError(f"{response.status_code} from {url}: {message}")
        return str(response.json()["id"])

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


def make_hooks(config: Config) -> FineTuneHooks:
    """The server's link to fine-tuning: ``finetune.provider`` at ``finetune.api_base``.

    Handed to the optimizer job, which follows running jobs and retrains on
    schedule (:func:`optimizer.finetune.finetune_step`); building it talks to no one.
    """
    ft = config.finetune
    return FineTuneHooks(
        LiteLLMFineTuneProvider(ft.provider, api_base=ft.api_base), Path(ft.out_dir)
    )
