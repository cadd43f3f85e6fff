"""Synthetic histories of 100k–10M sessions for the benchmarks, written in bulk.

Shared by ``refit.py``, ``fewshot_step.py`` and ``operator_page.py``: **constant traffic**
of 16,667 sessions a day (1M sessions = 60 days), so a bigger store is a longer
history, not a busier one. The KPI is ``flywheel.toml``'s default (conversion 7
days, thumbs up, support minutes, revenue 30 days), five arms, 5% holdback, 20%
returning users, two turns a session, a vote on a quarter of the turns,
conversions arriving over days. With ``texts`` the turns carry short, distinct
messages (random words) and the retrieved arm's turns the ids of the examples
they showed, so the few-shot step has something to mine and credit. Rows go in
with ``executemany`` on SQLite and ``COPY`` on PostgreSQL, not the ORM.
"""

from __future__ import annotations

import io
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

ARMS = ("concise", "empathetic", "proactive-upsell", "concise+fixed", "concise+retrieved")
EXPERIMENT = "history-bench"
START = datetime(2025, 1, 6, tzinfo=UTC)
PER_DAY = 1_000_000 / 60
CHUNK = 250_000
#: Example ids the retrieved arm's turns showed (credit has something to count).
SHOWN = tuple(f"bench-ex-{i}" for i in range(12))


def config(**fewshot: Any) -> Any:
    """The experiment of the built stores (default KPI of ``flywheel.toml``)."""
    from optimizer.config import Config

    return Config.model_validate(
        {
            "experiment": {
                "id": EXPERIMENT,
                "salt": EXPERIMENT,
                "champion": ARMS[0],
                "holdback": 0.05,
                "arms": [{"id": a, "prompt": a} for a in ARMS],
            },
            "fewshot": fewshot,
        }
    )


def days_for(n: int) -> float:
    return n / PER_DAY


def _ts(seconds: np.ndarray, pg: bool) -> np.ndarray:
    if not len(seconds):
        return np.array([], dtype=str)
    epoch = np.datetime64(START.replace(tzinfo=None), "us")
    stamps = epoch + (seconds * 1e6).astype("timedelta64[us]")
    text = np.char.replace(np.datetime_as_string(stamps, unit="us"), "T", " ")
    return np.char.add(text, "+00") if pg else text


def _vocabulary(rng: np.random.Generator, size: int = 600) -> np.ndarray:
    letters = np.array(list("abcdefghiklmnoprstuvwyz"))
    lengths = rng.integers(3, 9, size)
    return np.array(["".join(rng.choice(letters, k)) for k in lengths])


def _sentences(rng: np.random.Generator, vocab: np.ndarray, n: int, words: int) -> np.ndarray:
    """``n`` distinct sentences of random words (TF-IDF near-duplicates are rare)."""
    picks = vocab[rng.integers(0, len(vocab), (n, words))]
    out = picks[:, 0]
    for j in range(1, words):
        out = np.char.add(np.char.add(out, " "), picks[:, j])
    return np.char.add(out, "?")


def chunks(
    n: int, seed: int = 0, texts: bool = False, turn_days: float | None = None
) -> Iterator[dict[str, pd.DataFrame]]:
    """Rows of every table, ``CHUNK`` sessions at a time, in time order.

    ``turn_days``: only the sessions of that many last days have turns and votes
    (older ones none, and counts of 0 on their assignment), to build 10M-session
    histories in minutes on a shared machine: no refit reads old turns (a refit
    reads the counts kept on assignments; the latency guardrail the newest turns).
    """
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(np.random.default_rng(seed + 1))
    span = days_for(n) * 86400
    chat_from = None if turn_days is None else span - turn_days * 86400
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        yield session_rows(
            rng, vocab, lo, hi, lo / n * span, hi / n * span, texts=texts, chat_from=chat_from
        )


