"""Fine-tuning from the flywheel's own data: training sets, jobs, the resulting arms.

``flywheel finetune start`` → :func:`start_job`; ``flywheel finetune status``
→ :func:`poll_job`; schedules → :func:`retrain_due`, run by the server's
optimizer job (:func:`finetune_step`) or ``flywheel finetune tick``. The provider is handed in
(:class:`FineTuneProvider`), so this package never talks to a model itself.
"""

from __future__ import annotations

from optimizer.finetune.dataset import (
    TrainingSet,
    build_training_set,
    qualify_terms,
    qualifying_sessions,
)
from optimizer.finetune.jobs import (
    JobRecord,
    actual_cost,
    estimated_cost,
    jobs,
    poll_job,
    retrain_due,
    spent,
    start_job,
)
from optimizer.finetune.provider import FINAL_STATES, FineTuneProvider, JobState
from optimizer.finetune.schedule import FineTuneHooks, finetune_step

__all__ = [
    "FINAL_STATES",
    "FineTuneHooks",
    "FineTuneProvider",
    "JobRecord",
    "JobState",
    "TrainingSet",
    "actual_cost",
    "build_training_set",
    "estimated_cost",
    "finetune_step",
    "jobs",
    "poll_job",
    "qualify_terms",
    "qualifying_sessions",
    "retrain_due",
    "spent",
    "start_job",
]
