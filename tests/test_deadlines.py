"""L{dmq_bus.deadlines.Deadlines}: expiry on lookup, and a sweep that keeps it bounded."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dmq_bus.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def test_countsUntilItsTime(self) -> None:
        """A key counts before its time, not at or after it, and is then gone."""
        deadlines: Deadlines[str] = Deadlines()
        deadlines.set("a", 10.0, now=0.0)
        self.assertEqual(deadlines.get("a", 9.99), 10.0)
        self.assertIsNone(deadlines.get("a", 10.0))
        self.assertEqual(len(deadlines), 0)
        self.assertIsNone(deadlines.get("never", 0.0))

    def test_setAgainMovesTheDeadline(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        deadlines.set("a", 10.0, now=0.0)
        deadlines.set("a", 30.0, now=5.0)
        self.assertEqual(deadlines.get("a", 20.0), 30.0)

    def test_pop(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        deadlines.set("a", 10.0, now=0.0)
        deadlines.pop("a")
        deadlines.pop("absent")
        self.assertIsNone(deadlines.get("a", 1.0))

    def test_boundedByKeysWithinOneDelay(self) -> None:
        """
        Keys set one a second with a 10 s delay, never looked up again:
        100,000 of them leave at most a few times 10 (or the first sweep's
        size) held, not 100,000.
        """
        deadlines: Deadlines[int] = Deadlines()
        largest = 0
        for second in range(100_000):
            deadlines.set(second, second + 10.0, now=float(second))
            largest = max(largest, len(deadlines))
        self.assertLessEqual(largest, Deadlines.FIRST_SWEEP)
        self.assertEqual(deadlines.get(99_999, 99_999.0), 100_009.0)

    def test_unexpiredKeysAllKept(self) -> None:
        """The sweep drops only expired keys: 1,000 live ones all stay."""
        deadlines: Deadlines[int] = Deadlines()
        for key in range(1000):
            deadlines.set(key, 1e9, now=0.0)
        self.assertEqual(len(deadlines), 1000)
        self.assertTrue(all(deadlines.get(key, 1.0) == 1e9 for key in range(1000)))
