"""Export scrubbed datasets for fine-tuning and analysis.

Formats (``flywheel export --format …``):

- ``openai-sft`` → ``sft.jsonl``: one ``{"messages": [system, user, assistant]}``
  per good turn — a turn that qualifies for mining
  (:func:`optimizer.fewshot.mining.turn_reasons`: thumbs-up, KPI reward,
  conversion, quick resolution; no error, no thumbs-down), and with
  ``min_reward`` only those whose session's complete reward reaches it. The
  system message is the turn's prompt variant followed by the knowledge base.
  With ``sessions`` (a fine-tuning set, :mod:`optimizer.finetune`) the turns
  are those of the given qualifying sessions instead, minus errored and
  thumbed-down turns.
- ``dpo`` → ``dpo.jsonl``: ``{"prompt", "chosen", "rejected"}`` pairs — each
  thumbed-down turn with the thumbed-up turn whose user message is most similar
  (TF-IDF cosine ``>= fewshot.pair_similarity``); the prompt is the rejected
  turn's message, ``chosen`` the liked reply.
- ``openai-dpo`` → ``dpo_openai.jsonl``: the same pairs in OpenAI's preference
  fine-tuning format — ``{"input": {"messages": [system, user]},
  "preferred_output": [assistant], "non_preferred_output": [assistant]}``, the
  system message built as for ``openai-sft`` from the rejected turn's variant
  (``flywheel finetune --format dpo`` uploads this file).
- ``csv`` / ``parquet`` → ``turns.csv`` / ``turns.parquet``: every turn joined
  with its vote and its session's reward, user ids replaced by a hash.

Every user message and reply passes :class:`optimizer.privacy.Scrubber` (facts
of the public knowledge base are kept). Turns of users who opted out and of
deleted conversations are never exported (:mod:`optimizer.store.consent`).
Each file gets a manifest beside it (``<file>.manifest.json``): format,
filters, counts, time range of the rows, scrubber version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.fewshot.mining import turn_reasons
from optimizer.privacy import SCRUBBER_VERSION, Scrubber, public_allowlist
from optimizer.prompt_library import PromptLibrary, load_prompts
from optimizer.store import Store, schema

__all__ = ["FORMATS", "ExportResult", "export_dataset"]

log = logging.getLogger(__name__)

FORMATS = ("openai-sft", "dpo", "openai-dpo", "csv", "parquet")
_FILES = {
    "openai-sft": "sft.jsonl",
    "dpo": "dpo.jsonl",
    "openai-dpo": "dpo_openai.jsonl",
    "csv": "turns.csv",
    "parquet": "turns.parquet",
}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]


def export_dataset(
    store: Store,
    config: Config,
    fmt: str,
    out_dir: str | Path,
    *,
    min_reward: float | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    library: PromptLibrary | None = None,
    sessions: Collection[str] | None = None,
) -> ExportResult:
    """Write one dataset and its manifest into ``out_dir``; returns their paths and the manifest.

    ``sessions`` restricts the turns to these sessions (the SFT rows are then
    all their clean turns, see the module docstring).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    if min_reward is not None and not np.isfinite(min_reward):
        raise ValueError(f"min_reward must be a finite number, got {min_reward}")
    now = as_utc(now) if now is not None else utcnow()
    library = library if library is not None else load_prompts(config.prompts_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    turns = _turns(store, config, now=now, since=since, until=until)
    if sessions is not None:
        turns = turns[turns["session_id"].isin(set(sessions))] if len(turns) else turns
    scrubber = Scrubber(allow=public_allowlist(library.knowledge))
    path = out / _FILES[fmt]
    extra: dict[str, Any] = {}
    if fmt == "openai-sft" and sessions is not None:
        rows = _clean_turns(turns)
        records = [_sft_record(r, library, scrubber) for r in rows.to_dict("records")]
        _write_jsonl(path, records)
    elif fmt == "openai-sft":
        rows = _good_turns(turns, min_reward)
        records = [_sft_record(r, library, scrubber) for r in rows.to_dict("records")]
        _write_jsonl(path, records)
    elif fmt in ("dpo", "openai-dpo"):
        pairs, rows, extra = _pairs(turns, scrubber, config.fewshot.pair_similarity)
        records = (
            pairs
            if fmt == "dpo"
            else [
                _openai_dpo_record(pair, row, library)
                for pair, row in zip(pairs, rows.to_dict("records"), strict=True)
            ]
        )
        _write_jsonl(path, records)
    else:
        rows = (
            turns
            if min_reward is None
            else turns[turns["complete"] & (turns["reward"] >= min_reward)]
        )
        table = _flat(rows, scrubber)
        if fmt == "csv":
            table.to_csv(path, index=False)
        else:
            table.to_parquet(path, index=False)
        records = table.to_dict("records")
    manifest = {
        "format": fmt,
        "file": path.name,
        "rows": len(records),
        "created_at": now.isoformat(),
        "experiment_id": config.experiment.id,
        "filters": {
            "min_reward": min_reward,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "sessions": len(set(sessions)) if sessions is not None else None,
        },
        "counts": {"turns_considered": len(turns), "source_turns": len(rows), **extra},
        "time_range": _time_range(rows),
        "scrubber_version": SCRUBBER_VERSION,
    }
    manifest_path = out / f"{path.name}.manifest.json"
    manifest_path.write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    log.info("exported %d %s rows to %s", len(records), fmt, path)
    return ExportResult(path, manifest_path, manifest)


def _turns(
    store: Store, config: Config, *, now: datetime, since: datetime | None, until: datetime | None
) -> pd.DataFrame:
    turns = turn_reasons(store, config, now=now)
    if turns.empty:
        return turns.assign(thumbs=pd.Series(dtype="Int64"))
    if since is not None:
        turns = turns[turns["created_at"] >= pd.Timestamp(as_utc(since))]
    if until is not None:
        turns = turns[turns["created_at"] < pd.Timestamp(as_utc(until))]
    fb = schema.feedback
    votes = store.frame(fb, fb.c.value.is_not(None))[["turn_id", "user_id", "value"]]
    # Only the turn's own user can vote (store.record_feedback enforces it).
    thumbs = votes.groupby("turn_id")["value"].min()  # a down vote wins over an up vote
    turns = turns.assign(thumbs=turns["id"].map(thumbs).astype("Int64"))
    # Ties broken by turn id: the same store always exports the same bytes (the manifest's hash).
    return turns.sort_values(["created_at", "id"], kind="stable").reset_index(drop=True)


def _failed_or_empty(turns: pd.DataFrame) -> pd.Series:
    """Turns with nothing to learn from: an error, or no text (a simulated turn)."""
    failed = turns["error"].fillna("").astype(str).str.len() > 0
    empty = (turns["user_message"].fillna("").astype(str).str.strip() == "") | (
        turns["reply"].fillna("").astype(str).str.strip() == ""
    )
    return failed | empty


def _clean_turns(turns: pd.DataFrame) -> pd.DataFrame:
    if turns.empty:
        return turns
    return turns[~_failed_or_empty(turns) & (turns["thumbs"].fillna(1) != 0)]


def _good_turns(turns: pd.DataFrame, min_reward: float | None) -> pd.DataFrame:
    good = turns.loc[turns["reasons"].map(bool).astype(bool)] if not turns.empty else turns
    if min_reward is not None:
        good = good[good["complete"] & (good["reward"] >= min_reward)]
    return good


def _sft_record(row: dict[str, Any], library: PromptLibrary, scrubber: Scrubber) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": _system_message(row["prompt_id"], library)},
            {"role": "user", "content": scrubber.scrub(row["user_message"])},
            {"role": "assistant", "content": scrubber.scrub(row["reply"])},
        ]
    }


