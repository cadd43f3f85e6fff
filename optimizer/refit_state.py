"""The incremental refit: sums of closed sessions kept, only open and touched sessions read.

A refit needs sums per (segment, arm, holdback) (:mod:`optimizer.moments`). A
session whose KPI windows have all closed no longer changes with time: its
terms are final, its exposure 1, its share of the delay distribution fixed.
So whole **days** of such sessions are summed once and kept in ``refit_state``
(per day: moments, the support-minutes histogram, SRM counts, delay shares),
and each refit reads only

- the **open window**: sessions assigned after the last sealed day (a month
  with a 30-day revenue term: the cost follows the traffic of that window,
  not the length of the history), through :func:`optimizer.kpi.session_frame`
  restricted to it, with the kept delay shares as its prior;
- the sealed days an event **touched** since the last run, recomputed whole
  (a day's sessions, cheap) instead of patched: a late outcome, a duplicate, a
  vote changed, a turn of an old thread, a late or re-assigned session
  (``Store.reassign``'s ``<thread>~n`` sessions are new assignments), a user's
  later session changing who is "returning" — found from watermarks on the
  append-only ids (``outcomes.id``, ``feedback_events.id``, ``assignments.id``,
  ``arm_events.id``) and on the event times between the last run's ``now``
  and this one's (events written ahead of time by a simulation).

Why the job from a watermark and not triggers in the events' transactions: a
session becomes final when its window closes, which no event marks; the write
path of a chat turn stays as cheap as it is (issue 18 wants it cheaper); one
writer (the job, under its lock) owns the sums, so replicas never contend on
hot aggregate rows; and the state is a cache — lost or stale (another KPI
configuration: ``fingerprint``), it is rebuilt from the events.

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
from optimizer.store import Store, schema

__all__ = ["SEAL_CHUNK_DAYS", "RefitInputs", "evidence_moments", "refit_inputs"]

log = logging.getLogger(__name__)

_DAY_S = 86_400
#: Sealing a long history reads it this many days at a time (bounded memory).
SEAL_CHUNK_DAYS = 30
_MOMENT_KEYS = ("segment", "arm_id", "holdback")
_PARTS = ("moments", "sketch", "srm", "delay")


@dataclass
class RefitInputs:
    """What a refit fits on: sums of every session as of ``now``.

    ``moments`` (with ``attrs["sketch"]``) cover all sessions, holdback included;
    ``srm_groups`` the first non-holdback session of each user; ``frame`` the
    open window's session rows (or all sessions on the full path);
    ``sealed_until`` the end of the last sealed day (None on the full path);
    ``stats`` what the update did (days sealed, recomputed).
    """

    moments: pd.DataFrame
    srm_groups: pd.DataFrame
    frame: pd.DataFrame
    sealed_until: datetime | None
    stats: dict[str, Any]
    #: The kept sums per day (empty on the full path).
    sealed: pd.DataFrame | None = None


def refit_inputs(
    store: Store, config: Config, *, now: datetime, incremental: bool = True
) -> RefitInputs:
    """Sums for a refit at ``now``: kept and brought up to date, or (``incremental=False``)
    recomputed from every session — the reference the incremental path must equal."""
    now = as_utc(now)
    activity = srm.arm_activity(store, config.experiment.id)
    if not incremental:
        frame = kpi.session_frame(store, config, now=now)
        moments, sketch, groups, _ = _summarise(frame, activity, returning=(), by_day=False)
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
        sealed = inputs.sealed if inputs.sealed is not None else pd.DataFrame()
        day = math.floor(at.timestamp() / _DAY_S)
        if len(sealed):
            keep = (sealed["arm_id"] == arm) & (sealed["day"] > day) & ~sealed["holdback"]
            parts.append(sealed[keep].drop(columns="day"))
        day_end = datetime.fromtimestamp((day + 1) * _DAY_S, tz=UTC) - timedelta(microseconds=1)
        partial = bandit_frame(
            kpi.session_frame(store, config, now=now, assigned_after=at, assigned_until=day_end)
        )
        rows = partial[partial["arm_id"] == arm]
        rows.attrs = dict(partial.attrs)
        parts.append(session_moments(rows))
    out = combine(parts, _MOMENT_KEYS)
    out.attrs.update(bandit.attrs)
    return out


# -- summarising one frame ------------------------------------------------------------------


def _summarise(
    frame: pd.DataFrame,
    activity: pd.DataFrame,
    *,
    returning: Iterable[str],
    by_day: bool,
    srm_groups: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(moments, sketch, SRM groups, delay shares) of a session frame, per day if ``by_day``
    (no SRM groups without ``srm_groups``)."""
    keys: tuple[str, ...] = ("day", *_MOMENT_KEYS) if by_day else _MOMENT_KEYS
    f = frame
    if by_day:
        f = frame.assign(day=_days(frame))
        f.attrs = dict(frame.attrs)
    moments = session_moments(f, keys)
    sketch = support_sketch(f, keys)
    bandit = bandit_frame(f)
    first = bandit.drop_duplicates("user_id", keep="first")
    returning = set(returning)
    if returning and len(first):
        first = first[~first["user_id"].isin(returning)]
    if by_day:
        parts = [
            srm.srm_groups(g, activity).assign(day=day)
            for day, g in (first.groupby("day", sort=True) if srm_groups else ())
        ]
        groups = (
            pd.concat(parts, ignore_index=True)
            if parts
            else srm.srm_groups(first, activity).assign(day=np.int64(0)).iloc[:0]
        )
    else:
        groups = srm.srm_groups(first, activity)
    delay = _delay_rows(f) if by_day else pd.DataFrame()
    return moments, sketch, groups, delay


