"""
Tests for L{relayd.queue.spool}: the commit protocol, group commit, startup
recovery, the free-space reserve and queue ids, on a real directory (and,
when running as root, a real full file system).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace

from twisted.internet import defer, reactor
from twisted.internet.defer import DeferredList, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from relayd.interfaces import ISpool
from relayd.queue import spool as spoolModule
from relayd.queue.record import QueueRecord, RecipientState, readData, readRecord
from relayd.queue.spool import IncomingMessage, Spool, SpoolStopped, envelopeRecord
from relayd.queue.workers import GroupSync

MESSAGE = (
    b"Received: from client.example (client.example [192.0.2.1])\r\n"
    b"Subject: test\r\n"
    b"\r\n" + bytes(range(256)) + b"\r\n.. dot-stuffed line kept as received\r\n"
)


def record(queueId: str, size: int = len(MESSAGE)) -> QueueRecord:
    """An envelope for a test message."""
    return envelopeRecord(
        queueId,
        "sender@example.org",
        ["a@example.com", "b@example.net"],
        1700000000.25,
        size,
        "8BITMIME",
        "192.0.2.1",
        "client.example",
        None,
        "relay",
    )


def listing(directory: str) -> list[str]:
    """The sorted names in C{directory}."""
    return sorted(os.listdir(directory))


class TestCase(unittest.TestCase):
    """
    A trial test case whose L{mktemp} is under the system's temporary
    directory: trial's own is relative to the working directory, which under
    pytest is the source checkout.
    """

    def mktemp(self):
        """
        Return a path that does not exist yet, in a fresh directory that is
        removed after the test.
        """
        parent = tempfile.mkdtemp(prefix="relayd-test-spool-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        return os.path.join(parent, "spool")


class SpoolTestMixin:
    """Start spools on a temporary directory and stop them after the test."""

    journal = True
    asyncSync = True

    def startSpool(self, directory=None, reserveBytes=0):
        """
        Start a L{Spool} whose log events are collected in C{self.events}.

        @return: the running spool; it is stopped in the test's cleanup.
        """
        if directory is None:
            directory = self.mktemp()
        self.events = []
        log = Logger(namespace="relayd.queue.spool", observer=self.events.append)
        spool = Spool(
            directory,
            reserveBytes,
            reactor,
            threads=4,
            log=log,
            journal=self.journal,
            asyncSync=self.asyncSync,
        )
        spool.startService()
        self.addCleanup(spool.stopService)
        return spool

    def receive(self, spool, data=MESSAGE):
        """Open a message and write C{data} to it, as the SMTP server does."""
        incoming = spool.openMessage(spool.newQueueId())
        incoming.write(data)
        return incoming

    @inlineCallbacks
    def assertAllFailLeavingNothing(self, spool, count, code):
        """
        Commit C{count} messages at once: each fails with C{code}, and
        neither C{incoming/} nor C{tmp/} keeps anything of them.
        """
        messages = [self.receive(spool) for _ in range(count)]
        results = yield DeferredList(
            [spool.commit(m, record(m.queueId)) for m in messages], consumeErrors=True
        )
        for ok, result in results:
            self.assertFalse(ok)
            self.assertEqual(result.value.errno, code)
        self.assertEqual(spool.entries("incoming"), [])
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])

    def eventsAbout(self, queueId):
        """The collected log events that carry C{queue_id=queueId}."""
        return [e for e in self.events if e.get("queue_id") == queueId]


class CommitTests(SpoolTestMixin, TestCase):
    """L{Spool.commit} makes a message durable and visible, atomically."""

    def test_interface(self):
        """L{Spool} provides L{ISpool}."""
        spool = Spool(self.mktemp(), 0, reactor)
        self.assertTrue(verifyObject(ISpool, spool))

    def test_directories(self):
        """Starting the spool creates all its directories (and its lock file)."""
        spool = self.startSpool()
        self.assertEqual(
            listing(spool.directory),
            sorted(["tmp", "journal", "incoming", "active", "deferred", "hold", "corrupt", "lock"]),
        )

    @inlineCallbacks
    def test_commit(self):
        """
        A committed message is one queue file in C{incoming/}, the message
        followed by its record; L{Spool.load} returns the record and the
        file, whose message is byte-exact, and C{tmp/} is empty again.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        queueId = incoming.queueId
        self.assertEqual(incoming.size, len(MESSAGE))
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [queueId])

        result = yield spool.commit(incoming, record(queueId))

        self.assertEqual(result, queueId)
        self.assertEqual(spool.entries("incoming"), [queueId])
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        self.assertEqual(listing(os.path.join(spool.directory, "incoming")), [queueId])
        envelope, path = spool.load(queueId)
        self.assertEqual(envelope, record(queueId))
        self.assertEqual(path, os.path.join(spool.directory, "incoming", queueId))
        self.assertEqual(readData(path), MESSAGE)
        self.assertEqual(spool.readData(queueId), MESSAGE)
        with open(path, "rb") as f:
            stored = f.read()
        self.assertTrue(stored.startswith(MESSAGE + b'{"arrival": 1700000000.25,'))
        self.assertEqual(stored[-22:], b"RQF2 %016X\n" % len(MESSAGE))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertTrue(self.eventsAbout(queueId))

    @inlineCallbacks
    def test_commitSetsSize(self):
        """
        The stored record's size is what was written of the message, even
        when the record given says otherwise: the queue file's footer and
        the record must agree on where the message ends.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield spool.commit(incoming, record(incoming.queueId, size=3))
        stored, path = spool.load(incoming.queueId)
        self.assertEqual(stored.size, len(MESSAGE))
        self.assertEqual(readData(path), MESSAGE)

    @inlineCallbacks
    def test_commitWrongEnvelope(self):
        """
        An envelope for another queue id fails the commit and leaves
        nothing behind.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield self.assertFailure(spool.commit(incoming, record("0OTHER")), ValueError)
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        self.assertEqual(spool.entries("incoming"), [])

    @inlineCallbacks
    def test_commitTwice(self):
        """A message cannot be committed twice."""
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield spool.commit(incoming, record(incoming.queueId))
        yield self.assertFailure(spool.commit(incoming, record(incoming.queueId)), ValueError)
        self.assertEqual(spool.entries("incoming"), [incoming.queueId])

    def test_discard(self):
        """
        L{IncomingMessage.discard} removes the file; it is idempotent, and
        the message can no longer be written.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        self.assertTrue(os.path.exists(incoming.path))
        incoming.discard()
        self.assertFalse(os.path.exists(incoming.path))
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        incoming.discard()
        self.assertRaises(ValueError, incoming.write, b"more")

    @inlineCallbacks
    def test_discardDuringCommit(self):
        """
        Once handed to C{commit} the spool owns the message: C{discard} does
        nothing and the commit goes through.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        d = spool.commit(incoming, record(incoming.queueId))
        incoming.discard()
        result = yield d
        self.assertEqual(spool.entries("incoming"), [result])
        incoming.discard()
        self.assertEqual(spool.entries("incoming"), [result])

    def test_openMessageRejectsBadId(self):
        """A queue id that could escape C{tmp/} is refused."""
        spool = self.startSpool()
        self.assertRaises(ValueError, spool.openMessage, "../incoming/X")
        self.assertRaises(ValueError, spool.openMessage, "abc")

    def test_openMessageExisting(self):
        """An id already in use in C{tmp/} is refused, not overwritten."""
        spool = self.startSpool()
        incoming = self.receive(spool)
        exc = self.assertRaises(OSError, spool.openMessage, incoming.queueId)
        self.assertEqual(exc.errno, errno.EEXIST)
        incoming.discard()

    def test_loadMissing(self):
        """L{Spool.load} raises L{KeyError} for an unknown or invalid id."""
        spool = self.startSpool()
        self.assertRaises(KeyError, spool.load, spool.newQueueId())
        self.assertRaises(KeyError, spool.load, "../data/X")

    def test_entriesUnknownState(self):
        """L{Spool.entries} refuses a state that is not a spool directory."""
        spool = self.startSpool()
        self.assertRaises(ValueError, spool.entries, "tmp")
        self.assertEqual(spool.entries("hold"), [])


