"""
Tests for L{relayd.queue.journal}: commits through the journal, segment
rotation and retirement, and recovery at startup, on real directories.

A reboot cannot be made in a test; it is what a segment whose header holds
another boot id means to the spool, so the tests write such a segment (a
copy of a real one with its boot id changed) and take away or damage the
queue files a power loss could have taken.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import uuid

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, fail, gatherResults, inlineCallbacks

from relayd.ops.logs import Logger
from relayd.queue import journal as journalModule
from relayd.queue import spool as spoolModule
from relayd.queue.aio import AsyncSync
from relayd.queue.journal import (
    TOMBSTONES,
    AsyncAppend,
    GroupAppend,
    Tombstones,
    bootId,
    encodeRecord,
    readSegment,
    readTombstones,
    segmentsOf,
)
from relayd.queue.record import readRecord
from relayd.queue.spool import JOURNAL_MESSAGE_LIMIT, Spool
from relayd.testing.powercut import LoopFileSystem
from tests.queue.test_spool import MESSAGE, SpoolTestMixin, TestCase, listing, record

BIG = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * 100


class JournalCommitTests(SpoolTestMixin, TestCase):
    """Small messages commit through the journal; large ones do not."""

    def setUp(self):
        if bootId() is None:
            self.skipTest("no boot id on this system: the spool commits without a journal")

    def segments(self, spool):
        return segmentsOf(spool.directory)

    @inlineCallbacks
    def test_commitThroughJournal(self):
        """
        Twenty concurrent commits are all durable and byte-exact in
        C{incoming/}; the one segment holds each queue file's octets, in
        fewer syncs than messages, and no fsync of C{incoming/} ran.
        """
        spool = self.startSpool()
        messages = [self.receive(spool, MESSAGE + b"%d\r\n" % i) for i in range(20)]
        ids = yield gatherResults([spool.commit(m, record(m.queueId, m.size)) for m in messages])
        self.assertEqual(sorted(ids), spool.entries("incoming"))
        self.assertEqual(listing(os.path.join(spool.directory, "tmp")), [])
        [path] = self.segments(spool)
        boot, records = readSegment(path)
        self.assertEqual(boot, bootId())
        found = dict(records)
        self.assertEqual(sorted(found), sorted(ids))
        for queueId in ids:
            with open(os.path.join(spool.directory, "incoming", queueId), "rb") as f:
                self.assertEqual(found[queueId], f.read())
        self.assertEqual(spool.readData(ids[3]), MESSAGE + b"3\r\n")
        self.assertLessEqual(spool._journal.current.writer.count, 20)
        self.assertEqual(spool.batchCount, 0)
        # What the metrics report (relayd.ops.metrics.JournalCollector),
        # and the same after the segment is retired by the stop.
        self.assertEqual(spool.journalMode, "aio" if self.asyncSync else "threads")
        self.assertEqual(spool.journalCommits, 20)
        syncs = spool.journalSyncs
        self.assertTrue(1 <= syncs <= 20, syncs)
        yield spool.stopService()
        self.assertEqual(segmentsOf(spool.directory), [])
        self.assertEqual((spool.journalCommits, spool.journalSyncs), (20, syncs))

    @inlineCallbacks
    def test_syncedWhere(self):
        """
        The segments are synced through Linux AIO from the reactor thread
        (L{AsyncAppend}), or, with that turned off, in the spool's threads
        (L{GroupAppend}).
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield spool.commit(incoming, record(incoming.queueId))
        writer = spool._journal.current.writer
        self.assertIsInstance(writer, AsyncAppend if self.asyncSync else GroupAppend)
        self.assertEqual(spool._journal.sync is not None, self.asyncSync)

    @inlineCallbacks
    def test_writtenOutEditedAndLarge(self):
        """
        A message partly written out before its commit (larger than the
        write buffer) or flushed for a policy to read, and one whose header
        a modifier edited, commit through the journal too, byte-exact; one
        larger than L{JOURNAL_MESSAGE_LIMIT} is fsync'd on its own (a
        directory fsync of C{incoming/}) and has no record in the journal.
        """
        self.assertLess(len(BIG), JOURNAL_MESSAGE_LIMIT)
        self.assertGreater(len(BIG) * 11, JOURNAL_MESSAGE_LIMIT)
        spool = self.startSpool()
        written = self.receive(spool, BIG)
        flushed = self.receive(spool)
        flushed.flush()
        edited = self.receive(spool)
        edited.replaceHeader(
            b"X-Edited: yes\r\nSubject: test\r\n\r\n", MESSAGE.index(b"\r\n\r\n") + 4
        )
        huge = self.receive(spool, BIG * 11)
        for m in (written, flushed, edited, huge):
            yield spool.commit(m, record(m.queueId, m.size))
        self.assertEqual(spool.batchCount, 1)
        [path] = self.segments(spool)
        found = dict(readSegment(path)[1])
        self.assertEqual(sorted(found), sorted([written.queueId, flushed.queueId, edited.queueId]))
        for queueId in found:
            with open(os.path.join(spool.directory, "incoming", queueId), "rb") as f:
                self.assertEqual(found[queueId], f.read())
        self.assertEqual(spool.readData(written.queueId), BIG)
        self.assertEqual(spool.readData(flushed.queueId), MESSAGE)
        self.assertTrue(spool.readData(edited.queueId).startswith(b"X-Edited: yes\r\n"))
        self.assertEqual(spool.readData(huge.queueId), BIG * 11)
        self.assertEqual(
            spool.entries("incoming"),
            sorted(m.queueId for m in (written, flushed, edited, huge)),
        )

    @inlineCallbacks
    def test_rotationRetires(self):
        """
        A full segment is rotated; once its commits have finished it is
        retired (deleted), its messages staying in the spool.  Stopping
        the spool retires the last one: no segment is left.
        """
        spool = self.startSpool()
        spool._journal.segmentSize = 3 * len(MESSAGE) + 2048
        ids = []
        for _ in range(4):
            batch = [self.receive(spool) for _ in range(3)]
            ids += yield gatherResults([spool.commit(m, record(m.queueId)) for m in batch])
        yield spool._whenIdle()
        self.assertEqual(len(self.segments(spool)), 1)
        self.assertEqual(spool.entries("incoming"), sorted(ids))
        yield spool.stopService()
        self.assertEqual(self.segments(spool), [])
        self.assertEqual(spool.entries("incoming"), sorted(ids))

    @inlineCallbacks
    def test_idleSegmentRotated(self):
        """
        A segment that stops receiving records is rotated and retired by
        the timer, so that none lingers while no mail comes.
        """
        spool = self.startSpool()
        incoming = self.receive(spool)
        yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(len(self.segments(spool)), 1)
        spool._journal.current.started -= journalModule.SEGMENT_AGE
        spool._rotateIdle()
        yield spool._whenIdle()
        self.assertEqual(self.segments(spool), [])
        self.assertIsNone(spool._journal.current)

    @inlineCallbacks
    def test_syncFails(self):
        """
        When the segment's sync fails, every commit it covered fails and
        its queue file is taken out again; the segment is not written to
        again, and the next commit goes to a new one and succeeds.
        """
        spool = self.startSpool()
        sync = spool._journal.sync
        # Where the spool's threads sync, or the kernel through AIO.
        where, name = (journalModule.os, "fdatasync") if sync is None else (sync, "fdatasync")
        realSync = getattr(where, name)

        def failing(fd):
            error = OSError(errno.EIO, "injected fdatasync failure")
            if sync is None:
                raise error
            return fail(error)

        self.patch(where, name, failing)
        yield self.assertAllFailLeavingNothing(spool, 6, errno.EIO)
        broken = spool._journal.current
        self.assertIsNotNone(broken.writer.broken)

        self.patch(where, name, realSync)
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId])
        self.assertIsNot(spool._journal.current, broken)


