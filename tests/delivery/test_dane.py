"""
DANE for MX delivery (RFC 7672), end to end on loopback: the project's DNS
test server publishes MX, A and TLSA records and sets the AD bit for zones
marked secure (what a local validating resolver does), routing asks it for
the MX hosts, and relayd's deliverer talks SMTP with STARTTLS to sinks whose
certificates are made in the test.  Nothing is mocked: the TLSA digests are
those of the certificates the sinks present.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import replace

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.certificates import issueCertificate, loadServerOptions, makeCA, writeKeyPair
from relayd.config import ConfigError, load
from relayd.delivery.attempt import AttemptResult, Deliverer, RecipientResult
from relayd.delivery.client import Reply
from relayd.delivery.dane import DanePolicy, DaneResolver, TLSARecord, matchChain
from relayd.delivery.processes import DeliverRequest, decode, encode
from relayd.delivery.requiretls import POLICY_WAIVED
from relayd.delivery.routing import Destination, Hop, MXResolver, Router
from relayd.ops import relayctl
from relayd.testing.dnsserver import DNSServer
from relayd.testing.sink import SinkServer
from tests.delivery.test_attempt import FAST
from tests.delivery.test_attempt_e2e import DeliveryTestCase as E2ECase

DOMAIN = "example.test"
MX1 = "mx1.example.test"
MX2 = "mx2.example.test"


@defer.inlineCallbacks
def waitUntil(condition, timeout=10.0):
    """Let the reactor run until C{condition()} is true."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out")
        yield deferLater(reactor, 0.02, lambda: None)


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(pem: bytes) -> bytes:
    return (
        x509.load_pem_x509_certificate(pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class DaneTestCase(unittest.TestCase):
    """
    A DNS server with C{example.test} (secure: AD set) and C{insecure.test}
    (no AD), up to two MX hosts on 127.0.0.1 and 127.0.0.2 on one port,
    and a deliverer with DANE on.
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-dane-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.dnsServer = DNSServer()
        self.dnsPort = self.dnsServer.start(reactor)
        self.addCleanup(self.dnsServer.stop)
        self.dnsServer.setSecure(DOMAIN)
        self.resolver = MXResolver(reactor, ["127.0.0.1"], port=self.dnsPort, timeout=2)
        self.resolver.start()
        self.addCleanup(self.resolver.stop)
        self.caCert, self.caKey = makeCA("DANE test CA")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.port = 0

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def certificate(self, host: str, name: str | None = None, chain: bool = False):
        """A certificate for C{host} from the test CA: (leaf PEM, options)."""
        cert, key = issueCertificate(self.caCert, self.caKey, host)
        stem = name or host
        writeKeyPair(
            self.path(stem + ".crt"),
            self.path(stem + ".key"),
            cert + (self.caCert if chain else b""),
            key,
        )
        return cert, loadServerOptions(self.path(stem + ".crt"), self.path(stem + ".key"))

    def sink(self, address: str, options=None) -> SinkServer:
        sink = SinkServer()
        sink.start(reactor, interface=address, port=self.port, tlsOptions=options)
        self.port = sink.port
        self.addCleanup(sink.stop)
        return sink

    def mx(self, domain: str, *hosts: tuple[str, str]) -> None:
        """Publish C{domain}'s MX hosts, C{(name, address)} in preference order."""
        self.dnsServer.setMX(domain, [(10 * (i + 1), name) for i, (name, _) in enumerate(hosts)])
        for name, address in hosts:
            self.dnsServer.setA(name, [address])

    def tlsa(self, host: str, records) -> None:
        """
        Publish C{host}'s TLSA records for the sinks' port (RFC 6698
        section 3: the owner name carries the port; 25 in real use).
        """
        self.dnsServer.setTLSA(f"_{self.port}._tcp.{host}", records)

    def deliverer(self, dane: bool = True) -> Deliverer:
        resolver = (
            DaneResolver(reactor, ["127.0.0.1"], port=self.dnsPort, timeout=2) if dane else None
        )
        deliverer = Deliverer(reactor, "relay.test", timeouts=FAST, dane=resolver)
        self.addCleanup(deliverer.stop)
        return deliverer

    @defer.inlineCallbacks
    def deliver(self, domain=DOMAIN, requireTLS=False, dane=True, **options):
        router = Router(self.resolver, port=self.port)
        destination = yield router.route(domain)
        path = self.path("message")
        with open(path, "wb") as f:
            f.write(b"Subject: dane\r\n\r\nbody\r\n")
        result = yield self.deliverer(dane).deliver(
            destination,
            "from@relay.test",
            [f"to@{domain}"],
            path,
            os.path.getsize(path),
            queueId="DANE1",
            requireTLS=requireTLS,
            **options,
        )
        return result

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class MatchingTests(DaneTestCase):
    """DANE-EE and DANE-TA with each selector and matching type."""

    @defer.inlineCallbacks
    def check(self, records, chain=False):
        cert, options = self.certificate(MX1, chain=chain)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, records(cert))
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered", result.results[0].reply)
        self.assertEqual(result.policy, "dane")
        self.assertEqual(result.hop.tls, "dane")
        self.assertIsNotNone(result.tls)
        self.assertEqual(len(sink.messages), 1)
        self.assertIn("policy=dane", self.logged())

    def test_eeSpkiSha256(self):
        """3 1 1: the leaf's key, SHA-256."""
        return self.check(lambda cert: [(3, 1, 1, sha256(spki(cert)))])

    @defer.inlineCallbacks
    def test_sniNamesTheMXHost(self):
        """The client sends SNI with the TLSA base domain (RFC 7672 section 8.1)."""
        cert, options = self.certificate(MX1)
        names = []
        options.getContext().set_tlsext_servername_callback(
            lambda connection: names.append(connection.get_servername())
        )
        self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(spki(cert)))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(names, [MX1.encode("ascii")])

    def test_eeCertSha256(self):
        """3 0 1: the whole leaf certificate, SHA-256."""
        return self.check(lambda cert: [(3, 0, 1, sha256(der(cert)))])

    def test_eeSpkiSha512(self):
        """3 1 2: the leaf's key, SHA-512."""
        return self.check(lambda cert: [(3, 1, 2, hashlib.sha512(spki(cert)).digest())])

    def test_eeCertExact(self):
        """3 0 0: the whole certificate itself."""
        return self.check(lambda cert: [(3, 0, 0, der(cert))])

    def test_taSpkiSha256(self):
        """2 1 1: the test CA's key as trust anchor, sent in the chain."""
        return self.check(lambda cert: [(2, 1, 1, sha256(spki(self.caCert)))], chain=True)

    def test_taFullKeyNotInChain(self):
        """
        2 1 0: the CA's public key published in full, the server sends only
        its leaf; the key verifies the leaf's signature (RFC 7671 section
        5.2.2).
        """
        return self.check(lambda cert: [(2, 1, 0, spki(self.caCert))])

    def test_taFullCertNotInChain(self):
        """2 0 0: the CA certificate published in full, left out of the chain."""
        return self.check(lambda cert: [(2, 0, 0, der(self.caCert))])

    @defer.inlineCallbacks
    def test_eeNameNotChecked(self):
        """
        DANE-EE ignores the certificate's names (RFC 7672 section 3.1.1): a
        certificate for another name whose key is published is accepted.
        """
        cert, options = self.certificate("other.invalid")
        self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(spki(cert)))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(result.policy, "dane")

    def test_unknownUsageIgnored(self):
        """
        A record with a usage relayd cannot use (PKIX-EE 1, unknown 7) is
        skipped; the usable one beside it decides.
        """
        return self.check(
            lambda cert: [
                (1, 1, 1, sha256(b"nothing")),
                (7, 1, 1, sha256(b"nothing")),
                (3, 1, 1, sha256(spki(cert))),
            ]
        )

    def test_brokenHashBesideGoodRecord(self):
        """A digest of the wrong length is unusable, not fatal to the RRset."""
        return self.check(lambda cert: [(3, 1, 1, b"\x01" * 5), (3, 1, 1, sha256(spki(cert)))])


