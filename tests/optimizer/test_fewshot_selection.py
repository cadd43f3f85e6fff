"""Selection: nearest approved examples, pinned first, never a rejected one, cached."""

from __future__ import annotations

import pytest

from optimizer.config import ArmConfig
from optimizer.errors import ConfigError
from optimizer.fewshot import ExampleBank, ExampleSelector
from optimizer.store import Store
from tests.support.fewshot_scenario import library

RETRIEVED = ArmConfig(id="r", prompt="concise", fewshot="retrieved", k=2)


def _bank(store: Store) -> dict[str, str]:
    bank = ExampleBank(store)
    bank.sync_seeds(library())
    ids = {
        "invoice": bank.add(
            "Where can I download my invoices for accounting?",
            "Settings > Billing > Invoices.",
            source="mined",
            status="approved",
            reward=1.0,
        ),
        "invoice_rejected": bank.add(
            "Where can I download my invoices, all of them?",
            "No idea, ask your bank.",
            source="mined",
            status="approved",
            reward=1.0,
        ),
        "slack": bank.add(
            "Does Lumen integrate with Slack channels?",
            "Yes, on Team and Business.",
            source="mined",
            status="approved",
            reward=0.2,
        ),
        "candidate": bank.add(
            "Where are my invoices for download?", "Under Billing.", source="mined"
        ),
    }
    bank.set_status(ids["invoice_rejected"], "rejected", actor="alice")
    return ids


def test_retrieval_returns_nearest_approved_never_rejected(store: Store) -> None:
    ids = _bank(store)
    selector = ExampleSelector(library(), store, refresh_s=0)
    chosen = [e.id for e in selector.select(RETRIEVED, "where can I download my invoices?")]
    assert chosen[0] == ids["invoice"]
    assert ids["invoice_rejected"] not in chosen and ids["candidate"] not in chosen
    assert len(chosen) == 2
    served = {e.id for e in selector.candidates()}
    assert ids["invoice_rejected"] not in served and ids["candidate"] not in served
    assert set(library().examples) <= served  # seeds are approved bank members
    # Retrieval over every query never yields a non-servable example.
    for query in ("invoices", "download all invoices", "slack", "password", "refund double charge"):
        assert not {e.id for e in selector.select(RETRIEVED, query)} & {
            ids["invoice_rejected"],
            ids["candidate"],
        }


def test_pinned_first_then_nearest(store: Store) -> None:
    ids = _bank(store)
    ExampleBank(store).set_status(ids["slack"], "pinned", actor="alice")
    selector = ExampleSelector(library(), store, refresh_s=0)
    chosen = [e.id for e in selector.select(RETRIEVED, "where can I download my invoices?")]
    assert chosen == [ids["slack"], ids["invoice"]]


def test_demoted_and_rejected_seed_leave_the_pool(sqlite_store: Store) -> None:
    _bank(sqlite_store)
    bank = ExampleBank(sqlite_store)
    bank.set_status("password-reset", "rejected", actor="alice")
    selector = ExampleSelector(library(), sqlite_store, refresh_s=0)
    arm = ArmConfig(id="r", prompt="concise", fewshot="retrieved", k=1)
    assert [e.id for e in selector.select(arm, "I forgot my password")] != ["password-reset"]
    # Without a store the seed is served: the bank's word only counts with a bank.
    assert [e.id for e in ExampleSelector(library()).select(arm, "I forgot my password")] == [
        "password-reset"
    ]


def test_index_is_cached_until_the_bank_changes(sqlite_store: Store) -> None:
    _bank(sqlite_store)
    now = [0.0]
    selector = ExampleSelector(library(), sqlite_store, refresh_s=60, clock=lambda: now[0])
    arm = ArmConfig(id="r", prompt="concise", fewshot="retrieved", k=1)
    before = selector.select(arm, "Can we use single sign-on with Okta?")
    new = ExampleBank(sqlite_store).add(
        "Can we use single sign-on with Okta?",
        "SSO is on the Business plan.",
        source="mined",
        status="approved",
    )
    assert (
        selector.select(arm, "Can we use single sign-on with Okta?") == before
    )  # within refresh_s: cached
    now[0] = 61.0
    assert [e.id for e in selector.select(arm, "Can we use single sign-on with Okta?")] == [new]


def test_reward_weighting_breaks_similarity_ties(sqlite_store: Store) -> None:
    bank = ExampleBank(sqlite_store)
    low = bank.add(
        "How do I add a teammate to a project?",
        "Invite them from the project page.",
        source="mined",
        status="approved",
        reward=0.1,
    )
    high = bank.add(
        "How do I add a teammate to a project?",
        "Open the project, click Share, enter their email.",
        source="mined",
        status="approved",
        reward=2.0,
    )
    plain = ArmConfig(id="p", prompt="concise", fewshot="retrieved", k=1)
    weighted = ArmConfig(id="w", prompt="concise", fewshot="retrieved", k=1, reward_weighted=True)
    selector = ExampleSelector(library(), sqlite_store, refresh_s=0)
    assert [e.id for e in selector.select(plain, "add a teammate to my project")] == [
        low
    ]  # stable order: first banked
    assert [e.id for e in selector.select(weighted, "add a teammate to my project")] == [high]


def test_fixed_accepts_seed_and_bank_ids(sqlite_store: Store) -> None:
    ids = _bank(sqlite_store)
    selector = ExampleSelector(library(), sqlite_store, refresh_s=0)
    arm = ArmConfig(
        id="f",
        prompt="concise",
        fewshot="fixed",
        examples=("trial", ids["slack"], ids["invoice_rejected"]),
    )
    assert [e.id for e in selector.select(arm, "anything")] == ["trial", ids["slack"]]
    with pytest.raises(ConfigError, match="unknown example ids"):
        selector.select(
            ArmConfig(id="g", prompt="concise", fewshot="fixed", examples=("nope",)), "x"
        )
    assert selector.select(ArmConfig(id="n", prompt="concise"), "x") == []


def test_refresh_s_is_validated() -> None:
    with pytest.raises(ValueError, match="refresh_s must be >= 0"):
        ExampleSelector(library(), refresh_s=-1)
