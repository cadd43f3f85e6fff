"""What a reply costs, and what a session costs, in USD.

Turns record litellm's cost (``turns.cost``: 0 or NULL for local and fake
models, and for custom models litellm has no price for). ``model.prices`` in
``flywheel.toml`` gives a per-token price to such models; when a turn's model
has a configured price, that price wins over the recorded cost (the operator
knows what their GPU hour costs better than a public price list), otherwise
the recorded cost counts (NULL as 0). Prices are applied when reading, so a
price set today re-prices the past too and every report agrees.

A session's cost is the sum over its turns up to ``now``, fallback turns
included (the fallback's model is the turn's ``model``, priced as such). The
KPI term ``cost:usd`` and the guardrail ``cost_per_session`` read it
(:mod:`optimizer.kpi`, :mod:`optimizer.guardrails`).

>>> from optimizer.config import ModelPriceConfig
>>> prices = {"local/gemma3-270m": ModelPriceConfig(input_usd_per_mtok=1, output_usd_per_mtok=2)}
>>> turn_cost("local/gemma3-270m", None, 1000, 500, prices)
0.002
>>> turn_cost("openai/gpt-4o-mini", 0.0031, 1000, 500, prices)
0.0031
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer.config import ModelPriceConfig
from optimizer.store import schema
from optimizer.store.store import fetch_in, fetch_tuples

__all__ = ["COST_COLUMN", "session_costs", "turn_cost"]

#: Column of :func:`optimizer.kpi.session_frame` with the session's cost in USD.
COST_COLUMN = "cost_usd"
_MTOK = 1_000_000.0


def turn_cost(
    model: str,
    recorded: float | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    prices: Mapping[str, ModelPriceConfig],
) -> float:
    """One turn's cost: the configured price of ``model`` if any, else the recorded cost."""
    price = prices.get(model)
    if price is not None:
        return (
            (prompt_tokens or 0) * price.input_usd_per_mtok
            + (completion_tokens or 0) * price.output_usd_per_mtok
        ) / _MTOK
    if recorded is None or not math.isfinite(recorded):
        return 0.0
    return float(recorded)


def session_costs(
    conn: sa.Connection,
    experiment_id: str,
    prices: Mapping[str, ModelPriceConfig],
    now: datetime,
    *,
    assigned_after: datetime | None = None,
    assigned_until: datetime | None = None,
    session_ids: Sequence[str] | None = None,
) -> pd.Series:
    """Cost in USD of every session of ``experiment_id`` with a turn up to ``now``.

    One ``GROUP BY session, model`` in SQL (turns of a session use one model or
    two, with a fallback), the prices applied per group in numpy. With
    ``assigned_after`` (and ``assigned_until``), only the sessions assigned in that
    interval (the incremental refit reads one stretch of history at a time); with
    ``session_ids``, only those sessions.
    """
    t, a = schema.turns, schema.assignments
    query = (
        sa.select(
            t.c.session_id,
            t.c.model,
            sa.func.sum(t.c.cost),
            sa.func.sum(t.c.prompt_tokens),
            sa.func.sum(t.c.completion_tokens),
        )
        .where(t.c.experiment_id == experiment_id, t.c.created_at <= now)
        .group_by(t.c.session_id, t.c.model)
    )
    if assigned_after is not None and session_ids is None:
        within = sa.select(a.c.session_id).where(
            a.c.experiment_id == experiment_id, a.c.assigned_at > assigned_after
        )
        if assigned_until is not None:
            within = within.where(a.c.assigned_at <= assigned_until)
        query = query.where(t.c.session_id.in_(within))
    if session_ids is not None:
        rows = fetch_in(conn, query, t.c.session_id, session_ids)
    else:
        rows = fetch_tuples(conn, query)
    if not rows:
        return pd.Series(dtype=float, name=COST_COLUMN)
    frame = pd.DataFrame.from_records(
        rows, columns=["session_id", "model", "cost", "prompt_tokens", "completion_tokens"]
    )
    recorded = pd.to_numeric(frame["cost"], errors="coerce").fillna(0.0).to_numpy(dtype=float)
    cost = np.where(np.isfinite(recorded), recorded, 0.0)
    for model, price in prices.items():  # a handful of priced models
        mine = (frame["model"] == model).to_numpy()
        if mine.any():
            tokens_in = pd.to_numeric(frame.loc[mine, "prompt_tokens"]).fillna(0).to_numpy()
            tokens_out = pd.to_numeric(frame.loc[mine, "completion_tokens"]).fillna(0).to_numpy()
            cost[mine] = (
                tokens_in * price.input_usd_per_mtok + tokens_out * price.output_usd_per_mtok
            ) / _MTOK
    return pd.Series(cost, index=frame["session_id"]).groupby(level=0).sum().rename(COST_COLUMN)
