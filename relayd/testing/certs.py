"""
Certificates for tests: a test CA written to a folder, server certificates
it signs, and the server TLS options a next hop in a test listens with.

Every TLS test needs the same three steps (a CA whose certificate the
client trusts, a leaf for the name the client checks, both on disk for
C{[tls]}, C{ca_file} or L{relayd.certificates.loadServerOptions}); these
helpers do them once, over L{relayd.certificates.makeCA} and
L{relayd.certificates.issueCertificate} (EC P-256 keys, the extensions a
strict verifier wants: RFC 5280 section 4.2).

  - L{makeCA} makes a CA and writes its certificate (trust it with
    C{ssl.create_default_context(cafile=ca.path)} or C{[delivery] ca_file}).
  - L{makeServerCert} issues a certificate for a host name (and IP
    addresses) and writes it with its key;
    L{ServerCert.serverOptions} loads them for a listener, e.g. a
    L{relayd.testing.SinkServer} that relayd must verify.
  - L{writeRSASelfSigned} writes a self-signed RSA certificate, for the
    tests that need an RSA key (static RSA key exchange can only be
    offered, and so refused, with one).

Example, a next hop with a certificate relayd trusts and one it does not::

    ca = makeCA(directory, "upstream CA")
    good = makeServerCert(ca, directory, "smarthost.test")
    stranger = makeServerCert(makeCA(directory, "someone else"), directory,
                              "smarthost.test")
    sink.start(reactor, tlsOptions=good.serverOptions())
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import CertificateOptions

from relayd.certificates import issueCertificate, loadServerOptions, writeKeyPair
from relayd.certificates import makeCA as _makeCAPem

__all__ = ["TestCA", "ServerCert", "makeCA", "makeServerCert", "writeRSASelfSigned"]


def _fileName(name: str) -> str:
    """A file name from a common or host name: letters, digits, dots, dashes."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "cert"


@dataclass(frozen=True)
class TestCA:
    """
    A certificate authority for tests.

    @ivar certificate: its certificate, PEM.
    @ivar key: its private key, PEM.
    @ivar path: the file its certificate was written to.
    """

    __test__ = False  # not a pytest test class

    certificate: bytes
    key: bytes
    path: str

    @property
    def pair(self) -> tuple[bytes, bytes]:
        """C{(certificate, key)}, as L{relayd.certificates} takes an issuer."""
        return self.certificate, self.key


@dataclass(frozen=True)
class ServerCert:
    """
    A server certificate and its key on disk.

    @ivar certificate: the certificate, PEM.
    @ivar key: the private key, PEM.
    @ivar certPath: the certificate's file (mode 0o644).
    @ivar keyPath: the key's file (mode 0o600).
    """

    certificate: bytes
    key: bytes
    certPath: str
    keyPath: str

    def serverOptions(self) -> CertificateOptions:
        """TLS options for a listener that presents this certificate."""
        return loadServerOptions(self.certPath, self.keyPath)


def makeCA(
    directory: str,
    name: str = "relayd test CA",
    fileName: str | None = None,
    signedBy: TestCA | None = None,
) -> TestCA:
    """
    Make a CA and write its certificate into C{directory}.

    @param name: its common name.
    @param fileName: the certificate's file name in C{directory}; by
        default made from C{name} (C{"relayd-test-CA.pem"}).
    @param signedBy: a parent CA, to make an intermediate (path length 0)
        for tests of chains; None for a self-signed root.
    """
    os.makedirs(directory, exist_ok=True)
    certificate, key = _makeCAPem(name, signedBy=None if signedBy is None else signedBy.pair)
    path = os.path.join(directory, fileName or f"{_fileName(name)}.pem")
    with open(path, "wb") as f:
        f.write(certificate)
    return TestCA(certificate, key, path)


def makeServerCert(
    ca: TestCA,
    directory: str,
    hostname: str = "localhost",
    ipAddresses: Iterable[str] = ("127.0.0.1",),
    baseName: str | None = None,
    fileNames: tuple[str, str] | None = None,
) -> ServerCert:
    """
    Issue a server certificate for C{hostname} (and C{ipAddresses}, as IP
    subject alternative names) signed by C{ca}, and write it and its key
    into C{directory}.

    @param baseName: the files are C{BASE.crt} and C{BASE.key}; by default
        C{BASE} is the host name followed by the CA's name, so certificates
        for one name from two CAs do not overwrite each other.
    @param fileNames: the certificate's and the key's file names instead,
        e.g. C{("cert.pem", "key.pem")}.
    """
    os.makedirs(directory, exist_ok=True)
    certificate, key = issueCertificate(*ca.pair, hostname, ipAddresses=tuple(ipAddresses))
    if baseName is None:
        baseName = f"{_fileName(hostname)}.{_fileName(os.path.basename(ca.path))}"
    certName, keyName = fileNames or (f"{baseName}.crt", f"{baseName}.key")
    certPath = os.path.join(directory, certName)
    keyPath = os.path.join(directory, keyName)
    writeKeyPair(certPath, keyPath, certificate, key)
    return ServerCert(certificate, key, certPath, keyPath)


def writeRSASelfSigned(certPath: str, keyPath: str, hostname: str = "localhost") -> None:
    """
    Write a self-signed RSA (2048-bit) certificate for C{hostname}, valid
    from an hour ago for a day, and its key.  Only an RSA key can do
    static RSA key exchange (C{TLS_RSA_WITH_*}), so only with one can a
    scan show that relayd refuses it; relayd's own helpers make EC keys.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    writeKeyPair(
        certPath,
        keyPath,
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
