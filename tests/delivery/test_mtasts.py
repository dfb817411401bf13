"""
MTA-STS (RFC 8461, relayd.delivery.mtasts): the TXT record and policy
grammar; the policy fetch from a real HTTPS server on twisted.web (with a
certificate made here, by a CA relayd trusts through its config) whose name
resolves through the project's DNS server; the spool cache; and delivery
end to end, smtplib to relayd to TLS sinks, under enforce and testing.
"""

import io
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from relayd.certificates import issueCertificate, loadServerOptions, makeCA, writeKeyPair
from relayd.delivery.mtasts import (
    NO_POLICY,
    MTASTSPolicies,
    PolicyError,
    TLSPolicy,
    applyTLSPolicy,
    mxMatches,
    parsePolicy,
    parseTXT,
)
from relayd.delivery.routing import Destination, Hop, MXResolver
from relayd.ops import relayctl
from relayd.testing import DNSServer
from tests.delivery.test_attempt_e2e import BODY, DeliveryTestCase, afterReceived

POLICY = (
    b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\n"
    b"mx: *.backup.example.net\r\nmax_age: 86400\r\n"
)


# --- grammar -----------------------------------------------------------------------


class GrammarTests(unittest.TestCase):
    def test_txt(self):
        self.assertEqual(parseTXT(["v=STSv1; id=20160831085700Z;"]), "20160831085700Z")
        self.assertEqual(parseTXT(["v=spf1 -all", "v=STSv1;id=abc"]), "abc")
        self.assertEqual(parseTXT(["v=STSv1; id=abc; extension=value"]), "abc")

    def test_txtRefused(self):
        for records in (
            [],
            ["v=spf1 -all"],
            ["v=STSv1; id=a", "v=STSv1; id=b"],  # two: section 3.1, no policy
            ["v=STSv1;"],
            ["v=STSv1; id=not-alnum"],
            ["v=STSv1; id=" + "a" * 33],
            ["v=STSv10; id=a"],
        ):
            with self.assertRaises(PolicyError, msg=records):
                parseTXT(records)

    def test_policy(self):
        policy = parsePolicy(POLICY)
        self.assertEqual(policy.mode, "enforce")
        self.assertEqual(policy.mx, ("mx1.example.net", "*.backup.example.net"))
        self.assertEqual(policy.maxAge, 86400)
        # LF line ends, unknown keys, the first of a repeated key.
        policy = parsePolicy(
            b"version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.example\nmax_age: 0\n"
        )
        self.assertEqual((policy.mode, policy.mx, policy.maxAge), ("testing", ("a.example",), 0))
        self.assertEqual(parsePolicy(b"version: STSv1\nmode: none\nmax_age: 1\n").mx, ())

    def test_policyRefused(self):
        for body in (
            b"",
            b"<html>not a policy</html>",
            b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\n",
            b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
            b"version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
            b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\n\xff\n",
        ):
            with self.assertRaises(PolicyError, msg=body):
                parsePolicy(body)

    def test_mxMatches(self):
        self.assertTrue(mxMatches("mx1.example.net", "MX1.example.net."))
        self.assertTrue(mxMatches("*.example.net", "mail.example.net"))
        self.assertFalse(mxMatches("*.example.net", "example.net"))
        self.assertFalse(mxMatches("*.example.net", "a.b.example.net"))
        self.assertFalse(mxMatches("*.example.net", "mailexample.net"))
        self.assertFalse(mxMatches("mx1.example.net", "mx2.example.net"))


