"""
SMTPUTF8 (RFC 6531, 6532) on the receiving side, one dialogue per rule
over a L{StringTransport} (see tests/test_dialogue.py), plus the address
grammar and the normal form policies compare (L{relayd.address}).
"""

from __future__ import annotations

import json

from relayd.address import Address, AddressError, asciiDomain, normalDomain, parsePath
from relayd.queuefile import QueueRecord
from relayd.smtp import extensions
from tests.test_dialogue import PLAIN, DialogueTestCase

UTF8_SENDER = "jürgen@bücher.example"
UTF8_RECIPIENT = "用户@例え.テスト"


def wire(text: str) -> bytes:
    return text.encode("utf-8")


class AdvertisedTests(DialogueTestCase):
    def test_advertised(self) -> None:
        """SMTPUTF8 is in the EHLO reply, with 8BITMIME (RFC 6531 section 3.1)."""
        lines = self.ehlo()
        self.assertIn("250 SMTPUTF8", lines)
        self.assertIn("250-8BITMIME", lines)

    def test_notAfterHelo(self) -> None:
        """HELO offers no extension, so no SMTPUTF8 parameter either."""
        self.talk("HELO client.example\r\n")
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n")),
            ["555 5.5.4 Error: parameters need EHLO"],
        )


class MailTests(DialogueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ehlo()

    def test_utf8SenderWithParameter(self) -> None:
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n")), ["250 2.1.0 Ok"]
        )
        self.assertEqual(self.server.envelope.sender, Address("jürgen", "bücher.example"))
        self.assertTrue(self.server.envelope.smtputf8)

    def test_utf8SenderWithoutParameter(self) -> None:
        """RFC 6531 section 3.7.4.1: 553 5.6.7, and no transaction starts."""
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}>\r\n")),
            ["553 5.6.7 Error: non-ASCII sender address not permitted"],
        )
        self.assertIsNone(self.server.envelope)
        # The session goes on: a good MAIL now works.
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])

    def test_invalidUTF8(self) -> None:
        """Octets that are not UTF-8 in the address: 553 5.6.7 even with SMTPUTF8."""
        self.assertEqual(
            self.talk(b"MAIL FROM:<j\xfcrgen@example.com> SMTPUTF8\r\n"),
            ["553 5.6.7 Error: non-ASCII sender address not permitted"],
        )
        self.assertIsNone(self.server.envelope)
        self.assertEqual(
            self.talk(b"MAIL FROM:<a@ex\xc3ample.com> SMTPUTF8\r\n"),
            ["553 5.6.7 Error: non-ASCII sender address not permitted"],
        )
        self.assertIsNone(self.server.envelope)

    def test_parameterTakesNoValue(self) -> None:
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8=1\r\n")),
            ["501 5.5.4 Error: SMTPUTF8 takes no value"],
        )
        self.assertIsNone(self.server.envelope)

    def test_badULabel(self) -> None:
        """A U-label IDNA 2008 refuses is a syntax error (501), not 553."""
        self.assertEqual(
            self.talk(wire("MAIL FROM:<a@-bücher.example> SMTPUTF8\r\n")),
            ["501 5.1.7 Error: bad sender address syntax"],
        )

    def test_asciiWithParameter(self) -> None:
        """SMTPUTF8 with an ASCII address is fine (the headers may be UTF-8)."""
        self.assertEqual(self.talk("MAIL FROM:<a@example.com> SMTPUTF8\r\n"), ["250 2.1.0 Ok"])

    def test_lengthInOctets(self) -> None:
        """
        The 512-octet limit (plus the extensions' allowances)
        counts octets, not characters: a line one octet too long is
        refused although it has 32 characters fewer than octets.
        """

        def line(octets: int) -> bytes:
            head = wire(f"MAIL FROM:<{'ü' * 32}@example.com> SMTPUTF8 AUTH=<")
            return head + b"x" * (octets - len(head) - 3) + b">\r\n"

        limit = 512 + extensions.MAIL_ALLOWANCE
        self.assertEqual(len(line(limit)), limit)
        self.assertEqual(self.talk(line(limit + 1)), ["500 5.5.2 Error: line too long"])
        self.assertEqual(self.talk(line(limit)), ["250 2.1.0 Ok"])


class RcptTests(DialogueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ehlo()

    def test_utf8RecipientWithParameter(self) -> None:
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n")), ["250 2.1.0 Ok"]
        )
        self.assertEqual(self.talk(wire(f"RCPT TO:<{UTF8_RECIPIENT}>\r\n")), ["250 2.1.5 Ok"])
        self.assertEqual(self.server.envelope.recipients, [Address("用户", "例え.テスト")])

    def test_utf8RecipientWithoutParameter(self) -> None:
        """553 5.6.7, and the transaction is as it was."""
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])
        envelope = self.server.envelope
        self.assertEqual(
            self.talk(wire(f"RCPT TO:<{UTF8_RECIPIENT}>\r\n")),
            ["553 5.6.7 Error: non-ASCII recipient address not permitted"],
        )
        self.assertIs(self.server.envelope, envelope)
        self.assertEqual(envelope.recipients, [Address("b", "example.net")])

    def test_invalidUTF8Recipient(self) -> None:
        self.assertEqual(
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n")), ["250 2.1.0 Ok"]
        )
        envelope = self.server.envelope
        self.assertEqual(
            self.talk(b"RCPT TO:<\xff\xfe@example.net>\r\n"),
            ["553 5.6.7 Error: non-ASCII recipient address not permitted"],
        )
        self.assertIs(self.server.envelope, envelope)
        self.assertEqual(envelope.recipients, [])
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])


