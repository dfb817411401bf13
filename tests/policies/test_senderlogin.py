"""
The C{senderlogin} policy over real SMTP sessions: AUTH over STARTTLS with
smtplib against relayd's service tree running in the test process.  The
envelope sender at MAIL, the C{From:} mailboxes at the end of DATA,
sessions without AUTH, reload, config errors; and the C{From:} parser on
its own against inputs crafted to make a parser see another address than a
mail reader would.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.envelope import Headers
from relayd.policies.senderlogin import parseFrom
from relayd.service import buildService
from relayd.smtp.auth import setPassword
from relayd.testing import InProcessRelayd, TestSetup

PASSWORD = "a long enough test password"
USERS = ("alice", "bob", "app", "carol")
MAP = {
    "alice": ["alice@example.com", "@example.org"],
    "bob": ["@.example.net"],
    "app": ["*"],
}
OUTSIDER = {"networks": ["192.0.2.0/24"]}
"""mynetworks options under which 127.0.0.1 must authenticate to relay."""


def write(path: str, text: str) -> None:
    """Replace C{path} the way an editor does: new file, renamed over."""
    with open(path + ".new", "w") as f:
        f.write(text)
    os.replace(path + ".new", path)


def message(*fromValues: str, body: bytes = b"Hello.\r\n") -> bytes:
    head = "".join(f"From: {v}\r\n" for v in fromValues).encode()
    return head + b"To: b@example.net\r\nSubject: test\r\n\r\n" + body


class SenderLoginTestCase(unittest.TestCase):
    """relayd in-process with C{senderlogin} first; 127.0.0.1 untrusted."""

    options: dict = {"map": MAP}
    mynetworks: dict = OUTSIDER
    files: dict[str, str] = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-senderlogin-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        for name, text in self.files.items():
            write(os.path.join(self.directory, name), text)
        self.setup = TestSetup(
            self.directory,
            chain=["senderlogin", "mynetworks", "authenticated"],
            policies={"senderlogin": self.options, "mynetworks": self.mynetworks},
            modes=("relay",),
        )
        for user in USERS:
            setPassword(self.setup.usersPath, user, PASSWORD, rounds=4)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def send(self, user, sender, data=None, login=True):
        """
        One transaction, AUTH over STARTTLS as C{user} (unless not
        C{login}): the (code, text) of MAIL, and of the end of DATA when
        MAIL got 250 and C{data} is given.
        """

        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=20) as s:
                s.starttls(context=self.setup.clientContext())
                s.ehlo()
                if login:
                    s.login(user, PASSWORD)
                code, text = s.mail(sender)
                replies = [(code, text.decode())]
                if code != 250 or data is None:
                    return replies
                assert s.rcpt("b@example.net")[0] == 250
                code, text = s.data(data)
                return [*replies, (code, text.decode())]

        return deferToThread(dialogue)

    def spooled(self):
        spool = self.relayd.spool
        return spool.entries("incoming")

    def logged(self, text):
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "relayd.policies.senderlogin" and text in formatEvent(e)
        ]


NOT_OWNED = (553, "5.7.1 Sender address not owned by user")
FROM_NOT_OWNED = (553, "5.7.1 From: address not owned by user")
FROM_UNREADABLE = (553, "5.7.1 From: header cannot be parsed")


class EnvelopeTests(SenderLoginTestCase):
    @defer.inlineCallbacks
    def test_ownedAddressStoredUnchanged(self):
        """
        The user's own address, in another case, envelope and header: the
        message is stored byte for byte as sent, after relayd's Received:.
        """
        data = message(
            '"Alice A." <Alice@Example.COM>', body=b"x\r\n\xe9\r\n" + b"y" * 990 + b"\r\n"
        )
        replies = yield self.send("alice", "ALICE@example.com", data)
        self.assertEqual([code for code, _ in replies], [250, 250])
        [queueId] = self.spooled()
        stored = self.relayd.spool.readData(queueId)
        self.assertTrue(stored.endswith(data))
        received, _ = Headers.parse(stored[: -len(data)] + b"\r\n")
        self.assertEqual([f.name for f in received], ["Received"])

    @defer.inlineCallbacks
    def test_notOwned(self):
        replies = yield self.send("alice", "bob@example.com", message("alice@example.com"))
        self.assertEqual(replies, [NOT_OWNED])
        [line] = self.logged("may not use")
        self.assertRegex(
            line,
            r"^[0-9A-F]{8}: senderlogin: user alice may not use sender <bob@example\.com>: "
            r"not in the user's entries -> 553 5\.7\.1 session=[0-9A-F]{8}$",
        )
        self.assertEqual(self.spooled(), [])

    @defer.inlineCallbacks
    def test_domainEntries(self):
        """C{@domain}: that domain only; C{@.domain}: its subdomains only."""
        cases = {
            ("alice", "anyone@example.org"): 250,
            ("alice", "anyone@EXAMPLE.ORG"): 250,
            ("alice", "x@sub.example.org"): 553,
            ("alice", "x@example.org.evil.example"): 553,
            ("bob", "x@sub.example.net"): 250,
            ("bob", "x@a.b.example.net"): 250,
            ("bob", "x@example.net"): 553,
            ("bob", "x@notexample.net"): 553,
        }
        codes = {}
        for user, sender in cases:
            codes[user, sender] = (yield self.send(user, sender))[0][0]
        self.assertEqual(codes, cases)

    @defer.inlineCallbacks
    def test_star(self):
        """C{*}: any sender and any From:, even one that does not parse."""
        a = yield self.send("app", "x@anything.example", message("y@else.example"))
        b = yield self.send("app", "x@anything.example", message("undisclosed:;"))
        self.assertEqual([c for c, _ in a + b], [250, 250, 250, 250])

    @defer.inlineCallbacks
    def test_userNotInMap(self):
        """A user without entries may send as nobody, not even with <>."""
        replies = yield self.send("carol", "carol@example.com")
        self.assertEqual(replies, [NOT_OWNED])
        self.assertTrue(self.logged("user carol may not use sender <carol@example.com>: user not"))
        replies = yield self.send("carol", "", message("carol@example.com"))
        self.assertEqual(replies, [(250, "2.1.0 Ok"), FROM_NOT_OWNED])
        self.assertEqual(self.spooled(), [])


class HeaderTests(SenderLoginTestCase):
    @defer.inlineCallbacks
    def test_fromNotOwned(self):
        """Envelope fine, From: someone else's: refused at the end of DATA."""
        replies = yield self.send("alice", "alice@example.com", message("ceo@example.com"))
        self.assertEqual(replies, [(250, "2.1.0 Ok"), FROM_NOT_OWNED])
        self.assertEqual(self.spooled(), [])
        [line] = self.logged("may not use From:")
        self.assertRegex(
            line,
            r"^[0-9A-Z]+: senderlogin: user alice may not use From: <ceo@example\.com>: "
            r"not in the user's entries -> 553 5\.7\.1 session=[0-9A-F]{8}$",
        )
        queueId = line.split(":")[0]
        [event] = [
            e for e in self.events if e.get("queue_id") == queueId and "may not" in formatEvent(e)
        ]
        self.assertNotEqual(event["queue_id"], event["session_id"])

    @defer.inlineCallbacks
    def test_nullSender(self):
        """<> passes at MAIL; its From: is still checked."""
        ok = yield self.send("alice", "", message("Alice <alice@example.com>"))
        spoofed = yield self.send("alice", "", message("Boss <boss@example.com>"))
        self.assertEqual(ok, [(250, "2.1.0 Ok"), ok[1]])
        self.assertEqual(ok[1][0], 250)
        self.assertEqual(spoofed, [(250, "2.1.0 Ok"), FROM_NOT_OWNED])
        self.assertEqual(len(self.spooled()), 1)

    @defer.inlineCallbacks
    def test_everyMailbox(self):
        """Each mailbox of a From: list, and each From: field, is checked."""
        listed = yield self.send(
            "alice", "alice@example.com", message("alice@example.com, x@evil.example")
        )
        fields = yield self.send(
            "alice", "alice@example.com", message("alice@example.com", "x@evil.example")
        )
        fine = yield self.send(
            "alice", "alice@example.com", message("alice@example.com, Team <t@example.org>")
        )
        self.assertEqual(listed[1], FROM_NOT_OWNED)
        self.assertEqual(fields[1], FROM_NOT_OWNED)
        self.assertEqual(fine[1][0], 250)

    @defer.inlineCallbacks
    def test_unparseable(self):
        """
        A From: that might be read two ways is refused, as is one that
        names no mailbox; a display name that looks like an address counts
        for nothing.
        """
        values = [
            "alice@example.com <mallory@evil.example>",
            "alice@example.com)<mallory@evil.example>",
            "undisclosed-recipients:;",
            "<>",
            '"Alice <alice@example.com" <mallory@evil.example',
        ]
        for value in values:
            replies = yield self.send("alice", "alice@example.com", message(value))
            self.assertEqual(replies[1], FROM_UNREADABLE, value)
        replies = yield self.send(
            "alice", "alice@example.com", message('"alice@example.com" <mallory@evil.example>')
        )
        self.assertEqual(replies[1], FROM_NOT_OWNED)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(len(self.logged("does not parse")), len(values))

    @defer.inlineCallbacks
    def test_noFrom(self):
        """A message without From: passes (there is nothing to spoof)."""
        replies = yield self.send("alice", "alice@example.com", b"Subject: none\r\n\r\nx\r\n")
        self.assertEqual([c for c, _ in replies], [250, 250])


