"""
An SMTP sink for tests of relayd's outbound side, running in the test
process on Twisted: it takes mail and keeps it in memory, with hooks to
make it misbehave the way real next hops do.

It is deliberately simple (a L{LineReceiver} with CRLF lines, DATA read
line by line) and trusts its client; relayd's own server is the strict one.
L{relayd.testing} re-exports L{SinkServer}.

Example::

    sink = SinkServer()
    port = sink.start(reactor)
    self.addCleanup(sink.stop)
    sink.rcptReply = {"busy@example.net": (451, "4.2.0 try later")}
    ... deliver to 127.0.0.1:port ...
    [message] = sink.messages
    self.assertEqual(message.data, expected)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["SinkServer", "SinkMessage", "SinkCommand"]

DEFAULT_ADVERTISE = (
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "AUTH PLAIN LOGIN",
)


@dataclass
class SinkMessage:
    """
    One transaction the sink received in full.

    @ivar sender: the reverse-path, C{""} for C{<>}.
    @ivar recipients: the recipients the sink accepted.
    @ivar data: the message exactly as sent, dot-stuffing removed.
    @ivar tls: the TLS version (e.g. C{"TLSv1.3"}) or None.
    @ivar user: the authenticated user or None.
    @ivar helo: the EHLO/HELO name.
    @ivar mailParameters: what followed the path on the MAIL line, e.g.
        C{"SIZE=1234 BODY=8BITMIME"}.
    @ivar connection: the number of the connection it came on (1 first).
    """

    sender: str
    recipients: list[str]
    data: bytes
    tls: str | None
    user: str | None
    helo: str | None
    mailParameters: str
    connection: int


@dataclass
class SinkCommand:
    """
    One command line as received.

    @ivar connection: the connection's number (1 first).
    @ivar read: the number of the read (C{dataReceived} call) on that
        connection it arrived in: pipelined commands share one.
    @ivar line: the command line, without CRLF.
    """

    connection: int
    read: int
    line: str


@implementer(IHandshakeListener)
class _SinkSession(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink
        self.number = 0
        self.reads = 0
        self.state = "command"
        self.helo: str | None = None
        self.tls: str | None = None
        self.user: str | None = None
        self._resetTransaction()
        self._closed: list[Deferred[None]] = []
        self._authStep: Callable[[str], None] | None = None

    def _resetTransaction(self) -> None:
        self.sender: str | None = None
        self.mailParameters = ""
        self.recipients: list[str] = []
        self.lines: list[bytes] = []

    def reply(self, code: int, text: str) -> None:
        self.transport.write(f"{code} {text}\r\n".encode())  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        sink = self.sink
        sink.connections += 1
        self.number = sink.connections
        sink.sessions.add(self)
        if sink.hang:
            return
        greeting = sink.greeting or "220 sink.test ESMTP relayd test sink"
        self.transport.write(greeting.encode() + b"\r\n")  # type: ignore[union-attr]
        if not greeting.startswith("2"):
            if greeting.startswith("421"):
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                self.state = "refusing"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.sink.sessions.discard(self)
        self.sink.closedConnections += 1
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    def whenClosed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        return d

    def handshakeCompleted(self) -> None:
        try:
            self.tls = self.transport.getHandle().get_protocol_version_name()  # type: ignore[union-attr]
        except Exception:
            self.tls = "TLS"

    def dataReceived(self, data: bytes) -> None:
        self.reads += 1
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        sink = self.sink
        if sink.hang:
            return
        if self.state == "data":
            self._dataLine(line)
            return
        if self.state == "stalled":
            return
        text = line.decode("utf-8", "replace")
        if self.state == "auth":
            step, self._authStep = self._authStep, None
            self.state = "command"
            assert step is not None
            step(text)
            return
        sink.commands.append(SinkCommand(self.number, self.reads, text))
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb in sink.stallOn:
            self.state = "stalled"
            return
        if self._buffer and "PIPELINING" not in self._advertised() and verb != "QUIT":
            # More input waits behind a command the client should have
            # waited on (RFC 2920: only with PIPELINING may it not).
            sink.pipeliningViolations += 1
        if verb == "QUIT":
            self.reply(221, "2.0.0 Bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.state == "refusing":
            self.reply(503, "5.5.1 Error: no service")
            return
        method = getattr(self, "smtp_" + verb, None)
        if method is None:
            self.reply(502, "5.5.2 Error: command not recognized")
            return
        method(argument.strip())

    def _advertised(self) -> list[str]:
        sink = self.sink
        out = []
        for keyword in sink.advertise:
            name = keyword.split(" ", 1)[0].upper()
            if name == "STARTTLS" and (sink.tlsOptions is None or self.tls is not None):
                continue
            if name == "REQUIRETLS" and self.tls is None:
                # RFC 8689 section 2: only offered under TLS.
                continue
            if name == "AUTH" and (
                (sink.users is None and sink.oauthTokens is None)
                or self.user is not None
                or (self.tls is None and not sink.authWithoutTLS)
            ):
                continue
            out.append(keyword)
        return out

    def smtp_EHLO(self, argument: str) -> None:
        if "EHLO" in self.sink.refuse:
            code, text = self.sink.refuse["EHLO"]
            self.reply(code, text)
            return
        self.helo = argument
        self._resetTransaction()
        lines = ["sink.test", *self._advertised()]
        out = [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]
        self.transport.write("\r\n".join(out).encode() + b"\r\n")  # type: ignore[union-attr]

    def smtp_HELO(self, argument: str) -> None:
        if "HELO" in self.sink.refuse:
            code, text = self.sink.refuse["HELO"]
            self.reply(code, text)
            return
        self.helo = argument
        self._resetTransaction()
        self.reply(250, "sink.test")

    def smtp_NOOP(self, argument: str) -> None:
        self.reply(250, "2.0.0 Ok")

    def smtp_RSET(self, argument: str) -> None:
        self._resetTransaction()
        self.reply(250, "2.0.0 Ok")

    def smtp_STARTTLS(self, argument: str) -> None:
        if self.sink.tlsOptions is None or self.tls is not None:
            self.reply(502, "5.5.1 Error: STARTTLS not available")
            return
        self.transport.write(self.sink.starttlsReply.encode() + b"\r\n")  # type: ignore[union-attr]
        self.clearLineBuffer()  # type: ignore[no-untyped-call]
        self.transport.startTLS(self.sink.tlsOptions)  # type: ignore[union-attr]
        self.tls = "pending"
        self.helo = None
        self._resetTransaction()

    def smtp_AUTH(self, argument: str) -> None:
        if "AUTH" not in " ".join(self._advertised()).upper():
            self.reply(503, "5.5.1 Error: authentication not enabled")
            return
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                self._plain(initial)
            else:
                self._expect(self._plain, "")
        elif mechanism == "LOGIN":
            self._expect(
                lambda user: self._expect(
                    lambda password: self._login(_decode(user), _decode(password)),
                    "UGFzc3dvcmQ6",
                ),
                "VXNlcm5hbWU6",
            )
        elif mechanism in ("XOAUTH2", "OAUTHBEARER") and self.sink.oauthTokens is not None:
            if initial:
                self._oauth2(mechanism, initial)
            else:
                self._expect(lambda text: self._oauth2(mechanism, text), "")
        else:
            self.reply(504, "5.5.4 Error: unrecognized authentication type")

    def _oauth2(self, mechanism: str, text: str) -> None:
        """
        Check an XOAUTH2 or OAUTHBEARER (RFC 7628 section 3.1) client
        response against C{sink.oauthTokens}.  A wrong token gets the
        error challenge (a 334 with base64 JSON, section 3.2.2), then 535
        after the client's answer; or 535 at once when C{sink.oauthRefusal}
        is C{"535"}.
        """
        sink = self.sink
        raw = _decode(text)
        fields: dict[str, str] = {}
        user = ""
        if mechanism == "OAUTHBEARER":
            header, _, raw = raw.partition("\x01")
            for part in header.split(","):
                if part.startswith("a="):
                    user = part[2:].replace("=2C", ",").replace("=3D", "=")
        for item in raw.split("\x01"):
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        if mechanism == "XOAUTH2":
            user = fields.get("user", "")
        auth = fields.get("auth", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        sink.oauthSeen.append((mechanism, user, token, dict(fields)))
        expected = (sink.oauthTokens or {}).get(user)
        if expected is not None and token == expected:
            self.user = user
            self.reply(235, "2.7.0 Authentication successful")
            return
        if sink.oauthRefusal == "535":
            self.reply(535, "5.7.8 Username and Password not accepted")
            return
        error = base64.b64encode(
            b'{"status":"401","schemes":"bearer","scope":"https://mail.example/"}'
        ).decode("ascii")

        def ended(answer: str) -> None:
            sink.oauthChallengeAnswers.append(answer)
            self.reply(535, "5.7.8 Username and Password not accepted")

        self._expect(ended, error)

    def _expect(self, step: Callable[[str], None], challenge: str) -> None:
        self.state = "auth"
        self._authStep = step
        self.reply(334, challenge)

    def _plain(self, text: str) -> None:
        parts = _decode(text).split("\0")
        if len(parts) != 3:
            self.reply(501, "5.5.2 Error: malformed PLAIN response")
            return
        self._login(parts[1], parts[2])

    def _login(self, user: str, password: str) -> None:
        users = self.sink.users or {}
        if user in users and users[user] == password:
            self.user = user
            self.reply(235, "2.7.0 Authentication successful")
        else:
            self.reply(535, "5.7.8 Error: authentication failed")

    def smtp_MAIL(self, argument: str) -> None:
        if self.helo is None:
            self.reply(503, "5.5.1 Error: send EHLO/HELO first")
            return
        if self.sender is not None:
            self.reply(503, "5.5.1 Error: nested MAIL command")
            return
        if not argument.upper().startswith("FROM:<") or ">" not in argument:
            self.reply(501, "5.1.7 Error: bad sender address syntax")
            return
        path, _, parameters = argument[6:].partition(">")
        self.sender = path
        self.mailParameters = parameters.strip()
        if "MAIL" in self.sink.refuse:
            self.sender = None
            code, text = self.sink.refuse["MAIL"]
            self._answer(code, text)
            return
        self.reply(250, "2.1.0 Ok")

    def smtp_RCPT(self, argument: str) -> None:
        if self.sender is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return
        if not argument.upper().startswith("TO:<") or ">" not in argument:
            self.reply(501, "5.1.3 Error: bad recipient address syntax")
            return
        address = argument[4:].partition(">")[0]
        rcptReply = self.sink.rcptReply
        scripted = rcptReply(address) if callable(rcptReply) else rcptReply.get(address)
        if scripted is not None:
            self._answer(*scripted)
            return
        self.recipients.append(address)
        self.reply(250, "2.1.5 Ok")

    def smtp_DATA(self, argument: str) -> None:
        if self.sender is None:
            self.reply(503, "5.5.1 Error: need MAIL command")
            return
        if not self.recipients:
            self.reply(554, "5.5.1 Error: no valid recipients")
            return
        if self.sink.dataCommandReply is not None:
            self._answer(*self.sink.dataCommandReply)
            return
        self.state = "data"
        self.lines = []
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        if "BODY" in self.sink.stallOn:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _dataLine(self, line: bytes) -> None:
        if line != b".":
            self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        if "." in self.sink.stallOn:
            self.state = "stalled"
            return
        self.state = "command"
        sink = self.sink
        message = SinkMessage(
            sender=self.sender or "",
            recipients=list(self.recipients),
            data=b"".join(line + b"\r\n" for line in self.lines),
            tls=self.tls,
            user=self.user,
            helo=self.helo,
            mailParameters=self.mailParameters,
            connection=self.number,
        )
        self._resetTransaction()
        if sink.dataReply is not None:
            self._answer(*sink.dataReply)
            return
        sink.messages.append(message)
        self.reply(250, f"2.0.0 Ok: queued as S{len(sink.messages)}")

    def _answer(self, code: int, text: str) -> None:
        """A scripted reply; 421 also closes, as RFC 5321 section 3.8 says."""
        self.reply(code, text)
        if code == 421:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply(500, "5.5.2 Error: line too long")
        self.transport.loseConnection()  # type: ignore[union-attr]


def _decode(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return ""


class _SinkFactory(ServerFactory):
    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> _SinkSession:
        return _SinkSession(self.sink)


class SinkServer:
    """
    An SMTP server that keeps what it is sent, for tests.

    Set the hooks before or between deliveries:

    @ivar rcptReply: a dict from recipient address to C{(code, text)}, or a
        callable taking the address and returning one or None; a listed
        recipient is answered with it instead of 250 (C{text} starts with
        the enhanced code, e.g. C{(550, "5.1.1 no such user")}).  421 also
        closes the connection.
    @ivar dataReply: C{(code, text)} to answer the final dot with instead
        of 250 (the message is then not kept).
    @ivar dataCommandReply: C{(code, text)} to answer DATA itself with.
    @ivar refuse: command verb (C{"EHLO"}, C{"HELO"}, C{"MAIL"}) to
        C{(code, text)}.
    @ivar greeting: the whole greeting line instead of the 220, e.g.
        C{"421 4.3.2 busy"} (sent, then the connection closed) or
        C{"554 5.7.1 go away"} (then every command but QUIT gets 503).
    @ivar hang: accept connections but never say anything.
    @ivar stallOn: command verbs after which the sink goes silent for
        good, C{"."} for the end of data, and C{"BODY"} to stop reading
        the connection once DATA is answered (so the client's writes
        block): for timeout tests.
    @ivar starttlsReply: the raw reply to STARTTLS (CRLF added), e.g. with
        an extra line to inject before TLS starts.
    @ivar advertise: EHLO keywords offered.  STARTTLS is only offered with
        C{tlsOptions} and before TLS; AUTH only with C{users}, inside TLS
        (unless C{authWithoutTLS}) and before a successful AUTH; REQUIRETLS
        (not offered unless added) only inside TLS.
    @ivar oauthTokens: mailbox to the access token AUTH XOAUTH2 and
        OAUTHBEARER accept (add them to the AUTH keyword of C{advertise});
        AUTH is offered with these even without C{users}.
    @ivar oauthRefusal: how a wrong token is refused: C{"334"} (the error
        challenge, then 535) or C{"535"} at once.
    @ivar oauthSeen: C{(mechanism, user, token, fields)} of each OAuth2
        AUTH attempt.
    @ivar oauthChallengeAnswers: what the client answered to each error
        challenge (base64 text; empty for XOAUTH2's empty line).
    @ivar messages: the L{SinkMessage}s received.
    @ivar commands: every L{SinkCommand} received (not DATA lines nor AUTH
        responses).
    @ivar connections: connections accepted so far.
    @ivar closedConnections: connections ended so far.
    @ivar pipeliningViolations: commands that arrived with more input
        behind them while PIPELINING was not offered.
    """

    def __init__(self) -> None:
        self.rcptReply: dict[str, tuple[int, str]] | Callable[[str], tuple[int, str] | None] = {}
        self.dataReply: tuple[int, str] | None = None
        self.dataCommandReply: tuple[int, str] | None = None
        self.refuse: dict[str, tuple[int, str]] = {}
        self.greeting: str | None = None
        self.hang = False
        self.stallOn: set[str] = set()
        self.starttlsReply = "220 2.0.0 Ready to start TLS"
        self.advertise: list[str] = list(DEFAULT_ADVERTISE)
        self.authWithoutTLS = False
        self.tlsOptions: Any = None
        self.users: dict[str, str] | None = None
        self.oauthTokens: dict[str, str] | None = None
        self.oauthRefusal = "334"
        self.oauthSeen: list[tuple[str, str, str, dict[str, str]]] = []
        self.oauthChallengeAnswers: list[str] = []
        self.messages: list[SinkMessage] = []
        self.commands: list[SinkCommand] = []
        self.connections = 0
        self.closedConnections = 0
        self.pipeliningViolations = 0
        self.sessions: set[_SinkSession] = set()
        self.port = 0
        self._listening: Any = None

    def start(
        self,
        reactor: Any,
        interface: str = "127.0.0.1",
        port: int = 0,
        tlsOptions: Any = None,
        users: dict[str, str] | None = None,
    ) -> int:
        """
        Listen for SMTP.

        @param tlsOptions: server TLS options (e.g. from
            L{relayd.certificates.loadServerOptions}) to offer STARTTLS.
        @param users: user name to password, to offer AUTH PLAIN and LOGIN.
        @return: the port number listened on.
        """
        self.tlsOptions = tlsOptions
        self.users = users
        self._listening = reactor.listenTCP(port, _SinkFactory(self), interface=interface)
        self.port = int(self._listening.getHost().port)
        return self.port

    @property
    def openConnections(self) -> int:
        """Connections open now."""
        return len(self.sessions)

    def verbs(self) -> list[str]:
        """The command verbs received, in order (C{["EHLO", "MAIL", ...]})."""
        return [c.line.split(" ", 1)[0].upper() for c in self.commands]

    def stop(self) -> Deferred[None]:
        """Stop listening and cut every open connection; fires when all is closed."""
        waits: list[Deferred[Any]] = []
        if self._listening is not None:
            waits.append(maybeDeferred(self._listening.stopListening))
            self._listening = None
        for session in list(self.sessions):
            waits.append(session.whenClosed())
            session.transport.abortConnection()  # type: ignore[union-attr]
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
