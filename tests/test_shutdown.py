"""
Graceful shutdown (issue 5): the listeners close, idle sessions get
C{421 4.3.2}, a session in DATA finishes and gets its C{250} before the
C{421}, a session that does not finish in time is cut without a C{250},
deliveries in flight finish or are cut at their deadline, and nothing that
got a C{250} is lost: it is delivered or still in the spool after restart.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import tempfile
import threading
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.queue.record import readData, readRecord
from relayd.testing import InProcessRelayd, PostfixSink, TestSetup, WireClient
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)


def spooled(setup: TestSetup) -> list[str]:
    directory = os.path.join(setup.spoolPath, "incoming")
    return sorted(os.listdir(directory))


class ShutdownTestCase(unittest.TestCase):
    """Starts relayd in-process with the class's config; no tests of its own."""

    sections: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-shutdown-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, sections=self.sections, modes=("relay",))
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.port = self.relayd.port("relay")

    def client(self):
        c = WireClient(self.port)
        self.addCleanup(c.close)
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        return c

    def inData(self):
        c = self.client()
        assert c.command("MAIL FROM:<a@example.org>")[0] == 250
        assert c.command("RCPT TO:<b@example.net>")[0] == 250
        assert c.command("DATA")[0] == 354
        c.send(b"Subject: shutdown\r\n\r\nfirst part\r\n")
        return c


class SessionShutdownTests(ShutdownTestCase):
    @defer.inlineCallbacks
    def test_idleGets421AndDataFinishes(self):
        idle, mid, inData = yield deferToThread(
            lambda: (self.client(), self.client(), self.inData())
        )
        yield deferToThread(mid.command, "MAIL FROM:<a@example.org>")
        stopping = self.relayd.service.stopService()

        def clients():
            out = {"idle": idle.reply(), "mid": mid.reply()}
            inData.send(b"second part\r\n.\r\n")
            out["data"] = inData.reply()
            out["dataAfter"] = inData.reply()
            out["idleClosed"] = idle.closed()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
                out["newConnection"] = "accepted"
            except OSError:
                out["newConnection"] = "refused"
            return out

        out = yield deferToThread(clients)
        yield stopping
        self.assertEqual(out["idle"][0], 421)
        self.assertTrue(out["idle"][1][0].startswith("4.3.2 "), out["idle"])
        self.assertEqual(out["mid"][0], 421, "a transaction before DATA is not waited for")
        self.assertEqual(out["data"][0], 250, out["data"])
        self.assertEqual(out["dataAfter"][0], 421)
        self.assertTrue(out["idleClosed"])
        self.assertEqual(out["newConnection"], "refused")
        self.assertEqual(len(spooled(self.setup)), 1)


class DeadlineTests(ShutdownTestCase):
    sections = {"timeouts": {"shutdown_sessions": 0.5}}

    @defer.inlineCallbacks
    def test_stalledDataIsCut(self):
        inData = yield deferToThread(self.inData)
        started = time.monotonic()
        yield self.relayd.service.stopService()
        self.assertLess(time.monotonic() - started, 10)
        closed = yield deferToThread(inData.closed)
        self.assertTrue(closed)
        self.assertEqual(spooled(self.setup), [])
        self.assertEqual(os.listdir(os.path.join(self.setup.spoolPath, "tmp")), [])


# --- SIGTERM to a real twistd under load -----------------------------------

CLIENTS = 6
TOKEN = re.compile(rb"X-Shutdown-Token: (\S+)")


def configure(setup: TestSetup, sinkPort: int) -> None:
    setup.routeAllTo(sinkPort)


def tokensIn(texts: list[bytes]) -> set[str]:
    found: set[str] = set()
    for text in texts:
        found.update(t.decode() for t in TOKEN.findall(text))
    return found


