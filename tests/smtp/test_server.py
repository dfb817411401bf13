"""
The ESMTP server over real sockets: relayd's service tree runs in the test
process on 127.0.0.1, clients (smtplib and L{relayd.testing.WireClient})
run in threads.  One test per row of the issue's bad-input table, the rules
of DESIGN section 4, and the good paths.
"""

import base64
import contextlib
import os
import re
import select
import shutil
import smtplib
import socket
import ssl
import tempfile
import threading
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from relayd.interfaces import IMessagePolicy, IRecipientPolicy
from relayd.policy import PolicyChain
from relayd.queue.record import readData
from relayd.smtp.session import SMTPServer
from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    InProcessRelayd,
    RedisServer,
    TestSetup,
    WireClient,
)
from relayd.verdict import CONTINUE, accept

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def plain(user=DEMO_USER, password=DEMO_PASSWORD):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RelaydTestCase(unittest.TestCase):
    """Starts relayd in-process for each test, with per-class config."""

    sections: dict = {}
    chain = None
    policies = None

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(
            directory, sections=self.sections, chain=self.chain, policies=self.policies
        )
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def port(self, mode="relay"):
        return self.relayd.port(mode)

    def connect(self, mode="relay", tls=False):
        context = self.setup.clientContext() if tls else None
        client = WireClient(self.port(mode), context=context)
        self.addCleanup(client.close)
        code, _ = client.reply()
        assert code == 220, code
        return client

    def run_(self, f, *args):
        return deferToThread(f, *args)

    def exchange(self, *commands, mode="relay", ehlo=True):
        """
        In a thread: connect, say EHLO (unless C{ehlo} is false) and send
        each command; a Deferred of their replies, in order.
        """

        def dialogue():
            c = self.connect(mode)
            if ehlo:
                c.command("EHLO client.test")
            return [c.command(command) for command in commands]

        return self.run_(dialogue)

    def transaction(self, c, body: bytes):
        """On client C{c}: EHLO, one message from a@ to b@example.org, and its reply."""
        c.command("EHLO client.test")
        assert c.command("MAIL FROM:<a@example.org>")[0] == 250
        assert c.command("RCPT TO:<b@example.org>")[0] == 250
        assert c.command("DATA")[0] == 354
        c.send(body)
        return c.reply()

    def assertReply(self, reply, code, enhanced):
        """C{reply}, a C{(code, lines)}, has this code and enhanced status code."""
        self.assertEqual((reply[0], reply[1][0][:5]), (code, enhanced))

    def spooled(self):
        spool = self.relayd.spool
        return [spool.load(q) for q in spool.entries("incoming")]

    def tmpFiles(self):
        return os.listdir(os.path.join(self.setup.spoolPath, "tmp"))