class ThreadedJournalCommitTests(JournalCommitTests):
    """The same, with the journal synced in the spool's threads (no AIO)."""

    asyncSync = False


class GroupAppendTests(TestCase):
    """L{GroupAppend} directly, with threads appending at the same time."""

    def test_appendsInOrderAndShareSyncs(self):
        """
        Records appended by many threads are all in the file, each whole,
        and fewer syncs than records ran when they came together.
        """
        path = self.mktemp()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        writer = GroupAppend(fd, 0, lambda: None)
        gate = threading.Barrier(16)

        def append(i):
            gate.wait()
            writer.append(encodeRecord(f"{i:018d}", b"payload %d" % i))

        threads = [threading.Thread(target=append, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with open(path, "rb") as f:
            data = f.read()
        self.assertEqual(writer.end, len(data))
        self.assertLess(writer.count, 16)
        offset, found = 0, []
        while offset < len(data):
            length = int(data[offset + 19 : offset + 27], 16)
            found.append(data[offset + 35 : offset + 35 + length])
            offset += 35 + length
        self.assertEqual(sorted(found), sorted(b"payload %d" % i for i in range(16)))

    def test_brokenAfterFailure(self):
        """After a failed write, every later append fails at once."""
        path = self.mktemp()
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)  # writes fail: EBADF
        self.addCleanup(os.close, fd)
        writer = GroupAppend(fd, 0, lambda: None)
        self.assertRaises(OSError, writer.append, b"x")
        self.assertIsNotNone(writer.broken)
        error = self.assertRaises(OSError, writer.append, b"y")
        self.assertEqual(error.errno, errno.EBADF)


class AsyncAppendTests(TestCase):
    """L{AsyncAppend} directly, on a real file synced through Linux AIO."""

    def setUp(self):
        self.directory = os.path.dirname(self.mktemp())
        self.path = os.path.join(self.directory, "segment")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.fd)
        self.sync = AsyncSync(reactor, self.directory)
        self.addCleanup(self.sync.close)

    @inlineCallbacks
    def test_appendsInOrderAndShareSyncs(self):
        """
        Sixteen records appended in one reactor turn are in the file in
        that order, each whole; the first one's sync starts at once, the
        fifteen others share the next one.
        """
        writer = AsyncAppend(self.fd, 0, self.directory, self.sync)
        records = [encodeRecord(f"{i:018d}", b"payload %d" % i) for i in range(16)]
        yield gatherResults([writer.append(r) for r in records])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"".join(records))
        self.assertEqual(writer.end, len(b"".join(records)))
        self.assertEqual(writer.count, 2)
        yield writer.append(b"more")
        self.assertEqual(writer.count, 3)

    @inlineCallbacks
    def test_brokenAfterFailure(self):
        """
        A failed sync fails the records it covered and those waiting for
        the next one; every later append fails at once.
        """
        writer = AsyncAppend(self.fd, 0, self.directory, self.sync)
        self.patch(
            self.sync, "fdatasync", lambda fd: fail(OSError(errno.EIO, "injected sync failure"))
        )
        results = yield DeferredList(
            [writer.append(b"r%d" % i) for i in range(3)], consumeErrors=True
        )
        self.assertEqual([ok for ok, _ in results], [False] * 3)
        self.assertEqual({f.value.errno for _, f in results}, {errno.EIO})
        self.assertIsNotNone(writer.broken)
        error = yield self.assertFailure(writer.append(b"later"), OSError)
        self.assertEqual(error.errno, errno.EIO)

    @inlineCallbacks
    def test_failedWrite(self):
        """A write that fails (a read-only descriptor) breaks the file."""
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        writer = AsyncAppend(fd, 0, self.directory, self.sync)
        error = yield self.assertFailure(writer.append(b"x"), OSError)
        self.assertEqual(error.errno, errno.EBADF)
        self.assertIsNotNone(writer.broken)


