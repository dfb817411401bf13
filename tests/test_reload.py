"""
Reload (SIGHUP, L{relayd.service.RelaydService.reload}): the policy chain,
users file, TLS certificate, routes and session settings change without
dropping sessions; an invalid new config is refused and the old one stays.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import ssl
import tempfile
import time
from pathlib import Path

from cryptography import x509
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relayd.certificates import issueCertificate, makeCA, writeKeyPair
from relayd.smtp.auth import setPassword
from relayd.testing import InProcessRelayd, TestSetup, WireClient
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)

OLD_CHAIN = 'chain = ["mynetworks", "authenticated"]'
NEW_CHAIN = 'chain = ["authenticated"]'


def rewrite(path: str, old: str, new: str) -> None:
    text = Path(path).read_text()
    assert old in text, (old, text)
    Path(path).write_text(text.replace(old, new))


def peerSubject(port: int, context: ssl.SSLContext) -> str:
    c = WireClient(port, context=context)
    try:
        der = c.sock.getpeercert(binary_form=True)
    finally:
        c.close()
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string()


class InProcessReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-reload-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.setup = TestSetup(self.directory)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logText(self):
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)

    @defer.inlineCallbacks
    def test_chainChangeKeepsOpenSession(self):
        """
        A session open across the reload goes on, and its next RCPT is
        judged by the new chain: without mynetworks, loopback is an outsider.
        """
        port = self.relayd.port("relay")

        def before():
            c = WireClient(port)
            c.reply()
            c.command("EHLO client.test")
            return c, c.command("MAIL FROM:<a@example.org>"), c.command("RCPT TO:<b@example.net>")

        client, mail, rcpt = yield deferToThread(before)
        self.addCleanup(client.close)
        self.assertEqual((mail[0], rcpt[0]), (250, 250))
        rewrite(
            self.setup.configPath,
            'chain = ["mynetworks", "authenticated"]',
            'chain = ["authenticated"]',
        )
        ok = yield self.relayd.service.reload()
        self.assertTrue(ok, self.logText())
        after = yield deferToThread(client.command, "RCPT TO:<c@example.net>")
        self.assertEqual(after[0], 554)
        data = yield deferToThread(client.command, "DATA")
        self.assertEqual(data[0], 354, "the recipient accepted before the reload stays")

    @defer.inlineCallbacks
    def test_connectionLimitsChange(self):
        """
        C{[limits] connections_per_client} and C{connections} are put in
        force by a reload: connections already counted stay counted, new
        ones are held to the new numbers.
        """
        port = self.relayd.port("relay")

        def greeting():
            c = WireClient(port)
            return c, c.reply()

        held = []
        for _ in range(2):
            client, reply = yield deferToThread(greeting)
            self.addCleanup(client.close)
            held.append(client)
            self.assertEqual(reply[0], 220)
        with open(self.setup.configPath, "a") as f:
            f.write("\n[limits]\nconnections_per_client = 2\n")
        ok = yield self.relayd.service.reload()
        self.assertTrue(ok, self.logText())
        client, reply = yield deferToThread(greeting)
        self.addCleanup(client.close)
        self.assertEqual(reply[0], 421)
        self.assertIn("4.7.0", reply[1][0])
        self.assertIn("too many connections from your address", reply[1][0])

    @defer.inlineCallbacks
    def test_invalidConfigRefused(self):
        rewrite(self.setup.configPath, "[spool]", "[spool\n")
        ok = yield self.relayd.service.reload()
        self.assertFalse(ok)
        self.assertIn("reload refused, the old config stays in force", self.logText())
        refused = yield deferToThread(self.send, "relay")
        self.assertEqual(refused, {})

    @defer.inlineCallbacks
    def test_badCertificateRefused(self):
        Path(self.directory, "key.pem").write_text("not a key\n")
        ok = yield self.relayd.service.reload()
        self.assertFalse(ok)
        self.assertIn("tls.key", self.logText())
        subject = yield deferToThread(
            peerSubject, self.relayd.port("submissions"), self.setup.clientContext()
        )
        self.assertIn("CN=localhost", subject)

    @defer.inlineCallbacks
    def test_newCertificateAndUsers(self):
        """
        After replacing the certificate files and the users file, new TLS
        connections (implicit and STARTTLS) get the new certificate and the
        new user can log in; a TLS session opened before keeps working.
        """
        context = self.setup.clientContext()
        context.check_hostname = False
        old = yield deferToThread(self.openTLS, context)
        self.addCleanup(old.close)
        caCert, caKey = makeCA("second CA")
        cert, key = issueCertificate(caCert, caKey, "renewed.localhost", ipAddresses=("127.0.0.1",))
        writeKeyPair(
            str(Path(self.directory, "cert.pem")), str(Path(self.directory, "key.pem")), cert, key
        )
        Path(self.directory, "ca2.pem").write_bytes(caCert)
        setPassword(str(Path(self.directory, "users2")), "newuser", "new password", rounds=4)
        rewrite(self.setup.configPath, 'users_file = "users"', 'users_file = "users2"')
        ok = yield self.relayd.service.reload()
        self.assertTrue(ok, self.logText())

        newContext = ssl.create_default_context(cafile=str(Path(self.directory, "ca2.pem")))
        newContext.check_hostname = False
        subject = yield deferToThread(peerSubject, self.relayd.port("submissions"), newContext)
        self.assertIn("CN=renewed.localhost", subject)

        def starttlsLogin():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("submission"), timeout=10) as s:
                s.starttls(context=newContext)
                s.login("newuser", "new password")
                return s.sock.getpeercert(binary_form=True)

        der = yield deferToThread(starttlsLogin)
        self.assertIn("renewed", x509.load_der_x509_certificate(der).subject.rfc4514_string())
        oldStill = yield deferToThread(old.command, "NOOP")
        self.assertEqual(oldStill[0], 250)

    def openTLS(self, context):
        c = WireClient(self.relayd.port("submissions"), context=context)
        c.reply()
        c.command("EHLO client.test")
        return c

    def send(self, mode):
        with smtplib.SMTP("127.0.0.1", self.relayd.port(mode), timeout=10) as s:
            return s.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nx\r\n")


class RouteToSelfReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_routeToOwnListenerRefused(self):
        """
        A reload whose new [[routes]] hop is relayd's own listener is
        refused with the config error naming the hop; the old config stays.
        """
        directory = tempfile.mkdtemp(prefix="relayd-reload-")
        self.addCleanup(shutil.rmtree, directory, True)
        setup = TestSetup(directory, modes=("relay",), portZero=False)
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        port = setup.ports["relay"]
        with open(setup.configPath, "a") as f:
            f.write('\n[[routes]]\ndomains = ["*"]\n[[routes.hops]]\nhost = "localhost"\n')
            f.write(f"port = {port}\n")
        ok = yield relayd.service.reload()
        self.assertFalse(ok)
        self.assertEqual(
            relayd.service.reloadError,
            f"{setup.configPath}: routes[0].hops[0]: localhost:{port} is relayd's own listener "
            f"'relay' (tcp:{port}:interface=127.0.0.1): mail routed there would loop",
        )
        self.assertEqual(relayd.service.config.routes, ())


def test_sighupReloadsRealTwistd(tmp_path: Path, relaydProcesses) -> None:  # noqa: F811
    """SIGHUP to a real twistd: a good config is applied, a bad one refused."""
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",), portZero=False)
    process = RelaydProcess(setup, tmp_path / "relayd.log")
    relaydProcesses.append(process)
    process.waitListening()

    def rcpt() -> int:
        c = WireClient(process.port)
        try:
            c.reply()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            return c.command("RCPT TO:<b@example.net>")[0]
        finally:
            c.close()

    def waitFor(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in process.logPath.read_text():
            assert time.monotonic() < deadline, f"no {text!r}\n{process.log()}"
            time.sleep(0.05)

    assert rcpt() == 250
    rewrite(
        setup.configPath, 'chain = ["mynetworks", "authenticated"]', 'chain = ["authenticated"]'
    )
    process.process.send_signal(signal.SIGHUP)
    waitFor("reload: new config in force")
    assert rcpt() == 554

    rewrite(setup.configPath, 'chain = ["authenticated"]', 'chain = ["nosuchpolicy"]')
    process.process.send_signal(signal.SIGHUP)
    waitFor("reload refused, the old config stays in force")
    assert "unknown policy 'nosuchpolicy'" in process.logPath.read_text()
    assert rcpt() == 554
    assert process.process.poll() is None
    process.terminate()
    process.wait()
