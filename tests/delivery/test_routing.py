"""
Tests for L{relayd.delivery.routing}: MX selection per RFC 5321 section 5.1 and
RFC 7505, configured routes, and the resolver's thread pool and TTL cache,
over real DNS: a L{relayd.testing.dnsserver.DNSServer} on 127.0.0.1 in the test
process answers the L{MXResolver}'s pool threads while the reactor runs.
"""

from __future__ import annotations

import random

import dns.message
import dns.query
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.delivery.routing import (
    NXDOMAIN,
    Destination,
    Hop,
    MXResolver,
    NextHopConfig,
    NoData,
    Route,
    Router,
    RoutingError,
    TemporaryDNSError,
)
from relayd.testing.dnsserver import DNSServer


class DNSTestCase(unittest.TestCase):
    """
    Starts a L{DNSServer} and an L{MXResolver} asking it, whose cache runs
    on C{self.clock}; both are stopped after the test.
    """

    def setUp(self):
        self.dnsServer = DNSServer(ttl=60)
        self.dnsPort = self.dnsServer.start(reactor)
        self.addCleanup(self.dnsServer.stop)
        self.clock = Clock()
        self.resolver = self.startResolver(port=self.dnsPort)

    def startResolver(self, port, timeout=5.0, threads=2):
        """
        Start an L{MXResolver} asking 127.0.0.1:C{port}, stopped (its pool
        joined) after the test, before the DNS server is stopped.
        """
        resolver = MXResolver(
            reactor,
            nameservers=["127.0.0.1"],
            port=port,
            timeout=timeout,
            threads=threads,
            clock=self.clock,
        )
        resolver.start()
        self.addCleanup(resolver.stop)
        return resolver

    def router(self, routes=(), localNames=(), seed=0, resolver=None):
        """A L{Router} on C{self.resolver} with a seeded random."""
        return Router(
            resolver or self.resolver,
            routes=routes,
            port=2525,
            mxTls="opportunistic",
            localNames=localNames,
            random=random.Random(seed),
        )

    @inlineCallbacks
    def assertRoutingError(self, d, permanent, enhanced):
        """
        Wait for C{d} to fail with a L{RoutingError} of that kind; return it.
        """
        error = yield self.assertFailure(d, RoutingError)
        self.assertEqual((error.permanent, error.enhanced), (permanent, enhanced), error.text)
        return error