def _system_message(prompt_id: str, library: PromptLibrary) -> str:
    variant = library.variants.get(prompt_id)
    return "\n\n".join(p for p in ((variant.template if variant else ""), library.knowledge) if p)


def _openai_dpo_record(
    pair: dict[str, str], row: dict[str, Any], library: PromptLibrary
) -> dict[str, Any]:
    """One pair in OpenAI's preference format; ``row`` is the rejected turn (its variant)."""
    return {
        "input": {
            "messages": [
                {"role": "system", "content": _system_message(row["prompt_id"], library)},
                {"role": "user", "content": pair["prompt"]},
            ]
        },
        "preferred_output": [{"role": "assistant", "content": pair["chosen"]}],
        "non_preferred_output": [{"role": "assistant", "content": pair["rejected"]}],
    }


def _pairs(
    turns: pd.DataFrame, scrubber: Scrubber, threshold: float
) -> tuple[list[dict[str, str]], pd.DataFrame, dict[str, Any]]:
    clean = turns[~_failed_or_empty(turns)] if len(turns) else turns
    ups = clean[clean["thumbs"] == 1]
    downs = clean[clean["thumbs"] == 0]
    extra = {"thumbs_up": len(ups), "thumbs_down": len(downs), "pair_similarity": threshold}
    if ups.empty or downs.empty:
        return [], clean.iloc[0:0], extra
    up_prompts = [scrubber.scrub(t) for t in ups["user_message"]]
    down_prompts = [scrubber.scrub(t) for t in downs["user_message"]]
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(
        up_prompts + down_prompts
    )  # words: paraphrases match
    sims = (vectorizer.transform(down_prompts) @ vectorizer.transform(up_prompts).T).toarray()
    records: list[dict[str, str]] = []
    used: list[int] = []
    for i, down in enumerate(downs.to_dict("records")):
        j = int(np.argmax(sims[i]))
        if sims[i, j] < threshold:
            continue
        chosen, rejected = scrubber.scrub(ups.iloc[j]["reply"]), scrubber.scrub(down["reply"])
        if chosen.strip() == rejected.strip():
            continue
        records.append({"prompt": down_prompts[i], "chosen": chosen, "rejected": rejected})
        used.append(i)
    extra["unpaired_thumbs_down"] = len(downs) - len(used)
    return records, downs.iloc[used], extra


