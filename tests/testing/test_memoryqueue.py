"""
L{relayd.testing.memoryqueue.MemoryQueue} answers the scheduler as the real
spool does: the same script run against both gives the same answers, so a
scheduler test on the memory queue says something about the spool too.
"""

import shutil
import tempfile
from dataclasses import replace

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from relayd.queue.record import readData, readRecord
from relayd.queue.spool import Spool, envelopeRecord
from relayd.testing.memoryqueue import MemoryQueue

DATA = b"Subject: test\r\nFrom: a@example.org\r\n\r\nbody\r\n"


def record():
    return envelopeRecord(
        queueId="",
        sender="a@example.org",
        recipients=["b@example.org"],
        arrival=1000.0,
        size=0,
        body="7BIT",
        client="127.0.0.1",
        helo="h",
        user=None,
        listener="relay",
    )


class QueueContractMixin:
    """The contract; C{makeQueue} gives the queue under test."""

    answersAtOnce = False

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-memq-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.queue = self.makeQueue()
        self.seen = []
        self.queue.addQueueObserver(lambda queueId, rec: self.seen.append((queueId, rec)))

    @defer.inlineCallbacks
    def test_submitTellsObserversAndLandsInIncoming(self):
        queueId = yield self.queue.submit(record(), DATA)
        self.assertEqual(self.queue.entries("incoming"), [queueId])
        # The submitter's callback first (a session sends its 250 from
        # it), the observers just after it, in the same turn; an answer
        # given at once has told them before it was returned.
        if not self.answersAtOnce:
            self.assertEqual(self.seen, [])
            yield deferLater(reactor, 0, lambda: None)
        [(seenId, seenRecord)] = self.seen
        self.assertEqual(seenId, queueId)
        self.assertEqual((seenRecord.queueId, seenRecord.size), (queueId, len(DATA)))
        self.assertEqual(len(queueId), 18)

    @defer.inlineCallbacks
    def test_readOnlyInItsState(self):
        queueId = yield self.queue.submit(record(), DATA)
        read = yield self.queue.read(queueId, "incoming")
        self.assertEqual(read.sender, "a@example.org")
        yield self.assertFailure(self.queue.read(queueId, "deferred"), FileNotFoundError)

    @defer.inlineCallbacks
    def test_moveUpdateRemove(self):
        queueId = yield self.queue.submit(record(), DATA)
        yield self.queue.move(queueId, "incoming", "active", durable=False)
        self.assertEqual(self.queue.entries("incoming"), [])
        self.assertEqual(self.queue.entries("active"), [queueId])
        yield self.assertFailure(self.queue.move(queueId, "incoming", "active"), FileNotFoundError)
        current = yield self.queue.read(queueId, "active")
        yield self.queue.update(queueId, "active", replace(current, nextAttempt=5000.0), "deferred")
        self.assertEqual(self.queue.entries("deferred"), [queueId])
        scanned = yield self.queue.scan()
        self.assertEqual(scanned, [(queueId, "deferred", 5000.0)])
        listed = yield self.queue.listQueued()
        self.assertEqual(listed, ({queueId: ["deferred"]}, []))
        yield self.assertFailure(self.queue.update("0" * 18, "deferred", current), ValueError)
        yield self.queue.remove(queueId, "deferred")
        self.assertEqual(self.queue.entries("deferred"), [])
        yield self.assertFailure(self.queue.remove(queueId, "deferred"), FileNotFoundError)
        self.assertEqual((yield self.queue.scan()), [])

    @defer.inlineCallbacks
    def test_queueFileReadsAsOne(self):
        """The deliverer and the DSN writer read the message from its queue file."""
        queueId = yield self.queue.submit(record(), DATA)
        path = self.queue.queueFile(queueId, "incoming")
        self.assertEqual(readData(path), DATA)
        self.assertEqual(readRecord(path, queueId).recipients[0].address, "b@example.org")
        self.assertEqual(self.queue.load(queueId)[0].queueId, queueId)
        self.assertEqual(self.queue.readData(queueId), DATA)
        self.assertRaises(KeyError, self.queue.load, "0" * 18)


class SpoolContractTests(QueueContractMixin, unittest.TestCase):
    def makeQueue(self):
        spool = Spool(self.directory, 0, reactor)
        spool.startService()
        self.addCleanup(spool.stopService)
        return spool


class MemoryQueueContractTests(QueueContractMixin, unittest.TestCase):
    def makeQueue(self):
        return MemoryQueue(self.directory, reactor)


class ImmediateMemoryQueueContractTests(QueueContractMixin, unittest.TestCase):
    """Without a reactor every answer has already fired."""

    answersAtOnce = True

    def makeQueue(self):
        return MemoryQueue(self.directory)

    def test_answersAtOnce(self):
        d = self.queue.submit(record(), DATA)
        self.assertEqual(self.successResultOf(d), self.queue.entries("incoming")[0])
