"""Mine the example bank from conversations that earned the KPI.

A turn of the experiment qualifies when it has no error, no thumbs-down, and
at least one of (thresholds in ``[fewshot]`` of ``flywheel.toml``):

- ``thumbs_up`` — the user gave that turn a thumbs-up;
- ``reward`` — its session's KPI reward (:func:`optimizer.kpi.session_frame`) is
  complete and ``>= min_reward``;
- ``outcome:<name>`` — its session reported one of ``outcomes`` (e.g. a
  conversion) with a value > 0;
- ``resolved_quickly`` — its session reported ``resolved_outcome`` with at most
  ``max_support_minutes`` of ``support_minutes_outcome``.

A session that needed more than ``max_support_minutes`` of support never
teaches, whatever its thumbs.
The qualifying turns are scrubbed (:mod:`optimizer.privacy`, user text *and*
reply; facts of the public knowledge base are kept), cut to
``[min_chars, max_chars]`` per side, de-duplicated by TF-IDF cosine ``>=
dedup_threshold`` against every banked example — rejected ones included, so
they never return — and within the batch (best reward first), then added as
``candidate`` (``approved`` with ``auto_approve``) with their provenance.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sklearn.feature_extraction.text import TfidfVectorizer

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.fewshot.bank import ExampleBank
from optimizer.fewshot.signals import RANK_COLUMNS, flag_turns, outcome_signals, reward_so_far
from optimizer.kpi import session_frame
from optimizer.privacy import SCRUBBER_VERSION, Scrubber, public_allowlist
from optimizer.prompt_library import PromptLibrary, load_prompts
from optimizer.store import Store, schema
from optimizer.store.store import fetch_tuples

__all__ = ["MiningResult", "mine_examples", "turn_reasons"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningResult:
    """What one mining pass did; ``added`` are the new example ids."""

    considered: int = 0
    qualifying: int = 0
    added: tuple[str, ...] = ()
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    seeds_added: tuple[str, ...] = ()
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "considered": self.considered,
            "qualifying": self.qualifying,
            "added": list(self.added),
            "too_short": self.too_short,
            "too_long": self.too_long,
            "duplicates": self.duplicates,
            "seeds_added": list(self.seeds_added),
            "reasons": dict(self.reasons),
        }


#: The message columns of ``turns``, read for the few turns a mining run banks.
TEXT_COLUMNS = ("user_message", "reply")
#: The columns of ``turns`` a mining run ranks by (texts come later, for the few it banks).


def _session_signals(store: Store, config: Config, now: datetime) -> pd.DataFrame:
    """Per session: KPI reward (complete or so far) and the outcome signals mining uses."""
    frame = session_frame(store, config, now=now)
    if frame.empty:
        return pd.DataFrame(columns=["reward", "complete", "reward_so_far"]).rename_axis(
            "session_id"
        )
    sessions = frame.set_index("session_id")[["arm_id", "reward", "complete"]].copy()
    sessions["reward_so_far"] = reward_so_far(frame)
    with store.engine.connect() as conn:
        return outcome_signals(conn, config, sessions, now)


def turn_reasons(
    store: Store, config: Config, *, now: datetime | None = None, texts: bool = True
) -> pd.DataFrame:
    """Every turn of the experiment up to ``now`` with the session's reward and ``reasons``.

    ``reasons`` lists why the turn qualifies for mining (empty: it does not).
    Sorted best first: complete reward, then reward so far, then newest, then turn
    id (so that ties have one order, the incremental step's too). Without
    ``texts`` only :data:`RANK_COLUMNS` are read: millions of turns are cheap to
    rank, not to read in full.
    """
    now = as_utc(now) if now is not None else utcnow()
    t = schema.turns
    turns = store.frame(
        t,
        sa.and_(t.c.experiment_id == config.experiment.id, t.c.created_at <= now),
        exclude=() if texts else [c.name for c in t.columns if c.name not in RANK_COLUMNS],
    )
    if not turns.empty:
        # Opted-out users and deleted conversations never become data (optimizer.store.consent).
        excluded = store.excluded_sessions(config.experiment.id)
        if excluded:
            turns = turns[~turns["session_id"].isin(excluded)].reset_index(drop=True)
    if turns.empty:
        return turns.assign(
            reasons=pd.Series(dtype=object),
            reward=pd.Series(dtype=float),
            complete=pd.Series(dtype=bool),
            reward_so_far=pd.Series(dtype=float),
        )
    sessions = _session_signals(store, config, now).drop(columns=["arm_id"], errors="ignore")
    fb = schema.feedback
    votes = store.frame(fb, sa.and_(fb.c.value.is_not(None), fb.c.updated_at <= now))
    turns = flag_turns(
        turns.join(sessions, on="session_id"),
        up=set(votes.loc[votes["value"] == 1, "turn_id"]),
        down=set(votes.loc[votes["value"] == 0, "turn_id"]),
        config=config,
    )
    order = pd.DataFrame(
        {
            "r": turns["reward"].astype(float).fillna(-np.inf),
            "s": turns["reward_so_far"].astype(float).fillna(-np.inf),
            "t": turns["created_at"],
            "i": turns["id"],
        }
    )
    return turns.loc[
        order.sort_values(["r", "s", "t", "i"], ascending=False, kind="stable").index
    ].reset_index(drop=True)


def mine_examples(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    library: PromptLibrary | None = None,
    actor: str = "miner",
    incremental: bool = False,
) -> MiningResult:
    """Add scrubbed, de-duplicated examples from qualifying turns to the bank.

    Idempotent: turns already mined and texts already banked are skipped. The
    optimizer job calls this; so does ``flywheel fewshot mine``. With
    ``incremental`` the ranking comes from the state kept by
    :func:`optimizer.fewshot.state.refresh_state` (which the caller ran up to
    ``now``), not from every turn: same candidates, same order.
    """
    now = as_utc(now) if now is not None else utcnow()
    fs = config.fewshot
    library = library if library is not None else load_prompts(config.prompts_dir)
    bank = ExampleBank(store)
    seeds: tuple[str, ...] = tuple(bank.sync_seeds(library, at=now))
    pages: Iterable[pd.DataFrame]
    if incremental:
        from optimizer.fewshot.state import mining_counts, ranked_candidates

        counts = mining_counts(store, config)
        considered, qualifying, reason_counts = counts.considered, counts.qualifying, counts.reasons
        too_short, too_long = counts.too_short, counts.too_long
        pages = ranked_candidates(store, config, size=fs.max_mined_per_run)
    else:
        turns = turn_reasons(store, config, now=now, texts=False)
        considered = len(turns)
        candidates = turns.loc[turns["reasons"].map(bool).astype(bool)]
        qualifying = len(candidates)
        reason_counts = {}
        for why in candidates["reasons"]:
            for r in why:
                reason_counts[r] = reason_counts.get(r, 0) + 1
        candidates = candidates[~candidates["id"].isin(bank.mined_turn_ids())]
        # Lengths are checked before scrubbing too (it barely changes them), so turns that
        # can never fit do not take the run's places; the best max_mined_per_run remain.
        lengths = _text_lengths(store, config.experiment.id, now)
        candidates = candidates.join(lengths, on="id")
        too_short = int((candidates["shortest"] < fs.min_chars).sum())
        too_long = int((candidates["longest"] > fs.max_chars).sum())
        candidates = candidates[
            (candidates["shortest"] >= fs.min_chars) & (candidates["longest"] <= fs.max_chars)
        ]
        pages = (
            candidates.iloc[start : start + fs.max_mined_per_run]
            for start in range(0, len(candidates), fs.max_mined_per_run)
        )
    scrubber = Scrubber(allow=public_allowlist(library.knowledge))
    banked = [f"{e.user_text}\n{e.assistant_text}" for e in bank.list()]
    added: list[str] = []
    duplicates = 0
    # Best first, in slices of the run's places, until they are filled: a near-duplicate
    # (checked only once scrubbed) is passed over, never blocking the turns below it.
    for page in pages:
        if len(added) >= fs.max_mined_per_run:
            break
        pending: list[tuple[Any, str, str]] = []
        chunk = _with_texts(store, page)
        for row in chunk.to_dict("records"):
            user, reply = (
                scrubber.scrub(row["user_message"]).strip(),
                scrubber.scrub(row["reply"]).strip(),
            )
            if min(len(user), len(reply)) < fs.min_chars:
                too_short += 1
            elif max(len(user), len(reply)) > fs.max_chars:
                too_long += 1
            else:
                pending.append((row, user, reply))
        for (row, user, reply), novel in zip(
            pending, _novel(pending, banked, fs.dedup_threshold), strict=True
        ):
            if not novel or len(added) >= fs.max_mined_per_run:
                duplicates += not novel
                continue
            example_id = _bank_turn(bank, row, user, reply, now=now, actor=actor, config=config)
            if example_id is None:  # the same text was banked meanwhile
                duplicates += 1
                continue
            added.append(example_id)
            banked.append(f"{user}\n{reply}")
    result = MiningResult(
        considered=considered,
        qualifying=qualifying,
        added=tuple(added),
        too_short=too_short,
        too_long=too_long,
        duplicates=duplicates,
        seeds_added=seeds,
        reasons=reason_counts,
    )
    log.info("mining: %s", result.as_dict())
    return result


def _text_lengths(store: Store, experiment_id: str, now: datetime) -> pd.DataFrame:
    """Per turn id: the shorter and the longer of its two messages, in characters."""
    t = schema.turns
    u, r = sa.func.length(t.c.user_message), sa.func.length(t.c.reply)
    query = sa.select(
        t.c.id,
        sa.case((u < r, u), else_=r).label("shortest"),
        sa.case((u > r, u), else_=r).label("longest"),
    ).where(t.c.experiment_id == experiment_id, t.c.created_at <= now)
    with store.engine.connect() as conn:
        rows = fetch_tuples(conn, query)
    return pd.DataFrame(rows, columns=["id", "shortest", "longest"]).set_index("id")


def _with_texts(store: Store, turns: pd.DataFrame) -> pd.DataFrame:
    """``turns`` (a few) with their messages read."""
    t = schema.turns
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.id, *(t.c[c] for c in TEXT_COLUMNS)).where(
                t.c.id.in_(turns["id"].tolist())
            )
        ).all()
    texts = pd.DataFrame(rows, columns=["id", *TEXT_COLUMNS]).set_index("id")
    return turns.join(texts, on="id")


def _bank_turn(
    bank: ExampleBank,
    row: dict[str, Any],
    user: str,
    reply: str,
    *,
    now: datetime,
    actor: str,
    config: Config,
) -> str | None:
    """Add one scrubbed turn to the bank with its provenance; None if the text is banked."""
    final = _number(row["reward"]) if row["complete"] else None
    so_far = _number(row["reward_so_far"])
    provenance = {
        "session_id": row["session_id"],
        "turn_id": row["id"],
        "arm_id": row["arm_id"],
        "prompt_id": row["prompt_id"],
        "turn_created_at": as_utc(pd.Timestamp(row["created_at"]).to_pydatetime()).isoformat(),
        "reasons": list(row["reasons"]),
        "session_reward": final,
        "reward_complete": bool(row["complete"]),
        "reward_so_far": so_far,
        "mined_at": now.isoformat(),
        "scrubber_version": SCRUBBER_VERSION,
    }
    return bank.add(
        user,
        reply,
        source="mined",
        status="approved" if config.fewshot.auto_approve else "candidate",
        session_id=row["session_id"],
        turn_id=row["id"],
        reward=final if final is not None else so_far,
        provenance=provenance,
        actor=actor,
        at=now,
    )


def _number(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _novel(pending: list[tuple[Any, str, str]], banked: list[str], threshold: float) -> list[bool]:
    """For each pending pair: not a near-duplicate of the bank nor of an earlier kept pair."""
    if not pending:
        return []
    texts = [f"{user}\n{reply}" for _, user, reply in pending]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    matrix = vectorizer.fit_transform(banked + texts)
    bank_m, new_m = matrix[: len(banked)], matrix[len(banked) :]
    against_bank = (new_m @ bank_m.T).toarray().max(axis=1) if len(banked) else np.zeros(len(texts))
    within = (new_m @ new_m.T).toarray()
    keep: list[bool] = []
    for i in range(len(texts)):
        dup = against_bank[i] >= threshold or any(
            keep[j] and within[i, j] >= threshold for j in range(i)
        )
        keep.append(not dup)
    return keep
