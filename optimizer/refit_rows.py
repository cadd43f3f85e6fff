"""Sessions kept as rows of numbers between refits: what stays true as time passes.

:mod:`optimizer.refit_state` needs, at every refit, the sums of every session
as of ``now``. Reading sessions back from the events costs what the history
costs; most of a session does not change once it happened. So each session is
kept as one row of numbers:

- keys and counts: arm, segment, holdback, snapshot version, assignment time,
  turns, errors, votes, cost;
- per outcome term, its value so far and its events' delays
  (:func:`optimizer.kpi.observed_terms`);
- ``srm_first``: whether it is its user's first session outside the holdback
  (the sample-ratio check counts those).

What depends on ``now`` — which windows closed, exposures, the reward — is
computed from them (:meth:`Rows.dated`, through :func:`optimizer.kpi.finish_frame`):
the frame a full read would give. An event changes only the rows of the
sessions it names, or of its user: :func:`reread` reads exactly those again.

Rows are kept one day per part (:func:`encode_day`), so a refit rewrites only
the days it changed.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer import kpi
from optimizer.config import Config
from optimizer.cost import COST_COLUMN
from optimizer.store import Store, schema
from optimizer.store.store import fetch_in

__all__ = [
    "REREAD_LIMIT",
    "Rows",
    "concat",
    "decode_day",
    "encode_day",
    "reread",
    "row_days",
    "srm_first",
]

_DAY_S = 86_400
_COUNTS = ("turns", "errors", "rated", "thumbs_up", "thumbs_down")
_SMALL = (*_COUNTS, "version")
#: Kept as categories: their codes are what the sums group by.
_CODED = ("arm_id", "segment")
#: More sessions than this to read again, and starting over is cheaper.
REREAD_LIMIT = 200_000
_DELAY_COLUMNS = {"column": object, "assignment_id": np.int64, "delay_s": float, "weight": float}


@dataclass
class Rows:
    """Kept sessions (``rows``, in time order) and their outcome-term delays (``delays``:
    ``column``, ``assignment_id``, ``delay_s``, ``weight``)."""

    rows: pd.DataFrame
    delays: pd.DataFrame

    @classmethod
    def empty(cls) -> Rows:
        return cls(pd.DataFrame(), _empty_delays())

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, config: Config, first: np.ndarray) -> Rows:
        """The rows of a :func:`optimizer.kpi.session_frame` read ``with_ids``; ``first``
        flags its SRM first sessions (:func:`srm_first`)."""
        if not len(frame):
            return cls.empty()
        version = frame["snapshot_version"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
        rows = pd.DataFrame(
            {
                "assignment_id": frame["assignment_id"].to_numpy(dtype=np.int64),
                "user_key": _user_keys(frame["user_id"]),
                "arm_id": _coded(frame["arm_id"]),
                "segment": _coded(frame["segment"]),
                "holdback": frame["holdback"].to_numpy(dtype=bool),
                "version": version,
                "assigned_s": frame["assigned_s"].to_numpy(dtype=float),
                **{c: frame[c].to_numpy(dtype=np.int64) for c in _COUNTS},
                **(
                    {COST_COLUMN: frame[COST_COLUMN].to_numpy(dtype=float)}
                    if COST_COLUMN in frame
                    else {}
                ),
                "srm_first": np.asarray(first, dtype=bool),
            }
        )
        ids = rows["assignment_id"].to_numpy()
        term_delays = frame.attrs.get("term_delays", {})
        delays = [_empty_delays()]
        for col in _outcome_columns(config):
            rows[f"{col}__obs"] = frame[f"{col}_observed"].to_numpy(dtype=float)
            d = term_delays.get(col)
            if d is not None and len(d):
                delays.append(
                    pd.DataFrame(
                        {
                            "column": _objects(np.full(len(d), col, dtype=object)),
                            "assignment_id": ids[d["pos"].to_numpy(dtype=np.int64)],
                            "delay_s": d["delay_s"].to_numpy(dtype=float),
                            "weight": d["weight"].to_numpy(dtype=float),
                        }
                    )
                )
        return cls(rows, pd.concat(delays, ignore_index=True)).sorted()

    def __len__(self) -> int:
        return len(self.rows)

    def ids(self) -> np.ndarray:
        """Assignment ids of the rows."""
        if not len(self.rows):
            return np.zeros(0, dtype=np.int64)
        return self.rows["assignment_id"].to_numpy(dtype=np.int64)

    def sorted(self) -> Rows:
        """In time order (ties: assignment order), as a read of the store gives them."""
        if not len(self.rows):
            return self
        at = self.rows["assigned_s"].to_numpy()
        ids = self.rows["assignment_id"].to_numpy()
        if ((np.diff(at) > 0) | ((np.diff(at) == 0) & (np.diff(ids) > 0))).all():
            return self  # days read in order: already sorted
        order = np.lexsort((ids, at))
        return Rows(self.rows.iloc[order].reset_index(drop=True), self.delays)

    def days(self) -> np.ndarray:
        return row_days(self.rows)

    def where(self, mask: np.ndarray) -> Rows:
        """The rows where ``mask`` holds, with their delays."""
        if not len(self.rows):
            return self
        rows = self.rows[np.asarray(mask, dtype=bool)].reset_index(drop=True)
        keep = self.delays["assignment_id"].isin(rows["assignment_id"]).to_numpy()
        return Rows(rows, self.delays[keep].reset_index(drop=True))

    def without(self, assignment_ids: Iterable[int] | np.ndarray) -> Rows:
        if not len(self.rows):
            return self
        return self.where(~np.isin(self.ids(), np.asarray(list(assignment_ids), dtype=np.int64)))

    def dated(
        self, config: Config, now: datetime, prior: Mapping[str, tuple[np.ndarray, int]] | None
    ) -> pd.DataFrame:
        """The session frame of these rows at ``now`` (with ``assignment_id``, ``assigned_s``
        and ``srm_first``; no session ids, ``user_id`` holds a key of the user)."""
        rows = self.rows
        if not len(rows):
            out = kpi.empty_session_frame(config, cost=kpi.uses_cost(config), with_ids=True)
            out["srm_first"] = pd.Series(dtype=bool)
            return out
        cost = COST_COLUMN in rows
        frame = pd.DataFrame(
            {
                "session_id": _objects(np.full(len(rows), None, dtype=object)),
                "user_id": rows["user_key"].to_numpy(),
                "arm_id": rows["arm_id"].array,
                "segment": rows["segment"].array,
                "propensity": np.full(len(rows), np.nan),
                "snapshot_version": pd.array(
                    np.where(rows["version"] >= 0, rows["version"], np.nan), dtype="Int64"
                ),
                "holdback": rows["holdback"].to_numpy(dtype=bool),
                "assigned_s": rows["assigned_s"].to_numpy(dtype=float),
                **{c: rows[c].to_numpy(dtype=np.int64) for c in _COUNTS},
                **({COST_COLUMN: rows[COST_COLUMN].to_numpy(dtype=float)} if cost else {}),
                "assignment_id": rows["assignment_id"].to_numpy(dtype=np.int64),
            }
        )
        pos = pd.Index(rows["assignment_id"].to_numpy())
        observed, delays = {}, {}
        for col in _outcome_columns(config):
            observed[col] = rows[f"{col}__obs"].to_numpy(dtype=float)
            d = self.delays[(self.delays["column"] == col).to_numpy()]
            delays[col] = pd.DataFrame(
                {
                    "pos": pos.get_indexer(d["assignment_id"].to_numpy()).astype(np.int64),
                    "delay_s": d["delay_s"].to_numpy(dtype=float),
                    "weight": d["weight"].to_numpy(dtype=float),
                }
            )
        out = kpi.finish_frame(
            frame, config, now, observed, delays, prior=prior, cost=cost, with_ids=True
        )
        out["srm_first"] = rows["srm_first"].to_numpy(dtype=bool)
        return out


def concat(parts: Iterable[Rows]) -> Rows:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Rows.empty()
    rows = pd.concat([p.rows for p in parts], ignore_index=True)
    for col in _CODED:  # one set of codes for all parts (pandas falls back to objects)
        if col in rows:
            rows[col] = _union([p.rows[col] for p in parts])
    return Rows(rows, pd.concat([p.delays for p in parts], ignore_index=True)).sorted()


def row_days(rows: pd.DataFrame) -> np.ndarray:
    """Day number (since 1970, UTC) of each row's assignment."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    return np.floor(rows["assigned_s"].to_numpy(dtype=float) / _DAY_S).astype(np.int64)


