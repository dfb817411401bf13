"""
C{relayctl check-domain DOMAIN}: would mail relayd sends for DOMAIN pass
the receivers' SPF, DKIM and DMARC checks, and are the domain's MTA-STS
and TLSRPT records well formed?

One L{Finding} per question, each C{ok}, C{warn} or C{fail}, with what to
publish to fix it:

  - C{spf}: the domain's SPF record (RFC 7208) evaluated, as a receiver
    would, for every address relayd sends from: the addresses of its own
    host name (C{[server] hostname}) as the configured resolver gives them,
    or the addresses given with C{--address} (relayd has no outbound source
    address setting; behind NAT the public address is not in DNS).  The
    mail is assumed to come from C{postmaster@DOMAIN} (relayd passes on the
    client's envelope sender; a relay for DOMAIN's mail sends with DOMAIN
    in it).
  - C{dkim}: for every key the C{dkim} policy signs DOMAIN's mail with,
    the TXT record at C{SELECTOR._domainkey.D} (RFC 6376 section 3.6.2)
    compared with the public half of the configured private key (RSA or
    Ed25519, RFC 8463).
  - C{dmarc}: the DMARC record (RFC 7489 section 6.1), and whether
    relayd's mail would pass it: aligned DKIM (C{adkim}) or aligned SPF
    (C{aspf}), assuming the From: domain and the envelope sender's domain
    are DOMAIN (section 3.1).  No record is a warning, not a failure:
    receivers deliver such mail, only the large mailbox providers want a
    record from bulk senders.
  - C{mta-sts} (RFC 8461 section 3.1) and C{tlsrpt} (RFC 8460 section 3):
    when published, their TXT records' syntax.  The MTA-STS policy file
    (HTTPS) is not fetched.

Why dnspython and a small evaluator here rather than checkdmarc or pyspf:
dnspython is already relayd's resolver (L{relayd.delivery.routing}), so this asks
the same name servers (C{[delivery] resolvers}, C{resolver_port},
C{dns_timeout}) with the same timeouts, which is also how the tests point
it at L{relayd.testing.DNSServer}; checkdmarc would add a dozen
dependencies (publicsuffix data, an HTTP client, report and XML parsing)
for the handful of TXT lookups used here, and does not compare a
published DKIM key with a private one; pyspf evaluates SPF only, and
would be a second dependency for one of the five checks.
The evaluator is RFC 7208 section 4 and 5 (with macros, section 7) within
the section 4.6.4 limits: 10 DNS-querying terms, 2 void lookups, 10 MX or
PTR names per term.

The organisational domain (RFC 7489 section 3.2) is the public suffix
plus one label, by the Public Suffix List that Debian's C{publicsuffix}
package installs (L{relayd.ops.publicsuffix}): C{example.co.uk} for
C{mail.example.co.uk}.  Without that file it is the last two labels, and
a warning line says so (for C{mail.example.co.uk} the record would then
be looked for at C{_dmarc.co.uk}, where it is not).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import dns.reversename
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relayd.delivery.routing import NXDOMAIN, NoData, ResolverError, TemporaryDNSError
from relayd.ops import publicsuffix

__all__ = [
    "Finding",
    "OK",
    "WARN",
    "FAIL",
    "DomainDNS",
    "SPFResult",
    "checkSPF",
    "checkDomain",
    "organizationalDomain",
    "Setup",
    "setupFromConfig",
]

OK = "ok"
WARN = "warn"
FAIL = "fail"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Finding:
    """
    One answer: C{status} (L{OK}, L{WARN}, L{FAIL}), the C{check} it belongs
    to (C{spf}, C{dkim}, C{dmarc}, C{mta-sts}, C{tlsrpt}, C{setup}), what was
    found, and what to publish to fix it (or L{None}).
    """

    status: str
    check: str
    what: str
    fix: str | None = None

    def line(self) -> str:
        """C{ok|warn|fail  CHECK: WHAT  [fix: FIX]}."""
        text = f"{self.status:<4}  {self.check}: {self.what}"
        if self.fix:
            text += f"  [fix: {self.fix}]"
        return text

    def asJSON(self) -> dict[str, Any]:
        return {"status": self.status, "check": self.check, "what": self.what, "fix": self.fix}


# --- DNS -----------------------------------------------------------------------


class DomainDNS:
    """
    Blocking lookups through a dnspython resolver (L{relayd.delivery.routing.newResolver}),
    giving records or raising L{NXDOMAIN}, L{NoData} or L{TemporaryDNSError}
    as L{relayd.delivery.routing.MXResolver} does.  relayctl runs no reactor while it
    checks, so blocking is fine here.
    """

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self._resolver = resolver

    def _query(self, name: str, rdtype: str) -> Any:
        name = name.strip().rstrip(".").lower()
        try:
            qname = dns.name.from_text(name + ".")
        except dns.exception.DNSException as e:
            raise NXDOMAIN(name, rdtype, f"invalid domain name ({e})") from None
        try:
            return self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=True)
        except dns.resolver.NXDOMAIN:
            raise NXDOMAIN(name, rdtype, "no such domain") from None
        except dns.resolver.NoAnswer:
            raise NoData(name, rdtype, "no records of that type") from None
        except dns.exception.Timeout:
            raise TemporaryDNSError(name, rdtype, "timed out") from None
        except dns.resolver.NoNameservers:
            raise TemporaryDNSError(name, rdtype, "no name server answered (SERVFAIL)") from None
        except (dns.exception.DNSException, OSError) as e:
            raise TemporaryDNSError(name, rdtype, f"{type(e).__name__}: {e}") from None

    def txt(self, name: str) -> list[str]:
        """
        The TXT records of C{name}, each one's character-strings joined
        (RFC 7208 section 3.3, RFC 6376 section 3.6.2.2).
        """
        return [
            b"".join(rdata.strings).decode("utf-8", "replace") for rdata in self._query(name, "TXT")
        ]

    def addresses(self, name: str, version: int) -> list[IPAddress]:
        """The A (C{version} 4) or AAAA (6) records of C{name}."""
        answer = self._query(name, "A" if version == 4 else "AAAA")
        return [ipaddress.ip_address(rdata.address) for rdata in answer]

    def mx(self, name: str) -> list[str]:
        """The MX exchanges of C{name}, by preference; C{"."} is the null MX."""
        answer = sorted(self._query(name, "MX"), key=lambda r: r.preference)
        return [r.exchange.to_text(omit_final_dot=True).lower() or "." for r in answer]

    def ptr(self, address: IPAddress) -> list[str]:
        """The PTR names of C{address}."""
        qname = dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)
        return [r.target.to_text(omit_final_dot=True).lower() for r in self._query(qname, "PTR")]


# --- SPF (RFC 7208) ---------------------------------------------------------------------

LOOKUP_LIMIT = 10
"""DNS-querying terms allowed in one evaluation (RFC 7208 section 4.6.4)."""

VOID_LIMIT = 2
"""Lookups answering NXDOMAIN or no records allowed (RFC 7208 section 4.6.4)."""

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MODIFIER = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.*)$")
_MECHANISM = re.compile(r"^([+\-~?]?)([A-Za-z][A-Za-z0-9_.-]*)(.*)$")
_DUAL_CIDR = re.compile(r"^(?:/(\d{1,2}))?(?://(\d{1,3}))?$")
_MACRO = re.compile(r"%(?:\{([A-Za-z])(\d*)(r?)([.\-+,/_=]*)\}|(.))", re.IGNORECASE)


class SPFError(Exception):
    """A permerror or temperror (RFC 7208 sections 2.6.6 and 2.6.7)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass
