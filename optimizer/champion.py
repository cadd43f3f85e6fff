"""The champion's stored arm row: promoted in the store (by anyone) beats the file's.

Shared by what builds on "the champion" (few-shot proposals, the proposer), so
they follow promotions at once.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from optimizer.config import Config
from optimizer.store import Store

__all__ = ["champion_row"]


def champion_row(store: Store, config: Config) -> Any:
    """The champion's stored arm row: promoted in the store (by anyone) beats the file's.

    Without a stored row (an experiment never synced) a row-like view of the
    configured champion (or first arm) is returned, or None without arms.
    """
    exp = config.experiment
    rows = {r.id: r for r in store.arms(exp.id)}
    statuses = store.arm_statuses(exp.id)
    stored = next((a for a, s in statuses.items() if s == "champion" and a in rows), None)
    if stored is None and exp.champion is not None and exp.champion in rows:
        stored = store.current_arm(exp.id, exp.champion)
    if stored is not None:
        return rows[stored]
    configured = {a.id: a for a in exp.arms}
    arm = configured.get(exp.champion or "") or (exp.arms[0] if exp.arms else None)
    if arm is None:
        return None
    return SimpleNamespace(
        id=arm.id, prompt_id=arm.prompt, prompt_hash="", prompt_text=None, model=None
    )
