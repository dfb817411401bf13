# -*- test-case-name: tests.test_bounce -*-
"""
Delivery status notifications (DSNs, "bounces"), RFC 3464.

When delivery to some recipients fails for good, or is still being retried
after a while, or (C{NOTIFY=SUCCESS}, RFC 3461 section 6.2.3) was relayed
to a next hop that does not do DSN, the sender is told with a report built
by L{makeDSN}: a
C{multipart/report} (RFC 6522) with three parts:

    1. C{text/plain}: what happened, for a person to read;
    2. C{message/delivery-status}: the same, for a program (RFC 3464
       section 2), one block of fields per recipient;
    3. C{text/rfc822-headers}: the header section of the original message,
       or, when the whole message is to be returned and is small enough,
       C{message/rfc822} with all of it.

The report is sent from the null reverse-path C{<>} (RFC 5321 section
4.5.5), so that it can never cause another report: a message from C{<>}
that cannot be delivered is not bounced (L{shouldBounce}).  The caller then
either drops it or, when a postmaster address is configured, calls
L{makeDSN} with C{postmaster} set, which addresses the same report to the
postmaster instead.  RFC 5321 section 4.5.5 only forbids sending a report
back to C{<>}; which of the two to do is the site's choice, and the caller's.

The report is assembled byte by byte rather than with L{email.message}: it
keeps line endings (CRLF everywhere), folding and the transfer encoding of
each part under our control, and the result is checked by parsing it back
with the L{email} package in the tests.

Encodings, and when a report needs C{8BITMIME} (RFC 6152):

    - all header fields of the report are 7-bit, except C{To:} when the
      report goes to an internationalized address (SMTPUTF8, RFC 6532);
    - the C{text/plain} part is C{us-ascii}, or C{utf-8} in
      quoted-printable when a recipient address or a remote reply has
      non-ASCII characters;
    - the C{message/delivery-status} fields are 7-bit: non-ASCII in a
      remote reply is replaced by C{"?"} there (RFC 3464 section 2.3.6
      wants US-ASCII text; the full reply is in the text part), and
      non-ASCII recipient addresses are written as C{utf-8} addresses in
      RFC 6533 section 3 C{xtext} form;
    - the C{text/rfc822-headers} part is sent as is when the original
      header section is 7-bit, and in quoted-printable when it has 8-bit
      octets (RFC 6522 section 4 allows exactly this for "broken"
      headers).  So a headers-only report is always 7-bit and can go to
      any server;
    - a returned whole message (C{message/rfc822}) cannot be encoded
      (RFC 2046 section 5.2.1 allows only 7bit, 8bit and binary), so an
      8-bit original is included with C{Content-Transfer-Encoding: 8bit}.
      Only then is the report not 7-bit, and it must go out with
      C{BODY=8BITMIME}: test with C{not report.isascii()}.

L{makeDSN} reads the original message from the spool: that is blocking
file I/O, so call it from a thread pool, never on the reactor thread.
"""

from __future__ import annotations

import os
import quopri
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime

from relayd.queue.record import QueueRecord, openRegion
from relayd.reply import Reply
from relayd.smtp.dsn import originalRecipient

__all__ = [
    "RecipientStatus",
    "noticeRecord",
    "makeDSN",
    "shouldBounce",
    "FAILED_SUBJECT",
    "DELAYED_SUBJECT",
    "RELAYED_SUBJECT",
]

FAILED_SUBJECT = "Undelivered Mail Returned to Sender"
"""The subject of a report in which at least one recipient failed."""

DELAYED_SUBJECT = "Delayed Mail (still being retried)"
"""The subject of a report in which every recipient is only delayed."""

RELAYED_SUBJECT = "Successful Mail Delivery Report"
"""
The subject of a report on recipients relayed to a next hop that does not
do DSN (RFC 3461 section 6.2.3, Postfix's wording), when none failed or is
delayed.
"""

MAX_LINE = 998
"""RFC 5322 section 2.1.1: a line is at most 998 octets without its CRLF."""

MAX_HEADERS = 1024 * 1024
"""
The most octets of an original's header section a report returns; a
message without an empty line after its headers is not read to its end.
"""

_FOLD_AT = 78
"""RFC 5322 section 2.1.1: lines SHOULD be at most 78 octets."""

