"""
The scheduler as a unit: a L{relayd.testing.memoryqueue.MemoryQueue} (a
real spool on disk where the test is about the disk: L{SpoolTroubleCase}),
a L{task.Clock} driving the schedule, and a scripted deliverer standing in
for the next hops (the
end-to-end tests in test_delivery_e2e.py use real DNS and real SMTP sinks).
"""

import email
import email.policy
import errno
import os
import random
import shutil
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.delivery.attempt import AttemptResult, RecipientResult
from relayd.delivery.routing import Destination, Hop, RoutingError
from relayd.ops.metrics import Metrics
from relayd.queue.record import encodeTrailer, readData
from relayd.queue.scheduler import Scheduler, backoff
from relayd.queue.spool import Spool, envelopeRecord
from relayd.reply import Reply
from relayd.testing.memoryqueue import MemoryQueue
from tests.queue.test_diskfull import mountTmpfs


class ScriptedRouter:
    def __init__(self):
        self.errors = {}

    def route(self, domain):
        if domain in self.errors:
            return defer.fail(self.errors[domain])
        hop = Hop(host=f"mx.{domain}", address="127.0.0.1", port=25, tls="none")
        return defer.succeed(Destination(key=f"mx:{domain}", hops=(hop,)))


class ScriptedDeliverer:
    """
    Answers per recipient from C{script}: address to a list of statuses,
    one per attempt (the last repeats); default delivered.
    """

    def __init__(self):
        self.script = {}
        self.calls = []
        self.hold = False
        self.held = []
        self.dsn = []
        self.dsnPassed = False
        self.broken = set()  # destination keys whose attempt fails (a bug)

    def deliver(
        self,
        destination,
        sender,
        recipients,
        dataPath,
        size,
        queueId=None,
        dsn=None,
        smtputf8=False,
    ):
        self.calls.append((destination.key, sender, list(recipients)))
        if destination.key in self.broken:
            return defer.fail(RuntimeError(f"bug delivering to {destination.key}"))
        self.dsn.append(dsn)
        self.smtputf8 = smtputf8
        results = []
        for address in recipients:
            steps = self.script.get(address, ["delivered"])
            status = steps.pop(0) if len(steps) > 1 else steps[0]
            code, enhanced = {
                "delivered": (250, "2.0.0"),
                "deferred": (451, "4.7.1"),
                "failed": (550, "5.1.1"),
            }[status]
            reply = Reply(code, enhanced, "scripted")
            results.append(
                RecipientResult(
                    address, status, reply, destination.hops[0].host, "end of DATA", self.dsnPassed
                )
            )
        result = AttemptResult(results=results, hop=destination.hops[0], tls=None)
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, result))
            return d
        return defer.succeed(result)

    def stop(self):
        return defer.succeed(None)


class SchedulerTestCase(unittest.TestCase):
    """A real spool in a temporary directory and a scheduler on a L{Clock}."""

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-sched-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.spool = self.makeQueue()
        self.router = ScriptedRouter()
        self.deliverer = ScriptedDeliverer()
        self.scheduler = None

    def makeQueue(self):
        """The queue the scheduler runs on: in memory; the spool's own tests cover the disk."""
        return MemoryQueue(self.directory, reactor)

    def queueBusy(self):
        return self.spool.pending

    def start(self, **options):
        options.setdefault("retryInitial", 300)
        options.setdefault("retryMax", 4200)
        options.setdefault("lifetime", 5 * 86400)
        options.setdefault("delayWarning", 0)
        self.scheduler = Scheduler(
            spool=self.spool,
            router=self.router,
            deliverer=self.deliverer,
            clock=self.clock,
            hostname="relayd.test",
            random=random.Random(1),
            **options,
        )
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        return self.scheduler.whenIndexed()

    def submit(self, sender="a@example.org", recipients=("b@example.org",)):
        record = self.envelope("", sender, recipients, 40)
        return self.spool.submit(record, b"Subject: test\r\nFrom: a@example.org\r\n\r\nbody\r\n")

    def envelope(self, queueId, sender, recipients, size):
        """The envelope of a test message that arrives now."""
        return envelopeRecord(
            queueId=queueId,
            sender=sender,
            recipients=list(recipients),
            arrival=self.clock.seconds(),
            size=size,
            body="7BIT",
            client="127.0.0.1",
            helo="h",
            user=None,
            listener="relay",
        )

    @defer.inlineCallbacks
    def settle(self):
        """Let the spool's threads and the scheduler's callbacks run."""
        for _ in range(500):
            yield deferLater(reactor, 0.005, lambda: None)
            if self.scheduler is not None and not self.scheduler._inFlight and not self.queueBusy():
                yield deferLater(reactor, 0.01, lambda: None)
                if not self.scheduler._inFlight and not self.queueBusy():
                    return

    def queued(self):
        return {state: self.spool.entries(state) for state in ("incoming", "active", "deferred")}


