"""
C{authenticated}: a session that passed SMTP AUTH may relay.

The Postfix C{permit_sasl_authenticated} restriction.  No options.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from relayd.plugin import (
    CONTINUE,
    Address,
    Envelope,
    IRecipientPolicy,
    PolicyContext,
    PolicyOptionError,
    SessionView,
    Verdict,
    accept,
)


@implementer(IRecipientPolicy)
class Authenticated:
    name = "authenticated"

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> Authenticated:
        if options:
            raise PolicyOptionError(min(options), "unknown option (this policy has none)")
        return cls()

    def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Verdict:
        if session.user is not None:
            return accept(250, "2.1.5", "Ok")
        return CONTINUE
