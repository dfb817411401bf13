"""
Builds relayd's service tree from a L{relayd.config.Config}.

Startup order is the order children are added: thread pools, then the spool
(whose recovery runs before anything listens), then the listeners.
L{MultiService} stops children in reverse order, so on shutdown the
listeners close first and the spool's thread pool finishes the commits in
flight before the process exits.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayd.config import Config, ConfigError
from relayd.interfaces import IDeliverer, IQueue, IRateCounterStore, IReloadable
from relayd.ops.control import ControlService, ControlSocketError
from relayd.ops.logs import Logger
from relayd.ops.metrics import NO_METRICS, Metrics, NoMetrics, SummedRegistry, metricsSite
from relayd.ops.sdnotify import SystemdNotifier
from relayd.policies.ratecounter import MemoryStore
from relayd.policy import PolicyChain, loadPolicies, startPolicies, stopPolicies
from relayd.queue.spool import SpoolLocked
from relayd.smtp.proxy import ProxyFactory
from relayd.smtp.session import ConnectionLimits, SMTPFactory

if TYPE_CHECKING:
    from twisted.internet.ssl import CertificateOptions

    from relayd.delivery.attempt import Deliverer
    from relayd.delivery.processes import DeliveryPool
    from relayd.delivery.routing import Router
    from relayd.delivery.tlsrpt import TLSReportCounts
    from relayd.queue.scheduler import Scheduler
    from relayd.queue.spool import Spool
    from relayd.receivers import ReceiverPool

log = Logger(namespace="relayd.service")

__all__ = ["RelaydService", "ListenerService", "ThreadPoolService", "buildService"]


class ListenerService(Service):
    """
    Listens on one endpoint while running.  Unlike
    L{twisted.application.internet.StreamServerEndpointService} it raises a
    bind failure synchronously from L{startService} and keeps the bound
    port in L{port}, so tests can listen on port 0 and ask which it got.
    """

    def __init__(
        self, endpoint: Any, factory: Any, configKey: str = "listeners", sendAtOnce: bool = False
    ) -> None:
        """
        @param configKey: the config key named when binding fails.
        @param sendAtOnce: a TCP port's connections send what is written
            at once when nothing is queued (L{relayd.smtp.transport}).
        """
        self.sendAtOnce = sendAtOnce
        self.endpoint = endpoint
        self.factory = factory
        self.configKey = configKey
        self.port: Any = None
        self.listenerName = ""
        self.accepting = True

    def privilegedStartService(self) -> None:
        """
        Bind now, while twistd still has root (C{--uid}/C{--gid} drop it
        right after): ports below 1024 need it.  Nothing is accepted before
        the reactor runs, which is after L{startService} of every service,
        spool recovery included.
        """
        Service.privilegedStartService(self)
        self._listen()

    def startService(self) -> None:
        if self.port is None:
            self._listen()
        Service.startService(self)

    def _listen(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("endpoint did not listen synchronously")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        if self.sendAtOnce:
            from relayd.smtp.transport import writeThrough

            writeThrough(self.port)

    def stopAccepting(self) -> None:
        """
        Leave new connections to the other processes that accept on this
        socket (the receivers): it stays bound and open, and the
        connections already accepted go on.
        """
        if self.accepting and self.port is not None and hasattr(self.port, "stopReading"):
            self.accepting = False
            self.port.stopReading()

    def startAccepting(self) -> None:
        """Accept new connections again (after L{stopAccepting})."""
        if not self.accepting and self.port is not None:
            self.accepting = True
            self.port.startReading()

    def stopService(self) -> Any:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class ThreadPoolService(Service):
    """Starts and stops a L{ThreadPool} with the service tree."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.pool.stop()