def _delay_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Delay shares of a frame's sessions past each term's window, per day: ``day``,
    ``column``, ``bin`` (-1: the number of events) and ``weight``."""
    parts = []
    days = frame["day"].to_numpy() if "day" in frame else None
    for column, ev in frame.attrs.get("delay_sealed", {}).items():
        if days is None or not len(ev):
            continue
        d = days[ev["pos"].to_numpy(dtype=np.int64)]
        weights = pd.DataFrame({"day": d, "bin": ev["bin"].to_numpy(), "weight": ev["weight"]})
        summed = weights.groupby(["day", "bin"], sort=True)["weight"].sum().reset_index()
        counts = weights.groupby("day", sort=True).size().rename("weight").reset_index()
        counts["bin"] = -1
        parts.append(pd.concat([summed, counts], ignore_index=True).assign(column=column))
    columns = ["day", "column", "bin", "weight"]
    if not parts:
        return pd.DataFrame(
            {c: pd.Series(dtype=object if c == "column" else float) for c in columns}
        )
    return pd.concat(parts, ignore_index=True)[columns]


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
        parts, meta = self._load()
        known = self._earlier
        self.new_users: set[str] = set()
        self.srm_days: set[int] = set()
        stats: dict[str, Any] = {"path": "incremental", "sealed_days": 0, "recomputed_days": 0}
        target = self._sealable_day()
        marks = self._marks()
        if meta is None or meta.get("fingerprint") != self.fingerprint or self._rewritten(meta):
            parts, meta = _empty_parts(), {"fingerprint": self.fingerprint, "sealed_day": None}
            stats["rebuilt"] = True
            known = None
        sealed_day = meta.get("sealed_day")
        if sealed_day is not None:
            if sealed_day > target:  # `now` went back (a report as of a past date): start over
                parts, sealed_day = _empty_parts(), None
                stats["rebuilt"] = True
                known = None
            else:
                dirty = sorted(d for d in self._dirty_days(meta, sealed_day) if d <= sealed_day)
                for lo, hi in _runs(dirty):
                    # who is first (SRM) changes only with a user's new sessions
                    srm_dirty = any(lo <= d <= hi for d in self.srm_days)
                    parts = self._seal(parts, lo, hi, srm=srm_dirty)
                stats["recomputed_days"] = len(dirty)
        first_new = (sealed_day + 1) if sealed_day is not None else None
        if first_new is None:
            first_new = self._first_day()
        if first_new is not None and first_new <= target:
            day = first_new
            while day <= target:
                hi = min(day + SEAL_CHUNK_DAYS - 1, target)
                parts = self._seal(parts, day, hi)
                stats["sealed_days"] += hi - day + 1
                day = hi + 1
            sealed_day = target
        elif first_new is not None and sealed_day is None:
            sealed_day = first_new - 1  # nothing old enough yet
        meta = {
            "fingerprint": self.fingerprint,
            "sealed_day": sealed_day,
            "now": self.now.isoformat(),
            **marks,
        }
        until = (
            datetime.fromtimestamp((sealed_day + 1) * _DAY_S, tz=UTC)
            if sealed_day is not None
            else None
        )
        prior = _delay_prior(parts["delay"])
        frame = kpi.session_frame(
            self.store,
            self.config,
            now=self.now,
            assigned_after=until - timedelta(microseconds=1) if until is not None else None,
            delay_prior=prior,
            # who had a session before the window: kept from the last run, probed for the
            # window's new users and those who got a session back-dated
            earlier_known=known,
            stale_users=self.new_users,
        )
        if sealed_day is not None:
            flags = frame.attrs.get("earlier_flags")
            self._save(
                parts,
                meta,
                pd.DataFrame({"id": flags.ids, "earlier": flags.flags})
                if flags is not None
                else None,
            )
        o_moments, o_sketch, o_groups, _ = _summarise(
            frame, self.activity, returning=frame.attrs.get("returning_users", []), by_day=False
        )
        moments = combine([parts["moments"].drop(columns="day"), o_moments], _MOMENT_KEYS)
        moments.attrs.update(o_moments.attrs)
        moments.attrs["metrics"] = bool(
            o_moments.attrs.get("metrics") or parts["moments"].attrs.get("metrics")
        )
        moments.attrs["sketch"] = SketchRef(
            combine([parts["sketch"].drop(columns="day"), o_sketch], (*_MOMENT_KEYS, "bucket"))
        )
        srm_keys = ("version", "segment", "inactive", "arm_id")
        groups = combine([parts["srm"].drop(columns="day"), o_groups], srm_keys)
        stats["open_sessions"] = len(frame)
        return RefitInputs(moments, groups, frame, until, stats, parts["moments"])

    # -- sealing ------------------------------------------------------------------------
    def _seal(
        self, parts: dict[str, pd.DataFrame], lo: int, hi: int, *, srm: bool = True
    ) -> dict[str, pd.DataFrame]:
        """(Re)compute days lo..hi whole and replace them in ``parts``; without ``srm`` their
        SRM counts are kept (a vote or outcome does not change who came first), which
        spares the per-session "returning user" probes."""
        kept = {
            k: v[~v["day"].between(lo, hi)] if len(v) and (srm or k != "srm") else v
            for k, v in parts.items()
        }
        after = datetime.fromtimestamp(lo * _DAY_S, tz=UTC) - timedelta(microseconds=1)
        until = datetime.fromtimestamp((hi + 1) * _DAY_S, tz=UTC) - timedelta(microseconds=1)
        frame = kpi.session_frame(
            self.store,
            self.config,
            now=self.now,
            assigned_after=after,
            assigned_until=until,
            probe_returning=srm,
        )
        if not len(frame):
            return kept
        new = _summarise(
            frame,
            self.activity,
            returning=frame.attrs.get("returning_users", []),
            by_day=True,
            srm_groups=srm,
        )
        out = {}
        for k, fresh in zip(_PARTS, new, strict=True):
            frames = [f for f in (kept[k], fresh) if len(f)]
            out[k] = pd.concat(frames, ignore_index=True) if frames else kept[k]
        out["moments"].attrs = {**parts["moments"].attrs, **new[0].attrs}
        return out

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

    def _dirty_days(self, meta: Mapping[str, Any], sealed_day: int) -> set[int]:
        """Sealed days whose sessions an event since the last run may have changed."""
        a, o, fe, f, t = (
            schema.assignments,
            schema.outcomes,
            schema.feedback_events,
            schema.feedback,
            schema.turns,
        )
        last_now = as_utc(datetime.fromisoformat(meta["now"])) if meta.get("now") else None
        sealed_end = datetime.fromtimestamp((sealed_day + 1) * _DAY_S, tz=UTC)
        horizon = sealed_end + timedelta(seconds=self.max_window_s + 3600)
        sessions: set[str] = set()
        users: set[str] = set()
        with self.store.engine.connect() as conn:
            for sid, uid in conn.execute(
                sa.select(o.c.session_id, o.c.user_id).where(
                    o.c.id > int(meta.get("outcomes", 0)), o.c.occurred_at <= horizon
                )
            ):
                if sid is not None:
                    sessions.add(sid)
                elif uid is not None:
                    users.add(uid)
            sessions.update(
                r[0]
                for r in conn.execute(
                    sa.select(fe.c.session_id).where(fe.c.id > int(meta.get("feedback_events", 0)))
                )
            )
            if last_now is not None and last_now < self.now:
                sessions.update(
                    r[0]
                    for r in conn.execute(
                        sa.select(f.c.session_id).where(
                            f.c.updated_at > last_now, f.c.updated_at <= self.now
                        )
                    )
                )
                sessions.update(
                    r[0]
                    for r in conn.execute(
                        sa.select(t.c.session_id)
                        .where(t.c.created_at > last_now, t.c.created_at <= self.now)
                        .distinct()
                    )
                )
            # late or re-assigned sessions: the user's other sealed sessions may change
            # (who is returning; which session a user-level outcome within a window of a
            # sealed session belongs to). Sessions assigned in real time are past that.
            self.new_users = {
                r[0]
                for r in conn.execute(
                    sa.select(a.c.user_id).where(
                        a.c.id > int(meta.get("assignments", 0)),
                        a.c.experiment_id == self.experiment,
                        a.c.assigned_at < horizon,
                    )
                )
            }
            users.update(self.new_users)
            # an event named by one assignment of a moved conversation may count for another
            moved = kpi.moved_threads(conn, self.experiment, self.now)
            if len(moved):
                thread_of = dict(zip(moved["session_id"], moved["thread"], strict=True))
                threads = {thread_of[s] for s in sessions if s in thread_of}
                sessions.update(moved.loc[moved["thread"].isin(threads), "session_id"])
            times: list[datetime] = []
            ids = sorted(sessions)
            for i in range(0, len(ids), 500):
                times.extend(
                    r[0]
                    for r in conn.execute(
                        sa.select(a.c.assigned_at).where(
                            a.c.session_id.in_(ids[i : i + 500]),
                            a.c.experiment_id == self.experiment,
                            a.c.assigned_at < sealed_end,
                        )
                    )
                )
            names = sorted(users)
            for i in range(0, len(names), 500):
                times.extend(
                    r[0]
                    for r in conn.execute(
                        sa.select(a.c.assigned_at).where(
                            a.c.user_id.in_(names[i : i + 500]),
                            a.c.experiment_id == self.experiment,
                            a.c.assigned_at < sealed_end,
                        )
                    )
                )
            self.srm_days = {
                math.floor(as_utc(r[0]).timestamp() / _DAY_S)
                for names in _batches(sorted(self.new_users), 500)
                for r in conn.execute(
                    sa.select(a.c.assigned_at).where(
                        a.c.user_id.in_(names),
                        a.c.experiment_id == self.experiment,
                        a.c.assigned_at < sealed_end,
                    )
                )
            }
        return {math.floor(as_utc(t).timestamp() / _DAY_S) for t in times}

    # -- persistence --------------------------------------------------------------------
    def _load(self) -> tuple[dict[str, pd.DataFrame], dict[str, Any] | None]:
        rs = schema.refit_state
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                sa.select(rs.c.part, rs.c.data, rs.c.meta).where(
                    rs.c.experiment_id == self.experiment
                )
            ).all()
        self._earlier: kpi.EarlierFlags | None = None
        if not {r.part for r in rows} >= set(_PARTS):
            return _empty_parts(), None
        parts = {r.part: _decode(r.data) for r in rows if r.part in _PARTS}
        for r in rows:
            if r.part == "earlier":
                flags = _decode(r.data)
                self._earlier = kpi.EarlierFlags(
                    flags["id"].to_numpy(dtype=np.int64), flags["earlier"].to_numpy(dtype=bool)
                )
        meta = dict(next(r.meta for r in rows if r.part == "moments"))
        parts["moments"].attrs.update(meta.get("attrs", {}))
        return parts, meta

    def _save(
        self,
        parts: Mapping[str, pd.DataFrame],
        meta: Mapping[str, Any],
        earlier: pd.DataFrame | None = None,
    ) -> None:
        """The kept sums, and (``earlier``) the open window's returning-user verdicts."""
        rs = schema.refit_state
        attrs = {k: v for k, v in parts["moments"].attrs.items() if k != "sketch"}
        parts = {**parts, **({"earlier": earlier} if earlier is not None else {})}
        with self.store.engine.begin() as conn:
            conn.execute(sa.delete(rs).where(rs.c.experiment_id == self.experiment))
            conn.execute(
                sa.insert(rs),
                [
                    {
                        "experiment_id": self.experiment,
                        "part": part,
                        "data": _encode(parts[part]),
                        "meta": {**meta, "attrs": attrs} if part == "moments" else {},
                        "updated_at": self.now,
                    }
                    for part in parts
                ],
            )


def _days(frame: pd.DataFrame) -> np.ndarray:
    """Day number (since 1970, UTC) of each session's assignment."""
    seconds = frame["assigned_at"].to_numpy(dtype="datetime64[s]").astype(np.int64)
    return seconds // _DAY_S


def _empty_parts() -> dict[str, pd.DataFrame]:
    return {k: pd.DataFrame({"day": pd.Series(dtype=np.int64)}) for k in _PARTS}


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


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _runs(days: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted days."""
    out: list[tuple[int, int]] = []
    for d in days:
        if out and d == out[-1][1] + 1:
            out[-1] = (out[-1][0], d)
        else:
            out.append((d, d))
    return out


def _fingerprint(config: Config) -> str:
    """What the kept sums depend on: the KPI terms, and whether sessions carry their cost
    (a cost term or guardrail; the model prices that value it)."""
    terms: list[Any] = [t.model_dump(mode="json") for t in config.kpi.terms]
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
    frame = pd.DataFrame(
        {k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in cols.items()}
    )
    return frame
