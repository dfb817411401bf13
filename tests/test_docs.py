"""
The Python blocks of docs/plugins.md are real: they run here, in order, as
one module, like a reader pasting them into a file.  Every policy class
they define is checked against the interfaces it declares, and the trial
test cases they define are collected and run as tests of this module.
"""

import ast
import os
import re
import tempfile
from pathlib import Path

from twisted.trial import unittest
from zope.interface import implementedBy
from zope.interface.verify import verifyClass

from relayd.plugin import IPolicy, PolicyContext

CONTEXT = PolicyContext("/etc/relayd/relayd.toml", "relay.example.org", "docs")
DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def runBlocks():
    namespace = {"__name__": "docs_plugins"}
    blocks = BLOCK.findall(DOC.read_text())
    for number, source in enumerate(blocks, 1):
        code = compile(source, f"{DOC}, python block {number}", "exec")
        exec(code, namespace)
    return blocks, namespace


BLOCKS, NAMESPACE = runBlocks()


def collectTestCases():
    """Make the documented test cases tests of this module."""
    for name, value in list(NAMESPACE.items()):
        if isinstance(value, type) and issubclass(value, unittest.TestCase):
            globals()[f"Doc{name}"] = value


collectTestCases()


class DocumentedPoliciesTests(unittest.TestCase):
    def test_blocksFound(self):
        self.assertGreaterEqual(len(BLOCKS), 8)

    def test_policiesImplementWhatTheyDeclare(self):
        policies = [
            value
            for value in NAMESPACE.values()
            if isinstance(value, type) and IPolicy.implementedBy(value)
        ]
        self.assertEqual(
            sorted(p.__name__ for p in policies),
            ["HeaderHygiene", "HourlyQuota", "LocalDomains", "NoReply", "SenderDomainResolves"],
        )
        for policy in policies:
            self.assertTrue(callable(policy.fromConfig))
            for interface in implementedBy(policy):
                verifyClass(interface, policy)

    def test_importsOnlyThePluginAPI(self):
        """
        The guide's code imports from relayd only C{relayd.plugin} (the
        policy's side) and C{relayd.testing} (its tests).
        """
        found = set()
        for source in BLOCKS:
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
        self.assertEqual(
            {m for m in found if m.split(".")[0] == "relayd"}, {"relayd.plugin", "relayd.testing"}
        )

    def test_headerHygiene(self):
        from relayd.envelope import Message

        fd, path = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.unlink, path)
        raw = (
            b"Received: by relayd.test\r\nFrom: a@example.org\r\n"
            b"X-Internal-Score: 9\r\n\r\nbody\r\n"
        )
        with open(path, "wb") as f:
            f.write(raw)
        session = NAMESPACE["submissionSession"]("alice")
        policy = NAMESPACE["HeaderHygiene"].fromConfig({}, CONTEXT)
        message = Message(path, len(raw))
        self.assertIs(policy.checkMessage(session, None, message), NAMESPACE["CONTINUE"])
        self.assertFalse(message.changed)
        self.assertIsNone(policy.modifyMessage(session, None, message))
        self.assertEqual(
            message.asBytes(),
            b"Received: by relayd.test\r\nFrom: a@example.org\r\n"
            b"X-Relayed-By: relayd\r\nX-Authenticated-User: alice\r\n\r\nbody\r\n",
        )
        with open(path, "wb") as f:
            f.write(b"Subject: no From\r\n\r\n")
        verdict = policy.checkMessage(session, None, Message(path, 20))
        self.assertEqual((verdict.code, verdict.enhanced), (550, "5.6.0"))

    def test_senderDomainResolves(self):
        from twisted.internet import defer, reactor

        from relayd.address import Address
        from relayd.envelope import Envelope

        context = PolicyContext("relayd.toml", "relay.example", "resolves", reactor)
        policy = NAMESPACE["SenderDomainResolves"].fromConfig({"threads": 1}, context)
        policy.startPolicy(reactor)
        self.addCleanup(policy.stopPolicy)
        session = NAMESPACE["submissionSession"](None)

        def check(sender):
            envelope = Envelope(sender=sender)
            return defer.ensureDeferred(policy.checkSender(session, envelope, sender))

        d = check(Address("a", "localhost"))
        d.addCallback(self.assertIs, NAMESPACE["CONTINUE"])
        d.addCallback(lambda _: check(Address.null()))
        d.addCallback(self.assertIs, NAMESPACE["CONTINUE"])
        return d


ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MODULE_PATH = re.compile(r"`((?:relayd|twisted|tests)/[\w/]*?(?:\.py|/))`")


def _testingSection():
    """The text of docs/plugins.md from its Testing heading to the next one."""
    text = DOC.read_text()
    start = text.index("\n## Testing\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


class TestingHelpersDocumentedTests(unittest.TestCase):
    """docs/plugins.md names every public helper of relayd.testing."""

    def modules(self):
        import importlib
        import pkgutil

        import relayd.testing

        names = ["relayd.testing"] + [
            f"relayd.testing.{info.name}"
            for info in pkgutil.iter_modules(relayd.testing.__path__)
            if not info.name.startswith("_")
        ]
        return [importlib.import_module(name) for name in names]

    def test_modulesFound(self):
        self.assertEqual(
            sorted(m.__name__ for m in self.modules()),
            [
                "relayd.testing",
                "relayd.testing.certs",
                "relayd.testing.dnsserver",
                "relayd.testing.memoryqueue",
                "relayd.testing.powercut",
                "relayd.testing.process",
                "relayd.testing.redisserver",
                "relayd.testing.sink",
            ],
        )

    def test_everyModuleSaysWhatItIsAndExports(self):
        for module in self.modules():
            self.assertTrue(module.__doc__ and module.__doc__.strip(), module.__name__)
            self.assertTrue(module.__all__, module.__name__)
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), f"{module.__name__}.{name}")

    def test_everyPublicNameInTheTestingSection(self):
        section = _testingSection()
        missing = [
            f"{module.__name__}.{name}"
            for module in self.modules()
            for name in module.__all__
            if not re.search(rf"`[^`]*\b{name}\b[^`]*`", section)
        ]
        self.assertEqual(missing, [])
        for module in self.modules()[1:]:
            self.assertIn(f"`{module.__name__}", section)


class ArchitectureDocTests(unittest.TestCase):
    """docs/architecture.md, where a newcomer starts, names what exists."""

    def test_namesModules(self):
        paths = MODULE_PATH.findall(ARCHITECTURE.read_text())
        self.assertGreaterEqual(len(paths), 30)
        # The walk names every room.
        for room in ("relayd/smtp/", "relayd/queue/", "relayd/delivery/", "relayd/ops/"):
            self.assertIn(room, paths)

    def test_everyModulePathExists(self):
        missing = [
            path
            for path in MODULE_PATH.findall(ARCHITECTURE.read_text())
            if not (ROOT / path).exists()
        ]
        self.assertEqual(missing, [])

    def test_readmeStartsThere(self):
        """The README links it in its first lines."""
        head = "\n".join((ROOT / "README.md").read_text().splitlines()[:20])
        self.assertIn("(docs/architecture.md)", head)
