"""
Tests for L{relayd.delivery.bounce}: delivery status notifications (RFC 3464), read
back with the standard library's L{email} parser as a recipient's mail
program would.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import re
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from relayd.delivery import bounce
from relayd.delivery.bounce import (
    DELAYED_SUBJECT,
    FAILED_SUBJECT,
    RecipientStatus,
    makeDSN,
    shouldBounce,
)
from relayd.queue.record import QueueRecord, encodeTrailer

ORIGINAL = (
    b"Received: from client.example (client.example [192.0.2.1])\r\n"
    b"\tby relay.example.org with ESMTP id 0A1B2C3D\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <original.1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the numbers are attached.\r\n"
)

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3 * 86400

BOB = RecipientStatus(
    address="bob@example.net",
    action="failed",
    status="5.1.1",
    remoteMTA="mx.example.net",
    diagnostic="550 5.1.1 <bob@example.net>: no such user",
    lastAttempt=ARRIVAL + 60,
)

CAROL = RecipientStatus(
    address="carol@example.com",
    action="delayed",
    status="4.4.1",
    remoteMTA="mx1.example.com",
    diagnostic=None,
    lastAttempt=ARRIVAL + 7200,
)

DAVE = RecipientStatus(
    address="dave@nowhere.invalid",
    action="failed",
    status="5.1.2",
    remoteMTA=None,
    diagnostic=None,
    lastAttempt=None,
)


@pytest.fixture
def original(tmp_path: Path) -> Path:
    """The spool data file of the message being reported on."""
    path = tmp_path / "0A1B2C3D"
    path.write_bytes(ORIGINAL)
    return path


def dsn(originalPath: Path, **kwargs: Any) -> bytes:
    """
    Build a report with sensible defaults, and check what every report
    must satisfy whatever its content: CRLF line endings only, no line
    over 998 octets (RFC 5322 section 2.1.1), 7-bit header fields.
    """
    arguments: dict[str, Any] = {
        "reportingMTA": "relay.example.org",
        "queueId": "0A1B2C3D",
        "sender": "alice@example.org",
        "arrival": ARRIVAL,
        "now": NOW,
        "recipients": [BOB],
        "originalPath": str(originalPath),
    }
    arguments.update(kwargs)
    data = makeDSN(**arguments)
    assert isinstance(data, bytes)
    assertWellFormed(data)
    return data


def assertWellFormed(data: bytes) -> None:
    """
    Fail unless C{data} uses CRLF for every line break, has no line over
    998 octets and has a 7-bit header section.
    """
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None, "bare CR or LF"
    assert data.endswith(b"\r\n")
    longest = max(len(line) for line in data.split(b"\r\n"))
    assert longest <= 998
    headerSection = data.split(b"\r\n\r\n", 1)[0]
    assert headerSection.isascii()


def parse(data: bytes) -> EmailMessage:
    """Parse a report as a mail program would."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.defects == []
    return message


def parts(message: EmailMessage) -> list[Message]:
    """
    The parts of a report, checking the C{multipart/report} structure of
    RFC 6522 section 3.
    """
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    payload = message.get_payload()
    assert isinstance(payload, list)
    for part in payload:
        assert part.defects == []
    return payload


def statusBlocks(message: EmailMessage) -> list[Message]:
    """
    The blocks of the C{message/delivery-status} part: per-message fields
    first, then one block per recipient (RFC 3464 section 2.1).
    """
    part = parts(message)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def text(message: EmailMessage) -> str:
    """
    The human-readable first part, decoded, with each run of white space
    (line breaks of wrapped paragraphs included) made one space.
    """
    part = parts(message)[0]
    assert part.get_content_type() == "text/plain"
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return " ".join(content.split())


