"""
TLS versions and cipher suites (DESIGN section 4, rule 10): Mozilla's
"intermediate" profile by default, configurable in C{[tls]}, for the
listeners and for outbound delivery.

The listeners are scanned from outside with sslyze, whose own OpenSSL
builds still offer what the system's refuses (SSL 3, TLS 1.0, static RSA,
CBC with SHA-1), so a suite or version relayd would accept cannot hide
behind the test machine's OpenSSL.  Outbound, relayd's client meets a next
hop that only has a CBC suite with a SHA-1 MAC over TLS 1.2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

from OpenSSL import crypto
from sslyze import (
    ProtocolWithOpportunisticTlsEnum,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze import ScanCommand as C
from twisted.internet import defer, reactor
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.certificates import issueCertificate, makeCA
from relayd.delivery.attempt import Deliverer
from relayd.delivery.client import ClientTimeouts
from relayd.delivery.routing import Destination, Hop
from relayd.testing import InProcessRelayd, TestSetup
from relayd.testing.certs import writeRSASelfSigned
from relayd.testing.sink import SinkServer

VERSIONS = {
    "SSLv2": C.SSL_2_0_CIPHER_SUITES,
    "SSLv3": C.SSL_3_0_CIPHER_SUITES,
    "TLSv1.0": C.TLS_1_0_CIPHER_SUITES,
    "TLSv1.1": C.TLS_1_1_CIPHER_SUITES,
    "TLSv1.2": C.TLS_1_2_CIPHER_SUITES,
    "TLSv1.3": C.TLS_1_3_CIPHER_SUITES,
}

FAST = ClientTimeouts(**dict.fromkeys(ClientTimeouts.__dataclass_fields__, 5))


def scan(ports: dict[str, int]) -> dict[str, dict[str, list[str]]]:
    """
    Scan relayd listeners with sslyze (blocking: run it in a thread).

    @param ports: C{"submissions"} (implicit TLS) and/or C{"submission"}
        (STARTTLS) to its port on 127.0.0.1.
    @return: by mode, by TLS version, the IANA names of the suites accepted.
    @raise AssertionError: when sslyze could not connect or a scan failed,
        so that a broken scanner never passes for a strict server.
    """
    requests = {}
    for mode, port in ports.items():
        starttls = ProtocolWithOpportunisticTlsEnum.SMTP if mode == "submission" else None
        requests[mode] = ServerScanRequest(
            server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
            network_configuration=ServerNetworkConfiguration(
                tls_server_name_indication="localhost",
                tls_opportunistic_encryption=starttls,
                smtp_ehlo_hostname="sslyze.test" if starttls else None,
            ),
            scan_commands=set(VERSIONS.values()),
        )
    scanner = Scanner()
    scanner.queue_scans(list(requests.values()))
    byId = {request.uuid: mode for mode, request in requests.items()}
    found: dict[str, dict[str, list[str]]] = {}
    for result in scanner.get_results():
        mode = byId[result.uuid]
        assert result.scan_status == ServerScanStatusEnum.COMPLETED, (
            f"sslyze could not scan {mode}: {result.connectivity_error_trace}"
        )
        assert result.scan_result is not None
        found[mode] = {}
        for version, command in VERSIONS.items():
            attempt = getattr(result.scan_result, command.value)
            assert attempt.result is not None, (
                f"sslyze's {version} scan of {mode} failed: {attempt.error_reason} "
                f"{attempt.error_trace}"
            )
            found[mode][version] = [
                a.cipher_suite.name for a in attempt.result.accepted_cipher_suites
            ]
    assert set(found) == set(ports), found
    return found


def writeRSACertificate(directory: str) -> None:
    """
    Replace L{TestSetup}'s EC certificate with a self-signed RSA one: only
    an RSA key can do static RSA key exchange (C{TLS_RSA_WITH_*}), so only
    then can a scan show that relayd refuses it.
    """
    writeRSASelfSigned(os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))


class ListenerScanCase(unittest.TestCase):
    sections: dict = {}
    rsaCertificate = False

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-tlsprofile-")
        self.addCleanup(shutil.rmtree, directory, True)
        # sslyze scans both listeners at once, five connections each, and
        # reconnects the moment a handshake is refused: more connections
        # from 127.0.0.1 than the default per-client limit while relayd's
        # reactor (sharing this process with sslyze's threads) catches up
        # with the closes.  The limit is not what these tests are about.
        sections = {**self.sections, "limits": {"connections_per_client": 200}}
        self.setup = TestSetup(directory, sections=sections, modes=("submission", "submissions"))
        if self.rsaCertificate:
            writeRSACertificate(directory)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def ports(self) -> dict[str, int]:
        return {mode: self.relayd.port(mode) for mode in ("submissions", "submission")}


class DefaultProfileTests(ListenerScanCase):
    @defer.inlineCallbacks
    def test_intermediateProfile(self):
        """
        Port 465 (implicit TLS) and 587 (STARTTLS) accept TLS 1.2 and 1.3
        only, and in TLS 1.2 only forward-secret AEAD suites: no static RSA
        key exchange, no CBC, no SHA-1 MAC.
        """
        found = yield deferToThread(scan, self.ports())
        for mode, versions in found.items():
            for old in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"):
                self.assertEqual(versions[old], [], f"{mode} accepts {old}")
            self.assertNotEqual(versions["TLSv1.3"], [], f"{mode} refuses TLS 1.3")
            tls12 = versions["TLSv1.2"]
            self.assertNotEqual(tls12, [], f"{mode} refuses TLS 1.2")
            for name in tls12:
                self.assertRegex(name, r"^TLS_(ECDHE|DHE)_", f"{mode}: no forward secrecy")
                self.assertNotIn("_CBC_", name, f"{mode}: CBC suite")
                self.assertFalse(name.endswith("_SHA"), f"{mode}: SHA-1 MAC in {name}")
                self.assertRegex(name, r"_(GCM_SHA256|GCM_SHA384|CHACHA20_POLY1305_SHA256)$")
            self.assertFalse([n for n in tls12 if n.startswith("TLS_RSA_")], tls12)
            # The certificate's key type decides which suites can be used.
            kind = "RSA" if self.rsaCertificate else "ECDSA"
            self.assertTrue(all(f"_{kind}_WITH_" in n for n in tls12), tls12)


class DefaultProfileRSATests(DefaultProfileTests):
    """The same with an RSA certificate, which static RSA suites could use."""

    rsaCertificate = True


class TLS13OnlyTests(ListenerScanCase):
    sections = {"tls": {"min_version": "TLSv1.3"}}

    @defer.inlineCallbacks
    def test_minVersionHonoured(self):
        """With C{min_version = "TLSv1.3"} nothing older is accepted."""
        found = yield deferToThread(scan, self.ports())
        for mode, versions in found.items():
            accepted = [v for v, names in versions.items() if names]
            self.assertEqual(accepted, ["TLSv1.3"], mode)


class ConfiguredCiphersTests(ListenerScanCase):
    sections = {"tls": {"ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305"}}

    @defer.inlineCallbacks
    def test_ciphersHonoured(self):
        """C{[tls] ciphers} is what TLS 1.2 offers, on both kinds of listener."""
        found = yield deferToThread(scan, self.ports())
        for mode, versions in found.items():
            self.assertEqual(
                versions["TLSv1.2"], ["TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"], mode
            )


class OutboundProfileTests(unittest.TestCase):
    """
    A next hop that only speaks TLS 1.2 with ECDHE-ECDSA-AES128-SHA (CBC,
    SHA-1 MAC): refused where relayd was asked for security, accepted for
    opportunistic TLS, where the alternative is no delivery at all.
    """

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-tlsout-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        caCert, caKey = makeCA("outbound test CA")
        self.caPath = os.path.join(self.directory, "ca.pem")
        with open(self.caPath, "wb") as f:
            f.write(caCert)
        cert, key = issueCertificate(caCert, caKey, "localhost", ipAddresses=("127.0.0.1",))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            options = CertificateOptions(
                privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key),
                certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert),
                acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(
                    "ECDHE-ECDSA-AES128-SHA"
                ),
                lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
            )
            options.getContext()
        self.sink = SinkServer()
        self.sink.start(reactor, tlsOptions=options)
        self.addCleanup(self.sink.stop)
        self.dataPath = os.path.join(self.directory, "data")
        with open(self.dataPath, "wb") as f:
            f.write(b"Subject: hi\r\n\r\nbody\r\n")

    def deliver(self, tls: str, **kwargs):
        deliverer = Deliverer(reactor, "relay.test", timeouts=FAST, caFile=self.caPath, **kwargs)
        self.addCleanup(deliverer.stop)
        hop = Hop(host="localhost", address="127.0.0.1", port=self.sink.port, tls=tls)
        return deliverer.deliver(
            Destination("route:0", (hop,)), "a@example.org", ["b@example.net"], self.dataPath, 24
        )

    @defer.inlineCallbacks
    def test_requiredAndVerifyRefuseWeakSuites(self):
        for mode in ("required", "verify"):
            result = yield self.deliver(mode)
            [r] = result.results
            self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.5"), mode)
            self.assertIn("TLS handshake with localhost[127.0.0.1] failed", r.text)
        self.assertEqual(self.sink.messages, [])

    @defer.inlineCallbacks
    def test_opportunisticTakesWeakSuites(self):
        result = yield self.deliver("opportunistic")
        [r] = result.results
        self.assertEqual(r.status, "delivered")
        self.assertEqual(result.tls, "TLSv1.2 ECDHE-ECDSA-AES128-SHA")
        self.assertEqual([m.tls for m in self.sink.messages], ["TLSv1.2"])

    @defer.inlineCallbacks
    def test_opportunisticProfileConfigurable(self):
        """The strict profile for opportunistic too, when configured so."""
        from relayd.certificates import INTERMEDIATE

        result = yield self.deliver("opportunistic", opportunisticProfile=INTERMEDIATE)
        self.assertEqual(result.results[0].status, "deferred")
        self.assertEqual(self.sink.messages, [])


class ReloadTests(ListenerScanCase):
    sections = {"delivery": {"enabled": True}}

    @defer.inlineCallbacks
    def test_reloadChangesProfile(self):
        """
        SIGHUP's reload puts new C{[tls]} values in force for new
        connections: listeners and the deliverer alike.
        """
        with open(self.setup.configPath) as f:
            text = f.read()
        self.assertIn("[tls]\n", text)
        with open(self.setup.configPath, "w") as f:
            f.write(text.replace("[tls]\n", '[tls]\nmin_version = "TLSv1.3"\n', 1))
        ok = yield self.relayd.service.reload()
        self.assertTrue(ok, self.relayd.service.reloadError)
        found = yield deferToThread(scan, {"submissions": self.relayd.port("submissions")})
        accepted = [v for v, names in found["submissions"].items() if names]
        self.assertEqual(accepted, ["TLSv1.3"])
        deliverer = self.relayd.service.scheduler.deliverer
        self.assertEqual(deliverer.tlsProfile.minVersion, "TLSv1.3")
        self.assertEqual(deliverer.opportunisticProfile.minVersion, "TLSv1.3")
