"""
Several receiving processes around one queue manager (DESIGN section 1,
issue 14): Postfix's split of many C{smtpd} processes and one C{qmgr}.

One Twisted process uses one core.  With C{[server] processes = N} above 1
(by default one per core) the process that C{twistd} starts, the I{queue
manager}, binds the listening sockets, recovers the spool and runs the
scheduler and deliveries as before; it starts N I{receivers} (C{python -m
relayd.receivers}), each handed the same listening sockets, and the kernel
gives each new connection to one of them.

The queue manager accepts connections only while no receiver is ready:
until the first one has started, and whenever they have all died (until
one is back), so that mail is received all along.  Otherwise it leaves
them to the receivers, as Postfix's C{qmgr} leaves them to C{smtpd}: its
scheduling, the deliveries' outcomes and the receivers' notices then
never wait behind a client's commands, nor a client behind them
(measured in C{docs/performance.md}).

The spool is the only hand-off, and its one-owner rule becomes one owner
per directory:

  - a receiver creates files in C{tmp/} under names of its own (queue ids
    carry 5 random characters), renames them into C{incoming/} with the
    same commit protocol and fsyncs as ever (L{relayd.queue.spool}), and
    touches nothing else; it neither takes the spool's lock (it only
    holds the queue manager's, below) nor recovers;
  - the queue manager alone moves, updates and removes; startup recovery
    runs before any receiver exists, not even one of a previous run: each
    receiver holds the spool's lock with the queue manager (it inherits
    the locked file on its fd L{SPOOL_LOCK_FD}), so that a queue manager
    started after one that was killed waits until the old receivers,
    which may still be committing, have stopped (L{relayd.queue.spool.Spool}
    C{lockWait}).

After each commit a receiver writes C{queued <id>} on a pipe (its fd 3) to
the queue manager, which attempts the message at once; a notice lost on
the way costs only latency, since the scheduler's sweep lists C{incoming/}
on disk.  The queue manager holds the write end of each receiver's standard
input: when the queue manager dies, even by C{kill -9}, every receiver reads
end of file and stops by itself (gracefully), so no orphan keeps accepting.

Signals: SIGHUP (reload) and SIGTERM (graceful stop) to the queue manager
reach every receiver.  A receiver that dies is started again, with a
growing delay if it keeps dying.  Each receiver logs to the queue manager's
standard output and error, its lines marked C{receiver-N}.

What relayd counts is the whole relayd's, not each process's: the queue
manager keeps the counts for every process, and a receiver asks it
(L{QueueManagerLink}), as Postfix's C{smtpd} asks C{anvil}: the
connection counts of C{[limits]}, before it greets a client
(L{SharedLimits}), and the rate counters kept in memory, the AUTH
lockout's and a C{ratelimit} policy's with the memory backend
(L{QueueManagerStore}).  The metrics endpoint is the queue
manager's, and it adds up everything: each receiver counts in a registry
of its own and sends a snapshot every L{METRICS_INTERVAL} seconds (and as
it stops) on the notice pipe; what a receiver that ended had counted stays
in the totals, so no counter ever goes down.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.interfaces import IRateCounterStore
from relayd.ops.logs import Logger
from relayd.ops.metrics import Samples, addSamples, parseProcessSamples, parseSamples
from relayd.smtp.session import ConnectionLimits

__all__ = [
    "ProcessPool",
    "ChildProcess",
    "ReceiverPool",
    "SharedLimits",
    "QueueManagerLink",
    "QueueManagerStore",
    "QueueManagerSilent",
    "AdoptedEndpoint",
    "main",
]

log = Logger(namespace="relayd.receivers")

LISTENER_FD_BASE = 10
"""A receiver gets listener number n on this fd + n."""
NOTICE_FD = 3
"""The receiver's end of the pipe for C{queued <id>} notices."""
SPOOL_LOCK_FD = 4
"""The spool's lock file, locked by the queue manager, held by the receiver
until it exits (never used there otherwise)."""
METRICS_INTERVAL = 5.0
"""Seconds between two snapshots of a receiver's metrics to the queue manager."""
ASK_TIMEOUT = 5.0
"""Seconds a receiver waits for the queue manager to count a connection."""
REFUSAL_GRACE = 0.25
"""Seconds the queue manager waits for slots given back before it refuses a connection."""
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0


