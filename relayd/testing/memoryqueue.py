"""
A queue in memory: what the queue manager (L{relayd.queue.scheduler})
uses of the spool, without the disk, for unit tests of scheduling on a
L{twisted.internet.task.Clock} (DESIGN section 7).

L{MemoryQueue} keeps each message's state (C{incoming}, C{active},
C{deferred}, C{hold}), its L{QueueRecord} and its bytes in dicts, and
answers the scheduler's calls as L{relayd.queue.spool.Spool} does:
C{read}, C{move}, C{update} and C{remove} of a message not in the state
named fail with L{FileNotFoundError}; C{submit} gives a new queue id of the
spool's form and tells the queue observers.  Like the spool's, every
answer comes on a later turn of the reactor (the spool's from its thread
pool), so a test sees the same interleavings; C{reactor=None} answers at
once, for tests that step everything by hand.

One thing it cannot keep in memory: the deliverer and the DSN writer
read the message from a path (L{relayd.queue.record.openData}), so
L{MemoryQueue.queueFile} writes the message's current queue file into the
folder given at construction and returns that path.

What it does not do, on purpose: durability, recovery, corrupt entries,
full disks and failing directories.  Tests of those use the real spool on
a real (or a full tmpfs) file system: C{tests/queue/test_spool.py},
C{tests/queue/test_diskfull.py}.
"""

from __future__ import annotations

import os
import random
import string
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from relayd.ops.logs import Logger
from relayd.queue.record import QUEUED_STATES, QueueRecord, encodeTrailer

__all__ = ["MemoryQueue"]

log = Logger()

_T = TypeVar("_T")

QueueObserver = Callable[[str, QueueRecord | None], None]

_QUEUED = tuple(state.value for state in QUEUED_STATES)


