"""Work-arounds for Chainlit behaviour that costs the chat server capacity.

Installed once per process by :func:`install` (``create_app`` does it). Each
says what it replaces, why it is safe, and the upstream fix we would propose.

**The 1 ms stall in ``Message`` and ``Step`` constructors.** Chainlit 2.x
calls ``time.sleep(0.001)`` in ``Message.__init__`` and ``Step.__init__`` —
on the event loop, so the whole server stops for a millisecond or more (1.6 ms
measured on a busy 2-core machine) three times per chat turn: the user's
message, the ``on_message`` run step and the reply. At 100 turns per second
that is a third of the loop's time spent asleep, for every user at once. The
sleep keeps the timestamps of steps made one after another apart (their
``createdAt`` orders a thread). :func:`install` makes the two modules' ``sleep``
skip exactly that stall and gives Chainlit a ``utc_now`` that is strictly
increasing within the process, which is the guarantee the sleep bought.

Upstream fix we would propose: remove the sleeps and make
``chainlit.utils.utc_now`` monotonic (as here), or order steps by a sequence
number instead of wall-clock time. (Chainlit PR #1374 proposed async
constructors with ``asyncio.sleep``; it was closed unmerged.)
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import types
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MonotonicClock", "install"]

#: The constructors' stall; longer sleeps (none today) are left alone.
_STALL_S = 0.001


class MonotonicClock:
    """Chainlit's ``utc_now`` (naive UTC in ISO format with a ``Z``), strictly increasing.

    Two calls in the same microsecond get distinct, ordered times: the second
    is one microsecond later.

    >>> clock = MonotonicClock()
    >>> first, second = clock(), clock()
    >>> first < second and first.endswith("Z")
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = datetime.min

    def __call__(self) -> str:
        now = datetime.now(UTC).replace(tzinfo=None)
        with self._lock:
            if now <= self._last:
                now = self._last + timedelta(microseconds=1)
            self._last = now
        return now.isoformat(timespec="microseconds") + "Z"


class _TimeWithoutStall(types.ModuleType):
    """The ``time`` module as ``chainlit.message`` and ``chainlit.step`` see it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds > _STALL_S:
            time.sleep(seconds)


_installed = False


def install() -> bool:
    """Apply the work-arounds (idempotent); False, with a warning, if Chainlit changed shape."""
    global _installed
    if _installed:
        return True
    # By module name: ``chainlit.step`` as an attribute is the ``@step`` decorator.
    message, step, emitter = (
        importlib.import_module(f"chainlit.{name}") for name in ("message", "step", "emitter")
    )
    stalled = (message, step)
    if not all(getattr(m, "time", None) is time for m in stalled) or not all(
        hasattr(m, "utc_now") for m in (*stalled, emitter)
    ):
        log.warning(
            "Chainlit's Message/Step modules changed; the 1 ms constructor stall is left as is"
        )
        return False
    clock = MonotonicClock()
    for module in stalled:
        module.time = _TimeWithoutStall("time")  # type: ignore[attr-defined]
    for module in (*stalled, emitter):
        module.utc_now = clock  # type: ignore[attr-defined]
    _installed = True
    return True
