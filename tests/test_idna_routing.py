"""
Routing of internationalized domains (RFC 6531 with IDNA 2008): a domain
with U-labels is looked up in DNS, and matched against routes, by its
A-label form, over the test DNS server (L{relayd._testdns.DNSServer}).
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from relayd.routing import Destination, Hop, NextHopConfig, Route
from tests.test_routing import DNSTestCase


class IDNARoutingTests(DNSTestCase):
    @inlineCallbacks
    def test_mxLookedUpByALabel(self):
        """
        The MX question for C{bücher.example} is asked for
        C{xn--bcher-kva.example}, and the destination key is the A-label,
        so both spellings share connections and limits.
        """
        self.dnsServer.setMX("xn--bcher-kva.example", [(10, "mx.xn--bcher-kva.example")])
        self.dnsServer.setA("mx.xn--bcher-kva.example", ["127.0.0.7"])
        router = self.router()
        expected = Destination(
            "mx:xn--bcher-kva.example",
            (Hop("mx.xn--bcher-kva.example", "127.0.0.7", 2525, "opportunistic"),),
        )
        destination = yield router.route("Bücher.example")
        self.assertEqual(destination, expected)
        self.assertIn(("xn--bcher-kva.example", "MX"), self.dnsServer.queries)
        self.assertFalse(any("ü" in name for name, _ in self.dnsServer.queries))
        again = yield router.route("xn--bcher-kva.example")
        self.assertEqual(again, expected)

    @inlineCallbacks
    def test_idna2008NotIdna2003(self):
        """
        C{faß.example} is C{xn--fa-hia.example} in IDNA 2008; IDNA 2003
        (Python's built-in codec, and dnspython's default for a Unicode
        name) would ask for C{fass.example}, another domain.
        """
        self.dnsServer.setMX("xn--fa-hia.example", [(10, "mx.example.net")])
        self.dnsServer.setMX("fass.example", [(10, "wrong.example.net")])
        self.dnsServer.setA("mx.example.net", ["127.0.0.9"])
        self.dnsServer.setA("wrong.example.net", ["127.0.0.10"])
        destination = yield self.router().route("faß.example")
        self.assertEqual(destination.key, "mx:xn--fa-hia.example")
        self.assertEqual([hop.address for hop in destination.hops], ["127.0.0.9"])

    @inlineCallbacks
    def test_implicitMXByALabel(self):
        """No MX: the A-label name itself is the implicit MX (RFC 5321 section 5.1)."""
        self.dnsServer.setA("xn--mnchen-3ya.example", ["127.0.0.8"])
        destination = yield self.router().route("münchen.example")
        self.assertEqual(
            destination.hops,
            (Hop("xn--mnchen-3ya.example", "127.0.0.8", 2525, "opportunistic"),),
        )

    @inlineCallbacks
    def test_routeMatchesALabels(self):
        """
        A route written with U-labels matches a recipient domain written
        with A-labels, and the other way round, wildcards included.
        """
        routes = [
            Route(("bücher.example",), (NextHopConfig("127.0.0.11", 2526, "none"),)),
            Route(("*.xn--mnchen-3ya.example",), (NextHopConfig("127.0.0.12", 2527, "none"),)),
        ]
        router = self.router(routes)
        destination = yield router.route("xn--bcher-kva.example")
        self.assertEqual(destination.key, "route:0")
        destination = yield router.route("BÜCHER.example")
        self.assertEqual(destination.key, "route:0")
        destination = yield router.route("mail.münchen.example")
        self.assertEqual(destination.key, "route:1")
        self.assertEqual(self.dnsServer.queries, [])

    @inlineCallbacks
    def test_badULabel(self):
        """A name IDNA 2008 refuses is a permanent 5.1.2, never a DNS question."""
        d = self.router().route("-bücher.example")
        yield self.assertRoutingError(d, True, "5.1.2")
        self.assertEqual(self.dnsServer.queries, [])