class AdoptedEndpoint:
    """
    An C{IStreamServerEndpoint} that listens on an already-bound socket
    inherited from the queue manager (C{reactor.adoptStreamPort}).
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: Any) -> Deferred[Any]:
        port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        os.close(self.fd)  # the reactor has its own duplicate
        return succeed(port)


def writeLineNow(writer: Any, line: bytes) -> None:
    """
    Write one whole C{line} to a pipe now, ahead of what C{writer} (a
    C{twisted.internet.process.ProcessWriter}: a child's standard input, a
    child's notice pipe) still holds for its next turn, so that it reaches
    the other end at once: a receiver's questions to the queue manager and
    its closes (L{QueueManagerLink}), and the answers.  Twisted's writer
    would send on the next reactor turn: a connection would wait two more
    turns before its greeting (L{SharedLimits}), and a slot given back
    as a session ends could reach the queue manager after the client's
    next connection, on another receiver, asked for one.

    Other lines (the C{queued} notices, metrics, delivery requests) keep
    Twisted's way: several of them in one system call, one reactor turn
    later.  Going ahead of them is safe while none is partly sent (the
    writer's offset is 0, so the pipe holds whole lines) and C{line} is no
    longer than C{PIPE_BUF}, which a pipe writes whole or not at all;
    otherwise, or when the pipe is full, C{line} is queued behind them.
    """
    if (
        writer.connected
        and not writer.disconnecting
        and writer.offset == 0
        and len(line) <= select.PIPE_BUF
    ):
        try:
            if os.write(writer.fd, line) == len(line):
                return
        except OSError:
            pass  # full (EAGAIN), or gone: the writer finds out which
    writer.write(line)


class NoticePipe:
    """
    A child's end of its notice pipe (fd L{NOTICE_FD}): C{write} the
    Twisted way, C{writeNow} at once (L{writeLineNow}).
    """

    def __init__(self, stdio: Any) -> None:
        self.stdio = stdio

    def write(self, data: bytes) -> None:
        self.stdio.write(data)

    def writeNow(self, line: bytes) -> None:
        writer = self.stdio._writer
        if writer is None:
            # The pipe is gone with the queue manager: nobody to tell, and
            # the lifeline's end is stopping this process.
            return
        writeLineNow(writer, line)


class ChildProcess(ProcessProtocol):
    """
    The queue manager's side of one child process (a receiver, or a
    delivery process, L{relayd.delivery.processes}): reads the notice pipe
    (C{ready}, C{metrics N} snapshots, and lines for the pool).
    """

    # Set by the reactor's spawnProcess before any event: the child's
    # process, never None while the child runs.
    transport: IProcessTransport

    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.label = f"{pool.kind}-{index}"
        self.started = pool.reactor.seconds()
        self._notices = b""
        self.ended: Deferred[None] = Deferred()
        self.ready = False
        self.pid: int | None = None
        self.generation = pool.generation
        self._pendingMetrics = 0
        self.metrics: Samples = {}
        self.processMetrics: Samples = {}
        """Its latest C{process_*} figures, labelled with its L{label}."""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        log.info(
            "{label} started (pid {pid})",
            label=self.label,
            pid=self.transport.pid,
        )

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != NOTICE_FD:
            return
        buffer = self._notices + data
        while True:
            if self._pendingMetrics:
                if len(buffer) < self._pendingMetrics:
                    break
                text = buffer[: self._pendingMetrics]
                buffer = buffer[self._pendingMetrics :]
                self._pendingMetrics = 0
                page = text.decode("utf-8", "replace")
                self.metrics = parseSamples(page)
                self.processMetrics = parseProcessSamples(page, self.label)
                continue
            line, found, buffer = buffer.partition(b"\n")
            if not found:
                buffer = line
                break
            word, _, argument = line.partition(b" ")
            if word == b"metrics" and argument.isdigit():
                self._pendingMetrics = int(argument)
            elif word == b"ready":
                self.ready = True
                self.pool.childReady(self)
                if self.generation != self.pool.generation:
                    # A reload came while it was starting: it may have read
                    # the config before the change.
                    self.signal("HUP")
            else:
                self.pool.notice(self, word.decode("ascii", "replace"), argument)
        self._notices = buffer

    def write(self, data: bytes) -> None:
        """To the child's standard input."""
        self.transport.write(data)

    def writeNow(self, line: bytes) -> None:
        """One line to the child's standard input, at once (L{writeLineNow})."""
        pipes = getattr(self.transport, "pipes", {})
        if 0 in pipes:
            writeLineNow(pipes[0], line)
        else:
            self.transport.write(line)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except Exception as e:  # already gone
            log.debug("{label}: {error}", label=self.label, error=e)

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class ProcessPool(Service):
    """
    Starts, watches, restarts and stops a set of child processes, each
    C{python -m <module> --config ... --index N} with a lifeline on its
    standard input and a notice pipe on its fd 3 (see the module
    docstring); the receivers and the delivery processes
    (L{relayd.delivery.processes}) are two kinds.

    @ivar kind: names the children in the log: C{<kind>-N}.
    @ivar children: the running children, by index (1 to N).
    """

    kind = "child"
    module = ""

    def __init__(self, *, configPath: str, count: int, reactor: Any, stopDeadline: float) -> None:
        """
        @param count: children to run.
        @param stopDeadline: seconds a child may take to stop gracefully
            before it is killed.
        """
        self.configPath = configPath
        self.count = count
        self.reactor = reactor
        self.stopDeadline = stopDeadline
        self.children: dict[int, ChildProcess] = {}
        self._delays: dict[int, float] = {}
        self._timers: dict[int, Any] = {}
        self._terminated = False
        self.generation = 0
        self.retired: Samples = {}

    # Hooks for the kinds of children.

    def extraArguments(self, index: int, childFDs: dict[int, Any]) -> list[str]:
        """Arguments (and inherited fds, added to C{childFDs}) for child C{index}."""
        return []

    def makeChild(self, index: int) -> ChildProcess:
        return ChildProcess(self, index)

    def notice(self, child: ChildProcess, word: str, argument: bytes) -> None:
        """A line other than C{ready} or C{metrics} on C{child}'s notice pipe."""

    def childReady(self, child: ChildProcess) -> None:
        """C{child} said it is ready."""

    def childEnded(self, child: ChildProcess) -> None:
        """C{child} is gone (before any restart is planned)."""

    # The pool.

    def startService(self) -> None:
        Service.startService(self)
        self._terminated = False
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if not self.running:
            return
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2, NOTICE_FD: "r"}
        args = [
            sys.executable,
            "-m",
            self.module,
            "--config",
            self.configPath,
            "--index",
            str(index),
        ]
        args += self.extraArguments(index, childFDs)
        child = self.makeChild(index)
        self.children[index] = child
        self.reactor.spawnProcess(
            child, sys.executable, args, env=dict(os.environ), childFDs=childFDs
        )

    def metricsSamples(self) -> list[Samples]:
        """
        What the children counted (their latest snapshots, a few seconds
        old at most) and what those that have ended had counted, for the
        queue manager's metrics page to add to its own; and each running
        child's C{process_*} figures under its own C{process} label.
        """
        # A child's process_* series (its own CPU, memory, fds, labelled
        # process=<kind>-N) are served while it runs; never retired.
        return (
            [self.retired]
            + [c.metrics for c in self.children.values()]
            + [c.processMetrics for c in self.children.values()]
        )

    def ended(self, child: ChildProcess, reason: Failure) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        # Its counts stay counted (a total must not go down); its gauges go.
        addSamples(self.retired, _withoutGauges(child.metrics))
        self.childEnded(child)
        if not self.running:
            return
        # A child that dies soon after starting is restarted ever later.
        quick = self.reactor.seconds() - child.started < 10
        delay = min(self._delays.get(child.index, RESTART_DELAY / 2) * 2, RESTART_DELAY_MAX)
        self._delays[child.index] = delay if quick else RESTART_DELAY / 2
        log.warn(
            "{label} exited ({why}); starting it again in {delay:g}s",
            label=child.label,
            why=reason.getErrorMessage(),
            delay=delay if quick else RESTART_DELAY,
        )
        self._timers[child.index] = self.reactor.callLater(
            delay if quick else RESTART_DELAY, self._spawn, child.index
        )

    def reload(self) -> None:
        """
        SIGHUP every child, to read the config again.  One still starting
        (its handler not yet installed, where SIGHUP would kill it) gets it
        once it is ready.
        """
        self.generation += 1
        for child in list(self.children.values()):
            if child.ready:
                child.generation = self.generation
                child.signal("HUP")

    def terminate(self) -> None:
        """SIGTERM every child, once: each stops gracefully, as relayd does."""
        if not self._terminated:
            self._terminated = True
            for child in list(self.children.values()):
                child.signal("TERM")

    def stopService(self) -> Deferred[Any]:
        """
        L{terminate}, and SIGKILL the children still running after the
        deadline; fires once every child has ended.
        """
        Service.stopService(self)
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        children = list(self.children.values())
        if not children:
            return succeed(None)
        from twisted.internet.defer import DeferredList

        self.terminate()

        def late() -> None:
            for child in children:
                if not child.ended.called:
                    log.warn("{label} did not stop in time; killing it", label=child.label)
                    child.signal("KILL")

        timer = self.reactor.callLater(self.stopDeadline, late)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return DeferredList([c.ended for c in children]).addBoth(done)