class SPFResult:
    """
    The outcome of one evaluation: C{result} (C{pass}, C{fail},
    C{softfail}, C{neutral}, C{none}, C{permerror}, C{temperror}), the
    term that decided it (L{None} for the default), why (for errors), and
    how many DNS-querying terms and void lookups it took.
    """

    result: str
    term: str | None
    reason: str
    lookups: int
    voids: int


@dataclass
class _Evaluation:
    """
    State of one C{check_host()} run (RFC 7208 section 4), across its
    includes and redirects: the terms and void lookups counted so far
    (a record including itself ends at the limit), and the term that
    matched inside the last C{include:} that passed.
    """

    lookup: DomainDNS
    ip: IPAddress
    sender: str
    helo: str
    lookups: int = 0
    voids: int = 0
    included: str = ""

    def count(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise SPFError(
                "permerror",
                f"more than {LOOKUP_LIMIT} DNS-querying terms (at {term}; RFC 7208 section 4.6.4)",
            )

    def void(self, term: str) -> None:
        self.voids += 1
        if self.voids > VOID_LIMIT:
            raise SPFError(
                "permerror",
                f"more than {VOID_LIMIT} void lookups (at {term}; RFC 7208 section 4.6.4)",
            )


def _spfRecords(texts: list[str]) -> list[str]:
    """The TXT strings that are SPF records (RFC 7208 section 4.5)."""
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def _expand(spec: str, domain: str, ev: _Evaluation, term: str) -> str:
    """
    Expand the macros of a domain-spec (RFC 7208 section 7); a result
    longer than 253 octets loses labels on the left (section 7.3).
    """
    local, _, senderDomain = ev.sender.rpartition("@")
    if ev.ip.version == 4:
        ipText = str(ev.ip)
    else:
        ipText = ".".join(ev.ip.exploded.replace(":", ""))

    def one(match: re.Match[str]) -> str:
        letter, digits, reverse, delimiters, other = match.groups()
        if other is not None:
            literal = {"%": "%", "_": " ", "-": "%20"}.get(other)
            if literal is None:
                raise SPFError("permerror", f"bad macro %{other} in {term}")
            return literal
        values = {
            "s": ev.sender,
            "l": local or "postmaster",
            "o": senderDomain,
            "d": domain,
            "i": ipText,
            "p": "unknown",
            "v": "in-addr" if ev.ip.version == 4 else "ip6",
            "h": ev.helo,
        }
        value = values.get(letter.lower())
        if value is None:
            raise SPFError("permerror", f"bad macro letter {letter!r} in {term}")
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            if int(digits) == 0:
                raise SPFError("permerror", f"bad macro transformer 0 in {term}")
            parts = parts[-int(digits) :]
        result = ".".join(parts)
        if letter.isupper():
            result = urllib.parse.quote(result, safe="")
        return result

    pieces = []
    position = 0
    for match in _MACRO.finditer(spec):
        pieces.append(spec[position : match.start()])
        pieces.append(one(match))
        position = match.end()
    rest = spec[position:]
    if "%" in rest:
        raise SPFError("permerror", f"bad macro in {term}")
    pieces.append(rest)
    expanded = "".join(pieces).rstrip(".")
    while len(expanded) > 253 and "." in expanded:
        expanded = expanded.split(".", 1)[1]
    return expanded


def _domainArgument(rest: str, domain: str, ev: _Evaluation, term: str) -> str:
    """The target name of C{a}, C{mx}, C{ptr}: C{:domain-spec} or the current domain."""
    if not rest:
        return domain
    if not rest.startswith(":") or len(rest) == 1:
        raise SPFError("permerror", f"malformed term {term!r}")
    target = _expand(rest[1:], domain, ev, term)
    try:
        dns.name.from_text(target + ".")
    except dns.exception.DNSException:
        raise SPFError("permerror", f"invalid domain name {target!r} in {term}") from None
    return target


def _splitCIDR(rest: str, term: str) -> tuple[str, int, int]:
    """Split C{[:domain-spec][/ip4-cidr][//ip6-cidr]}."""
    position = rest.find("/")
    spec, cidr = (rest, "") if position < 0 else (rest[:position], rest[position:])
    match = _DUAL_CIDR.match(cidr)
    if match is None:
        raise SPFError("permerror", f"malformed prefix length in {term!r}")
    four = int(match.group(1)) if match.group(1) else 32
    six = int(match.group(2)) if match.group(2) else 128
    if four > 32 or six > 128:
        raise SPFError("permerror", f"prefix length out of range in {term!r}")
    return spec, four, six


def _inAny(ip: IPAddress, addresses: Sequence[IPAddress], four: int, six: int) -> bool:
    prefix = four if ip.version == 4 else six
    network = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
    return any(a.version == ip.version and a in network for a in addresses)


def _addressesFor(
    ev: _Evaluation, name: str, term: str, voidCounts: bool = True
) -> list[IPAddress]:
    try:
        return ev.lookup.addresses(name, ev.ip.version)
    except (NXDOMAIN, NoData):
        if voidCounts:
            ev.void(term)
        return []
    except TemporaryDNSError as e:
        raise SPFError("temperror", f"DNS error at {term}: {e}") from None


def _checkHost(ev: _Evaluation, domain: str) -> tuple[str, str | None]:
    """
    RFC 7208 section 4: the result for C{domain} and the deciding term.

    @raise SPFError: permerror or temperror.
    """
    try:
        texts = ev.lookup.txt(domain)
    except (NXDOMAIN, NoData):
        return "none", None
    except TemporaryDNSError as e:
        raise SPFError("temperror", f"DNS error: {e}") from None
    records = _spfRecords(texts)
    if not records:
        return "none", None
    if len(records) > 1:
        raise SPFError(
            "permerror", f"{domain} has {len(records)} v=spf1 records (RFC 7208 section 4.5)"
        )
    record = records[0]
    redirect: str | None = None
    seen: set[str] = set()
    directives: list[tuple[str, str, str, str]] = []
    for term in record.split()[1:]:
        modifier = _MODIFIER.match(term)
        if modifier is not None:
            name = modifier.group(1).lower()
            if name in ("redirect", "exp"):
                if name in seen:
                    raise SPFError("permerror", f"{name}= given twice in the record of {domain}")
                seen.add(name)
            if name == "redirect":
                redirect = modifier.group(2)
            continue
        mechanism = _MECHANISM.match(term)
        if mechanism is None:
            raise SPFError("permerror", f"malformed term {term!r} in the record of {domain}")
        qualifier, name, rest = mechanism.groups()
        name = name.lower()
        if name not in _MECHANISMS:
            raise SPFError(
                "permerror", f"unknown mechanism {name!r} in the record of {domain} ({term!r})"
            )
        directives.append((_QUALIFIERS[qualifier or "+"], name, rest, term))
    for result, name, rest, term in directives:
        if _matches(ev, name, rest, term, domain):
            if name == "include":
                return result, f"{ev.included}, through {term} (in the record of {domain})"
            return result, f"{term} (in the record of {domain})"
    if redirect is not None and not any(name == "all" for _, name, _, _ in directives):
        term = f"redirect={redirect}"
        ev.count(term)
        target = _expand(redirect, domain, ev, term)
        result, decided = _checkHost(ev, target)
        if result == "none":
            raise SPFError("permerror", f"{term}: {target} has no SPF record")
        return result, decided
    return "neutral", None


def _matches(ev: _Evaluation, name: str, rest: str, term: str, domain: str) -> bool:
    """Whether one mechanism matches (RFC 7208 section 5)."""
    ip = ev.ip
    if name == "all":
        if rest:
            raise SPFError("permerror", f"malformed term {term!r}")
        return True
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise SPFError("permerror", f"malformed term {term!r}")
        try:
            network = ipaddress.ip_network(rest[1:], strict=False)
        except ValueError:
            raise SPFError("permerror", f"malformed network in {term!r}") from None
        if network.version != (4 if name == "ip4" else 6):
            raise SPFError("permerror", f"malformed network in {term!r}")
        return ip.version == network.version and ip in network
    if name == "include":
        ev.count(term)
        if not rest.startswith(":") or len(rest) == 1:
            raise SPFError("permerror", f"malformed term {term!r}")
        target = _domainArgument(rest, domain, ev, term)
        result, decided = _checkHost(ev, target)
        if result == "pass":
            ev.included = decided or term
            return True
        if result == "none":
            raise SPFError("permerror", f"{term}: {target} has no SPF record")
        if result in ("permerror", "temperror"):  # pragma: no cover - raised instead
            raise SPFError(result, term)
        return False
    if name == "exists":
        ev.count(term)
        if not rest.startswith(":") or len(rest) == 1:
            raise SPFError("permerror", f"malformed term {term!r}")
        target = _domainArgument(rest, domain, ev, term)
        try:
            ev.lookup.addresses(target, 4)
        except (NXDOMAIN, NoData):
            ev.void(term)
            return False
        except TemporaryDNSError as e:
            raise SPFError("temperror", f"DNS error at {term}: {e}") from None
        return True
    spec, four, six = _splitCIDR(rest, term)
    if name == "a":
        ev.count(term)
        target = _domainArgument(spec, domain, ev, term)
        return _inAny(ip, _addressesFor(ev, target, term), four, six)
    if name == "mx":
        ev.count(term)
        target = _domainArgument(spec, domain, ev, term)
        try:
            exchanges = ev.lookup.mx(target)
        except (NXDOMAIN, NoData):
            ev.void(term)
            return False
        except TemporaryDNSError as e:
            raise SPFError("temperror", f"DNS error at {term}: {e}") from None
        if len(exchanges) > 10:
            raise SPFError("permerror", f"{term}: {target} has more than 10 MX records")
        for exchange in exchanges:
            if exchange == ".":
                continue
            addresses = _addressesFor(ev, exchange, term, voidCounts=False)
            if _inAny(ip, addresses, four, six):
                return True
        return False
    # ptr (section 5.5; "SHOULD NOT be used", but evaluated as receivers do)
    ev.count(term)
    if "/" in rest:
        raise SPFError("permerror", f"malformed term {term!r}")
    target = _domainArgument(rest, domain, ev, term)
    try:
        names = ev.lookup.ptr(ip)[:10]
    except (NXDOMAIN, NoData):
        ev.void(term)
        return False
    except TemporaryDNSError:
        return False
    for candidate in names:
        if candidate == target or candidate.endswith("." + target):
            try:
                if ip in ev.lookup.addresses(candidate, ip.version):
                    return True
            except ResolverError:
                continue
    return False


def checkSPF(
    lookup: DomainDNS, ip: IPAddress, domain: str, sender: str | None = None, helo: str = ""
) -> SPFResult:
    """
    RFC 7208 C{check_host(ip, domain, sender)} for mail from C{sender}
    (default C{postmaster@DOMAIN}) sent from C{ip}.
    """
    ev = _Evaluation(lookup, ip, sender or f"postmaster@{domain}", helo or domain)
    try:
        result, term = _checkHost(ev, domain)
    except SPFError as e:
        return SPFResult(e.result, None, e.reason, ev.lookups, ev.voids)
    return SPFResult(result, term, "", ev.lookups, ev.voids)


# --- tag lists (DKIM, DMARC, MTA-STS, TLSRPT) ------------------------------------------


def _tags(text: str) -> dict[str, str] | None:
    """
    Parse C{tag=value; tag=value}, RFC 6376 section 3.2 (DMARC uses the
    same form, RFC 7489 section 6.4): names case-insensitive, a trailing
    C{;} allowed; L{None} when malformed or a tag repeats.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, equals, value = part.partition("=")
        name = name.strip().lower()
        if not equals or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in tags:
            return None
        tags[name] = value.strip()
    return tags


def _publicKey(tags: dict[str, str]) -> bytes | None:
    """The raw key material of a DKIM record's C{p=} (whitespace dropped), or None."""
    text = re.sub(r"\s+", "", tags.get("p", ""))
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def _sameKey(published: bytes, keyType: str, configured: str) -> bool:
    """
    Whether the published key is the configured key's public half.  An
    RSA key may be published as SubjectPublicKeyInfo or, as dkimpy also
    reads it, PKCS#1 RSAPublicKey; Ed25519 as the raw 32 octets.
    """
    mine = base64.b64decode(configured)
    if keyType == "ed25519":
        return published == mine
    ours = serialization.load_der_public_key(mine)
    assert isinstance(ours, rsa.RSAPublicKey)
    try:
        theirs: Any = serialization.load_der_public_key(published)
    except ValueError:
        pem = (
            b"-----BEGIN RSA PUBLIC KEY-----\n"
            + base64.encodebytes(published)
            + b"-----END RSA PUBLIC KEY-----\n"
        )
        try:
            theirs = serialization.load_pem_public_key(pem)
        except ValueError:
            return False
    return isinstance(theirs, rsa.RSAPublicKey) and theirs.public_numbers() == ours.public_numbers()


def organizationalDomain(domain: str) -> str:
    """
    RFC 7489 section 3.2 by the Public Suffix List; the last two labels of
    C{domain} when the list is not installed (see the module docstring).
    """
    suffixes = publicsuffix.default()
    if suffixes is None:
        return ".".join(domain.lower().rstrip(".").split(".")[-2:])
    return suffixes.organizationalDomain(domain)


def _suffixListFindings() -> list[Finding]:
    """A warning when the Public Suffix List is missing (the fallback is used)."""
    if publicsuffix.default() is not None:
        return []
    return [
        Finding(
            WARN,
            "dmarc",
            f"no Public Suffix List at {publicsuffix.DEFAULT_PATH}: the organisational "
            "domain is taken as the last two labels (wrong under e.g. co.uk)",
            "install Debian's publicsuffix package",
        )
    ]


def _txtFix(name: str, text: str) -> str:
    """C{publish TXT "..." at NAME}, noting the 255-octet string limit."""
    fix = f'publish TXT "{text}" at {name}'
    if len(text.encode("utf-8")) > 255:
        fix += " (as several strings of at most 255 octets in one record)"
    return fix


# --- the checks ----------------------------------------------------------------------


@dataclass
class _Signer:
    """One key the dkim policy signs DOMAIN's mail with."""

    domain: str
    selector: str
    keyType: str
    public: str
    record: str


@dataclass
class Setup:
    """
    What relayd does that the checks compare DNS with.

    @ivar hostname: C{[server] hostname}: the SPF C{h} macro, and the
        name whose addresses relayd sends from.
    @ivar addresses: the addresses given with C{--address}, or L{None}.
    @ivar signers: the dkim policy's keys for DOMAIN.
    @ivar dkimConfigured: whether the dkim policy is in the chain at all.
    @ivar notes: findings about the setup itself (e.g. a dkim policy
        configured but not in the chain).
    """

    hostname: str
    addresses: list[IPAddress] | None = None
    signers: list[_Signer] = field(default_factory=list)
    dkimConfigured: bool = False
    notes: list[Finding] = field(default_factory=list)


def setupFromConfig(
    config: Any, domain: str, addresses: Sequence[str] = (), selector: str | None = None
) -> Setup:
    """
    Read what the checks need from a loaded L{relayd.config.Config}: the
    host name, and the dkim policy's keys for C{domain} (loaded as relayd
    loads them, so a key relayd could not use stops here too).

    @raise ValueError: an address in C{addresses} is not an IP address, or
        a dkim option is wrong (the policy's own message).
    """
    from relayd.policies.dkim import DKIMSign
    from relayd.policy import PolicyContext

    parsed = []
    for text in addresses:
        try:
            parsed.append(ipaddress.ip_address(text.strip("[]")))
        except ValueError:
            raise ValueError(f"not an IP address: {text!r}") from None
    setup = Setup(config.hostname, parsed or None)
    for route in config.routes:
        if "*" in route.domains:
            hosts = ", ".join(hop.host for hop in route.hops)
            setup.notes.append(
                Finding(
                    WARN,
                    "spf",
                    f"all mail leaves through the smart host {hosts} ([[routes]] domains "
                    '= ["*"]): receivers see its addresses, not relayd\'s; checking '
                    "relayd's own anyway",
                    f"make sure the SPF record of {domain} covers {hosts}'s outgoing "
                    "addresses (the provider documents an include: for it)",
                )
            )
    options = config.policyOptions.get("dkim")
    inChain = "dkim" in config.policyChain
    if options is None or not inChain:
        if options is not None:
            setup.notes.append(
                Finding(
                    WARN,
                    "dkim",
                    "[policies.dkim] is configured but dkim is not in [policy] chain: "
                    "relayd signs nothing",
                    'add "dkim" at the end of [policy] chain',
                )
            )
        return setup
    setup.dkimConfigured = True
    policy = DKIMSign.fromConfig(dict(options), PolicyContext(config.path, config.hostname, "dkim"))
    for signer in policy.signersFor(domain):
        if selector is not None and signer.selector != selector:
            continue
        setup.signers.append(
            _Signer(
                signer.domain,
                signer.selector,
                signer.key.keyType,
                signer.key.public,
                signer.key.dnsRecord(),
            )
        )
    return setup


_NAT_NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]
"""Private (RFC 1918, RFC 6598, RFC 4193), loopback and link-local networks:
not what a receiver sees a sender's connection come from."""


