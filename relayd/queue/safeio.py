"""
Crash-safe file writes (chasquid's C{safeio}): the one place that knows
the write-temp, fsync, rename, fsync-directory dance.  Blocking: call from
a thread, or at startup, or from command-line tools.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

__all__ = ["fsyncDirectory", "writeAtomically"]


def fsyncDirectory(path: str) -> None:
    """
    Make the entries of directory C{path} (creations, renames, removals)
    durable.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeAtomically(
    path: str, data: bytes, mode: int = 0o600, like: os.stat_result | None = None
) -> None:
    """
    Replace C{path} with C{data}: temp file in the same directory (created
    with the final mode, so a key is never readable by others even for a
    moment), fsync, rename, fsync the directory.  Readers see the old file
    or the new one, never half of it, and a crash leaves one of the two.

    @param mode: the new file's mode, unless C{like} is given.
    @param like: the stat of a file being replaced, whose mode and (when
        permitted) owner the new file keeps: a users file owned by the
        relayd user stays readable by it after root changes a password.
    @raise OSError: naming C{path}, not the temp file.
    """
    directory = os.path.dirname(path) or "."
    try:
        fd, tempPath = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
        )
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode if like is None else stat.S_IMODE(like.st_mode))
            if like is not None and (like.st_uid, like.st_gid) != (os.getuid(), os.getgid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), like.st_uid, like.st_gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tempPath, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tempPath)
        raise
    fsyncDirectory(directory)