class GroupCommitTests(SpoolTestMixin, TestCase):
    """
    Commits that finish together share the fsync of C{incoming/}: the
    protocol without the journal (a message too large for it, or no boot
    id); L{tests.queue.test_journal} tests the journal's.
    """

    journal = False

    @inlineCallbacks
    def test_concurrentCommits(self):
        """
        Fifty concurrent commits all succeed, byte-exact, with fewer
        directory fsyncs than messages.
        """
        spool = self.startSpool()
        messages = []
        for i in range(50):
            data = MESSAGE + b"message %d\r\n" % (i,)
            messages.append((self.receive(spool, data), data))

        results = yield gatherResults(
            [spool.commit(incoming, record(incoming.queueId)) for incoming, _ in messages]
        )

        ids = [incoming.queueId for incoming, _ in messages]
        self.assertEqual(results, ids)
        self.assertEqual(spool.entries("incoming"), sorted(ids))
        for incoming, data in messages:
            self.assertEqual(spool.readData(incoming.queueId), data)
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        self.assertGreaterEqual(spool.batchCount, 1)
        self.assertLess(spool.batchCount, 50)

    @inlineCallbacks
    def test_failureIsolated(self):
        """
        When one commit fails (here: renaming its queue file into
        C{incoming/}), only its Deferred fails, its file is removed again,
        and the others committed at the same time are durable.
        """
        spool = self.startSpool()
        messages = [self.receive(spool) for _ in range(5)]
        victim = messages[2]
        victimEnvelope = os.path.join(spool.directory, "incoming", victim.queueId)
        realRename = os.rename

        def rename(source, destination):
            if destination == victimEnvelope:
                raise OSError(errno.EIO, "injected failure", destination)
            return realRename(source, destination)

        self.patch(spoolModule.os, "rename", rename)
        ds = [spool.commit(m, record(m.queueId)) for m in messages]

        failure = yield self.assertFailure(ds[2], OSError)
        self.assertEqual(failure.errno, errno.EIO)
        others = yield gatherResults(ds[:2] + ds[3:])
        self.assertEqual(sorted(others), spool.entries("incoming"))
        self.assertNotIn(victim.queueId, spool.entries("incoming"))
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        self.assertEqual(listing(os.path.join(spool.directory, "incoming")), sorted(others))
        self.assertRaises(KeyError, spool.load, victim.queueId)

    @inlineCallbacks
    def test_directoryFsyncFails(self):
        """
        When the fsync of C{incoming/} fails, every commit it covered fails
        (the client gets a temporary failure) and its queue file is taken
        out again: nothing the client was not told is durable stays queued.
        The spool keeps working once fsync works again.
        """
        spool = self.startSpool()
        sync = spool._incomingSync
        real = sync._fsync

        def failing(path):
            raise OSError(errno.EIO, "injected fsync failure", path)

        sync._fsync = failing
        yield self.assertAllFailLeavingNothing(spool, 8, errno.EIO)
        self.assertEqual(spool._incomingSync._failed, [])

        sync._fsync = real
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId])