class EnforcementTests(DaneTestCase):
    """A usable TLSA RRset makes TLS and a matching certificate mandatory."""

    @defer.inlineCallbacks
    def test_mismatchDeferred(self):
        """No record matches: deferred with 4.7.5, logged, nothing sent."""
        _cert, options = self.certificate(MX1)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"another key"))])
        result = yield self.deliver()
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.5"))
        self.assertIn("DANE", r.text)
        self.assertIn("matches no TLSA record", r.text)
        self.assertEqual(result.policy, "dane")
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.verbs())
        self.assertIn("matches no TLSA record", self.logged())

    @defer.inlineCallbacks
    def test_mismatchThenNextMX(self):
        """The first MX host fails the check; the second matches and takes it."""
        _cert1, options1 = self.certificate(MX1)
        cert2, options2 = self.certificate(MX2)
        sink1 = self.sink("127.0.0.1", options1)
        sink2 = self.sink("127.0.0.2", options2)
        self.mx(DOMAIN, (MX1, "127.0.0.1"), (MX2, "127.0.0.2"))
        self.tlsa(MX1, [(3, 1, 1, sha256(spki(cert2)))])
        self.tlsa(MX2, [(3, 1, 1, sha256(spki(cert2)))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(result.hop.host, MX2)
        self.assertEqual(sink1.messages, [])
        self.assertEqual(len(sink2.messages), 1)

    @defer.inlineCallbacks
    def test_taWrongNameDeferred(self):
        """DANE-TA checks the name: a certificate for another host fails."""
        _cert, options = self.certificate("elsewhere.test", chain=True)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(2, 1, 1, sha256(spki(self.caCert)))])
        result = yield self.deliver()
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), ("deferred", "4.7.5"))
        self.assertIn("name does not match", r.text)
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def deferredWithout(self, records, why, host=MX1):
        """The leaf alone (no CA in the chain) against C{records}: deferred."""
        _cert, options = self.certificate(host)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, records)
        result = yield self.deliver()
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.5"), r.text)
        self.assertIn(why, r.text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.verbs())

    def test_taFullKeyOfAnotherCADeferred(self):
        """2 1 0 with a key that did not sign the leaf: deferred."""
        other, _ = makeCA("not the issuer")
        return self.deferredWithout(
            [(2, 1, 0, spki(other))], "not signed by the DANE-TA trust anchor"
        )

    def test_taFullCertOfAnotherCADeferred(self):
        """2 0 0 with a certificate that did not sign the leaf: deferred."""
        other, _ = makeCA("not the issuer")
        return self.deferredWithout(
            [(2, 0, 0, der(other))], "not signed by the DANE-TA trust anchor"
        )

    def test_taFullKeyWrongNameDeferred(self):
        """The key verifies the leaf, but DANE-TA still checks its name."""
        return self.deferredWithout(
            [(2, 1, 0, spki(self.caCert))], "name does not match", host="elsewhere.test"
        )

    def test_taDigestNotInChainDeferred(self):
        """
        2 1 1: a digest cannot stand in for an anchor the server left out
        (nothing to check the leaf's signature with).
        """
        return self.deferredWithout(
            [(2, 1, 1, sha256(spki(self.caCert)))], "chain matches no TLSA record"
        )

    @defer.inlineCallbacks
    def test_noSTARTTLSDeferred(self):
        """
        A host with TLSA records that offers no STARTTLS is never given the
        message in plain text.
        """
        sink = self.sink("127.0.0.1", None)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"key"))])
        result = yield self.deliver()
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), ("deferred", "4.7.4"))
        self.assertIn("TLS is required", r.text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.verbs())

    @defer.inlineCallbacks
    def test_tlsaLookupFailureDeferred(self):
        """
        SERVFAIL on the TLSA lookup of a secure MX host: not contacted at
        all (an attacker could cause the failure to strip DANE).
        """
        _cert, options = self.certificate(MX1)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.dnsServer.setServfail(f"_{self.port}._tcp.{MX1}")
        result = yield self.deliver()
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), ("deferred", "4.7.5"))
        self.assertIn("TLSA lookup", r.text)
        self.assertEqual(sink.connections, 0)

    @defer.inlineCallbacks
    def test_requireTLSAcceptsDaneHop(self):
        """A DANE-verified hop counts as verified TLS for REQUIRETLS (RFC 8689)."""
        cert, options = self.certificate("not-the-mx.invalid")
        sink = self.sink("127.0.0.1", options)
        sink.advertise.append("REQUIRETLS")
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(spki(cert)))])
        result = yield self.deliver(requireTLS=True)
        self.assertEqual(result.results[0].status, "delivered", result.results[0].reply)
        self.assertIn("REQUIRETLS", sink.messages[0].mailParameters)


