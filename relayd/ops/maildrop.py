"""
The maildrop: where C{relayd-sendmail} leaves a message when relayd cannot
be reached, and where relayd picks it up (Postfix's C{maildrop} directory,
C{postdrop} and C{pickup}).

A maildrop file is written once, durably (L{relayd.queue.safeio.writeAtomically}:
temp name, fsync, rename, fsync the directory), and holds one line of JSON
(the envelope) after a magic word, then the message::

    RELAYD-MAILDROP 1 {"sender": ..., "recipients": [...], "uid": 1000,
                       "user": "alice", "time": ..., "size": 1234}\\n
    <the message, CRLF line ends, exactly size octets>

A file is submitted to relayd in one SMTP transaction to relayd's own
relay listener on loopback, so it goes through the policy chain like any
local submission (C{mynetworks} trusts loopback) and is in relayd's spool,
fsync'd, when relayd answers 250.  Only then is the file removed: a crash
between the two submits it again (at least once, never lost).  A file
locked by another flusher (C{flock}) is left to it, so that relayd's pickup
and C{relayd-sendmail -q} never submit the same file at once.

A file that cannot be a maildrop file (a bad magic word, bad JSON, a size
that does not match, a link, not a regular file, an envelope claiming
another uid than the file's owner) is moved into C{broken/} beside it,
never retried and never fatal; the log says why.  One relayd refuses for
good (5xx) is bounced to its sender by relayd's pickup (L{flush}'s
C{bounce}), or moved into C{broken/} when it cannot be (C{relayd-sendmail
-q}, a null sender).  A temporary failure (4xx, no connection) leaves it for the next
round.

Everything here is blocking: relayd calls it from a thread
(L{MaildropService}), C{relayd-sendmail} directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from relayd.queue.safeio import fsyncDirectory, writeAtomically

__all__ = [
    "MAGIC",
    "BROKEN",
    "DIRECTORY_MODE",
    "FILE_MODE",
    "Dropped",
    "BrokenFile",
    "Refused",
    "Unreachable",
    "drop",
    "readDropped",
    "pending",
    "flush",
    "FlushResult",
    "removeStale",
    "ensureDirectory",
    "receivedField",
    "refusals",
    "Bounce",
]

MAGIC = b"RELAYD-MAILDROP 1 "
"""The first octets of every maildrop file (format version 1)."""

BROKEN = "broken"
"""The folder inside the maildrop where unusable files are moved."""

DIRECTORY_MODE = 0o3730
"""
The maildrop's mode when relayd creates it: its owner (relayd's user)
reads and writes; its group may create files but not list the folder
(so no writer learns another's file names); sticky, so that nobody but
a file's owner (and relayd, the folder's owner) removes or renames it;
set-group-id, so that every file gets the folder's group, through which
relayd reads it whoever wrote it.
"""

FILE_MODE = 0o640
"""
A maildrop file's mode: its writer and the folder's group (through which
relayd reads it) read it, nobody else.
"""

HEADER_LIMIT = 1 << 20
"""The envelope line is at most this long (1 MiB): enough for many recipients."""


@dataclass(frozen=True)
class Dropped:
    """
    One maildrop file's content.

    @ivar uid: the submitting user's uid: the file's owner, which the
        kernel sets, checked against the envelope's claim.
    @ivar user: that user's login name when it has one.
    """

    name: str
    sender: str
    recipients: tuple[str, ...]
    uid: int
    user: str | None
    time: float
    message: bytes


class BrokenFile(Exception):
    """A maildrop file that is not one; C{str()} says why."""


class Unreachable(Exception):
    """relayd cannot be reached now: try again later."""


class Refused(Exception):
    """
    relayd answered a submission with an error.

    @ivar permanent: a 5xx reply: retrying cannot help.
    """

    def __init__(
        self,
        message: str,
        permanent: bool,
        replies: tuple[tuple[str | None, int, str], ...] = (),
    ) -> None:
        """
        @param replies: the refusing replies as C{(recipient, code, text)},
            C{None} as the recipient of a reply to MAIL or DATA that
            refuses them all (L{relayd.ops.sendmail.SendmailError}).
        """
        super().__init__(message)
        self.permanent = permanent
        self.replies = replies


Bounce = Callable[["Dropped", list[tuple[str, int, str]]], str]
"""
Queues a non-delivery report to a maildrop file's sender about the
recipients relayd refused for good, given as C{(recipient, code, text)};
returns the report's queue id once it is durable in relayd's spool, or
raises.  L{relayd.ops.pickup} makes one.
"""


def _loginOf(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def drop(
    directory: str,
    sender: str,
    recipients: list[str],
    message: bytes,
    now: float | None = None,
) -> str:
    """
    Write a message into the maildrop at C{directory}, durably.

    @return: the file's path.
    @raise OSError: it cannot be written (missing folder, no permission,
        disk full); nothing is left behind then.
    """
    uid = os.getuid()
    envelope = {
        "sender": sender,
        "recipients": list(recipients),
        "uid": uid,
        "user": _loginOf(uid),
        "time": time.time() if now is None else now,
        "size": len(message),
    }
    header = MAGIC + json.dumps(envelope, sort_keys=True).encode("ascii") + b"\n"
    # Time first so that a listing sorts by submission, then randomness so
    # that no writer can guess (and pre-create) another's name.
    name = f"{int(time.time() * 1e6):016x}.{secrets.token_hex(8)}"
    path = os.path.join(directory, name)
    writeAtomically(path, header + message, mode=FILE_MODE)
    return path


def receivedField(dropped: Dropped, hostname: str) -> bytes:
    """
    The trace field put before a maildrop message when it is submitted, as
    Postfix's pickup writes one (C{Received: by host (Postfix, from userid
    0)}): it records who dropped the message and when, which the SMTP hop
    over loopback cannot (RFC 5321 section 4.4: a C{by} clause, the uid in
    a comment, the date of the drop).
    """
    from email.utils import formatdate

    who = f"from userid {dropped.uid}"
    if dropped.user and re.fullmatch(r"[A-Za-z0-9._-]+", dropped.user):
        who += f" ({dropped.user})"
    return (
        f"Received: by {hostname} (relayd maildrop, {who})\r\n"
        f"\tid {dropped.name}; {formatdate(dropped.time, localtime=True)}\r\n"
    ).encode("ascii", "replace")


def readDropped(path: str, fd: int) -> Dropped:
    """
    Parse the maildrop file open on C{fd} (at C{path}).

    @raise BrokenFile: it is not a maildrop file, or its envelope lies
        about who wrote it.
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise BrokenFile("not a regular file")
    if info.st_nlink != 1:
        # A hard link to a file its writer could not read is no submission.
        raise BrokenFile(f"has {info.st_nlink} links")
    with os.fdopen(os.dup(fd), "rb") as f:
        first = f.readline(HEADER_LIMIT)
        message = f.read()
    if not first.startswith(MAGIC) or not first.endswith(b"\n"):
        raise BrokenFile("no maildrop header (RELAYD-MAILDROP 1)")
    try:
        envelope = json.loads(first[len(MAGIC) :])
    except ValueError as e:
        raise BrokenFile(f"bad envelope: {e}") from None
    if not isinstance(envelope, dict):
        raise BrokenFile("bad envelope: not an object")
    sender, recipients = envelope.get("sender"), envelope.get("recipients")
    size, claimed = envelope.get("size"), envelope.get("uid")
    if not isinstance(sender, str) or any(c in sender for c in "<>\r\n "):
        raise BrokenFile("bad envelope: sender")
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(
            isinstance(r, str) and r and not any(c in r for c in "<>\r\n ") for r in recipients
        )
    ):
        raise BrokenFile("bad envelope: recipients")
    if not isinstance(size, int) or size != len(message):
        raise BrokenFile(f"truncated: {len(message)} octets of a message of {size}")
    if claimed != info.st_uid:
        raise BrokenFile(f"envelope says uid {claimed!r}, the file belongs to uid {info.st_uid}")
    when = envelope.get("time")
    return Dropped(
        name=os.path.basename(path),
        sender=sender,
        recipients=tuple(recipients),
        uid=info.st_uid,
        user=_loginOf(info.st_uid),
        time=float(when) if isinstance(when, (int, float)) else info.st_mtime,
        message=message,
    )


