"""
Asynchronous fsync for the reactor thread: Linux AIO (C{io_submit} with
C{IOCB_CMD_FDSYNC} or C{IOCB_CMD_FSYNC}, kernels since 4.18), completions
signalled on an C{eventfd} that the reactor watches.

The commit journal (L{relayd.queue.journal.AsyncAppend}) syncs its
segments this way: the record is written and the sync submitted on the
reactor thread, the kernel runs the sync in one of its own workers, and the
reactor learns of its end like of any other readable descriptor.  With a
spool thread instead, each commit waited twice for the GIL (to start the
sync, and to hand its end back to the reactor) and cost a receiver four
context switches; measured under the benchmark's load on 2 cores, those
two hand-offs were 0.4 ms of the 1.3 ms from the dot to the C{250}
(C{docs/performance.md}).

Nothing here blocks but L{AsyncSync.__init__}'s probe, at startup: one
sync of a directory, waited for, so that a kernel (or a seccomp filter)
without AIO fsync is found then, and the spool keeps its threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

__all__ = ["AsyncSync"]

# io_setup, io_destroy, io_getevents, io_submit.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC = 2
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1
_PROBE_TIMEOUT = 10


class _IOCB(ctypes.Structure):
    """C{struct iocb} of C{linux/aio_abi.h} (little-endian layout)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IOEvent(ctypes.Structure):
    """C{struct io_event}."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _oserror(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


class AsyncSync:
    """
    One AIO context and its C{eventfd}, used on the reactor thread:
    L{fdatasync} and L{fsync} return a Deferred that fires once the kernel
    has synced the file (or fails with the L{OSError} it returned).

    @raise OSError: from the constructor, when this system cannot do it
        (not Linux on x86-64 or ARM64, no AIO, a kernel before 4.18, or a
        probe that fails): the caller then syncs in threads.
    """

    def __init__(self, reactor: Any, probeDirectory: str, depth: int = 128) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or not hasattr(os, "eventfd"):
            raise OSError(0, f"no Linux AIO on {platform.system()} {platform.machine()}")
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self._context = ctypes.c_ulong(0)
        if (
            self._syscall(
                ctypes.c_long(self._setup), ctypes.c_uint(depth), ctypes.byref(self._context)
            )
            < 0
        ):
            raise _oserror(ctypes.get_errno(), "io_setup")
        self._events = (_IOEvent * depth)()
        self._waiting: dict[int, Deferred[None]] = {}
        self._tokens = 0
        self._noWait = _Timespec(0, 0)
        self.reactor = reactor
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._probe(probeDirectory)
        except BaseException:
            self._release()
            raise
        reactor.addReader(self)

    def _probe(self, directory: str) -> None:
        """Sync C{directory} and wait for it (blocking, startup only)."""
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        try:
            self._submitOne(fd, _IOCB_CMD_FSYNC, 0)
            timeout = _Timespec(_PROBE_TIMEOUT, 0)
            got = self._syscall(
                ctypes.c_long(self._getevents),
                self._context,
                ctypes.c_long(1),
                ctypes.c_long(1),
                self._events,
                ctypes.byref(timeout),
            )
            if got < 0:
                raise _oserror(ctypes.get_errno(), "io_getevents")
            if got == 0:
                raise OSError(0, f"AIO fsync probe of {directory}: no answer in {_PROBE_TIMEOUT}s")
            if self._events[0].res < 0:
                raise _oserror(-self._events[0].res, "AIO fsync probe")
        finally:
            os.close(fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)

    def _release(self) -> None:
        self._syscall(ctypes.c_long(self._destroy), self._context)
        os.close(self._eventfd)
        self._eventfd = -1

    def fdatasync(self, fd: int) -> Deferred[None]:
        """Sync the data of C{fd} (and the metadata needed to read it back)."""
        return self._sync(fd, _IOCB_CMD_FDSYNC)

    def fsync(self, fd: int) -> Deferred[None]:
        """Sync C{fd} whole: for a directory, its entries."""
        return self._sync(fd, _IOCB_CMD_FSYNC)

    def _sync(self, fd: int, command: int) -> Deferred[None]:
        if self._eventfd < 0:
            return fail(OSError(0, "AIO context closed"))
        self._tokens += 1
        try:
            self._submitOne(fd, command, self._tokens)
        except OSError:
            return fail()
        d: Deferred[None] = Deferred()
        self._waiting[self._tokens] = d
        return d

    def _submitOne(self, fd: int, command: int, token: int) -> None:
        block = _IOCB(
            aio_data=token,
            aio_lio_opcode=command,
            aio_fildes=fd,
            aio_flags=_IOCB_FLAG_RESFD,
            aio_resfd=self._eventfd,
        )
        blocks = (ctypes.POINTER(_IOCB) * 1)(ctypes.pointer(block))
        if self._syscall(ctypes.c_long(self._submit), self._context, ctypes.c_long(1), blocks) != 1:
            raise _oserror(ctypes.get_errno(), "io_submit")

    # IReadDescriptor: the eventfd counts completions.

    def fileno(self) -> int:
        return self._eventfd

    def logPrefix(self) -> str:
        return "AsyncSync"

    def doRead(self) -> None:
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return
        while self._waiting:
            got = self._syscall(
                ctypes.c_long(self._getevents),
                self._context,
                ctypes.c_long(0),
                ctypes.c_long(len(self._events)),
                self._events,
                ctypes.byref(self._noWait),
            )
            if got <= 0:
                return
            done = [(self._events[i].data, self._events[i].res) for i in range(got)]
            for token, result in done:
                d = self._waiting.pop(token, None)
                if d is None:
                    continue
                if result < 0:
                    d.errback(Failure(_oserror(-result, "fsync")))
                else:
                    d.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor is shutting down: nothing to do (see L{close})."""

    def close(self) -> None:
        """
        Stop watching and free the context; what is still in flight is
        waited for by the kernel (C{io_destroy}) and its Deferreds fail.
        """
        if self._eventfd < 0:
            return
        self.reactor.removeReader(self)
        self._release()
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(Failure(OSError(0, "AIO context closed before the sync ended")))
