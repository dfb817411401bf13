"""
relayd's outbound ESMTP client: one connection to one next hop.

This is not C{twisted.mail.smtp.ESMTPClient}: the stock client dot-stuffs
line by line across the chunks it is fed and can put C{CRLF.CRLF} on the
wire before the real end of the message (DESIGN section 1).  Here the
message goes through L{DotStuffer}, which works on whole chunks and keeps
the state a chunk boundary needs.

L{SMTPClient} is driven by L{relayd.delivery.attempt.Deliverer}:

  1. L{SMTPClient.ready} fires once the session can take mail: greeting,
     EHLO (HELO when EHLO gets a 5xx), STARTTLS as the hop's TLS mode asks,
     EHLO again inside TLS, and AUTH when the hop has credentials.  Anything
     that makes the hop unusable errbacks it with L{HopFailure}, so that the
     caller tries the next hop.
  2. L{SMTPClient.send} runs one mail transaction and returns one L{Reply}
     per recipient; it never errbacks.
  3. The connection may carry more transactions (RSET before each) and ends
     with L{SMTPClient.quit}.

Replies are matched to commands through a queue, which is what makes
PIPELINING (RFC 2920) work: with it, MAIL, every RCPT and DATA go out in one
write and the replies are taken in order.  Each queued command carries the
RFC 5321 section 4.5.3.2 timeout for its reply (L{ClientTimeouts}).
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import IO, Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPullProducer,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

import relayd.reply
from relayd.certificates import INTERMEDIATE, OPPORTUNISTIC, TLSProfile
from relayd.delivery.dane import DanePolicy, matchChain
from relayd.delivery.oauth2 import TokenError, TokenSources, saslResponse
from relayd.delivery.routing import Hop
from relayd.ops.logs import Logger
from relayd.queue.record import openRegion
from relayd.smtp.dsn import DSNParameters
from relayd.smtp.transport import writeSoon
from relayd.smtp.wire import DotStuffer
from relayd.timeouts import IdleTimer

__all__ = [
    "CHUNK_SIZE",
    "ClientTimeouts",
    "DotStuffer",
    "HopFailure",
    "Reply",
    "SMTPClient",
    "Transaction",
]

log = Logger(namespace="relayd.smtp")

CHUNK_SIZE = 65536
"""Octets read from the spool data file at a time while sending DATA."""


@dataclass(frozen=True)
class ClientTimeouts:
    """
    How long to wait, in seconds, at each step (RFC 5321 section 4.5.3.2;
    C{connect}, C{rset} and C{quit} follow Postfix's defaults).

    @ivar connect: for the TCP connection to be made.
    @ivar greeting: for the 220 greeting (RFC: 5 minutes).
    @ivar helo: for replies to EHLO/HELO, STARTTLS and AUTH (RFC: 5 minutes).
    @ivar mail: for the reply to MAIL (RFC: 5 minutes).
    @ivar rcpt: for each reply to RCPT (RFC: 5 minutes).
    @ivar dataInit: for the 354 reply to DATA (RFC: 2 minutes).
    @ivar dataBlock: for each chunk of the message to be taken by the peer
        (RFC: 3 minutes per TCP SEND).
    @ivar dataDone: for the reply after the final dot (RFC: 10 minutes).
    @ivar rset: for the reply to RSET.
    @ivar quit: for the reply to QUIT.
    """

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    dataInit: float = 120.0
    dataBlock: float = 180.0
    dataDone: float = 600.0
    rset: float = 20.0
    quit: float = 300.0


_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")


@dataclass(frozen=True)
class Reply(relayd.reply.Reply):
    """
    An SMTP reply from a next hop, or an outcome relayd made up in the same
    shape: a L{relayd.reply.Reply} with what the client also needs.

    A reply the peer sent is kept as received, whatever its digits (the
    checks of L{relayd.reply.Reply} are for replies relayd makes, and a
    peer's odd reply is a fact to report, not an error of ours); one
    relayd describes itself (C{remote} False) is checked.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 enhanced status code (RFC 2034), taken
        from the reply, or C{"X.0.0"} for the code's class when the server
        gave none.
    @ivar text: the reply text without codes, lines joined by spaces: what
        a DSN's Diagnostic-Code (RFC 3464 section 2.3.6) puts after them.
    @ivar lines: the text of each line (for EHLO keywords).
    @ivar remote: True when the peer sent this reply; False when relayd
        describes what happened itself (connection lost, timeout, TLS
        failure, a refusal of relayd's own).
    """

    enhanced: str
    lines: tuple[str, ...] = ()
    remote: bool = True

    def __post_init__(self) -> None:
        if not self.remote:
            super().__post_init__()

    @classmethod
    def parse(cls, lines: list[str]) -> Reply:
        """Make a reply from its lines as received (C{"250-..."}, C{"250 ..."})."""
        code = int(lines[-1][:3])
        texts = tuple(line[4:] for line in lines)
        enhanced = ""
        parts = []
        for text in texts:
            match = _ENHANCED.match(text)
            if match is not None and match.group(1) == str(code)[0]:
                enhanced = enhanced or match.group(0).strip()
                text = text[match.end() :]
            if text:
                parts.append(text)
        return cls(code, enhanced or f"{code // 100}.0.0", " ".join(parts), texts)

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> Reply:
        """
        An outcome described by relayd rather than said by the peer.  Line
        breaks in C{text} (an exception's message may have some) become
        spaces, so the reply stays one line.
        """
        if "\r" in text or "\n" in text:
            text = " ".join(text.split())
        return cls(code, enhanced, text, (text,), remote=False)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def quoted(self) -> str:
        """
        The reply as the peer sent it, for quoting in relayd's own texts:
        each line with its code and separator, joined by spaces (as
        Postfix quotes a remote reply), without the C{X.0.0} that
        L{enhanced} makes up when the peer gave no enhanced code.  An
        outcome relayd describes itself is quoted as L{__str__}.
        """
        if not self.remote or not self.lines:
            return str(self)
        last = len(self.lines) - 1
        return " ".join(
            f"{self.code}{' ' if i == last else '-'}{line}".rstrip()
            for i, line in enumerate(self.lines)
        )


class HopFailure(Exception):
    """
    This hop cannot take mail now: try the next one.

    @ivar reply: the outcome to report if no other hop does better; always
        a 4xx (a 5xx from the peer at this stage is reported as 4xx, as the
        next attempt may reach a better-behaved hop).
    @ivar connected: True when the TCP connection was made.
    @ivar tls: the session's C{"<version> <cipher>"} when TLS was up at the
        time (e.g. a smart host refusing AUTH inside TLS), else None; for
        the log line of the attempt.
    @ivar tlsProblem: the session's L{SMTPClient.tlsProblem} (TLSRPT).
    @ivar sendingAddress: relayd's address of the connection, if made.
    """

    def __init__(self, reply: Reply, connected: bool = True, tls: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.connected = connected
        self.tls = tls
        self.tlsProblem: tuple[str, str] | None = None
        self.sendingAddress = ""


class _SessionLost(Exception):
    """The connection ended while a reply was awaited; C{reply} says how."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass
class Transaction:
    """
    What one L{SMTPClient.send} came to.

    @ivar replies: one per recipient, in the order given: the RCPT reply
        for a refused recipient, the reply after the data for an accepted
        one, or what ended the session.
    @ivar stale: the connection failed before the MAIL command was
        answered, so nothing was done: a cached connection that turns out
        dead, and the message may go over a new one at once.
    @ivar commands: one per recipient, the command its reply answered
        (C{"MAIL FROM"}, C{"RCPT TO"}, C{"DATA"}, C{"end of DATA"}), or None
        for an outcome relayd describes itself; for a DSN's "in reply to"
        text (empty when not known).
    @ivar dsn: the DSN parameters went to the next hop (it advertised DSN,
        RFC 3461 section 4): from there on it reports, not relayd.
    """

    replies: list[Reply]
    stale: bool = False
    commands: list[str | None] = field(default_factory=list)
    dsn: bool = False


@dataclass
class _Waiter:
    stage: str
    timeout: float
    deferred: Deferred[Reply]


@implementer(IPullProducer)
class _MessageProducer:
    """
    Feeds the spool data file through a L{DotStuffer} to the transport, one
    L{CHUNK_SIZE} read each time the transport asks, so a large message
    never sits in memory.  Reading happens on the reactor thread: the file
    was written moments or minutes ago and is normally in the page cache.
    """

    def __init__(self, client: SMTPClient, file: IO[bytes]) -> None:
        self._client = client
        self._file: IO[bytes] | None = file
        self._stuffer = DotStuffer()

    def resumeProducing(self) -> None:
        file = self._file
        if file is None:
            return
        try:
            chunk = file.read(CHUNK_SIZE)
            # A short read is the end of a file; one more read confirms it
            # (b"" there), so that the last chunk and the final dot go out
            # in one write: written apart, the dot waited for the ACK of
            # the chunk (Nagle's algorithm against the next hop's delayed
            # ACK), 40 ms and more per message on a busy relay.
            ended = not chunk or (len(chunk) < CHUNK_SIZE and not (more := file.read(1)))
        except OSError as e:
            self.stopProducing()
            self._client._readFailed(e)
            return
        transport = self._client.transport
        assert transport is not None
        self._client._idle.restart()
        if not ended:
            if len(chunk) < CHUNK_SIZE:
                chunk += more
            # Queued, not sent at once: the transport asks for the next
            # chunk once it has sent what it holds.
            transport.write(self._stuffer.encode(chunk))
            return
        self._file = None
        transport.unregisterProducer()
        writeSoon(transport, self._stuffer.encode(chunk) + self._stuffer.finish())
        self._client._dataSent()

    def stopProducing(self) -> None:
        self._file = None


@implementer(IHandshakeListener)
class SMTPClient(LineReceiver):
    """
    One ESMTP session with one next hop.  See the module docstring.

    Replies are read with LF as the delimiter and a trailing CR removed, so
    a peer that ends reply lines with a bare LF is still understood; commands
    always go out with CRLF, written directly (never C{sendLine}, which would
    send the bare LF).

    @ivar hop: where this connection goes.
    @ivar ready: fires with this client once the session can take mail, or
        errbacks with L{HopFailure}.
    @ivar extensions: the EHLO keywords (upper case) and their parameters.
    @ivar esmtp: True when EHLO was accepted, False after a HELO fallback.
    @ivar tls: C{"<version> <cipher>"} once TLS is up, else None.
    @ivar messages: transactions started on this connection.
    @ivar steps: the set-up steps that succeeded, in order: C{"greeting"},
        C{"ehlo"} (EHLO or the HELO fallback), C{"starttls"} (TLS up and
        EHLO answered inside it), C{"auth"}; for reports such as
        C{relayctl check-config --live}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 4096
    transport: Any

    def __init__(
        self,
        hop: Hop,
        heloName: str,
        timeouts: ClientTimeouts,
        clock: Any,
        trustRoot: Any = None,
        tlsProfile: TLSProfile = INTERMEDIATE,
        opportunisticProfile: TLSProfile = OPPORTUNISTIC,
        dane: DanePolicy | None = None,
        tokens: TokenSources | None = None,
    ) -> None:
        """
        @param heloName: the name relayd gives in EHLO/HELO.
        @param clock: the reactor (L{IReactorTime}) for timeouts.
        @param trustRoot: the trust root for C{verify} TLS (an
            C{IOpenSSLTrustRoot}); None for the system's (L{platformTrust}).
        @param tlsProfile: TLS versions and suites for C{required} and
            C{verify} hops (C{[tls] ciphers}, C{min_version}).
        @param opportunisticProfile: the same for C{opportunistic} hops
            (C{[tls] opportunistic_ciphers}, C{min_version}).
        @param dane: the TLSA records of a hop whose TLS mode is C{"dane"}
            (L{relayd.delivery.dane}): the certificate must match one of
            them, checked as soon as the handshake completes.
        @param tokens: the OAuth2 access tokens for hops with C{oauth2}
            settings, shared between connections; None makes a private one
            when such a hop needs it.
        """
        self.hop = hop
        self.tokens = tokens
        self.dane = dane
        self.daneVerified = False
        self.heloName = heloName
        self.timeouts = timeouts
        self.clock = clock
        self.trustRoot = trustRoot
        self.tlsProfile = tlsProfile
        self.opportunisticProfile = opportunisticProfile
        self.ready: Deferred[SMTPClient] = Deferred()
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls: str | None = None
        self.messages = 0
        self.steps: list[str] = []
        self.peer = f"{hop.host}[{hop.address}]"
        # TLSRPT (RFC 8460 section 4.3): the result type and reason of this
        # session's TLS failure, or of the check a C{tlsCheck} hop makes
        # without refusing (MTA-STS testing); None while all is well.
        self.tlsProblem: tuple[str, str] | None = None
        self.sendingAddress = ""
        self._verifyErrors: list[int] = []
        self._lines: list[str] = []
        self._waiting: deque[_Waiter] = deque()
        self._stage = "receiving the initial server greeting"
        self._connected = False
        self._closing = False
        self._broken = False
        self._needReset = False
        self._tlsStarted = False
        self._tlsInfo: str | None = None
        self._lostReply: Reply | None = None
        self._serverClosing: Reply | None = None
        self._producer: _MessageProducer | None = None
        self._whenClosed: list[Deferred[None]] = []
        # How long the peer may keep us waiting (L{relayd.timeouts}).
        self._idle = IdleTimer(clock, self.timeoutConnection)

    # --- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        try:
            self.sendingAddress = str(self.transport.getHost().host)
        except Exception:
            self.sendingAddress = ""
        greeting = self._expect(self._stage, self.timeouts.greeting)
        d = self._open(greeting)
        d.addErrback(self._openFailed)
        d.chainDeferred(self.ready)

    def handshakeCompleted(self) -> None:
        """
        Note the TLS version and cipher.  They become L{tls} only once the
        peer has answered EHLO inside TLS: with C{verify}, a certificate
        that does not match the host name is found just after the handshake
        itself completes, and must not count as TLS established.
        """
        try:
            connection = self.transport.getHandle()
            self._tlsInfo = (
                f"{connection.get_protocol_version_name()} {connection.get_cipher_name()}"
            )
        except Exception:
            self._tlsInfo = "TLS"
        if self.hop.tls == "dane":
            self._checkDane()
        elif self.hop.tlsCheck and self.hop.tls != "verify":
            self._checkCertificate()

    def _checkCertificate(self) -> None:
        """
        MTA-STS C{testing} (RFC 8461 section 5): check the certificate as
        C{verify} would (chained to the trust store, valid for the MX name:
        section 4.2), and note what failed in L{tlsProblem}, without
        refusing the session.
        """
        try:
            chain = self.transport.getHandle().get_peer_cert_chain() or []
            leaf = chain[0].to_cryptography() if chain else None
        except Exception as e:
            self.tlsProblem = ("validation-failure", f"cannot read the certificate ({e})")
            return
        if self._verifyErrors:
            self.tlsProblem = _verifyProblem(self._verifyErrors[0])
        elif leaf is None:
            self.tlsProblem = ("validation-failure", "no certificate presented")
        else:
            try:
                verify_certificate_hostname(leaf, self.hop.host.rstrip("."))
            except (VerificationError, CertificateError, ValueError):
                self.tlsProblem = (
                    "certificate-host-mismatch",
                    f"certificate not valid for {self.hop.host}",
                )

    def _checkDane(self) -> None:
        """
        DANE (RFC 7672 section 3): right after the handshake, before the
        EHLO inside TLS is answered, match the chain the server presented
        against the TLSA records; on a mismatch the connection is cut and
        the hop fails with C{4.7.5}, so nothing of the message ever goes
        to a server that failed the check.
        """
        why: str | None
        if self.dane is None or not self.dane.usable:
            why = "no usable TLSA record"
            self.tlsProblem = ("tlsa-invalid", why)
        else:
            try:
                chain = self.transport.getHandle().get_peer_cert_chain() or []
                why = matchChain(self.dane, [c.to_cryptography() for c in chain], self.hop.host)
            except Exception as e:
                why = f"cannot read the certificate chain ({type(e).__name__})"
        if why is None:
            self.daneVerified = True
            return
        if self.tlsProblem is None:
            self.tlsProblem = ("validation-failure", why)
        reply = Reply.local(
            451, "4.7.5", f"DANE: TLS certificate of {self.peer} not accepted: {why}"
        )
        log.warn("{peer}: {text}", peer=self.peer, text=reply.text)
        self._abort(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._idle.stop()
        self._connected = False
        self._broken = True
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        lost = self._lossReply(reason)
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            waiter.deferred.errback(_SessionLost(lost))
        whenClosed, self._whenClosed = self._whenClosed, []
        for d in whenClosed:
            d.callback(None)

    def _lossReply(self, reason: Failure) -> Reply:
        """Describe why the session ended, Postfix-style, for the DSN."""
        if self._lostReply is not None:
            return self._lostReply
        if self._serverClosing is not None:
            return self._serverClosing
        if (self._tlsStarted and self._tlsInfo is None) or reason.check(
            SSL.Error, VerificationError
        ):
            if self.tlsProblem is None:
                errors = self._verifyErrors or _verifyResult(self.transport)
                self.tlsProblem = _handshakeProblem(reason, errors)
            return Reply.local(
                451,
                "4.7.5",
                f"TLS handshake with {self.peer} failed: {_tlsError(reason)}",
            )
        return Reply.local(451, "4.4.2", f"lost connection with {self.peer} while {self._stage}")

    def timeoutConnection(self) -> None:
        """No reply (or no progress sending data) in time: give up on the peer."""
        self._lostReply = Reply.local(
            451,
            "4.4.1" if self._stage.startswith("receiving the initial") else "4.4.2",
            f"conversation with {self.peer} timed out while {self._stage}",
        )
        log.warn("{peer}: {text}", peer=self.peer, text=self._lostReply.text)
        assert self.transport is not None
        self.transport.abortConnection()

    def whenClosed(self) -> Deferred[None]:
        """A Deferred that fires once the connection is gone."""
        if not self._connected and self.transport is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._whenClosed.append(d)
        return d

    @property
    def reusable(self) -> bool:
        """True when the session is idle, in step and may take another message."""
        return (
            self._connected
            and not self._closing
            and not self._broken
            and not self._waiting
            and self.ready.called
        )

    def quit(self) -> Deferred[None]:
        """
        Say QUIT (when the session is in step), then close; fires once the
        connection is gone.
        """
        closed = self.whenClosed()
        if not self._connected or self._closing:
            return closed
        self._closing = True
        assert self.transport is not None
        if self._broken or self._waiting or self._producer is not None:
            self.transport.loseConnection()
            return closed
        d = self._command(b"QUIT", "sending QUIT", self.timeouts.quit)
        d.addErrback(lambda _: None)
        d.addCallback(lambda _: self.transport.loseConnection())
        return closed

    def _abort(self, reply: Reply) -> None:
        """Drop the connection; waiters get C{reply} as the reason."""
        if self._lostReply is None:
            self._lostReply = reply
        self._broken = True
        if self.transport is not None and self._connected:
            self.transport.abortConnection()

    # --- replies ---------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._abort(
                Reply.local(
                    451,
                    "4.5.0",
                    f"protocol error with {self.peer} while {self._stage}: "
                    f"malformed reply {text[:80]!r}",
                )
            )
            return
        self._lines.append(text)
        if text[3:4] == "-":
            return
        lines, self._lines = self._lines, []
        self._replied(Reply.parse(lines))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(
            Reply.local(
                451,
                "4.5.0",
                f"protocol error with {self.peer} while {self._stage}: reply line too long",
            )
        )

    def _replied(self, reply: Reply) -> None:
        if reply.code == 421:
            # RFC 5321 section 3.8: the server is closing the connection;
            # whatever else was pending ends with this reply.
            self._serverClosing = reply
            self._broken = True
        if not self._waiting:
            log.info("{peer}: unexpected reply: {reply}", peer=self.peer, reply=str(reply))
            self._broken = True
            assert self.transport is not None
            self.transport.loseConnection()
            return
        waiter = self._waiting.popleft()
        if self._waiting:
            self._stage = self._waiting[0].stage
            self._idle.start(self._waiting[0].timeout)
        else:
            self._idle.start(None)
        if self._serverClosing is not None:
            assert self.transport is not None
            self.transport.loseConnection()
        waiter.deferred.callback(reply)

    # --- commands --------------------------------------------------------

    def _expect(self, stage: str, timeout: float) -> Deferred[Reply]:
        """Queue a wait for one more reply."""
        waiter = _Waiter(stage, timeout, Deferred())
        if not self._waiting:
            self._stage = stage
            self._idle.start(timeout)
        self._waiting.append(waiter)
        return waiter.deferred

    def _commands(self, commands: list[tuple[bytes, str, float]]) -> list[Deferred[Reply]]:
        """
        Send commands in one write and queue their replies: C{(line, stage,
        timeout)} each, where C{stage} names the wait in error texts.
        """
        if not self._connected:
            lost = self._lossReply(Failure(ConnectionError("not connected")))
            return [_failed(lost) for _ in commands]
        replies = [self._expect(stage, timeout) for _, stage, timeout in commands]
        assert self.transport is not None
        writeSoon(self.transport, b"".join(line + b"\r\n" for line, _, _ in commands))
        return replies

    def _command(self, line: bytes, stage: str, timeout: float) -> Deferred[Reply]:
        return self._commands([(line, stage, timeout)])[0]

    # --- session set-up --------------------------------------------------

    @inlineCallbacks
    def _open(self, greeting: Deferred[Reply]) -> Generator[Deferred[Any], Any, SMTPClient]:
        """
        Greeting, EHLO, STARTTLS, EHLO, AUTH: everything before the first
        MAIL.  Raises L{HopFailure} when this hop will not do.
        """
        reply = yield greeting
        if reply.code // 100 != 2:
            raise _refused(reply, self.peer, "refused to talk to me")
        self.steps.append("greeting")
        yield self._hello()
        self.steps.append("ehlo")
        mode = self.hop.tls
        if mode != "none":
            if "STARTTLS" in self.extensions:
                reply = yield self._command(b"STARTTLS", "sending STARTTLS", self.timeouts.helo)
                if reply.code == 220:
                    self._startTLS()
                    yield self._hello()
                    self.tls = self._tlsInfo or "TLS"
                    self.steps.append("starttls")
                    log.info("{peer}: TLS established: {tls}", peer=self.peer, tls=self.tls)
                elif mode != "opportunistic":
                    self.tlsProblem = ("starttls-not-supported", f"STARTTLS refused: {reply}")
                    raise _refused(reply, self.peer, "refused STARTTLS")
                else:
                    if self.hop.tlsCheck:
                        self.tlsProblem = ("starttls-not-supported", f"STARTTLS refused: {reply}")
                    log.info(
                        "{peer}: STARTTLS refused ({reply}); continuing without TLS",
                        peer=self.peer,
                        reply=reply.quoted,
                    )
            elif mode != "opportunistic":
                self.tlsProblem = ("starttls-not-supported", "STARTTLS not offered")
                raise HopFailure(
                    Reply.local(
                        451,
                        "4.7.4",
                        f"TLS is required, but was not offered by host {self.peer}",
                    )
                )
        elif self.hop.tlsCheck:
            self.tlsProblem = ("starttls-not-supported", "tls = none for this hop")
        if self.hop.tlsCheck and self.tls is None and self.tlsProblem is None:
            self.tlsProblem = ("starttls-not-supported", "STARTTLS not offered")
        if self.hop.username is not None:
            yield self._authenticate()
            self.steps.append("auth")
        return self

    def _openFailed(self, failure: Failure) -> Failure:
        """Turn a failed set-up into L{HopFailure} and end the session."""
        if isinstance(failure.value, _SessionLost):
            failure = Failure(HopFailure(failure.value.reply))
        elif not failure.check(HopFailure):
            log.failure("{peer}: session set-up failed", failure, peer=self.peer)
            failure = Failure(
                HopFailure(Reply.local(451, "4.3.0", f"internal error talking to {self.peer}"))
            )
        hopFailure = failure.value
        assert isinstance(hopFailure, HopFailure)
        if hopFailure.tls is None:
            # Set here, where the session knows, not where it is raised:
            # every refusal after STARTTLS (AUTH, a later EHLO) carries it.
            hopFailure.tls = self.tls
        hopFailure.tlsProblem = hopFailure.tlsProblem or self.tlsProblem
        hopFailure.sendingAddress = self.sendingAddress
        self.quit()
        return failure

    @inlineCallbacks
    def _hello(self) -> Generator[Deferred[Any], Any, None]:
        """EHLO, or HELO when the server answers EHLO with 5xx (RFC 5321 section 3.2)."""
        name = self.heloName.encode("ascii")
        reply = yield self._command(b"EHLO " + name, "sending EHLO", self.timeouts.helo)
        if reply.code // 100 == 2:
            self.esmtp = True
            self.extensions = _extensions(reply.lines[1:])
            return
        if reply.code // 100 == 5:
            reply = yield self._command(b"HELO " + name, "sending HELO", self.timeouts.helo)
            if reply.code // 100 == 2:
                self.esmtp = False
                self.extensions = {}
                return
        raise _refused(reply, self.peer, "refused to talk to me", "in reply to EHLO/HELO")

    def _startTLS(self) -> None:
        """
        Start TLS after the 220 to STARTTLS.  Anything the peer sent after
        that reply was sent in plaintext and is thrown away, never read as a
        reply inside TLS (RFC 3207 section 4.2; CVE-2011-0411 seen from the
        client's side).  A C{verify} hop checks the certificate against the
        trust root and C{hop.host}; the other modes encrypt without checking
        (RFC 7435 opportunistic security).  C{required} and C{verify} hops
        get L{tlsProfile}, C{opportunistic} ones the wider
        L{opportunisticProfile} (L{relayd.config.OPPORTUNISTIC_CIPHERS} says
        why).
        """
        self.clearLineBuffer()
        self._lines = []
        self.extensions = {}
        self._tlsStarted = True
        profile = self.opportunisticProfile if self.hop.tls == "opportunistic" else self.tlsProfile
        extra = profile.certificateOptions()
        if self.hop.tls == "verify":
            trustRoot = self.trustRoot if self.trustRoot is not None else platformTrust()
            options: Any = optionsForClientTLS(
                self.hop.host, trustRoot=trustRoot, extraCertificateOptions=extra
            )
        elif self.hop.tlsCheck and self.hop.tls != "dane":
            # MTA-STS testing: the certificate is checked after the
            # handshake (_checkCertificate), never refused.
            trustRoot = self.trustRoot if self.trustRoot is not None else platformTrust()
            options = _CheckingClientOptions(
                CertificateOptions(**extra), self.hop.host, trustRoot, self._verifyErrors
            )
        elif self.hop.tls == "dane":
            # The certificate is checked against the TLSA records once the
            # handshake is done (_checkDane); SNI names the TLSA base
            # domain, so that the server presents the right chain (RFC
            # 7672 section 8.1).
            options = _SNIClientOptions(CertificateOptions(**extra), self.hop.host)
        else:
            options = CertificateOptions(**extra)
        assert self.transport is not None
        self.transport.startTLS(options)

    @inlineCallbacks
    def _authenticate(self) -> Generator[Deferred[Any], Any, None]:
        """
        AUTH PLAIN (RFC 4616) or else LOGIN, only inside TLS: credentials
        are never sent in plaintext, whatever the hop's TLS mode.
        """
        if self.tls is None:
            raise HopFailure(
                Reply.local(
                    451,
                    "4.7.4",
                    f"refusing to send credentials to {self.peer} without TLS",
                )
            )
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if self.hop.oauth2 is not None:
            yield self._authenticateOAuth2(mechanisms)
            return
        user = (self.hop.username or "").encode("utf-8")
        password = (self.hop.password or "").encode("utf-8")
        timeout = self.timeouts.helo
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = yield self._command(b"AUTH PLAIN " + token, "sending AUTH", timeout)
        elif "LOGIN" in mechanisms:
            reply = yield self._command(b"AUTH LOGIN", "sending AUTH", timeout)
            if reply.code == 334:
                reply = yield self._command(
                    base64.b64encode(user), "sending the AUTH user name", timeout
                )
            if reply.code == 334:
                reply = yield self._command(
                    base64.b64encode(password), "sending the AUTH password", timeout
                )
        else:
            offered = " ".join(mechanisms) or "none"
            raise HopFailure(
                Reply.local(
                    451,
                    "4.7.4",
                    f"host {self.peer} offers no AUTH mechanism relayd can use "
                    f"(PLAIN, LOGIN; offered: {offered})",
                )
            )
        if reply.code != 235:
            raise _refused(
                reply, self.peer, "refused authentication", "in reply to AUTH", AUTH_REFUSED
            )

    @inlineCallbacks
    def _authenticateOAuth2(self, mechanisms: list[str]) -> Generator[Deferred[Any], Any, None]:
        """
        AUTH XOAUTH2 or OAUTHBEARER (RFC 7628) with an access token from
        the hop's L{TokenSource<relayd.delivery.oauth2.TokenSource>}.

        When the server refuses the token (a C{334} error challenge, or
        C{535}), the token is refreshed once and AUTH tried once more in
        the same session: RFC 4954 section 4 lets a client try again after
        a failed AUTH, and a new connection would only repeat the TLS
        handshake.  No token (endpoint down, grant refused) defers the mail
        with the L{TokenError}'s reply.
        """
        config = self.hop.oauth2
        assert config is not None
        mechanism = config.mechanism.upper()
        if mechanism not in mechanisms:
            offered = " ".join(mechanisms) or "none"
            raise HopFailure(
                Reply.local(
                    451,
                    "4.7.4",
                    f"host {self.peer} does not offer AUTH {mechanism} (offered: {offered})",
                )
            )
        if self.tokens is None:
            self.tokens = TokenSources(self.clock)
        source = self.tokens.source(config)
        try:
            token = yield source.token()
        except TokenError as e:
            raise HopFailure(Reply.local(e.code, e.enhanced, e.text)) from None
        reply, challenged = yield self._saslOAuth2(config.mechanism, token)
        context = f"in reply to AUTH {mechanism}"
        if reply.code == 535 or (challenged and reply.code // 100 == 5):
            log.info(
                "{peer}: AUTH {mechanism} refused ({reply}): fetching a new access "
                "token and trying once more",
                peer=self.peer,
                mechanism=mechanism,
                reply=reply.quoted,
            )
            try:
                token = yield source.refresh(stale=token)
            except TokenError as e:
                raise HopFailure(Reply.local(e.code, e.enhanced, e.text)) from None
            reply, _ = yield self._saslOAuth2(config.mechanism, token)
            context += " with a fresh token"
        if reply.code != 235:
            raise _refused(reply, self.peer, "refused authentication", context, AUTH_REFUSED)

    @inlineCallbacks
    def _saslOAuth2(
        self, mechanism: str, token: str
    ) -> Generator[Deferred[Any], Any, tuple[Reply, bool]]:
        """
        One AUTH exchange with an initial response.  A C{334} is the
        server's error challenge (RFC 7628 section 3.2.2; XOAUTH2 does the
        same): relayd answers as the mechanism says (OAUTHBEARER: a single
        C{%x01}, section 3.2.3; XOAUTH2: an empty line).

        @return: the server's final reply, and whether it came after an
            error challenge (the token was refused, whatever the code).
        """
        assert self.hop.username is not None
        response = saslResponse(mechanism, self.hop.username, token, self.hop.host, self.hop.port)
        timeout = self.timeouts.helo
        reply = yield self._command(
            b"AUTH " + mechanism.upper().encode("ascii") + b" " + response,
            "sending AUTH",
            timeout,
        )
        if reply.code == 334:
            challenge = reply.lines[0].strip() if reply.lines else ""
            try:
                detail = base64.b64decode(challenge, validate=True).decode("utf-8", "replace")
            except ValueError:
                detail = challenge
            log.info(
                "{peer}: AUTH {mechanism} error challenge: {detail}",
                peer=self.peer,
                mechanism=mechanism.upper(),
                detail=detail[:300],
            )
            answer = base64.b64encode(b"\x01") if mechanism == "oauthbearer" else b""
            reply = yield self._command(answer, "ending the AUTH error exchange", timeout)
            if reply.code == 334:
                # Not ended as the mechanism says: cancel (RFC 4954 section 4).
                reply = yield self._command(b"*", "cancelling AUTH", timeout)
            return reply, True
        return reply, False

    # --- transactions ----------------------------------------------------

    def send(
        self,
        sender: str,
        recipients: list[str],
        dataPath: str,
        size: int,
        eightBit: bool = False,
        dsn: DSNParameters | None = None,
        smtputf8: bool = False,
        *,
        requireTLS: bool = False,
    ) -> Deferred[Transaction]:
        """
        One mail transaction: RSET if the connection carried one before,
        MAIL, RCPT for each recipient, DATA and the message.

        C{MAIL} carries C{SIZE=} when the server offers SIZE (RFC 1870) and
        C{BODY=8BITMIME} when the message has 8-bit octets and the server
        offers 8BITMIME (RFC 6152).  An 8-bit message goes to a server that
        does not offer 8BITMIME as it is, without C{BODY=}, as Postfix does:
        converting it is beyond a relay, and refusing it would bounce mail
        most servers take in practice.

        @param sender: the reverse-path; C{""} for the null path C{<>}.
        @param dataPath: the spool queue file (CRLF line ends); the message
            is its first C{size} octets.
        @param size: its size in octets.
        @param eightBit: the message has octets above 127.
        @param dsn: the message's DSN parameters, passed on as C{RET=},
            C{ENVID=}, C{NOTIFY=}, C{ORCPT=} when the server offers DSN
            (RFC 3461 section 4); left out otherwise.
        @param requireTLS: the message was received with REQUIRETLS (RFC
            8689): C{MAIL} carries C{REQUIRETLS}, and nothing is sent unless
            L{requireTLSRefusal} finds the session fit for it.
        @param smtputf8: the message needs C{SMTPUTF8} (RFC 6531;
            L{relayd.delivery.smtputf8.needsSMTPUTF8}): MAIL carries it, and when the
            server does not offer it nothing is sent and every recipient
            fails with C{553 5.6.7} (never a downgrade).
        @return: a L{Transaction}; never errbacks.
        """
        d = self._transaction(
            sender, recipients, dataPath, size, eightBit, dsn, smtputf8, requireTLS
        )

        def unexpected(failure: Failure) -> Transaction:
            log.failure("{peer}: transaction failed", failure, peer=self.peer)
            self._abort(Reply.local(451, "4.3.0", "internal error in delivery"))
            reply = Reply.local(451, "4.3.0", f"internal error sending to {self.peer}")
            return Transaction([reply] * len(recipients))

        return d.addErrback(unexpected).addCallback(_withCommands)

    @inlineCallbacks
    def _transaction(
        self,
        sender: str,
        recipients: list[str],
        dataPath: str,
        size: int,
        eightBit: bool,
        dsn: DSNParameters | None = None,
        smtputf8: bool = False,
        requireTLS: bool = False,
    ) -> Generator[Deferred[Any], Any, Transaction]:
        replies: list[Reply | None] = [None] * len(recipients)
        commands: list[str | None] = [None] * len(recipients)
        passDSN = False
        t = self.timeouts
        mailAnswered = False
        try:
            file = openRegion(dataPath, size)
        except OSError as e:
            reply = Reply.local(451, "4.3.0", f"cannot read queue file: {e.strerror}")
            return Transaction([reply] * len(recipients))
        try:
            if self._needReset:
                reply = yield self._command(b"RSET", "sending RSET", t.rset)
                if reply.code // 100 != 2:
                    self._abort(reply)
                    return Transaction([reply] * len(recipients), stale=True)
                self._needReset = False
            if requireTLS:
                # The deliverer checked already; this is the last word
                # before a REQUIRETLS message could leave.
                refusal = self.requireTLSRefusal()
                if refusal is not None:
                    return Transaction([refusal] * len(recipients))
            self.messages += 1
            limit = self._sizeLimit()
            if limit and size > limit:
                reply = Reply.local(
                    552,
                    "5.3.4",
                    f"message size {size} exceeds size limit {limit} of server {self.peer}",
                )
                return Transaction([reply] * len(recipients))
            if smtputf8 and "SMTPUTF8" not in self.extensions:
                # RFC 6531 section 3.2: not to a server without it; the
                # sender hears of it in a DSN (Postfix says the same).
                reply = Reply.local(
                    553,
                    "5.6.7",
                    f"SMTPUTF8 is required, but was not offered by host {self.peer}",
                )
                return Transaction([reply] * len(recipients))
            self._needReset = True
            mail = b"MAIL FROM:<" + sender.encode("utf-8") + b">"
            if "SIZE" in self.extensions:
                mail += b" SIZE=%d" % size
            if eightBit and "8BITMIME" in self.extensions:
                mail += b" BODY=8BITMIME"
            passDSN = dsn is not None and not dsn.empty and "DSN" in self.extensions
            if passDSN:
                assert dsn is not None
                mail += dsn.mail().encode("ascii")
            if requireTLS:
                mail += b" REQUIRETLS"
            if smtputf8:
                mail += b" SMTPUTF8"
            rcpts = [
                (
                    b"RCPT TO:<"
                    + r.encode("utf-8")
                    + b">"
                    + (dsn.rcpt(r).encode("ascii") if passDSN and dsn is not None else b""),
                    "sending RCPT TO",
                    t.rcpt,
                )
                for r in recipients
            ]
            dataReply: Reply | None = None
            if "PIPELINING" in self.extensions:
                pending = self._commands(
                    [
                        (mail, "sending MAIL FROM", t.mail),
                        *rcpts,
                        (b"DATA", "sending DATA", t.dataInit),
                    ]
                )
                # Every reply is taken, even after the connection is lost,
                # so that no Deferred is left with an unhandled error.
                for d in pending:
                    d.addErrback(_lostAsValue)
                mailReply = _raiseLost((yield pending[0]))
                mailAnswered = True
                rcptReplies = []
                for d in pending[1:-1]:
                    rcptReplies.append((yield d))
                dataReply = yield pending[-1]
                for reply in [*rcptReplies, dataReply]:
                    _raiseLost(reply)
            else:
                mailReply = yield self._command(mail, "sending MAIL FROM", t.mail)
                mailAnswered = True
                rcptReplies = []
                if mailReply.code // 100 == 2:
                    for command in rcpts:
                        rcptReplies.append((yield self._command(*command)))
            if mailReply.code // 100 != 2:
                return Transaction(
                    [mailReply] * len(recipients), commands=["MAIL FROM"] * len(recipients)
                )
            accepted = []
            for i, reply in enumerate(rcptReplies):
                if reply.code // 100 == 2:
                    accepted.append(i)
                else:
                    replies[i] = reply
                    commands[i] = "RCPT TO"
            if not accepted:
                if dataReply is not None and dataReply.code == 354:
                    # A server that says 354 with no valid recipient
                    # (RFC 2920 section 3.1 says it must not): end the empty
                    # message at once, it goes to nobody.
                    yield self._endEmptyData()
                reply = yield self._command(b"RSET", "sending RSET", t.rset)
                self._needReset = reply.code // 100 != 2
                return Transaction([r for r in replies if r is not None], commands=commands)
            if dataReply is None:
                dataReply = yield self._command(b"DATA", "sending DATA", t.dataInit)
            if dataReply.code != 354:
                if dataReply.code // 100 == 2:
                    dataReply = _unexpected(dataReply, self.peer, "DATA")
                for i in accepted:
                    replies[i] = dataReply
                    commands[i] = "DATA" if dataReply.remote else None
            else:
                final = yield self._sendData(file)
                if final.code // 100 not in (2, 4, 5):
                    final = _unexpected(final, self.peer, "end of data")
                for i in accepted:
                    replies[i] = final
                    commands[i] = "end of DATA" if final.remote else None
        except _SessionLost as e:
            return Transaction(
                [r if r is not None else e.reply for r in replies],
                stale=not mailAnswered,
                commands=commands,
                dsn=passDSN if mailAnswered else False,
            )
        finally:
            file.close()
        return Transaction([r for r in replies if r is not None], commands=commands, dsn=passDSN)

    def requireTLSRefusal(self) -> Reply | None:
        """
        Why this session may not carry a REQUIRETLS message (RFC 8689
        section 4.2.1), or None when it may: TLS must be up with the
        C{verify} mode (a certificate chained to the trust root and
        matching the hop's host name, or the C{dane} mode: a certificate
        that matched the MX host's TLSA records, which RFC 8689 section
        4.2.1 counts as verified; C{5.7.10} otherwise), and the EHLO
        inside TLS must offer C{REQUIRETLS} (C{5.7.30} otherwise, the code
        RFC 8689 registers: "REQUIRETLS support required").  Permanent:
        the same hop will answer the same.
        """
        if self.tls is None or self.hop.tls not in ("verify", "dane"):
            return Reply.local(
                550,
                "5.7.10",
                f"requiretls: TLS with host {self.peer} not established or its "
                "certificate not verified",
            )
        if "REQUIRETLS" not in self.extensions:
            return Reply.local(
                550,
                "5.7.30",
                f"requiretls: next hop {self.peer} does not offer REQUIRETLS",
            )
        return None

    def _sizeLimit(self) -> int:
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

    def _endEmptyData(self) -> Deferred[Reply]:
        return self._command(b".", "sending end of data", self.timeouts.dataDone)

    def _sendData(self, file: IO[bytes]) -> Deferred[Reply]:
        """
        Stream the message through a producer, then wait for the reply to
        the final dot.  Until the last chunk is written, the timeout is the
        data-block one and restarts with every chunk; then the final-dot
        one.  A reply before the end (a server refusing mid-stream) ends the
        stream and the connection, which is then out of step.
        """
        final = self._expect(
            "sending end of data -- message may be sent more than once",
            self.timeouts.dataDone,
        )
        self._stage = "sending message body"
        self._idle.start(self.timeouts.dataBlock)
        producer = _MessageProducer(self, file)
        self._producer = producer

        def replied(reply: Reply) -> Reply:
            if self._producer is producer:
                # Still sending: the reply came early.
                self._producer = None
                producer.stopProducing()
                self._abort(reply)
            return reply

        final.addCallback(replied)
        assert self.transport is not None
        self.transport.registerProducer(producer, False)
        return final

    def _dataSent(self) -> None:
        """The last chunk and the final dot are written."""
        self._producer = None
        if self._waiting:
            self._stage = self._waiting[0].stage
        self._idle.start(self.timeouts.dataDone)

    def _readFailed(self, error: OSError) -> None:
        """The spool file could not be read mid-message: never end the data."""
        self._producer = None
        self._abort(Reply.local(451, "4.3.0", f"error reading queue file: {error.strerror}"))


@implementer(IOpenSSLClientConnectionCreator)
class _SNIClientOptions:
    """
    Client TLS without PKIX verification, as L{CertificateOptions}, that
    sends a server name (SNI, RFC 6066 section 3), which
    L{CertificateOptions} alone does not.
    """

    def __init__(self, options: CertificateOptions, hostname: str) -> None:
        self._options = options
        self._hostname = hostname.rstrip(".").encode("ascii", "replace")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _CheckingClientOptions:
    """
    Client TLS that verifies the chain against C{trustRoot} and notes the
    errors in C{errors} but never fails the handshake on them (MTA-STS
    testing); sends the MX name as SNI.
    """

    def __init__(
        self, options: CertificateOptions, hostname: str, trustRoot: Any, errors: list[int]
    ) -> None:
        self._options = options
        self._hostname = hostname.rstrip(".").encode("ascii", "replace")
        self._trustRoot = trustRoot
        self._errors = errors

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = self._options.getContext()
        self._trustRoot._addCACertsToContext(context)
        errors = self._errors

        def note(conn: Any, cert: Any, err: int, depth: int, ok: int) -> bool:
            if not ok and err:
                errors.append(err)
            return True

        context.set_verify(SSL.VERIFY_PEER, note)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        connection.set_connect_state()
        return connection


_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_HOSTNAME_MISMATCH = 62


def _verifyResult(transport: Any) -> list[int]:
    """
    The certificate verify error OpenSSL noted for the session (its
    C{SSL_get_verify_result}), as a one-element list, or empty: the one
    place relayd reads it, for TLSRPT's result type of a failed C{verify}
    handshake (the error queue only says "certificate verify failed").
    """
    try:
        connection = transport.getHandle()
        error = int(SSL._lib.SSL_get_verify_result(connection._ssl))  # type: ignore[attr-defined]
    except Exception:
        return []
    return [error] if error else []


def _verifyProblem(error: int) -> tuple[str, str]:
    """The RFC 8460 result type of an OpenSSL verify error code."""
    try:
        raw = SSL._lib.X509_verify_cert_error_string(error)  # type: ignore[attr-defined]
        text = SSL._ffi.string(raw).decode("ascii", "replace")  # type: ignore[attr-defined]
    except Exception:
        text = f"certificate verify error {error}"
    if error in (_X509_V_ERR_CERT_HAS_EXPIRED, _X509_V_ERR_CERT_NOT_YET_VALID):
        return "certificate-expired", text
    if error == _X509_V_ERR_HOSTNAME_MISMATCH:
        return "certificate-host-mismatch", text
    return "certificate-not-trusted", text


def _handshakeProblem(reason: Failure, errors: list[int]) -> tuple[str, str]:
    """The RFC 8460 result type of a failed handshake (section 4.3.1)."""
    if reason.check(VerificationError):
        return "certificate-host-mismatch", "certificate does not match the host name"
    if errors:
        return _verifyProblem(errors[0])
    return "validation-failure", _tlsError(reason)


def _withCommands(transaction: Transaction) -> Transaction:
    """Give every reply a command entry (None where none was recorded)."""
    missing = len(transaction.replies) - len(transaction.commands)
    if missing > 0:
        transaction.commands = [*transaction.commands, *([None] * missing)]
    return transaction


def _extensions(lines: tuple[str, ...]) -> dict[str, str]:
    """EHLO keywords and parameters (RFC 5321 section 4.1.1.1)."""
    found: dict[str, str] = {}
    for line in lines:
        keyword, _, parameters = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            # The pre-RFC 4954 form some servers still send as well.
            parameters = keyword[5:] + " " + parameters
            keyword = "AUTH"
        if keyword == "AUTH" and "AUTH" in found:
            parameters = found["AUTH"] + " " + parameters
        if keyword:
            found[keyword] = parameters.strip()
    return found


AUTH_REFUSED = (454, "4.7.0")
"""
What relayd reports when a next hop refuses its AUTH: a deferral, with the
code pair RFC 4954 gives a temporary authentication failure.  The peer's
C{535 5.7.8} is quoted in the text; RFC 4954 pairs X.7.8 with 535 only, so
there is no C{4.7.8} to turn it into.
"""


def _refused(
    reply: Reply,
    peer: str,
    what: str,
    context: str = "",
    codes: tuple[int, str] | None = None,
) -> HopFailure:
    """
    A reply that makes this hop unusable: relayd defers, since the next
    attempt may reach another hop or a mended one (Postfix's
    C{smtp_skip_5xx_greeting}).  A 4xx is kept as the peer sent it.
    Anything else becomes relayd's own deferral, with the peer's reply
    quoted as it came: C{codes} when given, else C{451} (RFC 5321: "local
    error in processing", what relayd says for every hop it gives up on)
    with the peer's enhanced code in class 4, as Postfix reports it.  Never
    a code made by arithmetic (C{535 - 100} is no reply code).
    """
    if reply.code // 100 == 4:
        return HopFailure(reply)
    if codes is not None:
        code, enhanced = codes
    else:
        code = 451
        enhanced = reply.enhanced
        enhanced = "4" + enhanced[1:] if enhanced[:1] in ("4", "5") else "4.0.0"
    suffix = f" ({context})" if context else ""
    return HopFailure(Reply.local(code, enhanced, f"host {peer} {what}: {reply.quoted}{suffix}"))


def _unexpected(reply: Reply, peer: str, command: str) -> Reply:
    return Reply.local(
        451, "4.5.0", f"protocol error: host {peer} said {reply.quoted} in reply to {command}"
    )


def _lostAsValue(failure: Failure) -> _SessionLost:
    failure.trap(_SessionLost)
    lost = failure.value
    assert isinstance(lost, _SessionLost)  # trapped just above
    return lost


def _raiseLost(reply: Reply | _SessionLost) -> Reply:
    if isinstance(reply, _SessionLost):
        raise reply
    return reply


def _failed(reply: Reply) -> Deferred[Reply]:
    d: Deferred[Reply] = Deferred()
    d.errback(_SessionLost(reply))
    return d


def _tlsError(reason: Failure) -> str:
    """A short text for a failed TLS handshake."""
    value = reason.value
    if isinstance(value, VerificationError):
        return "server certificate does not match the host name"
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        texts = [str(e[-1]) for e in value.args[0] if isinstance(e, tuple) and e]
        if texts:
            return "; ".join(texts)
    return reason.getErrorMessage()
