"""
DANE for SMTP (RFC 7672): TLSA records, published in DNSSEC-signed zones,
say which certificate or key an MX host must present, so that a man in
the middle can neither strip STARTTLS nor present a certificate of his own.

Three pieces:

  - L{DaneResolver} asks the configured resolver (C{[delivery] resolvers})
    whether a domain's MX RRset is secure and for the TLSA RRset
    C{_25._tcp.<mx host>}, from a thread pool of its own (dnspython is
    blocking).  relayd validates no signature itself: like Postfix, it
    sets the DO bit and trusts the AD bit of the answer, which is only
    sound when that resolver is a validating one on the same machine
    (unbound on 127.0.0.1; L{relayd.config} refuses C{dane = true} with a
    resolver elsewhere, whose AD bit any on-path attacker could set).
  - L{DanePolicy}: what the lookups came to for one MX host, a small frozen
    value the deliverer applies (L{relayd.delivery.attempt}).
  - L{matchChain}: checks the certificate chain a server presented after
    the TLS handshake against the usable records (RFC 7672 section 3,
    RFC 6698 section 2.1, RFC 7218 acronyms).

The rules (RFC 7672 section 2.2):

  - DANE applies only when the MX RRset is secure (AD set); an insecure
    MX RRset means no DANE for any of its hosts (section 2.2.1).  For a
    domain without MX records (the implicit MX), the security of the
    NODATA answer stands in for it.
  - An MX host whose address records are not secure (an unsigned zone):
    no DANE for that host (section 2.2.2); it keeps its usual TLS mode.
  - No TLSA records (NXDOMAIN or NODATA), or an answer without AD: no
    DANE for that host; the hop keeps its usual TLS mode.
  - A TLSA lookup that fails (SERVFAIL, timeout) for a host of a secure MX
    RRset: the host is not used now (deferred, never delivered in plain
    text), as an attacker could make the lookup fail to strip DANE.
  - Usable records: TLS is mandatory and the certificate must match one
    of them (L{matchChain}); no STARTTLS or no match defers that hop and
    the next MX host is tried, never plain text.  A DANE-TA(2) record that
    publishes the trust anchor in full ("2 0 0", "2 1 0") also serves when
    the server leaves the anchor out of its chain (RFC 7671 section 5.2.2).
  - Records present but none usable (PKIX-TA(0) and PKIX-EE(1) are
    unusable for SMTP, section 3.1.3; unknown usages, selectors or
    matching types; a digest of the wrong length): TLS is still mandatory
    but the certificate is not checked (section 2.2, "mandatory
    unauthenticated TLS").
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.wire
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from relayd.delivery.routing import newResolver

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "DanePolicy",
    "DaneResolver",
    "NO_DANE",
    "TLSARecord",
    "isLoopbackResolver",
    "matchChain",
    "tlsaName",
]

DANE_TA = 2
"""Certificate usage DANE-TA(2): a trust anchor of the server's chain."""

DANE_EE = 3
"""Certificate usage DANE-EE(3): the server's own certificate or key."""

_SELECTORS = (0, 1)
"""Cert(0): the whole certificate, DER; SPKI(1): its SubjectPublicKeyInfo."""

_DIGEST_LENGTHS = {1: 32, 2: 64}
"""Matching types SHA2-256(1) and SHA2-512(2) and their digest lengths."""


