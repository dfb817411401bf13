"""
Per-connection and per-transaction state handed to policies.

L{Session} lives as long as the SMTP connection; L{Envelope} as long as one
mail transaction (MAIL to end of DATA, or RSET).  Both carry a C{notes} dict
where policies may keep what they learn for later phases (Haraka's
C{connection.notes} and C{transaction.notes}).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from relayd.address import Address

__all__ = ["Session", "Envelope", "Message"]


@dataclass
class Session:
    """
    One SMTP connection.

    @ivar clientAddress: the peer's IP address.
    @ivar clientPort: the peer's TCP port.
    @ivar listener: the name of the listener that accepted the connection.
    @ivar mode: the listener mode: C{"relay"}, C{"submission"} or
        C{"submissions"}.
    @ivar helo: the name given with EHLO/HELO, or None.
    @ivar esmtp: True after EHLO, False after HELO.
    @ivar tls: True once the connection is encrypted.
    @ivar tlsVersion: e.g. C{"TLSv1.3"} when encrypted.
    @ivar tlsCipher: the cipher name when encrypted.
    @ivar user: the authenticated user name, or None.
    @ivar sessionId: a short id for log lines about this connection.
    @ivar notes: free-form storage for policies.
    """

    clientAddress: ipaddress.IPv4Address | ipaddress.IPv6Address
    clientPort: int
    listener: str
    mode: str
    sessionId: str
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tlsVersion: str | None = None
    tlsCipher: str | None = None
    user: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Envelope:
    """
    One mail transaction.

    @ivar sender: the reverse-path; C{Address.null()} for C{MAIL FROM:<>}.
    @ivar recipients: accepted forward-paths, in RCPT order.
    @ivar declaredSize: the SIZE= parameter, or None.
    @ivar body: C{"7BIT"} or C{"8BITMIME"} (the BODY= parameter).
    @ivar queueId: assigned when DATA starts.
    @ivar notes: free-form storage for policies.
    """

    sender: Address
    recipients: list[Address] = field(default_factory=list)
    declaredSize: int | None = None
    body: str = "7BIT"
    queueId: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    """
    The message as received, handed to message policies at end of DATA.

    @ivar path: the file holding the message bytes (CRLF line ends, dot
        unstuffed, with relayd's C{Received:} header first).  Read it; do
        not write it.
    @ivar size: its size in octets.
    """

    path: str
    size: int

    def headerBytes(self, limit: int = 1 << 20) -> bytes:
        """
        Return the header section (up to and including the empty line), read
        from the file.  Blocking file I/O: call from a thread for big inputs.
        """
        with open(self.path, "rb") as f:
            data = f.read(limit)
        end = data.find(b"\r\n\r\n")
        return data if end < 0 else data[: end + 4]