class MemoryQueue:
    """
    The spool as the scheduler sees it, in memory.

    @ivar directory: where L{queueFile} writes queue files.
    @ivar calls: each call the scheduler made, as C{(method, queueId,
        states...)}, for tests that check what was done, not only the end
        state.
    """

    def __init__(self, directory: str, reactor: IReactorTime | None = None) -> None:
        """
        @param directory: a folder for the queue files L{queueFile} writes
            (it is created).
        @param reactor: what the answers are deferred to (the real reactor,
            not the scheduler's L{Clock}); None to answer at once.
        """
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._reactor = reactor
        self._state: dict[str, str] = {}
        self._records: dict[str, QueueRecord] = {}
        self._data: dict[str, bytes] = {}
        self._observers: list[QueueObserver] = []
        self._lastIdTime = 0
        self._random = random.Random()
        self.calls: list[tuple[str, ...]] = []
        self.pending = 0
        """Answers not given yet (the spool's C{_busy})."""

    # --- answering as the spool does ---------------------------------------

    def _answer(self, f: Callable[[], _T]) -> Deferred[_T]:
        """Run C{f} now and give its result (or its exception) later."""
        try:
            result = f()
        except Exception:
            if self._reactor is None:
                return fail()
            failed = fail()
            return self._later(lambda: failed)
        if self._reactor is None:
            return succeed(result)
        return self._later(lambda: succeed(result))

    def _later(
        self, make: Callable[[], Deferred[_T]], then: Callable[[], object] | None = None
    ) -> Deferred[_T]:
        """
        The answer C{make} gives, on a later turn; C{then}, if given, runs
        right after the answer has fired, in the same turn.
        """
        assert self._reactor is not None
        self.pending += 1

        result: Deferred[_T] = Deferred()

        def fire() -> None:
            self.pending -= 1
            make().chainDeferred(result)
            if then is not None:
                then()

        self._reactor.callLater(0, fire)
        return result

    def _where(self, queueId: str, state: str) -> None:
        if self._state.get(queueId) != state:
            raise FileNotFoundError(f"no message {queueId} in {state}")

    # --- what tests and tooling read (blocking in the spool) ---------------

    def entries(self, state: str = "incoming") -> list[str]:
        """The queue ids in C{state}, sorted (that is, by arrival)."""
        if state not in _QUEUED:
            raise ValueError(f"unknown queue state {state!r}")
        return sorted(q for q, s in self._state.items() if s == state)

    def load(self, queueId: str) -> tuple[QueueRecord, str]:
        """The record of a queued message and the path of its queue file."""
        if queueId not in self._state:
            raise KeyError(queueId)
        return self._records[queueId], self.queueFile(queueId, self._state[queueId])

    def readData(self, queueId: str) -> bytes:
        """The bytes of a queued message."""
        if queueId not in self._state:
            raise KeyError(queueId)
        return self._data[queueId]

    def stateOf(self, queueId: str) -> str | None:
        """The state C{queueId} is in, or None once it has left the queue."""
        return self._state.get(queueId)

    # --- the scheduler's view -----------------------------------------------

    def newQueueId(self) -> str:
        """A queue id of the spool's form (time-ordered, so ids sort by arrival)."""
        now = max(time.time_ns() // 1000, self._lastIdTime + 1)
        self._lastIdTime = now
        suffix = "".join(self._random.choices(string.digits + string.ascii_uppercase, k=5))
        return f"{now:013X}{suffix}"

    def addQueueObserver(self, observer: QueueObserver) -> None:
        """Call C{observer(queueId, record)} for each message submitted."""
        self._observers.append(observer)

    def queueFile(self, queueId: str, state: str) -> str:
        """
        Write the queue file of C{queueId} (its bytes, then its record, as
        the spool lays them out) and return its path.  Writes even when
        the message is not in C{state}, as the spool's path exists or not.
        """
        path = os.path.join(self.directory, f"{state}.{queueId}")
        if queueId in self._records:
            record = self._records[queueId]
            data = self._data[queueId]
            with open(path, "wb") as f:
                f.write(data + encodeTrailer(record, len(data)))
        return path

    def read(self, queueId: str, state: str) -> Deferred[QueueRecord]:
        """The record of C{queueId} in C{state}."""
        self.calls.append(("read", queueId, state))

        def read() -> QueueRecord:
            self._where(queueId, state)
            return self._records[queueId]

        return self._answer(read)

    def scan(self) -> Deferred[list[tuple[str, str, float]]]:
        """Every queued message as C{(queueId, state, nextAttempt)}; hold is never due."""

        def scan() -> list[tuple[str, str, float]]:
            return [
                (
                    queueId,
                    state,
                    float("inf")
                    if state == "hold"
                    else float(self._records[queueId].nextAttempt or 0),
                )
                for queueId, state in sorted(self._state.items())
            ]

        return self._answer(scan)

    def listQueued(self) -> Deferred[tuple[dict[str, list[str]], list[tuple[str, str]]]]:
        """The state of each queue id, and no listing problems."""
        return self._answer(lambda: ({q: [s] for q, s in self._state.items()}, []))

    def update(
        self, queueId: str, state: str, record: QueueRecord, newState: str | None = None
    ) -> Deferred[None]:
        """Replace the record of C{queueId}, moving it to C{newState} if given."""
        self.calls.append(("update", queueId, state, newState or state))
        if record.queueId != queueId:
            return fail(ValueError(f"record is not for message {queueId}"))

        def update() -> None:
            if self._state.get(queueId) != newState or newState is None:
                self._where(queueId, state)
            self._records[queueId] = record
            self._state[queueId] = newState or state

        return self._answer(update)

    def move(self, queueId: str, state: str, newState: str, durable: bool = True) -> Deferred[None]:
        """Move C{queueId} from C{state} to C{newState}."""
        self.calls.append(("move", queueId, state, newState))

        def move() -> None:
            self._where(queueId, state)
            self._state[queueId] = newState

        return self._answer(move)

    def remove(self, queueId: str, state: str, durable: bool = False) -> Deferred[None]:
        """Take C{queueId} out of the queue for good."""
        self.calls.append(("remove", queueId, state))

        def remove() -> None:
            self._where(queueId, state)
            del self._state[queueId], self._records[queueId], self._data[queueId]

        return self._answer(remove)

    def submit(self, record: QueueRecord, data: bytes) -> Deferred[str]:
        """
        Queue a message in C{incoming}: the record's C{queueId} and C{size}
        are filled in.  As the spool does once the message is durable, the
        result fires first and the queue observers are told right after it,
        in the same turn; with C{reactor=None} (the result fires before the
        caller can add to it) they are told before it is returned.
        """
        queueId = self.newQueueId()
        record = replace(record, queueId=queueId, size=len(data))
        self.calls.append(("submit", queueId))

        def store() -> None:
            self._state[queueId] = "incoming"
            self._records[queueId] = record
            self._data[queueId] = bytes(data)

        def tell() -> None:
            for observer in list(self._observers):
                try:
                    observer(queueId, record)
                except Exception:
                    log.failure("{queue_id}: queue observer failed", queue_id=queueId)

        def stored() -> Deferred[str]:
            store()
            return succeed(queueId)

        if self._reactor is None:
            store()
            tell()
            return succeed(queueId)
        return self._later(stored, then=tell)

    def __repr__(self) -> str:
        counts: dict[str, Any] = {s: len(self.entries(s)) for s in _QUEUED}
        return f"<MemoryQueue {counts}>"
