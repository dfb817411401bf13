"""
C{mynetworks}: clients connecting from trusted networks may relay.

The Postfix C{permit_mynetworks} restriction: at RCPT, a client whose
address is in one of the configured networks gets its recipient accepted;
anyone else gets no opinion from this policy.

Options (C{[policies.mynetworks]}):
  - C{networks}: list of CIDR networks; default loopback only.
"""

from __future__ import annotations

import ipaddress
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

DEFAULT_NETWORKS = ("127.0.0.0/8", "::1/128")


@implementer(IRecipientPolicy)
class MyNetworks:
    name = "mynetworks"

    def __init__(self, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> None:
        self.networks = networks

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> MyNetworks:
        values = options.pop("networks", list(DEFAULT_NETWORKS))
        if options:
            raise PolicyOptionError(min(options), "unknown option (known: networks)")
        if not isinstance(values, list):
            raise PolicyOptionError("networks", 'must be a list like ["10.0.0.0/8"]')
        networks = []
        for value in values:
            try:
                networks.append(ipaddress.ip_network(value, strict=False))
            except (ValueError, TypeError):
                raise PolicyOptionError("networks", f"not a network: {value!r}") from None
        return cls(tuple(networks))

    def trusts(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)

    def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Verdict:
        if self.trusts(session.clientAddress):
            return _TRUSTED
        return CONTINUE


_TRUSTED = accept(250, "2.1.5", "Ok")
"""The answer for a trusted client, made once (verdicts are immutable)."""
