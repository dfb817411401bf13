"""
The one plugin API (issue 12, item 3; DESIGN section 3):

  - L{relayd.plugin} exports exactly the names a policy author needs, and
    each is the object relayd uses;
  - C{fromConfig(options, context)} is the constructor; a policy written
    with the older C{fromConfig(options)} still loads, with a
    L{DeprecationWarning} and a log line naming the new form;
  - relayd keeps the names of policies in its own registry and writes
    nothing onto the author's objects;
  - C{accept()}, C{reject()} and C{tempfail()} without arguments take the
    defaults of the phase they answer, on the wire too;
  - the modifier phase runs every L{IMessageModifier} in config order after
    the checks, and a failing modifier delays the message (451 4.3.0).

The DKIM case (a check's ACCEPT at DATA, then the message still leaves
signed, verified by dkimpy at a sink) is in tests/policies/test_dkim.py.
"""

import ipaddress
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

import relayd.plugin
from relayd.address import Address
from relayd.config import load
from relayd.envelope import Envelope, Session
from relayd.interfaces import (
    IConnectionPolicy,
    IMessageModifier,
    IMessagePolicy,
    IRecipientPolicy,
)
from relayd.policy import PolicyChain, PolicyContext, loadPolicies
from relayd.testing import InProcessRelayd, TestSetup, WireClient
from relayd.verdict import CONTINUE, PHASE_DEFAULTS, Action, accept, reject, tempfail

POLICYDIST = str(Path(__file__).resolve().parents[1] / "policydist")

EXPORTED = [
    "IPolicy",
    "IConnectionPolicy",
    "IHeloPolicy",
    "ISenderPolicy",
    "IRecipientPolicy",
    "IMessagePolicy",
    "IMessageModifier",
    "ITransactionObserver",
    "IPolicyLifecycle",
    "IReloadable",
    "Verdict",
    "Action",
    "CONTINUE",
    "accept",
    "reject",
    "tempfail",
    "Phase",
    "PHASE_DEFAULTS",
    "PolicyAnswer",
    "Modification",
    "SessionView",
    "Session",
    "Envelope",
    "Message",
    "Headers",
    "HeaderField",
    "HeaderSectionTooLarge",
    "Address",
    "normalDomain",
    "normalLocal",
    "asciiDomain",
    "PolicyContext",
    "PolicyOptionError",
]


