"""
Next-hop selection for outbound mail (DESIGN section 6): configured routes
and smart hosts first, else MX per RFC 5321 section 5.1 and RFC 7505.

Two pieces:

  - L{MXResolver} asks DNS (dnspython, blocking) from its own thread pool,
    never the reactor's default pool, so slow name servers cannot starve
    other users of threads, and keeps the answers for their TTL.  Answers
    come back as plain values or as one of three exceptions: L{NXDOMAIN},
    L{NoData} and L{TemporaryDNSError}, the three outcomes routing must tell
    apart.
  - L{Router} turns a recipient domain into a L{Destination}: an ordered
    list of L{Hop}s, or a L{RoutingError} that says whether to bounce or to
    try again later.
"""

from __future__ import annotations

import functools
import ipaddress
import random as randomModule
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayd.address import AddressError, asciiDomain
from relayd.interfaces import IMXResolver, IRouter
from relayd.ops.logs import Logger

if TYPE_CHECKING:
    from relayd.delivery.oauth2 import OAuth2Config

__all__ = [
    "Hop",
    "Destination",
    "RoutingError",
    "Route",
    "NextHopConfig",
    "matchRoute",
    "MXResolver",
    "newResolver",
    "Router",
    "ResolverError",
    "NXDOMAIN",
    "NoData",
    "TemporaryDNSError",
]

log = Logger()


@dataclass(frozen=True)
class NextHopConfig:
    """One configured next hop of a route (smart host)."""

    host: str
    port: int = 25
    tls: str = "opportunistic"  # none | opportunistic | required | verify
    username: str | None = None
    password: str | None = None
    # auth = "xoauth2"/"oauthbearer": where the access tokens come from.
    oauth2: OAuth2Config | None = None

    def hop(self, address: str) -> Hop:
        """This next hop at C{address} (its host name without brackets)."""
        return Hop(
            self.host.strip("[]"),
            address,
            self.port,
            self.tls,
            self.username,
            self.password,
            self.oauth2,
        )


@dataclass(frozen=True)
class Route:
    """
    A configured route: recipient domains (exact, or C{*.example.org}
    for subdomains, or C{*} for everything: the classic relayhost) to a list
    of next hops tried in order.
    """

    domains: tuple[str, ...]
    hops: tuple[NextHopConfig, ...]
    mode: str = "spool"
    """C{"spool"}: queue, then deliver; C{"passthrough"}: relay MAIL, RCPT
    and DATA while the client is connected (L{relayd.smtp.passthrough})."""
    fallback: str = "spool"
    """For a passthrough route whose hops cannot be reached: C{"spool"}
    (queue the message as any other) or C{"tempfail"} (C{451 4.4.1})."""


@dataclass(frozen=True)
class Hop:
    """
    One address to try: the host name (for TLS verification and the log),
    one IP address, port, TLS mode and optional AUTH credentials.
    """

    host: str
    address: str
    port: int
    tls: str
    username: str | None = None
    password: str | None = None
    oauth2: OAuth2Config | None = None
    """AUTH with an OAuth2 token (XOAUTH2, OAUTHBEARER) instead of a password."""
    tlsCheck: bool = False
    """
    Check the certificate as C{verify} would, without refusing the session
    (an MTA-STS C{testing} policy, L{relayd.delivery.mtasts.applyTLSPolicy}):
    what would have failed is logged and counted for TLSRPT.
    """


@dataclass(frozen=True)
class Destination:
    """
    Where mail for one recipient domain goes.

    @ivar key: groups recipients into one transaction and keys the
        per-destination connection limit: C{"mx:<domain>"} for MX delivery,
        C{"route:<index>"} for a configured route.
    @ivar hops: addresses to try, in order.
    """

    key: str
    hops: tuple[Hop, ...]