def test_structure(original: Path) -> None:
    """
    A report is a C{multipart/report; report-type=delivery-status} with
    exactly three parts: text, delivery status, and by default the
    original's header section (RFC 3464 section 2, RFC 6522 section 3).
    """
    message = parse(dsn(original))
    assert [p.get_content_type() for p in parts(message)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.get_boundary()


def test_headers(original: Path) -> None:
    """
    The report comes from the mailer daemon, goes to the sender, is marked
    as automatic (RFC 3834 section 5) and dated C{now}.
    """
    data = dsn(original)
    assert b"\r\nTo: <alice@example.org>\r\n" in data
    message = parse(data)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.org>"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == FAILED_SUBJECT
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert re.match(r"^<0A1B2C3D\.[^@<> ]+@relay\.example\.org>$", message["Message-ID"])


def test_messageIdUnique(original: Path) -> None:
    """
    Two reports about the same message have different Message-IDs and
    boundaries.
    """
    first = parse(dsn(original))
    second = parse(dsn(original))
    assert first["Message-ID"] != second["Message-ID"]
    assert first.get_boundary() != second.get_boundary()


def test_perMessageFields(original: Path) -> None:
    """
    The first block of the delivery status names the reporting MTA, the
    queue id and the arrival date (RFC 3464 section 2.2).
    """
    perMessage = statusBlocks(parse(dsn(original)))[0]
    assert perMessage["Reporting-MTA"] == "dns; relay.example.org"
    assert perMessage["X-Relayd-Queue-ID"] == "0A1B2C3D"
    assert parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp() == ARRIVAL


def test_perRecipientFields(original: Path) -> None:
    """
    A recipient that failed at a remote server gets Final-Recipient,
    Action, Status, Remote-MTA, Diagnostic-Code and Last-Attempt-Date
    (RFC 3464 section 2.3).
    """
    blocks = statusBlocks(parse(dsn(original)))
    assert len(blocks) == 2
    block = blocks[1]
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    lastAttempt = parsedate_to_datetime(block["Last-Attempt-Date"])
    assert lastAttempt.timestamp() == ARRIVAL + 60
    assert "Will-Retry-Until" not in block


def test_textPart(original: Path) -> None:
    """
    The text part tells a person which recipient failed and quotes the
    remote server's reply.
    """
    content = text(parse(dsn(original)))
    assert "<bob@example.net>" in content
    assert "host mx.example.net said: 550 5.1.1" in content
    assert "header section of the message is attached" in content
    assert parts(parse(dsn(original)))[0].get_content_charset() == "us-ascii"


def test_headersOnly(original: Path) -> None:
    """
    By default the third part is the original's header section, up to and
    not including the empty line, and none of its body.
    """
    third = parts(parse(dsn(original)))[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert third.get_payload(decode=True) == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def test_returnFull(original: Path) -> None:
    """
    With C{returnFull}, the third part is C{message/rfc822} holding the
    whole original (RFC 3461 section 4.3, C{RET=FULL}).
    """
    data = dsn(original, returnFull=True)
    assert ORIGINAL in data
    message = parse(data)
    third = parts(message)[2]
    assert third.get_content_type() == "message/rfc822"
    enclosed = third.get_payload()[0]
    assert enclosed["Subject"] == "quarterly numbers"
    assert enclosed["Message-ID"] == "<original.1@example.org>"
    assert enclosed.get_payload() == "Hello Bob,\r\n\r\nthe numbers are attached.\r\n"
    assert "The message is attached" in text(message)
    assert data.isascii()


def test_returnFullTooBig(original: Path) -> None:
    """
    An original over C{maxOriginal} octets is not returned whole: the
    report falls back to its header section.
    """
    data = dsn(original, returnFull=True, maxOriginal=len(ORIGINAL) - 1)
    third = parts(parse(data))[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert b"the numbers are attached" not in data
    assert b"Subject: quarterly numbers" in data


def test_returnFullExactlyMax(original: Path) -> None:
    """
    An original of exactly C{maxOriginal} octets is still returned whole.
    """
    data = dsn(original, returnFull=True, maxOriginal=len(ORIGINAL))
    assert parts(parse(data))[2].get_content_type() == "message/rfc822"


def test_returnFullLongLine(tmp_path: Path) -> None:
    """
    An original with a line over 998 octets cannot be embedded as it is,
    so it is not returned whole.
    """
    path = tmp_path / "long"
    path.write_bytes(b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n")
    data = dsn(path, returnFull=True)
    assert parts(parse(data))[2].get_content_type() == "text/rfc822-headers"


def test_mixedRecipients(original: Path) -> None:
    """
    Several recipients with different outcomes each get their own block,
    in order; fields that are unknown are left out; a report with any
    failure says so in its subject.
    """
    message = parse(dsn(original, recipients=[BOB, CAROL, DAVE]))
    assert message["Subject"] == FAILED_SUBJECT
    blocks = statusBlocks(message)
    assert len(blocks) == 4
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.com",
        "rfc822; dave@nowhere.invalid",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "failed"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.1", "5.1.2"]

    carol = blocks[2]
    assert carol["Remote-MTA"] == "dns; mx1.example.com"
    assert "Diagnostic-Code" not in carol

    dave = blocks[3]
    assert "Remote-MTA" not in dave
    assert "Diagnostic-Code" not in dave
    assert "Last-Attempt-Date" not in dave

    content = text(message)
    assert "<carol@example.com>" in content
    assert "delayed" in content
    # No remote reply: the meaning of the status code (RFC 3463) explains.
    assert "Bad destination system address (5.1.2)" in content
    assert content.index("<dave@") < content.index("delayed")


def test_allDelayed(original: Path) -> None:
    """
    When every recipient is only delayed the subject says so, and the
    retry deadline, when known, appears as Will-Retry-Until (RFC 3464
    section 2.3.9).
    """
    until = ARRIVAL + 5 * 86400
    message = parse(dsn(original, recipients=[CAROL], retryUntil=until))
    assert message["Subject"] == DELAYED_SUBJECT
    block = statusBlocks(message)[1]
    assert block["Action"] == "delayed"
    assert parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until
    assert "keep trying until" in text(message)


def test_noWillRetryUntilByDefault(original: Path) -> None:
    """
    Without C{retryUntil}, delayed recipients get no Will-Retry-Until.
    """
    block = statusBlocks(parse(dsn(original, recipients=[CAROL])))[1]
    assert "Will-Retry-Until" not in block


def test_longDiagnosticFolded(original: Path) -> None:
    """
    A long remote reply is folded at white space (RFC 5322 section 2.2.3)
    so that no line exceeds 998 octets, and unfolds to the same text; a
    multi-line reply becomes one line.
    """
    words = " ".join(f"word{i}" for i in range(400))
    reply = "550-5.7.1 first line\r\n550 5.7.1 " + words
    recipient = RecipientStatus("bob@example.net", "failed", "5.7.1", "mx.example.net", reply, None)
    data = dsn(original, recipients=[recipient])
    statusPart = data.split(b"Diagnostic-Code:", 1)[1].split(b"\r\n\r\n", 1)[0]
    assert statusPart.count(b"\r\n ") > 10
    assert max(len(line) for line in statusPart.split(b"\r\n")) <= 78
    block = statusBlocks(parse(data))[1]
    assert block["Diagnostic-Code"] == ("smtp; 550-5.7.1 first line 550 5.7.1 " + words)
    assert "word399" in text(parse(data))


def test_longUnbrokenDiagnostic(original: Path) -> None:
    """
    A reply with a run of non-blank characters longer than a line can
    hold is cut so that no line exceeds 998 octets.
    """
    reply = "550 " + "x" * 5000
    recipient = RecipientStatus("bob@example.net", "failed", "5.0.0", "mx.example.net", reply, None)
    data = dsn(original, recipients=[recipient], returnFull=True)
    block = statusBlocks(parse(data))[1]
    assert block["Diagnostic-Code"].replace(" ", "") == "smtp;550" + "x" * 5000


def test_nonAsciiDiagnostic(original: Path) -> None:
    """
    Non-ASCII in a remote reply keeps the delivery-status part 7-bit (it
    becomes C{?} there) and appears in full in a UTF-8 text part.
    """
    recipient = RecipientStatus(
        "bob@example.net",
        "failed",
        "5.1.1",
        "mx.example.net",
        "550 5.1.1 Benutzer unbekannt: Müller\x00",
        None,
    )
    data = dsn(original, recipients=[recipient])
    assert data.isascii()
    message = parse(data)
    assert statusBlocks(message)[1]["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 Benutzer unbekannt: M?ller?"
    )
    first = parts(message)[0]
    assert first.get_content_charset() == "utf-8"
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Benutzer unbekannt: Müller" in text(message)


def test_nonAsciiRecipient(original: Path) -> None:
    """
    A non-ASCII recipient address is reported as a C{utf-8} address in the
    7-bit C{xtext} form of RFC 6533 section 3.
    """
    recipient = RecipientStatus("jörg+x@example.net", "failed", "5.1.1")
    data = dsn(original, recipients=[recipient])
    assert data.isascii()
    block = statusBlocks(parse(data))[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg\\x{2B}x@example.net"
    assert "<jörg+x@example.net>" in text(parse(data))


def test_eightBitHeadersOnly(tmp_path: Path) -> None:
    """
    An original whose header section has 8-bit octets is returned in a
    quoted-printable C{text/rfc822-headers} part (RFC 6522 section 4), so
    the report stays 7-bit and needs no 8BITMIME; decoding it gives back
    the original octets.
    """
    headers = b"From: =?utf-8?q?x?= <a@example.org>\r\nSubject: Gr\xc3\xbc\xc3\x9fe \xff\r\n"
    path = tmp_path / "8bit"
    path.write_bytes(headers + b"\r\nBody \xc3\xa9\r\n")
    data = dsn(path)
    assert data.isascii()
    third = parts(parse(data))[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    assert third.get_payload(decode=True) == headers


def test_eightBitReturnFull(tmp_path: Path) -> None:
    """
    A whole 8-bit original cannot be encoded inside C{message/rfc822}
    (RFC 2046 section 5.2.1): it goes in as 8bit, the report is marked
    8bit, and is no longer 7-bit (the caller sends it with BODY=8BITMIME).
    """
    message = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nK\xc3\xa4se\r\n"
    path = tmp_path / "8bit"
    path.write_bytes(message)
    data = dsn(path, returnFull=True)
    assert not data.isascii()
    assert message in data
    parsed = parse(data)
    assert parsed["Content-Transfer-Encoding"] == "8bit"
    third = parts(parsed)[2]
    assert third.get_content_type() == "message/rfc822"
    assert third["Content-Transfer-Encoding"] == "8bit"


def test_bareLineFeedsInOriginal(tmp_path: Path) -> None:
    """
    The spool stores CRLF only, but a data file with bare LFs still gives
    a report with CRLF only.
    """
    path = tmp_path / "lf"
    path.write_bytes(b"Subject: lf\nFrom: a@example.org\n\nbody\nmore\n")
    third = parts(parse(dsn(path)))[2]
    assert third.get_payload(decode=True) == b"Subject: lf\r\nFrom: a@example.org\r\n"
    data = dsn(path, returnFull=True)
    assert b"body\r\nmore\r\n" in data


def test_longHeaderLineInOriginal(tmp_path: Path) -> None:
    """
    A header line over 998 octets in the original is cut into continuation
    lines, so the report still has no overlong line.
    """
    path = tmp_path / "longheader"
    path.write_bytes(b"X-Long: " + b"y" * 3000 + b"\r\n\r\nbody\r\n")
    third = parts(parse(dsn(path)))[2]
    payload = third.get_payload(decode=True)
    assert payload.replace(b"\r\n ", b"") == b"X-Long: " + b"y" * 3000 + b"\r\n"


def test_noBodySeparator(tmp_path: Path) -> None:
    """
    An original that is all header section (no empty line) is returned
    whole as its headers.
    """
    path = tmp_path / "headersonly"
    path.write_bytes(b"Subject: only\r\n")
    third = parts(parse(dsn(path)))[2]
    assert third.get_payload(decode=True) == b"Subject: only\r\n"


def test_missingOriginal(tmp_path: Path) -> None:
    """
    A report cannot be built when the original is gone: the caller hears
    about it.
    """
    with pytest.raises(OSError):
        dsn(tmp_path / "gone")


def test_boundaryNotInContent(
    original: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The boundary is chosen again when the returned message happens to
    contain it (RFC 2046 section 5.1.1).
    """
    counter = itertools.count()
    monkeypatch.setattr(bounce.secrets, "token_hex", lambda n=32: f"{next(counter):0{2 * n}x}")
    firstBoundary = "=_0A1B2C3D." + "0" * 24
    path = tmp_path / "evil"
    path.write_bytes(b"Subject: x\r\n\r\n--" + firstBoundary.encode() + b"\r\n")
    message = parse(dsn(path, returnFull=True))
    boundary = message.get_boundary()
    assert boundary is not None
    assert boundary != firstBoundary
    assert len(parts(message)) == 3
    assert len(boundary) <= 70


def test_shouldBounce() -> None:
    """
    Never bounce a bounce: only the null reverse-path is exempt (RFC 5321
    section 4.5.5); mailer-daemon addresses are ordinary senders.
    """
    assert shouldBounce("") is False
    assert shouldBounce("<>") is False
    assert shouldBounce("alice@example.org") is True
    assert shouldBounce("MAILER-DAEMON@example.org") is True


def test_nullSenderRefused(original: Path) -> None:
    """
    A report about a message from the null sender has nobody to go to
    unless a postmaster is named.
    """
    with pytest.raises(ValueError, match="bounce"):
        dsn(original, sender="")


def test_postmaster(original: Path) -> None:
    """
    With C{postmaster} the same report goes to the postmaster, whether the
    message came from the null sender or not.
    """
    data = dsn(original, sender="", postmaster="postmaster@example.org")
    assert b"\r\nTo: <postmaster@example.org>\r\n" in data
    message = parse(data)
    assert message["Subject"] == FAILED_SUBJECT
    assert len(parts(message)) == 3
    assert "null sender" in text(message)

    data = dsn(original, postmaster="postmaster@example.org")
    assert b"\r\nTo: <postmaster@example.org>\r\n" in data
    message = parse(data)
    assert "<alice@example.org>" in text(message)


def test_noRecipients(original: Path) -> None:
    """
    A report must be about at least one recipient.
    """
    with pytest.raises(ValueError):
        dsn(original, recipients=[])


@pytest.mark.parametrize(
    "sender",
    ["alice@example.org\r\nBcc: victim@example.net", "alice@example.org\x00"],
)
def test_unsafeSender(original: Path, sender: str) -> None:
    """
    A sender that cannot go into a header field as it is (a line break
    would inject fields) is refused.  A non-ASCII one is taken
    (tests/delivery/test_smtputf8_bounce.py).
    """
    with pytest.raises(ValueError):
        dsn(original, sender=sender)


@pytest.mark.parametrize("queueId", ["", "a b", "x" * 65, "<id>"])
def test_badQueueId(original: Path, queueId: str) -> None:
    """
    The queue id goes into the Message-ID and the boundary, so it must be
    a plain token.
    """
    with pytest.raises(ValueError):
        dsn(original, queueId=queueId)


@pytest.mark.parametrize(
    "action, status",
    [
        ("delivered", "2.0.0"),
        ("failed", "2.0.0"),
        ("delayed", "5.1.1"),
        ("failed", "5.1"),
        ("failed", "550"),
    ],
)
def test_badRecipientStatus(action: str, status: str) -> None:
    """
    Only C{failed} and C{delayed} are reported, with a well-formed RFC 3463
    code of a class that matches.
    """
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.net", action, status)


def test_failedAfterExpiry(original: Path) -> None:
    """
    A recipient that failed because it ran out of time may carry the
    4.X.X code it last got.
    """
    recipient = RecipientStatus("bob@example.net", "failed", "4.4.7")
    block = statusBlocks(parse(dsn(original, recipients=[recipient])))[1]
    assert block["Status"] == "4.4.7"
    assert block["Action"] == "failed"


def test_recipientLineBreakRefused() -> None:
    """
    A recipient address or remote host with a line break is refused.
    """
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.net\r\nX: y", "failed", "5.1.1")
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.net", "failed", "5.1.1", "mx\nX: y")


def test_originalFromQueueFile(tmp_path: Path) -> None:
    """
    From a spool queue file (the message, then its record) with
    C{originalSize}, the report returns the message and nothing of the
    record, whole or headers only.
    """
    record = QueueRecord.new(
        "0A1B2C3D",
        "alice@example.org",
        ["bob@example.net"],
        ARRIVAL,
        len(ORIGINAL),
        "7BIT",
        "192.0.2.1",
        None,
        None,
        "relay",
    )
    path = tmp_path / "0A1B2C3D"
    path.write_bytes(ORIGINAL + encodeTrailer(record, len(ORIGINAL)))
    full = dsn(path, originalSize=len(ORIGINAL), returnFull=True)
    enclosed = parts(parse(full))[2].get_payload()[0]
    assert enclosed.as_bytes(policy=email.policy.SMTP).endswith(ORIGINAL.split(b"\r\n\r\n", 1)[1])
    assert b"RQF2" not in full and b"queue_id" not in full
    headers = dsn(path, originalSize=len(ORIGINAL))
    assert b"RQF2" not in headers and b"queue_id" not in headers
    assert parts(parse(headers))[2].get_content_type() == "text/rfc822-headers"


def test_headerSectionBounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    An original without an empty line after its headers is not read to
    its end: the headers part stops after C{MAX_HEADERS} octets.
    """
    monkeypatch.setattr(bounce, "MAX_HEADERS", 100)
    path = tmp_path / "noseparator"
    path.write_bytes(b"".join(b"X-Line-%03d: value\r\n" % i for i in range(100)))
    payload = parts(parse(dsn(path)))[2].get_payload(decode=True)
    assert payload.startswith(b"X-Line-000: value\r\n")
    assert 100 <= len(payload) < 130
    assert payload.endswith(b"\r\n")


def test_headersNotLimitedByMaxOriginal(original: Path) -> None:
    """
    C{maxOriginal} limits only a whole returned message, never the header
    section.
    """
    data = dsn(original, returnFull=True, maxOriginal=10)
    payload = parts(parse(data))[2].get_payload(decode=True)
    assert payload == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def test_returnFullNoFinalLineBreak(tmp_path: Path) -> None:
    """
    A returned original whose last line has no line break gets one, so
    the boundary that follows starts a line of its own.
    """
    path = tmp_path / "unterminated"
    path.write_bytes(b"Subject: x\r\n\r\nlast line")
    data = dsn(path, returnFull=True)
    assert b"\r\nlast line\r\n\r\n--=_" in data
    assert parts(parse(data))[2].get_payload()[0].get_payload() == "last line\r\n"


def test_diagnosticWithoutRemoteMTA(original: Path) -> None:
    """
    A reply without a known remote host is still quoted, and no
    Remote-MTA field is written.
    """
    recipient = RecipientStatus(
        "bob@example.net", "failed", "5.1.1", None, "550 5.1.1 unknown user"
    )
    message = parse(dsn(original, recipients=[recipient]))
    block = statusBlocks(message)[1]
    assert "Remote-MTA" not in block
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown user"
    assert "<bob@example.net>: 550 5.1.1 unknown user" in text(message)


def test_emptyPostmaster(original: Path) -> None:
    """
    An empty postmaster address is no address.
    """
    with pytest.raises(ValueError):
        dsn(original, sender="", postmaster="")


@pytest.mark.parametrize("reportingMTA", ["", "a b", "x" * 256, "r\u00e9lai.example"])
def test_badReportingMTA(original: Path, reportingMTA: str) -> None:
    """
    The reporting MTA must be a host name (an A-label) that fits a header.
    """
    with pytest.raises(ValueError):
        dsn(original, reportingMTA=reportingMTA)


def test_noticeRecord() -> None:
    """
    The envelope of a notice relayd writes itself: null sender, 8BITMIME
    only for 8-bit data, SMTPUTF8 only for an internationalized recipient.
    """
    from relayd.delivery.bounce import noticeRecord

    plain = noticeRecord(["a@example.net"], b"Subject: x\r\n\r\nhi\r\n", 100.0, "bounce")
    assert (plain.sender, plain.body, plain.smtputf8, plain.listener) == (
        "",
        "7BIT",
        False,
        "bounce",
    )
    assert [r.address for r in plain.recipients] == ["a@example.net"]
    assert plain.size == len(b"Subject: x\r\n\r\nhi\r\n")
    eight = noticeRecord(["a@example.net"], "Subject: é\r\n\r\n".encode(), 100.0, "tlsrpt")
    assert (eight.body, eight.smtputf8, eight.listener) == ("8BITMIME", False, "tlsrpt")
    utf8 = noticeRecord(["jörg@example.net"], b"x\r\n", 100.0, "bounce")
    assert utf8.smtputf8 is True
