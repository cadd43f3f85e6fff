"""Offline effect of few-shot examples on the local model's answers.

    LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python bench/fewshot_offline.py
        [--model local/gemma3-270m] [--max-tokens 80] [--limit N] [--json]

For each held-out question about the demo knowledge base
(``bench/data/heldout_questions.jsonl``: question, reference answer, key facts)
the model answers three times, with the ``concise`` variant and:

- ``none`` — no examples (the baseline);
- ``fixed`` — the seed examples of flywheel.toml's ``concise+fixed`` arm;
- ``retrieved`` — the 3 nearest approved bank examples. The bank is built the
  way production builds it: past conversations (``bench/data/fewshot_bank.jsonl``,
  different wording from the held-out questions, same topics) are recorded as
  thumbed-up turns in a temporary SQLite store and mined by
  :func:`optimizer.fewshot.mine_examples` (scrubbed, de-duplicated, auto-approved),
  then :class:`optimizer.fewshot.ExampleSelector` retrieves from it.

Messages come from ``chatbot.llm.messages.build_messages`` and replies from
``chatbot.llm.streaming.stream_reply``, as in the chat (temperature 0, so runs repeat).

Scores, each averaged over questions:

- ``fact recall`` — share of the question's key facts ("$8", "14 days") found in
  the answer (case-insensitive substring): did the answer say the right thing;
- ``token F1`` — SQuAD-style bag-of-words F1 between answer and reference
  (lower-cased, punctuation and articles dropped): how close in wording;
- latency (ms, mean and median) and prompt tokens — what the examples cost.

Ratios are against ``none`` measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import string
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parents[1]

from chatbot.llm.messages import build_messages  # noqa: E402
from chatbot.llm.streaming import stream_reply  # noqa: E402
from optimizer.config import ArmConfig, ExperimentConfig, ModelConfig, load_config  # noqa: E402
from optimizer.fewshot import ExampleSelector, mine_examples  # noqa: E402
from optimizer.prompt_library import load_prompts  # noqa: E402
from optimizer.store import AssignmentRecord, Store, TurnRecord  # noqa: E402

DATA = Path(__file__).parent / "data"
START = datetime(2026, 1, 1, tzinfo=UTC)


def normalise(text: str) -> list[str]:
    text = text.lower()
    text = "".join(" " if ch in string.punctuation and ch not in "$%" else ch for ch in text)
    return [t for t in text.split() if t not in {"a", "an", "the"}]


def token_f1(answer: str, reference: str) -> float:
    pred, gold = normalise(answer), normalise(reference)
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def fact_recall(answer: str, facts: list[str]) -> float:
    squash = lambda s: re.sub(r"\s+", " ", s.lower())  # noqa: E731
    return sum(squash(f) in squash(answer) for f in facts) / len(facts)


def build_bank(store: Store) -> int:
    """Record the bank conversations as thumbed-up turns and mine them, as production does."""
    config = load_config(ROOT / "flywheel.toml", environ=False)
    config = config.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "experiment": ExperimentConfig(
                id="bench", salt="bench", arms=(ArmConfig(id="concise", prompt="concise"),)
            ),
            "fewshot": config.fewshot.model_copy(update={"auto_approve": True}),
        }
    )
    rows = [
        json.loads(line)
        for line in (DATA / "fewshot_bank.jsonl").read_text().splitlines()
        if line.strip()
    ]
    for i, row in enumerate(rows):
        sid, uid, at = f"bank-{i}", f"u{i}", START + timedelta(minutes=i)
        store.record_assignment(
            AssignmentRecord(sid, uid, "bench", "concise", 1.0, None, "*", {}, at)
        )
        store.record_turn(
            TurnRecord(
                f"{sid}-t0",
                sid,
                uid,
                "bench",
                "concise",
                "concise",
                "h",
                "bench",
                row["user"],
                row["assistant"],
                created_at=at,
            )
        )
        store.record_feedback(f"{sid}-t0", uid, 1, at=at)
    result = mine_examples(
        store, config, now=START + timedelta(days=60), library=load_prompts(ROOT / "prompts")
    )
    return len(result.added)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(ROOT / "flywheel.toml", environ=False)
    library = load_prompts(ROOT / "prompts")
    variant = library.variant("concise")
    model = ModelConfig(
        name=args.model, temperature=0.0, max_tokens=args.max_tokens, timeout_s=120, retries=0
    )
    budget = config.model.context_tokens - args.max_tokens
    fixed_arm = next(a for a in config.experiment.arms if a.fewshot == "fixed")
    arms = {
        "none": ArmConfig(id="none", prompt="concise"),
        "fixed": ArmConfig(
            id="fixed", prompt="concise", fewshot="fixed", examples=fixed_arm.examples
        ),
        "retrieved": ArmConfig(id="retrieved", prompt="concise", fewshot="retrieved", k=3),
    }
    questions = [
        json.loads(line)
        for line in (DATA / "heldout_questions.jsonl").read_text().splitlines()
        if line.strip()
    ]
    questions = questions[: args.limit] if args.limit else questions
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/bench.db")
        store.create_all()
        banked = build_bank(store)
        selector = ExampleSelector(library, store, refresh_s=0)
        await stream_reply(
            [{"role": "user", "content": "Hello"}], model=model
        )  # load the model outside the timing
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for q in questions:
            for name, arm in arms.items():
                examples = selector.select(arm, q["question"])
                messages, kept = build_messages(
                    variant, library.knowledge, examples, [], q["question"], budget_tokens=budget
                )
                completion = await stream_reply(messages, model=model)
                results[name].append(
                    {
                        "id": q["id"],
                        "examples": kept,
                        "answer": completion.text.strip(),
                        "error": completion.error,
                        "fact_recall": fact_recall(completion.text, q["facts"]),
                        "token_f1": token_f1(completion.text, q["reference"]),
                        "latency_ms": completion.latency_ms,
                        "prompt_tokens": completion.prompt_tokens,
                    }
                )
                print(
                    f"  {q['id']:18} {name:9} facts {results[name][-1]['fact_recall']:.2f} "
                    f"F1 {results[name][-1]['token_f1']:.2f} {completion.latency_ms:6.0f} ms  "
                    f"{completion.text.strip()[:70]!r}",
                    file=sys.stderr,
                )
        store.dispose()
    summary = {}
    for name, rows in results.items():
        summary[name] = {
            "fact_recall": statistics.fmean(r["fact_recall"] for r in rows),
            "token_f1": statistics.fmean(r["token_f1"] for r in rows),
            "latency_ms_mean": statistics.fmean(r["latency_ms"] for r in rows),
            "latency_ms_median": statistics.median(r["latency_ms"] for r in rows),
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] or 0 for r in rows),
            "errors": sum(1 for r in rows if r["error"]),
        }
    return {
        "model": args.model,
        "questions": len(questions),
        "bank_examples_mined": banked,
        "max_tokens": args.max_tokens,
        "summary": summary,
        "answers": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="local/gemma3-270m")
    parser.add_argument("--max-tokens", type=int, default=80)
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    base = report["summary"]["none"]
    print(
        f"model {report['model']}, {report['questions']} held-out questions, "
        f"{report['bank_examples_mined']} mined bank examples, max_tokens {report['max_tokens']}"
    )
    cols = (
        "facts",
        "x none",
        "tokenF1",
        "x none",
        "lat ms",
        "median",
        "x none",
        "prompt tok",
        "errors",
    )
    print(f"{'strategy':10} " + " ".join(f"{c:>8}" for c in cols))
    for name, s in report["summary"].items():

        def ratio(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key] / base[key]:.2f}x" if base[key] else "n/a"

        cells = (
            f"{s['fact_recall']:.2f}",
            ratio("fact_recall"),
            f"{s['token_f1']:.3f}",
            ratio("token_f1"),
            f"{s['latency_ms_mean']:.0f}",
            f"{s['latency_ms_median']:.0f}",
            ratio("latency_ms_mean"),
            f"{s['prompt_tokens_mean']:.0f}",
            str(s["errors"]),
        )
        print(f"{name:10} " + " ".join(f"{c:>8}" for c in cells))


if __name__ == "__main__":
    main()