class ReceiverPool(ProcessPool):
    """
    The receivers (see the module docstring).  Added to the service tree
    after the spool and the listeners: the sockets are bound and the spool
    recovered by then.
    """

    kind = "receiver"
    module = "relayd.receivers"

    def __init__(
        self,
        *,
        configPath: str,
        count: int,
        listeners: list[Any],
        spool: Any,
        reactor: Any,
        stopDeadline: float,
        limits: ConnectionLimits | None = None,
        counters: IRateCounterStore | None = None,
    ) -> None:
        """
        @param count: receivers to run.
        @param listeners: the L{relayd.service.ListenerService}s to share.
        @param limits: the queue manager's connection limits, which count
            every process's connections (L{SharedLimits}); None counts
            none (each receiver then only counts its own).
        @param counters: the queue manager's rate counters, in which the
            receivers count too (L{QueueManagerStore}).
        @param stopDeadline: seconds a receiver may take to stop gracefully
            before it is killed.
        """
        super().__init__(
            configPath=configPath, count=count, reactor=reactor, stopDeadline=stopDeadline
        )
        self.listeners = listeners
        self.spool = spool
        self.limits = limits
        self.counters = counters
        self.connections: dict[ChildProcess, dict[str, int]] = {}
        """Each receiver's open connections that L{limits} counts, by client."""

    @property
    def receivers(self) -> dict[int, ChildProcess]:
        """The running receivers, by index (1 to N)."""
        return self.children

    def extraArguments(self, index: int, childFDs: dict[int, Any]) -> list[str]:
        args = []
        if self.spool is not None and self.spool.lockFd is not None:
            # A receiver commits into the spool: the next queue manager
            # must not recover it while this one runs (module docstring).
            childFDs[SPOOL_LOCK_FD] = self.spool.lockFd
        for n, listener in enumerate(self.listeners):
            sock = listener.port.socket
            childFDs[LISTENER_FD_BASE + n] = sock.fileno()
            where = f"{listener.listenerName}={LISTENER_FD_BASE + n}:{int(sock.family)}"
            args += ["--listener", where]
        return args

    def notice(self, child: ChildProcess, word: str, argument: bytes) -> None:
        if word == "queued" and argument:
            self.queued(argument.decode("ascii", "replace"))
        elif word == "open":
            token, _, client = argument.partition(b" ")
            self.admitOrWait(child, token, client.decode("ascii", "replace"))
        elif word == "close":
            self.closed(child, argument.decode("ascii", "replace"))
        elif word == "count":
            token, _, question = argument.partition(b" ")
            self.counted(question).addCallback(
                lambda payload: child.writeNow(b"answer %s %s\n" % (token, payload))
            )

    def admitOrWait(self, child: ChildProcess, token: bytes, client: str, attempt: int = 0) -> None:
        """
        Answer C{child}'s C{open <token> <client>}: admitted, or the reason
        for a refusal.

        A client that reconnects the moment it reads a 221 (as smtp-source
        does) must not be refused because its old session's C{close},
        written on another receiver's pipe before that 221 went out
        (L{relayd.smtp.session.SMTPServer.smtp_QUIT}), is still unread
        there.  So a refusal is decided on a later reactor turn, once every
        receiver's pipe has been read to its end (L{_drainNotices}): then
        every session that ended before this connection was made has been
        counted out, and whatever the count says is what the client holds.
        Reading the pipes in the middle of one receiver's lines would not
        do: the lines it wrote after this C{open} (closes of sessions that
        ended since) would be counted after the other pipes' newer
        connections.  A C{close} that a receiver could not write at once
        (its pipe full) is waited for L{REFUSAL_GRACE} seconds more.

        @param attempt: 0 as the line is read, 1 on the next turn after the
            pipes are read, 2 after the grace.
        """
        if self.children.get(child.index) is not child:
            return  # ended meanwhile: its connections are gone
        if attempt == 1:
            self._drainNotices()
        refusal = self.opened(child, client)
        if refusal is not None and attempt < 2:
            delay = 0 if attempt == 0 else REFUSAL_GRACE
            self.reactor.callLater(delay, self.admitOrWait, child, token, client, attempt + 1)
            return
        child.writeNow(b"answer %s %s\n" % (token, (refusal or "").encode("ascii")))

    def _drainNotices(self) -> None:
        """
        Read now, to its end, what every receiver has written on its notice
        pipe, as the reactor would on this turn or a later one (never
        called while a receiver's lines are being read: L{admitOrWait}
        calls it from a timed call).  End of file is left for the reactor.
        """
        for child in list(self.children.values()):
            reader = getattr(child.transport, "pipes", {}).get(NOTICE_FD)
            while reader is not None:
                try:
                    data = os.read(reader.fileno(), 65536)
                except OSError:
                    break  # nothing there (EAGAIN), or closed
                if data:
                    child.childDataReceived(NOTICE_FD, data)
                if len(data) < 65536:
                    break

    def opened(self, child: ChildProcess, client: str) -> str | None:
        """
        C{child} has a new connection from C{client}: count it against the
        limits of the whole relayd, or return the reason it is refused.
        """
        if self.limits is None:
            return None
        refusal = self.limits.admit(client)
        if refusal is None:
            counts = self.connections.setdefault(child, {})
            counts[client] = counts.get(client, 0) + 1
        return refusal

    def counted(self, question: bytes) -> Deferred[bytes]:
        """
        A receiver's L{QueueManagerStore} call, C{<op> <counters as JSON>},
        made on L{counters}: its result as JSON, or C{!<problem>}.
        """
        op, _, text = question.partition(b" ")
        try:
            if self.counters is None or op not in (b"reserve", b"peek", b"release"):
                raise ValueError(f"no such question: count {op.decode('ascii', 'replace')}")
            counters = [tuple(c) for c in json.loads(text)]
            d: Deferred[Any] = getattr(self.counters, op.decode("ascii"))(counters)
        except (ValueError, TypeError, IndexError) as e:
            log.warn("a receiver's count was refused: {error}", error=str(e))
            return succeed(b"!" + str(e).encode("utf-8", "replace"))
        return d.addCallback(lambda result: json.dumps(result).encode("ascii"))

    def closed(self, child: ChildProcess, client: str) -> None:
        """A connection from C{client} that C{child} had counted is over."""
        counts = self.connections.get(child, {})
        left = counts.get(client, 0)
        if not left or self.limits is None:
            return  # never counted here (admitted while the answer was late)
        if left > 1:
            counts[client] = left - 1
        else:
            del counts[client]
        self.limits.close(client)

    def childReady(self, child: ChildProcess) -> None:
        """A receiver accepts connections: the queue manager leaves them to it."""
        if self.running and any(one.accepting for one in self.listeners):
            for listener in self.listeners:
                listener.stopAccepting()
            log.info("{label} ready: new connections are the receivers'", label=child.label)

    def childEnded(self, child: ChildProcess) -> None:
        """
        A receiver is gone, and its connections with it: their slots are
        given back.  When no receiver that is ready is left, the queue
        manager accepts connections itself until one is back.
        """
        counts = self.connections.pop(child, {})
        if child.pid is not None and self.spool is not None:
            # Its journal: what it committed is the spool's for good.
            self.spool.retireSegmentsOf(child.pid)
        if self.limits is not None:
            for client, count in counts.items():
                for _ in range(count):
                    self.limits.close(client)
        if not self.running or any(one.ready for one in self.children.values()):
            return
        if not all(one.accepting for one in self.listeners):
            for listener in self.listeners:
                listener.startAccepting()
            log.warn("no receiver is running: the queue manager accepts connections until one is")

    def queued(self, queueId: str) -> None:
        """A receiver committed C{queueId}: tell the scheduler at once."""
        self.spool.announce(queueId)


