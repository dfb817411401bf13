"""
The answer a policy gives: L{Verdict} and its constructors.

A verdict is a value: an action, and for the actions that end a phase, the
SMTP reply code, the RFC 3463 enhanced status code and the text, which make
its L{Reply} (L{Verdict.reply}, the value the server, the client and
delivery share: L{relayd.reply}).  Invalid
combinations fail at construction, so a policy bug shows up in its own test
and never as a malformed reply on the wire.

Policies normally use the constructors (from L{relayd.plugin})::

    from relayd.plugin import CONTINUE, accept, reject, tempfail

    CONTINUE                                   # no opinion: ask the next policy
    accept()                                   # vouch (at RCPT: 250 2.1.5 Ok)
    reject()                                   # the phase's refusal, e.g. 550 5.7.1
    reject(text="Sender not allowed")          # the phase's code, your text
    tempfail(450, "4.7.1", "Try again later")  # temporary refusal, all given
    reject(554, "5.7.1", "Go away", disconnect=True)

What is not given takes the phase's default (L{PHASE_DEFAULTS}): the chain
fills it in with L{Verdict.forPhase} once it knows which phase answered, so
C{reject()} means C{554 5.7.1} at the connection (RFC 5321 section 3.1) and
C{550 5.7.1} at MAIL or RCPT.  A verdict made outside a chain (in a unit
test) carries the generic values of its constructor.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from relayd.reply import Reply, checkReply

__all__ = [
    "Action",
    "Verdict",
    "CONTINUE",
    "accept",
    "reject",
    "tempfail",
    "Phase",
    "PHASES",
    "PHASE_DEFAULTS",
]

Phase = Literal["connect", "helo", "mail", "rcpt", "data"]
"""The SMTP phases a policy is asked about (also the C{phase} label of the
policy metrics)."""

PHASES: tuple[Phase, ...] = ("connect", "helo", "mail", "rcpt", "data")


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


_PARTS = frozenset({"code", "enhanced", "text"})
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
    defaulted: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    """
    Which of C{code}, C{enhanced} and C{text} the policy left out (the
    constructors record it): L{forPhase} replaces those with the phase's.
    """

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            raise TypeError(f"action must be an Action, not {self.action!r}")
        if not self.defaulted <= _PARTS:
            raise ValueError(f"defaulted must name parts of {sorted(_PARTS)}")
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

    def forPhase(self, phase: Phase) -> Verdict:
        """
        This verdict with what the policy left out (L{defaulted}) taken
        from the defaults of C{phase} (L{PHASE_DEFAULTS}); itself when
        nothing was left out.  The chain calls it on every final answer.
        """
        if not self.defaulted or self.action is Action.CONTINUE:
            return self
        code, enhanced, text = PHASE_DEFAULTS[phase][self.action]
        reply = self.reply
        if "code" not in self.defaulted:
            code = reply.code
            if "enhanced" in self.defaulted and enhanced[0] != str(code)[0]:
                enhanced = f"{str(code)[0]}{enhanced[1:]}"
        if "enhanced" not in self.defaulted:
            enhanced = reply.enhanced or enhanced  # never None in a final verdict
        if "text" not in self.defaulted:
            text = self.text
        return replace(self, code=code, enhanced=enhanced, text=text, defaulted=frozenset())


CONTINUE = Verdict(Action.CONTINUE)
"""No opinion: the chain asks the next policy of the phase."""


_PHASE_DEFAULTS: dict[Phase, dict[Action, tuple[int, str, str]]] = {
    "connect": {
        Action.ACCEPT: (250, "2.0.0", "Ok"),
        Action.REJECT: (554, "5.7.1", "Access denied"),
        Action.TEMPFAIL: (421, "4.7.0", "Service not available, try again later"),
    },
    "helo": {
        Action.ACCEPT: (250, "2.0.0", "Ok"),
        Action.REJECT: (550, "5.7.1", "Rejected by policy"),
        Action.TEMPFAIL: (451, "4.7.1", "Deferred by policy, try again later"),
    },
    "mail": {
        Action.ACCEPT: (250, "2.1.0", "Ok"),
        Action.REJECT: (550, "5.7.1", "Sender rejected by policy"),
        Action.TEMPFAIL: (451, "4.7.1", "Sender deferred by policy, try again later"),
    },
    "rcpt": {
        Action.ACCEPT: (250, "2.1.5", "Ok"),
        Action.REJECT: (550, "5.7.1", "Recipient rejected by policy"),
        Action.TEMPFAIL: (451, "4.7.1", "Recipient deferred by policy, try again later"),
    },
    "data": {
        Action.ACCEPT: (250, "2.0.0", "Ok"),
        Action.REJECT: (550, "5.7.1", "Message rejected by policy"),
        Action.TEMPFAIL: (451, "4.7.1", "Message deferred by policy, try again later"),
    },
}
PHASE_DEFAULTS: Mapping[Phase, Mapping[Action, tuple[int, str, str]]] = MappingProxyType(
    {phase: MappingProxyType(answers) for phase, answers in _PHASE_DEFAULTS.items()}
)
"""
What C{accept()}, C{reject()} and C{tempfail()} mean in each phase when the
policy gives no code, enhanced code or text.

  - A refusal of the connection is C{554} (RFC 5321 section 3.1: "No SMTP
    service here") and a temporary one C{421} (section 3.8: the server
    closes the channel), with C{5.7.1} and C{4.7.0}.
  - HELO, MAIL, RCPT and the end of DATA: C{550} is the reply RFC 5321
    section 4.3.2 lists for each of them for a refusal by policy, and
    C{5.7.1} (RFC 3463: delivery not authorized, message refused) says it
    is a policy decision.  The temporary form is C{451 4.7.1}: section
    4.3.2 lists C{451} after MAIL, RCPT and DATA alike (C{450}, which
    Postfix's C{defer_if_permit} uses, is not listed for MAIL), with the
    temporary form of the same enhanced code.  C{4.3.0} is kept
    for relayd's own failures (a policy that raised or timed out), so a
    log reader can tell "a policy said later" from "a policy broke".
  - An C{accept} at RCPT is sent as is, C{250 2.1.5} (RFC 3463: destination
    address valid); in the other phases relayd sends its own success reply.
"""

_GENERIC = {
    Action.ACCEPT: (250, "2.0.0", "Ok"),
    Action.REJECT: (550, "5.7.1", "Rejected by policy"),
    Action.TEMPFAIL: (451, "4.7.1", "Deferred by policy, try again later"),
}
"""The values of a verdict made outside a chain, where no phase is known."""


def _make(
    action: Action,
    code: int | None,
    enhanced: str | None,
    text: str | None,
    disconnect: bool = False,
) -> Verdict:
    defaulted = frozenset(
        name
        for name, value in (("code", code), ("enhanced", enhanced), ("text", text))
        if value is None
    )
    genericCode, genericEnhanced, genericText = _GENERIC[action]
    if code is None:
        code = genericCode
    if enhanced is None:
        enhanced = genericEnhanced
        if str(code)[0] != enhanced[0]:
            enhanced = f"{str(code)[0]}{enhanced[1:]}"
    return Verdict(
        action,
        code,
        enhanced,
        genericText if text is None else text,
        disconnect,
        defaulted=defaulted,
    )


def accept(
    code: int | None = None, enhanced: str | None = None, text: str | None = None
) -> Verdict:
    """
    Accept the phase now: later policies of this phase are not asked.

    Only at RCPT is the reply sent (by default C{250 2.1.5 Ok}); in the
    other phases relayd sends its own success reply.
    """
    return _make(Action.ACCEPT, code, enhanced, text)


def reject(
    code: int | None = None,
    enhanced: str | None = None,
    text: str | None = None,
    disconnect: bool = False,
) -> Verdict:
    """
    Refuse permanently (5xx): the client must not retry as is.  What is
    not given is the phase's (L{PHASE_DEFAULTS}): C{554 5.7.1} at the
    connection, C{550 5.7.1} at HELO, MAIL, RCPT and DATA.
    """
    return _make(Action.REJECT, code, enhanced, text, disconnect)


def tempfail(
    code: int | None = None,
    enhanced: str | None = None,
    text: str | None = None,
    disconnect: bool = False,
) -> Verdict:
    """
    Refuse temporarily (4xx): the client should try again later.  What is
    not given is the phase's (L{PHASE_DEFAULTS}): C{421 4.7.0} at the
    connection, C{451 4.7.1} elsewhere.
    """
    return _make(Action.TEMPFAIL, code, enhanced, text, disconnect)
