"""
Per-connection and per-transaction state handed to policies, and the
message with its editable header section.

L{Session} lives as long as the SMTP connection; L{Envelope} as long as one
mail transaction (MAIL to end of DATA, or RSET).  Both carry a C{notes} dict
where policies may keep what they learn for later phases (Haraka's
C{connection.notes} and C{transaction.notes}).  Key your notes by your
policy's name (C{session.notes["example.score"]}) so that policies do not
trip over each other.

L{Message} is what message policies get at the end of DATA; its L{Headers}
(a list of L{HeaderField}s) may be edited, and the spool stores the edited
header section followed by the body exactly as received.

Policies read these objects and must not change their other attributes:
relayd's server owns them (it sets C{helo}, C{tls}, C{user},
C{recipients}...).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from relayd.address import Address

__all__ = [
    "Session",
    "Envelope",
    "Recipient",
    "Message",
    "Headers",
    "HeaderField",
    "HeaderSectionTooLarge",
    "DEFAULT_HEADER_SIZE",
]


@dataclass
class Session:
    """
    One SMTP connection, from connect to disconnect.

    @ivar clientAddress: the peer's IP address (an L{ipaddress.IPv4Address}
        or L{ipaddress.IPv6Address}; with a C{haproxy:} endpoint, the
        address the proxy reported).
    @ivar clientPort: the peer's TCP port.
    @ivar listener: the name of the listener that accepted the connection
        (C{[[listeners]] name}).
    @ivar mode: the listener mode: C{"relay"} (port 25 style, no AUTH
        required), C{"submission"} (STARTTLS then AUTH required) or
        C{"submissions"} (implicit TLS, AUTH required).
    @ivar helo: the name given with EHLO/HELO, or None before it (and
        again after STARTTLS, which starts the session over).
    @ivar esmtp: True after EHLO, False after HELO.
    @ivar tls: True once the connection is encrypted (from the start on a
        C{submissions} listener, after STARTTLS otherwise).
    @ivar tlsVersion: e.g. C{"TLSv1.3"} once the TLS handshake is done.
    @ivar tlsCipher: the cipher name once the TLS handshake is done.
    @ivar user: the authenticated user name (SMTP AUTH), or None.  On
        submission listeners MAIL is refused until it is set.
    @ivar sessionId: a short id for log lines about this connection.
    @ivar notes: free-form storage for policies, kept for the whole
        connection.
    """

    clientAddress: ipaddress.IPv4Address | ipaddress.IPv6Address
    clientPort: int
    listener: str
    mode: str
    sessionId: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tlsVersion: str | None = None
    tlsCipher: str | None = None
    user: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Envelope:
    """
    One mail transaction: from MAIL FROM to the end of DATA (or RSET, a new
    EHLO, STARTTLS, or the client leaving).

    @ivar sender: the reverse-path, an L{Address}; C{Address.null()} (whose
        C{isNull} is True) for C{MAIL FROM:<>}.
    @ivar recipients: the L{Address}es accepted so far, in RCPT order,
        without duplicates.  Refused recipients are not in it.
    @ivar declaredSize: the SIZE= parameter (RFC 1870), or None.  The
        client's claim, not the real size (see L{Message.receivedSize}).
    @ivar body: C{"7BIT"} or C{"8BITMIME"} (the BODY= parameter, RFC 6152).
    @ivar queueId: the spool's id for the message, given once the
        transaction starts, so None only in C{checkSender}.  Put it in
        every log line about the message.
    @ivar notes: free-form storage for policies, for this transaction
        only.
    @ivar ret: the RET= parameter (RFC 3461 section 4.3), C{"FULL"} or
        C{"HDRS"}, or None.
    @ivar envid: the ENVID= parameter decoded from xtext (RFC 3461
        section 4.4), or None.
    @ivar parameters: the RCPT parameters of each accepted recipient that
        gave any (L{Recipient}), by address.
    @ivar requireTLS: the client gave C{REQUIRETLS} on MAIL (RFC 8689
        section 4.1): relay the message only over verified TLS.
    @ivar smtputf8: MAIL carried C{SMTPUTF8} (RFC 6531 section 3.4): the
        sender and recipients may be internationalized addresses
        (L{Address.isAscii} False) and the header fields UTF-8 (RFC 6532).
    """

    sender: Address
    recipients: list[Address] = field(default_factory=list)
    declaredSize: int | None = None
    body: str = "7BIT"
    queueId: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    ret: str | None = None
    envid: str | None = None
    parameters: dict[Address, Recipient] = field(default_factory=dict)
    requireTLS: bool = False
    smtputf8: bool = False


@dataclass
class Recipient:
    """
    One RCPT TO being read: the address and what its parameters asked for.
    The RCPT parsers of L{relayd.smtp.extensions} fill it in; the server
    keeps it in L{Envelope.parameters} once the recipient is accepted, so a
    refused RCPT leaves the transaction as it was.

    @ivar address: the forward-path.
    @ivar notify: NOTIFY= (RFC 3461 section 4.1): C{("NEVER",)} or some of
        C{"SUCCESS"}, C{"FAILURE"}, C{"DELAY"} in that order; None when
        not given.
    @ivar orcpt: ORCPT= (RFC 3461 section 4.2): C{"<type>;<xtext>"}, the
        type in lower case; None when not given.
    """

    address: Address
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    @property
    def given(self) -> bool:
        """True when a parameter was given."""
        return self.notify is not None or self.orcpt is not None


_LINE_REST = rb"[^\r]*(?:\r(?!\n)[^\r]*)*\r\n"
"""The rest of a line, up to and with the first CRLF (a lone CR or LF is
part of the line, as everywhere in this module)."""
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:" + _LINE_REST + rb"(?:[ \t]" + _LINE_REST + rb")*")
"""
One whole field: name, colon, value and its continuation lines (RFC 5322
section 2.2: the name is printable US-ASCII except colon; some mailers put
white space before the colon, obsolete syntax still seen; section 2.2.3:
continuation lines start with white space).
"""
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_NOT_FIELD = re.compile(rb"\r\n(?![ \t]|[!-9;-~]+[ \t]*:)")
"""A CRLF followed by a line that is neither a field nor a continuation
line (an empty line among them), or by nothing: where a header section
ends, found by C{re} in one pass whatever the number of fields."""
_RECEIVED = re.compile(rb"\r\nreceived[ \t]*:", re.IGNORECASE)
_RECEIVED_FIRST = re.compile(rb"received[ \t]*:", re.IGNORECASE)

DEFAULT_HEADER_SIZE = 1 << 20
"""
The default bound on a message's header section, in octets (C{[limits]
header_size}): what L{Message} reads and parses.  relayd refuses a message
whose header section is larger, so that no policy decides on part of it.
"""

FIRST_READ = 1 << 16
"""Octets read first: the whole header section of nearly every message."""


class HeaderSectionTooLarge(Exception):
    """
    The message's header section is larger than the bound L{Message} was
    given, so its fields cannot all be read.

    relayd's server refuses such a message at the end of DATA (C{552
    5.3.4}) before any policy is asked, so policies running in relayd never
    see this.  It exists so that a L{Message} never hands out a header
    section cut short, in which a C{From:} past the bound would go unseen.

    @ivar limit: the bound, in octets.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"header section larger than {limit} octets")
        self.limit = limit