class CommandRulesTests(RelaydTestCase):
    sections = {"limits": {"recipients": 3, "message_size": 20000}}

    @defer.inlineCallbacks
    def test_mailBeforeEhlo(self):
        [reply] = yield self.exchange("MAIL FROM:<a@example.org>", ehlo=False)
        self.assertReply(reply, 503, "5.5.1")

    @defer.inlineCallbacks
    def test_ehloWithoutArgument(self):
        def dialogue():
            c = self.connect()
            return c.command("EHLO"), c.command("HELO"), c.command("EHLO client.test")

        (c1, l1), (c2, l2), (c3, _) = yield self.run_(dialogue)
        self.assertEqual((c1, l1[0][:5]), (501, "5.5.4"))
        self.assertEqual((c2, l2[0][:5]), (501, "5.5.4"))
        self.assertEqual(c3, 250)

    @defer.inlineCallbacks
    def test_commandTooLong(self):
        def dialogue():
            c = self.connect()
            long = c.command("NOOP " + "x" * 600)
            return long, c.command("NOOP")

        (code, lines), (after, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (500, "5.5.2"))
        self.assertEqual(after, 250)

    @defer.inlineCallbacks
    def test_mailLineMayUseExtensionAllowance(self):
        """RFC 4954: AUTH= adds 500 octets to MAIL's 512."""

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            return c.command("MAIL FROM:<a@example.org> SIZE=100 AUTH=" + "x" * 480)

        code, _ = yield self.run_(dialogue)
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_pathTooLong(self):
        [reply] = yield self.exchange(
            "MAIL FROM:<" + "a" * 60 + "@" + ("b" * 60 + ".") * 4 + "org>"
        )
        self.assertReply(reply, 501, "5.1.7")

    @defer.inlineCallbacks
    def test_floodWithoutCRLF(self):
        def dialogue():
            c = self.connect()
            with contextlib.suppress(OSError):
                c.send(b"A" * (1 << 20))
            try:
                reply = c.reply()
            except (EOFError, OSError):
                reply = None
            return reply, c.closed()

        reply, closed = yield self.run_(dialogue)
        self.assertTrue(closed)
        if reply is not None:
            self.assertReply(reply, 500, "5.5.2")
        yield self.assertStillServing()

    def assertStillServing(self):
        def dialogue():
            c = self.connect()
            return c.command("EHLO other.test")[0]

        return self.run_(dialogue).addCallback(self.assertEqual, 250)

    @defer.inlineCallbacks
    def test_bareLFEndingCommand(self):
        def dialogue():
            c = self.connect()
            c.send(b"NOOP\n")
            first = c.reply()
            return first, c.command("NOOP")

        (code, lines), (after, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (500, "5.5.2"))
        self.assertEqual(after, 250)

    @defer.inlineCallbacks
    def test_bareCRInCommand(self):
        [reply] = yield self.exchange("NOOP\rRSET", ehlo=False)
        self.assertReply(reply, 500, "5.5.2")

    @defer.inlineCallbacks
    def test_unknownVerbAndErrorLimit(self):
        def dialogue():
            c = self.connect()
            replies = [c.command("FOO bar") for _ in range(19)]
            c.send(b"FOO bar\r\n")
            replies.append(c.reply())
            replies.append(c.reply())
            return replies, c.closed()

        replies, closed = yield self.run_(dialogue)
        for code, lines in replies[:20]:
            self.assertEqual((code, lines[0][:5]), (502, "5.5.2"))
        self.assertReply(replies[20], 421, "4.7.0")
        self.assertTrue(closed)
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_httpRequestsClosed(self):
        for request in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /x HTTP/1.0\r\n",
            b"CONNECT example.org:25 HTTP/1.1\r\n",
        ):

            def dialogue(request=request):
                c = self.connect()
                c.send(request)
                code, _ = c.reply()
                return code, c.closed()

            code, closed = yield self.run_(dialogue)
            self.assertTrue(closed)
            self.assertEqual(code, 521)
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_outOfOrder(self):
        rcpt, data0, _, nested, data = yield self.exchange(
            "RCPT TO:<b@example.org>",
            "DATA",
            "MAIL FROM:<a@example.org>",
            "MAIL FROM:<a@example.org>",
            "DATA",
        )
        self.assertReply(rcpt, 503, "5.5.1")
        self.assertReply(data0, 503, "5.5.1")
        self.assertReply(nested, 503, "5.5.1")
        self.assertReply(data, 554, "5.5.1")

    @defer.inlineCallbacks
    def test_badAddressSyntax(self):
        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            bad = [c.command(f"MAIL FROM:{a}") for a in ("<a@@b>", "<a b@c>", "<@x>", "<a@-b>")]
            # Not a syntax error: non-ASCII without SMTPUTF8 (RFC 6531
            # section 3.7.4.1), tests/smtp/test_smtputf8.py.
            nonAscii = c.command("MAIL FROM:<ü@x.org>")
            c.command("MAIL FROM:<a@example.org>")
            badr = [c.command(f"RCPT TO:{a}") for a in ("<>", "<x@>", "<x@y..z>", "<x")]
            return bad, badr, nonAscii

        bad, badr, nonAscii = yield self.run_(dialogue)
        for reply in bad:
            self.assertReply(reply, 501, "5.1.7")
        for reply in badr:
            self.assertReply(reply, 501, "5.1.3")
        self.assertReply(nonAscii, 553, "5.6.7")

    @defer.inlineCallbacks
    def test_unknownParameters(self):
        mail, _, rcpt = yield self.exchange(
            "MAIL FROM:<a@example.org> FOO=bar",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.org> XNOTIFY=NEVER",
        )
        self.assertReply(mail, 555, "5.5.4")
        self.assertReply(rcpt, 555, "5.5.4")

    @defer.inlineCallbacks
    def test_sizeOverLimit(self):
        [reply] = yield self.exchange("MAIL FROM:<a@example.org> SIZE=20001")
        self.assertReply(reply, 552, "5.3.4")

    @defer.inlineCallbacks
    def test_tooManyRecipients(self):
        _, *replies = yield self.exchange(
            "MAIL FROM:<a@example.org>", *[f"RCPT TO:<r{i}@example.org>" for i in range(4)]
        )
        self.assertEqual([r[0] for r in replies[:3]], [250, 250, 250])
        self.assertReply(replies[3], 452, "4.5.3")

    @defer.inlineCallbacks
    def test_vrfyHelpNoopRset(self):
        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            return [c.command(x) for x in ("VRFY root", "HELP", "NOOP", "RSET", "QUIT")]

        replies = yield self.run_(dialogue)
        self.assertEqual([r[0] for r in replies], [252, 214, 250, 250, 221])
        for _code, lines in replies:
            self.assertRegex(lines[-1], ENHANCED)


