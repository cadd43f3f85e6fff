"""The incremental refit: what a refit needs, kept up to date instead of read again.

A refit needs sums per (segment, arm, holdback) (:mod:`optimizer.moments`),
the support-minutes histogram, the SRM counts and the delay shares. Reading
every session back from the events at every refit costs what the history
costs (issue 18). Instead:

- every session is kept as a row of numbers (:mod:`optimizer.refit_rows`), one
  part per day in ``refit_state`` (``day:<day>``);
- a session whose KPI windows have all closed no longer changes with time, so
  whole **days** of them are summed once into **totals** (``moments``,
  ``sketch``, ``srm``, ``delay``: no per-day sums, so the totals are small at
  any history);
- the **open window** (the last month, with a 30-day revenue term) is dated at
  each refit's ``now`` from its kept rows;
- an event since the last run — a late outcome, a duplicate, a vote changed, a
  turn, a new, late or re-assigned session (``Store.reassign``'s
  ``<thread>~n`` sessions are new assignments) — changes the rows of the
  sessions it names or of its user: those are read again
  (:func:`optimizer.refit_rows.reread`); in a closed day the totals are
  corrected by the difference (old rows out, new rows in). The events are
  found from watermarks on the append-only ids (``outcomes.id``,
  ``feedback_events.id``, ``assignments.id``, ``arm_events.id``) and on the
  event times between the last run's ``now`` and this one's (events written
  ahead of time by a simulation).

So a refit reads the few sessions that changed, the month of kept rows and
the totals: its cost follows the traffic, not the length of the history.

Why the job from a watermark and not triggers in the events' transactions: a
session becomes final when its window closes, which no event marks; the write
path of a chat turn stays as cheap as it is; one writer (the job, under its
lock) owns the sums, so replicas never contend on hot aggregate rows; and the
state is a cache — lost or stale (another KPI configuration: ``fingerprint``;
an arm status stamped in the past), it is rebuilt from the events.

Results equal a full recomputation up to the order of floating-point
additions (``tests/optimizer/test_refit_state.py`` compares them on random
event streams).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer import kpi, srm
from optimizer.clock import as_utc
from optimizer.config import Config
from optimizer.holdback import bandit_frame
from optimizer.moments import SketchRef, combine, session_moments, support_sketch
from optimizer.refit_rows import Rows, concat, decode_day, encode_day, reread, row_days, srm_first
from optimizer.store import Store, schema

__all__ = ["SEAL_CHUNK_DAYS", "RefitInputs", "evidence_moments", "refit_inputs"]

log = logging.getLogger(__name__)

_DAY_S = 86_400
#: Sealing a long history reads it this many days at a time (bounded memory).
SEAL_CHUNK_DAYS = 30
_MOMENT_KEYS = ("segment", "arm_id", "holdback")
_SRM_KEYS = ("version", "segment", "inactive", "arm_id")
#: The totals and the keys they sum over, and the column that counts their rows.
_TOTALS = {
    "moments": (_MOMENT_KEYS, "n"),
    "sketch": ((*_MOMENT_KEYS, "bucket"), "count"),
    "srm": (_SRM_KEYS, "n"),
    "delay": (("column", "bin"), None),
}
_DAY = "day:"
#: The layout of the kept state; another one is rebuilt from the events.
_FORMAT = 4


@dataclass
class RefitInputs:
    """What a refit fits on: sums of every session as of ``now``.

    ``moments`` (with ``attrs["sketch"]``) cover all sessions, holdback included;
    ``srm_groups`` the first non-holdback session of each user; ``frame`` the
    open window's session rows (or all sessions on the full path);
    ``sealed_until`` the end of the last sealed day (None on the full path);
    ``stats`` what the update did (days sealed, days corrected, sessions read again).
    """

    moments: pd.DataFrame
    srm_groups: pd.DataFrame
    frame: pd.DataFrame
    sealed_until: datetime | None
    stats: dict[str, Any]


def refit_inputs(
    store: Store, config: Config, *, now: datetime, incremental: bool = True
) -> RefitInputs:
    """Sums for a refit at ``now``: kept and brought up to date, or (``incremental=False``)
    recomputed from every session — the reference the incremental path must equal."""
    now = as_utc(now)
    activity = srm.arm_activity(store, config.experiment.id)
    if not incremental:
        frame = kpi.session_frame(store, config, now=now)
        moments, sketch, groups, _ = _summarise(frame, activity)
        moments.attrs["sketch"] = SketchRef(sketch)
        return RefitInputs(moments, groups, frame, None, {"path": "full"})
    return _Updater(store, config, now, activity).run()


def evidence_moments(
    store: Store,
    config: Config,
    inputs: RefitInputs,
    resumed: Mapping[str, datetime],
    *,
    now: datetime,
) -> pd.DataFrame:
    """Bandit sums for the guardrails, an arm an operator resumed counted only from the
    sessions assigned after its resumption (so it is not re-paused on old data)."""
    bandit = bandit_frame(inputs.moments)
    if not resumed or not len(bandit):
        return bandit
    frame = bandit_frame(inputs.frame)
    parts = [bandit[~bandit["arm_id"].isin(list(resumed))]]
    for arm, at in sorted(resumed.items()):
        at = as_utc(at)
        rows = frame[(frame["arm_id"] == arm) & (frame["assigned_at"] > at)]
        rows.attrs = dict(frame.attrs)
        parts.append(session_moments(rows))
        if inputs.sealed_until is None or at >= inputs.sealed_until:
            continue
        # resumed before the open window: its closed sessions since then, read (rare)
        partial = bandit_frame(
            kpi.session_frame(
                store,
                config,
                now=now,
                assigned_after=at,
                assigned_until=inputs.sealed_until - timedelta(microseconds=1),
            )
        )
        rows = partial[partial["arm_id"] == arm]
        rows.attrs = dict(partial.attrs)
        parts.append(session_moments(rows))
    out = combine(parts, _MOMENT_KEYS)
    out.attrs.update(bandit.attrs)
    return out


# -- summarising a frame --------------------------------------------------------------------


def _summarise(
    frame: pd.DataFrame, activity: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(moments, sketch, SRM groups, delay shares) of a session frame. Its SRM first
    sessions are flagged (``srm_first``) or, for a frame of every session, found."""
    moments = session_moments(frame)
    sketch = support_sketch(frame)
    flags = frame["srm_first"] if "srm_first" in frame else srm_first(frame)
    columns = [c for c in ("snapshot_version", "segment", "arm_id", "assigned_at") if c in frame]
    first = frame.loc[np.asarray(flags, dtype=bool), columns]  # only what the SRM groups need
    return moments, sketch, srm.srm_groups(first, activity), _delay_rows(frame)


