"""
The PROXY protocol, versions 1 and 2 (HAProxy's "proxy-protocol.txt"), read
by relayd itself in front of a listener.

A TCP load balancer (HAProxy with C{send-proxy}/C{send-proxy-v2}, an AWS
NLB, a Kubernetes ingress) connects to relayd on the client's behalf and
first sends one header that says who the client really is.  Everything that
depends on the client address (the relay decision of C{mynetworks}, access
lists, rate limits, per-client connection limits, C{Received:}, logs) must
use that address, never the proxy's.

Why not Twisted's C{haproxy:} endpoint: its wrapper connects the wrapped
protocol before the header has been parsed (Twisted issue 12501), so
C{connectionMade} sees the proxy's address and relayd would greet before
the header arrived; and C{haproxy:ssl:} expects the header inside TLS
(Twisted issue 9041), while HAProxy sends it before the handshake.  Here:

  - Only peers in the listener's C{proxy_from} networks may send a header;
    a connection from anywhere else is closed at once, without a greeting.
  - Nothing is sent and no SMTP (or TLS) protocol exists until the whole
    header has arrived, within C{timeouts.proxy_header} seconds and a size
    bound: v1 at most 107 octets (the specification's own limit, CRLF
    included), v2 at most 16 + L{V2_MAX_LENGTH}.
  - Malformed, truncated, oversized or unsupported headers (UDP, UNIX
    sockets, an unknown version or command) close the connection with a
    log line.
  - A v2 C{LOCAL} command (the proxy's own health check) and a v1
    C{UNKNOWN} are served as connections from the proxy itself, and logged
    as such.
  - The header is read before TLS on an implicit-TLS listener: the
    wrapping order is TCP, this wrapper, TLS, SMTP.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from relayd.ops.logs import Logger

__all__ = [
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyFactory",
    "parseHeader",
    "V1_MAX",
    "V2_MAX_LENGTH",
]

log = Logger(namespace="relayd.smtp.proxy")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = IPv4Address | IPv6Address

V1_PREFIX = b"PROXY "
V1_MAX = 107
"""The longest v1 header, CRLF included (proxy-protocol.txt section 2.1)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 2048
"""
The largest v2 address block (addresses plus TLVs) relayd reads.  Addresses
take at most 216 octets (UNIX); HAProxy's TLVs (unique id, SSL details)
stay far below this.
"""


class ProxyHeaderError(ValueError):
    """The PROXY header is malformed, truncated, too long or unsupported."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A parsed header.

    @ivar source: the real client, or None for a v2 C{LOCAL} command or a
        v1 C{UNKNOWN} (a connection made by the proxy itself).
    @ivar destination: the address the client connected to, or None.
    @ivar version: 1 or 2.
    """

    source: Address | None
    destination: Address | None
    version: int


def _v1Address(family: str, host: str, port: str) -> Address:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyHeaderError(f"bad address {host[:45]!r}") from None
    if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[0] == "0"):
        raise ProxyHeaderError(f"bad port {port[:8]!r}")
    number = int(port)
    if number > 65535:
        raise ProxyHeaderError(f"bad port {port[:8]!r}")
    if family == "TCP4" and address.version == 4:
        return IPv4Address("TCP", str(address), number)
    if family == "TCP6" and address.version == 6:
        return IPv6Address("TCP", str(address), number)
    raise ProxyHeaderError(f"address {host[:45]!r} is not {family}")


