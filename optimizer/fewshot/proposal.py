"""Propose a challenger arm when the example bank has grown.

When at least ``fewshot.propose_after`` mined examples were approved (or
pinned) since the last proposal, propose the champion's prompt × a ``fixed``
set of the ``propose_k`` best examples (pinned first, then by the reward of the
session they came from). The champion is the one in the store — promoted by
the stop rule, an operator or the file, whichever came last — and its stored
prompt text is the parent's. With ``fewshot.propose_adds_arm`` (the default) the
proposal is created as an arm in the store at once (origin ``optimizer``) and
every replica serves it from the next snapshot, under its burn-in share, the
challenger cap and the guardrails; either way it is recorded as an audit event
(``fewshot_challenger_proposed``, with a TOML snippet). Undo by retiring it.

With ``proposer.enabled`` (the default) the proposal goes through the proposer's
path instead (:func:`optimizer.proposer.submit_candidate`, source ``fewshot``):
the same gates as a written challenger (the examples' texts count as untrusted
input for the injection gate, the replay runs through the model handed in as
``hooks``), kept as a candidate; ``propose_adds_arm`` starts it when it passes,
else it waits for one-click approval. Without a model handed in (the CLI) the
replay cannot run and the candidate waits for an operator. No TOML to paste.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import tomli_w

from optimizer.champion import champion_row
from optimizer.config import Config
from optimizer.fewshot.bank import ExampleBank
from optimizer.store import ArmSpec, Store, schema

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
    #: The proposer candidate it became (id, status, reason, arm id), when gated.
    candidate: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "toml": self.toml,
            "approved_mined": self.approved_mined,
            "previous": self.previous,
            "examples": list(self.examples),
            "candidate": self.candidate,
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
    store: Store,
    config: Config,
    *,
    actor: str = "optimizer",
    force: bool = False,
    hooks: Any | None = None,
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
    exp = config.experiment
    champion = _champion(store, config)
    if champion is None:
        log.warning("no arms configured or stored: cannot propose a challenger")
        return None
    prompt = str(champion.prompt_id)
    arms = {r.id for r in store.arms(exp.id)} | {a.id for a in exp.arms}  # ids taken
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
    details: dict[str, Any] = {
        "arm": arm,
        "toml": snippet,
        "approved_mined": approved_mined,
        "previous": previous,
        "parent": champion.id,
    }
    stored = {r.id for r in store.arms(exp.id)}
    candidate = None
    if config.proposer.enabled and champion.id in stored:  # through the proposer's gates
        from optimizer.proposer import parent_of, submit_candidate

        parent = parent_of(store, config)
        if parent is not None:
            gated = submit_candidate(
                store,
                config,
                hooks,
                prompt_text=parent.prompt_text,
                rationale=(
                    f"The {len(chosen)} best approved examples of the bank "
                    f"({approved_mined} mined and approved so far) as fixed few-shot examples "
                    f"for the champion {champion.id!r}."
                ),
                source="fewshot",
                fewshot="fixed",
                fewshot_config={"examples": list(chosen)},
                parent=parent,
                start=config.fewshot.propose_adds_arm,
                untrusted=[
                    t for e in ranked[: fs.propose_k] for t in (e.user_text, e.assistant_text)
                ],
            )
            candidate = {
                "id": gated.id,
                "status": gated.status,
                "reason": gated.reason,
                "arm_id": gated.arm_id,
            }
            details["candidate"] = candidate
            if gated.arm_id:
                details["added"] = gated.arm_id
    elif config.fewshot.propose_adds_arm and champion.id in stored:  # a registered experiment
        spec = ArmSpec(
            arm_id,
            prompt,
            champion.prompt_hash,
            "fixed",
            {"examples": list(chosen)},
            prompt_text=champion.prompt_text,
            model=champion.model,
            origin="optimizer",
        )
        details["added"], _ = store.add_arm(exp.id, spec, actor=actor)
    store.audit(actor, AUDIT_ACTION, arm_id, details)
    log.info("proposed challenger %s (parent %s) with examples %s", arm_id, champion.id, chosen)
    return Proposal(arm, snippet, approved_mined, previous, chosen, candidate)


def _champion(store: Store, config: Config) -> Any:
    """The champion's stored arm row (see :func:`optimizer.champion.champion_row`)."""
    return champion_row(store, config)
