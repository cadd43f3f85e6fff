"""Arms as data, versioned by the content hash of what they serve.

An arm row is one **version** of a logical arm (its ``base_id``). Its identity
is the content hash of what it serves (:func:`arm_content_hash`: the prompt's
hash, the few-shot strategy and its settings, and the model when one is set),
so:

- a content seen for the first time under a base id is a new version: version 1
  keeps the base id as its arm id (today's arms and their data never split),
  later ones are ``<base>@v<n>``; the previous version is retired with
  ``{"superseded_by": new}`` and, if it was the champion, the new one is
  promoted (``{"follows": old}``); its returning users move to the new version
  (serving looks up :func:`successor`), its history stays;
- a content already known under that base — any version, retired ones
  included — changes nothing. **The store wins**: a replica still holding the
  old ``prompts/`` during a rolling deploy finds its file's hash among the
  versions and creates nothing, so versions never flip-flop; every replica
  serves the text stored with the version (``prompt_text``), not its own file.
  Going back to an old text therefore needs a new content (or ``flywheel arms
  add``), not a revert of the file.

The model dimension fits without a split: ``model`` is None for "the configured
model" and enters the hash only when set, so today's arms keep their hashes; its
own parameters (``model_params``: temperature, max_tokens, api_base) enter only
when non-empty, so the same model with another temperature is another content.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from optimizer.store import schema
from optimizer.store.schema import ARM_STATUS_BY_EVENT

__all__ = ["VERSION_SEPARATOR", "arm_content_hash", "register_arm", "row_content_hash", "successor"]

#: Between a base id and the version number in the id of versions 2, 3, …
VERSION_SEPARATOR = "@v"
_BASE_ID = re.compile(r"^[A-Za-z0-9_.:+/-]{1,180}$")


def arm_content_hash(
    prompt_hash: str,
    fewshot: str,
    fewshot_config: Mapping[str, Any],
    model: str | None = None,
    model_params: Mapping[str, Any] | None = None,
) -> str:
    """Hash of what an arm serves; ``model`` counts only when set, ``model_params`` when non-empty.

    >>> arm_content_hash("h1", "none", {}) == arm_content_hash("h1", "none", {}, None, {})
    True
    >>> arm_content_hash("h1", "none", {}) == arm_content_hash("h1", "none", {}, "openai/x")
    False
    >>> a = arm_content_hash("h1", "none", {}, "openai/x", {"temperature": 0.2})
    >>> a == arm_content_hash("h1", "none", {}, "openai/x")
    False
    """
    payload: dict[str, Any] = {
        "prompt": prompt_hash,
        "fewshot": fewshot,
        "fewshot_config": dict(fewshot_config),
    }
    if model is not None:
        payload["model"] = model
    if model_params:
        payload["model_params"] = dict(model_params)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def row_content_hash(row: Any) -> str:
    """Content hash of a stored arm row (computed for rows written before migration 0003)."""
    if row.content_hash:
        return str(row.content_hash)
    params = getattr(row, "model_params", None)
    return arm_content_hash(
        row.prompt_hash, row.fewshot, row.fewshot_config or {}, row.model, params
    )


def _base(row: Any) -> str:
    return str(row.base_id or row.id)


def _status(conn: sa.Connection, experiment_id: str, arm_id: str) -> str | None:
    ev = schema.arm_events
    kinds = conn.execute(
        sa.select(ev.c.kind)
        .where(ev.c.experiment_id == experiment_id, ev.c.arm_id == arm_id)
        .order_by(ev.c.id)
    ).scalars()
    status = None
    for kind in kinds:
        status = ARM_STATUS_BY_EVENT.get(kind, status)
    if status == "champion":  # a later promotion of another arm demotes it
        newer = conn.execute(
            sa.select(ev.c.arm_id)
            .where(ev.c.experiment_id == experiment_id, ev.c.kind == "promoted")
            .order_by(ev.c.id.desc())
            .limit(1)
        ).scalar()
        if newer != arm_id:
            status = "active"
    return status


def register_arm(
    conn: sa.Connection,
    experiment_id: str,
    spec: Any,
    *,
    actor: str,
    now: datetime,
    event: Any,
) -> tuple[str, str]:
    """Register ``spec`` (an :class:`~optimizer.store.ArmSpec`) in one transaction.

    Returns ``(arm id, what happened)``: ``"created"`` (a new arm),
    ``"version"`` (a new version superseding the current one) or ``"known"``
    (the content exists already under this base: nothing changes). ``event``
    writes an arm event (``Store._arm_event``).
    """
    if not _BASE_ID.match(spec.id):
        raise ValueError(
            f"arm id may hold 1-180 letters, digits and _.:+/- (no '@'), got {spec.id!r}"
        )
    arms = schema.arms
    digest = arm_content_hash(
        spec.prompt_hash, spec.fewshot, spec.fewshot_config, spec.model, spec.model_params
    )
    rows = [
        r
        for r in conn.execute(
            sa.select(arms).where(
                arms.c.experiment_id == experiment_id,
                sa.func.coalesce(arms.c.base_id, arms.c.id) == spec.id,
            )
        )
    ]
    values = {
        "experiment_id": experiment_id,
        "prompt_id": spec.prompt_id,
        "prompt_hash": spec.prompt_hash,
        "fewshot": spec.fewshot,
        "fewshot_config": dict(spec.fewshot_config),
        "base_id": spec.id,
        "content_hash": digest,
        "prompt_text": spec.prompt_text,
        "model": spec.model,
        "model_params": dict(spec.model_params) or None,
        "manifest": dict(spec.manifest) if spec.manifest else None,
        "origin": spec.origin,
        "created_at": now,
    }
    if not rows:
        conn.execute(arms.insert().values(id=spec.id, version=1, **values))
        event(conn, experiment_id, spec.id, "created", actor, {"content_hash": digest}, now)
        return spec.id, "created"
    rows.sort(key=lambda r: r.version)
    current = rows[-1]
    for row in rows:
        if row_content_hash(row) == digest:
            if row.content_hash is None or (row.prompt_text is None and spec.prompt_text):
                # a row from before 0003: record its hash and text, once
                conn.execute(
                    arms.update()
                    .where(arms.c.experiment_id == experiment_id, arms.c.id == row.id)
                    .values(
                        base_id=spec.id,
                        content_hash=digest,
                        prompt_text=row.prompt_text or spec.prompt_text,
                    )
                )
            return str(current.id), "known"
    version = int(current.version) + 1
    new_id = f"{spec.id}{VERSION_SEPARATOR}{version}"
    was = _status(conn, experiment_id, current.id)
    conn.execute(arms.insert().values(id=new_id, version=version, **values))
    event(
        conn,
        experiment_id,
        new_id,
        "created",
        actor,
        {"content_hash": digest, "supersedes": current.id, "version": version},
        now,
    )
    if was != "retired":
        event(conn, experiment_id, current.id, "retired", actor, {"superseded_by": new_id}, now)
    if was == "champion":
        event(conn, experiment_id, new_id, "promoted", actor, {"follows": current.id}, now)
    return new_id, "version"


def successor(rows: list[Any], arm_id: str) -> str:
    """The newest version of ``arm_id``'s base among arm ``rows`` (itself if newest or unknown).

    >>> from types import SimpleNamespace as R
    >>> rows = [R(id="a", base_id="a", version=1), R(id="a@v2", base_id="a", version=2)]
    >>> successor(rows, "a"), successor(rows, "a@v2"), successor(rows, "zzz")
    ('a@v2', 'a@v2', 'zzz')
    """
    mine = next((r for r in rows if r.id == arm_id), None)
    if mine is None:
        return arm_id
    same = [r for r in rows if _base(r) == _base(mine)]
    return str(max(same, key=lambda r: r.version).id)
