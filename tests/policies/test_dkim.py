"""
The C{dkim} policy over real sockets and real DNS: keys are made in the
test, their public halves published as TXT records in a
L{relayd.testing.DNSServer}, messages sent to an in-process relayd, and
the stored data files verified with dkimpy, which looks the keys up in that
DNS server through dnspython.
"""

import base64
import ipaddress
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from relayd.address import Address
from relayd.config import ConfigError, load
from relayd.envelope import Envelope, Headers, Message, Session
from relayd.policies.dkim import DEFAULT_SIGN_HEADERS, DKIMSign, loadKey
from relayd.policy import PolicyContext, PolicyOptionError, loadPolicies
from relayd.service import buildService
from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    DNSServer,
    InProcessRelayd,
    SinkServer,
    TestSetup,
    WireClient,
)

REPO = Path(__file__).resolve().parents[2]
POLICYDIST = str(Path(__file__).resolve().parents[1] / "policydist")
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_ED = ed25519.Ed25519PrivateKey.generate()
_ED_ORG = ed25519.Ed25519PrivateKey.generate()


def pem(key, pkcs8=True):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def seed(key):
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw) + b"\n"


def publicRecord(key):
    """The DKIM TXT record of C{key}, made here rather than by relayd."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def writeFile(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def sendRaw(port, data, sender="alice@example.com"):
    c = WireClient(port)
    try:
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        code, lines = c.sendMessage(sender, ["bob@example.net"], data)
        assert code == 250, (code, lines)
        return lines[0].rsplit(" ", 1)[1]
    finally:
        c.close()


def dnsfunc(port):
    """A dkimpy C{dnsfunc} asking the test DNS server through dnspython."""

    def get(name, timeout=5):
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = port
        resolver.lifetime = timeout
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return get


DOMAINS = {
    "example.com": [
        {"selector": "rsa2026", "key": "dkim/example.com.rsa.pem"},
        {"selector": "ed2026", "key": "dkim/example.com.ed25519.pem"},
    ],
    "example.org": {"selector": "org", "key": "dkim/example.org.seed", "subdomains": True},
}


class DKIMTestCase(unittest.TestCase):
    chain = ["mynetworks", "authenticated", "dkim"]
    headersOptions: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-dkim-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.dns = DNSServer()
        self.dnsPort = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.dns.setTXT("rsa2026._domainkey.example.com", [publicRecord(_RSA)])
        self.dns.setTXT("ed2026._domainkey.example.com", [publicRecord(_ED)])
        self.dns.setTXT("org._domainkey.example.org", [publicRecord(_ED_ORG)])
        policies = {"dkim": {"domains": DOMAINS}}
        if "headers" in self.chain:
            policies["headers"] = self.headersOptions
        self.setup = TestSetup(directory, chain=self.chain, policies=policies)
        writeFile(os.path.join(directory, "dkim/example.com.rsa.pem"), pem(_RSA, pkcs8=False))
        writeFile(os.path.join(directory, "dkim/example.com.ed25519.pem"), pem(_ED))
        writeFile(os.path.join(directory, "dkim/example.org.seed"), seed(_ED_ORG))
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def send(self, data, **kw):
        return deferToThread(sendRaw, self.relayd.port("relay"), data, **kw)

    def stored(self, queueId):
        spool = self.relayd.spool
        record, _ = spool.load(queueId)
        return spool.readData(queueId), record

    def verify(self, data, index=0):
        """Verify signature C{index} (0: the top one) of C{data}, in a thread."""

        def check():
            try:
                return dkim.DKIM(data).verify(idx=index, dnsfunc=dnsfunc(self.dnsPort))
            except dkim.DKIMException:
                return False  # as dkim.verify does

        return deferToThread(check)

    def signatures(self, data):
        """The tags of each C{DKIM-Signature:} field, top first."""
        headers, _ = Headers.parse(data)
        result = []
        for f in headers:
            if f.name == "DKIM-Signature":
                tags = {
                    k.strip(): re.sub(r"\s+", "", v)
                    for k, v in (t.split("=", 1) for t in f.value.split(";") if "=" in t)
                }
                result.append(tags)
        return result

    def unsigned(self, data):
        """C{data} without the signatures and relayd's own trace on top."""
        headers, _ = Headers.parse(data)
        skip = 0
        for f in headers:
            skip += len(f.raw)
            if f.name == "Received":
                break
        return data[skip:]


MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: a folded\r\n"
    b"   subject with \xc3\xa9 8-bit\r\n"
    b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"X-Custom: not signed\r\n"
    b"\r\n"
    b"Hello,   with  spaces   \r\n"
    b".dot line\r\n"
    b"\r\n"
    b"\r\n"
)


class SigningTests(DKIMTestCase):
    @defer.inlineCallbacks
    def test_rsaAndEd25519(self):
        """
        A domain with two keys gets two signatures at the top, RSA first
        as configured, both verifying against the published keys; the rest
        of the message is stored as sent.
        """
        queueId = yield self.send(MESSAGE)
        data, _ = self.stored(queueId)
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
        rsaTags, edTags = self.signatures(data)
        self.assertEqual(
            [(t["a"], t["d"], t["s"], t["c"]) for t in (rsaTags, edTags)],
            [
                ("rsa-sha256", "example.com", "rsa2026", "relaxed/relaxed"),
                ("ed25519-sha256", "example.com", "ed2026", "relaxed/relaxed"),
            ],
        )
        self.assertEqual(
            rsaTags["h"].split(":"), ["from", "from", "subject", "date", "message-id", "to"]
        )
        self.assertEqual(self.unsigned(data), MESSAGE)
        self.assertTrue((yield self.verify(data, 0)))
        self.assertTrue((yield self.verify(data, 1)))
        self.assertTrue((yield deferToThread(dkim.verify, data, dnsfunc=dnsfunc(self.dnsPort))))

    @defer.inlineCallbacks
    def test_modifiedFails(self):
        """
        The signatures protect the message: a changed body, a changed
        signed field, a second C{From:} (oversigned) all fail, while a
        field that is not signed may be added.
        """
        queueId = yield self.send(MESSAGE)
        data, _ = self.stored(queueId)
        self.assertTrue((yield self.verify(data, 0)))
        for tampered in [
            data + b"P.S. added later\r\n",
            data.replace(b"Hello,", b"Hallo,"),
            data.replace(b"Subject: a folded", b"Subject: a changed"),
            data.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice"),
        ]:
            self.assertFalse((yield self.verify(tampered, 0)))
            self.assertFalse((yield self.verify(tampered, 1)))
        added = data.replace(b"X-Custom:", b"X-Added: fine\r\nX-Custom:")
        self.assertTrue((yield self.verify(added, 0)))

    @defer.inlineCallbacks
    def test_subdomainAndSeedKey(self):
        """
        With C{subdomains}, mail from a subdomain is signed with the
        parent's key (C{d=} the parent); an Ed25519 key given as a base64
        seed works.
        """
        message = MESSAGE.replace(b"alice@example.com", b"alice@mail.Example.ORG")
        queueId = yield self.send(message)
        data, _ = self.stored(queueId)
        [tags] = self.signatures(data)
        self.assertEqual(
            (tags["a"], tags["d"], tags["s"]), ("ed25519-sha256", "example.org", "org")
        )
        self.assertTrue((yield self.verify(data)))

    @defer.inlineCallbacks
    def test_noKeyPassesUnsigned(self):
        """
        The C{From:} domain decides: mail from a domain without a key (even
        with an envelope sender that has one) is stored unsigned, exactly
        as it came; so is mail from a subdomain of a domain without
        C{subdomains}.
        """
        for sender in (b"carol@example.net", b"carol@sub.example.com"):
            message = MESSAGE.replace(b"alice@example.com", sender)
            queueId = yield self.send(message)
            data, _ = self.stored(queueId)
            self.assertEqual(self.signatures(data), [])
            self.assertTrue(data.startswith(b"Received: "))
            self.assertEqual(self.unsigned(data), message)

    @defer.inlineCallbacks
    def test_envelopeSenderWithoutFrom(self):
        """Without an address in C{From:}, the envelope sender's domain signs."""
        message = b"Subject: no from\r\n\r\nbody\r\n"
        queueId = yield self.send(message, sender="alice@example.com")
        data, _ = self.stored(queueId)
        self.assertEqual([t["d"] for t in self.signatures(data)], ["example.com", "example.com"])
        self.assertTrue((yield self.verify(data)))

    @defer.inlineCallbacks
    def test_unsignableMessagesPass(self):
        """
        A message whose header section is not ended by an empty line, or
        that dkimpy cannot parse (white space before a colon), is queued
        unsigned and as sent, with a warning.
        """
        for message in [
            b"From: alice@example.com\r\nno empty line before this body\r\n",
            b"From: alice@example.com\r\nX-Odd : spacing\r\n\r\nbody\r\n",
        ]:
            queueId = yield self.send(message)
            data, _ = self.stored(queueId)
            self.assertEqual(self.signatures(data), [])
            self.assertEqual(self.unsigned(data), message)
            warnings = [
                e
                for e in self.events
                if e.get("queue_id") == queueId and "not signed" in e.get("log_format", "")
            ]
            self.assertEqual(len(warnings), 1)


