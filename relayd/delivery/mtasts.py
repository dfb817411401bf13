"""
MTA-STS (RFC 8461) for MX delivery: the recipient domain's policy says
which MX hosts may take its mail and that they must do so over TLS with a
certificate valid for their name (DESIGN section 6).

The pieces, in the order delivery meets them:

  - L{TLSPolicy}: the small frozen value the rest of relayd sees: the
    policy's kind (C{"none"}, C{"mta-sts"}, or C{"dane"} for the DANE
    module, which takes precedence when both exist: DESIGN section 6), its
    mode and its C{mx} patterns.  L{MTASTSPolicies.lookup} is the one
    function that finds it for a domain.
  - L{parseTXT} and L{parsePolicy}: the TXT record C{_mta-sts.<domain>}
    (section 3.1) and the policy file (section 3.2).
  - L{MTASTSPolicies}: the TXT lookup through relayd's resolver, the fetch
    of C{https://mta-sts.<domain>/.well-known/mta-sts.txt} with
    L{twisted.web.client.Agent} (section 3.3: verified certificate, no
    redirects, a 64 KiB body limit, a timeout), and the policy cache in the
    spool directory (C{<spool>/mta-sts/<domain>.json}), which survives
    restarts and honours C{max_age} (section 5).
  - L{applyTLSPolicy}: what a policy does to a L{Destination}: under
    C{enforce}, only the matching MX hosts, each with the C{verify} TLS
    mode; none left means a deferral (4.7.5), never a fallback.

A message with C{TLS-Required: No} (RFC 8689 section 5,
L{relayd.queue.record.QueueRecord.tlsOptional}) is delivered without the
policy: the scheduler does not ask for one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relayd.delivery.client import Reply
from relayd.delivery.routing import Destination, Hop, ResolverError
from relayd.ops.logs import Logger
from relayd.queue.safeio import writeAtomically

__all__ = [
    "TLSPolicy",
    "NO_POLICY",
    "PolicyError",
    "MTASTSPolicy",
    "AppliedPolicy",
    "parseTXT",
    "parsePolicy",
    "mxMatches",
    "applyTLSPolicy",
    "MTASTSPolicies",
    "CACHE_DIRECTORY",
    "MAX_BODY",
    "MAX_AGE",
    "FETCH_TIMEOUT",
]

log = Logger(namespace="relayd.smtp")

CACHE_DIRECTORY = "mta-sts"
"""The cache's folder inside the spool directory."""

MAX_BODY = 64 * 1024
"""RFC 8461 section 3.3: policy bodies over 64 KiB are refused."""

MAX_AGE = 31557600
"""RFC 8461 section 3.2: the longest C{max_age}, about a year."""

FETCH_TIMEOUT = 60.0
"""RFC 8461 section 3.3: senders SHOULD time a policy fetch out after at most 60 s."""

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")


@dataclass(frozen=True)
class TLSPolicy:
    """
    The recipient domain's TLS policy, as delivery applies it.

    @ivar kind: C{"none"} (no policy: the route's or C{mx_tls}'s mode
        alone), C{"mta-sts"} (RFC 8461) or C{"dane"} (RFC 7672, the DANE
        module's, which wins over MTA-STS).
    @ivar mode: for MTA-STS C{"enforce"}, C{"testing"} or C{"none"}.
    @ivar mxPatterns: the policy's C{mx} patterns (C{mail.example.net},
        C{*.example.net}).
    @ivar domain: the policy domain.
    @ivar policyId: the TXT record's C{id} the policy was fetched under.
    @ivar expires: when the policy stops being usable (fetch time plus
        C{max_age}), on the clock of the L{MTASTSPolicies}.
    @ivar note: why there is no policy, or where this one came from
        (C{"fetched"}, C{"cached"}), for log lines and C{relayctl route}.
    @ivar maxAge: the policy's C{max_age}, for the policy text of TLSRPT
        reports (0 in caches written before relayd kept it).
    """

    kind: str
    mode: str
    mxPatterns: tuple[str, ...] = ()
    domain: str = ""
    policyId: str | None = None
    expires: float = 0.0
    note: str = ""
    maxAge: int = 0

    @property
    def label(self) -> str:
        """C{"none"} or C{"<kind>:<mode>"} (C{mta-sts:enforce}), for the delivery log line."""
        return "none" if self.kind == "none" else f"{self.kind}:{self.mode}"

    def matches(self, host: str) -> bool:
        """Whether MX host C{host} matches one of L{mxPatterns} (L{mxMatches})."""
        return any(mxMatches(pattern, host) for pattern in self.mxPatterns)