class MXTests(DNSTestCase):
    """
    L{Router.route} without configured routes: MX delivery.
    """

    @inlineCallbacks
    def test_lowestPreferenceFirst(self):
        """
        MX hosts are tried in order of preference, lowest value first
        (RFC 5321 section 5.1), each address of a host in turn, IPv4 first;
        hops carry the MX port and TLS mode; the key names the domain.
        """
        self.dnsServer.setMX("Example.TEST", [(20, "mx2.example.test"), (10, "MX1.example.test")])
        self.dnsServer.setA("mx1.example.test", ["127.0.0.1"])
        self.dnsServer.setAAAA("mx1.example.test", ["::1"])
        self.dnsServer.setA("mx2.example.test", ["127.0.0.2"])
        destination = yield self.router().route("EXAMPLE.test.")
        self.assertEqual(
            destination,
            Destination(
                "mx:example.test",
                (
                    Hop("mx1.example.test", "127.0.0.1", 2525, "opportunistic"),
                    Hop("mx1.example.test", "::1", 2525, "opportunistic"),
                    Hop("mx2.example.test", "127.0.0.2", 2525, "opportunistic"),
                ),
            ),
        )

    @inlineCallbacks
    def test_equalPreferencesShuffled(self):
        """
        MX hosts of equal preference are shuffled on every call, even when
        the MX answer comes from the cache; a host of higher preference
        value stays after them.
        """
        self.dnsServer.setMX(
            "example.test",
            [(10, "a.example.test"), (10, "b.example.test"), (20, "c.example.test")],
        )
        for host, address in [
            ("a", "127.0.0.1"),
            ("b", "127.0.0.2"),
            ("c", "127.0.0.3"),
        ]:
            self.dnsServer.setA(f"{host}.example.test", [address])
        router = self.router(seed=1234)
        orders = set()
        for _ in range(20):
            destination = yield router.route("example.test")
            orders.add(tuple(hop.host for hop in destination.hops))
        self.assertEqual(
            orders,
            {
                ("a.example.test", "b.example.test", "c.example.test"),
                ("b.example.test", "a.example.test", "c.example.test"),
            },
        )
        self.assertEqual(self.dnsServer.queryCount("example.test", "MX"), 1)

    @inlineCallbacks
    def test_implicitMXOnNoData(self):
        """
        A domain that exists but has no MX records is its own MX with
        preference 0 (RFC 5321 section 5.1): its A and AAAA records are used.
        """
        self.dnsServer.setA("example.test", ["127.0.0.5"])
        self.dnsServer.setAAAA("example.test", ["::1"])
        destination = yield self.router().route("example.test")
        self.assertEqual(
            [(hop.host, hop.address) for hop in destination.hops],
            [("example.test", "127.0.0.5"), ("example.test", "::1")],
        )
        self.assertEqual(destination.key, "mx:example.test")

    @inlineCallbacks
    def test_noImplicitMXWhenMXExists(self):
        """
        When the domain has MX records, its own A records are not a
        fallback, even when every MX host fails to resolve: that is a
        temporary failure.
        """
        self.dnsServer.setMX("example.test", [(10, "mx.example.test")])
        self.dnsServer.setA("example.test", ["127.0.0.9"])
        self.dnsServer.setA("mx.example.test", ["127.0.0.1"])
        destination = yield self.router().route("example.test")
        self.assertEqual([hop.address for hop in destination.hops], ["127.0.0.1"])

        self.dnsServer.setMX("other.test", [(10, "nowhere.other.test")])
        self.dnsServer.setA("other.test", ["127.0.0.9"])
        error = yield self.assertRoutingError(self.router().route("other.test"), False, "4.4.3")
        self.assertIn("nowhere.other.test", error.text)

    @inlineCallbacks
    def test_unresolvableMXSkipped(self):
        """
        An MX host whose address lookup fails (here NXDOMAIN, then SERVFAIL)
        is skipped; the others are kept in order.
        """
        self.dnsServer.setMX(
            "example.test",
            [
                (10, "gone.example.test"),
                (20, "broken.example.test"),
                (30, "mx.example.test"),
            ],
        )
        self.dnsServer.setA("broken.example.test", ["127.0.0.7"])
        self.dnsServer.setServfail("broken.example.test")
        self.dnsServer.setA("mx.example.test", ["127.0.0.1"])
        destination = yield self.router().route("example.test")
        self.assertEqual([hop.host for hop in destination.hops], ["mx.example.test"])

    @inlineCallbacks
    def test_nxdomain(self):
        """
        A domain that does not exist is a permanent failure, 5.1.2.
        """
        error = yield self.assertRoutingError(self.router().route("nowhere.test"), True, "5.1.2")
        self.assertIn("nowhere.test", error.text)

    @inlineCallbacks
    def test_nullMX(self):
        """
        A null MX (RFC 7505: one MX, exchange the root) is a permanent
        failure, 5.1.10, without looking up any address; so is a null MX
        among other MX records.
        """
        self.dnsServer.setNullMX("nomail.test")
        self.dnsServer.setA("nomail.test", ["127.0.0.1"])
        yield self.assertRoutingError(self.router().route("nomail.test"), True, "5.1.10")
        self.dnsServer.setMX("mixed.test", [(0, "."), (10, "mx.mixed.test")])
        self.dnsServer.setA("mx.mixed.test", ["127.0.0.1"])
        yield self.assertRoutingError(self.router().route("mixed.test"), True, "5.1.10")
        self.assertEqual(self.dnsServer.queryCount(type="A"), 0)

    @inlineCallbacks
    def test_servfail(self):
        """
        SERVFAIL for the MX lookup is a temporary failure, 4.4.3, and is not
        cached: once the server answers again, so does routing.
        """
        self.dnsServer.setMX("example.test", [(10, "mx.example.test")])
        self.dnsServer.setA("mx.example.test", ["127.0.0.1"])
        self.dnsServer.setServfail("example.test")
        router = self.router()
        yield self.assertRoutingError(router.route("example.test"), False, "4.4.3")
        self.dnsServer.setServfail("example.test", False)
        destination = yield router.route("example.test")
        self.assertEqual([hop.address for hop in destination.hops], ["127.0.0.1"])

    @inlineCallbacks
    def test_timeout(self):
        """
        A name server that never answers gives a temporary failure, 4.4.3,
        once the resolver's timeout has passed.
        """
        silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        resolver = self.startResolver(port=silent.getHost().port, timeout=0.5)
        error = yield self.assertRoutingError(
            self.router(resolver=resolver).route("example.test"), False, "4.4.3"
        )
        self.assertIn("example.test", error.text)
        yield self.assertFailure(resolver.lookupAddresses("host.test"), TemporaryDNSError)

    @inlineCallbacks
    def test_loopRuleDropsOwnPreferenceAndHigher(self):
        """
        When this host is one of the MX hosts, it and every MX with the same
        or a higher preference value are dropped (RFC 5321 section 5.1).
        """
        self.dnsServer.setMX(
            "example.test",
            [
                (10, "primary.example.test"),
                (20, "relay.example.test"),
                (20, "peer.example.test"),
                (30, "backup.example.test"),
            ],
        )
        for host in ("primary", "relay", "peer", "backup"):
            self.dnsServer.setA(f"{host}.example.test", ["127.0.0.1"])
        router = self.router(localNames=["Relay.Example.Test."])
        destination = yield router.route("example.test")
        self.assertEqual([hop.host for hop in destination.hops], ["primary.example.test"])

    @inlineCallbacks
    def test_loopBackToMyself(self):
        """
        When this host is the most preferred MX, the mail would loop: a
        permanent failure, 5.4.6.  The implicit MX counts too.
        """
        self.dnsServer.setMX(
            "example.test", [(10, "relay.example.test"), (20, "backup.example.test")]
        )
        self.dnsServer.setA("relay.example.test", ["127.0.0.1"])
        self.dnsServer.setA("backup.example.test", ["127.0.0.2"])
        self.dnsServer.setA("relay.test", ["127.0.0.1"])
        router = self.router(localNames=["relay.example.test", "relay.test"])
        yield self.assertRoutingError(router.route("example.test"), True, "5.4.6")
        yield self.assertRoutingError(router.route("relay.test"), True, "5.4.6")

    @inlineCallbacks
    def test_addressLiteral(self):
        """
        An address literal (RFC 5321 section 4.1.3) routes to that address
        without asking DNS; anything else in brackets is a permanent 5.1.2.
        """
        router = self.router()
        destination = yield router.route("[127.0.0.1]")
        self.assertEqual(
            destination,
            Destination(
                "mx:[127.0.0.1]",
                (Hop("127.0.0.1", "127.0.0.1", 2525, "opportunistic"),),
            ),
        )
        destination = yield router.route("[IPv6:0:0::1]")
        self.assertEqual([hop.address for hop in destination.hops], ["::1"])
        yield self.assertRoutingError(router.route("[999.0.0.1]"), True, "5.1.2")
        yield self.assertRoutingError(router.route("[::1]"), True, "5.1.2")
        self.assertEqual(self.dnsServer.queries, [])