_MAX_WORD = 900
"""
The longest run of non-blank characters kept whole in a folded field.
Folding happens only at white space (RFC 5322 section 2.2.3), so a longer
run is cut into pieces of this size with a fold between them (which adds a
space to the unfolded text, a small price for a legal line).
"""

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEWLINE = re.compile(rb"\r\n|\r|\n")

_ACTIONS = {"failed": ("4", "5"), "delayed": ("4",), "relayed": ("2",)}
"""
The actions a report can carry (RFC 3464 section 2.3.3) and the classes of
RFC 3463 status code that go with each.  A recipient that I{failed} may
carry a 4.X.X code: that is what it last got before its lifetime ran out.
I{relayed}: handed to a next hop that does not do DSN, for a recipient
that asked C{NOTIFY=SUCCESS} (RFC 3461 section 6.2.3).
"""

_DETAIL = {
    "0.0": "Other undefined status",
    "1.0": "Other address status",
    "1.1": "Bad destination mailbox address",
    "1.2": "Bad destination system address",
    "1.3": "Bad destination mailbox address syntax",
    "1.4": "Destination mailbox address ambiguous",
    "1.5": "Destination address valid",
    "1.6": "Destination mailbox has moved, no forwarding address",
    "1.7": "Bad sender's mailbox address syntax",
    "1.8": "Bad sender's system address",
    "1.10": "Recipient address has null MX",
    "2.0": "Other or undefined mailbox status",
    "2.1": "Mailbox disabled, not accepting messages",
    "2.2": "Mailbox full",
    "2.3": "Message length exceeds administrative limit",
    "2.4": "Mailing list expansion problem",
    "3.0": "Other or undefined mail system status",
    "3.1": "Mail system full",
    "3.2": "System not accepting network messages",
    "3.3": "System not capable of selected features",
    "3.4": "Message too big for system",
    "3.5": "System incorrectly configured",
    "4.0": "Other or undefined network or routing status",
    "4.1": "No answer from host",
    "4.2": "Bad connection",
    "4.3": "Directory server failure",
    "4.4": "Unable to route",
    "4.5": "Mail system congestion",
    "4.6": "Routing loop detected",
    "4.7": "Delivery time expired",
    "5.0": "Other or undefined protocol status",
    "5.1": "Invalid command",
    "5.2": "Syntax error",
    "5.3": "Too many recipients",
    "5.4": "Invalid command arguments",
    "5.5": "Wrong protocol version",
    "6.0": "Other or undefined media error",
    "6.1": "Media not supported",
    "6.2": "Conversion required and prohibited",
    "6.3": "Conversion required but not supported",
    "6.4": "Conversion with loss performed",
    "6.5": "Conversion failed",
    # RFC 6531 section 3.7.4.1 (SMTPUTF8 needed, the next hop lacks it).
    "6.7": "Non-ASCII addresses not permitted for that sender/recipient",
    "7.0": "Other or undefined security status",
    "7.1": "Delivery not authorized, message refused",
    "7.2": "Mailing list expansion prohibited",
    "7.3": "Security conversion required but not possible",
    "7.4": "Security features not supported",
    "7.5": "Cryptographic failure",
    "7.6": "Cryptographic algorithm not supported",
    "7.7": "Message integrity failure",
    # RFC 5248's registry: X.7.10 (RFC 5248), X.7.30 (RFC 8689).
    "7.10": "Encryption needed",
    "7.30": "REQUIRETLS support required",
}
"""
What the subject and detail of an enhanced status code mean (RFC 3463
section 3; X.1.10 from RFC 7505 section 4.2), for the text part when the
report has no remote reply to quote.
"""


