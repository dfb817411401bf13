"""
The commit journal: one C{fdatasync} for every small message that commits
at the same moment (issue 14; DESIGN section 5, "one fsync per message
... or a journal").

Without it, a message's commit costs an fsync of its queue file and a
share of an fsync of C{incoming/} (L{relayd.queue.spool}).  With it, each
process that commits writes a copy of every small queue file to its own
append-only I{segment} under C{<spool>/journal/}, and the C{250} waits
for one C{fdatasync} of that segment, shared by every commit waiting for
one.  Where Linux AIO can sync a file (L{relayd.queue.aio}), the record
is written on the reactor thread and the sync submitted to the kernel
from there, its end coming back on an C{eventfd} (L{AsyncAppend});
elsewhere the spool's threads write and sync (L{GroupAppend}: the first
thread writes everybody's records with one C{pwrite}, then syncs).  The
queue file itself is renamed into C{incoming/} as before, but neither it
nor the directory is fsync'd before the C{250}.

Why nothing that got a C{250} is lost:

  - While the machine stays up, the kernel keeps what was written and
    renamed, whatever happens to relayd (C{kill -9} included): the queue
    file is in C{incoming/} (or wherever the queue manager moved it).
  - Before a segment is deleted it is I{retired} (L{retireSegment}):
    every queue file it names that is still in the spool is fsync'd, then
    the state directories are; from then on the spool alone keeps them.
  - A segment still there at startup is replayed (L{recoverJournal}):
    each message it holds whose queue file is damaged is written back from
    it; so is each one whose queue file is missing when the segment was
    written before a reboot (its header holds the kernel's boot id), a
    power loss or a kernel crash.  Then it is retired.

What a reboot may bring back: a message of a segment still live (rotated
every L{SEGMENT_AGE} seconds or L{SEGMENT_SIZE} octets) that was delivered
before a power loss is restored and delivered again.  A delivered message
whose unlink was lost comes back without a journal too (removals are not
fsync'd: at-least-once).  A message removed on purpose (an operator's
delete, or a bounce by C{relayctl}) does not come back: its durable
removal first writes its queue id to L{TOMBSTONES} when a segment that may
hold it is still there (L{Tombstones}), and replay skips it.

Only messages whose whole queue file is still in memory at the commit
(smaller than the spool's write buffer, and not rewritten by a message
policy) go through the journal; a larger one is fsync'd on its own as
before.  Linux only: the boot id comes from C{/proc}; elsewhere the spool
commits without a journal.

Segment format: a header line C{relayd-journal 1 <boot id>\\n}, then
records, each C{Q}, the 18-character queue id, the payload's length and
its CRC-32 as 8 hex digits each, then the payload: the queue file's
octets.  Records are only ever appended, and a record is acknowledged
only once an C{fdatasync} that began after it was written has returned,
so a crash can only leave a torn I{tail}; reading stops at the first
record that is incomplete or does not match its CRC.

Tombstones file (L{TOMBSTONES}): lines C{D} and a queue id, each
C{fdatasync}'d before the removal it stands for; a torn last line is
ignored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults
from twisted.python.failure import Failure

from relayd.queue.aio import AsyncSync
from relayd.queue.record import QUEUE_ID, QUEUED_STATES, CorruptRecord, readRecord
from relayd.queue.safeio import fsyncDirectory, writeAtomically
from relayd.queue.workers import GroupSync, freshError

__all__ = [
    "JOURNAL_DIRECTORY",
    "SEGMENT_AGE",
    "SEGMENT_SIZE",
    "TOMBSTONES",
    "AsyncAppend",
    "GroupAppend",
    "Journal",
    "Segment",
    "Tombstones",
    "bootId",
    "encodeRecord",
    "readSegment",
    "readTombstones",
    "recoverJournal",
    "replaySegment",
    "retireSegment",
    "segmentsOf",
]

JOURNAL_DIRECTORY = "journal"
"""The journal's directory under the spool's root."""

SEGMENT_SIZE = 16 * 1024 * 1024
"""A segment takes no new record once it holds this many octets."""

SEGMENT_AGE = 2.0
"""Seconds after which a segment that holds records is rotated (and then
retired once its commits have finished): how long a segment lives, and so
how far back a replay after a power loss reaches."""

TOMBSTONES = "deleted"
"""The file under C{journal/} that holds the queue ids removed on purpose
while a segment that may hold them was still there (L{Tombstones})."""

TOMBSTONE_REWRITE = 4096
"""L{Tombstones} rewrites its file once it holds this many lines of which
more than half are no longer needed."""

_MAGIC = b"relayd-journal 1 "
_RECORD_HEAD = 1 + 18 + 8 + 8
_HEAD = re.compile(rb"Q([0-9A-Z]{18})([0-9A-F]{8})([0-9A-F]{8})")
_SEGMENT_NAME = re.compile(r"[0-9]+\.[0-9a-f]+")
_TOMBSTONE = re.compile(rb"D([0-9A-Z]{18})\n")
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FILE_MODE = 0o600


def bootId() -> str | None:
    """
    The kernel's id for this boot (Linux), or None where there is none:
    the spool then commits without a journal.
    """
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            value = f.read().strip()
    except OSError:
        return None
    return value if _BOOT_ID.fullmatch(value) else None


def encodeRecord(queueId: str, payload: bytes) -> bytes:
    """One journal record: C{Q}, the queue id, length, CRC-32, payload."""
    return b"Q%s%08X%08X" % (queueId.encode("ascii"), len(payload), zlib.crc32(payload)) + payload


def _header(boot: str) -> bytes:
    return _MAGIC + boot.encode("ascii") + b"\n"


def readSegment(path: str) -> tuple[str | None, Iterator[tuple[str, bytes]]]:
    """
    Read a segment.  Blocking.

    @return: the boot id of its header (None when the header is missing
        or damaged: then no record is trusted) and its sound records, in
        order, up to the first one that is incomplete or damaged.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"\n")
    boot = data[len(_MAGIC) : end].decode("ascii", "replace") if end > 0 else ""
    if not data.startswith(_MAGIC) or not _BOOT_ID.fullmatch(boot):
        return None, iter(())

    def records() -> Iterator[tuple[str, bytes]]:
        offset = end + 1
        while True:
            match = _HEAD.match(data, offset)
            if match is None:
                return
            length = int(match.group(2), 16)
            start = offset + _RECORD_HEAD
            payload = data[start : start + length]
            if len(payload) != length or zlib.crc32(payload) != int(match.group(3), 16):
                return
            yield match.group(1).decode("ascii"), payload
            offset = start + length

    return boot, records()