class DataTests(RelaydTestCase):
    # At debug, so that the story below has every line (at info the
    # accepted RCPT line is not even made: QuietAtInfoTests).
    sections = {"limits": {"message_size": 20000}, "logging": {"level": "debug"}}

    @defer.inlineCallbacks
    def test_messageAcceptedByteExact(self):
        body = b"Subject: t\r\n\r\n.leading dot\r\n\xe9\xe8 8-bit\r\n" + b"x" * 998 + b"\r\n"
        stuffed = body.replace(b"\r\n.", b"\r\n..")

        def dialogue():
            c = self.connect()
            return self.transaction(c, stuffed + b".\r\n"), c.command("NOOP")

        (code, lines), (noop, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (250, "2.0.0"))
        self.assertEqual(noop, 250)
        queueId = lines[0].split()[-1]
        [(record, path)] = self.spooled()
        self.assertEqual(record.queueId, queueId)
        self.assertEqual(record.sender, "a@example.org")
        self.assertEqual([r.address for r in record.recipients], ["b@example.org"])
        stored = readData(path)
        self.assertTrue(stored.startswith(b"Received: from client.test ([127.0.0.1])\r\n"))
        self.assertTrue(stored.endswith((b"\r\n" + body, body)))
        self.assertEqual(stored[stored.index(b"Subject") :], body)
        self.assertEqual(self.tmpFiles(), [])
        from twisted.logger import formatEvent

        story = [formatEvent(e) for e in self.events if e.get("queue_id") == queueId]
        # One grep for the queue id tells the message's story.
        self.assertTrue(all(line.startswith(queueId + ": ") for line in story), story)
        self.assertIn("MAIL sender=<a@example.org>", story[0])
        self.assertIn("RCPT to=<b@example.org>", story[1])
        self.assertTrue(any("durable in incoming" in line for line in story), story)
        # The accepted RCPT and the spool's "durable" are debug lines (at
        # info, Postfix's set: client, queued, each delivery, removed).
        levels = {
            formatEvent(e).split(" ", 2)[1]: e["log_level"].name
            for e in self.events
            if e.get("queue_id") == queueId
        }
        self.assertEqual(
            (levels["MAIL"], levels["RCPT"], levels["durable"], levels["queued"]),
            ("info", "debug", "debug", "info"),
        )
        self.assertIn("queued from=<a@example.org> nrcpt=1", story[-1])

    @defer.inlineCallbacks
    def test_overSizeWithoutSizeParameter(self):
        def dialogue():
            c = self.connect()
            reply = self.transaction(c, (b"y" * 98 + b"\r\n") * 300 + b".\r\n")
            return reply, c.command("NOOP")

        (code, lines), (noop, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (552, "5.3.4"))
        self.assertEqual(noop, 250)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.tmpFiles(), [])

    @defer.inlineCallbacks
    def test_longLinesNeverCommandMode(self):
        for length in (1001, 16 * 1024 + 10):
            # The smuggled commands after the long line must stay message
            # content: if relayd fell back to command mode they would be
            # answered and a second message queued.
            body = b"a\r\n" + b"z" * length + b"\r\nRSET\r\nMAIL FROM:<x@y.org>\r\n.\r\n"

            def dialogue(body=body):
                c = self.connect()
                reply = self.transaction(c, body)
                return reply, c.command("NOOP")

            (code, lines), (noop, nooplines) = yield self.run_(dialogue)
            self.assertEqual((code, lines[0][:5]), (554, "5.6.0"))
            self.assertEqual(noop, 250, nooplines)
        self.assertEqual(self.spooled(), [])

    @defer.inlineCallbacks
    def test_limitLinesInSeparateSegments(self):
        """
        Lines of 998 octets are legal (RFC 5321 section 4.5.3.1.6) however
        TCP cuts them: their CR and LF in different segments (issue 9 item
        7), or a leading dot, doubled on the wire, that does not count
        (issue 11).  Sent with TCP_NODELAY and pauses, segment by segment.
        """
        plainLine = b"p" * 998
        dotLine = b"." + b"d" * 997
        segments = [
            b"Subject: limits\r\n\r\n",
            plainLine,
            b"\r",
            b"\n.",
            dotLine,
            b"\r",
            b"\n",
            b"." * 999,
            b"\r\n.\r",
            b"\n",
        ]
        body = b"Subject: limits\r\n\r\n" + b"\r\n".join([plainLine, dotLine, b"." * 998]) + b"\r\n"

        def dialogue():
            c = self.connect()
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            c.command("RCPT TO:<b@example.org>")
            assert c.command("DATA")[0] == 354
            for segment in segments:
                c.send(segment)
                time.sleep(0.05)
            return c.reply(), c.command("NOOP")

        (code, lines), (noop, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (250, "2.0.0"), lines)
        self.assertEqual(noop, 250)
        [(_, path)] = self.spooled()
        stored = readData(path)
        self.assertEqual(stored[stored.index(b"Subject: limits") :], body)

    @defer.inlineCallbacks
    def test_smugglingVariants(self):
        variants = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n\x00.\r\n"]
        for variant in variants:
            smuggled = (
                b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n"
                b"DATA\r\nSubject: forged\r\n\r\nforged\r\n"
            )
            body = b"Subject: real\r\n\r\nhello" + variant + smuggled + b".\r\n"

            def dialogue(body=body):
                c = self.connect()
                reply = self.transaction(c, body)
                c.send(b"NOOP\r\n")
                return reply, c.reply()

            (code, _lines), (noop, _) = yield self.run_(dialogue)
            self.assertIn(code, (550, 554), variant)
            self.assertEqual(noop, 250, variant)
        # Never two messages; nothing with a bare CR or LF in the spool.
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.tmpFiles(), [])

    @defer.inlineCallbacks
    def test_pipelinedTransactions(self):
        """Two whole transactions in one write: replies in order, two entries."""
        wire = (
            b"EHLO client.test\r\n"
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
            b"RCPT TO:<c@example.org>\r\nDATA\r\n"
            b"Subject: one\r\n\r\none\r\n.\r\n"
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n"
            b"Subject: two\r\n\r\ntwo\r\n.\r\nQUIT\r\n"
        )

        def dialogue():
            c = self.connect()
            c.send(wire)
            return [c.reply()[0] for _ in range(11)]

        codes = yield self.run_(dialogue)
        self.assertEqual(codes, [250, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221])
        entries = self.spooled()
        self.assertEqual(len(entries), 2)
        recipients = sorted(len(r.recipients) for r, _ in entries)
        self.assertEqual(recipients, [1, 2])

    @defer.inlineCallbacks
    def test_disconnectMidData(self):
        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            c.command("RCPT TO:<b@example.org>")
            c.command("DATA")
            c.send(b"Subject: half\r\n\r\n" + b"partial line\r\n" * 50)
            c.close()

        yield self.run_(dialogue)
        for _ in range(200):
            if not self.relayd.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.tmpFiles(), [])
        self.assertEqual(self.spooled(), [])

    @defer.inlineCallbacks
    def test_oneEntryPerTransaction(self):
        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.port()) as s:
                return s.sendmail(
                    "a@example.org",
                    [f"r{i}@example.org" for i in range(10)],
                    b"Subject: many\r\n\r\nbody\r\n",
                )

        refused = yield self.run_(dialogue)
        self.assertEqual(refused, {})
        [(record, _)] = self.spooled()
        self.assertEqual(len(record.recipients), 10)