@dataclass(frozen=True)
class TLSARecord:
    """
    One TLSA record (RFC 6698 section 2.1).

    @ivar usage: certificate usage (2 DANE-TA, 3 DANE-EE; 0 and 1 are
        unusable for SMTP).
    @ivar selector: 0 full certificate, 1 SubjectPublicKeyInfo.
    @ivar mtype: matching type: 0 exact, 1 SHA-256, 2 SHA-512.
    @ivar data: the certificate association data.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """
        Whether relayd can use this record (RFC 7672 section 3.1.3:
        PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP; RFC 6698 section
        4.1: records with unknown parameters are unusable; a digest of the
        wrong length can match nothing and is unusable too).
        """
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in _SELECTORS:
            return False
        if self.mtype == 0:
            return bool(self.data)
        return _DIGEST_LENGTHS.get(self.mtype) == len(self.data)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True)
class DanePolicy:
    """
    What DANE asks of one MX host, from L{DaneResolver.policy}.

    @ivar records: every TLSA record found in a secure answer (empty: no
        DANE for this host).
    @ivar usable: those of them relayd can match against (a subset).
    @ivar tlsaBase: the name the records were found for (the MX host
        name), a name the certificate may carry under DANE-TA.
    @ivar error: the TLSA lookup failed for a host of a secure MX RRset:
        the host must not be used now (RFC 7672 section 2.2).
    """

    records: tuple[TLSARecord, ...] = ()
    usable: tuple[TLSARecord, ...] = ()
    tlsaBase: str = ""
    error: str | None = None

    @property
    def mode(self) -> str:
        """
        C{"dane"} (usable records: TLS with a matching certificate),
        C{"dane-unusable"} (records, none usable: TLS mandatory, not
        authenticated), C{"dane-error"} (lookup failed: do not use the
        host) or C{"none"}.
        """
        if self.error is not None:
            return "dane-error"
        if self.usable:
            return "dane"
        if self.records:
            return "dane-unusable"
        return "none"


NO_DANE = DanePolicy()
"""No DANE: the hop's own TLS mode applies."""


def tlsaName(host: str, port: int = 25) -> str:
    """The TLSA owner name of C{host} (RFC 6698 section 3, RFC 7672 section 2.2.3)."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


def isLoopbackResolver(address: str) -> bool:
    """Whether C{address} is a loopback address (a resolver on this host)."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _exchange(address: str, port: int, wire: bytes, timeout: float, tcp: bool) -> bytes:
    """
    Send one query to C{address} and return the response's octets as they
    came: over UDP, the first datagram from that address and port whose ID
    is the query's (others are ignored, as dnspython's own UDP query does);
    over TCP, the one length-prefixed message (RFC 1035 section 4.2.2).

    @raise OSError: (C{TimeoutError} among them) when no answer came in time.
    @raise EOFError: when the server closed the TCP connection early.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    deadline = time.monotonic() + timeout
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        if tcp:
            sock.connect((address, port))
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", _receive(sock, 2, deadline))
            return _receive(sock, length, deadline)
        sock.sendto(wire, (address, port))
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data, peer = sock.recvfrom(65535)
            if _samePeer(peer, address, port) and data[:2] == wire[:2]:
                return data


def _samePeer(peer: Sequence[object], address: str, port: int) -> bool:
    """Whether a datagram came from C{address} and C{port} (any spelling of the address)."""
    try:
        return peer[1] == port and ipaddress.ip_address(str(peer[0])) == ipaddress.ip_address(
            address
        )
    except (ValueError, IndexError, TypeError):
        return False


def _receive(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Exactly C{count} octets from a TCP socket, before C{deadline}."""
    data = b""
    while len(data) < count:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EOFError("connection closed by the name server")
        data += chunk
    return data


class _TolerantNameserver(dns.nameserver.Do53Nameserver):
    """
    A name server (DNS over UDP, then TCP when the answer is truncated) whose
    answers dnspython parses with C{continue_on_error}: a record it refuses
    (dnspython 2.8 and later refuse a TLSA digest of the wrong length) is
    left out of the parsed answer instead of throwing the whole answer away.
    One broken record would otherwise look like a failed lookup and defer
    the mail to that host for good, where RFC 6698 section 4.1 and RFC 7672
    section 3.1.3 make only that record unusable.  L{_tlsaRecords} reads
    the TLSA records from the response's octets (C{Message.wire}), the
    broken ones among them, so that L{TLSARecord.usable} judges each.

    Only dnspython's public interface is used (a resolver takes
    L{dns.nameserver.Nameserver} objects); the response is still checked to
    answer the query (ID and question, L{dns.message.Message.is_response}).
    """

    def query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        data = _exchange(self.address, self.port, request.to_wire(), timeout, max_size)
        response = dns.message.from_wire(
            data,
            keyring=request.keyring,
            request_mac=request.mac,
            one_rr_per_rrset=one_rr_per_rrset,
            ignore_trailing=ignore_trailing,
            continue_on_error=True,
        )
        if not request.is_response(response):
            raise dns.query.BadResponse
        if not max_size and response.flags & dns.flags.TC:
            raise dns.message.Truncated(message=response)  # type: ignore[no-untyped-call]
        return response