class LargeHeaderTests(DKIMTestCase):
    @defer.inlineCallbacks
    def test_headerSectionOverLimitRefused(self):
        """
        A From: after more header than relayd parses is never signed
        unseen (the key would be picked from the envelope): the message is
        refused with 552 5.3.4, and the session goes on.
        """
        line = b"X-Pad: " + b"p" * 900 + b"\r\n"
        big = line * (1_100_000 // len(line) + 1) + MESSAGE

        def dialogue():
            c = WireClient(self.relayd.port("relay"))
            try:
                assert c.reply()[0] == 220
                assert c.command("EHLO client.test")[0] == 250
                replies = []
                for data in (big, MESSAGE):
                    code, lines = c.sendMessage("alice@example.com", ["bob@example.net"], data)
                    replies.append((code, lines[0]))
                return replies
            finally:
                c.close()

        refused, after = yield deferToThread(dialogue)
        self.assertEqual(refused, (552, "5.3.4 Error: message header section exceeds fixed limit"))
        self.assertEqual(after[0], 250)
        [queueId] = self.relayd.spool.entries("incoming")
        data, _ = self.stored(queueId)
        self.assertNotIn(b"X-Pad", data)
        self.assertTrue((yield self.verify(data)))


class HeadersThenDKIMTests(DKIMTestCase):
    """The C{headers} policy edits, C{dkim} (last) signs the result."""

    chain = ["mynetworks", "authenticated", "headers", "dkim"]
    headersOptions = {"masquerade": ["example.com"], "privacy": True, "remove": ["User-Agent"]}

    @defer.inlineCallbacks
    def test_chain(self):
        """
        An authenticated submission from a host of example.com: the sender
        is masqueraded, the trace made private, a field removed, C{Date:}
        and C{Message-ID:} added; the signature covers all of that and
        verifies.
        """
        message = (
            b"From: Alice <alice@laptop.example.com>\r\n"
            b"To: bob@example.net\r\n"
            b"User-Agent: Mutt\r\n"
            b"Subject: hi\r\n"
            b"\r\n"
            b"body\r\n"
        )

        def submit():
            port = self.relayd.port("submission")
            with smtplib.SMTP("127.0.0.1", port, local_hostname="laptop.test", timeout=30) as s:
                s.starttls(context=self.setup.clientContext())
                s.login(DEMO_USER, DEMO_PASSWORD)
                s.sendmail("alice@laptop.example.com", ["bob@example.net"], message)

        yield deferToThread(submit)
        [queueId] = self.relayd.spool.entries("incoming")
        data, record = self.stored(queueId)
        self.assertEqual(record.sender, "alice@example.com")
        headers, _ = Headers.parse(data)
        names = [f.name for f in headers]
        self.assertEqual(
            names,
            [
                "DKIM-Signature",
                "DKIM-Signature",
                "Received",
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
            ],
        )
        self.assertIn(b"Received: from hidden.invalid (authenticated submission)", data)
        self.assertIn(b"From: Alice <alice@example.com>\r\n", data)
        tags = self.signatures(data)[0]
        self.assertEqual(tags["d"], "example.com")
        self.assertEqual(
            tags["h"].split(":"), ["from", "from", "subject", "date", "message-id", "to"]
        )
        self.assertTrue((yield self.verify(data, 0)))
        self.assertTrue((yield self.verify(data, 1)))
        undone = data.replace(b"alice@example.com>", b"alice@laptop.example.com>")
        self.assertFalse((yield self.verify(undone, 0)))


class AcceptedAtDataStillSignedTests(unittest.TestCase):
    """
    DKIM is a modifier: a check that answers ACCEPT at the end of DATA
    ends the checks, not the modifiers, so the message still leaves
    signed.  The chain lists the check first, as an operator might
    ("acceptor" vouches, so why ask further?); before the modifier phase
    that order sent the message out unsigned.
    """

    @defer.inlineCallbacks
    def test_acceptThenSigned(self):
        sys.path.insert(0, POLICYDIST)
        self.addCleanup(sys.path.remove, POLICYDIST)
        directory = tempfile.mkdtemp(prefix="relayd-dkim-")
        self.addCleanup(shutil.rmtree, directory, True)
        dns = DNSServer()
        dnsPort = dns.start(reactor)
        self.addCleanup(dns.stop)
        dns.setTXT("rsa2026._domainkey.example.com", [publicRecord(_RSA)])
        dns.setTXT("ed2026._domainkey.example.com", [publicRecord(_ED)])
        sink = SinkServer()
        sinkPort = sink.start(reactor)
        self.addCleanup(sink.stop)
        setup = TestSetup(
            directory,
            chain=["acceptor", "mynetworks", "dkim"],
            policies={"dkim": {"domains": {"example.com": DOMAINS["example.com"]}}},
            modes=("relay",),
            sections={"delivery": {"enabled": True, "connect_timeout": 10}},
        )
        setup.routeAllTo(sinkPort)
        writeFile(os.path.join(directory, "dkim/example.com.rsa.pem"), pem(_RSA, pkcs8=False))
        writeFile(os.path.join(directory, "dkim/example.com.ed25519.pem"), pem(_ED))
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def send():
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=30) as s:
                s.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)

        yield deferToThread(send)
        deadline = time.monotonic() + 30
        while not sink.messages:
            self.assertLess(time.monotonic(), deadline, "nothing reached the sink")
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(relayd.service.policies.chain.names["acceptor"].asked, 1)
        [delivered] = sink.messages
        self.assertEqual(delivered.recipients, ["bob@example.net"])
        data = delivered.data
        self.assertTrue(data.startswith(b"DKIM-Signature: "), data[:200])
        self.assertTrue(data.endswith(MESSAGE), data[-300:])
        check = dnsfunc(dnsPort)
        for index in (0, 1):
            verified = yield deferToThread(dkim.DKIM(data).verify, idx=index, dnsfunc=check)
            self.assertTrue(verified, index)


