"""
Keys with a deadline each (L{Deadlines}): the bookkeeping of "not again
before" rules (held-back nodes, rate limits), bounded by the keys set
within one delay rather than by every key ever set. Used by the bus and
by peers alike; it depends on nothing.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)


class Deadlines(Generic[_K]):
    """
    Keys that each count until a clock time, then are as good as absent.
    An expired key is deleted when it is looked up, and every expired one
    when the dict has doubled since the last sweep (amortised O(1)): keys
    never looked up again do not pile up. It holds about the keys set
    within one delay, whatever the number ever set.
    """

    FIRST_SWEEP = 64
    """Keys held before the first sweep."""

    def __init__(self) -> None:
        self._until: dict[_K, float] = {}
        self._sweepAt = self.FIRST_SWEEP

    def __len__(self) -> int:
        return len(self._until)

    def set(self, key: _K, until: float, now: float) -> None:
        """C{key} counts until clock time C{until}; C{now} is the clock's time."""
        entries = self._until
        entries[key] = until
        if len(entries) >= self._sweepAt:
            for expired in [k for k, end in entries.items() if end <= now]:
                del entries[expired]
            self._sweepAt = max(self.FIRST_SWEEP, 2 * len(entries))

    def get(self, key: _K, now: float) -> float | None:
        """The time until which C{key} counts, or None when absent or over."""
        until = self._until.get(key)
        if until is not None and until <= now:
            del self._until[key]
            return None
        return until

    def pop(self, key: _K) -> None:
        """Forget C{key}."""
        self._until.pop(key, None)


__all__ = ["Deadlines"]
