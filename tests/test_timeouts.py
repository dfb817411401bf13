"""
L{relayd.timeouts.IdleTimer}: one timer and a deadline per connection, so
that a sign of life neither cancels a timer nor makes a new one.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from relayd.timeouts import IdleTimer


class IdleTimerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[float] = []
        self.idle = IdleTimer(self.clock, lambda: self.expired.append(self.clock.seconds()))

    def test_expires(self) -> None:
        self.idle.start(10)
        self.clock.advance(9.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [10])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(self.idle.period)

    def test_laterDeadlineKeepsTheTimer(self) -> None:
        """A longer wait keeps the timer; it fires, finds time left, and waits the rest."""
        self.idle.start(10)
        [timer] = self.clock.getDelayedCalls()
        self.clock.advance(5)
        self.idle.start(10)  # now due at 15
        self.assertEqual(self.clock.getDelayedCalls(), [timer])
        self.clock.advance(5)
        self.assertEqual(self.expired, [])
        self.clock.advance(4.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [15])

    def test_earlierDeadlineReplacesTheTimer(self) -> None:
        """
        A shorter limit cancels the timer and makes one due at the new
        deadline, rather than moving the old one (a linear search of the
        reactor's timers).
        """
        self.idle.start(300)
        [first] = self.clock.getDelayedCalls()
        self.idle.start(2)
        [second] = self.clock.getDelayedCalls()
        self.assertFalse(first.active())
        self.assertEqual(second.getTime(), 2)
        self.clock.advance(2)
        self.assertEqual(self.expired, [2])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noLimit(self) -> None:
        """No limit: the timer fires once for nothing; a new wait starts afresh."""
        self.idle.start(3)
        self.idle.start(None)
        self.assertIsNone(self.idle.period)
        self.clock.advance(3)
        self.assertEqual((self.expired, self.clock.getDelayedCalls()), ([], []))
        self.idle.start(1)
        self.assertEqual(self.idle.period, 1)
        self.clock.advance(1)
        self.assertEqual(self.expired, [4])

    def test_restartStartsTheWaitOver(self) -> None:
        self.idle.start(10)
        self.clock.advance(8)
        self.idle.restart()
        self.clock.advance(9)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual(self.expired, [18])

    def test_restartWithoutLimit(self) -> None:
        """A sign of life with no limit kept sets none."""
        self.idle.restart()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.idle.start(5)
        self.idle.start(None)
        self.idle.restart()
        self.clock.advance(100)
        self.assertEqual(self.expired, [])

    def test_stopLeavesNoTimer(self) -> None:
        """Once the connection is gone, no timer holds it."""
        self.idle.start(10)
        self.idle.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual(self.expired, [])
        self.idle.stop()  # twice is harmless
