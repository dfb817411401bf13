"""
The limits relayd puts on a message's header section at the end of DATA,
over real sockets against an in-process relayd: the header section is
read whole or the message is refused: one larger than C{[limits]
header_size} gets C{552 5.3.4}, so no policy ever decides on a header
section cut short.

Each refusal has its log line, and the session goes on serving.
"""

from __future__ import annotations

import re
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, SMTPClient, TestSetup

HEADER_TOO_LARGE = (552, "5.3.4 Error: message header section exceeds fixed limit")


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
            c = SMTPClient(self.relayd.port("relay"))
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


class ConfiguredTests(HeaderLimitsCase):
    sections = {"limits": {"header_size": 4096}}

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