NO_POLICY = TLSPolicy("none", "none")
"""No recipient-domain policy: delivery as configured."""


class PolicyError(Exception):
    """A TXT record or policy that cannot be used, or a failed fetch; the text says why."""


class PolicyInvalid(PolicyError):
    """A fetched policy that does not parse (TLSRPT's C{sts-policy-invalid})."""


def fetchResultType(failure: Failure) -> str:
    """
    The TLSRPT result type (RFC 8460 section 4.3.2.2) of a failed policy
    fetch: C{sts-policy-invalid} for a policy that does not parse,
    C{sts-webpki-invalid} for a policy host whose certificate failed
    (PKIX), else C{sts-policy-fetch-error}.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    if failure.check(PolicyInvalid):
        return "sts-policy-invalid"
    inner = [failure, *(getattr(failure.value, "reasons", None) or [])]
    if any(f.check(SSL.Error, VerificationError) for f in inner):
        return "sts-webpki-invalid"
    return "sts-policy-fetch-error"


@dataclass(frozen=True)
class MTASTSPolicy:
    """A parsed policy file (RFC 8461 section 3.2)."""

    mode: str
    mx: tuple[str, ...]
    maxAge: int


def txtFields(record: str, error: Callable[[str], Exception]) -> dict[str, str]:
    """
    The fields of an MTA-STS or TLSRPT TXT record (RFC 8461 section 3.1,
    RFC 8460 section 3: C{name=value} fields separated by C{;} and
    optional spaces or tabs); the first of a repeated name wins.

    @param error: makes the exception raised for a field without C{=}.
    """
    fields: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise error(f"malformed TXT field {part[:40]!r}")
        fields.setdefault(key.strip(" \t"), value.strip(" \t"))
    return fields


def parseTXT(records: Sequence[str]) -> str:
    """
    The C{id} of the domain's MTA-STS TXT record (RFC 8461 section 3.1):
    of the records, those starting with C{v=STSv1} count; there must be
    exactly one.  Fields are C{key=value} separated by C{;} with optional
    spaces; unknown fields are ignored.

    @raise PolicyError: no such record, more than one, or no valid C{id}.
    """
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if not candidates:
        raise PolicyError("no TXT record starting with v=STSv1")
    if len(candidates) > 1:
        raise PolicyError("more than one v=STSv1 TXT record")
    fields = txtFields(candidates[0], PolicyError)
    if fields.get("v") != "STSv1":
        raise PolicyError("TXT record version is not STSv1")
    policyId = fields.get("id", "")
    if not _ID.fullmatch(policyId):
        raise PolicyError(f"TXT record has no valid id ({policyId!r})")
    return policyId


def parsePolicy(body: bytes) -> MTASTSPolicy:
    """
    Parse a policy file (RFC 8461 section 3.2): lines of C{key: value}
    ending in CRLF or LF; C{version: STSv1}, C{mode} (C{enforce},
    C{testing}, C{none}), C{max_age} (0 to 31557600 seconds) and, unless
    the mode is C{none}, one or more C{mx}; unknown keys are ignored, and
    of a key given twice (other than C{mx}) the first counts.

    @raise PolicyError: anything else.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"malformed policy line {line[:80]!r}")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode {mode!r} is not enforce, testing or none")
    maxAge = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(maxAge) or int(maxAge) > MAX_AGE:
        raise PolicyError(f"policy max_age {maxAge!r} is not 0 to {MAX_AGE}")
    for pattern in mx:
        host = pattern.removeprefix("*.")
        if not _DOMAIN.fullmatch(host):
            raise PolicyError(f"policy mx {pattern!r} is not a host name or *.domain")
    if mode != "none" and not mx:
        raise PolicyError("policy has no mx")
    return MTASTSPolicy(mode, tuple(mx), int(maxAge))