class RoutingError(Exception):
    """
    No way to the domain: permanent (bounce) or temporary (defer).

    @ivar permanent: True for NXDOMAIN (5.1.2) and null MX (5.1.10).
    @ivar enhanced: the RFC 3463 code, e.g. C{"5.1.2"}, C{"4.4.3"}.
    """

    def __init__(self, permanent: bool, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.enhanced = enhanced
        self.text = text

    def __repr__(self) -> str:
        return (
            f"RoutingError(permanent={self.permanent!r}, "
            f"enhanced={self.enhanced!r}, text={self.text!r})"
        )


# --- DNS ---------------------------------------------------------------------


class ResolverError(Exception):
    """
    A DNS lookup gave no records.  Subclasses say why; routing needs to know
    which (RFC 5321 section 5.1).

    @ivar name: the name looked up, lower-case, without the final dot.
    @ivar rdtype: the record type looked up, e.g. C{"MX"}.
    @ivar reason: what went wrong, for log lines and bounce texts.
    """

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{name} {rdtype}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason

    def copy(self) -> ResolverError:
        """
        A fresh exception with the same contents, so a cached answer can be
        raised again without sharing (and growing) one traceback.
        """
        return type(self)(self.name, self.rdtype, self.reason)


class NXDOMAIN(ResolverError):
    """
    The name does not exist (RCODE 3, RFC 1035 section 4.1.1; RFC 8020: no
    name below it exists either).  Cached for the negative TTL.
    """


class NoData(ResolverError):
    """
    The name exists but has no records of the asked type (NODATA, RFC 2308
    section 2.2).  Cached for the negative TTL.
    """


class TemporaryDNSError(ResolverError):
    """
    No answer now: SERVFAIL, timeout, no usable name server, a network
    error.  Never cached; the caller should try again later.
    """


@dataclass
class _CacheEntry:
    """
    One cached answer: records or a negative answer, until C{expires} on
    the resolver's clock.
    """

    expires: float
    records: list[Any] | None
    error: ResolverError | None

    def result(self) -> Any:
        """The records (a new list) or a new copy of the negative answer."""
        if self.error is not None:
            raise self.error.copy()
        assert self.records is not None
        return list(self.records)


def _absoluteName(name: str) -> dns.name.Name:
    """
    Parse C{name} as an absolute DNS name, so that no search list or
    C{ndots} rule of the system configuration ever applies: a mail domain is
    always fully qualified (RFC 5321 section 2.3.5).
    """
    return dns.name.from_text(name.rstrip(".") + ".")


@functools.lru_cache(maxsize=1024)
def _ipLiteral(host: str) -> str | None:
    """
    Return the canonical text of C{host} if it is an IP address (optionally
    in brackets, as Postfix writes a smart host), else L{None}.  Cached:
    the same few configured hops are asked about for every message (the
    parse was 4% of the queue manager's time under load).
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().startswith("ipv6:"):
        host = host[5:]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def newResolver(
    nameservers: Sequence[str] | None = None, port: int = 53, timeout: float = 5.0
) -> dns.resolver.Resolver:
    """
    A blocking dnspython resolver set up from C{[delivery] resolvers},
    C{resolver_port} and C{dns_timeout}, the one L{MXResolver} asks, so
    that other DNS users (C{relayctl check-domain}) ask the same servers.

    @param nameservers: addresses of the recursive name servers to ask;
        L{None} reads the system configuration (C{/etc/resolv.conf}).
    @param port: the name servers' port.
    @param timeout: how long one lookup may take in all, in seconds
        (dnspython's lifetime), across retries and name servers.
    """
    resolver = dns.resolver.Resolver(configure=nameservers is None)
    resolver.port = port
    if nameservers is not None:
        resolver.nameservers = list(nameservers)
    resolver.lifetime = timeout
    resolver.timeout = min(resolver.timeout, timeout)
    resolver.cache = None
    return resolver


@implementer(IMXResolver)
class MXResolver:
    """
    MX and address lookups with dnspython in a thread pool of their own,
    with a TTL cache.

    dnspython's resolver is blocking; running it in the reactor's default
    thread pool would let a slow name server starve everything else that
    uses threads (DESIGN section 6), so this class owns a small L{ThreadPool}
    that L{start} and L{stop} run.

    Answers are cached under C{(type, name)} for their TTL (the lowest TTL
    of the CNAME chain and the records), capped at L{maxTTL}.  Negative
    answers (L{NXDOMAIN}, L{NoData}) are cached for their negative TTL
    (RFC 2308 section 5: the lower of the SOA's TTL and its MINIMUM), capped
    at L{maxNegativeTTL}; L{TemporaryDNSError} is never cached.  Concurrent
    lookups of the same question share one query.

    @cvar maxTTL: the longest time a positive answer is kept, in seconds.
    @cvar maxNegativeTTL: the longest time a negative answer is kept.
    @cvar defaultNegativeTTL: how long a negative answer without an SOA is
        kept.
    """

    maxTTL = 86400.0
    maxNegativeTTL = 300.0
    defaultNegativeTTL = 60.0

    def __init__(
        self,
        reactor: Any,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        threads: int = 4,
        clock: Any = None,
    ) -> None:
        """
        @param reactor: delivers results from the pool threads
            (C{callFromThread}).
        @param nameservers: addresses of the recursive name servers to ask;
            L{None} reads the system configuration (C{/etc/resolv.conf}).
        @param port: the name servers' port.
        @param timeout: how long one lookup may take in all, in seconds
            (dnspython's lifetime), across retries and name servers.
        @param threads: the most lookups running at once.
        @param clock: provides C{seconds()} for cache expiry; defaults to
            C{reactor}.  Tests pass a L{twisted.internet.task.Clock}.
        """
        self._reactor = reactor
        self._clock = reactor if clock is None else clock
        self._resolver = newResolver(nameservers, port, timeout)
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="relayd-dns")
        self._cache: dict[tuple[str, str], _CacheEntry] = {}
        self._waiting: dict[tuple[str, str], list[Deferred[Any]]] = {}

    def start(self) -> None:
        """Start the thread pool."""
        self._pool.start()

    def stop(self) -> None:
        """
        Stop the thread pool and wait for its threads to end (a lookup under
        way finishes first, so this may block for up to the timeout).
        Lookups after this fail with L{TemporaryDNSError}.  Calling it again
        does nothing.
        """
        if not self._pool.joined:
            self._pool.stop()

    def clearCache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    def lookupMX(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """
        Look up the MX records of C{domain}.

        @return: a Deferred firing with C{(preference, exchange)} pairs in
            the order the server gave them, each exchange lower-case without
            the final dot; the root (RFC 7505 null MX) is C{"."}.  It fails
            with L{NXDOMAIN}, L{NoData} or L{TemporaryDNSError}.
        """
        return self._lookup("MX", domain)

    def lookupTXT(self, name: str) -> Deferred[list[str]]:
        """
        Look up the TXT records of C{name} (e.g. C{_mta-sts.<domain>}, RFC
        8461 section 3.1), cached like every other answer.

        @return: a Deferred firing with one string per record, its
            character-strings joined without a separator (RFC 7208 section
            3.3, RFC 8461 section 3.1), decoded as UTF-8 with undecodable
            octets replaced; it fails like L{lookupMX}.
        """
        return self._lookup("TXT", name)

    def lookupAddresses(self, host: str) -> Deferred[list[str]]:
        """
        Look up the A and AAAA records of C{host}, in parallel.

        An IP address (or C{[address]}) is returned as it is, without asking
        DNS.

        @return: a Deferred firing with the IPv4 addresses, then the IPv6
            ones.  When neither lookup gave records it fails with
            L{TemporaryDNSError} if either failed that way, else L{NXDOMAIN}
            if either said so, else L{NoData}.
        """
        literal = _ipLiteral(host)
        if literal is not None:
            return succeed([literal])
        lookups = [self._lookup("A", host), self._lookup("AAAA", host)]
        return DeferredList(lookups, consumeErrors=True).addCallback(self._combineAddresses)

    def _combineAddresses(self, results: list[tuple[bool, Any]]) -> list[str]:
        """
        Join the A and AAAA outcomes (see L{lookupAddresses}).
        """
        addresses: list[str] = []
        errors: list[Failure] = []
        for ok, value in results:
            if ok:
                addresses.extend(value)
            else:
                errors.append(value)
        if addresses:
            return addresses
        for kind in (TemporaryDNSError, NXDOMAIN, NoData):
            for failure in errors:
                if failure.check(kind):
                    failure.raiseException()
        errors[0].raiseException()
        raise AssertionError("unreachable")  # pragma: no cover

    def _lookup(self, rdtype: str, name: str) -> Deferred[Any]:
        """
        Answer C{(rdtype, name)} from the cache, or join a query already
        under way, or start one in the pool.
        """
        name = name.strip().rstrip(".").lower()
        key = (rdtype, name)
        entry = self._cache.get(key)
        if entry is not None:
            if self._clock.seconds() < entry.expires:
                try:
                    return succeed(entry.result())
                except ResolverError as e:
                    return fail(e)
            del self._cache[key]
        try:
            qname = _absoluteName(name)
        except dns.exception.DNSException as e:
            # Too long a label, an empty label: no such name can exist.
            return fail(NXDOMAIN(name, rdtype, f"invalid domain name ({e})"))
        if self._pool.joined:
            return fail(TemporaryDNSError(name, rdtype, "resolver stopped"))
        result: Deferred[Any] = Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[key] = [result]
        deferToThreadPool(self._reactor, self._pool, self._query, rdtype, name, qname).addBoth(
            self._answered, key
        )
        return result

    def _query(
        self, rdtype: str, name: str, qname: dns.name.Name
    ) -> tuple[list[Any] | None, ResolverError | None, float]:
        """
        Ask DNS, in a pool thread.

        @return: C{(records, None, ttl)} or C{(None, error, ttl)}.
        """
        try:
            answer = self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=True)
        except dns.resolver.NXDOMAIN as e:
            responses = list(e.kwargs.get("responses", {}).values())
            return (
                None,
                NXDOMAIN(name, rdtype, "no such domain"),
                _negativeTTL(responses[0] if responses else None, self.defaultNegativeTTL),
            )
        except dns.resolver.NoAnswer as e:
            response = e.kwargs.get("response")
            return (
                None,
                NoData(name, rdtype, "no records of that type"),
                _negativeTTL(response, self.defaultNegativeTTL),
            )
        except dns.resolver.NoNameservers as e:
            return None, TemporaryDNSError(name, rdtype, _firstLine(e)), 0.0
        except dns.exception.Timeout as e:
            return None, TemporaryDNSError(name, rdtype, _firstLine(e)), 0.0
        except (dns.exception.DNSException, OSError) as e:
            return (
                None,
                TemporaryDNSError(name, rdtype, f"{type(e).__name__}: {_firstLine(e)}"),
                0.0,
            )
        ttl = float(answer.chaining_result.minimum_ttl)
        records: list[Any]
        if rdtype == "MX":
            records = [
                (
                    int(rdata.preference),
                    "."
                    if rdata.exchange == dns.name.root
                    else rdata.exchange.to_text(omit_final_dot=True).lower(),
                )
                for rdata in answer
            ]
        elif rdtype == "TXT":
            records = [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]
        else:
            records = [str(rdata.address) for rdata in answer]
        return records, None, ttl

    def _answered(self, outcome: Any, key: tuple[str, str]) -> None:
        """
        In the reactor thread: cache the outcome of a query and give it to
        everyone waiting for it.
        """
        waiting = self._waiting.pop(key, [])
        if isinstance(outcome, Failure):
            # A bug, not a DNS answer: do not cache it.
            for d in waiting:
                d.errback(outcome)
            return
        records, error, ttl = outcome
        if error is None:
            ttl = min(ttl, self.maxTTL)
        elif isinstance(error, TemporaryDNSError):
            ttl = 0.0
        else:
            ttl = min(ttl, self.maxNegativeTTL)
        entry = _CacheEntry(self._clock.seconds() + ttl, records, error)
        if ttl > 0:
            self._cache[key] = entry
        for d in waiting:
            try:
                value = entry.result()
            except ResolverError as e:
                d.errback(Failure(e))
            else:
                d.callback(value)


def _negativeTTL(response: Any, default: float) -> float:
    """
    The negative caching TTL of a NXDOMAIN or NODATA C{response}: the lower
    of the SOA record's TTL and its MINIMUM field (RFC 2308 section 5), or
    C{default} when the response carries no SOA.
    """
    if response is None:
        return default
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return default


def _firstLine(error: Exception) -> str:
    """The first line of C{str(error)}, for log lines and bounce texts."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# --- Routing -----------------------------------------------------------------


def _normalizeDomain(domain: str) -> str:
    """
    Lower-case C{domain} and drop a final dot; a name with U-labels (an
    SMTPUTF8 recipient, or a route written in Unicode) becomes its A-label
    form by IDNA 2008 (L{relayd.address.asciiDomain}), the form DNS is
    asked for and routes are matched in, so that C{b\u00fccher.example}
    and C{xn--bcher-kva.example} route alike.  DNS compares names
    case-insensitively (RFC 4343 section 3).  A route pattern's leading
    C{*.} is kept.  A name IDNA refuses is only lower-cased: it matches
    no A-label route and L{Router.route} refuses it.
    """
    domain = domain.strip().rstrip(".")
    if domain.isascii():
        return domain.lower()
    wildcard = "*." if domain.startswith("*.") else ""
    try:
        return wildcard + asciiDomain(domain[len(wildcard) :])
    except AddressError:
        return domain.lower()


def _domainMatches(pattern: str, domain: str) -> bool:
    """
    Whether a route's domain C{pattern} covers C{domain}: C{*} covers every
    domain, C{*.example.org} every domain below C{example.org} (not
    C{example.org} itself), anything else only itself.  Both arguments are
    normalized (L{_normalizeDomain}).
    """
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return pattern == domain


def matchRoute(routes: Sequence[Route], domain: str) -> int | None:
    """
    The index of the first of C{routes} whose domain patterns cover
    C{domain}, as L{Router.route} picks it, or None when mail for it goes
    by MX.  For the SMTP session, which decides at RCPT whether a
    recipient's route is relayed in session (L{relayd.smtp.passthrough}).
    """
    domain = _normalizeDomain(domain)
    for index, route in enumerate(routes):
        if any(_domainMatches(_normalizeDomain(p), domain) for p in route.domains):
            return index
    return None


def _addressLiteral(domain: str) -> str:
    """
    Parse an RFC 5321 section 4.1.3 address literal (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}) and return the address.

    @raise RoutingError: (permanent, 5.1.2) for anything else in brackets.
    """
    inner = domain[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise RoutingError(True, "5.1.2", f"unusable address literal {domain}") from None


@implementer(IRouter)
class Router:
    """
    Decides where mail for a recipient domain goes (DESIGN section 6).

    Configured routes come first, in order: the first L{Route} with a
    matching domain pattern wins, and its next hops are used in the order
    given.  Otherwise the domain's MX records are used (RFC 5321 section
    5.1); an address literal goes to that address.

    @ivar routes: the configured routes.
    """

    def __init__(
        self,
        resolver: MXResolver,
        routes: Sequence[Route] = (),
        port: int = 25,
        mxTls: str = "opportunistic",
        localNames: Sequence[str] = (),
        random: randomModule.Random | None = None,
    ) -> None:
        """
        @param resolver: answers MX and address lookups (an L{MXResolver} or
            anything with its C{lookupMX} and C{lookupAddresses}).
        @param routes: configured routes, tried in order.
        @param port: the port of MX hosts (25; tests use another).
        @param mxTls: the TLS mode of MX hops (C{none}, C{opportunistic},
            C{required}, C{verify}).
        @param localNames: this host's names, as it may appear among the MX
            hosts of a domain it relays for (RFC 5321 section 5.1 loop
            rule).
        @param random: shuffles MX hosts of equal preference; tests pass a
            seeded one.
        """
        self._resolver = resolver
        self._random = random if random is not None else randomModule.Random()
        self.reconfigure(routes, port, mxTls, localNames)

    def reconfigure(
        self, routes: Sequence[Route], port: int, mxTls: str, localNames: Sequence[str]
    ) -> None:
        """
        Put new routes and MX settings in force (config reload); lookups
        already running finish with the old ones.
        """
        self.routes = tuple(routes)
        self._patterns = [
            tuple(_normalizeDomain(d) for d in route.domains) for route in self.routes
        ]
        self._port = port
        self._mxTls = mxTls
        self._localNames = frozenset(_normalizeDomain(n) for n in localNames)
        # Routes whose next hops are all IP addresses need no lookup: their
        # destination is the same for every message, made once here.
        self._fixed: dict[int, Destination] = {}
        for index, route in enumerate(self.routes):
            literals = [_ipLiteral(config.host) for config in route.hops]
            if route.hops and None not in literals:
                hops = [config.hop(str(a)) for config, a in zip(route.hops, literals, strict=True)]
                self._fixed[index] = Destination(f"route:{index}", _unique(hops))

    def route(self, domain: str) -> Deferred[Destination]:
        """
        Find the next hops for mail to C{domain}.

        @return: a Deferred firing with a L{Destination} whose hops are in
            the order to try them, or failing with L{RoutingError}:
              - permanent 5.1.2 when the domain does not exist (NXDOMAIN)
                or is not a usable address literal;
              - permanent 5.1.10 for a null MX (RFC 7505 section 3);
              - permanent 5.4.6 when the lowest-preference MX is this host
                (mail would loop back to itself);
              - temporary 4.4.3 when DNS fails now (SERVFAIL, timeout) or no
                next host has an address.
        """
        fixed = self._fixedRoute(domain) if self._fixed else None
        if fixed is not None:
            return succeed(fixed)
        return Deferred.fromCoroutine(self._route(domain))

    def _fixedRoute(self, domain: str) -> Destination | None:
        """
        The destination of C{domain} when a route with only IP-address
        hops (L{reconfigure}) takes it, found without a coroutine, the
        same one L{_route} would give; None for everything else (and for
        any doubt: L{_route} then decides, errors included).
        """
        try:
            domain = _normalizeDomain(domain)
            if not domain or not domain.isascii():
                return None
            for index, patterns in enumerate(self._patterns):
                if any(_domainMatches(p, domain) for p in patterns):
                    return self._fixed.get(index)
        except Exception:
            return None
        return None

    async def _route(self, domain: str) -> Destination:
        domain = _normalizeDomain(domain)
        if not domain:
            raise RoutingError(True, "5.1.2", "empty recipient domain")
        if not domain.isascii():
            raise RoutingError(True, "5.1.2", f"bad internationalized domain {domain}")
        try:
            for index, patterns in enumerate(self._patterns):
                if any(_domainMatches(p, domain) for p in patterns):
                    return await self._configuredRoute(index, domain)
            if domain.startswith("[") and domain.endswith("]"):
                address = _addressLiteral(domain)
                hop = Hop(domain[1:-1], address, self._port, self._mxTls)
                return Destination(f"mx:{domain}", (hop,))
            return await self._mxRoute(domain)
        except RoutingError:
            raise
        except Exception as e:
            # A bug: defer the mail rather than lose or bounce it.
            log.failure("Routing {domain} failed unexpectedly", domain=domain)
            raise RoutingError(False, "4.3.0", f"internal error routing {domain}") from e

    async def _configuredRoute(self, index: int, domain: str) -> Destination:
        """
        Turn route C{index}'s next hops into L{Hop}s, in order: an IP
        address is used as is, a name gives one hop per address.  A name
        that does not resolve is skipped, so a relayhost list fails over
        past a host whose DNS is broken.
        """
        configs = self.routes[index].hops
        resolved = await gatherResults([self._addressesOrError(config.host) for config in configs])
        hops: list[Hop] = []
        problems: list[str] = []
        for config, result in zip(configs, resolved, strict=True):
            if isinstance(result, ResolverError):
                problems.append(f"{config.host}: {result.reason}")
                continue
            hops.extend(config.hop(address) for address in result)
        if not hops:
            raise RoutingError(
                False,
                "4.4.3",
                f"no next hop of route {index} for {domain} has an address"
                + (f" ({'; '.join(problems)})" if problems else ""),
            )
        return Destination(f"route:{index}", _unique(hops))

    async def _mxRoute(self, domain: str) -> Destination:
        """
        MX delivery per RFC 5321 section 5.1 and RFC 7505.
        """
        try:
            records = await self._resolver.lookupMX(domain)
        except NXDOMAIN:
            raise RoutingError(
                True, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)"
            ) from None
        except NoData:
            # No MX at all: the domain itself is the implicit MX, preference
            # 0 (section 5.1).  Only for NODATA, never after an error.
            records = [(0, domain)]
        except TemporaryDNSError as e:
            raise RoutingError(
                False, "4.4.3", f"MX lookup for {domain} failed: {e.reason}"
            ) from None

        if any(host == "." for _, host in records):
            # RFC 7505 section 3: a null MX means the domain accepts no
            # mail; a null MX mixed with others is a broken record set we
            # read the same way (section 4.3 bounces on it too).
            raise RoutingError(
                True, "5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)"
            )

        hosts = self._sortMX(records)
        local = [pref for pref, host in hosts if host in self._localNames]
        if local:
            # Section 5.1: when this host is among the MX hosts, only those
            # with a lower preference value may be tried; if none is left,
            # the mail would loop.
            hosts = [(pref, host) for pref, host in hosts if pref < min(local)]
            if not hosts:
                raise RoutingError(True, "5.4.6", f"mail for {domain} loops back to myself")

        names = [host for _, host in hosts]
        resolved = await gatherResults([self._addressesOrError(h) for h in names])
        hops: list[Hop] = []
        problems: list[str] = []
        for host, result in zip(names, resolved, strict=True):
            if isinstance(result, ResolverError):
                problems.append(f"{host}: {result.reason}")
                continue
            hops.extend(Hop(host, a, self._port, self._mxTls) for a in result)
        if not hops:
            raise RoutingError(
                False,
                "4.4.3",
                f"no MX host of {domain} has an address ({'; '.join(problems)})",
            )
        return Destination(f"mx:{domain}", _unique(hops))

    def _sortMX(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """
        Order MX records by preference, shuffling those of equal preference
        to spread the load (RFC 5321 section 5.1); done on every call, so
        cached answers are shuffled anew.
        """
        byPreference: dict[int, list[str]] = {}
        for pref, host in records:
            hosts = byPreference.setdefault(pref, [])
            if host not in hosts:
                hosts.append(host)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(byPreference):
            hosts = byPreference[pref]
            self._random.shuffle(hosts)
            ordered.extend((pref, host) for host in hosts)
        return ordered

    def _addressesOrError(self, host: str) -> Deferred[list[str] | ResolverError]:
        """
        The addresses of C{host}, or the L{ResolverError} explaining why
        there are none (as a result, not a failure, so that
        L{gatherResults} waits for every host).
        """
        d = self._resolver.lookupAddresses(host)
        return d.addErrback(_errorValue)

    def forgetLookups(self) -> None:
        """
        Drop the resolver's cached DNS answers (C{relayctl queue requeue}
        after a route or DNS change), so the next route of every domain is
        looked up afresh.  A resolver without a cache has nothing to drop.
        """
        clearCache = getattr(self._resolver, "clearCache", None)
        if clearCache is not None:
            clearCache()


def _errorValue(failure: Failure) -> ResolverError:
    """Return the L{ResolverError} of C{failure}; pass anything else on."""
    failure.trap(ResolverError)
    error = failure.value
    assert isinstance(error, ResolverError)
    return error


def _unique(hops: list[Hop]) -> tuple[Hop, ...]:
    """
    Drop repeats of an address and port already listed (two MX names for
    one machine): trying it again only adds a connect timeout.
    """
    seen: set[tuple[str, int]] = set()
    kept = []
    for hop in hops:
        if (hop.address, hop.port) not in seen:
            seen.add((hop.address, hop.port))
            kept.append(hop)
    return tuple(kept)
