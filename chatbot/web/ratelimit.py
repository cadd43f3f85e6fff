"""A per-key sliding-window rate limit for the public surfaces (votes, outcomes API).

In-process: with several replicas each allows the limit, which is enough to
stop a runaway client or script; it is not an accounting mechanism.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateLimitExceeded", "RateLimiter"]


class RateLimitExceeded(Exception):
    """Raised by :meth:`RateLimiter.hit`; the message says the limit and when to retry."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    """At most ``per_minute`` hits per key in any 60-second window.

    >>> limiter = RateLimiter(2, clock=lambda: 0.0)
    >>> limiter.hit("k"); limiter.hit("k")
    >>> limiter.hit("k")
    Traceback (most recent call last):
    ...
    chatbot.web.ratelimit.RateLimitExceeded: more than 2 requests per minute; retry in 60 s
    """

    window_s = 60.0

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError(f"per_minute must be > 0, got {per_minute}")
        self.per_minute = per_minute
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        """Count one request for ``key``; raises :class:`RateLimitExceeded` over the limit."""
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= self.per_minute:
                retry = hits[0] + self.window_s - now
                raise RateLimitExceeded(
                    f"more than {self.per_minute} requests per minute; retry in {retry:.0f} s",
                    retry,
                )
            hits.append(now)
            if len(self._hits) > 10_000:  # forget idle keys so memory stays bounded
                self._hits = {
                    k: v for k, v in self._hits.items() if v and v[-1] > now - self.window_s
                }
