"""Fine-tuning jobs: start one from the flywheel's data, follow it, make the result an arm.

:func:`start_job` builds the training set (:mod:`optimizer.finetune.dataset`),
checks it (at least ``finetune.min_sessions`` sessions; the spend of past
jobs within ``spend_window_days`` — what the provider billed for finished ones,
the estimate for the others — plus this job's estimate within
``finetune.spend_cap_usd``), uploads exactly
that file and starts the provider's job. :func:`poll_job` asks the provider;
when the job has **succeeded** the new model becomes a challenger arm: the
champion's prompt and few-shot strategy with the new model, the dataset
manifest attached (``arms.manifest``), origin ``finetune``. From there it wins
or loses on the KPI like any arm, under the same guardrails and caps. A job
that **failed** (or could not start) is recorded with its error and changes
nothing else: no arm, no event, no snapshot.

Retraining (:func:`retrain_due`): a new job is due after
``retrain_interval_days`` since the last job, or once
``retrain_after_sessions`` sessions qualified after the newest session of the
last job's dataset. The previous fine-tune keeps its arm and traffic: the new
one arrives as a challenger and takes traffic only by beating it.

Every state is a row of ``finetune_jobs``; ``flywheel finetune status`` reads them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.errors import FineTuneError
from optimizer.finetune.dataset import build_training_set, qualifying_sessions
from optimizer.finetune.provider import FINAL_STATES, FineTuneProvider
from optimizer.store import ArmSpec, Store, schema

__all__ = [
    "STALE_START_S",
    "JobRecord",
    "actual_cost",
    "estimated_cost",
    "fail_interrupted",
    "jobs",
    "poll_job",
    "retrain_due",
    "spent",
    "start_job",
]

log = logging.getLogger(__name__)

ACTOR = "finetune"

#: A job still ``created`` (no provider job id) after this long was interrupted mid-start.
STALE_START_S = 3600.0


@dataclass(frozen=True)
class JobRecord:
    """One row of ``finetune_jobs``."""

    id: str
    experiment_id: str
    provider: str
    format: str
    base_model: str
    status: str
    provider_file_id: str | None
    provider_job_id: str | None
    fine_tuned_model: str | None
    arm_id: str | None
    parent_arm_id: str | None
    estimated_cost_usd: float
    #: Billable tokens the provider reported once the job finished (None: not reported).
    trained_tokens: int | None
    #: ``trained_tokens`` at ``finetune.usd_per_mtok_trained`` (None until billed).
    actual_cost_usd: float | None
    manifest: dict[str, Any]
    error: str | None
    created_at: datetime
    updated_at: datetime


def estimated_cost(tokens: int, config: Config) -> float:
    """USD a job on ``tokens`` training tokens is expected to cost.

    >>> from optimizer.config import load_config
    >>> estimated_cost(1_000_000, load_config("/nonexistent.toml", environ=False))
    9.0
    """
    ft = config.finetune
    return tokens * ft.epochs * ft.usd_per_mtok_trained / 1_000_000


def jobs(store: Store, experiment_id: str) -> list[JobRecord]:
    """Every fine-tuning job of the experiment, newest first."""
    j = schema.finetune_jobs
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(j).where(j.c.experiment_id == experiment_id).order_by(j.c.created_at.desc())
        ).all()
    return [_record(r) for r in rows]


def actual_cost(trained_tokens: int, config: Config) -> float:
    """USD of a finished job the provider billed for ``trained_tokens`` tokens.

    The provider's count already includes every epoch (OpenAI: "the total
    number of billable tokens processed by this fine-tuning job").

    >>> from optimizer.config import load_config
    >>> actual_cost(2_000_000, load_config("/nonexistent.toml", environ=False))
    6.0
    """
    return trained_tokens * config.finetune.usd_per_mtok_trained / 1_000_000


def spent(store: Store, config: Config, *, now: datetime | None = None) -> float:
    """USD of the jobs a provider accepted within ``spend_window_days``.

    A job the provider billed counts its actual cost (:func:`actual_cost`); one
    still running, or finished without a bill, counts its estimate.
    """
    now = as_utc(now) if now is not None else utcnow()
    since = now - timedelta(days=config.finetune.spend_window_days)
    j = schema.finetune_jobs
    with store.engine.connect() as conn:
        total = conn.execute(
            sa.select(
                sa.func.coalesce(
                    sa.func.sum(sa.func.coalesce(j.c.actual_cost_usd, j.c.estimated_cost_usd)),
                    0.0,
                )
            ).where(
                j.c.experiment_id == config.experiment.id,
                j.c.created_at >= since,
                j.c.provider_job_id.is_not(None),
            )
        ).scalar()
    return float(total or 0.0)


def start_job(
    store: Store,
    config: Config,
    provider: FineTuneProvider,
    out_dir: str | Path,
    *,
    fmt: str | None = None,
    now: datetime | None = None,
) -> JobRecord:
    """Export, check, upload and start one job; returns its record.

    Raises :class:`FineTuneError` before anything leaves when the set is too
    small or the cap would be exceeded; a provider error is recorded on the
    job (status ``failed``) and raised as :class:`FineTuneError`. Either way the
    experiment is untouched.
    """
    now = as_utc(now) if now is not None else utcnow()
    ft = config.finetune
    fmt = fmt or ft.format
    exp = config.experiment.id
    if fmt not in provider.formats:
        raise FineTuneError(
            f"provider {provider.name!r} cannot train on {fmt!r} sets "
            f"(it takes {sorted(provider.formats)})"
        )
    job_id = f"ft-{uuid.uuid4().hex[:12]}"
    training = build_training_set(store, config, fmt, Path(out_dir) / job_id, now=now)
    if training.sessions < ft.min_sessions or training.manifest["rows"] == 0:
        raise FineTuneError(
            f"{training.sessions} qualifying sessions ({training.manifest['rows']} rows) in the "
            f"{fmt} set; finetune.min_sessions is {ft.min_sessions}"
        )
    cost = estimated_cost(training.estimated_tokens, config)
    already = spent(store, config, now=now)
    if already + cost > ft.spend_cap_usd:
        raise FineTuneError(
            f"estimated ${cost:.2f} for this job would exceed finetune.spend_cap_usd "
            f"${ft.spend_cap_usd:.2f} ({already:.2f} spent in the last "
            f"{ft.spend_window_days:g} days)"
        )
    champion = _champion(store, config)
    _insert(
        store,
        id=job_id,
        experiment_id=exp,
        provider=provider.name,
        format=fmt,
        base_model=ft.base_model,
        status="created",
        parent_arm_id=champion,
        estimated_cost_usd=cost,
        manifest=training.manifest,
        created_at=now,
        updated_at=now,
    )
    try:
        file_id = provider.upload(training.export.path)
        _update(store, job_id, now, provider_file_id=file_id)
        provider_job = provider.create_job(
            training_file=file_id,
            base_model=ft.base_model,
            suffix=job_id,
            epochs=ft.epochs,
            fmt=fmt,
            dpo_beta=ft.dpo_beta,
        )
    except Exception as exc:  # any provider failure: recorded, nothing else changes
        _update(store, job_id, now, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        log.warning("fine-tuning job %s failed to start: %s", job_id, exc)
        raise FineTuneError(f"fine-tuning job {job_id} failed to start: {exc}") from exc
    _update(store, job_id, now, status="running", provider_job_id=provider_job)
    store.audit(
        ACTOR,
        "finetune_started",
        f"{exp}/{job_id}",
        {"provider_job_id": provider_job, "rows": training.manifest["rows"], "usd": cost},
    )
    log.info("fine-tuning job %s started (%s, %d rows)", job_id, provider_job, training.sessions)
    return _get(store, job_id)


def poll_job(
    store: Store,
    config: Config,
    provider: FineTuneProvider,
    job_id: str,
    *,
    now: datetime | None = None,
) -> JobRecord:
    """Ask the provider about ``job_id``; on success register the model as a challenger arm.

    A job already final is returned as it is. Raises :class:`FineTuneError` for
    an unknown job.
    """
    now = as_utc(now) if now is not None else utcnow()
    job = _get(store, job_id)
    if job.status in FINAL_STATES or job.provider_job_id is None:
        return job
    state = provider.retrieve(job.provider_job_id)
    if state.status in FINAL_STATES and state.trained_tokens is not None:
        tokens = int(state.trained_tokens)
        _update(
            store,
            job_id,
            now,
            trained_tokens=tokens,
            actual_cost_usd=actual_cost(tokens, config),
        )
        log.info(
            "fine-tuning job %s billed %d tokens ($%.2f; estimated $%.2f)",
            job_id,
            tokens,
            actual_cost(tokens, config),
            job.estimated_cost_usd,
        )
    if state.status == "succeeded":
        if not state.fine_tuned_model:
            _update(store, job_id, now, status="failed", error="succeeded without a model name")
            return _get(store, job_id)
        arm_id = _register_arm(store, config, job, state.fine_tuned_model, now)
        _update(
            store,
            job_id,
            now,
            status="succeeded",
            fine_tuned_model=state.fine_tuned_model,
            arm_id=arm_id,
        )
    elif state.status in ("failed", "cancelled"):
        _update(store, job_id, now, status=state.status, error=state.error or state.status)
        log.warning("fine-tuning job %s %s: %s", job_id, state.status, state.error)
    else:
        _update(store, job_id, now, status="running")
    return _get(store, job_id)


def fail_interrupted(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    older_than_s: float = STALE_START_S,
) -> list[str]:
    """Mark failed the jobs whose start was interrupted; returns their ids.

    A job stays ``created`` only between its row and the provider's answer; one
    older than ``older_than_s`` lost its process (a crash, a restart) and would
    otherwise block retraining for ever (:func:`retrain_due` waits while a job
    runs). Its error says what to check at the provider.
    """
    now = as_utc(now) if now is not None else utcnow()
    stale = [
        j
        for j in jobs(store, config.experiment.id)
        if j.status == "created"
        and j.provider_job_id is None
        and (now - j.updated_at).total_seconds() >= older_than_s
    ]
    for j in stale:
        error = "interrupted before the provider accepted the job" + (
            f"; if the provider lists a job on file {j.provider_file_id}, cancel it there"
            if j.provider_file_id
            else ""
        )
        _update(store, j.id, now, status="failed", error=error)
        log.warning("fine-tuning job %s: %s", j.id, error)
    return [j.id for j in stale]


def retrain_due(store: Store, config: Config, *, now: datetime | None = None) -> str | None:
    """Why a new job is due now (a sentence), or None.

    Never while a job runs. Without any job yet, not due (the first job is an
    operator's decision: ``flywheel finetune start``).
    """
    now = as_utc(now) if now is not None else utcnow()
    ft = config.finetune
    history = jobs(store, config.experiment.id)
    if not history or any(j.status in ("created", "running") for j in history):
        return None
    last = next((j for j in history if j.status == "succeeded"), history[0])
    if ft.retrain_interval_days > 0:
        age = (now - as_utc(last.created_at)).total_seconds() / 86_400
        if age >= ft.retrain_interval_days:
            return f"{age:.1f} days since job {last.id} (retrain_interval_days)"
    if ft.retrain_after_sessions > 0:
        until = last.manifest.get("sessions_to")
        qualifying = qualifying_sessions(store, config, now=now)
        if until:
            # start times come back through float epoch seconds: a millisecond of slack
            cutoff = datetime.fromisoformat(until) + timedelta(milliseconds=1)
            qualifying = qualifying[qualifying["assigned_at"] > cutoff]
        if len(qualifying) >= ft.retrain_after_sessions:
            return (
                f"{len(qualifying)} new qualifying sessions since job {last.id} "
                "(retrain_after_sessions)"
            )
    return None


# -- helpers ----------------------------------------------------------------------------------


def _champion(store: Store, config: Config) -> str | None:
    statuses = store.arm_statuses(config.experiment.id)
    champion = next((a for a, s in statuses.items() if s == "champion"), None)
    return champion or config.experiment.champion


def _register_arm(
    store: Store, config: Config, job: JobRecord, fine_tuned_model: str, now: datetime
) -> str:
    """The champion's prompt and examples with the new model, as a new challenger arm."""
    exp = config.experiment.id
    parent_id = _champion(store, config) or job.parent_arm_id
    rows = {r.id: r for r in store.arms(exp)}
    parent = rows.get(parent_id or "")
    if parent is None:
        raise FineTuneError(f"no champion arm to build on in experiment {exp!r}")
    params: dict[str, Any] = {}
    if config.finetune.api_base:
        params["api_base"] = config.finetune.api_base
    manifest = {
        **job.manifest,
        "job_id": job.id,
        "provider": job.provider,
        "provider_job_id": job.provider_job_id,
        "base_model": job.base_model,
        "fine_tuned_model": fine_tuned_model,
        "parent_arm": parent.id,
    }
    spec = ArmSpec(
        job.id,
        parent.prompt_id,
        parent.prompt_hash,
        parent.fewshot,
        dict(parent.fewshot_config or {}),
        prompt_text=parent.prompt_text,
        model=f"{job.provider}/{fine_tuned_model}",
        model_params=params,
        origin="finetune",
        manifest=manifest,
    )
    arm_id, _ = store.add_arm(exp, spec, actor=ACTOR, at=now)
    log.info("fine-tuned model %s is challenger arm %s", fine_tuned_model, arm_id)
    return arm_id


def _insert(store: Store, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(schema.finetune_jobs.insert().values(**values))


def _update(store: Store, job_id: str, now: datetime, **values: Any) -> None:
    j = schema.finetune_jobs
    with store.engine.begin() as conn:
        conn.execute(j.update().where(j.c.id == job_id).values(updated_at=now, **values))


def _get(store: Store, job_id: str) -> JobRecord:
    j = schema.finetune_jobs
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(j).where(j.c.id == job_id)).first()
    if row is None:
        raise FineTuneError(f"no fine-tuning job {job_id!r}")
    return _record(row)


def _record(row: Any) -> JobRecord:
    values = dict(row._mapping)
    values["manifest"] = dict(values.get("manifest") or {})
    values["created_at"] = as_utc(values["created_at"])
    values["updated_at"] = as_utc(values["updated_at"])
    return JobRecord(**values)