def srm_first(frame: pd.DataFrame, earlier: Iterable[Any] = ()) -> np.ndarray:
    """Each user's first session outside the holdback in a time-ordered frame, unless the
    user had one before the frame (``earlier``)."""
    holdback = frame["holdback"].to_numpy(dtype=bool)
    first = ~holdback & ~frame["user_id"].where(~frame["holdback"]).duplicated().to_numpy()
    earlier = set(earlier)
    if earlier:
        first &= ~frame["user_id"].isin(earlier).to_numpy()
    return first


# -- reading again what changed -------------------------------------------------------------


def reread(
    store: Store, config: Config, now: datetime, sessions: Iterable[str], users: Iterable[str]
) -> Rows | None:
    """The rows, as of ``now``, of ``sessions`` (an event named them) and of every session of
    ``users`` (a user-level outcome, a back-dated session). Each of their users' sessions
    is read along — a user-level outcome goes to the user's latest session before it, and
    the SRM first session is the user's first — but only those rows are returned.
    None: more than :data:`REREAD_LIMIT` sessions."""
    sessions, users = set(sessions), set(users)
    if not sessions and not users:
        return Rows.empty()
    everyone = _sessions_of(store, config.experiment.id, now, sessions, users)
    if everyone is None:
        return None
    if not everyone:
        return Rows.empty()
    frame = kpi.session_frame(store, config, now=now, session_ids=sorted(everyone), with_ids=True)
    first = srm_first(frame)
    mine = (frame["session_id"].isin(sessions) | frame["user_id"].isin(users)).to_numpy()
    if not len(frame):
        return Rows.empty()
    picked = kpi.frame_rows(frame, mine)
    return Rows.from_frame(picked, config, first[mine])