class NotAppliedTests(DaneTestCase):
    """When DANE does not apply, or applies without authentication."""

    @defer.inlineCallbacks
    def test_unusableOnlyTLSWithoutVerification(self):
        """
        Records, none usable (PKIX usages, a broken digest): TLS mandatory,
        the certificate not checked (RFC 7672 section 2.2).
        """
        _cert, options = self.certificate(MX1)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(1, 1, 1, sha256(b"x")), (3, 1, 1, b"\x00" * 7)])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(result.policy, "dane-unusable")
        self.assertEqual(result.hop.tls, "required")
        self.assertIsNotNone(result.tls)
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_unusableOnlyNoSTARTTLSDeferred(self):
        """... and so a host without STARTTLS gets nothing."""
        sink = self.sink("127.0.0.1", None)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(0, 0, 1, sha256(b"x"))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "deferred")
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_insecureZoneNotApplied(self):
        """
        An MX RRset without AD (an unsigned zone): no DANE, even though a
        TLSA record that would not match is there (RFC 7672 section 2.2.1).
        """
        _cert, options = self.certificate("mx.insecure.test")
        sink = self.sink("127.0.0.1", options)
        self.mx("insecure.test", ("mx.insecure.test", "127.0.0.1"))
        self.tlsa("mx.insecure.test", [(3, 1, 1, sha256(b"other"))])
        result = yield self.deliver("insecure.test")
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.policy)
        self.assertEqual(result.hop.tls, "opportunistic")
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(self.dnsServer.queryCount(type="52"), 0)

    @defer.inlineCallbacks
    def test_insecureTLSAAnswerNotApplied(self):
        """A secure MX but a TLSA answer without AD: no DANE for that host."""
        _cert, options = self.certificate("mx.other.test")
        self.sink("127.0.0.1", options)
        self.mx(DOMAIN, ("mx.other.test", "127.0.0.1"))
        self.tlsa("mx.other.test", [(3, 1, 1, sha256(b"other"))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.policy)

    @defer.inlineCallbacks
    def test_insecureHostNotApplied(self):
        """
        A secure MX RRset naming a host in an unsigned zone: no DANE for
        that host (RFC 7672 section 2.2.2), even with secure TLSA records.
        """
        _cert, options = self.certificate("mx.plain.test")
        self.sink("127.0.0.1", options)
        self.mx(DOMAIN, ("mx.plain.test", "127.0.0.1"))
        self.dnsServer.setSecure(f"_{self.port}._tcp.mx.plain.test")
        self.tlsa("mx.plain.test", [(3, 1, 1, sha256(b"other"))])
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.policy)

    @defer.inlineCallbacks
    def test_noTLSARecords(self):
        """A secure zone without TLSA records: the hop's own TLS mode."""
        self.sink("127.0.0.1", None)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        result = yield self.deliver()
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.policy)
        self.assertIsNone(result.tls)

    @defer.inlineCallbacks
    def test_tlsRequiredNoIgnoresDane(self):
        """
        C{TLS-Required: No} (RFC 8689 section 4.2.2): the sender waives the
        recipient domain's policies, DANE among them.  TLSA records that the
        certificate does not match: no TLSA lookup at all, delivered with
        opportunistic TLS, and the result says why no policy applied.
        """
        _cert, options = self.certificate(MX1)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"not this key"))])
        result = yield self.deliver(tlsOptional=True)
        self.assertEqual(result.results[0].status, "delivered", result.results[0].reply)
        self.assertEqual(result.policy, POLICY_WAIVED)
        self.assertEqual(result.policy, "none (TLS-Required: No)")
        self.assertEqual(result.hop.tls, "opportunistic")
        self.assertIsNotNone(result.tls)
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(self.dnsServer.queryCount(type="52"), 0)
        self.assertIn("DANE1: TLS-Required: No: DANE not applied to mx:example.test", self.logged())
        # The same message without the header field is held to DANE.
        again = yield self.deliver()
        self.assertEqual(again.results[0].status, "deferred")
        self.assertEqual(again.policy, "dane")
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_tlsRequiredNoInADeliveryProcess(self):
        """
        The delivery process's side of the pipe: a request line with
        C{tlsOptional} reaches its (real) deliverer, which skips DANE.
        """
        from relayd.delivery.processes import _Requests

        _cert, options = self.certificate(MX1)
        sink = self.sink("127.0.0.1", options)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"not this key"))])
        destination = yield Router(self.resolver, port=self.port).route(DOMAIN)
        path = self.path("message")
        with open(path, "wb") as f:
            f.write(b"Subject: dane\r\n\r\nbody\r\n")
        notices = io.BytesIO()
        requests = _Requests(self.deliverer(), lambda: None)
        requests.notices = notices
        request = DeliverRequest(
            destination,
            "from@relay.test",
            (f"to@{DOMAIN}",),
            path,
            os.path.getsize(path),
            "DANE2",
            tlsOptional=True,
        )
        requests.dataReceived(encode(7, request))
        yield waitUntil(notices.getvalue)
        number, result = decode(notices.getvalue())
        self.assertEqual(number, 7)
        self.assertEqual((result.results[0].status, result.policy), ("delivered", POLICY_WAIVED))
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_tlsRequiredNoWithoutStartTLS(self):
        """... and a host with usable TLSA records but no STARTTLS gets it in plain text."""
        sink = self.sink("127.0.0.1", None)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"key"))])
        result = yield self.deliver(tlsOptional=True)
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.tls)
        self.assertEqual(result.policy, POLICY_WAIVED)
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_daneOffByDefault(self):
        """Without a DANE resolver the deliverer never asks for TLSA."""
        self.sink("127.0.0.1", None)
        self.mx(DOMAIN, (MX1, "127.0.0.1"))
        self.tlsa(MX1, [(3, 1, 1, sha256(b"key"))])
        result = yield self.deliver(dane=False)
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(self.dnsServer.queryCount(type="52"), 0)