@dataclass(frozen=True)
class RecipientStatus:
    """
    What became of one recipient, as one block of a delivery status report
    (RFC 3464 section 2.3).

    @ivar address: the recipient as given in RCPT TO, without angle
        brackets (C{Final-Recipient}, RFC 3464 section 2.3.2).
    @ivar action: C{"failed"}, C{"delayed"} or C{"relayed"} (RFC 3464
        section 2.3.3).
    @ivar status: the RFC 3463 enhanced status code, e.g. C{"5.1.1"} or
        C{"4.4.1"} (RFC 3464 section 2.3.4).  A delayed recipient needs a
        4.X.X code; a failed one a 5.X.X or, when it ran out of time after
        temporary failures, the 4.X.X it last got.
    @ivar remoteMTA: the host name of the server that gave the reply, if
        any (C{Remote-MTA}, RFC 3464 section 2.3.5).
    @ivar diagnostic: the remote server's reply as text, e.g. C{"550 5.1.1
        no such user"}, or None when relayd itself decided (NXDOMAIN, null
        MX, expiry without a reply).  A multi-line reply may be given with
        its line breaks; they become spaces (C{Diagnostic-Code}, RFC 3464
        section 2.3.6).  Made from C{reply} when that is given instead.
    @ivar lastAttempt: when delivery was last tried (seconds since the
        epoch), if ever (C{Last-Attempt-Date}, RFC 3464 section 2.3.7).
    @ivar reply: the remote server's reply as a L{Reply}, the same value
        delivery recorded; sets C{diagnostic}.
    @ivar command: the SMTP command that reply answered (C{"RCPT TO"},
        C{"end of DATA"}...): the text says "in reply to RCPT TO command",
        as Postfix's does.
    @ivar originalRecipient: the client's C{ORCPT} as stored
        (C{"rfc822;<xtext>"}, L{relayd.smtp.dsn}), for C{Original-Recipient}
        (RFC 3464 section 2.3.1), or None.
    """

    address: str
    action: str
    status: str
    remoteMTA: str | None = None
    diagnostic: str | None = None
    lastAttempt: float | None = None
    reply: Reply | None = None
    command: str | None = None
    originalRecipient: str | None = None

    def __post_init__(self) -> None:
        if self.diagnostic is None and self.reply is not None:
            object.__setattr__(self, "diagnostic", str(self.reply))
        if self.action not in _ACTIONS:
            raise ValueError(f"action must be 'failed' or 'delayed', not {self.action!r}")
        m = _STATUS.match(self.status)
        if m is None:
            raise ValueError(f"bad enhanced status code {self.status!r}")
        if m.group(1) not in _ACTIONS[self.action]:
            raise ValueError(f"status {self.status} does not go with action {self.action}")
        _checkText("recipient address", self.address)
        if self.remoteMTA is not None:
            _checkText("remote MTA", self.remoteMTA, ascii=True)
        if self.command is not None:
            _checkText("command", self.command, ascii=True)
        if self.originalRecipient is not None:
            _checkText("original recipient", self.originalRecipient, ascii=True)


def shouldBounce(sender: str) -> bool:
    """
    Whether a message that cannot be delivered may be reported to its
    sender.

    Never bounce a bounce: a message from the null reverse-path is itself a
    notification, and reporting on it could loop forever (RFC 5321 section
    4.5.5: no notification about a notification).  The decision rests on
    the envelope alone, as the RFC says; addresses such as
    C{MAILER-DAEMON@...} are ordinary senders.  When this is False the
    caller drops the report or sends it to the postmaster (L{makeDSN} with
    C{postmaster} set).

    @param sender: the reverse-path as stored in the envelope record,
        C{""} for the null sender (C{"<>"} is accepted as well).
    @return: False for the null sender, True otherwise.
    """
    return sender not in ("", "<>")