def mxMatches(pattern: str, host: str) -> bool:
    """
    Whether MX host C{host} matches the policy's C{pattern} (RFC 8461
    section 4.1): equal ignoring case, or C{*.example.net} matching exactly
    one more label to the left (C{mail.example.net}, not C{example.net} nor
    C{a.b.example.net}).
    """
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return pattern == host


@dataclass(frozen=True)
class AppliedPolicy:
    """
    What L{applyTLSPolicy} made of a destination.

    @ivar destination: the hops to try (under C{enforce}: only matching MX
        hosts, each with the C{verify} TLS mode).
    @ivar refusal: set when no hop may be tried: the deferral for every
        recipient.
    @ivar wouldFail: under C{testing}: what C{enforce} would have refused
        (MX hosts that do not match), for the log.
    """

    destination: Destination
    refusal: Reply | None = None
    wouldFail: tuple[str, ...] = ()


def applyTLSPolicy(destination: Destination, policy: TLSPolicy) -> AppliedPolicy:
    """
    Apply an MTA-STS policy to an MX destination (RFC 8461 section 5.1).

      - C{enforce}: only hops whose host matches a C{mx} pattern, each with
        TLS mode C{verify} (a certificate chained to the trust store and
        valid for the MX name: section 4.2), whatever C{mx_tls} says; a
        failed handshake or certificate then defers that hop
        (L{relayd.delivery.client}), never falls back to plain text.  When
        no hop matches: a 451 4.7.5 deferral; the message bounces when its
        lifetime runs out.
      - C{testing}: the destination's hops, those matching a C{mx}
        pattern with C{tlsCheck} (their certificate is checked as under
        C{enforce}, never refused); the hops that C{enforce} would drop
        are listed in C{wouldFail} for the log (section 5).
      - C{none}, or a policy of another kind: the destination as it is
        (a DANE policy is the DANE module's to apply).
    """
    if policy.kind != "mta-sts" or policy.mode == "none":
        return AppliedPolicy(destination)
    matching = [hop for hop in destination.hops if policy.matches(hop.host)]
    others = sorted({hop.host for hop in destination.hops if not policy.matches(hop.host)})
    patterns = " ".join(policy.mxPatterns)
    if policy.mode == "testing":
        # The matching hops check the certificate as enforce would, without
        # refusing (RFC 8461 section 5): what fails is logged and counted
        # for TLSRPT (relayd.delivery.tlsrpt).
        checked = tuple(
            replace(hop, tlsCheck=True) if policy.matches(hop.host) else hop
            for hop in destination.hops
        )
        return AppliedPolicy(
            replace(destination, hops=checked),
            wouldFail=tuple(f"MX host {host} does not match mx {patterns}" for host in others),
        )
    if not matching:
        hosts = " ".join(others) or "none"
        return AppliedPolicy(
            destination,
            refusal=Reply.local(
                451,
                "4.7.5",
                f"mta-sts: no MX host of {policy.domain} matches the policy "
                f"(mx {patterns}; MX hosts {hosts})",
            ),
        )
    hops: list[Hop] = [replace(hop, tls="verify") for hop in matching]
    return AppliedPolicy(replace(destination, hops=tuple(hops)))


