"""``flywheel scrub``: replace personal data in text from stdin with typed placeholders."""

from __future__ import annotations

import sys
from dataclasses import asdict

import typer

from optimizer.cli.common import JsonOption, print_json


def scrub(
    as_json: bool = JsonOption,
    types: list[str] = typer.Option(
        None,
        "--type",
        help="Only this type (repeatable): EMAIL, PHONE, CARD, IBAN, IP, ADDRESS, GOV_ID, NAME.",
    ),
) -> None:
    """Read text on stdin, print it with <EMAIL>, <PHONE>, <NAME> … in place of personal data."""
    from optimizer.cli.common import fail
    from optimizer.privacy import SCRUBBER_VERSION, Scrubber

    try:
        scrubber = Scrubber(types=[t.upper() for t in types] if types else None)
    except ValueError as exc:
        fail(str(exc), 2)
    text = sys.stdin.read()
    if as_json:
        entities = scrubber.find(text)
        print_json(
            {
                "scrubbed": scrubber.scrub(text),
                "entities": [asdict(e) for e in entities],
                "scrubber_version": SCRUBBER_VERSION,
            }
        )
        return
    sys.stdout.write(scrubber.scrub(text))