class TolerantTLSAParsingTests(unittest.TestCase):
    """
    L{DaneResolver.lookupTLSA} against the DNS test server: records that
    dnspython refuses to parse (a digest of the wrong length) are read as
    they came and judged unusable one by one, over UDP and, for an answer
    too long for UDP, over TCP; dnspython's own registry is left alone.
    """

    def setUp(self):
        self.server = DNSServer()
        self.port = self.server.start(reactor)
        self.addCleanup(self.server.stop)
        self.server.setSecure(DOMAIN)
        self.resolver = DaneResolver(reactor, ["127.0.0.1"], port=self.port, timeout=2)
        self.addCleanup(self.resolver.stop)

    def test_dnspythonRefusesTheRecord(self):
        """
        The premise: dnspython will not parse a 5-octet SHA-256 digest (if
        this fails after an upgrade, dnspython takes such records again and
        the tolerant name server of L{relayd.delivery.dane} is no longer
        needed for them).
        """
        with pytest.raises(dns.exception.FormError):
            dns.rdata.from_wire("IN", "TLSA", b"\x03\x01\x01" + b"\x01" * 5, 0, 8)

    def test_registryUntouched(self):
        """relayd replaces no dnspython parser (no private registry edit)."""
        import dns.rdtypes.ANY.TLSA

        cls = dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.TLSA)
        self.assertIs(cls, dns.rdtypes.ANY.TLSA.TLSA)

    @defer.inlineCallbacks
    def test_onlyBrokenRecords(self):
        """
        An RRset of broken records only: records present, none usable, so
        TLS stays mandatory (RFC 7672 section 2.2), not "no DANE".
        """
        self.server.setTLSA(f"_25._tcp.{MX1}", [(3, 1, 1, b"\x01" * 5), (2, 0, 2, b"\x02" * 3)])
        policy = yield self.resolver.lookupTLSA(MX1)
        self.assertEqual(policy.mode, "dane-unusable")
        self.assertEqual(
            sorted((r.usage, r.selector, r.mtype, r.data) for r in policy.records),
            [(2, 0, 2, b"\x02" * 3), (3, 1, 1, b"\x01" * 5)],
        )
        self.assertEqual(policy.usable, ())

    @defer.inlineCallbacks
    def test_brokenBesideGoodOverTCP(self):
        """
        A long RRset (truncated over UDP, asked again over TCP) with a broken
        record among full-certificate ones: every record read, the good
        ones usable.
        """
        anchors = [makeCA(f"big anchor {i}")[0] for i in range(2)]
        good = [(2, 0, 0, der(ca)) for ca in anchors] + [(3, 1, 1, sha256(b"k"))]
        self.server.setTLSA(f"_25._tcp.{MX1}", [*good, (3, 1, 1, b"\x01" * 5)])
        policy = yield self.resolver.lookupTLSA(MX1)
        self.assertEqual(policy.mode, "dane")
        self.assertEqual(len(policy.records), 4)
        self.assertEqual(
            sorted((r.usage, r.selector, r.mtype, r.data) for r in policy.usable), sorted(good)
        )
        # Too long for UDP: the resolver asked again over TCP.
        self.assertGreater(sum(len(der(ca)) for ca in anchors), 512)
        self.assertGreaterEqual(self.server.queryCount(type="52"), 2)

    @defer.inlineCallbacks
    def test_insecureAndMissing(self):
        """No AD, or no records: no DANE; a name server that is down: an error."""
        self.server.setTLSA("_25._tcp.mx.other.test", [(3, 1, 1, sha256(b"k"))])
        policy = yield self.resolver.lookupTLSA("mx.other.test")
        self.assertEqual(policy.mode, "none")
        policy = yield self.resolver.lookupTLSA(MX2)
        self.assertEqual(policy.mode, "none")
        yield self.server.stop()
        policy = yield self.resolver.lookupTLSA(MX1)
        self.assertEqual(policy.mode, "dane-error")