class SchedulerTests(SchedulerTestCase):
    @defer.inlineCallbacks
    def test_newMessageAttemptedAtOnce(self):
        yield self.start()
        yield self.submit()
        yield self.settle()
        self.assertEqual(
            self.deliverer.calls, [("mx:example.org", "a@example.org", ["b@example.org"])]
        )
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_recipientsGroupedByDestination(self):
        yield self.start()
        yield self.submit(recipients=("x@a.test", "y@b.test", "z@a.test"))
        yield self.settle()
        calls = sorted(self.deliverer.calls)
        self.assertEqual(
            calls,
            [
                ("mx:a.test", "a@example.org", ["x@a.test", "z@a.test"]),
                ("mx:b.test", "a@example.org", ["y@b.test"]),
            ],
        )

    @defer.inlineCallbacks
    def assertBugDefers(self, recipients, broken):
        """
        The deliverer fails (a bug) for the C{broken} destinations: their
        recipients are deferred with an internal error and the others
        delivered, whether the message had one destination or several.
        """
        self.deliverer.broken = set(broken)
        yield self.start()
        queueId = yield self.submit(recipients=recipients)
        yield self.settle()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), len(broken))
        self.assertEqual(self.queued()["deferred"], [queueId])
        record, _ = self.spool.load(queueId)
        states = {r.address: (str(r.state), r.lastReply) for r in record.recipients}
        for address in recipients:
            if "mx:" + address.rpartition("@")[2] in broken:
                self.assertEqual(states[address], ("deferred", "451 4.3.0 internal error"))
            else:
                self.assertEqual(states[address][0], "delivered")

    def test_delivererBugOneDestination(self):
        return self.assertBugDefers(("x@a.test",), {"mx:a.test"})

    def test_delivererBugOneOfTwoDestinations(self):
        return self.assertBugDefers(("x@a.test", "y@b.test"), {"mx:a.test"})

    @defer.inlineCallbacks
    def test_deferredThenRetriedWithBackoff(self):
        self.deliverer.script["b@example.org"] = ["deferred", "deferred", "delivered"]
        yield self.start()
        queueId = yield self.submit()
        yield self.settle()
        self.assertEqual(self.queued()["deferred"], [queueId])
        record, _ = self.spool.load(queueId)
        self.assertEqual(record.recipients[0].state, "deferred")
        self.assertIn("451 4.7.1", record.recipients[0].lastReply)
        first = record.nextAttempt - self.clock.seconds()
        self.assertTrue(270 <= first <= 330, first)
        self.clock.advance(first - 1)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 1)
        self.clock.advance(2)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 2)
        record, _ = self.spool.load(queueId)
        second = record.nextAttempt - self.clock.seconds()
        self.assertTrue(540 <= second <= 660, second)
        self.clock.advance(second + 1)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 3)
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_mixedOutcome(self):
        """250 / 451 / 550 in one transaction: each handled on its own."""
        self.deliverer.script = {
            "ok@x.test": ["delivered"],
            "later@x.test": ["deferred", "delivered"],
            "no@x.test": ["failed"],
        }
        yield self.start()
        queueId = yield self.submit(recipients=("ok@x.test", "later@x.test", "no@x.test"))
        yield self.settle()
        record, _ = self.spool.load(queueId)
        states = {r.address: r.state for r in record.recipients}
        self.assertEqual(
            states, {"ok@x.test": "delivered", "later@x.test": "deferred", "no@x.test": "failed"}
        )
        # The DSN went out at once, to the sender, from <>.
        dsnCalls = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(dsnCalls, [("mx:example.org", "", ["a@example.org"])])
        # The retry carries only the deferred recipient.
        self.clock.advance(400)
        yield self.settle()
        self.assertEqual(self.deliverer.calls[-1], ("mx:x.test", "a@example.org", ["later@x.test"]))
        self.assertEqual(self.queued()["deferred"], [])

    @defer.inlineCallbacks
    def test_dsnContent(self):
        self.deliverer.script = {"no@x.test": ["failed"], "a@example.org": ["deferred"]}
        yield self.start()
        yield self.submit(recipients=("no@x.test",))
        yield self.settle()
        [dsnId] = self.spool.entries("deferred")
        record, path = self.spool.load(dsnId)
        self.assertEqual(
            (record.sender, [r.address for r in record.recipients]), ("", ["a@example.org"])
        )
        data = readData(path)
        message = email.message_from_bytes(
            data[data.index(b"From: ") :], policy=email.policy.default
        )
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        status = message.get_payload()[1]
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        fields = status.get_payload()[1]
        self.assertEqual(fields["Final-Recipient"], "rfc822; no@x.test")
        self.assertEqual(fields["Action"], "failed")
        self.assertEqual(fields["Status"], "5.1.1")

    @defer.inlineCallbacks
    def test_permanentRoutingErrorBounces(self):
        self.router.errors["gone.test"] = RoutingError(
            True, "5.1.2", "Host or domain name not found"
        )
        self.router.errors["flaky.test"] = RoutingError(False, "4.4.3", "DNS lookup failed")
        yield self.start()
        queueId = yield self.submit(recipients=("x@gone.test", "y@flaky.test"))
        yield self.settle()
        record, _ = self.spool.load(queueId)
        states = {r.address: (r.state, r.status) for r in record.recipients}
        self.assertEqual(
            states, {"x@gone.test": ("failed", "5.1.2"), "y@flaky.test": ("deferred", "4.4.3")}
        )

    @defer.inlineCallbacks
    def test_lifetimeExpiry(self):
        self.deliverer.script["b@example.org"] = ["deferred"]
        self.deliverer.script["a@example.org"] = ["deferred"]
        yield self.start(lifetime=1000, retryInitial=300, retryMax=300)
        queueId = yield self.submit()
        yield self.settle()
        for _ in range(6):
            self.clock.advance(330)
            yield self.settle()
        with self.assertRaises(KeyError):
            self.spool.load(queueId)
        [dsnId] = self.spool.entries("deferred")
        _record, path = self.spool.load(dsnId)
        self.assertIn(b"Status: 4.4.7", readData(path))

    @defer.inlineCallbacks
    def test_delayWarningOnce(self):
        self.deliverer.script["b@example.org"] = ["deferred"]
        self.deliverer.script["a@example.org"] = ["deferred"]
        yield self.start(delayWarning=500, retryInitial=300, retryMax=300)
        queueId = yield self.submit()
        yield self.settle()
        for _ in range(4):
            self.clock.advance(330)
            yield self.settle()
        dsns = [q for q in self.spool.entries("deferred") if q != queueId]
        self.assertEqual(len(dsns), 1)
        _, path = self.spool.load(dsns[0])
        self.assertIn(b"Action: delayed", readData(path))
        record, _ = self.spool.load(queueId)
        self.assertTrue(record.delayWarned)

    @defer.inlineCallbacks
    def test_neverBounceABounce(self):
        self.deliverer.script["b@example.org"] = ["failed"]
        yield self.start()
        yield self.submit(sender="")
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_restartRepeatsNothingDeliveredForgetsNothingPending(self):
        self.deliverer.script = {
            "ok@x.test": ["delivered"],
            "later@x.test": ["deferred", "delivered"],
        }
        yield self.start()
        queueId = yield self.submit(recipients=("ok@x.test", "later@x.test"))
        yield self.settle()
        yield self.scheduler.stopService()
        self.deliverer.calls.clear()
        # A new scheduler on the same spool: the index is rebuilt from disk.
        yield self.start()
        self.clock.advance(400)
        yield self.settle()
        self.assertEqual(self.deliverer.calls, [("mx:x.test", "a@example.org", ["later@x.test"])])
        with self.assertRaises(KeyError):
            self.spool.load(queueId)

    @defer.inlineCallbacks
    def test_perDestinationLimit(self):
        self.deliverer.hold = True
        yield self.start(perDestination=2, concurrency=10)
        for i in range(5):
            yield self.submit(recipients=(f"r{i}@slow.test",))
        yield self.submit(recipients=("r@fast.test",))
        yield deferLater(reactor, 0.2, lambda: None)
        keys = [c[0] for c in self.deliverer.calls]
        self.assertEqual(keys.count("mx:slow.test"), 2)
        self.assertEqual(keys.count("mx:fast.test"), 1)
        self.deliverer.hold = False
        while self.deliverer.held:
            d, result = self.deliverer.held.pop(0)
            d.callback(result)
            yield deferLater(reactor, 0.05, lambda: None)
        yield self.settle()
        self.assertEqual([c[0] for c in self.deliverer.calls].count("mx:slow.test"), 5)

    @defer.inlineCallbacks
    def test_globalConcurrency(self):
        self.deliverer.hold = True
        yield self.start(perDestination=10, concurrency=3)
        for i in range(6):
            yield self.submit(recipients=(f"r@d{i}.test",))
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.deliverer.calls), 3)
        self.deliverer.hold = False
        while self.deliverer.held:
            d, result = self.deliverer.held.pop(0)
            d.callback(result)
            yield deferLater(reactor, 0.05, lambda: None)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 6)


