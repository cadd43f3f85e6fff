"""The PII scrubber: positives and tricky negatives per entity type, the CLI, the corpora."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimizer.privacy import ENTITY_TYPES, Scrubber, find_entities, public_allowlist, scrub

ROOT = Path(__file__).resolve().parents[2]

POSITIVES = [
    ("EMAIL", "write to maria.gonzalez@gmail.com today", "maria.gonzalez@gmail.com"),
    (
        "EMAIL",
        "my email is kevin dot brown at outlook dot com",
        "kevin dot brown at outlook dot com",
    ),
    ("PHONE", "Call me on (415) 555-2671 after 5pm.", "(415) 555-2671"),
    ("PHONE", "My mobile is +44 7911 123456.", "+44 7911 123456"),
    ("PHONE", "Handynummer: 0151 23456789", "0151 23456789"),
    ("PHONE", "my phone number is 4155552671", "4155552671"),
    ("CARD", "My card 4111 1111 1111 1111 was declined.", "4111 1111 1111 1111"),
    ("CARD", "Amex 3782 822463 10005", "3782 822463 10005"),
    ("IBAN", "IBAN: DE89 3704 0044 0532 0130 00 thanks", "DE89 3704 0044 0532 0130 00"),
    ("IBAN", "account NL91ABNA0417164300 for the refund", "NL91ABNA0417164300"),
    ("IP", "My IP is 81.2.69.142 and I'm blocked.", "81.2.69.142"),
    ("IP", "Logged in from 2001:db8:85a3::8a2e:370:7334 at night", "2001:db8:85a3::8a2e:370:7334"),
    (
        "ADDRESS",
        "I live at 1600 Pennsylvania Avenue NW, Washington, DC 20500.",
        "1600 Pennsylvania Avenue NW, Washington, DC 20500",
    ),
    ("ADDRESS", "Rechnungsadresse: Hauptstraße 5, 10115 Berlin", "Hauptstraße 5, 10115 Berlin"),
    ("GOV_ID", "SSN 536-22-8740", "536-22-8740"),
    ("GOV_ID", "National Insurance number: AB 12 34 56 C", "AB 12 34 56 C"),
    ("GOV_ID", "Steuer-ID: 36574261809", "36574261809"),
    ("GOV_ID", "passport number X1234567", "X1234567"),
    ("NAME", "Hi, my name is Sarah Johnson and I can't log in.", "Sarah Johnson"),
    ("NAME", "Dear Mr. Thompson, thanks for the quick reply.", "Thompson"),
    ("NAME", "Best regards,\nJean-Luc Moreau", "Jean-Luc Moreau"),
    ("NAME", "Please add Anna Schmidt to the project.", "Anna Schmidt"),
]

NEGATIVES = [
    "My order number is 4155552671 and it hasn't shipped.",  # phone-shaped order number
    "Order #123-456-7890 was charged twice.",
    "The meeting is on 2024-03-15 at 10:30.",  # dates
    "We paid 1.299,00 € on 03.04.2024",
    "It costs $1,299.00 per year, or €12.50 monthly.",  # prices
    "Upgrade to version 10.2.14 or 3.11.7 of the desktop app.",  # versions
    "version 1.2.3.4 of the plugin",  # a version shaped like an IPv4 address
    "Order 4111 1111 1111 1112 did not arrive.",  # fails Luhn
    "Serial number 1234 5678 9012 3456",  # no card network starts with 1
    "Device MAC 00:1A:2B:3C:4D:5E",
    "The SKU GB12ABCD is out of stock.",
    "Does the 2 Way Sync work with Google Calendar?",
    "Will this work on the Free plan?",  # first names that are ordinary words
    "May I get a refund for last month?",
    "I live in Austin and work in Paris.",
    "The logo file is called logo@2x.png, is that the right size?",
    "Go to Settings > Billing > Invoices and download the PDF.",
]


@pytest.mark.parametrize(("kind", "text", "entity"), POSITIVES)
def test_positives_are_found_with_their_type(kind: str, text: str, entity: str) -> None:
    found = [(e.type, e.text) for e in find_entities(text)]
    assert (kind, entity) in found
    assert entity not in scrub(text) and f"<{kind}>" in scrub(text)


@pytest.mark.parametrize("text", NEGATIVES)
def test_tricky_negatives_are_left_alone(text: str) -> None:
    assert find_entities(text) == []
    assert scrub(text) == text


def test_spans_point_into_the_text_and_scrub_is_idempotent() -> None:
    text = (
        "Hi, I'm Laura Bianchi (laura.bianchi@gmail.com, +39 347 123 4567). Refund to "
        "IT60 X054 2811 1010 0000 0123 456 or card 5555 5555 5555 4444; "
        "I'm at 10 Downing St, London SW1A 2AA."
    )
    entities = find_entities(text)
    assert [e.type for e in entities] == ["NAME", "EMAIL", "PHONE", "IBAN", "CARD", "ADDRESS"]
    assert all(text[e.start : e.end] == e.text for e in entities)
    assert all(a.end <= b.start for a, b in itertools.pairwise(entities))
    once = scrub(text)
    assert scrub(once) == once
    assert (
        once
        == "Hi, I'm <NAME> (<EMAIL>, <PHONE>). Refund to <IBAN> or card <CARD>; I'm at <ADDRESS>."
    )


def test_scrubber_options() -> None:
    text = "mail support@lumen.example or me at +49 30 901820"
    assert Scrubber(types=["EMAIL"]).scrub(text) == "mail <EMAIL> or me at +49 30 901820"
    allow = public_allowlist(
        (ROOT / "prompts" / "knowledge" / "lumen.md").read_text(encoding="utf-8")
    )
    assert Scrubber(allow=allow).scrub(text) == "mail support@lumen.example or me at <PHONE>"
    with pytest.raises(ValueError, match="types must be among"):
        Scrubber(types=["SSN"])
    with pytest.raises(TypeError, match="text must be a str"):
        find_entities(None)  # type: ignore[arg-type]
    assert scrub("") == ""


def test_cli_scrub_reads_stdin() -> None:
    from chatbot.cli import app

    runner = CliRunner()
    plain = runner.invoke(app, ["scrub"], input="I'm Anna Schmidt, card 4111 1111 1111 1111\n")
    assert plain.exit_code == 0 and plain.output == "I'm <NAME>, card <CARD>\n"
    out = runner.invoke(app, ["scrub", "--json"], input="ping me: anna@example.org")
    payload = json.loads(out.output)
    assert payload["scrubbed"] == "ping me: <EMAIL>"
    assert payload["entities"] == [
        {"type": "EMAIL", "start": 9, "end": 25, "text": "anna@example.org"}
    ]
    assert runner.invoke(app, ["scrub", "--type", "nope"], input="x").exit_code == 2


CORPORA = [
    "pii_corpus.jsonl",
    "pii_heldout.jsonl",
    "pii_secrets.jsonl",
    "pii_secrets_heldout.jsonl",
]


def test_corpora_cover_every_type() -> None:
    seen = {
        ent["type"]
        for corpus in CORPORA
        for line in (ROOT / "bench" / "data" / corpus).read_text(encoding="utf-8").splitlines()
        for ent in json.loads(line)["entities"]
    }
    assert seen == set(ENTITY_TYPES)


@pytest.mark.parametrize("corpus", CORPORA)
def test_corpus_recall_and_precision(corpus: str) -> None:
    """The shipped corpora (bench/scrubber.py prints the table): every type found, little noise."""
    rows = [
        json.loads(line)
        for line in (ROOT / "bench" / "data" / corpus).read_text(encoding="utf-8").splitlines()
    ]
    gold = predicted = hit_gold = hit_pred = 0
    for row in rows:
        found = find_entities(row["text"])
        spans = []
        for ent in row["entities"]:
            start = row["text"].index(ent["text"])
            spans.append((ent["type"], start, start + len(ent["text"])))
        gold += len(spans)
        predicted += len(found)
        hit_gold += sum(
            any(f.type == t and f.start < e and s < f.end for f in found) for t, s, e in spans
        )
        hit_pred += sum(
            any(f.type == t and f.start < e and s < f.end for t, s, e in spans) for f in found
        )
    assert hit_gold / gold >= 0.95
    assert hit_pred / predicted >= 0.95
