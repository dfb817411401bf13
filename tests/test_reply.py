"""
L{relayd.reply.Reply}: the one SMTP reply value, and the rules it keeps
(RFC 5321 section 4.2, RFC 2034 section 3, RFC 3463).
"""

import pytest

from relayd.reply import Reply
from relayd.verdict import CONTINUE, accept, reject


def test_wireForm() -> None:
    """As it goes on the wire, without the CRLF."""
    assert str(Reply(550, "5.7.1", "Relay access denied")) == "550 5.7.1 Relay access denied"
    assert str(Reply(354, None, "End data")) == "354 End data"


def test_enhancedLeftOutOnlyWhereRFC2034Does() -> None:
    """None for the greeting, the EHLO/HELO reply and 3xx; not elsewhere."""
    for code in (220, 250, 334, 354):
        Reply(code, None, "text")
    for code in (221, 235, 421, 451, 500, 554):
        with pytest.raises(ValueError, match="needs an enhanced status code"):
            Reply(code, None, "text")


@pytest.mark.parametrize(
    "code, enhanced, problem",
    [
        (199, None, "reply code must be 2xx-5xx"),
        (600, "5.0.0", "reply code must be 2xx-5xx"),
        (451, "5.3.0", "enhanced code 5.3.0 does not match reply 451"),
        (550, "5.7", "bad enhanced status code"),
        (550, "3.0.0", "bad enhanced status code"),
        (550, "", "bad enhanced status code"),
    ],
)
def test_invalid(code: int, enhanced: str | None, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Reply(code, enhanced, "text")


def test_singleLine() -> None:
    with pytest.raises(ValueError, match="single line"):
        Reply(250, "2.0.0", "two\r\nlines")


def test_verdictReply() -> None:
    """A final verdict carries its Reply; CONTINUE has none."""
    assert reject(554, "5.7.1", "Go away").reply == Reply(554, "5.7.1", "Go away")
    assert accept().reply == Reply(250, "2.0.0", "Ok")
    with pytest.raises(ValueError):
        _ = CONTINUE.reply


def test_frozen() -> None:
    reply = Reply(250, "2.0.0", "Ok")
    with pytest.raises(AttributeError):
        reply.code = 550  # type: ignore[misc]


def test_clientReplyIsAReply() -> None:
    """
    The client's replies are Replies: a peer's is kept as received, even
    with odd digits; one relayd makes itself is checked, on one line.
    """
    from relayd.delivery.client import Reply as ClientReply

    peer = ClientReply.parse(["354 go ahead"])
    assert isinstance(peer, Reply)
    assert (peer.code, peer.enhanced, str(peer)) == (354, "3.0.0", "354 3.0.0 go ahead")
    assert ClientReply.parse(["600 odd"]).code == 600
    local = ClientReply.local(451, "4.4.1", "connect failed:\nrefused")
    assert (str(local), local.remote) == ("451 4.4.1 connect failed: refused", False)
    with pytest.raises(ValueError):
        ClientReply.local(451, "5.4.1", "wrong class")
