"""What the proposer reads: the champion's failures and held-out questions, scrubbed.

Failures are the champion's thumbs-down turns (with their comments), newest
first, then the first turn of its complete sessions in the bottom quarter of the
KPI. Replay questions are other past user messages of the experiment (never one
shown to the proposer), topped up from ``prompts/proposer/replay_seed.md`` on a
new install. Every text is scrubbed (:mod:`optimizer.privacy`) before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from optimizer import kpi
from optimizer.config import Config
from optimizer.privacy import Scrubber
from optimizer.store import Store, schema

__all__ = ["FailureTurn", "failure_sample", "new_negative_count", "read_prompt_file", "replay_set"]

_ITEM_CHARS = 400


@dataclass(frozen=True)
class FailureTurn:
    """A turn that went wrong: ``kind`` is ``thumbs_down`` or ``low_kpi``."""

    user_message: str
    reply: str
    comment: str | None
    kind: str

    def render(self, max_chars: int = _ITEM_CHARS) -> str:
        """One line for the rewrite prompt, cut to ``max_chars``."""
        parts = [f"User asked: {_one_line(self.user_message)}"]
        parts.append(f"Assistant replied: {_one_line(self.reply)}")
        if self.comment:
            parts.append(f"User's comment: {_one_line(self.comment)}")
        else:
            parts.append(
                "Outcome: thumbs down" if self.kind == "thumbs_down" else "Outcome: no sale"
            )
        line = "- " + " | ".join(parts)
        return line if len(line) <= max_chars else line[: max_chars - 1] + "…"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:_ITEM_CHARS]


def new_negative_count(
    store: Store, experiment_id: str, arm_id: str, *, since: datetime | None, until: datetime
) -> int:
    """Thumbs-down turns of ``arm_id`` voted after ``since`` (ever, when None) up to ``until``."""
    fb, tu = schema.feedback, schema.turns
    query = (
        sa.select(sa.func.count())
        .select_from(fb.join(tu, tu.c.id == fb.c.turn_id))
        .where(
            tu.c.experiment_id == experiment_id,
            tu.c.arm_id == arm_id,
            fb.c.value == 0,
            fb.c.updated_at <= until,
        )
    )
    if since is not None:
        query = query.where(fb.c.updated_at > since)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


def failure_sample(
    store: Store,
    config: Config,
    arm_id: str,
    *,
    now: datetime,
    limit: int,
    scrubber: Scrubber,
) -> list[FailureTurn]:
    """Up to ``limit`` scrubbed failures of ``arm_id``: thumbs-down first, then low-KPI turns."""
    fb, tu = schema.feedback, schema.turns
    exp = config.experiment.id
    with store.engine.connect() as conn:
        downs = conn.execute(
            sa.select(tu.c.session_id, tu.c.user_message, tu.c.reply, fb.c.comment)
            .select_from(fb.join(tu, tu.c.id == fb.c.turn_id))
            .where(
                tu.c.experiment_id == exp,
                tu.c.arm_id == arm_id,
                fb.c.value == 0,
                fb.c.updated_at <= now,
            )
            .order_by(
                sa.case((fb.c.comment.is_(None), 1), (fb.c.comment == "", 1), else_=0),
                fb.c.updated_at.desc(),
            )
            .limit(limit)
        ).all()
    out = [
        FailureTurn(
            scrubber.scrub(r.user_message),
            scrubber.scrub(r.reply),
            scrubber.scrub(r.comment) if r.comment else None,
            "thumbs_down",
        )
        for r in downs
    ]
    if len(out) >= limit:
        return out
    seen = {r.session_id for r in downs}
    frame = kpi.session_frame(store, config, now=now)
    if frame.empty:
        return out
    mine = frame[(frame["arm_id"] == arm_id) & frame["reward"].notna()]
    if mine.empty:
        return out
    cut = float(np.quantile(mine["reward"].to_numpy(), 0.25))
    low = mine[(mine["reward"] <= cut) & ~mine["session_id"].isin(seen)]
    low = low.sort_values("assigned_at", ascending=False)["session_id"].head(limit - len(out))
    if low.empty:
        return out
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(tu.c.session_id, tu.c.user_message, tu.c.reply, tu.c.created_at)
            .where(tu.c.session_id.in_(low.tolist()), tu.c.error.is_(None))
            .order_by(tu.c.session_id, tu.c.created_at)
        ).all()
    first: dict[str, tuple[str, str]] = {}
    for r in rows:
        first.setdefault(r.session_id, (r.user_message, r.reply))
    for sid in low:
        if sid in first:
            msg, reply = first[sid]
            out.append(FailureTurn(scrubber.scrub(msg), scrubber.scrub(reply), None, "low_kpi"))
    return out


def read_prompt_file(path: Path) -> str:
    """A ``prompts/`` file's text without its ``---`` front matter."""
    text = path.read_text(encoding="utf-8")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            text = text[end + 4 :]
    return text.strip()


def replay_set(
    store: Store,
    experiment_id: str,
    *,
    n: int,
    exclude: set[str],
    scrubber: Scrubber,
    seed_path: Path | None,
) -> list[str]:
    """``n`` held-out questions: recent distinct user messages not in ``exclude``, then seeds."""
    tu = schema.turns
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(tu.c.user_message)
            .where(tu.c.experiment_id == experiment_id, tu.c.error.is_(None))
            .order_by(tu.c.created_at.desc())
            .limit(50 * n)
        ).scalars()
        messages = list(rows)
    out: list[str] = []
    seen = {_one_line(e).lower() for e in exclude}
    for message in messages:
        text = _one_line(scrubber.scrub(message))
        if len(text) < 8 or text.lower() in seen:
            continue
        seen.add(text.lower())
        out.append(text)
        if len(out) == n:
            return out
    if seed_path is not None and seed_path.exists():
        for line in read_prompt_file(seed_path).splitlines():
            line = line.strip()
            if line and line.lower() not in seen:
                seen.add(line.lower())
                out.append(line)
                if len(out) == n:
                    break
    return out