def tempDirectory(testCase):
    directory = tempfile.mkdtemp(prefix="relayd-plugin-api-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory


def usePolicyDist(testCase):
    sys.path.insert(0, POLICYDIST)
    testCase.addCleanup(sys.path.remove, POLICYDIST)


def session():
    return Session(ipaddress.ip_address("192.0.2.1"), 50000, "relay", "relay", "S1")


class ExportsTests(unittest.TestCase):
    def test_exactlyTheseNames(self):
        """
        The contract: exactly these names, in this order.  Adding one is a
        decision (change this list); removing or renaming one breaks
        every plugin that imports it.
        """
        self.assertEqual(relayd.plugin.__all__, EXPORTED)

    def test_sameObjectsAsRelaydUses(self):
        """Each name is the very object relayd checks against and builds."""
        import relayd.envelope
        import relayd.interfaces
        import relayd.policy
        import relayd.verdict

        for name in EXPORTED:
            value = getattr(relayd.plugin, name)
            homes = [
                m
                for m in (relayd.interfaces, relayd.verdict, relayd.envelope, relayd.policy)
                if hasattr(m, name)
            ]
            if name in ("Address", "normalDomain", "normalLocal", "asciiDomain"):
                self.assertIs(value, getattr(relayd.address, name))
                continue
            self.assertTrue(homes, name)
            self.assertIs(value, getattr(homes[0], name), name)

    def test_nothingElsePublic(self):
        """No other public name leaks from the module (imports included)."""
        public = {n for n in vars(relayd.plugin) if not n.startswith("_")}
        self.assertEqual(public - {"annotations"}, set(EXPORTED))


REPO = Path(__file__).resolve().parents[2]


def relaydImports(path):
    """The relayd modules a source file imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "relayd"}


class OnlyThePluginAPITests(unittest.TestCase):
    """
    The example package and the built-in policies are written against
    C{relayd.plugin} alone, as a third-party policy would be; built-ins may
    also use their own helpers (C{relayd.policies.*}) and the rate
    counters, which only the ratelimit policy uses.
    """

    def test_examplePackage(self):
        source = REPO / "examples/relayd-policy-example/src/relayd_policy_example/__init__.py"
        self.assertEqual(relaydImports(source), {"relayd.plugin"})

    def test_builtIns(self):
        allowed = {"relayd.plugin", "relayd.policies.ratecounter"}
        for path in sorted((REPO / "relayd/policies").glob("*.py")):
            if path.name in ("__init__.py", "_entries.py", "ratecounter.py"):
                continue
            imports = relaydImports(path)
            self.assertIn("relayd.plugin", imports, path.name)
            others = {m for m in imports if not m.startswith("relayd.policies.")} - allowed
            self.assertEqual(others, set(), path.name)


class LegacyFromConfigTests(unittest.TestCase):
    """A third-party policy written for C{fromConfig(options)} keeps loading."""

    def setUp(self):
        usePolicyDist(self)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_loadsWithWarning(self):
        setup = TestSetup(
            tempDirectory(self),
            chain=["legacy", "mynetworks"],
            policies={"legacy": {"x": 1}},
            modes=("relay",),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            policies, options = loadPolicies(load(setup.configPath))
        legacy = policies[0]
        self.assertEqual(type(legacy).__name__, "Legacy")
        self.assertEqual(legacy.options, {"x": 1})
        expected = (
            "policy 'legacy' (relayd_testpolicies:Legacy): fromConfig(options) is "
            "deprecated and will stop working; define fromConfig(cls, options, context) "
            "(context: relayd.plugin.PolicyContext)"
        )
        deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        self.assertEqual([str(w.message) for w in deprecations], [expected])
        logged = [e for e in self.events if e.get("deprecation") == expected]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["log_level"].name, "warn")
        # relayd wrote nothing onto it; its registry knows its name.
        self.assertFalse(hasattr(legacy, "name"))
        chain = PolicyChain(policies, 30.0, Clock(), options)
        self.assertIs(chain.names["legacy"], legacy)
        self.assertEqual(chain.nameOf(legacy), "legacy")

    def test_newFormNoWarning(self):
        setup = TestSetup(tempDirectory(self), chain=["recorder"], modes=("relay",))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loadPolicies(load(setup.configPath))
        self.assertEqual([w for w in caught if issubclass(w.category, DeprecationWarning)], [])

    @defer.inlineCallbacks
    def test_servesOverSMTP(self):
        """
        The legacy policy, loaded by relayd, answers at MAIL; its bare
        C{reject()} gets the MAIL phase's default reply.
        """
        setup = TestSetup(tempDirectory(self), chain=["legacy", "mynetworks"], modes=("relay",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def dialogue():
            c = WireClient(relayd.port("relay"))
            try:
                c.reply()
                c.command("EHLO client.test")
                refused = c.command("MAIL FROM:<legacy@example.org>")
                accepted = c.command("MAIL FROM:<other@example.org>")
                return refused, accepted
            finally:
                c.close()

        refused, accepted = yield deferToThread(dialogue)
        self.assertEqual(refused, (550, ["5.7.1 Sender rejected by policy"]))
        self.assertEqual(accepted[0], 250)


class PhaseDefaultsTests(unittest.TestCase):
    """What C{accept()}, C{reject()} and C{tempfail()} mean in each phase."""

    def test_table(self):
        """RFC 5321 section 3.1 at the connection, 550/451 with X.7.1 elsewhere."""
        table = {
            phase: tuple(answers[a][:2] for a in (Action.ACCEPT, Action.REJECT, Action.TEMPFAIL))
            for phase, answers in PHASE_DEFAULTS.items()
        }
        self.assertEqual(
            table,
            {
                "connect": ((250, "2.0.0"), (554, "5.7.1"), (421, "4.7.0")),
                "helo": ((250, "2.0.0"), (550, "5.7.1"), (451, "4.7.1")),
                "mail": ((250, "2.1.0"), (550, "5.7.1"), (451, "4.7.1")),
                "rcpt": ((250, "2.1.5"), (550, "5.7.1"), (451, "4.7.1")),
                "data": ((250, "2.0.0"), (550, "5.7.1"), (451, "4.7.1")),
            },
        )

    def test_givenPartsKept(self):
        """Only what the policy left out is the phase's."""
        self.assertEqual(str(reject(text="Go away").forPhase("connect").reply), "554 5.7.1 Go away")
        self.assertEqual(
            str(tempfail(450).forPhase("rcpt").reply),
            "450 4.7.1 Recipient deferred by policy, try again later",
        )
        self.assertEqual(
            str(reject(553, "5.7.1", "Not yours").forPhase("mail").reply), "553 5.7.1 Not yours"
        )
        self.assertEqual(str(tempfail(421).forPhase("data").reply)[:9], "421 4.7.1")
        self.assertTrue(reject(disconnect=True).forPhase("rcpt").disconnect)

    def test_outsideAChain(self):
        """Made in a unit test, a verdict is whole: the generic values."""
        self.assertEqual(str(reject().reply), "550 5.7.1 Rejected by policy")
        self.assertEqual(str(tempfail().reply), "451 4.7.1 Deferred by policy, try again later")
        self.assertEqual(str(accept().reply), "250 2.0.0 Ok")
        self.assertEqual(reject(), reject(550, "5.7.1", "Rejected by policy"))
        self.assertRaises(ValueError, reject, 450)
        self.assertRaises(ValueError, tempfail, 550)

    def test_connectionPhase(self):
        """
        At the connection a bare C{reject()} is C{554 5.7.1} and a bare
        C{tempfail()} is C{421 4.7.0}: the chain fills in the phase.
        """

        @implementer(IConnectionPolicy)
        class Refuse:
            answer = reject()

            def checkConnection(self, session):
                return self.answer

        policy = Refuse()
        chain = PolicyChain([policy], 30.0, Clock(), {"refuse": {}})
        verdict = self.successResultOf(chain.checkConnection(session()))
        self.assertEqual(str(verdict.reply), "554 5.7.1 Access denied")
        policy.answer = tempfail()
        verdict = self.successResultOf(chain.checkConnection(session()))
        self.assertEqual(str(verdict.reply), "421 4.7.0 Service not available, try again later")

    @defer.inlineCallbacks
    def test_recipientPhaseOnTheWire(self):
        usePolicyDist(self)
        setup = TestSetup(tempDirectory(self), chain=["defaults"], modes=("relay",))
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def dialogue():
            c = WireClient(relayd.port("relay"))
            try:
                c.reply()
                c.command("EHLO client.test")
                c.command("MAIL FROM:<a@example.org>")
                return [
                    c.command(f"RCPT TO:<{local}@example.net>")
                    for local in ("accept", "reject", "tempfail", "rejecttext", "other")
                ]
            finally:
                c.close()

        replies = yield deferToThread(dialogue)
        self.assertEqual(
            replies,
            [
                (250, ["2.1.5 Ok"]),
                (550, ["5.7.1 Recipient rejected by policy"]),
                (451, ["4.7.1 Recipient deferred by policy, try again later"]),
                (550, ["5.7.1 Not this one"]),
                (554, ["5.7.1 Relay access denied"]),
            ],
        )


@implementer(IMessageModifier)
class Stamp:
    def __init__(self, name, log, fail=False):
        self.label, self.log, self.fail = name, log, fail

    def modifyMessage(self, session, envelope, message):
        self.log.append(self.label)
        if self.fail:
            raise RuntimeError(f"{self.label} failed on purpose")


@implementer(IMessagePolicy)
class Accepting:
    def __init__(self, log):
        self.log = log

    def checkMessage(self, session, envelope, message):
        self.log.append("check")
        return accept()


class ModifierPhaseTests(unittest.TestCase):
    """L{PolicyChain.modifyMessage}, on a clock."""

    def envelope(self):
        return Envelope(Address("a", "example.org"), queueId="Q1")

    def test_afterAcceptInConfigOrder(self):
        """
        A check's ACCEPT ends the checks; every modifier still runs, in
        chain order, whatever the order of checks and modifiers.
        """
        log = []
        policies = [Stamp("first", log), Accepting(log), Stamp("second", log)]
        chain = PolicyChain(policies, 30.0, Clock(), {"first": {}, "acc": {}, "second": {}})
        verdict = self.successResultOf(chain.checkMessage(session(), self.envelope(), None))
        self.assertIs(verdict.action, Action.ACCEPT)
        done = self.successResultOf(chain.modifyMessage(session(), self.envelope(), None))
        self.assertIs(done, CONTINUE)
        self.assertEqual(log, ["check", "first", "second"])

    def test_failureDelays(self):
        """A modifier that raises: 451 4.3.0, logged with its chain name; later ones skipped."""
        log = []
        policies = [Stamp("a", log, fail=True), Stamp("b", log)]
        chain = PolicyChain(policies, 30.0, Clock(), {"signer": {}, "b": {}})
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        verdict = self.successResultOf(chain.modifyMessage(session(), self.envelope(), None))
        self.assertEqual(str(verdict.reply), "451 4.3.0 Temporary policy failure, try again later")
        self.assertEqual(log, ["a"])
        [failure] = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual((failure["policy"], failure["queue_id"]), ("signer", "Q1"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_timeout(self):
        """A modifier that never finishes is cancelled after the timeout: 451 4.3.0."""

        @implementer(IMessageModifier)
        class Hangs:
            def modifyMessage(self, session, envelope, message):
                return defer.Deferred()

        clock = Clock()
        chain = PolicyChain([Hangs()], 5.0, clock, {"hangs": {}})
        d = chain.modifyMessage(session(), self.envelope(), None)
        self.assertNoResult(d)
        clock.advance(5)
        self.assertEqual(self.successResultOf(d).reply.enhanced, "4.3.0")
        self.flushLoggedErrors(defer.TimeoutError)

    def test_immediateAnswerNoTimer(self):
        """
        A modifier that answers at once leaves no timer behind (the
        timeout is for answers still to come).
        """

        @implementer(IMessageModifier)
        class AtOnce:
            def modifyMessage(self, session, envelope, message):
                return CONTINUE

        clock = Clock()
        calls = []
        original = clock.callLater

        def callLater(*args, **kwargs):
            calls.append(args[0])
            return original(*args, **kwargs)

        clock.callLater = callLater
        chain = PolicyChain([AtOnce()], 5.0, clock, {"atonce": {}})
        d = chain.modifyMessage(session(), self.envelope(), None)
        self.assertEqual(self.successResultOf(d), CONTINUE)
        self.assertEqual(calls, [])

    def test_notAModifierNotRun(self):
        """Checks are not modifiers: modifyMessage asks only IMessageModifier providers."""

        @implementer(IRecipientPolicy)
        class OnlyRcpt:
            def checkRecipient(self, session, envelope, recipient):
                return CONTINUE

        chain = PolicyChain([OnlyRcpt()], 5.0, Clock())
        self.assertIs(
            self.successResultOf(chain.modifyMessage(session(), self.envelope(), None)), CONTINUE
        )
        self.assertEqual(list(chain.names), ["OnlyRcpt"])


class ModifierOverSMTPTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_failingModifierDelaysAndSessionGoesOn(self):
        """
        After a check's ACCEPT the modifier still runs; when it raises, the
        client gets C{451 4.3.0}, nothing is queued, and the session takes
        the next transaction, which the modifier marks.
        """
        usePolicyDist(self)
        setup = TestSetup(
            tempDirectory(self), chain=["acceptor", "marker", "mynetworks"], modes=("relay",)
        )
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)

        def dialogue():
            c = WireClient(relayd.port("relay"))
            try:
                c.reply()
                c.command("EHLO client.test")
                replies = []
                for subject in ("fail", "fine"):
                    c.command("MAIL FROM:<a@example.org>")
                    c.command("RCPT TO:<b@example.net>")
                    c.command("DATA")
                    replies.append(c.command(f"Subject: {subject}\r\n\r\nbody\r\n."))
                return replies
            finally:
                c.close()

        failed, queued = yield deferToThread(dialogue)
        self.assertEqual(failed, (451, ["4.3.0 Temporary policy failure, try again later"]))
        self.assertEqual(queued[0], 250)
        self.assertEqual(relayd.service.policies.chain.names["acceptor"].asked, 2)
        [queueId] = relayd.spool.entries("incoming")
        self.assertIn(
            b"\r\nSubject: fine\r\nX-Marked: yes\r\n\r\nbody", relayd.spool.readData(queueId)
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ContextTests(unittest.TestCase):
    def test_byHand(self):
        """A context made in a unit test: a given clock, or the global reactor."""
        clock = Clock()
        context = PolicyContext("/etc/relayd/relayd.toml", "relay.example", "x", clock)
        self.assertIs(context.reactor, clock)
        self.assertEqual(context.resolvePath("a"), "/etc/relayd/a")
        from twisted.internet import reactor

        self.assertIs(PolicyContext("/r.toml", "h", "x").reactor, reactor)