class DNSServerADTests(unittest.TestCase):
    """The test DNS server sets AD only for secure zones and only when asked."""

    def setUp(self):
        self.server = DNSServer()
        self.port = self.server.start(reactor)
        self.addCleanup(self.server.stop)
        self.server.setMX("signed.test", [(10, "mx.signed.test")])
        self.server.setMX("plain.test", [(10, "mx.plain.test")])
        self.server.setSecure("signed.test")

    def ask(self, name, dnssec=True):
        query = dns.message.make_query(name, "MX", want_dnssec=dnssec)
        response = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=2)
        return bool(response.flags & dns.flags.AD)

    @defer.inlineCallbacks
    def test_ad(self):
        self.assertTrue((yield threads.deferToThread(self.ask, "signed.test")))
        self.assertFalse((yield threads.deferToThread(self.ask, "plain.test")))
        self.assertFalse((yield threads.deferToThread(self.ask, "signed.test", False)))


# --- without sockets ------------------------------------------------------------


def test_usable():
    good = sha256(b"k")
    assert TLSARecord(3, 1, 1, good).usable
    assert TLSARecord(2, 0, 2, hashlib.sha512(b"k").digest()).usable
    assert TLSARecord(3, 0, 0, b"der").usable
    assert not TLSARecord(3, 1, 1, good[:20]).usable  # broken digest length
    assert not TLSARecord(3, 1, 2, good).usable  # SHA-256 length for SHA-512
    assert not TLSARecord(1, 1, 1, good).usable  # PKIX-EE: unusable for SMTP
    assert not TLSARecord(0, 1, 1, good).usable  # PKIX-TA
    assert not TLSARecord(4, 1, 1, good).usable  # unknown usage
    assert not TLSARecord(3, 2, 1, good).usable  # unknown selector
    assert not TLSARecord(3, 1, 3, good).usable  # unknown matching type