def makeDSN(
    *,
    reportingMTA: str,
    queueId: str,
    sender: str,
    arrival: float,
    now: float,
    recipients: Sequence[RecipientStatus],
    originalPath: str,
    originalSize: int | None = None,
    returnFull: bool = False,
    postmaster: str | None = None,
    maxOriginal: int = 10 * 1024 * 1024,
    retryUntil: float | None = None,
    envid: str | None = None,
) -> bytes:
    """
    Build a delivery status notification (RFC 3464) about one message.

    The result is a whole message, CRLF line endings, no line over 998
    octets, to be sent from C{<>}.  Its subject says I{undelivered} when
    any recipient failed, I{delayed} when some are delayed and none
    failed, and I{successful} when all were relayed (L{RELAYED_SUBJECT}).

    @param reportingMTA: our host name (an A-label), for C{From},
        C{Message-ID} and C{Reporting-MTA} (RFC 3464 section 2.2.2).
    @param queueId: the queue id of the original message (from its envelope
        record), reported as C{X-Relayd-Queue-ID} (RFC 3464 section 2.2
        allows extension fields) and part of the C{Message-ID}.
    @param sender: the original reverse-path, the report's recipient.
    @param arrival: when the original arrived (seconds since the epoch),
        for C{Arrival-Date} (RFC 3464 section 2.2.5).
    @param now: the time of the report, for its C{Date}.
    @param recipients: the recipients to report on, in order; the others
        (delivered, still pending without delay notice) are left out.
    @param originalPath: the spool queue file of the original message.
    @param originalSize: the original's size: it is the first
        C{originalSize} octets of C{originalPath} (L{relayd.queue.record});
        None for the whole file.
    @param returnFull: include the whole original (C{RET=FULL}, RFC 3461
        section 4.3) instead of its header section; a message over
        C{maxOriginal} octets or with a line too long to be embedded gets
        its header section only, as RFC 3461 section 4.3 permits.
    @param postmaster: when set, address the report to this address
        instead of the sender: for a report about a message from C{<>}
        (see L{shouldBounce}), or a copy for the postmaster.
    @param maxOriginal: the largest original, in octets, returned whole.
    @param retryUntil: when relayd gives up on delayed recipients (seconds
        since the epoch), for C{Will-Retry-Until} (RFC 3464 section
        2.3.9), or None to leave it out.
    @param envid: the client's C{ENVID} (decoded, RFC 3461 section 4.4),
        reported as C{Original-Envelope-Id} (RFC 3464 section 2.2.1), or
        None.

    @return: the report, as bytes.  7-bit unless it returns a whole 8-bit
        original, in which case it must be sent with C{BODY=8BITMIME}, or
        goes to an internationalized address (a UTF-8 C{To:} field, RFC
        6532), in which case it must also be queued with C{smtputf8}.
        Non-ASCII recipient addresses are in C{message/delivery-status}
        as RFC 6533 section 3 C{utf-8} xtext; relayd does not make
        C{message/global-delivery-status}.

    @raise ValueError: when there is nobody to send the report to (null
        sender and no postmaster), no recipient to report on, or an
        argument that cannot be put in a header (control characters, or
        a non-ASCII reporting MTA).
    @raise OSError: when the original cannot be read.
    """
    if not recipients:
        raise ValueError("a delivery status notification needs recipients")
    if not _TOKEN.match(queueId):
        raise ValueError(f"not a queue id: {queueId!r}")
    _checkText("reporting MTA", reportingMTA, ascii=True)
    if not 0 < len(reportingMTA) <= 255 or " " in reportingMTA:
        raise ValueError(f"not a host name: {reportingMTA!r}")
    # An internationalized sender (SMTPUTF8, RFC 6531) gets a report whose
    # To: field is UTF-8 (RFC 6532); the caller queues it with smtputf8.
    _checkText("sender", sender)
    if postmaster is not None:
        _checkText("postmaster", postmaster)
        to = postmaster
    elif shouldBounce(sender):
        to = sender
    else:
        raise ValueError("never bounce a bounce: null sender and no postmaster")
    if not to:
        raise ValueError("the report needs a recipient")

    if envid is not None:
        _checkText("envelope id", envid, ascii=True)
    actions = {r.action for r in recipients}
    subject = (
        FAILED_SUBJECT
        if "failed" in actions
        else DELAYED_SUBJECT
        if "delayed" in actions
        else RELAYED_SUBJECT
    )
    original, originalType, originalEncoding = _original(
        originalPath,
        os.path.getsize(originalPath) if originalSize is None else originalSize,
        returnFull,
        maxOriginal,
    )
    text = _explanation(
        reportingMTA=reportingMTA,
        sender=sender,
        arrival=arrival,
        recipients=recipients,
        forPostmaster=postmaster is not None,
        returned=originalType == "message/rfc822",
        retryUntil=retryUntil,
    )
    if text.isascii():
        textCharset, textEncoding = "us-ascii", "7bit"
        textBody = _crlf(text.encode("ascii"))
    else:
        textCharset, textEncoding = "utf-8", "quoted-printable"
        textBody = _quotedPrintable(text.encode("utf-8", "replace"))
    status = _deliveryStatus(reportingMTA, queueId, arrival, recipients, retryUntil, envid)

    parts = [
        (
            [
                f"Content-Type: text/plain; charset={textCharset}",
                "Content-Description: Notification",
                f"Content-Transfer-Encoding: {textEncoding}",
            ],
            textBody,
        ),
        (
            [
                "Content-Type: message/delivery-status",
                "Content-Description: Delivery report",
                "Content-Transfer-Encoding: 7bit",
            ],
            status,
        ),
        (
            [
                f"Content-Type: {originalType}",
                "Content-Description: "
                + (
                    "Undelivered Message"
                    if originalType == "message/rfc822"
                    else "Undelivered Message Headers"
                ),
                f"Content-Transfer-Encoding: {originalEncoding}",
            ],
            original,
        ),
    ]
    boundary = _boundary(queueId, [body for _, body in parts])

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queueId}.{secrets.token_hex(8)}@{reportingMTA}>",
        # RFC 3834 section 5: generated in answer to another message, so
        # that responders (vacation programs) stay quiet.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    if originalEncoding == "8bit":
        # RFC 2045 section 6.4: a multipart holding 8bit data is 8bit.
        headers.append("Content-Transfer-Encoding: 8bit")

    # UTF-8 only for an internationalized To: (RFC 6532); ASCII otherwise.
    out = ["".join(line + "\r\n" for line in headers).encode("utf-8"), b"\r\n"]
    out.append(b"This is a MIME-encapsulated message.\r\n")
    delimiter = b"\r\n--" + boundary.encode("ascii")
    for partHeaders, body in parts:
        out += [delimiter, b"\r\n", _lines(partHeaders), b"\r\n", body]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def _checkText(what: str, value: str, ascii: bool = False) -> None:
    """
    Refuse a value that cannot go into a header field as it is.

    @raise ValueError: when C{value} has control characters (a CR or LF
        would inject header fields), or, with C{ascii}, non-ASCII ones.
    """
    if _CONTROL.search(value):
        raise ValueError(f"{what} has control characters: {value!r}")
    if ascii and not value.isascii():
        raise ValueError(f"{what} is not ASCII (needs SMTPUTF8): {value!r}")


