"""
The plugin API from relayd's side (issue 4, docs/plugins.md):

  - a third-party policy (examples/relayd-policy-example, which
    scripts/test installs into .venv) is loaded by its entry-point name from
    the config and changes SMTP replies and the stored message;
  - startup errors about policies are one clear line through the real
    C{twistd -n relayd --config X}; C{twistd relayd --list-policies};
  - the optional hooks: L{ITransactionObserver.transactionEnded} once per
    transaction, L{IPolicyLifecycle} start and stop, reload on SIGHUP
    keeping unchanged instances and calling L{IReloadable.reload}, an
    invalid new config refused with the old chain kept.

Test-only policies (some broken on purpose) live in tests/policydist, a
distribution that is never installed: its folder goes on C{sys.path} (or
C{PYTHONPATH} for twistd) and importlib.metadata finds its entry points
there, as it finds an installed plugin's.
"""

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.policy import PolicyChain, loadPolicies
from relayd.testing import InProcessRelayd, TestSetup, WireClient

REPO = Path(__file__).resolve().parents[2]
POLICYDIST = str(Path(__file__).resolve().parents[1] / "policydist")
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


def twistd(*args, policydist=False, **kwargs):
    env = dict(os.environ)
    if policydist:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [POLICYDIST, env.get("PYTHONPATH")]))
    return subprocess.run(
        [*TWISTD, *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        **kwargs,
    )


def usePolicyDist(testCase):
    """Make the test-only policies loadable in this process for one test."""
    sys.path.insert(0, POLICYDIST)
    testCase.addCleanup(sys.path.remove, POLICYDIST)


def tempDirectory(testCase):
    directory = tempfile.mkdtemp(prefix="relayd-plugins-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory


def stored(relayd):
    """The bytes of every message in incoming/, oldest first."""
    spool = relayd.spool
    result = []
    for queueId in spool.entries("incoming"):
        result.append(spool.readData(queueId))
    return result


def policyNamed(relayd, name):
    """The policy called C{name} in the chain, from relayd's registry."""
    return relayd.service.policies.chain.names[name]


class ExamplePackageTests(unittest.TestCase):
    """The example third-party package, loaded by name from the config."""

    @defer.inlineCallbacks
    def test_loadedByNameChangesRepliesAndHeaders(self):
        setup = TestSetup(
            tempDirectory(self),
            chain=["example", "mynetworks"],
            policies={"example": {"refuse_domains": ["refused.example"], "stamp": "by-relayd"}},
            modes=("relay",),
        )
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        policy = policyNamed(relayd, "example")
        self.assertEqual(type(policy).__module__, "relayd_policy_example")

        def dialogue():
            c = WireClient(relayd.port("relay"))
            try:
                c.reply()
                c.command("EHLO client.test")
                c.command("MAIL FROM:<app@example.org>")
                refused = c.command("RCPT TO:<bob@refused.example>")
                accepted = c.command("RCPT TO:<bob@example.net>")
                c.command("DATA")
                done = c.command(b"Subject: hi\r\n\r\nbody\r\n.")
                return refused, accepted, done
            finally:
                c.close()

        refused, accepted, done = yield deferToThread(dialogue)
        self.assertEqual(
            refused, (550, ["5.7.1 Recipients at refused.example are not accepted here"])
        )
        self.assertEqual(accepted[0], 250)
        self.assertEqual(done[0], 250)
        [message] = stored(relayd)
        self.assertIn(b"\r\nSubject: hi\r\nX-Example-Policy: by-relayd\r\n\r\nbody\r\n", message)


class StartupErrorTests(unittest.TestCase):
    """
    Each policy problem stops C{twistd -n relayd} with exit status 1 and one
    line C{relayd: config error: FILE: KEY: PROBLEM}, no traceback.
    """

    def startupError(self, chain, policies=None, policydist=False):
        setup = TestSetup(tempDirectory(self), chain=chain, policies=policies, modes=("relay",))
        result = twistd(
            "-n", "--pidfile=", "relayd", "--config", setup.configPath, policydist=policydist
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "relayd: " in line]
        self.assertEqual(len(lines), 1, output)
        prefix = f"relayd: config error: {setup.configPath}: "
        self.assertTrue(lines[0].startswith(prefix), lines[0])
        return lines[0][len(prefix) :]

    def test_unknownName(self):
        """The line lists the installed policies, the example among them."""
        problem = self.startupError(["mynetworks", "nosuch"])
        match = re.fullmatch(r"policy\.chain: unknown policy 'nosuch' \(installed: (.*)\)", problem)
        self.assertIsNotNone(match, problem)
        installed = match.group(1).split(", ")
        self.assertEqual(installed, sorted(installed))
        self.assertTrue({"authenticated", "example", "mynetworks"} <= set(installed), installed)

    def test_interfaceNotImplemented(self):
        """A class claiming IRecipientPolicy without checkRecipient (verifyObject)."""
        problem = self.startupError(["broken"], policydist=True)
        self.assertRegex(
            problem,
            r"^policy\.chain: policy 'broken' does not implement IRecipientPolicy: "
            r".*checkRecipient.*",
        )

    def test_badOption(self):
        """The policy's PolicyOptionError names its table and key."""
        problem = self.startupError(["example"], {"example": {"tarpit": -1}})
        self.assertEqual(problem, "policies.example.tarpit: must be a number of seconds, 0 or more")


class ListPoliciesTests(unittest.TestCase):
    def test_listPolicies(self):
        """
        C{twistd relayd --list-policies}: a table of name, distribution,
        version and object, sorted by name, without starting anything.
        """
        result = twistd("relayd", "--list-policies")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = [line.split() for line in result.stdout.splitlines()]
        self.assertEqual(rows[0], ["NAME", "DISTRIBUTION", "VERSION", "OBJECT"])
        byName = {row[0]: row for row in rows[1:]}
        self.assertEqual(list(byName), sorted(byName))
        version = importlib.metadata.version("relayd-policy-example")
        self.assertEqual(
            byName["example"],
            ["example", "relayd-policy-example", version, "relayd_policy_example:ExamplePolicy"],
        )
        self.assertEqual(byName["mynetworks"][1], "relayd")


class LoadPoliciesTests(unittest.TestCase):
    """loadPolicies' own checks, in process."""

    def setUp(self):
        usePolicyDist(self)

    def config(self, chain, policies=None):
        setup = TestSetup(tempDirectory(self), chain=chain, policies=policies, modes=("relay",))
        return load(setup.configPath)

    def configError(self, chain, policies=None):
        config = self.config(chain, policies)
        with self.assertRaises(ConfigError) as caught:
            loadPolicies(config)
        return str(caught.exception).removeprefix(f"{config.path}: ")

    def test_noFromConfig(self):
        self.assertEqual(
            self.configError(["nofactory"]),
            "policy.chain: policy 'nofactory' (relayd_testpolicies:NoFromConfig) "
            "has no fromConfig(options, context) to build it with",
        )

    def test_noInterface(self):
        self.assertEqual(
            self.configError(["nointerface"]),
            "policy.chain: policy 'nointerface' provides none of the policy interfaces",
        )

    def test_importFails(self):
        self.assertEqual(
            self.configError(["missing"]),
            "policy.chain: policy 'missing' failed to import: "
            "No module named 'relayd_testpolicies_missing'",
        )

    def test_fromConfigValueError(self):
        """Not a PolicyOptionError: one line naming the policy's table."""
        self.assertEqual(
            self.configError(["recorder"], {"recorder": {"valueError": "no good"}}),
            "policies.recorder: no good",
        )

    def test_listedTwice(self):
        self.assertEqual(
            self.configError(["mynetworks", "mynetworks"]),
            "policy.chain: policy 'mynetworks' listed twice",
        )

    def test_context(self):
        """fromConfig(options, context) gets a PolicyContext."""
        config = self.config(["recorder"], {"recorder": {"file": "data/list"}})
        clock = Clock()
        [recorder], options = loadPolicies(config, reactor=clock)
        context = recorder.context
        self.assertEqual(
            (context.configPath, context.hostname, context.name, context.reactor),
            (config.path, "relayd.test", "recorder", clock),
        )
        self.assertEqual(context.configDirectory, os.path.dirname(config.path))
        self.assertEqual(context.log.namespace, "relayd.policies.recorder")
        self.assertEqual(
            context.resolvePath("data/list"),
            os.path.join(os.path.dirname(config.path), "data", "list"),
        )
        self.assertEqual(context.resolvePath("/abs/list"), "/abs/list")
        self.assertEqual(recorder.options, {"file": "data/list"})
        self.assertEqual(options, {"recorder": {"file": "data/list"}})

    def test_reloadKeepsByChainName(self):
        """
        One class under two names, so both instances have the class's
        C{name}: a reload keeps each instance in its own place.
        """
        config = self.config(
            ["recorder", "recorder2"], {"recorder": {"n": 1}, "recorder2": {"n": 2}}
        )
        policies, options = loadPolicies(config)
        previous = PolicyChain(policies, 30.0, reactor, options)
        again, _ = loadPolicies(config, previous=previous)
        self.assertEqual([p.options for p in again], [{"n": 1}, {"n": 2}])
        self.assertIs(again[0], policies[0])
        self.assertIs(again[1], policies[1])
        # relayd's registry names each by its chain name; the class's own
        # name attribute is the author's and stays as it was.
        self.assertEqual(previous.names, {"recorder": policies[0], "recorder2": policies[1]})
        self.assertEqual(previous.nameOf(policies[1]), "recorder2")
        self.assertEqual(policies[1].name, "recorder")


class HookTests(unittest.TestCase):
    """The optional hooks, with relayd running in process."""

    @defer.inlineCallbacks
    def setUp(self):
        usePolicyDist(self)
        self.directory = tempDirectory(self)
        self.setup = TestSetup(
            self.directory,
            chain=["recorder", "mynetworks"],
            policies={"recorder": {"version": 1}},
            modes=("relay", "submission"),
        )
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.recorder = policyNamed(self.relayd, "recorder")

    def ended(self):
        return [e[1:] for e in self.recorder.events if e[0] == "ended"]

    @defer.inlineCallbacks
    def closed(self):
        """Wait until the server has seen every connection go."""
        for _ in range(1000):
            if not self.relayd.sessions:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("sessions still open")

    def session(self, *steps):
        """Run one SMTP session: each step is a command or raw bytes."""

        def dialogue():
            c = WireClient(self.relayd.port("relay"))
            try:
                c.reply()
                replies = []
                for step in steps:
                    if isinstance(step, bytes):
                        c.send(step)
                        replies.append(c.reply())
                    else:
                        replies.append(c.command(step))
                return replies
            finally:
                c.close()

        return deferToThread(dialogue)

    def test_startedWithReactor(self):
        self.assertEqual(self.recorder.events, [("start", reactor)])

    @defer.inlineCallbacks
    def test_stoppedAtShutdown(self):
        yield self.relayd.stop()
        self.assertEqual(self.recorder.events, [("start", reactor), ("stop",)])

    @defer.inlineCallbacks
    def test_queued(self):
        """Two transactions in one session: each ends once, queued."""
        replies = yield self.session(
            "EHLO client.test",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.net>",
            "RCPT TO:<c@example.net>",
            "DATA",
            b"Subject: one\r\n\r\n.\r\n",
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<d@example.net>",
            "DATA",
            b"Subject: two\r\n\r\n.\r\n",
            "QUIT",
        )
        self.assertEqual(
            [code for code, _ in replies], [250] * 4 + [354, 250] + [250] * 2 + [354, 250, 221]
        )
        yield self.closed()
        [(id1, rcpts1, q1), (id2, rcpts2, q2)] = self.ended()
        self.assertEqual(
            (rcpts1, q1, rcpts2, q2),
            (["b@example.net", "c@example.net"], True, ["d@example.net"], True),
        )
        self.assertEqual(sorted([id1, id2]), self.relayd.spool.entries("incoming"))

    @defer.inlineCallbacks
    def test_notQueued(self):
        """
        RSET, a new EHLO, a policy's refusal at DATA, a message refused
        for a bare LF: each ends its transaction once, not queued.  MAIL
        refused starts none.
        """
        transaction = ["MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"]
        replies = yield self.session(
            "EHLO client.test",
            "MAIL FROM:<bad",
            *transaction,
            "RSET",
            *transaction,
            "EHLO client.test",
            *transaction,
            "DATA",
            b"Subject: refuse\r\n\r\nx\r\n.\r\n",
            *transaction,
            "DATA",
            b"Subject: bare\r\n\r\nx\ny\r\n.\r\n",
            "QUIT",
        )
        codes = [code for code, _ in replies]
        mailRcpt = [250, 250]
        expected = [250, 501, *mailRcpt, 250, *mailRcpt, 250, *mailRcpt, 354, 554]
        expected += [*mailRcpt, 354, 550, 221]
        self.assertEqual(codes, expected)
        yield self.closed()
        ended = self.ended()
        self.assertEqual([(r, q) for _, r, q in ended], [(["b@example.net"], False)] * 4)
        self.assertEqual(len({queueId for queueId, _, _ in ended}), 4)
        self.assertEqual(self.relayd.spool.entries("incoming"), [])

    @defer.inlineCallbacks
    def test_clientLeavesMidTransaction(self):
        yield self.session(
            "EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"
        )
        yield self.closed()
        [(_, recipients, queued)] = self.ended()
        self.assertEqual((recipients, queued), (["b@example.net"], False))

    def rewriteConfig(self, chain=None, policies=None):
        """Write a new config over the running one (same ports)."""
        with open(self.setup.configPath) as f:
            text = f.read()
        if chain is not None:
            text = re.sub(r"(?m)^chain = .*$", "chain = " + repr(chain).replace("'", '"'), text)
        for name, options in (policies or {}).items():
            body = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in options.items())
            text = re.sub(rf"(?ms)^\[policies\.{name}\]\n.*?(?=^\[|\Z)", "", text)
            text += f"\n[policies.{name}]\n{body}"
        with open(self.setup.configPath, "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def test_reloadKeepsUnchanged(self):
        before = list(self.relayd.service.policies.chain.policies)
        reloaded = yield self.relayd.service.reload()
        self.assertTrue(reloaded)
        after = self.relayd.service.policies.chain.policies
        self.assertEqual(len(after), 2)
        self.assertIs(after[0], before[0])
        self.assertIs(after[1], before[1])
        self.assertEqual(self.recorder.events, [("start", reactor), ("reload",)])
        for factory in self.relayd.service.factories:
            self.assertIs(factory.chain, self.relayd.service.policies.chain)

    @defer.inlineCallbacks
    def test_reloadReplacesChanged(self):
        """New options: a new instance is started, the old one stopped."""
        old = self.relayd.service.policies.chain
        self.rewriteConfig(policies={"recorder": {"version": 2}})
        reloaded = yield self.relayd.service.reload()
        self.assertTrue(reloaded)
        new = self.relayd.service.policies.chain
        self.assertIsNot(new, old)
        fresh = policyNamed(self.relayd, "recorder")
        self.assertIsNot(fresh, self.recorder)
        self.assertEqual(fresh.options, {"version": 2})
        self.assertEqual(fresh.events, [("start", reactor)])
        self.assertEqual(self.recorder.events, [("start", reactor), ("stop",)])
        self.assertIs(new.policies[1], old.policies[1])  # mynetworks, unchanged
        for factory in self.relayd.service.factories:
            self.assertIs(factory.chain, new)

    @defer.inlineCallbacks
    def test_reloadDropsRemoved(self):
        self.rewriteConfig(chain=["mynetworks"])
        reloaded = yield self.relayd.service.reload()
        self.assertTrue(reloaded)
        self.assertEqual(list(self.relayd.service.policies.chain.names), ["mynetworks"])
        self.assertEqual(self.recorder.events, [("start", reactor), ("stop",)])

    @defer.inlineCallbacks
    def test_invalidReloadKeepsOldChain(self):
        """An unknown policy, then a file that is not TOML: both refused."""
        old = self.relayd.service.policies.chain
        self.rewriteConfig(chain=["recorder", "nosuch"])
        first = yield self.relayd.service.reload()
        with open(self.setup.configPath, "a") as f:
            f.write("this is not toml\n")
        second = yield self.relayd.service.reload()
        self.assertEqual((first, second), (False, False))
        self.assertIs(self.relayd.service.policies.chain, old)
        for factory in self.relayd.service.factories:
            self.assertIs(factory.chain, old)
        self.assertEqual(self.recorder.events, [("start", reactor)])
        # Still working: the old chain answers.
        replies = yield self.session(
            "EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"
        )
        self.assertEqual(replies[-1][0], 250)


class SighupTests(unittest.TestCase):
    def test_sighupRereadsPolicyFile(self):
        """
        The real thing: C{twistd -n relayd} gets SIGHUP after the example
        policy's refuse_file changed, and refuses the new domain.
        """
        directory = tempDirectory(self)
        listFile = os.path.join(directory, "refused")
        with open(listFile, "w") as f:
            f.write("first.example\n")
        setup = TestSetup(
            directory,
            chain=["example", "mynetworks"],
            policies={"example": {"refuse_file": "refused"}},
            modes=("relay",),
            portZero=False,
        )
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "relayd", "--config", setup.configPath],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def stop():
            if process.poll() is None:
                process.kill()
            process.wait(30)
            process.stdout.close()

        self.addCleanup(stop)
        port = setup.ports["relay"]

        def codes():
            c = WireClient(port)
            try:
                c.reply()
                c.command("EHLO client.test")
                c.command("MAIL FROM:<a@example.org>")
                return (
                    c.command("RCPT TO:<x@first.example>")[0],
                    c.command("RCPT TO:<x@second.example>")[0],
                )
            finally:
                c.close()

        def eventually(expected):
            deadline = time.monotonic() + 30
            while True:
                try:
                    got = codes()
                except OSError:
                    got = None
                if got == expected or time.monotonic() > deadline:
                    return got
                time.sleep(0.1)

        self.assertEqual(eventually((550, 250)), (550, 250))
        with open(listFile, "w") as f:
            f.write("second.example\n")
        process.send_signal(signal.SIGHUP)
        self.assertEqual(eventually((250, 550)), (250, 550))
        process.terminate()
        process.wait(30)
        output = process.stdout.read().decode("utf-8", "replace")
        self.assertIn("reload: policy chain now example mynetworks", output)


class FailingHookTests(unittest.TestCase):
    """
    Hooks that raise are logged with the policy's name and change nothing
    else: relayd starts, answers, queues, reloads and stops as usual.
    """

    @defer.inlineCallbacks
    def test_failuresLogged(self):
        from twisted.logger import globalLogPublisher

        usePolicyDist(self)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        setup = TestSetup(
            tempDirectory(self),
            chain=["recorder", "mynetworks"],
            policies={"recorder": {"fail": True}},
            modes=("relay",),
        )
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)  # does nothing once stopped
        recorder = policyNamed(relayd, "recorder")

        def dialogue():
            c = WireClient(relayd.port("relay"))
            try:
                c.reply()
                steps = ["EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>"]
                replies = [c.command(step) for step in steps]
                replies.append(c.command("DATA"))
                replies.append(c.command(b"Subject: x\r\n\r\nbody\r\n."))
                replies.append(c.command("NOOP"))
                return [code for code, _ in replies]
            finally:
                c.close()

        codes = yield deferToThread(dialogue)
        self.assertEqual(codes, [250, 250, 250, 354, 250, 250])
        self.assertEqual(len(relayd.spool.entries("incoming")), 1)
        reloaded = yield relayd.service.reload()
        self.assertTrue(reloaded)
        self.assertIs(policyNamed(relayd, "recorder"), recorder)
        yield relayd.stop()
        self.assertEqual([e[0] for e in recorder.events], ["start", "ended", "reload", "stop"])
        failures = [
            e for e in events if e.get("log_failure") is not None and e.get("policy") == "recorder"
        ]
        self.assertEqual(
            sorted(e.get("method") or e["log_format"] for e in failures),
            [
                "policy {policy} could not reload; it keeps its old data",
                "startPolicy",
                "stopPolicy",
                "{prefix}: policy {policy} failed in transactionEnded",
            ],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)