def padded(fromValue: str, size: int = 1_100_000) -> bytes:
    """
    A message whose header section holds C{size} octets of C{X-Pad:}
    fields before its C{From:}: more than relayd's default bound on the
    header section (1 MiB).
    """
    line = b"X-Pad: " + b"p" * 900 + b"\r\n"
    return line * (size // len(line) + 1) + message(fromValue)


HEADER_TOO_LARGE = (552, "5.3.4 Error: message header section exceeds fixed limit")


class LargeHeaderTests(SenderLoginTestCase):
    @defer.inlineCallbacks
    def test_fromAfterLargeHeaderRefused(self):
        """
        A From: hidden after more header than relayd parses is never
        accepted unseen: the message is refused with 552 5.3.4 and a log
        line, and the session goes on serving.
        """

        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=60) as s:
                s.starttls(context=self.setup.clientContext())
                s.ehlo()
                s.login("alice", PASSWORD)
                assert s.mail("alice@example.com")[0] == 250
                assert s.rcpt("b@example.net")[0] == 250
                code, text = s.data(padded("ceo@example.com"))
                refused = (code, text.decode())
                assert s.mail("alice@example.com")[0] == 250
                assert s.rcpt("b@example.net")[0] == 250
                return refused, s.data(message("alice@example.com"))[0]

        refused, after = yield deferToThread(dialogue)
        self.assertEqual(refused, HEADER_TOO_LARGE)
        self.assertEqual(after, 250)
        self.assertEqual(len(self.spooled()), 1)
        lines = [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "relayd.smtpd" and "header section" in formatEvent(e)
        ]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(
            lines[0],
            r"^[0-9A-Z]+: message refused: header section over 1048576 octets "
            r"\(limits\.header_size\) from \[127\.0\.0\.1\] session=[0-9A-F]{8}$",
        )


