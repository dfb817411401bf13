"""
L{relayd.smtp.extensions}: the one table that decides what EHLO advertises
and which MAIL and RCPT parameters are read.
"""

from relayd.address import Address, parseParameters
from relayd.envelope import Envelope
from relayd.reply import Reply
from relayd.smtp import extensions


def offer(**changes: object) -> extensions.Offer:
    values: dict = {
        "tls": False,
        "tlsAvailable": True,
        "authAvailable": True,
        "authenticated": False,
        "mode": "relay",
        "messageSize": 1000,
    }
    values.update(changes)
    return extensions.Offer(**values)


def test_plainText() -> None:
    """Before TLS: STARTTLS, no AUTH."""
    assert extensions.advertise(offer()) == [
        "PIPELINING",
        "SIZE 1000",
        "STARTTLS",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "CHUNKING",
        "SMTPUTF8",
    ]


def test_underTLS() -> None:
    """Under TLS: AUTH until the client has logged in, no STARTTLS."""
    lines = extensions.advertise(offer(tls=True))
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    assert "AUTH PLAIN LOGIN" not in extensions.advertise(offer(tls=True, authenticated=True))
    assert "AUTH PLAIN LOGIN" not in extensions.advertise(offer(tls=True, authAvailable=False))


def test_noTLSOptions() -> None:
    assert "STARTTLS" not in extensions.advertise(offer(tlsAvailable=False))


def test_mailAllowance() -> None:
    """SIZE (26), BODY=8BITMIME (14), AUTH= (500) and SMTPUTF8 (10)."""
    assert extensions.MAIL_ALLOWANCE == 550


def test_parseSMTPUTF8() -> None:
    """RFC 6531 section 3.4: a bare keyword, recorded in the envelope."""
    envelope = Envelope(sender=Address.null())
    assert extensions.parseMail(parseParameters("SMTPUTF8"), envelope) is None
    assert envelope.smtputf8
    envelope = Envelope(sender=Address.null())
    assert extensions.parseMail(parseParameters("SMTPUTF8=yes"), envelope) == Reply(
        501, "5.5.4", "Error: SMTPUTF8 takes no value"
    )
    assert not envelope.smtputf8


def test_parseMail() -> None:
    envelope = Envelope(sender=Address.null())
    parameters = parseParameters("SIZE=123 BODY=8bitmime AUTH=<>")
    assert extensions.parseMail(parameters, envelope) is None
    assert (envelope.declaredSize, envelope.body) == (123, "8BITMIME")


def test_parseMailFirstProblemInClientOrder() -> None:
    envelope = Envelope(sender=Address.null())
    assert extensions.parseMail(parseParameters("FOO=1 SIZE=x"), envelope) == Reply(
        555, "5.5.4", "Error: unsupported parameter FOO"
    )
    assert extensions.parseMail(parseParameters("SIZE=x FOO=1"), envelope) == Reply(
        501, "5.5.4", "Error: bad SIZE parameter"
    )
    assert extensions.parseMail(parseParameters("BODY=BINARYMIME"), envelope) == Reply(
        501, "5.5.4", "Error: bad BODY parameter"
    )


def test_parseRecipient() -> None:
    """No RCPT parameters yet (DSN will bring NOTIFY and ORCPT)."""
    envelope = Envelope(sender=Address.null())
    assert extensions.parseRecipient({}, envelope) is None
    assert extensions.parseRecipient(parseParameters("ORCPT=x NOTIFY=NEVER"), envelope) == Reply(
        555, "5.5.4", "Error: unsupported parameter NOTIFY"
    )


def test_sizeOnlyAsciiDigits() -> None:
    """A superscript digit is a digit to str.isdigit, not to int: refused, not a crash."""
    envelope = Envelope(sender=Address.null())
    for bad in ["\xb9", "\xb2\xb3", "\u0661"]:
        assert extensions.parseMail({"SIZE": bad}, envelope) == Reply(
            501, "5.5.4", "Error: bad SIZE parameter"
        )
