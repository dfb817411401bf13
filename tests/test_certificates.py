"""
Tests for L{relayd.certificates}, including real TLS handshakes on
127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from relayd.certificates import (
    CertificateError,
    issueCertificate,
    loadServerOptions,
    makeCA,
    makeSelfSigned,
    writeKeyPair,
)


def _realReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def tempDir(testCase: SynchronousTestCase) -> str:
    """
    Make a directory removed after the test.  (Trial's C{mktemp} is
    relative to the working directory, which under pytest is the checkout.)
    """
    directory = tempfile.mkdtemp(prefix="relayd-test-")
    testCase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return directory


def writeFile(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def alternativeNames(certPem: bytes) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(certPem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        san.get_values_for_type(x509.DNSName),
        [str(a) for a in san.get_values_for_type(x509.IPAddress)],
    )


class MakeTests(SynchronousTestCase):
    """
    Tests for L{makeSelfSigned}, L{makeCA}, L{issueCertificate} and
    L{writeKeyPair}.
    """

    def test_selfSignedLocalhost(self) -> None:
        """
        A certificate for localhost names the loopback addresses too, is
        not a CA, and its key is unencrypted PEM that matches it.
        """
        certPem, keyPem = makeSelfSigned("localhost", days=10)
        self.assertEqual(alternativeNames(certPem), (["localhost"], ["127.0.0.1", "::1"]))
        cert = x509.load_pem_x509_certificate(certPem)
        self.assertEqual(cert.subject, cert.issuer)
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertTrue(10 <= lifetime.days <= 11, lifetime)
        key = serialization.load_pem_private_key(keyPem, password=None)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.public_key(), cert.public_key())

    def test_selfSignedOtherNames(self) -> None:
        """
        Another host name gets no IP address; an IP address given as host
        name goes in as an IP address, not a DNS name.
        """
        self.assertEqual(alternativeNames(makeSelfSigned("mx.example")[0]), (["mx.example"], []))
        self.assertEqual(alternativeNames(makeSelfSigned("192.0.2.7")[0]), ([], ["192.0.2.7"]))

    def test_issue(self) -> None:
        """
        A leaf issued by a test CA verifies against it and carries the
        addresses given.
        """
        caCert, caKey = makeCA("Test CA")
        ca = x509.load_pem_x509_certificate(caCert)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        certPem, _ = issueCertificate(
            caCert,
            caKey,
            "mx.example",
            [ipaddress.ip_address("192.0.2.1"), "2001:db8::1"],
        )
        self.assertEqual(alternativeNames(certPem), (["mx.example"], ["192.0.2.1", "2001:db8::1"]))
        x509.load_pem_x509_certificate(certPem).verify_directly_issued_by(ca)

    def test_writeKeyPair(self) -> None:
        """
        The key is written with mode 0o600, the certificate readable;
        existing files are replaced.
        """
        directory = tempDir(self)
        certPath = os.path.join(directory, "cert.pem")
        keyPath = os.path.join(directory, "key.pem")
        writeFile(keyPath, b"old")
        os.chmod(keyPath, 0o644)
        certPem, keyPem = makeSelfSigned("localhost")
        writeKeyPair(certPath, keyPath, certPem, keyPem)
        self.assertEqual(stat.S_IMODE(os.stat(keyPath).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(certPath).st_mode), 0o644)
        with open(keyPath, "rb") as f:
            self.assertEqual(f.read(), keyPem)
        self.assertEqual(sorted(os.listdir(directory)), ["cert.pem", "key.pem"])


class LoadServerOptionsTests(SynchronousTestCase):
    """
    Tests for L{loadServerOptions}' checks.
    """

    def setUp(self) -> None:
        self.directory = tempDir(self)
        self.certPem, self.keyPem = makeSelfSigned("localhost")
        self.certPath = self.path("cert.pem", self.certPem)
        self.keyPath = self.path("key.pem", self.keyPem)

    def path(self, name: str, data: bytes | None = None) -> str:
        path = os.path.join(self.directory, name)
        if data is not None:
            writeFile(path, data)
        return path

    def assertProblem(self, certPath: str, keyPath: str, path: str, text: str) -> None:
        e = self.assertRaises(CertificateError, loadServerOptions, certPath, keyPath)
        self.assertEqual(e.path, path)
        self.assertIn(text, e.problem)
        self.assertEqual(str(e), f"{path}: {e.problem}")
        self.assertNotIn("\n", str(e))

    def test_loads(self) -> None:
        """
        A matching pair gives L{CertificateOptions} with TLS 1.2 as least
        version, also from one file holding both.
        """
        from twisted.internet.ssl import TLSVersion

        options = loadServerOptions(self.certPath, self.keyPath)
        self.assertIsInstance(options, CertificateOptions)
        self.assertEqual(options._defaultMinimumTLSVersion, TLSVersion.TLSv1_2)
        self.assertEqual(options.extraCertChain, [])
        both = self.path("both.pem", self.keyPem + self.certPem)
        loadServerOptions(both, both)

    def test_missing(self) -> None:
        self.assertProblem(self.path("nope.pem"), self.keyPath, self.path("nope.pem"), "not found")
        self.assertProblem(self.certPath, self.path("nope.pem"), self.path("nope.pem"), "not found")

    def test_directory(self) -> None:
        self.assertProblem(self.directory, self.keyPath, self.directory, "directory")

    def test_unreadable(self) -> None:
        if os.getuid() == 0:
            self.skipTest("root reads files whatever their mode")
        os.chmod(self.keyPath, 0)
        self.assertProblem(self.certPath, self.keyPath, self.keyPath, "cannot read")

    def test_notPem(self) -> None:
        """
        A file that is not PEM, or swapped certificate and key, are told
        apart from corrupt PEM.
        """
        der = x509.load_pem_x509_certificate(self.certPem).public_bytes(serialization.Encoding.DER)
        self.assertProblem(
            self.path("c.der", der),
            self.keyPath,
            self.path("c.der"),
            "no PEM certificate",
        )
        self.assertProblem(self.keyPath, self.certPath, self.keyPath, "no PEM certificate")
        self.assertProblem(self.certPath, self.certPath, self.certPath, "no PEM private key")
        corrupt = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        self.assertProblem(
            self.path("bad.pem", corrupt), self.keyPath, self.path("bad.pem"), "corrupt"
        )
        corruptKey = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        self.assertProblem(
            self.certPath, self.path("k.pem", corruptKey), self.path("k.pem"), "corrupt"
        )

    def test_mismatchedKey(self) -> None:
        """
        A key from another pair is refused, naming both files.
        """
        _, otherKey = makeSelfSigned("localhost")
        other = self.path("other.pem", otherKey)
        self.assertProblem(self.certPath, other, other, "does not match")
        e = self.assertRaises(CertificateError, loadServerOptions, self.certPath, other)
        self.assertIn(self.certPath, e.problem)

    def test_encryptedKey(self) -> None:
        """
        A passphrase-protected key is refused with a clear reason.
        """
        key = serialization.load_pem_private_key(self.keyPem, password=None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        path = self.path("enc.pem", encrypted)
        self.assertProblem(self.certPath, path, path, "encrypted")

    def test_chain(self) -> None:
        """
        Certificates after the first are the chain sent to clients; out of
        order they are refused.
        """
        root = makeCA("Root")
        intermediate = makeCA("Intermediate", signedBy=root)
        leafCert, leafKey = issueCertificate(*intermediate, "localhost")
        keyPath = self.path("leaf.key", leafKey)
        chainPath = self.path("chain.pem", leafCert + intermediate[0])
        options = loadServerOptions(chainPath, keyPath)
        self.assertEqual(len(options.extraCertChain), 1)
        # The root may be included at the end.
        loadServerOptions(self.path("full.pem", leafCert + intermediate[0] + root[0]), keyPath)
        wrong = self.path("wrong.pem", leafCert + root[0] + intermediate[0])
        self.assertProblem(
            wrong,
            keyPath,
            wrong,
            "certificate 2 in the file did not issue certificate 1",
        )


class CommandTests(SynchronousTestCase):
    """
    Tests for C{python -m relayd.certificates}.
    """

    def runCommand(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "relayd.certificates", *args],
            capture_output=True,
            timeout=60,
        )

    def test_makesPairOnce(self) -> None:
        """
        The command writes a loadable pair, refuses to overwrite it, and
        overwrites it with C{--force}.
        """
        directory = tempDir(self)
        cert = os.path.join(directory, "cert.pem")
        key = os.path.join(directory, "key.pem")
        args = ("--hostname", "localhost", "--cert", cert, "--key", key)
        result = self.runCommand(*args)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        loadServerOptions(cert, key)
        with open(cert, "rb") as f:
            first = f.read()

        result = self.runCommand(*args)
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"exists; use --force", result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1)
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), first)

        result = self.runCommand(*args, "--force")
        self.assertEqual(result.returncode, 0)
        with open(cert, "rb") as f:
            self.assertNotEqual(f.read(), first)
        loadServerOptions(cert, key)

    def test_usageAndFailure(self) -> None:
        """
        Missing options are a usage error (2); an unwritable place is a
        one-line failure (1).
        """
        self.assertEqual(self.runCommand("--hostname", "localhost").returncode, 2)
        missing = os.path.join(tempDir(self), "no", "cert.pem")
        result = self.runCommand("--hostname", "x", "--cert", missing, "--key", missing + ".key")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.count(b"\n"), 1)
        self.assertNotIn(b"Traceback", result.stderr)


@implementer(IHandshakeListener)
class Peer(Protocol):
    """
    One end of a TLS connection: reports the negotiated version when the
    handshake completes, and when the connection is gone.
    """

    def __init__(self) -> None:
        self.handshake: Deferred[str] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        version = connection.get_protocol_version_name()
        self.handshake.callback(version)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(None)


class PeerFactory(Factory):
    """Make L{Peer}s and keep them, so a test can wait for them to close."""

    def __init__(self) -> None:
        self.peers: list[Peer] = []

    def buildProtocol(self, addr: Any) -> Peer:
        peer = Peer()
        peer.factory = self
        self.peers.append(peer)
        return peer


def _quietly(f: Callable[[], Any]) -> Any:
    """Call C{f} with the ssl module's deprecation warnings for TLS < 1.2 off."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return f()


