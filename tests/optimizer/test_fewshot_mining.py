"""Mining: qualifying turns only, scrubbed, de-duplicated, with provenance; no rejected ones."""

from __future__ import annotations

from datetime import timedelta

import pytest

from optimizer.fewshot import ExampleBank, mine_examples
from optimizer.fewshot.mining import turn_reasons
from optimizer.store import Store
from tests.support.fewshot_scenario import LATER, START, add_session, library, make_config

EXPORT_Q = "Hi, I'm Anna Schmidt. How do I export all my projects to a CSV file?"
EXPORT_A = (
    "Go to Settings > Data > Export and pick CSV or JSON, Anna. You get one file with all projects."
)
REFUND_Q = "My email is bob.miller@example.org, can I get a refund for a double charge?"
REFUND_A = (
    "Refunds are possible within 30 days: email support@lumen.example with the invoice "
    "and we refund it."
)


def _scenario(store: Store) -> dict[str, list[str]]:
    ids = {}
    ids["converted"] = add_session(
        store, "s1", [(EXPORT_Q, EXPORT_A)], votes={0: 1}, outcomes={"conversion": 1.0}
    )
    ids["thumbs_up"] = add_session(store, "s2", [(REFUND_Q, REFUND_A)], votes={0: 1})
    # Near-duplicate of s1 (one word differs), converted, not rated: s1 has the higher reward.
    ids["near_duplicate"] = add_session(
        store,
        "s3",
        [(EXPORT_Q, EXPORT_A.replace("all projects", "all your projects"))],
        outcomes={"conversion": 1.0},
        at=START + timedelta(hours=1),
    )
    ids["thumbs_down"] = add_session(
        store,
        "s4",
        [
            (
                "Which integrations does the Team plan include today?",
                "We integrate with nothing at all, sorry.",
            )
        ],
        votes={0: 0},
        outcomes={"conversion": 1.0},
    )
    ids["no_signal"] = add_session(
        store,
        "s5",
        [("What does the Business plan cost per user?", "It costs $15 per user per month.")],
    )
    ids["error"] = add_session(
        store,
        "s6",
        [
            (
                "How long is the password reset link valid?",
                "Sorry, something went wrong on our side.",
            )
        ],
        votes={0: 1},
        error_turns=[0],
    )
    ids["too_short"] = add_session(
        store, "s7", [("Is there a free trial of the Team plan?", "Yes.")], votes={0: 1}
    )
    ids["resolved_quickly"] = add_session(
        store,
        "s8",
        [
            (
                "Can I pay yearly instead of monthly for the Team plan?",
                "Yes: yearly billing saves 20%, switch it in Settings > Billing.",
            )
        ],
        outcomes={"resolved": 1.0, "support_minutes": 3.0},
    )
    ids["resolved_slowly"] = add_session(
        store,
        "s9",
        [
            (
                "Do you offer SSO on the Team plan or only Business?",
                "SSO is part of the Business plan only.",
            )
        ],
        outcomes={"resolved": 1.0, "support_minutes": 45.0},
    )
    # A thumbs-up in a session that cost an hour of support: negative reward, never teaches.
    ids["negative_reward"] = add_session(
        store,
        "s10",
        [
            (
                "Where can I find the invoices of last year?",
                "Invoices are under Settings > Billing > Invoices.",
            )
        ],
        votes={0: 1},
        outcomes={"support_minutes": 60.0},
    )
    return ids


def test_mining_adds_only_qualifying_scrubbed_unique_turns(store: Store) -> None:
    ids = _scenario(store)
    config = make_config()
    result = mine_examples(store, config, now=LATER, library=library())

    bank = ExampleBank(store)
    mined = {e.turn_id: e for e in bank.list() if e.source == "mined"}
    expected = {ids["converted"][0], ids["thumbs_up"][0], ids["resolved_quickly"][0]}
    assert set(mined) == expected
    assert set(result.added) == {e.id for e in mined.values()}
    assert result.duplicates == 1 and result.too_short == 1
    assert set(result.seeds_added) == set(library().examples)

    converted = mined[ids["converted"][0]]
    assert converted.status == "candidate"
    assert "Anna" not in converted.user_text + converted.assistant_text
    assert "<NAME>" in converted.user_text and "<NAME>" in converted.assistant_text
    assert converted.session_id == "s1" and converted.reward == pytest.approx(1.2)
    assert converted.provenance["reasons"] == ["thumbs_up", "reward", "outcome:conversion"]
    assert converted.provenance["reward_complete"] is True
    assert converted.provenance["turn_created_at"].startswith("2026-01-05T09:01")

    refund = mined[ids["thumbs_up"][0]]
    assert "bob.miller@example.org" not in refund.user_text and "<EMAIL>" in refund.user_text
    assert (
        "support@lumen.example" in refund.assistant_text
    )  # public fact of the knowledge base, kept
    assert refund.provenance["reasons"] == ["thumbs_up"]
    assert mined[ids["resolved_quickly"][0]].provenance["reasons"] == ["resolved_quickly"]

    events = [ev for ev in bank.events() if ev.example_id in result.added]
    assert sorted(ev.kind for ev in events) == ["added"] * 3

    again = mine_examples(store, config, now=LATER, library=library())
    assert again.added == () and again.seeds_added == ()