class ApplyTests(unittest.TestCase):
    destination = Destination(
        "mx:example.net",
        (
            Hop("mx1.example.net", "192.0.2.1", 25, "opportunistic"),
            Hop("evil.example.org", "192.0.2.2", 25, "opportunistic"),
            Hop("b.backup.example.net", "192.0.2.3", 25, "none"),
        ),
    )

    def policy(self, mode):
        return TLSPolicy(
            "mta-sts", mode, ("mx1.example.net", "*.backup.example.net"), "example.net", "1"
        )

    def test_enforceKeepsMatchingHostsVerified(self):
        applied = applyTLSPolicy(self.destination, self.policy("enforce"))
        self.assertIsNone(applied.refusal)
        self.assertEqual(
            [(h.host, h.tls) for h in applied.destination.hops],
            [("mx1.example.net", "verify"), ("b.backup.example.net", "verify")],
        )

    def test_enforceWithoutMatchDefers(self):
        destination = Destination("mx:example.net", self.destination.hops[1:2])
        applied = applyTLSPolicy(destination, self.policy("enforce"))
        self.assertEqual((applied.refusal.code, applied.refusal.enhanced), (451, "4.7.5"))
        self.assertIn("evil.example.org", applied.refusal.text)

    def test_testingAndNoneChangeNothing(self):
        applied = applyTLSPolicy(self.destination, self.policy("testing"))
        # Testing: every hop kept with its TLS mode; the matching ones
        # check the certificate without refusing (relayd.delivery.tlsrpt).
        self.assertEqual(
            [(h.host, h.tls, h.tlsCheck) for h in applied.destination.hops],
            [
                ("mx1.example.net", "opportunistic", True),
                ("evil.example.org", "opportunistic", False),
                ("b.backup.example.net", "none", True),
            ],
        )
        [why] = applied.wouldFail
        self.assertIn("evil.example.org does not match", why)
        for policy in (self.policy("none"), NO_POLICY, TLSPolicy("dane", "enforce")):
            applied = applyTLSPolicy(self.destination, policy)
            self.assertEqual((applied.destination, applied.wouldFail), (self.destination, ()))
            self.assertIsNone(applied.refusal)

    def test_label(self):
        self.assertEqual(self.policy("enforce").label, "mta-sts:enforce")
        self.assertEqual(NO_POLICY.label, "none")


# --- the policy server ----------------------------------------------------------------


