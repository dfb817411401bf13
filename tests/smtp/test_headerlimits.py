"""
The limits relayd puts on a message's header section at the end of DATA,
over real sockets against an in-process relayd:

  - the header section is read whole or the message is refused: one
    larger than C{[limits] header_size} gets C{552 5.3.4}, so no policy
    ever decides on a header section cut short;
  - more C{Received:} fields than C{[limits] hops} (relayd's own counted)
    is a mail loop: C{554 5.4.6}.

Each refusal has its log line, and the session goes on serving.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, TestSetup, WireClient

TOO_MANY_HOPS = (554, "5.4.6 Error: too many hops")
HEADER_TOO_LARGE = (552, "5.3.4 Error: message header section exceeds fixed limit")


def received(n: int) -> bytes:
    """C{n} trace fields as other MTAs write them, folded."""
    return b"".join(
        b"Received: from hop%d.example.net (hop%d.example.net [192.0.2.%d])\r\n"
        b"\tby mx.example.org with ESMTP id A%d; Thu, 3 Dec 2026 07:00:00 +0000\r\n"
        % (i, i, i % 250 + 1, i)
        for i in range(n)
    )


BODY = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hops\r\n\r\nHello.\r\n"


class HeaderLimitsCase(unittest.TestCase):
    sections: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-headerlimits-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, sections=self.sections, modes=("relay",))
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def send(self, *messages: bytes):
        """
        The messages in one session (no line may start with a dot): the
        reply to each end of DATA, then that to a NOOP.
        """

        def dialogue():
            c = WireClient(self.relayd.port("relay"))
            try:
                assert c.reply()[0] == 220
                assert c.command("EHLO client.test")[0] == 250
                replies = []
                for data in messages:
                    assert c.command("MAIL FROM:<a@example.org>")[0] == 250
                    assert c.command("RCPT TO:<b@example.org>")[0] == 250
                    assert c.command("DATA")[0] == 354
                    c.send(data + b".\r\n")
                    code, lines = c.reply()
                    replies.append((code, lines[0]))
                return replies, c.command("NOOP")[0]
            finally:
                c.close()

        return deferToThread(dialogue)

    def spooled(self):
        return self.relayd.spool.entries("incoming")

    def refusals(self):
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "relayd.smtpd" and "message refused" in formatEvent(e)
        ]

    def assertQueued(self, reply):
        self.assertEqual(reply[0], 250)
        self.assertTrue(reply[1].startswith("2.0.0 Ok: queued as "), reply)


class HopLimitTests(HeaderLimitsCase):
    """The default limit: 50 Received: fields, as Postfix's hopcount_limit."""

    @defer.inlineCallbacks
    def test_loopingMessageRefused(self):
        """150 trace fields: refused with 554 5.4.6 and a log line."""
        replies, noop = yield self.send(received(150) + BODY)
        self.assertEqual(replies, [TOO_MANY_HOPS])
        self.assertEqual(noop, 250)
        self.assertEqual(self.spooled(), [])
        [line] = self.refusals()
        self.assertRegex(
            line,
            r"^[0-9A-Z]+: message refused: 151 Received: fields, more than 50 "
            r"\(limits\.hops\); a mail loop\? from \[127\.0\.0\.1\] session=[0-9A-F]{8}$",
        )

    @defer.inlineCallbacks
    def test_boundary(self):
        """
        relayd's own Received: counts: 49 others make 50 and pass, 50
        others make 51 and are refused.
        """
        replies, _ = yield self.send(received(49) + BODY, received(50) + BODY)
        self.assertQueued(replies[0])
        self.assertEqual(replies[1], TOO_MANY_HOPS)
        self.assertEqual(len(self.spooled()), 1)

    @defer.inlineCallbacks
    def test_onlyTheHeaderSectionCounts(self):
        """Received: lines in the body (a forwarded message) are not trace fields."""
        replies, _ = yield self.send(BODY + received(150))
        self.assertQueued(replies[0])


class ConfiguredTests(HeaderLimitsCase):
    sections = {"limits": {"hops": 3, "header_size": 4096}}

    @defer.inlineCallbacks
    def test_hops(self):
        replies, _ = yield self.send(received(2) + BODY, received(3) + BODY)
        self.assertQueued(replies[0])
        self.assertEqual(replies[1], TOO_MANY_HOPS)
        self.assertRegex(self.refusals()[0], r": 4 Received: fields, more than 3 \(limits\.hops\)")

    @defer.inlineCallbacks
    def test_headerSize(self):
        """
        The bound counts the whole header section as stored (relayd's own
        Received: field included) up to the empty line that ends it; a
        big body does not count.
        """
        pad = b"X-Pad: " + b"p" * 90 + b"\r\n"
        small = pad * 30 + BODY + b"x" * 900 + b"\r\n" * 10
        big = pad * 45 + BODY
        replies, noop = yield self.send(small, big)
        self.assertQueued(replies[0])
        self.assertEqual(replies[1], HEADER_TOO_LARGE)
        self.assertEqual(noop, 250)
        self.assertEqual(len(self.spooled()), 1)
        [line] = self.refusals()
        self.assertTrue(
            re.search(r": header section over 4096 octets \(limits\.header_size\) from ", line),
            line,
        )


class MailLoopTests(unittest.TestCase):
    """
    A relayd whose route leads back to itself stops the loop.  The route
    names the port relayd got for a listener on port 0, which no check of
    the config file can see: the hop limit is what ends such loops.
    """

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-loop-")
        self.addCleanup(shutil.rmtree, directory, True)
        delivery = {
            "enabled": True,
            "retry_initial": 30,
            "idle_timeout": 0.5,
            "connect_timeout": 5,
            "command_timeout": 10,
            "data_timeout": 10,
        }
        self.setup = TestSetup(directory, modes=("relay",), sections={"delivery": delivery})
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        with open(self.setup.configPath, "a") as f:
            f.write(
                '\n[[routes]]\ndomains = ["*"]\n[[routes.hops]]\nhost = "127.0.0.1"\n'
                f'port = {self.relayd.port("relay")}\ntls = "none"\n'
            )
        self.assertTrue((yield self.relayd.service.reload()))

    def lines(self, text):
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    def spoolCount(self):
        spool = self.relayd.spool
        return sum(len(spool.entries(s)) for s in ("incoming", "active", "deferred"))

    @defer.inlineCallbacks
    def test_loopStops(self):
        """
        Each pass adds a Received: field; the pass that would make 51 is
        refused (554 5.4.6), the copy before it bounces (to <>, so no DSN)
        and the spool is empty again: 50 passes, not an endless loop.
        """

        def send():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=30) as s:
                s.sendmail("", ["someone@loop.test"], BODY)

        yield deferToThread(send)
        deadline = time.monotonic() + 120
        while not (self.lines("Received: fields, more than 50") and self.spoolCount() == 0):
            if time.monotonic() > deadline:
                self.fail(f"the loop did not stop: {len(self.lines(': queued from=<>'))} passes")
            yield deferLater(reactor, 0.05, lambda: None)
        [refused] = self.lines("Received: fields, more than 50")
        self.assertIn(": message refused: 51 Received: fields, more than 50 (limits.hops)", refused)
        self.assertEqual(len(self.lines(": queued from=<>")), 50)
        [bounced] = self.lines("status=bounced")
        self.assertIn("status=bounced (554 5.4.6 Error: too many hops)", bounced)
