# -*- test-case-name: tests.test_spool -*-
"""
The durable queue between receiving and sending (DESIGN.md section 5).

One message is one I{queue file} (L{relayd.queue.record}): the message's
bytes followed by its typed envelope record, L{QueueRecord}, as Postfix's
queue file holds envelope and content together::

    <spool>/tmp/<id>       message being received (records follow at commit)
    <spool>/<state>/<id>   the queue file; <state> is one of incoming,
                           active, deferred, hold, corrupt
    <spool>/journal/<pid>.<n>  a process's commit journal segment

A message moves between the state directories by a single C{rename} of its
one file, so it is always in exactly one state and a crash can never leave
it in two or in none.

Commit protocol (L{Spool.commit}), before the SMTP C{250}:

  1. the message is written to C{tmp/<id>} as it arrives (page cache only);
  2. in one of the spool's threads the record and the footer are appended
     and the file is fsync'd: the I{one} fsync of this message;
  3. in the same thread, C{tmp/<id>} is renamed to C{incoming/<id>};
  4. C{incoming/} is fsync'd by an fsync that began after that rename,
     shared by every commit waiting for one (group commit across the
     threads, L{relayd.queue.workers.GroupSync}), and only then does the
     commit fire.  Steps 2 to 4 are one hand-off to a thread and one back.

Crash safety, step by step: before 3, only C{tmp/} holds the message, and
startup recovery removes everything there; the client never got its C{250}
and sends again.  Between 3 and 4 the file is complete (it was fsync'd
before the rename), so whether or not the rename survives, what is in
C{incoming/} is a whole message: either it is delivered, or it is gone and
the client, which got no C{250}, sends it again.  This is the ordering
rule of chasquid's safeio and of Postfix's queue files: write, fsync,
rename, fsync the directory.

The previous layout (version 1: C{data/<id>} plus C{<state>/<id>.json})
needed two file fsyncs and two directory fsyncs per message.

With the journal (L{relayd.queue.journal}, Linux, the default), a message
whose whole queue file is still in memory at step 2 (smaller than the
write buffer, header not rewritten: nearly all mail) skips the fsyncs of
steps 2 and 4: its file is renamed into C{incoming/} and a copy of its
octets is appended to this process's journal segment, and the commit
fires once one C{fdatasync} of the segment, shared by every commit
waiting for one, has covered it.  The queue file reaches the disk later:
a segment is retired (its messages' queue files and the state
directories fsync'd, then the segment deleted) every few seconds, and a
segment found at startup is retired, or replayed when it was written
before a reboot (a power loss).  See that module for why no C{250} is
lost.  Where Linux AIO can sync a file (L{relayd.queue.aio}), such a
commit involves no thread at all: the rename, the append and the
submission of the sync run on the reactor thread, and the kernel's
completion comes back on an C{eventfd} the reactor watches; otherwise
the append and the sync run in a spool thread.

Delivery (L{Spool.update}): after an attempt that leaves recipients to try
again, the queue file is written anew with the new record (the message
copied in the kernel by C{copy_file_range}), fsync'd, renamed over the
one in C{active/}, then renamed into C{deferred/}, and both directories
fsync'd: at every instant one complete queue file exists, in one state.
Messages delivered at the first attempt, the common case, are never
rewritten.  Moves (to C{active/} for an attempt, to and from C{hold/}) are
single renames.

Removal of a delivered or bounced message (L{Spool.remove}) is one
C{unlink} and no directory fsync: a crash that loses the unlink brings the
message back, to be delivered once more, which at-least-once delivery
allows (Postfix does the same).  Only an operator's delete is fsync'd.

Everything that waits for the disk (each fsync) runs in the spool's own
threads (L{relayd.queue.workers.SpoolThreads}) or in the kernel's (the
journal's AIO syncs), never on the reactor thread, and so does an
unlink (on ext4 it waits for the journal while fsyncs commit it); the
queue manager's bare renames and trailer reads do not wait for the disk
and run inline (L{Spool._now}).  Receiving processes
(L{relayd.receivers}) only create files in C{tmp/} and rename them into
C{incoming/}; the queue manager alone moves, rewrites and removes.

Upgrade: startup recovery converts a spool of the previous layout, each
message to a queue file in the same state (C{active} returns to
C{incoming} as always), keeping every recipient's state; see L{_recover}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import secrets
import shutil
import time
from dataclasses import replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.envelope import FIRST_READ
from relayd.interfaces import IIncomingSpool, IQueue, QueueObserver
from relayd.ops.logs import Logger
from relayd.queue.aio import AsyncSync
from relayd.queue.journal import (
    JOURNAL_DIRECTORY,
    SEGMENT_AGE,
    AsyncAppend,
    GroupAppend,
    Journal,
    Segment,
    Tombstones,
    bootId,
    encodeRecord,
    recoverJournal,
    retireSegment,
    segmentsOf,
)
from relayd.queue.record import (
    QUEUE_ID,
    QUEUED_STATES,
    CorruptRecord,
    QueueRecord,
    QueueState,
    encodeTrailer,
    readData,
    readRecord,
)
from relayd.queue.safeio import fsyncDirectory
from relayd.queue.workers import GroupSync, SpoolThreads

__all__ = [
    "Spool",
    "IncomingMessage",
    "SpoolStopped",
    "SpoolLocked",
    "envelopeRecord",
    "arrivalFromQueueId",
    "STATES",
    "QUEUED_STATES",
    "listQueue",
    "currentState",
    "findQueued",
]

STATES = tuple(QueueState)
"""The directories a queue file can be in, one at a time."""

REFRESH_INTERVAL = 5.0
"""Seconds between two refreshes of the cached free-space figure."""

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID_SUFFIX_LENGTH = 5
_FILE_MODE = 0o600
_DIRECTORY_MODE = 0o700
_WRITE_BUFFER = 64 * 1024
JOURNAL_MESSAGE_LIMIT = 1024 * 1024
"""Queue files up to this many octets commit through the journal; a
larger one is fsync'd on its own (its copy would hold up the commits
sharing its segment's sync)."""


def listQueue(directory: str) -> tuple[dict[str, list[str]], list[tuple[str, OSError]]]:
    """
    Which queued states of the spool at C{directory} hold a queue file of
    which queue id, from a listing of the state directories (names only:
    no file is opened).  Blocking; reads only, so it is safe beside a
    running relayd (the spool's sweep, scan and the offline readers of
    L{relayd.ops.queueview} all list the queue through it).

    @return: the states of each queue id (two only when the listing raced
        with a move: see L{currentState}), and C{(state, error)} for each
        directory that could not be listed; the caller decides what a
        missing one means.
    """
    found: dict[str, list[str]] = {}
    problems: list[tuple[str, OSError]] = []
    for state in QUEUED_STATES:
        try:
            names = os.listdir(os.path.join(directory, state))
        except OSError as e:
            problems.append((state.value, e))
            continue
        for name in names:
            if QUEUE_ID.match(name):
                found.setdefault(name, []).append(state.value)
    return found, problems


def currentState(states: list[str]) -> str:
    """
    The state that counts for a message a listing found in C{states}: a
    message is moved out of C{active/} by one rename, so seen both there
    and elsewhere, it is elsewhere.
    """
    return next((s for s in states if s != QueueState.ACTIVE), states[0])


