"""
Tests for L{relayd.queue.aio}: syncs through Linux AIO on real files, a
real failure from the kernel (a file system shut down), and the probe.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from relayd.queue.aio import AsyncSync
from relayd.testing.powercut import LoopFileSystem
from tests.queue.test_spool import TestCase


class AsyncSyncTests(TestCase):
    def setUp(self):
        self.directory = os.path.dirname(self.mktemp())
        self.sync = AsyncSync(reactor, self.directory)
        self.addCleanup(self.sync.close)

    @inlineCallbacks
    def test_syncs(self):
        """A file's data, the file whole and a directory are synced; each Deferred fires."""
        path = os.path.join(self.directory, "file")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        os.write(fd, b"data")
        results = []
        results.append((yield self.sync.fdatasync(fd)))
        results.append((yield self.sync.fsync(fd)))
        directory = os.open(self.directory, os.O_RDONLY)
        self.addCleanup(os.close, directory)
        results.append((yield self.sync.fsync(directory)))
        self.assertEqual(results, [None, None, None])

    @inlineCallbacks
    def test_refusedAtSubmit(self):
        """A descriptor that is not open: the Deferred fails with EBADF."""
        fd = os.open(self.directory, os.O_RDONLY)
        os.close(fd)
        error = yield self.assertFailure(self.sync.fdatasync(fd), OSError)
        self.assertEqual(error.errno, errno.EBADF)

    def test_closeFailsWhatWaits(self):
        """A sync still unanswered when the context is closed fails."""
        path = os.path.join(self.directory, "file")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        d = self.sync.fdatasync(fd)
        self.sync.close()
        self.failureResultOf(d, OSError)
        self.failureResultOf(self.sync.fdatasync(fd), OSError)

    def test_probeFails(self):
        """The probe's directory cannot be opened: the constructor raises."""
        self.assertRaises(OSError, AsyncSync, reactor, os.path.join(self.directory, "missing"))


class KernelFailureTests(TestCase):
    """The kernel's own error, from a file system shut down. Root only."""

    def setUp(self):
        why = LoopFileSystem.available()
        if why is not None:
            self.skipTest(why)
        base = tempfile.mkdtemp(prefix="relayd-aio-")
        self.addCleanup(shutil.rmtree, base, True)
        self.mountPoint = os.path.join(base, "mnt")
        self.fileSystem = LoopFileSystem(self.mountPoint)
        self.addCleanup(self.fileSystem.remove)

    @inlineCallbacks
    def test_syncOfAFileSystemShutDown(self):
        sync = AsyncSync(reactor, self.mountPoint)
        self.addCleanup(sync.close)
        fd = os.open(os.path.join(self.mountPoint, "file"), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        os.write(fd, b"x" * 4096)
        self.fileSystem.cut()
        error = yield self.assertFailure(sync.fdatasync(fd), OSError)
        self.assertEqual(error.errno, errno.EIO)