def _legacyContext(server: bool) -> ssl.SSLContext:
    """
    An ssl context limited to TLS 1.0/1.1, at OpenSSL security level 0 so
    that OpenSSL 3 offers those versions at all.
    """

    def make() -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    return _quietly(make)  # type: ignore[no-any-return]


def _handshake(context: ssl.SSLContext, port: int, hostname: str = "localhost") -> str:
    """Connect to 127.0.0.1:C{port}, do the handshake, return the version."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as tls:
            version = tls.version()
            assert version is not None
            return version


def legacyTLSWorks(certPath: str, keyPath: str) -> bool:
    """
    Control for the TLS 1.1 test: can the local OpenSSL do a TLS 1.1
    handshake at all, between two ends willing to?  If not, a refused TLS
    1.1 client proves nothing about our server.
    """
    try:
        serverContext = _legacyContext(server=True)
        serverContext.load_cert_chain(certPath, keyPath)
        clientContext = _legacyContext(server=False)
        clientContext.check_hostname = False
        clientContext.verify_mode = ssl.CERT_NONE
    except ssl.SSLError:
        return False
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    serverVersion: list[str | None] = []

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            with serverContext.wrap_socket(connection, server_side=True) as tls:
                serverVersion.append(tls.version())
        except (OSError, ssl.SSLError):
            serverVersion.append(None)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        clientVersion: str | None = _handshake(clientContext, listener.getsockname()[1])
    except (OSError, ssl.SSLError):
        clientVersion = None
    finally:
        thread.join(30)
        listener.close()
    return clientVersion == "TLSv1.1" and serverVersion == ["TLSv1.1"]


class HandshakeTests(TestCase):
    """
    Real TLS handshakes on 127.0.0.1 between a Twisted server using
    L{loadServerOptions} and clients verifying against a test CA.
    """

    def setUp(self) -> None:
        self.reactor = _realReactor()
        self.directory = tempDir(self)
        self.ca = makeCA("relayd test CA")
        self.caPath = writeFile(os.path.join(self.directory, "ca.pem"), self.ca[0])
        leafCert, leafKey = issueCertificate(*self.ca, "localhost", ["127.0.0.1"])
        self.certPath = writeFile(os.path.join(self.directory, "cert.pem"), leafCert)
        self.keyPath = writeFile(os.path.join(self.directory, "key.pem"), leafKey)

    @inlineCallbacks
    def listen(self, certPath: str | None = None) -> Any:
        """
        Start a TLS server on 127.0.0.1 with L{loadServerOptions}; stop it,
        and wait for its connections to close, at cleanup.
        """
        options = loadServerOptions(certPath or self.certPath, self.keyPath)
        self.serverFactory = PeerFactory()
        endpoint = SSL4ServerEndpoint(self.reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(self.serverFactory)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.serverClosed)
        return port.getHost().port

    def serverClosed(self) -> Deferred[Any]:
        """Wait until every server-side connection is closed."""
        from twisted.internet.defer import gatherResults

        for peer in self.serverFactory.peers:
            # A refused handshake fails the server side's Deferred too; the
            # tests assert on the client side, so consume it here.
            peer.handshake.addErrback(lambda failure: None)
        return gatherResults([peer.lost for peer in self.serverFactory.peers])

    def startThreadPool(self) -> ThreadPool:
        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-tls-client")
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    @inlineCallbacks
    def twistedClient(self, port: int, caPem: bytes, hostname: str = "localhost") -> Any:
        """
        Connect with Twisted's client TLS, verifying the server against
        C{caPem} for C{hostname}.

        @return: a Deferred firing with the TLS version after closing.
        """
        options = optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(caPem))
        endpoint = SSL4ClientEndpoint(self.reactor, "127.0.0.1", port, options)
        client = yield endpoint.connect(Factory.forProtocol(Peer))
        try:
            version = yield client.handshake
        finally:
            client.transport.loseConnection()
            yield client.lost
        return version

    def pythonClient(self, port: int, context: ssl.SSLContext) -> Deferred[str]:
        """Handshake with Python's ssl module in a thread of our own pool."""
        pool = self.startThreadPool()
        return deferToThreadPool(self.reactor, pool, _handshake, context, port)

    def verifyingContext(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.caPath)
        return context

    @inlineCallbacks
    def test_twistedClient(self) -> Any:
        """
        A Twisted client that verifies the server against the test CA and
        the host name completes a TLS 1.2+ handshake.
        """
        port = yield self.listen()
        version = yield self.twistedClient(port, self.ca[0])
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        serverVersion = yield self.serverFactory.peers[0].handshake
        self.assertEqual(serverVersion, version)

    @inlineCallbacks
    def test_chainSent(self) -> Any:
        """
        With a leaf issued by an intermediate and the chain in the
        certificate file, a client trusting only the root verifies the
        server: the intermediate went out as part of the handshake.
        """
        intermediate = makeCA("relayd test intermediate", signedBy=self.ca)
        leafCert, leafKey = issueCertificate(*intermediate, "localhost")
        chainPath = writeFile(os.path.join(self.directory, "chain.pem"), leafCert + intermediate[0])
        writeFile(self.keyPath, leafKey)
        port = yield self.listen(chainPath)
        version = yield self.twistedClient(port, self.ca[0])
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @inlineCallbacks
    def test_otherCARefused(self) -> Any:
        """
        A client trusting another CA refuses the server: the verification
        in the positive tests is real.
        """
        port = yield self.listen()
        other = makeCA("some other CA")
        d = self.twistedClient(port, other[0])
        yield self.assertFailure(d, Exception)

    @inlineCallbacks
    def test_pythonClientTLS12Max(self) -> Any:
        """
        Python's ssl client capped at TLS 1.2 verifies the server and gets
        exactly TLS 1.2: the floor is 1.2, not 1.3.
        """
        port = yield self.listen()
        context = self.verifyingContext()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        version = yield self.pythonClient(port, context)
        self.assertEqual(version, "TLSv1.2")

    @inlineCallbacks
    def test_pythonClientDefault(self) -> Any:
        """
        Python's default verifying client gets TLS 1.2 or later, checking
        the certificate for the IP address too.
        """
        port = yield self.listen()
        pool = self.startThreadPool()
        version = yield deferToThreadPool(
            self.reactor, pool, _handshake, self.verifyingContext(), port, "127.0.0.1"
        )
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    @inlineCallbacks
    def test_tls11Refused(self) -> Any:
        """
        A client that offers at most TLS 1.1 fails the handshake.

        OpenSSL 3 offers TLS 1.1 only at security level 0, so the client
        context sets that; a control handshake between two TLS 1.1-willing
        Python ends first shows the client really can speak TLS 1.1 here.
        Where even that fails, the local OpenSSL cannot offer TLS 1.1 at
        all, and L{test_pythonClientTLS12Max} is what shows the floor.
        """
        pool = self.startThreadPool()
        works = yield deferToThreadPool(
            self.reactor, pool, legacyTLSWorks, self.certPath, self.keyPath
        )
        if not works:
            self.skipTest("the local OpenSSL cannot do a TLS 1.1 handshake at all")
        port = yield self.listen()
        context = _legacyContext(server=False)
        context.load_verify_locations(cafile=self.caPath)
        d = deferToThreadPool(self.reactor, pool, _handshake, context, port)
        failure = yield self.assertFailure(d, ssl.SSLError, OSError)
        self.assertNotIsInstance(failure, ssl.SSLCertVerificationError)
