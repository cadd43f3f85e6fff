"""What the operator's buttons do: plain functions, testable without HTTP.

Every action is recorded twice, on purpose: as an arm event (the optimizer and
the Assigner derive arm statuses from those) and as an audit event (who did
what, when, from the dashboard). Then the optimizer runs, so the next snapshot
reflects the change, and the process's Assigner forgets its cached snapshot,
so the very next assignment does too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from optimizer.assignment import Assigner
from optimizer.config import Config
from optimizer.store import ACTIVE_STATUSES, Store

log = logging.getLogger(__name__)

__all__ = [
    "ARM_ACTIONS",
    "CANDIDATE_DECISIONS",
    "EXAMPLE_DECISIONS",
    "ActionError",
    "ActionResult",
    "Services",
    "add_variant",
    "arm_action",
    "available_actions",
    "candidates_view",
    "decide_candidate",
    "refresh_policy",
    "review_example",
    "run_optimizer_now",
]

#: Dashboard action → arm event kind.
ARM_ACTIONS = {
    "pause": "paused_operator",
    "resume": "resumed",
    "promote": "promoted",
    "retire": "retired",
    "cap": "cap_set",
}


def available_actions(status: str) -> list[tuple[str, str]]:
    """(action, button label) pairs an arm in ``status`` offers (:func:`arm_action` enforces them).

    >>> [a for a, _ in available_actions("paused_guardrail")]
    ['resume', 'promote', 'retire']
    """
    offered = []
    if status == "active":
        offered.append(("pause", "Pause"))
    if status.startswith("paused"):
        offered.append(("resume", "Resume"))
    if status != "champion":
        offered.append(("promote", "Promote"))
    if status not in ("champion", "retired"):
        offered.append(("retire", "Retire"))
    return offered


class Services(Protocol):
    """What the dashboard needs from the process (``chatbot.runtime.Runtime`` provides it)."""

    config: Config
    store: Store
    assigner: Assigner


class ActionError(ValueError):
    """An action that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ActionResult:
    message: str
    snapshot_version: int | None = None


def arm_action(
    services: Services, actor: str, arm_id: str, action: str, *, cap: float | None = None
) -> ActionResult:
    """Apply a dashboard action to an arm of the configured experiment.

    Raises :class:`ActionError` (404 unknown arm, 400 bad value, 409 not allowed
    in the arm's current status).
    """
    if action not in ARM_ACTIONS:
        raise ActionError(f"action must be one of {sorted(ARM_ACTIONS)}, got {action!r}", 400)
    store, exp = services.store, services.config.experiment
    known = {row.id for row in store.arms(exp.id)}
    if arm_id not in known:
        raise ActionError(f"no arm {arm_id!r} in experiment {exp.id!r}", 404)
    statuses = store.arm_statuses(exp.id)
    status = statuses.get(arm_id, "active")
    served = [a for a in known if statuses.get(a, "active") in ACTIVE_STATUSES]
    evidence: dict[str, Any] = {"via": "operator dashboard", "previous_status": status}

    if action in ("pause", "retire"):
        if status == "champion":
            raise ActionError(
                f"{arm_id!r} is the champion: promote another arm before you {action} it"
            )
        if action == "pause" and status not in ACTIVE_STATUSES:
            raise ActionError(f"{arm_id!r} is not active (it is {status}); nothing to pause")
        if action == "retire" and status == "retired":
            raise ActionError(f"{arm_id!r} is already retired")
        if served == [arm_id]:
            raise ActionError(f"{arm_id!r} is the only arm served; at least one must stay active")
    elif action == "resume" and not status.startswith("paused"):
        raise ActionError(f"{arm_id!r} is not paused (it is {status}); nothing to resume")
    elif action == "promote" and status == "champion":
        raise ActionError(f"{arm_id!r} is already the champion")
    elif action == "cap":
        if cap is None or not math.isfinite(cap) or not 0 < cap <= 1:
            raise ActionError(f"cap must be a share in (0, 1], got {cap!r}", 400)
        evidence["cap"] = cap

    store.record_arm_event(exp.id, arm_id, ARM_ACTIONS[action], actor=actor, evidence=evidence)
    store.audit(actor, f"arm.{action}", arm_id, {"experiment": exp.id, **evidence})
    version = refresh_policy(services, actor)
    done = {
        "pause": "paused",
        "resume": "resumed",
        "promote": "promoted to champion",
        "retire": "retired",
        "cap": f"capped at {cap:.0%}" if cap is not None else "capped",
    }[action]
    return ActionResult(f"{arm_id} {done}{_snapshot_note(version)}", version)


#: Longest prompt text the dashboard accepts for a new variant (the form body is capped at
#: ``routes.MAX_FORM_BYTES``; longer prompts go through ``flywheel arms add``).
MAX_PROMPT_CHARS = 3000