def session_rows(
    rng: np.random.Generator,
    vocab: np.ndarray,
    lo: int,
    hi: int,
    t_lo: float,
    t_hi: float,
    *,
    texts: bool = False,
    prefix: str = "s",
    chat_from: float | None = None,
) -> dict[str, pd.DataFrame]:
    """Sessions ``lo..hi`` assigned between ``t_lo`` and ``t_hi`` seconds after START."""
    k = hi - lo
    idx = np.arange(lo, hi)
    t = np.sort(rng.uniform(t_lo, t_hi, k))
    arm = rng.integers(0, len(ARMS), k)
    holdback = rng.random(k) < 0.05
    arm[holdback] = 0
    returning = (rng.random(k) < 0.2) & (idx > 1000)
    user = np.where(returning, (idx * 0.5).astype(np.int64), idx)
    sid = np.char.add(prefix, idx.astype(str))
    uid = np.char.add("u", user.astype(str))
    turn_s = np.repeat(np.arange(k), 2)
    turn_k = np.tile([0, 1], k)
    turn_t = t[turn_s] + 60 * (turn_k + 1)
    turn_id = np.char.add(np.char.add(sid[turn_s], ":t"), turn_k.astype(str))
    errors = rng.random(2 * k) < 0.01
    voted = (rng.random(2 * k) < 0.25) & ~errors
    chatted = np.ones(2 * k, dtype=bool)
    if chat_from is not None:  # sessions before it have no turns (see ``chunks``)
        chatted = t[turn_s] >= chat_from
        errors &= chatted
        voted &= chatted
    up = rng.random(2 * k) < 0.75

    def per(flags: np.ndarray) -> np.ndarray:
        return np.bincount(turn_s, weights=flags, minlength=k).astype(int)

    assignments = pd.DataFrame(
        {
            "session_id": sid,
            "user_id": uid,
            "experiment_id": EXPERIMENT,
            "arm_id": np.array(ARMS)[arm],
            "propensity": 0.2,
            "segment": "*",
            "context": "{}",
            "simulated": True,
            "assigned_s": t,
            "sticky": False,
            "holdback": holdback,
            "turns": per(chatted),
            "errors": per(errors),
            "rated": per(voted),
            "thumbs_up": per(voted & up),
            "thumbs_down": per(voted & ~up),
        }
    )
    turn_arm = np.array(ARMS)[arm][turn_s]
    if texts:
        questions = np.char.add(_sentences(rng, vocab, 2 * k, 6), turn_id)
        replies = _sentences(rng, vocab, 2 * k, 10)
        retrieved = turn_arm == "concise+retrieved"
        pick = rng.integers(0, len(SHOWN), (2 * k, 2))
        shown = np.where(
            retrieved,
            np.char.add(
                np.char.add('["', np.array(SHOWN)[pick[:, 0]]),
                np.char.add(
                    '", "',
                    np.char.add(np.array(SHOWN)[(pick[:, 0] + 1 + pick[:, 1] % 11) % 12], '"]'),
                ),
            ),
            "[]",
        )
    else:
        questions = replies = np.full(2 * k, "")
        shown = np.full(2 * k, "[]")
    turns = pd.DataFrame(
        {
            "id": turn_id,
            "session_id": sid[turn_s],
            "user_id": uid[turn_s],
            "experiment_id": EXPERIMENT,
            "arm_id": turn_arm,
            "prompt_id": turn_arm,
            "prompt_hash": "bench",
            "fewshot_ids": shown,
            "model": "bench",
            "user_message": questions,
            "reply": replies,
            "latency_ms": np.exp(np.log(800) + 0.3 * rng.standard_normal(2 * k)),
            "error": np.where(errors, "error", ""),
            "created_s": turn_t,
        }
    )[chatted]
    turns["error"] = turns["error"].replace("", None)
    v = np.flatnonzero(voted)
    votes = pd.DataFrame(
        {
            "turn_id": turn_id[v],
            "session_id": sid[turn_s[v]],
            "user_id": uid[turn_s[v]],
            "value": up[v].astype(int),
            "created_s": turn_t[v] + 20,
        }
    )
    converted = np.flatnonzero(rng.random(k) < 0.03 + 0.005 * arm)
    conv_t = t[converted] + rng.exponential(1.5 * 86400, len(converted))
    support = np.flatnonzero(rng.random(k) < 0.3)
    parts = []
    for name, rows, when, values in (
        ("conversion", converted, conv_t, np.ones(len(converted))),
        ("revenue", converted, conv_t, rng.exponential(40, len(converted))),
        ("support_minutes", support, t[support] + 3600, rng.exponential(6, len(support))),
    ):
        parts.append(
            pd.DataFrame(
                {
                    "idempotency_key": np.char.add(sid[rows], f":{name}"),
                    "session_id": sid[rows],
                    "user_id": uid[rows],
                    "name": name,
                    "value": values,
                    "occurred_s": when,
                }
            )
        )
    outcomes = pd.concat(parts, ignore_index=True).sort_values("occurred_s", kind="stable")
    return {"assignments": assignments, "turns": turns, "votes": votes, "outcomes": outcomes}