# --- fetching -------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _ResolvingTLSEndpoint:
    """
    Connect to a host name's addresses as relayd's resolver gives them
    (so a test's DNS server and C{[delivery] resolvers} are used, not the
    system's), in order until one answers, with TLS verified for the name.
    """

    def __init__(
        self, reactor: Any, resolver: Any, host: str, port: int, trustRoot: Any, timeout: float
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._trustRoot = trustRoot
        self._timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        try:
            addresses = await self._resolver.lookupAddresses(self._host)
        except ResolverError as e:
            raise PolicyError(f"{self._host}: {e.reason}") from None
        error: Exception | None = None
        options = optionsForClientTLS(self._host, trustRoot=self._trustRoot)
        for address in addresses:
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            tcp = kind(self._reactor, address, self._port, timeout=self._timeout)
            try:
                return await wrapClientTLS(options, tcp).connect(factory)
            except Exception as e:
                error = e
        raise PolicyError(f"connect to {self._host}:{self._port}: {error}")


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """The L{Agent}'s endpoints: through L{_ResolvingTLSEndpoint}."""

    def __init__(self, reactor: Any, resolver: Any, trustRoot: Any, timeout: float) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._trustRoot = trustRoot
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> _ResolvingTLSEndpoint:
        if uri.scheme != b"https":
            raise PolicyError("only https")
        return _ResolvingTLSEndpoint(
            self._reactor,
            self._resolver,
            uri.host.decode("ascii"),
            uri.port,
            self._trustRoot,
            self._timeout,
        )


class _LimitedBody(Protocol):
    """
    Collect a response body of at most C{limit} octets; more fails the
    fetch and drops the connection (RFC 8461 section 3.3).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            # twisted.web gives the body protocol a transport that is a
            # producer: stopping it drops the connection.
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._stop()
            self.done.errback(PolicyError(f"policy body over {self.limit // 1024} KiB"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(PolicyError(f"policy body cut short: {reason.getErrorMessage()}"))


def httpsAgent(reactor: Any, resolver: Any, trustRoot: Any, timeout: float) -> Agent:
    """
    An HTTPS L{Agent} as the policy fetch uses it: names resolved through
    relayd's resolver, certificates verified against C{trustRoot}, no
    redirects followed (also for TLSRPT's C{https:} rua, RFC 8460 5.4).
    """
    agent: Agent = Agent.usingEndpointFactory(
        reactor, _Endpoints(reactor, resolver, trustRoot, timeout)
    )
    return agent


def _drop(d: Deferred[Any]) -> None:
    """Stop reading a body no longer wanted, without an unhandled error."""
    d.addErrback(lambda _: None)
    d.cancel()


def _describe(failure: Failure) -> str:
    """One line about a failed fetch, for the log: never a traceback."""
    error = failure.value
    if isinstance(error, PolicyError):
        return str(error)
    reasons = getattr(error, "reasons", None)
    if reasons:
        # twisted.web's ResponseNeverReceived, RequestTransmissionFailed:
        # the TLS or connection failure inside.
        inner = reasons[0]
        return f"{type(inner.value).__name__}: {inner.getErrorMessage()}"
    return f"{type(error).__name__}: {failure.getErrorMessage()}"


class MTASTSPolicies:
    """
    Finds, fetches and caches MTA-STS policies (RFC 8461 sections 3 to 5),
    in the queue manager.

    The cache lives in memory and, durably, in C{<spool>/mta-sts/}: one
    JSON file per policy domain, written with L{writeAtomically} in a
    thread.  L{loadCache} reads it back at startup, so a restart keeps every policy
    until its C{max_age} runs out.

    @ivar port: the HTTPS port of policy hosts (443; tests use another).
    @ivar timeout: seconds a whole fetch may take (section 3.3: 60 or less).
    @cvar refreshBefore: a cached policy with less than this many seconds
        left is fetched again in the background when a message needs it.
    @cvar refreshInterval: at most one such early refresh per domain in
        this many seconds.
    """

    refreshBefore = 21600.0
    refreshInterval = 3600.0

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        spoolDirectory: str,
        caFile: str | None = None,
        port: int = 443,
        timeout: float = FETCH_TIMEOUT,
        persist: bool = True,
    ) -> None:
        """
        @param resolver: an L{relayd.delivery.routing.MXResolver} (its
            C{lookupTXT} and C{lookupAddresses}).
        @param spoolDirectory: the spool; the cache is its C{mta-sts/}.
        @param caFile: PEM file of the CAs trusted for policy hosts; None
            for the system trust store.
        @param persist: write fetched policies to the cache directory;
            C{relayctl route} reads the cache but never writes the spool.
        @raise OSError: C{caFile} cannot be read.
        @raise ValueError: it holds no certificate.
        """
        from relayd.delivery.attempt import loadTrustRoot

        self.persist = persist
        self.reactor = reactor
        self.resolver = resolver
        self.directory = os.path.join(spoolDirectory, CACHE_DIRECTORY)
        self.port = port
        self.timeout = timeout
        self._trustRoot = loadTrustRoot(caFile) if caFile is not None else platformTrust()
        self._cache: dict[str, TLSPolicy] = {}
        self._fetching: dict[str, list[Deferred[TLSPolicy | None]]] = {}
        self._refreshed: dict[str, float] = {}
        # TLSRPT (relayd.delivery.tlsrpt): told of every failed fetch, with
        # the domain, the RFC 8460 result type and why.
        self.fetchFailed: Callable[[str, str, str], None] | None = None

    # --- the cache on disk --------------------------------------------------

    def loadCache(self) -> None:
        """
        At startup (blocking, like the spool's own recovery): read every
        C{<domain>.json} of the cache directory; an unreadable or expired
        one is ignored (and left for the next write to replace).
        """
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        except OSError as e:
            log.error(
                "mta-sts: cannot read the policy cache {path}: {error}",
                path=self.directory,
                error=e,
            )
            return
        now = self.reactor.seconds()
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read())
                policy = TLSPolicy(
                    "mta-sts",
                    str(data["mode"]),
                    tuple(str(p) for p in data["mx"]),
                    str(data["domain"]),
                    str(data["id"]),
                    float(data["expires"]),
                    "cached",
                    int(data.get("max_age", 0)),
                )
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn("mta-sts: ignoring cache file {path}: {error}", path=path, error=e)
                continue
            if policy.expires > now and name == f"{policy.domain}.json":
                self._cache[policy.domain] = policy

    def _store(self, policy: TLSPolicy) -> Deferred[None]:
        """Write C{policy} to the cache directory, durably, in a thread."""
        data = json.dumps(
            {
                "domain": policy.domain,
                "id": policy.policyId,
                "mode": policy.mode,
                "mx": list(policy.mxPatterns),
                "expires": policy.expires,
                "max_age": policy.maxAge,
            },
            sort_keys=True,
        ).encode("ascii")
        path = os.path.join(self.directory, f"{policy.domain}.json")

        def write() -> None:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            writeAtomically(path, data, mode=0o600)

        def failed(failure: Failure) -> None:
            log.error(
                "mta-sts: cannot write the policy cache {path}: {error}",
                path=path,
                error=failure.getErrorMessage(),
            )

        return deferToThread(write).addErrback(failed)

    def cached(self, domain: str) -> TLSPolicy | None:
        """The cached, unexpired policy of C{domain}, if any."""
        policy = self._cache.get(domain)
        if policy is not None and policy.expires > self.reactor.seconds():
            return policy
        return None

    # --- lookups -------------------------------------------------------------

    def lookup(self, domain: str) -> Deferred[TLSPolicy]:
        """
        The MTA-STS policy for mail to C{domain} (RFC 8461 section 5).

          - TXT record with the cached policy's C{id}: the cached policy.
          - TXT record with another C{id}: with a fresh cached policy, that
            one now and a fetch in the background (section 5.1, the next
            message gets the new one); without, a fetch now.
          - No usable TXT record: the fresh cached policy if any (section
            5.1: a removed record does not end a policy), else none.
          - A failed fetch: the fresh cached policy if any, else none
            (section 5: a sender without a cached policy cannot know the
            mode, so it delivers as without one); logged with the reason.

        @return: a Deferred that always fires with a L{TLSPolicy}, never
            fails.
        """
        d = Deferred.fromCoroutine(self._lookup(domain.lower().rstrip(".")))

        def unexpected(failure: Failure) -> TLSPolicy:
            log.failure("mta-sts: policy lookup for {domain} failed", failure, domain=domain)
            return self.cached(domain) or replace(NO_POLICY, note="internal error")

        return d.addErrback(unexpected)

    async def _lookup(self, domain: str) -> TLSPolicy:
        if not _DOMAIN.fullmatch(domain):
            return replace(NO_POLICY, note="not a domain name")
        fresh = self.cached(domain)
        try:
            records = await self.resolver.lookupTXT(f"_mta-sts.{domain}")
            policyId = parseTXT(records)
        except (ResolverError, PolicyError) as e:
            why = e.reason if isinstance(e, ResolverError) else str(e)
            if fresh is not None:
                return fresh
            return replace(NO_POLICY, domain=domain, note=f"no MTA-STS TXT record ({why})")
        if fresh is not None and fresh.policyId == policyId:
            now = self.reactor.seconds()
            if (
                fresh.expires - now < self.refreshBefore
                and now - self._refreshed.get(domain, 0.0) >= self.refreshInterval
            ):
                # Section 5.1: a successful fetch renews max_age; fetch
                # before it runs out rather than lose the policy for a
                # moment when the policy host is briefly down.
                self._refreshed[domain] = now
                self.refresh(domain, policyId)
            return fresh
        if fresh is not None:
            log.info(
                "mta-sts: {domain}: policy id changed ({old} to {new}); refreshing in the "
                "background, the cached policy applies meanwhile",
                domain=domain,
                old=fresh.policyId,
                new=policyId,
            )
            self.refresh(domain, policyId)
            return fresh
        fetched = await self.refresh(domain, policyId)
        if fetched is not None:
            return fetched
        return replace(NO_POLICY, domain=domain, note="policy fetch failed, none cached")

    def refresh(self, domain: str, policyId: str) -> Deferred[TLSPolicy | None]:
        """
        Fetch C{domain}'s policy now (one fetch per domain at a time) and
        cache it.

        @return: a Deferred firing with the new policy, or None when the
            fetch failed (logged).
        """
        result: Deferred[TLSPolicy | None] = Deferred()
        waiting = self._fetching.get(domain)
        if waiting is not None:
            waiting.append(result)
            return result
        self._fetching[domain] = [result]

        def done(outcome: Any) -> None:
            if isinstance(outcome, Failure):
                why = _describe(outcome)
                log.warn("mta-sts: {domain}: policy fetch failed: {why}", domain=domain, why=why)
                if self.fetchFailed is not None:
                    self.fetchFailed(domain, fetchResultType(outcome), why)
                outcome = None
            for d in self._fetching.pop(domain, []):
                d.callback(outcome)

        self._fetch(domain, policyId).addBoth(done)
        return result

    def _fetch(self, domain: str, policyId: str) -> Deferred[TLSPolicy]:
        """
        GET the policy (RFC 8461 section 3.3): HTTPS with the certificate
        verified for C{mta-sts.<domain>}, no redirect followed (L{Agent}
        follows none), 200 and C{text/plain} or nothing, 64 KiB at most,
        the whole within L{timeout}.
        """
        started = self.reactor.seconds()
        d = Deferred.fromCoroutine(self._get(domain, policyId, started))
        d.addTimeout(self.timeout, self.reactor, lambda result, timeout: self._timedOut())
        return d

    def _timedOut(self) -> Any:
        raise PolicyError(f"policy fetch timed out after {self.timeout:g}s")

    async def _get(self, domain: str, policyId: str, started: float) -> TLSPolicy:
        agent = Agent.usingEndpointFactory(
            self.reactor, _Endpoints(self.reactor, self.resolver, self._trustRoot, self.timeout)
        )
        host = f"mta-sts.{domain}"
        authority = host if self.port == 443 else f"{host}:{self.port}"
        url = f"https://{authority}/.well-known/mta-sts.txt".encode("ascii")
        response = await agent.request(b"GET", url)
        body = _LimitedBody(MAX_BODY)
        response.deliverBody(body)
        if response.code != 200:
            _drop(body.done)
            raise PolicyError(
                f"policy host answered HTTP {response.code} (redirects are not followed)"
            )
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if contentType.split(b";")[0].strip().lower() != b"text/plain":
            _drop(body.done)
            raise PolicyError(
                f"policy Content-Type is {contentType.decode('latin-1')!r}, not text/plain"
            )
        data = await body.done
        try:
            parsed = parsePolicy(data)
        except PolicyError as e:
            raise PolicyInvalid(str(e)) from None
        policy = TLSPolicy(
            "mta-sts",
            parsed.mode,
            parsed.mx,
            domain,
            policyId,
            started + parsed.maxAge,
            "fetched",
            parsed.maxAge,
        )
        self._cache[domain] = policy
        log.info(
            "mta-sts: {domain}: policy {id} fetched: mode={mode} mx={mx} max_age={max_age}",
            domain=domain,
            id=policyId,
            mode=parsed.mode,
            mx=" ".join(parsed.mx),
            max_age=parsed.maxAge,
        )
        if self.persist:
            await self._store(policy)
        return policy