def _tolerant(resolver: dns.resolver.Resolver) -> dns.resolver.Resolver:
    """C{resolver} asking its name servers through L{_TolerantNameserver}s."""
    servers: list[dns.nameserver.Nameserver] = []
    for server in resolver.nameservers:
        if isinstance(server, str):
            servers.append(_TolerantNameserver(server, resolver.port))
        elif isinstance(server, dns.nameserver.Do53Nameserver):
            servers.append(_TolerantNameserver(server.address, server.port))
        else:
            servers.append(server)
    resolver.nameservers = servers
    return resolver


def _tlsaRecords(response: dns.message.Message | None) -> tuple[TLSARecord, ...]:
    """
    The TLSA records of the answer section of C{response}, read from its
    octets as sent (RFC 1035 section 4.1; RFC 6698 section 2.1 for the
    rdata: usage, selector, matching type, then the association data), so
    that none is refused for its content here.  An answer that does not
    parse as far as the TLSA records gives what was read up to there.
    """
    wire = response.wire if response is not None else None
    if not wire:
        return ()
    parser = dns.wire.Parser(wire)
    records: list[TLSARecord] = []
    try:
        _id, _flags, questions, answers = parser.get_struct("!HHHH")
        parser.seek(12)
        for _ in range(questions):
            dns.name.from_wire_parser(parser)
            parser.get_struct("!HH")
        for _ in range(answers):
            dns.name.from_wire_parser(parser)
            rdtype, rdclass, _ttl, length = parser.get_struct("!HHIH")
            rdata = parser.get_bytes(length)
            if rdtype == dns.rdatatype.TLSA and rdclass == dns.rdataclass.IN and length >= 3:
                records.append(TLSARecord(rdata[0], rdata[1], rdata[2], rdata[3:]))
    except dns.exception.DNSException:
        pass
    return tuple(records)


