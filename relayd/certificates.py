"""
TLS material: loading the server's certificate and key, and making
certificates for development and tests.

L{loadServerOptions} is what the listeners use: it reads a PEM certificate
file (the leaf first, then any intermediates, as Let's Encrypt's
C{fullchain.pem}) and a PEM key file, checks they belong together and turns
any problem into a L{CertificateError} the config layer can print as one
line, instead of an OpenSSL error stack at the first handshake.

The rest makes certificates with the C{cryptography} package: a
self-signed pair for C{scripts/run} (C{python -m relayd.certificates}), and
a test CA with leaves it issues for tests that verify peers.  Keys are EC
P-256: small, fast, and accepted by every TLS 1.2+ peer.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import itertools
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

from relayd.config import INTERMEDIATE_CIPHERS, OPPORTUNISTIC_CIPHERS
from relayd.queue.safeio import writeAtomically

__all__ = [
    "INTERMEDIATE",
    "INTERMEDIATE_CIPHERS",
    "OPPORTUNISTIC",
    "OPPORTUNISTIC_CIPHERS",
    "TLS_VERSIONS",
    "TLSProfile",
    "cipherProblem",
    "CertificateError",
    "makeSelfSigned",
    "makeCA",
    "issueCertificate",
    "writeKeyPair",
    "loadServerOptions",
    "main",
]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKERS = (
    b"-----BEGIN PRIVATE KEY-----",
    b"-----BEGIN EC PRIVATE KEY-----",
    b"-----BEGIN RSA PRIVATE KEY-----",
    b"-----BEGIN ENCRYPTED PRIVATE KEY-----",
)


# --- TLS profiles ---------------------------------------------------------

TLS_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}
"""C{[tls] min_version}'s values (L{relayd.config.TLS_MIN_VERSIONS})."""


def cipherProblem(ciphers: str) -> str | None:
    """
    Why OpenSSL cipher string C{ciphers} cannot be used, or None when it
    names at least one TLS 1.2 suite this OpenSSL has.
    """
    problem = f"no TLS 1.2 cipher suite matches {ciphers!r} (an OpenSSL cipher string)"
    if not ciphers.isascii():
        return problem
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        return problem
    # TLS 1.3's suites are always listed; OpenSSL sets them apart.
    names = SSL.Connection(context, None).get_cipher_list()
    if all(name.startswith("TLS_") for name in names):
        return problem
    return None


@dataclass(frozen=True)
class TLSProfile:
    """
    Which TLS versions and cipher suites one side of relayd accepts.

    @ivar ciphers: an OpenSSL cipher string for TLS 1.2 (L{cipherProblem}
        says whether it is usable).
    @ivar minVersion: a key of L{TLS_VERSIONS}.
    """

    ciphers: str = INTERMEDIATE_CIPHERS
    minVersion: str = "TLSv1.2"

    def certificateOptions(self) -> dict[str, Any]:
        """Keyword arguments for L{CertificateOptions}."""
        return {
            "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(self.ciphers),
            "raiseMinimumTo": TLS_VERSIONS[self.minVersion],
        }


INTERMEDIATE = TLSProfile()
"""Mozilla's intermediate profile: TLS 1.2 with L{INTERMEDIATE_CIPHERS}, and 1.3."""

OPPORTUNISTIC = TLSProfile(OPPORTUNISTIC_CIPHERS)
"""Outbound opportunistic TLS's default: TLS 1.2 with L{OPPORTUNISTIC_CIPHERS}, and 1.3."""


