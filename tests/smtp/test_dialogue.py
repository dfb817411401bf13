"""
The protocol rules of DESIGN section 4 as dialogues over a
L{StringTransport}: one L{SMTPServer} driven byte by byte, with a real
config, a real policy chain (mynetworks, authenticated), a real portal and
a spool kept in a temporary directory, on a L{Clock}.  Nothing here opens a
socket or waits for the reactor; tests/smtp/test_server.py has the same rules
over real sockets.
"""

from __future__ import annotations

import email.parser
import email.policy
import errno
import os
import shutil
import tempfile
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relayd.config import load
from relayd.policy import PolicyChain, loadPolicies
from relayd.queue.spool import IncomingMessage
from relayd.smtp.auth import IMailUser, Realm
from relayd.smtp.session import ConnectionLimits, SMTPFactory, SMTPServer

USER = "alice"
PASSWORD = "secret"
PLAIN = "AGFsaWNlAHNlY3JldA=="  # base64 of "\0alice\0secret"


class MemorySpool:
    """
    What L{SMTPServer} asks of L{relayd.queue.spool.Spool}, without threads: the
    message is written to a real L{IncomingMessage} and a commit succeeds
    (or fails, as the test sets) at once.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.messages: dict[str, bytes] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.openError: OSError | None = None
        self.commitError: OSError | None = None
        self._count = 0

    def reserveOk(self, size: int) -> bool:
        return True

    def newQueueId(self) -> str:
        self._count += 1
        return f"Q{self._count:04d}"

    def openMessage(self, queueId: str) -> IncomingMessage:
        if self.openError is not None:
            raise self.openError
        path = os.path.join(self.directory, queueId)
        return IncomingMessage(queueId, path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def commit(self, incoming: IncomingMessage, record: dict[str, Any]) -> Any:
        if self.commitError is not None:
            return fail(self.commitError)
        incoming.flush()
        incoming._closeQuietly()
        with open(incoming.path, "rb") as f:
            self.messages[incoming.queueId] = f.read()
        self.records[incoming.queueId] = record
        return succeed(incoming.queueId)


class Transport(StringTransport):
    """A L{StringTransport} that notes C{startTLS} instead of doing it."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), lenient=True)
        self.tlsOptions: Any = None

    def startTLS(self, options: Any) -> None:
        self.tlsOptions = options