class RouteTests(DNSTestCase):
    """
    L{Router.route} with configured routes: matching and next hops.
    """

    def setUp(self):
        DNSTestCase.setUp(self)
        self.dnsServer.setA("smart.test", ["127.0.0.21"])
        self.dnsServer.setAAAA("smart.test", ["::1"])
        self.dnsServer.setMX("example.org", [(10, "mx.example.org")])
        self.dnsServer.setA("mx.example.org", ["127.0.0.31"])
        self.routes = [
            Route(("Exact.Example",), (NextHopConfig("127.0.0.11", 2526, "none"),)),
            Route(
                ("*.example.org",),
                (NextHopConfig("smart.test", 587, "required", "user", "secret"),),
            ),
            Route(
                ("*",),
                (
                    NextHopConfig("gone.test"),
                    NextHopConfig("smart.test", 25, "verify"),
                    NextHopConfig("[127.0.0.12]"),
                ),
            ),
        ]

    @inlineCallbacks
    def test_exact(self):
        """
        An exact domain matches case-insensitively; an IP address hop is
        used as it is, with the hop's port and TLS mode; the key is the
        route's index.
        """
        destination = yield self.router(self.routes).route("exact.EXAMPLE.")
        self.assertEqual(
            destination,
            Destination("route:0", (Hop("127.0.0.11", "127.0.0.11", 2526, "none"),)),
        )
        self.assertEqual(self.dnsServer.queries, [])

    @inlineCallbacks
    def test_wildcardSubdomains(self):
        """
        C{*.example.org} matches every domain below example.org, at any
        depth, and resolves a named hop's addresses, keeping its
        credentials; example.org itself is not matched by it.
        """
        router = self.router(self.routes)
        for domain in ("a.example.org", "b.c.Example.ORG"):
            destination = yield router.route(domain)
            self.assertEqual(
                destination,
                Destination(
                    "route:1",
                    (
                        Hop(
                            "smart.test",
                            "127.0.0.21",
                            587,
                            "required",
                            "user",
                            "secret",
                        ),
                        Hop("smart.test", "::1", 587, "required", "user", "secret"),
                    ),
                ),
            )
        destination = yield router.route("example.org")
        self.assertEqual(destination.key, "route:2")

    @inlineCallbacks
    def test_relayhost(self):
        """
        C{*} matches every other domain, address literals included: the
        relayhost.  Next hops keep their configured order (failover); one
        that does not resolve is skipped, a bracketed address is used as an
        address.  No MX lookup is made.
        """
        router = self.router(self.routes)
        for domain in ("example.com", "nowhere.test", "[192.0.2.1]"):
            destination = yield router.route(domain)
            self.assertEqual(
                destination,
                Destination(
                    "route:2",
                    (
                        Hop("smart.test", "127.0.0.21", 25, "verify"),
                        Hop("smart.test", "::1", 25, "verify"),
                        Hop("127.0.0.12", "127.0.0.12", 25, "opportunistic"),
                    ),
                ),
            )
        self.assertEqual(self.dnsServer.queryCount(type="MX"), 0)

    @inlineCallbacks
    def test_firstMatchingRouteWins(self):
        """
        Routes are tried in order; a domain matched by none goes by MX.
        """
        routes = [
            Route(("a.example.org",), (NextHopConfig("127.0.0.41"),)),
            Route(("*.example.org", "a.example.org"), (NextHopConfig("127.0.0.42"),)),
        ]
        router = self.router(routes)
        destination = yield router.route("a.example.org")
        self.assertEqual(destination.key, "route:0")
        destination = yield router.route("b.example.org")
        self.assertEqual(destination.key, "route:1")
        destination = yield router.route("example.org")
        self.assertEqual(
            destination,
            Destination(
                "mx:example.org",
                (Hop("mx.example.org", "127.0.0.31", 2525, "opportunistic"),),
            ),
        )

    @inlineCallbacks
    def test_addressHopsAreMadeOnce(self):
        """
        A route whose hops are all IP addresses gives its destination at
        once (a fired Deferred, no lookup), the same object every time;
        an empty domain is still refused, and a reload puts new hops in force.
        """

        class NoLookups:
            def lookupAddresses(self, host):
                raise AssertionError(f"looked up {host}")

            lookupMX = lookupAddresses

        routes = [Route(("*",), (NextHopConfig("[127.0.0.51]", 2526), NextHopConfig("::1")))]
        router = self.router(routes, resolver=NoLookups())
        first, second = router.route("a.example"), router.route("B.Example.")
        self.assertTrue(first.called and second.called)
        destination = self.successResultOf(first)
        self.assertIs(self.successResultOf(second), destination)
        self.assertEqual(
            destination,
            Destination(
                "route:0",
                (
                    Hop("127.0.0.51", "127.0.0.51", 2526, "opportunistic"),
                    Hop("::1", "::1", 25, "opportunistic"),
                ),
            ),
        )
        yield self.assertRoutingError(router.route(""), True, "5.1.2")
        router.reconfigure([Route(("*",), (NextHopConfig("127.0.0.52"),))], 2525, "none", ())
        destination = yield router.route("a.example")
        self.assertEqual(destination.hops, (Hop("127.0.0.52", "127.0.0.52", 25, "opportunistic"),))

    @inlineCallbacks
    def test_noHopResolves(self):
        """
        When no next hop of the route has an address, routing fails
        temporarily (4.4.3), naming the hosts: the operator can fix DNS or
        the config while the mail waits.
        """
        self.dnsServer.setA("broken.test", ["127.0.0.1"])
        self.dnsServer.setServfail("broken.test")
        routes = [Route(("*",), (NextHopConfig("gone.test"), NextHopConfig("broken.test")))]
        error = yield self.assertRoutingError(
            self.router(routes).route("example.com"), False, "4.4.3"
        )
        self.assertIn("gone.test", error.text)
        self.assertIn("broken.test", error.text)


