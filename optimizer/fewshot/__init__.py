"""Few-shot flywheel: the example bank, its selection strategies, mining and credit."""

from __future__ import annotations

from optimizer.fewshot.selection import ExampleSelector

__all__ = ["ExampleSelector"]