class TLSTests(RelaydTestCase):
    @defer.inlineCallbacks
    def test_submissionWithStarttlsAndAuth(self):
        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.port("submission")) as s:
                s.ehlo("client.test")
                plainExt = (s.has_extn("auth"), s.has_extn("starttls"))
                s.starttls(context=self.setup.clientContext())
                s.ehlo("client.test")
                tlsExt = (s.has_extn("auth"), s.has_extn("starttls"), s.esmtp_features.get("auth"))
                s.login(DEMO_USER, DEMO_PASSWORD)
                s.sendmail("demo@example.org", ["x@example.net"], b"Subject: hi\r\n\r\nhi\r\n")
                return plainExt, tlsExt

        plainExt, tlsExt = yield self.run_(dialogue)
        self.assertEqual(plainExt, (False, True))
        self.assertEqual(tlsExt[:2], (True, False))
        self.assertEqual(sorted(tlsExt[2].split()), ["LOGIN", "PLAIN"])
        [(record, path)] = self.spooled()
        self.assertEqual(record.user, DEMO_USER)
        with open(path, "rb") as f:
            header = f.read(600).decode()
        self.assertRegex(
            header,
            r"^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
            r"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\r\n"
            r"\tby relayd\.test \(relayd\) with ESMTPSA id [0-9A-Z]+\r\n"
            r"\tfor <x@example\.net>; \w{3}, \d+ \w{3} \d{4} [\d:]{8} [+-]\d{4}\r\n",
        )
        self.assertTrue(any("TLS established" in (e.get("log_format") or "") for e in self.events))

    @defer.inlineCallbacks
    def test_implicitTLSWithAuthLogin(self):
        def dialogue():
            with smtplib.SMTP_SSL(
                "127.0.0.1", self.port("submissions"), context=self.setup.clientContext()
            ) as s:
                s.ehlo("client.test")
                starttls = s.has_extn("starttls")
                s.user, s.password = DEMO_USER, DEMO_PASSWORD
                code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                s.sendmail("demo@example.org", ["x@example.net"], b"Subject: hi\r\n\r\nhi\r\n")
                return starttls, code, s.sock.version()

        starttls, code, version = yield self.run_(dialogue)
        self.assertFalse(starttls)
        self.assertEqual(code, 235)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(len(self.spooled()), 1)

    @defer.inlineCallbacks
    def test_tls11Refused(self):
        def dialogue():
            context = self.setup.clientContext()
            try:
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = ssl.TLSVersion.TLSv1_1
            except (ValueError, ssl.SSLError):
                return "client cannot even offer TLS 1.1"
            try:
                with smtplib.SMTP_SSL(
                    "127.0.0.1", self.port("submissions"), context=context, timeout=5
                ):
                    return "connected"
            except (ssl.SSLError, OSError) as e:
                return f"refused: {e}"

        outcome = yield self.run_(dialogue)
        self.assertNotEqual(outcome, "connected")

    @defer.inlineCallbacks
    def test_starttlsDiscardsPipelinedPlaintext(self):
        """CVE-2011-0411: injected commands after STARTTLS are never run."""

        def dialogue():
            c = self.connect("submission")
            c.command("EHLO client.test")
            c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.test>\r\n")
            code, _ = c.reply()
            c.starttls(self.setup.clientContext())
            # The first reply inside TLS must answer our NOOP, not RSET/MAIL.
            noop = c.command("NOOP")
            mail = c.command("MAIL FROM:<a@example.org>")
            return code, noop, mail

        code, noop, mail = yield self.run_(dialogue)
        self.assertEqual(code, 220)
        self.assertEqual(noop, (250, ["2.0.0 Ok"]))
        # MAIL after TLS without a new EHLO: 503.
        self.assertReply(mail, 503, "5.5.1")

    @defer.inlineCallbacks
    def test_starttlsRules(self):
        def dialogue():
            c = self.connect("submission")
            c.command("EHLO client.test")
            withArg = c.command("STARTTLS foo")
            c.command("STARTTLS")
            c.starttls(self.setup.clientContext())
            c.command("EHLO client.test")
            again = c.command("STARTTLS")
            return withArg, again

        withArg, again = yield self.run_(dialogue)
        self.assertReply(withArg, 501, "5.5.4")
        self.assertEqual(again[0], 503)

    @defer.inlineCallbacks
    def test_noStarttlsOnImplicitListener(self):
        def dialogue():
            c = self.connect("submissions", tls=True)
            ehlo = c.command("EHLO client.test")
            return ehlo, c.command("STARTTLS")

        (_code, lines), (st, _) = yield self.run_(dialogue)
        self.assertNotIn("STARTTLS", lines)
        self.assertIn("AUTH PLAIN LOGIN", lines)
        self.assertEqual(st, 503)