class MXResolverTests(DNSTestCase):
    """
    L{MXResolver}: answers, errors, and the TTL cache.
    """

    @inlineCallbacks
    def test_lookups(self):
        """
        L{MXResolver.lookupMX} gives C{(preference, exchange)} pairs;
        L{MXResolver.lookupAddresses} the IPv4 then the IPv6 addresses, or an
        IP address as it is.
        """
        self.dnsServer.setMX("example.test", [(10, "MX.Example.Test")])
        self.dnsServer.setAAAA("mx.example.test", ["2001:db8::1"])
        self.dnsServer.setA("mx.example.test", ["192.0.2.1", "192.0.2.2"])
        records = yield self.resolver.lookupMX("example.test")
        self.assertEqual(records, [(10, "mx.example.test")])
        addresses = yield self.resolver.lookupAddresses("mx.example.test")
        self.assertEqual(sorted(addresses[:2]), ["192.0.2.1", "192.0.2.2"])
        self.assertEqual(addresses[2:], ["2001:db8::1"])
        addresses = yield self.resolver.lookupAddresses("2001:DB8::5")
        self.assertEqual(addresses, ["2001:db8::5"])

    @inlineCallbacks
    def test_errors(self):
        """
        NXDOMAIN, NODATA and SERVFAIL map to L{NXDOMAIN}, L{NoData} and
        L{TemporaryDNSError}; an address lookup with no records reports the
        most hopeful error of its A and AAAA lookups.
        """
        self.dnsServer.setA("a.test", ["192.0.2.1"])
        self.dnsServer.setA("bad.test", ["192.0.2.1"])
        self.dnsServer.setServfail("bad.test")
        self.dnsServer.setTXT("txt.test", ["v=spf1 -all"])
        yield self.assertFailure(self.resolver.lookupMX("none.test"), NXDOMAIN)
        yield self.assertFailure(self.resolver.lookupMX("a.test"), NoData)
        yield self.assertFailure(self.resolver.lookupMX("bad.test"), TemporaryDNSError)
        yield self.assertFailure(self.resolver.lookupAddresses("none.test"), NXDOMAIN)
        yield self.assertFailure(self.resolver.lookupAddresses("txt.test"), NoData)
        yield self.assertFailure(self.resolver.lookupAddresses("bad.test"), TemporaryDNSError)
        error = yield self.assertFailure(self.resolver.lookupMX("a..test"), NXDOMAIN)
        self.assertEqual((error.name, error.rdtype), ("a..test", "MX"))

    @inlineCallbacks
    def test_cacheWithinTTL(self):
        """
        A second lookup within the TTL is answered from the cache; once the
        TTL has passed on the resolver's clock, the server is asked again.
        """
        self.dnsServer.setMX("example.test", [(10, "mx.example.test")], ttl=30)
        yield self.resolver.lookupMX("example.test")
        self.clock.advance(29)
        self.dnsServer.setMX("example.test", [(20, "new.example.test")], ttl=30)
        records = yield self.resolver.lookupMX("EXAMPLE.test.")
        self.assertEqual(records, [(10, "mx.example.test")])
        self.assertEqual(self.dnsServer.queryCount("example.test", "MX"), 1)
        self.clock.advance(1)
        records = yield self.resolver.lookupMX("example.test")
        self.assertEqual(records, [(20, "new.example.test")])
        self.assertEqual(self.dnsServer.queryCount("example.test", "MX"), 2)

    @inlineCallbacks
    def test_cacheCopies(self):
        """
        Changing a list the resolver returned does not change its cache.
        """
        self.dnsServer.setA("host.test", ["192.0.2.1"])
        addresses = yield self.resolver.lookupAddresses("host.test")
        addresses.append("192.0.2.99")
        addresses = yield self.resolver.lookupAddresses("host.test")
        self.assertEqual(addresses, ["192.0.2.1"])

    @inlineCallbacks
    def test_zeroTTLNotCached(self):
        """
        An answer with TTL 0 is used once and never cached.
        """
        self.dnsServer.ttl = 0
        self.dnsServer.setA("host.test", ["192.0.2.1"])
        yield self.resolver.lookupAddresses("host.test")
        yield self.resolver.lookupAddresses("host.test")
        self.assertEqual(self.dnsServer.queryCount("host.test", "A"), 2)

    @inlineCallbacks
    def test_negativeCache(self):
        """
        NXDOMAIN and NODATA are cached for the negative TTL of the SOA
        (RFC 2308 section 5); SERVFAIL is not cached at all.
        """
        self.dnsServer.negativeTTL = 10
        self.dnsServer.setA("a.test", ["192.0.2.1"])
        self.dnsServer.setA("bad.test", ["192.0.2.1"])
        self.dnsServer.setServfail("bad.test")
        for _ in range(2):
            yield self.assertFailure(self.resolver.lookupMX("none.test"), NXDOMAIN)
            yield self.assertFailure(self.resolver.lookupMX("a.test"), NoData)
            yield self.assertFailure(self.resolver.lookupMX("bad.test"), TemporaryDNSError)
        self.assertEqual(self.dnsServer.queryCount("none.test", "MX"), 1)
        self.assertEqual(self.dnsServer.queryCount("a.test", "MX"), 1)
        self.assertEqual(self.dnsServer.queryCount("bad.test", "MX"), 2)
        self.dnsServer.setMX("none.test", [(10, "mx.none.test")])
        self.clock.advance(10)
        records = yield self.resolver.lookupMX("none.test")
        self.assertEqual(records, [(10, "mx.none.test")])

    @inlineCallbacks
    def test_concurrentLookupsShareOneQuery(self):
        """
        Lookups of one question made while it is under way share its answer.
        """
        self.dnsServer.setMX("example.test", [(10, "mx.example.test")])
        results = yield gatherResults([self.resolver.lookupMX("example.test") for _ in range(5)])
        self.assertEqual(results, [[(10, "mx.example.test")]] * 5)
        self.assertEqual(self.dnsServer.queryCount("example.test", "MX"), 1)

    def test_ownThreadPool(self):
        """
        Lookups run in the resolver's own pool, not the reactor's.
        """
        self.assertIsNot(self.resolver._pool, reactor.getThreadPool())
        self.assertEqual(self.resolver._pool.name, "relayd-dns")
        self.assertEqual(self.resolver._pool.max, 2)


