"""
Several receiving processes around one queue manager (DESIGN section 1,
issue 14): Postfix's split of many C{smtpd} processes and one C{qmgr}.

One Twisted process uses one core.  With C{[server] processes = N} (by
default one per core) the process that C{twistd} starts, the I{queue
manager}, binds the listening sockets, recovers the spool and runs the
scheduler and deliveries as before, and also receives mail itself; it then
starts N-1 I{receivers} (C{python -m relayd.receivers}), each handed the
same listening sockets, so the kernel spreads new connections over all of
them.

The spool is the only hand-off, and its one-owner rule becomes one owner
per directory:

  - a receiver creates files in C{tmp/} under names of its own (queue ids
    carry 5 random characters), renames them into C{data/} and
    C{incoming/} with the same commit protocol and fsyncs as ever, and
    touches nothing else; it neither takes the spool's lock nor recovers;
  - the queue manager alone moves, updates and removes; startup recovery
    runs before any receiver exists.

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

What is per process: the connection counts of C{[limits]} and in-memory
counters (so a C{ratelimit} policy with the memory backend needs
C{processes = 1}, see L{relayd.config}).  The metrics endpoint is the queue
manager's, and it adds up everything: each receiver counts in a registry
of its own and sends a snapshot every L{METRICS_INTERVAL} seconds (and as
it stops) on the notice pipe; what a receiver that ended had counted stays
in the totals, so no counter ever goes down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.ops.metrics import Samples, addSamples, parseSamples

__all__ = ["ReceiverPool", "AdoptedEndpoint", "main"]

log = Logger(namespace="relayd.receivers")

LISTENER_FD_BASE = 10
"""A receiver gets listener number n on this fd + n."""
NOTICE_FD = 3
"""The receiver's end of the pipe for C{queued <id>} notices."""
METRICS_INTERVAL = 5.0
"""Seconds between two snapshots of a receiver's metrics to the queue manager."""
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