class SpoolTroubleCase(SchedulerTestCase):
    """
    The spool fails under the scheduler, for real: a state directory that
    is not a directory for a while (a failed rename, as EACCES or EROFS
    would make it, and which root cannot chmod its way into), a file
    system that is full, a message the index never heard of.  Nothing that
    got its 250 is left behind, nothing delivered is sent twice, and each
    failure is one log line and a count, not a traceback.
    """

    def makeQueue(self):
        """A real spool: these tests break its directories and fill its disk."""
        spool = Spool(self.directory, 0, reactor)
        spool.startService()
        self.addCleanup(spool.stopService)
        return spool

    def queueBusy(self):
        return self.spool._busy

    def setUp(self):
        super().setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.metrics = Metrics()

    def breakDirectory(self, state):
        """Put a file where C{<spool>/<state>/} was: renames into it fail (ENOTDIR)."""
        path = os.path.join(self.directory, state)
        os.rename(path, path + ".away")
        with open(path, "w") as f:
            f.write("not a directory\n")
        self.addCleanup(self.repairDirectory, state)

    def repairDirectory(self, state):
        path = os.path.join(self.directory, state)
        if os.path.isdir(path + ".away"):
            os.unlink(path)
            os.rename(path + ".away", path)

    def errors(self, queueId):
        return [
            e
            for e in self.events
            if e.get("queue_id") == queueId and e["log_level"] >= LogLevel.error
        ]

    def count(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels) or 0

    def placeByHand(self, sender):
        """
        Write a queue file for C{sender} to b@example.org into incoming/
        behind the spool's back (as a restore, or another process, would);
        its queue id.
        """
        queueId = self.spool.newQueueId()
        record = self.envelope(queueId, sender, ["b@example.org"], 8)
        with open(os.path.join(self.directory, "incoming", queueId), "wb") as f:
            f.write(b"\r\nbody\r\n" + encodeTrailer(record, 8))
        return queueId


