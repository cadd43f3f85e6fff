"""Few-shot flywheel: the example bank, its selection strategies, mining and credit."""

from __future__ import annotations

from optimizer.fewshot.bank import BankExample, ExampleBank, example_hash
from optimizer.fewshot.credit import CreditResult, ExampleCredit, credit_examples
from optimizer.fewshot.mining import MiningResult, mine_examples
from optimizer.fewshot.proposal import Proposal, propose_challenger
from optimizer.fewshot.selection import ExampleSelector

__all__ = [
    "BankExample",
    "CreditResult",
    "ExampleBank",
    "ExampleCredit",
    "ExampleSelector",
    "MiningResult",
    "Proposal",
    "credit_examples",
    "example_hash",
    "mine_examples",
    "propose_challenger",
]