def add_variant(
    services: Services,
    actor: str,
    arm_id: str,
    prompt: str,
    *,
    fewshot: str = "none",
    k: int = 3,
    model: str | None = None,
    api_base: str | None = None,
) -> ActionResult:
    """Create an arm (or a new version of ``arm_id``) from a prompt text, audited, and refit.

    ``model`` (a litellm model string; None: the configured model) and its
    ``api_base``, which must be in ``model.allowed_api_bases``.

    Every replica serves it from the snapshot written now (within its snapshot
    cache time). Raises :class:`ActionError` (400 bad input, 409 content already
    known under that id). Undo by retiring it.
    """
    from optimizer.config import ArmConfig
    from optimizer.models import check_model_params
    from optimizer.prompt_library import content_hash
    from optimizer.store import ArmSpec

    text = prompt.replace("\r\n", "\n").strip()
    if not text:
        raise ActionError("prompt must not be empty", 400)
    if len(text) > MAX_PROMPT_CHARS:
        raise ActionError(
            f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}", 400
        )
    if fewshot not in ("none", "retrieved"):
        raise ActionError(f"fewshot must be 'none' or 'retrieved', got {fewshot!r}", 400)
    try:
        arm = ArmConfig.model_validate({"id": arm_id, "prompt": arm_id, "fewshot": fewshot, "k": k})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ActionError(f"invalid variant: {where}: {first['msg']}", 400) from None
    try:
        model_params = check_model_params(
            model,
            {"api_base": api_base} if api_base else {},
            services.config.model.allowed_api_bases,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ActionError(f"invalid model: {first['msg']}", 400) from None
    except ValueError as exc:
        raise ActionError(f"invalid model: {exc}", 400) from None
    settings: dict[str, Any] = (
        {"k": arm.k, "reward_weighted": False} if fewshot == "retrieved" else {}
    )
    exp = services.config.experiment
    if services.config.proposer.enabled and model is None and not model_params:
        # A new prompt text goes through the proposer's gates; a known prompt on another
        # model is a model change (allow-list checked above), added directly.
        return _gated_variant(services, actor, arm.id, text, arm.fewshot, settings)
    spec = ArmSpec(
        arm.id,
        arm.id,
        content_hash(text),
        arm.fewshot,
        settings,
        prompt_text=text,
        origin="operator",
        model=model,
        model_params=model_params,
    )
    try:
        new_id, what = services.store.add_arm(exp.id, spec, actor=actor)
    except ValueError as exc:
        raise ActionError(str(exc), 400) from None
    if what == "known":
        raise ActionError(
            f"{arm_id!r} already serves exactly this prompt, few-shot setting and model"
        )
    version = refresh_policy(services, actor)
    verb = "created" if what == "created" else "added as a new version"
    return ActionResult(f"{new_id} {verb}{_snapshot_note(version)}", version)


def _gated_variant(
    services: Services,
    actor: str,
    arm_id: str,
    text: str,
    fewshot: str,
    settings: dict[str, Any],
) -> ActionResult:
    """An operator's variant through the proposer's gates; started at once when it passes."""
    from optimizer.prompt_library import content_hash
    from optimizer.proposer import submit_candidate
    from optimizer.store.versions import arm_content_hash, row_content_hash

    digest = arm_content_hash(content_hash(text), fewshot, settings)
    for row in services.store.arms(services.config.experiment.id):
        if (row.base_id or row.id) == arm_id and row_content_hash(row) == digest:
            raise ActionError(f"{arm_id!r} already serves exactly this prompt and few-shot setting")
    try:
        candidate = submit_candidate(
            services.store,
            services.config,
            getattr(services, "proposer_hooks", None),
            prompt_text=text,
            rationale=f"written by {actor} in the dashboard",
            source="operator",
            fewshot=fewshot,
            fewshot_config=settings,
            start=True,
            arm_id=arm_id,
        )
    except ValueError as exc:
        raise ActionError(str(exc), 400) from None
    if candidate.status in ("rejected", "duplicate"):
        raise ActionError(f"the gates refused the variant: {candidate.reason}", 422)
    if candidate.status == "waiting":
        return ActionResult(
            f"variant kept as candidate {candidate.id[:8]}: {candidate.reason}; approve it on "
            "the candidates page"
        )
    version = refresh_policy(services, actor)
    return ActionResult(
        f"{candidate.arm_id} created after passing the gates{_snapshot_note(version)}", version
    )


#: A candidate's decision on the candidates page → approve (start its arm) or decline.
CANDIDATE_DECISIONS = ("approve", "decline")


def decide_candidate(
    services: Services, actor: str, candidate_id: str, decision: str
) -> ActionResult:
    """One click on the candidates page. Raises :class:`ActionError` (400, 404, 409)."""
    from optimizer.errors import StoreError
    from optimizer.prompt_library import content_hash
    from optimizer.proposer import decide, get_candidate

    if decision not in CANDIDATE_DECISIONS:
        raise ActionError(
            f"decision must be one of {list(CANDIDATE_DECISIONS)}, got {decision!r}", 400
        )
    candidate = get_candidate(services.store, candidate_id)
    if candidate is None or candidate.experiment_id != services.config.experiment.id:
        raise ActionError(f"no candidate {candidate_id!r}", 404)
    parent = next(
        (
            r
            for r in services.store.arms(candidate.experiment_id)
            if r.id == candidate.parent_arm_id
        ),
        None,
    )
    try:
        decided = decide(
            services.store,
            candidate_id,
            approve=decision == "approve",
            actor=actor,
            **(
                {
                    "prompt_id": parent.prompt_id
                    if parent is not None
                    else candidate.parent_arm_id,
                    "prompt_hash": content_hash(candidate.prompt_text or ""),
                    "model": parent.model if parent is not None else None,
                    "trial_cap": services.config.proposer.trial_cap,
                }
                if decision == "approve"
                else {}
            ),
        )
    except StoreError as exc:
        raise ActionError(str(exc), 409) from None
    if decision == "approve":
        version = refresh_policy(services, actor)
        return ActionResult(f"{decided.arm_id} started{_snapshot_note(version)}", version)
    return ActionResult(f"candidate {candidate_id[:8]} declined")


def candidates_view(services: Services) -> dict[str, Any]:
    """The candidates page: each candidate with its parent's text and a line diff to it."""
    import difflib

    from optimizer.proposer import candidates

    exp = services.config.experiment.id
    texts = {r.id: r.prompt_text or "" for r in services.store.arms(exp)}
    items: list[dict[str, Any]] = []
    for c in candidates(services.store, exp)[:100]:
        parent = texts.get(c.parent_arm_id, "")
        diff = list(
            difflib.unified_diff(
                parent.splitlines(),
                (c.prompt_text or "").splitlines(),
                fromfile=c.parent_arm_id,
                tofile="candidate",
                lineterm="",
            )
        )
        items.append({"c": c, "parent": parent, "diff": diff})
    return {
        "waiting": [i for i in items if i["c"].status == "waiting"],
        "others": [i for i in items if i["c"].status != "waiting"],
    }


#: Few-shot review decision → bank status.
EXAMPLE_DECISIONS = {"approve": "approved", "reject": "rejected"}


def review_example(
    services: Services, actor: str, example_id: str, decision: str, *, reason: str | None = None
) -> ActionResult:
    """Approve or reject a bank example; retrieval sees it from the next turn on.

    Raises :class:`ActionError` (404 unknown example, 400 unknown decision).
    """
    from optimizer.fewshot import ExampleBank

    if decision not in EXAMPLE_DECISIONS:
        raise ActionError(
            f"decision must be one of {sorted(EXAMPLE_DECISIONS)}, got {decision!r}", 400
        )
    bank = ExampleBank(services.store)
    example = bank.get(example_id)
    if example is None:
        raise ActionError(f"no example {example_id!r} in the bank", 404)
    status = EXAMPLE_DECISIONS[decision]
    bank.set_status(example_id, status, actor=actor, reason=reason or None)
    services.store.audit(
        actor, f"example.{decision}", example_id, {"from": example.status, "reason": reason or None}
    )
    selector = getattr(services, "selector", None)
    if selector is not None:
        selector.refresh()  # the chat path's cached index, rebuilt on the next turn
    return ActionResult(f"example {example_id} {status}")


def run_optimizer_now(services: Services, actor: str) -> ActionResult:
    """Fit and write a snapshot now (the background job would otherwise wait its interval)."""
    services.store.audit(
        actor, "optimizer.run", services.config.experiment.id, {"via": "operator dashboard"}
    )
    version = refresh_policy(services, actor)
    if version is None:
        return ActionResult("the optimizer is already running elsewhere; its snapshot will follow")
    return ActionResult(f"optimizer ran{_snapshot_note(version)}", version)


def refresh_policy(services: Services, actor: str) -> int | None:
    """Run the optimizer (new snapshot) and drop the Assigner's cache; the snapshot version or None.

    None when another process holds the optimizer lock: the arm statuses still
    apply at once, because the Assigner serves only active arms.
    """
    from optimizer.refit import run_optimizer

    try:
        run = run_optimizer(services.store, services.config, actor=actor)
    finally:
        services.assigner.invalidate()
    return getattr(run, "snapshot_version", None) if run is not None else None


def _snapshot_note(version: int | None) -> str:
    return f"; policy snapshot v{version} written" if version is not None else ""


def reattribute_outcomes(services: Services, actor: str) -> ActionResult:
    """Re-judge the unattributed outcomes (:func:`optimizer.attribution.reattribute`), audited."""
    from optimizer.attribution import reattribute

    counts = reattribute(services.store, services.config)
    services.store.audit(
        actor,
        "outcomes.reattribute",
        services.config.experiment.id,
        {"via": "operator dashboard", "verdicts": counts},
    )
    if not counts:
        return ActionResult("nothing to re-judge: every stored outcome is attributed")
    verdicts = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
    return ActionResult(f"re-judged outcomes: {verdicts}")
