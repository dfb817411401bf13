"""
The spool's threads: blocking file work (fsync, rename, read, unlink) off
the reactor thread, at the lowest cost per call (issue 14).

Twisted's C{ThreadPool} hands each call to a worker through a pure-Python
C{queue.Queue} (a C{Condition} notified under the GIL) and each result
back with its own C{callFromThread}, one write to the reactor's waker pipe
each.  With several spool calls per message, that hand-off was the largest
single item in the receivers' and the queue manager's profiles (py-spy:
C{Condition.notify} 13-16% of the time the reactor thread held the GIL).
Here a call goes in through a C{queue.SimpleQueue} (implemented in C) and
results come back in batches: a worker that finishes a call while an
earlier result still waits for the reactor adds to that batch instead of
waking the reactor again.

The contract is C{deferToThreadPool}'s: L{SpoolThreads.run} returns a
Deferred that fires on the reactor thread with the function's result or
its failure.  Functions run in the order they were queued when there is
one thread; with several, concurrently (each fsync waits for the disk on
its own, as with the pool this replaces).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["GroupSync", "SpoolThreads", "freshError"]

_STOP = None


def freshError(error: OSError) -> OSError:
    """
    A copy of C{error} for one more thread to raise: threads raising one
    instance would share (and rewrite) its traceback.
    """
    return OSError(error.errno, error.strerror, error.filename)


class SpoolThreads:
    """
    A fixed set of plain threads taking calls from one C{SimpleQueue}.

    @ivar name: the threads' name prefix (seen in py-spy and C{/proc}).
    @ivar count: how many threads run.
    """

    def __init__(self, reactor: Any, count: int, name: str) -> None:
        if count < 1:
            raise ValueError("SpoolThreads needs at least one thread")
        self.name = name
        self.count = count
        self._reactor = reactor
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._results: list[tuple[Deferred[Any], bool, Any]] = []
        self._scheduled = False

    @property
    def started(self) -> bool:
        """Whether the threads run (between L{start} and L{stop})."""
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads."""
        if self._threads:
            return
        for index in range(self.count):
            thread = threading.Thread(target=self._work, name=f"{self.name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """
        Let every queued call finish, then end and join the threads.  Call
        it once nothing is queued any more (the spool waits until it is
        idle), like C{ThreadPool.stop}: it blocks until they end.
        """
        threads, self._threads = self._threads, []
        for _ in threads:
            self._calls.put(_STOP)
        for thread in threads:
            thread.join()

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in a thread.

        @return: a Deferred firing on the reactor thread with the result,
            or failing with what C{f} raised.
        """
        if not self._threads:
            raise RuntimeError(f"{self.name}: threads not started")
        d: Deferred[Any] = Deferred()
        self._calls.put((d, f, args))
        return d

    def _work(self) -> None:
        """A thread: run calls until told to stop."""
        calls = self._calls
        while True:
            call = calls.get()
            if call is _STOP:
                return
            d, f, args = call
            try:
                result = f(*args)
            except BaseException:
                self._post(d, False, Failure())
            else:
                self._post(d, True, result)
            del call, d, f, args

    def _post(self, d: Deferred[Any], ok: bool, value: Any) -> None:
        """
        In a thread: hand a result to the reactor, waking it only when no
        earlier result is already waiting for it.
        """
        with self._lock:
            self._results.append((d, ok, value))
            if self._scheduled:
                return
            self._scheduled = True
        self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """On the reactor thread: fire every Deferred whose call finished."""
        with self._lock:
            results, self._results = self._results, []
            self._scheduled = False
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)


class GroupSync:
    """
    Group commit of one directory's entries across threads: each thread
    that renamed a file into the directory calls L{sync}, which returns
    once an fsync of the directory that I{began after} that call has
    succeeded.  While one fsync runs, the callers arriving meanwhile wait
    and share the next one: under load a handful of renames pay for one
    directory fsync, and an idle spool pays one per message, as before.

    @ivar count: how many fsyncs ran (for tests and statistics).
    """

    def __init__(self, path: str, fsync: Callable[[str], None]) -> None:
        self.path = path
        self.count = 0
        self._fsync = fsync
        self._cond = threading.Condition()
        self._issued = 0
        self._done = 0
        self._running = False
        # [first, last, error, waiters]: tickets first..last were covered
        # by an fsync that failed; kept until each of the waiters (all of
        # them but the thread that ran it) has seen it.
        self._failed: list[list[Any]] = []

    def sync(self) -> None:
        """
        Make every rename into the directory that happened before this
        call durable.  Blocking: call from a spool thread.

        @raise OSError: when the fsync that covered this call failed (the
            caller must undo its rename: the entry may or may not be on
            disk).
        """
        with self._cond:
            self._issued += 1
            ticket = self._issued
            while self._done < ticket and self._running:
                self._cond.wait()
            if self._done >= ticket:
                self._raiseIfFailed(ticket)
                return
            self._running = True
            first, last = self._done + 1, self._issued
        error: OSError | None = None
        try:
            self._fsync(self.path)
        except OSError as e:
            error = e
        with self._cond:
            self.count += 1
            self._running = False
            self._done = last
            if error is not None and last > first:
                # every ticket of first..last but this thread's waits
                self._failed.append([first, last, error, last - first])
            self._cond.notify_all()
        if error is not None:
            raise error

    def _raiseIfFailed(self, ticket: int) -> None:
        """Under the lock: raise the error of the failed fsync covering C{ticket}."""
        for entry in self._failed:
            first, last, error, _ = entry
            if first <= ticket <= last:
                entry[3] -= 1
                if not entry[3]:
                    self._failed.remove(entry)
                raise freshError(error)