class NoAsyncSyncTests(SpoolTestMixin, TestCase):
    """A system without AIO fsync: the spool syncs the journal in threads."""

    @inlineCallbacks
    def test_fallsBackToThreads(self):
        if bootId() is None:
            self.skipTest("no boot id on this system: the spool commits without a journal")

        def unavailable(reactor, directory):
            raise OSError(errno.ENOSYS, "io_setup: Function not implemented")

        self.patch(spoolModule, "AsyncSync", unavailable)
        spool = self.startSpool()
        self.assertIsNone(spool._journal.sync)
        said = [e for e in self.events if "AIO" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId])
        self.assertIsInstance(spool._journal.current.writer, GroupAppend)


class RecoveryTests(SpoolTestMixin, TestCase):
    """What startup does with the segments a previous run left."""

    def setUp(self):
        if bootId() is None:
            self.skipTest("no boot id on this system: the spool commits without a journal")

    @inlineCallbacks
    def committedSegment(self, count=3):
        """
        Commit C{count} messages, keep a copy of the segment as it was
        before the spool retired it at its stop (what a C{kill -9} leaves),
        and stop the spool.

        @return: the spool's directory, the queue ids and the segment's
            name and octets.
        """
        spool = self.startSpool()
        messages = [self.receive(spool, MESSAGE + b"%d\r\n" % i) for i in range(count)]
        ids = yield gatherResults([spool.commit(m, record(m.queueId, m.size)) for m in messages])
        [path] = segmentsOf(spool.directory)
        with open(path, "rb") as f:
            octets = f.read()
        yield spool.stopService()
        self.assertEqual(segmentsOf(spool.directory), [])
        return spool.directory, ids, os.path.basename(path), octets

    def leave(self, directory, name, octets):
        with open(os.path.join(directory, "journal", name), "wb") as f:
            f.write(octets)

    def rebooted(self, octets):
        """The segment as if written before a reboot: another boot id."""
        other = str(uuid.uuid4()).encode("ascii")
        return octets.replace(bootId().encode("ascii"), other, 1)

    @inlineCallbacks
    def test_replayAfterReboot(self):
        """
        After a reboot, a message whose queue file was lost or damaged is
        written back into C{incoming/} from the segment, byte-exact; a
        sound one is left alone; a torn record at the end is ignored; the
        segment is deleted.
        """
        directory, ids, name, octets = yield self.committedSegment(3)
        lost, damaged, _sound = ids
        original = {}
        for queueId in ids:
            with open(os.path.join(directory, "incoming", queueId), "rb") as f:
                original[queueId] = f.read()
        os.unlink(os.path.join(directory, "incoming", lost))
        # The damaged one had been moved to active/ for its attempt: the
        # copy must take its place, or recovery would move the damaged
        # file back over it.
        os.rename(
            os.path.join(directory, "incoming", damaged),
            os.path.join(directory, "active", damaged),
        )
        with open(os.path.join(directory, "active", damaged), "r+b") as f:
            f.truncate(100)
        torn = encodeRecord("0" * 13 + "TORNX", b"half of a record")[:-5]
        self.leave(directory, name, self.rebooted(octets) + torn)

        spool = self.startSpool(directory)
        self.assertEqual(spool.entries("incoming"), sorted(ids))
        for queueId in ids:
            with open(os.path.join(directory, "incoming", queueId), "rb") as f:
                self.assertEqual(f.read(), original[queueId])
            readRecord(os.path.join(directory, "incoming", queueId), queueId)
        self.assertEqual(spool.entries("corrupt"), [])
        self.assertEqual(segmentsOf(directory), [])
        restored = {e["queue_id"] for e in self.events if "journal" in e.get("what", "")}
        self.assertEqual(restored, {lost, damaged})

    @inlineCallbacks
    def test_sameBootRetires(self):
        """
        A segment written since this boot restores only what is damaged (a
        file system can lose unwritten pages without a reboot): a message
        delivered (removed) before the restart does not come back.
        """
        directory, ids, name, octets = yield self.committedSegment(3)
        delivered, kept, damaged = ids
        os.unlink(os.path.join(directory, "incoming", delivered))
        path = os.path.join(directory, "incoming", damaged)
        with open(path, "rb") as f:
            original = f.read()
        with open(path, "r+b") as f:
            f.truncate(0)
        self.leave(directory, name, octets)

        spool = self.startSpool(directory)
        self.assertEqual(spool.entries("incoming"), sorted([kept, damaged]))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(segmentsOf(directory), [])

    @inlineCallbacks
    def test_deletedNotWrittenBack(self):
        """
        A message an operator deleted while its segment was live is not
        written back after a reboot: its durable removal wrote its
        tombstone first.  A lost one of the same segment is; the
        tombstones file is deleted with the segments.
        """
        spool = self.startSpool()
        directory = spool.directory
        messages = [self.receive(spool, MESSAGE + b"%d\r\n" % i) for i in range(3)]
        ids = yield gatherResults([spool.commit(m, record(m.queueId, m.size)) for m in messages])
        deleted, lost, sound = ids
        [path] = segmentsOf(directory)
        yield spool.remove(deleted, "incoming", durable=True)
        self.assertEqual(readTombstones(directory), {deleted})
        tombstones = os.path.join(directory, "journal", TOMBSTONES)
        with open(tombstones, "rb") as f:
            marks = f.read()
        with open(path, "rb") as f:
            octets = f.read()
        yield spool.stopService()
        # What a power loss leaves: the segment, the tombstones, and the
        # queue files as far as they reached the disk.
        os.unlink(os.path.join(directory, "incoming", lost))
        self.leave(directory, os.path.basename(path), self.rebooted(octets))
        with open(tombstones, "wb") as f:
            f.write(marks)

        spool = self.startSpool(directory)
        self.assertEqual(spool.entries("incoming"), sorted([lost, sound]))
        self.assertFalse(os.path.exists(tombstones))
        self.assertEqual(segmentsOf(directory), [])
        said = {e["queue_id"]: e["what"] for e in self.events if "what" in e}
        self.assertIn("removed on purpose", said[deleted])
        self.assertIn("restored from the journal", said[lost])

    @inlineCallbacks
    def test_tombstonePruned(self):
        """
        A tombstone is kept while a segment that was there at the delete
        is; once that one is retired, the tombstones file goes.  A delete
        while no segment is there writes none.
        """
        spool = self.startSpool()
        tombstones = os.path.join(spool.directory, "journal", TOMBSTONES)
        first, second = [self.receive(spool) for _ in range(2)]
        yield spool.commit(first, record(first.queueId))
        yield spool.remove(first.queueId, "incoming", durable=True)
        self.assertEqual(readTombstones(spool.directory), {first.queueId})
        spool._journal.current.started -= journalModule.SEGMENT_AGE
        spool._rotateIdle()
        yield spool._whenIdle()
        self.assertEqual(segmentsOf(spool.directory), [])
        self.assertTrue(os.path.exists(tombstones))
        spool._pruneCall.cancel()
        spool._pruneTombstones()
        yield spool._whenIdle()
        self.assertFalse(os.path.exists(tombstones))
        self.assertIsNone(spool._pruneCall)

        yield spool.commit(second, record(second.queueId))
        spool._journal.current.started -= journalModule.SEGMENT_AGE
        spool._rotateIdle()
        yield spool._whenIdle()
        yield spool.remove(second.queueId, "incoming", durable=True)
        self.assertFalse(os.path.exists(tombstones))
        self.assertIsNone(spool._pruneCall)
        self.assertEqual(spool.entries("incoming"), [])

    @inlineCallbacks
    def test_damagedHeaderReplaysNothing(self):
        """A segment whose header is damaged is trusted for nothing."""
        directory, ids, name, octets = yield self.committedSegment(1)
        os.unlink(os.path.join(directory, "incoming", ids[0]))
        self.leave(directory, name, b"X" + octets[1:])

        spool = self.startSpool(directory)
        self.assertEqual(spool.entries("incoming"), [])
        self.assertEqual(segmentsOf(directory), [])

    @inlineCallbacks
    def test_retireSegmentsOf(self):
        """
        L{Spool.retireSegmentsOf} retires the segments a dead process left,
        and only its own.
        """
        directory, ids, name, octets = yield self.committedSegment(1)
        spool = self.startSpool(directory)
        pid = name.partition(".")[0]
        self.leave(directory, name, octets)
        self.leave(directory, "1." + name.partition(".")[2], octets)
        yield spool.retireSegmentsOf(int(pid))
        self.assertEqual(
            [os.path.basename(p) for p in segmentsOf(directory)],
            ["1." + name.partition(".")[2]],
        )
        self.assertEqual(spool.entries("incoming"), ids)

    @inlineCallbacks
    def test_spoolWithoutJournal(self):
        """
        A spool left by the code before the journal (no C{journal/}) keeps
        its messages; the directory is made and new mail goes through it.
        """
        directory, ids, _, _ = yield self.committedSegment(2)
        os.rmdir(os.path.join(directory, "journal"))
        spool = self.startSpool(directory)
        self.assertEqual(spool.entries("incoming"), sorted(ids))
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        [path] = segmentsOf(directory)
        self.assertEqual([q for q, _ in readSegment(path)[1]], [queueId])


