"""
The answer a policy gives: L{Verdict} and its constructors.

A verdict is a value: an action, and for the actions that end a phase, the
SMTP reply code, the RFC 3463 enhanced status code and the text, which make
its L{Reply} (L{Verdict.reply}, the value the server, the client and
delivery share: L{relayd.reply}).  Invalid
combinations fail at construction, so a policy bug shows up in its own test
and never as a malformed reply on the wire.

Policies normally use the constructors::

    from relayd.verdict import CONTINUE, accept, reject, tempfail

    CONTINUE                                   # no opinion: ask the next policy
    accept(250, "2.1.5", "Ok")                 # vouch for a recipient
    reject(550, "5.7.1", "Sender not allowed") # permanent refusal
    tempfail(450, "4.7.1", "Try again later")  # temporary refusal
    reject(554, "5.7.1", "Go away", disconnect=True)

Enhanced status codes (RFC 3463, registry in RFC 5248) often used by
policies: C{5.7.1} / C{4.7.1} delivery not authorized (policy), C{5.1.1}
bad destination mailbox, C{5.1.8} bad sender's domain, C{4.7.0} / C{5.7.0}
security or policy status, C{4.3.0} / C{5.3.0} other mail system problem,
C{5.3.4} message too big, C{4.4.5} system congestion, C{5.6.0} other media
error.  The first digit of the enhanced code must be that of the reply
code; replies must be 2xx for ACCEPT, 5xx for REJECT, 4xx for TEMPFAIL
(RFC 5321 section 4.2.1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from relayd.reply import Reply, checkReply

__all__ = ["Action", "Verdict", "CONTINUE", "accept", "reject", "tempfail"]


class Action(enum.Enum):
    """What a policy wants done with the phase it was asked about."""

    CONTINUE = "continue"
    """No opinion: ask the next policy in the chain."""
    ACCEPT = "accept"
    """Accept now; later policies in this phase are not asked."""
    REJECT = "reject"
    """Permanent refusal (5xx)."""
    TEMPFAIL = "tempfail"
    """Temporary refusal (4xx)."""


_CLASS = {Action.ACCEPT: "2", Action.REJECT: "5", Action.TEMPFAIL: "4"}


@dataclass(frozen=True)
class Verdict:
    """
    A policy's answer.

    @ivar action: the L{Action}.
    @ivar code: the three-digit SMTP reply code (None for CONTINUE).
    @ivar enhanced: the RFC 3463 enhanced status code, e.g. C{"5.7.1"}; its
        class digit must match the first digit of C{code}.
    @ivar text: the human-readable text, without the numbers: one line
        (CR and LF are refused), printable ASCII (it goes on the wire as
        is).
    @ivar disconnect: close the connection after sending the reply (for
        REJECT and TEMPFAIL; a refusal of the connection itself always
        closes it).

    @raise TypeError: when C{action} is not an L{Action}.
    @raise ValueError: for a code given with CONTINUE, a reply code that
        does not match the action, an enhanced code that is malformed or
        does not match the reply code, or a multi-line text.
    """

    action: Action
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    disconnect: bool = False

    _reply: Reply | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise TypeError(f"action must be an Action, not {self.action!r}")
        if self.action is Action.CONTINUE:
            if self.code is not None or self.enhanced is not None:
                raise ValueError("CONTINUE carries no reply code")
            return
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            raise ValueError(f"reply code must be 2xx-5xx, not {self.code!r}")
        want = _CLASS[self.action]
        if str(self.code)[0] != want:
            raise ValueError(f"{self.action.value} needs a {want}xx code, not {self.code}")
        if self.enhanced is None:
            # A policy's reply always carries one (RFC 2034): it is never
            # the greeting, an EHLO reply or a 3xx.
            raise ValueError(f"bad enhanced status code {self.enhanced!r}")
        checkReply(self.code, self.enhanced, "")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("verdict text must be a single line")
        object.__setattr__(self, "_reply", Reply(self.code, self.enhanced, self.text))

    @property
    def reply(self) -> Reply:
        """
        The L{Reply} this verdict asks for (code, enhanced code, text).

        @raise ValueError: for C{CONTINUE}, which carries none.
        """
        if self._reply is None:
            raise ValueError("CONTINUE carries no reply")
        return self._reply

    @property
    def final(self) -> bool:
        """True when this verdict ends the phase."""
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)
"""No opinion: the chain asks the next policy of the phase."""


def accept(code: int = 250, enhanced: str = "2.0.0", text: str = "Ok") -> Verdict:
    """
    Accept the phase now: later policies of this phase are not asked.

    Only at RCPT is the reply sent as given (use C{250 2.1.5}); in the
    other phases relayd sends its own success reply.
    """
    return Verdict(Action.ACCEPT, code, enhanced, text)


def reject(
    code: int = 550,
    enhanced: str = "5.7.1",
    text: str = "Rejected by policy",
    disconnect: bool = False,
) -> Verdict:
    """
    Refuse permanently (5xx): the client must not retry as is.  The
    defaults give C{550 5.7.1 Rejected by policy}.
    """
    return Verdict(Action.REJECT, code, enhanced, text, disconnect)


def tempfail(
    code: int = 451,
    enhanced: str = "4.3.0",
    text: str = "Temporary failure, try again later",
    disconnect: bool = False,
) -> Verdict:
    """
    Refuse temporarily (4xx): the client should try again later.  The
    defaults give C{451 4.3.0 Temporary failure, try again later}.
    """
    return Verdict(Action.TEMPFAIL, code, enhanced, text, disconnect)