def test_sigtermUnderLoadLosesNothing(tmp_path: Path, relaydProcesses) -> None:  # noqa: F811
    """
    Clients send mail as fast as they can to a real C{twistd relayd} that
    delivers to Postfix's smtp-sink, which waits 3 s before answering DATA,
    so deliveries are in flight; SIGTERM arrives mid-load.  relayd must exit
    by itself, in time, with status 0, and every message that got a C{250}
    must have reached the sink or still be in the spool, from where a
    restarted relayd delivers it.  relayd must exit by itself: twistd
    re-raises the SIGTERM after a clean stop.
    """
    # smtp-sink runs as nobody: its dump folder must not be under pytest's
    # private (0700) tmp_path.
    sinkRoot = tempfile.mkdtemp(prefix="relayd-shutdown-sinks-")
    os.chmod(sinkRoot, 0o755)
    os.mkdir(os.path.join(sinkRoot, "slow"))
    os.mkdir(os.path.join(sinkRoot, "fast"))
    slowSink = PostfixSink(os.path.join(sinkRoot, "slow"), extra=("-w", "3"))
    try:
        setup = TestSetup(
            str(tmp_path / "relayd"),
            modes=("relay",),
            portZero=False,
            sections={
                "delivery": {"enabled": True, "retry_initial": 1, "retry_max": 1},
                "timeouts": {"shutdown_sessions": 5, "shutdown_deliveries": 1},
            },
        )
        configure(setup, slowSink.port)
        first = RelaydProcess(setup, tmp_path / "first.log")
        relaydProcesses.append(first)
        first.waitListening()

        accepted: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                token = f"{n}-{i}-{secrets.token_hex(4)}"
                i += 1
                message = (
                    f"Subject: load {token}\r\nX-Shutdown-Token: {token}\r\n\r\n"
                    + "line of text\r\n" * 200
                ).encode()
                try:
                    with smtplib.SMTP("127.0.0.1", first.port, timeout=15) as s:
                        s.sendmail(f"c{n}@example.org", [f"r{n}@example.net"], message)
                except (smtplib.SMTPException, OSError):
                    continue  # refused or cut: not accepted, the client retries
                with lock:
                    accepted.append(token)

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if len(accepted) >= 30:
                    break
            time.sleep(0.05)
        started = time.monotonic()
        first.terminate()
        status = first.wait(timeout=30)
        took = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(20)
        log = first.log(20000)
        # twistd ends a SIGTERM-triggered clean stop by re-raising SIGTERM,
        # which systemd counts as a clean exit.
        assert status in (0, -signal.SIGTERM), log
        assert "Server Shut Down." in log, log
        assert took < 5 + 1 + 10, f"shutdown took {took:.1f}s\n{log}"
        assert len(accepted) >= 30, log
        # The shutdown lines come before one line per delivery cut off, which
        # can be more than the tail above holds: search the whole log.
        assert "shutdown:" in first.log(tail=10**8), log

        delivered = tokensIn(slowSink.messages())
        waiting = set()
        for state in ("incoming", "active", "deferred"):
            for name in os.listdir(os.path.join(setup.spoolPath, state)):
                path = os.path.join(setup.spoolPath, state, name)
                readRecord(path, name)
                waiting |= tokensIn([readData(path)])
        missing = set(accepted) - delivered - waiting
        assert not missing, f"{len(missing)} accepted messages lost\n{log}"
        assert waiting, "no delivery was in flight: the test proved nothing about deliveries"
    finally:
        slowSink.stop()

    # Restart, delivering to a fast sink: what was waiting is delivered.
    fastSink = PostfixSink(os.path.join(sinkRoot, "fast"))
    try:
        with open(setup.configPath) as f:
            text = f.read()
        with open(setup.configPath, "w") as f:
            f.write(text.replace(f"port = {slowSink.port}", f"port = {fastSink.port}"))
        second = RelaydProcess(setup, tmp_path / "second.log")
        relaydProcesses.append(second)
        second.waitListening()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = tokensIn(fastSink.messages())
            if waiting <= got:
                break
            time.sleep(0.2)
        assert waiting <= tokensIn(fastSink.messages()), second.log()
        second.terminate()
        assert second.wait(timeout=30) in (0, -signal.SIGTERM), second.log()
    finally:
        fastSink.stop()
        shutil.rmtree(sinkRoot, True)