def _delay_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Delay shares of a frame's sessions past each term's window: ``column``, ``bin``
    (-1: the number of events) and ``weight``."""
    parts = []
    for column, ev in frame.attrs.get("delay_sealed", {}).items():
        if not len(ev):
            continue
        weights = pd.DataFrame({"bin": ev["bin"].to_numpy(), "weight": ev["weight"]})
        summed = weights.groupby("bin", sort=True)["weight"].sum().reset_index()
        count = pd.DataFrame({"bin": [-1], "weight": [float(len(ev))]})
        parts.append(pd.concat([summed, count], ignore_index=True).assign(column=column))
    columns = ["column", "bin", "weight"]
    if not parts:
        return pd.DataFrame(
            {
                "column": pd.Series(dtype=object),
                "bin": pd.Series(dtype=np.int64),
                "weight": pd.Series(dtype=float),
            }
        )
    return pd.concat(parts, ignore_index=True)[columns]


def _add(
    totals: Mapping[str, pd.DataFrame],
    parts: Iterable[pd.DataFrame],
    *,
    sign: float = 1.0,
) -> dict[str, pd.DataFrame]:
    """``totals`` plus (or minus) the summary ``parts`` (moments, sketch, srm, delay); groups
    left without a row dropped."""
    out = {}
    for (name, (keys, count)), part in zip(_TOTALS.items(), parts, strict=True):
        if sign < 0 and len(part):
            values = [c for c in part.columns if c not in keys]
            negated = pd.concat([part[list(keys)], -part[values].astype(float)], axis=1)
            negated.attrs = part.attrs
            part = negated
        merged = combine([totals[name], part], keys)
        if count is not None and len(merged):
            merged = merged[merged[count] != 0].reset_index(drop=True)
        merged.attrs = {**totals[name].attrs, **part.attrs, **merged.attrs}
        out[name] = merged
    return out


# -- the update -----------------------------------------------------------------------------


class _Updater:
    def __init__(self, store: Store, config: Config, now: datetime, activity: pd.DataFrame):
        self.store, self.config, self.now, self.activity = store, config, now, activity
        self.experiment = config.experiment.id
        self.max_window_s = max(t.window_days for t in config.kpi.terms) * _DAY_S
        self.fingerprint = _fingerprint(config)

    # the last whole day whose sessions are all past every window at `now`
    def _sealable_day(self) -> int:
        return math.floor((self.now.timestamp() - self.max_window_s) / _DAY_S) - 1

    def run(self) -> RefitInputs:
        target = self._sealable_day()
        marks = self._marks()
        totals, meta = self._load_totals()
        stats: dict[str, Any] = {"path": "incremental", "sealed_days": 0, "recomputed_days": 0}
        sealed_day = meta.get("sealed_day") if meta is not None else None
        if (
            meta is None
            or sealed_day is None
            or meta.get("fingerprint") != self.fingerprint
            or sealed_day > target  # `now` went back (a report as of a past date)
            or self._rewritten(meta)
        ):
            return self._rebuild(target, marks, stats, rebuilt=meta is not None)
        # From the run before the last: a write stamped (or numbered) before the last run but
        # committed after it read is still seen — a chat's turns and votes are committed in
        # groups, and ids are handed out before commit — at the cost of reading twice.
        kept_at = as_utc(datetime.fromisoformat(meta["now"]))
        changes = self._changes(meta.get("since") or meta, kept_at=kept_at)
        fresh = reread(self.store, self.config, self.now, *changes)
        if fresh is None:  # too much changed: starting over is cheaper
            return self._rebuild(target, marks, stats, rebuilt=True)
        stats["reread_sessions"] = len(fresh)
        fresh_days = fresh.days()
        window = self._load_days(lo=sealed_day + 1)
        write: dict[int, Rows] = {}
        closed = sorted(set(fresh_days[fresh_days <= sealed_day].tolist()))
        if closed:  # closed days corrected by the difference
            before = self._load_days(days=closed)
            ids = fresh.ids()
            gone = before.where(np.isin(before.ids(), ids))
            came = fresh.where(fresh_days <= sealed_day)
            totals = _add(totals, self._summary(gone), sign=-1.0)
            totals = _add(totals, self._summary(came))
            after = concat([before.without(ids), came])
            days = after.days()
            write.update({d: after.where(days == d) for d in closed})
            stats["recomputed_days"] = len(closed)
        window = concat(
            [
                window.without(fresh.ids()),
                fresh.where(fresh_days > sealed_day),
            ]
        )
        days = window.days()
        for d in sorted(set(fresh_days[fresh_days > sealed_day].tolist())):
            write[d] = window.where(days == d)
        whole = window.dated(self.config, self.now, _delay_prior(totals["delay"]))
        frame = whole
        if target > sealed_day:  # days whose windows all closed since: into the totals
            whole_days = row_days(whole)
            totals = _add(
                totals, _summarise(kpi.frame_rows(whole, whole_days <= target), self.activity)
            )
            frame = kpi.frame_rows(whole, whole_days > target)
            stats["sealed_days"] = target - sealed_day
            sealed_day = target
        self._put(write, totals, self._meta(sealed_day, marks, since=meta))
        return self._inputs(totals, frame, sealed_day, stats)

    def _summary(self, rows: Rows) -> tuple[pd.DataFrame, ...]:
        """The summary of closed sessions' rows (the same at any later ``now``)."""
        return _summarise(rows.dated(self.config, self.now, None), self.activity)

    def _rebuild(
        self, target: int, marks: Mapping[str, int], stats: dict[str, Any], *, rebuilt: bool
    ) -> RefitInputs:
        """Everything from the events: closed days summed a chunk at a time (their rows
        kept), then the open window read whole."""
        if rebuilt:
            stats["rebuilt"] = True
        first = self._first_day()
        if first is None:  # nothing assigned yet
            frame = kpi.session_frame(self.store, self.config, now=self.now)
            totals = _empty_totals()
            return self._inputs(totals, frame.assign(srm_first=False), None, stats)
        self._clear()
        totals = _empty_totals()
        sealed_day = min(target, first - 1) if first > target else target
        day = first
        while day <= sealed_day:
            hi = min(day + SEAL_CHUNK_DAYS - 1, sealed_day)
            frame = self._read(day, hi, prior=None)
            totals = _add(totals, _summarise(frame, self.activity))
            self._write_rows(Rows.from_frame(frame, self.config, frame["srm_first"]))
            stats["sealed_days"] += hi - day + 1
            day = hi + 1
        frame = self._read(sealed_day + 1, None, prior=_delay_prior(totals["delay"]))
        self._write_rows(Rows.from_frame(frame, self.config, frame["srm_first"]))
        self._put({}, totals, self._meta(sealed_day, marks))
        return self._inputs(totals, frame, sealed_day, stats)

    def _read(
        self, lo: int, hi: int | None, *, prior: Mapping[str, tuple[np.ndarray, int]] | None
    ) -> pd.DataFrame:
        """Days lo..hi (None: up to ``now``) from the events, SRM first sessions flagged."""
        after = datetime.fromtimestamp(lo * _DAY_S, tz=UTC) - timedelta(microseconds=1)
        until = (
            datetime.fromtimestamp((hi + 1) * _DAY_S, tz=UTC) - timedelta(microseconds=1)
            if hi is not None
            else None
        )
        frame = kpi.session_frame(
            self.store,
            self.config,
            now=self.now,
            assigned_after=after,
            assigned_until=until,
            delay_prior=prior,
            with_ids=True,
        )
        frame["srm_first"] = srm_first(frame, frame.attrs.get("returning_users", []))
        return frame

    def _inputs(
        self,
        totals: Mapping[str, pd.DataFrame],
        frame: pd.DataFrame,
        sealed_day: int | None,
        stats: dict[str, Any],
    ) -> RefitInputs:
        o_moments, o_sketch, o_groups, _ = _summarise(frame, self.activity)
        moments = combine([totals["moments"], o_moments], _MOMENT_KEYS)
        moments.attrs.update(o_moments.attrs)
        moments.attrs["metrics"] = bool(
            o_moments.attrs.get("metrics") or totals["moments"].attrs.get("metrics")
        )
        moments.attrs["sketch"] = SketchRef(
            combine([totals["sketch"], o_sketch], (*_MOMENT_KEYS, "bucket"))
        )
        groups = combine([totals["srm"], o_groups], _SRM_KEYS)
        stats["open_sessions"] = len(frame)
        until = (
            datetime.fromtimestamp((sealed_day + 1) * _DAY_S, tz=UTC)
            if sealed_day is not None
            else None
        )
        return RefitInputs(moments, groups, frame, until, stats)

    def _meta(
        self,
        sealed_day: int,
        marks: Mapping[str, int],
        *,
        since: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The state's meta: this run's watermarks, and (``since``) the last run's."""
        last = {k: since[k] for k in ("now", *marks) if k in since} if since else None
        return {
            "fingerprint": self.fingerprint,
            "sealed_day": sealed_day,
            "now": self.now.isoformat(),
            **marks,
            **({"since": last} if last else {}),
        }

    def _first_day(self) -> int | None:
        a = schema.assignments
        with self.store.engine.connect() as conn:
            first = conn.execute(
                sa.select(sa.func.min(a.c.assigned_at)).where(a.c.experiment_id == self.experiment)
            ).scalar()
        if first is None:
            return None
        return math.floor(as_utc(first).timestamp() / _DAY_S)

    # -- what changed -------------------------------------------------------------------
    def _marks(self) -> dict[str, int]:
        out = {}
        with self.store.engine.connect() as conn:
            for name, table in (
                ("outcomes", schema.outcomes),
                ("feedback_events", schema.feedback_events),
                ("assignments", schema.assignments),
                ("arm_events", schema.arm_events),
            ):
                out[name] = int(conn.execute(sa.select(sa.func.max(table.c.id))).scalar() or 0)
        return out

    def _rewritten(self, meta: Mapping[str, Any]) -> bool:
        """An arm status event stamped inside the sealed days changes their SRM groups."""
        if meta.get("sealed_day") is None:
            return False
        ev = schema.arm_events
        sealed_end = datetime.fromtimestamp((meta["sealed_day"] + 1) * _DAY_S, tz=UTC)
        with self.store.engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.select(
                        sa.exists().where(
                            ev.c.id > int(meta.get("arm_events", 0)), ev.c.created_at < sealed_end
                        )
                    )
                ).scalar()
            )

    def _changes(self, meta: Mapping[str, Any], *, kept_at: datetime) -> tuple[set[str], set[str]]:
        """What an event since the watermarks of ``meta`` may have changed: sessions it names,
        and users (a user-level outcome; a session assigned before ``kept_at``, the time of
        the kept rows, which may come before the user's others)."""
        a, o, fe, f, t = (
            schema.assignments,
            schema.outcomes,
            schema.feedback_events,
            schema.feedback,
            schema.turns,
        )
        last_now = as_utc(datetime.fromisoformat(meta["now"]))
        since = last_now < self.now
        sessions: set[str] = set()
        users: set[str] = set()
        # One query per index (an OR of an id and a time would scan the table).
        names = sorted(
            {
                t.source.split(":", 1)[1]
                for t in self.config.kpi.terms
                if t.source.startswith("outcome:")
            }
        )
        fresh = [o.c.id > int(meta.get("outcomes", 0))]
        if since:  # written ahead of time, in the past now
            fresh.append(o.c.name.in_(names) & o.c.occurred_at.between(last_now, self.now))
        new = [a.c.id > int(meta.get("assignments", 0))]
        if since:
            new.append(a.c.assigned_at.between(last_now, self.now))
        with self.store.engine.connect() as conn:
            for where in fresh:
                for sid, uid in conn.execute(sa.select(o.c.session_id, o.c.user_id).where(where)):
                    if sid is not None:
                        sessions.add(sid)
                    elif uid is not None:
                        users.add(uid)
            votes = sa.select(fe.c.session_id).where(fe.c.id > int(meta.get("feedback_events", 0)))
            sessions.update(r[0] for r in conn.execute(votes))
            if since:
                changed = sa.select(f.c.session_id).where(
                    f.c.updated_at > last_now, f.c.updated_at <= self.now
                )
                turns = (
                    sa.select(t.c.session_id)
                    .where(t.c.created_at > last_now, t.c.created_at <= self.now)
                    .distinct()
                )
                sessions.update(r[0] for q in (changed, turns) for r in conn.execute(q))
            for where in new:
                query = sa.select(a.c.session_id, a.c.user_id, a.c.assigned_at).where(
                    where, a.c.experiment_id == self.experiment, a.c.assigned_at <= self.now
                )
                for sid, uid, at in conn.execute(query):
                    sessions.add(sid)
                    if as_utc(at) <= kept_at and uid is not None:
                        users.add(uid)
            # an event named by one assignment of a moved conversation may count for another
            moved = kpi.moved_threads(conn, self.experiment, self.now)
            if len(moved):
                thread_of = dict(zip(moved["session_id"], moved["thread"], strict=True))
                threads = {thread_of[s] for s in sessions if s in thread_of}
                sessions.update(moved.loc[moved["thread"].isin(threads), "session_id"])
        return sessions, users

    # -- persistence --------------------------------------------------------------------
    def _load_totals(self) -> tuple[dict[str, pd.DataFrame], dict[str, Any] | None]:
        rs = schema.refit_state
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rs.c.part, rs.c.data, rs.c.meta).where(
                    rs.c.experiment_id == self.experiment, rs.c.part.in_(list(_TOTALS))
                )
            ).all()
        if {r.part for r in rows} != set(_TOTALS):
            return _empty_totals(), None
        totals = {r.part: _decode(r.data) for r in rows}
        meta = dict(next(r.meta for r in rows if r.part == "moments"))
        totals["moments"].attrs.update(meta.get("attrs", {}))
        return totals, meta

    def _load_days(self, *, lo: int | None = None, days: Iterable[int] = ()) -> Rows:
        """Kept rows of the days from ``lo`` on, or of ``days``."""
        rs = schema.refit_state
        query = sa.select(rs.c.data).where(rs.c.experiment_id == self.experiment)
        if lo is not None:
            query = query.where(rs.c.part >= _day_part(lo), rs.c.part < _DAY + "~")
        else:
            query = query.where(rs.c.part.in_([_day_part(d) for d in days]))
        with self.store.engine.connect() as conn:
            blobs = [r[0] for r in conn.execute(query.order_by(rs.c.part))]
        return concat(decode_day(b) for b in blobs)

    def _clear(self) -> None:
        rs = schema.refit_state
        with self.store.engine.begin() as conn:
            conn.execute(sa.delete(rs).where(rs.c.experiment_id == self.experiment))

    def _write_rows(self, rows: Rows) -> None:
        """Days of rows written whole (a rebuild)."""
        days = rows.days()
        self._put({d: rows.where(days == d) for d in sorted(set(days.tolist()))}, {})

    def _put(
        self,
        days: Mapping[int, Rows],
        totals: Mapping[str, pd.DataFrame],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Rewritten days and (with ``totals``) the totals, whose meta says the state is
        whole, in one transaction."""
        rs = schema.refit_state
        attrs = (
            {k: v for k, v in totals["moments"].attrs.items() if k != "sketch"} if totals else {}
        )
        parts = [
            (
                name,
                _encode(totals[name]),
                {**(meta or {}), "attrs": attrs} if name == "moments" else {},
            )
            for name in totals
        ]
        parts += [(_day_part(d), encode_day(rows), {}) for d, rows in days.items() if len(rows)]
        empty = [_day_part(d) for d, rows in days.items() if not len(rows)]
        if not parts and not empty:
            return
        with self.store.engine.begin() as conn:
            names = [p[0] for p in parts] + empty
            for i in range(0, len(names), 500):
                conn.execute(
                    sa.delete(rs).where(
                        rs.c.experiment_id == self.experiment, rs.c.part.in_(names[i : i + 500])
                    )
                )
            if parts:
                conn.execute(
                    sa.insert(rs),
                    [
                        {
                            "experiment_id": self.experiment,
                            "part": part,
                            "data": data,
                            "meta": part_meta,
                            "updated_at": self.now,
                        }
                        for part, data, part_meta in parts
                    ],
                )


def _day_part(day: int) -> str:
    return f"{_DAY}{day:08d}"


def _empty_totals() -> dict[str, pd.DataFrame]:
    return {
        "moments": pd.DataFrame({k: pd.Series(dtype=object) for k in _MOMENT_KEYS}),
        "sketch": pd.DataFrame({k: pd.Series(dtype=object) for k in (*_MOMENT_KEYS, "bucket")}),
        "srm": pd.DataFrame({k: pd.Series(dtype=object) for k in _SRM_KEYS}),
        "delay": pd.DataFrame({k: pd.Series(dtype=object) for k in ("column", "bin")}),
    }


def _delay_prior(delay: pd.DataFrame) -> dict[str, tuple[np.ndarray, int]]:
    from optimizer.kpi import DELAY_BINS

    out: dict[str, tuple[np.ndarray, int]] = {}
    if not len(delay):
        return out
    for column, g in delay.groupby("column", sort=True):
        weights = np.zeros(DELAY_BINS + 1)
        bins = g[g["bin"] >= 0]
        np.add.at(weights, bins["bin"].to_numpy(dtype=np.int64), bins["weight"].to_numpy(float))
        out[str(column)] = (weights, round(float(g.loc[g["bin"] < 0, "weight"].sum())))
    return out


def _fingerprint(config: Config) -> str:
    """What the kept sums depend on: the KPI terms, and whether sessions carry their cost
    (a cost term or guardrail; the model prices that value it)."""
    terms: list[Any] = [t.model_dump(mode="json") for t in config.kpi.terms]
    terms.append({"state": _FORMAT})
    if kpi.uses_cost(config):
        prices = {m: p.model_dump(mode="json") for m, p in config.model.prices.items()}
        terms.append({"cost": prices})
    return hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).hexdigest()[:16]


def _encode(frame: pd.DataFrame) -> bytes:
    """A frame as a compressed numpy archive (no pickle: strings become unicode arrays)."""
    arrays: dict[str, np.ndarray] = {}
    for i, col in enumerate(frame.columns):
        values = frame[col].to_numpy()
        if values.dtype == object:
            values = values.astype(str)
        arrays[f"{i}:{col}"] = values
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _decode(data: bytes) -> pd.DataFrame:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        names = sorted(archive.files, key=lambda k: int(k.split(":", 1)[0]))
        cols = {k.split(":", 1)[1]: archive[k] for k in names}
    # strings stay Python objects (pandas 3 would make them Arrow strings, slower to group)
    return pd.DataFrame(
        {
            k: (pd.Series(v.astype(object), dtype=object) if v.dtype.kind == "U" else v)
            for k, v in cols.items()
        }
    )
