"""
L{relayd.smtp.sasl}: the AUTH PLAIN and LOGIN wire formats, without a
session (the dialogues with one are in test_dialogue.py).
"""

import base64

from relayd.smtp import sasl


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_unknownMechanism() -> None:
    assert sasl.start("CRAM-MD5") is None
    assert sasl.start("plain") is not None


def test_plainInitialResponse() -> None:
    exchange = sasl.start("PLAIN")
    assert exchange is not None
    assert exchange.begin(b64("\0alice\0secret")) == sasl.Credentials("alice", "secret")


def test_plainChallenged() -> None:
    exchange = sasl.start("PLAIN")
    assert exchange is not None
    assert exchange.begin("") == sasl.Challenge("")
    assert exchange.respond(b64("alice\0alice\0pw")) == sasl.Credentials("alice", "pw")


def test_plainOtherAuthorizationIdentity() -> None:
    """Acting for someone else counts as a failed login, not a syntax error."""
    exchange = sasl.start("PLAIN")
    assert exchange is not None
    step = exchange.begin(b64("bob\0alice\0pw"))
    assert step == sasl.Credentials("alice", "pw", "authorization identity differs")


def test_plainMalformed() -> None:
    exchange = sasl.start("PLAIN")
    assert exchange is not None
    step = exchange.begin(b64("alice\0pw"))
    assert isinstance(step, sasl.Refusal)
    assert str(step.reply) == "501 5.5.2 Error: malformed PLAIN response"


def test_login() -> None:
    exchange = sasl.start("LOGIN")
    assert exchange is not None
    assert exchange.begin("") == sasl.Challenge("VXNlcm5hbWU6")
    assert exchange.respond(b64("alice")) == sasl.Challenge("UGFzc3dvcmQ6")
    assert exchange.respond(b64("secret")) == sasl.Credentials("alice", "secret")


def test_loginEmptyPassword() -> None:
    """C{=} is the empty response (RFC 4954 section 4)."""
    exchange = sasl.start("LOGIN")
    assert exchange is not None
    assert exchange.begin(b64("alice")) == sasl.Challenge("UGFzc3dvcmQ6")
    assert exchange.respond("=") == sasl.Credentials("alice", "")


def test_undecodable() -> None:
    exchange = sasl.start("LOGIN")
    assert exchange is not None
    step = exchange.begin("not base64!")
    assert isinstance(step, sasl.Refusal)
    assert str(step.reply) == "501 5.5.2 Error: cannot decode response"


def test_cancelled() -> None:
    exchange = sasl.start("LOGIN")
    assert exchange is not None
    exchange.begin("")
    step = exchange.respond("*")
    assert isinstance(step, sasl.Refusal)
    assert str(step.reply) == "501 5.7.0 Error: authentication cancelled"