class KeyTests(unittest.TestCase):
    def test_formats(self):
        """
        RSA keys in PKCS#1 and PKCS#8 PEM, Ed25519 keys in PKCS#8 PEM and
        as a base64 seed, each with the DNS record to publish.
        """
        for data, algorithm, key in [
            (pem(_RSA, pkcs8=False), b"rsa-sha256", _RSA),
            (pem(_RSA), b"rsa-sha256", _RSA),
            (pem(_ED), b"ed25519-sha256", _ED),
            (seed(_ED), b"ed25519-sha256", _ED),
        ]:
            parsed = loadKey(data)
            self.assertEqual(parsed.algorithm, algorithm)
            self.assertEqual(parsed.dnsRecord(), publicRecord(key))

    def test_refused(self):
        """Keys DKIM cannot use are refused with a reason."""
        encrypted = _RSA.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        ecKey = pem(ec.generate_private_key(ec.SECP256R1()))
        short = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
        for data, reason in [
            (b"garbage", "not a PEM private key nor a base64 Ed25519 seed"),
            (base64.b64encode(b"x" * 31), "not a PEM private key nor a base64 Ed25519 seed"),
            (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a valid PEM"),
            (encrypted, "encrypted"),
            (ecKey, "unsupported key type"),
            (short, "RSA key of 512 bits"),
        ]:
            error = self.assertRaises(ValueError, loadKey, data)
            self.assertIn(reason, str(error))


def configDir(test, options, keys=()):
    directory = tempfile.mkdtemp(prefix="relayd-dkim-")
    test.addCleanup(shutil.rmtree, directory, True)
    setup = TestSetup(directory, chain=["mynetworks", "dkim"], policies={"dkim": options})
    for name, data in keys:
        writeFile(os.path.join(directory, name), data)
    return setup


GOOD_KEYS = (("dkim/good.pem", pem(_ED)),)


class ConfigTests(unittest.TestCase):
    def error(self, options, keys=GOOD_KEYS):
        setup = configDir(self, options, keys)
        config = load(setup.configPath)
        return self.assertRaises(ConfigError, buildService, config, Clock()), setup

    def check(self, options, key, problem, keys=GOOD_KEYS):
        error, setup = self.error(options, keys)
        self.assertEqual((error.path, error.key), (setup.configPath, f"policies.dkim.{key}"))
        self.assertIn(problem, error.problem)
        return error

    def test_keyFiles(self):
        """
        A key that cannot be read or used stops the build with one error
        naming the key's option and the file.
        """
        good = {"selector": "s", "key": "dkim/good.pem"}
        error = self.check(
            {"domains": {"example.com": {"selector": "s", "key": "dkim/missing.pem"}}},
            'domains."example.com".key',
            "cannot read ",
        )
        self.assertIn("dkim/missing.pem: No such file or directory", error.problem)
        self.assertTrue(os.path.isabs(error.problem.split()[2]))
        error = self.check(
            {"domains": {"example.com": [good, {"selector": "t", "key": "dkim/bad.pem"}]}},
            'domains."example.com"[1].key',
            "dkim/bad.pem: not a PEM private key",
            keys=(("dkim/good.pem", pem(_ED)), ("dkim/bad.pem", b"junk")),
        )

    def test_options(self):
        """Each bad option names itself."""
        good = {"selector": "s", "key": "dkim/good.pem"}
        domains = {"example.com": good}
        for options, key, problem in [
            ({}, "domains", "must be a table"),
            ({"domains": {"not a domain": good}}, 'domains."not a domain"', "not a domain"),
            ({"domains": {"example.com": "x"}}, 'domains."example.com"', "must be a table"),
            (
                {"domains": {"example.com": dict(good, selector="a b")}},
                'domains."example.com".selector',
                "not a selector",
            ),
            (
                {"domains": {"example.com": {"selector": "s"}}},
                'domains."example.com".key',
                "must be the path",
            ),
            (
                {"domains": {"example.com": dict(good, subdomain=True)}},
                'domains."example.com".subdomain',
                "unknown option",
            ),
            (
                {"domains": {"example.com": dict(good, subdomains="yes")}},
                'domains."example.com".subdomains',
                "must be true or false",
            ),
            ({"domains": domains, "sign_headers": ["Subject"]}, "sign_headers", "include From"),
            (
                {"domains": domains, "sign_headers": ["From", "Received"]},
                "sign_headers",
                "must not sign Received",
            ),
            ({"domains": domains, "oversign": "From"}, "oversign", "must be a list"),
            ({"domains": domains, "canonicalization": "loose"}, "canonicalization", "must be"),
            ({"domains": domains, "sessions": "x"}, "sessions", "must be"),
            ({"domains": domains, "threads": 0}, "threads", "from 1 to 64"),
            ({"domains": domains, "mystery": 1}, "mystery", "unknown option"),
        ]:
            self.check(options, key, problem)

    def test_loaded(self):
        """Good options give a L{DKIMSign}; relative key paths are taken
        from the config file's folder."""
        setup = configDir(
            self,
            {
                "domains": {"Example.COM": {"selector": "s", "key": "dkim/good.pem"}},
                "canonicalization": "simple/relaxed",
                "oversign": ["From", "Subject"],
            },
            keys=(("dkim/good.pem", pem(_ED)),),
        )
        policies, _ = loadPolicies(load(setup.configPath))
        policy = policies[-1]
        self.assertIsInstance(policy, DKIMSign)
        [signer] = policy.signers
        self.assertEqual(signer.domain, "example.com")
        self.assertEqual(signer.path, os.path.join(setup.directory, "dkim/good.pem"))
        self.assertEqual(policy.canonicalization, (b"simple", b"relaxed"))
        self.assertEqual(policy.signHeaders, tuple(h.lower() for h in DEFAULT_SIGN_HEADERS))
        self.assertEqual(
            policy._includeHeaders(["Subject", "from", "To", "To", "X-A"]),
            [b"from", b"from", b"subject", b"subject", b"to", b"to"],
        )
        self.assertEqual([s.domain for s in policy.signersFor("a.b.example.com")], [])
        self.assertEqual(policy.signersFor("EXAMPLE.com."), [signer])

    @defer.inlineCallbacks
    def test_authenticatedOnlyAndIDN(self):
        """
        With C{sessions = "authenticated"}, a session without AUTH is not
        signed; a C{From:} domain in Unicode finds the key of its A-label
        form; without oversigning, C{From} is still signed once.
        """
        setup = configDir(
            self,
            {
                "domains": {"xn--bcher-kva.example": {"selector": "s", "key": "dkim/good.pem"}},
                "sessions": "authenticated",
                "oversign": [],
            },
            keys=GOOD_KEYS,
        )
        [policy] = [p for p in loadPolicies(load(setup.configPath))[0] if p.name == "dkim"]
        policy.startPolicy(reactor)
        self.addCleanup(policy.stopPolicy)
        path = os.path.join(setup.directory, "message")
        raw = "From: a@b\u00fccher.example\r\n\r\nbody\r\n".encode()
        writeFile(path, raw)
        envelope = Envelope(Address("a", "example.net"), queueId="Q1")
        for user, signed in [(None, False), ("demo", True)]:
            session = Session(
                ipaddress.ip_address("127.0.0.1"), 1, "relay", "relay", "S", user=user
            )
            message = Message(path, len(raw))
            done = yield policy.modifyMessage(session, envelope, message)
            self.assertIsNone(done)
            self.assertEqual(message.changed, signed)
        [tags] = self.signatures(message.asBytes())
        self.assertEqual((tags["d"], tags["h"]), ("xn--bcher-kva.example", "from"))

    signatures = DKIMTestCase.signatures

    def test_twistd(self):
        """
        The real C{twistd relayd} with an unreadable key: one line naming
        the config file, the key's option and the file; exit status 1.
        """
        setup = configDir(
            self, {"domains": {"example.com": {"selector": "s", "key": "dkim/missing.pem"}}}
        )
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "relayd",
                "--config",
                setup.configPath,
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1, result)
        text = result.stdout + result.stderr
        self.assertNotIn("Traceback", text)
        lines = [line for line in text.splitlines() if "relayd: " in line]
        path = os.path.join(setup.directory, "dkim/missing.pem")
        self.assertEqual(
            lines,
            [
                (
                    f"relayd: config error: {setup.configPath}: "
                    f'policies.dkim.domains."example.com".key: '
                    f"cannot read {path}: No such file or directory"
                )
            ],
        )


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_reload(self):
        """
        SIGHUP's C{reload} reads the key files again: a replaced key is
        used from then on; a broken one keeps the old keys and fails.
        """
        directory = tempfile.mkdtemp(prefix="relayd-dkim-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "k.pem")
        writeFile(path, pem(_ED))
        context = PolicyContext(os.path.join(directory, "relayd.toml"), "relayd.test", "dkim")
        policy = DKIMSign.fromConfig(
            {"domains": {"example.com": {"selector": "s", "key": "k.pem"}}}, context
        )
        self.assertRaises(RuntimeError, policy.reload)
        policy.startPolicy(reactor)
        self.addCleanup(policy.stopPolicy)
        replacement = ed25519.Ed25519PrivateKey.generate()
        writeFile(path, seed(replacement))
        yield policy.reload()
        self.assertEqual(policy.signers[0].key.dnsRecord(), publicRecord(replacement))
        writeFile(path, b"broken")
        error = yield self.assertFailure(policy.reload(), PolicyOptionError)
        self.assertEqual(error.key, 'domains."example.com".key')
        self.assertEqual(policy.signers[0].key.dnsRecord(), publicRecord(replacement))


class LongTXTTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_split(self):
        """
        L{DNSServer.setTXT} stores a string longer than 255 octets as
        several character-strings of one record (RFC 1035 section
        3.3.14); joined, they give the string back.
        """
        server = DNSServer()
        port = server.start(reactor)
        self.addCleanup(server.stop)
        text = "v=DKIM1; k=rsa; p=" + "A" * 600
        server.setTXT("long.test", [text])
        server.setTXT("short.test", ["short", ""])

        def ask(name):
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            resolver.port = port
            return sorted(tuple(r.strings) for r in resolver.resolve(name, "TXT"))

        [strings] = yield deferToThread(ask, "long.test")
        self.assertEqual([len(s) for s in strings], [255, 255, 108])
        self.assertEqual(b"".join(strings).decode(), text)
        short = yield deferToThread(ask, "short.test")
        self.assertEqual(short, [(b"",), (b"short",)])