class DNSServerTests(DNSTestCase):
    """
    L{DNSServer} itself: TCP answers and queries seen.
    """

    @inlineCallbacks
    def test_tcp(self):
        """
        The server answers over TCP on the same port as UDP.
        """
        self.dnsServer.setMX("example.test", [(10, "mx.example.test")])

        def ask():
            query = dns.message.make_query("example.test", "MX")
            return dns.query.tcp(query, "127.0.0.1", port=self.dnsPort, timeout=5)

        response = yield deferToThread(ask)
        self.assertEqual(
            [rdata.to_text() for rrset in response.answer for rdata in rrset],
            ["10 mx.example.test."],
        )
        self.assertEqual(self.dnsServer.queries, [("example.test", "MX")])

    @inlineCallbacks
    def test_truncatedOverUDP(self):
        """
        An answer longer than 512 octets is truncated over UDP with TC set,
        and the resolver gets it whole by asking again over TCP.
        """
        addresses = [f"2001:db8::{i:x}" for i in range(1, 41)]
        self.dnsServer.setAAAA("big.test", addresses)
        self.dnsServer.setA("big.test", ["192.0.2.1"])
        result = yield self.resolver.lookupAddresses("big.test")
        self.assertEqual(result[0], "192.0.2.1")
        self.assertEqual(sorted(result[1:]), sorted(addresses))
        self.assertEqual(self.dnsServer.queryCount("big.test", "AAAA"), 2)

    @inlineCallbacks
    def test_emptyNonTerminalAndRemove(self):
        """
        A name with nothing but names below it exists (NODATA, RFC 8020);
        L{DNSServer.remove} makes a name answer NXDOMAIN again.
        """
        self.dnsServer.setA("host.sub.example.test", ["192.0.2.1"])
        yield self.assertFailure(self.resolver.lookupMX("sub.example.test"), NoData)
        self.dnsServer.setA("gone.test", ["192.0.2.1"])
        self.dnsServer.remove("gone.test")
        yield self.assertFailure(self.resolver.lookupAddresses("gone.test"), NXDOMAIN)


class MXResolverStopTests(unittest.TestCase):
    """
    L{MXResolver.stop} without a DNS server: nothing is asked.
    """

    @inlineCallbacks
    def test_lookupAfterStop(self):
        """
        After L{MXResolver.stop}, lookups fail with L{TemporaryDNSError}
        (mail is deferred, not bounced); stopping again does nothing.
        """
        resolver = MXResolver(reactor, nameservers=["127.0.0.1"], port=9)
        resolver.start()
        resolver.stop()
        resolver.stop()
        error = yield self.assertFailure(resolver.lookupMX("example.test"), TemporaryDNSError)
        self.assertEqual(error.reason, "resolver stopped")
        yield self.assertFailure(Router(resolver).route("example.test"), RoutingError)