def findQueued(directory: str, queueId: str) -> tuple[str, QueueRecord] | None:
    """
    Find a queued message in the spool at C{directory}: its state and
    record.  Blocking; reads only.  A message that moves while it is read
    is looked for again (three times at most).

    @return: None when no queued state holds it (or C{queueId} is not one).
    @raise OSError: when the queue file is there but cannot be read.
    @raise ValueError: (L{CorruptRecord}) when it is not a sound queue file.
    """
    if not QUEUE_ID.match(queueId):
        return None
    for _ in range(3):
        states = [
            state.value
            for state in QUEUED_STATES
            if os.path.exists(os.path.join(directory, state, queueId))
        ]
        if not states:
            return None
        state = currentState(states)
        try:
            return state, readRecord(os.path.join(directory, state, queueId), queueId)
        except FileNotFoundError:
            continue  # moved on meanwhile: look again
    return None


class SpoolStopped(OSError):
    """
    The spool is not running (not yet started, or stopping): it takes no
    new commits.  An L{OSError} so that callers mapping spool trouble to a
    temporary SMTP failure need no special case.
    """

    def __init__(self) -> None:
        super().__init__(errno.ESHUTDOWN, "spool is not running")


_LOCK_POLL = 0.1
"""Seconds between two tries at a spool lock held by another process."""


def _endedHolder(fd: int) -> int | None:
    """
    The pid written in the spool's lock file (open on C{fd}) when that
    process has ended; None when it runs, or when no pid is written (a
    spool locked by some other program, or by relayd before it wrote it).
    """
    try:
        text = os.pread(fd, 32, 0)
        pid = int(text.strip() or b"0")
    except (OSError, ValueError):
        return None
    if pid <= 1:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:
        return None  # it runs, as another user
    return None


class SpoolLocked(Exception):
    """
    Another process holds the spool's lock: two relayd instances must never
    share a spool (each one's startup recovery would take the other's
    messages in flight for crash debris).
    """

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.directory = directory

    def __str__(self) -> str:
        return (
            f"spool {self.directory} is in use by another relayd (lock file {self.directory}/lock)"
        )


def arrivalFromQueueId(queueId: str) -> float | None:
    """
    When C{queueId} was made, in seconds since the epoch: its first 13
    characters are the microseconds in hexadecimal (L{Spool.newQueueId}).
    None for an id of another form.
    """
    try:
        return int(queueId[:13], 16) / 1e6 if len(queueId) > 13 else None
    except ValueError:
        return None


envelopeRecord = QueueRecord.new
"""
The envelope record of a newly received message, every recipient pending
and due at once: L{QueueRecord.new}, under the name the session and the
scheduler have long used.
"""


def _writeAll(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd}; C{os.write} may write less."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _readBack(fd: int, length: int) -> bytes:
    """The first C{length} octets of C{fd} (fewer if it is shorter)."""
    data = os.pread(fd, length, 0)
    while len(data) < length:
        more = os.pread(fd, length - len(data), len(data))
        if not more:
            break
        data += more
    return data


def _copy(source: int, target: int, length: int) -> None:
    """
    Copy C{length} octets from the current position of descriptor
    C{source} to descriptor C{target}, in the kernel when it can
    (C{copy_file_range}).

    @raise OSError: C{EIO} when C{source} ends before C{length} octets.
    """
    left = length
    kernel = hasattr(os, "copy_file_range")
    while left > 0:
        copied = 0
        if kernel:
            try:
                copied = os.copy_file_range(source, target, left)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = False
                continue
        else:
            chunk = os.read(source, min(left, _WRITE_BUFFER))
            _writeAll(target, chunk)
            copied = len(chunk)
        if copied == 0:
            raise OSError(errno.EIO, f"queue file shorter than its record says ({left} missing)")
        left -= copied


