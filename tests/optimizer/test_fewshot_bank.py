"""The example bank: statuses, events, seeds, uniqueness; the package's public names."""

from __future__ import annotations

import importlib

import pytest

from optimizer.errors import StoreError
from optimizer.fewshot import ExampleBank, example_hash
from optimizer.prompt_library import Example, PromptLibrary
from optimizer.store import Store
from tests.support.fewshot_scenario import library


def test_status_changes_are_events(store: Store) -> None:
    bank = ExampleBank(store)
    v0 = bank.version()
    ex = bank.add(
        "How do I export my projects?",
        "Settings > Data > Export.",
        source="mined",
        session_id="s1",
        turn_id="t1",
        reward=1.0,
        provenance={"reasons": ["thumbs_up"]},
    )
    assert ex is not None and bank.version() > v0
    for status in ("approved", "pinned", "rejected"):
        assert bank.set_status(ex, status, actor="alice", reason="review").status == status
    kinds = [(e.kind, e.actor) for e in bank.events(ex)]
    assert kinds == [
        ("added", "miner"),
        ("approved", "alice"),
        ("pinned", "alice"),
        ("rejected", "alice"),
    ]
    assert bank.events(ex)[-1].details == {"from": "pinned", "to": "rejected", "reason": "review"}
    got = bank.get(ex)
    assert (got.session_id, got.turn_id, got.reward, dict(got.provenance)) == (
        "s1",
        "t1",
        1.0,
        {"reasons": ["thumbs_up"]},
    )
    assert [e.id for e in bank.list("rejected")] == [ex] and bank.list("approved") == []
    # Same text, differently spaced and cased: the content hash says it is banked already.
    assert (
        bank.add("how do I  export my projects?", "settings > data > export.", source="mined")
        is None
    )


def test_bad_arguments(sqlite_store: Store) -> None:
    bank = ExampleBank(sqlite_store)
    with pytest.raises(ValueError, match="status must be one of"):
        bank.list("great")
    with pytest.raises(ValueError, match="source must be"):
        bank.add("q", "a", source="web")
    with pytest.raises(ValueError, match="non-empty"):
        bank.add(" ", "a", source="mined")
    with pytest.raises(StoreError, match="no example 'nope'"):
        bank.set_status("nope", "approved", actor="alice")


def test_seeds_enter_approved_and_follow_edits(sqlite_store: Store) -> None:
    bank = ExampleBank(sqlite_store)
    lib = library()
    assert sorted(bank.sync_seeds(lib)) == sorted(lib.examples)
    assert {e.id: (e.status, e.source) for e in bank.list()} == {
        i: ("approved", "seed") for i in lib.examples
    }
    assert bank.sync_seeds(lib) == []
    bank.set_status("trial", "rejected", actor="alice")
    trial = lib.examples["trial"]
    edited = PromptLibrary(
        lib.variants,
        {**lib.examples, "trial": Example("trial", trial.user, "New text.", trial.path)},
        lib.knowledge,
    )
    bank.sync_seeds(edited)
    got = bank.get("trial")
    assert got.assistant_text == "New text." and got.status == "rejected"
    assert got.content_hash == example_hash(trial.user, "New text.")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (
            "optimizer.fewshot",
            [
                "BankExample",
                "CreditResult",
                "ExampleBank",
                "ExampleCredit",
                "ExampleSelector",
                "MiningResult",
                "Proposal",
                "credit_examples",
                "example_hash",
                "mine_examples",
                "propose_challenger",
            ],
        ),
        (
            "optimizer.privacy",
            [
                "ENTITY_TYPES",
                "PHONE_REGIONS",
                "SCRUBBER_VERSION",
                "Entity",
                "Scrubber",
                "find_entities",
                "public_allowlist",
                "scrub",
            ],
        ),
        ("optimizer.export", ["FORMATS", "ExportResult", "export_dataset"]),
    ],
)
def test_public_names(module: str, expected: list[str]) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ == expected  # in ruff's (isort-style) order
    assert all(hasattr(mod, name) for name in expected)