@dataclass
class HeaderField:
    """
    One header field exactly as it is in the message.

    Do not change a field in place; use the L{Headers} methods, which
    check what they add and mark the header section as changed.

    @ivar name: the field name as written (compare with C{lower()}).
    @ivar raw: the whole field: C{Name: value}, folded continuation lines
        included, ending with CRLF.
    """

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """
        The unfolded value without leading or trailing white space (RFC 5322
        section 2.2.3).  Octets that are not UTF-8 are kept as surrogate
        escapes, so C{value} can be compared but not all of it printed.
        """
        text = self.raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")
        return re.sub(r"\r\n(?=[ \t])", "", text).strip()


_NAME_ONLY = re.compile(r"[!-9;-~]+")


def _isValidName(name: str) -> bool:
    return _NAME_ONLY.fullmatch(name) is not None


MAX_LINE = 998
"""
RFC 5322 section 2.1.1: octets in a line, CRLF not counted.  relayd
refuses longer lines from clients, so policies must not make any.
"""


def _checkLines(raw: bytes) -> bytes:
    """
    Refuse a field relayd would refuse from a client: a NUL, or a line
    over L{MAX_LINE} octets.
    """
    if b"\0" in raw:
        raise ValueError("header field must not contain NUL")
    if any(len(line) > MAX_LINE for line in raw.split(b"\r\n")):
        raise ValueError(f"header field has a line over {MAX_LINE} octets; fold it and use addRaw")
    return raw


