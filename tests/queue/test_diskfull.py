"""
Storage trouble seen over SMTP, on a real full file system: the spool is a
tiny tmpfs.  A write failure at the end of DATA answers 451/452 (never 250,
never 5xx) and leaves nothing half-written; the free-space reserve is
checked at MAIL (452 4.3.1); the server keeps serving.
"""

import os
import shutil
import subprocess
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.testing import InProcessRelayd, TestSetup, WireClient


def mountTmpfs(testCase, size):
    if os.geteuid() != 0:
        raise unittest.SkipTest("mounting a tmpfs to fill up needs root")
    directory = tempfile.mkdtemp(prefix="relayd-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory], check=True)
    testCase.addCleanup(os.rmdir, directory)
    testCase.addCleanup(subprocess.run, ["umount", directory], check=True)
    return directory


class FullSpoolMixin:
    """relayd with its spool on a 256 KiB tmpfs and the given reserve."""

    reserve = 0

    @defer.inlineCallbacks
    def setUp(self):
        self.spoolDir = mountTmpfs(self, "256k")
        directory = tempfile.mkdtemp(prefix="relayd-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(
            directory,
            modes=("relay",),
            sections={"spool": {"directory": self.spoolDir, "reserve_bytes": self.reserve}},
        )
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def send(self, body):
        c = WireClient(self.relayd.port("relay"))
        try:
            c.reply()
            c.command("EHLO client.test")
            mail = c.command("MAIL FROM:<a@example.org>")
            if mail[0] != 250:
                return mail
            c.command("RCPT TO:<b@example.org>")
            c.command("DATA")
            c.send(body + b".\r\n")
            return c.reply()
        finally:
            c.close()

    def leftovers(self):
        found = {}
        for state in ("tmp", "incoming"):
            found[state] = os.listdir(os.path.join(self.spoolDir, state))
        return found


class FullDiskTests(FullSpoolMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_writeFailureAtEndOfData(self):
        big = (b"x" * 998 + b"\r\n") * 400  # 400 KB into a 256 KB file system
        code, lines = yield deferToThread(self.send, big)
        self.assertIn(code, (451, 452))
        self.assertIn(lines[0][:5], ("4.3.0", "4.3.1"))
        self.assertEqual(self.leftovers(), {"tmp": [], "incoming": []})
        # Space is back: the next, small message is accepted and durable.
        code, lines = yield deferToThread(self.send, b"Subject: small\r\n\r\nok\r\n")
        self.assertEqual(code, 250, lines)
        queueId = lines[0].split()[-1]
        self.assertEqual(self.leftovers()["incoming"], [queueId])


class ReserveTests(FullSpoolMixin, unittest.TestCase):
    reserve = 1024 * 1024  # more than the whole file system

    @defer.inlineCallbacks
    def test_reserveCheckedAtMail(self):
        code, lines = yield deferToThread(self.send, b"Subject: x\r\n\r\nx\r\n")
        self.assertEqual((code, lines[0][:5]), (452, "4.3.1"))