class GroupSyncTests(TestCase):
    """L{GroupSync} directly, with threads that rename at the same time."""

    def test_sharedAndOrdered(self):
        """
        Every caller returns only after an fsync that began after it
        called; callers arriving during one fsync share the next.
        """
        events = []
        lock = threading.Lock()
        clock = itertools.count()

        def fsync(path):
            with lock:
                began = next(clock)
            time.sleep(0.01)
            events.append(("fsync", began))

        sync = GroupSync("/nowhere", fsync)
        calledAt = {}

        def caller(n):
            with lock:
                calledAt[n] = next(clock)
            sync.sync()
            with lock:
                finishedFsyncs = [began for kind, began in events if kind == "fsync"]
            # An fsync that began after this call has finished.
            self.assertTrue(any(began > calledAt[n] for began in finishedFsyncs))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(calledAt), 20)
        self.assertLess(sync.count, 20)
        self.assertGreaterEqual(sync.count, 1)

    def test_failureReachesEveryCoveredCaller(self):
        """An fsync that fails raises in every thread it covered, each its own copy."""
        gate = threading.Event()
        first = [True]

        def fsync(path):
            if first[0]:
                first[0] = False
                gate.wait(5)  # the others queue up behind this one
                return
            raise OSError(errno.EIO, "injected", path)

        sync = GroupSync("/dir", fsync)
        errors = {}

        def caller(n):
            try:
                sync.sync()
            except OSError as e:
                errors[n] = e

        runner = threading.Thread(target=caller, args=("runner",))
        runner.start()
        for _ in range(500):
            if sync._running:
                break
            time.sleep(0.001)
        waiting = [threading.Thread(target=caller, args=(n,)) for n in range(5)]
        for t in waiting:
            t.start()
        for _ in range(500):
            if sync._issued == 6:
                break
            time.sleep(0.001)
        gate.set()
        for t in [runner, *waiting]:
            t.join()
        self.assertNotIn("runner", errors)
        self.assertEqual(sorted(errors), list(range(5)))
        self.assertEqual({e.errno for e in errors.values()}, {errno.EIO})
        self.assertEqual(len({id(e) for e in errors.values()}), 5)
        self.assertEqual(sync._failed, [])
        self.assertEqual(sync.count, 2)