class DialogueTestCase(unittest.TestCase):
    """One server session per test, and helpers to talk to it."""

    mode = "relay"
    config: Any = None

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="relayd-dialogue-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "relayd.toml")
        with open(path, "w") as f:
            f.write(
                '[server]\nhostname = "relayd.test"\n'
                '[spool]\ndirectory = "spool"\n'
                '[policy]\nchain = ["mynetworks", "authenticated"]\n'
                "[auth]\nfailure_delay = 1\n"
                '[[listeners]]\nname = "test"\nendpoint = "tcp:0"\nmode = "relay"\n'
            )
        self.config = load(path)
        self.clock = Clock()
        policies, options = loadPolicies(self.config)
        chain = PolicyChain(policies, self.config.policyTimeout, self.clock, options)
        checker = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
        self.spool = MemorySpool(directory)
        self.factory = SMTPFactory(
            config=self.config,
            listener="test",
            mode=self.mode,
            spool=self.spool,
            chain=chain,
            portal=Portal(Realm(), [checker]),
            avatarInterface=IMailUser,
            tlsOptions=None if self.mode == "submissions" else object(),
            limits=ConnectionLimits(10, 10),
            clock=self.clock,
        )
        self.transport = Transport()
        self.server: SMTPServer = self.factory.buildProtocol(None)
        self.server.makeConnection(self.transport)
        self.greeting = self.read()

    def tearDown(self) -> None:
        self.server.connectionLost()
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.server.dataReceived(data)

    def read(self) -> list[str]:
        """The reply lines written since the last read."""
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        assert out == "" or out.endswith("\r\n"), out
        return out.split("\r\n")[:-1]

    def talk(self, data: bytes | str) -> list[str]:
        self.send(data)
        return self.read()

    def ehlo(self) -> list[str]:
        return self.talk("EHLO client.example\r\n")

    def starttls(self) -> None:
        self.assertEqual(self.talk("STARTTLS\r\n"), ["220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(self.transport.tlsOptions)
        self.ehlo()

    def transaction(self) -> None:
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])
        self.assertEqual(self.talk("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])

    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class StartTLSTests(DialogueTestCase):
    """Rule 1: STARTTLS."""

    def test_discardsPipelinedCommandsAndResets(self) -> None:
        """
        Whatever the client pipelined after STARTTLS in plain text is
        thrown away (CVE-2011-0411), and the session starts over: EHLO
        again before MAIL.
        """
        self.ehlo()
        self.assertEqual(
            self.talk("STARTTLS\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"),
            ["220 2.0.0 Ready to start TLS"],
        )
        self.assertIsNotNone(self.transport.tlsOptions)
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com>\r\n"), ["503 5.5.1 Error: send EHLO/HELO first"]
        )
        lines = self.ehlo()
        self.assertNotIn("250-STARTTLS", lines)
        self.assertIn("250-AUTH PLAIN LOGIN", lines)

    def test_argumentRefused(self) -> None:
        """C{STARTTLS foo} is a syntax error, and TLS does not start."""
        self.ehlo()
        self.assertEqual(self.talk("STARTTLS foo\r\n"), ["501 5.5.4 Syntax: STARTTLS"])
        self.assertIsNone(self.transport.tlsOptions)


class ImplicitTLSTests(DialogueTestCase):
    """Rule 1: no STARTTLS on an implicit-TLS (port 465) listener."""

    mode = "submissions"

    def test_noStartTLS(self) -> None:
        lines = self.ehlo()
        self.assertNotIn("250-STARTTLS", lines)
        self.assertIn("250-AUTH PLAIN LOGIN", lines)
        self.assertEqual(self.talk("STARTTLS\r\n"), ["503 5.5.1 Error: TLS already active"])


class DataTests(DialogueTestCase):
    """Rules 2 and 3: the DATA wire format."""

    def test_endsOnlyAtCRLFDotCRLF(self) -> None:
        """
        C{LF.LF}, C{CR.CR} and C{CRLF.LF} do not end DATA; only
        C{CRLF.CRLF} does, and then the message is refused for its bare
        line ends, once.
        """
        self.ehlo()
        self.transaction()
        for fake in ["a\n.\n", "b\r.\r", "c\r\n.\n", "d\n.\r\n"]:
            self.assertEqual(self.talk(fake), [])
            self.assertEqual(self.server.state, "data")
        self.assertEqual(
            self.talk("\r\n.\r\n"),
            ["550 5.5.2 Error: bare CR or LF in message; lines must end with CRLF"],
        )
        self.assertEqual(self.spool.messages, {})

    def test_smugglingRefusedAfterRealEnd(self) -> None:
        """
        A second message hidden behind a bare-LF end of data (SMTP
        smuggling) is part of the first: one refusal after the real end,
        nothing spooled, and the session still in step.
        """
        self.ehlo()
        self.transaction()
        self.assertEqual(
            self.talk(
                "Subject: one\r\n\r\nbody\n.\n"
                "MAIL FROM:<evil@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                "Subject: two\r\n\r\nsmuggled\r\n.\r\nNOOP\r\n"
            ),
            [
                "550 5.5.2 Error: bare CR or LF in message; lines must end with CRLF",
                "250 2.0.0 Ok",
            ],
        )
        self.assertEqual(self.spool.messages, {})

    def test_nulRefused(self) -> None:
        self.ehlo()
        self.transaction()
        self.assertEqual(
            self.talk("Subject: x\r\n\r\na\x00b\r\n.\r\n"),
            ["554 5.6.0 Error: message contains NUL octets"],
        )

    def test_dotStuffingRemoved(self) -> None:
        """
        A leading dot is transparency (RFC 5321 section 4.5.2): removed, and
        not counted in the line length.
        """
        self.ehlo()
        self.transaction()
        long = "." + "x" * 998
        reply = self.talk(f"Subject: x\r\n\r\n..dot\r\n{long}\r\n.\r\n")
        self.assertEqual(reply, ["250 2.0.0 Ok: queued as Q0001"])
        body = self.spool.messages["Q0001"].split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body, b".dot\r\n" + b"x" * 998 + b"\r\n")

    def test_overlongLineStaysInData(self) -> None:
        """
        A line over 998 octets does not drop DATA back to command mode:
        what follows it is message text until the real end, then the
        message is refused.
        """
        self.ehlo()
        self.transaction()
        self.assertEqual(self.talk("Subject: x\r\n\r\n" + "y" * 5000), [])
        self.assertEqual(self.talk("\r\nQUIT\r\nRSET\r\n"), [])
        self.assertEqual(self.server.state, "data")
        self.assertEqual(
            self.talk(".\r\n"), ["554 5.6.0 Error: message has a line longer than 998 octets"]
        )
        self.assertFalse(self.closed())

    def test_sizeLimit(self) -> None:
        """Over C{[limits] message_size}: 552 5.3.4 after the end."""
        self.ehlo()
        self.transaction()
        line = "z" * 998 + "\r\n"
        chunk = line * (self.config.messageSize // len(line) + 1)
        self.assertEqual(self.talk(chunk), [])
        self.assertEqual(self.talk(".\r\n"), ["552 5.3.4 Error: message size exceeds fixed limit"])


class LineLimitTests(DialogueTestCase):
    """Rule 3: command lines and paths."""

    def test_longCommandLine(self) -> None:
        """Over 512 octets with CRLF: 500 5.5.2."""
        self.ehlo()
        self.assertEqual(
            self.talk("NOOP " + "x" * 506 + "\r\n"), ["500 5.5.2 Error: line too long"]
        )
        self.assertEqual(self.talk("NOOP " + "x" * 505 + "\r\n"), ["250 2.0.0 Ok"])

    def test_mailAllowance(self) -> None:
        """
        MAIL may be longer by what the advertised extensions' parameters
        need (SIZE, BODY, AUTH=): a 1000-octet MAIL line is taken.
        """
        self.ehlo()
        line = "MAIL FROM:<a@example.com> AUTH=" + "x" * 500 + " BODY=8BITMIME SIZE=100"
        self.assertGreater(len(line) + 2, 512)
        self.assertEqual(self.talk(line + "\r\n"), ["250 2.1.0 Ok"])

    def test_longPath(self) -> None:
        """A path over 256 octets: 501, not 500."""
        self.ehlo()
        path = "a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".example"
        self.assertGreater(len(path) + 2, 256)
        self.assertEqual(self.talk(f"MAIL FROM:<{path}>\r\n"), ["501 5.1.7 Error: path too long"])

    def test_floodClosed(self) -> None:
        """An unterminated line past every limit: one 500 and the close."""
        self.assertEqual(self.talk("x" * 20000), ["500 5.5.2 Error: line too long"])
        self.assertTrue(self.closed())

    def test_bareLF(self) -> None:
        """A command line must end in CRLF."""
        self.assertEqual(
            self.talk("NOOP\n"), ["500 5.5.2 Error: bare LF received; lines must end with CRLF"]
        )


class SequenceTests(DialogueTestCase):
    """Rule 4: order of commands and parameters."""

    def test_mailBeforeHelo(self) -> None:
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com>\r\n"), ["503 5.5.1 Error: send EHLO/HELO first"]
        )

    def test_rcptAndDataBeforeMail(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net>\r\nDATA\r\n"),
            ["503 5.5.1 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"],
        )

    def test_nestedMail(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com>\r\n"), ["503 5.5.1 Error: nested MAIL command"]
        )

    def test_unknownMailParameter(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> FOO=bar\r\n"),
            ["555 5.5.4 Error: unsupported parameter FOO"],
        )

    def test_unknownRcptParameter(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net> XNOTIFY=NEVER\r\n"),
            ["555 5.5.4 Error: unsupported parameter XNOTIFY"],
        )

    def test_parametersNeedEhlo(self) -> None:
        self.talk("HELO client.example\r\n")
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> SIZE=10\r\n"),
            ["555 5.5.4 Error: parameters need EHLO"],
        )

    def test_badSize(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> SIZE=ten\r\n"),
            ["501 5.5.4 Error: bad SIZE parameter"],
        )