def _parseV1(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX or b"\n" in buffer[:V1_MAX]:
            raise ProxyHeaderError("v1 header without CRLF within 107 octets")
        return None
    try:
        line = buffer[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(None, None, 1), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"bad v1 header {line[:107]!r}")
    family = parts[1]
    source = _v1Address(family, parts[2], parts[4])
    destination = _v1Address(family, parts[3], parts[5])
    return ProxyHeader(source, destination, 1), end + 2


def _parseV2(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buffer) < 16:
        return None
    versionCommand, familyTransport, length = struct.unpack("!BBH", buffer[12:16])
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"unknown v2 version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"unknown v2 command {command}")
    if length > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2 address block of {length} octets is over {V2_MAX_LENGTH}")
    if len(buffer) < 16 + length:
        return None
    block = buffer[16 : 16 + length]
    if command == 0:  # LOCAL: the proxy's own connection; addresses ignored
        return ProxyHeader(None, None, 2), 16 + length
    family, transport = familyTransport >> 4, familyTransport & 0x0F
    if transport != 1:
        raise ProxyHeaderError(f"v2 transport {transport} is not TCP (STREAM)")
    if family == 1:
        if length < 12:
            raise ProxyHeaderError("v2 TCP4 address block too short")
        src, dst, sport, dport = struct.unpack("!4s4sHH", block[:12])
        return (
            ProxyHeader(
                IPv4Address("TCP", str(ipaddress.IPv4Address(src)), sport),
                IPv4Address("TCP", str(ipaddress.IPv4Address(dst)), dport),
                2,
            ),
            16 + length,
        )
    if family == 2:
        if length < 36:
            raise ProxyHeaderError("v2 TCP6 address block too short")
        src, dst, sport, dport = struct.unpack("!16s16sHH", block[:36])
        return (
            ProxyHeader(
                IPv6Address("TCP", str(ipaddress.IPv6Address(src)), sport),
                IPv6Address("TCP", str(ipaddress.IPv6Address(dst)), dport),
                2,
            ),
            16 + length,
        )
    raise ProxyHeaderError(f"v2 address family {family} is not IPv4 or IPv6")


def parseHeader(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    """
    Parse a PROXY header at the start of C{buffer}.

    @return: the header and the number of octets it took, or None while
        C{buffer} is a valid but incomplete start of one.
    @raise ProxyHeaderError: C{buffer} cannot start a valid header.
    """
    if buffer.startswith(V2_SIGNATURE):
        return _parseV2(buffer)
    if buffer.startswith(V1_PREFIX):
        return _parseV1(buffer)
    if V2_SIGNATURE.startswith(buffer) or V1_PREFIX.startswith(buffer):
        return None
    raise ProxyHeaderError("no PROXY header")


def _host(address: Any) -> str:
    return str(getattr(address, "host", address))


class ProxyHeaderProtocol(Protocol):
    """
    Reads the header, then builds the wrapped protocol and connects it with
    this object as its transport: every transport call goes to the real
    one, except C{getPeer} and C{getHost}, which answer from the header.
    See the module docstring.

    @ivar proxyPeer: the proxy's own address (the TCP peer).
    """

    transport: Any

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.wrappedProtocol: IProtocol | None = None
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._timer: Any = None
        self._refused = False
        self.disconnecting = False
        self.proxyPeer: Any = None

    def logPrefix(self) -> str:
        return "ProxyHeader"

    def makeConnection(self, transport: Any) -> None:
        # Unlike twisted.protocols.policies.ProtocolWrapper, the wrapped
        # protocol is connected only once the header is read (Twisted issue
        # 12501), so it never sees the proxy's address.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.proxyPeer = peer
        if not self.factory.allowed(_host(peer)):
            self._refuse(f"peer [{_host(peer)}] is not in proxy_from")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timedOut)

    def _refuse(self, why: str) -> None:
        self._refused = True
        self._cancelTimer()
        log.warn(
            "proxy: closing connection from [{peer}] on {listener}: {why}",
            peer=_host(self.proxyPeer),
            listener=self.factory.listener,
            why=why,
        )
        self.factory.refused += 1
        self.transport.abortConnection()

    def _timedOut(self) -> None:
        self._timer = None
        self._refuse(f"no complete PROXY header within {self.factory.timeout:g}s")

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            parsed = parseHeader(self._buffer)
        except ProxyHeaderError as e:
            self._refuse(str(e))
            return
        if parsed is None:
            return
        header, used = parsed
        rest, self._buffer = self._buffer[used:], b""
        self._cancelTimer()
        self._header = header
        if header.source is None:
            log.info(
                "proxy: LOCAL connection (health check) from proxy [{peer}] on {listener}",
                peer=_host(self.proxyPeer),
                listener=self.factory.listener,
            )
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if rest:
            protocol.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    # --- the transport the wrapped protocol sees ---------------------------

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        peer: IAddress = self.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        host: IAddress = self.transport.getHost()
        return host

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def __getattr__(self, name: str) -> Any:
        # pauseProducing, resumeProducing, getHandle, setTcpNoDelay, ...
        return getattr(self.transport, name)


class ProxyFactory(ServerFactory):
    """
    Wraps a listener's factory so that each connection starts with a
    PROXY header from one of C{networks}.

    @ivar refused: connections closed for a missing, bad or unauthorised
        header (for tests and status).
    """

    def __init__(
        self,
        wrappedFactory: Any,
        *,
        networks: Sequence[Network],
        timeout: float,
        clock: Any,
        listener: str,
    ) -> None:
        self.wrappedFactory = wrappedFactory
        self.networks = tuple(networks)
        self.timeout = timeout
        self.clock = clock
        self.listener = listener
        self.refused = 0

    def allowed(self, host: str) -> bool:
        """Whether a peer at C{host} may send a PROXY header."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def startFactory(self) -> None:
        self.wrappedFactory.doStart()

    def stopFactory(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)

    def logPrefix(self) -> str:
        return f"{self.listener} (PROXY)"
