"""
The C{access} policy over real SMTP sessions: relayd's service tree runs in
the test process on 127.0.0.1 and clients (L{relayd.testing.WireClient},
smtplib) run in threads.  Lists inline and in files, allow entries that
exempt but never open the relay, reload through the running service and
through a real SIGHUP to a real C{twistd relayd}, and config errors.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.envelope import Headers
from relayd.policies.access import Access
from relayd.policy import PolicyContext
from relayd.service import buildService
from relayd.testing import InProcessRelayd, TestSetup, WireClient

REPO = Path(__file__).resolve().parents[2]
OUTSIDER = {"networks": ["192.0.2.0/24"]}
"""mynetworks options under which 127.0.0.1 may not relay."""


def write(path: str, text: str | bytes) -> None:
    """Replace C{path} the way an editor does: new file, renamed over."""
    with open(path + ".new", "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    os.replace(path + ".new", path)


class AccessTestCase(unittest.TestCase):
    """Starts relayd in-process with C{access} first in the chain."""

    options: dict = {}
    chain = ["access", "mynetworks", "authenticated"]
    mynetworks: dict = {}
    files: dict[str, str] = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-access-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        for name, text in self.files.items():
            write(os.path.join(self.directory, name), text)
        self.setup = TestSetup(
            self.directory,
            chain=self.chain,
            policies={"access": self.options, "mynetworks": self.mynetworks},
            modes=("relay",),
        )
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def connect(self):
        client = WireClient(self.relayd.port("relay"))
        self.addCleanup(client.close)
        return client

    def session(self, *commands):
        """Greeting, EHLO, then each command; the replies (code, first line)."""

        def dialogue():
            c = self.connect()
            code, lines = c.reply()
            replies = [(code, lines[0])]
            if code != 220:
                return [*replies, ("closed", c.closed())]
            c.command("EHLO client.test")
            for command in commands:
                code, lines = c.command(command)
                replies.append((code, lines[0]))
            c.command("QUIT")
            return replies

        return deferToThread(dialogue)

    def mail(self, sender, recipient="b@example.net"):
        """The codes of MAIL and RCPT in one transaction."""
        d = self.session(f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>")
        return d.addCallback(lambda replies: [code for code, _ in replies[1:]])

    def logged(self, text):
        """The formatted access log lines containing C{text}."""
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "relayd.policies.access" and text in formatEvent(e)
        ]


class ClientTests(AccessTestCase):
    options = {"client_deny_files": ["clients.txt"]}
    files = {
        "clients.txt": "# bad networks\n\n2001:db8::/32\n127.0.0.0/8   # all of loopback\n",
    }

    @defer.inlineCallbacks
    def test_deniedBeforeGreeting(self):
        """
        A denied client gets 554 5.7.1 instead of the greeting and the
        connection is closed; the log line names the list, the entry, the
        file and line, and the session.
        """
        replies = yield self.session()
        self.assertEqual(replies, [(554, "5.7.1 Access denied"), ("closed", True)])
        [line] = self.logged("denied")
        self.assertRegex(
            line,
            r"^[0-9A-F]{8}: access: client \[127\.0\.0\.1\] denied by client_deny entry "
            r"127\.0\.0\.0/8 \(.*clients\.txt:4\) -> 554 5\.7\.1 session=[0-9A-F]{8}$",
        )
        self.assertEqual(self.relayd.spool.entries("incoming"), [])


class ClientAllowTests(AccessTestCase):
    options = {"client_deny": ["127.0.0.0/8"], "client_allow": ["127.0.0.1"]}

    @defer.inlineCallbacks
    def test_allowExempts(self):
        replies = yield self.session("NOOP")
        self.assertEqual([code for code, _ in replies], [220, 250])


class SenderTests(AccessTestCase):
    options = {
        "sender_deny": ["Spammer@Example.COM"],
        "sender_domain_deny": ["example.net", ".bad.example", "B\u00fccher.example"],
        "sender_allow": ["ceo@example.net"],
        "sender_domain_allow": ["ok.bad.example"],
    }

    @defer.inlineCallbacks
    def test_addressDenied(self):
        """Addresses compare without regard to case; the reply is generic."""
        replies = yield self.session("MAIL FROM:<spammer@EXAMPLE.com>", "MAIL FROM:<x@example.com>")
        self.assertEqual(replies[1:], [(550, "5.7.1 Access denied"), (250, "2.1.0 Ok")])
        [line] = self.logged("denied")
        self.assertIn(
            "access: sender <spammer@EXAMPLE.com> denied by sender_deny entry "
            "Spammer@Example.COM (sender_deny) -> 550 5.7.1 session=",
            line,
        )

    @defer.inlineCallbacks
    def test_domains(self):
        """
        A domain entry matches that domain only; one with a leading dot
        matches the subdomains only.  Case does not matter; an
        internationalized entry matches its A-label form.
        """
        cases = {
            "x@example.net": 550,
            "x@EXAMPLE.NET": 550,
            "x@sub.example.net": 250,
            "x@bad.example": 250,
            "x@a.bad.example": 550,
            "x@a.b.BAD.example": 550,
            "x@xn--bcher-kva.example": 550,
            "x@notbad.example": 250,
        }
        codes = {}
        for sender in cases:
            codes[sender] = (yield self.mail(sender))[0]
        self.assertEqual(codes, cases)

    @defer.inlineCallbacks
    def test_allowExemptsFromDeny(self):
        """An allow entry (address or domain) wins over the deny lists."""
        ceo = yield self.mail("CEO@example.net")
        ok = yield self.mail("x@ok.bad.example")
        self.assertEqual((ceo, ok), ([250, 250], [250, 250]))

    @defer.inlineCallbacks
    def test_nullSenderNeverMatched(self):
        """Bounces must get through (RFC 5321 section 4.5.5)."""
        codes = yield self.mail("")
        self.assertEqual(codes, [250, 250])


class RecipientTests(AccessTestCase):
    options = {
        "recipient_domain_deny": ["blocked.example"],
        "recipient_deny": ["nobody@example.net"],
        "recipient_allow": ["postmaster@blocked.example"],
    }

    @defer.inlineCallbacks
    def test_recipients(self):
        replies = yield self.session(
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<x@blocked.example>",
            "RCPT TO:<NoBody@example.net>",
            "RCPT TO:<postmaster@blocked.example>",
            "RCPT TO:<b@example.net>",
            "RCPT TO:<Postmaster>",
        )
        self.assertEqual(
            replies[2:],
            [
                (550, "5.7.1 Access denied"),
                (550, "5.7.1 Access denied"),
                (250, "2.1.5 Ok"),
                (250, "2.1.5 Ok"),
                (250, "2.1.5 Ok"),
            ],
        )
        self.assertEqual(len(self.logged("denied by recipient_domain_deny entry")), 1)
        self.assertEqual(len(self.logged("denied by recipient_deny entry")), 1)

    @defer.inlineCallbacks
    def test_acceptedMessageStoredUnchanged(self):
        """
        A message that passes is stored byte for byte as sent, after
        relayd's own Received: field.
        """
        body = (
            b"From: a@example.org\r\nTo: b@example.net\r\nSubject: t\r\n\r\n"
            b".leading dot\r\n\xe9 8-bit\r\n" + b"x" * 998 + b"\r\n"
        )

        def dialogue():
            c = self.connect()
            c.reply()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org> BODY=8BITMIME")
            c.command("RCPT TO:<b@example.net>")
            c.command("DATA")
            c.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            return c.reply()

        code, lines = yield deferToThread(dialogue)
        self.assertEqual(code, 250, lines)
        [queueId] = self.relayd.spool.entries("incoming")
        stored = self.relayd.spool.readData(queueId)
        self.assertTrue(stored.endswith(body))
        received, _ = Headers.parse(stored[: -len(body)] + b"\r\n")
        self.assertEqual([f.name for f in received], ["Received"])


class AllowNeverRelaysTests(AccessTestCase):
    """
    127.0.0.1 is not trusted here: however many allow lists match, the
    recipient still gets relayed only if mynetworks or authenticated
    vouches, and here none does.
    """

    mynetworks = OUTSIDER
    options = {
        "client_allow": ["127.0.0.0/8", "::/0", "0.0.0.0/0"],
        "sender_allow": ["a@example.org"],
        "sender_domain_allow": ["example.org"],
        "recipient_allow": ["b@example.net"],
        "recipient_domain_allow": ["example.net"],
    }

    @defer.inlineCallbacks
    def test_allowDoesNotOpenTheRelay(self):
        replies = yield self.session("MAIL FROM:<a@example.org>", "RCPT TO:<b@example.net>", "DATA")
        self.assertEqual(
            replies[1:],
            [(250, "2.1.0 Ok"), (554, "5.7.1 Relay access denied"), (554, replies[3][1])],
        )
        self.assertEqual(self.relayd.spool.entries("incoming"), [])


class ReloadTests(AccessTestCase):
    options = {
        "sender_deny_files": ["senders.txt"],
        "client_deny_files": ["clients.txt"],
    }
    files = {"senders.txt": "a@example.org\n", "clients.txt": "192.0.2.0/24\n"}

    def path(self, name):
        return os.path.join(self.directory, name)

    @defer.inlineCallbacks
    def test_reloadReadsEditedFiles(self):
        """
        The running service's reload (what SIGHUP calls) re-reads the
        files; the same policy instance stays in the chain.
        """
        before = self.relayd.service.policies.chain.policies[0]
        self.assertEqual((yield self.mail("a@example.org"))[0], 550)
        write(self.path("senders.txt"), "# a is fine now\nb@example.org\n")
        ok = yield self.relayd.service.reload()
        self.assertTrue(ok)
        self.assertIs(self.relayd.service.policies.chain.policies[0], before)
        self.assertEqual((yield self.mail("a@example.org"))[0], 250)
        self.assertEqual((yield self.mail("b@example.org"))[0], 550)
        self.assertTrue(self.logged("lists reloaded: client_deny=1 sender_deny=1"))

    @defer.inlineCallbacks
    def test_unreadableFileKeepsOldLists(self):
        """A file that is gone at reload: logged, and the old lists stay."""
        os.remove(self.path("senders.txt"))
        write(self.path("clients.txt"), "127.0.0.0/8\n")
        yield self.relayd.service.reload()
        self.assertEqual((yield self.mail("a@example.org"))[0], 550)
        failures = [
            e
            for e in self.events
            if "could not reload" in (e.get("log_format") or "") and e.get("policy") == "access"
        ]
        self.assertEqual(len(failures), 1)
        self.assertIn("senders.txt", str(failures[0]["log_failure"].value))
        self.assertIn("sender_deny_files: cannot read", str(failures[0]["log_failure"].value))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_badEntryKeepsOldLists(self):
        write(self.path("clients.txt"), "127.0.0.0/8\nnot-a-network\n")
        yield self.relayd.service.reload()
        self.assertEqual((yield self.session("NOOP"))[0][0], 220)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertIn("clients.txt:2: not a network: 'not-a-network'", str(failure.value))
        self.flushLoggedErrors()


class ConfigErrorTests(unittest.TestCase):
    """Bad options stop startup with one line naming the key."""

    def error(self, options, files=None):
        directory = tempfile.mkdtemp(prefix="relayd-access-")
        self.addCleanup(shutil.rmtree, directory, True)
        for name, text in (files or {}).items():
            write(os.path.join(directory, name), text)
        setup = TestSetup(
            directory,
            chain=["access", "mynetworks"],
            policies={"access": options},
            modes=("relay",),
        )
        with self.assertRaises(ConfigError) as caught:
            buildService(load(setup.configPath), reactor)
        line = str(caught.exception)
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(setup.configPath + ": policies.access."), line)
        return line[len(setup.configPath) + 2 :].replace(directory + os.sep, "")

    def test_unknownOption(self):
        self.assertEqual(
            self.error({"client_denied": []}),
            "policies.access.client_denied: unknown option (known: client_allow, client_deny, "
            "sender_allow, sender_deny, sender_domain_allow, sender_domain_deny, "
            "recipient_allow, recipient_deny, recipient_domain_allow, recipient_domain_deny, "
            "each also with _files)",
        )

    def test_notAList(self):
        self.assertEqual(
            self.error({"sender_deny": "a@example.org"}),
            'policies.access.sender_deny: must be a list of strings like ["user@example.com"]',
        )
        self.assertEqual(
            self.error({"client_deny_files": "deny.txt"}),
            'policies.access.client_deny_files: must be a list of strings like ["deny.txt"]',
        )

    def test_badEntries(self):
        self.assertEqual(
            self.error({"client_deny": ["10.0.0.0/33"]}),
            "policies.access.client_deny: not a network: '10.0.0.0/33'",
        )
        self.assertEqual(
            self.error({"sender_deny": ["@example.org"]}),
            "policies.access.sender_deny: not an address: '@example.org' "
            "(domains go in the *_domain_* lists)",
        )
        self.assertEqual(
            self.error({"recipient_domain_deny": ["exa mple.org"]}),
            "policies.access.recipient_domain_deny: not a domain: 'exa mple.org'",
        )

    def test_missingFile(self):
        self.assertEqual(
            self.error({"sender_domain_deny_files": ["missing.txt"]}),
            "policies.access.sender_domain_deny_files: cannot read missing.txt: "
            "No such file or directory",
        )

    def test_notUtf8(self):
        self.assertEqual(
            self.error({"client_deny_files": ["c.txt"]}, {"c.txt": b"192.0.2.1\n\xff\n"}),
            "policies.access.client_deny_files: c.txt is not UTF-8 text",
        )

    def test_badFileLine(self):
        self.assertEqual(
            self.error({"recipient_deny_files": ["r.txt"]}, {"r.txt": "# x\na@b.example\nnope\n"}),
            "policies.access.recipient_deny_files: r.txt:3: not an address: 'nope'",
        )


class UnstartedReloadTests(unittest.TestCase):
    """
    A policy built without relayd around it (as a plugin author's unit
    test would) reloads in the global reactor's thread pool.
    """

    @defer.inlineCallbacks
    def test_reload(self):
        directory = tempfile.mkdtemp(prefix="relayd-access-")
        self.addCleanup(shutil.rmtree, directory, True)
        write(os.path.join(directory, "d.txt"), "example.com\n")
        context = PolicyContext(os.path.join(directory, "relayd.toml"), "relayd.test", "access")
        policy = Access.fromConfig({"sender_domain_deny_files": ["d.txt"]}, context)
        self.assertIsNotNone(policy.lists.find("sender_domain_deny", "example.com"))
        write(os.path.join(directory, "d.txt"), ".example.com\n")
        yield policy.reload()
        self.assertIsNone(policy.lists.find("sender_domain_deny", "example.com"))
        self.assertEqual(
            policy.lists.find("sender_domain_deny", "a.example.com").entry, ".example.com"
        )


# --- a real twistd, a real SIGHUP -------------------------------------------


def startTwistd(setup: TestSetup, logPath: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', "
        f"{setup.configPath!r}]; run()"
    )
    with open(logPath, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def mailCode(port: int, sender: str) -> int:
    client = WireClient(port, timeout=20)
    try:
        assert client.reply()[0] == 220
        client.command("EHLO client.test")
        return client.command(f"MAIL FROM:<{sender}>")[0]
    finally:
        client.close()


def waitFor(predicate, what: str, logPath: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} within {timeout}s\n{logPath.read_text('utf-8', 'replace')}"
            )
        time.sleep(0.1)


def test_sighupReloadsRealTwistd(tmp_path: Path) -> None:
    """
    A real C{twistd -n relayd}: editing the deny file and sending SIGHUP
    changes what is refused, without a restart.
    """
    deny = tmp_path / "senders.txt"
    deny.write_text("a@example.org\n")
    setup = TestSetup(
        str(tmp_path),
        chain=["access", "mynetworks"],
        policies={"access": {"sender_deny_files": ["senders.txt"]}},
        modes=("relay",),
        portZero=False,
    )
    port = setup.ports["relay"]
    logPath = tmp_path / "twistd.log"
    process = startTwistd(setup, logPath)
    try:

        def listening() -> bool:
            assert process.poll() is None, logPath.read_text()
            try:
                return mailCode(port, "x@example.org") == 250
            except (OSError, EOFError):
                return False

        waitFor(listening, "relayd did not listen", logPath)
        assert mailCode(port, "a@example.org") == 550
        write(str(deny), "b@example.org\n")
        process.send_signal(signal.SIGHUP)
        waitFor(lambda: mailCode(port, "b@example.org") == 550, "no reload", logPath)
        assert mailCode(port, "a@example.org") == 250
        assert process.poll() is None
        # Informational lines are written in batches (relayd.ops.logs).
        waitFor(
            lambda: "access: lists reloaded: sender_deny=1" in logPath.read_text(),
            "no reload line",
            logPath,
        )
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_configErrorRealTwistd(tmp_path: Path) -> None:
    """Through the real twistd: exit 1 and one line, no traceback."""
    setup = TestSetup(
        str(tmp_path),
        chain=["access"],
        policies={"access": {"client_deny_files": ["nowhere.txt"]}},
        modes=("relay",),
    )
    code = (
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', "
        f"{setup.configPath!r}]; run()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "relayd: " in line]
    assert lines == [
        (
            f"relayd: config error: {setup.configPath}: policies.access.client_deny_files: "
            f"cannot read {tmp_path / 'nowhere.txt'}: No such file or directory"
        )
    ], output