def _sendingAddresses(lookup: DomainDNS, setup: Setup) -> tuple[list[IPAddress], list[Finding]]:
    """The addresses relayd sends from, and findings about how they were found."""
    if setup.addresses is not None:
        return setup.addresses, []
    found: list[IPAddress] = []
    errors = []
    for version in (4, 6):
        try:
            found += lookup.addresses(setup.hostname, version)
        except (NXDOMAIN, NoData):
            pass
        except TemporaryDNSError as e:
            errors.append(str(e))
    findings = []
    if not found:
        why = "; ".join(errors) or "no A or AAAA records"
        findings.append(
            Finding(
                FAIL,
                "spf",
                f"cannot tell which addresses relayd sends from: its host name "
                f"{setup.hostname} ([server] hostname) has no address ({why})",
                f"publish A/AAAA records for {setup.hostname}, or name the public "
                "addresses with --address",
            )
        )
    else:
        private = [str(a) for a in found if any(a in n for n in _NAT_NETWORKS)]
        if private:
            findings.append(
                Finding(
                    WARN,
                    "spf",
                    f"{setup.hostname} resolves to non-public {', '.join(private)}: behind NAT "
                    "receivers see another address",
                    "give the public sending addresses with --address",
                )
            )
    return found, findings


def _spfFindings(lookup: DomainDNS, domain: str, setup: Setup) -> tuple[list[Finding], bool]:
    """The SPF findings, and whether every sending address passes."""
    addresses, findings = _sendingAddresses(lookup, setup)
    if not addresses:
        return findings, False
    allPass = True
    record: str | None = None
    try:
        records = _spfRecords(lookup.txt(domain))
        record = records[0] if len(records) == 1 else None
    except ResolverError:
        pass
    for ip in addresses:
        result = checkSPF(lookup, ip, domain, helo=setup.hostname)
        term = ("ip4:" if ip.version == 4 else "ip6:") + str(ip)
        if result.result == "pass":
            used = f"{result.lookups} of {LOOKUP_LIMIT} DNS lookups"
            status = WARN if result.lookups >= LOOKUP_LIMIT - 2 else OK
            findings.append(
                Finding(
                    status,
                    "spf",
                    f"{domain} authorises {ip} (pass, by {result.term}; {used})",
                )
            )
            continue
        allPass = False
        if result.result == "none":
            findings.append(
                Finding(
                    FAIL,
                    "spf",
                    f"{domain} has no SPF record: receivers cannot tell relayd's {ip} may send",
                    _txtFix(domain, f"v=spf1 {term} ~all"),
                )
            )
        elif result.result in ("permerror", "temperror"):
            fix = None
            if result.result == "permerror":
                if "DNS-querying" in result.reason:
                    fix = (
                        f"cut the record of {domain} to {LOOKUP_LIMIT} DNS lookups or fewer: "
                        'replace include:/a/mx terms with ip4:/ip6: ("flatten" it)'
                    )
                elif "void" in result.reason:
                    fix = f"remove the terms of {domain}'s record that name domains without records"
                else:
                    fix = f"correct the SPF record of {domain}"
            findings.append(
                Finding(
                    FAIL,
                    "spf",
                    f"{domain}: {result.result} for {ip}: {result.reason}",
                    fix,
                )
            )
        else:
            by = f"by {result.term}" if result.term else "no term matched"
            fix = f'add "{term}" to the SPF record of {domain}'
            if record is not None:
                fix += ': "' + record[:6] + f" {term}" + record[6:] + '"'
            findings.append(
                Finding(
                    FAIL if result.result == "fail" else WARN,
                    "spf",
                    f"{domain} does not authorise {ip} ({result.result}, {by})",
                    fix,
                )
            )
    return findings, allPass


