"""Secrets, dates of birth, lower-case and non-Latin names, profile URLs — and what must stay."""

from __future__ import annotations

import pytest

from optimizer.privacy import find_entities, scrub
from optimizer.privacy_context import looks_random

FOUND = [
    ("SECRET", "my password is Tr0ub4dor&3 and it fails", "Tr0ub4dor&3"),
    ("SECRET", "password: sunshine2024! no luck", "sunshine2024!"),
    ("SECRET", 'my passphrase is "correct horse battery staple"', "correct horse battery staple"),
    ("SECRET", "Mein Passwort ist Sommer2023 und es geht nicht.", "Sommer2023"),
    ("SECRET", "PIN: 4821 for the admin panel", "4821"),
    (
        "SECRET",
        "my key sk-live-4f9aB7cD2eF8gH1jK3mN5pQ7 in case",
        "sk-live-4f9aB7cD2eF8gH1jK3mN5pQ7",
    ),
    ("SECRET", "AWS key AKIAIOSFODNN7EXAMPLE leaked?", "AKIAIOSFODNN7EXAMPLE"),
    (
        "SECRET",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n",
    ),
    (
        "SECRET",
        "DATABASE_URL=postgres://admin:S3cr3tPw@db.internal:5432/prod.",
        "postgres://admin:S3cr3tPw@db.internal:5432/prod",
    ),
    ("SECRET", "pasted: Zq8vN3kLw7YtR2pXm9sB4fHd1jCg6aE", "Zq8vN3kLw7YtR2pXm9sB4fHd1jCg6aE"),
    ("DOB", "Anna Kowalski, born 14/03/1987, needs her data", "14/03/1987"),
    ("DOB", "my birthday is March 5, 1992 if you need it", "March 5, 1992"),
    ("DOB", "Date of birth: 1990-07-22", "1990-07-22"),
    ("NAME", "hi my name is sarah connor and I can't log in", "sarah connor"),
    ("NAME", "my name is kwabena, the invoice is wrong", "kwabena"),
    ("NAME", "我叫王小明，我的账户被锁了", "王小明"),
    ("NAME", "你好，我是李娜，发票有问题", "李娜"),
    ("NAME", "田中さん asked about the Business plan", "田中"),
    ("NAME", "제 이름은 김민준입니다", "김민준"),
    ("NAME", "Меня зовут Дмитрий Иванов, не могу войти", "Дмитрий Иванов"),
    ("NAME", "my name is 陈建国 and I need a refund", "陈建国"),
    ("PROFILE", "see https://www.linkedin.com/in/jane-doe-4b2a19", "jane-doe-4b2a19"),
    ("PROFILE", "find me at facebook.com/marco.rossi.77.", "marco.rossi.77"),
]


@pytest.mark.parametrize(("kind", "text", "expected"), FOUND)
def test_found(kind: str, text: str, expected: str) -> None:
    assert (kind, expected) in [(e.type, e.text) for e in find_entities(text)]
    assert expected not in scrub(text)


KEPT = [
    ("Order ORD-2024-118833 was charged twice", "ORD-2024-118833"),
    ("We're on Lumen Tasks v2.14.3 (build 20240611)", "v2.14.3 (build 20240611)"),
    ("The Business plan is $24.99 per seat, or €1,299.00 a year", "$24.99 per seat, or €1,299.00"),
    ("Lumen Tasks Pro for iOS 17.4.1 crashes", "Lumen Tasks Pro for iOS 17.4.1"),
    ("How do I change my password?", "change my password"),
    ("My password is not accepted after the reset", "not accepted"),
    ("the password reset link never arrives", "password reset link"),
    ("I use the token-based SSO", "token-based SSO"),
    ("workspace 3f2b9c1e-8a7d-4e6f-9b0a-1c2d3e4f5a6b", "3f2b9c1e-8a7d-4e6f-9b0a-1c2d3e4f5a6b"),
    (
        "commit a94a8fe5ccb19ba61f4c4d8731b2f6f0b41d7bb3 broke it",
        "a94a8fe5ccb19ba61f4c4d8731b2f6f0b41d7bb3",
    ),
    ("our renewal date is 2024-09-01", "2024-09-01"),
    ("Our company was born in 2015", "2015"),
    ("my name is on the invoice but spelled wrong", "on the invoice"),
    ("see github.com/lumen-tasks/lumen-cli/issues/42", "lumen-tasks/lumen-cli"),
    ("the export is ProjectPlanner_v2_FINAL_draft.docx", "ProjectPlanner_v2_FINAL_draft.docx"),
    ("SKU LT-PRO-ANNUAL-2024 is missing", "LT-PRO-ANNUAL-2024"),
    ("我是新用户", "新用户"),
]


@pytest.mark.parametrize(("text", "kept"), KEPT)
def test_kept(text: str, kept: str) -> None:
    assert kept in scrub(text)


@pytest.mark.parametrize(
    ("token", "random"),
    [
        ("8fJk2LpQ9xRt4vWz7mNb3cYd6hGs", True),
        ("4eC39HqLyjWDarjtT1zdp7dc", True),
        ("ProjectPlanner_v2_FINAL_draft", False),
        ("report_2024_Q3_final", False),
        ("a94a8fe5ccb19ba61f4c4d8731b2f6f0b41d7bb3", False),
        ("3f2b9c1e-8a7d-4e6f-9b0a-1c2d3e4f5a6b", False),
        ("short1A", False),
    ],
)
def test_looks_random(token: str, random: bool) -> None:
    assert looks_random(token) is random
