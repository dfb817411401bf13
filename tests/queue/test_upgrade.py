"""
Upgrades lose nothing: a spool written by the relayd before queue files
(tests/fixtures/spool-v1, made by tests/fixtures/make_spool_v1.py with that
relayd) is converted at startup, every message in its state with every
recipient's state, then listed by relayctl's readers and delivered by the
scheduler, each pending recipient once and no delivered one again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial import unittest

from relayd.ops.queueview import readQueue, showMessage
from relayd.queue.record import QueueState, RecipientState, readData, readRecord
from relayd.queue.scheduler import Scheduler
from relayd.queue.spool import Spool
from tests.queue.test_scheduler import ScriptedDeliverer, ScriptedRouter

FIXTURE = Path(__file__).parents[1] / "fixtures" / "spool-v1"
IDS = json.loads((FIXTURE.parent / "spool-v1-ids.json").read_text())
ARRIVAL = 1764000000.0


def body(name: str, extra: bytes = b"") -> bytes:
    """The message make_spool_v1.py stored as C{name}."""
    return (
        b"Received: from client.example ([192.0.2.1])\r\n\tby relayd.test\r\n"
        b"Subject: upgrade " + name.encode() + b"\r\n\r\n" + extra + b"line\r\n"
    )


class UpgradeTests(unittest.TestCase):
    def setUp(self) -> None:
        parent = tempfile.mkdtemp(prefix="relayd-upgrade-")
        self.addCleanup(shutil.rmtree, parent, True)
        self.directory = os.path.join(parent, "spool")
        shutil.copytree(FIXTURE, self.directory)
        self.events: list[dict] = []
        self.spool = Spool(
            self.directory,
            0,
            reactor,
            log=Logger("relayd.queue.spool", observer=self.events.append),
        )
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.directory, name)))

    def test_converted(self) -> None:
        """
        Each message is a queue file in its state (active back in
        incoming; of the two copies a crash left, the newer); the message
        bytes and every field and recipient state are as the old relayd
        wrote them; the old files are gone, except the corrupt entry, now
        beside the data it names, and data/ itself is gone.
        """
        self.assertEqual(self.spool.entries("incoming"), sorted([IDS["incoming"], IDS["active"]]))
        self.assertEqual(self.spool.entries("deferred"), sorted([IDS["deferred"], IDS["twice"]]))
        self.assertEqual(self.spool.entries("hold"), [IDS["hold"]])
        for state in ("incoming", "active", "deferred", "hold", "tmp"):
            self.assertEqual([n for n in self.listing(state) if n.endswith(".json")], [], state)
        self.assertEqual(self.listing("active"), [])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("corrupt"), ["0BADJSON.data", "0BADJSON.json"])
        self.assertFalse(os.path.exists(os.path.join(self.directory, "data")))
        with open(os.path.join(self.directory, "corrupt", "0BADJSON.data"), "rb") as f:
            self.assertEqual(f.read(), body("corrupt"))

        for name in ("active", "hold", "twice", "deferred"):
            self.assertEqual(self.spool.readData(IDS[name]), body(name), name)
        self.assertEqual(
            self.spool.readData(IDS["incoming"]), body("incoming", "café\r\n".encode())
        )

        record, _ = self.spool.load(IDS["incoming"])
        self.assertEqual(record.body, "8BITMIME")
        self.assertEqual(
            [(r.address, r.state) for r in record.recipients],
            [("a@example.com", RecipientState.PENDING), ("b@example.net", RecipientState.PENDING)],
        )
        record, _ = self.spool.load(IDS["deferred"])
        self.assertEqual(
            (record.attempts, record.nextAttempt, record.delayWarned, record.user),
            (1, ARRIVAL + 360, True, "alice"),
        )
        self.assertEqual(
            [(r.address, r.state, r.attempts, r.lastReply, r.status) for r in record.recipients],
            [
                ("ok@example.com", RecipientState.DELIVERED, 1, "250 2.0.0 Ok", "2.0.0"),
                ("later@example.net", RecipientState.DEFERRED, 1, "451 4.7.1 greylisted", "4.7.1"),
                ("gone@example.org", RecipientState.FAILED, 1, "550 5.1.1 no such user", "5.1.1"),
            ],
        )
        record, _ = self.spool.load(IDS["twice"])
        self.assertEqual(record.nextAttempt, ARRIVAL + 600)
        self.assertEqual(record.recipients[0].lastReply, "421 4.4.2 timeout")
        self.assertEqual(record.version, 2)
        for name in IDS.values():
            self.assertTrue([e for e in self.events if e.get("queue_id") == name], name)

    @defer.inlineCallbacks
    def test_restartAfterConversion(self) -> object:
        """A second start finds nothing left to convert, and changes nothing."""
        files = {
            state: {
                n: readRecord(os.path.join(self.directory, state, n)) for n in self.listing(state)
            }
            for state in ("incoming", "deferred", "hold")
        }
        yield self.spool.stopService()
        self.events.clear()
        self.spool.startService()
        again = {
            state: {
                n: readRecord(os.path.join(self.directory, state, n)) for n in self.listing(state)
            }
            for state in ("incoming", "deferred", "hold")
        }
        self.assertEqual(again, files)
        self.assertEqual([e for e in self.events if "convert" in e.get("log_format", "")], [])

    @defer.inlineCallbacks
    def test_crashBeforeCleanup(self) -> object:
        """
        A crash after a message's queue file was renamed into place but
        before its old envelope and data were removed: the next start
        keeps the queue file (which may be newer) and removes the old ones,
        so the message is neither lost nor queued twice.
        """
        queueId = IDS["deferred"]
        yield self.spool.stopService()
        os.makedirs(os.path.join(self.directory, "data"))
        shutil.copy(FIXTURE / "data" / queueId, os.path.join(self.directory, "data"))
        shutil.copy(FIXTURE / "deferred" / f"{queueId}.json", os.path.join(self.directory, "hold"))
        before = readRecord(os.path.join(self.directory, "deferred", queueId))
        self.spool.startService()
        self.assertEqual(self.listing("hold"), [IDS["hold"]])
        self.assertEqual(self.spool.entries("deferred"), sorted([queueId, IDS["twice"]]))
        self.assertEqual(self.spool.load(queueId)[0], before)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "data")))

    def test_listedByRelayctl(self) -> None:
        """relayctl's readers list and show the converted messages."""
        entries, more = readQueue(self.directory)
        self.assertFalse(more)
        byId = {e["queue_id"]: e for e in entries}
        self.assertEqual(set(byId), set(IDS.values()))
        self.assertEqual(byId[IDS["hold"]]["state"], "hold")
        self.assertEqual(
            [(r["address"], r["state"]) for r in byId[IDS["deferred"]]["recipients"]],
            [
                ("ok@example.com", "delivered"),
                ("later@example.net", "deferred"),
                ("gone@example.org", "failed"),
            ],
        )
        shown = showMessage(self.directory, IDS["deferred"], body=True)
        self.assertEqual(shown["message"], body("deferred"))
        self.assertEqual(shown["entry"]["envelope"]["user"], "alice")

    @defer.inlineCallbacks
    def test_deliveredAfterConversion(self) -> object:
        """
        The scheduler delivers every recipient still waiting, once, and
        none already delivered or failed; the message on hold stays.
        """
        clock = Clock()
        clock.advance(ARRIVAL + 3600)
        deliverer = ScriptedDeliverer()
        scheduler = Scheduler(
            spool=self.spool,
            router=ScriptedRouter(),
            deliverer=deliverer,
            clock=clock,
            hostname="relayd.test",
            random=random.Random(1),
            delayWarning=0,
        )
        scheduler.startService()
        self.addCleanup(scheduler.stopService)
        yield scheduler.whenIndexed()
        for _ in range(400):
            yield deferLater(reactor, 0.005, lambda: None)
            if not scheduler._inFlight and not self.spool._busy and len(deliverer.calls) >= 5:
                break
        yield deferLater(reactor, 0.05, lambda: None)
        sent = sorted(address for _, _, addresses in deliverer.calls for address in addresses)
        self.assertEqual(
            sent,
            [
                "a@example.com",
                "b@example.net",
                "cut@example.com",
                "later@example.net",
                "twice@example.com",
            ],
        )
        self.assertEqual(self.spool.entries(QueueState.INCOMING), [])
        self.assertEqual(self.spool.entries(QueueState.DEFERRED), [])
        self.assertEqual(self.spool.entries(QueueState.HOLD), [IDS["hold"]])
        self.assertEqual(readData(self.spool.load(IDS["hold"])[1]), body("hold"))