def pending(directory: str) -> list[str]:
    """
    The names of the maildrop files waiting in C{directory}, oldest first:
    not the temp files of a writer still at work (leading dot), not
    C{broken/}.

    @raise OSError: the folder cannot be listed.
    """
    return sorted(
        name for name in os.listdir(directory) if not name.startswith(".") and name != BROKEN
    )


STALE_TEMP = 86400.0
"""
Seconds after which a writer's temp file (a leading dot: a
C{relayd-sendmail} that died before its rename) is removed by L{removeStale}.
"""


def removeStale(directory: str, now: float | None = None) -> list[str]:
    """
    Remove the temp files writers left behind more than L{STALE_TEMP}
    seconds ago: they were never renamed, so never submitted, and their
    writer got a failure status.

    @return: the names removed.
    """
    limit = (time.time() if now is None else now) - STALE_TEMP
    removed = []
    for name in os.listdir(directory):
        if not name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            continue
    if removed:
        fsyncDirectory(directory)
    return removed


def moveAside(directory: str, name: str) -> str:
    """
    Move a maildrop file into C{broken/} (created mode 0700), durably.

    @return: its new path.
    """
    broken = os.path.join(directory, BROKEN)
    with contextlib.suppress(FileExistsError):
        os.mkdir(broken, 0o700)
    target = os.path.join(broken, name)
    os.replace(os.path.join(directory, name), target)
    fsyncDirectory(broken)
    fsyncDirectory(directory)
    return target


