"""Propose a challenger arm when the example bank has grown.

When at least ``fewshot.propose_after`` mined examples were approved (or
pinned) since the last proposal, propose the champion's prompt variant × a
``fixed`` set of the ``propose_k`` best examples (pinned first, then by the
reward of the session they came from). The proposal is data, not a change:
it is stored as an audit event (``fewshot_challenger_proposed``, with the TOML
snippet) for an operator to paste into ``flywheel.toml``; once there, the arm
enters like any new arm, under the challenger cap and the guardrails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import tomli_w

from optimizer.config import Config
from optimizer.fewshot.bank import ExampleBank
from optimizer.store import Store, schema

__all__ = ["AUDIT_ACTION", "Proposal", "propose_challenger"]

log = logging.getLogger(__name__)

AUDIT_ACTION = "fewshot_challenger_proposed"


@dataclass(frozen=True)
class Proposal:
    arm: dict[str, Any]
    toml: str
    approved_mined: int
    previous: int
    examples: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "toml": self.toml,
            "approved_mined": self.approved_mined,
            "previous": self.previous,
            "examples": list(self.examples),
        }


def _last_count(store: Store) -> int:
    au = schema.audit_events
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(au.c.details)
            .where(au.c.action == AUDIT_ACTION)
            .order_by(au.c.id.desc())
            .limit(1)
        ).first()
    return int((row.details or {}).get("approved_mined", 0)) if row is not None else 0


def propose_challenger(
    store: Store, config: Config, *, actor: str = "optimizer", force: bool = False
) -> Proposal | None:
    """Record and return a proposal; ``None`` if the bank has not grown enough (or ``force``)."""
    fs = config.fewshot
    bank = ExampleBank(store)
    servable = [e for e in bank.list(("approved", "pinned"))]
    approved_mined = sum(1 for e in servable if e.source == "mined")
    previous = _last_count(store)
    if not force and approved_mined - previous < fs.propose_after:
        return None
    if not servable:
        return None
    champion_id = config.experiment.champion
    arms = {a.id: a for a in config.experiment.arms}
    prompt = (
        arms[champion_id].prompt
        if champion_id in arms
        else (config.experiment.arms[0].prompt if arms else None)
    )
    if prompt is None:
        log.warning("no arms configured: cannot propose a challenger")
        return None
    ranked = sorted(
        servable,
        key=lambda e: (
            e.status != "pinned",
            -(e.reward if e.reward is not None else float("-inf")),
            e.id,
        ),
    )
    chosen = tuple(e.id for e in ranked[: fs.propose_k])
    arm_id = f"{prompt}+bank{approved_mined}"
    while arm_id in arms:
        arm_id += "b"
    arm = {"id": arm_id, "prompt": prompt, "fewshot": "fixed", "examples": list(chosen)}
    snippet = tomli_w.dumps({"experiment": {"arms": [arm]}})
    details = {"arm": arm, "toml": snippet, "approved_mined": approved_mined, "previous": previous}
    store.audit(actor, AUDIT_ACTION, arm_id, details)
    log.info("proposed challenger %s with examples %s", arm_id, list(chosen))
    return Proposal(arm, snippet, approved_mined, previous, chosen)
