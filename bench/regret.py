"""Regret of Thompson sampling vs the uniform A/B split vs the oracle, on the shipped scenarios.

Every policy runs through ``optimizer.simulator.simulate`` (real assigner, store,
optimizer job, delayed outcomes in simulated time), averaged over seeds. Next to
them, two references that do not use the product's code:

- **ideal TS**: an in-memory Thompson sampler that sees every outcome the moment
  the session ends (no delay, no refit interval, no burn-in, no floor) — the
  practical limit of what any bandit could do on the scenario;
- **Lai–Robbins**: the asymptotic lower bound ``Σ_a Δ_a / KL(p_a, p*) · ln T`` for
  Bernoulli KPIs (per segment), among the arms that respect the guardrails.

The baseline of the ratio is the uniform split measured in the same run:
``thompson / uniform`` regret. Targets: ≤ 25% on ``five_arms_one_winner``; ≤ 50% on
``shipped_defaults`` (the project's flywheel.toml KPI and policy, four weeks);
≤ 18% on ``two_day_delay`` (issue #13).

``--floor-study`` prices the safe-rollout choices on the target scenario:
Thompson with no floor, a constant 2% floor, the default decaying floor
(``floor / (1 + n / floor_decay_sessions)``), waiting for windows to close
instead of modelling the delay, and a daily instead of 6-hourly refit.

Usage::

    python bench/regret.py                     # all scenarios, 3 seeds
    python bench/regret.py --seeds 5 --jobs 2 --floor-study
    python bench/regret.py --scenario two_close_arms --seeds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.config import PolicyConfig  # noqa: E402
from optimizer.scenario import CONVERSION_OFFSET_S, SUPPORT_OFFSET_S, Scenario, load_scenario  # noqa: E402
from optimizer.simulator import simulate  # noqa: E402

SCENARIOS = ROOT / "bench" / "scenarios"
#: The simulator's scenarios (the folder also holds inputs of other benchmarks).
NAMES = (
    "two_close_arms",
    "five_arms_one_winner",
    "guardrail_breach",
    "segments",
    "slow_conversions",
    "shipped_defaults",
    "two_day_delay",
)
TARGET_SCENARIO = "five_arms_one_winner"
TARGET_RATIO = 0.25
#: Variants of Thompson sampling on the target scenario (policy or scenario fields).
STUDY: list[tuple[str, dict[str, Any]]] = [
    ("no floor", {"floor": 0.0}),
    ("constant floor 0.02", {"floor": 0.02, "floor_decay_sessions": 0.0}),
    ("delay=wait (count a session once its window closed)", {"delay": "wait"}),
    ("refit every 24 h", {"refit_every_hours": 24.0}),
]


# -- references -------------------------------------------------------------------------------
def bernoulli_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) ‖ Bernoulli(q)).

    >>> round(bernoulli_kl(0.03, 0.05), 5)
    0.00496
    """
    eps = 1e-12
    p, q = min(max(p, eps), 1 - eps), min(max(q, eps), 1 - eps)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def lai_robbins(scenario: Scenario) -> float | None:
    """Σ over segments and allowed worse arms of Δ/KL(p_a, p*) · ln T_segment (binary KPI only)."""
    if not scenario.is_binary_kpi():
        return None
    weight = scenario.kpi.terms[0].weight
    rewards = scenario.expected_rewards()
    allowed = [i for i, a in enumerate(scenario.arm_ids) if a in scenario.allowed_arms()]
    total = 0.0
    for s, share in enumerate(scenario.segment_shares):
        t = scenario.sessions * share
        p = rewards[s] / weight
        best = max(allowed, key=lambda i: rewards[s, i])
        for i in allowed:
            delta = rewards[s, best] - rewards[s, i]
            if delta > 0:
                total += delta / bernoulli_kl(p[i], p[best]) * math.log(t)
    return total


