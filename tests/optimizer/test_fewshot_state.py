"""The few-shot step's kept state equals a full re-ranking, on random event streams.

Each stream writes sessions (some users return, some conversations move to another
arm), turns with and without few-shot examples, votes that change or are deleted,
outcomes with a session id or only a user id, late ones (occurred long before they
arrive), re-sent ones (a duplicate idempotency key), events stamped ahead of the
optimizer's ``now``, opt-outs and deleted conversations. At every checkpoint the
incremental refresh is compared with the full path: the ranked qualifying turns,
the mining counts and the credit statistics.
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from optimizer.config import Config
from optimizer.fewshot import ExampleCredit, mine_examples, state_rows
from optimizer.fewshot import state as fewshot_state
from optimizer.fewshot.credit import example_usage
from optimizer.fewshot.mining import _text_lengths, turn_reasons
from optimizer.fewshot.state import (
    credit_sums,
    mining_counts,
    ranked_candidates,
    refresh_state,
)
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord, schema
from tests.support.fewshot_scenario import START, make_config

WORDS = [
    "export",
    "invoice",
    "refund",
    "plan",
    "team",
    "billing",
    "password",
    "reset",
    "project",
    "csv",
    "settings",
    "data",
    "yearly",
    "monthly",
    "upgrade",
    "seat",
    "user",
    "admin",
    "support",
    "trial",
    "integration",
    "slack",
    "calendar",
]
EXAMPLES = ("ex-a", "ex-b", "ex-c", "ex-d")


def _text(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n)) + f" {rng.integers(1_000_000)}"


class Stream:
    """Random events written through the store's own API, in time order."""

    def __init__(self, store: Store, seed: int) -> None:
        self.store, self.rng = store, np.random.default_rng(seed)
        self.sessions: list[tuple[str, str, str]] = []  # session, user, arm
        self.turns: list[tuple[str, str]] = []  # turn, user
        self.outcomes: list[OutcomeRecord] = []
        self.n = 0

    def step(self, at: pd.Timestamp, count: int) -> None:
        rng, store = self.rng, self.store
        for _ in range(count):
            self.n += 1
            returning = self.sessions and rng.random() < 0.3
            user = self.sessions[rng.integers(len(self.sessions))][1] if returning else f"u{self.n}"
            arm = "concise+retrieved" if rng.random() < 0.5 else "concise"
            sid = f"s{self.n}"
            when = at + timedelta(minutes=float(rng.uniform(0, 50)))
            store.record_assignment(
                AssignmentRecord(
                    sid, user, "exp", arm, 0.5, None, str(rng.choice(["free", "pro"])), {}, when
                )
            )
            self.sessions.append((sid, user, arm))
            for i in range(int(rng.integers(0, 4))):
                shown = (
                    tuple(rng.choice(EXAMPLES, 2, replace=False))
                    if arm == "concise+retrieved"
                    else ()
                )
                tid = f"{sid}-t{i}"
                store.record_turn(
                    TurnRecord(
                        id=tid,
                        session_id=sid,
                        user_id=user,
                        experiment_id="exp",
                        arm_id=arm,
                        prompt_id="concise",
                        prompt_hash="h",
                        model="fake/echo",
                        user_message=_text(rng, int(rng.integers(1, 9))),
                        reply=_text(rng, int(rng.integers(1, 12))),
                        fewshot_ids=shown,
                        error="timeout" if rng.random() < 0.05 else None,
                        created_at=when + timedelta(minutes=i + 1),
                    )
                )
                self.turns.append((tid, user))
                if rng.random() < 0.4:
                    store.record_feedback(
                        tid, user, int(rng.random() < 0.7), at=when + timedelta(minutes=i + 2)
                    )
            for name, p, value in (
                ("conversion", 0.25, 1.0),
                ("resolved", 0.2, 1.0),
                ("support_minutes", 0.3, float(rng.exponential(8))),
                ("revenue", 0.15, float(rng.exponential(40))),
            ):
                if rng.random() < p:
                    by_user = rng.random() < 0.25
                    delay = timedelta(hours=float(rng.exponential(30)))
                    rec = OutcomeRecord(
                        f"{sid}-{name}",
                        name,
                        value,
                        session_id=None if by_user else sid,
                        user_id=user if by_user else None,
                        occurred_at=when + delay,
                    )
                    # Some arrive later than they happened: written now, stamped in the past
                    # or ahead of the optimizer's clock.
                    store.record_outcome(rec, received_at=at)
                    self.outcomes.append(rec)
        self.churn(at)

    def churn(self, at: pd.Timestamp) -> None:
        """Changes to old sessions: votes changed or deleted, late and re-sent outcomes,
        a moved conversation, an opt-out, a deleted conversation."""
        rng, store = self.rng, self.store
        for _ in range(3):
            if self.turns:
                tid, user = self.turns[rng.integers(len(self.turns))]
                value = [None, 0, 1][int(rng.integers(3))]
                store.record_feedback(tid, user, value, at=at)
        if self.outcomes:  # a duplicate delivery counts once
            store.record_outcome(self.outcomes[rng.integers(len(self.outcomes))], received_at=at)
        if self.sessions:
            sid, user, _ = self.sessions[rng.integers(len(self.sessions))]
            late = OutcomeRecord(
                f"late-{self.n}-{sid}",
                "conversion",
                1.0,
                session_id=sid,
                occurred_at=at - timedelta(days=float(rng.uniform(0, 3))),
            )
            store.record_outcome(late, received_at=at)
            if rng.random() < 0.3:
                store.set_opt_out(user, bool(rng.random() < 0.8), actor="t", at=at)
            if rng.random() < 0.3:
                other = self.sessions[rng.integers(len(self.sessions))]
                store.delete_conversation(other[0], user_id=other[1], actor="t", at=at)
            if rng.random() < 0.3:
                old = store.get_assignment(sid)
                if old is not None and old.closed_at is None and "~" not in sid:
                    arm = "concise" if old.arm_id != "concise" else "concise+retrieved"
                    new = AssignmentRecord(
                        f"{sid}~2", user, "exp", arm, 0.5, None, "*", {}, at, thread_id=sid
                    )
                    store.reassign(old, new, "test")
                    self.sessions.append((new.session_id, user, arm))