class MessageTests(DialogueTestCase):
    def test_utf8HeadersAndReceived(self) -> None:
        """
        UTF-8 header fields are taken (RFC 6532), the record says smtputf8,
        and Received: says UTF8SMTP (RFC 6531 section 3.7.3).
        """
        self.ehlo()
        self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n"))
        self.talk(wire(f"RCPT TO:<{UTF8_RECIPIENT}>\r\n"))
        self.assertEqual(self.talk("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        header = wire(f"From: Jürgen <{UTF8_SENDER}>\r\nSubject: Grüße\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(self.talk(header), ["250 2.0.0 Ok: queued as Q0001"])
        message = self.spool.messages["Q0001"]
        self.assertIn(wire(f"From: Jürgen <{UTF8_SENDER}>\r\n"), message)
        received = message.split(b"\r\n\r\n")[0].decode("utf-8")
        self.assertIn("with UTF8SMTP id Q0001", received)
        self.assertIn(f"for <{UTF8_RECIPIENT}>;", received)
        record = self.spool.records["Q0001"]
        self.assertTrue(record.smtputf8)
        self.assertEqual(record.sender, UTF8_SENDER)
        self.assertEqual([r.address for r in record.recipients], [UTF8_RECIPIENT])
        self.assertEqual(QueueRecord.decode(record.encode()), record)

    def test_receivedUnderTLSAndAuth(self) -> None:
        """UTF8SMTPS after STARTTLS, UTF8SMTPSA after AUTH as well."""
        self.ehlo()
        self.starttls()
        for name, expected in (("Q0001", "UTF8SMTPS"), ("Q0002", "UTF8SMTPSA")):
            if name == "Q0002":
                self.assertEqual(
                    self.talk(f"AUTH PLAIN {PLAIN}\r\n"), ["235 2.7.0 Authentication successful"]
                )
            self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n"))
            self.talk(wire(f"RCPT TO:<{UTF8_RECIPIENT}>\r\n"))
            self.talk("DATA\r\n")
            self.assertEqual(
                self.talk("Subject: x\r\n\r\nbody\r\n.\r\n"), [f"250 2.0.0 Ok: queued as {name}"]
            )
            self.assertIn(f"with {expected} id {name}".encode(), self.spool.messages[name])

    def test_bdat(self) -> None:
        """The same through BDAT (RFC 3030): UTF-8 header taken, UTF8SMTP."""
        self.ehlo()
        self.talk(wire(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8\r\n"))
        self.talk(wire(f"RCPT TO:<{UTF8_RECIPIENT}>\r\n"))
        content = wire("Subject: Grüße\r\n\r\nbody\r\n")
        self.assertEqual(
            self.talk(b"BDAT %d LAST\r\n" % len(content) + content),
            ["250 2.0.0 Ok: queued as Q0001"],
        )
        message = self.spool.messages["Q0001"]
        self.assertTrue(message.endswith(content))
        self.assertIn(b"with UTF8SMTP id Q0001", message)
        self.assertTrue(self.spool.records["Q0001"].smtputf8)

    def test_plainTransaction(self) -> None:
        """Without the parameter: ESMTP, and the record says False."""
        self.ehlo()
        self.transaction()
        self.talk("Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertIn(b"with ESMTP id Q0001", self.spool.messages["Q0001"])
        self.assertFalse(self.spool.records["Q0001"].smtputf8)


class RecordTests(DialogueTestCase):
    def test_oldRecordReadsFalse(self) -> None:
        """A record written before SMTPUTF8 (no "smtputf8" key) reads as False."""
        record = QueueRecord.new(
            "Q1", "a@example.com", ["b@example.net"], 1.0, 10, "7BIT", "127.0.0.1", None, None, "x"
        )
        data = record.toJSON()
        del data["smtputf8"]
        self.assertFalse(QueueRecord.fromJSON(json.loads(json.dumps(data))).smtputf8)


class AddressTests(DialogueTestCase):
    """The grammar of RFC 6531 section 3.3 and the normal form."""

    def test_parse(self) -> None:
        address, params = parsePath(f"FROM:<{UTF8_SENDER}> SMTPUTF8", "FROM:", allowNull=True)
        self.assertEqual(address, Address("jürgen", "bücher.example"))
        self.assertFalse(address.isAscii)
        self.assertEqual(params, "SMTPUTF8")
        quoted, _ = parsePath('TO:<"jür gen"@example.com>', "TO:", allowNull=False)
        self.assertEqual(quoted.local, '"jür gen"')

    def test_surrogatesRefused(self) -> None:
        with self.assertRaises(AddressError) as caught:
            parsePath("TO:<a\udcff@example.com>", "TO:", allowNull=False)
        self.assertTrue(caught.exception.badUTF8)

    def test_normalForm(self) -> None:
        """
        U-label and A-label forms of a domain are the same; the local part
        is NFC and lower case.
        """
        self.assertEqual(asciiDomain("Bücher.Example"), "xn--bcher-kva.example")
        self.assertEqual(normalDomain("xn--BCHER-kva.example."), "xn--bcher-kva.example")
        self.assertEqual(
            Address("User", "bücher.example").normalForm,
            Address("user", "XN--bcher-kva.example").normalForm,
        )
        # "ü" precomposed and as u + combining diaeresis.
        self.assertEqual(
            Address("J\u00fcrgen", "example.com").normalForm,
            Address("ju\u0308rgen", "example.com").normalForm,
        )
        self.assertEqual(Address("JÜRGEN", "example.com").normalForm, "jürgen@example.com")
        # Non-transitional IDNA 2008: ß is not ss.
        self.assertEqual(normalDomain("faß.de"), "xn--fa-hia.de")
        self.assertNotEqual(
            Address("straße", "example.com").normalForm,
            Address("strasse", "example.com").normalForm,
        )