def _dkimFindings(
    lookup: DomainDNS, domain: str, setup: Setup, selector: str | None
) -> tuple[list[Finding], list[str]]:
    """The DKIM findings, and the C{d=} domains whose keys are published right."""
    findings: list[Finding] = []
    good: list[str] = []
    if not setup.signers:
        if selector is not None:
            name = f"{selector}._domainkey.{domain}"
            try:
                texts = lookup.txt(name)
            except ResolverError as e:
                findings.append(
                    Finding(
                        FAIL,
                        "dkim",
                        f"no key at {name} ({e.reason}), and relayd has none for it either",
                        f"add a key for {domain} with selector {selector} to [policies.dkim] "
                        "domains and publish its record",
                    )
                )
                return findings, good
            findings.append(
                Finding(
                    WARN,
                    "dkim",
                    f"{name} publishes {texts[0][:60]!r}, but relayd has no key "
                    f"with selector {selector} for {domain}: it does not sign with it",
                    f'add the matching private key to [policies.dkim] domains."{domain}"',
                )
            )
            return findings, good
        if not any(f.check == "dkim" for f in setup.notes):
            findings.append(
                Finding(
                    WARN,
                    "dkim",
                    f"relayd does not sign mail from {domain}: no [policies.dkim] key for it",
                    f'add domains."{domain}" = {{ selector = "...", key = "..." }} to '
                    "[policies.dkim] and publish the key",
                )
            )
        return findings, good
    for signer in setup.signers:
        name = f"{signer.selector}._domainkey.{signer.domain}"
        fix = _txtFix(name, signer.record)
        try:
            texts = lookup.txt(name)
        except (NXDOMAIN, NoData):
            findings.append(Finding(FAIL, "dkim", f"no key published at {name}", fix))
            continue
        except TemporaryDNSError as e:
            findings.append(Finding(FAIL, "dkim", f"cannot read {name}: {e.reason}"))
            continue
        if len(texts) > 1:
            findings.append(
                Finding(
                    FAIL,
                    "dkim",
                    f"{name} has {len(texts)} TXT records: verifiers may pick any "
                    "(RFC 6376 section 3.6.2.2)",
                    fix + " and remove the others",
                )
            )
            continue
        tags = _tags(texts[0])
        if tags is None or ("v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v")):
            findings.append(
                Finding(FAIL, "dkim", f"{name} is not a valid DKIM key record: {texts[0]!r}", fix)
            )
            continue
        keyType = tags.get("k", "rsa").lower()
        published = _publicKey(tags)
        if published is None:
            findings.append(Finding(FAIL, "dkim", f"{name}: p= is not base64", fix))
        elif not published:
            findings.append(Finding(FAIL, "dkim", f"{name}: the key is revoked (empty p=)", fix))
        elif keyType != signer.keyType or not _sameKey(published, keyType, signer.public):
            findings.append(
                Finding(
                    FAIL,
                    "dkim",
                    f"{name} publishes another key (k={keyType}) than relayd signs with "
                    f"({signer.keyType}): signatures fail",
                    fix.replace("publish", "replace it by", 1),
                )
            )
        elif "y" in tags.get("t", "").split(":"):
            good.append(signer.domain)
            findings.append(
                Finding(
                    WARN,
                    "dkim",
                    f"{name} matches relayd's {signer.keyType} key but is in testing mode "
                    "(t=y): verifiers may ignore failures and results",
                    fix,
                )
            )
        else:
            good.append(signer.domain)
            findings.append(
                Finding(
                    OK, "dkim", f"{name} matches relayd's {signer.keyType} key (d={signer.domain})"
                )
            )
    return findings, good


