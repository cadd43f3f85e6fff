"""A proposal round: champion + failures in, gated candidates out.

:func:`run_round` is what the optimizer job calls (with the serving process's
:class:`~optimizer.proposer.hooks.ProposerHooks`). A round runs only when it is
due (:func:`round_due`): the proposer is enabled, fewer than ``max_live``
proposed arms are live and fewer than ``max_live`` candidates wait for approval,
``min_interval_hours`` passed since the last round, the champion has
``min_new_negative`` new thumbs-down turns since then, today's spending is under
``max_cost_usd_per_day``, and the model is idle. It then:

1. reads the champion's prompt and a scrubbed sample of its failures
   (:mod:`optimizer.proposer.sample`);
2. asks the proposer model ``candidates`` times for a rewrite and its rationale,
   each request filled to the model's context budget (:mod:`~.rewrite`);
3. passes each through :func:`gate_candidate` — PII, format, duplicates, injection,
   replay, judges (:mod:`~.gates`) — and keeps every candidate with its verdict;
4. starts the passing ones (``auto_start``, within ``max_live``) or leaves them
   waiting for an operator, with a ``candidate_waiting`` alert.

Few-shot proposals and operator-written variants enter at step 3 through
:func:`submit_candidate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from optimizer.alerts import Alert
from optimizer.champion import champion_row
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.privacy import Scrubber, public_allowlist
from optimizer.proposer import gates, records
from optimizer.proposer.hooks import Completion, ProposerHooks
from optimizer.proposer.rewrite import fill_to_budget, parse_rewrite
from optimizer.proposer.sample import (
    failure_sample,
    new_negative_count,
    read_prompt_file,
    replay_set,
)
from optimizer.store import ACTIVE_STATUSES, Store

__all__ = [
    "Parent",
    "RoundResult",
    "gate_candidate",
    "live_proposals",
    "parent_of",
    "round_due",
    "run_round",
    "start_waiting",
    "submit_candidate",
]

log = logging.getLogger(__name__)

#: Seconds a round waits for the local model to be idle before it gives up until next time.
IDLE_WAIT_S = 10.0
_REWRITE_FILE = "rewrite.md"
_RATIONALE_FILE = "rationale.md"
_SEED_FILE = "replay_seed.md"


@dataclass(frozen=True)
class Parent:
    """The arm a candidate revises: its id, prompt id and text, few-shot settings, model."""

    arm_id: str
    prompt_id: str
    prompt_text: str
    fewshot: str = "none"
    fewshot_config: dict[str, Any] = field(default_factory=dict)
    model: str | None = None


@dataclass(frozen=True)
class RoundResult:
    """What a round did (``skipped`` says why nothing ran)."""

    round_id: str | None
    parent: str | None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "parent": self.parent,
            "candidates": self.candidates,
            "skipped": self.skipped,
            "cost_usd": self.cost_usd,
        }


def parent_of(store: Store, config: Config) -> Parent | None:
    """The champion as a :class:`Parent` (stored text, else its prompt file's)."""
    row = champion_row(store, config)
    if row is None:
        return None
    text = getattr(row, "prompt_text", None)
    if not text:
        from optimizer.prompt_library import load_prompts

        text = load_prompts(config.prompts_dir).variant(row.prompt_id).template
    return Parent(
        arm_id=str(row.id),
        prompt_id=str(row.prompt_id),
        prompt_text=str(text),
        fewshot=str(getattr(row, "fewshot", "none") or "none"),
        fewshot_config=dict(getattr(row, "fewshot_config", None) or {}),
        model=getattr(row, "model", None),
    )


def live_proposals(store: Store, experiment_id: str) -> list[str]:
    """Arms started from candidates that are still active and not the champion."""
    statuses = store.arm_statuses(experiment_id)
    started = records.candidates(store, experiment_id, status="started")
    return sorted(
        c.arm_id
        for c in started
        if c.arm_id is not None
        and statuses.get(c.arm_id) in ACTIVE_STATUSES
        and statuses.get(c.arm_id) != "champion"
    )


def start_waiting(store: Store, config: Config, *, now: datetime) -> list[records.Candidate]:
    """With ``auto_start``: start waiting proposals (oldest first) into free ``max_live`` slots.

    A round can leave passing candidates waiting when the slots were full; they go
    first when a trial ends, before any new round. Returns the candidates started.
    """
    pc = config.proposer
    if not pc.auto_start:
        return []
    exp = config.experiment.id
    free = pc.max_live - len(live_proposals(store, exp))
    if free <= 0:
        return []
    waiting = [
        c
        for c in reversed(records.candidates(store, exp, status="waiting"))
        if c.source == "proposer" and not any(not g.get("passed") for g in c.gates)
    ]
    out = []
    rows = {r.id: r for r in store.arms(exp)}
    from optimizer.prompt_library import content_hash

    for candidate in waiting[:free]:
        parent = rows.get(candidate.parent_arm_id)
        records.start_candidate(
            store,
            candidate,
            prompt_id=str(parent.prompt_id) if parent is not None else candidate.parent_arm_id,
            prompt_hash=content_hash(candidate.prompt_text or ""),
            model=parent.model if parent is not None else None,
            actor="optimizer",
            at=now,
            trial_cap=pc.trial_cap,
        )
        started = records.get_candidate(store, candidate.id)
        assert started is not None
        out.append(started)
    return out


def round_due(
    store: Store, config: Config, parent: Parent, *, now: datetime, hooks: ProposerHooks | None
) -> str | None:
    """None when a round should run, else why not (logged and returned by the job)."""
    pc = config.proposer
    exp = config.experiment.id
    if not pc.enabled:
        return "proposer disabled"
    live = live_proposals(store, exp)
    if len(live) >= pc.max_live:
        return f"{len(live)} proposed arms live (proposer.max_live = {pc.max_live})"
    waiting = records.candidates(store, exp, status="waiting")
    if len([c for c in waiting if c.source == "proposer"]) >= max(pc.max_live, 1):
        return f"{len(waiting)} candidates wait for approval (proposer.max_live = {pc.max_live})"
    last = records.last_round_at(store, exp)
    if last is not None and now - last < timedelta(hours=pc.min_interval_hours):
        return (
            f"last round at {last.isoformat()} "
            f"(proposer.min_interval_hours = {pc.min_interval_hours:g})"
        )
    negatives = new_negative_count(store, exp, parent.arm_id, since=last, until=now)
    if negatives < pc.min_new_negative:
        return (
            f"{negatives} new thumbs-down on {parent.arm_id!r} "
            f"(proposer.min_new_negative = {pc.min_new_negative})"
        )
    spent = records.spent_today(store, now)
    if pc.max_cost_usd_per_day and spent >= pc.max_cost_usd_per_day:
        return (
            f"spent ${spent:.4f} today "
            f"(proposer.max_cost_usd_per_day = {pc.max_cost_usd_per_day:g})"
        )
    if hooks is not None and not hooks.idle():
        return "the model is busy with chat turns"
    return None


class _Budget:
    """Spending of one round against the day's cap; every call goes through :meth:`call`."""

    def __init__(self, store: Store, config: Config, hooks: ProposerHooks, now: datetime) -> None:
        self.cap = config.proposer.max_cost_usd_per_day
        self.before = records.spent_today(store, now)
        self.spent = 0.0
        self.hooks = hooks
        self.calls = 0

    def exhausted(self) -> bool:
        return bool(self.cap) and self.before + self.spent >= self.cap

    def call(
        self,
        label: str,
        messages: list[dict[str, str]],
        *,
        model: str,
        max_tokens: int,
        temperature: float,
    ) -> Completion:
        if self.exhausted():
            return Completion("", 0.0, 0.0, "spending cap reached (proposer.max_cost_usd_per_day)")
        if not _wait_idle(self.hooks):
            return Completion("", 0.0, 0.0, "the model stayed busy with chat turns")
        result = self.hooks.complete(
            messages, model=model, max_tokens=max_tokens, temperature=temperature
        )
        self.calls += 1
        self.spent += float(result.cost_usd or 0.0)
        if self.hooks.trace is not None:
            try:
                self.hooks.trace(
                    f"proposer.{label}",
                    {
                        "model": model,
                        "latency_ms": result.latency_ms,
                        "cost_usd": result.cost_usd,
                        "error": result.error,
                    },
                )
            except Exception:  # tracing never breaks a round
                log.warning("proposer: tracing %s failed", label, exc_info=True)
        return result


def _wait_idle(hooks: ProposerHooks, timeout_s: float = IDLE_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not hooks.idle():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _scrubber(config: Config, parent: Parent) -> Scrubber:
    knowledge = ""
    try:
        from optimizer.prompt_library import load_prompts

        knowledge = load_prompts(config.prompts_dir).knowledge
    except Exception:  # no prompts folder (simulations, tests): nothing public to allow
        knowledge = ""
    return Scrubber(allow=public_allowlist(knowledge, parent.prompt_text))


def _proposer_dir(config: Config) -> Path:
    own = Path(config.prompts_dir) / "proposer"
    if (own / _REWRITE_FILE).exists():
        return own
    return Path(__file__).resolve().parents[2] / "prompts" / "proposer"


def run_round(
    store: Store,
    config: Config,
    hooks: ProposerHooks,
    *,
    now: datetime | None = None,
    alerts: Any | None = None,
    force: bool = False,
) -> RoundResult:
    """Run a round if due (``force``: whatever the budget says, but not past the cost cap)."""
    now = as_utc(now) if now is not None else utcnow()
    pc = config.proposer
    exp = config.experiment.id
    parent = parent_of(store, config)
    if parent is None:
        return RoundResult(None, None, skipped="no champion")
    started = start_waiting(store, config, now=now)
    if started:
        return RoundResult(
            None,
            parent.arm_id,
            [{"id": c.id, "status": c.status, "arm_id": c.arm_id} for c in started],
            skipped="started waiting candidates into free slots",
        )
    reason = None if force else round_due(store, config, parent, now=now, hooks=hooks)
    if reason is not None:
        log.info("proposer: no round for %r: %s", exp, reason)
        return RoundResult(None, parent.arm_id, skipped=reason)
    model = pc.model or config.model.name
    scrubber = _scrubber(config, parent)
    failures = failure_sample(
        store, config, parent.arm_id, now=now, limit=pc.sample_turns, scrubber=scrubber
    )
    folder = _proposer_dir(config)
    template = read_prompt_file(folder / _REWRITE_FILE)
    context = pc.context_tokens or config.model.context_tokens
    budget_tokens = context - pc.max_tokens - 16
    budget = _Budget(store, config, hooks, now)
    untrusted = [t for f in failures for t in (f.user_message, f.comment or "") if t]
    replay_qs = replay_set(
        store,
        exp,
        n=pc.replay_questions,
        exclude={f.user_message for f in failures},
        scrubber=scrubber,
        seed_path=folder / _SEED_FILE,
    )
    parent_latency = _parent_latency(budget, config, parent, replay_qs)
    produced: list[tuple[str, str, dict[str, Any]]] = []
    for k in range(1, pc.candidates + 1):
        request, used = fill_to_budget(
            template,
            fields={
                "current_prompt": parent.prompt_text.strip(),
                "candidate": str(k),
                "candidates": str(pc.candidates),
            },
            failures=failures,
            budget_tokens=budget_tokens,
            tokens=hooks.tokens,
        )
        reply = budget.call(
            "rewrite",
            [{"role": "user", "content": request}],
            model=model,
            max_tokens=pc.max_tokens,
            temperature=pc.temperature,
        )
        if reply.error:
            produced.append(("", "", {"error": reply.error, "failures_used": used}))
            if budget.exhausted() or "busy" in reply.error:
                break
            continue
        text, rationale = parse_rewrite(reply.text)
        if text and not gates.usable_rationale(rationale):
            rationale = _ask_rationale(budget, config, folder, parent, text, failures, model)
        produced.append((text, rationale, {"failures_used": used, "raw": reply.text[:4000]}))
    round_id = records.record_round(
        store,
        exp,
        parent.arm_id,
        source="proposer",
        model=model,
        cost_usd=budget.spent,
        details={
            "failures": len(failures),
            "thumbs_down": sum(f.kind == "thumbs_down" for f in failures),
            "low_kpi": sum(f.kind == "low_kpi" for f in failures),
            "replay_questions": len(replay_qs),
            "calls": budget.calls,
            "requested": pc.candidates,
        },
        at=now,
    )
    out = []
    for text, rationale, info in produced:
        if info.get("error"):
            cid = records.record_candidate(
                store,
                round_id=round_id,
                experiment_id=exp,
                parent_arm_id=parent.arm_id,
                source="proposer",
                prompt_text=None,
                fewshot=parent.fewshot,
                fewshot_config=parent.fewshot_config,
                rationale="",
                status="rejected",
                reason=f"the proposer model failed: {info['error']}",
                gates=[],
                at=now,
            )
            out.append({"id": cid, "status": "rejected", "reason": info["error"]})
            continue
        candidate = gate_candidate(
            store,
            config,
            budget,
            parent=parent,
            round_id=round_id,
            source="proposer",
            prompt_text=text,
            rationale=rationale,
            fewshot=parent.fewshot,
            fewshot_config=parent.fewshot_config,
            untrusted=untrusted,
            replay_qs=replay_qs,
            parent_latency=parent_latency,
            scrubber=scrubber,
            now=now,
            alerts=alerts,
            start=None,
            request=template,
        )
        out.append(
            {
                "id": candidate.id,
                "status": candidate.status,
                "reason": candidate.reason,
                "arm_id": candidate.arm_id,
            }
        )
    log.info(
        "proposer: round %s on %r: %s (cost $%.4f)",
        round_id,
        parent.arm_id,
        [c["status"] for c in out],
        budget.spent,
    )
    return RoundResult(round_id, parent.arm_id, out, None, round(budget.spent, 6))


def _parent_latency(
    budget: _Budget, config: Config, parent: Parent, questions: Sequence[str]
) -> float | None:
    replies = _replay(budget, config, parent.prompt_text, questions, parent.model)
    ok = [r.latency_ms for r in replies if not r.error]
    if not ok:
        return None
    import numpy as np

    return float(np.percentile(ok, 95))


def _replay(
    budget: _Budget, config: Config, text: str, questions: Sequence[str], model: str | None
) -> list[Completion]:
    out = []
    for q in questions:
        messages = [{"role": "system", "content": text}, {"role": "user", "content": q}]
        if budget.hooks.reply is not None:
            if not _wait_idle(budget.hooks):
                out.append(Completion("", 0.0, 0.0, "the model stayed busy with chat turns"))
                continue
            out.append(budget.hooks.reply(text, q))
            continue
        out.append(
            budget.call(
                "replay",
                messages,
                model=model or config.model.name,
                max_tokens=config.model.max_tokens,
                temperature=config.model.temperature,
            )
        )
    return out


def _latency_recheck(
    budget: _Budget, config: Config, parent: Parent, text: str, questions: Sequence[str]
) -> gates.GateResult:
    """Measure parent and candidate again, interleaved question by question, and judge that.

    The first verdict compares two batches run at different moments; on a shared
    machine (a local model next to the web server) load alone can make the second
    slower. Interleaving exposes both to the same load; the second verdict stands.
    """
    import numpy as np

    mine: list[Completion] = []
    theirs: list[float] = []
    for q in questions:
        theirs += [
            r.latency_ms
            for r in _replay(budget, config, parent.prompt_text, [q], parent.model)
            if not r.error
        ]
        mine += _replay(budget, config, text, [q], parent.model)
    parent_p95 = float(np.percentile(theirs, 95)) if theirs else None
    result = gates.replay_gate(mine, parent_p95, max_latency_ratio=_latency_ratio(config))
    return gates.GateResult(
        result.name, result.passed, result.detail, {**result.data, "rechecked": True}
    )


def _ask_rationale(
    budget: _Budget,
    config: Config,
    folder: Path,
    parent: Parent,
    text: str,
    failures: Sequence[Any],
    model: str,
) -> str:
    template = read_prompt_file(folder / _RATIONALE_FILE)
    context = config.proposer.context_tokens or config.model.context_tokens
    request, _ = fill_to_budget(
        template,
        fields={"current_prompt": parent.prompt_text.strip(), "new_prompt": text},
        failures=failures,
        budget_tokens=context - 200 - 16,
        tokens=budget.hooks.tokens,
    )
    reply = budget.call(
        "rationale",
        [{"role": "user", "content": request}],
        model=model,
        max_tokens=200,
        temperature=0.3,
    )
    return " ".join(reply.text.split()) if not reply.error else ""


def _judge(budget: _Budget, config: Config, text: str) -> list[gates.GateResult]:
    out = []
    model = config.proposer.model or config.model.name
    for judge in config.proposer.judges:
        reply = budget.call(
            f"judge.{judge.name}",
            [
                {
                    "role": "user",
                    "content": (
                        "Here are the instructions of a customer-support assistant:\n"
                        f"<<<\n{text}\n>>>\n\n{judge.question}\nAnswer YES or NO."
                    ),
                }
            ],
            model=model,
            max_tokens=5,
            temperature=0.0,
        )
        name = f"judge:{judge.name}"
        if reply.error:
            out.append(gates.GateResult(name, False, f"judge failed: {reply.error}"))
            break
        words = reply.text.strip().lower().split()
        answer = words[0].strip(".,!:") if words else ""
        if answer not in ("yes", "no"):
            out.append(gates.GateResult(name, False, f"judge answered {reply.text.strip()[:40]!r}"))
            break
        passed = answer == judge.pass_on
        out.append(gates.GateResult(name, passed, "" if passed else f"judge answered {answer!r}"))
        if not passed:
            break
    return out


def gate_candidate(
    store: Store,
    config: Config,
    budget: _Budget | None,
    *,
    parent: Parent,
    round_id: str,
    source: str,
    prompt_text: str,
    rationale: str,
    fewshot: str,
    fewshot_config: dict[str, Any],
    untrusted: Sequence[str],
    replay_qs: Sequence[str],
    parent_latency: float | None,
    scrubber: Scrubber,
    now: datetime,
    alerts: Any | None,
    start: bool | None,
    request: str = "",
    arm_id: str | None = None,
) -> records.Candidate:
    """Run the gates in order, record the candidate, start it or leave it waiting.

    ``budget`` None (no model handed in): replay and judges cannot run, so the
    candidate waits for an operator whatever ``auto_start`` says. ``start`` None
    follows ``proposer.auto_start``.
    """
    pc = config.proposer
    exp = config.experiment.id
    results: list[gates.GateResult] = []
    text, pii = gates.pii_gate(prompt_text, scrubber)
    results.append(pii)
    rationale = scrubber.scrub(rationale) if rationale else rationale
    status, reason = "waiting", None
    if pii.passed:
        fmt = gates.format_gate(
            text,
            parent.prompt_text
            if fewshot == parent.fewshot and fewshot_config == parent.fewshot_config
            else "",
            min_chars=pc.min_prompt_chars,
            max_chars=pc.max_prompt_chars,
            request=request,
            rationale=rationale if source == "proposer" else None,
        )
        results.append(fmt)
    if all(r.passed for r in results):
        others = _existing_texts(store, config, fewshot, fewshot_config)
        sim = gates.similarity(text, others) if source != "fewshot" else 0.0
        dup = sim >= pc.dedup_threshold
        results.append(
            gates.GateResult(
                "duplicate",
                not dup,
                f"similarity {sim:.2f} to an existing arm or candidate "
                f"(limit {pc.dedup_threshold:g})"
                if dup
                else "",
                {"similarity": round(sim, 3)},
            )
        )
        if dup:
            status = "duplicate"
    if all(r.passed for r in results):
        results.append(gates.injection_gate(text, untrusted, scrubber, parent=parent.prompt_text))
    if all(r.passed for r in results):
        if budget is None:
            results.append(
                gates.GateResult("replay", False, "not run: no model handed in", {"skipped": True})
            )
        else:
            replies = _replay(budget, config, text, replay_qs, parent.model)
            replay = gates.replay_gate(
                replies, parent_latency, max_latency_ratio=_latency_ratio(config)
            )
            if not replay.passed and "latency" in replay.detail:
                replay = _latency_recheck(budget, config, parent, text, replay_qs)
            results.append(replay)
            if results[-1].passed:
                results.extend(_judge(budget, config, text))
    failed = next((r for r in results if not r.passed), None)
    if failed is not None and not failed.data.get("skipped"):
        status = "duplicate" if failed.name == "duplicate" else "rejected"
        reason = f"{failed.name}: {failed.detail}"
    elif failed is not None:
        reason = f"{failed.name}: {failed.detail}"
    cid = records.record_candidate(
        store,
        round_id=round_id,
        experiment_id=exp,
        parent_arm_id=parent.arm_id,
        source=source,
        prompt_text=text,
        fewshot=fewshot,
        fewshot_config=fewshot_config,
        rationale=rationale,
        status=status,
        reason=reason,
        gates=[r.as_dict() for r in results],
        at=now,
    )
    candidate = records.get_candidate(store, cid)
    assert candidate is not None
    if status != "waiting":
        log.info("proposer: candidate %s %s (%s)", cid, status, reason)
        return candidate
    wants_start = pc.auto_start if start is None else start
    can_start = failed is None and (
        source == "operator" or len(live_proposals(store, exp)) < pc.max_live
    )
    if wants_start and can_start:
        from optimizer.prompt_library import content_hash

        records.start_candidate(
            store,
            candidate,
            prompt_id=parent.prompt_id,
            prompt_hash=content_hash(text),
            model=parent.model,
            actor="optimizer" if source != "operator" else "operator",
            at=now,
            trial_cap=pc.trial_cap if source != "operator" else 1.0,
            arm_id=arm_id,
        )
    elif alerts is not None:
        alerts.emit(
            Alert(
                "candidate_waiting",
                f"Flywheel {exp}: a new {source} candidate for {parent.arm_id!r} waits for "
                f"approval: {rationale[:200] or '(no rationale)'}",
                exp,
                parent.arm_id,
                {"candidate_id": cid, "source": source},
                at=now,
            )
        )
    updated = records.get_candidate(store, cid)
    assert updated is not None
    return updated


def submit_candidate(
    store: Store,
    config: Config,
    hooks: ProposerHooks | None,
    *,
    prompt_text: str,
    rationale: str,
    source: str,
    fewshot: str | None = None,
    fewshot_config: dict[str, Any] | None = None,
    parent: Parent | None = None,
    start: bool | None = None,
    now: datetime | None = None,
    alerts: Any | None = None,
    untrusted: Sequence[str] = (),
    arm_id: str | None = None,
) -> records.Candidate:
    """Gate a candidate written elsewhere: a few-shot proposal or an operator's variant.

    It is recorded in a round of its own (``source``); the gates are the same as
    a proposer round's. ``start`` True: start it when it passes (an operator's
    own variant); None: ``proposer.auto_start``.
    """
    now = as_utc(now) if now is not None else utcnow()
    parent = parent or parent_of(store, config)
    if parent is None:
        raise ValueError("no champion to propose against: the experiment has no arms")
    scrubber = _scrubber(config, parent)
    budget = _Budget(store, config, hooks, now) if hooks is not None else None
    folder = _proposer_dir(config)
    replay_qs = replay_set(
        store,
        config.experiment.id,
        n=config.proposer.replay_questions,
        exclude=set(),
        scrubber=scrubber,
        seed_path=folder / _SEED_FILE,
    )
    parent_latency = _parent_latency(budget, config, parent, replay_qs) if budget else None
    round_id = records.record_round(
        store,
        config.experiment.id,
        parent.arm_id,
        source=source,
        model=None,
        cost_usd=0.0,
        details={"replay_questions": len(replay_qs)},
        at=now,
    )
    candidate = gate_candidate(
        store,
        config,
        budget,
        parent=parent,
        round_id=round_id,
        source=source,
        prompt_text=prompt_text,
        rationale=rationale,
        fewshot=fewshot if fewshot is not None else parent.fewshot,
        fewshot_config=fewshot_config if fewshot_config is not None else parent.fewshot_config,
        untrusted=untrusted,
        replay_qs=replay_qs,
        parent_latency=parent_latency,
        scrubber=scrubber,
        now=now,
        alerts=alerts,
        start=start,
        arm_id=arm_id,
    )
    if budget is not None and budget.spent:
        records.add_round_cost(store, round_id, budget.spent)
    return candidate


def _latency_ratio(config: Config) -> float | None:
    for g in config.kpi.guardrails:
        if g.metric == "latency_p95_ms":
            return g.max_ratio
    return None


def _existing_texts(
    store: Store, config: Config, fewshot: str, fewshot_config: dict[str, Any]
) -> list[str]:
    """Prompt texts of the experiment's arms and of candidates waiting or started, with the
    same few-shot setting (a known prompt with another few-shot strategy is a new arm)."""
    exp = config.experiment.id
    texts = [
        str(r.prompt_text)
        for r in store.arms(exp)
        if r.prompt_text and r.fewshot == fewshot and dict(r.fewshot_config or {}) == fewshot_config
    ]
    if not texts:
        try:
            from optimizer.prompt_library import load_prompts

            texts = [v.template for v in load_prompts(config.prompts_dir).variants.values()]
        except Exception:  # no prompts folder: nothing to compare with
            texts = []
    texts += [
        c.prompt_text
        for c in records.candidates(store, exp, status=("waiting", "started"))
        if c.prompt_text and c.fewshot == fewshot and c.fewshot_config == fewshot_config
    ]
    return texts
