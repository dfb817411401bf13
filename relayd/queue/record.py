# -*- test-case-name: tests.test_queuefile -*-
"""
The queue file: one message in the spool, its bytes and its typed,
versioned envelope record in one file (DESIGN.md section 5; Postfix's
queue file holds envelope and content together in the same way).

Layout of a queue file (version 2)::

    <the message, exactly record.size octets, as received>
    <the record: one line of JSON, ASCII, ending with LF>
    RQF2 <16 upper-case hex digits: offset of the record line> LF

The message comes first so that it is written once, as it arrives, and
the record is appended when the message is committed: one file, one
fsync (L{relayd.queue.spool}).  The footer has a fixed length, so a reader
finds the record from the end of the file in two small reads, and the
message is the first C{offset} octets (L{openData}).

The record is owned by this module and L{relayd.queue.spool}: everybody else
uses L{QueueRecord} and L{RecipientRecord} and their enums, never the JSON
keys.  L{QueueRecord.fromJSON} also reads the version-1 envelopes that
earlier relayd releases kept beside a separate data file, so the spool can
convert them at startup.
"""

from __future__ import annotations

import enum
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import IO, Any, TypeVar

__all__ = [
    "VERSION",
    "QueueState",
    "QUEUED_STATES",
    "RecipientState",
    "FINAL",
    "QUEUE_ID",
    "BodyType",
    "RecipientRecord",
    "QueueRecord",
    "CorruptRecord",
    "evolve",
    "FOOTER_LENGTH",
    "encodeTrailer",
    "readRecord",
    "openData",
    "openRegion",
    "readData",
]

VERSION = 2
"""The record version this code writes."""

_FOOTER_MAGIC = b"RQF2 "
FOOTER_LENGTH = len(_FOOTER_MAGIC) + 16 + 1
"""Octets of the footer at the very end of a queue file."""

QUEUE_ID = re.compile(r"^[0-9A-Z]{1,64}$")
"""What a queue id (the queue file's name) looks like (L{relayd.queue.spool} makes them)."""


class QueueState(enum.StrEnum):
    """
    The spool directory a message is in, one at a time.  A C{str} enum, so
    that it is also the directory's name.
    """

    INCOMING = "incoming"
    ACTIVE = "active"
    DEFERRED = "deferred"
    HOLD = "hold"
    CORRUPT = "corrupt"


QUEUED_STATES = (QueueState.INCOMING, QueueState.ACTIVE, QueueState.DEFERRED, QueueState.HOLD)
"""The states of a message that is still to be delivered."""


