"""
relayd's ESMTP server: an explicit state machine on L{LineReceiver}.

C{twisted.mail.smtp} is the behavioural reference, not the base class: the
stock server has protocol-level gaps (DESIGN section 4) that a subclass would
have to override nearly everywhere.  What this module does differently:

  - Command lines end only with CRLF.  The delimiter is LF so that a bare LF
    is noticed at once and answered C{500 5.5.2} instead of waiting forever;
    a bare CR inside a line gets the same answer.
  - DATA is read in raw mode, chunk by chunk, by
    L{relayd.smtp.wire.DataReader}: only
    C{CRLF.CRLF} ends it.  Bare CR, bare LF and NUL anywhere in the message,
    over-long lines and over-size messages get the message refused after the
    real end, never a second message (SMTP smuggling) and never a fall back
    to command mode.
  - BDAT (RFC 3030 CHUNKING) reads exactly the octets each command counts,
    in raw mode, and checks them with L{relayd.smtp.wire.ChunkReader}
    under the same line rules, because the message may be relayed as DATA.
    A refused BDAT whose count could be read still has its octets read and
    dropped, so that they are never taken for commands.
  - C{STARTTLS} throws away everything the client pipelined after it
    (CVE-2011-0411 class) and forgets EHLO, AUTH and the transaction.
  - Pipelined commands are answered strictly in order: while a policy, the
    password check or the spool commit is under way the protocol stops
    reading (L{LineReceiver.pauseProducing}) and picks up where it left off.
  - C{250} after DATA is sent only once the spool says the message is
    durable; a spool failure answers 451/452, never 250 and never 5xx.
  - Timeouts are deadlines, not reset by every octet: a command line must
    be complete C{timeouts.command} seconds after relayd is ready for it,
    and a DATA transfer within C{timeouts.data_deadline} plus what its
    octets earn at C{timeouts.data_min_rate}, so a client trickling octets
    cannot hold its connection slot for ever.
  - AUTH failures also count across connections, per client address and
    per user name at that address (L{relayd.smtp.auth.Lockout}); above a limit
    AUTH gets C{454 4.7.0} before any password is checked.

Replies carry RFC 3463 enhanced status codes (RFC 2034), except the greeting,
the EHLO/HELO answers and the 3xx intermediate replies, where RFC 2034
section 3 leaves them out; L{relayd.reply.Reply} checks each one.

The session drives the other rooms of L{relayd.smtp}: the AUTH mechanisms'
dialogue is L{relayd.smtp.sasl}, and what EHLO advertises and which MAIL
and RCPT parameters are read is the table in L{relayd.smtp.extensions}.
"""

from __future__ import annotations

import datetime
import errno
import functools
import ipaddress
import random
import re
import time
from collections.abc import Callable
from email.utils import format_datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLContextFactory, IReactorTime
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from relayd.address import AddressError, parseParameters, parsePath
from relayd.config import Config
from relayd.delivery import requiretls
from relayd.delivery.routing import matchRoute
from relayd.envelope import FIRST_READ, Envelope, Message, Recipient, Session
from relayd.interfaces import IIncomingSpool
from relayd.ops.logs import ABSENT, Logger, idFields
from relayd.ops.metrics import NO_METRICS, NoMetrics
from relayd.policy import PolicyChain
from relayd.queue.record import QueueRecord
from relayd.reply import Reply
from relayd.smtp import extensions, passthrough, sasl
from relayd.smtp.auth import Lockout
from relayd.smtp.transport import allSent
from relayd.smtp.wire import COMMAND_LINE, ChunkReader, DataReader
from relayd.timeouts import IdleTimer
from relayd.verdict import Action, Verdict

if TYPE_CHECKING:
    from relayd.delivery.client import Reply as UpstreamReply
    from relayd.delivery.passthrough import Connector, Upstream

__all__ = ["SMTPServer", "SMTPFactory", "ConnectionLimits"]

log = Logger(namespace="relayd.smtpd")

HTTP_VERBS = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT", "OPTIONS"})


class ConnectionLimits:
    """
    Connection counts shared by all listeners of one relayd: in total and
    per client address.
    """

    def __init__(self, total: int, perClient: int) -> None:
        self.total = total
        self.perClient = perClient
        self.current = 0
        self.byClient: dict[str, int] = {}

    def open(self, client: str) -> str | Deferred[str | None] | None:
        """
        Count a new connection; return the reason when over a limit, or
        None.  A receiver's limits answer later (a Deferred), once the
        queue manager has counted (L{relayd.receivers.SharedLimits}).
        """
        return self.admit(client)

    def admit(self, client: str) -> str | None:
        """Count a new connection here; return the reason when over a limit."""
        if self.current >= self.total:
            return "too many connections"
        if self.byClient.get(client, 0) >= self.perClient:
            return "too many connections from your address"
        self.current += 1
        self.byClient[client] = self.byClient.get(client, 0) + 1
        return None

    def close(self, client: str) -> None:
        """Give back a slot counted by L{open} (or L{admit})."""
        self.current -= 1
        left = self.byClient.get(client, 1) - 1
        if left:
            self.byClient[client] = left
        else:
            self.byClient.pop(client, None)