_DMARC_VALUES = {
    "p": ("none", "quarantine", "reject"),
    "sp": ("none", "quarantine", "reject"),
    "adkim": ("r", "s"),
    "aspf": ("r", "s"),
}


def _dmarcRecord(lookup: DomainDNS, domain: str) -> tuple[str, list[str]] | str:
    """
    The DMARC records at C{_dmarc.DOMAIN}, or at the organisational
    domain's (RFC 7489 section 6.6.3): C{(name, records)}; a string on a
    DNS error.
    """
    names = [f"_dmarc.{domain}"]
    org = organizationalDomain(domain)
    if org != domain:
        names.append(f"_dmarc.{org}")
    for name in names:
        try:
            texts = lookup.txt(name)
        except (NXDOMAIN, NoData):
            continue
        except TemporaryDNSError as e:
            return f"cannot read {name}: {e.reason}"
        records = [t for t in texts if re.match(r"^v\s*=\s*DMARC1\s*(;|$)", t)]
        if records:
            return name, records
    return names[0], []


def _dmarcFindings(
    lookup: DomainDNS, domain: str, dkimDomains: list[str], spfPass: bool
) -> list[Finding]:
    assumption = f"(assuming From: and envelope sender domain {domain})"
    found = _dmarcRecord(lookup, domain)
    if isinstance(found, str):
        return [Finding(FAIL, "dmarc", found)]
    name, records = found
    suggested = _txtFix(f"_dmarc.{domain}", f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}")
    if not records:
        return [
            Finding(
                WARN,
                "dmarc",
                f"no DMARC record at {name}: receivers apply no policy and send no reports",
                suggested,
            )
        ]
    if len(records) > 1:
        return [
            Finding(
                FAIL,
                "dmarc",
                f"{name} has {len(records)} DMARC records: receivers ignore them all "
                "(RFC 7489 section 6.6.3)",
                "keep one",
            )
        ]
    tags = _tags(records[0])
    problem = None
    if tags is None:
        problem = "malformed tag list"
    elif "p" not in tags:
        problem = "no p= tag"
    else:
        for tag, allowed in _DMARC_VALUES.items():
            if tag in tags and tags[tag].lower() not in allowed:
                problem = f"{tag}={tags[tag]} (must be one of {', '.join(allowed)})"
                break
    if problem is not None or tags is None:
        return [Finding(FAIL, "dmarc", f"{name}: {problem}: {records[0]!r}", "correct the record")]
    inherited = name != f"_dmarc.{domain}"
    policy = tags.get("sp", tags["p"]) if inherited else tags["p"]
    policy = policy.lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    org = organizationalDomain(domain)
    dkimAligned = [
        d for d in dkimDomains if d == domain or (adkim == "r" and organizationalDomain(d) == org)
    ]
    ways = []
    if dkimAligned:
        ways.append(f"DKIM (d={dkimAligned[0]}, adkim={adkim})")
    if spfPass:
        # The envelope sender's domain is DOMAIN: aligned strictly and relaxed.
        ways.append(f"SPF ({domain}, aspf={aspf})")
    where = (
        f"{name} (p={policy}"
        + (", inherited from the organisational domain" if inherited else "")
        + ")"
    )
    if ways:
        return [
            Finding(
                OK,
                "dmarc",
                f"{where}: relayd's mail aligns through {' and '.join(ways)} {assumption}",
            )
        ]
    status = WARN if policy == "none" else FAIL
    return [
        Finding(
            status,
            "dmarc",
            f"{where}: relayd's mail would fail DMARC: neither an aligned DKIM signature "
            f"(adkim={adkim}) nor an aligned SPF pass (aspf={aspf}) {assumption}",
            "fix the dkim or spf findings above",
        )
    ]


