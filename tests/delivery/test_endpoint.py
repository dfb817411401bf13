"""
L{relayd.delivery.endpoint.hopEndpoint}: the one choice between IPv4 and
IPv6 for a next hop's address, tried on real sockets.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from relayd.delivery.endpoint import hopEndpoint, relayName
from relayd.delivery.routing import Hop


def _hasIPv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class HopEndpointTests(TestCase):
    """The endpoint matches the address family, and connects."""

    def test_kinds(self):
        """IPv4 addresses get a TCP4 endpoint, IPv6 ones (zone or not) a TCP6 one."""
        self.assertIsInstance(hopEndpoint(reactor, "192.0.2.1", 25, 5), TCP4ClientEndpoint)
        self.assertIsInstance(hopEndpoint(reactor, "2001:db8::1", 25, 5), TCP6ClientEndpoint)
        self.assertIsInstance(hopEndpoint(reactor, "fe80::1%eth0", 25, 5), TCP6ClientEndpoint)

    def test_relayName(self):
        """A hop is named as Postfix's relay= does; no hop is C{none}."""
        hop = Hop("mx.example.test", "2001:db8::25", 25, "opportunistic")
        self.assertEqual(relayName(hop), "mx.example.test[2001:db8::25]:25")
        self.assertEqual(relayName(None), "none")

    @inlineCallbacks
    def connectTo(self, serverEndpoint, address):
        port = yield serverEndpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        client = Protocol()
        yield connectProtocol(hopEndpoint(reactor, address, port.getHost().port, 5), client)
        peer = client.transport.getPeer()
        client.transport.loseConnection()
        return peer

    @inlineCallbacks
    def test_connectIPv4(self):
        """A real connection to an IPv4 address."""
        peer = yield self.connectTo(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), "127.0.0.1"
        )
        self.assertEqual(peer.host, "127.0.0.1")

    @inlineCallbacks
    def test_connectIPv6(self):
        """A real connection to an IPv6 address."""
        if not _hasIPv6Loopback():
            raise SkipTest("no IPv6 loopback on this machine")
        peer = yield self.connectTo(TCP6ServerEndpoint(reactor, 0, interface="::1"), "::1")
        self.assertEqual(peer.host, "::1")
