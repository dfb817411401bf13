"""
C{relayctl} against a running relayd: in-process (the whole service tree on
the test's reactor, the command line's L{main} in a thread, or as a separate
process) and against a real C{twistd -n relayd} process.

The next hop is a L{SinkServer} reached through a configured route; it is
not listening at first, so mail is deferred (for an hour) until the test
starts it and flushes.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

import relayd.testing
from relayd.ops import relayctl as ctl
from relayd.ops.control import BUSY, ControlClient, Status
from relayd.testing import (
    DEMO_PASSWORD,
    DNSServer,
    InProcessRelayd,
    PostfixSink,
    SinkServer,
    TestSetup,
    freePort,
)
from relayd.testing.certs import makeCA, makeServerCert

REPO = Path(__file__).resolve().parents[2]
CTL = [sys.executable, "-m", "relayd.ops.relayctl"]

BODY = b"Subject: relayctl test\r\nFrom: app@sender.test\r\n\r\nbody line\r\n.dot line\r\n"


def hopLines(hops: list[dict[str, Any]], domains: tuple[str, ...] = ("*",)) -> str:
    """A [[routes]] table with the given hops, as TOML."""
    lines = ["", "[[routes]]", "domains = [" + ", ".join(f'"{d}"' for d in domains) + "]"]
    for hop in hops:
        lines.append("[[routes.hops]]")
        for key, value in hop.items():
            lines.append(f"{key} = " + (f'"{value}"' if isinstance(value, str) else str(value)))
    return "\n".join(lines) + "\n"


def run(argv: list[str], **kwargs: Any) -> tuple[int, str, str, bytes]:
    """Run L{ctl.main}; return its status, output, errors and raw output."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    err = io.StringIO()
    status = ctl.main(argv, stdout=out, stderr=err, **kwargs)
    out.flush()
    data = raw.getvalue()
    return status, data.decode("utf-8", "replace"), err.getvalue(), data


