"""Pick the few-shot examples for a turn according to the arm's strategy.

``none`` → no examples; ``fixed`` → the arm's listed example ids in order;
``retrieved`` → the ``k`` examples most similar (TF-IDF cosine) to the user's
message among the approved ones.
"""

from __future__ import annotations

import threading

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from optimizer.config import ArmConfig
from optimizer.errors import ConfigError
from optimizer.prompts import Example, PromptLibrary

__all__ = ["ExampleSelector"]


class ExampleSelector:
    """Select examples for an arm and a user message.

    >>> from optimizer.prompts import load_prompts
    >>> sel = ExampleSelector(load_prompts("prompts"))
    >>> [e.id for e in sel.select(ArmConfig(id="x", prompt="concise", fewshot="retrieved", k=1), "reset my password")]
    ['password-reset']
    """

    def __init__(self, library: PromptLibrary) -> None:
        self.library = library
        self._lock = threading.Lock()
        self._pool: list[Example] = []
        self._vectorizer: TfidfVectorizer | None = None
        self._matrix: object | None = None

    def candidates(self) -> list[Example]:
        """Examples retrieval may return (approved ones)."""
        return list(self.library.examples.values())

    def _index(self) -> tuple[list[Example], TfidfVectorizer, object]:
        with self._lock:
            if self._vectorizer is None:
                self._pool = self.candidates()
                self._vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
                self._matrix = self._vectorizer.fit_transform([e.user for e in self._pool] or [""])
            return self._pool, self._vectorizer, self._matrix

    def select(self, arm: ArmConfig, user_message: str) -> list[Example]:
        if arm.fewshot == "none":
            return []
        if arm.fewshot == "fixed":
            missing = [i for i in arm.examples if i not in self.library.examples]
            if missing:
                raise ConfigError(f"arm {arm.id!r}: unknown example ids {missing}")
            return [self.library.examples[i] for i in arm.examples]
        pool, vectorizer, matrix = self._index()
        if not pool:
            return []
        scores = (matrix @ vectorizer.transform([user_message]).T).toarray().ravel()  # type: ignore[attr-defined]
        order = np.argsort(-scores, kind="stable")[: arm.k]
        return [pool[i] for i in order]
