"""
Builds relayd's service tree from a L{relayd.config.Config}.

Startup order is the order children are added: thread pools, then the spool
(whose recovery runs before anything listens), then the listeners.
L{MultiService} stops children in reverse order, so on shutdown the
listeners close first and the spool's thread pool finishes the commits in
flight before the process exits.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayd.config import Config, ConfigError
from relayd.policy import PolicyChain, loadPolicies
from relayd.server import ConnectionLimits, SMTPFactory

__all__ = ["RelaydService", "ListenerService", "ThreadPoolService", "buildService"]


class ListenerService(Service):
    """
    Listens on one endpoint while running.  Unlike
    L{twisted.application.internet.StreamServerEndpointService} it raises a
    bind failure synchronously from L{startService} and keeps the bound
    port in L{port}, so tests can listen on port 0 and ask which it got.
    """

    def __init__(self, endpoint: Any, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("endpoint did not listen synchronously")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class ThreadPoolService(Service):
    """Starts and stops a L{ThreadPool} with the service tree."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class RelaydService(MultiService):
    """
    The top of the tree.  A listener that cannot bind stops startup with one
    line instead of a traceback.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.factories: list[SMTPFactory] = []

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            sys.stderr.write(
                f"relayd: {self.config.path}: listeners: cannot listen on "
                f"{e.interface or '*'}:{e.port}: {e.socketError}\n"
            )
            raise SystemExit(1) from None


def buildService(config: Config, reactor: Any) -> RelaydService:
    """
    Make the whole service tree, checking everything that can be checked
    before listening: certificates, users file, policies, endpoint strings.

    @raise ConfigError: on any of those problems.
    """
    from relayd.auth import IMailUser, UsersFileChecker, UsersFileError, makePortal
    from relayd.certificates import CertificateError, loadServerOptions
    from relayd.spool import Spool

    top = RelaydService(config)

    tlsOptions = None
    if config.tlsCertificate and config.tlsKey:
        try:
            tlsOptions = loadServerOptions(config.tlsCertificate, config.tlsKey)
        except CertificateError as e:
            key = "tls.key" if getattr(e, "path", None) == config.tlsKey else "tls.certificate"
            raise ConfigError(config.path, key, str(e)) from None

    portal = None
    if config.usersFile:
        pool = ThreadPool(minthreads=1, maxthreads=config.authThreads, name="relayd-auth")
        ThreadPoolService(pool).setServiceParent(top)
        try:
            checker = UsersFileChecker(config.usersFile, pool, reactor)
        except UsersFileError as e:
            raise ConfigError(config.path, "auth.users_file", str(e)) from None
        portal = makePortal(checker)

    chain = PolicyChain(loadPolicies(config), config.policyTimeout, reactor)

    spool = Spool(
        config.spoolDirectory, config.spoolReserveBytes, reactor, threads=config.spoolThreads
    )
    spool.setServiceParent(top)

    limits = ConnectionLimits(config.maxConnections, config.maxConnectionsPerClient)
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
        )
        top.factories.append(factory)
        wrapped: Any = factory
        if listener.mode == "submissions":
            wrapped = TLSMemoryBIOFactory(tlsOptions, False, factory)
        try:
            endpoint = serverFromString(reactor, listener.endpoint)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                config.path, f"listeners[{i}].endpoint", f"bad endpoint {listener.endpoint!r}: {e}"
            ) from None
        svc = ListenerService(endpoint, wrapped)
        svc.setName(f"listener:{listener.name}")
        svc.setServiceParent(top)
    return top