def _date(when: float) -> str:
    """
    Format a time as an RFC 5322 section 3.3 date-time, in UTC.
    """
    return format_datetime(datetime.fromtimestamp(when, tz=UTC))


def _lines(lines: Sequence[str]) -> bytes:
    """
    Join header lines, each ended with CRLF, as ASCII bytes.
    """
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def _crlf(data: bytes) -> bytes:
    """
    Give C{data} CRLF line endings, ending with one.
    """
    data = _NEWLINE.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _quotedPrintable(data: bytes) -> bytes:
    """
    Encode C{data} (any line endings) in quoted-printable (RFC 2045
    section 6.7), lines of at most 76 characters, CRLF line endings.
    """
    lines = _NEWLINE.sub(b"\n", data)
    return _crlf(quopri.encodestring(lines))


def _fold(name: str, value: str) -> list[str]:
    """
    Fold a header field at white space (RFC 5322 section 2.2.3; RFC 3464
    section 2.1 lets DSN fields fold the same way) so that lines stay near
    78 octets and never reach 998.

    Runs of white space in C{value} become one space first: a multi-line
    SMTP reply becomes one line of text.

    @return: the lines of the field, without line endings.
    """
    words: list[str] = []
    for word in value.split():
        words += [word[i : i + _MAX_WORD] for i in range(0, len(word), _MAX_WORD)]
    lines: list[str] = []
    line = f"{name}:"
    for index, word in enumerate(words):
        if index and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return lines


def _sevenBit(value: str) -> str:
    """
    Make a reply text fit a 7-bit field: white space runs become a space,
    other control and non-ASCII characters C{"?"}.
    """
    value = " ".join(value.split())
    return "".join(c if " " <= c <= "~" else "?" for c in value)


def _xtext(address: str) -> str:
    """
    Write an address for a C{Final-Recipient} field: C{rfc822; address}
    when it is ASCII, else C{utf-8; } and the RFC 6533 section 3
    C{utf-8-addr-xtext} form, where every character that is not a QCHAR is
    written C{\\x{HEX}}.
    """
    if address.isascii():
        return f"rfc822; {address}"
    encoded = "".join(
        c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):02X}}}" for c in address
    )
    return f"utf-8; {encoded}"