_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_STS_EXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_STS_VALUE = re.compile(r"^[\x21-\x3a\x3c\x3e-\x7e]+$")


def _fieldList(text: str) -> list[tuple[str, str]] | None:
    """C{name=value} fields separated by C{;} (RFC 8461/8460 grammars)."""
    fields = []
    parts = [p.strip(" \t") for p in text.split(";")]
    if parts and parts[-1] == "":
        parts.pop()
    for part in parts:
        name, equals, value = part.partition("=")
        if not equals:
            return None
        fields.append((name, value))
    return fields


def _mtaSTSFindings(lookup: DomainDNS, domain: str) -> list[Finding]:
    name = f"_mta-sts.{domain}"
    try:
        texts = lookup.txt(name)
    except (NXDOMAIN, NoData):
        return [Finding(OK, "mta-sts", f"no record at {name} (optional; nothing to check)")]
    except TemporaryDNSError as e:
        return [Finding(FAIL, "mta-sts", f"cannot read {name}: {e.reason}")]
    records = [t for t in texts if t.startswith("v=STSv1")]
    fix = f'publish one TXT "v=STSv1; id=20260101T000000;" at {name}'
    if len(records) != 1:
        what = "no v=STSv1 record" if not records else f"{len(records)} v=STSv1 records"
        return [
            Finding(
                FAIL,
                "mta-sts",
                f"{name} has {what}: senders assume no MTA-STS (RFC 8461 section 3.1)",
                fix,
            )
        ]
    fields = _fieldList(records[0])
    problem = None
    if fields is None or not fields or fields[0] != ("v", "STSv1"):
        problem = "not of the form v=STSv1; id=...;"
    else:
        ids = [value for key, value in fields if key == "id"]
        if len(ids) != 1 or not _STS_ID.match(ids[0]):
            problem = "id= must appear once, 1 to 32 letters and digits"
        for key, value in fields[1:]:
            if key != "id" and not (_STS_EXT.match(key) and _STS_VALUE.match(value)):
                problem = f"malformed field {key}={value}"
    if problem is not None:
        return [Finding(FAIL, "mta-sts", f"{name}: {problem}: {records[0]!r}", fix)]
    return [
        Finding(
            OK,
            "mta-sts",
            f"{name} is well formed ({records[0]}); the policy at "
            f"https://mta-sts.{domain}/.well-known/mta-sts.txt was not fetched",
        )
    ]