class SMTPFactory(ServerFactory["SMTPServer"]):
    """
    Builds L{SMTPServer} sessions for one listener.

    @ivar mode: C{"relay"}, C{"submission"} or C{"submissions"}.
    @ivar implicitTLS: the listener's endpoint is wrapped in TLS (465).
    @ivar tlsOptions: server TLS options for STARTTLS, or None.
    @ivar portal: a L{twisted.cred.portal.Portal} for AUTH, or None.
    @ivar avatarInterface: the interface asked of the portal.
    @ivar metrics: where connections, AUTH results and messages are
        counted (L{relayd.ops.metrics}); by default nowhere.
    @ivar lockout: AUTH failures across connections (L{relayd.smtp.auth.Lockout}),
        shared by the listeners of one relayd.
    """

    def __init__(
        self,
        *,
        config: Config,
        listener: str,
        mode: str,
        spool: IIncomingSpool,
        chain: PolicyChain,
        portal: Portal | None,
        avatarInterface: type[Interface],
        tlsOptions: IOpenSSLContextFactory | None,
        limits: ConnectionLimits,
        clock: IReactorTime,
        metrics: NoMetrics = NO_METRICS,
        lockout: Lockout | None = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.mode = mode
        self.implicitTLS = mode == "submissions"
        self.spool = spool
        self.chain = chain
        self.portal = portal
        self.avatarInterface = avatarInterface
        self.tlsOptions = tlsOptions
        self.limits = limits
        self.clock = clock
        self.metrics = metrics
        self.lockout = Lockout(clock) if lockout is None else lockout
        # Opens upstream sessions for passthrough routes, made when first
        # needed (relayd.smtp.passthrough).
        self.connector: Connector | None = None
        self.sessions: set[SMTPServer] = set()
        self.shuttingDown = False
        self._emptyWaiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPServer:
        p = SMTPServer()
        p.factory = self
        return p

    def sessionGone(self, session: SMTPServer) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            waiters, self._emptyWaiters = self._emptyWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def shutdown(self, deadline: float) -> Deferred[None]:
        """
        Graceful shutdown, once the listener stopped accepting: idle
        sessions get C{421 4.3.2} now; a session receiving DATA or waiting
        for its commit or a policy finishes that, gets its reply (the
        C{250}, so nothing accepted is lost) and then the C{421}.  After
        C{deadline} seconds the sessions still open are cut; a message cut
        before its C{250} was never accepted, and the client retries.

        @return: a Deferred firing when every session is gone.
        """
        self.shuttingDown = True
        for session in list(self.sessions):
            session.shutdown()
        if not self.sessions:
            return self._stopConnector(None)
        done: Deferred[None] = Deferred()
        self._emptyWaiters.append(done)

        def late() -> None:
            for session in list(self.sessions):
                session.abort()

        timer = self.clock.callLater(deadline, late)

        def finished(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return done.addCallback(finished).addCallback(self._stopConnector)

    def _stopConnector(self, _: None) -> Deferred[None]:
        """Once the sessions are gone, end their upstream sessions (passthrough routes)."""
        if self.connector is None:
            return succeed(None)
        return self.connector.stop()


@functools.lru_cache(maxsize=4096)
def _clientAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """
    The client's address from the peer's host text (an IPv4-mapped IPv6
    address as IPv4); cached, since ipaddress parses in Python and
    clients come back from the same addresses.
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


_sessionIds = random.Random()
"""
Session ids: 8 hex digits that tell one session's log lines from the
others'.  Not secrets (every log line shows them), so a generator seeded
once from the system's randomness, not a getrandom() call per connection.
"""


def _utf8(argument: str) -> str:
    """
    A MAIL or RCPT argument read as UTF-8 (RFC 6531 section 3.3): command
    lines are decoded as latin-1, octet for octet, so this gets the octets
    back.  Octets that are not UTF-8 become surrogate escapes, which
    L{parsePath} refuses as such (C{badUTF8}).
    """
    if argument.isascii():
        return argument
    return argument.encode("latin-1").decode("utf-8", "surrogateescape")


_COUNTED_COMMANDS = frozenset(
    {
        "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
        "EXPN", "HELP", "STARTTLS", "AUTH", "ETRN", "TURN", "ATRN", "XCLIENT", "XFORWARD",
    }
)  # fmt: skip
"""The command label values of C{relayd_smtp_replies_total}: the SMTP
verbs (RFC 5321 section 4.1, and extensions); any other line counts as
C{UNKNOWN}, so a client cannot make up label values."""

_REFUSAL_STAGES = {"MAIL": "mail", "RCPT": "rcpt"}
"""Commands whose refusal is a rejected message (L{SMTPServer.failWith})."""


def _shown(key: str, value: Any) -> str:
    """A field in a line's text: an address in angle brackets, no value as C{none}."""
    if value is None:
        return ABSENT
    return f"<{value}>" if key in ("sender", "to") else str(value)


def _tlsFailed(reason: Failure) -> bool:
    """Whether a connection ended for a TLS error (a failed handshake, before any version)."""
    from OpenSSL import SSL

    return reason.check(SSL.Error) is not None


def _escaped(argument: str) -> str:
    """A command argument (latin-1 decoded octets) for a log line: non-ASCII octets as C{\\xNN}."""
    return argument.encode("latin-1").decode("ascii", "backslashreplace")


def _same(result: Any) -> Any:
    """Pass a result (or a failure, still unhandled) on unchanged."""
    return result


def _printable(text: str, limit: int = 255) -> str:
    """What of a client-supplied name may go into a log line."""
    clean = "".join(c if "!" <= c <= "~" else "?" for c in text[:limit])
    return clean or "unknown"


_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_ADDRESS_LITERAL = re.compile(r"\[[!-Z^-~]+\]")


@functools.lru_cache(maxsize=2)
def _receivedDate(second: int) -> str:
    """
    The date of a C{Received:} field for C{second} (RFC 5322 section 3.3),
    made once per second, not per message.
    """
    return format_datetime(datetime.datetime.fromtimestamp(second, datetime.UTC))


def _receivedName(helo: str) -> str:
    """
    The EHLO/HELO name as one token of a C{Received:} field's FROM clause,
    whatever the client sent (DESIGN section 4, rule 9).

    RFC 5322 section 3.6.7 makes the field a list of words, domains and
    addresses, then C{;} and the date: a C{(} opens a comment that runs to
    its C{)}, a C{[} a domain literal, a C{"} a quoted string, and a C{;}
    ends the list, so an EHLO argument copied as it came (C{x(}) swallows
    the BY, WITH, ID and FOR clauses.  Postfix's smtpd replaces such
    characters with C{?} (C{printable()}, then C{neuter()} of space and
    C{<>()\\";@}); this keeps fewer: the result is a dot-atom (atext and
    single dots between them, C{?} for anything else) or a whole domain
    literal (C{[192.0.2.1]}, C{[IPv6:...]}).  The session, the envelope
    record and the log keep the name as the client gave it, only its
    non-printable octets replaced (L{_printable}), so what was changed
    here stays visible there.
    """
    if _ADDRESS_LITERAL.fullmatch(helo):
        return helo
    name = "".join(c if c in _ATEXT or c == "." else "?" for c in helo)
    if name.endswith(".") and len(name) > 1:
        name = name[:-1]  # an FQDN's root dot: mail.example.org.
    return ".".join(part or "?" for part in name.split(".")) or "?"


@implementer(IHandshakeListener)
class SMTPServer(LineReceiver):
    """
    One SMTP session.  See the module docstring for the rules it keeps.

    States: C{"connect"} until the greeting is sent, C{"command"}, C{"auth"}
    while an AUTH exchange waits for the client, C{"data"} during DATA or
    while the octets of one BDAT chunk are read, and C{"closed"}.  Whether
    HELO, MAIL and TLS have happened lives in L{Session} and L{Envelope}.
    """

    delimiter = b"\n"
    """LF, so a bare LF is seen at once; never use C{sendLine} (it would send it)."""
    MAX_LENGTH = sasl.AUTH_LINE
    factory: SMTPFactory
    # The TCP transport, or TLSMemoryBIOProtocol for STARTTLS and port 465:
    # ITransport plus ITLSTransport.startTLS and getHandle, which no single
    # interface declares.  Set by makeConnection before any method runs.
    transport: Any

    def __init__(self) -> None:
        self.state = "connect"
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self._errors = 0
        self._authFailures = 0
        self._exchange: sasl.Exchange | None = None
        self._reader: DataReader | ChunkReader | None = None
        self._chunks: ChunkReader | None = None
        self._chunkLeft = 0
        self._chunkDone: Callable[[], None] | None = None
        self._chunkFeed: Callable[[bytes], None] | None = None
        self._incoming: Any = None
        self._committing = False
        # Relaying in session (relayd.smtp.passthrough): the upstream
        # transaction, and the passthrough route of the transaction's first
        # recipient (None: spooled).
        self._relayed: passthrough.RelayedTransaction | None = None
        self._routeKey: int | None = None
        # Counted in the connection limits (until given back) and known to
        # the factory (until connectionLost).
        self._counted = False
        self._tracked = False
        self._metered = False
        self._client = ""
        self._clientText = "0.0.0.0"  # str(session.clientAddress), made once
        self._paused = 0
        self._transportPaused = False
        self._shuttingDown = False
        self._closing = False
        self._dataStarted = 0.0
        self._dataOctets = 0
        self._dataTimer: Any = None
        # The command the next reply answers, for the replies metric:
        # GREETING until the first command line.
        self._command = "GREETING"

    # --- connection ----------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        # The command, data and close timeouts (L{relayd.timeouts}).
        self._idle = IdleTimer(f.clock, self.timeoutConnection)
        peer = self.transport.getPeer()
        self._client = getattr(peer, "host", "0.0.0.0")
        try:
            address = _clientAddress(self._client)
        except ValueError:
            address = ipaddress.ip_address("0.0.0.0")
        self._clientText = str(address)
        self.session = Session(
            clientAddress=address,
            clientPort=getattr(peer, "port", 0),
            listener=f.listener,
            mode=f.mode,
            sessionId=f"{_sessionIds.getrandbits(32):08X}",
            tls=f.implicitTLS,
        )
        # Behind a load balancer (relayd.smtp.proxy), getPeer() is the client
        # the PROXY header named; the proxy's own address is logged too.
        proxy = getattr(self.transport, "proxyPeer", None)
        log.info(
            "{session_id}: connect from [{client}]:{port} on {listener}{via}",
            session_id=self.session.sessionId,
            client=self._clientText,
            port=self.session.clientPort,
            listener=f.listener,
            via=f" via proxy [{proxy.host}]" if proxy is not None else "",
            proxy=proxy.host if proxy is not None else None,
        )
        self._metered = True
        f.metrics.connectionOpened(f.listener)
        decided = f.limits.open(self._clientText)
        if isinstance(decided, Deferred):
            # A receiver asks the queue manager, which counts every
            # process's connections (L{relayd.receivers.SharedLimits}):
            # nothing is read or answered until it has.
            self._hold()
            decided.addCallback(self._admit)
            decided.addErrback(self._admitFailed)
            decided.addBoth(self._releaseAfter)
            return
        self._admit(decided)

    def _admitFailed(self, failure: Failure) -> None:
        """
        Admitting the connection raised: log it and cut the connection, as
        Twisted does when C{connectionMade} raises, rather than leave it
        open with no timeout running.
        """
        assert self.session is not None
        log.failure(
            "{session_id}: admitting the connection failed",
            failure,
            session_id=self.session.sessionId,
        )
        self.transport.abortConnection()

    def _admit(self, refusal: str | None) -> None:
        """The connection limits answered: C{refusal} says why not, or None."""
        f = self.factory
        assert self.session is not None
        if self.state == "closed":
            # The client left while the queue manager was asked.
            if refusal is None:
                f.limits.close(self._clientText)
            return
        if refusal is not None:
            log.warn(
                "{session_id}: refused [{client}]: {reason}",
                session_id=self.session.sessionId,
                client=self._clientText,
                reason=refusal,
            )
            self.reply(421, "4.7.0", f"{f.config.hostname} Error: {refusal}")
            self._close()
            return
        if f.shuttingDown:
            self.reply(421, "4.3.2", f"{f.config.hostname} Service shutting down")
            self._close()
            return
        self._counted = self._tracked = True
        f.sessions.add(self)
        self._idle.start(f.config.timeoutCommand)
        self._hold()
        self._whenDecided(f.chain.walk("checkConnection", self.session), self._greet, done=_same)

    def _greet(self, verdict: Verdict) -> None:
        if self.state == "closed":
            return
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            self._log("connection", verdict)
            self.sendReply(verdict.reply)
            self._close()
            return
        self.state = "command"
        cfg = self.factory.config
        self.transport.write(f"220 {cfg.hostname} {cfg.banner}\r\n".encode())
        self._release()

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or implicit): note version and cipher."""
        assert self.session is not None
        try:
            conn = self.transport.getHandle()
            self.session.tlsVersion = conn.get_protocol_version_name()
            self.session.tlsCipher = conn.get_cipher_name()
            bits = conn.get_cipher_bits()
        except Exception:
            bits = None
        self.factory.metrics.tlsHandshake(self.factory.listener, self.session.tlsVersion)
        log.info(
            "{session_id}: TLS established {tls_version} {tls_cipher} ({bits} bits)",
            session_id=self.session.sessionId,
            tls_version=self.session.tlsVersion,
            tls_cipher=self.session.tlsCipher,
            bits=bits,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._idle.stop()
        self._stopDataDeadline()
        previous, self.state = self.state, "closed"
        if self._committing and self._relayed is not None and self._relayed.upstream.sending:
            # The client left while its message was being relayed: cut the
            # upstream before the final dot, so that it takes nothing.
            self._relayed.close()
        if self._incoming is not None and not self._committing:
            self._incoming.discard()
            self._incoming = None
        if not self._committing:
            # A commit in flight ends its transaction itself when it fires.
            self._reset()
        if self._tracked:
            self._tracked = False
            try:
                self._giveSlotBack()
            finally:
                # Whatever happened to the slot, the session is gone: a
                # graceful stop waits for every session to be.
                self.factory.sessionGone(self)
        if self._metered:
            self._metered = False
            self.factory.metrics.connectionClosed(self.factory.listener)
            session = self.session
            # A TLS session (implicit, or after STARTTLS) that never got a
            # version: its handshake failed.  Cheap checks first.
            if (
                session is not None
                and session.tls
                and not session.tlsVersion
                and _tlsFailed(reason)
            ):
                self.factory.metrics.tlsHandshakeFailed(self.factory.listener)
        if self.session is not None:
            log.info(
                "{session_id}: disconnect from [{client}] in state {state}",
                session_id=self.session.sessionId,
                client=self._clientText,
                state=previous,
            )

    def timeoutConnection(self) -> None:
        assert self.session is not None
        if self.state == "closed":
            # The close did not complete in time: the client neither read
            # its last reply nor answered the TLS close_notify.  Cut it.
            log.info(
                "{session_id}: close timed out; aborting connection with [{client}]",
                session_id=self.session.sessionId,
                client=self._clientText,
            )
            self.transport.abortConnection()
            return
        if self._buffer and not self.paused and self.state in ("command", "auth"):
            log.info(
                "{session_id}: command line not complete after {seconds} s "
                "({octets} octets) from [{client}]",
                session_id=self.session.sessionId,
                seconds=self.factory.config.timeoutCommand,
                octets=len(self._buffer),
                client=self._clientText,
            )
        else:
            log.info(
                "{session_id}: timeout in state {state} from [{client}]",
                session_id=self.session.sessionId,
                state=self.state,
                client=self._clientText,
            )
        self.reply(421, "4.4.2", f"{self.factory.config.hostname} Error: timeout exceeded")
        self._close()

    def shutdown(self) -> None:
        """
        relayd is stopping: say goodbye now when idle, else after the
        command in progress (DATA, its commit, a policy or AUTH check) has
        been answered.
        """
        self._shuttingDown = True
        if self.state == "closed" or self.state == "data" or self._paused:
            return
        self._goodbye()

    def _goodbye(self) -> None:
        assert self.session is not None
        log.info(
            "{session_id}: shutting down; closing session with [{client}] in state {state}",
            session_id=self.session.sessionId,
            client=self._clientText,
            state=self.state,
        )
        self.reply(421, "4.3.2", f"{self.factory.config.hostname} Service shutting down")
        self._close()

    def abort(self) -> None:
        """The shutdown deadline passed: cut the connection now."""
        if self.session is not None:
            log.warn(
                "{session_id}: shutdown deadline reached; aborting session in state {state}",
                session_id=self.session.sessionId,
                state=self.state,
            )
        self.transport.abortConnection()

    def _close(self) -> None:
        """
        End the session: every path that ends one comes here (or to
        L{abort}), whatever state reading is in.

        Reading is resumed even if a policy, the AUTH delay or a commit
        still holds it paused: a TLS close needs the client's close_notify
        (or its FIN) to be read before C{connectionLost} runs and the
        connection's slot is given back.  What arrives from now on is
        dropped (L{dataReceived}).  The close gets L{timeoutClose} seconds;
        then the connection is aborted (L{timeoutConnection}).
        """
        if self._incoming is not None and not self._committing:
            self._incoming.discard()
            self._incoming = None
        self._stopDataDeadline()
        if self.state == "closed" and self._closing:
            return
        self.state = "closed"
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()
        self._transportPaused = False
        self.transport.resumeProducing()
        self._idle.start(self.factory.config.timeoutClose)

    # --- flow control ----------------------------------------------------

    def _hold(self) -> None:
        """
        Stop processing input until L{_release}.  The line parser stops at
        once (C{paused}); the socket stops being read (the transport is
        paused) only when more octets arrive meanwhile (L{dataReceived}).
        Most commands are decided before control returns to the reactor,
        and pausing and resuming the transport for each cost two epoll
        changes per command (a third of a receiver's system calls); a
        client that pushes on while a decision waits gets one read
        buffered, then reading stops as before.
        """
        self._paused += 1
        if self._paused == 1:
            self.paused = True

    def _whenDecided(
        self,
        answer: Verdict | Deferred[Verdict],
        decided: Callable[[Verdict], Any],
        failed: Callable[[Failure], Any] | None = None,
        done: Callable[[Any], Any] | None = None,
    ) -> None:
        """
        C{decided(verdict)}, then C{failed} if that or the verdict failed,
        then C{done} (by default L{_release}): as Deferred callbacks when
        the verdict is still to come, but called on the spot when the
        chain answered at once (L{PolicyChain.walk}), which is most
        commands.  An exception in C{decided}, or a Deferred it returns,
        goes the Deferred way from there, so the outcome is the same.

        (The tests ask "a Verdict?" and "None?" first: C{Deferred} is an
        C{Awaitable}, so C{isinstance(x, Deferred)} goes through
        C{ABCMeta.__instancecheck__}, two calls more every time.)
        """
        if done is None:
            done = self._releaseAfter
        if not isinstance(answer, Verdict):
            d = answer.addCallback(decided)
        else:
            try:
                result = decided(answer)
            except Exception:
                d = fail()
            else:
                if result is None or not isinstance(result, Deferred):
                    done(result)
                    return
                d = result
        if failed is not None:
            d.addErrback(failed)
        d.addBoth(done)

    def _releaseAfter(self, _: Any) -> None:
        self._release()

    def _release(self) -> None:
        self._paused -= 1
        if self._paused == 0 and self.state != "closed":
            if self._shuttingDown and self.state != "data":
                self._goodbye()
                return
            # Ready for the next command: its time starts now.
            self._idle.restart()
            self.paused = False
            if self._transportPaused:
                self._transportPaused = False
                self.transport.resumeProducing()
            self.dataReceived(b"")

    def dataReceived(self, data: bytes) -> None:
        """
        In command mode the timeout is a deadline for each whole line
        (L{lineReceived} and L{_release} restart it), so that octets
        trickling in do not keep a connection open; in DATA it is an idle
        limit per read, and L{_dataDeadline} bounds the whole transfer.
        """
        if self.state == "closed":
            return
        if self._paused and data and not self._transportPaused:
            self._transportPaused = True
            self.transport.pauseProducing()
        if self.state == "data" and data:
            self._idle.restart()
        LineReceiver.dataReceived(self, data)

    # --- replies ---------------------------------------------------------

    def sendReply(self, reply: Reply) -> None:
        """
        Send a one-line L{Reply}.  A refusal (4xx, 5xx) is counted by the
        command it answers (L{relayd.ops.metrics}: every refusal, whichever
        path sent it).
        """
        self.transport.write(str(reply).encode("utf-8") + b"\r\n")
        if reply.code >= 400:
            self.factory.metrics.smtpReply(self._command, reply.code, reply.enhanced)

    def reply(self, code: int, enhanced: str | None, text: str) -> None:
        """
        Send a one-line reply; C{enhanced} None only where RFC 2034 leaves
        it out (L{Reply} checks).
        """
        self.sendReply(Reply(code, enhanced, text))

    def fail(self, code: int, enhanced: str, text: str) -> None:
        """Send an error reply; too many of them end the session."""
        self.failWith(Reply(code, enhanced, text))

    def failWith(self, reply: Reply, stage: str | None = None) -> None:
        """
        L{fail} with a L{Reply}.  A refused MAIL or RCPT (syntax, 530,
        555, parameters, ...) is counted as a rejected message at its
        C{stage} (C{relayd_messages_rejected_total}), as are the refusals
        that name their C{stage} (L{_refuseWith}).
        """
        self.sendReply(reply)
        stage = stage or _REFUSAL_STAGES.get(self._command)
        if stage is not None:
            self.factory.metrics.messageRejected(stage, reply.code)
        self._errors += 1
        if self._errors >= self.factory.config.maxErrors and self.state != "closed":
            assert self.session is not None
            log.warn(
                "{session_id}: too many errors from [{client}]",
                session_id=self.session.sessionId,
                client=self._clientText,
            )
            self.reply(421, "4.7.0", f"{self.factory.config.hostname} Error: too many errors")
            self._close()

    def _refuse(self, stage: str, code: int, enhanced: str, text: str) -> None:
        """L{fail} for a refused MAIL, RCPT or message, counted by stage and code."""
        self._refuseWith(stage, Reply(code, enhanced, text))

    def _refuseWith(self, stage: str, reply: Reply) -> None:
        """L{_refuse} with a L{Reply}."""
        self.failWith(reply, stage)

    def _answer(self, verdict: Verdict) -> None:
        self.sendReply(verdict.reply)
        if verdict.disconnect:
            self._close()

    def _log(self, what: str, verdict: Verdict, quiet: bool = False, **extra: Any) -> None:
        """
        One line per decided command, led by the queue id (the session id
        before MAIL was accepted).  The fields are as everywhere
        (docs/observability.md): addresses without angle brackets and
        absent values as None (null in JSON); the text shows addresses in
        brackets and absent values as C{none}.  A C{quiet} line is logged
        at debug level (an accepted recipient: Postfix does not log those
        either; the delivery lines name every recipient).
        """
        assert self.session is not None
        if quiet and self.factory.config.logLevel != "debug":
            return  # dropped by the level filter anyway: not built at all
        (log.debug if quiet else log.info)(
            "{prefix}: {what} {detail}-> {action} {code} {enhanced} session={session_id}",
            **idFields(self.session, self.envelope),
            what=what,
            detail="".join(f"{k}={_shown(k, v)} " for k, v in extra.items()),
            action=verdict.action._value_,
            code=verdict.code,
            enhanced=verdict.enhanced,
            **extra,
        )

    # --- line mode -------------------------------------------------------

    def lineReceived(self, raw: bytes) -> None:
        if self.state == "closed":
            return
        self._idle.restart()
        if not raw.endswith(b"\r"):
            self.fail(500, "5.5.2", "Error: bare LF received; lines must end with CRLF")
            return
        raw = raw[:-1]
        if b"\r" in raw:
            self.fail(500, "5.5.2", "Error: bare CR received; lines must end with CRLF")
            return
        line = raw.decode("latin-1")
        if self.state == "auth":
            self._command = "AUTH"
            self._authContinue(line)
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        self._command = verb if verb in _COUNTED_COMMANDS else "UNKNOWN"
        limit = COMMAND_LINE + (extensions.MAIL_ALLOWANCE if verb == "MAIL" else 0)
        limit += extensions.RCPT_ALLOWANCE if verb == "RCPT" else 0
        if len(raw) + 2 > limit:
            self.fail(500, "5.5.2", "Error: line too long")
            return
        if verb in HTTP_VERBS:
            assert self.session is not None
            log.warn(
                "{session_id}: HTTP command {verb} from [{client}]; closing",
                session_id=self.session.sessionId,
                verb=verb,
                client=self._clientText,
            )
            self.reply(521, "5.7.0", "Error: this is an SMTP server")
            self._close()
            return
        method = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        if method is None:
            self.fail(502, "5.5.2", "Error: command not recognized")
            return
        method(argument.strip(" "))

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        More than L{MAX_LENGTH} octets without an end of line: a flood, not
        a command.  Answer once and close; the buffer is already dropped.
        """
        self.reply(500, "5.5.2", "Error: line too long")
        self._close()

    # --- commands --------------------------------------------------------

    def smtp_EHLO(self, argument: str) -> None:
        self._hello(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._hello(argument, esmtp=False)

    def _hello(self, argument: str, esmtp: bool) -> None:
        assert self.session is not None
        verb = "EHLO" if esmtp else "HELO"
        if not argument:
            self.fail(501, "5.5.4", f"Syntax: {verb} hostname")
            return
        name = _printable(argument.split(" ", 1)[0])
        self._hold()
        answer = self.factory.chain.walk("checkHelo", self.session, name)

        def decided(verdict: Verdict) -> None:
            if self.state == "closed":
                return
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                self._log(verb, verdict, helo=name)
                self._answer(verdict)
                return
            # self.session is set while not closed; mypy does not narrow it in a callback.
            self.session.helo = name  # type: ignore[union-attr]
            self.session.esmtp = esmtp  # type: ignore[union-attr]
            self._reset()
            hostname = self.factory.config.hostname
            if not esmtp:
                self.transport.write(f"250 {hostname}\r\n".encode())
                return
            lines = [hostname, *self._extensions()]
            out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
            self.transport.write("\r\n".join(out).encode() + b"\r\n")

        self._whenDecided(answer, decided)

    def _extensions(self) -> list[str]:
        f = self.factory
        assert self.session is not None
        offer = extensions.Offer(
            tls=self.session.tls,
            tlsAvailable=f.tlsOptions is not None,
            authAvailable=f.portal is not None,
            authenticated=self.session.user is not None,
            mode=f.mode,
            messageSize=f.config.messageSize,
        )
        return extensions.advertise(offer)

    def smtp_STARTTLS(self, argument: str) -> None:
        assert self.session is not None
        if argument:
            self.fail(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.session.tls:
            self.fail(503, "5.5.1", "Error: TLS already active")
            return
        if self.factory.tlsOptions is None:
            self.fail(502, "5.5.1", "Error: STARTTLS not available")
            return
        if self.session.helo is None:
            self.fail(503, "5.5.1", "Error: send EHLO first")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        # RFC 3207 section 4.2 and CVE-2011-0411: anything the client sent
        # after STARTTLS in plaintext is discarded, never read as a command
        # inside TLS; and the session starts over.
        self._buffer = b""
        self.transport.startTLS(self.factory.tlsOptions)
        self.session.tls = True
        self.session.helo = None
        self.session.esmtp = False
        self._reset()

    def smtp_AUTH(self, argument: str) -> None:
        f = self.factory
        assert self.session is not None
        if not self.session.tls:
            self.fail(530, "5.7.0", "Error: must issue a STARTTLS command first")
            return
        if f.portal is None:
            self.fail(502, "5.5.1", "Error: authentication not enabled")
            return
        if self.session.helo is None or not self.session.esmtp:
            self.fail(503, "5.5.1", "Error: send EHLO first")
            return
        if self.session.user is not None:
            self.fail(503, "5.5.1", "Error: already authenticated")
            return
        if self.envelope is not None:
            self.fail(503, "5.5.1", "Error: MAIL transaction in progress")
            return
        mechanism, _, initial = argument.partition(" ")
        exchange = sasl.start(mechanism)
        if exchange is None:
            self.fail(504, "5.5.4", "Error: unrecognized authentication type")
            return
        self._authStep(exchange, exchange.begin(initial.strip(" ")))

    def _authStep(self, exchange: sasl.Exchange, step: sasl.Step) -> None:
        """Do what the AUTH exchange asks for next (L{relayd.smtp.sasl})."""
        if isinstance(step, sasl.Challenge):
            self.state = "auth"
            self._exchange = exchange
            self.reply(334, None, step.text)
        elif isinstance(step, sasl.Refusal):
            self.failWith(step.reply)
        elif step.problem is not None:
            self._authFailed(step.problem, step.user)
        else:
            self._login(step.user, step.password)

    def _authContinue(self, line: str) -> None:
        exchange, self._exchange = self._exchange, None
        self.state = "command"
        assert exchange is not None
        self._authStep(exchange, exchange.respond(line))

    def _login(self, user: str, password: str) -> None:
        """
        Check the password, unless this client (or this user at this
        client) has failed too often lately, across connections
        (L{relayd.smtp.auth.Lockout}): then C{454 4.7.0} without checking it, so
        that a locked-out guesser learns nothing, even from a right guess.
        """
        f = self.factory
        session = self.session
        assert session is not None
        self._hold()
        d = f.lockout.refused(f.chain, session.clientAddress, user, f.config)

        def decided(scope: str | None) -> Any:
            if self.state == "closed":
                return None
            if scope is None:
                return self._checkPassword(user, password)
            log.warn(
                "{session_id}: AUTH refused for [{client}] user={user}: too many failures "
                "from this {scope} within {window} s",
                session_id=session.sessionId,
                client=self._clientText,
                user=_printable(user, 64),
                scope="address" if scope == "client" else "user at this address",
                window=f.config.authFailureWindow,
            )
            f.metrics.authLockedOut(f.listener, scope)
            self.fail(454, "4.7.0", "Temporary authentication failure")
            return None

        d.addCallback(decided)
        d.addBoth(lambda _: self._release())

    def _checkPassword(self, user: str, password: str) -> Deferred[None]:
        f = self.factory
        credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        portal = f.portal
        assert portal is not None, "AUTH is offered only with a portal"
        self._hold()
        d: Deferred[Any] = portal.login(credentials, None, f.avatarInterface)

        def succeeded(result: Any) -> None:
            if self.state == "closed":
                return
            _interface, avatar, _logout = result
            name = avatar if isinstance(avatar, str) else user
            # self.session is set while not closed; mypy does not narrow it in a callback.
            self.session.user = name  # type: ignore[union-attr]
            f.lockout.succeeded(f.chain, self.session.clientAddress, user, f.config)  # type: ignore[union-attr]
            log.info(
                "{session_id}: AUTH success user={user}",
                session_id=self.session.sessionId,  # type: ignore[union-attr]
                user=name,
            )
            f.metrics.authenticated(f.listener, "success")
            self.reply(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> None:
            if not failure.check(UnauthorizedLogin):
                log.failure("AUTH backend error", failure)
                f.metrics.authenticated(f.listener, "error")
                if self.state != "closed":
                    self.fail(454, "4.7.0", "Temporary authentication failure")
                return
            self._authFailed("bad credentials", user)

        d.addCallbacks(succeeded, failed)
        return d.addBoth(lambda _: self._release())

    def _authFailed(self, why: str, user: str) -> None:
        """
        Answer C{535 5.7.8} after a delay that grows with each failure, and
        close after too many (RFC 4954 section 6; no hint of which part was
        wrong, so no user enumeration).  The failure also counts across
        connections (L{relayd.smtp.auth.Lockout}).
        """
        f = self.factory
        assert self.session is not None
        f.lockout.failed(f.chain, self.session.clientAddress, user, f.config)
        if self.state == "closed":
            return
        self._authFailures += 1
        f.metrics.authenticated(f.listener, "failure")
        assert self.session is not None
        log.warn(
            "{session_id}: AUTH failure {count} from [{client}]: {why}",
            session_id=self.session.sessionId,
            count=self._authFailures,
            client=self._clientText,
            why=why,
        )
        self._hold()

        def answer() -> None:
            if self.state == "closed":
                return
            self.fail(535, "5.7.8", "Error: authentication failed")
            if self._authFailures >= f.config.authMaxFailures and self.state != "closed":
                self.reply(
                    421, "4.7.0", f"{f.config.hostname} Error: too many authentication failures"
                )
                self._close()
            self._release()

        f.clock.callLater(f.config.authFailureDelay * self._authFailures, answer)

    def smtp_MAIL(self, argument: str) -> None:
        f = self.factory
        session = self.session
        assert session is not None
        if session.helo is None:
            self.fail(503, "5.5.1", "Error: send EHLO/HELO first")
            return
        if self.envelope is not None:
            self.fail(503, "5.5.1", "Error: nested MAIL command")
            return
        if f.mode != "relay" and session.user is None:
            self.fail(530, "5.7.0", "Authentication required")
            return
        try:
            sender, params = parsePath(_utf8(argument), "FROM:", allowNull=True)
            parameters = parseParameters(params)
        except AddressError as e:
            if e.badUTF8:
                self._refuseNonAscii("mail", "sender", argument)
                return
            if e.parameter:
                self.fail(501, "5.5.4", "Error: bad parameters")
                return
            text = "path too long" if e.tooLong else "bad sender address syntax"
            self.fail(501, "5.1.7", f"Error: {text}")
            return
        envelope = Envelope(sender=sender)
        if parameters and not session.esmtp:
            self.fail(555, "5.5.4", "Error: parameters need EHLO")
            return
        refusal = extensions.parseMail(parameters, envelope)
        if refusal is not None:
            self.failWith(refusal)
            return
        if not sender.isAscii and not envelope.smtputf8:
            self._refuseNonAscii("mail", "sender", argument)
            return
        refusal = requiretls.checkMail(session, envelope)
        if refusal is not None:
            self.failWith(refusal)
            return
        declared = envelope.declaredSize or 0
        if declared > f.config.messageSize:
            self._refuse("mail", 552, "5.3.4", "Error: message size exceeds fixed limit")
            return
        if not f.spool.reserveOk(declared):
            log.warn(
                "{session_id}: spool below free-space reserve; MAIL refused",
                session_id=session.sessionId,
            )
            self._refuse("mail", 452, "4.3.1", "Error: insufficient system storage")
            return
        self._hold()
        answer = f.chain.walk("checkSender", session, envelope, sender)

        def decided(verdict: Verdict) -> None:
            if self.state == "closed":
                return
            if verdict.action in (Action.REJECT, Action.TEMPFAIL):
                self._log("MAIL", verdict, sender=str(sender))
                f.metrics.messageRejected("mail", verdict.reply.code)
                self._answer(verdict)
                return
            # Like Postfix, the queue id is given at MAIL, so that the MAIL
            # and RCPT log lines already carry it.
            envelope.queueId = f.spool.newQueueId()
            self.envelope = envelope
            # Where the message comes from, under its queue id (Postfix's
            # "client=" line), so that one grep for the id tells it.
            self._log(
                "MAIL",
                verdict if verdict.final else _OK_SENDER,
                sender=str(sender),
                client=self._clientText,
                helo=session.helo,
                tls=session.tlsVersion if session.tls else None,
                user=session.user,
            )
            self.sendReply(_OK_SENDER.reply)

        self._whenDecided(answer, decided)

    def smtp_RCPT(self, argument: str) -> None:
        f = self.factory
        session = self.session
        envelope = self.envelope
        assert session is not None
        if envelope is None:
            self.fail(503, "5.5.1", "Error: need MAIL command")
            return
        try:
            recipient, params = parsePath(_utf8(argument), "TO:", allowNull=False)
            parameters = parseParameters(params)
        except AddressError as e:
            if e.badUTF8:
                self._refuseNonAscii("rcpt", "recipient", argument)
                return
            if e.parameter:
                self.fail(501, "5.5.4", "Error: bad parameters")
                return
            text = "path too long" if e.tooLong else "bad recipient address syntax"
            self.fail(501, "5.1.3", f"Error: {text}")
            return
        if not recipient.isAscii and not envelope.smtputf8:
            self._refuseNonAscii("rcpt", "recipient", argument)
            return
        added = Recipient(recipient)
        refusal = extensions.parseRecipient(parameters, envelope, added)
        if refusal is not None:
            self.failWith(refusal)
            return
        if len(envelope.recipients) >= f.config.maxRecipients:
            self._refuse("rcpt", 452, "4.5.3", "Error: too many recipients")
            return
        self._hold()
        answer = f.chain.walk("checkRecipient", session, envelope, recipient)

        def decided(verdict: Verdict) -> Deferred[None] | None:
            if self.state == "closed" or self.envelope is not envelope:
                return None
            if verdict.action is Action.CONTINUE:
                # Relaying is denied by default (DESIGN section 3).
                verdict = _RELAY_DENIED
            self._log(
                "RCPT",
                verdict,
                quiet=verdict.action is Action.ACCEPT,
                to=str(recipient),
                sender=str(envelope.sender),
            )
            if verdict.action is Action.ACCEPT:
                if recipient not in envelope.recipients:
                    relaying = self._routeRecipient(envelope, added, verdict)
                    if relaying is not None:
                        return relaying
                self._acceptRecipient(envelope, added, verdict)
            else:
                self._refuseWith("rcpt", verdict.reply)
                if verdict.disconnect and self.state != "closed":
                    self._close()
            return None

        self._whenDecided(answer, decided, lambda f: self._recipientFailed(f, envelope))

    def _acceptRecipient(self, envelope: Envelope, added: Recipient, verdict: Verdict) -> None:
        """Add an accepted recipient to the transaction and answer with the policy's reply."""
        if added.address not in envelope.recipients:
            envelope.recipients.append(added.address)
            if added.given:
                envelope.parameters[added.address] = added
        self._answer(verdict)

    # --- relaying in session (relayd.smtp.passthrough) -------------------

    def _routeRecipient(
        self, envelope: Envelope, added: Recipient, verdict: Verdict
    ) -> Deferred[None] | None:
        """
        A recipient the policies accepted, whose route may be relayed in
        session (C{mode = "passthrough"}): relay it and answer with the
        upstream's reply.  The first recipient's route is the
        transaction's; one for another route gets C{452 4.5.3} (RFC 5321
        section 4.5.3.1.10: the client sends it in a new transaction).

        @return: None when the recipient is the spool's (answer as always),
            else a Deferred that fires once the client has its answer.
        """
        routes = self.factory.config.routes
        index = matchRoute(routes, added.address.domain) if routes else None
        key = index if index is not None and routes[index].mode == "passthrough" else None
        if envelope.recipients:
            if key != self._routeKey:
                self._refuse(
                    "rcpt",
                    452,
                    "4.5.3",
                    "Error: too many recipients for this transaction (another route); "
                    "send them in a new one",
                )
                return succeed(None)
            if self._relayed is None:
                return None
            return self._relayRecipient(envelope, added, verdict)
        relayed = self._relayed
        if relayed is not None and relayed.key != key:
            self._relayed = None
            relayed.close()
        self._routeKey = key
        if key is None:
            return None
        if self._relayed is not None:
            return self._relayRecipient(envelope, added, verdict)
        route = routes[key]
        session = self.session
        assert session is not None
        d: Deferred[Any]
        try:
            d = self._connector().open(route)
        except (OSError, ValueError) as e:
            from relayd.delivery.client import HopFailure, Reply

            d = fail(HopFailure(Reply.local(451, "4.3.0", f"cannot set up outbound TLS: {e}")))

        def opened(upstream: Upstream) -> Deferred[None] | None:
            if self.state == "closed" or self.envelope is not envelope:
                upstream.close()
                return None
            self._relayed = passthrough.RelayedTransaction(key, upstream, session)
            return self._relayRecipient(envelope, added, verdict)

        def unreachable(failure: Failure) -> None:
            from relayd.delivery.client import HopFailure

            failure.trap(HopFailure)
            if self.state == "closed" or self.envelope is not envelope:
                return
            error = failure.value
            assert isinstance(error, HopFailure)
            self._fallback(envelope, added, verdict, key, str(error.reply))

        done: Deferred[None] = d.addCallbacks(opened, unreachable)
        return done

    def _connector(self) -> Connector:
        """
        The listener's L{relayd.delivery.passthrough.Connector}, made on
        first use.

        @raise OSError: C{delivery.ca_file} cannot be read.
        @raise ValueError: it holds no certificate.
        """
        from relayd.delivery.passthrough import Connector

        f = self.factory
        if f.connector is None:
            f.connector = Connector(f.clock, f.config)
        elif f.connector.config is not f.config:
            # Reloaded: new upstream sessions take the new outbound settings.
            f.connector.configure(f.config)
        return f.connector

    def _relayRecipient(
        self, envelope: Envelope, added: Recipient, verdict: Verdict
    ) -> Deferred[None]:
        """Relay one RCPT (and MAIL before the first) and answer with the upstream's reply."""
        relayed = self._relayed
        assert relayed is not None

        def answered(reply: UpstreamReply) -> None:
            if self.state == "closed" or self.envelope is not envelope:
                return
            if not relayed.upstream.inStep and not relayed.accepted:
                # Lost before the upstream took anything: as unreachable.
                if self._relayed is relayed:
                    self._relayed = None
                relayed.close()
                assert relayed.key is not None
                self._fallback(envelope, added, verdict, relayed.key, str(reply))
                return
            if reply.code // 100 == 2 and added.address not in envelope.recipients:
                envelope.recipients.append(added.address)
                if added.given:
                    envelope.parameters[added.address] = added
            self._sendRelayed(reply, "rcpt")

        return relayed.recipient(envelope, added).addCallback(answered)

    def _fallback(
        self, envelope: Envelope, added: Recipient, verdict: Verdict, key: int, why: str
    ) -> None:
        """
        No next hop of passthrough route C{key} can be reached: the route's
        C{fallback} decides.  C{"spool"}: the transaction goes on as an
        ordinary one (relayd's own reply, the message queued);
        C{"tempfail"}: C{451 4.4.1} to this RCPT, the transaction as it was.
        """
        route = self.factory.config.routes[key]
        session = self.session
        assert session is not None
        log.warn(
            "{queue_id}: passthrough route {route}: no next hop reachable ({why}); "
            "fallback {fallback} session={session_id}",
            queue_id=envelope.queueId,
            route=key,
            why=why,
            fallback=route.fallback,
            session_id=session.sessionId,
        )
        if route.fallback == "tempfail":
            if not envelope.recipients:
                self._routeKey = None
            self._refuse("rcpt", 451, "4.4.1", "Error: next hop not reachable; try again later")
            return
        self._acceptRecipient(envelope, added, verdict)

    def _sendRelayed(self, reply: UpstreamReply, stage: str) -> None:
        """
        Send an upstream's reply as it came (L{passthrough.replyBytes}); a
        refusal is counted like relayd's own, but not as the client's error.
        """
        self.transport.write(passthrough.replyBytes(reply))
        if reply.code >= 400:
            self.factory.metrics.smtpReply(self._command, reply.code, reply.enhanced)
            self.factory.metrics.messageRejected(stage, reply.code)

    def _recipientFailed(self, failure: Failure, envelope: Envelope) -> None:
        """A bug while deciding a RCPT (relaying it, say): C{451 4.3.0}, never silence."""
        log.failure("{queue_id}: RCPT failed", failure, queue_id=envelope.queueId)
        if self.state != "closed":
            self.fail(451, "4.3.0", "Error: local error in processing")

    def _relayMessage(
        self,
        envelope: Envelope,
        incoming: Any,
        message: Message,
        started: float,
        outcome: dict[str, bool],
    ) -> Deferred[None] | None:
        """
        The checks and modifiers accepted the message of a relayed
        transaction: send it upstream (as L{commit<relayd.queue.spool.Spool.commit>}
        would store it, with the modifiers' header) and answer the client
        with the upstream's reply.  The file under C{tmp/} is never
        committed: it is discarded whatever the outcome.
        """
        from relayd.delivery.passthrough import messageFile

        f = self.factory
        relayed, session = self._relayed, self.session
        assert relayed is not None and session is not None
        header, offset = b"", 0
        if message.changed:
            header, offset = message.headerBytes(), message.bodyOffset
        size = len(header) + incoming.size - offset
        try:
            file = messageFile(header, incoming.path, offset, incoming.size)
        except OSError as e:
            incoming.discard()
            self._spoolFailed(e, "read")
            return None

        # The next hop's own timeouts bound the wait (10 minutes for the
        # reply to the final dot, RFC 5321 section 4.5.3.2.6, which the
        # client waits too): relayd's command timeout must not cut the
        # session first, while the next hop may be taking the message.
        self._idle.start(None)

        def answered(reply: UpstreamReply) -> None:
            if self.state != "closed":
                self._idle.start(f.config.timeoutCommand)
            incoming.discard()
            self._logRelayed(envelope, relayed, reply, f.clock.seconds() - started)
            if reply.code // 100 == 2:
                outcome["queued"] = True
                f.metrics.messageAccepted(session.listener, size, f.clock.seconds() - started)
            if self.state != "closed":
                self._sendRelayed(reply, "data")

        return relayed.message(envelope, file).addCallback(answered)

    def _logRelayed(
        self,
        envelope: Envelope,
        relayed: passthrough.RelayedTransaction,
        reply: UpstreamReply,
        delay: float,
    ) -> None:
        """
        One line per recipient, as the delivery log writes them: C{sent},
        C{deferred} (4xx) or C{refused} (5xx: the client has the refusal,
        relayd sends no bounce); counted as delivery attempts, a refusal
        as C{bounced}.
        """
        status = {2: "sent", 5: "refused"}.get(reply.code // 100, "deferred")
        for address in relayed.accepted:
            log.info(
                "{queue_id}: to=<{to}>, relay={relay}, delay={delay:.1f}, tls={tls}, "
                "status={status} ({reply}) passthrough session={session_id}",
                queue_id=envelope.queueId,
                to=address,
                relay=relayed.relay,
                relay_host=relayed.upstream.hop.host,
                relay_address=relayed.upstream.hop.address,
                relay_port=relayed.upstream.hop.port,
                delay=delay,
                tls=relayed.upstream.tls,
                status=status,
                reply=reply.quoted,
                code=reply.code,
                enhanced=reply.enhanced,
                session_id=relayed.session.sessionId,
            )
            outcome = "bounced" if status == "refused" else status
            self.factory.metrics.deliveryAttempt(outcome, delay if status == "sent" else None)

    def _refuseNonAscii(self, stage: str, what: str, argument: str) -> None:
        """
        C{553 5.6.7} for an address relayd may not take (RFC 6531 section
        3.7.4.1): non-ASCII in a transaction without C{SMTPUTF8}, or octets
        that are not UTF-8 at all.  The log shows the octets escaped.
        """
        session = self.session
        assert session is not None
        envelope = self.envelope
        log.info(
            "{prefix}: {verb} refused: non-ASCII {what} address without SMTPUTF8 "
            "or not UTF-8: {argument} session={session_id}",
            prefix=(envelope.queueId if envelope else None) or session.sessionId,
            queue_id=envelope.queueId if envelope else None,
            verb="MAIL" if stage == "mail" else "RCPT",
            what=what,
            argument=_escaped(argument),
            session_id=session.sessionId,
        )
        self._refuse(stage, 553, "5.6.7", f"Error: non-ASCII {what} address not permitted")

    def smtp_DATA(self, argument: str) -> None:
        f = self.factory
        session = self.session
        envelope = self.envelope
        assert session is not None
        if argument:
            self.fail(501, "5.5.4", "Syntax: DATA")
            return
        if envelope is None:
            self.fail(503, "5.5.1", "Error: need MAIL command")
            return
        if self._chunks is not None:
            self.fail(503, "5.5.1", "Error: BDAT and DATA cannot be mixed")
            return
        if not envelope.recipients:
            self.fail(554, "5.5.1", "Error: no valid recipients")
            return
        if self._relayed is not None and not self._relayed.upstream.inStep:
            # The next hop is gone since it took the recipients: say so
            # now rather than after the whole message.
            self._refuse("data", 451, "4.4.2", "Error: lost connection with the next hop")
            return
        assert envelope.queueId is not None
        try:
            self._incoming = f.spool.openMessage(envelope.queueId)
            self._incoming.write(self._received(envelope))
        except OSError as e:
            self._spoolFailed(e, "open")
            return
        self.state = "data"
        self._reader = DataReader(self._incoming.write, f.config.messageSize)
        self._idle.start(f.config.timeoutData)
        self._dataStarted = f.clock.seconds()
        self._dataOctets = 0
        self._dataTimer = f.clock.callLater(f.config.dataDeadline, self._dataDeadline)
        self.sendReply(_GO_AHEAD)
        self.setRawMode()

    def _dataDeadline(self) -> None:
        """
        The DATA transfer has had C{dataDeadline} seconds: if the octets
        received since have earned it more time (one second per
        C{dataMinRate} octets), look again then; else end the session.
        One timer per transfer, nothing per chunk but a sum.
        """
        f = self.factory
        cfg = f.config
        now = f.clock.seconds()
        earned = self._dataOctets / cfg.dataMinRate if cfg.dataMinRate > 0 else 0.0
        allowed = self._dataStarted + cfg.dataDeadline + earned
        if now < allowed:
            self._dataTimer = f.clock.callLater(allowed - now, self._dataDeadline)
            return
        self._dataTimer = None
        envelope, session = self.envelope, self.session
        assert session is not None
        log.warn(
            "{queue_id}: DATA deadline exceeded: {octets} octets in {seconds:.0f} s "
            "(allowed {deadline} s plus 1 s per {rate} octets) from [{client}] "
            "session={session_id}",
            queue_id=envelope.queueId if envelope else None,
            octets=self._dataOctets,
            seconds=now - self._dataStarted,
            deadline=cfg.dataDeadline,
            rate=cfg.dataMinRate,
            client=self._clientText,
            session_id=session.sessionId,
        )
        self.reply(421, "4.4.2", f"{cfg.hostname} Error: timeout exceeded")
        self._close()

    def _stopDataDeadline(self) -> None:
        timer, self._dataTimer = self._dataTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def smtp_BDAT(self, argument: str) -> None:
        """
        C{BDAT <size> [LAST]} (RFC 3030): the next C{size} octets are part
        of the message, and C{LAST} ends it.

        The octets are read in raw mode whatever the answer, once the
        count could be read: a refused chunk is read and dropped, so the
        client stays in step and its content is never taken for commands
        (RFC 3030 section 2: discard the chunks pipelined after a failed
        one).  Every chunk is answered after its octets: C{250 2.0.0}
        with the count, and after C{LAST} the answer DATA gets (policies,
        header checks, the spool commit before C{250}).  A message that
        breaks DATA's rules is read to its C{LAST} and refused then, as
        DATA refuses after its real end.

        The whole message, from its first BDAT to the end of its C{LAST}
        chunk, has the deadline of a DATA transfer (L{_dataDeadline}), so
        that a trickle of small chunks cannot hold the connection; inside a
        chunk the DATA idle timeout applies.  A refused chunk outside a
        transaction has a deadline of its own.
        """
        words = argument.split()
        size = int(words[0]) if words and _COUNT.fullmatch(words[0]) else None
        last = len(words) == 2 and words[1].upper() == "LAST"
        if size is None or len(words) > 2 or (len(words) == 2 and not last):
            refusal = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
            if size is None:
                # Without a count there are no octets to skip.
                self.failWith(refusal)
                return
            self._readChunk(size, partial(self.failWith, refusal))
            return
        envelope = self.envelope
        if envelope is None:
            # Also the answer to a BDAT after LAST (RFC 3030 section 2).
            self._readChunk(size, partial(self.fail, 503, "5.5.1", "Error: need MAIL command"))
            return
        if not envelope.recipients:
            self._readChunk(size, partial(self.fail, 554, "5.5.1", "Error: no valid recipients"))
            return
        assert envelope.queueId is not None
        chunks = self._chunks
        if chunks is None:
            f = self.factory
            try:
                self._incoming = f.spool.openMessage(envelope.queueId)
                self._incoming.write(self._received(envelope))
            except OSError as e:
                self._readChunk(size, partial(self._spoolFailed, e, "open"))
                return
            chunks = self._chunks = ChunkReader(self._incoming.write, f.config.messageSize)

        def done() -> None:
            if not last:
                self.reply(250, "2.0.0", f"{size} octets received")
                return
            chunks.finish()
            self._chunks = None
            self._reader = chunks
            self._hold()
            self._endOfData()

        self._readChunk(size, done, chunks.feed)

    def _readChunk(
        self, size: int, done: Callable[[], None], feed: Callable[[bytes], None] | None = None
    ) -> None:
        """
        Read the C{size} octets of a BDAT chunk in raw mode, give them to
        C{feed} (or drop them), then call C{done} in command mode with
        reading held until it returns.  The transfer deadline starts with
        the first chunk of a message and runs until the message is done.
        """
        f = self.factory
        if self._dataTimer is None:
            self._dataStarted = f.clock.seconds()
            self._dataOctets = 0
            self._dataTimer = f.clock.callLater(f.config.dataDeadline, self._dataDeadline)
        if size == 0:
            self._chunkEnded(done)
            return
        self.state = "data"
        self._chunkLeft = size
        self._chunkDone = done
        self._chunkFeed = feed
        self._idle.start(f.config.timeoutData)
        self.setRawMode()

    def _chunkReceived(self, data: bytes) -> None:
        """Octets of the BDAT chunk being read, and what follows it."""
        part, rest = data[: self._chunkLeft], data[self._chunkLeft :]
        self._chunkLeft -= len(part)
        self._dataOctets += len(part)
        if self._chunkFeed is not None:
            self._chunkFeed(part)
        if self._chunkLeft:
            return
        done, self._chunkDone, self._chunkFeed = self._chunkDone, None, None
        assert done is not None
        self.state = "command"
        self._idle.start(self.factory.config.timeoutCommand)
        self._hold()
        self.setLineMode(rest)
        self._chunkEnded(done)
        self._release()

    def _chunkEnded(self, done: Callable[[], None]) -> None:
        """
        A chunk has been read: answer it (C{done}), with reading held, and
        stop the transfer deadline unless a BDAT message goes on.
        """
        self._hold()
        done()
        if self._chunks is None:
            self._stopDataDeadline()
        self._release()

    def _received(self, envelope: Envelope) -> bytes:
        """The C{Received:} trace header (RFC 5321 section 4.4, RFC 3848)."""
        session = self.session
        assert session is not None
        address = session.clientAddress
        literal = f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"
        protocol = "ESMTP" if session.esmtp else "SMTP"
        if envelope.smtputf8:
            # RFC 6531 sections 3.7.3 and 4.3 register UTF8SMTP, UTF8SMTPA,
            # UTF8SMTPS and UTF8SMTPSA ("ESMTP with SMTPUTF8"; Postfix and
            # Gmail write these).  SMTPUTF8 needs EHLO, so this is ESMTP.
            protocol = "UTF8SMTP"
        if session.tls:
            protocol += "S"
        if session.user is not None:
            protocol += "A"
        lines = [f"Received: from {_receivedName(session.helo or '')} ({literal})"]
        if session.tls:
            lines.append(f"\t(using {session.tlsVersion} with cipher {session.tlsCipher})")
        lines.append(
            f"\tby {self.factory.config.hostname} (relayd) with {protocol} id {envelope.queueId}"
        )
        # RFC 5322 section 3.3: "+0000" is UTC; "-0000" would say that
        # the local time zone is unknown, which is not relayd's case.
        stamp = _receivedDate(int(time.time()))
        if len(envelope.recipients) == 1:
            lines.append(f"\tfor <{envelope.recipients[0]}>; {stamp}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{stamp}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def rawDataReceived(self, data: bytes) -> None:
        if self._chunkDone is not None:
            self._chunkReceived(data)
            return
        assert isinstance(self._reader, DataReader)
        self._dataOctets += len(data)
        rest = self._reader.feed(data)
        if rest is None:
            return
        self._stopDataDeadline()
        self._hold()
        self.state = "command"
        self._idle.start(self.factory.config.timeoutCommand)
        self.setLineMode(rest)
        self._endOfData()

    def _endOfData(self) -> None:
        f = self.factory
        reader, self._reader = self._reader, None
        envelope, session, incoming = self.envelope, self.session, self._incoming
        assert reader is not None and envelope is not None and session is not None
        if reader.problem is not None:
            self._incoming = None
            incoming.discard()
            self._refuseData(reader)
            self._reset()
            self._release()
            return
        # The octets still in the file's buffer go to the file now only if
        # something will read it before the commit: a message policy (it
        # may open message.path), relaying in session, or a header section
        # past the kept head.  Otherwise the commit writes them with the
        # record, one write system call instead of two.
        if f.chain.readsMessages or self._relayed is not None or incoming.size > FIRST_READ:
            try:
                incoming.flush()
            except OSError as e:
                self._spoolFailed(e, "write")
                self._release()
                return
        message = Message(incoming.path, incoming.size, f.config.maxHeaderSize, incoming.head)
        try:
            refused = self._refuseHeader(message)
        except OSError as e:
            self._spoolFailed(e, "read")
            self._release()
            return
        if refused:
            self._incoming = None
            incoming.discard()
            self._reset()
            self._release()
            return
        self._committing = True
        started = f.clock.seconds()
        answer = f.chain.walk("checkMessage", session, envelope, message)
        outcome = {"queued": False}

        def refuse(verdict: Verdict) -> bool:
            if verdict.action not in (Action.REJECT, Action.TEMPFAIL):
                return False
            self._log("DATA", verdict)
            incoming.discard()
            if self.state != "closed":
                f.metrics.messageRejected("data", verdict.reply.code)
                self._answer(verdict)
            return True

        def decided(verdict: Verdict) -> Any:
            if refuse(verdict):
                return None
            # The checks let it through (CONTINUE or ACCEPT): every
            # modifier runs now, so no check's answer can skip one.
            changes = f.chain.modify(session, envelope, message)
            if not isinstance(changes, Verdict):
                return changes.addCallback(modified)
            return modified(changes)

        def modified(verdict: Verdict) -> Any:
            if refuse(verdict):
                return None
            if self._relayed is not None:
                return self._relayMessage(envelope, incoming, message, started, outcome)
            if message.changed:
                incoming.replaceHeader(message.headerBytes(), message.bodyOffset)
            record = self._record(envelope, incoming.size)
            record = requiretls.markRecord(record, envelope, message)
            return f.spool.commit(incoming, record).addCallbacks(committed, failed)

        def committed(queueId: str) -> None:
            outcome["queued"] = True
            elapsed = f.clock.seconds() - started
            # The client is waiting: its 250 first, then the log line and
            # the metrics.
            if self.state != "closed":
                self.reply(250, "2.0.0", f"Ok: queued as {queueId}")
            log.info(
                "{queue_id}: queued from=<{sender}> nrcpt={nrcpt} size={size} user={user} "
                "client=[{client}] session={session_id}",
                queue_id=queueId,
                sender=str(envelope.sender),
                nrcpt=len(envelope.recipients),
                size=incoming.size,
                user=session.user,
                client=self._clientText,
                session_id=session.sessionId,
            )
            f.metrics.messageAccepted(session.listener, incoming.size, elapsed)

        def failed(failure: Failure) -> None:
            incoming.discard()
            error = failure.value if isinstance(failure.value, OSError) else None
            if error is None:
                log.failure("{queue_id}: commit failed", failure, queue_id=envelope.queueId)
            self._spoolFailed(error, "commit")

        def done(_: Any) -> None:
            self._committing = False
            self._incoming = None
            if self.envelope is envelope:
                self._reset(outcome["queued"])
            self._release()

        self._whenDecided(answer, decided, failed, done)

    def _refuseHeader(self, message: Message) -> bool:
        """
        Refuse, before any policy is asked, a message whose header section
        is larger than C{[limits] header_size} (no policy may decide on
        part of it: a C{From:} past the bound would go unseen) or that has
        more C{Received:} fields than C{[limits] hops} (a mail loop, RFC
        5321 section 6.3).  Reads the header section (blocking, at most
        the bound): the policies find it parsed.

        @return: True when the message was refused.
        """
        config = self.factory.config
        if message.headerTooLarge:
            problem = f"header section over {config.maxHeaderSize} octets (limits.header_size)"
            reply = Reply(552, "5.3.4", "Error: message header section exceeds fixed limit")
        elif message.hopCount > config.maxHops:
            problem = (
                f"{message.hopCount} Received: fields, more than {config.maxHops} "
                "(limits.hops); a mail loop?"
            )
            reply = Reply(554, "5.4.6", "Error: too many hops")
        else:
            return False
        envelope, session = self.envelope, self.session
        assert envelope is not None and session is not None
        log.warn(
            "{queue_id}: message refused: {problem} from [{client}] session={session_id}",
            queue_id=envelope.queueId,
            problem=problem,
            client=self._clientText,
            session_id=session.sessionId,
        )
        self._refuseWith("data", reply)
        return True

    def _record(self, envelope: Envelope, size: int) -> QueueRecord:
        from relayd.queue.spool import envelopeRecord

        session = self.session
        assert session is not None and envelope.queueId is not None
        return envelopeRecord(
            queueId=envelope.queueId,
            sender=str(envelope.sender),
            recipients=[str(r) for r in envelope.recipients],
            arrival=time.time(),
            size=size,
            body=envelope.body,
            client=self._clientText,
            helo=session.helo,
            user=session.user,
            listener=session.listener,
            ret=envelope.ret,
            envid=envelope.envid,
            notify={str(a): p.notify for a, p in envelope.parameters.items() if p.notify},
            orcpt={str(a): p.orcpt for a, p in envelope.parameters.items() if p.orcpt},
            smtputf8=envelope.smtputf8,
        )

    def _refuseData(self, reader: DataReader | ChunkReader) -> None:
        envelope, session = self.envelope, self.session
        assert envelope is not None and session is not None
        problem = reader.problem
        log.warn(
            "{queue_id}: message refused: {problem} from [{client}] session={session_id}",
            queue_id=envelope.queueId,
            problem=problem,
            client=self._clientText,
            session_id=session.sessionId,
        )
        if problem == "size":
            self._refuse("data", 552, "5.3.4", "Error: message size exceeds fixed limit")
        elif problem == "line":
            self._refuse("data", 554, "5.6.0", "Error: message has a line longer than 998 octets")
        elif problem == "bare":
            self._refuse(
                "data", 550, "5.5.2", "Error: bare CR or LF in message; lines must end with CRLF"
            )
        elif problem == "nul":
            self._refuse("data", 554, "5.6.0", "Error: message contains NUL octets")
        else:
            self._spoolFailed(reader.error, "write")

    def _spoolFailed(self, error: OSError | None, stage: str) -> None:
        """A local storage problem: always temporary (DESIGN section 4.8)."""
        envelope, session = self.envelope, self.session
        assert session is not None
        if self._incoming is not None and not self._committing:
            self._incoming.discard()
            self._incoming = None
        log.error(
            "{queue_id}: spool {stage} failed: {error}",
            queue_id=envelope.queueId if envelope else None,
            stage=stage,
            error=error,
        )
        if self.state == "closed":
            return
        if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
            self._refuse("data", 452, "4.3.1", "Error: insufficient system storage")
        else:
            self._refuse("data", 451, "4.3.0", "Error: local error in processing")
        self._reset()

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self.fail(501, "5.5.4", "Syntax: RSET")
            return
        self._reset()
        self.sendReply(_OK)

    def _reset(self, queued: bool = False) -> None:
        """End the transaction in progress, if any, and tell the observers."""
        envelope, self.envelope = self.envelope, None
        relayed, self._relayed = self._relayed, None
        self._routeKey = None
        if relayed is not None:
            relayed.close()
        if self._chunks is not None:
            # A BDAT message left before its LAST chunk.
            self._chunks = None
            self._stopDataDeadline()
            if self._incoming is not None and not self._committing:
                self._incoming.discard()
                self._incoming = None
        if envelope is not None and self.session is not None:
            self.factory.chain.transactionEnded(self.session, envelope, queued)

    def smtp_NOOP(self, argument: str) -> None:
        self.sendReply(_OK)

    def smtp_QUIT(self, argument: str) -> None:
        if allSent(self.transport):
            # Nothing is queued, so the 221 goes out at once
            # (relayd.smtp.transport), and the session is over: the slot
            # is free now, as Postfix's smtpd tells anvil after flushing
            # its 221, not a reactor turn later when the socket is closed.
            # A client that reconnects the moment it reads the 221 (as
            # smtp-source does) must not find its old session counted: in
            # a receiver the slot is given back to the queue manager
            # before the 221 is written, so the process cannot be
            # preempted between the two with the client already back
            # (relayd.receivers.SharedLimits).  Should the kernel not take
            # even the 221, the close still ends the connection within
            # timeouts.close.
            self._giveSlotBack()
        self.sendReply(_BYE)
        self._close()

    def _giveSlotBack(self) -> None:
        """Give the connection's slot back to the limits, once."""
        if self._counted:
            self._counted = False
            # Counted only after connectionMade set _clientText.
            self.factory.limits.close(self._clientText)

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            self.fail(501, "5.5.4", "Syntax: VRFY address")
            return
        # RFC 5321 section 3.5.3: 252 tells nothing about the address.
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, argument: str) -> None:
        self.reply(
            214,
            "2.0.0",
            "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
        )


_COUNT = re.compile(r"[0-9]{1,20}")
"""A BDAT chunk size: ASCII digits only, bounded like SIZE's."""
_RELAY_DENIED = Verdict(Action.REJECT, 554, "5.7.1", "Relay access denied")
_OK_SENDER = Verdict(Action.ACCEPT, 250, "2.1.0", "Ok")

# Replies sent on every transaction, made (and checked) once.
_GO_AHEAD = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
_OK = Reply(250, "2.0.0", "Ok")
_BYE = Reply(221, "2.0.0", "Bye")