class ExtensionTests(DialogueTestCase):
    """Rule 5: what EHLO advertises, and enhanced status codes."""

    def test_advertised(self) -> None:
        self.assertEqual(
            self.ehlo(),
            [
                "250-relayd.test",
                "250-PIPELINING",
                f"250-SIZE {self.config.messageSize}",
                "250-STARTTLS",
                "250-ENHANCEDSTATUSCODES",
                "250-8BITMIME",
                "250-CHUNKING",
                "250-DSN",
                "250 SMTPUTF8",
            ],
        )

    def test_helo(self) -> None:
        """HELO: one line, no extensions, no enhanced code."""
        self.assertEqual(self.talk("HELO client.example\r\n"), ["250 relayd.test"])

    def test_enhancedCodes(self) -> None:
        """
        RFC 2034 section 3: enhanced codes on every reply but the
        greeting, the EHLO/HELO replies and 3xx.
        """
        self.assertEqual(self.greeting, ["220 relayd.test ESMTP relayd"])
        self.ehlo()
        self.transaction()
        self.assertEqual(
            self.talk("Subject: x\r\n\r\nhello\r\n.\r\n"), ["250 2.0.0 Ok: queued as Q0001"]
        )
        self.assertEqual(
            self.talk("NOOP\r\nRSET\r\nVRFY x\r\nFOO\r\nQUIT\r\n"),
            [
                "250 2.0.0 Ok",
                "250 2.0.0 Ok",
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
                "502 5.5.2 Error: command not recognized",
                "221 2.0.0 Bye",
            ],
        )


