"""
Tests for the example policy, the way a plugin author would write them:
relayd runs in the test process with the policy loaded by its entry-point
name (so the package must be installed: C{pip install -e .}), and a real
SMTP client talks to it over a loopback socket from a thread.
"""

import os
import shutil
import tempfile
import time

from relayd_policy_example import HEADER, ExamplePolicy
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.service import buildService
from relayd.testing import InProcessRelayd, TestSetup, WireClient

MESSAGE = (
    b"From: app@example.org\r\n"
    b"To: someone@example.com\r\n"
    b"X-Example-Policy: forged by the client\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Body, kept exactly.\r\n"
)


class ExamplePolicyTests(unittest.TestCase):
    options = {
        "refuse_domains": ["refused.example"],
        "defer_domains": ["later.example"],
        "tarpit": 0.3,
    }

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-example-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        yield self.startRelayd(self.options)

    @defer.inlineCallbacks
    def startRelayd(self, options, sections=None):
        # "example" first: once mynetworks has accepted a recipient, the
        # phase is over and later policies are not asked.
        self.setup = TestSetup(
            self.directory,
            chain=["example", "mynetworks"],
            policies={"example": options},
            sections=sections,
            modes=("relay",),
        )
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def policy(self):
        return self.relayd.service.policies.chain.names["example"]

    def rcpt(self, *recipients):
        """MAIL, then one RCPT per recipient; the RCPT replies, timed."""

        def dialogue():
            client = WireClient(self.relayd.port("relay"))
            try:
                client.reply()
                client.command("EHLO client.test")
                client.command("MAIL FROM:<app@example.org>")
                replies = []
                for recipient in recipients:
                    started = time.monotonic()
                    code, lines = client.command(f"RCPT TO:<{recipient}>")
                    replies.append((code, lines[0], time.monotonic() - started))
                return replies
            finally:
                client.close()

        return deferToThread(dialogue)

    @defer.inlineCallbacks
    def test_refusedDomain(self):
        """Refused after the tarpit delay, whatever the case of the domain."""
        [(code, line, elapsed)] = yield self.rcpt("bob@Refused.Example")
        self.assertEqual(code, 550)
        self.assertEqual(line, "5.7.1 Recipients at refused.example are not accepted here")
        self.assertGreaterEqual(elapsed, 0.3)

    @defer.inlineCallbacks
    def test_deferredDomain(self):
        [(code, line, _)] = yield self.rcpt("bob@later.example")
        self.assertEqual(
            (code, line), (450, "4.7.1 Recipients at later.example are not accepted now")
        )

    @defer.inlineCallbacks
    def test_otherDomainsLeftToTheNextPolicy(self):
        """CONTINUE: mynetworks (loopback is trusted) accepts the recipient."""
        [(code, _, _)] = yield self.rcpt("bob@example.com")
        self.assertEqual(code, 250)

    @defer.inlineCallbacks
    def test_messageStamped(self):
        """The client's own field is replaced; the body is stored as sent."""

        def send():
            client = WireClient(self.relayd.port("relay"))
            try:
                client.reply()
                client.command("EHLO client.test")
                client.command("MAIL FROM:<app@example.org>")
                client.command("RCPT TO:<someone@example.com>")
                client.command("DATA")
                return client.command(MESSAGE + b".")
            finally:
                client.close()

        code, _ = yield deferToThread(send)
        self.assertEqual(code, 250)
        spool = self.relayd.spool
        [queueId] = spool.entries("incoming")
        stored = spool.readData(queueId)
        header, body = stored.split(b"\r\n\r\n", 1)
        self.assertEqual(body, b"Body, kept exactly.\r\n")
        stamps = [line for line in header.split(b"\r\n") if line.startswith(HEADER.encode())]
        self.assertEqual(stamps, [b"X-Example-Policy: checked"])

    @defer.inlineCallbacks
    def test_stopCancelsTarpit(self):
        """
        Shutting down while a refusal waits in the tarpit: stopPolicy
        cancels the wait, so no timer is left (trial fails a test that
        leaves one in the reactor).
        """
        yield self.relayd.stop()
        yield self.startRelayd({"refuse_domains": ["refused.example"], "tarpit": 60})
        pending = self.rcpt("bob@refused.example")
        pending.addErrback(lambda failure: None)  # the connection is cut
        for _ in range(1000):
            if self.policy()._waiting:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.policy()._waiting), 1)
        yield self.relayd.stop()
        self.assertEqual(self.policy()._waiting, set())
        yield pending
        # The cancelled answer is logged as a policy failure.
        self.assertEqual(len(self.flushLoggedErrors(defer.CancelledError)), 1)


class RefuseFileTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_reloadRereadsFile(self):
        """
        refuse_file is relative to the config file; SIGHUP (here the
        service's reload, which SIGHUP calls) keeps the same instance,
        since its options did not change, and re-reads the file.
        """
        directory = tempfile.mkdtemp(prefix="relayd-example-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(os.path.join(directory, "refused"), "w") as f:
            f.write("# one domain per line\nfirst.example\n")
        setup = TestSetup(
            directory,
            chain=["example", "mynetworks"],
            policies={"example": {"refuse_file": "refused"}},
            modes=("relay",),
        )
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        before = relayd.service.policies.chain.names["example"]
        self.assertEqual(before.refuseDomains, {"first.example"})

        with open(os.path.join(directory, "refused"), "w") as f:
            f.write("second.example  # moved\n")
        reloaded = yield relayd.service.reload()
        self.assertTrue(reloaded)
        after = relayd.service.policies.chain.names["example"]
        self.assertIs(after, before)
        self.assertEqual(after.refuseDomains, {"second.example"})

        def dialogue():
            client = WireClient(relayd.port("relay"))
            try:
                client.reply()
                client.command("EHLO client.test")
                client.command("MAIL FROM:<app@example.org>")
                return [
                    client.command("RCPT TO:<a@first.example>")[0],
                    client.command("RCPT TO:<a@second.example>")[0],
                ]
            finally:
                client.close()

        codes = yield deferToThread(dialogue)
        self.assertEqual(codes, [250, 550])


class OptionTests(unittest.TestCase):
    """
    A bad option stops relayd at startup with one line naming the file,
    the policy's table and the key.  load() and buildService() are what
    C{twistd relayd} runs before it listens.
    """

    def configError(self, options):
        directory = tempfile.mkdtemp(prefix="relayd-example-")
        self.addCleanup(shutil.rmtree, directory, True)
        setup = TestSetup(directory, chain=["example"], policies={"example": options})
        with self.assertRaises(ConfigError) as caught:
            buildService(load(setup.configPath), reactor)
        return str(caught.exception).replace(setup.configPath, "FILE")

    def test_badTarpit(self):
        self.assertEqual(
            self.configError({"tarpit": "soon"}),
            "FILE: policies.example.tarpit: must be a number of seconds, 0 or more",
        )

    def test_unknownOption(self):
        self.assertEqual(
            self.configError({"refuse": ["a.example"]}),
            "FILE: policies.example.refuse: unknown option "
            "(known: refuse_domains, refuse_file, defer_domains, tarpit, stamp)",
        )

    def test_badDomains(self):
        self.assertEqual(
            self.configError({"refuse_domains": "a.example"}),
            "FILE: policies.example.refuse_domains: "
            'must be a list of domain names like ["example.net"]',
        )

    def test_missingFile(self):
        message = self.configError({"refuse_file": "nowhere"})
        self.assertTrue(
            message.startswith("FILE: policies.example.refuse_file: cannot read "), message
        )

    def test_fromConfigDirectly(self):
        """fromConfig is an ordinary classmethod: unit-test it without relayd running."""
        from relayd.plugin import PolicyContext

        policy = ExamplePolicy.fromConfig(
            {"refuse_domains": ["A.example."], "stamp": "ok"},
            PolicyContext("/etc/relayd/relayd.toml", "relay.example", "example"),
        )
        self.assertEqual((policy.refuseDomains, policy.stamp), ({"a.example"}, "ok"))
