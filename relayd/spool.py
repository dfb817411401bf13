# -*- test-case-name: tests.test_spool -*-
"""
The durable queue between receiving and sending (DESIGN.md section 5).

One message is a data file plus a JSON envelope, the I{commit record}::

    <spool>/tmp/<id>            message being received
    <spool>/tmp/<id>.json       envelope being written
    <spool>/data/<id>           the message bytes, for as long as it is queued
    <spool>/<state>/<id>.json   the envelope; <state> is one of incoming,
                                active, deferred, hold, corrupt

The data file never moves once it is in C{data/}; only the envelope moves
between the state directories, each time by a single C{rename}, so a message
is always in exactly one state and a crash can never leave it in two or in
none.

A message gets its SMTP C{250} only after L{Spool.commit} fires, and commit
fires only after the data file, the envelope and both directory entries have
been fsync'd.  Everything that can block runs in the spool's own thread pool,
never on the reactor thread.  Messages that finish at the same time share
one directory fsync each (group commit), which is what keeps throughput up
on disks where fsync costs milliseconds.

Crash safety comes from the order of operations: the data file is renamed
into C{data/} (and C{data/} fsync'd) before its envelope appears in
C{incoming/}.  A crash before the envelope's rename is durable leaves either
files in C{tmp/} or a data file without envelope; startup recovery removes
both, and the client, which never got its C{250}, sends the message again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayd.interfaces import ISpool
from relayd.safeio import fsyncDirectory

__all__ = [
    "Spool",
    "IncomingMessage",
    "SpoolStopped",
    "SpoolLocked",
    "envelopeRecord",
    "arrivalFromQueueId",
    "STATES",
]

STATES = ("incoming", "active", "deferred", "hold", "corrupt")
"""The directories an envelope can be in, one at a time."""

QUEUED_STATES = ("incoming", "active", "deferred", "hold")
"""The states of a message that is still to be delivered (see L{Spool.load})."""

REFRESH_INTERVAL = 5.0
"""Seconds between two refreshes of the cached free-space figure."""

_QUEUE_ID = re.compile(r"^[0-9A-Z]{1,64}$")
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ID_SUFFIX_LENGTH = 5
_FILE_MODE = 0o600
_DIRECTORY_MODE = 0o700
_WRITE_BUFFER = 64 * 1024


class SpoolStopped(OSError):
    """
    The spool is not running (not yet started, or stopping): it takes no
    new commits.  An L{OSError} so that callers mapping spool trouble to a
    temporary SMTP failure need no special case.
    """

    def __init__(self) -> None:
        super().__init__(errno.ESHUTDOWN, "spool is not running")


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


def envelopeRecord(
    queueId: str,
    sender: str,
    recipients: list[str],
    arrival: float,
    size: int,
    body: str,
    client: str,
    helo: str | None,
    user: str | None,
    listener: str,
) -> dict[str, Any]:
    """
    Build the JSON envelope of a newly received message.

    The delivery side rewrites this record as recipients change state, so
    every recipient carries its own state, attempt count, next attempt time
    and last reply.

    @param queueId: the message's queue id.
    @param sender: the reverse-path, C{""} for the null sender.
    @param recipients: the accepted forward-paths, in RCPT order.
    @param arrival: when the message was received (seconds since the epoch).
    @param size: the message size in octets.
    @param body: C{"7BIT"} or C{"8BITMIME"}.
    @param client: the client's IP address.
    @param helo: the EHLO/HELO name, or None.
    @param user: the authenticated user, or None.
    @param listener: the name of the listener that received the message.
    @return: a JSON-serialisable dict, C{"version": 1}.
    """
    return {
        "version": 1,
        "queue_id": queueId,
        "sender": str(sender),
        "recipients": [
            {
                "address": str(address),
                "state": "pending",
                "attempts": 0,
                "next_attempt": None,
                "last_reply": None,
            }
            for address in recipients
        ],
        "arrival": arrival,
        "size": size,
        "body": body,
        "client": client,
        "helo": helo,
        "user": user,
        "listener": listener,
        "attempts": 0,
        "next_attempt": arrival,
    }


def _writeAll(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd}; C{os.write} may write less."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


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

    def __init__(self, queueId: str, path: str, file: Any) -> None:
        self.queueId = queueId
        self.path = path
        self.size = 0
        self._file = file
        self._committing = False
        self._discarded = False
        self._header: tuple[bytes, int] | None = None

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
        self._file.write(data)
        self.size += len(data)

    def flush(self) -> None:
        """
        Push buffered octets to the file (not to the disk: that is
        L{Spool.commit}'s fsync), so that a message policy can read the
        whole message from L{path} before the commit.

        @raise OSError: when the file system refuses it.
        """
        if self._committing or self._discarded:
            raise ValueError(f"message {self.queueId} is no longer writable")
        self._file.flush()

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
        Close the file, ignoring errors: closing flushes the buffer, which
        fails again when the disk is full.  The descriptor is released
        either way.
        """
        try:
            self._file.close()
        except Exception:
            pass


class _PendingCommit:
    """
    One message between L{Spool.commit} and the firing of its Deferred.

    @ivar incoming: the message.
    @ivar payload: the serialised envelope.
    @ivar deferred: fires with the queue id once the message is durable.
    @ivar tmpData: C{tmp/<id>}.
    @ivar tmpEnvelope: C{tmp/<id>.json}.
    @ivar dataPath: C{data/<id>}.
    @ivar envelopePath: C{incoming/<id>.json}.
    """

    def __init__(self, spool: Spool, incoming: IncomingMessage, payload: bytes):
        queueId = incoming.queueId
        self.queueId = queueId
        self.incoming = incoming
        self.payload = payload
        self.deferred: Deferred[str] = Deferred()
        self.record: dict[str, Any] | None = None
        self.tmpData = incoming.path
        self.tmpEnvelope = os.path.join(spool._tmp, queueId + ".json")
        self.dataPath = os.path.join(spool._data, queueId)
        self.envelopePath = os.path.join(spool._incoming, queueId + ".json")


@implementer(ISpool)
class Spool(Service):
    """
    The on-disk queue: commit protocol, group commit, crash recovery and
    the free-space reserve.

    @ivar directory: the spool's root directory.
    @ivar reserveBytes: free space, in octets, that must remain after a
        message is accepted.
    @ivar batchCount: how many group-commit batches have run (for tests and
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
    ) -> None:
        """
        @param directory: the spool's root directory, created if missing.
        @param reserveBytes: see L{reserveOk}.
        @param reactor: the reactor: timers, and delivery of thread results.
        @param threads: the size of the spool's thread pool.
        @param log: the logger to use; by default namespace C{relayd.spool}.
        @param receiver: this is a receiving process beside the queue
            manager (L{relayd.receivers}): it only commits new messages into
            C{incoming/}, each under its own name, and leaves the lock and
            startup recovery to the queue manager, which owns the spool and
            alone moves, updates and removes what is in it.
        """
        self.directory = os.path.abspath(directory)
        self.reserveBytes = reserveBytes
        self.batchCount = 0
        self.log = log if log is not None else Logger(namespace="relayd.spool")
        self._reactor = reactor
        self._threads = threads
        self._tmp = os.path.join(self.directory, "tmp")
        self._data = os.path.join(self.directory, "data")
        self._incoming = os.path.join(self.directory, "incoming")
        self._pool: ThreadPool | None = None
        self._refreshLoop: LoopingCall | None = None
        self._freeBytes: int | None = None
        self._accepting = False
        self._ready: list[_PendingCommit] = []
        self._batchRunning = False
        self._busy = 0
        self._idleWaiters: list[Deferred[None]] = []
        self._lastIdTime = 0
        self._observers: list[Any] = []
        self.receiver = receiver

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
            for name in ("tmp", "data") + STATES:
                os.makedirs(os.path.join(self.directory, name), mode=_DIRECTORY_MODE, exist_ok=True)
            fsyncDirectory(self.directory)
            self._recover()
        self._freeBytes = self._statFreeBytes()
        Service.startService(self)
        self._pool = ThreadPool(0, self._threads, "relayd-spool")
        self._pool.start()
        self._accepting = True
        self._refreshLoop = LoopingCall(self.refreshFreeSpace)
        self._refreshLoop.clock = self._reactor
        self._refreshLoop.start(REFRESH_INTERVAL, now=False).addErrback(
            lambda f: self.log.failure("free-space refresh stopped", f)
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
        return self._whenIdle().addCallback(lambda _: self._stopPool())

    def _stopPool(self) -> None:
        """Join the (now idle) threads of the pool; release the lock."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        self._unlock()

    def _lock(self) -> None:
        """
        Take an exclusive C{flock} on C{<spool>/lock} for as long as this
        spool runs; the kernel drops it when the process dies, even by
        C{kill -9}, so a restart is never locked out.

        @raise SpoolLocked: when another process holds it.
        """
        fd = os.open(
            os.path.join(self.directory, "lock"),
            os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
            _FILE_MODE,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(self.directory) from None
        self._lockFd: int | None = fd

    def _unlock(self) -> None:
        fd, self._lockFd = getattr(self, "_lockFd", None), None
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
        return deferToThreadPool(self._reactor, self._pool, f, *args)

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
        suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_SUFFIX_LENGTH))
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
        if not _QUEUE_ID.match(queueId):
            raise ValueError(f"not a queue id: {queueId!r}")
        path = os.path.join(self._tmp, queueId)
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            _FILE_MODE,
        )
        try:
            file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        except BaseException:
            os.close(fd)
            _unlinkQuietly(path)
            raise
        return IncomingMessage(queueId, path, file)

    # Commit

    def commit(self, incoming: IncomingMessage, record: dict[str, Any]) -> Deferred[str]:
        """
        Make the message durable and put it in C{incoming/}.

        The envelope is serialised now, on the calling thread, so later
        changes to C{record} do not race with the pool.  From here on the
        spool owns C{incoming}.

        @param incoming: the message, as returned by L{openMessage}.
        @param record: its envelope, see L{envelopeRecord}; its
            C{queue_id} must be C{incoming.queueId}.
        @return: a Deferred firing with the queue id once data, envelope and
            both directory entries are on disk, or failing (typically with
            an L{OSError}) with nothing of the message left in the spool.
        """
        queueId = incoming.queueId
        if incoming._committing or incoming._discarded:
            return fail(ValueError(f"message {queueId} was already committed or discarded"))
        if not self._accepting:
            incoming.discard()
            return fail(SpoolStopped())
        if record.get("queue_id") != queueId:
            incoming.discard()
            return fail(ValueError(f"envelope is not for message {queueId}"))
        try:
            payload = (json.dumps(record, sort_keys=True) + "\n").encode("ascii")
        except Exception:
            incoming.discard()
            return fail()
        incoming._committing = True
        pending = _PendingCommit(self, incoming, payload)
        pending.record = record
        self._busy += 1
        d = self._inPool(self._prepare, pending)
        d.addCallbacks(
            self._prepared, self._prepareFailed, callbackArgs=(pending,), errbackArgs=(pending,)
        )
        return pending.deferred

    def _prepare(self, pending: _PendingCommit) -> None:
        """
        In the pool: make the data file and the envelope durable under
        C{tmp/}.  On failure remove both and re-raise.
        """
        try:
            file = pending.incoming._file
            if pending.incoming._header is not None:
                file.flush()
                file.close()
                self._rewriteHeader(pending.tmpData, *pending.incoming._header)
            else:
                file.flush()
                os.fsync(file.fileno())
                file.close()
            fd = os.open(
                pending.tmpEnvelope,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                _FILE_MODE,
            )
            try:
                _writeAll(fd, pending.payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            pending.incoming._closeQuietly()
            self._removeFromThread(pending, pending.tmpData, pending.tmpEnvelope)
            raise

    @staticmethod
    def _rewriteHeader(path: str, header: bytes, bodyOffset: int) -> None:
        """
        In the pool: write C{header} and the body of C{path} (from
        C{bodyOffset}) to a new file, fsync it and rename it over C{path}.
        The directory is fsynced by the batch that renames the file into
        C{data/}.
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
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlinkQuietly(new)
            raise
        os.close(fd)
        os.replace(new, path)

    def _prepared(self, _: None, pending: _PendingCommit) -> None:
        """The message is durable in C{tmp/}: queue it for the next batch."""
        self._ready.append(pending)
        self._maybeStartBatch()

    def _prepareFailed(self, failure: Failure, pending: _PendingCommit) -> None:
        """Writing the message out failed; its tmp files are gone."""
        self._finish(pending, failure)

    def _maybeStartBatch(self) -> None:
        """
        Start a batch with every ready message, unless one is running: those
        that become ready meanwhile wait for the next, and share it.
        """
        if self._batchRunning or not self._ready:
            return
        batch, self._ready = self._ready, []
        self._batchRunning = True
        self.batchCount += 1
        self.log.debug(
            "committing batch of {count} messages",
            count=len(batch),
            queue_ids=[p.queueId for p in batch],
        )
        d = self._inPool(self._runBatch, batch)
        d.addCallbacks(
            self._batchDone, self._batchFailed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _runBatch(self, batch: list[_PendingCommit]) -> list[Failure | None]:
        """
        In the pool: rename the data files into C{data/}, fsync it once,
        rename the envelopes into C{incoming/}, fsync it once.

        Each message's failure is caught and cleaned up on its own; only a
        failed directory fsync fails every message that depended on it.

        @return: per message of C{batch}, None when it is durable or the
            L{Failure} it failed with.
        """
        results: dict[int, Failure | None] = {}

        moved = []
        for index, pending in enumerate(batch):
            try:
                os.rename(pending.tmpData, pending.dataPath)
            except Exception:
                results[index] = Failure()
                self._removeFromThread(pending, pending.tmpData, pending.tmpEnvelope)
            else:
                moved.append(index)
        if moved:
            try:
                fsyncDirectory(self._data)
            except Exception:
                failure = Failure()
                for index in moved:
                    results[index] = failure
                    pending = batch[index]
                    self._removeFromThread(pending, pending.dataPath, pending.tmpEnvelope)
                moved = []

        committed = []
        for index in moved:
            pending = batch[index]
            try:
                os.rename(pending.tmpEnvelope, pending.envelopePath)
            except Exception:
                results[index] = Failure()
                self._removeFromThread(pending, pending.tmpEnvelope, pending.dataPath)
            else:
                committed.append(index)
        if committed:
            try:
                fsyncDirectory(self._incoming)
            except Exception:
                # The envelopes may or may not be on disk.  The client gets
                # a temporary failure, so take them out again (envelope
                # first: a crash in between leaves only orphan data).
                failure = Failure()
                for index in committed:
                    results[index] = failure
                    pending = batch[index]
                    self._removeFromThread(pending, pending.envelopePath, pending.dataPath)

        return [results.get(index) for index in range(len(batch))]

    def _removeFromThread(self, pending: _PendingCommit, *paths: str) -> None:
        """In the pool: remove C{paths} of a failed commit, in that order."""
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

    def _batchDone(self, results: list[Failure | None], batch: list[_PendingCommit]) -> None:
        """Back on the reactor thread: fire every Deferred of the batch."""
        self._batchRunning = False
        for pending, failure in zip(batch, results, strict=False):
            self._finish(pending, failure)
        self._maybeStartBatch()

    def _batchFailed(self, failure: Failure, batch: list[_PendingCommit]) -> None:
        """
        The batch itself raised (a bug; per-message errors are caught): fail
        all of it rather than leave clients waiting.  Their files may remain
        in C{tmp/} or C{data/}; startup recovery removes them.
        """
        self.log.failure("spool batch failed", failure)
        self._batchDone([failure] * len(batch), batch)

    def _finish(self, pending: _PendingCommit, failure: Failure | None) -> None:
        """Fire the Deferred of one message and account for it."""
        try:
            if failure is None:
                if self._freeBytes is not None:
                    self._freeBytes -= pending.incoming.size + len(pending.payload)
                self.log.info(
                    "{queue_id}: durable in incoming ({size} octets)",
                    queue_id=pending.queueId,
                    size=pending.incoming.size,
                )
                self._notifyQueued(pending.queueId, pending.record)
                pending.deferred.callback(pending.queueId)
            else:
                self.log.warn(
                    "{queue_id}: could not queue message: {error}",
                    queue_id=pending.queueId,
                    error=failure.value,
                )
                pending.deferred.errback(failure)
        finally:
            self._release()

    # Recovery

    def _recover(self) -> None:
        """
        Clean up after the previous run (blocking, called at startup):

          - everything in C{tmp/} is an unfinished message: remove it;
          - envelopes left in C{active/} were being delivered: put them back
            in C{incoming/};
          - an envelope that does not parse, is not for the id it is named
            after, or whose data file is missing goes to C{corrupt/};
          - a data file without an envelope anywhere was never committed:
            remove it.
        """
        for entry in os.scandir(self._tmp):
            queueId = entry.name.removesuffix(".json")
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

        active = os.path.join(self.directory, "active")
        for name in sorted(os.listdir(active)):
            if not name.endswith(".json"):
                continue
            newer = [
                state
                for state in ("incoming", "deferred", "hold")
                if os.path.exists(os.path.join(self.directory, state, name))
            ]
            if newer:
                # A crash inside update(..., newState) after the new
                # envelope was renamed into place: that one is newer.
                os.unlink(os.path.join(active, name))
                self.log.info(
                    "{queue_id}: recovery: dropped stale copy in active (kept {state})",
                    queue_id=name.removesuffix(".json"),
                    state=newer[0],
                )
                continue
            os.rename(os.path.join(active, name), os.path.join(self._incoming, name))
            self.log.info(
                "{queue_id}: recovery: returned from active to incoming",
                queue_id=name.removesuffix(".json"),
            )

        known: set[str] = set()
        for state in QUEUED_STATES:
            stateDirectory = os.path.join(self.directory, state)
            for name in sorted(os.listdir(stateDirectory)):
                queueId = name.removesuffix(".json")
                path = os.path.join(stateDirectory, name)
                problem = self._checkEnvelope(name, path)
                if problem is None:
                    known.add(queueId)
                else:
                    self._moveToCorrupt(state, name, problem)

        corrupt = os.path.join(self.directory, "corrupt")
        for name in os.listdir(corrupt):
            # "<id>.json", or "<id>.json.<n>" when moved aside more than once.
            known.add(name.partition(".")[0])

        for name in sorted(os.listdir(self._data)):
            if name in known or not _QUEUE_ID.match(name):
                continue
            error = _unlinkQuietly(os.path.join(self._data, name))
            if error is None:
                self.log.info(
                    "{queue_id}: recovery: removed data of uncommitted message",
                    queue_id=name,
                )
            else:
                self.log.error(
                    "{queue_id}: recovery: could not remove orphan data: {error}",
                    queue_id=name,
                    error=error,
                )

        for name in ("tmp", "data") + STATES:
            fsyncDirectory(os.path.join(self.directory, name))

    def _checkEnvelope(self, name: str, path: str) -> str | None:
        """
        Check one envelope file found at startup.

        @return: None when it is sound, else what is wrong with it.
        """
        queueId = name.removesuffix(".json")
        if not name.endswith(".json") or not _QUEUE_ID.match(queueId):
            return "unexpected file name"
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read())
        except (OSError, ValueError) as e:
            return f"unreadable envelope: {e}"
        if not isinstance(record, dict) or record.get("queue_id") != queueId:
            return "envelope is not for this queue id"
        if not os.path.isfile(os.path.join(self._data, queueId)):
            return "data file is missing"
        return None

    def _moveToCorrupt(self, state: str, name: str, problem: str) -> None:
        """
        Move C{<state>/<name>} to C{corrupt/} for a human to look at,
        without overwriting an earlier corrupt entry of the same name.
        """
        corrupt = os.path.join(self.directory, "corrupt")
        target = os.path.join(corrupt, name)
        counter = 0
        while os.path.lexists(target):
            counter += 1
            target = os.path.join(corrupt, f"{name}.{counter}")
        os.rename(os.path.join(self.directory, state, name), target)
        self.log.error(
            "{queue_id}: recovery: moved from {state} to corrupt: {problem}",
            queue_id=name.removesuffix(".json"),
            state=state,
            problem=problem,
        )

    # Tooling

    def load(self, queueId: str) -> tuple[dict[str, Any], str]:
        """
        Find a queued message.  Blocking; for tests and tooling.

        @return: its envelope and the path of its data file.
        @raise KeyError: when no queued state holds C{queueId}.
        """
        if not _QUEUE_ID.match(queueId):
            raise KeyError(queueId)
        for state in QUEUED_STATES:
            path = os.path.join(self.directory, state, queueId + ".json")
            try:
                with open(path, "rb") as f:
                    record = json.loads(f.read())
            except FileNotFoundError:
                continue
            return record, os.path.join(self._data, queueId)
        raise KeyError(queueId)

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
            name.removesuffix(".json")
            for name in os.listdir(os.path.join(self.directory, state))
            if name.endswith(".json")
        )

    # The delivery side (DESIGN section 5): the scheduler's view of the spool.

    def addQueueObserver(self, observer: Any) -> None:
        """
        Call C{observer(queueId, record)} on the reactor thread each time a
        message has become durable in C{incoming/}, so the scheduler can
        attempt it at once instead of waiting for a sweep.
        """
        self._observers.append(observer)

    def announce(self, queueId: str) -> None:
        """
        Another process (a receiver, L{relayd.receivers}) committed
        C{queueId} into C{incoming/}: tell the queue observers, as for a
        commit of this process's own.
        """
        self._notifyQueued(queueId, None)

    def _notifyQueued(self, queueId: str, record: dict[str, Any] | None) -> None:
        for observer in self._observers:
            try:
                observer(queueId, record)
            except Exception:
                self.log.failure("{queue_id}: queue observer failed", queue_id=queueId)

    def _envelopePath(self, state: str, queueId: str) -> str:
        if state not in STATES or not _QUEUE_ID.match(queueId):
            raise ValueError(f"bad spool entry {state}/{queueId}")
        return os.path.join(self.directory, state, queueId + ".json")

    def dataPath(self, queueId: str) -> str:
        """Where the bytes of C{queueId} live (they never move)."""
        if not _QUEUE_ID.match(queueId):
            raise ValueError(f"not a queue id: {queueId!r}")
        return os.path.join(self._data, queueId)

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

    def read(self, queueId: str, state: str) -> Deferred[dict[str, Any]]:
        """Read the envelope of C{queueId} in C{state}, in the pool."""
        path = self._envelopePath(state, queueId)

        def read() -> dict[str, Any]:
            with open(path, "rb") as f:
                record: dict[str, Any] = json.loads(f.read())
            return record

        return self._tracked(read)

    def scan(self) -> Deferred[list[tuple[str, str, float]]]:
        """
        In the pool: list every queued message as C{(queueId, state,
        nextAttempt)} for the scheduler's index at startup.  C{hold/} is
        included with an infinite next attempt.
        """

        def scan() -> list[tuple[str, str, float]]:
            found = []
            for state in QUEUED_STATES:
                directory = os.path.join(self.directory, state)
                for name in os.listdir(directory):
                    if not name.endswith(".json"):
                        continue
                    queueId = name[:-5]
                    try:
                        with open(os.path.join(directory, name), "rb") as f:
                            record = json.loads(f.read())
                        when = float(record.get("next_attempt") or 0)
                    except (OSError, ValueError, TypeError):
                        continue
                    if state == "hold":
                        when = float("inf")
                    found.append((queueId, state, when))
            return found

        return self._tracked(scan)

    def listQueued(self) -> Deferred[tuple[dict[str, list[str]], list[tuple[str, str]]]]:
        """
        In the pool: which queued states hold an envelope of which queue id,
        from a listing of the directories (names only: no envelope is
        opened), for the scheduler's sweep to find what its index lost.

        @return: a Deferred firing with the states of each queue id (two
            only while a move is under way, or after one failed half-way),
            and C{(state, error)} for each directory that could not be
            listed: reported, not fatal.
        """

        def listQueued() -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
            found: dict[str, list[str]] = {}
            problems = []
            for state in QUEUED_STATES:
                try:
                    names = os.listdir(os.path.join(self.directory, state))
                except OSError as e:
                    problems.append((state, str(e)))
                    continue
                for name in names:
                    queueId = name.removesuffix(".json")
                    if name.endswith(".json") and _QUEUE_ID.match(queueId):
                        found.setdefault(queueId, []).append(state)
            return found, problems

        return self._tracked(listQueued)

    def update(
        self, queueId: str, state: str, record: dict[str, Any], newState: str | None = None
    ) -> Deferred[None]:
        """
        Durably replace the envelope of C{queueId} (now in C{state}) with
        C{record}, moving it to C{newState} if given: write and fsync a new
        file in C{tmp/}, rename it over the old one (or into the new state,
        then remove the old), fsync the directories.  At every instant one
        complete envelope exists: the old or the new.  (During a move a
        crash can leave both; recovery keeps the newer state's, see
        L{_recover}: so moves with a new record only ever leave C{active}.)
        When the old envelope is already gone (a retry after a failure
        that came after its removal), the move is done, not an error.

        The record is serialised now, on the calling thread.
        """
        payload = (json.dumps(record, sort_keys=True) + "\n").encode("ascii")
        old = self._envelopePath(state, queueId)
        new = self._envelopePath(newState or state, queueId)
        tmp = os.path.join(self._tmp, f"{queueId}.json.{secrets.token_hex(4)}")

        def update() -> None:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _FILE_MODE
            )
            try:
                try:
                    _writeAll(fd, payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, new)
            except BaseException:
                _unlinkQuietly(tmp)
                raise
            fsyncDirectory(os.path.dirname(new))
            if new != old:
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass
                fsyncDirectory(os.path.dirname(old))

        return self._tracked(update)

    def move(self, queueId: str, state: str, newState: str, durable: bool = True) -> Deferred[None]:
        """
        Move the envelope of C{queueId} between states with one rename.
        With C{durable=False} the directory is not fsync'd: for moves whose
        loss a crash may undo harmlessly (incoming to active: recovery puts
        active back into incoming anyway).
        """
        old = self._envelopePath(state, queueId)
        new = self._envelopePath(newState, queueId)

        def move() -> None:
            os.rename(old, new)
            if durable:
                fsyncDirectory(os.path.dirname(new))
                fsyncDirectory(os.path.dirname(old))

        return self._tracked(move)

    def remove(self, queueId: str, state: str) -> Deferred[None]:
        """
        Remove a message that has left the queue for good (delivered,
        bounced, or deleted by an operator): envelope first (the commit
        point), then the data; a crash in between leaves orphan data that
        recovery deletes.
        """
        envelope = self._envelopePath(state, queueId)
        data = self.dataPath(queueId)

        def remove() -> None:
            os.unlink(envelope)
            fsyncDirectory(os.path.dirname(envelope))
            _unlinkQuietly(data)

        return self._tracked(remove)

    def submit(self, record: dict[str, Any], data: bytes) -> Deferred[str]:
        """
        Queue a message relayd makes itself (a DSN): same durability as
        mail received over SMTP.  C{record["queue_id"]} is filled in.

        @return: a Deferred firing with the new queue id once durable.
        """
        queueId = self.newQueueId()
        record = dict(record, queue_id=queueId)
        try:
            incoming = self.openMessage(queueId)
            incoming.write(data)
        except OSError:
            return fail()
        return self.commit(incoming, record)
