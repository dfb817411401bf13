"""
Through relayd end to end with independent peers on both sides: swaks
submits over STARTTLS with AUTH, relayd spools and delivers through a
configured route to Postfix's smtp-sink, and the message arrives intact.
"""

import shutil
import subprocess

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import DEMO_PASSWORD, DEMO_USER
from tests.interop.postfix import relaydToSmtpSink, waitDump

BODY_LINES = [
    "Subject: swaks to smtp-sink",
    "",
    ".leading dot",
    "..two dots",
    "x" * 998,
    "last line",
]


class SwaksThroughRelaydToSmtpSinkTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_byteExactThroughRelayd(self):
        relayd, sink = yield relaydToSmtpSink(
            self, "relayd-interop-", tls="opportunistic", modes=("submission",)
        )

        swaks = shutil.which("swaks")
        self.assertIsNotNone(swaks, "swaks is not installed; scripts/test installs it")
        result = yield deferToThread(
            subprocess.run,
            [
                swaks,
                "--server",
                f"127.0.0.1:{relayd.port('submission')}",
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                DEMO_USER,
                "--auth-password",
                DEMO_PASSWORD,
                "--from",
                "demo@example.org",
                "--to",
                "friend@example.net",
                "--data",
                "\r\n".join(BODY_LINES) + "\r\n",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # What swaks put on the wire between 354 and the final dot (it adds
        # an empty line of its own before the dot), from its transcript, with
        # the dot-stuffing taken off.
        transcript = result.stdout.splitlines()
        start = next(i for i, line in enumerate(transcript) if line.startswith("<~  354"))
        end = next(i for i in range(start, len(transcript)) if transcript[i] == " ~> .")
        onWire = [line[4:] for line in transcript[start + 1 : end]]
        sent = [line.removeprefix(".") for line in onWire]
        self.assertEqual(sent[: len(BODY_LINES)], BODY_LINES)

        [dump] = yield waitDump(sink, b"last line")
        self.assertIn(b"X-Mail-Args: <demo@example.org>", dump)
        self.assertIn(b"X-Rcpt-Args: <friend@example.net>", dump)
        # The message after relayd's Received: header, as smtp-sink dumps
        # it (LF line ends, dot-stuffing removed).
        start = dump.index(b"Subject: swaks to smtp-sink")
        # smtp-sink ends each dump with one empty line of its own.
        self.assertEqual(dump[start:], ("\n".join(sent) + "\n\n").encode())
        self.assertIn(b"by relayd.test (relayd) with ESMTPSA id", dump)
        while relayd.spool.entries("incoming") or relayd.spool.entries("active"):
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(relayd.spool.entries("deferred"), [])
