"""Retraining from the optimizer job: follow running jobs, start the next one when due.

The server's optimizer loop (:func:`optimizer.refit.run_optimizer`) is handed
:class:`FineTuneHooks` (the provider, where datasets are kept) and calls
:func:`finetune_step` once per run. A step holds the job lock
``finetune:<experiment>`` (:mod:`optimizer.locks`), so two replicas, or a
replica and ``flywheel finetune tick``, never follow or start jobs at once. Each
step:

1. marks failed a job whose start was interrupted (still ``created`` after
   ``STALE_START_S``: :func:`optimizer.finetune.jobs.fail_interrupted`), which
   would otherwise block retraining for ever;
2. polls every job that is not final (a succeeded one becomes a challenger arm,
   its bill is recorded: :func:`optimizer.finetune.poll_job`);
3. starts the next job when :func:`optimizer.finetune.retrain_due` says so
   (``retrain_interval_days`` or ``retrain_after_sessions``) — never while one
   runs, so at most one job at a time, and within the spending cap.

The previous fine-tune keeps its arm and its traffic: the new model arrives as a
challenger and takes traffic only by beating it on the KPI. ``flywheel finetune
tick`` (cron) does the same step without a server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.errors import FineTuneError
from optimizer.finetune.jobs import fail_interrupted, jobs, poll_job, retrain_due, start_job
from optimizer.finetune.provider import FINAL_STATES, FineTuneProvider
from optimizer.locks import job_lock
from optimizer.store import Store

__all__ = ["FineTuneHooks", "finetune_step"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuneHooks:
    """What the optimizer job needs to retrain: a provider and a directory for datasets."""

    provider: FineTuneProvider
    out_dir: Path


def finetune_step(
    store: Store, config: Config, hooks: FineTuneHooks, *, now: datetime | None = None
) -> dict[str, Any]:
    """Poll the running jobs, start the next one when retraining is due; never raises.

    Returns what happened: ``polled`` (job id → status), ``due`` (the reason, or
    None), ``started`` (the new job's id, or None), ``error`` when a provider
    or the cap refused (logged; the next run tries again), ``interrupted`` (the
    ids of jobs whose start was interrupted, now failed), ``skipped`` when
    another process holds the lock.
    """
    now = as_utc(now) if now is not None else utcnow()
    out: dict[str, Any] = {"polled": {}, "due": None, "started": None}
    with job_lock(store, f"finetune:{config.experiment.id}") as held:
        if not held:
            log.info("fine-tuning step skipped: another process holds its lock")
            return {**out, "skipped": "another process is following the fine-tuning jobs"}
        return _step(store, config, hooks, now, out)


def _step(
    store: Store, config: Config, hooks: FineTuneHooks, now: datetime, out: dict[str, Any]
) -> dict[str, Any]:
    try:
        if interrupted := fail_interrupted(store, config, now=now):
            out["interrupted"] = interrupted
        for job in jobs(store, config.experiment.id):
            if job.status not in FINAL_STATES and job.provider_job_id is not None:
                out["polled"][job.id] = poll_job(
                    store, config, hooks.provider, job.id, now=now
                ).status
        out["due"] = retrain_due(store, config, now=now)
        if out["due"] is not None:
            log.info("fine-tuning: retraining due (%s)", out["due"])
            out["started"] = start_job(store, config, hooks.provider, hooks.out_dir, now=now).id
    except FineTuneError as exc:
        log.warning("fine-tuning step: %s", exc)
        out["error"] = str(exc)
    except Exception as exc:  # a provider outage never costs the optimizer its run
        log.exception("fine-tuning step failed")
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out