def _reward_sampler(scenario: Scenario, seg: int, arm: str, rng: np.random.Generator) -> Any:
    """Draw n per-session rewards from the truth, with the KPI's caps and windows."""
    truth = scenario.truths()[seg][arm]
    lam = scenario.turns_mean - 1
    r = truth.rate * (1 - truth.error_rate)

    def draw(n: int) -> np.ndarray:
        total = np.zeros(n)
        converted = rng.random(n) < truth.conversion
        delay_s = (
            CONVERSION_OFFSET_S
            + scenario.delay.sample(rng.random(n), scenario.delay_max_days) * 86400
        )
        for term in scenario.kpi.terms:
            cap = term.cap if term.cap is not None else np.inf
            window_s = term.window_days * 86400
            if term.source == "outcome:conversion":
                value = (converted & (delay_s <= window_s)) * min(1.0, cap)
            elif term.source == "outcome:revenue":
                amount = rng.exponential(truth.revenue, n) if truth.revenue > 0 else np.zeros(n)
                value = np.minimum(amount, cap) * (converted & (delay_s <= window_s))
            elif term.source == "outcome:support_minutes":
                minutes = (
                    rng.exponential(truth.support_minutes, n)
                    if truth.support_minutes > 0
                    else np.zeros(n)
                )
                value = np.minimum(minutes, cap) * (window_s >= SUPPORT_OFFSET_S)
            else:
                turns = 1 + rng.poisson(lam, n)
                rated = rng.binomial(turns, r)
                p_vote = truth.thumbs_up if term.source == "feedback:up_rate" else truth.thumbs_down
                votes = rng.binomial(rated, p_vote)
                value = np.minimum(np.divide(votes, rated, out=np.zeros(n), where=rated > 0), cap)
            total += term.weight * value
        return total

    return draw


def ideal_thompson(scenario: Scenario, seed: int) -> float:
    """Regret of a Thompson sampler that learns from each session instantly.

    Beta–Bernoulli for a binary KPI, a Normal posterior on the mean otherwise;
    one independent sampler per segment, over the arms that respect the guardrails.
    """
    rng = np.random.default_rng([seed, 99])
    rewards = scenario.expected_rewards()
    arms = [a for a in scenario.arm_ids if a in scenario.allowed_arms()]
    cols = [scenario.arm_ids.index(a) for a in arms]
    binary = scenario.is_binary_kpi()
    weight = scenario.kpi.terms[0].weight if binary else 1.0
    counts = rng.multinomial(scenario.sessions, scenario.segment_shares)
    regret = 0.0
    for s, t in enumerate(counts):
        mean = rewards[s, cols]
        best = mean.max()
        k = len(arms)
        if binary:
            p = mean / weight
            a, b = np.ones(k), np.ones(k)
            outcomes = rng.random((t, k))
            for i in range(t):
                j = int(np.argmax(rng.beta(a, b)))
                hit = outcomes[i, j] < p[j]
                a[j] += hit
                b[j] += 1 - hit
                regret += best - mean[j]
            continue
        pools = [_reward_sampler(scenario, s, arm, rng)(t + 10) for arm in arms]
        n, sy, syy = np.zeros(k), np.zeros(k), np.zeros(k)
        for i in range(t):
            if i < 2 * k:  # two pulls each to start the variance
                j = i % k
            else:
                mu = sy / n
                var = np.maximum(syy / n - mu**2, 1e-12)
                j = int(np.argmax(mu + np.sqrt(var / n) * rng.standard_normal(k)))
            y = pools[j][int(n[j])]
            n[j] += 1
            sy[j] += y
            syy[j] += y * y
            regret += best - mean[j]
    return regret


# -- running the product's policies -----------------------------------------------------------
def _one(args: tuple[str, str, int, dict[str, Any]]) -> dict[str, Any]:
    path, policy, seed, overrides = args
    logging.getLogger("optimizer").setLevel(logging.ERROR)  # pauses are expected, not news
    scenario = load_scenario(path)
    policy_fields = {k: v for k, v in overrides.items() if k in PolicyConfig.model_fields}
    scenario_fields = {k: v for k, v in overrides.items() if k not in policy_fields}
    scenario = scenario.model_copy(
        update={"policy": scenario.policy.model_copy(update=policy_fields), **scenario_fields}
    )
    result = simulate(scenario, policy=policy, seed=seed)  # type: ignore[arg-type]
    return {
        "scenario": scenario.name,
        "policy": policy,
        "variant": json.dumps(overrides, sort_keys=True) if overrides else "",
        "seed": seed,
        "regret": result.regret,
        "sessions": result.sessions,
        "best_share": result.sessions_per_arm.get(scenario.oracle_arms()[0], 0) / result.sessions,
        "paused": result.paused_arms,
        "winner": result.winner,
        "final_allocation": result.final_allocation,
        "sessions_per_s": result.sessions_per_s,
        "elapsed_s": result.elapsed_s,
        "timings_s": result.timings_s,
    }