class AuthTests(RelaydTestCase):
    def tlsClient(self):
        c = self.connect("submission")
        c.command("EHLO client.test")
        assert c.command("STARTTLS")[0] == 220
        c.starttls(self.setup.clientContext())
        c.command("EHLO client.test")
        return c

    @defer.inlineCallbacks
    def test_authBeforeTLS(self):
        def dialogue():
            c = self.connect("submission")
            ehlo = c.command("EHLO client.test")
            return ehlo, c.command("AUTH PLAIN " + plain())

        (_code, lines), (auth, authLines) = yield self.run_(dialogue)
        self.assertFalse(any(line.startswith("AUTH") for line in lines))
        self.assertIn(auth, (530, 538))
        self.assertEqual(authLines[0][:2], "5.")

    @defer.inlineCallbacks
    def test_mailWithoutAuthOnSubmission(self):
        def dialogue():
            c = self.tlsClient()
            return c.command("MAIL FROM:<demo@example.org>")

        code, lines = yield self.run_(dialogue)
        self.assertEqual((code, lines[0]), (530, "5.7.0 Authentication required"))

    @defer.inlineCallbacks
    def test_badBase64AndCancel(self):
        def dialogue():
            c = self.tlsClient()
            bad = c.command("AUTH PLAIN !!!notbase64")
            challenge = c.command("AUTH LOGIN")
            cancelled = c.command("*")
            good = c.command("AUTH PLAIN " + plain())
            return bad, challenge, cancelled, good

        bad, challenge, cancelled, good = yield self.run_(dialogue)
        self.assertEqual((bad[0], bad[1][0][:2]), (501, "5."))
        self.assertEqual(challenge, (334, ["VXNlcm5hbWU6"]))
        self.assertEqual((cancelled[0], cancelled[1][0][:2]), (501, "5."))
        self.assertReply(good, 235, "2.7.0")

    @defer.inlineCallbacks
    def test_wrongPasswordThenCutOff(self):
        def dialogue():
            c = self.tlsClient()
            replies = [c.command("AUTH PLAIN " + plain(password="wrong")) for _ in range(3)]
            replies.append(c.reply())
            unknown = None
            return replies, c.closed(), unknown

        replies, closed, _ = yield self.run_(dialogue)
        for code, lines in replies[:3]:
            self.assertEqual((code, lines[0][:5]), (535, "5.7.8"))
        self.assertReply(replies[3], 421, "4.7.0")
        self.assertTrue(closed)
        for event in self.events:
            self.assertNotIn("wrong", repr(event))
            self.assertNotIn(DEMO_PASSWORD, repr(event))

    @defer.inlineCallbacks
    def test_unknownUserSameAnswer(self):
        def dialogue():
            c = self.tlsClient()
            return c.command("AUTH PLAIN " + plain(user="nobody")), c.command(
                "AUTH PLAIN " + plain(password="nope")
            )

        unknown, wrong = yield self.run_(dialogue)
        self.assertEqual(unknown, wrong)


class AuthLockoutTests(RelaydTestCase):
    """
    Issue 9 item 8: AUTH failures count across connections, per client
    address and per user name at that address; above a limit AUTH gets
    454 4.7.0 without the password being checked, and other addresses are
    not locked out.
    """

    sections = {
        "auth": {
            "max_failures": 2,
            "failure_window": 3600,
            "user_failure_limit": 3,
            "client_failure_limit": 5,
        },
        "metrics": {"endpoint": "tcp:0:interface=127.0.0.1"},
    }

    def client(self, source=None):
        c = WireClient(self.port("submissions"), context=self.setup.clientContext(), source=source)
        self.addCleanup(c.close)
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        return c

    def lockouts(self, scope):
        value = self.relayd.service.metrics.registry.get_sample_value(
            "relayd_auth_lockouts_total", {"listener": "submissions", "scope": scope}
        )
        return value or 0

    @defer.inlineCallbacks
    def test_userLockedOutAtThisAddressOnly(self):
        def dialogue():
            first = self.client()
            guesses = [first.command("AUTH PLAIN " + plain(password=f"guess{i}")) for i in (1, 2)]
            cut = first.reply()
            second = self.client()
            guesses.append(second.command("AUTH PLAIN " + plain(password="guess3")))
            # The right password, from the guesser's address: refused unchecked.
            locked = second.command("AUTH PLAIN " + plain())
            # The real user from another address is not locked out.
            elsewhere = self.client(source="127.0.0.2").command("AUTH PLAIN " + plain())
            return guesses, cut, locked, elsewhere

        guesses, cut, locked, elsewhere = yield self.run_(dialogue)
        self.assertEqual([(c, lines[0][:5]) for c, lines in guesses], [(535, "5.7.8")] * 3)
        self.assertReply(cut, 421, "4.7.0")
        self.assertEqual(locked, (454, ["4.7.0 Temporary authentication failure"]))
        self.assertReply(elsewhere, 235, "2.7.0")
        self.assertEqual(self.lockouts("user"), 1)
        refusals = [e for e in self.events if "AUTH refused" in (e.get("log_format") or "")]
        self.assertEqual(len(refusals), 1)
        self.assertEqual((refusals[0]["client"], refusals[0]["user"]), ("127.0.0.1", DEMO_USER))

    @defer.inlineCallbacks
    def test_addressLockedOutForEveryUser(self):
        def dialogue():
            replies = []
            for user in ("u1", "u2", "u3"):
                c = self.client()
                replies += [c.command("AUTH PLAIN " + plain(user=user)) for _ in range(2)]
            return replies, self.client().command("AUTH PLAIN " + plain())

        replies, locked = yield self.run_(dialogue)
        # Five failures, then the address is over its limit for every user.
        self.assertEqual([c for c, _ in replies], [535] * 5 + [454])
        self.assertEqual(locked, (454, ["4.7.0 Temporary authentication failure"]))
        self.assertEqual(self.lockouts("client"), 2)


