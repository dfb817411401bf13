"""
Relaying in session with a real Postfix as the next hop: relayd's client
gets Postfix's own reply to the end of data ("queued as" with Postfix's
queue id), relayd queues nothing, the DSN parameters reach Postfix, and
Postfix delivers the message on to its relayhost.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, SinkServer, TestSetup
from tests.interop.postfix import postfixDirectory, startPostfix, waitArrived

MESSAGE = b"From: app@example.org\r\nSubject: via Postfix\r\n\r\n.dot line\r\nbody\r\n"


class PassthroughToPostfixTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_postfixVerdictInSession(self) -> Any:
        directory = postfixDirectory(self, "relayd-interop-passthrough-")
        sink = SinkServer()
        sink.advertise = [*sink.advertise, "DSN"]
        sinkPort = sink.start(reactor)
        self.addCleanup(sink.stop)
        postfix = yield startPostfix(self, directory, sinkPort)
        setup = TestSetup(str(directory / "relayd"), modes=("relay",), chain=["mynetworks"])
        with open(setup.configPath, "a") as f:
            f.write(
                '\n[[routes]]\ndomains = ["*"]\nmode = "passthrough"\nfallback = "tempfail"\n'
                f'[[routes.hops]]\nhost = "127.0.0.1"\nport = {postfix.port}\ntls = "none"\n'
            )
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=60) as client:
                client.ehlo("app.example")
                client.mail("app@example.org", ["RET=HDRS"])
                client.rcpt("friend@example.net", ["NOTIFY=SUCCESS"])
                return client.data(MESSAGE)

        code, text = yield deferToThread(send)
        self.assertEqual(code, 250)
        # Postfix's own words, not relayd's "Ok: queued as <relayd id>".
        self.assertRegex(text.decode(), r"^2\.0\.0 Ok: queued as [0-9A-Za-z]+$")
        queued = [
            name
            for state in ("tmp", "incoming", "deferred")
            for name in os.listdir(os.path.join(setup.spoolPath, state))
        ]
        self.assertEqual(queued, [])
        yield waitArrived(sink, postfix)
        [message] = sink.messages
        self.assertEqual(message.recipients, ["friend@example.net"])
        self.assertIn(b"by relayd.test (relayd) with ESMTP id", message.data)
        self.assertTrue(message.data.endswith(b".dot line\r\nbody\r\n"))
        lines = [c.line for c in sink.commands]
        [rcpt] = [line for line in lines if line.upper().startswith("RCPT TO:")]
        self.assertIn("NOTIFY=SUCCESS", rcpt.split())
