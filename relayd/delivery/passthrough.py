"""
The outbound half of relaying in session (C{mode = "passthrough"} routes,
L{relayd.smtp.passthrough}): one connection to a route's next hop, opened
while relayd's own client is still connected, and driven one command at a
time as that client's commands come in.

  - L{Upstream} is relayd's outbound L{SMTPClient} (greeting, EHLO,
    STARTTLS and AUTH, OAuth2 included, as the hop says; the same
    timeouts) with public steps instead of one whole transaction:
    L{Upstream.mail}, L{Upstream.rcpt}, L{Upstream.message} (DATA and the
    message, dot-stuffed by L{relayd.smtp.wire.DotStuffer}), L{Upstream.close}.
    Every step fires with a L{Reply} and never errbacks: when the
    connection is lost or times out, the reply is relayd's own
    (C{remote} False, C{451 4.4.2}).
  - L{Connector} opens one, trying the route's hops in order, as delivery
    tries a route's hops (L{relayd.delivery.attempt.Deliverer}); when none
    can take mail it fails with the last hop's L{HopFailure}.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import IO, Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.python.failure import Failure

from relayd.certificates import TLSProfile
from relayd.config import Config
from relayd.delivery.attempt import _QuietFactory, loadTrustRoot
from relayd.delivery.client import ClientTimeouts, HopFailure, Reply, SMTPClient, _unexpected
from relayd.delivery.endpoint import hopEndpoint, relayName
from relayd.delivery.oauth2 import TokenSources
from relayd.delivery.routing import Hop, Route, _ipLiteral
from relayd.ops.logs import Logger

__all__ = ["Connector", "Upstream", "messageFile"]

log = Logger(namespace="relayd.smtp")


def _asReply(failure: Failure) -> Reply:
    """
    A step that ended with the connection (L{SMTPClient}'s lost-session
    error, which carries relayd's own reply): that reply.  Anything else
    is a bug and goes on as a failure.
    """
    reply = getattr(failure.value, "reply", None)
    if isinstance(reply, Reply):
        return reply
    failure.raiseException()
    raise AssertionError("unreachable")  # pragma: no cover


class Upstream(SMTPClient):
    """
    One session with a passthrough route's next hop, driven step by step.

    @ivar sending: True from the first octet of the message until the
        final dot is written: closing then must abort the connection, so
        that no partial message is ever taken (the final dot is never sent).
    """

    sending = False

    @property
    def inStep(self) -> bool:
        """True while the connection is up and in step."""
        return self._connected and not self._broken and not self._closing

    @property
    def relay(self) -> str:
        """The hop as log lines name it: C{host[address]:port}."""
        return relayName(self.hop)

    def command(self, line: bytes, stage: str, timeout: float) -> Deferred[Reply]:
        """Send one command; fire with its reply, or relayd's own when the session ends."""
        return self._command(line, stage, timeout).addErrback(_asReply)

    def mail(self, line: bytes) -> Deferred[Reply]:
        """C{MAIL FROM:<...> ...} (the line without CRLF)."""
        self._needReset = True
        self.messages += 1
        return self.command(line, "sending MAIL FROM", self.timeouts.mail)

    def rcpt(self, line: bytes) -> Deferred[Reply]:
        """C{RCPT TO:<...> ...} (the line without CRLF)."""
        return self.command(line, "sending RCPT TO", self.timeouts.rcpt)

    @inlineCallbacks
    def message(self, file: IO[bytes]) -> Generator[Deferred[Any], Any, Reply]:
        """
        DATA, then (after C{354}) the message in C{file} dot-stuffed and
        ended with the final dot.

        @return: the reply to DATA when it was not C{354}, else the reply
            to the end of data; relayd's own when the session ended first.
        """
        reply: Reply = yield self.command(b"DATA", "sending DATA", self.timeouts.dataInit)
        if reply.code != 354:
            if reply.code // 100 == 2:
                return _unexpected(reply, self.peer, "DATA")
            return reply
        self.sending = True
        try:
            final: Reply = yield self._sendData(file).addErrback(_asReply)
        finally:
            self.sending = False
        self._needReset = False
        return final

    def _dataSent(self) -> None:
        self.sending = False
        SMTPClient._dataSent(self)

    def close(self) -> Deferred[None]:
        """
        End the session: RSET when a transaction is open, then QUIT, when
        it is in step; else cut it.  While the message
        is being written the connection is aborted, so the final dot is
        never sent and the next hop takes nothing.
        """
        if self.sending and self.transport is not None:
            self._abort(Reply.local(451, "4.4.2", f"passthrough to {self.relay} abandoned"))
            return self.quit()
        if self._needReset and self.inStep and not self._waiting:
            # The client's RSET (or its leaving) as the upstream sees it:
            # the transaction ends, then the session.
            self._needReset = False
            reset = self.command(b"RSET", "sending RSET", self.timeouts.rset)
            reset.addCallback(lambda _: self.quit())
            return self.whenClosed()
        return self.quit()


class _Parts(io.RawIOBase):
    """
    A message as one readable file: the header section a message policy
    rewrote (or nothing), then the received file from C{offset} to C{end}.
    """

    def __init__(self, header: bytes, path: str, offset: int, end: int) -> None:
        super().__init__()
        self._header = header
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close)
        self._file.seek(offset)
        self._left = max(end - offset, 0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._header:
            n = min(len(view), len(self._header))
            view[:n] = self._header[:n]
            self._header = self._header[n:]
            return n
        data = self._file.read(min(len(view), self._left))
        self._left -= len(data)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def messageFile(header: bytes, path: str, offset: int, end: int) -> IO[bytes]:
    """
    The message to send from a received file at C{path}: C{header} (the
    header section as message policies left it; C{b""} when unchanged),
    then the file's octets from C{offset} up to C{end}.

    @raise OSError: the file cannot be opened.
    """
    return io.BufferedReader(_Parts(header, path, offset, end))


def _hops(route: Route) -> list[Hop]:
    """
    A route's next hops as L{Hop}s, in order.  A name stays a name: the
    endpoint resolves it (L{hopEndpoint}); the session has no MX resolver
    of its own.
    """
    return [config.hop(_ipLiteral(config.host) or config.host) for config in route.hops]


class Connector:
    """
    Opens L{Upstream} sessions to passthrough routes' next hops, with the
    outbound settings delivery uses (EHLO name, timeouts, CA file, TLS
    profiles, OAuth2 tokens shared by the sessions of one listener).
    """

    def __init__(self, reactor: Any, config: Config) -> None:
        """
        @raise OSError: C{delivery.ca_file} cannot be read.
        @raise ValueError: it holds no certificate.
        """
        self.reactor = reactor
        self.tokens = TokenSources(reactor)
        self.clients: set[Upstream] = set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """
        Take the outbound settings of C{config} (at start and after a
        reload): EHLO name, the delivery timeouts, C{ca_file}, the TLS
        profiles.  Open sessions keep theirs.

        @raise OSError: C{delivery.ca_file} cannot be read.
        @raise ValueError: it holds no certificate.
        """
        from relayd.service import _clientTimeouts

        self.config = config
        self.heloName = config.hostname
        self.timeouts: ClientTimeouts = _clientTimeouts(ClientTimeouts, config)
        self.trustRoot = loadTrustRoot(config.caFile) if config.caFile is not None else None
        self.tlsProfile = TLSProfile(config.tlsCiphers, config.tlsMinVersion)
        self.opportunisticProfile = TLSProfile(config.tlsOpportunisticCiphers, config.tlsMinVersion)

    @inlineCallbacks
    def open(self, route: Route) -> Generator[Deferred[Any], Any, Upstream]:
        """
        Connect to the first of C{route}'s hops that takes a session.

        @raise HopFailure: the last hop's, when none does.
        """
        failure: HopFailure | None = None
        for hop in _hops(route):
            try:
                upstream: Upstream = yield self._connect(hop)
            except HopFailure as e:
                log.info(
                    "passthrough to {relay}: {reply}", relay=relayName(hop), reply=str(e.reply)
                )
                failure = e
                continue
            return upstream
        assert failure is not None, "a route has at least one hop"
        raise failure

    @inlineCallbacks
    def _connect(self, hop: Hop) -> Generator[Deferred[Any], Any, Upstream]:
        from relayd.delivery.attempt import _connectError

        client = Upstream(
            hop,
            self.heloName,
            self.timeouts,
            self.reactor,
            self.trustRoot,
            self.tlsProfile,
            self.opportunisticProfile,
            tokens=self.tokens,
        )
        endpoint = hopEndpoint(self.reactor, hop.address, hop.port, self.timeouts.connect)
        try:
            yield endpoint.connect(_QuietFactory(client))
        except Exception:
            raise HopFailure(_connectError(hop, Failure()), connected=False) from None
        self.clients.add(client)
        client.whenClosed().addCallback(lambda _: self.clients.discard(client))
        yield client.ready
        return client

    def stop(self, deadline: float = 5.0) -> Deferred[None]:
        """
        End every upstream session still open (relayd is stopping, its
        client sessions gone): QUIT, and after C{deadline} seconds cut
        those still there.  Fires once they are all closed.
        """
        clients = list(self.clients)
        for client in clients:
            client.close()

        def late() -> None:
            for client in list(self.clients):
                if client.transport is not None:
                    client.transport.abortConnection()

        timer = self.reactor.callLater(deadline, late)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()

        closing = [client.whenClosed() for client in clients]
        closing.append(self.tokens.stop())
        return DeferredList(closing, consumeErrors=True).addCallback(finished)