class RelaydService(MultiService):
    """
    The top of the tree.  A listener that cannot bind stops startup with one
    line instead of a traceback.
    """

    def __init__(self, config: Config) -> None:
        MultiService.__init__(self)
        self.config = config
        self.factories: list[SMTPFactory] = []
        self.scheduler: Scheduler | None = None
        # Reconfigured on reload: the router, and the deliverer when it
        # runs in this process (not in delivery processes).
        self.router: Router | None = None
        self.deliverer: Deliverer | None = None
        self.policies: PolicyService | None = None
        self.tls: Any = None
        self.checker: Any = None
        self.reactor: Any = None
        self.metrics: NoMetrics = NO_METRICS
        self.logObserver: Any = None
        self.installSignalHandlers = False
        # Set where the service is the process (twistd, a receiver), not
        # a part of a test's process: see freezeStartupHeap.
        self.freezeHeap = False
        self.reloadError: str | None = None
        self.spool: Spool | None = None
        self.receivers: ReceiverPool | None = None
        # The connection limits of [limits], shared by the listeners.
        self.limits: ConnectionLimits | None = None
        self.deliveries: DeliveryPool | None = None
        # TLSRPT counts (relayd.delivery.tlsrpt), when MTA-STS or DANE is on.
        self.tlsReports: TLSReportCounts | None = None
        # systemd's Type=notify (relayd.ops.sdnotify): the queue manager's
        # tree only, never a receiver's or a config check's.
        self.systemd: SystemdNotifier | None = None

    def setServiceParent(self, parent: Any) -> Any:
        """
        Join C{parent}; when it is twistd's application and relayd chose a
        log observer (L{relayd.ops.logs}), give it as the application's
        C{ILogObserver} component, which twistd uses unless its own
        C{--logger} option names another (the way a C{.tac} file sets it).
        """
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.logObserver)
        return MultiService.setServiceParent(self, parent)

    def privilegedStartService(self) -> None:
        try:
            MultiService.privilegedStartService(self)
        except CannotListenError as e:
            # Children bind in order: the first without a port failed.
            failed = next(
                (c for c in self if isinstance(c, ListenerService) and c.port is None), None
            )
            key = failed.configKey if failed is not None else "listeners"
            self._fatal(f"{key}: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")
        if self.installSignalHandlers:
            import signal

            from twisted.internet import reactor

            def hup(signum: int, frame: Any) -> None:
                cast(Any, reactor).callFromThread(self.reload)

            signal.signal(signal.SIGHUP, hup)

    def reload(self) -> Deferred[bool]:
        """
        Re-read the config file and put in force what can change while
        running: the policy chain (and the files its policies read), the
        users file, the TLS certificate and key, the routes, and the
        per-session settings (limits, timeouts, host name).  Sessions and
        deliveries in progress go on; new ones use the new settings.

        Everything is checked before anything changes: an invalid new
        config is refused with one log line and the old one stays in force.
        Changes that need a restart (listeners, spool, thread pools,
        resolvers, delivery on/off) are named in a warning.

        @return: a Deferred firing with True when the new config is in force;
            when False, L{reloadError} says why.
        """
        if self.receivers is not None:
            # Each receiver reads the file again itself.
            self.receivers.reload()
        if self.deliveries is not None:
            self.deliveries.reload()
        if self.systemd is not None:
            self.systemd.reloading()

        def done(ok: bool) -> bool:
            self.metrics.reloaded(bool(ok))
            if self.systemd is not None:
                self.systemd.reloaded("" if ok else f"reload refused: {self.reloadError}")
            return ok

        return _reload(self).addCallback(done)

    def stopService(self) -> Deferred[None]:
        """
        Stop the children one at a time, last started first, each after the
        previous has finished: the listeners close, then the scheduler lets
        its deliveries in flight record their outcome, then the spool
        finishes its commits, then the thread pools stop.
        """
        Service.stopService(self)
        if self.systemd is not None:
            self.systemd.stopping()
        children = list(self)
        if self.receivers is not None:
            # They stop in parallel with this process's own sessions; the
            # pool's stopService (in turn, below) waits for them.
            self.receivers.terminate()

        @inlineCallbacks
        def stopInTurn() -> Any:
            for child in reversed(children):
                if child.running:
                    try:
                        yield maybeDeferred(child.stopService)
                    except Exception:
                        log.failure("stopping {service} failed", service=child)

        return stopInTurn()

    def startService(self) -> None:
        try:
            MultiService.startService(self)
        except SpoolLocked as e:
            self._fatal(f"spool.directory: {e}")
        except CannotListenError as e:
            # Children start in order: the first listener not running failed.
            failed = next(
                (c for c in self if isinstance(c, ListenerService) and not c.running), None
            )
            key = failed.configKey if failed is not None else "listeners"
            self._fatal(f"{key}: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")
        except ControlSocketError as e:
            self._fatal(f"control.socket: {e}")
        if self.freezeHeap:
            cast(Any, self.reactor).callWhenRunning(freezeStartupHeap)
        if self.systemd is not None:
            # Listeners bound, spool recovered; ready once the reactor runs
            # and so answers the connections waiting in the backlog.
            systemd = self.systemd
            cast(Any, self.reactor).callWhenRunning(
                systemd.ready, f"relaying; config {self.config.path}"
            )

    def _fatal(self, problem: str) -> None:
        """
        Startup cannot go on: one line on stderr, stop what already started
        (thread pools would otherwise keep the process alive), exit 1.
        """
        sys.stderr.write(f"relayd: {self.config.path}: {problem}\n")
        sys.stderr.flush()
        for child in reversed(list(self)):
            if child.running:
                with contextlib.suppress(Exception):
                    child.stopService()
        raise SystemExit(1)