class TombstonesTests(TestCase):
    """L{Tombstones} on a real journal directory."""

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(os.path.join(self.directory, "journal"))
        self.tombstones = Tombstones(self.directory)

    def segment(self, name):
        path = os.path.join(self.directory, "journal", name)
        with open(path, "wb"):
            pass
        return path

    def test_keptWhileItsSegmentsAre(self):
        """
        Without a segment no tombstone is written; one is needed until
        every segment there at its delete is gone; a later segment does
        not keep it.
        """
        self.assertFalse(self.tombstones.add("A" * 18))
        self.assertFalse(os.path.exists(self.tombstones.path))
        a = self.segment("10.00000000000000a1")
        self.assertTrue(self.tombstones.add("B" * 18))
        b = self.segment("11.00000000000000b1")
        self.assertTrue(self.tombstones.add("C" * 18))
        self.assertEqual(readTombstones(self.directory), {"B" * 18, "C" * 18})
        self.assertEqual(self.tombstones.prune(), 2)
        os.unlink(a)
        self.segment("12.00000000000000c1")
        self.assertEqual(self.tombstones.prune(), 1)
        self.assertTrue(os.path.exists(self.tombstones.path))
        os.unlink(b)
        self.assertEqual(self.tombstones.prune(), 0)
        self.assertFalse(os.path.exists(self.tombstones.path))
        self.assertEqual(readTombstones(self.directory), frozenset())

    def test_rewrittenWhenMostlyDead(self):
        """A file of mostly unneeded lines is rewritten with the needed ones."""
        self.patch(journalModule, "TOMBSTONE_REWRITE", 4)
        a = self.segment("10.00000000000000a1")
        for letter in "DEFG":
            self.tombstones.add(letter * 18)
        self.segment("11.00000000000000b1")
        self.tombstones.add("H" * 18)
        os.unlink(a)
        self.assertEqual(self.tombstones.prune(), 1)
        with open(self.tombstones.path, "rb") as f:
            self.assertEqual(f.read(), b"D" + b"H" * 18 + b"\n")

    def test_tornLineIgnored(self):
        """A line torn by a crash is no tombstone; the lines around it are."""
        with open(os.path.join(self.directory, "journal", TOMBSTONES), "wb") as f:
            f.write(b"D" + b"J" * 18 + b"\nD0123" + b"D" + b"K" * 18 + b"\nD" + b"L" * 10)
        self.assertEqual(readTombstones(self.directory), {"J" * 18, "K" * 18})

    def test_notASegment(self):
        """The tombstones file, and other names, are not taken for segments."""
        self.segment("10.00000000000000a1")
        self.segment(TOMBSTONES)
        self.segment(".deleted.x.tmp")
        self.assertEqual(
            [os.path.basename(p) for p in segmentsOf(self.directory)], ["10.00000000000000a1"]
        )


