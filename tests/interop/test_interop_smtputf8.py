"""
SMTPUTF8 with Postfix as relayd's next hop, and as its client.

Next hop: Python's smtplib sends with
C{SMTPUTF8} and UTF-8 addresses and header fields to relayd, which relays
through a configured route to a private Postfix instance (C{postfix -c},
L{bench.systems.PrivatePostfix}, set up by L{tests.interop.postfix}; Postfix 3.x
with C{smtputf8_enable = yes},
the default at compatibility level 3.6), which relays on to an SMTP sink
that offers SMTPUTF8.  Postfix takes the message only if relayd sent
C{SMTPUTF8} on MAIL (it refuses a non-ASCII address without it), and it
passes the flag on to the sink.

Client: the same the other way round: smtplib to Postfix, whose relayhost
is relayd, which delivers to the sink; relayd takes the message only with
C{SMTPUTF8} on Postfix's MAIL, and passes it on.
"""

import smtplib

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, SinkServer, TestSetup
from relayd.testing.sink import DEFAULT_ADVERTISE
from tests.interop.postfix import postfixDirectory, startPostfix, waitArrived

SENDER = "jürgen@bücher.example"
RECIPIENT = "用户@例え.テスト"
BODY = "From: Jürgen <jürgen@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo, 世界\r\n".encode()


class PostfixNextHopTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_throughRelaydAndPostfix(self):
        directory = postfixDirectory(self, "relayd-interop-utf8-")

        sink = SinkServer()
        sink.advertise = [*DEFAULT_ADVERTISE, "SMTPUTF8"]
        sinkPort = sink.start(reactor)
        self.addCleanup(sink.stop)
        postfix = yield startPostfix(self, directory, sinkPort)

        setup = TestSetup.relayingTo(str(directory / "relayd"), postfix.port)
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def send():
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=20) as s:
                return s.sendmail(SENDER, [RECIPIENT], BODY, mail_options=["SMTPUTF8"])

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        yield waitArrived(sink, postfix)
        [message] = sink.messages
        self.assertEqual((message.sender, message.recipients), (SENDER, [RECIPIENT]))
        self.assertIn("SMTPUTF8", message.mailParameters.split())
        head, _, body = message.data.partition(b"\r\n\r\n")
        self.assertEqual(body, "Hallo, 世界\r\n".encode(), message.data)
        # Postfix's cleanup adds the fields the message lacks (Date:,
        # Message-Id:, To:); the client's are there as sent.
        self.assertIn("\r\nFrom: Jürgen <jürgen@bücher.example>\r\n".encode(), head)
        self.assertIn("\r\nSubject: Grüße\r\n".encode(), head)
        # Both hops say UTF8SMTP in their Received: (RFC 6531 section 3.7.3).
        self.assertIn(b"by relayd.test (relayd) with UTF8SMTP id", head)
        self.assertIn(b"(Postfix) with UTF8SMTP id", head.split(b"by relayd.test")[0])
        # relayd delivered (nothing left to retry, no DSN).
        for _ in range(200):
            if not any(relayd.spool.entries(s) for s in ("incoming", "active", "deferred")):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(relayd.spool.entries("deferred"), [])


class PostfixClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_postfixRelaysToRelayd(self):
        directory = postfixDirectory(self, "relayd-interop-utf8-")

        sink = SinkServer()
        sink.advertise = [*DEFAULT_ADVERTISE, "SMTPUTF8"]
        sinkPort = sink.start(reactor)
        self.addCleanup(sink.stop)
        setup = TestSetup.relayingTo(str(directory / "relayd"), sinkPort)
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        # Postfix's relayhost is relayd.
        postfix = yield startPostfix(self, directory, relayd.port("relay"))

        def send():
            with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as s:
                return s.sendmail(SENDER, [RECIPIENT], BODY, mail_options=["SMTPUTF8"])

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        yield waitArrived(sink, postfix)
        [message] = sink.messages
        self.assertEqual((message.sender, message.recipients), (SENDER, [RECIPIENT]))
        self.assertIn("SMTPUTF8", message.mailParameters.split())
        head, _, body = message.data.partition(b"\r\n\r\n")
        self.assertEqual(body, "Hallo, 世界\r\n".encode())
        self.assertIn("\r\nSubject: Grüße\r\n".encode(), head)
        # relayd's Received: (the first) names Postfix and says UTF8SMTP.
        first = head.split(b"\r\nReceived:")[0]
        self.assertIn(b"Received: from postfix-bench.localhost", first)
        self.assertIn(b"by relayd.test (relayd) with UTF8SMTP id", first)