def freezeStartupHeap() -> None:
    """
    Move every object alive now (modules, classes, the config, the
    services: tens of thousands after startup) to the garbage collector's
    permanent generation (C{gc.freeze}), once the process is set up.

    A full collection walks every tracked object; after startup, that was
    60-90 ms for relayd's heap on a 2-core machine, and under load one
    happens every few seconds: the tail of the time-to-250 (p99 50-90 ms in
    C{scripts/bench}) was made of them.  Frozen objects are not walked, so
    full collections only see what was allocated since; what is frozen is
    never collected, which costs nothing for objects that live as long as
    the process.  Every relayd process calls this as its reactor starts.

    It also shortens the interpreter's switch interval from 5 ms to 1 ms:
    a spool thread whose fsync returned waits that long for the GIL while
    the reactor thread is busy, and that wait was part of every commit's
    time to the C{250} (p99 14 ms at 5 ms, 8-11 ms at 1 ms, 250 messages a
    second on 2 cores).  relayd's threads only wait for the disk, DNS or a
    password hash, so the shorter interval adds few switches.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)


SWITCH_INTERVAL = 0.001
"""Seconds a thread waiting for the GIL lets the running one keep it (see L{freezeStartupHeap})."""


def _serverEndpoint(reactor: Any, text: str, path: str, key: str, checkOnly: bool) -> Any:
    """
    The server endpoint C{text} describes, or a L{ConfigError} naming
    C{key}.  A C{systemd:} endpoint needs the socket systemd passes
    (C{LISTEN_FDS}, a C{.socket} unit); when only checking the config
    (C{relayctl check-config}), its syntax is all there is to check.
    """
    import os

    from relayd.endpoints import endpointProblem, explainError, resolvePaths

    written = text
    # Relative file names (unix: sockets, ssl: keys) are the config
    # folder's, as every other path in the config file.
    text = resolvePaths(text, os.path.dirname(os.path.abspath(path)))
    problem = endpointProblem(text)
    if problem is not None:
        raise ConfigError(path, key, f"bad endpoint {written!r}: {problem}")
    try:
        return serverFromString(reactor, text)
    except (IndexError, KeyError) as e:
        if text.strip().startswith("systemd:"):
            if checkOnly:
                return None
            raise ConfigError(
                path,
                key,
                f"{text!r}: systemd passed no such socket (LISTEN_FDS, LISTEN_FDNAMES); "
                "start relayd from its .socket unit (etc/relayd.socket), or listen with tcp:",
            ) from None
        raise ConfigError(path, key, f"bad endpoint {written!r}: {explainError(e)}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(path, key, f"bad endpoint {written!r}: {explainError(e)}") from None


def buildService(
    config: Config,
    reactor: Any,
    receiver: dict[str, Any] | None = None,
    checkOnly: bool = False,
    limits: ConnectionLimits | None = None,
    counters: IRateCounterStore | None = None,
) -> RelaydService:
    """
    Make the whole service tree, checking everything that can be checked
    before listening: certificates, users file, policies, endpoint strings.

    @param receiver: None for the queue manager (the process twistd runs,
        which starts C{config.processes} receivers when that is above 1,
        L{relayd.receivers.ReceiverPool}); in a
        receiver process (L{relayd.receivers}), the endpoints of the
        inherited listening sockets by listener name: that tree only
        receives (no delivery, control socket or metrics) and its spool
        only commits.
    @param checkOnly: the tree is built to check the config, never started
        (C{relayctl check-config}): sockets systemd would pass are not
        required.
    @param limits: the connection limits to count in; by default new
        ones from C{config} (a receiver's are
        L{relayd.receivers.SharedLimits}).
    @param counters: in a receiver, the queue manager's rate counters
        (L{relayd.receivers.QueueManagerStore}), where its AUTH lockout
        and its C{ratelimit} policy with the memory backend count.
    @raise ConfigError: on any of those problems.
    """
    from relayd.certificates import (
        CertificateError,
        ReloadableServerOptions,
        TLSProfile,
        loadServerOptions,
    )
    from relayd.queue.spool import Spool
    from relayd.smtp.auth import IMailUser, Lockout, UsersFileChecker, UsersFileError, makePortal

    top = RelaydService(config)
    top.reactor = reactor
    metricsEndpoint = None
    if config.metricsEndpoint:
        if receiver is None:
            metricsEndpoint = _serverEndpoint(
                reactor, config.metricsEndpoint, config.path, "metrics.endpoint", checkOnly
            )
        # A receiver counts too; the queue manager serves the sums.
        top.metrics = Metrics()

    tlsOptions = None
    if config.tlsCertificate and config.tlsKey:
        try:
            tlsOptions = ReloadableServerOptions(
                loadServerOptions(
                    config.tlsCertificate,
                    config.tlsKey,
                    TLSProfile(config.tlsCiphers, config.tlsMinVersion),
                )
            )
        except CertificateError as e:
            key = "tls.key" if getattr(e, "path", None) == config.tlsKey else "tls.certificate"
            raise ConfigError(config.path, key, str(e)) from None
        top.tls = tlsOptions

    portal = None
    if config.usersFile:
        pool = ThreadPool(minthreads=1, maxthreads=config.authThreads, name="relayd-auth")
        ThreadPoolService(pool).setServiceParent(top)
        try:
            checker = UsersFileChecker(config.usersFile, pool, reactor)
        except UsersFileError as e:
            raise ConfigError(config.path, "auth.users_file", str(e)) from None
        portal = makePortal(checker)
        top.checker = checker

    # With receivers, rate counters kept in memory are the queue manager's,
    # for every process (relayd.receivers.QueueManagerStore).
    queueManagerCounters: MemoryStore | None = None
    if receiver is None and config.processes > 1:
        queueManagerCounters = MemoryStore(reactor)
        counters = queueManagerCounters
    policies, options = loadPolicies(config, reactor=reactor)
    shareCounters(policies, counters)
    chain = PolicyChain(policies, config.policyTimeout, reactor, options, top.metrics)
    top.policies = PolicyService(chain, reactor, top.factories, top.metrics, counters)
    top.policies.setServiceParent(top)

    spool = Spool(
        config.spoolDirectory,
        config.spoolReserveBytes,
        reactor,
        threads=config.spoolThreads,
        receiver=receiver is not None,
        journal=config.spoolJournal,
        # As long as the receivers of a queue manager that was killed may
        # take to stop (they hold the lock: relayd.receivers).
        lockWait=config.shutdownSessions + 10,
    )
    spool.logDurable = config.logLevel == "debug"
    spool.setServiceParent(top)
    top.spool = spool
    if config.deliveryEnabled and receiver is None:
        top.scheduler = _deliverySide(config, reactor, spool, top)
        top.metrics.watchQueue(top.scheduler)
    if receiver is None:
        top.metrics.watchSpool(spool)
    top.metrics.watchJournal(spool)
    metricsService = None
    if metricsEndpoint is not None:
        assert isinstance(top.metrics, Metrics)
        metricsService = ListenerService(metricsEndpoint, None, "metrics.endpoint")
        metricsService.setName("metrics")
        metricsService.setServiceParent(top)

    # Stopped after the listeners (children stop in reverse order) and
    # before the scheduler and the spool: the sessions in DATA still commit.
    SessionsService(top.factories, config.shutdownSessions).setServiceParent(top)

    if limits is None:
        limits = ConnectionLimits(config.maxConnections, config.maxConnectionsPerClient)
    top.limits = limits
    listeners: list[ListenerService] = []
    if receiver is not None:
        lockout = Lockout(reactor, queueManager=counters)
    else:
        lockout = Lockout(reactor, memory=queueManagerCounters)
    for i, listener in enumerate(config.listeners):
        factory = SMTPFactory(
            config=config,
            listener=listener.name,
            mode=listener.mode,
            spool=spool,
            chain=chain,
            portal=portal,
            avatarInterface=IMailUser,
            tlsOptions=None if listener.mode == "submissions" else tlsOptions,
            limits=limits,
            clock=reactor,
            metrics=top.metrics,
            lockout=lockout,
        )
        top.factories.append(factory)
        wrapped: Any = factory
        if listener.mode == "submissions":
            # load() refuses a submissions listener without [tls], so the
            # options are there; cast rather than check, to keep behaviour.
            wrapped = TLSMemoryBIOFactory(cast("CertificateOptions", tlsOptions), False, factory)
        if listener.proxyProtocol:
            # The PROXY header comes first, before TLS on port 465.
            wrapped = ProxyFactory(
                wrapped,
                networks=listener.proxyFrom,
                timeout=config.timeoutProxyHeader,
                clock=reactor,
                listener=listener.name,
            )
        if receiver is not None:
            if listener.name not in receiver:
                continue  # not handed to this receiver: the queue manager's alone
            endpoint = receiver[listener.name]
        else:
            endpoint = _serverEndpoint(
                reactor, listener.endpoint, config.path, f"listeners[{i}].endpoint", checkOnly
            )
        svc = ListenerService(endpoint, wrapped, sendAtOnce=True)
        svc.setName(f"listener:{listener.name}")
        svc.listenerName = listener.name
        svc.setServiceParent(top)
        listeners.append(svc)
    if receiver is not None:
        return top
    if config.processes > 1:
        from relayd.receivers import ReceiverPool

        top.receivers = ReceiverPool(
            configPath=config.path,
            count=config.processes,
            listeners=listeners,
            spool=spool,
            reactor=reactor,
            stopDeadline=config.shutdownSessions + 10,
            limits=limits,
            counters=queueManagerCounters,
        )
        top.receivers.setServiceParent(top)
    if metricsService is not None:
        assert isinstance(top.metrics, Metrics)
        registry: Any = top.metrics.registry
        pools = [p for p in (top.receivers, top.deliveries) if p is not None]
        if pools:
            registry = SummedRegistry(
                registry, lambda: [samples for p in pools for samples in p.metricsSamples()]
            )
        metricsService.factory = metricsSite(registry, reactor)
    # After the listeners: relayd-sendmail's maildrop is submitted to one.
    from relayd.ops.pickup import MaildropService

    MaildropService(top, reactor).setServiceParent(top)
    # Last: it starts once the spool holds its lock, and stops first.
    ControlService(top, spool, reactor).setServiceParent(top)
    if not checkOnly:
        top.systemd = SystemdNotifier(reactor)
    return top


_RESTART_FIELDS = {
    "listeners": "listeners",
    "spoolDirectory": "spool.directory",
    "spoolThreads": "spool.threads",
    "spoolJournal": "spool.journal",
    "authThreads": "auth.threads",
    "deliveryEnabled": "delivery.enabled",
    "resolvers": "delivery.resolvers",
    "resolverPort": "delivery.resolver_port",
    "dane": "delivery.dane",
    "caFile": "delivery.ca_file",
    "deliveryConcurrency": "delivery.concurrency",
    "deliveryProcesses": "delivery.processes",
    "maildropDirectory": "maildrop.directory",
    "maildropInterval": "maildrop.interval",
}


@inlineCallbacks
def _reload(top: RelaydService) -> Any:
    from relayd.certificates import CertificateError, TLSProfile, loadServerOptions
    from relayd.config import load
    from relayd.smtp.auth import UsersFile, UsersFileError

    log.info("reload: reading {path}", path=top.config.path)

    top.reloadError = None

    def refuse(problem: str) -> bool:
        log.error("reload refused, the old config stays in force: {problem}", problem=problem)
        top.reloadError = problem
        return False

    try:
        config = load(top.config.path)
    except ConfigError as e:
        return refuse(str(e))
    old = top.config
    tlsOptions = None
    if top.tls is not None and config.tlsCertificate and config.tlsKey:
        try:
            tlsOptions = loadServerOptions(
                config.tlsCertificate,
                config.tlsKey,
                TLSProfile(config.tlsCiphers, config.tlsMinVersion),
            )
        except CertificateError as e:
            key = "tls.key" if getattr(e, "path", None) == config.tlsKey else "tls.certificate"
            return refuse(f"{config.path}: {key}: {e}")
    usersFile = None
    if top.checker is not None and config.usersFile:
        try:
            usersFile = UsersFile(config.usersFile, top.reactor)
        except UsersFileError as e:
            return refuse(f"{config.path}: auth.users_file: {e}")
    assert top.policies is not None
    ok = yield top.policies.reload(config)
    if not ok:
        top.reloadError = top.policies.reloadError
        return False
    # Checked; now put it in force.
    if tlsOptions is not None and top.tls is not None:
        top.tls.current = tlsOptions
    if usersFile is not None and top.checker is not None:
        top.checker.usersFile = usersFile
    if top.router is not None and config.deliveryEnabled:
        top.router.reconfigure(config.routes, config.deliveryPort, config.mxTls, (config.hostname,))
        if top.deliverer is not None:
            # Delivery processes read the file again themselves.
            applyDeliveryConfig(top.deliverer, config)
    for factory in top.factories:
        factory.config = config
    if top.limits is not None:
        top.limits.total = config.maxConnections
        top.limits.perClient = config.maxConnectionsPerClient
    top.config = config
    changed = [
        key
        for field, key in _RESTART_FIELDS.items()
        if getattr(old, field) != getattr(config, field)
    ]
    if changed:
        log.warn(
            "reload: {keys} changed; that takes effect after a restart",
            keys=", ".join(changed),
        )
    log.info("reload: new config in force")
    return True


class SessionsService(Service):
    """
    On shutdown, once the listeners are closed: ends the SMTP sessions
    gracefully (L{SMTPFactory.shutdown}) within C{deadline} seconds.
    """

    def __init__(self, factories: list[SMTPFactory], deadline: float) -> None:
        self.factories = factories
        self.deadline = deadline

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        from twisted.internet.defer import gatherResults

        count = sum(len(f.sessions) for f in self.factories)
        if count:
            log.info(
                "shutdown: closing {count} SMTP sessions (deadline {deadline}s)",
                count=count,
                deadline=self.deadline,
            )
        return gatherResults([f.shutdown(self.deadline) for f in self.factories])


def shareCounters(policies: list[Any], counters: IRateCounterStore | None) -> None:
    """
    Give the policies that count in a memory store of their own (the
    C{ratelimit} policy with the memory backend) C{counters} instead: the
    queue manager's, where every receiving process counts, so that their
    limits are the whole relayd's.  None (one process) changes nothing.
    """
    if counters is None:
        return
    for policy in policies:
        if isinstance(getattr(policy, "store", None), MemoryStore):
            policy.store = counters


class PolicyService(Service):
    """
    Owns the policy chain: starts and stops the policies that have a
    lifecycle, and swaps in a new chain on reload without dropping
    sessions (a session in progress uses the new chain from its next
    command on).
    """

    def __init__(
        self,
        chain: PolicyChain,
        reactor: Any,
        factories: list[Any],
        metrics: NoMetrics = NO_METRICS,
        counters: IRateCounterStore | None = None,
    ) -> None:
        """
        @param counters: where the policies' rate counters kept in memory
            are, when several processes receive (L{shareCounters}).
        """
        self.chain = chain
        self.reactor = reactor
        self.factories = factories
        self.metrics = metrics
        self.counters = counters
        self.reloadError: str | None = None

    def startService(self) -> None:
        Service.startService(self)
        startPolicies(self.chain.names, self.reactor)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return stopPolicies(self.chain.names)

    @inlineCallbacks
    def reload(self, config: Config) -> Any:
        old = self.chain
        self.reloadError = None
        try:
            policies, options = loadPolicies(config, previous=old, reactor=self.reactor)
        except ConfigError as e:
            log.error("reload refused, the old config stays in force: {error}", error=str(e))
            self.reloadError = str(e)
            return False
        shareCounters(policies, self.counters)
        chain = PolicyChain(policies, config.policyTimeout, self.reactor, options, self.metrics)
        kept = {n: p for n, p in chain.names.items() if any(p is q for q in old.policies)}
        added = {n: p for n, p in chain.names.items() if n not in kept}
        dropped = {n: p for n, p in old.names.items() if not any(p is q for q in policies)}
        yield startPolicies(added, self.reactor)
        for name, policy in kept.items():
            if IReloadable.providedBy(policy):
                try:
                    yield maybeDeferred(policy.reload)
                except Exception:
                    log.failure(
                        "policy {policy} could not reload; it keeps its old data", policy=name
                    )
        self.chain = chain
        for factory in self.factories:
            factory.chain = self.chain
        yield stopPolicies(dropped)
        log.info("reload: policy chain now {chain}", chain=" ".join(chain.names) or "empty")
        return True


class ResolverService(Service):
    """Runs the DNS resolver's own thread pool with the service tree."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def startService(self) -> None:
        Service.startService(self)
        self.resolver.start()

    def stopService(self) -> None:
        Service.stopService(self)
        self.resolver.stop()


