"""
A next hop's address as delivery reaches and names it, for delivery
attempts (L{relayd.delivery.attempt}), the scheduler's delivery log
(L{relayd.queue.scheduler}) and C{relayctl} (L{relayd.ops.relayctl}) alike:

  - L{hopEndpoint}: the one place that chooses between IPv4 and IPv6
    (C{TCP4ClientEndpoint} for an IPv4 address, C{TCP6ClientEndpoint} for
    an IPv6 one, with or without a C{%zone});
  - L{relayName}: the hop as log lines name it, Postfix's C{relay=}
    form C{host[address]:port}.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

from relayd.delivery.routing import Hop

__all__ = ["hopEndpoint", "relayName"]


def relayName(hop: Hop | None) -> str:
    """
    C{host[address]:port}, as Postfix's C{relay=} names a next hop (its
    name, the address connected to, the port); C{none} when no hop was
    reached.
    """
    if hop is None:
        return "none"
    return f"{hop.host}[{hop.address}]:{hop.port}"


def hopEndpoint(
    reactor: Any, address: str, port: int, timeout: float
) -> TCP4ClientEndpoint | TCP6ClientEndpoint:
    """
    A client endpoint connecting to C{address} (an IP address as routing
    resolved it, L{relayd.delivery.routing.Hop.address}) at C{port}.

    @param reactor: provides C{IReactorTCP}.
    @param timeout: seconds to wait for the connection.
    """
    try:
        isV6 = ipaddress.ip_address(address.split("%", 1)[0]).version == 6
    except ValueError:
        isV6 = False  # not an address: TCP4ClientEndpoint resolves a name
    if isV6:
        return TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