class NoHeaderCheckTests(SenderLoginTestCase):
    options = {"map": MAP, "check_header_from": False}

    @defer.inlineCallbacks
    def test_headerNotChecked(self):
        replies = yield self.send("alice", "alice@example.com", message("ceo@example.com"))
        self.assertEqual([c for c, _ in replies], [250, 250])
        replies = yield self.send("alice", "ceo@example.com")
        self.assertEqual(replies, [NOT_OWNED])


class UnauthenticatedTests(SenderLoginTestCase):
    """Trusted networks relay for many senders: no AUTH, no check."""

    mynetworks: dict = {}

    @defer.inlineCallbacks
    def test_notChecked(self):
        replies = yield self.send("", "ceo@example.com", message("ceo@example.com"), login=False)
        self.assertEqual([c for c, _ in replies], [250, 250])


class ReloadTests(SenderLoginTestCase):
    options = {"map_files": ["senders.txt"], "map": {"alice": ["alice@example.com"]}}
    files = {"senders.txt": "# user  addresses\nbob\tbob@example.net\n"}

    def path(self):
        return os.path.join(self.directory, "senders.txt")

    @defer.inlineCallbacks
    def test_reload(self):
        """
        The running service's reload (what SIGHUP calls) re-reads the map
        file; inline entries stay; entries from both places add up.
        """
        self.assertEqual((yield self.send("alice", "x@example.com"))[0], NOT_OWNED)
        self.assertEqual((yield self.send("bob", "bob@example.net"))[0][0], 250)
        write(self.path(), "alice  x@example.com,@example.org\tz@example.com\n")
        self.assertTrue((yield self.relayd.service.reload()))
        self.assertEqual((yield self.send("alice", "x@example.com"))[0][0], 250)
        self.assertEqual((yield self.send("alice", "y@example.org"))[0][0], 250)
        self.assertEqual((yield self.send("alice", "z@example.com"))[0][0], 250)
        self.assertEqual((yield self.send("alice", "alice@example.com"))[0][0], 250)
        self.assertEqual((yield self.send("bob", "bob@example.net"))[0], NOT_OWNED)
        self.assertTrue(self.logged("map reloaded: 1 users"))

    @defer.inlineCallbacks
    def test_unreadableKeepsOldMap(self):
        os.remove(self.path())
        yield self.relayd.service.reload()
        self.assertEqual((yield self.send("bob", "bob@example.net"))[0][0], 250)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertIn("map_files: cannot read", str(failure.value))
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_badLineKeepsOldMap(self):
        write(self.path(), "bob @example.org\nbob\n")
        yield self.relayd.service.reload()
        self.assertEqual((yield self.send("bob", "bob@example.net"))[0][0], 250)
        self.assertEqual((yield self.send("bob", "bob@example.org"))[0], NOT_OWNED)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertIn("senders.txt:2: user 'bob' has no addresses", str(failure.value))
        self.flushLoggedErrors()