def _tlsrptFindings(lookup: DomainDNS, domain: str) -> list[Finding]:
    name = f"_smtp._tls.{domain}"
    try:
        texts = lookup.txt(name)
    except (NXDOMAIN, NoData):
        return [Finding(OK, "tlsrpt", f"no record at {name} (optional; nothing to check)")]
    except TemporaryDNSError as e:
        return [Finding(FAIL, "tlsrpt", f"cannot read {name}: {e.reason}")]
    records = [t for t in texts if re.match(r"^v=TLSRPTv1\s*;", t)]
    fix = f'publish one TXT "v=TLSRPTv1; rua=mailto:tls-reports@{domain}" at {name}'
    if len(records) != 1:
        what = "no v=TLSRPTv1 record" if not records else f"{len(records)} v=TLSRPTv1 records"
        return [
            Finding(
                FAIL,
                "tlsrpt",
                f"{name} has {what}: senders send no reports (RFC 8460 section 3)",
                fix,
            )
        ]
    fields = _fieldList(records[0])
    problem = None
    if fields is None or fields[0] != ("v", "TLSRPTv1"):
        problem = "not of the form v=TLSRPTv1; rua=..."
    else:
        rua = [value for key, value in fields if key == "rua"]
        if len(rua) != 1:
            problem = "rua= must appear once"
        else:
            for uri in (u.strip() for u in rua[0].split(",")):
                scheme, _, rest = uri.partition(":")
                if scheme == "mailto" and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", rest):
                    continue
                if scheme == "https" and rest.startswith("//") and len(rest) > 2:
                    continue
                problem = f"rua= {uri!r} is not a mailto: or https: URI"
                break
    if problem is not None:
        return [Finding(FAIL, "tlsrpt", f"{name}: {problem}: {records[0]!r}", fix)]
    return [Finding(OK, "tlsrpt", f"{name} is well formed ({records[0]})")]


def checkDomain(
    lookup: DomainDNS, domain: str, setup: Setup, selector: str | None = None
) -> list[Finding]:
    """
    Every check of the module docstring, in order: spf, dkim, dmarc,
    mta-sts, tlsrpt.
    """
    domain = domain.strip().rstrip(".").lower()
    spf, spfPass = _spfFindings(lookup, domain, setup)
    dkim, dkimDomains = _dkimFindings(lookup, domain, setup, selector)
    dmarc = _suffixListFindings() + _dmarcFindings(lookup, domain, dkimDomains, spfPass)
    return (
        list(setup.notes)
        + spf
        + dkim
        + dmarc
        + _mtaSTSFindings(lookup, domain)
        + _tlsrptFindings(lookup, domain)
    )
