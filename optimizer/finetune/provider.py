"""What the fine-tuning loop needs from a provider, and nothing more.

The optimizer does not know providers (it never imports litellm's model code):
the process that runs ``flywheel finetune`` hands it a :class:`FineTuneProvider`
(``chatbot.llm.finetune.LiteLLMFineTuneProvider`` talks to any provider litellm's
files and fine-tuning API supports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["FINAL_STATES", "FineTuneProvider", "JobState"]

#: Provider job states after which nothing changes any more.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobState:
    """A provider's view of a job: ``status`` in OpenAI's words (validating_files, queued,
    running, succeeded, failed, cancelled); ``fine_tuned_model`` once it succeeded."""

    status: str
    fine_tuned_model: str | None = None
    error: str | None = None
    trained_tokens: int | None = None


class FineTuneProvider(Protocol):
    """Upload a training file, start a job, report on it. Errors raise any exception.

    ``formats`` are the training-set formats (``openai-sft``, ``dpo``) the
    provider can train on: :func:`optimizer.finetune.start_job` refuses the
    others before anything is uploaded.
    """

    name: str
    formats: frozenset[str]

    def upload(self, path: Path) -> str:
        """Upload ``path`` for fine-tuning; returns the provider's file id."""
        ...

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
        """Start a job on the uploaded file (supervised, or preference for ``fmt="dpo"``);
        returns the provider's job id."""
        ...

    def retrieve(self, job_id: str) -> JobState:
        """The job's current state."""
        ...