def _deliverySide(config: Config, reactor: Any, spool: IQueue, top: RelaydService) -> Scheduler:
    """Resolver, router, deliverer and scheduler (DESIGN sections 1 and 6)."""
    from relayd.delivery.routing import MXResolver, Router
    from relayd.queue.scheduler import Scheduler
    from relayd.queue.suspend import Suspensions

    resolver = MXResolver(
        reactor,
        list(config.resolvers) or None,
        port=config.resolverPort,
        timeout=config.dnsTimeout,
    )
    ResolverService(resolver).setServiceParent(top)
    router = top.router = Router(
        resolver,
        config.routes,
        port=config.deliveryPort,
        mxTls=config.mxTls,
        localNames=(config.hostname,),
    )
    deliverer: IDeliverer
    if config.deliveryProcesses > 0:
        from relayd.delivery.processes import DeliveryPool

        # Before the scheduler: it stops after it (children stop in reverse).
        pool = top.deliveries = DeliveryPool(
            configPath=config.path,
            count=config.deliveryProcesses,
            reactor=reactor,
            stopDeadline=config.shutdownDeliveries + 10,
        )
        pool.setServiceParent(top)
        deliverer = pool
    else:
        deliverer = top.deliverer = makeDeliverer(config, reactor)
    scheduler = Scheduler(
        spool=spool,
        router=router,
        deliverer=deliverer,
        clock=reactor,
        hostname=config.hostname,
        concurrency=config.deliveryConcurrency,
        perDestination=config.perDestination,
        retryInitial=config.retryInitial,
        retryMax=config.retryMax,
        lifetime=config.lifetime,
        delayWarning=config.delayWarning,
        sweepInterval=config.sweepInterval,
        stopDeadline=config.shutdownDeliveries,
        postmaster=config.postmaster,
        metrics=top.metrics,
    )
    # relayctl destination suspend|resume (read from the spool at start).
    scheduler.suspensions = Suspensions(spool.directory)
    if config.mtaSts:
        scheduler.tlsPolicies = _mtaStsPolicies(config, reactor, resolver, top)
    if config.mtaSts or config.dane:
        scheduler.tlsReports = _tlsReports(config, reactor, resolver, spool, top)
        if scheduler.tlsPolicies is not None:
            scheduler.tlsPolicies.fetchFailed = _countFetchFailure(scheduler.tlsReports)
    scheduler.setServiceParent(top)
    return scheduler


