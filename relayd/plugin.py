"""
Everything a policy author imports, in one place, and nothing else (DESIGN
section 3; C{docs/plugins.md} is the guide).

A policy is a class with the one constructor C{fromConfig(options,
context)} (L{PolicyContext}), declared with C{@implementer(...)} to
provide the phases it takes part in:

  - checks, which answer a L{Verdict} (L{PolicyAnswer}):
    L{IConnectionPolicy}, L{IHeloPolicy}, L{ISenderPolicy},
    L{IRecipientPolicy}, L{IMessagePolicy};
  - the modifier phase, L{IMessageModifier}, which changes the message
    once the checks have let it through (L{Modification});
  - optional hooks: L{ITransactionObserver}, L{IPolicyLifecycle},
    L{IReloadable}.

It reads a L{SessionView} (built as a L{Session} in unit tests), an
L{Envelope}, an L{Address} and a L{Message} with its L{Headers}, and
answers with L{CONTINUE}, L{accept}, L{reject} or L{tempfail}, whose left
out parts take the phase's defaults (L{PHASE_DEFAULTS}).  It refuses a bad
option with L{PolicyOptionError}.

Every name here is part of the contract, pinned by
C{tests/test_plugin_api.py}: a name is only ever added to this module.
relayd's other modules (C{relayd.interfaces}, C{relayd.verdict},
C{relayd.envelope}, ...) are where these live today; they may move, this
module's names do not.  For tests, see L{relayd.testing}.
"""

from __future__ import annotations

from relayd.address import Address, asciiDomain, normalDomain, normalLocal
from relayd.envelope import Envelope, HeaderField, Headers, HeaderSectionTooLarge, Message, Session
from relayd.interfaces import (
    IConnectionPolicy,
    IHeloPolicy,
    IMessageModifier,
    IMessagePolicy,
    IPolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ISenderPolicy,
    ITransactionObserver,
    Modification,
    PolicyAnswer,
    SessionView,
)
from relayd.policy import PolicyContext, PolicyOptionError
from relayd.verdict import (
    CONTINUE,
    PHASE_DEFAULTS,
    Action,
    Phase,
    Verdict,
    accept,
    reject,
    tempfail,
)

__all__ = [
    # the phases and hooks
    "IPolicy",
    "IConnectionPolicy",
    "IHeloPolicy",
    "ISenderPolicy",
    "IRecipientPolicy",
    "IMessagePolicy",
    "IMessageModifier",
    "ITransactionObserver",
    "IPolicyLifecycle",
    "IReloadable",
    # answers
    "Verdict",
    "Action",
    "CONTINUE",
    "accept",
    "reject",
    "tempfail",
    "Phase",
    "PHASE_DEFAULTS",
    "PolicyAnswer",
    "Modification",
    # what a policy reads
    "SessionView",
    "Session",
    "Envelope",
    "Message",
    "Headers",
    "HeaderField",
    "HeaderSectionTooLarge",
    "Address",
    # the address normal form policies compare in
    "normalDomain",
    "normalLocal",
    "asciiDomain",
    # building
    "PolicyContext",
    "PolicyOptionError",
]