@dataclass
class FlushResult:
    """
    What one L{flush} did.

    @ivar submitted: (file name, relayd's reply) of each file now in
        relayd's spool, the file removed.
    @ivar broken: (file name, why) of each file moved into C{broken/}.
    @ivar left: names of files left for later (locked by another flusher,
        unreadable, or relayd answered 4xx).
    @ivar unreachable: why relayd could not be reached, when it could not
        (the files not tried yet are in C{left}).
    """

    submitted: list[tuple[str, str]]
    broken: list[tuple[str, str]]
    left: list[str]
    unreachable: str | None = None
    bounced: list[tuple[str, str]] = field(default_factory=list)
    """(file name, the report's queue id) of each file relayd refused for
    good and bounced to its sender (with a C{bounce}), the file removed."""


@dataclass
class _Claimed:
    name: str
    fd: int


def _claim(directory: str, name: str) -> _Claimed | None:
    """
    Open and lock one file; None when it is gone or another flusher holds
    it.  C{O_NOFOLLOW}: a symbolic link is opened as nothing (and then
    moved aside as broken by the caller).
    """
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    # Removed by the other flusher between our open and our lock?
    if not os.path.exists(path):
        os.close(fd)
        return None
    return _Claimed(name, fd)


def _each(directory: str, names: list[str]) -> Iterator[tuple[str, _Claimed | None, str | None]]:
    for name in names:
        try:
            claimed = _claim(directory, name)
        except OSError as e:
            if e.errno == errno.ELOOP:
                yield name, None, "a symbolic link"
            else:
                yield name, None, None
            continue
        yield name, claimed, None


def flush(
    directory: str,
    submit: Callable[[Dropped], str],
    log: Callable[..., Any] | None = None,
    names: list[str] | None = None,
    bounce: Bounce | None = None,
) -> FlushResult:
    """
    Submit every maildrop file in C{directory}, oldest first.

    @param submit: hands one message to relayd and returns its final reply
        (e.g. C{"250 2.0.0 Ok: queued as ..."}), or raises L{Unreachable}
        or L{Refused}.  It runs with the file locked.
    @param log: called as C{log(event, name=..., **details)} for each file
        done, broken or refused, for the caller's logger.
    @param names: the files to try (default: L{pending}).
    @param bounce: when given (relayd's own pickup), a file relayd refuses
        for good (5xx) is reported to its sender by a DSN (L{Bounce}) and
        removed, as Postfix returns such mail; the recipients relayd
        accepted get the message first (a second transaction without the
        refused ones).  Without it (C{relayd-sendmail -q}, which cannot
        queue a report), and for the null sender, the file is moved aside.
    """
    note = log or (lambda *a, **k: None)
    result = FlushResult([], [], [])
    todo = pending(directory) if names is None else names
    for index, (name, claimed, problem) in enumerate(_each(directory, todo)):
        if problem is not None:
            _brokenOne(directory, name, problem, result, note)
            continue
        if claimed is None:
            continue
        try:
            try:
                dropped = readDropped(os.path.join(directory, name), claimed.fd)
            except BrokenFile as e:
                _brokenOne(directory, name, str(e), result, note)
                continue
            except OSError as e:
                result.left.append(name)
                note("unreadable", name=name, error=e.strerror or str(e))
                continue
            try:
                reply = submit(dropped)
            except Unreachable as e:
                result.unreachable = str(e)
                result.left += [name, *todo[index + 1 :]]
                return result
            except Refused as e:
                if e.permanent and bounce is not None:
                    try:
                        _bounceOne(directory, dropped, e, submit, bounce, result, note)
                    except Unreachable as again:
                        result.unreachable = str(again)
                        result.left += [name, *todo[index + 1 :]]
                        return result
                elif e.permanent:
                    _brokenOne(directory, name, f"refused: {e}", result, note)
                else:
                    result.left.append(name)
                    note("deferred", name=name, reply=str(e), dropped=dropped)
                continue
            # In relayd's spool now: only then does the file go.
            os.unlink(os.path.join(directory, name))
            fsyncDirectory(directory)
            result.submitted.append((name, reply))
            note("submitted", name=name, reply=reply, dropped=dropped)
        finally:
            os.close(claimed.fd)
    return result