Task = tuple[str, str, int, dict[str, Any]]


def _key(scenario: str, policy: str, variant: str, seed: int) -> tuple[str, str, str, int]:
    return scenario, policy, variant, seed


def _task_key(task: Task) -> tuple[str, str, str, int]:
    path, policy, seed, overrides = task
    variant = json.dumps(overrides, sort_keys=True) if overrides else ""
    return _key(Path(path).stem, policy, variant, seed)


def _run_all(tasks: list[Task], jobs: int, checkpoint: Path | None) -> list[dict[str, Any]]:
    """Run the tasks; with ``checkpoint``, rows already saved there are reused and every
    finished row is saved at once, so an interrupted run resumes where it stopped."""
    done: list[dict[str, Any]] = []
    if checkpoint is not None and checkpoint.exists():
        wanted = {_task_key(t) for t in tasks}
        saved = json.loads(checkpoint.read_text())
        done = [
            r for r in saved if _key(r["scenario"], r["policy"], r["variant"], r["seed"]) in wanted
        ]
        have = {_key(r["scenario"], r["policy"], r["variant"], r["seed"]) for r in done}
        tasks = [t for t in tasks if _task_key(t) not in have]
        print(f"  reusing {len(done)} runs from {checkpoint}", file=sys.stderr)
    started, total = time.perf_counter(), len(done) + len(tasks)

    def finished(row: dict[str, Any]) -> None:
        done.append(row)
        _log(row, len(done), total, started)
        if checkpoint is not None:
            checkpoint.write_text(json.dumps(done, indent=2, default=str))

    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for row in pool.map(_one, tasks):
                finished(row)
    else:
        for task in tasks:
            finished(_one(task))
    return done