class RecoveryTests(SpoolTestMixin, TestCase):
    """Startup recovery cleans up after a crash."""

    @inlineCallbacks
    def test_recovery(self):
        """
        On startup: C{tmp/} is emptied, C{active/} goes back to
        C{incoming/}, and queue files that cannot be read (no footer, a
        torn end, a record that does not parse or is for another id, a
        name that is no queue id) go to C{corrupt/}.  Everything else is
        left alone, byte-exact.
        """
        directory = self.mktemp()
        first = Spool(directory, 0, reactor)
        first.startService()
        committed = []
        for _ in range(3):
            incoming = self.receive(first)
            committed.append((yield first.commit(incoming, record(incoming.queueId))))
        yield first.stopService()
        kept, wasActive, deferred = committed

        def path(*parts):
            return os.path.join(directory, *parts)

        def create(name, content=b"x"):
            with open(name, "wb") as f:
                f.write(content)

        with open(path("incoming", kept), "rb") as f:
            sound = f.read()
        # A crash while receiving, and one during a commit.
        create(path("tmp", "0UNFINISHED"))
        create(path("tmp", "0HALFCOMMIT"), sound[:-7])
        # A crash during delivery.
        os.rename(path("incoming", wasActive), path("active", wasActive))
        os.rename(path("incoming", deferred), path("deferred", deferred))
        # Not a queue file at all, and one whose end is torn off.
        create(path("incoming", "0NOFOOTER"), b"Subject: x\r\n\r\nbody\r\n")
        create(path("hold", "0TORN"), sound[:-7])
        # A record that does not parse.
        create(path("incoming", "0BADJSON"), MESSAGE + b"{not json\n" + sound[-22:])
        # A sound queue file named after another id.
        create(path("deferred", "0MISNAMED"), sound)
        # A file whose name is no queue id.
        create(path("active", "notes.txt"), b"x")

        spool = self.startSpool(directory)

        self.assertEqual(listing(path("tmp")), [])
        self.assertEqual(spool.entries("incoming"), sorted([kept, wasActive]))
        self.assertEqual(listing(path("active")), [])
        self.assertEqual(spool.entries("deferred"), [deferred])
        self.assertEqual(spool.entries("hold"), [])
        self.assertEqual(
            listing(path("corrupt")),
            sorted(["0NOFOOTER", "0TORN", "0BADJSON", "0MISNAMED", "notes.txt"]),
        )
        with open(path("corrupt", "0MISNAMED"), "rb") as f:
            self.assertEqual(f.read(), sound)
        for queueId in committed:
            envelope, path_ = spool.load(queueId)
            self.assertEqual(envelope, record(queueId))
            self.assertEqual(readData(path_), MESSAGE)
        for queueId in [
            "0UNFINISHED",
            "0HALFCOMMIT",
            wasActive,
            "0NOFOOTER",
            "0TORN",
            "0BADJSON",
            "0MISNAMED",
            "notes",
        ]:
            self.assertTrue(self.eventsAbout(queueId), queueId)
        self.assertEqual(self.eventsAbout(kept), [])

    def test_corruptNameClash(self):
        """
        An entry moved to C{corrupt/} does not overwrite an earlier one of
        the same name.
        """
        directory = self.mktemp()
        for name in ("corrupt", "incoming"):
            os.makedirs(os.path.join(directory, name))
        with open(os.path.join(directory, "corrupt", "0DUP"), "wb") as f:
            f.write(b"first")
        with open(os.path.join(directory, "incoming", "0DUP"), "wb") as f:
            f.write(b"second")
        spool = self.startSpool(directory)
        self.assertEqual(listing(os.path.join(directory, "corrupt")), ["0DUP", "0DUP.1"])
        with open(os.path.join(directory, "corrupt", "0DUP.1"), "rb") as f:
            self.assertEqual(f.read(), b"second")
        self.assertEqual(spool.entries("incoming"), [])