def _unlinkQuietly(path: str) -> OSError | None:
    """
    Remove C{path} if it exists.

    @return: None when the file is gone, the L{OSError} when it could not be
        removed (for the caller to log).
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e
    return None


class IncomingMessage:
    """
    A message being received: a new file under C{<spool>/tmp/}.

    The SMTP server writes the message to it on the reactor thread (writes go
    to the page cache; they do not wait for the disk), then hands it to
    L{Spool.commit}, which flushes, fsyncs and closes it in the thread pool.

    @ivar path: the file's path, under C{tmp/}.
    @ivar queueId: the queue id the message will have.
    @ivar size: how many octets have been written so far.
    """

    def __init__(self, queueId: str, path: str, fd: int) -> None:
        self.queueId = queueId
        self.path = path
        self.size = 0
        # A descriptor and a list of chunks, not a buffered file object:
        # that one probes the descriptor (fstat, lseek) when made, and the
        # commit writes the chunks and the record in one go.
        self._fd = fd
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._committing = False
        self._discarded = False
        self._header: tuple[bytes, int] | None = None
        self._head = bytearray()

    @property
    def head(self) -> bytes:
        """
        The first octets written, up to L{FIRST_READ}: what L{Message}
        reads first, kept so that it need not read them back from the file.
        """
        return bytes(self._head)

    def replaceHeader(self, header: bytes, bodyOffset: int) -> None:
        """
        Store C{header} instead of the first C{bodyOffset} octets: the
        commit writes C{header} followed by the received bytes from
        C{bodyOffset} on, so the body is stored exactly as received.  Used
        when message policies edited the header section.
        """
        if self._committing or self._discarded:
            raise ValueError(f"message {self.queueId} is no longer writable")
        if not 0 <= bodyOffset <= self.size:
            raise ValueError(f"body offset {bodyOffset} outside the message")
        self._header = (header, bodyOffset)
        self.size = len(header) + self.size - bodyOffset

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the message.

        @raise OSError: when the file system refuses it (e.g. C{ENOSPC});
            the caller should then L{discard} the message.
        @raise ValueError: after L{discard} or L{Spool.commit}.
        """
        if self._committing or self._discarded:
            raise ValueError(f"message {self.queueId} is no longer writable")
        data = bytes(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _WRITE_BUFFER:
            self._writeOut()
        self.size += len(data)
        room = FIRST_READ - len(self._head)
        if room > 0:
            self._head += data[:room]

    def flush(self) -> None:
        """
        Push buffered octets to the file (not to the disk: that is
        L{Spool.commit}'s fsync), so that a message policy can read the
        whole message from L{path} before the commit.

        @raise OSError: when the file system refuses it.
        """
        if self._committing or self._discarded:
            raise ValueError(f"message {self.queueId} is no longer writable")
        self._writeOut()

    def _writeOut(self, last: bytes = b"") -> None:
        """Write the chunks kept so far, and C{last}, with one system call."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if last:
            chunks.append(last)
        if chunks:
            _writeAll(self._fd, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def discard(self) -> None:
        """
        Close and remove the file, leaving no trace of the message.

        Idempotent and never raises, so it is safe in any error path.  Once
        the message has been handed to L{Spool.commit} the spool owns it and
        this does nothing: the commit either makes it durable or cleans it
        up itself.
        """
        if self._committing or self._discarded:
            return
        self._discarded = True
        self._closeQuietly()
        _unlinkQuietly(self.path)

    def _closeQuietly(self) -> None:
        """
        Close the descriptor (once: a closed number may be reused by then),
        ignoring errors; what was not written yet is dropped.
        """
        fd, self._fd = self._fd, -1
        self._chunks, self._buffered = [], 0
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


class _PendingCommit:
    """
    One message between L{Spool.commit} and the firing of its Deferred.

    @ivar incoming: the message.
    @ivar record: its envelope record.
    @ivar trailer: what is appended to the message: the serialised record
        and the footer (L{relayd.queue.record.encodeTrailer}).
    @ivar deferred: fires with the queue id once the message is durable.
    @ivar tmpPath: C{tmp/<id>}.
    @ivar queuePath: C{incoming/<id>}.
    """

    def __init__(
        self, spool: Spool, incoming: IncomingMessage, record: QueueRecord, trailer: bytes
    ) -> None:
        self.queueId = incoming.queueId
        self.incoming = incoming
        self.record = record
        self.trailer = trailer
        self.deferred: Deferred[str] = Deferred()
        self.tmpPath = incoming.path
        self.queuePath = os.path.join(spool._incoming, incoming.queueId)
        # With the journal (L{relayd.queue.journal}): the queue file's
        # octets, and the segment they go to.
        self.payload: bytes | None = None
        self.segment: Segment | None = None


@implementer(IIncomingSpool, IQueue)
class Spool(Service):
    """
    The on-disk queue: commit protocol, group commit, crash recovery and
    the free-space reserve.

    @ivar directory: the spool's root directory.
    @ivar reserveBytes: free space, in octets, that must remain after a
        message is accepted.
    @ivar batchCount: how many fsyncs of C{incoming/} commits have run,
        each shared by the commits that were waiting for one (for tests and
        statistics).
    @ivar log: the L{Logger}; events about a message carry C{queue_id}.
    """

    def __init__(
        self,
        directory: str,
        reserveBytes: int,
        reactor: Any,
        threads: int = 4,
        log: Logger | None = None,
        receiver: bool = False,
        journal: bool = True,
        lockWait: float = 0.0,
        asyncSync: bool = True,
    ) -> None:
        """
        @param directory: the spool's root directory, created if missing.
        @param reserveBytes: see L{reserveOk}.
        @param reactor: the reactor: timers, and delivery of thread results.
        @param threads: the size of the spool's thread pool.
        @param log: the logger to use; by default namespace C{relayd.queue.spool}.
        @param receiver: this is a receiving process beside the queue
            manager (L{relayd.receivers}): it only commits new messages into
            C{incoming/}, each under its own name, and leaves the lock and
            startup recovery to the queue manager, which owns the spool and
            alone moves, updates and removes what is in it.
        @param journal: commit small messages through the journal
            (L{relayd.queue.journal}) where the kernel has a boot id;
            without it each message's queue file is fsync'd on its own.
        @param lockWait: seconds to wait for the spool's lock at startup
            (see L{_lock}) before giving up with L{SpoolLocked}.
        @param asyncSync: sync the journal through Linux AIO where the
            kernel has it (L{relayd.queue.aio}); False syncs it in the
            spool's threads, as happens anyway where AIO is missing.
        """
        self.directory = os.path.abspath(directory)
        self.reserveBytes = reserveBytes
        self.log = log if log is not None else Logger(namespace="relayd.queue.spool")
        self._reactor = reactor
        self._threads = threads
        self._tmp = os.path.join(self.directory, "tmp")
        self._incoming = os.path.join(self.directory, "incoming")
        # Whether each commit logs its debug line (the service turns it off
        # below [logging] level debug: the line would be made to be dropped).
        self.logDurable = True
        # Each state's directory with its separator: a queue file's path is
        # one concatenation (os.path.join is Python code, several times
        # per delivered message).
        self._prefixes: dict[str, str] = {
            str(state): os.path.join(self.directory, state, "") for state in STATES
        }
        self._pool: SpoolThreads | None = None
        self._refreshLoop: LoopingCall | None = None
        self._freeBytes: int | None = None
        self._accepting = False
        self._incomingFd: int | None = None
        self._incomingSync = GroupSync(self._incoming, self._fsyncIncoming)
        self._busy = 0
        self._unlinks: list[tuple[str, Deferred[None]]] = []
        self._idleWaiters: list[Deferred[None]] = []
        self._lastIdTime = 0
        self._observers: list[QueueObserver] = []
        self.receiver = receiver
        self.lockWait = lockWait
        self._asyncSync = asyncSync
        self._lockFd: int | None = None
        # The boot id recovery compares segments with, journal or not.
        self._boot = bootId()
        self._journalWanted = journal
        self._journal: Journal | None = None
        self._rotateLoop: LoopingCall | None = None
        self._tombstones = Tombstones(self.directory)
        self.journalCommits = 0
        """Messages committed through the journal (for metrics)."""
        self._segments: set[Segment] = set()
        self._retiredSyncs = 0
        self._pruneCall: Any = None
        self._random = random.Random(secrets.token_bytes(16))

    # Service

    def startService(self) -> None:
        """
        Create the directories, recover from the previous run, measure the
        free space and start the thread pool and the free-space refresh.

        Recovery runs synchronously, before the listeners start, so that no
        message is accepted into a queue still holding a crash's debris.
        """
        os.makedirs(self.directory, mode=_DIRECTORY_MODE, exist_ok=True)
        if not self.receiver:
            self._lock()
            for name in ("tmp", JOURNAL_DIRECTORY, *STATES):
                os.makedirs(os.path.join(self.directory, name), mode=_DIRECTORY_MODE, exist_ok=True)
            fsyncDirectory(self.directory)
            self._recover()
        journal = os.path.join(self.directory, JOURNAL_DIRECTORY)
        if self._journalWanted and self._boot is not None and os.path.isdir(journal):
            sync = None
            if self._asyncSync:
                try:
                    sync = AsyncSync(self._reactor, journal)
                except OSError as e:
                    self.log.info(
                        "journal synced in the spool's threads (no AIO fsync: {error})", error=e
                    )
            self._journal = Journal(self.directory, self._boot, sync=sync)
        self._freeBytes = self._statFreeBytes()
        Service.startService(self)
        self._incomingFd = os.open(self._incoming, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self._pool = SpoolThreads(self._reactor, self._threads, "relayd-spool")
        self._pool.start()
        self._accepting = True
        self._refreshLoop = LoopingCall(self.refreshFreeSpace)
        self._refreshLoop.clock = self._reactor
        self._refreshLoop.start(REFRESH_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("free-space refresh stopped", f)
        )
        if self._journal is not None:
            self._rotateLoop = LoopingCall(self._rotateIdle)
            self._rotateLoop.clock = self._reactor
            self._rotateLoop.start(SEGMENT_AGE, now=False).addErrback(
                lambda f: self.log.failure("journal rotation stopped", f)
            )

    def stopService(self) -> Deferred[None]:
        """
        Stop taking commits, let the commits in flight finish, then stop the
        thread pool.

        @return: a Deferred firing once every commit in flight has fired and
            the pool's threads have been joined.
        """
        Service.stopService(self)
        self._accepting = False
        if self._refreshLoop is not None and self._refreshLoop.running:
            self._refreshLoop.stop()
        self._refreshLoop = None
        if self._rotateLoop is not None and self._rotateLoop.running:
            self._rotateLoop.stop()
        self._rotateLoop = None
        if self._pruneCall is not None:
            # Tombstones left in the file are read and deleted by the
            # next start's recovery.
            self._pruneCall.cancel()
            self._pruneCall = None
        if self._journal is not None:
            # Retired once its last commit is done: a graceful stop leaves
            # no segment behind.
            segment = self._journal.rotate()
            if segment is not None:
                self._segmentDone(segment, started=False)
        return self._whenIdle().addCallback(lambda _: self._stopPool())

    def _stopPool(self) -> None:
        """Join the (now idle) threads of the pool; release the lock."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        if self._journal is not None and self._journal.sync is not None:
            self._journal.sync.close()
        fd, self._incomingFd = self._incomingFd, None
        if fd is not None:
            os.close(fd)
        self._unlock()

    def _fsyncIncoming(self, path: str) -> None:
        """
        In a spool thread: fsync C{incoming/} through the descriptor held
        open for the spool's life (one system call, not open-fsync-close).
        """
        fd = self._incomingFd
        if fd is None:
            raise SpoolStopped()
        os.fsync(fd)

    def _lock(self) -> None:
        """
        Take an exclusive C{flock} on C{<spool>/lock} for as long as this
        spool runs, and write this process's pid into the file; the kernel
        drops the lock when the last process holding the locked file ends,
        even by C{kill -9}: this one, and the receivers it hands the file
        to (L{lockFd}), so that no queue manager recovers the spool while a
        receiver of a killed one still commits into it.

        When the lock is held and the pid in the file is of a process that
        has ended, what holds it is that queue manager's receivers, which
        stop by themselves within their graceful stop's deadline: wait up
        to L{lockWait} seconds (blocking: startup), logged once.

        @raise SpoolLocked: at once when the process named in the file runs
            (another relayd on this spool) or none is named; after
            L{lockWait} seconds when the lock is still held.
        """
        fd = os.open(
            os.path.join(self.directory, "lock"),
            os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
            _FILE_MODE,
        )
        started = time.monotonic()
        ended: int | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if ended is None:
                ended = _endedHolder(fd)
                if ended is not None:
                    self.log.warn(
                        "spool {directory} is locked, but the relayd that locked it "
                        "(pid {pid}) has ended: waiting up to {wait:g}s for its "
                        "receivers to stop",
                        directory=self.directory,
                        pid=ended,
                        wait=self.lockWait,
                    )
            if ended is None or time.monotonic() - started >= self.lockWait:
                os.close(fd)
                raise SpoolLocked(self.directory)
            time.sleep(_LOCK_POLL)
        if ended is not None:
            self.log.info("spool lock taken after {waited:.1f}s", waited=time.monotonic() - started)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        except OSError:
            os.close(fd)
            raise
        self._lockFd = fd

    @property
    def lockFd(self) -> int | None:
        """The locked file's descriptor while this spool holds the lock."""
        return self._lockFd

    def _unlock(self) -> None:
        fd, self._lockFd = self._lockFd, None
        if fd is not None:
            os.close(fd)

    def _whenIdle(self) -> Deferred[None]:
        """Return a Deferred firing when no pool work is outstanding."""
        if not self._busy:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idleWaiters.append(waiter)
        return waiter

    def _release(self) -> None:
        """One piece of pool work is done; wake L{_whenIdle} waiters."""
        self._busy -= 1
        if not self._busy:
            waiters, self._idleWaiters = self._idleWaiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _inPool(self, f: Any, *args: Any) -> Deferred[Any]:
        """Run C{f(*args)} in the spool's pool; the result comes back here."""
        assert self._pool is not None
        return self._pool.run(f, *args)

    def _logFromThread(self, level: str, fmt: str, **kw: Any) -> None:
        """Log from a pool thread by handing the event to the reactor."""
        self._reactor.callFromThread(getattr(self.log, level), fmt, **kw)

    # Free space

    def reserveOk(self, size: int) -> bool:
        """
        Whether a message of C{size} octets leaves at least C{reserveBytes}
        free.  Uses the cached figure, refreshed every few seconds off the
        reactor thread and lowered by each commit in between, so it never
        blocks.  False when free space has never been measured.
        """
        if self._freeBytes is None:
            return False
        return self._freeBytes - size >= self.reserveBytes

    def freeBytes(self) -> int | None:
        """
        Free octets as last measured (L{refreshFreeSpace}, lowered by each
        commit since), for the metrics; None before the first measure.
        Never touches the disk.
        """
        return self._freeBytes

    def _statFreeBytes(self) -> int:
        """Free octets available to unprivileged users.  Blocking."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def refreshFreeSpace(self) -> Deferred[None]:
        """
        Measure the free space in the thread pool and cache it.  Called
        every L{REFRESH_INTERVAL} seconds; never fails (a failed measurement
        is logged and the old figure kept).
        """
        if self._pool is None:
            return succeed(None)
        self._busy += 1

        def stored(freeBytes: int) -> None:
            self._freeBytes = freeBytes

        def failed(f: Failure) -> None:
            self.log.failure("could not measure free space in the spool", f)

        d = self._inPool(self._statFreeBytes)
        d.addCallbacks(stored, failed)
        d.addBoth(lambda _: self._release())
        return d

    # Queue ids and messages

    def newQueueId(self) -> str:
        """
        Return a new queue id: 13 hex digits of microseconds since the epoch
        (strictly increasing within this process, so ids sort by time) and 5
        random characters from C{[0-9A-Z]}, so that processes sharing a spool
        do not collide.  18 characters, C{[0-9A-Z]} only.
        """
        now = max(time.time_ns() // 1000, self._lastIdTime + 1)
        self._lastIdTime = now
        # The suffix only keeps processes sharing a spool apart (a queue id
        # is no secret: clients see it): a generator seeded from the
        # system's randomness, not one getrandom() call per character.
        suffix = "".join(self._random.choices(_ID_ALPHABET, k=_ID_SUFFIX_LENGTH))
        return f"{now:013X}{suffix}"

    def openMessage(self, queueId: str) -> IncomingMessage:
        """
        Create C{tmp/<queueId>} for a message about to be received.

        Opening one new file is cheap enough for the reactor thread; the
        expensive part (fsync) happens in L{commit}.

        @raise ValueError: when C{queueId} is not a queue id.
        @raise OSError: when the file cannot be created (C{EEXIST} if the id
            is already in use).
        """
        if not QUEUE_ID.match(queueId):
            raise ValueError(f"not a queue id: {queueId!r}")
        path = os.path.join(self._tmp, queueId)
        # Read and write: the journal reads a flushed message back.
        fd = os.open(
            path,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            _FILE_MODE,
        )
        return IncomingMessage(queueId, path, fd)

    # Commit

    def commit(self, incoming: IncomingMessage, record: QueueRecord) -> Deferred[str]:
        """
        Make the message durable and put it in C{incoming/}.

        The record is serialised now, on the calling thread; its C{size}
        is set to what was written of the message.  From here on the spool
        owns C{incoming}.

        @param incoming: the message, as returned by L{openMessage}.
        @param record: its envelope, see L{envelopeRecord}; its C{queueId}
            must be C{incoming.queueId}.
        @return: a Deferred firing with the queue id once the queue file
            and its directory entry are on disk, or failing (typically with
            an L{OSError}) with nothing of the message left in the spool.
        """
        queueId = incoming.queueId
        if incoming._committing or incoming._discarded:
            return fail(ValueError(f"message {queueId} was already committed or discarded"))
        if not self._accepting:
            incoming.discard()
            return fail(SpoolStopped())
        if not isinstance(record, QueueRecord) or record.queueId != queueId:
            incoming.discard()
            return fail(ValueError(f"envelope is not for message {queueId}"))
        try:
            if record.size != incoming.size:
                record = replace(record, size=incoming.size)
            trailer = encodeTrailer(record, incoming.size)
        except Exception:
            incoming.discard()
            return fail()
        payload: bytes | None = None
        journaled = (
            self._journal is not None and incoming.size + len(trailer) <= JOURNAL_MESSAGE_LIMIT
        )
        if incoming._header is None:
            # The record goes to the page cache here, like the message
            # before it; the thread only waits for the disk.
            try:
                if journaled and incoming._buffered == incoming.size:
                    # The whole queue file is in memory: one write, and
                    # the same octets go to the journal.
                    payload = b"".join([*incoming._chunks, trailer])
                    incoming._chunks, incoming._buffered = [], 0
                    _writeAll(incoming._fd, payload)
                else:
                    incoming._writeOut(trailer)
            except Exception as e:
                incoming.discard()
                self.log.warn(
                    "{queue_id}: could not queue message: {error}", queue_id=queueId, error=e
                )
                return fail()
        segment = self._segmentFor(queueId, incoming.size + len(trailer)) if journaled else None
        incoming._committing = True
        pending = _PendingCommit(self, incoming, record, trailer)
        pending.payload, pending.segment = payload, segment
        self._busy += 1
        if segment is not None and isinstance(segment.writer, AsyncAppend):
            d = self._commitAsync(pending, segment.writer)
        else:
            d = self._inPool(self._commitInThread, pending)
        d.addBoth(self._finish, pending)
        return pending.deferred

    @property
    def journalMode(self) -> str:
        """
        How this process's commits go: C{aio} (through the journal, synced
        by Linux AIO), C{threads} (through the journal, synced in the
        spool's threads) or C{off} (each message fsync'd on its own).
        """
        if self._journal is None:
            return "off"
        return "threads" if self._journal.sync is None else "aio"

    @property
    def journalSyncs(self) -> int:
        """Syncs of this process's journal segments so far (for metrics)."""
        return self._retiredSyncs + sum(segment.writer.count for segment in self._segments)

    @property
    def batchCount(self) -> int:
        """How many fsyncs of C{incoming/} the commits shared so far."""
        return self._incomingSync.count

    def _commitInThread(self, pending: _PendingCommit) -> None:
        """
        In a spool thread, the rest of the commit protocol for one message
        in one hand-off: fsync the file (its record was appended on the
        reactor thread, L{commit}), rename it into C{incoming/}, and fsync
        C{incoming/} together with the commits of the other threads
        (L{GroupSync}: one directory fsync for all the renames that were
        waiting for one).  On failure nothing of the message is left: its
        file is removed, and the error raised.

        Few system calls on purpose: each one releases the GIL, and taking
        it back while the reactor thread is busy can wait up to the
        interpreter's switch interval (5 ms); three calls here (fsync,
        rename, the shared directory fsync) instead of nine kept that wait
        out of the time to the C{250}.
        """
        incoming = pending.incoming
        if pending.segment is not None:
            self._journalInThread(pending, pending.segment)
            return
        try:
            if incoming._header is not None:
                incoming._writeOut()
                incoming._closeQuietly()
                self._rewriteHeader(pending.tmpPath, *incoming._header, pending.trailer)
            else:
                os.fsync(incoming._fd)
        except BaseException:
            self._abandon(pending, pending.tmpPath)
            raise
        self._renameIntoIncoming(pending)
        try:
            self._incomingSync.sync()
        except BaseException:
            # The entry may or may not be on disk; the client gets a
            # temporary failure, so take it out again.
            self._abandon(pending, pending.queuePath)
            raise

    def _renameIntoIncoming(self, pending: _PendingCommit) -> None:
        """C{tmp/<id>} to C{incoming/<id>}, or no trace of it (a spool thread, or the reactor's)."""
        try:
            os.rename(pending.tmpPath, pending.queuePath)
        except BaseException:
            self._abandon(pending, pending.tmpPath)
            raise

    def _commitAsync(self, pending: _PendingCommit, writer: AsyncAppend) -> Deferred[None]:
        """
        The commit of a message through a journal synced from the reactor
        thread (L{relayd.queue.journal.AsyncAppend}).  A message whose
        queue file is in memory (the usual case) is renamed into
        C{incoming/} and its record appended here, at once, and no thread
        is involved: the C{250} waits only for the kernel's sync.  Else
        its octets are made ready in a spool thread first
        (L{_journalPayloadInThread}).  On failure its file is removed.
        """
        if pending.payload is not None:
            try:
                self._renameIntoIncoming(pending)
            except Exception:
                return fail()
            ready: Deferred[bytes] = succeed(pending.payload)
        else:
            ready = self._inPool(self._journalPayloadInThread, pending)

        def append(payload: bytes) -> Deferred[None]:
            return writer.append(encodeRecord(pending.queueId, payload)).addErrback(failed)

        def failed(failure: Failure) -> Failure:
            self._abandon(pending, pending.queuePath)
            return failure

        return ready.addCallback(append)

    def _journalInThread(self, pending: _PendingCommit, segment: Segment) -> None:
        """
        In a spool thread, the commit of a message through the journal
        synced in threads: its octets made ready and the file renamed
        (L{_journalPayloadInThread}), then its record appended to the
        segment and the wait for the segment's group C{fdatasync}
        (L{relayd.queue.journal.GroupAppend}).  On failure its file is
        removed and the error raised.
        """
        payload = self._journalPayloadInThread(pending)
        writer = segment.writer
        assert isinstance(writer, GroupAppend)
        try:
            writer.append(encodeRecord(pending.queueId, payload))
        except BaseException:
            self._abandon(pending, pending.queuePath)
            raise

    def _journalPayloadInThread(self, pending: _PendingCommit) -> bytes:
        """
        In a spool thread: the octets of a message's queue file for its
        journal record (kept from the commit, or read back from the page
        cache, or written anew with the edited header, none of them
        fsync'd), and the file renamed into C{incoming/}.  On failure its
        file is removed and the error raised.
        """
        incoming = pending.incoming
        payload = pending.payload
        try:
            if incoming._header is not None:
                incoming._writeOut()
                incoming._closeQuietly()
                self._rewriteHeader(pending.tmpPath, *incoming._header, pending.trailer, sync=False)
                with open(pending.tmpPath, "rb") as f:
                    payload = f.read()
            elif payload is None:
                length = incoming.size + len(pending.trailer)
                payload = _readBack(incoming._fd, length)
                if len(payload) != length:
                    raise OSError(errno.EIO, "queue file shorter than written", pending.tmpPath)
        except BaseException:
            self._abandon(pending, pending.tmpPath)
            raise
        self._renameIntoIncoming(pending)
        return payload

    @staticmethod
    def _rewriteHeader(
        path: str, header: bytes, bodyOffset: int, trailer: bytes, sync: bool = True
    ) -> None:
        """
        In the pool: write C{header}, the body of C{path} (from
        C{bodyOffset}) and C{trailer} to a new file, fsync it (unless
        C{sync} is false: the journal keeps a copy) and rename it over
        C{path}.  The directory is fsync'd by the commit that renames the
        file into C{incoming/}.
        """
        new = path + ".rw"
        fd = os.open(
            new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), _FILE_MODE
        )
        try:
            _writeAll(fd, header)
            with open(path, "rb") as old:
                old.seek(bodyOffset)
                while chunk := old.read(_WRITE_BUFFER):
                    _writeAll(fd, chunk)
            _writeAll(fd, trailer)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlinkQuietly(new)
            raise
        os.close(fd)
        os.replace(new, path)

    def _abandon(self, pending: _PendingCommit, *paths: str) -> None:
        """
        A commit failed: close its file and remove C{paths}, in that order.
        In a spool thread or on the reactor thread (the log line is handed
        to the reactor either way).
        """
        pending.incoming._closeQuietly()
        for path in paths:
            error = _unlinkQuietly(path)
            if error is not None:
                self._logFromThread(
                    "error",
                    "could not remove {path} of failed message {queue_id}: {error}",
                    queue_id=pending.queueId,
                    path=path,
                    error=error,
                )

    def _finish(self, result: Failure | None, pending: _PendingCommit) -> None:
        """Back on the reactor thread: fire the Deferred of one message."""
        failure = result if isinstance(result, Failure) else None
        pending.incoming._closeQuietly()  # durable (or removed) by now
        try:
            if pending.segment is not None:
                self._segmentDone(pending.segment)
                if failure is None:
                    self.journalCommits += 1
            if failure is None:
                if self._freeBytes is not None:
                    self._freeBytes -= pending.incoming.size + len(pending.trailer)
                # The receiving session's "queued" line follows at info.
                if self.logDurable:
                    self.log.debug(
                        "{queue_id}: durable in incoming ({size} octets)",
                        queue_id=pending.queueId,
                        size=pending.incoming.size,
                    )
                # The committer first: its client is waiting for the 250,
                # which is sent from this callback.  The observers (the
                # queue manager starting the message's first attempt: a
                # rename, a read of the file, a connection; or a
                # receiver's notice to it over a pipe) come after it, not
                # on the way to the 250.
                pending.deferred.callback(pending.queueId)
                self._notifyQueued(pending.queueId, pending.record)
            else:
                self.log.warn(
                    "{queue_id}: could not queue message: {error}",
                    queue_id=pending.queueId,
                    error=failure.value,
                )
                pending.deferred.errback(failure)
        finally:
            self._release()

    # The journal

    def _segmentDone(self, segment: Segment, started: bool = True) -> None:
        """
        One commit with a record in C{segment} finished (C{started}), or
        the segment was rotated: once it is rotated and none of its
        commits is left, retire it in a spool thread
        (L{relayd.queue.journal.retireSegment}).
        """
        if started:
            segment.pending -= 1
        if not segment.rotated or segment.pending:
            return
        segment.pending = -1  # retired once only
        # No sync of it is left to run: its count moves to the total.
        self._segments.discard(segment)
        self._retiredSyncs += segment.writer.count
        self._busy += 1

        def retire() -> None:
            try:
                retireSegment(self.directory, segment.path, segment.queueIds)
            finally:
                segment.close()

        def failed(f: Failure) -> None:
            self.log.error(
                "could not retire journal segment {path}: {error}; "
                "it stays, and is retired again at the next start",
                path=segment.path,
                error=f.value,
            )

        self._inPool(retire).addErrback(failed).addBoth(lambda _: self._release())

    def _segmentFor(self, queueId: str, length: int) -> Segment | None:
        """
        The journal segment for a record of C{length} octets, or None when
        no new segment can be made (the message is then fsync'd on its
        own; logged).
        """
        assert self._journal is not None
        try:
            segment, rotated = self._journal.segmentFor(queueId, length)
        except OSError as e:
            self.log.error(
                "{queue_id}: no journal segment ({error}): committed without the journal",
                queue_id=queueId,
                error=e,
            )
            return None
        self._segments.add(segment)
        if rotated is not None:
            self._segmentDone(rotated, started=False)
        return segment

    def _rotateIdle(self) -> None:
        """
        Every L{SEGMENT_AGE} seconds: rotate a segment that holds records
        and is that old, so that no record stays un-retired for long when
        no message commits.
        """
        journal = self._journal
        current = journal.current if journal is not None else None
        if journal is None or current is None or not current.queueIds:
            return
        if time.monotonic() - current.started < SEGMENT_AGE / 2:
            return  # rotated at its next commit, or at the next turn
        segment = journal.rotate()
        if segment is not None:
            self._segmentDone(segment, started=False)

    def retireSegmentsOf(self, pid: int) -> Deferred[None]:
        """
        In a spool thread: retire the journal segments of process C{pid}, a
        receiver that ended (it can no longer retire them itself).  Errors
        are logged; the segments then wait for the next start.
        """
        if self._pool is None or self.receiver:
            return succeed(None)

        def retireAll() -> int:
            paths = segmentsOf(self.directory, pid)
            for path in paths:
                retireSegment(self.directory, path)
            return len(paths)

        def failed(f: Failure) -> None:
            self.log.error(
                "could not retire the journal of process {pid}: {error}",
                pid=pid,
                error=f.value,
            )

        return self._tracked(retireAll).addCallbacks(lambda _: None, failed)

    # Recovery

    def _recover(self) -> None:
        """
        Clean up after the previous run (blocking, called at startup,
        before any receiver exists):

          - everything in C{tmp/} is an unfinished message: remove it;
          - a spool of the previous layout is converted (L{_convert});
          - queue files left in C{active/} were being delivered: put them
            back in C{incoming/};
          - a queue file that cannot be read, or whose record is not for
            the id it is named after, goes to C{corrupt/}.
        """
        for entry in os.scandir(self._tmp):
            queueId = entry.name.partition(".")[0]
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError as e:
                self.log.error(
                    "recovery: could not remove {path}: {error}",
                    queue_id=queueId,
                    path=entry.path,
                    error=e,
                )
            else:
                self.log.info(
                    "recovery: removed unfinished {name} from tmp",
                    queue_id=queueId,
                    name=entry.name,
                )

        self._convert()

        for path, seen, restored, thisBoot in recoverJournal(
            self.directory,
            self._boot,
            lambda queueId, what: self.log.warn(
                "{queue_id}: recovery: {what}", queue_id=queueId, what=what
            ),
        ):
            self.log.emit(
                LogLevel.warn if restored else LogLevel.info,
                "recovery: journal segment {path} ({when}): "
                "{restored} of its {seen} messages written back",
                path=path,
                when="this boot" if thisBoot else "before a reboot",
                seen=seen,
                restored=restored,
            )

        active = self._stateDirectory(QueueState.ACTIVE)
        for name in sorted(os.listdir(active)):
            if not QUEUE_ID.match(name):
                continue  # moved to corrupt below
            os.rename(os.path.join(active, name), os.path.join(self._incoming, name))
            self.log.info("{queue_id}: recovery: returned from active to incoming", queue_id=name)

        for state in QUEUED_STATES:
            stateDirectory = self._stateDirectory(state)
            for name in sorted(os.listdir(stateDirectory)):
                problem = self._checkQueueFile(name, os.path.join(stateDirectory, name))
                if problem is not None:
                    self._moveToCorrupt(state, name, problem)

        for name in ("tmp", *STATES):
            fsyncDirectory(os.path.join(self.directory, name))

    def _stateDirectory(self, state: str) -> str:
        return os.path.join(self.directory, state)

    def _convert(self) -> None:
        """
        Convert a spool of the previous layout (version 1: the message in
        C{data/<id>}, its envelope in C{<state>/<id>.json}) to queue files,
        each in the state its envelope was in (C{active} to C{incoming}),
        with every recipient's state kept.  Blocking; part of L{_recover}.

        Each message is copied to a new queue file in C{tmp/}, fsync'd and
        renamed into its state; only when those directories are fsync'd
        are the old envelope and data file removed.  A crash at any point
        leaves either the old files (converted again on the next start) or
        the new queue file (the old ones are then removed as leftovers).
        The version-1 rule for an envelope found both in C{active/} and in
        another state (a crash inside an update) holds: the other one wins.
        An envelope that cannot be read, or has no data file, goes to
        C{corrupt/} as before, and the data file it names to
        C{corrupt/<id>.data} beside it, for a human to look at; other data
        files (never committed) are removed, and then C{data/} itself.
        """
        data = os.path.join(self.directory, "data")
        if not os.path.isdir(data):
            return
        converted = []
        for state in QUEUED_STATES:
            directory = self._stateDirectory(state)
            for name in sorted(os.listdir(directory)):
                if not name.endswith(".json"):
                    continue
                queueId = name.removesuffix(".json")
                path = os.path.join(directory, name)
                if not QUEUE_ID.match(queueId):
                    self._moveToCorrupt(state, name, "unexpected file name")
                    continue
                done = [s for s in QUEUED_STATES if os.path.exists(self._queuePath(s, queueId))]
                newer = [
                    s
                    for s in QUEUED_STATES
                    if s != QueueState.ACTIVE
                    and os.path.exists(os.path.join(self._stateDirectory(s), name))
                ]
                if done or (state == QueueState.ACTIVE and newer):
                    # Converted before a crash; or the stale copy of a
                    # version-1 update (the newer state's envelope counts).
                    os.unlink(path)
                    continue
                try:
                    with open(path, "rb") as f:
                        record = QueueRecord.decode(f.read())
                    if record.queueId != queueId:
                        raise CorruptRecord("envelope is not for this queue id")
                except (OSError, CorruptRecord) as e:
                    self._moveToCorrupt(state, name, f"unreadable envelope: {e}")
                    continue
                target = QueueState.INCOMING if state == QueueState.ACTIVE else state
                try:
                    self._writeConverted(record, os.path.join(data, queueId), target)
                except FileNotFoundError:
                    self._moveToCorrupt(state, name, "data file is missing")
                    continue
                converted.append(path)
                self.log.info(
                    "{queue_id}: recovery: converted from the version 1 spool layout "
                    "({state} to {target})",
                    queue_id=queueId,
                    state=state,
                    target=target,
                )
        for state in STATES:
            fsyncDirectory(self._stateDirectory(state))
        for path in converted:
            os.unlink(path)
        corrupt = self._stateDirectory(QueueState.CORRUPT)
        keep = {name.partition(".")[0] for name in os.listdir(corrupt)}
        for name in sorted(os.listdir(data)):
            path = os.path.join(data, name)
            if name in keep:
                # Beside its envelope, for a human to look at.
                aside = os.path.join(corrupt, name + ".data")
                counter = 0
                while os.path.lexists(aside):
                    counter += 1
                    aside = os.path.join(corrupt, f"{name}.data.{counter}")
                os.rename(path, aside)
                continue
            error = _unlinkQuietly(path)
            if error is not None:
                self.log.error(
                    "{queue_id}: recovery: could not remove {path}: {error}",
                    queue_id=name,
                    path=path,
                    error=error,
                )
        fsyncDirectory(corrupt)
        try:
            os.rmdir(data)
        except OSError as e:
            self.log.error("recovery: could not remove {path}: {error}", path=data, error=e)
        fsyncDirectory(self.directory)

    def _writeConverted(self, record: QueueRecord, dataFile: str, state: str) -> None:
        """
        Write the queue file of a version-1 message from its C{record} and
        C{dataFile}: copy, fsync, rename into C{state}.

        @raise FileNotFoundError: when C{dataFile} is missing.
        """
        tmp = os.path.join(self._tmp, record.queueId)
        with open(dataFile, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            record = replace(record, size=size)
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _FILE_MODE
            )
            try:
                try:
                    _copy(source.fileno(), fd, size)
                    _writeAll(fd, encodeTrailer(record, size))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, self._queuePath(state, record.queueId))
            except BaseException:
                _unlinkQuietly(tmp)
                raise

    def _checkQueueFile(self, name: str, path: str) -> str | None:
        """
        Check one queue file found at startup.

        @return: None when it is sound, else what is wrong with it.
        """
        if not QUEUE_ID.match(name):
            return "unexpected file name"
        try:
            readRecord(path, name)
        except (OSError, CorruptRecord) as e:
            return f"unreadable queue file: {e}"
        return None

    def _moveToCorrupt(self, state: str, name: str, problem: str) -> None:
        """
        Move C{<state>/<name>} to C{corrupt/} for a human to look at,
        without overwriting an earlier corrupt entry of the same name.
        """
        corrupt = self._stateDirectory(QueueState.CORRUPT)
        target = os.path.join(corrupt, name)
        counter = 0
        while os.path.lexists(target):
            counter += 1
            target = os.path.join(corrupt, f"{name}.{counter}")
        os.rename(os.path.join(self.directory, state, name), target)
        self.log.error(
            "{queue_id}: recovery: moved from {state} to corrupt: {problem}",
            queue_id=name.partition(".")[0],
            state=state,
            problem=problem,
        )

    # Tooling

    def load(self, queueId: str) -> tuple[QueueRecord, str]:
        """
        Find a queued message.  Blocking; for tests and tooling.

        @return: its record and the path of its queue file.
        @raise KeyError: when no queued state holds C{queueId}.
        """
        found = findQueued(self.directory, queueId)
        if found is None:
            raise KeyError(queueId)
        state, record = found
        return record, self._queuePath(state, queueId)

    def readData(self, queueId: str) -> bytes:
        """
        The message bytes of a queued message.  Blocking; for tests and
        tooling.

        @raise KeyError: when no queued state holds C{queueId}.
        """
        return readData(self.load(queueId)[1])

    def entries(self, state: str = "incoming") -> list[str]:
        """
        List the queue ids in one state, sorted (that is, by arrival).
        Blocking; for tests and tooling.

        @param state: one of L{STATES}.
        @raise ValueError: for an unknown state.
        """
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r}")
        return sorted(
            name for name in os.listdir(self._stateDirectory(state)) if QUEUE_ID.match(name)
        )

    # The delivery side (DESIGN section 5): the scheduler's view of the spool.

    def addQueueObserver(self, observer: QueueObserver) -> None:
        """
        Call C{observer(queueId, record)} on the reactor thread each time a
        message has become durable in C{incoming/}, so the scheduler can
        attempt it at once instead of waiting for a sweep.  C{record} is
        the L{QueueRecord}, or None for a receiver's message.
        """
        self._observers.append(observer)

    def announce(self, queueId: str) -> None:
        """
        Another process (a receiver, L{relayd.receivers}) committed
        C{queueId} into C{incoming/}: tell the queue observers, as for a
        commit of this process's own.
        """
        self._notifyQueued(queueId, None)

    def _notifyQueued(self, queueId: str, record: QueueRecord | None) -> None:
        for observer in self._observers:
            try:
                observer(queueId, record)
            except Exception:
                self.log.failure("{queue_id}: queue observer failed", queue_id=queueId)

    def _queuePath(self, state: str, queueId: str) -> str:
        prefix = self._prefixes.get(state)
        if prefix is None or not QUEUE_ID.match(queueId):
            raise ValueError(f"bad spool entry {state}/{queueId}")
        return prefix + queueId

    def queueFile(self, queueId: str, state: str) -> str:
        """
        The path of the queue file of C{queueId} in C{state}; its message
        is read with L{relayd.queue.record.openData} (it is the first
        C{record.size} octets).
        """
        return self._queuePath(state, queueId)

    def _tracked(self, f: Any, *args: Any) -> Deferred[Any]:
        """Run C{f} in the pool, counted so L{stopService} waits for it."""
        if self._pool is None:
            return fail(SpoolStopped())
        self._busy += 1
        d = self._inPool(f, *args)

        def done(result: Any) -> Any:
            self._release()
            return result

        return d.addBoth(done)

    def read(self, queueId: str, state: str) -> Deferred[QueueRecord]:
        """
        Read the record of C{queueId} in C{state}, on the calling thread
        (see L{_now}).

        @return: a fired Deferred, failed with L{FileNotFoundError} when it
            is not there, L{CorruptRecord} when it cannot be read as one.
        """
        return self._now(readRecord, self._queuePath(state, queueId), queueId)

    def _now(self, f: Any, *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} on the calling (reactor) thread: for the queue
        manager's file operations that never wait for the disk, a read of
        a small queue file's trailer (from the page cache: the receiver
        just wrote it), a rename without fsync.  Each takes a
        few microseconds; handing it to a thread and back cost more than a
        hundred (py-spy on a 2-core VM: waking a spool thread and then the
        reactor was 10-16% of the queue manager's time).  Postfix's qmgr
        does the same operations inline.  Whatever waits for the disk
        (fsync) still goes to the threads.

        @return: a fired Deferred with the result or the failure, like
            L{_tracked}'s (failing with L{SpoolStopped} once stopped).
        """
        if self._pool is None:
            return fail(SpoolStopped())
        try:
            return succeed(f(*args))
        except Exception:
            return fail()

    def scan(self) -> Deferred[list[tuple[str, str, float]]]:
        """
        In the pool: list every queued message as C{(queueId, state,
        nextAttempt)} for the scheduler's index at startup.  C{hold/} is
        included with an infinite next attempt.
        """

        def scan() -> list[tuple[str, str, float]]:
            listed, problems = listQueue(self.directory)
            for _, error in problems:
                raise error
            found = []
            for name in sorted(listed):
                for state in listed[name]:
                    if state == QueueState.HOLD:
                        found.append((name, state, float("inf")))
                        continue
                    try:
                        record = readRecord(self._queuePath(state, name), name)
                    except (OSError, CorruptRecord):
                        continue
                    found.append((name, state, float(record.nextAttempt or 0)))
            return found

        return self._tracked(scan)

    def listQueued(self) -> Deferred[tuple[dict[str, list[str]], list[tuple[str, str]]]]:
        """
        In the pool: which queued states hold a queue file of which queue
        id, from a listing of the directories (names only: no file is
        opened), for the scheduler's sweep to find what its index lost.

        @return: a Deferred firing with the states of each queue id (two
            only when a listing raced with a move), and C{(state, error)}
            for each directory that could not be listed: reported, not
            fatal.
        """

        def listQueued() -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
            found, problems = listQueue(self.directory)
            return found, [(state, str(error)) for state, error in problems]

        return self._tracked(listQueued)

    def update(
        self, queueId: str, state: str, record: QueueRecord, newState: str | None = None
    ) -> Deferred[None]:
        """
        Durably replace the record of C{queueId} (now in C{state}) with
        C{record}, moving it to C{newState} if given: write a new queue
        file in C{tmp/} (the message copied from the old one, then the new
        record), fsync it, rename it over the old one, rename that into
        C{newState}, fsync the directories.  Each step is one rename, so
        at every instant one complete queue file exists, in one state.
        When a previous try already moved it to C{newState} (and failed
        after), it is rewritten there.

        The record is serialised now, on the calling thread.
        """
        if record.queueId != queueId:
            return fail(ValueError(f"record is not for message {queueId}"))
        trailer = encodeTrailer(record, record.size)
        old = self._queuePath(state, queueId)
        new = self._queuePath(newState or state, queueId)
        tmp = os.path.join(self._tmp, f"{queueId}.{secrets.token_hex(4)}")

        def update() -> None:
            source = old
            if new != old and not os.path.exists(old) and os.path.exists(new):
                source = new
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _FILE_MODE
            )
            try:
                try:
                    with open(source, "rb") as f:
                        _copy(f.fileno(), fd, record.size)
                    _writeAll(fd, trailer)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, source)
            except BaseException:
                _unlinkQuietly(tmp)
                raise
            if source != new:
                os.rename(source, new)
                fsyncDirectory(os.path.dirname(new))
            fsyncDirectory(os.path.dirname(source))

        return self._tracked(update)

    def move(self, queueId: str, state: str, newState: str, durable: bool = True) -> Deferred[None]:
        """
        Move the queue file of C{queueId} between states with one rename.
        With C{durable=False} the directories are not fsync'd: for moves
        whose loss a crash may undo harmlessly (incoming to active:
        recovery puts active back into incoming anyway); such a move is a
        bare rename, done at once on the calling thread (L{_now}).
        """
        old = self._queuePath(state, queueId)
        new = self._queuePath(newState, queueId)
        if not durable:
            return self._now(os.rename, old, new)

        def move() -> None:
            os.rename(old, new)
            # The file too: one committed through the journal may not be
            # on disk yet, and its segment's retirement looks for it in
            # the states a message moves on to, not back.
            fd = os.open(new, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsyncDirectory(os.path.dirname(new))
            fsyncDirectory(os.path.dirname(old))

        return self._tracked(move)

    def remove(self, queueId: str, state: str, durable: bool = False) -> Deferred[None]:
        """
        Remove a message that has left the queue for good (delivered,
        bounced, or deleted by an operator): one unlink.

        @param durable: fsync the directory too.  Not for delivered mail: a
            crash that loses the unlink brings the message back and it is
            delivered again, a duplicate, which at-least-once delivery
            allows (DESIGN section 5; Postfix does not fsync removals
            either).  An operator's delete is durable: mail deleted on
            purpose must not come back, neither by a lost unlink nor by a
            replay of the journal after a reboot (its tombstone is written
            first, L{relayd.queue.journal.Tombstones}).
        """
        path = self._queuePath(state, queueId)
        if not durable:
            # In a spool thread, not at once (L{_now}): on ext4 an unlink
            # waits for the journal while receivers' fsyncs commit it
            # (strace under the benchmark's load: 0.26 ms median, up to
            # 4.6 ms), and this reactor also serves SMTP sessions.  The
            # unlinks asked for in one reactor turn go in one hand-off.
            return self._unlinkSoon(path)

        def remove() -> bool:
            try:
                marked = self._tombstones.add(queueId)
            except OSError as e:
                # A full disk is when an operator deletes mail to make
                # room: the delete goes on.
                marked = False
                self._logFromThread(
                    "warn",
                    "{queue_id}: could not write its tombstone ({error}): deleted, but a "
                    "reboot in the next seconds may write it back from the journal",
                    queue_id=queueId,
                    error=e,
                )
            os.unlink(path)
            fsyncDirectory(os.path.dirname(path))
            return marked

        return self._tracked(remove).addCallback(self._tombstoned)

    def _tombstoned(self, marked: bool) -> None:
        """After a durable removal: prune its tombstone once it may be."""
        if marked and self._pruneCall is None and self._pool is not None:
            self._pruneCall = self._reactor.callLater(SEGMENT_AGE, self._pruneTombstones)

    def _pruneTombstones(self) -> None:
        """
        Every L{SEGMENT_AGE} seconds while tombstones are needed: forget
        those whose segments were all retired
        (L{relayd.queue.journal.Tombstones.prune}).
        """
        self._pruneCall = None

        def failed(f: Failure) -> None:
            if f.check(SpoolStopped):
                return
            self.log.error("could not prune the journal's tombstones: {error}", error=f.value)
            self._tombstoned(True)

        self._tracked(self._tombstones.prune).addCallbacks(
            lambda needed: self._tombstoned(needed > 0), failed
        )

    def _unlinkSoon(self, path: str) -> Deferred[None]:
        """
        Unlink C{path} in a spool thread, together with the other unlinks
        asked for in this reactor turn (one hand-off, one wake-up, for all
        the messages a batch of delivery results finished).
        """
        if self._pool is None:
            return fail(SpoolStopped())
        d: Deferred[None] = Deferred()
        if not self._unlinks:
            self._busy += 1  # stopService waits for the batch
            self._reactor.callLater(0, self._unlinkBatch)
        self._unlinks.append((path, d))
        return d

    def _unlinkBatch(self) -> None:
        batch, self._unlinks = self._unlinks, []

        def unlinkAll() -> list[OSError | None]:
            errors: list[OSError | None] = []
            for path, _ in batch:
                try:
                    os.unlink(path)
                    errors.append(None)
                except OSError as e:
                    errors.append(e)
            return errors

        def done(result: list[OSError | None] | Failure) -> None:
            for index, (_, d) in enumerate(batch):
                if isinstance(result, Failure):
                    d.errback(result)
                elif result[index] is None:
                    d.callback(None)
                else:
                    d.errback(Failure(result[index]))
            self._release()  # last: a stop waiting for it sees every outcome

        self._inPool(unlinkAll).addBoth(done)

    def submit(self, record: QueueRecord, data: bytes) -> Deferred[str]:
        """
        Queue a message relayd makes itself (a DSN): same durability as
        mail received over SMTP.  The record's C{queueId} and C{size} are
        filled in.

        @return: a Deferred firing with the new queue id once durable.
        """
        queueId = self.newQueueId()
        record = replace(record, queueId=queueId, size=len(data))
        try:
            incoming = self.openMessage(queueId)
            incoming.write(data)
        except OSError:
            return fail()
        return self.commit(incoming, record)
