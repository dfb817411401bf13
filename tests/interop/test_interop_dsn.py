"""
DSN parameters through relayd to Postfix: Python's smtplib sends with RET,
ENVID, NOTIFY and ORCPT; relayd delivers through a configured route to
Postfix's smtp-sink, which advertises DSN, and its dump shows the MAIL and
RCPT arguments it was given.
"""

import shutil
import smtplib
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, PostfixSink, TestSetup


class SmtplibThroughRelaydToPostfixTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_dsnParametersPassedOn(self):
        directory = tempfile.mkdtemp(prefix="relayd-interop-dsn-")
        self.addCleanup(shutil.rmtree, directory, True)
        sink = PostfixSink(directory)
        self.addCleanup(sink.stop)
        setup = TestSetup(
            directory + "/relayd",
            modes=("relay",),
            sections={
                "delivery": {
                    "enabled": True,
                    "retry_initial": 1,
                    "retry_max": 1,
                    "idle_timeout": 0.2,
                }
            },
        )
        setup.routeAllTo(sink.port)
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

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
        deadline = time.monotonic() + 20
        # smtp-sink writes a dump when the session ends (relayd's idle
        # connection is closed after idle_timeout).
        while not any(b"last line" in d for d in sink.messages()) and time.monotonic() < deadline:
            yield deferLater(reactor, 0.05, lambda: None)
        [dump] = sink.messages()
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