class PowerLossTests(TestCase):
    """
    A real loss of everything not yet on disk: the spool on a small ext4
    file system (L{LoopFileSystem}) cut without a flush, then mounted
    again.  Root only.
    """

    asyncSync = True

    def setUp(self):
        why = LoopFileSystem.available()
        if why is not None:
            self.skipTest(why)
        if bootId() is None:
            self.skipTest("no boot id on this system: the spool commits without a journal")
        base = tempfile.mkdtemp(prefix="relayd-powerloss-")
        self.addCleanup(shutil.rmtree, base, True)
        self.mountPoint = os.path.join(base, "mnt")
        self.fileSystem = LoopFileSystem(self.mountPoint)
        self.addCleanup(self.fileSystem.remove)

    def spool(self, boot=None):
        """
        A started spool on the loop file system; with C{boot}, as if the
        machine had rebooted (the boot id it compares segments with).
        """
        events = []
        spool = Spool(
            os.path.join(self.mountPoint, "spool"),
            0,
            reactor,
            threads=4,
            log=Logger(namespace="relayd.queue.spool", observer=events.append),
            asyncSync=self.asyncSync,
        )
        if boot is not None:
            spool._boot = boot
        spool.startService()
        return spool, events

    @inlineCallbacks
    def committed(self, spool, count):
        """
        Commit C{count} messages at once, each with a body of its own.

        @return: their octets by queue id, once every one got its C{250}.
        """
        messages = [
            (spool.openMessage(spool.newQueueId()), MESSAGE + b"%d\r\n" % i) for i in range(count)
        ]
        for incoming, data in messages:
            incoming.write(data)
        ids = yield gatherResults([spool.commit(m, record(m.queueId, m.size)) for m, _ in messages])
        expected = {m.queueId: data for m, data in messages}
        self.assertEqual(sorted(ids), sorted(expected))
        return expected

    @inlineCallbacks
    def test_powerCutAfterThe250(self):
        """
        Forty messages get their C{250}; then the file system loses all
        that was not yet written.  Their queue files are gone or empty (so
        the cut took something); after it is mounted again the spool
        starts with all forty, byte-exact, from the journal.
        """
        spool, _ = self.spool()
        expected = yield self.committed(spool, 40)

        self.fileSystem.cut()
        yield spool.stopService()
        self.fileSystem.remount()

        directory = os.path.join(self.mountPoint, "spool")
        lost = 0
        for queueId in expected:
            try:
                readRecord(os.path.join(directory, "incoming", queueId), queueId)
            except (OSError, ValueError):
                lost += 1
        self.assertGreater(lost, 0, "the cut took nothing: the test tests nothing")

        spool, events = self.spool()
        self.addCleanup(spool.stopService)
        self.assertEqual(spool.entries("incoming"), sorted(expected))
        for queueId, data in expected.items():
            self.assertEqual(spool.readData(queueId), data)
        self.assertEqual(spool.entries("corrupt"), [])
        restored = [e for e in events if "journal" in e.get("what", "")]
        self.assertEqual(len(restored), lost)

    @inlineCallbacks
    def test_deletesSurviveAPowerCut(self):
        """
        Ten of forty messages are deleted durably (as by C{relayctl
        delete}) while their segment is live; then the power is cut and the
        machine "reboots" (another boot id), so replay writes back every
        message of the segment whose queue file is missing.  The thirty
        come back or stay; the ten deleted do not.
        """
        spool, _ = self.spool()
        ids = sorted((yield self.committed(spool, 40)))
        deleted, kept = ids[:10], ids[10:]
        for queueId in deleted:
            yield spool.remove(queueId, "incoming", durable=True)

        self.fileSystem.cut()
        yield spool.stopService()
        self.fileSystem.remount()

        spool, events = self.spool(boot=str(uuid.uuid4()))
        self.addCleanup(spool.stopService)
        self.assertEqual(spool.entries("incoming"), kept)
        skipped = {e["queue_id"] for e in events if "on purpose" in e.get("what", "")}
        self.assertEqual(skipped, set(deleted))