def test_policyModes():
    assert DanePolicy().mode == "none"
    record = TLSARecord(3, 1, 1, sha256(b"k"))
    assert DanePolicy((record,), (record,)).mode == "dane"
    assert DanePolicy((TLSARecord(1, 1, 1, b""),), ()).mode == "dane-unusable"
    assert DanePolicy(error="SERVFAIL").mode == "dane-error"


def test_taChainMustLeadToAnchor():
    """DANE-TA: a matching anchor that did not issue the leaf is refused."""
    ca, _caKey = makeCA("anchor")
    other, otherKey = makeCA("not the issuer")
    leaf, _ = issueCertificate(other, otherKey, "mx.example.test")
    chain = [x509.load_pem_x509_certificate(p) for p in (leaf, ca)]
    record = TLSARecord(2, 1, 1, sha256(spki(ca)))
    why = matchChain(DanePolicy((record,), (record,), "mx.example.test"), chain, "mx.example.test")
    assert why is not None and "does not lead" in why
    good = [x509.load_pem_x509_certificate(p) for p in (leaf, other)]
    record = TLSARecord(2, 1, 1, sha256(spki(other)))
    assert (
        matchChain(DanePolicy((record,), (record,), "mx.example.test"), good, "mx.example.test")
        is None
    )


def test_taFullAnchorAboveIntermediate():
    """
    A root published in full ("2 1 0", "2 0 0") and left out of a chain of
    leaf and intermediate: the intermediate must be signed by it and must
    have issued the leaf (RFC 7671 section 5.2.2).
    """
    root, rootKey = makeCA("root")
    intermediate, intermediateKey = makeCA("intermediate", signedBy=(root, rootKey))
    leaf, _ = issueCertificate(intermediate, intermediateKey, "mx.example.test")
    chain = [x509.load_pem_x509_certificate(p) for p in (leaf, intermediate)]
    stranger, strangerKey = makeCA("stranger")
    strayLeaf, _ = issueCertificate(stranger, strangerKey, "mx.example.test")
    for record in (TLSARecord(2, 1, 0, spki(root)), TLSARecord(2, 0, 0, der(root))):
        policy = DanePolicy((record,), (record,), "mx.example.test")
        assert matchChain(policy, chain, "mx.example.test") is None
        # The leaf alone: the root did not sign it.
        why = matchChain(policy, chain[:1], "mx.example.test")
        assert why is not None and "not signed by the DANE-TA" in why
        # An intermediate that did not issue the leaf breaks the path.
        broken = [x509.load_pem_x509_certificate(strayLeaf), chain[1]]
        why = matchChain(policy, broken, "mx.example.test")
        assert why is not None and "not signed by the DANE-TA" in why


