"""
The scheduler: picks queued messages whose time has come and delivers them
(DESIGN sections 1, 5 and 6; Postfix's qmgr is the model).

  - The spool tells the scheduler about each newly committed message, so
    it is attempted at once; the in-memory index is rebuilt from the spool
    at startup, and a periodic sweep is only a safety net.
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
"""

from __future__ import annotations

import heapq
import random as randomModule
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.bounce import RecipientStatus, makeDSN, shouldBounce
from relayd.delivery import RecipientResult
from relayd.metrics import NO_METRICS, NoMetrics
from relayd.routing import RoutingError
from relayd.spool import arrivalFromQueueId, envelopeRecord

__all__ = ["Scheduler", "backoff"]

log = Logger(namespace="relayd.qmgr")

FINAL = ("delivered", "failed")


def backoff(attempts: int, initial: float, maximum: float, rng: randomModule.Random) -> float:
    """
    Seconds to wait before the next attempt after C{attempts} attempts:
    C{initial}, doubling each time, capped at C{maximum}, then +-10% jitter
    so that messages deferred together do not all come back together.
    """
    delay = min(initial * (2 ** max(attempts - 1, 0)), maximum)
    return float(delay * rng.uniform(0.9, 1.1))


class Scheduler(Service):
    """
    Delivers what the spool holds.

    @ivar attempts: number of delivery attempts started (for tests).
    @ivar metrics: where delivery outcomes are counted (L{relayd.metrics});
        by default nowhere.
    """

    def __init__(
        self,
        *,
        spool: Any,
        router: Any,
        deliverer: Any,
        clock: Any,
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
        self._timer: Any = None
        self._sweep: LoopingCall | None = None
        self._running = False
        self._ready: Deferred[None] | None = None

    # --- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._running = True
        self.spool.addQueueObserver(self._queued)
        self._ready = self.spool.scan().addCallbacks(self._indexed, self._scanFailed)
        self._sweep = LoopingCall(self._kick)
        self._sweep.clock = self.clock
        self._sweep.start(self.sweepInterval, now=False)

    def stopService(self) -> Deferred[None]:
        """
        Stop starting deliveries; let the ones in flight finish, for at most
        L{stopDeadline} seconds, then cut their connections: their
        recipients are recorded as deferred and tried again after restart.
        """
        super().stopService()
        self._running = False
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        inFlight = list(self._inFlight.values())
        if not inFlight:
            return self.deliverer.stop().addCallback(lambda _: None)  # type: ignore[no-any-return]
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
            return self.deliverer.stop()

        d.addCallback(finished)
        return d.addCallback(lambda _: None)

    def whenIndexed(self) -> Deferred[None]:
        """Fires once the startup index of the spool is built (for tests)."""
        assert self._ready is not None
        d: Deferred[None] = Deferred()
        self._ready.addBoth(lambda r: (d.callback(None), r)[1])
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
        From the in-memory index, never the disk (for L{relayd.metrics}):
        the queued messages by spool state, and when the oldest arrived
        (read from its queue id, which starts with the time it was made).
        """
        counts: dict[str, int] = {}
        for state in self._state.values():
            counts[state] = counts.get(state, 0) + 1
        oldest = min(self._state) if self._state else None
        return counts, arrivalFromQueueId(oldest) if oldest is not None else None

    def _queued(self, queueId: str, record: dict[str, Any] | None) -> None:
        """The spool committed a new message: attempt it now."""
        self._schedule(queueId, "incoming", self.clock.seconds())
        self._kick()

    # --- the index -----------------------------------------------------------

    def _schedule(self, queueId: str, state: str, when: float) -> None:
        self._state[queueId] = state
        self._when[queueId] = when
        if when != float("inf"):
            self._sequence += 1
            heapq.heappush(self._due, (when, self._sequence, queueId))

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
        d = self._attempt(queueId)
        self._inFlight[queueId] = d

        def done(result: Any) -> None:
            self._inFlight.pop(queueId, None)
            if isinstance(result, Failure):
                log.failure("{queue_id}: delivery attempt failed", result, queue_id=queueId)
            self._kick()

        d.addBoth(done)

    # --- operator control (relayctl, relayd.control) ---------------------------

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
        state = self._state[queueId]
        del self._when[queueId]
        try:
            record = yield self.spool.read(queueId, state)
        except Exception:
            log.failure("{queue_id}: cannot read envelope in {state}", queue_id=queueId, state=state)
            self._state.pop(queueId, None)
            return
        if state != "active":
            # Not fsync'd: after a crash, active/ goes back to incoming/ anyway.
            yield self.spool.move(queueId, state, "active", durable=False)
            self._state[queueId] = "active"
        try:
            yield self._deliver(queueId, record)
        except Exception:
            # Keep the message: retry later with what its envelope on disk
            # says.  If even recording that fails (a full disk), leave it in
            # active/ and come back to it there: never drop it from the index.
            log.failure("{queue_id}: attempt failed; will retry", queue_id=queueId)
            when = self.clock.seconds() + self.retryInitial
            try:
                onDisk = yield self.spool.read(queueId, "active")
                onDisk["next_attempt"] = when
                yield self.spool.update(queueId, "active", onDisk, "deferred")
            except Exception:
                log.failure("{queue_id}: cannot reschedule on disk; retrying from active/",
                            queue_id=queueId)
                self._schedule(queueId, "active", when)
            else:
                self._schedule(queueId, "deferred", when)

    @inlineCallbacks
    def _deliver(self, queueId: str, record: dict[str, Any]) -> Any:
        sender = record["sender"]
        waiting = [r for r in record["recipients"] if r["state"] not in FINAL]
        outcomes: dict[str, tuple[RecipientResult, Any]] = {}

        byDomain: dict[str, list[str]] = {}
        for r in waiting:
            domain = r["address"].rpartition("@")[2].lower() or self.hostname.lower()
            byDomain.setdefault(domain, []).append(r["address"])

        groups: dict[str, tuple[Any, list[str]]] = {}
        for domain, addresses in byDomain.items():
            try:
                destination = yield self.router.route(domain)
            except RoutingError as e:
                status = "failed" if e.permanent else "deferred"
                for address in addresses:
                    code = 550 if e.permanent else 451
                    outcomes[address] = (
                        RecipientResult(address, status, code, e.enhanced, e.text, None), None
                    )
                continue
            groups.setdefault(destination.key, (destination, []))[1].extend(addresses)

        calls = []
        for key, (destination, addresses) in groups.items():
            semaphore = self._semaphores.setdefault(key, DeferredSemaphore(self.perDestination))
            d = semaphore.run(
                self.deliverer.deliver,
                destination,
                sender,
                addresses,
                self.spool.dataPath(queueId),
                record.get("size", 0),
                queueId=queueId,
            )
            calls.append(d)
        results = yield DeferredList(calls, consumeErrors=True)
        for ok, result in results:
            if not ok:
                log.failure("{queue_id}: deliverer failed", result, queue_id=queueId)
                continue
            for r in result.results:
                outcomes[r.recipient] = (r, result)

        now = self.clock.seconds()
        record["attempts"] = record.get("attempts", 0) + 1
        expired = now - record["arrival"] >= self.lifetime
        newlyFailed = []
        for r in waiting:
            outcome = outcomes.get(r["address"])
            if outcome is None:
                # No answer at all (deliverer crashed): try again later.
                result = RecipientResult(r["address"], "deferred", 451, "4.3.0", "internal error", None)
                attempt = None
            else:
                result, attempt = outcome
            reply = f"{result.code} {result.enhanced} {result.text}".strip()
            r["last_reply"] = reply
            r["status"] = result.enhanced
            r["remote"] = result.remoteHost
            r["attempts"] = r.get("attempts", 0) + 1
            r["last_attempt"] = now
            if result.status == "deferred" and expired:
                r["state"] = "failed"
                r["expired"] = True
            else:
                r["state"] = result.status
            self._logRecipient(queueId, r, result, attempt, now - record["arrival"], expired)
            if r["state"] == "failed":
                newlyFailed.append(r)

        if newlyFailed:
            yield self._bounce(queueId, record, newlyFailed, "failed", now)
        stillWaiting = [r for r in record["recipients"] if r["state"] not in FINAL]
        if (
            stillWaiting
            and self.delayWarning > 0
            and not record.get("delay_warned")
            and now - record["arrival"] >= self.delayWarning
        ):
            yield self._bounce(queueId, record, stillWaiting, "delayed", now)
            record["delay_warned"] = True

        if stillWaiting:
            when = now + backoff(record["attempts"], self.retryInitial, self.retryMax, self.random)
            when = min(when, record["arrival"] + self.lifetime) if not expired else when
            record["next_attempt"] = when
            yield self.spool.update(queueId, "active", record, "deferred")
            self._schedule(queueId, "deferred", when)
            log.info(
                "{queue_id}: deferred, {count} recipients left, next attempt in {delay:.0f}s",
                queue_id=queueId,
                count=len(stillWaiting),
                delay=when - now,
            )
        else:
            yield self.spool.remove(queueId, "active")
            self._state.pop(queueId, None)
            log.info("{queue_id}: removed", queue_id=queueId)

    def _logRecipient(
        self, queueId: str, r: dict[str, Any], result: RecipientResult, attempt: Any,
        delay: float, expired: bool,
    ) -> None:
        hop = getattr(attempt, "hop", None)
        relay = f"{hop.host}[{hop.address}]:{hop.port}" if hop is not None else "none"
        status = {"delivered": "sent", "failed": "bounced", "deferred": "deferred"}[r["state"]]
        tls = getattr(attempt, "tls", None)
        # With the hop's TLS mode "verify" a session only gets this far
        # once the certificate matched the host name (relayd.client).
        verified = tls is not None and getattr(hop, "tls", None) == "verify"
        log.info(
            "{queue_id}: to=<{to}>, relay={relay}, delay={delay:.1f}, tls={tls}{tls_trust}, "
            "status={status} ({reply}){expired}",
            queue_id=queueId,
            to=r["address"],
            relay=relay,
            relay_host=getattr(hop, "host", None),
            relay_address=getattr(hop, "address", None),
            relay_port=getattr(hop, "port", None),
            delay=delay,
            tls=tls or "none",
            tls_verified=verified,
            tls_trust="" if tls is None else " (verified)" if verified else " (unverified)",
            status=status,
            code=result.code,
            enhanced=result.enhanced,
            reply=r["last_reply"],
            remote_host=result.remoteHost,
            attempts=r.get("attempts"),
            expired=" (delivery time expired)" if expired and r.get("expired") else "",
        )
        self.metrics.deliveryAttempt(status, delay if status == "sent" else None)

    @inlineCallbacks
    def _bounce(
        self, queueId: str, record: dict[str, Any], recipients: list[dict[str, Any]],
        action: str, now: float,
    ) -> Any:
        """
        Commit a DSN about C{recipients} to the sender (or the postmaster
        for a bounce of a bounce, if configured); never bounce a bounce to
        the null sender.  The DSN is durable before the caller records the
        recipients as final, so a crash can repeat a DSN but not lose one.
        """
        sender = record["sender"]
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
            enhanced = r.get("status") or ("4.4.7" if action == "delayed" else "5.0.0")
            if r.get("expired"):
                enhanced = "4.4.7"  # RFC 3463: delivery time expired
            if action == "delayed" and not enhanced.startswith("4."):
                enhanced = "4.0.0"
            statuses.append(
                RecipientStatus(
                    address=r["address"],
                    action=action,
                    status=enhanced,
                    remoteMTA=r.get("remote"),
                    diagnostic=r.get("last_reply") if r.get("remote") else None,
                    lastAttempt=r.get("last_attempt"),
                )
            )
        # Reads the original's headers from disk: not on the reactor thread.
        dsn = yield deferToThread(
            makeDSN,
            reportingMTA=self.hostname,
            queueId=queueId,
            sender=sender,
            arrival=record["arrival"],
            now=now,
            recipients=statuses,
            originalPath=self.spool.dataPath(queueId),
            postmaster=None if shouldBounce(sender) else target,
        )
        dsnRecord = envelopeRecord(
            queueId="",
            sender="",
            recipients=[target],
            arrival=now,
            size=len(dsn),
            body="8BITMIME" if any(b > 127 for b in dsn) else "7BIT",
            client="127.0.0.1",
            helo=None,
            user=None,
            listener="bounce",
        )
        bounceId = yield self.spool.submit(dsnRecord, dsn)
        log.info(
            "{queue_id}: sender {action} notification: {bounce_id}",
            queue_id=queueId,
            action="non-delivery" if action == "failed" else "delay",
            bounce_id=bounceId,
        )
