"""A/A experiments and false-positive rates of the stop rule, the guardrails and SRM.

Each run is a simulated experiment (``optimizer.simulator.simulate``: real assigner,
store and optimizer job, delayed conversions in simulated time) in which every arm
has the **same KPI** (3 % conversion, exponential delay of 1.5 days, 7-day window):
four weeks at 2,000 sessions a day, a refit every 12 hours, 2–5 arms (cycling with
the seed). The arms differ only on the thumbs-down guardrail (limit: +5 points):

- ``champion`` and ``healthy-*``: 20 % thumbs-down;
- ``near-miss``: 24 % (4 points worse, inside the limit: must not be paused);
- ``breach`` (runs with ≥ 3 arms): 29 % (9 points worse: must be paused).

Guardrails run in ``observe`` mode, so nothing is paused and every rule can be
replayed on the same run: each snapshot records, per arm, the posterior P(breach)
and the always-valid lower bound, and the arm each stop rule would name. Up to
an arm's first pause the data do not depend on the rule, so "ever paused" and
"sessions until the pause" are exact for each rule without re-running.

Rates per run with a 95 % Clopper–Pearson interval, for each candidate rule:

- stop rule names a winner (any refit) — target ≤ 5 %;
- a guardrail pauses a healthy arm / the near-miss — target ≤ 5 %;
- SRM warns (any refit) — target ≤ 5 %;
- the true breach is paused — target ≥ 95 %, with the sessions it took.

The baseline of the ratios is the former per-look posterior rule, measured in the
same run: ``always_valid / posterior`` false-positive rate.

Usage::

    python bench/aa.py                     # 4 seeds (~ a few minutes on 2 cores)
    python bench/aa.py --seeds 40 --jobs 2 # the figures of the README
    python bench/aa.py --days 7 --seeds 2  # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.scenario import parse_scenario  # noqa: E402
from optimizer.simulator import simulate  # noqa: E402
from optimizer.store import Store, schema  # noqa: E402

#: Arms per run cycle through these (the issue: 2–5 arms).
ARM_COUNTS = (2, 3, 4, 5)
LIMIT = 0.05
CHAMPION_DOWN, NEAR_MISS_DOWN, BREACH_DOWN = 0.20, 0.24, 0.29
PAUSE_PROBABILITY = 0.95
#: The harm a breach may do: with ~0.6 votes per session (30 % of ~2 turns rated), 5,000
#: sessions are ~3,000 votes, where the always-valid test pauses a +9-point breach with
#: ≥ 95 % probability (bench/README.md). A bandit that starves the arm first keeps it under.
BREACH_EXPOSURE_SESSIONS = 5000
#: Guardrail rules compared: the per-look posterior rule, the same on k consecutive refits,
#: and the always-valid bound (the default).
GUARDRAIL_RULES = (
    "posterior",
    "posterior x2 consecutive",
    "posterior x3 consecutive",
    "always_valid",
)
STOP_RULES = ("posterior", "always_valid")


def scenario_for(
    seed: int, *, days: float, per_day: int, guardrail_floor: float | None = None
) -> Any:
    """The A/A scenario of one seed (arm count cycles through :data:`ARM_COUNTS`).

    ``guardrail_floor`` overrides ``policy.guardrail_floor`` (None: the shipped default).
    """
    policy: dict[str, Any] = {"delay": "model", "guardrail_action": "observe"}
    if guardrail_floor is not None:
        policy["guardrail_floor"] = guardrail_floor
    k = ARM_COUNTS[seed % len(ARM_COUNTS)]
    arms = [{"id": "champion", "thumbs_up": 1 - CHAMPION_DOWN}]
    arms.append({"id": "near-miss", "thumbs_up": 1 - NEAR_MISS_DOWN})
    if k >= 3:
        arms.append({"id": "breach", "thumbs_up": 1 - BREACH_DOWN})
    arms += [{"id": f"healthy-{i}", "thumbs_up": 1 - CHAMPION_DOWN} for i in range(k - len(arms))]
    for arm in arms:
        arm.update(conversion=0.03, rate=0.3)
    return parse_scenario(
        {
            "name": f"aa-{k}arms",
            "sessions": int(days * per_day),
            "sessions_per_day": per_day,
            "refit_every_hours": 12,
            "champion": "champion",
            "delay": {"distribution": "exponential", "mean_days": 1.5},
            "policy": policy,
            "kpi": {
                "terms": [
                    {
                        "name": "conversion",
                        "source": "outcome:conversion",
                        "weight": 1.0,
                        "window_days": 7,
                    }
                ],
                "guardrails": [{"metric": "thumbs_down_rate", "max_delta": LIMIT}],
            },
            "arms": arms,
        }
    )


def _first_pause(series: list[tuple[int, float, float | None, int]], rule: str) -> int | None:
    """Sessions at the first refit the rule pauses, from (sessions, P(breach), bound, votes)."""
    need = {"posterior x2 consecutive": 2, "posterior x3 consecutive": 3}.get(rule, 1)
    streak = 0
    for sessions, prob, lower, _ in series:
        if rule == "always_valid":
            hit = lower is not None and lower > LIMIT
        else:
            hit = prob >= PAUSE_PROBABILITY
        streak = streak + 1 if hit else 0
        if streak >= need:
            return sessions
    return None


def run_one(
    seed: int, days: float, per_day: int, guardrail_floor: float | None = None
) -> dict[str, Any]:
    """One A/A run: what each rule would have done."""
    scenario = scenario_for(seed, days=days, per_day=per_day, guardrail_floor=guardrail_floor)
    with tempfile.TemporaryDirectory(prefix="flywheel-aa-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'aa.db'}"
        tic = time.perf_counter()
        result = simulate(scenario, policy="thompson", seed=seed, database_url=url)
        elapsed = time.perf_counter() - tic
        store = Store(url)
        snaps = schema.policy_snapshots
        with store.engine.connect() as conn:
            summaries = [
                r.summary
                for r in conn.execute(sa.select(snaps.c.summary).order_by(snaps.c.version))
            ]
        store.dispose()
    per_arm: dict[str, list[tuple[int, float, float | None, int]]] = {}
    evidence: dict[str, list[list[Any]]] = {}
    stops = {rule: False for rule in STOP_RULES}
    srm = False
    for summary in summaries:
        for check in summary.get("guardrails", []):
            evidence.setdefault(check["arm"], []).append(
                [
                    int(summary["sessions"]),
                    check.get("arm_value"),
                    check.get("champion_value"),
                    int(check["n"]),
                    int(check["champion_n"]),
                    check.get("lower_bound"),
                    int(summary["arms"].get(check["arm"], {}).get("sessions", 0)),
                ]
            )
            per_arm.setdefault(check["arm"], []).append(
                (
                    int(summary["sessions"]),
                    float(check["probability"]),
                    check.get("lower_bound"),
                    int(check["n"]),
                )
            )
        for rule, arm in (summary["stop"].get("candidates") or {}).items():
            stops[rule] = stops[rule] or arm is not None
        srm = srm or bool(summary["srm"].get("warning"))
    pauses = {
        rule: {arm: _first_pause(series, rule) for arm, series in per_arm.items()}
        for rule in GUARDRAIL_RULES
    }
    return {
        "seed": seed,
        "arms": len(scenario.arm_ids),
        "sessions": result.sessions,
        "refits": result.refits,
        "elapsed_s": round(elapsed, 1),
        "stop": stops,
        "srm": srm,
        "pauses": pauses,
        # Votes (rated turns) each arm had at the end: a bandit may starve an arm of traffic,
        # and no valid test pauses an arm on evidence it never collected.
        "final_votes": {arm: series[-1][3] for arm, series in per_arm.items() if series},
        # Per refit: sessions, arm rate, champion rate, votes, champion votes, lower bound,
        # sessions the arm has served.
        "evidence": evidence,
    }


def _served_before_pause(run: dict[str, Any], rule: str) -> int:
    """Sessions the breaching arm had served when ``rule`` paused it, or by the end."""
    rows = run["evidence"]["breach"]
    paused_at = run["pauses"][rule]["breach"]
    row = next((r for r in rows if r[0] == paused_at), rows[-1]) if rows else None
    return int(row[6]) if row is not None and len(row) > 6 else 0


def power_curve(
    reps: int, *, seed: int = 0, look_votes: int = 100, max_votes: int = 6000, champion_x: int = 8
) -> dict[str, Any]:
    """P(paused by v votes of the arm) through the real ``check_guardrails`` (``always_valid``).

    Votes arrive in batches of ``look_votes`` for the arm and ``champion_x`` times as many
    for the champion (a bandit favours the champion in these runs), with a check after every
    batch: the breach (+9 points), an arm exactly at the limit (+5, the worst case of the
    guarantee) and the near-miss (+4). This says how many votes a breach needs; the
    simulator runs say how many a bandit gives it.
    """
    from optimizer.config import GuardrailConfig
    from optimizer.guardrails import check_guardrails

    rail = [GuardrailConfig(metric="thumbs_down_rate", max_delta=LIMIT)]
    rng = np.random.default_rng(seed)
    looks = np.arange(look_votes, max_votes + 1, look_votes)
    out: dict[str, Any] = {"votes": looks.tolist(), "champion_x": champion_x, "reps": reps}
    for label, down in (
        ("breach", BREACH_DOWN),
        ("at_limit", CHAMPION_DOWN + LIMIT),
        ("near_miss", NEAR_MISS_DOWN),
    ):
        first: list[int | None] = []
        for _ in range(reps):
            champ = bad = 0
            paused = None
            for n in looks:
                champ += int(rng.binomial(look_votes * champion_x, CHAMPION_DOWN))
                bad += int(rng.binomial(look_votes, down))
                frame = pd.DataFrame(
                    {
                        "arm_id": ["champion", label],
                        "rated": [n * champion_x, n],
                        "thumbs_down": [champ, bad],
                    }
                )
                check = check_guardrails(
                    frame,
                    rail,
                    champion="champion",
                    arms=[label],
                    pause_probability=PAUSE_PROBABILITY,
                    samples=16,
                    random_state=0,
                )[0]
                if check.breached:
                    paused = int(n)
                    break
            first.append(paused)
        out[label] = [rate(sum(t is not None and t <= v for t in first), reps) for v in looks]
    return out


def rate(hits: int, n: int) -> dict[str, Any]:
    """Share with its 95 % Clopper–Pearson interval."""
    if n == 0:
        return {"hits": 0, "n": 0, "rate": None, "ci": [None, None]}
    lo = stats.beta.ppf(0.025, hits, n - hits + 1) if hits > 0 else 0.0
    hi = stats.beta.ppf(0.975, hits + 1, n - hits) if hits < n else 1.0
    return {"hits": hits, "n": n, "rate": hits / n, "ci": [float(lo), float(hi)]}


def tabulate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The A/A table: per rule, each rate with its interval."""
    n = len(runs)
    out: dict[str, Any] = {"runs": n, "stop": {}, "guardrails": {}}
    for rule in STOP_RULES:
        out["stop"][rule] = rate(sum(r["stop"][rule] for r in runs), n)
    out["srm"] = rate(sum(r["srm"] for r in runs), n)
    for rule in GUARDRAIL_RULES:
        healthy = sum(
            any(t is not None for a, t in r["pauses"][rule].items() if a.startswith("healthy"))
            for r in runs
        )
        with_healthy = sum(any(a.startswith("healthy") for a in r["pauses"][rule]) for r in runs)
        near = sum(r["pauses"][rule].get("near-miss") is not None for r in runs)
        breach_runs = [r for r in runs if "breach" in r["pauses"][rule]]
        times = [r["pauses"][rule]["breach"] for r in breach_runs]
        caught = [t for t in times if t is not None]
        out["guardrails"][rule] = {
            "healthy_paused": rate(healthy, with_healthy),
            "near_miss_paused": rate(near, n),
            "breach_paused": rate(len(caught), len(breach_runs)),
            "breach_sessions_median": int(np.median(caught)) if caught else None,
            "breach_sessions_max": int(max(caught)) if caught else None,
            # Harm: sessions the breaching arm served before its pause (or by the end).
            "breach_served": [_served_before_pause(r, rule) for r in breach_runs],
            "breach_contained": rate(
                sum(_served_before_pause(r, rule) <= BREACH_EXPOSURE_SESSIONS for r in breach_runs),
                len(breach_runs),
            ),
            "missed_breach_final_votes": [
                r["final_votes"].get("breach")
                for r in breach_runs
                if r["pauses"][rule]["breach"] is None
            ],
        }
    return out


