"""
L{relayd.queue.workers.SpoolThreads}: the spool's threads, with results
handed back to the reactor in batches.  Run on the real reactor: the point
is the hand-off between real threads and the reactor thread.
"""

from __future__ import annotations

import threading
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from relayd.queue.workers import SpoolThreads


class SpoolThreadsTests(TestCase):
    def startThreads(self, count: int = 2) -> SpoolThreads:
        threads = SpoolThreads(reactor, count, "test-spool")
        threads.start()
        self.addCleanup(threads.stop)
        return threads

    @defer.inlineCallbacks
    def test_resultOnReactorThread(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """The function runs in another thread; its result fires on the reactor's."""
        threads = self.startThreads()
        seen: list[str] = []

        def work(a: int, b: int) -> int:
            seen.append(threading.current_thread().name)
            return a + b

        fired: list[str] = []
        d = threads.run(work, 2, 3)
        d.addCallback(lambda result: fired.append(threading.current_thread().name) or result)
        result = yield d
        self.assertEqual(result, 5)
        self.assertTrue(seen[0].startswith("test-spool-"))
        self.assertEqual(fired, [threading.main_thread().name])

    @defer.inlineCallbacks
    def test_failure(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """What the function raises fails the Deferred, with that exception."""
        threads = self.startThreads()

        def broken() -> None:
            raise OSError(28, "No space left on device")

        with self.assertRaises(OSError) as raised:
            yield threads.run(broken)
        self.assertEqual(raised.exception.errno, 28)

    @defer.inlineCallbacks
    def test_manyCallsBatched(self) -> defer.Generator[defer.Deferred[object], object, None]:
        """
        Hundreds of calls in flight all fire, each with its own result, and
        the reactor is woken fewer times than there were results: calls
        that finish while a batch waits for the reactor join it.
        """
        threads = self.startThreads(4)
        wakeups = 0
        original = threads._deliver

        def counting() -> None:
            nonlocal wakeups
            wakeups += 1
            original()

        threads._deliver = counting  # type: ignore[method-assign]

        def slow(n: int) -> int:
            time.sleep(0.0005)
            return n * n

        results = yield defer.gatherResults([threads.run(slow, n) for n in range(400)])
        self.assertEqual(results, [n * n for n in range(400)])
        self.assertLess(wakeups, 400)

    def test_stopJoins(self) -> None:
        """stop() lets queued calls finish and ends every thread."""
        threads = SpoolThreads(reactor, 3, "test-stop")
        threads.start()
        done: list[int] = []
        for n in range(10):
            threads.run(lambda n=n: done.append(n) or time.sleep(0.001))
        running = list(threads._threads)
        threads.stop()
        self.assertEqual(sorted(done), list(range(10)))
        self.assertFalse(any(t.is_alive() for t in running))
        self.assertFalse(threads.started)
        with self.assertRaises(RuntimeError):
            threads.run(lambda: None)

    def test_needsAThread(self) -> None:
        with self.assertRaises(ValueError):
            SpoolThreads(reactor, 0, "none")
