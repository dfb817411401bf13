"""
DSN parameters through relayd to Postfix: Python's smtplib sends with RET,
ENVID, NOTIFY and ORCPT; relayd delivers through a configured route to
Postfix's smtp-sink, which advertises DSN, and its dump shows the MAIL and
RCPT arguments it was given.
"""

import smtplib

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, SinkServer, TestSetup
from relayd.testing.sink import DEFAULT_ADVERTISE
from tests.interop.postfix import (
    postfixDirectory,
    relaydToSmtpSink,
    startPostfix,
    waitArrived,
    waitDump,
)


class SmtplibThroughRelaydToPostfixTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_dsnParametersPassedOn(self):
        relayd, sink = yield relaydToSmtpSink(self, "relayd-interop-dsn-")

        def send():
            with smtplib.SMTP("127.0.0.1", relayd.port("relay")) as s:
                s.ehlo()
                self.assertTrue(s.has_extn("dsn"))
                return s.sendmail(
                    "alice@example.org",
                    ["bob@example.net"],
                    b"Subject: dsn to postfix\r\n\r\nlast line\r\n",
                    mail_options=["RET=HDRS", "ENVID=abc+2B1"],
                    rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x@y"],
                )

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        [dump] = yield waitDump(sink, b"last line")
        mailArgs = next(line for line in dump.splitlines() if line.startswith(b"X-Mail-Args:"))
        rcptArgs = next(line for line in dump.splitlines() if line.startswith(b"X-Rcpt-Args:"))
        self.assertIn(b"<alice@example.org>", mailArgs)
        self.assertIn(b"RET=HDRS", mailArgs)
        self.assertIn(b"ENVID=abc+2B1", mailArgs)
        self.assertEqual(
            rcptArgs, b"X-Rcpt-Args: <bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y"
        )
        while relayd.spool.entries("incoming") or relayd.spool.entries("active"):
            yield deferLater(reactor, 0.05, lambda: None)
        # Postfix advertised DSN and took NOTIFY=SUCCESS: the notice is its
        # business, relayd queues none.
        self.assertEqual(relayd.spool.entries("deferred"), [])


def _dsnSink(testCase):
    sink = SinkServer()
    sink.advertise = [*DEFAULT_ADVERTISE, "DSN"]
    port = sink.start(reactor)
    testCase.addCleanup(sink.stop)
    return sink, port


def _relaydTo(directory, port):
    return InProcessRelayd.start(TestSetup.relayingTo(str(directory / "relayd"), port))


def _send(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        return s.sendmail(
            "alice@example.org",
            ["bob@example.net"],
            b"Subject: dsn\r\n\r\nhello\r\n",
            mail_options=["RET=HDRS", "ENVID=env+2B1"],
            rcpt_options=["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;orig@example.net"],
        )


class PostfixAsNextHopTests(unittest.TestCase):
    """
    relayd's next hop is a real Postfix (not smtp-sink), which offers DSN:
    relayd passes the parameters on and Postfix, relaying on to a sink that
    offers DSN too, passes them on again, so they went through both MTAs.
    """

    @defer.inlineCallbacks
    def test_parametersThroughRelaydAndPostfix(self):
        directory = postfixDirectory(self, "relayd-interop-dsn-hop-")
        sink, sinkPort = _dsnSink(self)
        postfix = yield startPostfix(self, directory, sinkPort)
        relayd = yield _relaydTo(directory, postfix.port)
        self.addCleanup(relayd.stop)

        refused = yield deferToThread(_send, relayd.port("relay"))
        self.assertEqual(refused, {})
        yield waitArrived(sink, postfix)
        lines = [c.line for c in sink.commands]
        [mail] = [line for line in lines if line.upper().startswith("MAIL FROM:")]
        [rcpt] = [line for line in lines if line.upper().startswith("RCPT TO:")]
        self.assertIn("RET=HDRS", mail.split())
        self.assertIn("ENVID=env+2B1", mail.split())
        self.assertIn("NOTIFY=SUCCESS,DELAY", rcpt.split())
        self.assertIn("ORCPT=rfc822;orig@example.net", rcpt.split())
        # Postfix took the DSN duty: relayd queued no notice of its own.
        for _ in range(200):
            if not any(relayd.spool.entries(s) for s in ("incoming", "active", "deferred")):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(relayd.spool.entries("deferred"), [])
        self.assertEqual(relayd.spool.entries("incoming"), [])


class PostfixAsClientTests(unittest.TestCase):
    """
    A real Postfix whose relayhost is relayd: Postfix sends RET, ENVID,
    NOTIFY and ORCPT because relayd advertises DSN, and relayd passes them
    on to its own next hop.
    """

    @defer.inlineCallbacks
    def test_postfixSendsParametersToRelayd(self):
        directory = postfixDirectory(self, "relayd-interop-dsn-client-")
        sink, sinkPort = _dsnSink(self)
        relayd = yield _relaydTo(directory, sinkPort)
        self.addCleanup(relayd.stop)
        postfix = yield startPostfix(self, directory, relayd.port("relay"))

        refused = yield deferToThread(_send, postfix.port)
        self.assertEqual(refused, {})
        yield waitArrived(sink, postfix)
        [message] = sink.messages
        self.assertEqual(
            (message.sender, message.recipients), ("alice@example.org", ["bob@example.net"])
        )
        lines = [c.line for c in sink.commands]
        [mail] = [line for line in lines if line.upper().startswith("MAIL FROM:")]
        [rcpt] = [line for line in lines if line.upper().startswith("RCPT TO:")]
        self.assertIn("RET=HDRS", mail.split())
        self.assertIn("ENVID=env+2B1", mail.split())
        self.assertIn("NOTIFY=SUCCESS,DELAY", rcpt.split())
        self.assertIn("ORCPT=rfc822;orig@example.net", rcpt.split())
        # relayd's Received: names Postfix as the client.
        self.assertIn(b"Received: from postfix-bench.localhost", message.data)
