"""
L{relayd.smtp.extensions}: the one table that decides what EHLO advertises
and which MAIL and RCPT parameters are read.
"""

from relayd.address import Address, parseParameters
from relayd.envelope import Envelope, Recipient
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
        "DSN",
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
    """SIZE (26), BODY=8BITMIME (14), AUTH= (500), RET=/ENVID= (100), SMTPUTF8 (10)."""
    assert extensions.MAIL_ALLOWANCE == 650


def test_rcptAllowance() -> None:
    """RFC 3461 section 4: NOTIFY= and ORCPT= may add 500 octets to RCPT."""
    assert extensions.RCPT_ALLOWANCE == 500


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
    """NOTIFY and ORCPT go into the recipient being added, not the envelope."""
    envelope = Envelope(sender=Address.null())
    bob = Recipient(Address("bob", "example.net"))
    assert extensions.parseRecipient({}, envelope, bob) is None
    assert not bob.given
    parameters = parseParameters("ORCPT=rfc822;bob+40example.net NOTIFY=failure,success")
    assert extensions.parseRecipient(parameters, envelope, bob) is None
    assert bob.notify == ("SUCCESS", "FAILURE")
    assert bob.orcpt == "rfc822;bob+40example.net"
    assert envelope.parameters == {}
    assert extensions.parseRecipient(parseParameters("XFOO=1"), envelope, bob) == Reply(
        555, "5.5.4", "Error: unsupported parameter XFOO"
    )


def test_parseMailDSN() -> None:
    envelope = Envelope(sender=Address.null())
    assert extensions.parseMail(parseParameters("RET=hdrs ENVID=a+2Bb"), envelope) is None
    assert (envelope.ret, envelope.envid) == ("HDRS", "a+b")


def test_sizeOnlyAsciiDigits() -> None:
    """A superscript digit is a digit to str.isdigit, not to int: refused, not a crash."""
    envelope = Envelope(sender=Address.null())
    for bad in ["\xb9", "\xb2\xb3", "\u0661"]:
        assert extensions.parseMail({"SIZE": bad}, envelope) == Reply(
            501, "5.5.4", "Error: bad SIZE parameter"
        )


def test_dsnBadMailParameters() -> None:
    """RET other than FULL/HDRS, bad xtext, ENVID over 100: 501 5.5.4."""
    for bad in ["RET=ALL", "RET", "ENVID=a+zz", "ENVID=" + "x" * 101, "ENVID=+0A", "ENVID"]:
        envelope = Envelope(sender=Address.null())
        reply = extensions.parseMail(parseParameters(bad), envelope)
        assert reply is not None and (reply.code, reply.enhanced) == (501, "5.5.4"), bad
        assert (envelope.ret, envelope.envid) == (None, None)
    envelope = Envelope(sender=Address.null())
    assert extensions.parseMail(parseParameters("ENVID=" + "x" * 100), envelope) is None


def test_dsnBadRecipientParameters() -> None:
    """NEVER with others, unknown keywords, ORCPT without a type or with bad xtext."""
    for bad in [
        "NOTIFY=NEVER,SUCCESS",
        "NOTIFY=SUCCESS,SOMETIMES",
        "NOTIFY",
        "ORCPT=bob@example.net",
        "ORCPT=;bob@example.net",
        "ORCPT=rfc822;bob+4",
        "ORCPT=rfc822;",
        "ORCPT=x400;bob",
    ]:
        recipient = Recipient(Address("bob", "example.net"))
        reply = extensions.parseRecipient(parseParameters(bad), Envelope(Address.null()), recipient)
        assert reply is not None and (reply.code, reply.enhanced) == (501, "5.5.4"), bad
        assert not recipient.given, bad