class _Receiver(ProcessProtocol):
    """The queue manager's side of one receiver process."""

    def __init__(self, pool: ReceiverPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.started = pool.reactor.seconds()
        self._notices = b""
        self.ended: Deferred[None] = Deferred()
        self.ready = False
        self.generation = pool.generation
        self._pendingMetrics = 0
        self.metrics: Samples = {}

    def connectionMade(self) -> None:
        log.info(
            "receiver-{index} started (pid {pid})",
            index=self.index,
            pid=self.transport.pid,  # type: ignore[union-attr]
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
                self.metrics = parseSamples(text.decode("utf-8", "replace"))
                continue
            line, found, buffer = buffer.partition(b"\n")
            if not found:
                buffer = line
                break
            word, _, argument = line.decode("ascii", "replace").partition(" ")
            if word == "metrics" and argument.isdigit():
                self._pendingMetrics = int(argument)
            elif word == "queued" and argument:
                self.pool.queued(argument)
            elif word == "ready":
                self.ready = True
                if self.generation != self.pool.generation:
                    # A reload came while it was starting: it may have read
                    # the config before the change.
                    self.signal("HUP")

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except Exception as e:  # already gone
            log.debug("receiver-{index}: {error}", index=self.index, error=e)

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class ReceiverPool(Service):
    """
    Starts, watches and stops the receiver processes (see the module
    docstring).  Added to the service tree after the spool and the
    listeners: the sockets are bound and the spool recovered by then.

    @ivar receivers: the running receivers, by index (1 to N-1).
    """

    def __init__(
        self,
        *,
        configPath: str,
        count: int,
        listeners: list[Any],
        spool: Any,
        reactor: Any,
        stopDeadline: float,
    ) -> None:
        """
        @param count: receivers to run besides this process.
        @param listeners: the L{relayd.service.ListenerService}s to share.
        @param stopDeadline: seconds a receiver may take to stop gracefully
            before it is killed.
        """
        self.configPath = configPath
        self.count = count
        self.listeners = listeners
        self.spool = spool
        self.reactor = reactor
        self.stopDeadline = stopDeadline
        self.receivers: dict[int, _Receiver] = {}
        self._delays: dict[int, float] = {}
        self._timers: dict[int, Any] = {}
        self._terminated = False
        self.generation = 0
        self.retired: Samples = {}

    def startService(self) -> None:
        super().startService()
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
            "relayd.receivers",
            "--config",
            self.configPath,
            "--index",
            str(index),
        ]
        for n, listener in enumerate(self.listeners):
            sock = listener.port.socket
            childFDs[LISTENER_FD_BASE + n] = sock.fileno()
            where = f"{listener.listenerName}={LISTENER_FD_BASE + n}:{int(sock.family)}"
            args += ["--listener", where]
        receiver = _Receiver(self, index)
        self.receivers[index] = receiver
        self.reactor.spawnProcess(
            receiver, sys.executable, args, env=dict(os.environ), childFDs=childFDs
        )

    def metricsSamples(self) -> list[Samples]:
        """
        What the receivers counted (their latest snapshots, a few seconds
        old at most) and what those that have ended had counted, for the
        queue manager's metrics page to add to its own.
        """
        return [self.retired] + [r.metrics for r in self.receivers.values()]

    def queued(self, queueId: str) -> None:
        """A receiver committed C{queueId}: tell the scheduler at once."""
        self.spool.announce(queueId)

    def ended(self, receiver: _Receiver, reason: Failure) -> None:
        if self.receivers.get(receiver.index) is receiver:
            del self.receivers[receiver.index]
        # Its counts stay counted (a total must not go down); its gauges go.
        addSamples(self.retired, _withoutGauges(receiver.metrics))
        if not self.running:
            return
        # A receiver that dies soon after starting is restarted ever later.
        quick = self.reactor.seconds() - receiver.started < 10
        delay = min(self._delays.get(receiver.index, RESTART_DELAY / 2) * 2, RESTART_DELAY_MAX)
        self._delays[receiver.index] = delay if quick else RESTART_DELAY / 2
        log.warn(
            "receiver-{index} exited ({why}); starting it again in {delay:g}s",
            index=receiver.index,
            why=reason.getErrorMessage(),
            delay=delay if quick else RESTART_DELAY,
        )
        self._timers[receiver.index] = self.reactor.callLater(
            delay if quick else RESTART_DELAY, self._spawn, receiver.index
        )

    def reload(self) -> None:
        """
        SIGHUP every receiver, to read the config again.  One still
        starting (its handler not yet installed, where SIGHUP would kill
        it) gets it once it is ready.
        """
        self.generation += 1
        for receiver in list(self.receivers.values()):
            if receiver.ready:
                receiver.generation = self.generation
                receiver.signal("HUP")

    def terminate(self) -> None:
        """SIGTERM every receiver, once: each stops gracefully, as relayd does."""
        if not self._terminated:
            self._terminated = True
            for receiver in list(self.receivers.values()):
                receiver.signal("TERM")

    def stopService(self) -> Deferred[Any]:
        """
        L{terminate}, and SIGKILL the receivers still running after the
        deadline; fires once every receiver has ended.
        """
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        receivers = list(self.receivers.values())
        if not receivers:
            return succeed(None)
        from twisted.internet.defer import DeferredList

        self.terminate()

        def late() -> None:
            for receiver in receivers:
                if not receiver.ended.called:
                    log.warn(
                        "receiver-{index} did not stop in time; killing it", index=receiver.index
                    )
                    receiver.signal("KILL")

        timer = self.reactor.callLater(self.stopDeadline, late)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return DeferredList([r.ended for r in receivers]).addBoth(done)


# --- the receiver process -------------------------------------------------------


class _Lifeline(Protocol):
    """
    The receiver's standard input (from the queue manager) and its notice
    pipe: end of file on standard input means the queue manager is gone.
    """

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.stop()


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


def main(argv: list[str] | None = None) -> None:
    """Run one receiver: C{python -m relayd.receivers --config ... --index N ...}."""
    parser = argparse.ArgumentParser(prog="relayd receiver")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from relayd.config import ConfigError, load
    from relayd.ops.logs import formatObserver, levelFiltered
    from relayd.service import buildService

    label = f"receiver-{args.index}"
    try:
        config = load(args.config)
    except ConfigError as e:
        sys.stderr.write(f"relayd: {label}: config error: {e}\n")
        raise SystemExit(1) from None
    json = config.logFormat == "json"
    observer = levelFiltered(
        _labelled(formatObserver(config.logFormat, sys.stdout), label, json), config.logLevel
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    endpoints: dict[str, AdoptedEndpoint] = {}
    for item in args.listener:
        name, _, where = item.rpartition("=")
        fd, _, family = where.partition(":")
        endpoints[name] = AdoptedEndpoint(reactor, int(fd), int(family or socket.AF_INET))

    service = buildService(config, reactor, receiver=endpoints)

    notices = stdio.StandardIO(  # type: ignore[call-arg]
        _Lifeline(lambda: _stop(reactor)), stdin=0, stdout=NOTICE_FD
    )

    def tell(queueId: str, record: Any) -> None:
        notices.write(f"queued {queueId}\n".encode("ascii"))

    service.spool.addQueueObserver(tell)

    registry = getattr(service.metrics, "registry", None)
    if registry is not None:
        from prometheus_client.exposition import generate_latest
        from twisted.internet.task import LoopingCall

        def push() -> None:
            page = generate_latest(registry)
            notices.write(b"metrics %d\n" % len(page) + page)

        pushing = LoopingCall(push)
        pushing.start(METRICS_INTERVAL, now=False)
        # A last snapshot as it stops, so the totals miss nothing.
        reactor.addSystemEventTrigger("before", "shutdown", push)

    def hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(service.reload)  # type: ignore[attr-defined]

    signal.signal(signal.SIGHUP, hup)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info("{label} receiving (pid {pid})", label=label, pid=os.getpid())
    notices.write(b"ready\n")
    reactor.run()


def _stop(reactor: Any) -> None:
    if reactor.running:
        log.warn("queue manager gone; stopping")
        reactor.stop()


if __name__ == "__main__":
    main()