class AuthLockoutSharedTests(unittest.TestCase):
    """
    With the ratelimit policy on Redis, two relayds share the AUTH failure
    counts: guesses at one instance lock the guesser out at the other.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.instances = []
        for _ in range(2):
            directory = tempfile.mkdtemp(prefix="relayd-test-")
            self.addCleanup(shutil.rmtree, directory, True)
            setup = TestSetup(
                directory,
                sections={"auth": {"max_failures": 5, "user_failure_limit": 3}},
                chain=["ratelimit", "mynetworks", "authenticated"],
                policies={
                    "ratelimit": {
                        "backend": "redis",
                        "redis_url": self.redis.url,
                        "redis_timeout": 2.0,
                        "rules": [{"name": "per-client", "key": "client", "messages": ["99/hour"]}],
                    }
                },
                modes=("submissions",),
            )
            relayd = yield InProcessRelayd.start(setup)
            self.addCleanup(relayd.stop)
            self.instances.append((setup, relayd))

    def client(self, index):
        setup, relayd = self.instances[index]
        c = WireClient(relayd.port("submissions"), context=setup.clientContext())
        self.addCleanup(c.close)
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        return c

    @defer.inlineCallbacks
    def test_guessesAtOneInstanceCountAtTheOther(self):
        def dialogue():
            c = self.client(0)
            return [c.command("AUTH PLAIN " + plain(password=f"guess{i}"))[0] for i in range(3)]

        codes = yield deferToThread(dialogue)
        self.assertEqual(codes, [535, 535, 535])
        # The count goes to Redis in a thread of the store: wait for it.
        keys = self.redis.client()
        self.addCleanup(keys.close)
        store = self.instances[0][1].service.policies.chain.policies[0].store
        for _ in range(200):
            counted = [store.used(k, 3, 900) for k in keys.keys("{relayd:authfail}:u:*")]
            if counted == [3]:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(counted, [3])

        def other():
            return self.client(1).command("AUTH PLAIN " + plain())

        locked = yield deferToThread(other)
        self.assertEqual(locked, (454, ["4.7.0 Temporary authentication failure"]))


class RelayDeniedTests(RelaydTestCase):
    """127.0.0.1 is not trusted here, so it is an outsider."""

    policies = {"mynetworks": {"networks": ["192.0.2.0/24"]}}

    @defer.inlineCallbacks
    def test_relayDenied(self):
        def dialogue():
            c = self.connect("relay")
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            return c.command("RCPT TO:<b@example.net>"), c.command("DATA")

        (code, lines), (data, _) = yield self.run_(dialogue)
        self.assertEqual((code, lines[0]), (554, "5.7.1 Relay access denied"))
        self.assertEqual(data, 554)
        self.assertEqual(self.spooled(), [])

    @defer.inlineCallbacks
    def test_authenticatedMayRelay(self):
        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.port("relay")) as s:
                s.starttls(context=self.setup.clientContext())
                s.login(DEMO_USER, DEMO_PASSWORD)
                return s.sendmail("demo@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")

        refused = yield self.run_(dialogue)
        self.assertEqual(refused, {})


class TimeoutTests(RelaydTestCase):
    sections = {"timeouts": {"command": 0.5, "data": 0.5}}

    @defer.inlineCallbacks
    def test_idleClient(self):
        def dialogue():
            c = self.connect()
            return c.reply(), c.closed()

        (code, lines), closed = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (421, "4.4.2"))
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_idleInData(self):
        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            c.command("RCPT TO:<b@example.org>")
            c.command("DATA")
            c.send(b"Subject: slow\r\n")
            return c.reply()

        reply = yield self.run_(dialogue)
        self.assertReply(reply, 421, "4.4.2")
        for _ in range(200):
            if not self.relayd.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.tmpFiles(), [])


class SlowClientTests(RelaydTestCase):
    """
    Issue 9 item 5: trickling one octet at a time must not hold a slot:
    a command line has C{command} seconds in all, and a DATA transfer
    C{data_deadline} seconds plus what it earns at C{data_min_rate}.
    """

    sections = {
        "timeouts": {"command": 1.0, "data": 3.0, "data_deadline": 1.0, "data_min_rate": 100}
    }

    def trickle(self, c, octets, interval=0.1):
        """
        Send C{octets} one at a time, C{interval} seconds apart, until the
        server answers: the reply and how many octets went, or None and all
        of them when it never answered while they were being sent.
        """
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for sent in range(1, len(octets) + 1):
            try:
                c.send(octets[sent - 1 : sent])
            except OSError:
                return None, sent
            readable, _, _ = select.select([c.sock], [], [], interval)
            if readable:
                return c.reply(), sent
        return None, len(octets)

    @defer.inlineCallbacks
    def waitForNoSessions(self):
        for _ in range(300):
            if not self.relayd.sessions:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    def assertStillServing(self):
        def dialogue():
            c = self.connect()
            return c.command("EHLO other.test")[0]

        return self.run_(dialogue).addCallback(self.assertEqual, 250)

    @defer.inlineCallbacks
    def test_commandLineTrickled(self):
        octets = b"EHLO " + b"x" * 55

        def dialogue():
            c = self.connect()
            reply, sent = self.trickle(c, octets)
            return reply, sent, c.closed()

        reply, sent, closed = yield self.run_(dialogue)
        self.assertIsNotNone(reply, "still open after the whole line was trickled")
        self.assertReply(reply, 421, "4.4.2")
        self.assertLess(sent, len(octets))
        self.assertTrue(closed)
        yield self.waitForNoSessions()
        self.assertTrue(
            [e for e in self.events if "command line not complete" in (e.get("log_format") or "")]
        )
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_dataTrickled(self):
        octets = b"Subject: slow\r\n\r\n" + b"y" * 50

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            c.command("RCPT TO:<b@example.org>")
            assert c.command("DATA")[0] == 354
            reply, sent = self.trickle(c, octets)
            return reply, sent, c.closed()

        reply, sent, closed = yield self.run_(dialogue)
        self.assertIsNotNone(reply, "still open after the whole message was trickled")
        self.assertReply(reply, 421, "4.4.2")
        self.assertLess(sent, len(octets))
        self.assertTrue(closed)
        yield self.waitForNoSessions()
        self.assertEqual(self.tmpFiles(), [])
        self.assertEqual(self.spooled(), [])
        self.assertTrue([e for e in self.events if "DATA deadline" in (e.get("log_format") or "")])
        yield self.assertStillServing()

    @defer.inlineCallbacks
    def test_dataAboveMinimumRateMayTakeLonger(self):
        """Each octet earns 1/data_min_rate seconds: slow but steady is fine."""
        body = b"Subject: steady\r\n\r\n" + (b"z" * 98 + b"\r\n") * 20

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            c.command("RCPT TO:<b@example.org>")
            assert c.command("DATA")[0] == 354
            for i in range(0, len(body), 100):
                c.send(body[i : i + 100])
                time.sleep(0.1)
            c.send(b".\r\n")
            return c.reply()

        reply = yield self.run_(dialogue)
        self.assertReply(reply, 250, "2.0.0")


class ConnectionLimitTests(RelaydTestCase):
    sections = {"limits": {"connections_per_client": 2}}

    @defer.inlineCallbacks
    def test_perClientLimit(self):
        def dialogue():
            a, b = self.connect(), self.connect()
            c = WireClient(self.port())
            self.addCleanup(c.close)
            refused = c.reply()
            a.command("QUIT")
            a.close()
            return refused, b.command("NOOP")[0]

        (code, lines), noop = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (421, "4.7.0"))
        self.assertEqual(noop, 250)


class QuitGivesSlotBackTests(RelaydTestCase):
    """
    The slot of a session that ended with QUIT is free as soon as the 221
    is sent, as Postfix's smtpd gives it back to anvil after flushing its
    221: a client that reconnects the moment it reads the 221 (smtp-source
    does) is not refused for its own finished session.
    """

    sections = {"limits": {"connections_per_client": 1}}

    @defer.inlineCallbacks
    def test_reconnectRightAfterQuit(self):
        """
        The QUIT and the next connection reach relayd in the same reactor
        turn (the reactor is kept busy while both arrive): the QUIT is
        answered first, and the new connection is greeted, not refused.
        """

        def dialogue():
            a = self.connect()
            a.command("EHLO client.test")
            busy = threading.Event()

            def hold():
                busy.set()
                time.sleep(0.5)

            reactor.callFromThread(hold)
            busy.wait(5)
            a.send(b"QUIT\r\n")
            time.sleep(0.05)
            b = WireClient(self.port())
            self.addCleanup(b.close)
            return a.reply()[0], b.reply()

        quit, (code, lines) = yield self.run_(dialogue)
        self.assertEqual(quit, 221)
        self.assertEqual(code, 220, lines)

    @defer.inlineCallbacks
    def test_limitStillHolds(self):
        """A live session still takes the client's only slot."""

        def dialogue():
            a = self.connect()
            a.command("EHLO client.test")
            b = WireClient(self.port())
            self.addCleanup(b.close)
            return b.reply()

        code, lines = yield self.run_(dialogue)
        self.assertEqual((code, lines[0][:5]), (421, "4.7.0"))


