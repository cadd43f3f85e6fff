"""The closed loop: challengers proposed, gated, started, promoted and retired with no hand.

Runs ``bench/scenarios/closed_loop.toml`` (one 4% champion, a simulated proposer
every three days, 2,000 sessions a day, delayed conversions, twelve weeks)
through ``optimizer.simulator.simulate``: the real assigner, store, optimizer
job (Thompson sampling, guardrails, stop rule with ``auto_promote``, retirement),
the real proposal budget (``max_live``, ``min_new_negative``, the interval) and
candidate records; only each proposal's truth and its replay verdict are drawn
(``optimizer.proposer.simulated``).

Per seed and averaged it prints: the true KPI lift of optimised traffic over the
holdback (and what the optimizer measured), regret against an oracle that knows
every proposal's truth (all traffic on the best proposal made so far, gated-out
ones included), proposals made / gated out / started / promoted / retired, the
share of all sessions served by proposals truly worse than their parent (target
≤ 3%) and the manual steps (target 0). The baseline measured in the same run is
the champion alone (no proposer, same seed): its regret against the same oracle
and its KPI, so the loop's gain reads as a ratio.

Usage::

    python bench/closed_loop.py --seeds 3 --jobs 2
    python bench/closed_loop.py --weeks 4 --seeds 1          # quicker look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.scenario import load_scenario  # noqa: E402
from optimizer.simulator import simulate  # noqa: E402

SCENARIO = ROOT / "bench" / "scenarios" / "closed_loop.toml"
TARGET_WORSE_SHARE = 0.03


def _one(args: tuple[str, int, float, int]) -> dict[str, Any]:
    path, seed, weeks, per_day = args
    logging.getLogger("optimizer").setLevel(logging.ERROR)
    scenario = load_scenario(path)
    scenario = scenario.model_copy(
        update={"sessions": int(weeks * 7 * per_day), "sessions_per_day": float(per_day)}
    )
    started = time.perf_counter()
    result = simulate(scenario, policy="thompson", seed=seed)
    loop = dict(result.closed_loop)
    loop["elapsed_s"] = round(time.perf_counter() - started, 1)
    loop["sessions"] = result.sessions
    return {"seed": seed, **loop}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--weeks", type=float, default=12.0)
    parser.add_argument("--per-day", type=int, default=2000)
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)
    tasks = [(str(args.scenario), s, args.weeks, args.per_day) for s in range(args.seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_one, t) for t in tasks]
            rows = []
            for future in as_completed(futures):  # each seed's figures as soon as it is done
                rows.append(future.result())
                print(f"seed done: {json.dumps(rows[-1], default=str)}", flush=True)
        rows.sort(key=lambda r: r["seed"])
    else:
        rows = [_one(t) for t in tasks]

    head = (
        f"{'seed':>4} {'lift':>8} {'rel':>7} {'meas':>8} {'regret':>8} {'base':>8} "
        f"{'ratio':>6} {'made':>4} {'gated':>5} {'start':>5} {'prom':>4} {'ret':>4} "
        f"{'paus':>4} {'worse%':>7} {'manual':>6} {'s':>6}"
    )
    print(f"closed loop: {args.weeks:g} weeks x {args.per_day} sessions/day, {args.seeds} seeds")
    print(head)

    def measured(row: dict[str, Any]) -> float | None:
        m = row.get("measured_holdback") or {}
        value = m.get("lift") if isinstance(m, dict) else None
        return float(value) if isinstance(value, int | float) else None

    for r in rows:
        meas = measured(r)
        print(
            f"{r['seed']:>4} {r['true_lift_over_holdback']:>8.5f} "
            f"{(r['true_relative_lift'] or 0):>7.2%} "
            f"{(f'{meas:.5f}' if meas is not None else 'n/a'):>8} "
            f"{r['regret']:>8.1f} {r['baseline_regret']:>8.1f} "
            f"{r['regret'] / r['baseline_regret'] if r['baseline_regret'] else float('nan'):>6.3f} "
            f"{r['proposals_made']:>4} {r['gated_out']:>5} {r['started']:>5} "
            f"{r['promoted']:>4} {r['retired']:>4} {r['paused_guardrail']:>4} "
            f"{r['worse_than_parent_share']:>7.2%} {r['manual_steps']:>6} {r['elapsed_s']:>6.0f}"
        )

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows if r[key] is not None]))

    ratio = mean("regret") / mean("baseline_regret") if mean("baseline_regret") else float("nan")
    print(
        f"mean {mean('true_lift_over_holdback'):>8.5f} {mean('true_relative_lift'):>7.2%} "
        f"{'':>8} {mean('regret'):>8.1f} {mean('baseline_regret'):>8.1f} {ratio:>6.3f} "
        f"{mean('proposals_made'):>4.1f} {mean('gated_out'):>5.1f} {mean('started'):>5.1f} "
        f"{mean('promoted'):>4.1f} {mean('retired'):>4.1f} {mean('paused_guardrail'):>4.1f} "
        f"{mean('worse_than_parent_share'):>7.2%} {mean('manual_steps'):>6.1f}"
    )
    worse = mean("worse_than_parent_share")
    print(
        f"share served by proposals worse than their parent: {worse:.2%} "
        f"(target <= {TARGET_WORSE_SHARE:.0%}: "
        f"{'met' if worse <= TARGET_WORSE_SHARE else 'NOT met'}); "
        f"manual steps: {mean('manual_steps'):g} (target 0)"
    )
    print(
        "lift = true expected KPI per session of optimised traffic minus the holdback's; "
        "meas = the optimizer's own holdback estimate at the end; regret against an oracle "
        "that knows every proposal's truth; base = regret of the champion alone (no proposer) "
        "against the same oracle; ratio = regret / base"
    )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