class ServiceTests(SpoolTestMixin, TestCase):
    """Starting and stopping the spool."""

    @inlineCallbacks
    def test_stopWaitsForCommits(self):
        """
        L{Spool.stopService} lets commits in flight finish before it stops
        the thread pool.
        """
        spool = self.startSpool()
        incomings = [self.receive(spool) for _ in range(10)]
        ds = [spool.commit(m, record(m.queueId)) for m in incomings]
        yield spool.stopService()
        self.assertEqual([d.called for d in ds], [True] * 10)
        results = yield gatherResults(ds)
        self.assertEqual(spool.entries("incoming"), sorted(results))
        self.assertIsNone(spool._pool)

    @inlineCallbacks
    def test_commitAfterStop(self):
        """
        A stopped spool refuses commits with L{SpoolStopped}, an L{OSError},
        and removes the message.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield spool.stopService()
        failure = yield self.assertFailure(
            spool.commit(incoming, record(incoming.queueId)), SpoolStopped
        )
        self.assertIsInstance(failure, OSError)
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])

    @inlineCallbacks
    def test_restart(self):
        """A stopped spool can be started again and keeps its messages."""
        spool = self.startSpool()
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        yield spool.stopService()
        spool.startService()
        incoming = self.receive(spool)
        second = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId, second])


class ReserveTests(SpoolTestMixin, TestCase):
    """L{Spool.reserveOk} compares cached free space with the reserve."""

    def test_reserveOk(self):
        """A small reserve leaves room for a small message."""
        spool = self.startSpool(reserveBytes=1024)
        self.assertTrue(spool.reserveOk(1024))

    def test_reserveTooBig(self):
        """A reserve larger than any disk leaves no room."""
        spool = self.startSpool(reserveBytes=1 << 62)
        self.assertFalse(spool.reserveOk(0))

    def test_messageTooBig(self):
        """A message larger than the free space does not fit."""
        spool = self.startSpool()
        self.assertFalse(spool.reserveOk(1 << 62))

    def test_notStarted(self):
        """Before the first measurement, nothing fits."""
        spool = Spool(self.mktemp(), 0, reactor)
        self.assertFalse(spool.reserveOk(0))

    @inlineCallbacks
    def test_refresh(self):
        """L{Spool.refreshFreeSpace} measures again, in the thread pool."""
        spool = self.startSpool()
        spool._freeBytes = 0
        self.assertFalse(spool.reserveOk(1))
        yield spool.refreshFreeSpace()
        self.assertTrue(spool.reserveOk(1))

    @inlineCallbacks
    def test_commitLowersFreeSpace(self):
        """
        Between two measurements a commit lowers the cached free space by
        the size of the message, so bursts count against the reserve.
        """
        spool = self.startSpool()
        spool._freeBytes = 1 << 40
        incoming = self.receive(spool)
        yield spool.commit(incoming, record(incoming.queueId))
        self.assertLess(spool._freeBytes, (1 << 40) - len(MESSAGE))


class QueueIdTests(TestCase):
    """L{Spool.newQueueId} makes unique ids that sort by time."""

    def test_uniqueAndSorted(self):
        """Ten thousand ids in a row are distinct, well-formed and sorted."""
        spool = Spool(self.mktemp(), 0, reactor)
        ids = [spool.newQueueId() for _ in range(10000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(ids), ids)
        for queueId in ids:
            self.assertRegex(queueId, r"^[0-9A-Z]{16,20}$")
        # Hex microseconds, then a random suffix.
        self.assertRegex(ids[0], r"^[0-9A-F]{13}[0-9A-Z]{5}$")

    def test_twoProcesses(self):
        """
        Two spools on the same directory, as two processes would have, do
        not hand out the same id even in the same microsecond.
        """
        directory = self.mktemp()
        first, second = Spool(directory, 0, reactor), Spool(directory, 0, reactor)
        ids = []
        for _ in range(5000):
            ids.append(first.newQueueId())
            ids.append(second.newQueueId())
        self.assertEqual(len(set(ids)), len(ids))


class EnvelopeRecordTests(TestCase):
    """L{envelopeRecord} builds the record of a new message."""

    def test_record(self):
        """Every field is there, recipients pending, due at arrival."""
        envelope = record("0ABC")
        self.assertEqual(
            envelope.toJSON(),
            {
                "version": 2,
                "queue_id": "0ABC",
                "sender": "sender@example.org",
                "recipients": [
                    {
                        "address": address,
                        "state": "pending",
                        "attempts": 0,
                        "last_reply": None,
                        "status": None,
                        "remote": None,
                        "last_attempt": None,
                        "expired": False,
                    }
                    for address in ["a@example.com", "b@example.net"]
                ],
                "arrival": 1700000000.25,
                "size": len(MESSAGE),
                "body": "8BITMIME",
                "client": "192.0.2.1",
                "helo": "client.example",
                "user": None,
                "listener": "relay",
                "attempts": 0,
                "next_attempt": 1700000000.25,
                "delay_warned": False,
                "require_tls": False,
                "tls_optional": False,
                "smtputf8": False,
            },
        )
        self.assertEqual(QueueRecord.fromJSON(json.loads(json.dumps(envelope.toJSON()))), envelope)


class DiskFullTests(SpoolTestMixin, TestCase):
    """
    A real full file system: a 64 KiB tmpfs as the spool.  Needs root to
    mount it.
    """

    def setUp(self):
        if os.geteuid() != 0:
            raise self.skipTest("mounting a tmpfs to fill up needs root")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", self.directory],
            check=True,
        )
        self.addCleanup(subprocess.run, ["umount", self.directory], check=True)

    def assertNothingLeft(self, spool):
        """Nothing of any message is in C{tmp/} or C{incoming/}."""
        for name in ("tmp", "incoming"):
            self.assertEqual(listing(os.path.join(spool.directory, name)), [], name)

    def fill(self):
        """Fill the file system; return the filler's path."""
        filler = os.path.join(self.directory, "filler")
        with open(filler, "wb", buffering=0) as f:
            while True:
                try:
                    f.write(b"\0" * 4096)
                except OSError as e:
                    self.assertEqual(e.errno, errno.ENOSPC)
                    break
        return filler

    @inlineCallbacks
    def test_commitOnFullDisk(self):
        """
        A message whose writes were only buffered fails in C{commit} with
        C{ENOSPC}, and nothing of it is left.  Once there is room again the
        spool works.
        """
        spool = self.startSpool(self.directory)
        filler = self.fill()
        yield spool.refreshFreeSpace()
        self.assertFalse(spool.reserveOk(4096))
        incoming = self.receive(spool, b"x" * 4096)

        failure = yield self.assertFailure(
            spool.commit(incoming, record(incoming.queueId, 4096)), OSError
        )
        self.assertEqual(failure.errno, errno.ENOSPC)
        self.assertNothingLeft(spool)
        self.assertTrue([e for e in self.eventsAbout(incoming.queueId) if "error" in e])

        os.unlink(filler)
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId])

    @inlineCallbacks
    def test_messageBiggerThanDisk(self):
        """
        A message bigger than the file system fails in C{write} or in
        C{commit} with an L{OSError}; after C{discard} nothing is left.
        """
        spool = self.startSpool(self.directory)
        self.assertFalse(spool.reserveOk(256 * 1024))
        incoming = spool.openMessage(spool.newQueueId())
        error = None
        try:
            for _ in range(32):
                incoming.write(b"y" * 8192)
        except OSError as e:
            error = e
            incoming.discard()
        else:
            error = yield self.assertFailure(
                spool.commit(incoming, record(incoming.queueId, incoming.size)),
                OSError,
            )
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertNothingLeft(spool)