# --- the receiver process -------------------------------------------------------


class _Lifeline(LineOnlyReceiver):
    """
    A child's standard input (from the queue manager) and its notice
    pipe: end of file on standard input means the queue manager is gone.
    A receiver also reads the queue manager's answers there, one per line
    (L{QueueManagerLink.answer}, set as L{answer}).
    """

    delimiter = b"\n"

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self.answer: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self.answer is not None:
            self.answer(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stop()


class QueueManagerSilent(Exception):
    """The queue manager did not answer a receiver's question in time."""


class QueueManagerLink:
    """
    A receiver's questions to the queue manager, about what the whole
    relayd counts (L{SharedLimits}, L{QueueManagerStore}): each is a line
    on the notice pipe, C{<word> <token> <argument>}, answered by a line
    C{answer <token> <payload>} on standard input (L{ReceiverPool.notice}).
    A question not answered within L{ASK_TIMEOUT} seconds fails with
    L{QueueManagerSilent}; a late answer is dropped.
    """

    def __init__(self, reactor: Any, notices: Any) -> None:
        self.reactor = reactor
        self.notices = notices
        self._tokens = 0
        self._waiting: dict[bytes, tuple[Deferred[bytes], Any]] = {}

    def ask(self, word: bytes, argument: bytes) -> Deferred[bytes]:
        """Ask; the Deferred fires with the answer's payload."""
        self._tokens += 1
        token = b"%d" % self._tokens
        answered: Deferred[bytes] = Deferred()
        timer = self.reactor.callLater(ASK_TIMEOUT, self._late, token)
        self._waiting[token] = (answered, timer)
        self.notices.writeNow(b"%s %s %s\n" % (word, token, argument))
        return answered

    def tell(self, word: bytes, argument: bytes) -> None:
        """A line that needs no answer."""
        self.notices.writeNow(b"%s %s\n" % (word, argument))

    def answer(self, line: bytes) -> None:
        """A line from the queue manager on standard input."""
        word, _, rest = line.partition(b" ")
        token, _, payload = rest.partition(b" ")
        waiting = self._waiting.pop(token, None) if word == b"answer" else None
        if waiting is None:
            return  # too late: the question failed already
        answered, timer = waiting
        timer.cancel()
        answered.callback(payload)

    def _late(self, token: bytes) -> None:
        answered, _ = self._waiting.pop(token)
        answered.errback(QueueManagerSilent(f"no answer within {ASK_TIMEOUT:g}s"))


class SharedLimits(ConnectionLimits):
    """
    A receiver's connection limits.  The C{[limits]} connection counts
    are the whole relayd's, not each process's, so the queue manager
    counts every process's connections (L{ReceiverPool.opened}), as
    Postfix's C{smtpd} processes ask C{anvil}.

    A new connection is counted here first (this process's own connections
    are some of the whole, so a refusal here is right), then the queue
    manager is asked (C{open <token> <client>}, answered with nothing or
    the reason for a refusal); the session greets nobody and reads nothing
    until then.  Each end is told (C{close <client>}).

    A queue manager that does not answer within L{ASK_TIMEOUT} seconds
    (busy or stuck) does not keep clients out: the connection is let in
    on this process's counts alone, with a warning.
    """

    def __init__(self, total: int, perClient: int, link: QueueManagerLink) -> None:
        super().__init__(total, perClient)
        self.link = link

    def open(self, client: str) -> str | Deferred[str | None] | None:
        refusal = self.admit(client)
        if refusal is not None:
            return refusal

        def answered(payload: bytes) -> str | None:
            if not payload:
                return None
            # Refused: give the local slot back; the queue manager never
            # counted it, so it is not told.
            ConnectionLimits.close(self, client)
            return payload.decode("ascii", "replace")

        def silent(failure: Failure) -> None:
            failure.trap(QueueManagerSilent)
            log.warn(
                "the queue manager did not answer within {timeout:g}s: [{client}] let in "
                "on this process's connection counts alone",
                timeout=ASK_TIMEOUT,
                client=client,
            )

        return self.link.ask(b"open", client.encode("ascii")).addCallbacks(answered, silent)

    def close(self, client: str) -> None:
        super().close(client)
        self.link.tell(b"close", client.encode("ascii"))


@implementer(IRateCounterStore)
class QueueManagerStore:
    """
    Rate counters kept in the queue manager's memory, for every process
    (L{relayd.interfaces.IRateCounterStore}): what a receiver's
    C{ratelimit} policy with the memory backend and its AUTH lockout
    (L{relayd.smtp.auth.Lockout}) count in, so that their limits are the
    whole relayd's.  Each call is one question, C{count <token> <op>
    <counters as JSON>}, answered with the queue manager's
    L{relayd.policies.ratecounter.MemoryStore}'s result as JSON; one the
    queue manager does not answer in time fails (L{QueueManagerSilent}),
    as a Redis store's does when Redis cannot answer.
    """

    def __init__(self, link: QueueManagerLink) -> None:
        self.link = link

    def _ask(self, op: bytes, counters: list[tuple[Any, ...]]) -> Deferred[Any]:
        question = json.dumps([list(c) for c in counters], separators=(",", ":"))
        d = self.link.ask(b"count", op + b" " + question.encode("utf-8"))
        return d.addCallback(_counted)

    def reserve(self, counters: list[tuple[Any, ...]]) -> Deferred[Any]:
        return self._ask(b"reserve", counters)

    def peek(self, counters: list[tuple[Any, ...]]) -> Deferred[Any]:
        return self._ask(b"peek", counters)

    def release(self, counters: list[tuple[Any, ...]]) -> Deferred[None]:
        return self._ask(b"release", counters).addCallback(lambda _: None)


def _counted(payload: bytes) -> Any:
    if payload.startswith(b"!"):
        raise ValueError(f"the queue manager refused: {payload[1:].decode('utf-8', 'replace')}")
    return json.loads(payload)


def _withoutGauges(samples: Samples) -> Samples:
    return {name: values for name, values in samples.items() if name not in _GAUGES}


_GAUGES = frozenset({"relayd_connections_open"})
"""The receivers' gauges (the rest are counters and histograms)."""


def _labelled(observer: Any, label: str, json: bool) -> Any:
    """Mark each event of this process: C{receiver-N} in text, a field in JSON."""

    def observe(event: dict[str, Any]) -> None:
        event = dict(event)
        if json:
            event["process"] = label
        else:
            level = getattr(event.get("log_level"), "name", "-")
            event["log_system"] = f"{label} {event.get('log_namespace', '-')}#{level}"
        observer(event)

    return observe


def startChild(label: str, configPath: str) -> Any:
    """
    The start of a child process: read the config and log to standard
    output with every line marked C{label}.  A config error is one line on
    standard error and exit status 1.

    @return: the L{relayd.config.Config}.
    """
    from twisted.logger import globalLogBeginner

    from relayd.config import ConfigError, load
    from relayd.ops.logs import formatObserver, levelFiltered

    try:
        config = load(configPath)
    except ConfigError as e:
        sys.stderr.write(f"relayd: {label}: config error: {e}\n")
        raise SystemExit(1) from None
    json = config.logFormat == "json"
    observer = levelFiltered(
        _labelled(formatObserver(config.logFormat, sys.stdout), label, json), config.logLevel
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return config


def openLifeline(reactor: Any, protocol: Any) -> Any:
    """
    C{protocol} on the child's standard input (from the queue manager; end
    of file means the queue manager is gone) and its notice pipe, fd
    L{NOTICE_FD}, for writing.
    """
    from twisted.internet import stdio

    # mypy sees the Windows StandardIO, without the POSIX stdin/stdout keywords.
    return stdio.StandardIO(protocol, stdin=0, stdout=NOTICE_FD)  # type: ignore[call-arg]


def pushMetrics(reactor: Any, registry: Any, notices: Any) -> None:
    """
    Send a snapshot of C{registry} on the notice pipe every
    L{METRICS_INTERVAL} seconds and as the child stops, for the queue
    manager to add up.
    """
    if registry is None:
        return
    from prometheus_client.exposition import generate_latest
    from twisted.internet.task import LoopingCall

    def push() -> None:
        page = generate_latest(registry)
        notices.write(b"metrics %d\n" % len(page) + page)

    pushing = LoopingCall(push)
    pushing.start(METRICS_INTERVAL, now=False)
    # A last snapshot as it stops, so the totals miss nothing.
    reactor.addSystemEventTrigger("before", "shutdown", push)


def main(argv: list[str] | None = None) -> None:
    """Run one receiver: C{python -m relayd.receivers --config ... --index N ...}."""
    parser = argparse.ArgumentParser(prog="relayd receiver")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    args = parser.parse_args(argv)

    from relayd.reactor import globalReactor, reactorName
    from relayd.service import buildService

    reactor = globalReactor()

    label = f"receiver-{args.index}"
    config = startChild(label, args.config)

    endpoints: dict[str, AdoptedEndpoint] = {}
    for item in args.listener:
        name, _, where = item.rpartition("=")
        fd, _, family = where.partition(":")
        endpoints[name] = AdoptedEndpoint(reactor, int(fd), int(family or socket.AF_INET))

    lifeline = _Lifeline(lambda: _stop(reactor))
    notices = NoticePipe(openLifeline(reactor, lifeline))
    link = QueueManagerLink(reactor, notices)
    lifeline.answer = link.answer
    limits = SharedLimits(config.maxConnections, config.maxConnectionsPerClient, link)

    service = buildService(
        config, reactor, receiver=endpoints, limits=limits, counters=QueueManagerStore(link)
    )

    def tell(queueId: str, record: Any) -> None:
        notices.write(f"queued {queueId}\n".encode("ascii"))

    spool = service.spool
    assert spool is not None, "buildService makes the spool"
    spool.addQueueObserver(tell)
    pushMetrics(reactor, getattr(service.metrics, "registry", None), notices)

    def hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(service.reload)

    signal.signal(signal.SIGHUP, hup)
    service.freezeHeap = True
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info(
        "{label} receiving (pid {pid}, reactor {reactor})",
        label=label,
        pid=os.getpid(),
        reactor=reactorName(reactor),
    )
    notices.write(b"ready\n")
    reactor.run()


def _stop(reactor: Any) -> None:
    if reactor.running:
        log.warn("queue manager gone; stopping")
        reactor.stop()


if __name__ == "__main__":
    main()
