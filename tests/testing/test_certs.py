"""
L{relayd.testing.certs}: what it writes is what a TLS client and server
need, and nothing overwrites anything else.
"""

import contextlib
import os
import ssl
import stat

import pytest
from cryptography import x509

from relayd.testing.certs import makeCA, makeServerCert, writeRSASelfSigned


def handshake(cafile, cert, hostname):
    """A TLS handshake in memory: a client trusting C{cafile} to a server with C{cert}."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert.certPath, cert.keyPath)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = ssl.create_default_context(cafile=cafile).wrap_bio(
        bios[0], bios[1], server_hostname=hostname
    )
    serving = server.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):
        for side in (client, serving):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    client.do_handshake()


def test_serverCertVerifiesAgainstItsCA(tmp_path):
    """A client trusting the CA's file accepts the server's certificate, for its name only."""
    ca = makeCA(str(tmp_path), "relayd test CA")
    cert = makeServerCert(ca, str(tmp_path), "mx.example.test")
    assert ca.path == str(tmp_path / "relayd-test-CA.pem")
    handshake(ca.path, cert, "mx.example.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca.path, cert, "other.example.test")
    stranger = makeCA(str(tmp_path), "someone else")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(stranger.path, cert, "mx.example.test")
    leaf = x509.load_pem_x509_certificate(cert.certificate)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(os.stat(cert.keyPath).st_mode) == 0o600


def test_oneNameTwoCAsTwoFiles(tmp_path):
    """Certificates for one name from two CAs do not overwrite each other."""
    good = makeServerCert(makeCA(str(tmp_path), "good CA"), str(tmp_path), "smarthost.test")
    bad = makeServerCert(makeCA(str(tmp_path), "bad CA"), str(tmp_path), "smarthost.test")
    assert len({good.certPath, bad.certPath, good.keyPath, bad.keyPath}) == 4
    assert open(good.certPath, "rb").read() == good.certificate
    assert open(bad.certPath, "rb").read() == bad.certificate


def test_intermediate(tmp_path):
    root = makeCA(str(tmp_path), "root")
    intermediate = makeCA(str(tmp_path), "intermediate", signedBy=root)
    certificate = x509.load_pem_x509_certificate(intermediate.certificate)
    assert certificate.issuer.rfc4514_string() == "CN=root"


def test_rsaSelfSigned(tmp_path):
    certPath, keyPath = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    writeRSASelfSigned(certPath, keyPath)
    certificate = x509.load_pem_x509_certificate(open(certPath, "rb").read())
    assert certificate.public_key().key_size == 2048
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certPath, keyPath)
