"""
C{authenticated}: a session that passed SMTP AUTH may relay.

The Postfix C{permit_sasl_authenticated} restriction.  No options.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from relayd.interfaces import IRecipientPolicy
from relayd.policy import PolicyOptionError
from relayd.verdict import CONTINUE, Verdict, accept


@implementer(IRecipientPolicy)
class Authenticated:
    name = "authenticated"

    @classmethod
    def fromConfig(cls, options: dict[str, Any]) -> Authenticated:
        if options:
            raise PolicyOptionError(sorted(options)[0], "unknown option (this policy has none)")
        return cls()

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Verdict:
        if session.user is not None:
            return accept(250, "2.1.5", "Ok")
        return CONTINUE
