"""The proposer's own LLM calls in Langfuse, asserted on what reaches a recording server.

A real round on a real store, the real Langfuse SDK sending OTLP and scores to
127.0.0.1 (tests/support); only the proposer model is a scripted completion
function at the boundary (as in tests/optimizer/test_proposer.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from chatbot.langfuse.credentials import LangfuseCredentials
from chatbot.langfuse.ids import trace_id_for_round
from chatbot.langfuse.tracer import LangfuseTracer, NoopTracer
from optimizer.config import LangfuseConfig, ProposerJudgeConfig
from optimizer.proposer import ProposerHooks, candidates, run_round, submit_candidate
from optimizer.proposer.records import rounds
from optimizer.store import Store
from tests.optimizer.test_proposer import (
    CHAMPION_TEXT,
    EXP,
    GOOD,
    GOOD_2,
    NOW,
    FakeModel,
    make_config,
    seed_store,
)
from tests.support.langfuse_recorder import LangfuseRecorder, RecordedSpan


@pytest.fixture
def recorder() -> Iterator[LangfuseRecorder]:
    with LangfuseRecorder(public_key=f"pk-lf-{uuid.uuid4().hex[:12]}") as rec:
        yield rec


def tracer_for(rec: LangfuseRecorder) -> LangfuseTracer:
    config = LangfuseConfig(request_timeout_s=2.0, flush_timeout_s=5.0)
    creds = LangfuseCredentials(rec.public_key, rec.secret_key, rec.base_url)
    return LangfuseTracer(creds, config, prompt_versions=lambda prompt_id, prompt_hash: None)


def generations(spans: list[RecordedSpan]) -> list[RecordedSpan]:
    return [s for s in spans if s.attributes.get("langfuse.observation.type") == "generation"]


def test_a_round_is_one_trace_with_its_calls_candidates_gates_and_scores(
    store: Store, recorder: LangfuseRecorder
) -> None:
    seed_store(
        store,
        comments=["Too vague. Write to me at jane.doe@example.com", "Useless", "Vague", "Bad"],
    )
    model = FakeModel(
        [
            GOOD + "\nRATIONALE: Users wrote from jane.doe@example.com that menus were vague.",
            CHAMPION_TEXT + " Be polite.\nRATIONALE: politeness",
        ],
        cost=0.002,
    )
    tracer = tracer_for(recorder)
    judge = ProposerJudgeConfig(name="on_brand", question="Is the tone friendly?")
    cfg = make_config(candidates=2, judges=(judge,))
    result = run_round(store, cfg, ProposerHooks(model, trace=tracer.proposer_trace()), now=NOW)
    assert tracer.flush(10)
    tracer.shutdown()

    [stored_round] = [r for r in rounds(store, EXP) if r["id"] == result.round_id]
    trace_id = stored_round["details"]["trace_id"]
    spans = recorder.spans_of(trace_id)
    [root] = [s for s in spans if s.name == "proposer-round:proposer"]
    assert root.attributes["langfuse.internal.as_root"] is True
    assert "proposer" in root.attributes["langfuse.trace.tags"]
    assert root.json_attr("langfuse.observation.output")["round_id"] == result.round_id

    gens = generations(spans)
    assert all(g.parent_span_id == root.span_id for g in gens)
    names = sorted(g.name for g in gens)
    # one rewrite per candidate; the parent's and the passing candidate's replays; its judge
    assert names.count("rewrite") == 2 and "judge.on_brand" in names
    assert names.count("replay") == 2 * cfg.proposer.replay_questions
    assert len(gens) == len(model.requests)  # every call the model saw, and no other
    rewrite = next(g for g in gens if g.name == "rewrite")
    assert rewrite.attributes["langfuse.observation.model.name"] == cfg.model.name
    assert rewrite.json_attr("langfuse.observation.cost_details") == {"total": 0.002}
    assert (rewrite.end_ns - rewrite.start_ns) / 1e6 == pytest.approx(100.0, abs=0.01)
    sent = json.dumps([g.attributes for g in gens])
    assert "FAILURES" in sent  # the request went out (scrubbed) ...
    assert "jane.doe@example.com" not in sent  # ... without the address, in or out

    events = [s for s in spans if s.attributes.get("langfuse.observation.type") == "event"]
    by_status = {e.name: e for e in events}
    assert set(by_status) == {"candidate:waiting", "candidate:duplicate"}
    gates = by_status["candidate:waiting"].json_attr("langfuse.observation.metadata.gates")
    assert [g["name"] for g in gates] == [
        "pii",
        "format",
        "duplicate",
        "injection",
        "replay",
        "judge:on_brand",
    ]
    assert by_status["candidate:duplicate"].attributes["langfuse.observation.level"] == "WARNING"

    scores = [s for s in recorder.scores().values() if s["traceId"] == trace_id]
    passed = {s["observationId"]: s["value"] for s in scores if s["dataType"] == "BOOLEAN"}
    assert passed == {
        by_status["candidate:waiting"].span_id: 1.0,
        by_status["candidate:duplicate"].span_id: 0.0,
    }
    [count] = [s for s in scores if s["name"] == "proposer_candidates_passed"]
    assert count["value"] == 1.0
    assert {c.status for c in candidates(store, EXP)} == {"waiting", "duplicate"}


def test_an_operator_variant_is_traced_as_its_own_round(
    store: Store, recorder: LangfuseRecorder
) -> None:
    seed_store(store)
    tracer = tracer_for(recorder)
    model = FakeModel([])
    candidate = submit_candidate(
        store,
        make_config(),
        ProposerHooks(model, trace=tracer.proposer_trace()),
        prompt_text=GOOD_2,
        rationale="written by hand",
        source="operator",
        now=NOW,
    )
    assert tracer.flush(10)
    tracer.shutdown()
    [stored_round] = [r for r in rounds(store, EXP) if r["id"] == candidate.round_id]
    spans = recorder.spans_of(stored_round["details"]["trace_id"])
    assert [s.name for s in spans if s.name.startswith("proposer-round")] == [
        "proposer-round:operator"
    ]
    assert {g.name for g in generations(spans)} == {"replay"}
    assert len(generations(spans)) == len(model.requests)


def test_no_langfuse_no_trace_and_the_round_still_runs(store: Store) -> None:
    seed_store(store)
    assert NoopTracer().proposer_trace() is None
    result = run_round(store, make_config(candidates=1), ProposerHooks(FakeModel([GOOD])), now=NOW)
    [stored_round] = [r for r in rounds(store, EXP) if r["id"] == result.round_id]
    assert stored_round["details"]["trace_id"] is None


def test_a_dead_langfuse_never_breaks_a_round(store: Store) -> None:
    seed_store(store)
    creds = LangfuseCredentials("pk-dead-" + uuid.uuid4().hex[:8], "sk", "http://127.0.0.1:9")
    tracer = LangfuseTracer(
        creds,
        LangfuseConfig(request_timeout_s=0.5, flush_timeout_s=1.0),
        prompt_versions=lambda p, h: None,
    )
    result = run_round(
        store,
        make_config(candidates=1),
        ProposerHooks(FakeModel([GOOD]), trace=tracer.proposer_trace()),
        now=NOW,
    )
    tracer.shutdown()
    assert [c["status"] for c in result.candidates] == ["waiting"]
    assert trace_id_for_round("x") != trace_id_for_round("y")


def test_a_trials_outcome_is_scored_on_its_rounds_trace(
    store: Store, recorder: LangfuseRecorder
) -> None:
    from datetime import timedelta

    from optimizer.proposer.trials import manage_trials

    seed_store(store)
    tracer = tracer_for(recorder)
    cfg = make_config(candidates=1, auto_start=True, trial_cap=0.05)
    result = run_round(
        store, cfg, ProposerHooks(FakeModel([GOOD]), trace=tracer.proposer_trace()), now=NOW
    )
    [started] = candidates(store, EXP, status="started")
    assert started.round_id == result.round_id
    summary = {
        "champion": "concise",
        "arms": {
            "concise": {"kpi_mean": 0.04, "kpi_ci": [0.039, 0.041], "effective_sessions": 9000},
            started.arm_id: {"kpi_mean": 0.02, "kpi_ci": [0.01, 0.03], "effective_sessions": 400},
        },
    }
    out = manage_trials(
        store, cfg, summary, now=NOW + timedelta(days=2), trace=tracer.proposer_trace()
    )
    assert out["retired"] == [started.arm_id]
    assert tracer.flush(10)
    tracer.shutdown()
    [kept] = [s for s in recorder.scores().values() if s["name"] == "proposer_trial_kept"]
    assert kept["traceId"] == trace_id_for_round(result.round_id or "")
    assert kept["value"] == 0.0 and "futility" in kept["comment"]
    [stored_round] = [r for r in rounds(store, EXP) if r["id"] == result.round_id]
    assert stored_round["details"]["trace_id"] == kept["traceId"]
