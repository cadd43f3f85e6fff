"""Precision and recall of the PII scrubber per entity type on a labelled corpus.

    .venv/bin/python bench/scrubber.py [--corpus FILE ...] [--json] [--errors]

Four corpora ship in ``bench/data``: ``pii_corpus.jsonl`` (280 lines) was used
while developing the detectors, so its figures are optimistic;
``pii_heldout.jsonl`` (100 lines) was written afterwards and measured
without tuning on it — quote that one as the honest estimate. The same pair
for secrets, dates of birth, lower-case and non-Latin names and profile URLs:
``pii_secrets.jsonl`` (development) and ``pii_secrets_heldout.jsonl`` (written
before the detectors, never tuned on).

Each corpus is JSONL: ``{"id", "text", "entities": [{"type", "text"}]}``; every
occurrence of an entity's text in the line is a gold span. Lines without
entities are tricky negatives (order numbers that look like phone numbers,
prices, dates, versions, ordinary words that are also names …). An optional
``"keep"`` list names strings that must survive scrubbing untouched (order
numbers, versions, prices, product names): the keep-list precision is the
share of them that do.

Scores:

* typed precision/recall per type — a prediction counts when it has the gold
  type and overlaps the gold span;
* redaction recall — share of gold entities whose every character ends up
  inside *some* predicted span (of any type): what privacy actually needs;
* leaks — gold entities with at least one character left unscrubbed.

The baseline in the same run is a naive regex scrubber (an email pattern and
"any run of 7+ digits, spaces or dashes"); the figures are printed side by side
with the ratio of throughput.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from optimizer.privacy import ENTITY_TYPES, SCRUBBER_VERSION, Entity, find_entities

DATA = Path(__file__).parent / "data"
CORPORA = (
    DATA / "pii_corpus.jsonl",
    DATA / "pii_heldout.jsonl",
    DATA / "pii_secrets.jsonl",
    DATA / "pii_secrets_heldout.jsonl",
)

_NAIVE_EMAIL = re.compile(r"\S+@\S+\.\w+")
_NAIVE_DIGITS = re.compile(r"\+?\d[\d -]{5,}\d")


def naive_find(text: str) -> list[Entity]:
    """Baseline: what a quick regex job would catch."""
    found = [Entity("EMAIL", m.start(), m.end(), m.group()) for m in _NAIVE_EMAIL.finditer(text)]
    found += [Entity("PHONE", m.start(), m.end(), m.group()) for m in _NAIVE_DIGITS.finditer(text)]
    return found


def gold_spans(row: dict) -> list[Entity]:
    spans: list[Entity] = []
    for ent in row["entities"]:
        for m in re.finditer(re.escape(ent["text"]), row["text"]):
            spans.append(Entity(ent["type"], m.start(), m.end(), ent["text"]))
    return spans


def evaluate(rows: list[dict], finder: Callable[[str], list[Entity]]) -> dict:
    tp_pred: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    tp_gold: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    covered: Counter[str] = Counter()
    errors: list[dict] = []
    keep_total = keep_kept = 0
    started = time.perf_counter()
    predictions = [finder(row["text"]) for row in rows]
    elapsed = time.perf_counter() - started
    for row, pred in zip(rows, predictions, strict=True):
        gold = gold_spans(row)
        for p in pred:
            n_pred[p.type] += 1
            if any(g.type == p.type and g.start < p.end and p.start < g.end for g in gold):
                tp_pred[p.type] += 1
            else:
                errors.append(
                    {"id": row["id"], "kind": "false_positive", "type": p.type, "text": p.text}
                )
        for g in gold:
            n_gold[g.type] += 1
            if any(p.type == g.type and g.start < p.end and p.start < g.end for p in pred):
                tp_gold[g.type] += 1
            else:
                errors.append({"id": row["id"], "kind": "missed", "type": g.type, "text": g.text})
            if all(any(p.start <= i < p.end for p in pred) for i in range(g.start, g.end)):
                covered[g.type] += 1
        for keep in row.get("keep", []):
            start = row["text"].index(keep)
            keep_total += 1
            hit = [p for p in pred if p.start < start + len(keep) and start < p.end]
            if hit:
                errors.append(
                    {"id": row["id"], "kind": "keep_damaged", "type": hit[0].type, "text": keep}
                )
            else:
                keep_kept += 1
    per_type = {}
    for t in ENTITY_TYPES:
        per_type[t] = {
            "gold": n_gold[t],
            "predicted": n_pred[t],
            "precision": tp_pred[t] / n_pred[t] if n_pred[t] else None,
            "recall": tp_gold[t] / n_gold[t] if n_gold[t] else None,
            "redaction_recall": covered[t] / n_gold[t] if n_gold[t] else None,
        }
    total_gold, total_pred = sum(n_gold.values()), sum(n_pred.values())
    overall = {
        "gold": total_gold,
        "predicted": total_pred,
        "precision": sum(tp_pred.values()) / total_pred if total_pred else None,
        "recall": sum(tp_gold.values()) / total_gold if total_gold else None,
        "redaction_recall": sum(covered.values()) / total_gold if total_gold else None,
        "leaks": total_gold - sum(covered.values()),
        "false_positive_on_negative_lines": sum(
            1 for row, pred in zip(rows, predictions, strict=True) if not row["entities"] and pred
        ),
        "negative_lines": sum(1 for row in rows if not row["entities"]),
        "keep_strings": keep_total,
        "keep_precision": keep_kept / keep_total if keep_total else None,
        "texts_per_second": len(rows) / elapsed if elapsed else None,
    }
    return {"per_type": per_type, "overall": overall, "errors": errors}


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        action="append",
        help="JSONL corpus (repeatable); default: both shipped",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--errors", action="store_true", help="list every miss and false positive")
    args = parser.parse_args()
    find_entities("warm up: Anna Schmidt +49 30 901820")  # name lists load once, not in the timing
    results = {}
    for corpus in args.corpus or CORPORA:
        rows = [
            json.loads(line)
            for line in corpus.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        ours, base = evaluate(rows, find_entities), evaluate(rows, naive_find)
        results[corpus.name] = {
            "lines": len(rows),
            "scrubber": ours,
            "naive_baseline": {k: v for k, v in base.items() if k != "errors"},
        }
        if not args.json:
            report(corpus, rows, ours, base, errors=args.errors)
    if args.json:
        json.dump({"scrubber_version": SCRUBBER_VERSION, "corpora": results}, sys.stdout, indent=2)
        print()


def _line(label: str, o: dict, b: dict) -> str:
    ours = f"{o['gold']:5d} {o['predicted']:5d} {_fmt(o['precision']):>9} {_fmt(o['recall']):>7}"
    naive = f"{_fmt(b['precision'])} / {_fmt(b['recall'])}"
    return f"{label:8} {ours} {_fmt(o['redaction_recall']):>8}   {naive}"


def report(corpus: Path, rows: list[dict], ours: dict, base: dict, *, errors: bool) -> None:
    o, b = ours["overall"], base["overall"]
    print(
        f"\ncorpus {corpus.name} — {len(rows)} lines, {o['negative_lines']} without PII; "
        f"scrubber {SCRUBBER_VERSION}"
    )
    header = f"{'type':8} {'gold':>5} {'pred':>5} {'precision':>9} {'recall':>7} {'redacted':>8}"
    print(f"{header}   naive: P / R")
    for t in ENTITY_TYPES:
        print(_line(t, ours["per_type"][t], base["per_type"][t]))
    print(_line("overall", o, b))
    fp, naive_fp = o["false_positive_on_negative_lines"], b["false_positive_on_negative_lines"]
    print(
        f"leaks (gold entities not fully scrubbed): {o['leaks']} (naive: {b['leaks']}); "
        f"negative lines with a false positive: {fp}/{o['negative_lines']} (naive: {naive_fp})"
    )
    if o["keep_strings"]:
        print(
            f"keep-list precision (order numbers, versions, prices, products left intact): "
            f"{_fmt(o['keep_precision'])} of {o['keep_strings']} "
            f"(naive: {_fmt(b['keep_precision'])})"
        )
    slower = b["texts_per_second"] / o["texts_per_second"]
    gain = o["redaction_recall"] / b["redaction_recall"]
    print(
        f"redaction recall vs naive baseline: {gain:.2f}x; "
        f"throughput {o['texts_per_second']:.0f} texts/s ({slower:.0f}x slower than naive regexes)"
    )
    if errors:
        for e in ours["errors"]:
            print(f"  {e['id']} {e['kind']:14} {e['type']:8} {e['text']!r}")


if __name__ == "__main__":
    main()