COLUMNS = {
    "assignments": (
        "session_id, user_id, experiment_id, arm_id, propensity, segment, context, simulated,"
        " assigned_at, sticky, holdback, turns, errors, rated, thumbs_up, thumbs_down"
    ),
    "turns": (
        "id, session_id, user_id, experiment_id, arm_id, prompt_id, prompt_hash, fewshot_ids,"
        " model, user_message, reply, latency_ms, error, created_at"
    ),
    "feedback_events": "turn_id, session_id, user_id, kind, value, created_at",
    "feedback": "turn_id, session_id, user_id, value, created_at, updated_at",
    "outcomes": (
        "idempotency_key, session_id, user_id, name, value, occurred_at, received_at, source, extra"
    ),
}


def tables(chunk: dict[str, pd.DataFrame], pg: bool) -> dict[str, pd.DataFrame]:
    """The chunk's rows in each table's column order, timestamps as text."""
    a, t, v, o = chunk["assignments"], chunk["turns"], chunk["votes"], chunk["outcomes"]
    a = a.assign(assigned_s=_ts(a["assigned_s"].to_numpy(), pg))
    t = t.assign(created_s=_ts(t["created_s"].to_numpy(), pg))
    stamp = _ts(v["created_s"].to_numpy(), pg)
    events = pd.DataFrame(
        {
            "turn_id": v["turn_id"],
            "session_id": v["session_id"],
            "user_id": v["user_id"],
            "kind": "upsert",
            "value": v["value"],
            "created_at": stamp,
        }
    )
    current = events.drop(columns="kind").assign(updated_at=stamp)
    occurred = _ts(o["occurred_s"].to_numpy(), pg)
    outcomes = o.drop(columns="occurred_s").assign(
        occurred_at=occurred, received_at=occurred, source="bench", extra="{}"
    )
    if not pg:
        for col in ("simulated", "sticky", "holdback"):
            a[col] = a[col].astype(int)
    return {
        "assignments": a,
        "turns": t,
        "feedback_events": events,
        "feedback": current,
        "outcomes": outcomes,
    }


def _prepare(url: str) -> None:
    from optimizer.store import ArmSpec, Store

    store = Store(url)
    store.upgrade()
    store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "bench") for a in ARMS], at=START)
    store.dispose()


def write(url: str, parts: Iterator[dict[str, pd.DataFrame]]) -> dict[str, int]:
    """Append the rows of ``parts`` to the store at ``url`` in bulk."""
    counts = dict.fromkeys(COLUMNS, 0)
    if url.startswith("postgresql"):
        import psycopg

        from optimizer.store import make_engine

        dsn = make_engine(url).url.set(drivername="postgresql").render_as_string(False)
        with psycopg.connect(dsn) as conn:
            for chunk in parts:
                for table, frame in tables(chunk, True).items():
                    buf = io.StringIO()
                    frame.to_csv(buf, sep="\t", header=False, index=False, na_rep="\\N")
                    with conn.cursor().copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as cp:
                        cp.write(buf.getvalue())
                    counts[table] += len(frame)
                conn.commit()
            # as autovacuum would leave a steady store: statistics, and pages marked
            # all-visible (index-only scans, e.g. the latency guardrail's)
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE")
        return counts
    lite = sqlite3.connect(url.removeprefix("sqlite:///"))
    lite.execute("PRAGMA synchronous=OFF")
    lite.execute("PRAGMA journal_mode=WAL")
    for chunk in parts:
        for table, frame in tables(chunk, False).items():
            marks = ", ".join("?" * len(frame.columns))
            lite.executemany(
                f"INSERT INTO {table} ({COLUMNS[table]}) VALUES ({marks})",
                frame.itertuples(index=False, name=None),
            )
            counts[table] += len(frame)
        lite.commit()
    lite.execute("ANALYZE")
    lite.close()
    return counts


def build(
    url: str, n: int, *, texts: bool = False, seed: int = 0, turn_days: float | None = None
) -> dict[str, int]:
    """Write ``n`` sessions with their turns, votes and outcomes into a new store at ``url``."""
    _prepare(url)
    return write(url, chunks(n, seed=seed, texts=texts, turn_days=turn_days))