def _log(row: dict[str, Any], i: int, n: int, started: float) -> None:
    print(
        f"  [{i}/{n} {time.perf_counter() - started:6.0f}s] "
        f"{row['scenario']:<22} {row['policy']:<8}"
        f" {row['variant']:<40} seed {row['seed']}: regret {row['regret']:8.2f}"
        f" ({row['sessions_per_s']:,.0f} sessions/s)",
        file=sys.stderr,
        flush=True,
    )


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds per scenario and policy (default 3)"
    )
    parser.add_argument(
        "--scenario", action="append", help="scenario name (repeatable; default: all)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="simulations in parallel processes")
    parser.add_argument(
        "--floor-study",
        action="store_true",
        help="also price floor, delay handling, refit interval",
    )
    parser.add_argument("--study-only", action="store_true", help="only that study")
    parser.add_argument("--study-seeds", type=int, help="seeds of the study (default: --seeds)")
    parser.add_argument(
        "--json",
        type=Path,
        help="save every run here as it finishes; runs already saved there are reused",
    )
    args = parser.parse_args(argv)

    paths = [SCENARIOS / f"{name}.toml" for name in NAMES]
    if args.scenario:
        paths = [p for p in paths if p.stem in set(args.scenario)]
    seeds = list(range(args.seeds))
    tasks: list[Task] = []
    if not args.study_only:
        tasks += [
            (str(p), pol, s, {})
            for p in paths
            for pol in ("thompson", "uniform", "oracle")
            for s in seeds
        ]
    target = SCENARIOS / f"{TARGET_SCENARIO}.toml"
    if args.floor_study or args.study_only:
        study_seeds = list(range(args.study_seeds or args.seeds))
        tasks += [(str(target), "thompson", s, v) for _, v in STUDY for s in study_seeds]
        if args.study_only:  # the default variant and the baseline, for the comparison
            tasks += [
                (str(target), pol, s, {}) for pol in ("thompson", "uniform") for s in study_seeds
            ]
    rows = _run_all(tasks, args.jobs, args.json)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    if not args.study_only:
        table = Table(title=f"Regret (KPI units, mean ± sd over {len(seeds)} seeds)")
        for col in (
            "scenario",
            "sessions",
            "oracle",
            "ideal TS",
            "Lai–Robbins",
            "thompson",
            "uniform",
        ):
            table.add_column(col, justify="right" if col != "scenario" else "left")
        table.add_column("thompson / uniform", justify="right")
        table.add_column("best-arm share (TS)", justify="right")
        table.add_column("paused (TS)")
        for path in paths:
            sc = load_scenario(path)
            got = {
                pol: [
                    r
                    for r in rows
                    if r["scenario"] == sc.name and r["policy"] == pol and not r["variant"]
                ]
                for pol in ("thompson", "uniform", "oracle")
            }
            ts, ts_sd = _mean_sd([r["regret"] for r in got["thompson"]])
            un, un_sd = _mean_sd([r["regret"] for r in got["uniform"]])
            orc, _ = _mean_sd([r["regret"] for r in got["oracle"]])
            ideal, ideal_sd = _mean_sd([ideal_thompson(sc, s) for s in range(max(len(seeds), 5))])
            lr = lai_robbins(sc)
            share, _ = _mean_sd([r["best_share"] for r in got["thompson"]])
            paused = sorted({a for r in got["thompson"] for a in r["paused"]})
            ratio = ts / un if un > 0 else float("nan")
            mark = ""
            if sc.name == TARGET_SCENARIO:
                mark = " [green]✓[/green]" if ratio <= TARGET_RATIO else " [red]✗[/red]"
            table.add_row(
                sc.name,
                f"{sc.sessions:,}",
                f"{orc:.2f}",
                f"{ideal:.1f} ± {ideal_sd:.1f}",
                f"{lr:.1f}" if lr is not None else "n/a (composite)",
                f"{ts:.1f} ± {ts_sd:.1f}",
                f"{un:.1f} ± {un_sd:.1f}",
                f"{ratio:.1%}{mark}",
                f"{share:.1%}",
                ", ".join(paused) or "—",
            )
        console.print(table)
        console.print(
            f"target: thompson / uniform ≤ {TARGET_RATIO:.0%} on {TARGET_SCENARIO}. "
            "Regret counts the true expected KPI lost against the best guardrail-respecting arm "
            "of each segment; 'ideal TS' sees each outcome instantly."
        )
    if args.floor_study or args.study_only:
        sc = load_scenario(target)
        pol = sc.policy
        table = Table(
            title=f"Price of the floor, delay handling and refit interval on {TARGET_SCENARIO}"
        )
        for col in (
            "thompson variant",
            "seeds",
            "regret",
            "vs scenario default",
            "thompson / uniform",
        ):
            table.add_column(col, justify="left" if col == "thompson variant" else "right")
        on_target = [r for r in rows if r["scenario"] == TARGET_SCENARIO]
        un = _mean_sd([r["regret"] for r in on_target if r["policy"] == "uniform"])[0]
        default_vals = [
            r["regret"] for r in on_target if r["policy"] == "thompson" and not r["variant"]
        ]
        default = _mean_sd(default_vals)[0]
        label = (
            f"scenario default: floor {pol.floor:g} decaying over {pol.floor_decay_sessions:g} "
            f"sessions, delay={pol.delay}, refit {sc.refit_every_hours:g} h"
        )
        for name, _variant, vals in [(label, {}, default_vals)] + [
            (
                n,
                v,
                [r["regret"] for r in on_target if r["variant"] == json.dumps(v, sort_keys=True)],
            )
            for n, v in STUDY
        ]:
            if not vals:
                continue
            m, sd = _mean_sd(vals)
            table.add_row(
                name,
                str(len(vals)),
                f"{m:.1f} ± {sd:.1f}",
                f"{m - default:+.1f}",
                f"{m / un:.1%}" if un > 0 else "—",
            )
        console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