class ConfigErrorTests(unittest.TestCase):
    """Bad options stop startup with one line naming the key."""

    def error(self, options, files=None):
        directory = tempfile.mkdtemp(prefix="relayd-senderlogin-")
        self.addCleanup(shutil.rmtree, directory, True)
        for name, text in (files or {}).items():
            write(os.path.join(directory, name), text)
        setup = TestSetup(
            directory,
            chain=["senderlogin", "authenticated"],
            policies={"senderlogin": options},
            modes=("relay",),
        )
        with self.assertRaises(ConfigError) as caught:
            buildService(load(setup.configPath), reactor)
        line = str(caught.exception)
        self.assertNotIn("\n", line)
        self.assertTrue(line.startswith(setup.configPath + ": policies.senderlogin."), line)
        return line[len(setup.configPath) + 2 :].replace(directory + os.sep, "")

    def test_options(self):
        self.assertEqual(
            self.error({"maps": {}}),
            "policies.senderlogin.maps: unknown option (known: map, map_files, check_header_from)",
        )
        self.assertEqual(
            self.error({"map": ["alice@example.com"]}),
            'policies.senderlogin.map: must be a table like { alice = ["alice@example.com"] }',
        )
        self.assertEqual(
            self.error({"map": {"alice": "alice@example.com"}}),
            'policies.senderlogin.map: alice: must be a list of strings like ["alice@example.com"]',
        )
        self.assertEqual(
            self.error({"check_header_from": "yes"}),
            "policies.senderlogin.check_header_from: must be true or false",
        )
        self.assertEqual(
            self.error({"map_files": "senders.txt"}),
            'policies.senderlogin.map_files: must be a list of strings like ["senders.txt"]',
        )

    def test_badEntries(self):
        self.assertEqual(
            self.error({"map": {"alice": ["alice"]}}),
            "policies.senderlogin.map: alice: not an address, @domain, @.domain or *: 'alice'",
        )
        self.assertEqual(
            self.error({"map": {"alice": ["@exa_mple.org"]}}),
            "policies.senderlogin.map: alice: not a domain: 'exa_mple.org'",
        )

    def test_files(self):
        self.assertEqual(
            self.error({"map_files": ["missing.txt"]}),
            "policies.senderlogin.map_files: cannot read missing.txt: No such file or directory",
        )
        self.assertEqual(
            self.error({"map_files": ["m.txt"]}, {"m.txt": "a a@example.org\nb *, nope\n"}),
            "policies.senderlogin.map_files: m.txt:2: not an address, @domain, @.domain or *: "
            "'nope'",
        )


class ParseFromTests(unittest.TestCase):
    """L{parseFrom}: the mailboxes, or None when a reading is in doubt."""

    def test_mailboxes(self):
        cases = {
            "alice@example.com": ["alice@example.com"],
            "Alice <Alice@EXAMPLE.com>": ["alice@example.com"],
            '"Smith, Alice" <a@example.com>': ["a@example.com"],
            "(Smith, Alice) <a@example.com>": ["a@example.com"],
            "a@example.com (Alice)": ["a@example.com"],
            "a@example.com, B <b@example.org>": ["a@example.com", "b@example.org"],
            "Team: a@example.com, b@example.org;": ["a@example.com", "b@example.org"],
            "x@b\u00fccher.example": ["x@xn--bcher-kva.example"],
            '"quoted local"@example.com': ['"quoted local"@example.com'],
            '"a \\"b\\" <c@d>" <a@example.com>': ["a@example.com"],
            "(a (nested \\) comment)) a@example.com": ["a@example.com"],
        }
        for value, expected in cases.items():
            self.assertEqual(parseFrom([value]), expected, value)
        self.assertEqual(
            parseFrom(["a@example.com", "b@example.org"]), ["a@example.com", "b@example.org"]
        )

    def test_doubtful(self):
        for value in [
            "",
            "alice",
            "<>",
            "undisclosed:;",
            "alice@example.com <m@evil.example>",
            "alice@example.com)<m@evil.example>",
            "(alice@example.com <m@evil.example>",
            '"alice@example.com <m@evil.example>',
            "<alice@example.com>m@evil.example",
            "A <a@example.com>, B",
            "a@example.com@evil.example",
            "a@[192.0.2.1]",
            "a@example.com\x00@evil.example",
            "a@\udce9vil.example",
            "<<a@example.com>>",
            "x" * 65 + "@example.com",
            "a..b@example.com",
            '"a \\"b <m@evil.example>',
            "a@example.com (x \\",
        ]:
            self.assertIsNone(parseFrom([value]), value)
        self.assertIsNone(parseFrom(["a@example.com", "garbage"]))