def _deliveryStatus(
    reportingMTA: str,
    queueId: str,
    arrival: float,
    recipients: Sequence[RecipientStatus],
    retryUntil: float | None,
    envid: str | None = None,
) -> bytes:
    """
    Build the body of the C{message/delivery-status} part (RFC 3464
    section 2.1): the per-message fields, then one block of per-recipient
    fields for each recipient, blocks separated by an empty line.
    C{Original-Envelope-Id} (section 2.2.1) and C{Original-Recipient}
    (section 2.3.1) are there when the client gave ENVID and ORCPT.
    """
    first = [f"Reporting-MTA: dns; {reportingMTA}"]
    if envid is not None:
        first = _fold("Original-Envelope-Id", envid) + first
    blocks = [
        [
            *first,
            f"X-Relayd-Queue-ID: {queueId}",
            f"Arrival-Date: {_date(arrival)}",
        ]
    ]
    for recipient in recipients:
        block = []
        if recipient.originalRecipient is not None:
            block += _fold("Original-Recipient", originalRecipient(recipient.originalRecipient))
        block += _fold("Final-Recipient", _xtext(recipient.address))
        block += [
            f"Action: {recipient.action}",
            f"Status: {recipient.status}",
        ]
        if recipient.remoteMTA:
            block += _fold("Remote-MTA", f"dns; {recipient.remoteMTA}")
        if recipient.diagnostic:
            block += _fold("Diagnostic-Code", f"smtp; {_sevenBit(recipient.diagnostic)}")
        if recipient.lastAttempt is not None:
            block.append(f"Last-Attempt-Date: {_date(recipient.lastAttempt)}")
        if recipient.action == "delayed" and retryUntil is not None:
            block.append(f"Will-Retry-Until: {_date(retryUntil)}")
        blocks.append(block)
    return b"\r\n".join(_lines(block) for block in blocks)


def _explanation(
    *,
    reportingMTA: str,
    sender: str,
    arrival: float,
    recipients: Sequence[RecipientStatus],
    forPostmaster: bool,
    returned: bool,
    retryUntil: float | None,
) -> str:
    """
    Write the human-readable part: what happened to each recipient, with
    the remote server's reply when there is one (RFC 3464 section 2, the
    first part of the report), wrapped to 72 columns, LF line endings.
    """
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    relayed = [r for r in recipients if r.action == "relayed"]
    # (text, indented): recipient paragraphs are indented after their first
    # line, so that each stands out.
    paragraphs = [(f"This is the mail delivery system at {reportingMTA}.", False)]
    if forPostmaster and not sender:
        paragraphs.append(
            (
                (
                    "This report goes to the postmaster: the message came from "
                    "the null sender <> (it is itself a delivery report), so no "
                    "report can go back to its sender."
                ),
                False,
            )
        )
    elif forPostmaster:
        paragraphs.append(
            (
                f"This report goes to the postmaster; the message's sender is <{sender}>.",
                False,
            )
        )
    paragraphs.append((f"The message arrived on {_date(arrival)}.", False))
    if failed:
        paragraphs.append(
            (
                (
                    "It could not be delivered to the recipients listed below; "
                    "the mail system has given up on them."
                ),
                False,
            )
        )
        paragraphs += [(_describe(r), True) for r in failed]
    if delayed:
        until = f" until {_date(retryUntil)}" if retryUntil is not None else ""
        paragraphs.append(
            (
                (
                    "Delivery to the recipients listed below has been delayed. "
                    f"The mail system will keep trying{until}; there is no need "
                    "to send the message again."
                ),
                False,
            )
        )
        paragraphs += [(_describe(r), True) for r in delayed]
    if relayed:
        paragraphs.append(
            (
                (
                    "Your message was successfully delivered to the next mail "
                    "system for the recipients listed below, as you asked. That "
                    "system does not send delivery notifications, so you may "
                    "receive no further notice; you may still hear of errors "
                    "from other systems."
                ),
                False,
            )
        )
        paragraphs += [(_describe(r), True) for r in relayed]
    paragraphs.append(
        (
            "The message is attached below."
            if returned
            else "The header section of the message is attached below.",
            False,
        )
    )
    wrapped = [
        textwrap.fill(
            text,
            width=72,
            subsequent_indent="    " if indented else "",
            break_on_hyphens=False,
        )
        for text, indented in paragraphs
    ]
    return "\n\n".join(wrapped) + "\n"


