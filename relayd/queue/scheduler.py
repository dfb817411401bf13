"""
The scheduler: picks queued messages whose time has come and delivers them
(DESIGN sections 1, 5 and 6; Postfix's qmgr is the model).

  - The spool tells the scheduler about each newly committed message, so
    it is attempted at once; the in-memory index is rebuilt from the spool
    at startup, and a periodic sweep is only a safety net: every
    C{sweepInterval} it lists the spool's directories (in the spool's
    threads, names only) and schedules again any message the index lost,
    logged and counted as stuck.
  - The index is a heap of (next attempt, queue id): the work per tick is
    O(log n) in the number of due messages, never a directory scan.
  - Recipients of one message are grouped by destination (L{Destination.key}),
    so one transaction carries every recipient that shares a next hop.
  - Limits: a global number of messages in delivery, and a per-destination
    number of connections, so that one slow domain cannot starve the others.
  - After an attempt, the per-recipient states are written durably (and any
    DSN committed) before the message is removed or rescheduled, so a
    restart repeats no delivered recipient and forgets no pending one.
  - Retries back off exponentially with jitter; when the lifetime runs out
    the remaining recipients bounce; an optional delay warning is sent once.
  - When the spool fails (a read, a move, writing the outcome: EACCES,
    EROFS, ENOSPC), the message stays scheduled and backs off like a
    deferral; outcomes that could not be written stay in memory, so no
    recipient known to be delivered is sent to again while the process
    lives (after a restart, at-least-once allows a duplicate).  Each
    failure is one log line and a count (L{relayd.ops.metrics}).
"""

from __future__ import annotations

import heapq
import random as randomModule
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from relayd.delivery import requiretls
from relayd.delivery.attempt import RecipientResult
from relayd.delivery.bounce import RecipientStatus, makeDSN, noticeRecord, shouldBounce
from relayd.delivery.client import Reply as RemoteReply
from relayd.delivery.endpoint import relayName
from relayd.delivery.routing import RoutingError
from relayd.interfaces import IDeliverer, IQueue, IRouter
from relayd.ops.logs import Logger
from relayd.ops.metrics import NO_METRICS, NoMetrics
from relayd.queue.record import QueueRecord, QueueState, RecipientRecord, RecipientState, evolve
from relayd.queue.spool import arrivalFromQueueId
from relayd.queue.suspend import Suspensions, SuspensionsError, readSuspended
from relayd.reply import Reply
from relayd.smtp.dsn import DSNParameters, wants

__all__ = ["Scheduler", "backoff"]

log = Logger(namespace="relayd.qmgr")

_COMMITTED_KEPT = 10000
"""At most this many envelopes of this process's own commits are kept for
their first attempt (L{Scheduler._committed}); past it, a burst's messages
are read back from disk like a receiver's."""


def backoff(attempts: int, initial: float, maximum: float, rng: randomModule.Random) -> float:
    """
    Seconds to wait before the next attempt after C{attempts} attempts:
    C{initial}, doubling each time, capped at C{maximum}, then +-10% jitter
    so that messages deferred together do not all come back together.
    """
    delay = min(initial * (2 ** max(attempts - 1, 0)), maximum)
    return float(delay * rng.uniform(0.9, 1.1))


def _remoteReply(r: RecipientRecord) -> Reply | None:
    """
    The next hop's last reply about C{r}, as delivery recorded it
    (C{"550 5.1.1 text"}), or None when there is none or it was relayd's.
    """
    if not r.remote or not r.lastReply or not r.lastReply[:3].isdigit():
        return None
    return RemoteReply.parse([r.lastReply])


