"""Credit and pruning: examples below their arm's average are demoted; challenger proposals."""

from __future__ import annotations

import tomllib
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from optimizer.config import ArmConfig
from optimizer.fewshot import ExampleBank, ExampleCredit, credit_examples, propose_challenger
from optimizer.fewshot.proposal import AUDIT_ACTION
from optimizer.store import Store, schema
from tests.support.fewshot_scenario import LATER, START, add_session, library, make_config


def test_credit_estimator_separates_good_from_bad() -> None:
    rng = np.random.default_rng(7)
    n = 60
    rewards = np.r_[rng.normal(0.2, 0.3, n), rng.normal(0.8, 0.3, n)]
    sessions = pd.DataFrame(
        {"session_id": [f"s{i}" for i in range(2 * n)], "arm_id": "a", "reward": rewards}
    )
    usage = pd.DataFrame(
        {"session_id": sessions["session_id"], "example_id": ["bad"] * n + ["good"] * n}
    )
    credit = ExampleCredit(min_sessions=20, demote_probability=0.9).fit(usage, sessions)
    assert credit.demote_ == ["bad"]
    assert credit.stats_.loc["bad", "prob_below"] > 0.99 > credit.stats_.loc["good", "prob_below"]
    assert credit.stats_.loc["good", "sessions"] == n
    # Too few sessions: no verdict, however bad it looks.
    assert ExampleCredit(min_sessions=n + 1).fit(usage, sessions).demote_ == []


def test_credit_is_relative_to_the_arm() -> None:
    # Example "x" is used in a weak arm and scores that arm's average: not demoted,
    # although its mean reward is far below the other arm's.
    sessions = pd.DataFrame(
        {
            "session_id": [f"s{i}" for i in range(80)],
            "arm_id": ["weak"] * 40 + ["strong"] * 40,
            "reward": [0.1, 0.3] * 20 + [0.9, 1.1] * 20,
        }
    )
    usage = pd.DataFrame({"session_id": [f"s{i}" for i in range(40)], "example_id": "x"})
    credit = ExampleCredit(min_sessions=10).fit(usage, sessions)
    assert credit.demote_ == []
    assert credit.stats_.loc["x", "mean_residual"] == pytest.approx(0.0)


@pytest.mark.parametrize(("field", "value"), [("min_sessions", 1), ("demote_probability", 1.0)])
def test_credit_validates_parameters(field: str, value: float) -> None:
    empty = pd.DataFrame(columns=["session_id", "arm_id", "reward", "example_id"])
    with pytest.raises(ValueError, match=field):
        ExampleCredit(**{field: value}).fit(empty, empty)


def test_credit_examples_demotes_the_example_that_drags_the_kpi(store: Store) -> None:
    bank = ExampleBank(store)
    good = bank.add(
        "How do I export my projects?",
        "Settings > Data > Export.",
        source="mined",
        status="approved",
    )
    bad = bank.add(
        "How do I export everything?", "Not possible, sorry.", source="mined", status="approved"
    )
    pinned = bank.add(
        "Export all my data please", "Not possible at all.", source="mined", status="pinned"
    )
    for i in range(24):
        at = START + timedelta(minutes=i)
        add_session(
            store,
            f"g{i}",
            [("export?", "ok")],
            arm_id="concise+retrieved",
            at=at,
            fewshot_ids=[good],
            outcomes={"conversion": 1.0} if i % 4 else {},
        )
        add_session(
            store,
            f"b{i}",
            [("export?", "no")],
            arm_id="concise+retrieved",
            at=at,
            fewshot_ids=[bad, pinned],
            outcomes={"conversion": 1.0} if i % 4 == 0 else {},
        )
    config = make_config(credit_min_sessions=20)
    result = credit_examples(store, config, now=LATER, library=library())
    assert result.demoted == (bad,)
    assert bank.get(bad).status == "demoted"
    assert bank.get(good).status == "approved" and bank.get(pinned).status == "pinned"
    (event,) = [e for e in bank.events(bad) if e.kind == "demoted"]
    assert event.actor == "optimizer" and event.details["sessions"] == 24
    assert event.details["prob_below"] >= 0.9 and event.details["mean_reward"] == pytest.approx(
        0.25
    )
    # Before the KPI windows close nothing is known, so nothing is demoted.
    ExampleBank(store).set_status(bad, "approved", actor="alice")
    assert (
        credit_examples(store, config, now=START + timedelta(days=1), library=library()).demoted
        == ()
    )


def test_propose_challenger_after_growth(store: Store) -> None:
    bank = ExampleBank(store)
    bank.sync_seeds(library())
    config = make_config(propose_after=3, propose_k=2)
    ids = [
        bank.add(
            f"Question number {i} about exports?",
            f"Answer {i}: Settings > Data > Export.",
            source="mined",
            status="approved",
            reward=float(i),
        )
        for i in range(2)
    ]
    assert propose_challenger(store, config) is None
    ids.append(
        bank.add(
            "Question about invoices?",
            "Settings > Billing > Invoices.",
            source="mined",
            status="approved",
            reward=5.0,
        )
    )
    proposal = propose_challenger(store, config)
    assert proposal is not None
    assert proposal.examples == (ids[2], ids[1])  # best rewards first
    arm = ArmConfig.model_validate(tomllib.loads(proposal.toml)["experiment"]["arms"][0])
    assert arm.fewshot == "fixed" and arm.prompt == "concise" and arm.examples == (ids[2], ids[1])
    audit = store.frame(schema.audit_events)
    assert list(audit["action"]) == [AUDIT_ACTION] and audit["details"][0]["approved_mined"] == 3
    assert propose_challenger(store, config) is None  # no growth since
    assert propose_challenger(store, config, force=True) is not None