def _describe(recipient: RecipientStatus) -> str:
    """
    One paragraph about one recipient for the human-readable part.
    """
    if recipient.diagnostic:
        reply = _CONTROL.sub("?", " ".join(recipient.diagnostic.split()))
        # A reply decoded with surrogateescape cannot be encoded back.
        reply = reply.encode("utf-8", "replace").decode("utf-8")
        # Postfix: "host X said: 550 ... (in reply to RCPT TO command)".
        context = f" (in reply to {recipient.command} command)" if recipient.command else ""
        if recipient.remoteMTA:
            return f"<{recipient.address}>: host {recipient.remoteMTA} said: {reply}{context}"
        return f"<{recipient.address}>: {reply}{context}"
    _, subject, detail = recipient.status.split(".")
    meaning = _DETAIL.get(f"{subject}.{detail}") or _DETAIL.get(
        f"{subject}.0", "Other undefined status"
    )
    text = f"<{recipient.address}>: {meaning} ({recipient.status})"
    if recipient.remoteMTA:
        text += f", while talking to {recipient.remoteMTA}"
    return text + "."


def _original(path: str, size: int, returnFull: bool, maxOriginal: int) -> tuple[bytes, str, str]:
    """
    Read what the report returns of the original message, the first
    C{size} octets of C{path}.

    @return: the body of the third part (CRLF line endings, ending with
        CRLF), its content type and its transfer encoding.
    """
    if returnFull and size <= maxOriginal:
        with openRegion(path, size) as f:
            data = f.read(maxOriginal + 1)
        if len(data) <= maxOriginal:
            data = _crlf(data)
            # An overlong line could not be embedded without changing the
            # message; the headers alone will do (RFC 3461 section 4.3).
            if all(len(line) <= MAX_LINE for line in data.split(b"\r\n")):
                encoding = "7bit" if data.isascii() else "8bit"
                return data, "message/rfc822", encoding
    headers = _headerSection(path, size, MAX_HEADERS)
    if headers.isascii():
        return headers, "text/rfc822-headers", "7bit"
    return _quotedPrintable(headers), "text/rfc822-headers", "quoted-printable"


def _headerSection(path: str, size: int, limit: int) -> bytes:
    """
    Read the header section of a message: every line up to the first empty
    one (RFC 5322 section 2.1), CRLF line endings, at most about C{limit}
    octets (a message without a body separator is not read to its end),
    from the first C{size} octets of C{path}.
    A line too long for the report is cut into continuation lines.
    """
    lines = []
    read = 0
    with openRegion(path, size) as f:
        while read < limit:
            raw = f.readline(limit - read)
            read += len(raw)
            line = raw.rstrip(b"\r\n")
            if not line:
                break
            while len(line) > MAX_LINE:
                lines.append(line[:MAX_LINE])
                line = b" " + line[MAX_LINE:]
            lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def _boundary(queueId: str, bodies: Sequence[bytes]) -> str:
    """
    Choose a multipart boundary that occurs in none of the parts (RFC 2046
    section 5.1.1).
    """
    while True:
        # At most 70 characters (RFC 2046 section 5.1.1); "=_" can never
        # appear in quoted-printable text.
        boundary = f"=_{queueId[:32]}.{secrets.token_hex(12)}"
        needle = b"--" + boundary.encode("ascii")
        if not any(needle in body for body in bodies):
            return boundary


def noticeRecord(recipients: Sequence[str], data: bytes, now: float, listener: str) -> QueueRecord:
    """
    The envelope of a message relayd writes itself (a DSN, a TLSRPT
    report) for L{relayd.queue.spool.Spool.submit}: from the null
    reverse-path, so that a notice that cannot be delivered never comes
    back as another (RFC 5321 section 4.5.5); C{8BITMIME} when C{data} has
    8-bit octets; C{SMTPUTF8} when a recipient's address needs it (RFC
    6531).

    @param listener: what the queue shows it came from (C{bounce},
        C{tlsrpt}).
    """
    record = QueueRecord.new(
        queueId="",
        sender="",
        recipients=list(recipients),
        arrival=now,
        size=len(data),
        body="8BITMIME" if any(b > 127 for b in data) else "7BIT",
        client="127.0.0.1",
        helo=None,
        user=None,
        listener=listener,
    )
    if not all(address.isascii() for address in recipients):
        record = replace(record, smtputf8=True)
    return record