class SpoolTroubleTests(SpoolTroubleCase):
    @defer.inlineCallbacks
    def test_failedMoveRetriedWithBackoff(self):
        """
        incoming/ to active/ fails: the message stays in incoming/ and in
        the schedule, comes back with backoff, and goes once the spool
        works again; each failure is one error line, no traceback.
        """
        yield self.start(metrics=self.metrics)
        self.metrics.watchQueue(self.scheduler)
        self.breakDirectory("active")
        queueId = yield self.submit()
        yield self.settle()
        self.assertEqual(self.deliverer.calls, [])
        self.assertEqual(self.spool.entries("incoming"), [queueId])
        [error] = self.errors(queueId)
        self.assertNotIn("log_failure", error)
        text = formatEvent(error)
        self.assertIn("stuck in incoming: cannot move it from incoming to active", text)
        self.assertIn("Not a directory", text)
        self.assertEqual(self.count("relayd_spool_errors_total", operation="move"), 1)
        self.assertEqual(self.count("relayd_queue_stuck_messages"), 1)
        # The first retry (300 s +-10%) fails too; the next waits longer.
        self.clock.advance(331)
        yield self.settle()
        self.assertEqual(len(self.errors(queueId)), 2)
        self.clock.advance(500)
        yield self.settle()
        self.assertEqual(len(self.errors(queueId)), 2)
        self.repairDirectory("active")
        self.clock.advance(200)
        yield self.settle()
        self.assertEqual(
            self.deliverer.calls, [("mx:example.org", "a@example.org", ["b@example.org"])]
        )
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        self.assertEqual(self.count("relayd_spool_errors_total", operation="move"), 2)
        self.assertEqual(self.count("relayd_queue_stuck_messages"), 0)

    @defer.inlineCallbacks
    def test_failedReadRetriedWithBackoff(self):
        """
        A deferred message whose envelope cannot be read when its retry
        comes stays scheduled (it was dropped from the index) and goes once
        the spool can be read again.
        """
        self.deliverer.script["b@example.org"] = ["deferred", "delivered"]
        yield self.start(metrics=self.metrics)
        queueId = yield self.submit()
        yield self.settle()
        self.assertEqual(self.spool.entries("deferred"), [queueId])
        self.breakDirectory("deferred")
        self.clock.advance(331)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 1)
        [error] = self.errors(queueId)
        self.assertNotIn("log_failure", error)
        self.assertIn("cannot read its envelope in deferred", formatEvent(error))
        self.assertEqual(self.count("relayd_spool_errors_total", operation="read"), 1)
        self.repairDirectory("deferred")
        self.clock.advance(700)
        yield self.settle()
        self.assertEqual(len(self.deliverer.calls), 2)
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_sweepFindsWhatTheIndexLost(self):
        """
        A message on disk that the schedule does not know (here: put in
        place by hand, as by a restore into a running relayd) is found by
        the sweep's directory listing, counted as stuck, logged and sent.
        """
        yield self.start(metrics=self.metrics, sweepInterval=60)
        queueId = self.placeByHand("a@example.org")
        self.clock.advance(30)
        yield self.settle()
        self.assertEqual(self.deliverer.calls, [])
        self.clock.advance(30)
        yield self.settle()
        self.assertEqual(
            self.deliverer.calls, [("mx:example.org", "a@example.org", ["b@example.org"])]
        )
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        self.assertEqual(self.count("relayd_queue_stuck_total"), 1)
        [warning] = [
            e
            for e in self.events
            if e.get("queue_id") == queueId and e["log_level"] == LogLevel.warn
        ]
        self.assertIn("not in the schedule", formatEvent(warning))


