"""
A real power cut for tests: a small ext4 file system on a loop device that
can lose, at once, everything not yet on its disk.

L{LoopFileSystem.cut} shuts the file system down with C{EXT4_IOC_SHUTDOWN}
and C{EXT4_GOING_FLAGS_NOLOGFLUSH} (what xfstests' C{godown} does to
simulate a power failure): from then on nothing more reaches the disk,
neither data nor ext4's journal, and every operation fails with C{EIO}.
L{LoopFileSystem.remount} unmounts it and mounts it again: the kernel then
reads the disk, which holds what a machine would find after the cut.  The
boot id does not change, as after a file system shut down on an I/O error
and mounted again; a test that wants a reboot writes another boot id where
relayd keeps one.

Root only (mount, loop devices); L{LoopFileSystem.available} says why not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import tempfile

__all__ = ["LoopFileSystem"]

EXT4_IOC_SHUTDOWN = 0x8004587D
"""C{_IOR('X', 125, __u32)}."""

EXT4_GOING_FLAGS_NOLOGFLUSH = 2
"""Shut down without flushing the journal or the data."""


class LoopFileSystem:
    """
    A 64 MiB ext4 image mounted at L{mountPoint}.

    @ivar mountPoint: where it is mounted.
    """

    def __init__(self, mountPoint: str, size: int = 64 * 1024 * 1024) -> None:
        self.mountPoint = mountPoint
        self._base = tempfile.mkdtemp(prefix="relayd-powercut-")
        self._image = os.path.join(self._base, "image")
        with open(self._image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", self._image], check=True, capture_output=True)
        os.makedirs(mountPoint, exist_ok=True)
        self._mounted = False
        self.mount()

    @staticmethod
    def available() -> str | None:
        """None when this system can run it, else why not."""
        if os.geteuid() != 0:
            return "mounting a file system needs root"
        if shutil.which("mkfs.ext4") is None or shutil.which("mount") is None:
            return "no mkfs.ext4 or mount"
        if not os.path.exists("/dev/loop-control"):
            return "no loop devices"
        return None

    def mount(self) -> None:
        subprocess.run(
            ["mount", "-o", "loop", self._image, self.mountPoint], check=True, capture_output=True
        )
        self._mounted = True

    def cut(self) -> None:
        """Lose everything not yet on the disk, now."""
        fd = os.open(self.mountPoint, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def remount(self) -> None:
        """Unmount (every process using it must have let go) and mount again."""
        subprocess.run(["umount", self.mountPoint], check=True, capture_output=True)
        self._mounted = False
        self.mount()

    def remove(self) -> None:
        """Unmount (lazily: never fails a test's cleanup) and delete the image."""
        if self._mounted:
            subprocess.run(["umount", "-l", self.mountPoint], capture_output=True, check=False)
            self._mounted = False
        shutil.rmtree(self._base, ignore_errors=True)