@implementer(IRecipientPolicy)
class Exploding:
    name = "exploding"

    def checkRecipient(self, session, envelope, recipient):
        raise RuntimeError("policy bug")


@implementer(IRecipientPolicy)
class Silent:
    name = "silent"

    def checkRecipient(self, session, envelope, recipient):
        return defer.Deferred()


class BrokenPolicyTests(RelaydTestCase):
    def useChain(self, *policies, timeout=30.0):
        for factory in self.relayd.service.factories:
            factory.chain = PolicyChain(policies, timeout, reactor)

    @defer.inlineCallbacks
    def test_raisingPolicy(self):
        self.useChain(Exploding())

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            return c.command("RCPT TO:<b@example.org>")

        reply = yield self.run_(dialogue)
        self.assertReply(reply, 451, "4.3.0")
        failures = [e for e in self.events if e.get("policy") == "exploding"]
        self.assertTrue(failures)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_slowPolicyTimesOut(self):
        self.useChain(Silent(), timeout=0.2)

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            return c.command("RCPT TO:<b@example.org>")

        reply = yield self.run_(dialogue)
        self.assertReply(reply, 451, "4.3.0")
        self.assertTrue([e for e in self.events if e.get("policy") == "silent"])
        self.flushLoggedErrors(defer.TimeoutError)


