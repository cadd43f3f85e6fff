"""What a newcomer does to a running experiment: regret and the known winner's share.

Runs ``bench/scenarios/newcomer.toml`` (four arms for ten days, a challenger
arriving on day 10, a loser retired on day 14) under Thompson sampling and the
uniform split, through ``optimizer.simulator.simulate`` (real assigner, store
and optimizer job). For each arrival it prints, over the seeds, the share of
traffic of the incumbent winner (the best arm present before the newcomer) in
the two days before and after the arrival, the newcomer's share after, and the
regret per session before and after. The baseline is the uniform split of the
same run (regret ratio ``thompson / uniform``).

Usage::

    python bench/newcomer.py --seeds 3 --jobs 2
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.scenario import load_scenario  # noqa: E402
from optimizer.simulator import simulate  # noqa: E402

SCENARIO = ROOT / "bench" / "scenarios" / "newcomer.toml"


def _one(args: tuple[str, str, int]) -> dict[str, Any]:
    path, policy, seed = args
    logging.getLogger("optimizer").setLevel(logging.ERROR)
    result = simulate(load_scenario(path), policy=policy, seed=seed)  # type: ignore[arg-type]
    return {"policy": policy, "seed": seed, "regret": result.regret, "arrivals": result.arrivals}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    args = parser.parse_args(argv)
    tasks = [(str(args.scenario), p, s) for p in ("thompson", "uniform") for s in range(args.seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(_one, tasks))
    else:
        rows = [_one(t) for t in tasks]

    def mean(values: list[float | None]) -> float:
        return float(np.mean([v for v in values if v is not None]))

    for policy in ("thompson", "uniform"):
        mine = [r for r in rows if r["policy"] == policy]
        print(f"{policy}: regret per seed {[round(r['regret'], 1) for r in mine]}")
        for i, arrival in enumerate(mine[0]["arrivals"]):
            got = [r["arrivals"][i] for r in mine]
            print(
                f"  newcomer {arrival['arm']} on day {arrival['day']:g}, incumbent "
                f"{arrival['incumbent']}: incumbent share 2 d before "
                f"{mean([g['incumbent_share_before'] for g in got]):.1%}, 2 d after "
                f"{mean([g['incumbent_share_after'] for g in got]):.1%}; newcomer share after "
                f"{mean([g['newcomer_share_after'] for g in got]):.1%}; regret/session before "
                f"{mean([g['regret_per_session_before'] for g in got]):.5f}, after "
                f"{mean([g['regret_per_session_after'] for g in got]):.5f}"
            )
    ts = [r["regret"] for r in rows if r["policy"] == "thompson"]
    un = [r["regret"] for r in rows if r["policy"] == "uniform"]
    ratios = [t / u for t, u in zip(ts, un, strict=True)]
    print(
        f"thompson / uniform regret: {np.mean(ts) / np.mean(un):.3f} "
        f"(per seed {[round(x, 3) for x in ratios]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