class Scheduler(Service):
    """
    Delivers what the spool holds.

    @ivar attempts: number of delivery attempts started (for tests).
    @ivar metrics: where delivery outcomes are counted (L{relayd.ops.metrics});
        by default nowhere.
    """

    tlsPolicies: Any = None
    """
    The recipient domains' TLS policies for MX delivery: an
    L{relayd.delivery.mtasts.MTASTSPolicies} (set by the service when
    C{[delivery] mta_sts} is on), or None.
    """

    tlsReports: Any = None
    """
    Where the TLS sessions of MX deliveries are counted for TLSRPT (RFC
    8460): a L{relayd.delivery.tlsrpt.TLSReportCounts} (set by the
    service when MTA-STS or DANE is on), or None.
    """

    def __init__(
        self,
        *,
        spool: IQueue,
        router: IRouter,
        deliverer: IDeliverer,
        clock: IReactorTime,
        hostname: str,
        concurrency: int = 100,
        perDestination: int = 20,
        retryInitial: float = 300.0,
        retryMax: float = 4200.0,
        lifetime: float = 5 * 86400.0,
        delayWarning: float = 4 * 3600.0,
        sweepInterval: float = 60.0,
        postmaster: str | None = None,
        random: randomModule.Random | None = None,
        stopDeadline: float = 30.0,
        metrics: NoMetrics = NO_METRICS,
    ) -> None:
        self.spool = spool
        self.router = router
        self.deliverer = deliverer
        self.clock = clock
        self.hostname = hostname
        self.concurrency = concurrency
        self.perDestination = perDestination
        self.retryInitial = retryInitial
        self.retryMax = retryMax
        self.lifetime = lifetime
        self.delayWarning = delayWarning
        self.sweepInterval = sweepInterval
        self.postmaster = postmaster
        self.random = random or randomModule.Random()
        self.stopDeadline = stopDeadline
        self.metrics = metrics
        self.attempts = 0
        self._due: list[tuple[float, int, str]] = []
        self._when: dict[str, float] = {}
        self._state: dict[str, str] = {}
        self._inFlight: dict[str, Deferred[None]] = {}
        self._semaphores: dict[str, DeferredSemaphore] = {}
        self._sequence = 0
        self._timer: IDelayedCall | None = None
        self._sweep: LoopingCall | None = None
        self._running = False
        self._ready: Deferred[None] | None = None
        # Envelopes newer than their copy on disk: outcomes not yet durable.
        self._unrecorded: dict[str, QueueRecord] = {}
        # Envelopes this process committed to incoming/ and has not yet
        # attempted: the first attempt takes them instead of reading the
        # file back (a receiver process's messages are read as before).
        self._committed: dict[str, QueueRecord] = {}
        # Spool failures in a row, per message: how far the next try backs off.
        self._troubles: dict[str, int] = {}
        # Taken out of the schedule by an operator (withdraw) and not yet back.
        self._withdrawn: set[str] = set()
        # Destinations an operator suspended (relayd.queue.suspend), if any:
        # set by the service after construction.
        self.suspensions: Suspensions | None = None
        # While a sweep's listing runs: the messages changed since it began,
        # whose state on disk the listing may no longer tell.
        self._touched: set[str] | None = None
        self._listing: Deferred[Any] | None = None

    # --- service -----------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._running = True
        self._loadSuspensions()
        self.spool.addQueueObserver(self._queued)
        self._ready = self.spool.scan().addCallbacks(self._indexed, self._scanFailed)
        self._sweep = LoopingCall(self._sweepNow)
        self._sweep.clock = self.clock
        self._sweep.start(self.sweepInterval, now=False)

    def stopService(self) -> Deferred[None]:
        """
        Stop starting deliveries; let the ones in flight finish, for at most
        L{stopDeadline} seconds, then cut their connections: their
        recipients are recorded as deferred and tried again after restart.
        """
        Service.stopService(self)
        self._running = False
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        inFlight = list(self._inFlight.values())
        if not inFlight:
            self._warnUnrecorded()
            return self.deliverer.stop()
        log.info(
            "shutdown: waiting up to {deadline}s for {count} deliveries in flight",
            deadline=self.stopDeadline,
            count=len(inFlight),
        )
        d: Deferred[Any] = DeferredList(inFlight, consumeErrors=True)

        def late() -> None:
            log.warn(
                "shutdown: deadline reached; aborting {count} deliveries in flight",
                count=len(self._inFlight),
            )
            self.deliverer.abort()

        timer = self.clock.callLater(self.stopDeadline, late)

        def finished(_: Any) -> Any:
            if timer.active():
                timer.cancel()
            self._warnUnrecorded()
            return self.deliverer.stop()

        d.addCallback(finished)
        return d.addCallback(lambda _: None)

    def _warnUnrecorded(self) -> None:
        """
        Name the messages whose outcomes only memory held (the spool would
        not take them): after the restart they are attempted from their
        older envelope on disk.
        """
        for queueId in sorted(self._unrecorded):
            log.warn(
                "{queue_id}: stopping with delivery outcomes the spool did not record; "
                "recipients already delivered may get the message again",
                queue_id=queueId,
            )

    def whenIndexed(self) -> Deferred[None]:
        """Fires once the startup index of the spool is built (for tests)."""
        assert self._ready is not None
        d: Deferred[None] = Deferred()

        def ready(result: object) -> object:
            d.callback(None)
            return result

        self._ready.addBoth(ready)
        return d

    def _indexed(self, entries: list[tuple[str, str, float]]) -> None:
        for queueId, state, when in entries:
            if queueId not in self._state:
                self._schedule(queueId, state, when)
        log.info("index rebuilt: {count} queued messages", count=len(entries))
        self._kick()

    def _scanFailed(self, failure: Failure) -> None:
        log.failure("could not index the spool", failure)

    def queueSummary(self) -> tuple[dict[str, int], float | None]:
        """
        From the in-memory index, never the disk (for L{relayd.ops.metrics}):
        the queued messages by spool state, and when the oldest arrived
        (read from its queue id, which starts with the time it was made).
        """
        counts: dict[str, int] = {}
        for state in self._state.values():
            counts[state] = counts.get(state, 0) + 1
        oldest = min(self._state) if self._state else None
        return counts, arrivalFromQueueId(oldest) if oldest is not None else None

    def oldestByState(self) -> dict[str, float]:
        """
        From the in-memory index (for L{relayd.ops.metrics}): when the
        oldest message in each spool state arrived (epoch, from its queue
        id); states without messages are left out.
        """
        oldest: dict[str, str] = {}
        for queueId, state in self._state.items():
            if state not in oldest or queueId < oldest[state]:
                oldest[state] = queueId
        arrivals = {state: arrivalFromQueueId(queueId) for state, queueId in oldest.items()}
        return {state: when for state, when in arrivals.items() if when is not None}

    def stuckMessages(self) -> int:
        """
        How many queued messages had their last spool operation fail (a
        read, a move, writing their outcome) and wait for a retry: mail
        stuck now, for L{relayd.ops.metrics}.
        """
        return len(self._troubles)

    def _queued(self, queueId: str, record: QueueRecord | None) -> None:
        """The spool committed a new message: attempt it now."""
        if record is not None and len(self._committed) < _COMMITTED_KEPT:
            self._committed[queueId] = record
        self._schedule(queueId, "incoming", self.clock.seconds())
        self._kick()

    # --- the index -----------------------------------------------------------

    def _schedule(self, queueId: str, state: str, when: float) -> None:
        self._touch(queueId)
        self._state[queueId] = state
        self._when[queueId] = when
        if when != float("inf"):
            self._sequence += 1
            heapq.heappush(self._due, (when, self._sequence, queueId))

    def _forget(self, queueId: str) -> None:
        """The message has left the queue (or this state): drop what we know."""
        self._touch(queueId)
        self._state.pop(queueId, None)
        self._when.pop(queueId, None)
        self._unrecorded.pop(queueId, None)
        self._committed.pop(queueId, None)
        self._troubles.pop(queueId, None)

    def _touch(self, queueId: str) -> None:
        if self._touched is not None:
            self._touched.add(queueId)

    def _backOff(self, queueId: str) -> float:
        """
        One more spool failure in a row for C{queueId}: the seconds to wait
        before trying it again, growing like a deferral's.
        """
        failures = self._troubles[queueId] = self._troubles.get(queueId, 0) + 1
        return backoff(failures, self.retryInitial, self.retryMax, self.random)

    def _kick(self) -> None:
        """Start every due message the limits allow; arm the timer for the next."""
        if not self._running:
            return
        now = self.clock.seconds()
        while self._due and len(self._inFlight) < self.concurrency:
            when, _, queueId = self._due[0]
            if when > now:
                break
            heapq.heappop(self._due)
            if self._when.get(queueId) != when or queueId in self._inFlight:
                continue  # a stale heap entry
            self._start(queueId)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._due or not self._running or len(self._inFlight) >= self.concurrency:
            return
        delay = max(self._due[0][0] - self.clock.seconds(), 0)
        self._timer = self.clock.callLater(delay, self._kick)

    def _start(self, queueId: str) -> None:
        self.attempts += 1
        self._touch(queueId)
        d = self._attempt(queueId)
        self._inFlight[queueId] = d

        def done(result: Any) -> None:
            self._inFlight.pop(queueId, None)
            self._touch(queueId)
            if isinstance(result, Failure):
                # A bug, not the spool (that is handled in _attempt): keep
                # the traceback, and the message in the schedule.
                log.failure("{queue_id}: delivery attempt failed", result, queue_id=queueId)
                state = self._state.get(queueId)
                if state is not None and queueId not in self._when:
                    self._schedule(queueId, state, self.clock.seconds() + self._backOff(queueId))
            self._kick()

        d.addBoth(done)

    # --- the sweep -------------------------------------------------------------

    def _sweepNow(self) -> None:
        """
        The safety net, every L{sweepInterval}: start what is due, put back
        anything the index holds but has no attempt planned for, and list
        the spool's directories (in the spool's threads, never here) to
        find messages the index lost.  The listing is names only, once per
        interval, and at most one at a time.
        """
        self._kick()
        now = self.clock.seconds()
        for queueId, state in sorted(self._state.items()):
            if queueId not in self._when and queueId not in self._inFlight:
                self._stuck(queueId, state, now)
        if self._listing is not None or not self._running:
            return
        if self._ready is None or not self._ready.called:
            return  # the startup index is still being built: all would look lost
        self._touched = set()
        listing = self._listing = self.spool.listQueued()

        def done(result: Any) -> None:
            self._listing = None
            self._touched = None
            if isinstance(result, Failure):
                if result.check(OSError):
                    log.error("sweep: could not list the spool: {error}", error=result.value)
                else:
                    log.failure("sweep: could not list the spool", result)

        listing.addCallback(self._listed)
        listing.addBoth(done)

    def _listed(self, listing: tuple[dict[str, list[str]], list[tuple[str, str]]]) -> None:
        """
        Compare the spool's directories with the index.  Messages changed
        since the listing began are left to the next sweep: what the
        listing says of them may be out of date already.
        """
        found, problems = listing
        for state, error in problems:
            log.warn("sweep: cannot list {state}/ of the spool: {error}", state=state, error=error)
        if not self._running:
            return
        touched = self._touched or set()
        now = self.clock.seconds()
        lost = []
        for queueId, states in sorted(found.items()):
            if queueId in touched or queueId in self._inFlight or queueId in self._withdrawn:
                continue
            # Two states only after a move that failed half-way: as in the
            # spool's recovery, the one that is not active/ is the newer.
            state = next((s for s in states if s != "active"), states[0])
            known = self._state.get(queueId)
            if known is None:
                lost.append((queueId, state))
            elif known not in states:
                log.warn(
                    "{queue_id}: the schedule had it in {known}, the spool has it in {state}; "
                    "corrected",
                    queue_id=queueId,
                    known=known,
                    state=state,
                )
                when = self._when.get(queueId, now)
                self._schedule(queueId, state, float("inf") if state == "hold" else when)
        # Forget what is kept in memory about messages that are gone.
        for queueId in list(self._unrecorded) + list(self._troubles) + list(self._committed):
            if queueId not in found and queueId not in touched and queueId not in self._state:
                self._forget(queueId)
        self._withdrawn -= {q for q in self._withdrawn if q not in found and q not in touched}
        for queueId, state in lost:
            self._rescue(queueId, state)
        self._kick()

    @inlineCallbacks
    def _rescue(self, queueId: str, state: str) -> Any:
        """A message on disk that the index lost: read when it is due, schedule it."""
        when = self.clock.seconds()
        try:
            record = yield self.spool.read(queueId, state)
            when = float(record.nextAttempt or when)
        except Exception:
            pass  # try it now; the attempt says what is wrong with it
        if (
            not self._running
            or queueId in self._state
            or queueId in self._inFlight
            or queueId in self._withdrawn
        ):
            return  # it came back by itself meanwhile
        self._stuck(queueId, state, when)
        self._kick()

    def _stuck(self, queueId: str, state: str, when: float) -> None:
        """Schedule a message that had no attempt planned; say so."""
        if state == "hold":
            self._schedule(queueId, state, float("inf"))
            return
        when = max(when, self.clock.seconds())
        log.warn(
            "{queue_id}: found in {state} but not in the schedule (stuck); next attempt in "
            "{delay:.0f}s",
            queue_id=queueId,
            state=state,
            delay=when - self.clock.seconds(),
        )
        self.metrics.queueStuck()
        self._schedule(queueId, state, when)

    # --- operator control (relayctl, relayd.ops.control) ---------------------------

    def delivering(self) -> list[str]:
        """The queue ids of the messages being delivered right now."""
        return sorted(self._inFlight)

    def isDelivering(self, queueId: str) -> bool:
        """True while an attempt to deliver C{queueId} is under way."""
        return queueId in self._inFlight

    def withdraw(self, queueId: str) -> tuple[str, float] | None:
        """
        Take a message that is not being delivered out of the schedule, so
        that no attempt starts while an operator moves or removes its files;
        L{reschedule} puts it back.  Check L{isDelivering} first: a message
        in delivery cannot be withdrawn.

        @return: its state and next attempt time as the index had them, or
            None when the index does not know it.
        @raise ValueError: when it is being delivered.
        """
        if queueId in self._inFlight:
            raise ValueError(f"{queueId} is being delivered")
        # Until it is rescheduled, the sweep leaves it alone too.
        self._withdrawn.add(queueId)
        self._touch(queueId)
        # The operator may change its files: read them when it comes back.
        self._committed.pop(queueId, None)
        if queueId not in self._state:
            return None
        return self._state.pop(queueId), self._when.pop(queueId, float("inf"))

    def reschedule(self, queueId: str, state: str, when: float | None = None) -> None:
        """
        Put a message (now in C{state} on disk) into the schedule, to be
        attempted at C{when} (default: now); a message in C{hold} is never
        attempted until it is rescheduled in another state.
        """
        if state == "hold":
            when = float("inf")
        elif when is None:
            when = self.clock.seconds()
        self._withdrawn.discard(queueId)
        self._schedule(queueId, state, when)
        self._kick()

    def flush(self, queueIds: list[str] | None = None) -> dict[str, str]:
        """
        Attempt the given messages (all queued ones when None) now, whatever
        their backoff says (Postfix's C{postqueue -f} and C{-i}); the
        concurrency limits still apply.

        @return: per queue id: C{"scheduled"}, C{"delivering"} (an attempt is
            under way already), C{"hold"} (on hold: release it first) or
            C{"unknown"} (not queued).
        """
        now = self.clock.seconds()
        results = {}
        for queueId in sorted(self._state) if queueIds is None else queueIds:
            state = self._state.get(queueId)
            if queueId in self._inFlight:
                results[queueId] = "delivering"
            elif state is None:
                results[queueId] = "unknown"
            elif state == "hold":
                results[queueId] = "hold"
            else:
                self._schedule(queueId, state, now)
                results[queueId] = "scheduled"
        self._kick()
        return results

    # --- one attempt -----------------------------------------------------------

    @inlineCallbacks
    def _attempt(self, queueId: str) -> Any:
        """
        One attempt at C{queueId}.  Every way out leaves the message either
        gone from the queue or scheduled again: a spool failure backs off
        (L{_spoolFailed}, L{_unrecordable}), never drops it.
        """
        state = self._state[queueId]
        self._when.pop(queueId, None)
        # Outcomes that could not be written are newer than the disk's copy;
        # a message committed here and untouched since is what was written.
        record = self._unrecorded.get(queueId)
        committed = self._committed.pop(queueId, None)
        if record is None and state == "incoming":
            record = committed
        if record is None:
            try:
                record = yield self.spool.read(queueId, state)
            except FileNotFoundError:
                # Deleted, or the index had its state wrong: if it is
                # anywhere else in the spool, the next sweep finds it.
                log.info("{queue_id}: no longer in {state}", queue_id=queueId, state=state)
                self._forget(queueId)
                return
            except Exception as e:
                self._spoolFailed(queueId, state, "read", f"cannot read its envelope in {state}", e)
                return
        if self._allSuspended(record):
            # relayctl destination suspend: nothing to send, so nothing is
            # moved or written; looked at again later, or at once on resume.
            self._schedule(queueId, state, self.clock.seconds() + self.retryInitial)
            return
        if state != "active":
            # Not fsync'd: after a crash, active/ goes back to incoming/ anyway.
            try:
                yield self.spool.move(queueId, state, "active", durable=False)
            except Exception as e:
                self._spoolFailed(
                    queueId, state, "move", f"cannot move it from {state} to active", e
                )
                return
            self._state[queueId] = "active"
        yield self._deliver(queueId, record)

    def _spoolFailed(
        self,
        queueId: str,
        state: str,
        operation: str,
        what: str,
        error: Exception,
    ) -> None:
        """
        A spool operation before delivery failed: nothing was sent, the
        message stays where it is, and is tried again with backoff.  One
        log line, no traceback: the error says it all.
        """
        delay = self._backOff(queueId)
        self.metrics.spoolError(operation)
        log.error(
            "{queue_id}: stuck in {state}: {what}: {error}; next attempt in {delay:.0f}s",
            queue_id=queueId,
            state=state,
            what=what,
            operation=operation,
            error=error,
            delay=delay,
        )
        self._schedule(queueId, state, self.clock.seconds() + delay)

    def _unrecordable(
        self,
        queueId: str,
        record: QueueRecord,
        operation: str,
        error: Exception,
        when: float,
    ) -> None:
        """
        The outcomes of an attempt could not be written (a full or
        read-only spool): keep them in memory, so that the next attempt
        starts from them and no recipient known to be delivered is sent to
        again, and back off until the spool takes them.  The envelope is in
        active/ still (or, after a move that failed half-way, the sweep
        finds where it is).
        """
        self._unrecorded[queueId] = record
        now = self.clock.seconds()
        when = max(when, now + self._backOff(queueId))
        self.metrics.spoolError(operation)
        self.metrics.outcomesUnrecorded()
        log.error(
            "{queue_id}: cannot record the delivery outcome ({operation}): {error}; "
            "kept in memory, next attempt in {delay:.0f}s",
            queue_id=queueId,
            operation=operation,
            error=error,
            delay=when - now,
        )
        self._schedule(queueId, "active", when)

    def _deliver(self, queueId: str, record: QueueRecord) -> Any:
        """
        Send to the recipients still waiting, then record the outcomes.
        A plain chain, not a generator: one per delivered message, and
        C{inlineCallbacks} costs about thirty calls to set up and resume.
        """
        if not record.waiting():
            return self._record(queueId, record)
        d: Deferred[QueueRecord] = self._send(queueId, record)
        return d.addCallback(lambda sent: self._record(queueId, sent))

    @inlineCallbacks
    def _send(self, queueId: str, record: QueueRecord) -> Any:
        """
        Deliver to the recipients still waiting.

        @return: a Deferred firing with the new record: their outcomes,
            the attempt counted, and the next attempt if some are left.
        """
        sender = record.sender
        waiting = record.waiting()
        outcomes: dict[str, tuple[RecipientResult, Any]] = {}

        byDomain: dict[str, list[str]] = {}
        held: set[str] = set()
        for r in waiting:
            domain = r.address.rpartition("@")[2].lower() or self.hostname.lower()
            if self.suspensions is not None and self.suspensions.isSuspended(domain):
                held.add(r.address)  # relayctl destination suspend: not attempted
                continue
            byDomain.setdefault(domain, []).append(r.address)
        if held:
            log.info(
                "{queue_id}: {count} recipients held: their destination is suspended",
                queue_id=queueId,
                count=len(held),
            )
            if len(held) == len(waiting):
                # Nothing attempted: no attempt counted, looked at again
                # after the first retry interval (or at once on resume).
                now = self.clock.seconds()
                return evolve(record, nextAttempt=now + self.retryInitial)

        groups: dict[str, tuple[Any, list[str]]] = {}
        policies: dict[str, Any] = {}
        # Each recipient's destination class, for the per-class metrics.
        classes: dict[str, str] = {}
        for domain, addresses in byDomain.items():
            try:
                destination = yield self.router.route(domain)
            except RoutingError as e:
                status = "failed" if e.permanent else "deferred"
                for address in addresses:
                    code = 550 if e.permanent else 451
                    reply = RemoteReply.local(code, e.enhanced, e.text)
                    outcomes[address] = (RecipientResult(address, status, reply, None), None)
                continue
            if (
                self.tlsPolicies is not None
                and destination.key.startswith("mx:")
                and not record.tlsOptional
            ):
                destination = yield self._applyTLSPolicy(
                    queueId, domain, destination, addresses, outcomes, policies
                )
                if destination is None:
                    continue
            groups.setdefault(destination.key, (destination, []))[1].extend(addresses)
            destinationClass = destinationClassOf(destination.key)
            classes.update((address, destinationClass) for address in addresses)

        dsn = DSNParameters.fromRecord(record)
        calls = []
        for key, (destination, addresses) in groups.items():
            semaphore = self._semaphores.setdefault(key, DeferredSemaphore(self.perDestination))
            d = semaphore.run(
                self.deliverer.deliver,
                destination,
                sender,
                addresses,
                self.spool.queueFile(queueId, QueueState.ACTIVE),
                record.size,
                queueId=queueId,
                dsn=dsn,
                # Only when set, so that a deliverer without the keyword
                # (a test's) still serves every other message.
                **({"requireTLS": True} if record.requireTLS else {}),
                # TLS-Required: No: the deliverer skips DANE (RFC 8689 4.2.2).
                **({"tlsOptional": True} if record.tlsOptional else {}),
                smtputf8=record.smtputf8,
            )
            calls.append(d)
        results: list[tuple[bool, Any]]
        if len(calls) == 1:
            # One destination, the usual case: no DeferredList around it.
            try:
                results = [(True, (yield calls[0]))]
            except Exception:
                results = [(False, Failure())]
        else:
            results = yield DeferredList(calls, consumeErrors=True)
        for ok, result in results:
            if not ok:
                log.failure("{queue_id}: deliverer failed", result, queue_id=queueId)
                continue
            for r in result.results:
                outcomes[r.recipient] = (r, result)
            self._policyTested(queueId, policies, result)
            if self.tlsReports is not None:
                self._countTLS(policies, result)

        now = self.clock.seconds()
        expired = now - record.arrival >= self.lifetime
        recipients = list(record.recipients)
        newlyFailed = []
        relayed = []
        for index, r in enumerate(recipients):
            if r.state.final or r.address in held:
                continue
            outcome = outcomes.get(r.address)
            if outcome is None:
                # No answer at all (deliverer crashed): try again later.
                internal = Reply(451, "4.3.0", "internal error")
                result = RecipientResult(r.address, "deferred", internal, None)
                attempt = None
            else:
                result, attempt = outcome
            expiring = result.status == "deferred" and expired
            r = recipients[index] = evolve(
                r,
                lastReply=f"{result.code} {result.enhanced} {result.text}".strip(),
                status=result.enhanced,
                remote=result.remoteHost,
                attempts=r.attempts + 1,
                lastAttempt=now,
                state=RecipientState.FAILED if expiring else RecipientState(result.status),
                expired=expiring,
                command=result.command,
            )
            policy = policies.get(r.address.rpartition("@")[2].lower() or self.hostname.lower())
            self._logRecipient(
                queueId, r, result, attempt, now - record.arrival, expired, policy=policy
            )
            self._countDestination(r, attempt, classes.get(r.address, "none"), now - record.arrival)
            if r.state == RecipientState.FAILED:
                newlyFailed.append(index)
            elif (
                r.state == RecipientState.DELIVERED
                and wants(r.notify, "SUCCESS")
                and not result.dsnPassed
            ):
                # RFC 3461 section 6.2.3: a next hop without DSN took it,
                # so relayd reports "relayed" itself.
                relayed.append(index)
        record = evolve(record, attempts=record.attempts + 1, recipients=tuple(recipients))

        if relayed:
            try:
                yield self._bounce(
                    queueId, record, [recipients[i] for i in relayed], "relayed", now
                )
            except Exception as e:
                # The recipients are delivered whatever happens to the
                # notice: delivering again to send it would duplicate mail.
                self.metrics.spoolError("bounce")
                log.error(
                    "{queue_id}: cannot queue the success notice: {error}",
                    queue_id=queueId,
                    error=e,
                )

        if newlyFailed:
            try:
                yield self._bounce(
                    queueId, record, [recipients[i] for i in newlyFailed], "failed", now
                )
            except Exception as e:
                # Never final without a durable DSN: they stay queued, and
                # the next attempt bounces them again.
                for i in newlyFailed:
                    recipients[i] = evolve(
                        recipients[i], state=RecipientState.DEFERRED, expired=False
                    )
                record = record.withRecipients(recipients)
                self.metrics.spoolError("bounce")
                log.error(
                    "{queue_id}: cannot queue the non-delivery notice: {error}; "
                    "{count} failed recipients stay queued",
                    queue_id=queueId,
                    error=e,
                    count=len(newlyFailed),
                )
        stillWaiting = record.waiting()
        if (
            stillWaiting
            and self.delayWarning > 0
            and not record.delayWarned
            and now - record.arrival >= self.delayWarning
        ):
            try:
                yield self._bounce(queueId, record, stillWaiting, "delayed", now)
            except Exception as e:
                self.metrics.spoolError("bounce")
                log.error(
                    "{queue_id}: cannot queue the delay notice: {error}; will try again",
                    queue_id=queueId,
                    error=e,
                )
            else:
                record = evolve(record, delayWarned=True)
        if stillWaiting:
            when = now + backoff(record.attempts, self.retryInitial, self.retryMax, self.random)
            when = min(when, record.arrival + self.lifetime) if not expired else when
            record = evolve(record, nextAttempt=when)
        return record

    @inlineCallbacks
    def _record(self, queueId: str, record: QueueRecord) -> Any:
        """
        Write the outcomes durably: the envelope to deferred/ while some
        recipients are left, else the message out of the spool.  When the
        spool refuses, L{_unrecordable} keeps them in memory.
        """
        stillWaiting = record.waiting()
        now = self.clock.seconds()
        if stillWaiting:
            when = float(record.nextAttempt or now)
            try:
                yield self.spool.update(queueId, "active", record, "deferred")
            except Exception as e:
                self._unrecordable(queueId, record, "update", e, when)
                return
            self._unrecorded.pop(queueId, None)
            self._troubles.pop(queueId, None)
            self._schedule(queueId, "deferred", when)
            log.info(
                "{queue_id}: deferred, {count} recipients left, next attempt in {delay:.0f}s",
                queue_id=queueId,
                count=len(stillWaiting),
                delay=when - now,
            )
        else:
            try:
                yield self.spool.remove(queueId, "active")
            except Exception as e:
                self._unrecordable(queueId, record, "remove", e, now)
                return
            self._forget(queueId)
            log.info("{queue_id}: removed", queue_id=queueId)

    def _logRecipient(
        self,
        queueId: str,
        r: RecipientRecord,
        result: RecipientResult,
        attempt: Any,
        delay: float,
        expired: bool,
        policy: Any = None,
    ) -> None:
        hop = getattr(attempt, "hop", None)
        relay = relayName(hop)
        status = {
            RecipientState.DELIVERED: "sent",
            RecipientState.FAILED: "bounced",
            RecipientState.DEFERRED: "deferred",
        }[r.state]
        tls = getattr(attempt, "tls", None)
        # With the hop's TLS mode "verify" a session only gets this far
        # once the certificate matched the host name (relayd.delivery.client).
        # With "dane" (relayd.delivery.dane) it matched a TLSA record.
        verified = tls is not None and getattr(hop, "tls", None) in ("verify", "dane")
        # The published policy applied (DANE, RFC 7672), when one was.
        # The published TLS policy applied: DANE's (RFC 7672) when the
        # attempt used it, as it wins over MTA-STS for its hosts (DESIGN
        # section 6), else the recipient domain's MTA-STS policy (MX
        # delivery with [delivery] mta_sts), e.g. mta-sts:enforce.
        applied = getattr(attempt, "policy", None) or (None if policy is None else policy.label)
        log.info(
            "{queue_id}: to=<{to}>, relay={relay}, delay={delay:.1f}, tls={tls}{tls_trust}, "
            "{policy_text}status={status} ({reply}){expired}",
            queue_id=queueId,
            to=r.address,
            relay=relay,
            relay_host=getattr(hop, "host", None),
            relay_address=getattr(hop, "address", None),
            relay_port=getattr(hop, "port", None),
            delay=delay,
            tls=tls,
            tls_verified=verified,
            tls_trust="" if tls is None else " (verified)" if verified else " (unverified)",
            policy=applied or "none",
            policy_text=f"policy={applied}, " if applied else "",
            status=status,
            code=result.code,
            enhanced=result.enhanced,
            reply=r.lastReply,
            remote_host=result.remoteHost,
            attempts=r.attempts,
            expired=" (delivery time expired)" if expired and r.expired else "",
        )
        self.metrics.deliveryAttempt(status, delay if status == "sent" else None)

    def _countDestination(
        self, r: RecipientRecord, attempt: Any, destinationClass: str, delay: float
    ) -> None:
        """Count one recipient's attempt by destination class and outbound TLS."""
        status = {
            RecipientState.DELIVERED: "sent",
            RecipientState.FAILED: "bounced",
            RecipientState.DEFERRED: "deferred",
        }[r.state]
        self.metrics.destinationDelivery(
            destinationClass, status, delay if status == "sent" else None
        )
        hop = getattr(attempt, "hop", None)
        if hop is None:
            return
        tls = getattr(attempt, "tls", None)
        # As the delivery line: "verify" matched the host name, "dane" a TLSA record.
        verified = hop.tls in ("verify", "dane")
        got = "none" if tls is None else "verified" if verified else "unverified"
        self.metrics.deliveryTLS(str(hop.tls), got)

    @inlineCallbacks
    def _applyTLSPolicy(
        self,
        queueId: str,
        domain: str,
        destination: Any,
        addresses: list[str],
        outcomes: dict[str, tuple[RecipientResult, Any]],
        policies: dict[str, Any],
    ) -> Any:
        """
        Look up C{domain}'s MTA-STS policy and apply it to its MX
        destination (L{relayd.delivery.mtasts.applyTLSPolicy}).

        @return: a Deferred firing with the destination to use, or None
            when the policy leaves no hop (the recipients are deferred,
            with the reason logged and in their outcome).
        """
        from relayd.delivery.mtasts import applyTLSPolicy

        # The key's domain: in A-labels, as DNS is asked (routing).
        policy = yield self.tlsPolicies.lookup(destination.key[len("mx:") :])
        policies[domain] = policy
        applied = applyTLSPolicy(destination, policy)
        for text in applied.wouldFail:
            log.info(
                "{queue_id}: mta-sts testing: {domain}: enforce would have failed: {why}",
                queue_id=queueId,
                domain=domain,
                why=text,
            )
        if applied.refusal is None:
            return applied.destination
        if self.tlsReports is not None:
            from relayd.delivery.tlsrpt import countAttempt, mxMismatch

            sessions = [mxMismatch(hop.host, policy) for hop in destination.hops]
            countAttempt(self.tlsReports, policy.domain or domain, policy, sessions)
        log.info(
            "{queue_id}: deferred by {policy}: {text}",
            queue_id=queueId,
            policy=policy.label,
            text=applied.refusal.text,
        )
        for address in addresses:
            outcomes[address] = (
                RecipientResult(address, "deferred", applied.refusal, None),
                None,
            )
        return None

    def _countTLS(self, policies: dict[str, Any], result: Any) -> None:
        """
        Count the attempt's sessions for TLSRPT (L{relayd.delivery.tlsrpt}):
        those the deliverer reported (in this process or a delivery
        process, whose results carry them here), and under an MTA-STS
        C{testing} policy a session with an MX host the policy does not
        list, as the C{validation-failure} C{enforce} would have made it.
        """
        from relayd.delivery.tlsrpt import countAttempt, mxMismatch

        hop = result.hop
        if not result.results or hop is None:
            return
        domain = result.results[0].recipient.rpartition("@")[2].lower()
        policy = policies.get(domain)
        sessions = list(getattr(result, "sessions", ()))
        if (
            policy is not None
            and policy.kind == "mta-sts"
            and policy.mode == "testing"
            and not policy.matches(hop.host)
            and not any(s.dane for s in sessions)
        ):
            sessions.append(mxMismatch(hop.host, policy, hop.address))
        if not sessions:
            return
        name = policy.domain if policy is not None and policy.domain else domain
        countAttempt(self.tlsReports, name, policy, sessions)

    def _policyTested(self, queueId: str, policies: dict[str, Any], result: Any) -> None:
        """
        Under an MTA-STS C{testing} policy (RFC 8461 section 5), log what
        C{enforce} would have refused about the hop that took the session:
        no TLS, or TLS without a certificate verified for its name.
        """
        hop = result.hop
        if hop is None or not result.results or getattr(result, "policy", None):
            # DANE applied to the hop: it, not MTA-STS, decided (RFC 8461
            # section 2).
            return
        domain = result.results[0].recipient.rpartition("@")[2].lower()
        policy = policies.get(domain)
        if policy is None or policy.kind != "mta-sts" or policy.mode != "testing":
            return
        if not policy.matches(hop.host):
            return  # logged before the attempt
        if getattr(hop, "tlsCheck", False):
            return  # the deliverer checked and logged (mta-sts testing: would have failed)
        lead = "enforce would have failed"
        if result.tls is None:
            why = f"no TLS with {hop.host}[{hop.address}]"
        elif hop.tls != "verify":
            # Testing mode delivers as without a policy, so the session
            # did not check the certificate: say so rather than guess.
            lead = "not checked"
            why = (
                f"TLS with {hop.host}[{hop.address}], its certificate unverified in testing "
                "mode (enforce requires one valid for the MX name)"
            )
        else:
            return
        log.info(
            "{queue_id}: mta-sts testing: {domain}: {lead}: {why}",
            queue_id=queueId,
            domain=domain,
            lead=lead,
            why=why,
        )

    @inlineCallbacks
    def _bounce(
        self,
        queueId: str,
        record: QueueRecord,
        recipients: list[RecipientRecord],
        action: str,
        now: float,
        diagnostic: str | None = None,
    ) -> Any:
        """
        Commit a DSN about C{recipients} to the sender (or the postmaster
        for a bounce of a bounce, if configured); never bounce a bounce to
        the null sender.  The DSN is durable before the caller records the
        recipients as final, so a crash can repeat a DSN but not lose one.
        """
        sender = record.sender
        # RFC 3461 section 4.1: only the notices each recipient asked for
        # (without NOTIFY: failure and delay).
        kind = {"failed": "FAILURE", "delayed": "DELAY", "relayed": "SUCCESS"}[action]
        unwanted = [r.address for r in recipients if not wants(r.notify, kind)]
        if unwanted:
            log.info(
                "{queue_id}: no {action} notice for {recipients}: NOTIFY={notify}",
                queue_id=queueId,
                action=action,
                recipients=", ".join(f"<{a}>" for a in unwanted),
                notify="/".join(
                    sorted({",".join(r.notify or ()) for r in recipients if r.address in unwanted})
                ),
            )
            recipients = [r for r in recipients if r.address not in unwanted]
            if not recipients:
                return
        if action == "relayed" and not shouldBounce(sender):
            return  # a notice about a notice is no one's business
        target = sender if shouldBounce(sender) else self.postmaster
        if not target:
            log.warn(
                "{queue_id}: undeliverable {action} notice for null sender dropped",
                queue_id=queueId,
                action=action,
            )
            return
        statuses = []
        for r in recipients:
            enhanced = r.status or ("4.4.7" if action == "delayed" else "5.0.0")
            if r.expired:
                enhanced = "4.4.7"  # RFC 3463: delivery time expired
            if action == "delayed" and not enhanced.startswith("4."):
                enhanced = "4.0.0"
            if action == "relayed":
                enhanced = enhanced if enhanced.startswith("2.") else "2.0.0"
            reply = _remoteReply(r)
            statuses.append(
                RecipientStatus(
                    address=r.address,
                    action=action,
                    status=enhanced,
                    remoteMTA=r.remote,
                    reply=reply,
                    lastAttempt=r.lastAttempt,
                    command=r.command if reply is not None else None,
                    originalRecipient=r.orcpt,
                    # relayd's own reason, when it has one worth quoting
                    # (an administrative bounce); remote replies win.
                    diagnostic=diagnostic if reply is None else None,
                )
            )
        # Reads the original's headers from disk: not on the reactor thread.
        # Headers only: for a REQUIRETLS original that is also what RFC 8689
        # section 5 wants; never return its body (relayd.delivery.requiretls).
        dsn = yield deferToThread(
            makeDSN,
            reportingMTA=self.hostname,
            queueId=queueId,
            sender=sender,
            arrival=record.arrival,
            now=now,
            recipients=statuses,
            originalPath=self.spool.queueFile(queueId, QueueState.ACTIVE),
            originalSize=record.size,
            postmaster=None if shouldBounce(sender) else target,
            # RFC 3461 section 4.3: RET=FULL returns the message with a
            # failure notice; HDRS, no RET and the other notices the headers.
            # RFC 8689 section 5: never the body of a REQUIRETLS message.
            returnFull=action == "failed" and record.ret == "FULL" and not record.requireTLS,
            envid=record.envid,
        )
        # To an internationalized sender only over SMTPUTF8 (RFC 6531).
        dsnRecord = noticeRecord([target], dsn, now, "bounce")
        dsnRecord = requiretls.bounceRecord(dsnRecord, record)
        bounceId = yield self.spool.submit(dsnRecord, dsn)
        log.info(
            "{queue_id}: sender {action} notification: {bounce_id}",
            queue_id=queueId,
            action={"failed": "non-delivery", "delayed": "delay", "relayed": "success"}[action],
            bounce_id=bounceId,
        )

    # --- operator control, continued (relayctl queue bounce/requeue) ---------

    @inlineCallbacks
    def administrativeBounce(self, queueId: str, state: str, now: float) -> Any:
        """
        Bounce a message on the operator's word (C{relayctl queue bounce}):
        every recipient not yet delivered or failed fails with
        L{ADMIN_BOUNCE} (RFC 3463 5.0.0: no more specific code applies), a
        non-delivery DSN goes to the sender (RFC 3464; to the postmaster
        for a null sender, as for any bounce), then the message leaves the
        queue.  The DSN is durable before the message is removed, so a
        crash can repeat it but not lose it.

        The caller withdraws the message first (L{withdraw}); it is moved
        to C{active/} (where L{_bounce} reads the original's headers).

        @return: a Deferred firing with the number of recipients bounced.
        """
        record = yield self.spool.read(queueId, state)
        if state != "active":
            yield self.spool.move(queueId, state, "active", durable=False)
        recipients = list(record.recipients)
        failed = []
        for index, r in enumerate(recipients):
            if r.state.final:
                continue
            recipients[index] = evolve(
                r,
                state=RecipientState.FAILED,
                status=ADMIN_BOUNCE.enhanced,
                lastReply=str(ADMIN_BOUNCE),
                remote=None,
                lastAttempt=now,
                expired=False,
                command=None,
            )
            failed.append(recipients[index])
        record = record.withRecipients(recipients)
        for r in failed:
            log.info(
                "{queue_id}: to=<{to}>, relay=none, status=bounced ({reply})",
                queue_id=queueId,
                to=r.address,
                reply=r.lastReply,
            )
            self.metrics.deliveryAttempt("bounced", None)
        if failed:
            yield self._bounce(queueId, record, failed, "failed", now, str(ADMIN_BOUNCE))
        yield self.spool.remove(queueId, "active", durable=True)
        self._forget(queueId)
        log.info("{queue_id}: removed", queue_id=queueId)
        return len(failed)

    def requeue(self, queueIds: list[str] | None = None) -> dict[str, str]:
        """
        Re-route messages after a route change (C{relayctl queue requeue},
        Postfix's C{postsuper -r}): the router's cached DNS answers are
        dropped, so that every next attempt resolves its destination
        afresh, and the messages given are attempted now (see L{flush} for
        the outcomes; messages on hold stay on hold).  relayd keeps no
        routing decision in a queue file, so nothing on disk changes.
        """
        forget = getattr(self.router, "forgetLookups", None)
        if forget is not None:  # a test's router may have no cache
            forget()
        for queueId in sorted(self._state) if queueIds is None else queueIds:
            self._troubles.pop(queueId, None)
        return self.flush(queueIds)

    def _loadSuspensions(self) -> None:
        """
        Read the suspended destinations from the spool at startup (a small
        file; startup may block).  An unreadable file is logged and leaves
        the suspensions as they were, rather than stopping relayd.
        """
        if self.suspensions is None:
            return
        try:
            self.suspensions.domains = readSuspended(self.suspensions.directory)
        except SuspensionsError as e:
            log.error("cannot read the suspended destinations: {error}", error=e)
            return
        if self.suspensions.domains:
            log.info(
                "suspended destinations (relayctl destination resume to deliver): {domains}",
                domains=" ".join(sorted(self.suspensions.domains)),
            )

    def _allSuspended(self, record: QueueRecord) -> bool:
        """Are all of the recipients still waiting at suspended destinations?"""
        if self.suspensions is None or not self.suspensions.domains:
            return False
        waiting = record.waiting()
        return bool(waiting) and all(
            self.suspensions.isSuspended(
                r.address.rpartition("@")[2].lower() or self.hostname.lower()
            )
            for r in waiting
        )


ADMIN_BOUNCE = Reply(550, "5.0.0", "message bounced by the administrator")
"""The reply an administrative bounce gives each recipient (in its DSN)."""


def destinationClassOf(key: str) -> str:
    """
    The metrics' destination class of a L{relayd.delivery.routing.Destination}
    key: C{mx} for MX delivery (whatever the domain: one label value, not
    one per domain), C{route:N} for the N-th configured route.
    """
    return "mx" if key.startswith("mx:") else key