class OwnCommitTests(SpoolTroubleCase):
    """
    A message this process committed is attempted with the envelope it
    committed, not read back from its queue file; a receiver process's, or
    one an operator withdrew meanwhile, is read from disk.
    """

    def spyOnReads(self):
        reads = []
        read = self.spool.read

        def spy(queueId, state):
            reads.append((queueId, state))
            return read(queueId, state)

        self.spool.read = spy
        return reads

    @defer.inlineCallbacks
    def test_ownCommitNotReadBack(self):
        yield self.start()
        reads = self.spyOnReads()
        yield self.submit(recipients=("b@example.org", "c@example.net"))
        yield self.settle()
        self.assertEqual(reads, [])
        self.assertEqual(
            sorted(self.deliverer.calls),
            [
                ("mx:example.net", "a@example.org", ["c@example.net"]),
                ("mx:example.org", "a@example.org", ["b@example.org"]),
            ],
        )
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        self.assertEqual(self.scheduler._committed, {})

    @defer.inlineCallbacks
    def test_retryReadsFromDisk(self):
        """Only the first attempt takes the committed envelope."""
        self.deliverer.script["b@example.org"] = ["deferred", "delivered"]
        yield self.start()
        reads = self.spyOnReads()
        queueId = yield self.submit()
        yield self.settle()
        self.assertEqual((reads, self.spool.entries("deferred")), ([], [queueId]))
        self.clock.advance(331)
        yield self.settle()
        self.assertEqual(reads, [(queueId, "deferred")])
        self.assertEqual(len(self.deliverer.calls), 2)
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_receiversMessageRead(self):
        """A message another process committed (announced) is read from disk."""
        yield self.start()
        reads = self.spyOnReads()
        queueId = self.placeByHand("r@example.org")
        self.spool.announce(queueId)
        yield self.settle()
        self.assertEqual(reads, [(queueId, "incoming")])
        self.assertEqual(
            self.deliverer.calls, [("mx:example.org", "r@example.org", ["b@example.org"])]
        )

    @defer.inlineCallbacks
    def test_withdrawnReadFromDisk(self):
        """
        An operator withdrew the message before its first attempt (to move
        or change its files): when it is back, its envelope comes from disk.
        """
        yield self.start(concurrency=1)
        self.deliverer.hold = True
        yield self.submit(recipients=("first@example.org",))
        yield self.settle()
        reads = self.spyOnReads()
        queueId = yield self.submit(recipients=("second@example.org",))
        # The spool tells the scheduler just after the committer's own
        # callback (which runs this test on), in the same reactor turn.
        self.assertNotIn(queueId, self.scheduler._committed)
        yield deferLater(reactor, 0, lambda: None)
        self.assertIn(queueId, self.scheduler._committed)
        self.assertEqual(self.scheduler.withdraw(queueId)[0], "incoming")
        self.assertEqual(self.scheduler._committed, {})
        self.scheduler.reschedule(queueId, "incoming")
        self.deliverer.hold = False
        held, result = self.deliverer.held.pop()
        held.callback(result)
        yield self.settle()
        self.assertEqual(reads, [(queueId, "incoming")])
        self.assertEqual(
            [recipients for _, _, recipients in self.deliverer.calls],
            [["first@example.org"], ["second@example.org"]],
        )