class DaneResolver:
    """
    MX security and TLSA lookups with the DO bit, in a thread pool of its
    own (started on first use, stopped at reactor shutdown or L{stop}).

    relayd trusts the AD bit of the answers (RFC 4035 section 3.2.3, RFC
    6840 section 5.7 asks for it by setting AD in the query), as Postfix
    does with C{smtp_dns_support_level = dnssec}: only safe with a
    validating resolver on this host.  No cache here: that resolver
    caches, and a delivery asks once per MX host tried.
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[str] | None = None,
        port: int = 53,
        timeout: float = 5.0,
        threads: int = 2,
    ) -> None:
        self._reactor = reactor
        self._resolver = _tolerant(newResolver(nameservers, port, timeout))
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="relayd-dane")
        self._started = False

    def stop(self) -> None:
        """Stop the thread pool; lookups after this fail (as temporary errors)."""
        if self._started and not self._pool.joined:
            self._pool.stop()

    def _run(self, rdtype: str, name: str) -> Deferred[tuple[str, list[Any], bool]]:
        if not self._started:
            self._started = True
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        if self._pool.joined:
            return succeed(("error: resolver stopped", [], False))
        return deferToThreadPool(self._reactor, self._pool, self._query, rdtype, name)

    def _query(self, rdtype: str, name: str) -> tuple[str, list[Any], bool]:
        """
        In a pool thread: C{(outcome, rdatas, secure)} where outcome is
        C{"answer"}, C{"nodata"}, C{"nxdomain"} or C{"error: ..."}, and
        secure says whether the answer came with AD.  For C{TLSA} the
        rdatas are L{TLSARecord}s read from the response's octets
        (L{_tlsaRecords}): an answer whose only records dnspython refused
        is still an answer.
        """
        qname = dns.name.from_text(name.rstrip(".") + ".")
        try:
            answer = self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as e:
            responses = list(e.kwargs.get("responses", {}).values())
            return "nxdomain", [], bool(responses) and _secure(responses[0])
        except dns.resolver.NoAnswer as e:
            response = e.kwargs.get("response")
            if rdtype == "TLSA" and (records := _tlsaRecords(response)):
                return "answer", list(records), _secure(response)
            return "nodata", [], _secure(response)
        except (dns.exception.DNSException, OSError) as e:
            text = (str(e).strip() or type(e).__name__).splitlines()[0]
            return f"error: {text}", [], False
        if rdtype == "TLSA":
            return "answer", list(_tlsaRecords(answer.response)), _secure(answer.response)
        return "answer", list(answer), _secure(answer.response)

    def mxSecure(self, domain: str) -> Deferred[bool]:
        """
        Whether C{domain}'s MX RRset (or its NODATA answer: the implicit
        MX) is DNSSEC-validated (RFC 7672 section 2.2.1).  A failed lookup
        counts as not secure: routing already asked for the MX records
        and got an answer, and a resolver that fails now fails the TLSA
        lookups as well.
        """
        d = self._run("MX", domain)
        return d.addCallback(lambda r: r[0] in ("answer", "nodata") and r[2])

    def validates(self) -> Deferred[bool]:
        """
        Whether the resolver looks like a validating one: the root zone is
        signed, so a validating resolver answers a question about it with
        AD (RFC 4035 section 3.2.3); one that does not validate never sets
        AD, and DANE would then never apply.  For C{relayctl route}, to
        tell "the domain is not signed" from "DANE cannot be checked here".
        """
        d = self._run("SOA", ".")
        return d.addCallback(lambda r: r[0] in ("answer", "nodata", "nxdomain") and r[2])

    def hostSecure(self, host: str) -> Deferred[bool]:
        """
        Whether C{host}'s address records are DNSSEC-validated (its A
        RRset, or a secure NODATA for an IPv6-only host): DANE applies
        only to an MX host in a signed zone (RFC 7672 section 2.2.2).
        """
        d = self._run("A", host)
        return d.addCallback(lambda r: r[0] in ("answer", "nodata") and r[2])

    def lookupTLSA(self, host: str, port: int = 25) -> Deferred[DanePolicy]:
        """
        The TLSA records of C{host}'s SMTP port, as a L{DanePolicy}: no
        records, or an insecure answer, is L{NO_DANE}; a failed lookup
        is a policy with C{error} set.
        """
        name = tlsaName(host, port)

        def answered(result: tuple[str, list[Any], bool]) -> DanePolicy:
            outcome, rdatas, secure = result
            if outcome.startswith("error"):
                return DanePolicy(
                    tlsaBase=host, error=f"TLSA lookup for {name} failed: {outcome[7:]}"
                )
            if outcome != "answer" or not secure:
                return NO_DANE
            records = tuple(r for r in rdatas if isinstance(r, TLSARecord))
            usable = tuple(r for r in records if r.usable)
            return DanePolicy(records, usable, host.rstrip(".").lower())

        def failed(failure: Any) -> DanePolicy:
            return DanePolicy(
                tlsaBase=host, error=f"TLSA lookup for {name} failed ({failure.getErrorMessage()})"
            )

        return self._run("TLSA", name).addCallbacks(answered, failed)


def _secure(response: dns.message.Message | None) -> bool:
    """Whether C{response} carries the AD bit (RFC 4035 section 3.2.3)."""
    return response is not None and bool(response.flags & dns.flags.AD)


# --- matching ----------------------------------------------------------------


def _selected(certificate: x509.Certificate, selector: int) -> bytes:
    """The octets a record's selector names: the DER certificate or its SPKI."""
    if selector == 0:
        return certificate.public_bytes(serialization.Encoding.DER)
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _matches(record: TLSARecord, certificate: x509.Certificate) -> bool:
    """Whether C{certificate} matches C{record} (RFC 6698 section 2.1.3)."""
    data = _selected(certificate, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _issued(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether C{issuer} signed C{child} (names chain and signature holds)."""
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _nameMatches(certificate: x509.Certificate, names: Sequence[str]) -> bool:
    """Whether the certificate is valid for one of C{names} (RFC 6125, RFC 7672 section 3.2.2)."""
    for name in names:
        try:
            verify_certificate_hostname(certificate, name)
        except (VerificationError, ValueError):
            continue
        return True
    return False


def _anchorOf(record: TLSARecord) -> x509.Certificate | PublicKeyTypes | None:
    """
    The trust anchor a DANE-TA(2) record with matching type Full(0) carries
    in full: the certificate (selector Cert(0)) or the public key (selector
    SPKI(1)); None for a digest record or data that does not parse (that
    record then matches only a certificate of the chain, or nothing).
    """
    if record.usage != DANE_TA or record.mtype != 0:
        return None
    try:
        if record.selector == 0:
            return x509.load_der_x509_certificate(record.data)
        return serialization.load_der_public_key(record.data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def _signedByKey(certificate: x509.Certificate, key: PublicKeyTypes) -> bool:
    """
    Whether C{key} made C{certificate}'s signature.  A bare key has no name
    to compare with the certificate's issuer: the signature is the whole
    check, as RFC 7671 section 5.2.2 has it for a TA published as a key.
    """
    data, signature = certificate.tbs_certificate_bytes, certificate.signature
    try:
        if isinstance(key, rsa.RSAPublicKey):
            padding = certificate.signature_algorithm_parameters
            algorithm = certificate.signature_hash_algorithm
            if not isinstance(padding, AsymmetricPadding) or algorithm is None:
                return False
            key.verify(signature, data, padding, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = certificate.signature_hash_algorithm
            if algorithm is None:
                return False
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _issuedByAnchor(
    certificate: x509.Certificate, anchor: x509.Certificate | PublicKeyTypes
) -> bool:
    """Whether the trust anchor of a Full(0) DANE-TA record issued C{certificate}."""
    if isinstance(anchor, x509.Certificate):
        return _issued(certificate, anchor)
    return _signedByKey(certificate, anchor)


def _checkLeaf(policy: DanePolicy, leaf: x509.Certificate, host: str) -> str | None:
    """
    What DANE-TA(2) asks of the leaf once its chain leads to a trust anchor
    (RFC 7672 section 3.1.2, 3.2.2): within its validity dates, and a name
    that is the MX host name or the TLSA base domain.
    """
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return "certificate is expired or not yet valid (DANE-TA)"
    names = [host.rstrip(".").lower()]
    if policy.tlsaBase and policy.tlsaBase not in names:
        names.append(policy.tlsaBase)
    if not _nameMatches(leaf, names):
        return f"certificate name does not match {' or '.join(names)} (DANE-TA)"
    return None


def matchChain(policy: DanePolicy, chain: Sequence[x509.Certificate], host: str) -> str | None:
    """
    Check the chain a server presented (leaf first) against the usable
    records of C{policy}.

    DANE-EE(3): the leaf must match; neither its names nor its dates are
    checked (RFC 7672 section 3.1.1).  DANE-TA(2): some certificate of the
    chain must match, every certificate from the leaf up to it must be
    issued by the next, the leaf must be within its validity dates and
    carry the MX host name or the TLSA base domain (section 3.1.2, 3.2.2).

    A DANE-TA(2) record that publishes the trust anchor in full ("2 0 0",
    the certificate; "2 1 0", its public key) serves even when the server
    leaves the anchor out of its chain (RFC 7671 section 5.2.2, which RFC
    7672 section 3.1.2 defers to): then some certificate of the chain, with
    every one below it issued by the next, must be signed by that
    certificate (names and signature) or that key (signature), and the same
    date and name checks apply to the leaf.  A digest record ("2 x 1",
    "2 x 2") cannot stand in for a missing anchor: there is nothing to
    check a signature with.

    @return: None when a record matches, else why not (for the log and the
        deferral text).
    """
    if not chain:
        return "no certificate presented"
    leaf = chain[0]
    for record in policy.usable:
        if record.usage == DANE_EE and _matches(record, leaf):
            return None
    taRecords = [r for r in policy.usable if r.usage == DANE_TA]
    if not taRecords:
        return "certificate matches no TLSA record"
    for depth, certificate in enumerate(chain):
        if not any(_matches(r, certificate) for r in taRecords):
            continue
        if not all(_issued(chain[i], chain[i + 1]) for i in range(depth)):
            return f"chain does not lead to the DANE-TA trust anchor at depth {depth}"
        return _checkLeaf(policy, leaf, host)
    # The anchor is not in the chain: a Full(0) record may still carry it.
    anchors = [a for a in (_anchorOf(r) for r in taRecords) if a is not None]
    for anchor in anchors:
        for depth, certificate in enumerate(chain):
            if not all(_issued(chain[i], chain[i + 1]) for i in range(depth)):
                break
            if _issuedByAnchor(certificate, anchor):
                return _checkLeaf(policy, leaf, host)
    if anchors:
        return "certificate chain is not signed by the DANE-TA trust anchor published in full"
    return "certificate chain matches no TLSA record"