class IncomingMessageTests(TestCase):
    """L{IncomingMessage} counts what is written."""

    def test_size(self):
        """C{size} is the number of octets written so far."""
        path = self.mktemp()
        incoming = IncomingMessage("0ABC", path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        incoming.write(b"abc")
        incoming.write(b"de")
        self.assertEqual(incoming.size, 5)
        incoming.discard()
        self.assertFalse(os.path.exists(path))

    def test_keptUntilFlushOrFull(self):
        """
        Small writes are kept in memory (the commit writes them with the
        record); L{flush} writes them out, and so does a write that fills
        the buffer.
        """
        from relayd.queue.spool import _WRITE_BUFFER

        path = self.mktemp()
        incoming = IncomingMessage("0ABC", path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.addCleanup(incoming.discard)
        incoming.write(b"abc")
        incoming.write(bytearray(b"de"))
        self.assertEqual(os.path.getsize(path), 0)
        incoming.flush()
        self.assertEqual(_content(path), b"abcde")
        big = b"x" * _WRITE_BUFFER
        incoming.write(big)
        self.assertEqual(_content(path), b"abcde" + big)
        self.assertEqual(incoming.size, 5 + len(big))

    def test_closedOnce(self):
        """
        Closing twice does not close a descriptor the number was given to
        since (the commit's thread and the reactor both close).
        """
        path = self.mktemp()
        incoming = IncomingMessage("0ABC", path, os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        incoming._closeQuietly()
        other = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, other)
        incoming._closeQuietly()
        incoming.discard()
        os.fstat(other)  # still open
        self.assertFalse(os.path.exists(path))


class DeliverySideTests(unittest.TestCase):
    """The API the scheduler uses: observers, read, scan, update, move, remove, submit."""

    def setUp(self):
        from twisted.internet import reactor

        self.directory = tempfile.mkdtemp(prefix="relayd-spool-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.spool = Spool(self.directory, 0, reactor)
        self.spool.startService()
        self.addCleanup(self.spool.stopService)

    def record(self, queueId):
        return envelopeRecord(
            queueId=queueId,
            sender="a@example.org",
            recipients=["b@example.org"],
            arrival=1000.0,
            size=3,
            body="7BIT",
            client="127.0.0.1",
            helo="h",
            user=None,
            listener="relay",
        )

    @defer.inlineCallbacks
    def test_lifecycle(self):
        seen = []
        self.spool.addQueueObserver(lambda q, r: seen.append((q, r.sender)))
        queueId = yield self.spool.submit(self.record("X"), b"hi\r\n")
        # The committer's callback comes first (a session sends its 250
        # from it), the observers just after it, in the same turn.
        self.assertEqual(seen, [])
        yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(seen, [(queueId, "a@example.org")])
        scanned = yield self.spool.scan()
        self.assertEqual(scanned, [(queueId, "incoming", 1000.0)])
        yield self.spool.move(queueId, "incoming", "active", durable=False)
        record = yield self.spool.read(queueId, "active")
        self.assertEqual(record.size, 4)
        recipient = replace(record.recipients[0], state=RecipientState.DEFERRED)
        record = replace(record, recipients=(recipient,), nextAttempt=2000.0)
        yield self.spool.update(queueId, "active", record, "deferred")
        self.assertEqual(self.spool.entries("active"), [])
        self.assertEqual(self.spool.entries("deferred"), [queueId])
        again = yield self.spool.read(queueId, "deferred")
        self.assertEqual(again, record)
        self.assertEqual(again.recipients[0].state, RecipientState.DEFERRED)
        self.assertEqual(self.spool.readData(queueId), b"hi\r\n")
        scanned = yield self.spool.scan()
        self.assertEqual(scanned, [(queueId, "deferred", 2000.0)])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        yield self.spool.remove(queueId, "deferred")
        self.assertEqual(self.spool.entries("deferred"), [])
        self.assertRaises(KeyError, self.spool.load, queueId)

    @defer.inlineCallbacks
    def test_updateRewritesOnlyTheRecord(self):
        """
        L{Spool.update} without a new state replaces the queue file in
        place (a new inode, renamed over the old one): the message is
        copied unchanged, the record is the new one, nothing is left in
        C{tmp/}.
        """
        data = MESSAGE * 50
        queueId = yield self.spool.submit(self.record("X"), data)
        path = os.path.join(self.directory, "incoming", queueId)
        before = os.stat(path).st_ino
        record = yield self.spool.read(queueId, "incoming")
        yield self.spool.update(queueId, "incoming", replace(record, attempts=7))
        self.assertNotEqual(os.stat(path).st_ino, before)
        self.assertEqual(readRecord(path, queueId).attempts, 7)
        self.assertEqual(readData(path), data)
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])

    @defer.inlineCallbacks
    def test_removeIsOneUnlink(self):
        """
        L{Spool.remove} unlinks the queue file, and fsyncs no directory
        (at-least-once allows the duplicate a lost unlink costs).
        """
        queueId = yield self.spool.submit(self.record("X"), b"hi\r\n")
        fsynced = []
        self.patch(spoolModule, "fsyncDirectory", fsynced.append)
        yield self.spool.remove(queueId, "incoming")
        self.assertEqual(self.spool.entries("incoming"), [])
        self.assertEqual(fsynced, [])
        yield self.assertFailure(self.spool.remove(queueId, "incoming"), FileNotFoundError)

    @defer.inlineCallbacks
    def test_removesOfOneTurnShareAHandOff(self):
        """
        The removals asked for in one reactor turn are done by one spool
        thread hand-off; each gets its own outcome (a missing file fails
        only its own); stopping the spool waits for a batch in flight.
        """
        ids = []
        for _ in range(5):
            ids.append((yield self.spool.submit(self.record("X"), b"hi\r\n")))
        handOffs = []
        inPool = self.spool._inPool
        self.patch(self.spool, "_inPool", lambda f, *a: handOffs.append(f) or inPool(f, *a))
        removals = [self.spool.remove(q, "incoming") for q in ids]
        missing = self.spool.remove(ids[0], "incoming")  # the same file twice
        results = yield defer.DeferredList(removals, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * 5)
        yield self.assertFailure(missing, FileNotFoundError)
        self.assertEqual(len(handOffs), 1)
        self.assertEqual(self.spool.entries("incoming"), [])
        last = yield self.spool.submit(self.record("X"), b"hi\r\n")
        removal = self.spool.remove(last, "incoming")
        yield self.spool.stopService()
        self.assertTrue(removal.called)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "incoming", last)))

    @defer.inlineCallbacks
    def test_removeDurable(self):
        """
        An operator's delete (C{durable=True}) fsyncs the directory: mail
        deleted on purpose must not come back after a crash.
        """
        queueId = yield self.spool.submit(self.record("X"), b"hi\r\n")
        fsynced = []
        self.patch(spoolModule, "fsyncDirectory", fsynced.append)
        yield self.spool.remove(queueId, "incoming", durable=True)
        self.assertEqual(self.spool.entries("incoming"), [])
        self.assertEqual(fsynced, [os.path.join(self.directory, "incoming")])

    @defer.inlineCallbacks
    def test_listQueued(self):
        """
        The sweep's view: which state directories hold which queue ids, from
        names alone; a directory that cannot be listed is reported, and the
        others are still listed.
        """
        first = yield self.spool.submit(self.record("X"), b"hi\r\n")
        second = yield self.spool.submit(self.record("X"), b"hi\r\n")
        yield self.spool.move(second, "incoming", "hold")
        with open(os.path.join(self.directory, "incoming", "stray.txt"), "w") as f:
            f.write("not a queue file\n")
        found, problems = yield self.spool.listQueued()
        self.assertEqual(found, {first: ["incoming"], second: ["hold"]})
        self.assertEqual(problems, [])
        # A state directory that is not one any more (renames into it fail).
        deferred = os.path.join(self.directory, "deferred")
        os.rename(deferred, deferred + ".away")
        with open(deferred, "w") as f:
            f.write("not a directory\n")
        try:
            found, problems = yield self.spool.listQueued()
        finally:
            os.unlink(deferred)
            os.rename(deferred + ".away", deferred)
        self.assertEqual(found, {first: ["incoming"], second: ["hold"]})
        self.assertEqual([state for state, _ in problems], ["deferred"])
        self.assertIn("Not a directory", problems[0][1])

    @defer.inlineCallbacks
    def test_updateAfterOldEnvelopeGone(self):
        """
        An update that moves the queue file out of active/ and finds it
        gone there already (an earlier update got that far before failing)
        is not an error: the new record is written in the new state.
        """
        queueId = yield self.spool.submit(self.record("X"), b"hi\r\n")
        yield self.spool.move(queueId, "incoming", "active")
        record = yield self.spool.read(queueId, "active")
        yield self.spool.move(queueId, "active", "deferred")
        yield self.spool.update(queueId, "active", replace(record, nextAttempt=3000.0), "deferred")
        self.assertEqual(self.spool.entries("active"), [])
        self.assertEqual(self.spool.entries("deferred"), [queueId])
        again = yield self.spool.read(queueId, "deferred")
        self.assertEqual(again.nextAttempt, 3000.0)
        self.assertEqual(self.spool.readData(queueId), b"hi\r\n")