def _chainWith(caKey, leafName="mx.example.test", pss=False):
    """A CA of key C{caKey} and a leaf it signed, built here: (CA, leaf)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    now = dt.datetime.now(dt.UTC)
    caName = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "anchor")])
    algorithm = (
        None
        if not isinstance(caKey, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        else hashes.SHA256()
    )
    extra = {}
    if pss:
        extra["rsa_padding"] = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)

    def build(subject, key, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(caName)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(leafName)]), critical=False
            )
        return builder.sign(caKey, algorithm, **extra)

    leafKey = ec.generate_private_key(ec.SECP256R1())
    ca = build(caName, caKey.public_key(), True)
    leafSubject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, leafName)])
    return ca, build(leafSubject, leafKey.public_key(), False)


@pytest.mark.parametrize("kind", ["rsa", "rsa-pss", "ed25519", "ed448"])
def test_taFullKeyOtherAlgorithms(kind):
    """
    "2 1 0" verifies the leaf's signature whatever the anchor's algorithm
    (RSA PKCS#1 v1.5 and PSS, Ed25519, Ed448; ECDSA in the tests above),
    and a leaf signed by another key of the same kind fails.
    """
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, rsa

    def newKey():
        if kind.startswith("rsa"):
            return rsa.generate_private_key(65537, 2048)
        return (
            ed25519.Ed25519PrivateKey if kind == "ed25519" else ed448.Ed448PrivateKey
        ).generate()

    ca, leaf = _chainWith(newKey(), pss=kind == "rsa-pss")
    key = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = TLSARecord(2, 1, 0, key)
    policy = DanePolicy((record,), (record,), "mx.example.test")
    assert matchChain(policy, [leaf], "mx.example.test") is None
    _otherCA, stray = _chainWith(newKey(), pss=kind == "rsa-pss")
    why = matchChain(policy, [stray], "mx.example.test")
    assert why is not None and "not signed by the DANE-TA" in why


def test_taFullAnchorGarbage():
    """Full(0) data that is neither a certificate nor a key matches nothing."""
    leaf, _ = makeCA("self-signed")
    chain = [x509.load_pem_x509_certificate(leaf)]
    for record in (TLSARecord(2, 1, 0, b"not a key"), TLSARecord(2, 0, 0, b"not a cert")):
        why = matchChain(DanePolicy((record,), (record,), "mx.example.test"), chain, "mx")
        assert why == "certificate chain matches no TLSA record"


def test_resultPolicyCrossesThePipe():
    """A delivery process hands the applied policy to the queue manager."""
    reply = Reply.local(250, "2.0.0", "ok")
    result = AttemptResult(
        [RecipientResult("a@b.test", "delivered", reply, None)], None, "TLS", "dane"
    )
    number, decoded = decode(encode(3, result))
    assert number == 3 and isinstance(decoded, AttemptResult)
    assert decoded.policy == "dane"


def test_tlsOptionalCrossesThePipe():
    """
    A delivery process gets C{tlsOptional} from the queue manager; a line
    without it (an older queue manager's) reads as False.
    """
    hop = Hop("mx1.example.test", "127.0.0.1", 25, "opportunistic")
    request = DeliverRequest(
        Destination("mx:example.test", (hop,)), "a@b.test", ("c@example.test",), "/q", 10, "Q1"
    )
    for value in (True, False):
        _, decoded = decode(encode(1, replace(request, tlsOptional=value)))
        assert isinstance(decoded, DeliverRequest) and decoded.tlsOptional is value
    body = json.loads(encode(1, request))
    del body["tlsOptional"]
    _, decoded = decode(json.dumps(body).encode())
    assert isinstance(decoded, DeliverRequest) and decoded.tlsOptional is False
    result = AttemptResult([], hop, "TLSv1.3", POLICY_WAIVED)
    _, decoded = decode(encode(2, result))
    assert isinstance(decoded, AttemptResult) and decoded.policy == POLICY_WAIVED


CONFIG = """
[server]
hostname = "relay.test"
[[listeners]]
name = "in"
endpoint = "tcp:2525:interface=127.0.0.1"
mode = "relay"
[spool]
directory = "spool"
[delivery]
dane = true
"""


@pytest.mark.parametrize(
    ("resolvers", "problem"),
    [
        ("", "needs delivery.resolvers"),
        ('resolvers = ["192.0.2.53"]', "not 192.0.2.53"),
        ('resolvers = ["127.0.0.1", "8.8.8.8"]', "not 8.8.8.8"),
    ],
)
def test_daneNeedsLoopbackResolver(tmp_path, resolvers, problem):
    path = tmp_path / "relayd.toml"
    path.write_text(CONFIG + resolvers + "\n")
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert problem in str(caught.value)
    assert "delivery.dane" in str(caught.value)


def test_daneWithLoopbackResolver(tmp_path):
    path = tmp_path / "relayd.toml"
    path.write_text(CONFIG + 'resolvers = ["127.0.0.1", "::1"]\n')
    assert load(str(path)).dane is True
    path.write_text(CONFIG.replace("dane = true", ""))
    assert load(str(path)).dane is False


# --- the whole relayd ------------------------------------------------------------


class WholeRelaydTests(E2ECase):
    """
    relayd in-process with C{[delivery] dane = true}: received over SMTP,
    MX and TLSA from the DNS test server, delivered to a TLS sink; the
    operator's delivery log line names the policy.
    """

    delivery = {"dane": True}
    sinkAddresses = ("127.0.0.2", "127.0.0.5")

    @defer.inlineCallbacks
    def setUp(self):
        self.caCert, self.caKey = makeCA("DANE e2e CA")
        self.certificates = {}
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()
        self.dns.setSecure("example.test")
        self.dns.setMX("example.test", [(10, MX1)])
        self.dns.setA(MX1, ["127.0.0.2"])

    def startSink(self, address, **options):
        cert, key = issueCertificate(self.caCert, self.caKey, f"sink-{address}.test")
        directory = tempfile.mkdtemp(prefix="relayd-dane-e2e-")
        self.addCleanup(shutil.rmtree, directory, True)
        certPath, keyPath = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        writeKeyPair(certPath, keyPath, cert, key)
        self.certificates[address] = cert
        options["tlsOptions"] = loadServerOptions(certPath, keyPath)
        return super().startSink(address, **options)

    def deliveryLines(self):
        return [formatEvent(e) for e in self.events if "to=<r@example.test>," in formatEvent(e)]

    @defer.inlineCallbacks
    def test_deliveredWithDane(self):
        cert = self.certificates["127.0.0.2"]
        self.dns.setTLSA(f"_{self.port}._tcp.{MX1}", [(3, 1, 1, sha256(spki(cert)))])
        yield self.send(["r@example.test"])
        yield self.waitFor(lambda: self.sinks["127.0.0.2"].messages)
        yield self.waitFor(lambda: any("status=sent" in line for line in self.deliveryLines()))
        [line] = [line for line in self.deliveryLines() if "status=sent" in line]
        self.assertIn("(verified), policy=dane, status=sent", line)

    @defer.inlineCallbacks
    def test_tlsRequiredNoIgnoresDane(self):
        """
        Received over SMTP with C{TLS-Required: No}: the record says
        C{tlsOptional}, the scheduler passes it on, and the message goes to
        the MX host whose TLSA record does not match (RFC 8689 section
        4.2.2), the delivery line saying why no policy applied.
        """
        self.dns.setTLSA(f"_{self.port}._tcp.{MX1}", [(3, 1, 1, sha256(b"not this key"))])
        body = b"Subject: not secret\r\nTLS-Required: No\r\n\r\nhello\r\n"
        yield self.send(["r@example.test"], body=body)
        yield self.waitFor(lambda: self.sinks["127.0.0.2"].messages)
        yield self.waitFor(lambda: any("status=sent" in line for line in self.deliveryLines()))
        [line] = [line for line in self.deliveryLines() if "status=sent" in line]
        self.assertIn("(unverified), policy=none (TLS-Required: No), status=sent", line)
        self.assertEqual(self.dns.queryCount(type="52"), 0)

    def route(self, address):
        """C{relayctl route ADDRESS} against this relayd's configuration: its output."""
        out, err = io.StringIO(), io.StringIO()

        def run():
            argv = ["--config", self.setup.configPath, "route", address]
            return relayctl.main(argv, stdout=out, stderr=err)

        d = threads.deferToThread(run)
        d.addCallback(lambda status: self.assertEqual((status, err.getvalue()), (0, "")))
        return d.addCallback(lambda _: out.getvalue())

    @defer.inlineCallbacks
    def test_relayctlRouteUnsignedOrNotValidating(self):
        """
        C{relayctl route} on an unsigned domain: "none" when the resolver
        validates (it sets AD for the signed root), "not checked" and why
        when it does not, since DANE then never applies.
        """
        self.dns.setMX("plain.test", [(10, "mx.plain.test")])
        self.dns.setA("mx.plain.test", ["127.0.0.2"])
        text = yield self.route("r@plain.test")
        self.assertIn("dane: none (MX records not DNSSEC-validated)", text)
        self.dns.setSecure(".", False)
        text = yield self.route("r@plain.test")
        self.assertIn(
            "dane: not checked (resolver 127.0.0.1 set no AD bit for the signed root zone: "
            "not a validating resolver, see docs/dane.md)",
            text,
        )
        self.assertNotIn("dane: none", text)
        # A signed domain is still checked as before.
        text = yield self.route("r@example.test")
        self.assertIn(f"dane: {MX1}: none (no TLSA records)", text)

    @defer.inlineCallbacks
    def test_mismatchDeferredNeverPlain(self):
        self.dns.setTLSA(f"_{self.port}._tcp.{MX1}", [(3, 1, 1, sha256(b"not this key"))])
        yield self.send(["r@example.test"])
        yield self.waitFor(lambda: any("status=deferred" in line for line in self.deliveryLines()))
        line = next(line for line in self.deliveryLines() if "status=deferred" in line)
        self.assertIn("policy=dane, status=deferred (451 4.7.5 DANE:", line)
        self.assertIn("matches no TLSA record", line)
        self.assertEqual(self.sinks["127.0.0.2"].messages, [])