class QuietAtInfoTests(RelaydTestCase):
    """
    At C{[logging] level = "info"} (the default) the accepted RCPT's debug
    line is not made at all, not only filtered out by the observer (the
    log-schema test shows it at debug, and a refused RCPT at info).
    """

    @defer.inlineCallbacks
    def test_acceptedRecipientNotLogged(self):
        replies = yield self.exchange("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>")
        self.assertEqual([code for code, _ in replies], [250, 250])
        self.assertEqual([e for e in self.events if e.get("what") == "RCPT"], [])
        self.assertEqual(len([e for e in self.events if e.get("what") == "MAIL"]), 1)

    @defer.inlineCallbacks
    def test_durableNotLogged(self):
        """Nor is the spool's "durable in incoming" line; the "queued" one is."""
        code, _ = yield self.run_(
            lambda: self.transaction(self.connect(), b"Subject: x\r\n\r\nhello\r\n.\r\n")
        )
        self.assertEqual(code, 250)
        formats = [e.get("log_format") or "" for e in self.events]
        self.assertFalse([f for f in formats if "durable in incoming" in f])
        self.assertTrue([f for f in formats if "queued from=" in f])


@implementer(IRecipientPolicy)
class AcceptLater:
    """Accepts every recipient, on the next reactor turn."""

    name = "acceptlater"

    def checkRecipient(self, session, envelope, recipient):
        return deferLater(reactor, 0, accept)


class BugAfterVerdictTests(RelaydTestCase):
    """
    A bug in the server's own handling of a verdict (here: adding the
    accepted recipient) is C{451 4.3.0} and logged, and the session goes
    on, whether the chain answered at once (taken on the spot, no
    Deferred) or later.
    """

    @defer.inlineCallbacks
    def check(self, *policies):
        for factory in self.relayd.service.factories:
            factory.chain = PolicyChain(policies, 30.0, reactor)

        def broken(*args):
            raise RuntimeError("bug after the verdict")

        self.patch(SMTPServer, "_acceptRecipient", broken)
        replies = yield self.exchange(
            "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.org>", "RSET"
        )
        self.assertEqual([code for code, _ in replies], [250, 451, 250])
        self.assertReply(replies[1], 451, "4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_atOnce(self):
        return self.check(AcceptAll())

    def test_later(self):
        return self.check(AcceptLater())


@implementer(IRecipientPolicy)
class AcceptAll:
    name = "acceptall"

    def checkRecipient(self, session, envelope, recipient):
        return accept()


@implementer(IMessagePolicy)
class FileReader:
    """A message policy that reads the file at message.path, as plugins may."""

    name = "filereader"

    def __init__(self):
        self.seen = []

    def checkMessage(self, session, envelope, message):
        with open(message.path, "rb") as f:
            self.seen.append(f.read())
        return CONTINUE


class MessageFileTests(RelaydTestCase):
    """
    A message policy finds the whole message at C{message.path}: the
    server writes it out before asking (when no policy reads messages, it
    leaves it to the commit, which writes message and record at once).
    """

    @defer.inlineCallbacks
    def test_policyReadsTheWholeFile(self):
        reader = FileReader()
        for factory in self.relayd.service.factories:
            factory.chain = PolicyChain([AcceptAll(), reader], 30.0, reactor)
        body = b"Subject: read me\r\n\r\n" + b"line of the body\r\n" * 200

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            assert c.command("MAIL FROM:<a@example.org>")[0] == 250
            assert c.command("RCPT TO:<b@example.org>")[0] == 250
            assert c.command("DATA")[0] == 354
            c.send(body + b".\r\n")
            return c.reply()

        code, lines = yield self.run_(dialogue)
        self.assertEqual(code, 250, lines)
        [seen] = reader.seen
        self.assertTrue(seen.endswith(body), seen[-100:])
        [(_record, path)] = self.spooled()
        self.assertTrue(readData(path).endswith(body))
        self.assertFalse(PolicyChain([AcceptAll()], 30.0, reactor).readsMessages)


class EnhancedCodeTests(RelaydTestCase):
    @defer.inlineCallbacks
    def test_everyReplyHasEnhancedCode(self):
        """All but greeting, EHLO/HELO and 3xx (RFC 2034 section 3)."""

        def dialogue():
            c = self.connect()
            replies = [c.command("HELO client.test")]
            for line in (
                "EHLO client.test",
                "MAIL FROM:<a@example.org> SIZE=10",
                "RCPT TO:<b@example.org>",
                "RCPT TO:<bad",
                "VRFY x",
                "NOOP",
                "RSET",
                "FOO",
                "DATA",
                "MAIL FROM:<a@example.org>",
                "RCPT TO:<b@example.org>",
                "AUTH PLAIN",
                "STARTTLS x",
                "HELP",
            ):
                replies.append((line, c.command(line)))
            c.command("DATA")
            replies.append(("end", c.command(b"x\r\n.")))
            replies.append(("QUIT", c.command("QUIT")))
            return replies

        replies = yield self.run_(dialogue)
        for line, (code, lines) in replies[1:]:
            if line.startswith("EHLO") or 300 <= code < 400:
                continue
            self.assertRegex(lines[-1], ENHANCED, (line, code, lines))