def _tlsReports(
    config: Config, reactor: Any, resolver: Any, spool: IQueue, top: RelaydService
) -> TLSReportCounts:
    """
    TLSRPT (RFC 8460, L{relayd.delivery.tlsrpt}) in the queue manager: the
    counts in C{<spool>/tlsrpt/}, and the daily reports, sent only with
    C{[delivery] tlsrpt = true}.  Before the scheduler in the service tree,
    so that it stops after it and writes the last counts.
    """
    from relayd.delivery.attempt import loadTrustRoot
    from relayd.delivery.tlsrpt import TLSReportCounts, TLSReporter

    counts = top.tlsReports = TLSReportCounts(reactor, config.spoolDirectory)
    TLSReporter(
        trustRoot=loadTrustRoot(config.caFile) if config.caFile is not None else None,
        counts=counts,
        resolver=resolver,
        spool=spool,
        clock=reactor,
        submitter=config.hostname,
        organization=config.tlsrptOrganization,
        contact=config.tlsrptContact,
        send=config.tlsrpt,
    ).setServiceParent(top)
    return counts


def _countFetchFailure(counts: TLSReportCounts) -> Callable[[str, str, str], None]:
    """An MTA-STS policy fetch that failed, counted as a failed C{sts} session."""
    from relayd.delivery.tlsrpt import TLSSession

    def count(domain: str, resultType: str, why: str) -> None:
        counts.add("sts", domain, TLSSession("", "", "", resultType, why))

    return count