class PolicyResource(Resource):
    """
    C{/.well-known/mta-sts.txt}: answers as the test says: a body, a status
    code, a content type, or never (C{hang}).
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = POLICY
        self.code = 200
        self.contentType = b"text/plain"
        self.hang = False
        self.requests = []
        self.hanging = []

    def render_GET(self, request):
        self.requests.append((request.getHeader("host"), request.path))
        if self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        if request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"no"
        request.setResponseCode(self.code)
        if self.code in (301, 302):
            request.setHeader(b"location", b"https://elsewhere.example.net/policy")
        request.setHeader(b"content-type", self.contentType)
        return self.body


class PolicyServer:
    """An HTTPS server on 127.0.0.1 for C{mta-sts.<domain>}, with a certificate from C{ca}."""

    def __init__(self, directory, ca, names):
        self.resource = PolicyResource()
        cert, key = issueCertificate(*ca, names[0])
        paths = [os.path.join(directory, f"policy.{kind}") for kind in ("crt", "key")]
        writeKeyPair(*paths, cert, key)
        self.options = loadServerOptions(*paths)
        self.site = Site(self.resource)
        self.site.noisy = False
        self.port = None
        self.listening = None

    def start(self, port=0):
        self.listening = reactor.listenSSL(port, self.site, self.options, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return self.port

    def stop(self):
        for request in self.resource.hanging:
            if not request.finished:
                request.channel.transport.abortConnection()
        self.resource.hanging = []
        if self.listening is None:
            return defer.succeed(None)
        listening, self.listening = self.listening, None
        return defer.maybeDeferred(listening.stopListening)


def makeTLSDir(testCase):
    directory = tempfile.mkdtemp(prefix="relayd-mtasts-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    ca = makeCA("MTA-STS test CA")
    caPath = os.path.join(directory, "ca.pem")
    with open(caPath, "wb") as f:
        f.write(ca[0])
    return directory, ca, caPath


class FetchTests(unittest.TestCase):
    """L{MTASTSPolicies} against the DNS test server and a twisted.web HTTPS server."""

    def setUp(self):
        self.dns = DNSServer(ttl=0)
        dnsPort = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.resolver = MXResolver(reactor, nameservers=["127.0.0.1"], port=dnsPort, timeout=2)
        self.resolver.start()
        self.addCleanup(self.resolver.stop)
        self.directory, self.ca, self.caPath = makeTLSDir(self)
        self.spool = os.path.join(self.directory, "spool")
        os.mkdir(self.spool)
        self.server = PolicyServer(self.directory, self.ca, ["mta-sts.example.net"])
        self.httpsPort = self.server.start()
        self.addCleanup(lambda: self.server.stop())  # noqa: PLW0108 (the test replaces self.server)
        self.dns.setTXT("_mta-sts.example.net", ["v=STSv1; id=one;"])
        self.dns.setA("mta-sts.example.net", ["127.0.0.1"])
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def policies(self, timeout=5.0):
        return MTASTSPolicies(
            reactor,
            self.resolver,
            self.spool,
            caFile=self.caPath,
            port=self.httpsPort,
            timeout=timeout,
        )

    def logged(self, text):
        return [line for line in map(formatEvent, self.events) if text in line]

    def cacheFile(self):
        return os.path.join(self.spool, "mta-sts", "example.net.json")

    @defer.inlineCallbacks
    def test_fetchedAndCached(self):
        policies = self.policies()
        policy = yield policies.lookup("Example.NET.")
        self.assertEqual(policy.label, "mta-sts:enforce")
        self.assertEqual(policy.mxPatterns, ("mx1.example.net", "*.backup.example.net"))
        self.assertEqual(policy.policyId, "one")
        self.assertLess(abs(policy.expires - (reactor.seconds() + 86400)), 30)
        # Host header: the policy host by its name (section 3.3).
        [(host, path)] = self.server.resource.requests
        self.assertEqual(host, f"mta-sts.example.net:{self.httpsPort}")
        self.assertEqual(path, b"/.well-known/mta-sts.txt")
        with open(self.cacheFile()) as f:
            stored = json.load(f)
        self.assertEqual(stored["mode"], "enforce")
        self.assertEqual(stored["id"], "one")
        # Same id: the cache answers, no second fetch.
        again = yield policies.lookup("example.net")
        self.assertEqual(again.mxPatterns, policy.mxPatterns)
        self.assertEqual(len(self.server.resource.requests), 1)

    @defer.inlineCallbacks
    def test_txtStringsJoined(self):
        """A TXT record split into character-strings is read joined (RFC 8461 section 3.1)."""
        self.dns.setTXT("_mta-sts.example.net", [["v=STSv1; ", "id=split1;"], "v=spf1 -all"])
        records = yield self.resolver.lookupTXT("_mta-sts.example.net")
        self.assertEqual(sorted(records), ["v=STSv1; id=split1;", "v=spf1 -all"])
        policy = yield self.policies().lookup("example.net")
        self.assertEqual(policy.policyId, "split1")

    @defer.inlineCallbacks
    def test_cacheSurvivesRestart(self):
        yield self.policies().lookup("example.net")
        yield self.server.stop()
        restarted = self.policies()
        restarted.loadCache()
        policy = yield restarted.lookup("example.net")
        self.assertEqual((policy.label, policy.note), ("mta-sts:enforce", "cached"))
        self.assertEqual(policy.maxAge, 86400)

    @defer.inlineCallbacks
    def test_cacheWithoutMaxAgeReads(self):
        """A cache file written before relayd kept max_age (for TLSRPT) still reads."""
        yield self.policies().lookup("example.net")
        yield self.server.stop()
        with open(self.cacheFile()) as f:
            stored = json.load(f)
        del stored["max_age"]
        with open(self.cacheFile(), "w") as f:
            json.dump(stored, f)
        restarted = self.policies()
        restarted.loadCache()
        policy = yield restarted.lookup("example.net")
        self.assertEqual(
            (policy.label, policy.note, policy.maxAge), ("mta-sts:enforce", "cached", 0)
        )

    @defer.inlineCallbacks
    def test_expiredCacheIgnored(self):
        self.server.resource.body = POLICY.replace(b"max_age: 86400", b"max_age: 0")
        yield self.policies().lookup("example.net")
        yield self.server.stop()
        restarted = self.policies()
        restarted.loadCache()
        policy = yield restarted.lookup("example.net")
        self.assertEqual(policy.label, "none")

    @defer.inlineCallbacks
    def test_idChangeRefreshesInBackground(self):
        policies = self.policies()
        yield policies.lookup("example.net")
        self.dns.setTXT("_mta-sts.example.net", ["v=STSv1; id=two;"])
        self.server.resource.body = POLICY.replace(b"mode: enforce", b"mode: testing")
        first = yield policies.lookup("example.net")
        # The cached one meanwhile.
        self.assertEqual(first.label, "mta-sts:enforce")
        yield policies._fetching.get("example.net", [defer.succeed(None)])[0]
        later = yield policies.lookup("example.net")
        self.assertEqual((later.label, later.policyId), ("mta-sts:testing", "two"))
        with open(self.cacheFile()) as f:
            self.assertEqual(json.load(f)["id"], "two")

    @defer.inlineCallbacks
    def test_nearExpiryRefreshedInBackground(self):
        """Same id, less than 6 hours left: fetched again, at most once an hour."""
        self.server.resource.body = POLICY.replace(b"max_age: 86400", b"max_age: 600")
        policies = self.policies()
        first = yield policies.lookup("example.net")
        yield policies.lookup("example.net")
        yield policies._fetching.get("example.net", [defer.succeed(None)])[0]
        self.assertEqual(len(self.server.resource.requests), 2)
        renewed = yield policies.lookup("example.net")
        self.assertGreater(renewed.expires, first.expires)
        self.assertEqual(len(self.server.resource.requests), 2)

    @defer.inlineCallbacks
    def test_refreshFailureKeepsCachedPolicy(self):
        policies = self.policies()
        yield policies.lookup("example.net")
        self.dns.setTXT("_mta-sts.example.net", ["v=STSv1; id=two;"])
        self.server.resource.code = 500
        yield policies.lookup("example.net")
        yield policies._fetching.get("example.net", [defer.succeed(None)])[0]
        policy = yield policies.lookup("example.net")
        self.assertEqual((policy.label, policy.policyId), ("mta-sts:enforce", "one"))
        self.assertTrue(self.logged("policy fetch failed: policy host answered HTTP 500"))

    @defer.inlineCallbacks
    def test_txtGoneKeepsCachedPolicy(self):
        policies = self.policies()
        yield policies.lookup("example.net")
        self.dns.setTXT("_mta-sts.example.net", [])
        policy = yield policies.lookup("example.net")
        self.assertEqual(policy.label, "mta-sts:enforce")

    @defer.inlineCallbacks
    def test_noTXTNoPolicy(self):
        self.dns.setTXT("_mta-sts.example.net", [])
        policy = yield self.policies().lookup("example.net")
        self.assertEqual(policy.label, "none")
        self.assertIn("no MTA-STS TXT record", policy.note)
        self.assertEqual(self.server.resource.requests, [])

    @defer.inlineCallbacks
    def checkFailed(self, why, **policyOptions):
        """Without a cached policy, a failed fetch means no policy (section 5)."""
        policy = yield self.policies(**policyOptions).lookup("example.net")
        self.assertEqual(policy.label, "none")
        self.assertEqual(policy.note, "policy fetch failed, none cached")
        self.assertTrue(self.logged(why), (why, [formatEvent(e) for e in self.events][-5:]))
        self.assertFalse(os.path.exists(self.cacheFile()))

    def test_serverDown(self):
        self.dns.setA("mta-sts.example.net", ["127.0.0.9"])
        return self.checkFailed("policy fetch failed: ")

    def test_policyHostWithoutAddress(self):
        self.dns.setA("mta-sts.example.net", [])
        return self.checkFailed("policy fetch failed: mta-sts.example.net:")

    def test_slow(self):
        self.server.resource.hang = True
        return self.checkFailed("policy fetch timed out after 0.5s", timeout=0.5)

    def test_notFound(self):
        # TXT record present, no policy published: as without.
        self.server.resource.code = 404
        return self.checkFailed("answered HTTP 404")

    def test_redirectNotFollowed(self):
        self.server.resource.code = 301
        return self.checkFailed("answered HTTP 301 (redirects are not followed)")

    def test_bodyTooLarge(self):
        self.server.resource.body = POLICY + b"x-padding: " + b"y" * (64 * 1024) + b"\n"
        return self.checkFailed("policy body over 64 KiB")

    def test_broken(self):
        self.server.resource.body = b"this is not a policy\n"
        return self.checkFailed("malformed policy line")

    def test_emptyMX(self):
        self.server.resource.body = b"version: STSv1\nmode: enforce\nmax_age: 600\n"
        return self.checkFailed("policy has no mx")

    def test_wrongContentType(self):
        self.server.resource.contentType = b"text/html"
        return self.checkFailed("not text/plain")

    @defer.inlineCallbacks
    def test_untrustedCertificate(self):
        yield self.server.stop()
        other = makeCA("not trusted")
        self.server = PolicyServer(self.directory, other, ["mta-sts.example.net"])
        self.server.start(self.httpsPort)
        yield self.checkFailed("policy fetch failed: ")
        self.assertEqual(self.server.resource.requests, [])

    @defer.inlineCallbacks
    def test_certificateForAnotherName(self):
        yield self.server.stop()
        self.server = PolicyServer(self.directory, self.ca, ["www.example.net"])
        self.server.start(self.httpsPort)
        yield self.checkFailed("policy fetch failed: ")
        self.assertEqual(self.server.resource.requests, [])


# --- delivery end to end -----------------------------------------------------------------

GOOD = "127.0.0.2"  # mx1.example.net: TLS, certificate from the trusted CA
OTHER = "127.0.0.3"  # mx.elsewhere.example: TLS, trusted, but not in the policy
UNTRUSTED = "127.0.0.4"  # mx2.example.net: TLS with an untrusted certificate
SENDER = "127.0.0.5"  # the sender's MX, for DSNs

NAMES = {
    GOOD: "mx1.example.net",
    OTHER: "mx.elsewhere.example",
    UNTRUSTED: "mx2.example.net",
    SENDER: "mx.sender.test",
}


class MTASTSDeliveryTests(DeliveryTestCase):
    """smtplib to relayd (in-process) to TLS sinks, with a policy served over HTTPS."""

    sinkAddresses = (GOOD, OTHER, UNTRUSTED, SENDER)
    dane = False

    @defer.inlineCallbacks
    def setUp(self):
        self.tlsDir, ca, caPath = makeTLSDir(self)
        other = makeCA("a CA nobody trusts")
        self.options = {}
        self.certificates = {}
        for address, name in NAMES.items():
            cert, key = issueCertificate(*(other if address == UNTRUSTED else ca), name)
            self.certificates[address] = cert
            paths = [os.path.join(self.tlsDir, f"{address}.{kind}") for kind in ("crt", "key")]
            writeKeyPair(*paths, cert, key)
            self.options[address] = loadServerOptions(*paths)
        self.server = PolicyServer(self.tlsDir, ca, ["mta-sts.example.net"])
        httpsPort = self.server.start()
        self.addCleanup(lambda: self.server.stop())  # noqa: PLW0108 (the test replaces self.server)
        self.delivery = {
            **self.delivery,
            "ca_file": caPath,
            "mta_sts_port": httpsPort,
            "mta_sts_timeout": 5,
            "dane": self.dane,
        }
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()
        for address, name in NAMES.items():
            self.dns.setA(name, [address])
        self.dns.setA("mta-sts.example.net", ["127.0.0.1"])
        self.dns.setTXT("_mta-sts.example.net", ["v=STSv1; id=one;"])

    def startSink(self, address, **options):
        return super().startSink(address, tlsOptions=self.options.get(address), **options)

    def mx(self, *hosts):
        self.dns.setMX("example.net", [(10 * (i + 1), h) for i, h in enumerate(hosts)])

    def logged(self, text):
        return [line for line in map(formatEvent, self.events) if text in line]

    def deliveryLines(self, status):
        return [x for x in self.logged("to=<b@example.net>, relay=") if f"status={status}" in x]

    @defer.inlineCallbacks
    def test_enforceMatchDeliveredOverVerifiedTLS(self):
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        sink = self.sinks[GOOD]
        yield self.waitFor(lambda: sink.messages)
        [message] = sink.messages
        self.assertIn(message.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(afterReceived(message.data), BODY)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        [line] = self.deliveryLines("sent")
        self.assertIn("(verified), policy=mta-sts:enforce, status=sent", line)

    @defer.inlineCallbacks
    def test_enforceSkipsNonMatchingMX(self):
        # The preferred MX is not in the policy: only the matching one gets it.
        self.mx("mx.elsewhere.example", "mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        self.assertEqual(self.sinks[OTHER].verbs(), [])

    @defer.inlineCallbacks
    def test_enforceNoMatchingMXDefers(self):
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        line = self.deliveryLines("deferred")[0]
        self.assertIn("policy=mta-sts:enforce, status=deferred (451 4.7.5 mta-sts: ", line)
        self.assertIn("no MX host of example.net matches the policy", line)
        self.assertEqual(self.sinks[OTHER].verbs(), [])
        # Written to deferred/ just after the log line.
        yield self.waitFor(lambda: self.relayd.spool.entries("deferred"))
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_enforceBadCertificateDefers(self):
        self.server.resource.body = POLICY.replace(b"mx: mx1.example.net", b"mx: mx2.example.net")
        self.mx("mx2.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        line = self.deliveryLines("deferred")[0]
        self.assertIn("policy=mta-sts:enforce, status=deferred (451 4.7.5 TLS handshake", line)
        self.assertIn("certificate verify failed", line)
        self.assertNotIn("MAIL", self.sinks[UNTRUSTED].verbs())
        self.assertEqual(self.sinks[UNTRUSTED].messages, [])

    @defer.inlineCallbacks
    def test_testingDeliversAndLogsWhatWouldFail(self):
        self.server.resource.body = POLICY.replace(b"mode: enforce", b"mode: testing")
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[OTHER].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        [line] = self.deliveryLines("sent")
        self.assertIn("policy=mta-sts:testing, status=sent", line)
        [note] = self.logged("mta-sts testing: example.net: enforce would have failed: ")
        self.assertIn("MX host mx.elsewhere.example does not match mx", note)

    @defer.inlineCallbacks
    def test_modeNoneAsWithout(self):
        self.server.resource.body = b"version: STSv1\nmode: none\nmax_age: 600\n"
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[OTHER].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        self.assertIn("policy=mta-sts:none, status=sent", self.deliveryLines("sent")[0])

    @defer.inlineCallbacks
    def test_tlsRequiredNoIgnoresPolicy(self):
        """RFC 8689 section 5: C{TLS-Required: No} waives the recipient domain's policy."""
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"], body=b"TLS-Required: No\r\n" + BODY)
        yield self.waitFor(lambda: self.sinks[OTHER].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        self.assertNotIn("policy=", self.deliveryLines("sent")[0])
        self.assertEqual(self.server.resource.requests, [])

    @defer.inlineCallbacks
    def test_fetchFailureWithoutCacheAsWithout(self):
        self.server.resource.code = 503
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[OTHER].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        self.assertIn("policy=none, status=sent", self.deliveryLines("sent")[0])

    @defer.inlineCallbacks
    def test_cacheSurvivesRestart(self):
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        cache = os.path.join(self.setup.spoolPath, "mta-sts", "example.net.json")
        yield self.waitFor(lambda: os.path.exists(cache))
        yield self.relayd.stop()
        # The policy host is gone; the cached policy still enforces.
        yield self.server.stop()
        from relayd.testing import InProcessRelayd

        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        self.assertIn("policy=mta-sts:enforce", self.deliveryLines("deferred")[0])
        self.assertEqual(self.sinks[OTHER].verbs(), [])

    @defer.inlineCallbacks
    def test_relayctlRoute(self):
        self.mx("mx1.example.net", "mx.elsewhere.example")
        out = io.StringIO()
        err = io.StringIO()

        def run():
            return relayctl.main(
                ["--config", self.setup.configPath, "route", "b@example.net"],
                stdout=out,
                stderr=err,
            )

        status = yield deferToThread(run)
        self.assertEqual((status, err.getvalue()), (0, ""))
        text = out.getvalue()
        self.assertIn("b@example.net: MX delivery to example.net", text)
        self.assertIn("10 mx1.example.net 127.0.0.2", text)
        self.assertIn("20 mx.elsewhere.example 127.0.0.3", text)
        self.assertIn(
            "policy: mta-sts enforce (id one, fetched), mx mx1.example.net *.backup.example.net",
            text,
        )
        if self.dane:
            self.assertIn("dane: none (MX records not DNSSEC-validated)", text)
        else:
            self.assertIn("dane: off ([delivery] dane = false)", text)
        # Fetched for the report, never written to the spool by relayctl.
        self.assertFalse(os.path.exists(os.path.join(self.setup.spoolPath, "mta-sts")))
        self.assertIn("mx1.example.net: tls=verify", text)
        self.assertIn("mx.elsewhere.example: not used (does not match the policy)", text)

    @defer.inlineCallbacks
    def test_relayctlRouteSmartHostNamesUserNeverSecret(self):
        with open(self.setup.configPath, "a") as f:
            f.write(
                '\n[[routes]]\ndomains = ["example.org"]\n[[routes.hops]]\n'
                'host = "mx1.example.net"\nport = 587\ntls = "verify"\n'
                'username = "relay"\npassword = "upstream secret"\n'
            )
        out, err = io.StringIO(), io.StringIO()

        def run():
            argv = ["--config", self.setup.configPath, "route", "c@example.org"]
            return relayctl.main([*argv, "--sender", "a@sender.test"], stdout=out, stderr=err)

        status = yield deferToThread(run)
        self.assertEqual((status, err.getvalue()), (0, ""))
        text = out.getvalue()
        self.assertIn("c@example.org: route 0 (domains example.org)", text)
        self.assertIn("hop: mx1.example.net:587 127.0.0.2 tls=verify, auth as relay", text)
        self.assertIn("sender: a@sender.test", text)
        self.assertIn("policy: none (MTA-STS and DANE apply to MX delivery, not to routes)", text)
        self.assertNotIn("upstream secret", text)

    @defer.inlineCallbacks
    def test_relayctlRouteNoRoute(self):
        out, err = io.StringIO(), io.StringIO()

        def run():
            argv = ["--config", self.setup.configPath, "route", "c@nowhere.example"]
            return relayctl.main(argv, stdout=out, stderr=err)

        status = yield deferToThread(run)
        self.assertEqual(status, 1)
        self.assertIn("c@nowhere.example: no route: 5.1.2", out.getvalue())
        self.assertIn("(would bounce)", out.getvalue())


class MTASTSWithDANETests(MTASTSDeliveryTests):
    """
    The same with C{[delivery] dane = true}: unsigned zones change nothing;
    where the MX is DNSSEC-validated and has TLSA records, DANE wins over
    MTA-STS for that host (RFC 8461 section 2, DESIGN section 6).
    """

    dane = True

    def publishDANE(self):
        from tests.delivery.test_dane import sha256, spki

        self.dns.setSecure("example.net")
        self.dns.setTLSA(
            f"_{self.port}._tcp.mx1.example.net",
            [(3, 1, 1, sha256(spki(self.certificates[GOOD])))],
        )

    @defer.inlineCallbacks
    def test_daneWinsOverMTASTS(self):
        self.publishDANE()
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        [line] = self.deliveryLines("sent")
        self.assertIn("(verified), policy=dane, status=sent", line)

    @defer.inlineCallbacks
    def test_tlsRequiredNoIgnoresPolicy(self):
        """
        RFC 8689 section 4.2.2: C{TLS-Required: No} waives MTA-STS and DANE
        both; with DANE on, the delivery line says so (the base class's
        test, without DANE, has no policy in the line at all).
        """
        self.publishDANE()
        self.mx("mx.elsewhere.example")
        yield self.send(["b@example.net"], body=b"TLS-Required: No\r\n" + BODY)
        yield self.waitFor(lambda: self.sinks[OTHER].messages)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        self.assertIn("policy=none (TLS-Required: No), status=sent", self.deliveryLines("sent")[0])
        self.assertEqual(self.server.resource.requests, [])

    @defer.inlineCallbacks
    def test_relayctlRouteDANE(self):
        self.publishDANE()
        self.mx("mx1.example.net", "mx.elsewhere.example")
        out, err = io.StringIO(), io.StringIO()

        def run():
            argv = ["--config", self.setup.configPath, "route", "b@example.net"]
            return relayctl.main(argv, stdout=out, stderr=err)

        status = yield deferToThread(run)
        self.assertEqual((status, err.getvalue()), (0, ""))
        text = out.getvalue()
        self.assertIn("dane: mx1.example.net: dane (1 usable TLSA record(s))", text)
        self.assertIn("dane: mx.elsewhere.example: none (host not in a signed zone)", text)
        self.assertIn("mx1.example.net: tls=dane (certificate must match a TLSA record)", text)
        self.assertIn("mx.elsewhere.example: not used (does not match the policy)", text)


class ConfigTests(unittest.TestCase):
    def load(self, delivery):
        from relayd.testing import TestSetup

        directory = tempfile.mkdtemp(prefix="relayd-mtasts-config-")
        self.addCleanup(shutil.rmtree, directory, True)
        setup = TestSetup(directory, modes=("relay",), sections={"delivery": delivery})
        from relayd.config import load

        return load(setup.configPath)

    def test_defaults(self):
        config = self.load({})
        self.assertTrue(config.mtaSts)
        self.assertEqual((config.mtaStsPort, config.mtaStsTimeout), (443, 60.0))

    def test_timeoutCappedAtSixty(self):
        config = self.load({"mta_sts": False, "mta_sts_timeout": 120})
        self.assertFalse(config.mtaSts)
        self.assertEqual(config.mtaStsTimeout, 60.0)