def _fold(name: str, value: str) -> bytes:
    """
    Make one field from C{name} and C{value}.  A value with line breaks is
    refused: headers added by policies must not be able to smuggle fields
    or end the header section.
    """
    if not _isValidName(name):
        raise ValueError(f"bad header field name {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError("header value must not contain CR or LF (for a folded field, use addRaw)")
    return _checkLines(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))


def _oneField(raw: bytes) -> HeaderField:
    """Parse C{raw} as exactly one complete field, or raise ValueError."""
    parsed, end = Headers.parse(raw + b"\r\n")
    if not raw.endswith(b"\r\n") or len(parsed.fields) != 1 or end != len(raw) + 2:
        raise ValueError("raw must be exactly one header field ending with CRLF")
    if b"\r" in raw.replace(b"\r\n", b"") or b"\n" in raw.replace(b"\r\n", b""):
        raise ValueError("raw must not contain bare CR or LF")
    _checkLines(raw)
    return parsed.fields[0]


def _sectionEnd(data: bytes) -> tuple[int, bool]:
    """
    Where the header section at the start of C{data} ends: after the
    first empty line, or at the first complete line that is neither a
    field nor a continuation line (left to the body), like Postfix's
    cleanup.

    @return: the offset where the body starts, and whether the section
        ended within C{data}: False when C{data} ran out first (so the
        section may go on after it), the offset then being where the last
        complete field ends.
    """
    if _FIELD_START.match(data) is None:
        # An empty line, a body line, or a continuation of nothing.
        if data.startswith(b"\r\n"):
            return 2, True
        return 0, data.find(b"\r\n") >= 0
    found = _NOT_FIELD.search(data)
    if found is None:
        # Each line starts a field or continues one; the last has no CRLF.
        return data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0, False
    start = found.end()
    if data.startswith(b"\r\n", start):
        return start + 2, True
    return start, data.find(b"\r\n", start) >= 0


def _hops(section: bytes) -> int:
    """The C{Received:} fields of a header section (see L{_sectionEnd})."""
    first = 1 if _RECEIVED_FIRST.match(section) is not None else 0
    return first + len(_RECEIVED.findall(section))


def _fields(section: bytes) -> list[HeaderField]:
    """The fields at the start of C{section}, in order."""
    fields = []
    pos = 0
    while (match := _FIELD.match(section, pos)) is not None:
        fields.append(HeaderField(match.group(1).decode("ascii"), match.group()))
        pos = match.end()
    return fields