class _PolicyCacheService(Service):
    """Reads the MTA-STS policy cache back from the spool at startup."""

    def __init__(self, policies: Any) -> None:
        self.policies = policies

    def startService(self) -> None:
        Service.startService(self)
        self.policies.loadCache()


def _mtaStsPolicies(config: Config, reactor: Any, resolver: Any, top: RelaydService) -> Any:
    """
    MTA-STS for MX delivery (RFC 8461, L{relayd.delivery.mtasts}), in the
    queue manager: policy hosts verified like C{verify} hops, with
    C{ca_file}, else the system's trust store; the cache in the spool.

    @raise OSError: the CA file cannot be read.
    @raise ValueError: it holds no certificate.
    """
    from relayd.delivery.mtasts import MTASTSPolicies

    policies = MTASTSPolicies(
        reactor,
        resolver,
        config.spoolDirectory,
        caFile=config.caFile,
        port=config.mtaStsPort,
        timeout=config.mtaStsTimeout,
    )
    _PolicyCacheService(policies).setServiceParent(top)
    return policies


def makeDeliverer(config: Config, reactor: Any) -> Deliverer:
    """
    The L{relayd.delivery.attempt.Deliverer} the config asks for: in the queue
    manager, or in each delivery process (L{relayd.delivery.processes}).

    @raise OSError: C{delivery.ca_file} cannot be read.
    @raise ValueError: it holds no certificate.
    """
    from relayd.certificates import TLSProfile
    from relayd.delivery.attempt import Deliverer
    from relayd.delivery.client import ClientTimeouts

    dane = None
    if config.dane:
        from relayd.delivery.dane import DaneResolver

        dane = DaneResolver(
            reactor,
            list(config.resolvers),
            port=config.resolverPort,
            timeout=config.dnsTimeout,
        )
    return Deliverer(
        reactor,
        config.hostname,
        dane=dane,
        timeouts=_clientTimeouts(ClientTimeouts, config),
        caFile=config.caFile,
        maxMessagesPerConnection=config.messagesPerConnection,
        idleTimeout=config.idleTimeout,
        reuseTimeLimit=config.reuseTimeLimit,
        tlsProfile=TLSProfile(config.tlsCiphers, config.tlsMinVersion),
        opportunisticProfile=TLSProfile(config.tlsOpportunisticCiphers, config.tlsMinVersion),
    )