def _flat(turns: pd.DataFrame, scrubber: Scrubber) -> pd.DataFrame:
    if turns.empty:
        columns = [
            "turn_id",
            "session_id",
            "user_hash",
            "arm_id",
            "prompt_id",
            "model",
            "created_at",
            "user_message",
            "reply",
            "fewshot_ids",
            "latency_ms",
            "ttft_ms",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "has_error",
            "thumbs",
            "session_reward",
            "reward_complete",
            "reward_so_far",
            "qualifies",
            "reasons",
        ]
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(
        {
            "turn_id": turns["id"],
            "session_id": turns["session_id"],
            "user_hash": turns["user_id"].map(
                lambda u: hashlib.sha256(str(u).encode()).hexdigest()[:16]
            ),
            "arm_id": turns["arm_id"],
            "prompt_id": turns["prompt_id"],
            "model": turns["model"],
            "created_at": turns["created_at"],
            "user_message": turns["user_message"].map(scrubber.scrub),
            "reply": turns["reply"].map(scrubber.scrub),
            "fewshot_ids": turns["fewshot_ids"].map(lambda ids: ",".join(ids or [])),
            "latency_ms": turns["latency_ms"].astype(float),
            "ttft_ms": turns["ttft_ms"].astype(float),
            "prompt_tokens": turns["prompt_tokens"].astype("Int64"),
            "completion_tokens": turns["completion_tokens"].astype("Int64"),
            "cost": turns["cost"].astype(float),
            "has_error": turns["error"].fillna("").astype(str).str.len() > 0,
            "thumbs": turns["thumbs"],
            "session_reward": turns["reward"].astype(float),
            "reward_complete": turns["complete"].astype(bool),
            "reward_so_far": turns["reward_so_far"].astype(float),
            "qualifies": turns["reasons"].map(bool),
            "reasons": turns["reasons"].map(lambda r: ",".join(r)),
        }
    ).reset_index(drop=True)


def _time_range(rows: pd.DataFrame) -> dict[str, str | None]:
    if rows.empty or "created_at" not in rows:
        return {"first": None, "last": None}
    return {
        "first": rows["created_at"].min().isoformat(),
        "last": rows["created_at"].max().isoformat(),
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