class FullSpoolTests(SpoolTroubleCase):
    """The scheduler's spool on a tiny tmpfs that the test fills up."""

    def setUp(self):
        mounted = mountTmpfs(self, "256k")
        super().setUp()
        self.spool.stopService()
        self.spool = Spool(mounted, 0, reactor)
        self.spool.startService()
        self.addCleanup(self.spool.stopService)
        self.directory = mounted

    def fill(self):
        """Take every free block of the file system."""
        path = os.path.join(self.directory, "filler")
        self.addCleanup(self.free)
        with open(path, "wb", buffering=0) as f:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise

    def free(self):
        if os.path.exists(os.path.join(self.directory, "filler")):
            os.unlink(os.path.join(self.directory, "filler"))

    @defer.inlineCallbacks
    def test_fullSpoolNeverResendsDelivered(self):
        """
        One recipient delivered, one deferred, and the outcome cannot be
        written: the delivered one is never sent again, the retries back
        off, and once space is back the rest goes and the message leaves.
        """
        self.deliverer.script = {"ok@x.test": ["delivered"], "later@x.test": ["deferred"]}
        self.deliverer.hold = True
        yield self.start(metrics=self.metrics, retryInitial=5, retryMax=300)
        self.metrics.watchQueue(self.scheduler)
        queueId = yield self.submit(recipients=("ok@x.test", "later@x.test"))
        yield deferLater(reactor, 0.1, lambda: None)
        self.fill()
        self.deliverer.hold = False
        [(d, result)] = self.deliverer.held
        self.deliverer.held.clear()
        d.callback(result)
        yield self.settle()
        self.assertEqual(self.spool.entries("active"), [queueId])
        for _ in range(40):
            self.clock.advance(1)
            yield self.settle()
        sentTo = [r for call in self.deliverer.calls for r in call[2]]
        self.assertEqual(sentTo.count("ok@x.test"), 1)
        # 5, 10, 20 s: at most three retries in 40 s, not eight.
        self.assertIn(sentTo.count("later@x.test"), (2, 3, 4))
        errors = self.errors(queueId)
        self.assertEqual(len(errors), sentTo.count("later@x.test"))
        for error in errors:
            self.assertNotIn("log_failure", error)
            self.assertIn("No space left on device", formatEvent(error))
        self.assertEqual(self.count("relayd_delivery_outcomes_unrecorded_total"), len(errors))
        self.assertEqual(self.count("relayd_queue_stuck_messages"), 1)
        # Space again: the deferred recipient goes, the message leaves.
        self.free()
        self.deliverer.script["later@x.test"] = ["delivered"]
        self.clock.advance(400)
        yield self.settle()
        sentTo = [r for call in self.deliverer.calls for r in call[2]]
        self.assertEqual(sentTo.count("ok@x.test"), 1)
        self.assertEqual(self.deliverer.calls[-1], ("mx:x.test", "a@example.org", ["later@x.test"]))
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        self.assertEqual(self.count("relayd_queue_stuck_messages"), 0)

    @defer.inlineCallbacks
    def test_stopWithUnrecordedOutcomesSaysSo(self):
        """
        Stopping while outcomes are only in memory loses them (at-least-once
        allows the duplicate after the restart): one warning names the message.
        """
        self.deliverer.script = {"ok@x.test": ["delivered"], "later@x.test": ["deferred"]}
        self.deliverer.hold = True
        yield self.start(metrics=self.metrics)
        queueId = yield self.submit(recipients=("ok@x.test", "later@x.test"))
        yield deferLater(reactor, 0.1, lambda: None)
        self.fill()
        self.deliverer.hold = False
        [(d, result)] = self.deliverer.held
        self.deliverer.held.clear()
        d.callback(result)
        yield self.settle()
        self.assertEqual(self.count("relayd_delivery_outcomes_unrecorded_total"), 1)
        yield self.scheduler.stopService()
        [warning] = [
            e
            for e in self.events
            if e.get("queue_id") == queueId and e["log_level"] == LogLevel.warn
        ]
        self.assertIn("outcomes the spool did not record", formatEvent(warning))

    @defer.inlineCallbacks
    def test_fullSpoolKeepsFailedRecipientUntilItsDSN(self):
        """
        One recipient delivered, one refused for good, and the DSN cannot
        be queued: the refused one is not final without its DSN, the
        delivered one is never sent again; with space back, the DSN is
        queued and the message leaves.
        """
        self.deliverer.script = {"ok@x.test": ["delivered"], "no@x.test": ["failed"]}
        self.deliverer.hold = True
        yield self.start(metrics=self.metrics, retryInitial=5, retryMax=300)
        queueId = yield self.submit(recipients=("ok@x.test", "no@x.test"))
        yield deferLater(reactor, 0.1, lambda: None)
        self.fill()
        self.deliverer.hold = False
        [(d, result)] = self.deliverer.held
        self.deliverer.held.clear()
        d.callback(result)
        yield self.settle()
        errors = self.errors(queueId)
        self.assertTrue(errors)
        self.assertIn("cannot queue the non-delivery notice", formatEvent(errors[0]))
        self.assertEqual(self.count("relayd_spool_errors_total", operation="bounce"), 1)
        self.clock.advance(30)
        yield self.settle()
        self.free()
        self.clock.advance(400)
        yield self.settle()
        sentTo = [r for call in self.deliverer.calls if call[1] for r in call[2]]
        self.assertEqual(sentTo.count("ok@x.test"), 1)
        dsnCalls = [c for c in self.deliverer.calls if c[1] == ""]
        self.assertEqual(dsnCalls, [("mx:example.org", "", ["a@example.org"])])
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        for error in self.errors(queueId):
            self.assertNotIn("log_failure", error)


def test_backoff():
    rng = random.Random(3)
    delays = [backoff(n, 300, 4200, rng) for n in range(1, 8)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(300 * 2 ** (n - 1), 4200)
        assert 0.9 * nominal <= delay <= 1.1 * nominal
    assert delays[-1] <= 4200 * 1.1
