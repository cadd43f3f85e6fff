"""Real proposals from demo feedback: the chat model answers, misses get a thumbs-down, the
proposer model rewrites the champion.

1. A fresh SQLite store gets the shipped experiment (``flywheel.toml``, ``prompts/``).
2. The chat model (``model.name``, the local Gemma 3 270M by default) answers the demo's
   held-out questions (``bench/data/heldout_questions.jsonl``) under the champion's prompt,
   exactly as the chat builds the prompt.
3. A reply that misses one of the reference facts gets a thumbs-down with a comment naming
   what was missing (what a user would say); the others a thumbs-up.
4. One proposer round (:func:`optimizer.proposer.run_round`, forced) asks the proposer model
   for ``--candidates`` rewrites with rationales and runs every gate, the replay through the
   real model included. Each candidate is printed verbatim with its gates and fate.

Usage::

    python scripts/demo_proposals.py --questions 8 --candidates 3 > proposals.txt
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from chatbot.llm.proposer import make_hooks  # noqa: E402
from optimizer.clock import utcnow  # noqa: E402
from optimizer.config import load_config  # noqa: E402
from optimizer.prompt_library import arm_spec, load_prompts  # noqa: E402
from optimizer.proposer import candidates, run_round  # noqa: E402
from optimizer.store import AssignmentRecord, Store, TurnRecord  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--replay", type=int, default=2)
    parser.add_argument("--sample", type=int, default=6, help="failures shown to the proposer")
    parser.add_argument("--database", default=None, help="SQLite file (default: a temp one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(ROOT / "flywheel.toml", environ=False)
    config = config.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "proposer": config.proposer.model_copy(
                update={
                    "candidates": args.candidates,
                    "replay_questions": args.replay,
                    "sample_turns": args.sample,
                }
            ),
        }
    )
    prompts = load_prompts(ROOT / "prompts")
    db = args.database or f"/tmp/flywheel-demo-proposals-{uuid.uuid4().hex[:8]}.db"
    store = Store(f"sqlite:///{db}")
    store.upgrade()
    exp = config.experiment
    store.sync_experiment(exp.id, exp.salt, [arm_spec(a, prompts) for a in exp.arms])
    champion = exp.champion or exp.arms[0].id
    variant = prompts.variant(next(a.prompt for a in exp.arms if a.id == champion))
    hooks = make_hooks(config, knowledge=prompts.knowledge, idle=lambda: True)
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "data" / "heldout_questions.jsonl").read_text().splitlines()
        if line.strip()
    ][: args.questions]
    t0 = utcnow() - timedelta(hours=len(rows) + 1)
    downs = 0
    for i, row in enumerate(rows):
        started = time.perf_counter()
        reply = hooks.reply(variant.template, row["question"]) if hooks.reply else None
        assert reply is not None
        missing = [f for f in row.get("facts", []) if f.lower() not in reply.text.lower()]
        sid, uid = f"demo-s{i}", f"demo-u{i}"
        at = t0 + timedelta(hours=i)
        store.record_assignment(
            AssignmentRecord(sid, uid, exp.id, champion, 1.0, None, "*", {}, at)
        )
        store.record_turn(
            TurnRecord(
                f"demo-t{i}",
                sid,
                uid,
                exp.id,
                champion,
                variant.id,
                variant.hash,
                config.model.name,
                row["question"],
                reply.text or "",
                latency_ms=reply.latency_ms,
                error=reply.error,
                created_at=at,
            )
        )
        if reply.error is None:
            if missing or not reply.text.strip():
                comment = (
                    f"It did not tell me {', '.join(missing)}." if missing else "No answer at all."
                )
                store.record_feedback(f"demo-t{i}", uid, 0, comment, at=at + timedelta(minutes=1))
                downs += 1
            else:
                store.record_feedback(f"demo-t{i}", uid, 1, None, at=at + timedelta(minutes=1))
        print(
            f"[answered {i + 1}/{len(rows)} in {time.perf_counter() - started:.1f}s; "
            f"missing {missing}]",
            file=sys.stderr,
        )
    print(f"thumbs-down turns: {downs} of {len(rows)}", file=sys.stderr)
    started = time.perf_counter()
    result = run_round(store, config, hooks, force=True)
    print(f"[round in {time.perf_counter() - started:.0f}s]", file=sys.stderr)
    print(f"# Proposer round {result.round_id} on {result.parent!r} (model {config.model.name})")
    print(f"parent prompt:\n\n{variant.template}\n")
    for k, c in enumerate(reversed(candidates(store, exp.id)), 1):
        print(f"## Candidate {k}: {c.status}" + (f" — {c.reason}" if c.reason else ""))
        print("\nPrompt (verbatim):\n")
        print(c.prompt_text or "(none)")
        print("\nRationale (verbatim):\n")
        print(c.rationale or "(none)")
        print(
            "\nGates: "
            + "; ".join(
                f"{g['name']} {'pass' if g['passed'] else 'FAIL'}"
                + (f" ({g['detail']})" if g.get("detail") else "")
                for g in c.gates
            )
        )
        print()
    print(f"(store: {db})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