def _full_ranking(store: Store, config: Config, now: pd.Timestamp) -> pd.DataFrame:
    turns = turn_reasons(store, config, now=now, texts=False)
    return turns[turns["reasons"].map(bool).astype(bool)].reset_index(drop=True)


def _compare(store: Store, config: Config, now: pd.Timestamp) -> None:
    full = _full_ranking(store, config, now)
    kept = pd.concat(
        list(ranked_candidates(store, config, size=7, unmined=False)) or [pd.DataFrame()],
        ignore_index=True,
    )
    assert kept.get("id", pd.Series(dtype=object)).tolist() == full["id"].tolist()
    if len(full):
        assert kept["reasons"].tolist() == full["reasons"].tolist()
        assert kept["complete"].astype(bool).tolist() == full["complete"].tolist()
        for column in ("reward", "reward_so_far"):
            np.testing.assert_allclose(
                kept[column].astype(float).to_numpy(),
                full[column].astype(float).to_numpy(),
                rtol=1e-9,
                atol=1e-9,
            )
    counts = mining_counts(store, config)
    all_turns = turn_reasons(store, config, now=now, texts=False)
    assert counts.considered == len(all_turns)
    assert counts.qualifying == len(full)
    expected: dict[str, int] = {}
    for why in full["reasons"]:
        for r in why:
            expected[r] = expected.get(r, 0) + 1
    assert counts.reasons == expected
    lengths = full.join(_text_lengths(store, "exp", now), on="id")
    fs = config.fewshot
    assert counts.too_short == int((lengths["shortest"] < fs.min_chars).sum())
    assert counts.too_long == int((lengths["longest"] > fs.max_chars).sum())

    credit = ExampleCredit(min_sessions=3, demote_probability=0.6)
    a = credit.fit(*example_usage(store, config, now=now)).stats_
    b = ExampleCredit(min_sessions=3, demote_probability=0.6).fit_sums(*credit_sums(store, config))
    assert b.demote_ == credit.demote_
    b_stats = b.stats_
    assert b_stats.index.tolist() == a.index.tolist()
    for column in a.columns:
        np.testing.assert_allclose(
            b_stats[column].astype(float).to_numpy(),
            a[column].astype(float).to_numpy(),
            rtol=1e-7,
            atol=1e-9,
            err_msg=column,
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_equals_full_on_random_streams(store: Store, seed: int) -> None:
    config = make_config(min_chars=25, max_chars=160)
    stream = Stream(store, seed)
    rebuilt = []
    for hour in range(14):
        at = pd.Timestamp(START + timedelta(hours=7 * hour))
        stream.step(at, count=6)
        # The optimizer's clock trails the writes sometimes: events ahead of it wait.
        now = at + timedelta(minutes=30 if hour % 3 else 90)
        result = refresh_state(store, config, now=now)
        rebuilt.append(result.rebuilt)
        _compare(store, config, now)
    assert rebuilt[0] and not any(rebuilt[1:])
    # Windows close with no new event at all: a week and a month later.
    for days in (8, 31):
        now = pd.Timestamp(START + timedelta(hours=7 * 13, days=days))
        assert not refresh_state(store, config, now=now).rebuilt
        _compare(store, config, now)


def test_touches_only_changed_sessions(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the margins for late commits, which re-read the last few ids and minutes.
    monkeypatch.setattr(fewshot_state, "ID_OVERLAP", 0)
    monkeypatch.setattr(fewshot_state, "TURN_LAG_S", 0.0)
    config = make_config()
    stream = Stream(store, 5)
    at = pd.Timestamp(START)
    stream.step(at, count=40)
    now = at + timedelta(days=60)  # every event visible, every window closed
    assert refresh_state(store, config, now=now).rebuilt
    quiet = refresh_state(store, config, now=now + timedelta(minutes=10))
    assert quiet.sessions == 0
    sid, user, _ = stream.sessions[0]
    store.record_outcome(
        OutcomeRecord("one-more", "conversion", 1.0, session_id=sid, occurred_at=now),
        received_at=now,
    )
    # The session and its user's other sessions (a user-level outcome may belong to any).
    mine = {s for s, u, _ in stream.sessions if u == user}
    touched = refresh_state(store, config, now=now + timedelta(minutes=20)).sessions
    assert len(mine) <= touched <= len(mine) + 2
    # With the margins: a bounded number more, whatever the history.
    monkeypatch.setattr(fewshot_state, "ID_OVERLAP", 10)
    assert refresh_state(store, config, now=now + timedelta(minutes=30)).sessions <= 3 * 10


def test_settings_change_rebuilds(store: Store) -> None:
    stream = Stream(store, 7)
    stream.step(pd.Timestamp(START), count=10)
    now = pd.Timestamp(START + timedelta(hours=3))
    assert refresh_state(store, make_config(), now=now).rebuilt
    assert not refresh_state(store, make_config(), now=now).rebuilt
    changed = make_config(min_reward=0.9)
    assert refresh_state(store, changed, now=now).rebuilt
    _compare(store, changed, now)
    assert refresh_state(store, changed, now=now - timedelta(hours=1)).rebuilt  # clock went back


def _pair(tmp_path: object, seed: int) -> tuple[Store, Store]:
    stores = []
    for name in ("full", "kept"):
        store = Store(f"sqlite:///{tmp_path}/{name}.db")
        store.create_all()
        stores.append(store)
    return stores[0], stores[1]


def test_mining_from_the_state_banks_what_the_full_path_banks(tmp_path: object) -> None:
    config = make_config(min_chars=25, max_chars=160, max_mined_per_run=4, auto_approve=True)
    full, kept = _pair(tmp_path, 3)
    streams = [Stream(full, 3), Stream(kept, 3)]
    for hour in range(6):
        at = pd.Timestamp(START + timedelta(hours=5 * hour))
        now = at + timedelta(hours=1)
        results = []
        for store, stream, incremental in ((full, streams[0], False), (kept, streams[1], True)):
            stream.step(at, count=8)
            if incremental:
                refresh_state(store, config, now=now)
            results.append(mine_examples(store, config, now=now, incremental=incremental))
        assert results[0].as_dict() == results[1].as_dict()
        with full.engine.connect() as a, kept.engine.connect() as b:
            ex = schema.examples
            query = sa.select(ex.c.id, ex.c.turn_id, ex.c.reward).order_by(ex.c.id)
            assert a.execute(query).all() == b.execute(query).all()


def _state_tables(store: Store) -> dict[str, list[tuple[object, ...]]]:
    """Every kept row of the experiment, in key order (and the watermark's sums)."""
    out: dict[str, list[tuple[object, ...]]] = {}
    with store.engine.connect() as conn:
        for table in (
            schema.fewshot_turns,
            schema.fewshot_sessions,
            schema.fewshot_credit,
            schema.report_buckets,
            schema.report_support,
        ):
            key = [c for c in table.primary_key.columns] or list(table.columns)
            rows = conn.execute(
                sa.select(table).where(table.c.experiment_id == "exp").order_by(*key)
            ).all()
            out[table.name] = [tuple(r) for r in rows]
        marks = conn.execute(sa.select(schema.fewshot_state.c.marks)).scalar()
    out["marks"] = [(marks["considered"], json.dumps(marks["counts"], sort_keys=True))]
    return out


def _same(u: object, v: object, name: str) -> None:
    if isinstance(u, float) and isinstance(v, float):  # sums added in another order
        assert v == pytest.approx(u, rel=1e-9, abs=1e-9, nan_ok=True), name
    elif isinstance(u, dict) and isinstance(v, dict):
        assert u.keys() == v.keys(), name
        for key in u:
            _same(u[key], v[key], f"{name}.{key}")
    elif isinstance(u, list | tuple) and isinstance(v, list | tuple):
        assert len(u) == len(v), name
        for x, y in zip(u, v, strict=True):
            _same(x, y, name)
    else:
        assert u == v, name


def _same_rows(a: list[tuple[object, ...]], b: list[tuple[object, ...]], name: str) -> None:
    assert len(a) == len(b), name
    for x, y in zip(a, b, strict=True):
        _same(x, y, f"{name} {x[:3]}")


@pytest.mark.parametrize("seed", [0, 4])
def test_rebuild_in_stretches_equals_one_pass(
    store: Store, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """A cold build a few hours of history at a time keeps what one pass over it keeps."""
    config = make_config(min_chars=25, max_chars=160)
    stream = Stream(store, seed)
    for hour in range(12):
        stream.step(pd.Timestamp(START + timedelta(hours=7 * hour)), count=6)
    # turns of sessions without an assignment, one of them voted
    for i, sid in enumerate(("orphan-1", "orphan-2")):
        store.record_turn(
            TurnRecord(
                id=f"{sid}-t0",
                session_id=sid,
                user_id="u-orphan",
                experiment_id="exp",
                arm_id="concise",
                prompt_id="concise",
                prompt_hash="h",
                model="fake/echo",
                user_message=_text(stream.rng, 6),
                reply=_text(stream.rng, 9),
                created_at=START + timedelta(hours=3 + 20 * i),
            )
        )
    store.record_feedback("orphan-1-t0", "u-orphan", 1, at=START + timedelta(hours=4))
    for now in (
        pd.Timestamp(START + timedelta(hours=7 * 11, minutes=30)),  # windows open and closed
        pd.Timestamp(START + timedelta(days=40)),  # every window closed
    ):
        kept = []
        for days in (0.0, 0.2, 1.0):  # 0: the whole history at once
            monkeypatch.setattr(state_rows, "REBUILD_CHUNK_DAYS", days)
            with store.engine.begin() as conn:
                conn.execute(schema.fewshot_state.delete())
            result = refresh_state(store, config, now=now)
            assert result.rebuilt
            kept.append((result.sessions, _state_tables(store)))
            _compare(store, config, now)
        (n0, whole), *others = kept
        assert whole["fewshot_sessions"] and whole["report_buckets"]
        for n, tables in others:
            assert n == n0
            for name, rows in whole.items():
                _same_rows(rows, tables[name], name)
