"""
Delivery reports about SMTPUTF8 messages (RFC 6531, 6532, 6533): a report
to an internationalized sender has a UTF-8 C{To:} field and must itself be
sent with SMTPUTF8; internationalized recipients are reported as RFC 6533
C{utf-8} addresses.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from relayd.bounce import RecipientStatus, makeDSN

ORIGINAL = "From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()


def test_internationalizedSender(tmp_path: Path) -> None:
    path = tmp_path / "Q1"
    path.write_bytes(ORIGINAL)
    recipient = RecipientStatus(
        "用户@例え.テスト",
        "failed",
        "5.6.7",
        diagnostic="553 5.6.7 SMTPUTF8 is required, but was not offered by host mx[192.0.2.1]",
    )
    data = makeDSN(
        reportingMTA="relay.example.org",
        queueId="Q1",
        sender="jörg@bücher.example",
        arrival=1_700_000_000.0,
        now=1_700_000_100.0,
        recipients=[recipient],
        originalPath=str(path),
    )
    head = data.split(b"\r\n\r\n", 1)[0]
    assert "\r\nTo: <jörg@bücher.example>\r\n".encode() in head
    # Only the To: field is 8-bit.
    assert all(line.isascii() for line in head.split(b"\r\n") if not line.startswith(b"To:"))
    message = email.message_from_string(data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert message["To"].addresses[0].addr_spec == "jörg@bücher.example"
    text, report, original = message.get_payload()
    assert "SMTPUTF8 is required" in text.get_content()
    assert "<用户@例え.テスト>" in text.get_content()
    blocks = report.get_payload()
    assert blocks[1]["Final-Recipient"] == (
        "utf-8; \\x{7528}\\x{6237}@\\x{4F8B}\\x{3048}.\\x{30C6}\\x{30B9}\\x{30C8}"
    )
    assert blocks[1]["Status"] == "5.6.7"
    assert original.get_content_type() == "text/rfc822-headers"