def segmentsOf(directory: str, pid: int | None = None) -> list[str]:
    """
    The segments under C{<directory>/journal/}, oldest first; only those
    of process C{pid} when given.
    """
    journal = os.path.join(directory, JOURNAL_DIRECTORY)
    try:
        names = os.listdir(journal)
    except FileNotFoundError:
        return []
    prefix = f"{pid}." if pid is not None else ""
    return [
        os.path.join(journal, name)
        for name in sorted(names, key=lambda n: n.partition(".")[2])
        if name.startswith(prefix) and _SEGMENT_NAME.fullmatch(name)
    ]


def readTombstones(directory: str) -> frozenset[str]:
    """
    The queue ids in the tombstones file under C{<directory>/journal/}
    (L{Tombstones}); none when there is no such file.  Blocking.
    """
    try:
        with open(os.path.join(directory, JOURNAL_DIRECTORY, TOMBSTONES), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return frozenset()
    return frozenset(m.group(1).decode("ascii") for m in _TOMBSTONE.finditer(data))


class Tombstones:
    """
    The messages removed on purpose (an operator's delete, a bounce by
    C{relayctl}) that a replay must not write back: a segment still there
    may hold a copy of one, and after a reboot replay restores a message
    whose queue file is missing (L{recoverJournal}).

    Before such a removal, L{add} appends its queue id to the tombstones
    file (L{TOMBSTONES}) and C{fdatasync}s it, when a segment is there at
    all; only the segments there at that moment can hold the message.
    Once every one of them is gone (retired), the tombstone is no longer
    needed (L{prune}); when none is needed the file is deleted.  The queue
    manager's spool alone writes it; used from its spool threads.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.journal = os.path.join(directory, JOURNAL_DIRECTORY)
        self.path = os.path.join(self.journal, TOMBSTONES)
        self._lock = threading.Lock()
        self._needed: list[tuple[str, frozenset[str]]] = []
        self._lines = 0

    @property
    def needed(self) -> int:
        """How many tombstones are still needed."""
        return len(self._needed)

    def _segmentNames(self) -> frozenset[str]:
        return frozenset(os.path.basename(path) for path in segmentsOf(self.directory))

    def add(self, queueId: str) -> bool:
        """
        Before removing C{queueId} on purpose: make its tombstone durable
        if a segment may hold it.  Blocking.

        @return: whether a tombstone was written.
        @raise OSError: when it could not be (the removal must not go on).
        """
        with self._lock:
            segments = self._segmentNames()
            if not segments:
                return False
            new = not os.path.exists(self.path)
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                _FILE_MODE,
            )
            line = b"D%s\n" % queueId.encode("ascii")
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, "short write", self.path)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if new:
                fsyncDirectory(self.journal)
            self._needed.append((queueId, segments))
            self._lines += 1
            return True

    def prune(self) -> int:
        """
        Forget the tombstones whose segments are all gone; delete the file
        when none is left (or rewrite it when it is mostly dead lines).
        Blocking.

        @return: how many tombstones are still needed.
        """
        with self._lock:
            if not self._needed:
                return 0
            present = self._segmentNames()
            needed = [(queueId, seen) for queueId, seen in self._needed if seen & present]
            if len(needed) == len(self._needed):
                return len(needed)
            # The retirements seen here are on disk before the tombstones
            # that covered them go.
            fsyncDirectory(self.journal)
            if not needed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self._lines = 0
            elif self._lines >= TOMBSTONE_REWRITE and len(needed) * 2 < self._lines:
                writeAtomically(
                    self.path, b"".join(b"D%s\n" % q.encode("ascii") for q, _ in needed)
                )
                self._lines = len(needed)
            self._needed = needed
            return len(needed)


def _queueFileToRestore(directory: str, queueId: str) -> tuple[str, bool] | None:
    """
    Where a message of the journal would be written back: None when a
    queued state holds a sound queue file of it; else the path of its
    damaged one (replaced in place, so that recovery does not later move
    the damaged one over the copy) and True, or its path in C{incoming/}
    and False when no queued state holds it.
    """
    damaged = None
    for state in QUEUED_STATES:
        path = os.path.join(directory, state, queueId)
        try:
            readRecord(path, queueId)
        except FileNotFoundError:
            continue
        except (OSError, CorruptRecord):
            damaged = damaged or path
            continue
        return None
    if damaged is not None:
        return damaged, True
    return os.path.join(directory, "incoming", queueId), False


def retireSegment(directory: str, path: str, queueIds: list[str] | None = None) -> None:
    """
    Hand the messages of segment C{path} over to the spool for good, then
    delete the segment: fsync each of their queue files still in a queued
    state, then the state directories, then remove the segment and fsync
    the journal's directory.  Blocking: a spool thread, or startup.

    @param queueIds: the queue ids it holds, when the caller knows them;
        else the segment is read.
    """
    if queueIds is None:
        _, records = readSegment(path)
        queueIds = [queueId for queueId, _ in records]
    for queueId in queueIds:
        # Looked for in the order a message moves on (incoming, active,
        # deferred, hold), once: most are delivered and gone by now.  One
        # that moves back meanwhile (a retry from deferred/, a release
        # from hold/) was fsync'd when it got there: an attempt's record
        # is written anew and fsync'd, and a durable move (to and from
        # hold/) fsyncs the file too (L{relayd.queue.spool.Spool.move}).
        _fsyncQueueFile(directory, queueId)
    for state in QUEUED_STATES:
        fsyncDirectory(os.path.join(directory, state))
    os.unlink(path)
    fsyncDirectory(os.path.dirname(path))


def _fsyncQueueFile(directory: str, queueId: str) -> bool:
    """Fsync the queue file of C{queueId}; False when no queued state has it."""
    for state in QUEUED_STATES:
        try:
            fd = os.open(os.path.join(directory, state, queueId), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    return False


def replaySegment(
    directory: str,
    records: list[tuple[str, bytes]],
    log: Callable[[str, str], None],
    missing: bool = True,
    deleted: frozenset[str] = frozenset(),
) -> int:
    """
    Write back each message of a segment's C{records} whose queue file is damaged
    (in its place) or, with C{missing}, gone (into C{incoming/}), each
    durably (write, fsync, rename, fsync the directory).  Blocking, at
    startup.

    @param missing: whether a message that no queued state holds is
        written back (see L{recoverJournal}).
    @param deleted: queue ids removed on purpose (L{readTombstones}):
        never written back.
    @param log: called with a queue id and what was done to it.
    @return: how many were written back.
    """
    restored = 0
    for queueId, payload in records:
        if not QUEUE_ID.match(queueId):
            continue
        if queueId in deleted:
            log(queueId, "removed on purpose before the restart: not written back")
            continue
        found = _queueFileToRestore(directory, queueId)
        if found is None or not (found[1] or missing):
            continue
        target = found[0]
        tmp = os.path.join(directory, "tmp", queueId + ".journal")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsyncDirectory(os.path.dirname(target))
        restored += 1
        state = os.path.basename(os.path.dirname(target))
        log(queueId, f"restored from the journal into {state}")
    return restored


def recoverJournal(
    directory: str, boot: str | None, log: Callable[[str, str], None]
) -> list[tuple[str, int, int, bool]]:
    """
    At startup, before anything commits: replay every segment, retire it
    (L{retireSegment}), and so delete it.  Blocking.

    A segment written since this boot restores only damaged queue files:
    in normal operation a queue file is never damaged (it is written under
    C{tmp/} and renamed whole), only by the loss of pages never written,
    which a file system can suffer without a reboot (shut down after an
    I/O error, then mounted again); and a message that the spool no longer
    holds was delivered.  A segment from before a reboot also restores
    missing ones: the power loss may have taken them, entries and all.
    Neither restores a message removed on purpose (L{Tombstones}); once
    every segment is retired, the tombstones file is deleted.

    @return: for each segment, its path, how many records it held, how
        many were written back, and whether it was written since this boot.
    """
    replayed = []
    deleted = readTombstones(directory)
    for path in segmentsOf(directory):
        segmentBoot, read = readSegment(path)
        records = list(read)
        thisBoot = boot is not None and segmentBoot == boot
        restored = replaySegment(directory, records, log, missing=not thisBoot, deleted=deleted)
        replayed.append((path, len(records), restored, thisBoot))
        retireSegment(directory, path, [queueId for queueId, _ in records])
    tombstones = os.path.join(directory, JOURNAL_DIRECTORY, TOMBSTONES)
    if os.path.exists(tombstones):
        os.unlink(tombstones)
        fsyncDirectory(os.path.dirname(tombstones))
    return replayed


class GroupAppend:
    """
    Group commit of records to one file: each thread calls L{append},
    which returns once its record is written and an C{fdatasync} after the
    write has returned.  The threads arriving together share one write
    (one C{pwrite} of all their records) and one sync: the group commit of
    L{relayd.queue.workers.GroupSync}, whose one fsync at a time is here
    "write what is queued, then sync".

    A failed write or sync fails the records it covered and breaks the
    file: every later L{append} fails (the caller starts a new file), so
    that no record ever follows a gap.

    @ivar end: the file's length once the records written so far are in.
    @ivar broken: the error that broke the file, or None.
    """

    def __init__(self, fd: int, end: int, beforeFirstSync: Callable[[], None]) -> None:
        self.fd = fd
        self.end = end
        self.broken: OSError | None = None
        self._beforeFirstSync: Callable[[], None] | None = beforeFirstSync
        self._lock = threading.Lock()
        self._queue: list[bytes] = []
        self._group = GroupSync("journal segment", self._writeAndSync)

    @property
    def count(self) -> int:
        """How many writes and syncs ran (for tests and statistics)."""
        return self._group.count

    def append(self, record: bytes) -> None:
        """
        Write C{record} and make it durable.  Blocking: a spool thread.

        @raise OSError: when the write or the sync that covered it failed,
            or the file is broken.
        """
        with self._lock:
            if self.broken is not None:
                raise freshError(self.broken)
            self._queue.append(record)
        self._group.sync()

    def _writeAndSync(self, _: str) -> None:
        """
        One at a time (L{GroupSync}): write every record queued so far at
        the end of the file, then C{fdatasync} it.  With none queued, an
        earlier run wrote and synced them already.
        """
        with self._lock:
            batch, self._queue = self._queue, []
            if self.broken is not None:
                raise freshError(self.broken)
        if not batch:
            return
        try:
            view = memoryview(batch[0] if len(batch) == 1 else b"".join(batch))
            offset = self.end
            while view:
                written = os.pwrite(self.fd, view, offset)
                offset += written
                view = view[written:]
            if self._beforeFirstSync is not None:
                self._beforeFirstSync()
                self._beforeFirstSync = None
            os.fdatasync(self.fd)
        except OSError as e:
            with self._lock:
                self.broken = e
            raise
        self.end = offset


class AsyncAppend:
    """
    Group commit of records to one file from the reactor thread, the file
    synced through Linux AIO (L{relayd.queue.aio.AsyncSync}): L{append}
    writes the record at once (the page cache) and returns a Deferred that
    fires once an C{fdatasync} submitted after the write has ended.  The
    records appended while one sync runs share the next one.  The first
    sync also syncs the file's directory, so the file is found after a
    power loss.

    As with L{GroupAppend}, a failed write or sync fails the records it
    covered, and the records waiting for the next sync, and breaks the
    file: every later L{append} fails.

    @ivar end: the file's length once the records written so far are in.
    @ivar broken: the error that broke the file, or None.
    @ivar count: how many syncs ran (for tests and statistics).
    """

    def __init__(self, fd: int, end: int, directory: str, sync: AsyncSync) -> None:
        self.fd = fd
        self.end = end
        self.broken: OSError | None = None
        self.count = 0
        self._directory: str | None = directory
        self._sync = sync
        self._running: list[Deferred[None]] | None = None
        self._next: list[Deferred[None]] = []

    def append(self, record: bytes) -> Deferred[None]:
        """Write C{record} now; the Deferred fires once it is durable."""
        if self.broken is not None:
            return fail(freshError(self.broken))
        try:
            view = memoryview(record)
            offset = self.end
            while view:
                written = os.pwrite(self.fd, view, offset)
                offset += written
                view = view[written:]
        except OSError as e:
            self._break(e)
            return fail()
        self.end = offset
        d: Deferred[None] = Deferred()
        if self._running is None:
            self._start([d])
        else:
            self._next.append(d)
        return d

    def _start(self, batch: list[Deferred[None]]) -> None:
        self._running = batch
        self.count += 1
        syncs = [self._sync.fdatasync(self.fd)]
        if self._directory is not None:
            try:
                directory = os.open(
                    self._directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
                )
            except OSError:
                syncs.append(fail())
            else:
                syncs.append(self._sync.fsync(directory))
                syncs[-1].addBoth(_closing, directory)
        gatherResults(syncs, consumeErrors=True).addCallbacks(self._synced, self._failed)

    def _synced(self, _: object) -> None:
        self._directory = None
        batch, self._running = self._running or [], None
        if self._next:
            waiting, self._next = self._next, []
            self._start(waiting)
        for d in batch:
            d.callback(None)

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, FirstError):
            error = error.subFailure.value
        self._break(error if isinstance(error, OSError) else OSError(0, str(error)))

    def _break(self, error: OSError) -> None:
        """Fail what is running and waiting; refuse what comes."""
        self.broken = error
        batch, self._running = self._running or [], None
        waiting, self._next = self._next, []
        for d in batch + waiting:
            d.errback(Failure(freshError(error)))


def _closing(result: object, fd: int) -> object:
    os.close(fd)
    return result


class Segment:
    """
    The journal file a process is writing, as the reactor thread sees it.

    @ivar path: its path.
    @ivar queueIds: the queue ids given a record in it.
    @ivar pending: commits with a record in it that have not finished.
    @ivar rotated: no new record goes to it; retired once C{pending} is 0.
    @ivar started: when it was made (C{time.monotonic}).
    """

    def __init__(self, path: str, fd: int, end: int, sync: AsyncSync | None = None) -> None:
        self.path = path
        self.fd = fd
        self.queueIds: list[str] = []
        self.octets = end
        self.pending = 0
        self.rotated = False
        self.started = time.monotonic()
        self.writer: GroupAppend | AsyncAppend
        if sync is None:
            self.writer = GroupAppend(fd, end, lambda: fsyncDirectory(os.path.dirname(path)))
        else:
            self.writer = AsyncAppend(fd, end, os.path.dirname(path), sync)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Journal:
    """
    A process's journal: which segment the next record goes to.  Used on
    the reactor thread; the records are written there and synced through
    Linux AIO (L{AsyncAppend}), or, where that is not to be had, written
    and synced in the spool's threads (L{GroupAppend}).
    """

    def __init__(
        self,
        directory: str,
        boot: str,
        segmentSize: int = SEGMENT_SIZE,
        segmentAge: float = SEGMENT_AGE,
        sync: AsyncSync | None = None,
    ) -> None:
        """
        @param sync: sync the segments from the reactor thread through it
            (L{AsyncAppend}); None: in the spool's threads (L{GroupAppend}).
        """
        self.directory = os.path.join(directory, JOURNAL_DIRECTORY)
        self.boot = boot
        self.sync = sync
        self.segmentSize = segmentSize
        self.segmentAge = segmentAge
        self.current: Segment | None = None

    def segmentFor(self, queueId: str, length: int) -> tuple[Segment, Segment | None]:
        """
        The segment a record of C{length} octets for C{queueId} goes to
        (counted in it now), and the segment this rotated away from, if
        any.

        @raise OSError: when a new segment cannot be made.
        """
        old = self.current
        if (
            old is not None
            and old.queueIds
            and (
                old.octets + _RECORD_HEAD + length > self.segmentSize
                or old.writer.broken is not None
                or time.monotonic() - old.started > self.segmentAge
            )
        ):
            old.rotated = True
            self.current = None
        else:
            old = None
        if self.current is None:
            self.current = self._newSegment()
        segment = self.current
        segment.queueIds.append(queueId)
        segment.octets += _RECORD_HEAD + length
        segment.pending += 1
        return segment, old

    def rotate(self) -> Segment | None:
        """Take no new record into the current segment; return it."""
        segment, self.current = self.current, None
        if segment is not None:
            segment.rotated = True
        return segment

    def _newSegment(self) -> Segment:
        path = os.path.join(self.directory, f"{os.getpid()}.{time.time_ns():016x}")
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            _FILE_MODE,
        )
        header = _header(self.boot)
        try:
            os.write(fd, header)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        return Segment(path, fd, len(header), self.sync)
