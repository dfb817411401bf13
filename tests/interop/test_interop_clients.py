"""
Real, independent SMTP clients against relayd: swaks (Perl, Net::SSLeay)
and Postfix's smtp-source.  scripts/test installs both; a missing tool is a
failure here, not a skip, because CI must run these.
"""

import shutil
import subprocess
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.queue.record import readData
from relayd.testing import DEMO_PASSWORD, DEMO_USER, InProcessRelayd, TestSetup


def tool(name, *candidates):
    for path in (shutil.which(name), *candidates):
        if path:
            return path
    raise AssertionError(f"{name} is not installed; scripts/test installs it")


def run(argv, timeout=60):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class InteropTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-interop-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, sections={"limits": {"recipients": 200}})
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.swaks = tool("swaks")

    def spooled(self):
        spool = self.relayd.spool
        return [spool.load(q) for q in spool.entries("incoming")]

    def body(self, path):
        data = readData(path)
        # Skip relayd's own Received: header (first line plus TAB lines).
        lines = data.split(b"\r\n")
        i = 1
        while lines[i].startswith(b"\t"):
            i += 1
        return b"\r\n".join(lines[i:])

    @defer.inlineCallbacks
    def test_swaksSubmissionStarttlsAuthPlain(self):
        result = yield deferToThread(
            run,
            [
                self.swaks,
                "--server",
                f"127.0.0.1:{self.relayd.port('submission')}",
                "--tls",
                "--tls-verify",
                "--tls-ca-path",
                self.setup.caPath,
                "--tls-protocol",
                "tlsv1_2,tlsv1_3",
                "--auth",
                "PLAIN",
                "--auth-user",
                DEMO_USER,
                "--auth-password",
                DEMO_PASSWORD,
                "--ehlo",
                "swaks.test",
                "--from",
                "demo@example.org",
                "--to",
                "friend@example.net",
                "--header",
                "Subject: via swaks",
                "--body",
                "line one\n.dot line\nline three",
            ],
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("<~  250 2.0.0 Ok: queued as", result.stdout)
        [(record, path)] = self.spooled()
        self.assertEqual((record.user, record.sender), (DEMO_USER, "demo@example.org"))
        body = self.body(path)
        self.assertIn(b"Subject: via swaks\r\n", body)
        self.assertIn(b"\r\n.dot line\r\n", body)
        with open(path, "rb") as f:
            self.assertIn(b"with ESMTPSA id", f.read(400))

    @defer.inlineCallbacks
    def test_swaksImplicitTlsAuthLoginPipelined(self):
        result = yield deferToThread(
            run,
            [
                self.swaks,
                "--server",
                f"127.0.0.1:{self.relayd.port('submissions')}",
                "--tlsc",
                "--pipeline",
                "--auth",
                "LOGIN",
                "--auth-user",
                DEMO_USER,
                "--auth-password",
                DEMO_PASSWORD,
                "--from",
                "demo@example.org",
                "--to",
                "a@example.net,b@example.net",
            ],
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        [(record, _)] = self.spooled()
        self.assertEqual(len(record.recipients), 2)

    @defer.inlineCallbacks
    def test_swaksWrongPassword(self):
        result = yield deferToThread(
            run,
            [
                self.swaks,
                "--server",
                f"127.0.0.1:{self.relayd.port('submission')}",
                "--tls",
                "--auth",
                "PLAIN",
                "--auth-user",
                DEMO_USER,
                "--auth-password",
                "wrong",
                "--from",
                "demo@example.org",
                "--to",
                "friend@example.net",
            ],
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("535 5.7.8", result.stdout)
        self.assertEqual(self.spooled(), [])

    @defer.inlineCallbacks
    def test_smtpSourceManySessions(self):
        """Postfix's load generator: 40 messages over 4 parallel sessions."""
        source = tool("smtp-source", "/usr/sbin/smtp-source")
        result = yield deferToThread(
            run,
            [
                source,
                "-s",
                "4",
                "-m",
                "40",
                "-l",
                "4096",
                "-r",
                "3",
                "-f",
                "load@example.org",
                "-t",
                "sink@example.net",
                f"127.0.0.1:{self.relayd.port('relay')}",
            ],
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        entries = self.spooled()
        self.assertEqual(len(entries), 40)
        for record, _path in entries:
            self.assertEqual(record.sender, "load@example.org")
            self.assertEqual(len(record.recipients), 3)