class ThreadedPowerLossTests(PowerLossTests):
    """The same, with the journal synced in the spool's threads (no AIO)."""

    asyncSync = False


class JournalOffTests(SpoolTestMixin, TestCase):
    """C{[spool] journal = false}: L{Spool} with C{journal=False}."""

    journal = False

    def test_modeOff(self):
        """No journal: the metrics and relayctl say C{off}."""
        spool = self.startSpool()
        self.assertEqual(spool.journalMode, "off")
        self.assertEqual((spool.journalCommits, spool.journalSyncs), (0, 0))

    @inlineCallbacks
    def test_noSegment(self):
        """Every message is fsync'd on its own; no segment is written."""
        spool = self.startSpool()
        incoming = self.receive(spool)
        queueId = yield spool.commit(incoming, record(incoming.queueId))
        self.assertEqual(spool.entries("incoming"), [queueId])
        self.assertEqual(spool.batchCount, 1)
        self.assertEqual(segmentsOf(spool.directory), [])

    @inlineCallbacks
    def test_leftSegmentsStillRecovered(self):
        """
        Segments a run with the journal left are still replayed as such:
        one of this boot brings back what is damaged, not what was
        delivered.
        """
        if bootId() is None:
            self.skipTest("no boot id on this system")
        self.journal = True
        spool = self.startSpool()
        messages = [self.receive(spool) for _ in range(2)]
        delivered, damaged = yield gatherResults(
            [spool.commit(m, record(m.queueId)) for m in messages]
        )
        [path] = segmentsOf(spool.directory)
        with open(path, "rb") as f:
            octets = f.read()
        yield spool.stopService()
        os.unlink(os.path.join(spool.directory, "incoming", delivered))
        with open(os.path.join(spool.directory, "incoming", damaged), "r+b") as f:
            f.truncate(10)
        with open(path, "wb") as f:
            f.write(octets)

        self.journal = False
        spool = self.startSpool(spool.directory)
        self.assertEqual(spool.entries("incoming"), [damaged])
        self.assertEqual(spool.readData(damaged), MESSAGE)
        self.assertEqual(segmentsOf(spool.directory), [])