class CertificateError(Exception):
    """
    A certificate or key file cannot be used.

    @ivar path: the file at fault.
    @ivar problem: one short line saying what is wrong.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


# Making certificates.


def _newKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _keyPem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def _alternativeNames(
    hostname: str, ipAddresses: Iterable[str | _IPAddress]
) -> x509.SubjectAlternativeName:
    """
    The subjectAltName: C{hostname} as a DNS name, or as an IP address when
    it is one (a DNS entry holding an address matches nothing), then
    C{ipAddresses}.
    """
    names: list[x509.GeneralName] = []
    addresses = [ipaddress.ip_address(a) for a in ipAddresses]
    try:
        addresses.insert(0, ipaddress.ip_address(hostname))
    except ValueError:
        names.append(x509.DNSName(hostname))
    for address in dict.fromkeys(addresses):
        names.append(x509.IPAddress(address))
    return x509.SubjectAlternativeName(names)


def _build(
    subject: x509.Name,
    publicKey: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuerKey: ec.EllipticCurvePrivateKey,
    days: int,
    isCA: bool,
    pathLength: int | None = None,
    alternativeNames: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    """
    Sign a certificate with the extensions a modern verifier expects
    (RFC 5280 section 4.2): basic constraints, key usage, key identifiers
    and, for a leaf, subjectAltName and extended key usage.
    """
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(publicKey)
        .serial_number(x509.random_serial_number())
        # Backdated a little so that a peer whose clock is slightly behind
        # accepts a certificate made a moment ago.
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=isCA, path_length=pathLength), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(publicKey), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()),
            critical=False,
        )
    )
    # A CA signs certificates and CRLs; a leaf only signs handshakes.
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=isCA,
            crl_sign=isCA,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if not isCA:
        builder = builder.add_extension(
            # clientAuth too: a relay may present the same certificate
            # when it connects to a next hop that asks for one.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    if alternativeNames is not None:
        builder = builder.add_extension(alternativeNames, critical=False)
    return builder.sign(issuerKey, hashes.SHA256())


def makeSelfSigned(hostname: str, days: int = 365) -> tuple[bytes, bytes]:
    """
    Make a self-signed server certificate for C{hostname}.

    Its subjectAltName holds C{hostname}, plus 127.0.0.1 and ::1 when the
    name is C{localhost}, so clients connecting by loopback address verify
    it too.

    @return: the certificate and the private key, both PEM.
    """
    key = _newKey()
    extra = ("127.0.0.1", "::1") if hostname == "localhost" else ()
    name = _name(hostname)
    cert = _build(
        name,
        key.public_key(),
        name,
        key,
        days,
        isCA=False,
        alternativeNames=_alternativeNames(hostname, extra),
    )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)


def _loadIssuer(
    caCertPem: bytes, caKeyPem: bytes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    caCert = x509.load_pem_x509_certificate(caCertPem)
    caKey = serialization.load_pem_private_key(caKeyPem, password=None)
    if not isinstance(caKey, ec.EllipticCurvePrivateKey):
        raise ValueError("only EC CA keys (as made by makeCA) are supported")
    return caCert, caKey


def makeCA(
    name: str, days: int = 3650, signedBy: tuple[bytes, bytes] | None = None
) -> tuple[bytes, bytes]:
    """
    Make a certificate authority for tests.

    @param name: its common name.
    @param signedBy: C{(caCertPem, caKeyPem)} of a parent CA to make an
        intermediate CA (path length 0), for tests of certificate chains;
        None for a self-signed root.
    @return: the CA certificate and its private key, both PEM.
    """
    key = _newKey()
    subject = _name(name)
    if signedBy is None:
        cert = _build(subject, key.public_key(), subject, key, days, isCA=True)
    else:
        parentCert, parentKey = _loadIssuer(*signedBy)
        cert = _build(
            subject,
            key.public_key(),
            parentCert.subject,
            parentKey,
            days,
            isCA=True,
            pathLength=0,
        )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)


def issueCertificate(
    caCertPem: bytes,
    caKeyPem: bytes,
    hostname: str,
    ipAddresses: Iterable[str | _IPAddress] = (),
    days: int = 365,
) -> tuple[bytes, bytes]:
    """
    Issue a server certificate for C{hostname} (and C{ipAddresses}) signed
    by the CA made with L{makeCA}.

    @return: the leaf certificate and its private key, both PEM.  For a CA
        made with C{signedBy}, append the CA certificate to the leaf to
        get the chain a server sends.
    """
    caCert, caKey = _loadIssuer(caCertPem, caKeyPem)
    key = _newKey()
    cert = _build(
        _name(hostname),
        key.public_key(),
        caCert.subject,
        caKey,
        days,
        isCA=False,
        alternativeNames=_alternativeNames(hostname, ipAddresses),
    )
    return cert.public_bytes(serialization.Encoding.PEM), _keyPem(key)


def writeKeyPair(certPath: str, keyPath: str, certPem: bytes, keyPem: bytes) -> None:
    """
    Write a certificate (mode 0o644) and its private key (mode 0o600),
    replacing existing files.  The key is written first, so that the
    certificate on disk never names a key that is not there yet.
    """
    writeAtomically(keyPath, keyPem, 0o600)
    writeAtomically(certPath, certPem, 0o644)


# Loading for a server.


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateError(path, f"{what} file not found") from None
    except IsADirectoryError:
        raise CertificateError(path, f"{what} file is a directory") from None
    except OSError as e:
        raise CertificateError(path, f"cannot read {what} file: {e.strerror or e}") from None


def _loadChain(path: str) -> list[x509.Certificate]:
    """
    Read a PEM certificate file: the leaf, then the intermediates, each
    issued by the next.  Other PEM blocks (a key in a combined file) are
    skipped.
    """
    data = _read(path, "certificate")
    if _CERT_MARKER not in data:
        raise CertificateError(path, "no PEM certificate found (expected BEGIN CERTIFICATE)")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(path, "a PEM certificate in the file is corrupt") from None
    for number, (cert, issuer) in enumerate(itertools.pairwise(chain), start=1):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise CertificateError(
                path,
                f"certificate {number + 1} in the file did not issue certificate "
                f"{number}: the chain must be the leaf first, then its issuers",
            ) from None
    return chain


def _loadKey(path: str) -> PrivateKeyTypes:
    data = _read(path, "key")
    if not any(marker in data for marker in _KEY_MARKERS):
        raise CertificateError(path, "no PEM private key found (expected BEGIN PRIVATE KEY)")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            path, "the private key is encrypted; relayd needs it without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            path, "the PEM private key is corrupt or of an unsupported type"
        ) from None


def _publicBytes(publicKey: PublicKeyTypes) -> bytes:
    return publicKey.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@implementer(IOpenSSLContextFactory)
class ReloadableServerOptions:
    """
    Server TLS options whose certificate can be replaced while running
    (SIGHUP): Twisted asks C{getContext()} for every new TLS connection,
    both implicit TLS and STARTTLS, so new connections get the new
    certificate and established ones keep theirs.

    @ivar current: the L{CertificateOptions} in force.
    """

    def __init__(self, options: CertificateOptions) -> None:
        self.current = options

    def getContext(self) -> Any:
        return self.current.getContext()


def loadServerOptions(
    certPath: str, keyPath: str, profile: TLSProfile = INTERMEDIATE
) -> CertificateOptions:
    """
    Load a server's certificate chain and key as TLS options for a
    listener (implicit TLS or STARTTLS).

    C{profile} says which versions and suites are offered: by default
    Mozilla's intermediate profile, TLS 1.2 with forward secrecy and AEAD
    suites only, and TLS 1.3 (RFC 8996 deprecates 1.0 and 1.1).
    C{certPath} and C{keyPath} may be the same file holding both.

    @param certPath: PEM file with the server certificate first, then any
        intermediate certificates in order (sent as the chain).
    @param keyPath: PEM file with the unencrypted private key.
    @raise CertificateError: for a missing or unreadable file, a file that
        is not PEM, an encrypted key, a chain out of order, a key that does
        not belong to the certificate, or material OpenSSL refuses.
    """
    chain = _loadChain(certPath)
    key = _loadKey(keyPath)
    try:
        keyPublic = _publicBytes(key.public_key())
        certPublic = _publicBytes(chain[0].public_key())
    except (ValueError, UnsupportedAlgorithm):
        keyPublic, certPublic = b"key", b"certificate"
    if keyPublic != certPublic:
        raise CertificateError(
            keyPath, f"the private key does not match the certificate in {certPath}"
        )
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
            dsa.DSAPrivateKey,
        ),
    ):
        # A key agreement key (DH, X25519, X448) cannot sign: no certificate has one.
        raise CertificateError(keyPath, "the private key is not of a type that can sign")
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(chain[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            **profile.certificateOptions(),
        )
        # Build the OpenSSL context now, so that whatever OpenSSL objects
        # to (a key too weak for its security level, say) stops startup
        # instead of failing every handshake.  The context is cached, so
        # this is the only time Twisted hands the pyOpenSSL objects its
        # API asks for to pyOpenSSL, which now deprecates them in favour
        # of cryptography's; that warning is for Twisted, not for relayd's
        # operators.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="Passing pyOpenSSL (X509|PKey) objects is deprecated",
                category=DeprecationWarning,
            )
            options.getContext()
    except (SSL.Error, crypto.Error, ValueError, TypeError) as e:
        raise CertificateError(certPath, f"OpenSSL refused the certificate or key: {e}") from None
    return options


# python -m relayd.certificates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relayd.certificates",
        description="Make a self-signed certificate and key for development.",
    )
    parser.add_argument("--hostname", required=True, help="name the certificate is for")
    parser.add_argument("--cert", required=True, metavar="PATH", help="certificate file to write")
    parser.add_argument(
        "--key", required=True, metavar="PATH", help="key file to write (mode 0600)"
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Make a self-signed pair for C{--hostname} into C{--cert} and C{--key}.

    @return: 0 on success, 1 on failure (one line on standard error);
        usage errors exit with 2 through L{argparse}.
    """
    parser = _parser()
    options = parser.parse_args(argv)
    if options.days < 1:
        parser.error("--days must be at least 1")
    if not options.force:
        for path in (options.cert, options.key):
            if os.path.lexists(path):
                print(
                    f"relayd.certificates: {path} exists; use --force to overwrite",
                    file=sys.stderr,
                )
                return 1
    certPem, keyPem = makeSelfSigned(options.hostname, options.days)
    try:
        writeKeyPair(options.cert, options.key, certPem, keyPem)
    except OSError as e:
        print(
            f"relayd.certificates: {e.filename or options.cert}: {e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