class RecipientState(enum.StrEnum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"
    """Not attempted yet."""
    DEFERRED = "deferred"
    """Attempted; a temporary failure: tried again later."""
    DELIVERED = "delivered"
    """The next hop took responsibility for it (final)."""
    FAILED = "failed"
    """Bounced: a permanent failure or its lifetime ran out (final)."""

    @property
    def final(self) -> bool:
        """Whether nothing more is to be done for the recipient."""
        return self in FINAL


FINAL = frozenset({RecipientState.DELIVERED, RecipientState.FAILED})
"""The recipient states after which nothing more is to be done."""


class BodyType(enum.StrEnum):
    """The message's body type (RFC 6152 C{BODY=})."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


class CorruptRecord(ValueError):
    """A queue file or envelope record that cannot be read as one."""


def _fail(problem: str) -> CorruptRecord:
    return CorruptRecord(problem)


_REQUIRED: Any = object()


def _get(data: dict[str, Any], key: str, kinds: Any, default: Any = _REQUIRED) -> Any:
    """
    C{data[key]}, checked to be of C{kinds} (a type or a tuple of types);
    C{default} when it is absent or null, if there is one.
    """
    value = data.get(key)
    if value is None:
        if default is _REQUIRED:
            raise _fail(f"missing {key!r}")
        return default
    kind = type(value)
    if kind is kinds or (kinds.__class__ is tuple and kind in kinds):
        return value  # what json.loads makes: exactly one of the types
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise _fail(f"{key!r} has the wrong type: {value!r}")
    return value


def _number(data: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = _get(data, key, (int, float), default)
    return None if value is None else float(value)


def _enum(
    kind: type[enum.StrEnum], data: dict[str, Any], key: str, default: Any = _REQUIRED
) -> Any:
    value = _get(data, key, str, default)
    try:
        return kind(value)
    except ValueError:
        raise _fail(f"{key!r} is not one of {[m.value for m in kind]}: {value!r}") from None


_Record = TypeVar("_Record", "RecipientRecord", "QueueRecord")
_FIELDS: dict[type, frozenset[str]] = {}


def evolve(record: _Record, **changes: Any) -> _Record:
    """
    C{dataclasses.replace(record, **changes)} for the two records of this
    module, made without their C{__init__}: a frozen dataclass's sets
    every field through C{object.__setattr__}, and C{replace} reads every
    unchanged one by name first: about 35 calls for each of the two
    copies the queue manager makes for a delivered message.  The records
    validate nothing on creation (no C{__post_init__}), so the copy is the
    same record.

    @raise TypeError: for a name that is not a field, as C{replace} does.
    """
    cls = type(record)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    if not names.issuperset(changes):
        raise TypeError(f"{cls.__name__} has no field {sorted(set(changes) - names)}")
    copy = object.__new__(cls)
    state = copy.__dict__
    state.update(record.__dict__)
    state.update(changes)
    return copy


@dataclass(frozen=True)
class RecipientRecord:
    """
    One recipient of a queued message and what happened to it so far.

    @ivar address: the forward-path, as accepted.
    @ivar state: see L{RecipientState}.
    @ivar attempts: delivery attempts made for it.
    @ivar lastReply: the last reply about it (C{"451 4.3.0 text"}), if any.
    @ivar status: the enhanced status code of that reply (RFC 3463).
    @ivar remote: the host that gave the reply, None for a local one.
    @ivar lastAttempt: when it was last attempted (seconds since the epoch).
    @ivar expired: it failed because the message's lifetime ran out.
    @ivar notify: the NOTIFY= it was given (RFC 3461 section 4.1):
        C{("NEVER",)} or some of C{"SUCCESS"}, C{"FAILURE"}, C{"DELAY"};
        None when none was given (L{relayd.smtp.dsn}).
    @ivar orcpt: the ORCPT= it was given (RFC 3461 section 4.2),
        C{"<type>;<xtext>"}, or None.
    @ivar command: the SMTP command the last reply answered (C{"RCPT TO"},
        C{"end of DATA"}...), for a DSN's text; None when the reply is
        relayd's own.
    """

    address: str
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    lastReply: str | None = None
    status: str | None = None
    remote: str | None = None
    lastAttempt: float | None = None
    expired: bool = False
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    command: str | None = None

    def toJSON(self) -> dict[str, Any]:
        """
        A JSON-serialisable dict of this record.  The DSN keys are written
        only when set, so a record without them reads as before.
        """
        data: dict[str, Any] = {
            "address": self.address,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_reply": self.lastReply,
            "status": self.status,
            "remote": self.remote,
            "last_attempt": self.lastAttempt,
            "expired": self.expired,
        }
        if self.notify is not None:
            data["notify"] = list(self.notify)
        if self.orcpt is not None:
            data["orcpt"] = self.orcpt
        if self.command is not None:
            data["command"] = self.command
        return data

    @classmethod
    def fromJSON(cls, data: Any) -> RecipientRecord:
        """
        Read what L{toJSON} (or a version-1 envelope) made.

        @raise CorruptRecord: when C{data} is not such a record.
        """
        if not isinstance(data, dict):
            raise _fail("a recipient is not a JSON object")
        return cls(
            address=_get(data, "address", str),
            state=_enum(RecipientState, data, "state", "pending"),
            attempts=_get(data, "attempts", int, 0),
            lastReply=_get(data, "last_reply", str, None),
            status=_get(data, "status", str, None),
            remote=_get(data, "remote", str, None),
            lastAttempt=_number(data, "last_attempt", None),
            expired=_get(data, "expired", bool, False),
            notify=_notify(data),
            orcpt=_get(data, "orcpt", str, None),
            command=_get(data, "command", str, None),
        )


_NOTIFY = ("NEVER", "SUCCESS", "FAILURE", "DELAY")


def _notify(data: dict[str, Any]) -> tuple[str, ...] | None:
    """A recipient's C{notify}: absent (None) or a list of NOTIFY keywords."""
    value = _get(data, "notify", list, None)
    if value is None:
        return None
    if not value or not all(isinstance(v, str) and v in _NOTIFY for v in value):
        raise _fail(f"'notify' is not a list of NOTIFY keywords: {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class QueueRecord:
    """
    The envelope of a queued message: how it arrived and where its
    delivery stands.  Immutable: the scheduler makes a new one with
    L{evolve} after each attempt and hands it to
    L{relayd.queue.spool.Spool.update}.

    @ivar queueId: the message's queue id.
    @ivar sender: the reverse-path, C{""} for the null sender.
    @ivar recipients: one L{RecipientRecord} per accepted forward-path, in
        RCPT order.
    @ivar arrival: when the message was received (seconds since the epoch).
    @ivar size: the message's size in octets (exactly what the queue file
        holds of it).
    @ivar body: see L{BodyType}.
    @ivar client: the client's IP address.
    @ivar helo: the EHLO/HELO name, or None.
    @ivar user: the authenticated user, or None.
    @ivar listener: the listener that received it (C{"bounce"} for DSNs).
    @ivar attempts: delivery attempts made.
    @ivar nextAttempt: when to attempt it next (seconds since the epoch).
    @ivar delayWarned: a delay notice was sent to the sender.
    @ivar ret: the RET= parameter (RFC 3461 section 4.3), C{"FULL"} or
        C{"HDRS"}, or None.
    @ivar envid: the ENVID= parameter decoded (RFC 3461 section 4.4), or
        None.
    @ivar requireTLS: the message came with C{MAIL ... REQUIRETLS} (RFC
        8689 section 4.1): it goes out only over verified TLS to a next hop
        that offers REQUIRETLS (L{relayd.delivery.requiretls}).
    @ivar tlsOptional: the message has C{TLS-Required: No} and no
        REQUIRETLS (RFC 8689 section 4.1): TLS policies of the recipient
        domain (MTA-STS, DANE) may be disregarded for it; routes' C{tls}
        settings still apply (L{relayd.delivery.requiretls}).
    @ivar smtputf8: the message came with C{SMTPUTF8} on MAIL (RFC 6531):
        its addresses and header fields may be UTF-8, and delivery sends
        C{SMTPUTF8} where the message needs it.  False in records written
        before relayd knew SMTPUTF8, which could not carry such a message.
    """

    queueId: str
    sender: str
    recipients: tuple[RecipientRecord, ...]
    arrival: float
    size: int
    body: BodyType = BodyType.SEVEN_BIT
    client: str = ""
    helo: str | None = None
    user: str | None = None
    listener: str = ""
    attempts: int = 0
    nextAttempt: float | None = None
    delayWarned: bool = False
    requireTLS: bool = False
    tlsOptional: bool = False
    smtputf8: bool = False
    version: int = field(default=VERSION, compare=False)
    ret: str | None = None
    envid: str | None = None

    @classmethod
    def new(
        cls,
        queueId: str,
        sender: str,
        recipients: Iterable[str],
        arrival: float,
        size: int,
        body: str,
        client: str,
        helo: str | None,
        user: str | None,
        listener: str,
        *,
        ret: str | None = None,
        envid: str | None = None,
        notify: Mapping[str, tuple[str, ...]] | None = None,
        orcpt: Mapping[str, str] | None = None,
        smtputf8: bool = False,
    ) -> QueueRecord:
        """
        The record of a newly received message: every recipient pending,
        due at once.

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
        @param ret: RET= (RFC 3461 section 4.3), or None.
        @param envid: ENVID= decoded (RFC 3461 section 4.4), or None.
        @param notify: NOTIFY= of the recipients that gave one, by address.
        @param orcpt: ORCPT= of the recipients that gave one, by address.
        @param smtputf8: the message came with C{SMTPUTF8} on MAIL.
        @raise ValueError: for an unknown C{body}.
        """
        notify = notify or {}
        orcpt = orcpt or {}
        return cls(
            queueId=queueId,
            sender=str(sender),
            recipients=tuple(
                RecipientRecord(
                    str(address),
                    notify=notify.get(str(address)),
                    orcpt=orcpt.get(str(address)),
                )
                for address in recipients
            ),
            arrival=arrival,
            size=size,
            body=BodyType(body),
            client=client,
            helo=helo,
            user=user,
            listener=listener,
            nextAttempt=arrival,
            ret=ret,
            envid=envid,
            smtputf8=smtputf8,
        )

    def waiting(self) -> list[RecipientRecord]:
        """The recipients not yet final (pending or deferred)."""
        return [r for r in self.recipients if not r.state.final]

    def toJSON(self) -> dict[str, Any]:
        """
        A JSON-serialisable dict of this record, C{"version": 2}; C{ret}
        and C{envid} only when set.
        """
        data: dict[str, Any] = {
            "version": VERSION,
            "queue_id": self.queueId,
            "sender": self.sender,
            "recipients": [r.toJSON() for r in self.recipients],
            "arrival": self.arrival,
            "size": self.size,
            "body": self.body.value,
            "client": self.client,
            "helo": self.helo,
            "user": self.user,
            "listener": self.listener,
            "attempts": self.attempts,
            "next_attempt": self.nextAttempt,
            "delay_warned": self.delayWarned,
            "require_tls": self.requireTLS,
            "tls_optional": self.tlsOptional,
            "smtputf8": self.smtputf8,
        }
        if self.ret is not None:
            data["ret"] = self.ret
        if self.envid is not None:
            data["envid"] = self.envid
        return data

    @classmethod
    def fromJSON(cls, data: Any) -> QueueRecord:
        """
        Read what L{toJSON} made, or a version-1 envelope of the previous
        spool layout (same keys; recipients then also had an unused
        C{next_attempt}).

        @raise CorruptRecord: when C{data} is not such a record.
        """
        if not isinstance(data, dict):
            raise _fail("the record is not a JSON object")
        version = data.get("version")
        if version not in (1, VERSION) or isinstance(version, bool):
            raise _fail(f"unknown record version {version!r}")
        recipients = _get(data, "recipients", list)
        size = _get(data, "size", int)
        if size < 0:
            raise _fail(f"negative size {size}")
        return cls(
            queueId=_get(data, "queue_id", str),
            sender=_get(data, "sender", str),
            recipients=tuple(RecipientRecord.fromJSON(r) for r in recipients),
            arrival=_number(data, "arrival"),
            size=size,
            body=_enum(BodyType, data, "body", "7BIT"),
            client=_get(data, "client", str, ""),
            helo=_get(data, "helo", str, None),
            user=_get(data, "user", str, None),
            listener=_get(data, "listener", str, ""),
            attempts=_get(data, "attempts", int, 0),
            nextAttempt=_number(data, "next_attempt", None),
            delayWarned=_get(data, "delay_warned", bool, False),
            requireTLS=_get(data, "require_tls", bool, False),
            tlsOptional=_get(data, "tls_optional", bool, False),
            smtputf8=_get(data, "smtputf8", bool, False),
            version=version,
            ret=_ret(data),
            envid=_get(data, "envid", str, None),
        )

    def encode(self) -> bytes:
        """The record as one line of JSON (ASCII, LF-terminated)."""
        return (json.dumps(self.toJSON(), sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> QueueRecord:
        """
        Read what L{encode} made.

        @raise CorruptRecord: when C{data} is not such a record.
        """
        try:
            value = json.loads(data)
        except ValueError as e:
            raise _fail(f"not JSON: {e}") from None
        return cls.fromJSON(value)

    def withRecipients(self, recipients: Iterable[RecipientRecord]) -> QueueRecord:
        """A copy with C{recipients} instead."""
        return evolve(self, recipients=tuple(recipients))


def _ret(data: dict[str, Any]) -> str | None:
    value: str | None = _get(data, "ret", str, None)
    if value not in (None, "FULL", "HDRS"):
        raise _fail(f"'ret' is not FULL or HDRS: {value!r}")
    return value


def encodeTrailer(record: QueueRecord, offset: int) -> bytes:
    """
    What follows the message in a queue file: the record line and the
    footer giving C{offset}, where the record line starts (that is, the
    message's size).
    """
    if offset != record.size:
        raise ValueError(f"record says {record.size} octets, the message has {offset}")
    return record.encode() + _FOOTER_MAGIC + b"%016X\n" % offset


def _preadAll(fd: int, size: int, offset: int) -> bytes:
    """C{size} octets of C{fd} from C{offset}, or fewer at the end of the file."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _footerAt(tail: bytes, length: int) -> int:
    """The record's offset, from the footer that ends C{tail} (a file of C{length} octets)."""
    if length < FOOTER_LENGTH:
        raise _fail("too short for a queue file")
    footer = tail[-FOOTER_LENGTH:]
    if not footer.startswith(_FOOTER_MAGIC) or not footer.endswith(b"\n"):
        raise _fail("no queue file footer")
    digits = footer[len(_FOOTER_MAGIC) : -1]
    if len(digits) != 16 or digits.strip(b"0123456789ABCDEF"):
        raise _fail("bad queue file footer")
    offset = int(digits, 16)
    if offset > length - FOOTER_LENGTH:
        raise _fail("bad queue file footer")
    return offset


def _tail(fd: int, size: int) -> tuple[bytes, int]:
    """The last C{size} octets of C{fd} (all of a shorter file), and its length."""
    length = os.fstat(fd).st_size
    start = max(length - size, 0)
    return _preadAll(fd, length - start, start), length


_TAIL = 4096
"""How much of a queue file's end L{readRecord} reads at once: the footer
and, for most messages, the whole record line."""


def readRecord(path: str, queueId: str | None = None) -> QueueRecord:
    """
    The record of the queue file at C{path}.  Blocking.

    One read of the file's last L{_TAIL} octets gets the footer and
    usually the record; only a longer record takes a second read.  (A
    buffered file object cost ten system calls here, against four.)

    @param queueId: when given, the record must be for this queue id.
    @raise OSError: when the file cannot be read (C{FileNotFoundError}
        when it is gone).
    @raise CorruptRecord: when it is not a sound queue file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        tail, length = _tail(fd, _TAIL)
        offset = _footerAt(tail, length)
        need = length - FOOTER_LENGTH - offset
        if need <= len(tail) - FOOTER_LENGTH:
            line = tail[len(tail) - FOOTER_LENGTH - need : len(tail) - FOOTER_LENGTH]
        else:
            line = _preadAll(fd, need, offset)
    finally:
        os.close(fd)
    record = QueueRecord.decode(line)
    if record.size != offset:
        raise _fail(f"record says {record.size} octets, the file holds {offset}")
    if queueId is not None and record.queueId != queueId:
        raise _fail(f"record is for {record.queueId!r}")
    return record


class _Region(io.RawIOBase):
    """The first C{length} octets of a file, as a raw stream."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self._f = f
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        wanted = min(len(view), self._left)
        if wanted <= 0:
            return 0
        data = self._f.read(wanted)
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def openRegion(path: str, length: int) -> IO[bytes]:
    """
    Open the first C{length} octets of the file at C{path} for reading,
    as a binary file that ends there: how delivery reads the message of a
    queue file, of which the record says the size.  Blocking.

    @raise OSError: when the file cannot be opened.
    """
    # Unbuffered underneath (the region is buffered): no isatty() or
    # position probe at open, which a buffered file does.
    return io.BufferedReader(_Region(open(path, "rb", buffering=0), length))


def openData(path: str) -> IO[bytes]:
    """
    Open the message of the queue file at C{path} for reading: a binary
    file that ends where the message ends.  Blocking.

    @raise OSError: when the file cannot be opened.
    @raise CorruptRecord: when it is not a queue file.
    """
    f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by the region)
    try:
        offset = _footerAt(*_tail(f.fileno(), FOOTER_LENGTH))
    except BaseException:
        f.close()
        raise
    return io.BufferedReader(_Region(f, offset))


def readData(path: str) -> bytes:
    """The whole message of the queue file at C{path}.  Blocking."""
    with openData(path) as f:
        return f.read()