def refusals(
    recipients: tuple[str, ...], replies: tuple[tuple[str | None, int, str], ...]
) -> tuple[list[tuple[str, int, str]], list[str]]:
    """
    Which recipients a refusal refused, with their reply, and which it
    did not: a reply without a recipient (to MAIL or DATA) refuses all.

    @return: C{(refused, others)}.
    """
    general = [(code, text) for who, code, text in replies if who is None]
    own = {who: (code, text) for who, code, text in replies if who is not None}
    refused: list[tuple[str, int, str]] = []
    others: list[str] = []
    for recipient in recipients:
        reply = general[0] if general else own.get(recipient)
        if reply is None:
            others.append(recipient)
        else:
            refused.append((recipient, *reply))
    return refused, others


def _bounceOne(
    directory: str,
    dropped: Dropped,
    refusal: Refused,
    submit: Callable[[Dropped], str],
    bounce: Bounce,
    result: FlushResult,
    note: Callable[..., Any],
) -> None:
    """
    A file relayd refused for good (5xx): the recipients it did not refuse
    get the message in a transaction of their own, then the sender gets a
    non-delivery report about the refused ones and the file goes (the
    report durable first: a crash can repeat it, not lose it).  A 4xx
    for any recipient leaves the whole file for a later round instead.
    A null sender gets no report (RFC 5321 section 4.5.5): moved aside.

    @raise Unreachable: relayd went away during the second transaction.
    """
    name = dropped.name
    refused, others = refusals(dropped.recipients, refusal.replies)
    if not refused:  # a 5xx without its reply: every recipient
        refused = [(r, 554, str(refusal)) for r in dropped.recipients]
        others = []
    if any(code < 500 for _, code, _ in refused):
        result.left.append(name)
        note("deferred", name=name, reply=str(refusal), dropped=dropped)
        return
    partly = None
    if others:
        try:
            partly = submit(replace(dropped, recipients=tuple(others)))
        except Refused as again:
            if not again.permanent:
                result.left.append(name)
                note("deferred", name=name, reply=str(again), dropped=dropped)
                return
            more, _ = refusals(tuple(others), again.replies)
            refused += more or [(r, 554, str(again)) for r in others]
        else:
            note("submitted", name=name, reply=partly, dropped=dropped, recipients=others)
    if not dropped.sender:
        _brokenOne(directory, name, f"refused: {refusal}; null sender, no report", result, note)
        return
    try:
        bounceId = bounce(dropped, refused)
    except Exception as e:  # the report could not be queued
        why = f"refused: {refusal}; report not queued: {e}"
        if partly is None:
            # Nothing went out yet: a later round tries it all again.
            result.left.append(name)
            note("deferred", name=name, reply=why, dropped=dropped)
        else:
            _brokenOne(directory, name, why, result, note)
        return
    os.unlink(os.path.join(directory, name))
    fsyncDirectory(directory)
    result.bounced.append((name, bounceId))
    note("bounced", name=name, dropped=dropped, refused=refused, bounce_id=bounceId)


def _brokenOne(
    directory: str,
    name: str,
    why: str,
    result: FlushResult,
    note: Callable[..., Any],
) -> None:
    try:
        target = moveAside(directory, name)
    except OSError as e:
        result.left.append(name)
        note("unmovable", name=name, why=why, error=e.strerror or str(e))
        return
    result.broken.append((name, why))
    note("broken", name=name, why=why, target=target)


def ensureDirectory(directory: str) -> None:
    """
    Create the maildrop (and its parents) if missing, mode
    L{DIRECTORY_MODE}.  An existing folder keeps its owner, group and mode:
    the operator may have chosen a group for its writers (docs/sendmail.md).
    """
    if os.path.isdir(directory):
        return
    os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
    try:
        os.mkdir(directory)
    except FileExistsError:
        return
    os.chmod(directory, DIRECTORY_MODE)
    fsyncDirectory(os.path.dirname(directory) or ".")
