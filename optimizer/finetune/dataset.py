"""The training set: qualifying sessions, scrubbed, with a manifest of what went in.

A session **qualifies** when a KPI term named in ``finetune.qualify`` (e.g.
``conversion``, ``thumbs_up``) is > 0 and the windows of *all* those terms have
closed — a session whose conversion window is open may still convert, and one
thumbed up today may be thumbed down tomorrow. Opted-out users and deleted
conversations never qualify (:mod:`optimizer.store.consent`); the export drops
their turns again, so even a session id passed by mistake cannot leak them.

The rows are written by :func:`optimizer.export.export_dataset` (the same
scrubber, the same formats as ``flywheel export``): the file uploaded is
exactly that export, byte for byte, and the manifest records its SHA-256.
``dpo`` sets are written as ``openai-dpo`` (OpenAI's preference fine-tuning
rows, what a provider's DPO job accepts), from every thumbed pair.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from optimizer import kpi
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.export import ExportResult, export_dataset
from optimizer.store import Store

__all__ = ["TrainingSet", "build_training_set", "qualify_terms", "qualifying_sessions"]

#: Rough characters per token, for the cost estimate before a provider counts.
CHARS_PER_TOKEN = 4.0

#: The export format each training-set format is written in.
EXPORT_FORMAT = {"openai-sft": "openai-sft", "dpo": "openai-dpo"}


@dataclass(frozen=True)
class TrainingSet:
    """A written dataset: the export, the manifest attached to the arm, the cost estimate."""

    export: ExportResult
    manifest: dict[str, Any]
    sessions: int
    estimated_tokens: int


def qualify_terms(config: Config) -> list[str]:
    """The KPI terms the filter uses: ``finetune.qualify`` among the configured terms."""
    names = {t.name for t in config.kpi.terms}
    return [q for q in config.finetune.qualify if q in names]


def qualifying_sessions(
    store: Store, config: Config, *, now: datetime | None = None
) -> pd.DataFrame:
    """Sessions that qualify (see the module docstring), oldest first: id, start, arm."""
    now = as_utc(now) if now is not None else utcnow()
    frame = kpi.session_frame(store, config, now=now)
    terms = qualify_terms(config)
    if frame.empty or not terms:
        return frame.loc[:, ["session_id", "assigned_at", "arm_id"]].iloc[0:0]
    values = frame[[kpi.term_column(t) for t in terms]].to_numpy(dtype=float)
    closed = ~np.isnan(values).any(axis=1)
    good = closed & (np.nan_to_num(values) > 0).any(axis=1)
    out = frame.loc[good, ["session_id", "assigned_at", "arm_id"]]
    excluded = store.excluded_sessions(config.experiment.id)
    out = out[~out["session_id"].isin(excluded)]
    return out.sort_values("assigned_at", kind="stable").reset_index(drop=True)


def build_training_set(
    store: Store,
    config: Config,
    fmt: str,
    out_dir: str | Path,
    *,
    now: datetime | None = None,
) -> TrainingSet:
    """Write the current training set in ``fmt`` (``openai-sft`` or ``dpo``) with its manifest."""
    if fmt not in ("openai-sft", "dpo"):
        raise ValueError(f"fmt must be 'openai-sft' or 'dpo', got {fmt!r}")
    now = as_utc(now) if now is not None else utcnow()
    qualifying = qualifying_sessions(store, config, now=now)
    ids = qualifying["session_id"].tolist()
    export = export_dataset(
        store,
        config,
        EXPORT_FORMAT[fmt],
        out_dir,
        now=now,
        sessions=ids if fmt == "openai-sft" else None,
    )
    data = export.path.read_bytes()
    sessions = len(ids) if fmt == "openai-sft" else export.manifest["counts"]["source_turns"]
    first = qualifying["assigned_at"].min() if len(qualifying) else None
    last = qualifying["assigned_at"].max() if len(qualifying) else None
    manifest = {
        **export.manifest,
        "dataset_sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "sessions": int(sessions),
        "qualify": (
            {"terms": qualify_terms(config), "rule": "any term > 0, all their windows closed"}
            if fmt == "openai-sft"
            else {
                "rule": "every thumbed-down turn with the thumbed-up turn whose message is "
                "most similar (TF-IDF cosine >= fewshot.pair_similarity)",
                "pair_similarity": config.fewshot.pair_similarity,
            }
        ),
        # the qualifying sessions as of this set: where retraining counts new ones from
        "sessions_from": first.isoformat() if first is not None else None,
        "sessions_to": last.isoformat() if last is not None else None,
        "session_ids_sha256": (
            hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
            if fmt == "openai-sft"
            else None
        ),
        "excluded_sessions": len(store.excluded_sessions(config.experiment.id)),
    }
    tokens = int(len(data.decode("utf-8")) / CHARS_PER_TOKEN)
    return TrainingSet(export, manifest, int(sessions), tokens)