class Headers:
    """
    The header section of a message as a list of L{HeaderField}s, in
    message order, that message policies may edit.

    Fields that are not changed keep their exact bytes (folding, case,
    white space), and the body is never touched, so a rewrite changes only
    what a policy asked for.

    Names are compared case-insensitively everywhere.  Reading:
    C{headers.get("subject")}, C{headers.getAll("received")}, C{"DKIM-
    Signature" in headers}, C{for field in headers} (a snapshot: editing
    while iterating is safe), C{len(headers)}.  Editing: L{add},
    L{addRaw}, L{remove}, L{replace}, L{setRaw}.  Everything added is
    checked: a bad field name, a value with CR or LF, a NUL or a line over
    998 octets raises C{ValueError} and changes nothing, so a policy cannot
    add a second field, end the header section or make a line relayd
    would refuse from a client (RFC 5322 sections 2.1.1 and 2.2).  Values
    are not folded for you; a long value goes in as a folded field with
    L{addRaw}.

    @ivar fields: the fields in order (read it; edit through the methods).
    @ivar changed: True once any edit was made.
    """

    def __init__(self, fields: list[HeaderField]) -> None:
        self.fields = fields
        self.changed = False

    @classmethod
    def parse(cls, data: bytes) -> tuple[Headers, int]:
        """
        Split the start of a message into header fields.

        The header section ends at the first empty line (which is consumed)
        or at the first line that is neither a field nor a continuation
        (which is left to the body), like Postfix's cleanup.

        @return: the headers and the offset where the body starts.
        """
        offset, _ = _sectionEnd(data)
        return cls(_fields(data[:offset])), offset

    def __iter__(self) -> Iterator[HeaderField]:
        return iter(list(self.fields))

    def __len__(self) -> int:
        return len(self.fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def get(self, name: str) -> str | None:
        """
        The value of the first field called C{name} (any case), or None;
        unfolded and stripped (see L{HeaderField.value}).
        """
        for f in self.fields:
            if f.name.lower() == name.lower():
                return f.value
        return None

    def getAll(self, name: str) -> list[str]:
        """The values of every field called C{name}, in order."""
        return [f.value for f in self.fields if f.name.lower() == name.lower()]

    def add(self, name: str, value: str, *, top: bool = False) -> None:
        """
        Add a field at the end of the header section, or at the top with
        C{top=True} (where trace fields and signatures go).

        @param name: the field name: printable US-ASCII, no colon or space.
        @param value: the value, on one line; it is written after C{": "}
            and encoded as UTF-8 (keep it ASCII unless you know the next
            hops accept UTF-8 headers, RFC 6532).
        @raise ValueError: for a bad name, a value with CR, LF or NUL, or
            a field longer than 998 octets.
        """
        field = HeaderField(name, _fold(name, value))
        if top:
            self.fields.insert(0, field)
        else:
            self.fields.append(field)
        self.changed = True

    def addRaw(self, raw: bytes, *, top: bool = False) -> None:
        """
        Add a field given as complete bytes (C{Name: value}, folded lines
        included, ending with CRLF), e.g. a C{DKIM-Signature} from dkimpy.
        Continuation lines start with a space or a tab (RFC 5322 section
        2.2.3).

        @raise ValueError: when C{raw} is not exactly one well-formed field,
            has a bare CR or LF or a NUL, or a line over 998 octets.
        """
        field = _oneField(raw)
        if top:
            self.fields.insert(0, field)
        else:
            self.fields.append(field)
        self.changed = True

    def remove(self, match: str | Callable[[HeaderField], bool]) -> int:
        """
        Remove every field called C{match} (any case), or for which
        C{match(field)} is true.

        @return: how many were removed.
        """
        test = match if callable(match) else (lambda f: f.name.lower() == match.lower())
        kept = [f for f in self.fields if not test(f)]
        removed = len(self.fields) - len(kept)
        if removed:
            self.fields = kept
            self.changed = True
        return removed

    def replace(self, name: str, value: str, *, addMissing: bool = True) -> int:
        """
        Give every field called C{name} the value C{value}, in place (order
        kept; each keeps its name's original case).  When there is none,
        add it at the end if C{addMissing}.

        @return: how many fields were replaced.
        @raise ValueError: as for L{add}.
        """
        raw = _fold(name, value)
        count = 0
        for i, f in enumerate(self.fields):
            if f.name.lower() == name.lower():
                self.fields[i] = HeaderField(f.name, f.name.encode("ascii") + raw[len(name) :])
                count += 1
        if count:
            self.changed = True
        elif addMissing:
            self.add(name, value)
        return count

    def setRaw(self, index: int, raw: bytes) -> None:
        """
        Replace field C{index} with C{raw}: one or more complete CRLF-ended
        lines forming a single field.  For rewrites that must keep a
        field's own folding (e.g. address masquerading)::

            for i, field in enumerate(headers.fields):
                if field.name.lower() == "from":
                    headers.setRaw(i, field.raw.replace(b"@host.", b"@"))

        @param index: the field's position in L{fields}.
        @raise ValueError: as for L{addRaw}.
        @raise IndexError: when there is no field C{index}.
        """
        field = _oneField(raw)
        self.fields[index] = field
        self.changed = True

    def toBytes(self) -> bytes:
        """The fields, concatenated (without the empty line)."""
        return b"".join(f.raw for f in self.fields)


class Message:
    """
    The message as received, handed to message policies at the end of DATA.

    The bytes are in a file (CRLF line ends, dot-unstuffing done, relayd's
    C{Received:} field first).  Policies read it through this object and may
    edit L{headers}; when they do, the spool stores the edited header
    section followed by the body bytes exactly as received.  The message
    has already passed relayd's own checks: size limit, no bare CR or LF,
    no NUL, no line over 998 octets.

    Reading is blocking file I/O.  The header section is read once, whole
    (at most C{maxHeaderSize} octets, 1 MiB unless C{[limits] header_size}
    says otherwise), on first use of L{headers}, which is fine on the
    reactor thread; read the body of a big message in a thread, e.g.
    C{await deferToThread(message.asBytes)}.

    A header section larger than that bound is never handed out in part:
    L{headers} and everything that needs the header section raise
    L{HeaderSectionTooLarge}.  relayd's server refuses such messages
    before the policies are asked (L{headerTooLarge}).

    @ivar path: the file holding the message as received.  Read it; do not
        write it: edit L{headers} instead.
    @ivar receivedSize: the size of the message as received, in octets.
    @ivar maxHeaderSize: the bound on the header section, in octets.
    """

    def __init__(
        self,
        path: str,
        size: int,
        maxHeaderSize: int = DEFAULT_HEADER_SIZE,
        head: bytes | None = None,
    ) -> None:
        """
        @param head: the first octets of the file (at least
            C{min(size, FIRST_READ)} of them, as the receiving session
            kept them while writing), so that the header section is not
            read back from the disk; None to read it from C{path}.
        """
        self._head = head
        self.path = path
        self.receivedSize = size
        self.maxHeaderSize = maxHeaderSize
        self._headers: Headers | None = None
        self._readDone = False
        self._section = b""
        self._tooLarge = False
        self._hops = 0
        self._bodyOffset = 0
        self._separator = b""

    def _read(self) -> None:
        """
        Read the header section and find where it ends and its hop count
        (one pass of C{re} each, whatever the number of fields; the fields
        themselves are made on first use of L{headers}), or find it larger
        than L{maxHeaderSize}.  A line that starts within the bound ends
        within C{MAX_LINE + 2} octets (relayd refuses longer lines), so
        reading that much more tells where a section that fits ends.
        """
        if self._readDone:
            return
        self._readDone = True
        limit = self.maxHeaderSize
        want = limit + MAX_LINE + 2
        first = min(want, FIRST_READ)
        head, self._head = self._head, None
        if head is None or len(head) < min(first, self.receivedSize):
            with open(self.path, "rb") as f:
                head = f.read(first)
        data = head[:first]
        offset, ended = _sectionEnd(data)
        if not ended and len(data) < want and len(data) == FIRST_READ:
            with open(self.path, "rb") as f:
                data = f.read(want)
            offset, ended = _sectionEnd(data)
        if offset > limit or (not ended and len(data) >= want):
            self._tooLarge = True
            return
        if data[max(0, offset - 4) : offset] == b"\r\n\r\n" or (
            offset == 2 and data[:2] == b"\r\n"
        ):
            self._separator = b"\r\n"  # the empty line ending the section
        self._bodyOffset = offset
        self._section = data[:offset]
        self._hops = _hops(self._section)

    def _load(self) -> Headers:
        if self._headers is None:
            self._read()
            if self._tooLarge:
                raise HeaderSectionTooLarge(self.maxHeaderSize)
            self._headers = Headers(_fields(self._section))
            self._section = b""  # the fields hold it now
        return self._headers

    @property
    def headerTooLarge(self) -> bool:
        """
        True when the header section is larger than L{maxHeaderSize}
        (reading it if that was not done yet; blocking).
        """
        self._read()
        return self._tooLarge

    @property
    def hopCount(self) -> int:
        """
        The number of C{Received:} fields in the header section as
        received, relayd's own included: the hop count of RFC 5321 section
        6.3, which a mail loop makes grow.

        @raise HeaderSectionTooLarge: see L{headers}.
        """
        self._read()
        if self._tooLarge:
            raise HeaderSectionTooLarge(self.maxHeaderSize)
        return self._hops

    def mayHaveField(self, name: str) -> bool:
        """
        False when no field called C{name} can be in the header section:
        the name appears nowhere in the raw section (case-insensitively).
        A quick test before L{headers} parses every field, for a check
        that looks for one rare field (C{TLS-Required}) on every message.
        True means "maybe": ask L{headers}.

        @raise HeaderSectionTooLarge: see L{headers}.
        """
        if self._headers is not None:
            return bool(self._headers.getAll(name))
        self._read()
        if self._tooLarge:
            raise HeaderSectionTooLarge(self.maxHeaderSize)
        return name.lower().encode("ascii") in self._section.lower()

    @property
    def headers(self) -> Headers:
        """
        The header section, parsed on first use (a blocking read from the
        page cache of at most L{maxHeaderSize} octets and one more line).

        @raise HeaderSectionTooLarge: when the header section is larger than
            L{maxHeaderSize}: its fields past the bound would go unseen.
        """
        return self._load()

    @property
    def bodyOffset(self) -> int:
        """Where the body starts in L{path} (after the empty line, if any)."""
        self._load()
        return self._bodyOffset

    @property
    def hasSeparator(self) -> bool:
        """
        True when an empty line ends the header section (RFC 5322 section
        3.5).  False when the message ends inside the header section or a
        line that is not a field ends it: the body then follows the last
        field directly, which strict parsers (dkimpy among them) refuse.
        """
        self._load()
        return self._separator == b"\r\n"

    @property
    def changed(self) -> bool:
        """True when a policy edited the headers."""
        return self._headers is not None and self._headers.changed

    @property
    def size(self) -> int:
        """The size of the message as it will be stored."""
        if not self.changed:
            return self.receivedSize
        return len(self.headerBytes()) + self.receivedSize - self.bodyOffset

    def headerBytes(self) -> bytes:
        """
        The header section as it now is, including the empty line that ends
        it (when the message has one).
        """
        headers = self._load()
        if not headers.changed:
            with open(self.path, "rb") as f:
                return f.read(self._bodyOffset)
        return headers.toBytes() + self._separator

    def iterBody(self, chunkSize: int = 1 << 16) -> Iterator[bytes]:
        """
        The body bytes, exactly as received, in chunks.  Blocking file I/O:
        call from a thread (L{twisted.internet.threads.deferToThread}) for
        big messages.
        """
        offset = self.bodyOffset
        with open(self.path, "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunkSize):
                yield chunk

    def asBytes(self) -> bytes:
        """The whole message as it will be stored (blocking; see L{iterBody})."""
        return self.headerBytes() + b"".join(self.iterBody())

    def open(self) -> IO[bytes]:
        """The file as received, opened for reading (blocking)."""
        return open(self.path, "rb")