def applyDeliveryConfig(deliverer: Deliverer, config: Config) -> None:
    """
    Put a reloaded config's outbound TLS settings in force in a
    L{relayd.delivery.attempt.Deliverer}: read by each new outbound connection;
    open ones keep theirs.
    """
    from relayd.certificates import TLSProfile

    deliverer.tlsProfile = TLSProfile(config.tlsCiphers, config.tlsMinVersion)
    deliverer.opportunisticProfile = TLSProfile(
        config.tlsOpportunisticCiphers, config.tlsMinVersion
    )


def reloadDeliverer(deliverer: Deliverer, path: str) -> bool:
    """
    SIGHUP in a delivery process: read the config at C{path} again and put
    its outbound settings in force; an invalid one is refused with one log
    line and the old one stays.
    """
    from relayd.config import load

    log.info("reload: reading {path}", path=path)
    try:
        config = load(path)
    except ConfigError as e:
        log.error("reload refused, the old config stays in force: {problem}", problem=str(e))
        return False
    applyDeliveryConfig(deliverer, config)
    log.info("reload: new config in force")
    return True


def _clientTimeouts(kind: Any, config: Config) -> Any:
    """
    The outbound client's per-stage timeouts from the three config keys,
    keeping RFC 5321 section 4.5.3.2's shorter stages (DATA initiation 2
    minutes, each data block 3 minutes) when the configured ones are longer.
    """
    command = config.commandTimeout
    return kind(
        connect=config.connectTimeout,
        greeting=command,
        helo=command,
        mail=command,
        rcpt=command,
        dataInit=min(120.0, command),
        dataBlock=min(180.0, config.dataTimeout),
        dataDone=config.dataTimeout,
        rset=min(20.0, command),
        quit=min(20.0, command),
    )
