"""
L{Reply}: an SMTP reply as one value, for every room that speaks or records
one.

A reply is a three-digit code (RFC 5321 section 4.2), an RFC 3463 enhanced
status code (RFC 2034) and a text.  The same value serves the server (what
it sends), a policy's L{relayd.verdict.Verdict} (what it asks the server to
send), the client (what a next hop said, L{relayd.delivery.client.Reply}), delivery
(each recipient's outcome) and the log lines about them, so the rules are
checked in one place:

  - the code is 2xx to 5xx;
  - the enhanced code is C{class.subject.detail} with a class of 2, 4 or
    5, and its class is the first digit of the code;
  - the enhanced code is left out (None) only where RFC 2034 section 3
    leaves it out: the greeting (220), the EHLO/HELO reply (250) and the
    3xx intermediate replies;
  - the text is one line.

Invalid values fail at construction, so a bad reply shows up in the code
that made it, never as a malformed line on the wire.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Reply"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_WITHOUT_ENHANCED = (220, 250)
"""Codes of the replies RFC 2034 sends without an enhanced code (besides 3xx)."""


@dataclass(frozen=True)
class Reply:
    """
    One SMTP reply line's worth: code, enhanced code, text.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the RFC 3463 enhanced status code, e.g. C{"5.7.1"}, or
        None for the greeting, the EHLO/HELO reply and 3xx replies.
    @ivar text: the text after the codes; printable, one line.

    @raise ValueError: when one of the rules in the module docstring is
        broken.
    """

    code: int
    enhanced: str | None
    text: str

    def __post_init__(self) -> None:
        checkReply(self.code, self.enhanced, self.text)

    def __str__(self) -> str:
        """The reply as it goes on the wire, without the CRLF."""
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"


def checkReply(code: int | None, enhanced: str | None, text: str) -> None:
    """
    Check the parts of a L{Reply} (the module docstring's rules).

    @raise ValueError: naming the first problem found.
    """
    if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
        raise ValueError(f"reply code must be 2xx-5xx, not {code!r}")
    if enhanced is None:
        if code not in _WITHOUT_ENHANCED and not 300 <= code <= 399:
            raise ValueError(f"a {code} reply needs an enhanced status code (RFC 2034)")
    else:
        m = _ENHANCED.match(enhanced) if isinstance(enhanced, str) else None
        if not m:
            raise ValueError(f"bad enhanced status code {enhanced!r}")
        if m.group(1) != str(code)[0]:
            raise ValueError(f"enhanced code {enhanced} does not match reply {code}")
    if "\r" in text or "\n" in text:
        raise ValueError("reply text must be a single line")