class AuthTests(DialogueTestCase):
    """Rule 6: AUTH."""

    def test_notBeforeTLS(self) -> None:
        lines = self.ehlo()
        self.assertNotIn("250-AUTH PLAIN LOGIN", lines)
        self.assertEqual(
            self.talk(f"AUTH PLAIN {PLAIN}\r\n"),
            ["530 5.7.0 Error: must issue a STARTTLS command first"],
        )

    def test_plain(self) -> None:
        self.ehlo()
        self.starttls()
        self.assertEqual(
            self.talk(f"AUTH PLAIN {PLAIN}\r\n"), ["235 2.7.0 Authentication successful"]
        )
        self.assertEqual(self.server.session.user, USER)

    def test_login(self) -> None:
        """AUTH LOGIN: 334 challenges, no enhanced code on them."""
        self.ehlo()
        self.starttls()
        self.assertEqual(self.talk("AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(self.talk("YWxpY2U=\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(self.talk("c2VjcmV0\r\n"), ["235 2.7.0 Authentication successful"])

    def test_failureSlowed(self) -> None:
        """A wrong password: 535 5.7.8, only after the failure delay."""
        self.ehlo()
        self.starttls()
        self.assertEqual(self.talk("AUTH PLAIN AGFsaWNlAHdyb25n\r\n"), [])
        self.clock.advance(self.config.authFailureDelay)
        self.assertEqual(self.read(), ["535 5.7.8 Error: authentication failed"])

    def test_unknownUserSameAnswer(self) -> None:
        """No user enumeration: an unknown user gets the same answer."""
        self.ehlo()
        self.starttls()
        self.talk("AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n")  # \0bob\0secret
        self.clock.advance(self.config.authFailureDelay)
        self.assertEqual(self.read(), ["535 5.7.8 Error: authentication failed"])

    def test_cancelled(self) -> None:
        self.ehlo()
        self.starttls()
        self.assertEqual(self.talk("AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(self.talk("*\r\n"), ["501 5.7.0 Error: authentication cancelled"])

    def test_cutOffAfterFailures(self) -> None:
        """
        Each failure waits longer (delay times the count); after
        C{[auth] max_failures} the session ends with 421 4.7.0.
        """
        self.ehlo()
        self.starttls()
        for count in range(1, self.config.authMaxFailures + 1):
            self.assertEqual(self.talk("AUTH PLAIN AGFsaWNlAHdyb25n\r\n"), [])
            self.clock.advance(self.config.authFailureDelay * count - 0.001)
            self.assertEqual(self.read(), [])
            self.clock.advance(0.001)
            reply = self.read()
            self.assertEqual(reply[0], "535 5.7.8 Error: authentication failed")
        self.assertEqual(
            reply[1:], ["421 4.7.0 relayd.test Error: too many authentication failures"]
        )
        self.assertTrue(self.closed())


class LimitTests(DialogueTestCase):
    """Rule 7: deadlines per state, and connections per client."""

    def test_commandDeadline(self) -> None:
        """
        A command line must be complete C{[timeouts] command} seconds after
        relayd is ready for it, however its octets trickle in.
        """
        deadline = self.config.timeoutCommand
        self.send("NO")
        self.clock.advance(deadline - 1)
        self.send("O")
        self.clock.advance(1)
        self.assertEqual(self.read(), ["421 4.4.2 relayd.test Error: timeout exceeded"])
        self.assertTrue(self.closed())

    def test_dataDeadline(self) -> None:
        """
        A DATA transfer gets C{data_deadline} seconds plus one per
        C{data_min_rate} octets: a trickle that keeps the idle timeout
        away is cut all the same.
        """
        self.ehlo()
        self.transaction()
        step = self.config.timeoutData / 2
        elapsed = 0.0
        while not self.closed():
            self.send("x")
            self.clock.advance(step)
            elapsed += step
            self.assertLess(elapsed, self.config.dataDeadline + 2 * step)
        self.assertEqual(self.read(), ["421 4.4.2 relayd.test Error: timeout exceeded"])
        self.assertGreaterEqual(elapsed, self.config.dataDeadline)

    def test_connectionsPerClient(self) -> None:
        """Over C{[limits] connections_per_client}: 421 4.7.0 at once."""
        self.factory.limits.perClient = 1
        transport = Transport()
        second = self.factory.buildProtocol(None)
        second.makeConnection(transport)
        self.assertEqual(
            transport.value(),
            b"421 4.7.0 relayd.test Error: too many connections from your address\r\n",
        )
        self.assertTrue(transport.disconnecting)
        second.connectionLost()

    def test_limitsAnswerLater(self) -> None:
        """
        Limits that answer later (a receiver's, which ask the queue
        manager): nothing is greeted or read until they have; then the
        session goes on as usual.
        """
        answer: Deferred[str | None] = Deferred()
        self.factory.limits.open = lambda client: answer  # type: ignore[method-assign]
        transport = Transport()
        second = self.factory.buildProtocol(None)
        second.makeConnection(transport)
        second.dataReceived(b"EHLO client.example\r\n")
        self.assertEqual(transport.value(), b"")
        answer.callback(None)
        lines = transport.value().decode().split("\r\n")
        self.assertTrue(lines[0].startswith("220 relayd.test "), lines)
        self.assertEqual(lines[1], "250-relayd.test")
        second.connectionLost()

    def test_limitsAnswerFails(self) -> None:
        """
        Limits whose answer fails: the failure is logged and the
        connection cut, not left open with no timeout running.
        """
        self.factory.limits.open = lambda client: fail(RuntimeError("no answer"))  # type: ignore[method-assign]
        transport = Transport()
        second = self.factory.buildProtocol(None)
        second.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        second.connectionLost()

    def test_sessionGoneWhenGivingBackFails(self) -> None:
        """
        Limits whose C{close} raises (a receiver's, telling a queue manager
        that is gone): the session still leaves the factory's sessions, so
        a graceful stop, which waits for every session, ends.
        """

        def broken(client: str) -> None:
            raise RuntimeError("the queue manager is gone")

        self.factory.limits.close = broken  # type: ignore[method-assign]
        stopped = self.factory.shutdown(30)
        self.assertEqual(self.read()[-1], "421 4.3.2 relayd.test Service shutting down")
        self.assertRaises(RuntimeError, self.server.connectionLost)
        self.assertEqual(self.factory.sessions, set())
        self.assertIsNone(self.successResultOf(stopped))


class SpoolFailureTests(DialogueTestCase):
    """Rule 8: a spool failure is temporary, never 250 or 5xx."""

    def test_diskFullAtOpen(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.spool.openError = OSError(errno.ENOSPC, "No space left on device")
        self.assertEqual(self.talk("DATA\r\n"), ["452 4.3.1 Error: insufficient system storage"])

    def test_commitFails(self) -> None:
        self.ehlo()
        self.transaction()
        self.spool.commitError = OSError(errno.EIO, "Input/output error")
        self.assertEqual(
            self.talk("Subject: x\r\n\r\nhello\r\n.\r\n"),
            ["451 4.3.0 Error: local error in processing"],
        )


class ReceivedTests(DialogueTestCase):
    """Rule 9: the trace field stays valid whatever the client says."""

    def received(self, helo: str) -> str:
        self.talk(f"EHLO {helo}\r\n")
        self.transaction()
        self.talk("Subject: x\r\n\r\nhello\r\n.\r\n")
        message = self.spool.messages["Q0001"]
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(message)
        field = parsed["Received"]
        self.assertEqual(field.defects, ())
        return str(field)

    def test_received(self) -> None:
        field = self.received("client.example")
        self.assertIn("from client.example ([127.0.0.1])", field)
        self.assertIn("by relayd.test (relayd) with ESMTP id Q0001", field)
        self.assertIn("for <b@example.net>;", field)

    def test_controlCharactersReplaced(self) -> None:
        field = self.received("bad\x01\x7fname")
        self.assertIn("from bad??name ([127.0.0.1])", field)


class FlowControlTests(DialogueTestCase):
    """
    Pipelined input waits while a decision is pending, in order; the
    socket stops being read only when the client pushes on meanwhile.
    """

    def test_decidedAtOnceNeverPausesTheSocket(self) -> None:
        """Commands decided before control returns leave reading alone."""
        pauses: list[None] = []
        original = self.transport.pauseProducing

        def counted() -> None:
            pauses.append(None)
            original()

        self.transport.pauseProducing = counted  # type: ignore[method-assign]
        self.ehlo()
        self.transaction()
        self.assertEqual(self.talk("Subject: x\r\n\r\nhi\r\n.\r\n")[0][:3], "250")
        self.assertEqual(pauses, [])
        self.assertEqual(self.transport.producerState, "producing")

    def test_pipelinedWhileCommitting(self) -> None:
        """
        While the commit is under way, a pipelined QUIT is neither
        answered nor lost: reading stops when it arrives, and once the
        message is durable the 250 comes first, then the 221.
        """
        pending: Deferred[str] = Deferred()
        commit = self.spool.commit

        def slow(incoming: Any, record: Any) -> Deferred[str]:
            d = commit(incoming, record)
            d.addCallback(lambda queueId: pending.addCallback(lambda _: queueId))
            return d

        self.spool.commit = slow  # type: ignore[method-assign]
        self.ehlo()
        self.transaction()
        self.assertEqual(self.talk("Subject: x\r\n\r\nhi\r\n.\r\n"), [])
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.talk("QUIT\r\n"), [])
        self.assertEqual(self.transport.producerState, "paused")
        pending.callback(None)
        replies = self.read()
        self.assertEqual(len(replies), 2, replies)
        self.assertTrue(replies[0].startswith("250 2.0.0 Ok: queued as "), replies)
        self.assertTrue(replies[1].startswith("221 2.0.0"), replies)


class CommittedTests(DialogueTestCase):
    """What happens once the message is durable."""

    def test_replyBeforeTheQueuedLine(self) -> None:
        """
        The client's C{250} is written before the C{queued} log line is
        made: the line and the metrics are not on the way to the reply.
        """
        from twisted.logger import globalLogPublisher

        written: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "queued from=" in (event.get("log_format") or ""):
                written.append(self.transport.value().decode("utf-8"))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.ehlo()
        self.transaction()
        replies = self.talk("Subject: x\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(len(written), 1)
        self.assertTrue(written[0].startswith("250 2.0.0 Ok: queued as Q0001"), written)
        self.assertEqual(replies, ["250 2.0.0 Ok: queued as Q0001"])