def _fmt(r: dict[str, Any]) -> str:
    if r["rate"] is None:
        return "n/a"
    lo, hi = r["ci"]
    return f"{r['rate']:6.1%} [{lo:5.1%}, {hi:5.1%}] ({r['hits']}/{r['n']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="runs (default 4; 40 for the README)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--days", type=float, default=28.0)
    parser.add_argument("--per-day", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--save", type=Path, help="also write the table and every run as JSON")
    parser.add_argument(
        "--guardrail-floor",
        type=float,
        help="policy.guardrail_floor of the runs (default: the shipped one; 0 = the floor of "
        "a suspect arm decays like any other, the policy before issue #16's power fix)",
    )
    parser.add_argument(
        "--power",
        type=int,
        metavar="REPS",
        help="instead: P(paused) by votes of the arm, REPS synthetic vote streams per case",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.power:
        curve = power_curve(args.power, seed=args.first_seed)
        print(
            f"always-valid guardrail, {curve['reps']} vote streams per case, a check every "
            f"100 votes, champion {curve['champion_x']}x the arm's votes: P(paused by v votes)"
        )
        print(f"  {'votes':>6s}  {'breach +9':28s}  {'at the limit +5':28s}  near-miss +4")
        for i, v in enumerate(curve["votes"]):
            if v % 500 == 0:
                row = [_fmt(curve[k][i]) for k in ("breach", "at_limit", "near_miss")]
                print(f"  {v:6d}  {row[0]:28s}  {row[1]:28s}  {row[2]}")
        return 0
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tic = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            n = len(seeds)
            runs = list(
                pool.map(
                    run_one,
                    seeds,
                    [args.days] * n,
                    [args.per_day] * n,
                    [args.guardrail_floor] * n,
                )
            )
    else:
        runs = [run_one(s, args.days, args.per_day, args.guardrail_floor) for s in seeds]
    table = tabulate(runs)
    table["elapsed_s"] = round(time.perf_counter() - tic, 1)
    table["per_run"] = runs
    if args.save:
        args.save.write_text(json.dumps(table))
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(
        f"A/A: {len(runs)} runs, {args.days:g} days x {args.per_day} sessions/day, "
        f"arms {sorted({r['arms'] for r in runs})}, {table['elapsed_s']} s"
    )
    print("\nstop rule names a winner (target <= 5%)")
    for rule in STOP_RULES:
        print(f"  {rule:26s} {_fmt(table['stop'][rule])}")
    print(
        f"\nSRM warns at some refit (target <= 5%)\n  {'chi2 p < 0.001':26s} {_fmt(table['srm'])}"
    )
    print("\nguardrail (thumbs-down, limit +5 points)")
    for rule in GUARDRAIL_RULES:
        g = table["guardrails"][rule]
        print(f"  {rule}")
        print(f"    healthy arm paused  (<= 5%)  {_fmt(g['healthy_paused'])}")
        print(f"    near-miss paused    (<= 5%)  {_fmt(g['near_miss_paused'])}")
        print(
            f"    +9 pt breach paused (>= 95%) {_fmt(g['breach_paused'])}, "
            f"sessions to pause: median {g['breach_sessions_median']}, "
            f"max {g['breach_sessions_max']}; missed runs' breach-arm votes at the end: "
            f"{g['missed_breach_final_votes']}"
        )
        served = g["breach_served"]
        print(
            f"    breach served <= {BREACH_EXPOSURE_SESSIONS} sessions before its pause "
            f"(>= 95%) {_fmt(g['breach_contained'])}, "
            f"sessions served: median {int(np.median(served)) if served else None}, "
            f"max {max(served) if served else None}"
        )
    base = table["guardrails"]["posterior"]
    new = table["guardrails"]["always_valid"]
    fp_base = base["healthy_paused"]["hits"] + base["near_miss_paused"]["hits"]
    fp_new = new["healthy_paused"]["hits"] + new["near_miss_paused"]["hits"]
    stop_base, stop_new = table["stop"]["posterior"]["hits"], table["stop"]["always_valid"]["hits"]
    print(
        f"\nratio always_valid / posterior (same runs): guardrail false pauses "
        f"{fp_new}/{fp_base}"
        + (f" = {fp_new / fp_base:.2f}" if fp_base else "")
        + f"; stop-rule winners {stop_new}/{stop_base}"
        + (f" = {stop_new / stop_base:.2f}" if stop_base else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
