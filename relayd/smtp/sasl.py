"""
The AUTH dialogue (RFC 4954) for the mechanisms relayd offers, PLAIN (RFC
4616) and LOGIN, as an object the session drives.

An L{Exchange} knows the mechanism's wire format and nothing else: it
turns the client's lines into a L{Step}, which tells the session what to
do next: send a C{334} L{Challenge} and feed the answer to
L{Exchange.respond}, check L{Credentials}, or send a L{Refusal}.  Whether
AUTH may be used at all (TLS, EHLO, already authenticated), the password
check, the lockout across connections and the slowing of failures stay in
the session (L{relayd.smtp.session}), which knows the connection.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

from relayd.reply import Reply

__all__ = [
    "AUTH_LINE",
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "Exchange",
    "Refusal",
    "Step",
    "start",
]

AUTH_LINE = 12288
"""RFC 4954 section 4: an AUTH response line may be 12288 octets."""

MECHANISMS = ("PLAIN", "LOGIN")
"""What relayd offers, in the order of the C{AUTH} EHLO keyword."""

_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"


@dataclass(frozen=True)
class Challenge:
    """Send C{334 <text>} and give the client's next line to L{Exchange.respond}."""

    text: str


@dataclass(frozen=True)
class Credentials:
    """
    The client has said who it is.

    @ivar problem: None when C{user} and C{password} are to be checked;
        else why the exchange failed as a failed login (counted, slowed,
        answered C{535 5.7.8}), e.g. an authorization identity that is
        not the user.
    """

    user: str
    password: str
    problem: str | None = None


@dataclass(frozen=True)
class Refusal:
    """The exchange ended without credentials: send C{reply}."""

    reply: Reply


Step = Challenge | Credentials | Refusal

_CANCELLED = Refusal(Reply(501, "5.7.0", "Error: authentication cancelled"))
_UNDECODABLE = Refusal(Reply(501, "5.5.2", "Error: cannot decode response"))
_MALFORMED_PLAIN = Refusal(Reply(501, "5.5.2", "Error: malformed PLAIN response"))


def start(mechanism: str) -> Exchange | None:
    """An exchange for C{mechanism} (any case), or None when not offered."""
    mechanism = mechanism.upper()
    return Exchange(mechanism) if mechanism in MECHANISMS else None


class Exchange:
    """
    One AUTH exchange, from the C{AUTH} command to its credentials.

    @ivar mechanism: C{"PLAIN"} or C{"LOGIN"}.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self._next: Callable[[str], Step] | None = None

    def begin(self, initial: str) -> Step:
        """
        The C{AUTH} command's initial response (RFC 4954 section 4), C{""}
        when there is none.
        """
        if self.mechanism == "PLAIN":
            if initial:
                return self._plain(initial)
            return self._expect(self._plain, "")
        if initial:
            return self._loginUser(initial)
        return self._expect(self._loginUser, _USERNAME)

    def respond(self, line: str) -> Step:
        """The client's answer to the last L{Challenge}; C{*} cancels."""
        step, self._next = self._next, None
        if line.strip() == "*":
            return _CANCELLED
        assert step is not None
        return step(line)

    def _expect(self, step: Callable[[str], Step], challenge: str) -> Challenge:
        self._next = step
        return Challenge(challenge)

    def _plain(self, text: str) -> Step:
        decoded = _decode(text)
        if decoded is None:
            return _UNDECODABLE
        parts = decoded.split("\x00")
        if len(parts) != 3:
            return _MALFORMED_PLAIN
        authzid, user, password = parts
        if authzid and authzid != user:
            return Credentials(user, password, "authorization identity differs")
        return Credentials(user, password)

    def _loginUser(self, text: str) -> Step:
        user = _decode(text)
        if user is None:
            return _UNDECODABLE
        return self._expect(lambda t: self._loginPassword(user, t), _PASSWORD)

    def _loginPassword(self, user: str, text: str) -> Step:
        password = _decode(text)
        if password is None:
            return _UNDECODABLE
        return Credentials(user, password)


def _decode(text: str) -> str | None:
    """A base64 response (C{=} is the empty one), or None when undecodable."""
    if text == "=":
        return ""
    try:
        return base64.b64decode(text.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