def _sessions_of(
    store: Store, experiment_id: str, now: datetime, sessions: set[str], users: set[str]
) -> set[str] | None:
    a = schema.assignments
    query = sa.select(a.c.session_id, a.c.user_id).where(
        a.c.experiment_id == experiment_id, a.c.assigned_at <= now
    )
    names = set(users)
    found: set[str] = set()
    with store.engine.connect() as conn:
        for sid, uid in fetch_in(conn, query, a.c.session_id, sessions):
            found.add(sid)
            if uid is not None:
                names.add(uid)
        found.update(r[0] for r in fetch_in(conn, query, a.c.user_id, names))
    return found if len(found) <= REREAD_LIMIT else None


# -- kept ---------------------------------------------------------------------------------


def encode_day(rows: Rows) -> bytes:
    """One day of rows as bytes: a JSON header (columns, dtypes, the strings behind coded
    columns) and the columns' raw buffers, compressed with zlib's fastest level (4-5x
    smaller, a tenth of the default level's time). No pickle; counts in 32 bits."""
    header: list[dict[str, Any]] = []
    buffers: list[bytes] = []
    for side, frame in (("r", rows.rows), ("d", rows.delays)):
        for col, series in frame.items():
            entry: dict[str, Any] = {"side": side, "name": col}
            if isinstance(series.dtype, pd.CategoricalDtype):
                codes, levels = series.cat.codes.to_numpy(), series.cat.categories
            else:
                codes, levels = (
                    pd.factorize(series.to_numpy()) if series.dtype == object else (None, None)
                )
            values = series.to_numpy() if codes is None else codes.astype(np.int32)
            if levels is not None:
                entry["levels"] = [str(v) for v in levels]
            elif col in _SMALL:
                values = values.astype(np.int32)
            values = np.ascontiguousarray(values)
            entry["dtype"], entry["n"] = values.dtype.str, len(values)
            header.append(entry)
            buffers.append(values.tobytes())
    head = json.dumps(header).encode()
    return zlib.compress(len(head).to_bytes(4, "little") + head + b"".join(buffers), 1)


def decode_day(blob: bytes) -> Rows:
    raw = zlib.decompress(blob)
    size = int.from_bytes(raw[:4], "little")
    offset = 4 + size
    sides: dict[str, dict[str, Any]] = {"r": {}, "d": {}}
    for entry in json.loads(raw[4:offset]):
        dtype = np.dtype(entry["dtype"])
        values = np.frombuffer(raw, dtype=dtype, count=entry["n"], offset=offset)
        offset += dtype.itemsize * entry["n"]
        if "levels" in entry:
            levels = pd.Index(np.asarray(entry["levels"], dtype=object), dtype=object)
            values = pd.Categorical.from_codes(values, levels)
            if entry["name"] not in _CODED:
                values = _objects(np.asarray(values, dtype=object))
        sides[entry["side"]][entry["name"]] = values
    delays = pd.DataFrame(sides["d"]) if sides["d"] else _empty_delays()
    return Rows(pd.DataFrame(sides["r"]), delays)


# -- helpers ------------------------------------------------------------------------------


def _union(parts: list[pd.Series]) -> pd.Categorical:
    """Categorical parts as one, on the union of their categories (kept as objects)."""
    cats = [np.asarray(p.cat.categories, dtype=object) for p in parts]
    levels = pd.Index(np.concatenate(cats), dtype=object).unique()
    codes = []
    for part, cat in zip(parts, cats, strict=True):
        mapping = np.append(levels.get_indexer(cat), -1)  # code -1 (missing) stays -1
        codes.append(mapping[part.cat.codes.to_numpy()])
    return pd.Categorical.from_codes(np.concatenate(codes), pd.Index(levels, dtype=object))


def _coded(values: pd.Series) -> pd.Categorical:
    """Strings as categories of Python objects (the kind :func:`decode_day` makes)."""
    codes, levels = pd.factorize(np.asarray(values, dtype=object))
    return pd.Categorical.from_codes(
        codes, pd.Index(np.asarray(levels, dtype=object), dtype=object)
    )


def _objects(values: Any) -> pd.Series:
    """Strings kept as Python objects: pandas 3 would convert them to Arrow strings, a cost
    paid on every frame built here and of no use to the sums."""
    return pd.Series(np.asarray(values, dtype=object), dtype=object)


def _user_keys(users: pd.Series) -> np.ndarray:
    """A stable 64-bit key per user (pandas' fixed-key hash): numbers, not strings, are kept;
    a frame of rows read again keys its users the same way."""
    if users.dtype.kind in "iu":  # already keys (rows dated and read back)
        return users.to_numpy(dtype=np.int64)
    values = np.asarray(users.astype(str).to_numpy(), dtype=object)
    return pd.util.hash_array(values).view(np.int64)


def _outcome_columns(config: Config) -> list[str]:
    return [kpi.term_column(t.name) for t in config.kpi.terms if t.source.startswith("outcome:")]


def _empty_delays() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _DELAY_COLUMNS.items()})