class RelayctlTestCase(unittest.TestCase):
    """relayd in-process, delivering everything to one sink through a route."""

    delivery: dict[str, Any] = {}
    modes: tuple[str, ...] = ("relay",)
    sections: dict[str, dict[str, Any]] = {}

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = tempfile.mkdtemp(prefix="relayctl-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.sinkPort = freePort()
        self.sink: SinkServer | None = None
        delivery = {
            "enabled": True,
            "retry_initial": 3600,
            "retry_max": 3600,
            "connect_timeout": 5,
            "command_timeout": 60,
            "idle_timeout": 0.5,
        }
        delivery.update(self.delivery)
        sections = {"delivery": delivery, **self.sections}
        self.setup = TestSetup(self.directory, modes=self.modes, sections=sections)
        with open(self.setup.configPath, "a") as f:
            f.write(hopLines([{"host": "127.0.0.1", "port": self.sinkPort, "tls": "none"}]))
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.stopRelayd)

    def stopRelayd(self) -> Any:
        return self.relayd.stop()

    def startSink(self, **options: Any) -> SinkServer:
        sink = SinkServer()
        for name, value in options.items():
            setattr(sink, name, value)
        sink.start(reactor, port=self.sinkPort)
        self.addCleanup(sink.stop)
        self.sink = sink
        return sink

    @property
    def socketPath(self) -> str:
        return os.path.join(self.setup.spoolPath, "control.sock")

    def ctl(self, *args: str, **kwargs: Any) -> defer.Deferred[tuple[int, str, str, bytes]]:
        return deferToThread(run, ["--config", self.setup.configPath, *args], **kwargs)

    def send(
        self, recipients: list[str], sender: str = "app@sender.test", body: bytes = BODY
    ) -> defer.Deferred[Any]:
        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=30) as s:
                return s.sendmail(sender, recipients, body)

        return deferToThread(send)

    @defer.inlineCallbacks
    def waitFor(self, condition: Any, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail("condition not met in time")
            yield deferLater(reactor, 0.05, lambda: None)

    def inState(self, state: str) -> list[str]:
        return self.relayd.spool.entries(state)

    @defer.inlineCallbacks
    def deferred(self, *recipientLists: list[str], **kwargs: Any) -> Any:
        """Send one message per list; wait until all are deferred; their ids."""
        before = set(self.inState("deferred"))
        for recipients in recipientLists:
            yield self.send(recipients, **kwargs)
        count = len(before) + len(recipientLists)
        yield self.waitFor(lambda: len(self.inState("deferred")) == count)
        return [i for i in self.inState("deferred") if i not in before]

    def gone(self, queueId: str) -> bool:
        """The message has left the queue, and no attempt is under way."""
        return not self.relayd.service.scheduler.isDelivering(queueId) and not any(
            queueId in self.inState(state) for state in ("incoming", "active", "deferred")
        )

    def envelopeFiles(self) -> dict[str, bytes]:
        """Every file under the spool's state directories, by path."""
        found = {}
        for name in ("incoming", "active", "deferred", "hold", "corrupt"):
            directory = os.path.join(self.setup.spoolPath, name)
            for entry in sorted(os.listdir(directory)):
                with open(os.path.join(directory, entry), "rb") as f:
                    found[f"{name}/{entry}"] = f.read()
        return found


# --- the socket ------------------------------------------------------------------


class SocketTests(RelayctlTestCase):
    def test_modeAndUmask(self) -> None:
        """
        The socket is in the spool, mode 0600 (the relayd user and root),
        and the process umask is as it was.
        """
        st = os.lstat(self.socketPath)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(st.st_uid, os.geteuid())
        umask = os.umask(0o022)
        os.umask(umask)
        self.assertNotEqual(umask, 0o177)

    @defer.inlineCallbacks
    def test_removedAtStopStaleReplaced(self) -> Any:
        """
        Stopping removes the socket; a stale one (nothing listening, as
        after SIGKILL) is replaced at the next start.
        """
        yield self.relayd.stop()
        self.assertFalse(os.path.exists(self.socketPath))
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.socketPath)
        stale.close()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.socketPath).st_mode))
        self.relayd = yield InProcessRelayd.start(self.setup)
        status, out, err, _ = yield self.ctl("status")
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn("relay ", out)

    @defer.inlineCallbacks
    def test_longPath(self) -> Any:
        """
        A socket path longer than a UNIX socket address can hold still works
        (reached through the directory's descriptor).
        """
        yield self.relayd.stop()
        deep = os.path.join(self.directory, "d" * 60, "e" * 60)
        os.makedirs(deep)
        path = os.path.join(deep, "control.sock")
        self.assertGreater(len(path), 108)
        with open(self.setup.configPath, "a") as f:
            f.write(f'\n[control]\nsocket = "{path}"\n')
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.assertEqual(stat.S_IMODE(os.lstat(path).st_mode), 0o600)
        status, out, err, _ = yield self.ctl("status", "--json")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(json.loads(out)["pid"], os.getpid())
        yield self.relayd.stop()
        self.assertFalse(os.path.exists(path))

    @defer.inlineCallbacks
    def test_otherUserHungUpOn(self) -> Any:
        """
        Even when the file permissions let another user in, the daemon hangs
        up on a client that is neither root nor the relayd user.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to run a client as another user")
        os.chmod(self.directory, 0o711)
        os.chmod(self.setup.spoolPath, 0o711)
        os.chmod(self.socketPath, 0o666)
        box = Status.makeArguments({}, None)
        box[b"_command"], box[b"_ask"] = b"Status", b"1"
        code = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(20)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(bytes.fromhex(sys.argv[2])); print(repr(s.recv(100)))\n"
            "except (BrokenPipeError, ConnectionResetError):\n"
            "    print('closed')\n"
        )

        # The test's own interpreter may live where nobody cannot reach.
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

        def asNobody() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [python, "-I", "-S", "-c", code, self.socketPath, box.serialize().hex()],
                user=65534,
                capture_output=True,
                text=True,
                timeout=60,
            )

        result = yield deferToThread(asNobody)
        self.assertIn(result.stdout.strip(), ("b''", "closed"), result)
        # The relayd user itself still gets its answer.
        status, _, err, _ = yield self.ctl("status")
        self.assertEqual((status, err), (0, ""))


# --- queue -------------------------------------------------------------------------


class QueueTests(RelayctlTestCase):
    @defer.inlineCallbacks
    def test_listAndShow(self) -> Any:
        """
        C{queue list}: one line per message with id, state, size, sender,
        recipients with their state and last reply; C{--json} the same as
        data.  C{queue show}: envelope and headers; C{--body}: the message
        exactly as stored.
        """
        first, second = yield self.deferred(
            ["bob@example.net", "carol@example.org"], ["dave@example.net"]
        )
        status, out, err, _ = yield self.ctl("queue", "list")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("QUEUE ID"), out)
        [line] = [one for one in lines if one.startswith(first)]
        self.assertIn(" deferred ", line)
        self.assertIn("<app@sender.test> -> bob@example.net deferred (451 4.4.1 connect to", line)
        self.assertIn("carol@example.org deferred", line)
        self.assertIn("Connection refused", line)
        size = len(self.relayd.spool.readData(first))
        self.assertEqual(self.relayd.spool.load(first)[0].size, size)
        self.assertIn(f" {size} ", line)
        self.assertTrue(any(one.startswith(second) for one in lines))
        self.assertEqual(lines[-1], f"-- 2 messages, {self.size(first, second)} octets: deferred 2")

        status, out, err, _ = yield self.ctl("queue", "list", "--json")
        entries = json.loads(out)
        self.assertEqual([e["queue_id"] for e in entries], [first, second])
        self.assertEqual(entries[0]["state"], "deferred")
        self.assertEqual(entries[0]["size"], size)
        self.assertEqual(
            [(r["address"], r["state"], r["attempts"]) for r in entries[0]["recipients"]],
            [("bob@example.net", "deferred", 1), ("carol@example.org", "deferred", 1)],
        )
        self.assertGreater(entries[0]["next_attempt"], time.time() + 3000)

        status, out, err, _ = yield self.ctl("queue", "show", first.lower())
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"queue id:   {first}", out)
        self.assertIn("sender:     <app@sender.test>", out)
        self.assertIn("recipient:  bob@example.net deferred, 1 attempt, last reply: 451", out)
        self.assertIn("Subject: relayctl test\r\n", out)
        self.assertNotIn("body line", out)

        status, _, err, raw = yield self.ctl("queue", "show", first, "--body")
        stored = self.relayd.spool.readData(first)
        self.assertTrue(stored.endswith(BODY))
        self.assertTrue(raw.endswith(b"\n\n" + stored), raw)

        status, _, err, _ = yield self.ctl("queue", "show", "0NOSUCHID")
        self.assertEqual(status, 1)
        self.assertEqual(err, "relayctl: 0NOSUCHID: no such message in the queue\n")
        status, _, err, _ = yield self.ctl("queue", "show", "not/an/id")
        self.assertEqual(status, 2)
        self.assertEqual(err.count("\n"), 1)

    def size(self, *queueIds: str) -> int:
        return sum(len(self.relayd.spool.readData(i)) for i in queueIds)

    @defer.inlineCallbacks
    def test_emptyAndLongQueue(self) -> Any:
        """
        An empty queue says so; a queue longer than one page of the
        protocol comes whole and in order.
        """
        status, out, _, _ = yield self.ctl("queue", "list")
        self.assertEqual((status, out), (0, "Mail queue is empty\n"))
        self.patch(ctl, "PAGE", 2)
        ids = yield self.deferred(*[[f"r{i}@example.net"] for i in range(5)])
        status, out, _, _ = yield self.ctl("queue", "list", "--json")
        self.assertEqual([e["queue_id"] for e in json.loads(out)], sorted(ids))

    @defer.inlineCallbacks
    def test_flush(self) -> Any:
        """
        C{queue flush ID} attempts that message now, despite its hour of
        backoff; C{queue flush} attempts all.
        """
        one, two, three = yield self.deferred(
            ["a@example.net"], ["b@example.net"], ["c@example.net"]
        )
        sink = self.startSink()
        status, out, err, _ = yield self.ctl("queue", "flush", one)
        self.assertEqual((status, out, err), (0, f"{one}: to be attempted now\n", ""))
        yield self.waitFor(lambda: len(sink.messages) == 1)
        self.assertEqual(sink.messages[0].recipients, ["a@example.net"])
        yield self.waitFor(lambda: self.gone(one))
        self.assertEqual(self.inState("deferred"), [two, three])

        status, out, err, _ = yield self.ctl("queue", "flush")
        self.assertEqual((status, out, err), (0, "2 messages to be attempted now\n", ""))
        yield self.waitFor(lambda: len(sink.messages) == 3)
        yield self.waitFor(lambda: not self.inState("deferred") and not self.inState("active"))

        status, _, err, _ = yield self.ctl("queue", "flush", one)
        self.assertEqual((status, err), (1, f"relayctl: {one}: no such message in the queue\n"))

    @defer.inlineCallbacks
    def test_holdAndRelease(self) -> Any:
        """
        A held message moves to hold/ and is not delivered by a flush of
        everything; released, it is attempted at once.
        """
        held, _other = yield self.deferred(["a@example.net"], ["b@example.net"])
        status, out, err, _ = yield self.ctl("queue", "hold", held)
        self.assertEqual((status, out, err), (0, f"{held}: on hold\n", ""))
        self.assertEqual(self.inState("hold"), [held])
        status, out, _, _ = yield self.ctl("queue", "hold", held)
        self.assertEqual((status, out), (0, f"{held}: already on hold\n"))

        sink = self.startSink()
        status, out, _, _ = yield self.ctl("queue", "flush")
        self.assertEqual(out, "1 message to be attempted now, 1 on hold (not flushed)\n")
        status, _, err, _ = yield self.ctl("queue", "flush", held)
        self.assertEqual(status, 1)
        self.assertIn("on hold; release it first", err)
        yield self.waitFor(lambda: not self.inState("deferred") and not self.inState("active"))
        self.assertEqual([m.recipients for m in sink.messages], [["b@example.net"]])
        self.assertEqual(self.inState("hold"), [held])
        status, out, _, _ = yield self.ctl("queue", "list")
        self.assertIn(f"{held}  hold ", out)

        status, out, err, _ = yield self.ctl("queue", "release", held)
        self.assertEqual((status, out, err), (0, f"{held}: released\n", ""))
        yield self.waitFor(lambda: len(sink.messages) == 2)
        self.assertEqual(sink.messages[1].recipients, ["a@example.net"])
        yield self.waitFor(lambda: not any(map(self.inState, ("hold", "deferred", "active"))))
        status, out, _, _ = yield self.ctl("queue", "release", "--all")
        self.assertEqual((status, out), (0, "no queued message matched\n"))

    @defer.inlineCallbacks
    def test_delete(self) -> Any:
        """
        C{queue delete ID...}, and C{--all} narrowed by C{--from} and C{--to}
        (a domain or an address still to be delivered to).
        """
        a, b, c, d = yield self.deferred(
            ["x@example.net"],
            ["y@example.org", "z@EXAMPLE.net"],
            ["w@example.org"],
            ["v@example.com"],
        )
        e = (yield self.deferred(["u@example.com"], sender="other@sender.test"))[0]
        status, out, err, _ = yield self.ctl("queue", "delete", a)
        self.assertEqual((status, out, err), (0, f"{a}: deleted\n", ""))
        self.assertRaises(KeyError, self.relayd.spool.load, a)

        status, out, _, _ = yield self.ctl("queue", "delete", "--all", "--to", "example.NET")
        self.assertEqual((status, out), (0, f"{b}: deleted\n"))
        status, out, _, _ = yield self.ctl(
            "queue", "delete", "--all", "--from", "Other@Sender.test", "--to", "example.com"
        )
        self.assertEqual((status, out), (0, f"{e}: deleted\n"))
        status, out, _, _ = yield self.ctl("queue", "delete", "--all", "--to", "w@example.org")
        self.assertEqual((status, out), (0, f"{c}: deleted\n"))
        self.assertEqual(self.inState("deferred"), [d])

        status, out, err, _ = yield self.ctl("queue", "delete", a, d)
        self.assertEqual(status, 1)
        self.assertEqual(out, f"{d}: deleted\n")
        self.assertEqual(err, f"relayctl: {a}: no such message in the queue\n")
        for state in ("incoming", "active", "deferred", "hold"):
            self.assertEqual(os.listdir(os.path.join(self.setup.spoolPath, state)), [])

    @defer.inlineCallbacks
    def test_usage(self) -> Any:
        """Usage errors: exit status 2 and one line."""
        for args in (
            ("queue", "delete"),
            ("queue", "delete", "--all", "ABC"),
            ("queue", "hold", "--to", "example.net"),
            ("queue", "frobnicate"),
            ("queue",),
            (),
            ("status", "--timeout", "soon"),
        ):
            status, out, err, _ = yield self.ctl(*args)
            self.assertEqual(status, 2, (args, err))
            self.assertEqual(err.count("\n"), 1, err)
            self.assertTrue(err.startswith("relayctl: "), err)
            self.assertEqual(out, "")

    @defer.inlineCallbacks
    def test_messageInDeliveryUntouched(self) -> Any:
        """
        A message being delivered right now (in active/, its envelope about
        to be rewritten by the attempt) is not held or deleted: relayctl
        says so and fails, and not one byte of the spool changes.  Once the
        attempt is over, the hold works.
        """
        sink = self.startSink(hang=True)
        yield self.send(["a@example.net"])
        yield self.waitFor(lambda: sink.openConnections == 1 and self.inState("active"))
        [queueId] = self.inState("active")
        before = self.envelopeFiles()

        status, out, _, _ = yield self.ctl("queue", "list")
        self.assertIn(f"{queueId}  delivering ", out)
        for action in ("hold", "delete"):
            status, out, err, _ = yield self.ctl("queue", action, queueId)
            self.assertEqual((status, out), (1, ""))
            self.assertEqual(err, f"relayctl: {queueId}: {BUSY}\n")
        status, out, _, _ = yield self.ctl("queue", "delete", "--all")
        self.assertEqual(status, 1)
        status, out, _, _ = yield self.ctl("queue", "flush", queueId)
        self.assertEqual((status, out), (0, f"{queueId}: being delivered already\n"))
        self.assertEqual(self.envelopeFiles(), before)

        yield sink.stop()  # the attempt ends: connection lost, deferred
        yield self.waitFor(lambda: self.inState("deferred") == [queueId])
        status, out, _, _ = yield self.ctl("queue", "hold", queueId)
        self.assertEqual((status, out), (0, f"{queueId}: on hold\n"))

    @defer.inlineCallbacks
    def test_daemonDown(self) -> Any:
        """
        With relayd stopped, list and show read the spool directly (saying
        so on stderr); changes fail, and the spool is left as it was.
        """
        [queueId] = yield self.deferred(["a@example.net"])
        yield self.relayd.stop()
        before = self.envelopeFiles()
        status, out, err, _ = yield self.ctl("queue", "list")
        self.assertEqual(status, 0)
        self.assertIn(f"{queueId}  deferred ", out)
        self.assertEqual(err.count("\n"), 1)
        self.assertIn("relayd is not running", err)
        self.assertIn("reading the spool", err)
        status, out, _, _ = yield self.ctl("queue", "show", queueId)
        self.assertEqual(status, 0)
        self.assertIn("Subject: relayctl test", out)

        for args in (
            ("queue", "flush"),
            ("queue", "hold", queueId),
            ("queue", "delete", queueId),
            ("queue", "release", "--all"),
            ("reload",),
            ("status",),
        ):
            status, out, err, _ = yield self.ctl(*args)
            self.assertEqual((status, out), (1, ""), args)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertIn("needs the running daemon", err)
        self.assertEqual(self.envelopeFiles(), before)

        shutil.rmtree(self.setup.spoolPath)
        status, _, err, _ = yield self.ctl("queue", "list")
        self.assertEqual(status, 1)
        self.assertIn("holds no spool", err)


class DisabledDeliveryTests(RelayctlTestCase):
    delivery = {"enabled": False}

    @defer.inlineCallbacks
    def test_holdReleaseDeleteWithoutScheduler(self) -> Any:
        """
        Without delivery there is nothing to flush; hold, release and delete
        still work on the spool.
        """
        yield self.send(["a@example.net"])
        yield self.waitFor(lambda: self.inState("incoming"))
        [queueId] = self.inState("incoming")
        status, _, err, _ = yield self.ctl("queue", "flush")
        self.assertEqual(status, 1)
        self.assertIn("delivery is disabled", err)
        status, out, _, _ = yield self.ctl("queue", "hold", queueId)
        self.assertEqual((status, self.inState("hold")), (0, [queueId]))
        status, out, _, _ = yield self.ctl("queue", "release", queueId)
        self.assertEqual((status, self.inState("incoming")), (0, [queueId]))
        status, out, _, _ = yield self.ctl("queue", "release", queueId)
        self.assertEqual((status, out), (0, f"{queueId}: not on hold (incoming)\n"))
        status, out, _, _ = yield self.ctl("status")
        self.assertIn("delivery:    disabled", out)
        status, out, _, _ = yield self.ctl("queue", "delete", "--all")
        self.assertEqual((status, out), (0, f"{queueId}: deleted\n"))


# --- status and reload ----------------------------------------------------------------


class StatusReloadTests(RelayctlTestCase):
    modes = ("relay", "submission")

    @defer.inlineCallbacks
    def test_status(self) -> Any:
        """
        Uptime, the listeners with their bound addresses and connections,
        queue counts by state.
        """
        yield self.deferred(["a@example.net"])
        client = yield deferToThread(
            socket.create_connection, ("127.0.0.1", self.relayd.port("submission")), 10
        )
        self.addCleanup(client.close)
        yield self.waitFor(lambda: len(self.relayd.sessions) == 1)
        status, out, err, _ = yield self.ctl("status")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith(f"relayd 0.1.0, pid {os.getpid()}, up "), out)
        relayPort, submissionPort = self.relayd.port("relay"), self.relayd.port("submission")
        self.assertIn(f"  relay          relay        127.0.0.1:{relayPort}", out)
        self.assertRegex(
            out, rf"submission +submission +127.0.0.1:{submissionPort} +1 connection\n"
        )
        self.assertIn("connections: 1 (limit 1000)", out)
        self.assertIn("queue:       incoming 0, active 0, deferred 1, hold 0, corrupt 0", out)
        self.assertIn("delivery:    on, 0 being delivered now", out)
        # The commit journal, synced through Linux AIO here (relayd.queue.aio).
        self.assertIn(f"spool:       {self.relayd.spool.directory} (journal: aio)", out)
        status, out, _, _ = yield self.ctl("status", "--json")
        data = json.loads(out)
        self.assertEqual(data["journal"], "aio")
        self.assertEqual(data["queue"]["deferred"], 1)
        self.assertEqual(data["connections"], 1)
        self.assertLessEqual(data["started"], data["now"])

    def chainNow(self) -> list[str]:
        return list(self.relayd.service.factories[0].chain.names)

    @defer.inlineCallbacks
    def test_reload(self) -> Any:
        """
        C{reload} puts a new config in force and says so; a broken one is
        refused with the config error, and the old one stays.
        """
        self.assertEqual(self.chainNow(), ["mynetworks", "authenticated"])
        with open(self.setup.configPath) as f:
            original = f.read()
        with open(self.setup.configPath, "w") as f:
            f.write(
                original.replace(
                    'chain = ["mynetworks", "authenticated"]', 'chain = ["mynetworks"]'
                )
            )
        status, out, err, _ = yield self.ctl("reload")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, "reloaded: the new config is in force (policy chain: mynetworks)\n")
        self.assertEqual(self.chainNow(), ["mynetworks"])

        with open(self.setup.configPath, "a") as f:
            f.write('\n[policies.mynetworks]\nnetworks = ["not a network"]\n')
        status, out, err, _ = yield self.ctl("reload")
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(
            err.startswith(
                "relayctl: reload refused, the old config stays in force: "
                f"{self.setup.configPath}: policies.mynetworks.networks: "
            ),
            err,
        )
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.chainNow(), ["mynetworks"])

        with open(self.setup.configPath, "a") as f:
            f.write("\n[spool\n")
        status, _, err, _ = yield self.ctl("reload")
        self.assertEqual(status, 1)
        self.assertIn("not valid TOML", err)


# --- passwd ----------------------------------------------------------------------------


class PasswdTests(RelayctlTestCase):
    modes = ("relay", "submission")
    # test_stdinThenLogin logs in again and again (smtplib: PLAIN, then
    # LOGIN) until relayd has reloaded the users file; those failures are
    # not password guessing, so no lockout across connections here.
    sections = {"auth": {"user_failure_limit": 0, "client_failure_limit": 0}}

    def login(self, user: str, password: str) -> Any:
        def login() -> Any:
            with smtplib.SMTP("127.0.0.1", self.relayd.port("submission"), timeout=30) as s:
                s.starttls(context=self.setup.clientContext())
                return s.login(user, password)[0]

        return deferToThread(login)

    @defer.inlineCallbacks
    def test_stdinThenLogin(self) -> Any:
        """
        C{passwd --stdin USER} sets the password in the config's users file;
        the running relayd accepts it for AUTH within a second or so.
        """
        status, out, err, _ = yield self.ctl(
            "passwd", "--rounds", "4", "--stdin", "alice", stdin=io.BytesIO(b"s3cret pass\n")
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"alice: password set in {self.setup.usersPath}\n")
        deadline = time.monotonic() + 20
        while True:
            try:
                code = yield self.login("alice", "s3cret pass")
                break
            except smtplib.SMTPAuthenticationError:
                if time.monotonic() > deadline:
                    raise
                yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(code, 235)
        code = yield self.login("demo", DEMO_PASSWORD)
        self.assertEqual(code, 235)

    @defer.inlineCallbacks
    def test_askedTwiceWithoutEcho(self) -> Any:
        """
        On a terminal the password is asked twice with echo off: nothing
        typed shows on the terminal (a real pty, relayctl as a process).
        """
        result = yield deferToThread(self.passwdOnTerminal, "typed-secret", "typed-secret")
        status, output = result
        self.assertEqual(status, 0, output)
        self.assertIn(b"New password:", output)
        self.assertIn(b"Retype new password:", output)
        self.assertNotIn(b"typed-secret", output)
        with open(self.setup.usersPath, "rb") as f:
            self.assertIn(b"\nbob:$2b$04$", f.read())

        result = yield deferToThread(self.passwdOnTerminal, "one", "two")
        self.assertEqual(result[0], 1)
        self.assertIn(b"relayctl: the passwords do not match", result[1])

    def passwdOnTerminal(self, first: str, second: str) -> tuple[int, bytes]:
        master, slave = pty.openpty()
        try:
            process = subprocess.Popen(
                [*CTL, "--config", self.setup.configPath, "passwd", "--rounds", "4", "bob"],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                cwd=REPO,
            )
        finally:
            os.close(slave)
        output = b""
        answers = [first, second]
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 4096)
                    except OSError:  # EIO: the other side is gone
                        break
                    if not chunk:
                        break
                    output += chunk
                    # One answer per prompt, once the prompt is out (getpass
                    # turns echo off before it writes the prompt).
                    if answers and output.count(b"password: ") > 2 - len(answers):
                        os.write(master, answers.pop(0).encode() + b"\n")
                elif process.poll() is not None:
                    break
            return process.wait(30), output
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(master)

    @defer.inlineCallbacks
    def test_failures(self) -> Any:
        """A bad user name is a usage error; an empty password a failure."""
        status, _, err, _ = yield self.ctl("passwd", "--stdin", "a:b", stdin=io.BytesIO(b"x\n"))
        self.assertEqual(status, 2)
        self.assertIn("':'", err)
        status, _, err, _ = yield self.ctl("passwd", "--stdin", "ann", stdin=io.BytesIO(b"\n"))
        self.assertEqual((status, err), (1, "relayctl: password is empty\n"))

        with open(self.setup.configPath) as f:
            text = f.read()
        bare = os.path.join(self.directory, "bare.toml")
        with open(bare, "w") as f:
            f.write(text.replace('users_file = "users"', ""))
        status, _, err, _ = yield deferToThread(
            run, ["--config", bare, "passwd", "--stdin", "x"], stdin=io.BytesIO(b"pw\n")
        )
        self.assertEqual(status, 1)
        self.assertIn("auth.users_file is not set", err)


# --- check-config ------------------------------------------------------------------------


class CheckConfigTests(RelayctlTestCase):
    @defer.inlineCallbacks
    def test_validates(self) -> Any:
        """
        A good config passes; mistakes give the same one line as relayd's
        startup (config errors found while building the service included).
        """
        status, out, err, _ = yield self.ctl("check-config")
        self.assertEqual((status, out, err), (0, f"{self.setup.configPath}: config OK\n", ""))

        with open(self.setup.configPath) as f:
            text = f.read()
        cases = {
            "policy.toml": (
                text + '\n[policies.mynetworks]\nnetworks = ["300.1.2.3/8"]\n',
                "policies.mynetworks.networks: ",
            ),
            "chain.toml": (
                text.replace('"mynetworks", "authenticated"', '"mynetworks", "nosuchpolicy"'),
                "policy.chain: unknown policy 'nosuchpolicy'",
            ),
            "cert.toml": (
                text.replace('certificate = "cert.pem"', 'certificate = "missing.pem"'),
                "tls.certificate: file not found",
            ),
            "badcert.toml": (
                text.replace('certificate = "cert.pem"', 'certificate = "users"'),
                "tls.certificate: ",
            ),
        }
        for name, (content, expected) in cases.items():
            path = os.path.join(self.directory, name)
            with open(path, "w") as f:
                f.write(content)
            status, out, err, _ = yield self.ctl("check-config", path)
            self.assertEqual((status, out), (1, ""), name)
            self.assertTrue(err.startswith(f"relayctl: config error: {path}: "), err)
            self.assertIn(expected, err)
            self.assertEqual(err.count("\n"), 1, err)
        status, _, err, _ = yield self.ctl("check-config", os.path.join(self.directory, "nope"))
        self.assertEqual(status, 1)
        self.assertIn("config file not found", err)


class LiveCheckTests(unittest.TestCase):
    """
    C{check-config --live} against real upstreams: L{SinkServer}s that
    demand STARTTLS and AUTH, named through a real DNS server.
    """

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = tempfile.mkdtemp(prefix="relayctl-live-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.dns = DNSServer(ttl=1)
        self.dnsPort = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        ca = makeCA(self.directory, "upstream CA")
        self.caPath = ca.path
        other = makeCA(self.directory, "someone else")
        self.options = {}
        for name, issuer in (("good.test", ca), ("bad.test", ca), ("fake.test", other)):
            self.options[name] = makeServerCert(issuer, self.directory, name, ()).serverOptions()
            self.dns.setA(name, ["127.0.0.1"])
        self.sinks = {}
        for name in self.options:
            sink = SinkServer()
            sink.start(reactor, tlsOptions=self.options[name], users={"relay": "upstream secret"})
            self.addCleanup(sink.stop)
            self.sinks[name] = sink
        yield defer.succeed(None)

    def config(self, hops: list[dict[str, Any]]) -> str:
        setup = TestSetup(
            os.path.join(self.directory, "relayd"),
            modes=("relay",),
            sections={
                "delivery": {
                    "enabled": True,
                    "ca_file": self.caPath,
                    "resolvers": ["127.0.0.1"],
                    "resolver_port": self.dnsPort,
                    "dns_timeout": 5,
                }
            },
        )
        for i, hop in enumerate(hops):
            with open(setup.configPath, "a") as f:
                f.write(hopLines([hop], (f"d{i}.example",)))
        return setup.configPath

    def hop(self, name: str, password: str = "upstream secret") -> dict[str, Any]:
        return {
            "host": name,
            "port": self.sinks[name].port,
            "tls": "verify",
            "username": "relay",
            "password": password,
        }

    @defer.inlineCallbacks
    def test_goodAndWrongPassword(self) -> Any:
        """
        Per upstream: connect, greeting, EHLO, STARTTLS with the verified
        certificate, AUTH; a wrong password fails at AUTH and makes the exit
        status 1.  Nothing is sent.
        """
        path = self.config([self.hop("good.test"), self.hop("bad.test", "wrong")])
        status, out, err, _ = yield deferToThread(run, ["check-config", path, "--live"])
        self.assertEqual(status, 1, out + err)
        good, bad = self.sinks["good.test"].port, self.sinks["bad.test"].port
        self.assertIn(
            f"upstream route 0 hop 0 (good.test:{good}), for d0.example: tls=verify, "
            "auth as relay [127.0.0.1]\n"
            f"  connect   ok: 127.0.0.1:{good}\n"
            "  greeting  ok\n"
            "  EHLO      ok\n"
            "  STARTTLS  ok: TLSv1.",
            out,
        )
        self.assertIn("certificate verified for good.test\n  AUTH      ok\n", out)
        self.assertIn(
            "  STARTTLS  ok: TLSv1.",
            out.split(f"(bad.test:{bad})")[1],
        )
        self.assertIn("  AUTH      FAILED: 4", out)
        self.assertIn("535 5.7.8", out)
        self.assertEqual(
            err, f"relayctl: 1 of 2 upstreams failed: route 1 hop 0 (bad.test:{bad}) [127.0.0.1]\n"
        )
        self.assertEqual(self.sinks["good.test"].users, {"relay": "upstream secret"})
        for sink in self.sinks.values():
            self.assertNotIn("MAIL", sink.verbs())
        self.assertIn("AUTH", self.sinks["good.test"].verbs())
        yield self.waitClosed()

    @defer.inlineCallbacks
    def waitClosed(self) -> Any:
        deadline = time.monotonic() + 30
        while any(s.openConnections for s in self.sinks.values()):
            self.assertLess(time.monotonic(), deadline)
            yield deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_allGood(self) -> Any:
        path = self.config([self.hop("good.test")])
        status, out, err, _ = yield deferToThread(run, ["check-config", path, "--live"])
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.endswith("all 1 upstream OK\n"), out)
        yield self.waitClosed()

    @defer.inlineCallbacks
    def test_asProcessBadCertificateAndNoName(self) -> Any:
        """
        As a separate process (running its own reactor): a certificate from
        another CA fails at STARTTLS, a name that does not resolve at
        resolve, a refused connection at connect.
        """
        path = self.config(
            [
                self.hop("good.test"),
                self.hop("fake.test"),
                dict(self.hop("good.test"), host="nowhere.test"),
                dict(self.hop("good.test"), host="127.0.0.1", tls="required", port=freePort()),
            ]
        )

        def check() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*CTL, "check-config", "--live", "--config", path],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )

        result = yield deferToThread(check)
        self.assertEqual(result.returncode, 1, result)
        out = result.stdout
        self.assertIn("certificate verified for good.test\n  AUTH      ok\n", out)
        fake = out.split("(fake.test:")[1]
        self.assertIn("  EHLO      ok\n  STARTTLS  FAILED: 451 4.7.5 TLS handshake", fake)
        self.assertIn("  resolve   FAILED: ", out.split("(nowhere.test:")[1])
        self.assertIn("  connect   FAILED: 127.0.0.1:", out.split("hop 0 (127.0.0.1:")[1])
        self.assertTrue(result.stderr.startswith("relayctl: 3 of 4 upstreams failed: "))
        self.assertEqual(result.stderr.count("\n"), 1)
        yield self.waitClosed()


# --- a real twistd --------------------------------------------------------------------


def ctlProcess(config: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CTL, "--config", config, *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def waitUntil(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_twistdStatusListFlushReload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Against a real C{twistd -n relayd}: status, queue list, flush to a real
    next hop (Postfix's smtp-sink) once it is up, reload; at exit the
    socket is gone.
    """
    hopPort = freePort()
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={"delivery": {"enabled": True, "retry_initial": 3600, "retry_max": 3600}},
    )
    with open(setup.configPath, "a") as f:
        f.write(hopLines([{"host": "127.0.0.1", "port": hopPort, "tls": "none"}]))
    code = (
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', "
        f"{setup.configPath!r}]; run()"
    )
    log = open(tmp_path / "relayd.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    socketPath = os.path.join(setup.spoolPath, "control.sock")
    sink = None
    try:
        waitUntil(lambda: os.path.exists(socketPath) or process.poll() is not None, "the socket")
        assert process.poll() is None, (tmp_path / "relayd.log").read_text()

        with smtplib.SMTP("127.0.0.1", setup.ports["relay"], timeout=30) as s:
            s.sendmail("app@sender.test", ["bob@example.net"], BODY)

        def listed() -> list[dict[str, Any]]:
            result = ctlProcess(setup.configPath, "queue", "list", "--json")
            assert result.returncode == 0, result
            entries: list[dict[str, Any]] = json.loads(result.stdout)
            return entries

        waitUntil(lambda: [e["state"] for e in listed()] == ["deferred"], "a deferred message")
        [entry] = listed()
        result = ctlProcess(setup.configPath, "queue", "list")
        assert result.returncode == 0 and entry["queue_id"] in result.stdout, result

        result = ctlProcess(setup.configPath, "status")
        assert result.returncode == 0, result
        assert f"pid {process.pid}, up " in result.stdout
        assert f"127.0.0.1:{setup.ports['relay']}" in result.stdout
        assert "deferred 1," in result.stdout

        monkeypatch.setattr(relayd.testing, "freePort", lambda: hopPort)
        # Not under tmp_path: smtp-sink runs as nobody, and pytest's
        # directories are private to root.
        sinkDirectory = tempfile.mkdtemp(prefix="relayctl-sink-")
        sink = PostfixSink(sinkDirectory)
        result = ctlProcess(setup.configPath, "queue", "flush")
        assert (result.returncode, result.stdout) == (0, "1 message to be attempted now\n"), result
        waitUntil(lambda: listed() == [], "delivery")
        [dump] = sink.messages()
        assert b"bob@example.net" in dump and b"body line" in dump

        result = ctlProcess(setup.configPath, "reload")
        assert result.returncode == 0, result
        assert "the new config is in force" in result.stdout

        with ControlClient(socketPath) as client:
            assert client.call(Status)["status"]["pid"] == process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
            if sink is not None:
                sink.stop()
                shutil.rmtree(sinkDirectory, True)
    # twistd ends a SIGTERM shutdown by re-raising the signal.
    assert status in (0, -signal.SIGTERM), (tmp_path / "relayd.log").read_text()
    assert "Server Shut Down." in (tmp_path / "relayd.log").read_text()
    assert not os.path.exists(socketPath)
    result = ctlProcess(setup.configPath, "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"relayctl: relayd is not running (nothing listens on {socketPath}): "
        "relayctl status needs the running daemon\n"
    )


def runTwistd(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "relayd",
            "--config",
            config,
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_socketPathProblemsStopStartup(tmp_path: Path) -> None:
    """
    A control socket path that is a regular file, or a socket another
    process listens on, stops startup with one line naming the key.
    """
    setup = TestSetup(str(tmp_path), modes=("relay",))
    os.makedirs(setup.spoolPath)
    path = os.path.join(setup.spoolPath, "control.sock")
    with open(path, "w") as f:
        f.write("not a socket")
    result = runTwistd(setup.configPath)
    output = result.stdout + result.stderr
    assert result.returncode == 1, result
    assert "Traceback" not in output
    [line] = [one for one in output.splitlines() if "relayd: " in one]
    assert line.endswith(
        f"relayd: {setup.configPath}: control.socket: {path} exists and is not a socket"
    ), output

    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(path)
        busy.listen()
        result = runTwistd(setup.configPath)
    assert result.returncode == 1, result
    assert f"control.socket: {path} is in use by another process" in result.stdout, result
    assert os.path.exists(path)


def test_consoleScript() -> None:
    """C{relayctl} is installed as a console script running L{ctl.main}."""
    from importlib.metadata import entry_points

    [script] = [ep for ep in entry_points(group="console_scripts") if ep.name == "relayctl"]
    assert script.value == "relayd.ops.relayctl:main"
    result = subprocess.run([*CTL, "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0
    for command in ("status", "queue", "reload", "check-config", "passwd"):
        assert command in result.stdout


# --- without a daemon at all --------------------------------------------------------


def test_configProblems(tmp_path: Path) -> None:
    """
    relayctl reads only what it needs from the config, resolving relative
    paths against its directory; what it cannot read is one line, status 1.
    """
    config = tmp_path / "relayd.toml"
    config.write_text('[spool]\ndirectory = "spool"\n[control]\nsocket = "run/ctl.sock"\n')
    status, _, err, _ = run(["--config", str(config), "status"])
    assert status == 1
    assert err == (
        f"relayctl: relayd is not running (nothing listens on {tmp_path}/run/ctl.sock): "
        "relayctl status needs the running daemon\n"
    )
    for content, expected in (
        ("[spool\n", "not valid TOML"),
        ("[server]\n", "spool.directory: missing (required)"),
        ("[spool]\ndirectory = 3\n", "spool.directory: must be a non-empty string"),
    ):
        config.write_text(content)
        status, out, err, _ = run(["--config", str(config), "queue", "list"])
        assert (status, out) == (1, ""), err
        assert err.startswith(f"relayctl: config error: {config}: "), err
        assert expected in err
        assert err.count("\n") == 1
    status, _, err, _ = run(["--config", str(tmp_path / "missing.toml"), "reload"])
    assert status == 1
    assert "config file not found" in err


def test_hungDaemonTimesOut(tmp_path: Path) -> None:
    """A daemon that takes the connection but never answers: one line, status 1."""
    config = tmp_path / "relayd.toml"
    config.write_text('[spool]\ndirectory = "spool"\n')
    os.makedirs(tmp_path / "spool")
    with socket.socket(socket.AF_UNIX) as hung:
        hung.bind(str(tmp_path / "spool" / "control.sock"))
        hung.listen()
        started = time.monotonic()
        status, out, err, _ = run(["--config", str(config), "--timeout", "0.5", "status"])
    assert (status, out) == (1, "")
    assert err == "relayctl: no answer from relayd within 0.5 seconds\n"
    assert time.monotonic() - started < 30


def test_offlineUnreadableEnvelope(tmp_path: Path) -> None:
    """
    Read from the spool directly, a queue file that cannot be read (here:
    a message without its record) is listed with the problem rather than
    stopping the listing, and nothing is written.
    """
    config = tmp_path / "relayd.toml"
    config.write_text('[spool]\ndirectory = "spool"\n')
    for name in ("incoming", "active", "deferred", "hold", "corrupt"):
        os.makedirs(tmp_path / "spool" / name)
    (tmp_path / "spool" / "hold" / "0ABC").write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    status, out, err, _ = run(["--config", str(config), "queue", "list"])
    assert status == 0, err
    [line] = [one for one in out.splitlines() if one.startswith("0ABC")]
    assert "hold" in line and "(unreadable envelope: " in line
    assert "reading the spool" in err
    status, _, err, _ = run(["--config", str(config), "queue", "show", "0abc"])
    assert status == 1
    note, error = err.splitlines()
    assert "reading the spool" in note
    assert error.startswith("relayctl: 0ABC: unreadable envelope: ")
    assert (tmp_path / "spool" / "hold" / "0ABC").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"


# --- RELAYD_CONFIG and --version -----------------------------------------------------

RELAYCTL = os.path.join(os.path.dirname(sys.executable), "relayctl")


def runScript(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed relayctl, with C{env} over an environment without RELAYD_CONFIG."""
    environ = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    environ.update(env)
    return subprocess.run(
        [RELAYCTL, *args], capture_output=True, text=True, env=environ, timeout=120
    )


class ConfigVariableTests(RelayctlTestCase):
    """The installed relayctl finds relayd's config through RELAYD_CONFIG."""

    @defer.inlineCallbacks
    def test_statusThroughVariable(self) -> Any:
        env = {"RELAYD_CONFIG": self.setup.configPath}
        result = yield deferToThread(runScript, ["status"], env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"config:      {self.setup.configPath}\n", result.stdout)
        result = yield deferToThread(runScript, ["queue", "list"], env)
        self.assertEqual((result.returncode, result.stdout), (0, "Mail queue is empty\n"))

    @defer.inlineCallbacks
    def test_configOptionWins(self) -> Any:
        missing = os.path.join(self.directory, "missing.toml")
        env = {"RELAYD_CONFIG": missing}
        result = yield deferToThread(runScript, ["--config", self.setup.configPath, "status"], env)
        self.assertEqual(result.returncode, 0, result.stderr)
        result = yield deferToThread(runScript, ["status"], env)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"relayctl: config file not found: tried {missing} (RELAYD_CONFIG); "
            "name one with --config FILE or RELAYD_CONFIG=FILE\n",
        )


def test_defaultConfigMissingSaysWhatWasTried() -> None:
    """Without --config or RELAYD_CONFIG: the default, and how to name one."""
    if os.path.exists("/etc/relayd/relayd.toml"):
        pytest.skip("this machine has /etc/relayd/relayd.toml")
    result = runScript(["status"], {})
    assert result.returncode == 1
    assert result.stderr == (
        "relayctl: config file not found: tried /etc/relayd/relayd.toml "
        "(the default; RELAYD_CONFIG is not set); "
        "name one with --config FILE or RELAYD_CONFIG=FILE\n"
    )


def test_twistdHonoursVariable(tmp_path: Path) -> None:
    """C{twistd relayd} without --config runs the config RELAYD_CONFIG names."""
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",), portZero=False)
    environ = dict(os.environ, RELAYD_CONFIG=setup.configPath)
    code = (
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd']; run()"
    )
    with open(tmp_path / "relayd.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code], env=environ, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "relayd.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", setup.ports["relay"]), 1) as s:
                    assert s.recv(512).startswith(b"220 ")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "relayd.log").read_text()
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(30)
    missing = str(tmp_path / "missing.toml")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, RELAYD_CONFIG=missing),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        f"relayd: config file not found: tried {missing} (RELAYD_CONFIG); "
        "name one with --config FILE or RELAYD_CONFIG=FILE" in result.stderr
    ), result.stderr