class LockTests(unittest.TestCase):
    """Two spools (two relayd processes) never share one directory."""

    def test_secondSpoolRefused(self):
        from relayd.queue.spool import SpoolLocked

        directory = tempfile.mkdtemp(prefix="relayd-lock-")
        self.addCleanup(shutil.rmtree, directory, True)
        first = Spool(directory, 0, reactor)
        first.startService()
        second = Spool(directory, 0, reactor)
        with self.assertRaises(SpoolLocked) as caught:
            second.startService()
        self.assertIn("in use by another relayd", str(caught.exception))

        def again(_):
            third = Spool(directory, 0, reactor)
            third.startService()
            return third.stopService()

        return first.stopService().addCallback(again)

    def test_lockHeldByAnotherProcess(self):
        """The lock is the kernel's: a separate process holding it is seen."""
        from relayd.queue.spool import SpoolLocked

        directory = tempfile.mkdtemp(prefix="relayd-lock-")
        self.addCleanup(shutil.rmtree, directory, True)
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import fcntl, os, sys, time\n"
                    f"fd = os.open({os.path.join(directory, 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                    "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(30)\n"
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        with self.assertRaises(SpoolLocked):
            Spool(directory, 0, reactor).startService()
        holder.stdout.close()

    def holdLock(self, directory, pid, seconds):
        """
        A process that locks C{directory}'s spool lock with C{pid} written
        in it (as a receiver holds the lock of its queue manager) for
        C{seconds}; returned once it holds it.
        """
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import fcntl, os, sys, time\n"
                    f"fd = os.open({os.path.join(directory, 'lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                    f"os.write(fd, b'{pid}\\n')\n"
                    f"print('locked', flush=True)\ntime.sleep({seconds})\n"
                ),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.addCleanup(holder.stdout.close)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        return holder

    def endedPid(self):
        """The pid of a process that has ended (and been reaped)."""
        ended = subprocess.Popen(["true"])
        ended.wait()
        return ended.pid

    def test_waitsForTheReceiversOfAnEndedRelayd(self):
        """
        The lock is held, but the relayd whose pid the file names has
        ended: its receivers still hold it while they stop.  The spool
        waits (one warning), and takes the lock once they are gone.
        """
        directory = tempfile.mkdtemp(prefix="relayd-lock-")
        self.addCleanup(shutil.rmtree, directory, True)
        pid = self.endedPid()
        self.holdLock(directory, pid, 1)
        events = []
        spool = Spool(directory, 0, reactor, lockWait=30, log=Logger(observer=events.append))
        started = time.monotonic()
        spool.startService()
        self.assertGreater(time.monotonic() - started, 0.5)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["pid"], pid)
        with open(os.path.join(directory, "lock"), "rb") as f:
            self.assertEqual(f.read(), b"%d\n" % os.getpid())
        return spool.stopService()

    def test_endedRelaydsReceiversTooSlow(self):
        """Still held after C{lockWait} seconds: refused."""
        from relayd.queue.spool import SpoolLocked

        directory = tempfile.mkdtemp(prefix="relayd-lock-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.holdLock(directory, self.endedPid(), 30)
        started = time.monotonic()
        with self.assertRaises(SpoolLocked):
            Spool(directory, 0, reactor, lockWait=0.5).startService()
        self.assertGreater(time.monotonic() - started, 0.4)

    def test_runningHolderRefusedAtOnce(self):
        """A lock held by a running process named in the file: no wait."""
        from relayd.queue.spool import SpoolLocked

        directory = tempfile.mkdtemp(prefix="relayd-lock-")
        self.addCleanup(shutil.rmtree, directory, True)
        holder = self.holdLock(directory, 0, 30)
        with open(os.path.join(directory, "lock"), "r+b") as f:
            f.write(b"%d\n" % holder.pid)
        started = time.monotonic()
        with self.assertRaises(SpoolLocked):
            Spool(directory, 0, reactor, lockWait=30).startService()
        self.assertLess(time.monotonic() - started, 5)


def _content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