def test_a_run_mines_at_most_max_mined_per_run_best_first(store: Store) -> None:
    ids = _scenario(store)
    config = make_config(max_mined_per_run=1)
    first = mine_examples(store, config, now=LATER, library=library())
    bank = ExampleBank(store)
    # The converted, thumbed-up session ranks first (highest complete reward); the
    # too-short turn was counted without taking the run's one place.
    assert [bank.get(i).turn_id for i in first.added] == ids["converted"]
    assert first.too_short == 1
    # Next runs: the near-duplicate of the first (ranked second) is passed over, not a block.
    runs = [mine_examples(store, config, now=LATER, library=library()) for _ in range(3)]
    assert [len(r.added) for r in runs] == [1, 1, 0]
    assert runs[0].duplicates == 1
    mined = {e.turn_id for e in bank.list() if e.source == "mined"}
    assert mined == {ids["converted"][0], ids["thumbs_up"][0], ids["resolved_quickly"][0]}


def test_rejected_examples_never_return(store: Store) -> None:
    add_session(store, "s1", [(EXPORT_Q, EXPORT_A)], outcomes={"conversion": 1.0})
    config = make_config()
    (first,) = mine_examples(store, config, now=LATER, library=library()).added
    bank = ExampleBank(store)
    bank.set_status(first, "rejected", actor="alice", reason="too chatty")

    # The same conversation again, and a light paraphrase of it, both converted.
    add_session(
        store,
        "s2",
        [(EXPORT_Q, EXPORT_A)],
        outcomes={"conversion": 1.0},
        at=START + timedelta(days=1),
    )
    add_session(
        store,
        "s3",
        [(EXPORT_Q + " Thanks!", EXPORT_A)],
        outcomes={"conversion": 1.0},
        at=START + timedelta(days=1),
    )
    result = mine_examples(store, config, now=LATER, library=library())
    assert result.added == () and result.duplicates == 2
    assert bank.get(first).status == "rejected"
    assert [e.id for e in bank.list("rejected")] == [first]


def test_auto_approve_and_open_windows(store: Store) -> None:
    add_session(store, "s1", [(EXPORT_Q, EXPORT_A)], votes={0: 1})
    add_session(
        store,
        "s2",
        [(REFUND_Q, REFUND_A)],
        outcomes={"revenue": 900.0},
        at=START + timedelta(hours=2),
    )
    config = make_config(auto_approve=True, min_reward=0.5)
    # A day later the revenue term (30-day window) is still open: s2 cannot qualify on
    # reward yet, the thumbs-up of s1 qualifies at once.
    early = mine_examples(store, config, now=START + timedelta(days=2), library=library())
    assert len(early.added) == 1
    ex = ExampleBank(store).get(early.added[0])
    assert ex.status == "approved" and ex.turn_id == "s1-t0"
    assert ex.provenance["reward_complete"] is False
    late = mine_examples(store, config, now=LATER, library=library())
    assert [ExampleBank(store).get(i).turn_id for i in late.added] == ["s2-t0"]


def test_turn_reasons_respects_thresholds(sqlite_store: Store) -> None:
    add_session(sqlite_store, "s1", [(EXPORT_Q, EXPORT_A)], votes={0: 1})
    add_session(
        sqlite_store,
        "s2",
        [(REFUND_Q, REFUND_A)],
        outcomes={"resolved": 1.0, "support_minutes": 8.0},
    )
    strict = make_config(thumbs_up=False, max_support_minutes=5.0)
    reasons = dict(
        zip(
            *[turn_reasons(sqlite_store, strict, now=LATER)[c] for c in ("id", "reasons")],
            strict=True,
        )
    )
    assert reasons == {"s1-t0": [], "s2-t0": []}
    loose = make_config()
    reasons = dict(
        zip(
            *[turn_reasons(sqlite_store, loose, now=LATER)[c] for c in ("id", "reasons")],
            strict=True,
        )
    )
    assert reasons == {"s1-t0": ["thumbs_up"], "s2-t0": ["resolved_quickly"]}


def test_empty_store_mines_nothing_but_seeds(sqlite_store: Store) -> None:
    result = mine_examples(sqlite_store, make_config(), now=LATER, library=library())
    assert result.considered == 0 and result.added == ()
    assert {e.id for e in ExampleBank(sqlite_store).list("approved")} == set(library().examples)
