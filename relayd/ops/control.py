"""
The control service: the running relayd's end of the control channel with
C{relayctl}, Twisted AMP over a UNIX socket (C{[control] socket}, by
default C{control.sock} in the spool directory).

  - The socket is created with mode 0600 under a umask of 0177, so it is
    never, even for a moment, open to anyone but the relayd user (root gets
    in anyway); on Linux the daemon also checks each client's credentials
    (C{SO_PEERCRED}) and hangs up on any other user.
  - The commands are in L{relayd.ops.commands}, the blocking client
    C{relayctl} uses in L{relayd.ops.controlclient}.
  - Changes to the queue go through the daemon only: it takes a message
    out of the scheduler's index before it moves or removes its files, and
    refuses to touch a message while an attempt to deliver it is under way
    (its envelope is being rewritten by that attempt).  Reads work without
    the daemon too, from the spool directly (L{relayd.ops.queueview}):
    they never write.

Every event about a message is logged with its queue id, like the rest of
relayd.

The names of the other three modules stay importable from here, as they
were before the split.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayd.config import CONTROL_SOCKET_NAME
from relayd.interfaces import IQueue
from relayd.ops.commands import (
    ACTIONS,
    ControlError,
    DestinationList,
    DestinationResume,
    DestinationSuspend,
    QueueBounce,
    QueueChange,
    QueueFlush,
    QueueList,
    QueueRequeue,
    QueueShow,
    Reload,
    Status,
    TLSReport,
    reachablePath,
)
from relayd.ops.controlclient import ControlClient, ControlClientError, NotRunning
from relayd.ops.logs import Logger
from relayd.ops.queueview import (
    MessageNotFound,
    countStates,
    findMessage,
    matches,
    readMessage,
    readQueue,
    showMessage,
    summarize,
)
from relayd.queue.record import QUEUE_ID

if TYPE_CHECKING:
    # relayd.service builds this service: only the annotations name it.
    from relayd.queue.scheduler import Scheduler
    from relayd.service import RelaydService

__all__ = [
    "BUSY",
    "ControlService",
    "ControlSocketError",
    # Re-exported from relayd.ops.commands, controlclient and queueview:
    "ControlError",
    "ControlClient",
    "ControlClientError",
    "NotRunning",
    "Status",
    "QueueList",
    "QueueShow",
    "QueueFlush",
    "QueueChange",
    "Reload",
    "ACTIONS",
    "QUEUE_ID",
    "readQueue",
    "findMessage",
    "countStates",
    "readMessage",
    "showMessage",
    "MessageNotFound",
    "matches",
    "summarize",
    "QueueBounce",
    "QueueRequeue",
    "DestinationSuspend",
    "DestinationResume",
    "DestinationList",
    "TLSReport",
]

log = Logger(namespace="relayd.ops.control")

BUSY = "being delivered right now; not changed (try again once the attempt is over)"
"""The answer for a message an attempt is delivering (see the module docstring)."""


class ControlSocketError(Exception):
    """The control socket cannot be set up: startup stops with one line."""


def _peerUid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket, if known."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = transport.getHandle().getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", raw)[1])


class ControlProtocol(amp.AMP):
    """One relayctl connection: answers the commands of this module."""

    def __init__(self, service: ControlService) -> None:
        amp.AMP.__init__(self)
        self.service = service

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's: it logs every connection at info level.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        uid = _peerUid(self.transport)
        if uid is not None and uid not in (0, os.geteuid()):
            log.warn("refused a control connection from uid {uid}", uid=uid)
            cast(Any, self.transport).abortConnection()
            return
        log.debug("relayctl connected (uid {uid})", uid=uid)
        self.service.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.service.connections.discard(self)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @Status.responder
    def status(self) -> Deferred[dict[str, Any]]:
        return self.service.status().addCallback(lambda status: {"status": status})

    @QueueList.responder
    def queueList(self, after: str, limit: int) -> Deferred[dict[str, Any]]:
        return self.service.queueList(after, limit)

    @QueueShow.responder
    def queueShow(self, queueId: str, body: bool) -> Deferred[dict[str, Any]]:
        return self.service.queueShow(queueId, body)

    @QueueFlush.responder
    def queueFlush(self, queueIds: list[str] | None) -> Deferred[dict[str, Any]]:
        return self.service.flush(queueIds).addCallback(lambda results: {"results": results})

    @QueueChange.responder
    def queueChange(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> Deferred[dict[str, Any]]:
        return self.service.change(action, queueIds, sender, recipient).addCallback(
            lambda results: {"results": results}
        )

    @Reload.responder
    def reload(self) -> Deferred[dict[str, Any]]:
        return self.service.reload()

    @QueueBounce.responder
    def queueBounce(self, queueIds: list[str]) -> Deferred[dict[str, Any]]:
        return self.service.bounce(queueIds).addCallback(lambda results: {"results": results})

    @QueueRequeue.responder
    def queueRequeue(self, queueIds: list[str] | None) -> Deferred[dict[str, Any]]:
        return self.service.requeue(queueIds).addCallback(lambda results: {"results": results})

    @DestinationSuspend.responder
    def destinationSuspend(self, domain: str) -> Deferred[dict[str, Any]]:
        return self.service.suspend(domain).addCallback(lambda changed: {"changed": changed})

    @DestinationResume.responder
    def destinationResume(self, domain: str) -> Deferred[dict[str, Any]]:
        return self.service.resume(domain)

    @DestinationList.responder
    def destinationList(self) -> dict[str, Any]:
        return {"domains": self.service.suspendedDomains()}

    @TLSReport.responder
    def tlsReport(self, domain: str) -> Deferred[dict[str, Any]]:
        return self.service.tlsReport(domain).addCallback(lambda counts: {"counts": counts})


class _ControlFactory(ServerFactory):
    noisy = False

    def __init__(self, service: ControlService) -> None:
        self.service = service

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.service)


class ControlService(Service):
    """
    Listens on the control socket while relayd runs and carries out what
    C{relayctl} asks (see the module docstring).

    It is the last child of the service tree: it starts once the spool holds
    its lock (so a socket file left by a crash can only be stale, and is
    replaced) and stops first.

    @ivar path: the socket's path.
    @ivar startedAt: when the service started (seconds since the epoch).
    @ivar connections: the relayctl connections open now.
    """

    def __init__(self, top: RelaydService, spool: IQueue, reactor: Any) -> None:
        """
        @param top: the L{relayd.service.RelaydService}: its config,
            listeners, scheduler and C{reload}.
        @param spool: the L{relayd.queue.spool.Spool}, to move and remove messages.
        @param reactor: provides C{listenUNIX} and C{seconds}.
        """
        self.top = top
        self.spool = spool
        self.reactor = reactor
        self.path: str = top.config.controlSocket or os.path.join(
            spool.directory, CONTROL_SOCKET_NAME
        )
        self.startedAt: float | None = None
        self.connections: set[ControlProtocol] = set()
        self._port: Any = None
        self._fd: int | None = None
        self._lock = DeferredLock()

    # Service

    def startService(self) -> None:
        """
        Replace a stale socket, then listen with mode 0600.

        @raise ControlSocketError: the path is not a socket, another process
            listens on it, or it cannot be bound.
        """
        bindPath, self._fd = reachablePath(self.path)
        try:
            self._removeStale(bindPath)
            # bind() creates the file with the umask's permissions before
            # Twisted chmods it: a umask of 0177 leaves no such moment.
            # Nothing else creates files at this point of startup.
            old = os.umask(0o177)
            try:
                self._port = self.reactor.listenUNIX(bindPath, _ControlFactory(self), mode=0o600)
            except CannotListenError as e:
                raise ControlSocketError(f"cannot listen on {self.path}: {e.socketError}") from None
            finally:
                os.umask(old)
        except BaseException:
            self._closeFd()
            raise
        self.startedAt = self.reactor.seconds()
        log.info("control socket listening on {path}", path=self.path)
        Service.startService(self)

    def _removeStale(self, bindPath: str) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlSocketError(f"{self.path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(bindPath)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(bindPath)
            log.info("removed stale control socket {path}", path=self.path)
            return
        except OSError as e:
            raise ControlSocketError(f"cannot check {self.path}: {e.strerror or e}") from None
        finally:
            probe.close()
        raise ControlSocketError(f"{self.path} is in use by another process (another relayd?)")

    def _closeFd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def stopService(self) -> Deferred[None]:
        """Stop listening (the socket file is removed) and hang up on relayctl."""
        Service.stopService(self)
        for protocol in list(self.connections):
            cast(Any, protocol.transport).abortConnection()
        port, self._port = self._port, None
        return Deferred.fromCoroutine(self._stopListening(port))

    async def _stopListening(self, port: Any) -> None:
        try:
            if port is not None:
                await port.stopListening()
        finally:
            # After the socket file is gone: it may be reached through _fd.
            self._closeFd()

    # Commands

    @property
    def scheduler(self) -> Scheduler | None:
        return self.top.scheduler

    def _indexed(self) -> Deferred[None]:
        """Fires once the scheduler knows the whole queue (at once without one)."""
        if self.scheduler is None:
            return succeed(None)
        d: Deferred[None] = self.scheduler.whenIndexed()
        return d

    def status(self) -> Deferred[dict[str, Any]]:
        """See L{Status}."""
        top = self.top
        config = top.config
        listeners: list[dict[str, Any]] = []
        for factory, listener in zip(top.factories, config.listeners, strict=False):
            address = None
            try:
                host = top.getServiceNamed(f"listener:{listener.name}").port.getHost()
                address = f"{host.host}:{host.port}"
            except (KeyError, AttributeError):
                pass
            listeners.append(
                {
                    "name": listener.name,
                    "mode": listener.mode,
                    "endpoint": listener.endpoint,
                    "address": address,
                    "connections": len(factory.sessions),
                }
            )
        # With receivers, the connections are theirs: each one's count as of
        # its latest metrics snapshot (a few seconds old at most).
        pool = getattr(top, "receivers", None)
        byName = {one["name"]: one for one in listeners}
        for child in pool.children.values() if pool is not None else ():
            for (_, labels), value in child.metrics.get("relayd_connections_open", {}).items():
                one = byName.get(dict(labels).get("listener"))
                if one is not None:
                    one["connections"] += int(value)
        status: dict[str, Any] = {
            "version": _version(),
            "pid": os.getpid(),
            "config": config.path,
            "started": self.startedAt,
            "now": self.reactor.seconds(),
            "listeners": listeners,
            "connections": sum(one["connections"] for one in listeners),
            "connection_limit": config.maxConnections,
            "delivery": self.scheduler is not None,
            "delivering": len(self.scheduler.delivering()) if self.scheduler else 0,
            "policies": _chain(top),
            "spool": self.spool.directory,
            "journal": self.spool.journalMode,
        }

        def counted(counts: dict[str, int]) -> dict[str, Any]:
            status["queue"] = counts
            return status

        d: Deferred[dict[str, int]] = deferToThread(countStates, self.spool.directory)
        return d.addCallback(counted)

    def queueList(self, after: str, limit: int) -> Deferred[dict[str, Any]]:
        """See L{QueueList}."""
        d = deferToThread(readQueue, self.spool.directory, after, max(1, min(limit, 10000)))

        def listed(result: tuple[list[dict[str, Any]], bool]) -> dict[str, Any]:
            entries, more = result
            for entry in entries:
                entry["delivering"] = self._delivering(entry["queue_id"])
            return {"entries": entries, "more": more}

        return d.addCallback(listed)

    def _delivering(self, queueId: str) -> bool:
        return self.scheduler is not None and bool(self.scheduler.isDelivering(queueId))

    def queueShow(self, queueId: str, body: bool) -> Deferred[dict[str, Any]]:
        """See L{QueueShow}."""
        directory = self.spool.directory

        def show() -> dict[str, Any]:
            try:
                return showMessage(directory, queueId, body)
            except MessageNotFound as e:
                raise ControlError(str(e)) from None

        def mark(result: dict[str, Any]) -> dict[str, Any]:
            result["entry"]["delivering"] = self._delivering(queueId)
            return result

        d: Deferred[dict[str, Any]] = deferToThread(show)
        return d.addCallback(mark)

    def flush(self, queueIds: list[str] | None) -> Deferred[dict[str, str]]:
        """See L{QueueFlush}."""
        scheduler = self.scheduler
        if scheduler is None:
            raise ControlError(
                "delivery is disabled ([delivery] enabled = false): nothing to flush"
            )

        def flush(_: object) -> dict[str, str]:
            results: dict[str, str] = scheduler.flush(queueIds)
            for queueId, outcome in results.items():
                if outcome == "scheduled":
                    log.info("{queue_id}: flushed by relayctl", queue_id=queueId)
            return results

        return self._indexed().addCallback(flush)

    def change(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> Deferred[list[list[Any]]]:
        """See L{QueueChange}.  One change at a time, message after message."""
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._change(action, queueIds, sender, recipient))
        )

    async def _change(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> list[list[Any]]:
        await self._indexed()
        if queueIds is None:
            entries, _ = await deferToThread(readQueue, self.spool.directory)
            queueIds = [e["queue_id"] for e in entries if matches(e, sender, recipient)]
        results = []
        for queueId in queueIds:
            outcome, ok = await Deferred.fromCoroutine(self._changeOne(action, queueId))
            results.append([queueId, outcome, ok])
        return results

    async def _changeOne(self, action: str, queueId: str) -> tuple[str, bool]:
        """
        Hold, release or delete one message.  The scheduler forgets it first
        (on the reactor thread, so no attempt can start in between), and
        learns its new state after the files have moved.
        """
        if not QUEUE_ID.match(queueId):
            return "not a queue id", False
        scheduler = self.scheduler
        if scheduler is not None and scheduler.isDelivering(queueId):
            return BUSY, False
        indexed = scheduler.withdraw(queueId) if scheduler is not None else None
        state: str | None = None
        when: float | None = indexed[1] if indexed is not None else None
        try:
            found = await deferToThread(findMessage, self.spool.directory, queueId)
            if found is None:
                return "no such message in the queue", False
            state, record = found
            if when is None:
                when = float(record.nextAttempt or self.reactor.seconds())
            if action == "hold":
                if state == "hold":
                    return "already on hold", True
                await self.spool.move(queueId, state, "hold")
                log.info(
                    "{queue_id}: put on hold by relayctl (was {state})",
                    queue_id=queueId,
                    state=state,
                )
                state = "hold"
                return "on hold", True
            if action == "release":
                if state != "hold":
                    return f"not on hold ({state})", True
                state = "deferred" if record.attempts else "incoming"
                await self.spool.move(queueId, "hold", state)
                log.info("{queue_id}: released by relayctl", queue_id=queueId)
                when = None
                return "released", True
            await self.spool.remove(queueId, state, durable=True)
            log.info("{queue_id}: deleted by relayctl (was {state})", queue_id=queueId, state=state)
            state = None
            return "deleted", True
        except Exception as e:
            log.failure("{queue_id}: relayctl {action} failed", queue_id=queueId, action=action)
            return f"{action} failed: {e}", False
        finally:
            if scheduler is not None and state is not None:
                scheduler.reschedule(queueId, state, when)

    def reload(self) -> Deferred[dict[str, Any]]:
        """See L{Reload}."""
        top = self.top

        def reloaded(applied: bool) -> dict[str, Any]:
            return {
                "applied": bool(applied),
                "error": None if applied else (top.reloadError or "see relayd's log"),
                "chain": _chain(top),
            }

        d: Deferred[bool] = top.reload()
        return d.addCallback(reloaded)

    # Commands of the queue tools (relayctl queue bounce/requeue, destination)

    def _needScheduler(self, what: str) -> Any:
        if self.scheduler is None:
            raise ControlError(f"delivery is disabled ([delivery] enabled = false): {what}")
        return self.scheduler

    def bounce(self, queueIds: list[str]) -> Deferred[list[list[Any]]]:
        """See L{QueueBounce}.  One change at a time, message after message."""
        scheduler = self._needScheduler("no bounce can be sent")
        if not isinstance(queueIds, list):
            raise ControlError("give the queue ids to bounce")
        return self._lock.run(lambda: Deferred.fromCoroutine(self._bounceAll(scheduler, queueIds)))

    async def _bounceAll(self, scheduler: Any, queueIds: list[str]) -> list[list[Any]]:
        await self._indexed()
        results = []
        for queueId in queueIds:
            outcome, ok = await Deferred.fromCoroutine(self._bounceOne(scheduler, queueId))
            results.append([queueId, outcome, ok])
        return results

    async def _bounceOne(self, scheduler: Any, queueId: str) -> tuple[str, bool]:
        """
        Bounce one message: withdrawn from the schedule first (as in
        L{_changeOne}); if the bounce fails half-way the message is put
        back wherever it is now, and the next attempt carries on.
        """
        if not QUEUE_ID.match(queueId):
            return "not a queue id", False
        if scheduler.isDelivering(queueId):
            return BUSY, False
        indexed = scheduler.withdraw(queueId)
        try:
            found = await deferToThread(findMessage, self.spool.directory, queueId)
        except Exception as e:
            if indexed is not None:
                scheduler.reschedule(queueId, indexed[0], indexed[1])
            return f"bounce failed: {e}", False
        if found is None:
            if indexed is not None:
                scheduler.reschedule(queueId, indexed[0], indexed[1])
            return "no such message in the queue", False
        state = found[0]
        try:
            count = await scheduler.administrativeBounce(queueId, state, self.reactor.seconds())
        except Exception as e:
            log.failure("{queue_id}: relayctl bounce failed", queue_id=queueId)
            again = await deferToThread(findMessage, self.spool.directory, queueId)
            if again is not None:
                scheduler.reschedule(queueId, again[0], None)
            return f"bounce failed: {e}", False
        log.info(
            "{queue_id}: bounced by relayctl (was {state}, {count} recipients)",
            queue_id=queueId,
            state=state,
            count=count,
        )
        return f"bounced ({count} recipients)", True

    def requeue(self, queueIds: list[str] | None) -> Deferred[dict[str, str]]:
        """See L{QueueRequeue}."""
        scheduler = self._needScheduler("nothing to requeue")

        def requeue(_: object) -> dict[str, str]:
            results: dict[str, str] = scheduler.requeue(queueIds)
            for queueId, outcome in results.items():
                if outcome == "scheduled":
                    log.info("{queue_id}: requeued by relayctl", queue_id=queueId)
            return results

        return self._indexed().addCallback(requeue)

    def _suspensions(self) -> Any:
        from relayd.queue.suspend import Suspensions

        if self.scheduler is not None and self.scheduler.suspensions is not None:
            return self.scheduler.suspensions
        if getattr(self, "_ownSuspensions", None) is None:
            # Delivery disabled: the state is still kept for the next start.
            # A small file, read once (like at startup).
            self._ownSuspensions = Suspensions.load(self.spool.directory)
        return self._ownSuspensions

    def tlsReport(self, domain: str) -> Deferred[list[dict[str, Any]]]:
        """See L{TLSReport}: today's counts, read from the spool in a thread if not in memory."""
        from relayd.delivery.tlsrpt import summarize, utcDay

        counts = self.top.tlsReports
        if counts is None:
            raise ControlError("no TLSRPT counts: MTA-STS and DANE are off or delivery is disabled")
        today = utcDay(self.reactor.seconds())
        d: Deferred[list[dict[str, Any]]] = counts.load(today).addCallback(
            lambda day: summarize(day, domain)
        )
        return d

    def suspendedDomains(self) -> dict[str, Any]:
        """See L{DestinationList}."""
        return dict(self._suspensions().domains)

    def suspend(self, domain: str) -> Deferred[bool]:
        """See L{DestinationSuspend}: written durably (in a thread) before it holds."""
        from relayd.queue.suspend import normalDomain

        try:
            domain = normalDomain(domain)
        except ValueError as e:
            raise ControlError(str(e)) from None
        suspensions = self._suspensions()

        async def suspend() -> bool:
            try:
                changed: bool = await deferToThread(
                    suspensions.suspend, domain, self.reactor.seconds()
                )
            except OSError as e:
                raise ControlError(f"cannot record the suspension: {e}") from None
            if changed:
                log.info("destination {domain} suspended by relayctl", domain=domain)
            return changed

        return self._lock.run(lambda: Deferred.fromCoroutine(suspend()))

    def resume(self, domain: str) -> Deferred[dict[str, Any]]:
        """See L{DestinationResume}: the waiting mail for the domain is flushed."""
        from relayd.queue.suspend import normalDomain

        try:
            domain = normalDomain(domain)
        except ValueError as e:
            raise ControlError(str(e)) from None
        suspensions = self._suspensions()

        async def resume() -> dict[str, Any]:
            try:
                changed: bool = await deferToThread(suspensions.resume, domain)
            except OSError as e:
                raise ControlError(f"cannot record the resumption: {e}") from None
            flushed = 0
            if changed:
                log.info("destination {domain} resumed by relayctl", domain=domain)
            if self.scheduler is not None:
                await self._indexed()
                entries, _ = await deferToThread(readQueue, self.spool.directory)
                ids = [e["queue_id"] for e in entries if matches(e, None, domain)]
                results = self.scheduler.flush(ids) if ids else {}
                flushed = sum(1 for outcome in results.values() if outcome == "scheduled")
            return {"changed": changed, "flushed": flushed}

        return self._lock.run(lambda: Deferred.fromCoroutine(resume()))


def _chain(top: RelaydService) -> list[str]:
    if top.policies is None:
        return []
    # relayd's registry: chain names, whatever the policy objects carry.
    return list(top.policies.chain.names)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relayd")
    except PackageNotFoundError:
        return "unknown"
