"""
The C{headers} policy over real sockets: messages go to an in-process
relayd with L{relayd.testing.WireClient} (exact bytes on the wire) or
smtplib (STARTTLS and AUTH), and the data file the spool stored is compared
byte for byte with what the policy should have made of it.
"""

import email.utils
import re
import shutil
import smtplib
import tempfile
import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.envelope import Headers
from relayd.policies.headers import HIDDEN_HOST, HeaderRewrite, addressDomains
from relayd.policy import PolicyContext, PolicyOptionError, loadPolicies
from relayd.service import buildService
from relayd.testing import DEMO_PASSWORD, DEMO_USER, InProcessRelayd, TestSetup, WireClient

CHAIN = ["mynetworks", "authenticated", "headers"]


def sendRaw(port, data, sender="alice@example.org", recipients=("bob@example.net",)):
    """Send C{data} unchanged over a relay session; return the queue id."""
    c = WireClient(port)
    try:
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        code, lines = c.sendMessage(sender, recipients, data)
        assert code == 250, (code, lines)
        c.command("QUIT")
        return lines[0].rsplit(" ", 1)[1]
    finally:
        c.close()


def sendAuthenticated(setup, port, data, sender="alice@example.org"):
    """Send C{data} over submission with STARTTLS and AUTH (smtplib)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="laptop.private.test", timeout=30) as s:
        s.starttls(context=setup.clientContext())
        s.login(DEMO_USER, DEMO_PASSWORD)
        s.sendmail(sender, ["bob@example.net"], data)
        code, _text = s.noop()
        assert code == 250
    return


class HeadersTestCase(unittest.TestCase):
    policies: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-headers-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, chain=CHAIN, policies={"headers": self.policies})
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    def send(self, data, **kw):
        return deferToThread(sendRaw, self.relayd.port("relay"), data, **kw)

    def stored(self, queueId=None):
        """The stored data and envelope of the one (or the named) message."""
        spool = self.relayd.spool
        if queueId is None:
            [queueId] = spool.entries("incoming")
        record, _ = spool.load(queueId)
        return spool.readData(queueId), record

    def splitTrace(self, data, queueId):
        """
        Split off relayd's own C{Received:} field (its date varies) and
        check that it is relayd's, for this message.
        """
        headers, _ = Headers.parse(data)
        first = headers.fields[0]
        self.assertEqual(first.name, "Received")
        self.assertIn("(relayd) with ", first.value)
        self.assertIn(f" id {queueId}", first.value)
        return first.raw, data[len(first.raw) :]


MESSAGE = (
    b"Received: from internal.example.org (internal.example.org [10.0.0.5])\r\n"
    b"\tby gw.example.org with ESMTP; Sun, 22 Nov 2026 08:59:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"X-Originating-IP: [198.51.100.7]\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and a\r\n"
    b"  folded \xc3\xa9 line\r\n"
    b"X-MS-Exchange-Organization-Id: 1234\r\n"
    b"\t5678\r\n"
    b"x-ms-has-attach: yes\r\n"
    b"X-Latin1: caf\xe9\r\n"
    b"X-Mailer: Outlook\r\n"
    b"\tfolded mailer\r\n"
    b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: second one\r\n"
    b"\r\n"
    b"X-MS-Not-A-Header: this is body\r\n"
    b".a line starting with a dot\r\n"
    b"\r\n"
    b"\xe9t\xe9 8-bit body  \r\n"
    b"last line without much"
    b"\r\n"
)


class RulesTests(HeadersTestCase):
    policies = {
        "remove": ["X-Originating-IP", "/^X-MS-/"],
        "replace": {"x-mailer": "relayd test", "/^x-latin/": "replaced"},
        "add": {"X-Relayed": "yes", "X-Unicode": "\u00e9t\u00e9"},
    }

    @defer.inlineCallbacks
    def test_byteExact(self):
        """
        Removed fields go (folded lines with them, by name and by pattern,
        any case), replaced ones keep their name and place, added ones go
        at the end; every other byte of the header section and the body is
        as sent, 8-bit bytes included.
        """
        queueId = yield self.send(MESSAGE)
        data, _ = self.stored()
        _, rest = self.splitTrace(data, queueId)
        expected = (
            b"Received: from internal.example.org (internal.example.org [10.0.0.5])\r\n"
            b"\tby gw.example.org with ESMTP; Sun, 22 Nov 2026 08:59:00 +0000\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: Bob <bob@example.net>\r\n"
            b"Subject: =?utf-8?q?caf=C3=A9?= and a\r\n"
            b"  folded \xc3\xa9 line\r\n"
            b"X-Latin1: replaced\r\n"
            b"X-Mailer: relayd test\r\n"
            b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
            b"Message-ID: <1@example.org>\r\n"
            b"X-Mailer: relayd test\r\n"
            b"X-Relayed: yes\r\n"
            b"X-Unicode: \xc3\xa9t\xc3\xa9\r\n"
            b"\r\n" + MESSAGE.split(b"\r\n\r\n", 1)[1]
        )
        self.assertEqual(rest, expected)


def padded(size: int = 1_100_000) -> bytes:
    """
    A message with C{size} octets of C{X-Pad:} fields before its C{From:},
    C{Date:} and C{Message-ID:}: more header than relayd's default bound
    (1 MiB).
    """
    line = b"X-Pad: " + b"p" * 900 + b"\r\n"
    return line * (size // len(line) + 1) + MESSAGE


def sendTwo(port, first, second):
    """Two messages in one relay session: the replies to each end of DATA."""
    c = WireClient(port)
    try:
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        replies = []
        for data in (first, second):
            code, lines = c.sendMessage("alice@example.org", ["bob@example.net"], data)
            replies.append((code, lines[0]))
        return replies
    finally:
        c.close()


class LargeHeaderTests(HeadersTestCase):
    @defer.inlineCallbacks
    def test_headerSectionOverLimitRefused(self):
        """
        The policy is never handed a header section cut short: one over
        the bound is refused (552 5.3.4) before it could rewrite or add
        fields in the middle of it; the session goes on.
        """
        refused, after = yield deferToThread(sendTwo, self.relayd.port("relay"), padded(), MESSAGE)
        self.assertEqual(refused, (552, "5.3.4 Error: message header section exceeds fixed limit"))
        self.assertEqual(after[0], 250)
        data, _ = self.stored()
        self.assertNotIn(b"X-Pad", data)


class OwnTraceTests(HeadersTestCase):
    policies = {"remove": ["Received"], "replace": {"/^rec/": "x"}}

    @defer.inlineCallbacks
    def test_ownTraceKept(self):
        """
        A rule that would match relayd's own C{Received:} field leaves it:
        the client's C{Received:} fields go, relayd's stays first.
        """
        queueId = yield self.send(MESSAGE)
        data, _ = self.stored()
        trace, rest = self.splitTrace(data, queueId)
        self.assertIn(b"[127.0.0.1]", trace)
        self.assertTrue(rest.startswith(b"From: Alice <alice@example.org>\r\n"), rest)
        self.assertNotIn(b"gw.example.org", data)


class AddMissingTests(HeadersTestCase):
    policies = {"privacy": True}

    def checkAdded(self, rest, queueId, before, after):
        """
        C{rest} is C{before}, then the added C{Date:} and C{Message-ID:}
        (RFC 6409 sections 8.2, 8.3), then C{after}.
        """
        pattern = (
            re.escape(before)
            + rb"Date: ([^\r\n]+)\r\nMessage-ID: <"
            + re.escape(queueId.encode())
            + rb"\.[0-9a-f]{12}@relayd\.test>\r\n"
            + re.escape(after)
        )
        m = re.fullmatch(pattern, rest)
        self.assertIsNotNone(m, rest)
        date = email.utils.parsedate_to_datetime(m.group(1).decode())
        self.assertLess(abs(date.timestamp() - time.time()), 600)

    @defer.inlineCallbacks
    def test_added(self):
        """Missing C{Date:} and C{Message-ID:} are added at the end."""
        head = b"From: a@example.org\r\nSubject: s\r\n  folded\r\n"
        body = b"\r\nbody\r\n"
        queueId = yield self.send(head + body)
        data, _ = self.stored()
        _, rest = self.splitTrace(data, queueId)
        self.checkAdded(rest, queueId, head, body)

    @defer.inlineCallbacks
    def test_presentAnyCaseKept(self):
        """Fields present under any case are not added twice: no edit."""
        message = b"DATE: Sun, 22 Nov 2026 09:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nb\r\n"
        queueId = yield self.send(message)
        data, _ = self.stored()
        _, rest = self.splitTrace(data, queueId)
        self.assertEqual(rest, message)

    @defer.inlineCallbacks
    def test_noSeparator(self):
        """
        A header section ended by a line that is not a field (no empty
        line): the fields are added after the last field and the body
        follows as it came.
        """
        queueId = yield self.send(b"Subject: x\r\nthis line is body\r\nmore\r\n")
        data, _ = self.stored()
        _, rest = self.splitTrace(data, queueId)
        self.checkAdded(rest, queueId, b"Subject: x\r\n", b"this line is body\r\nmore\r\n")

    @defer.inlineCallbacks
    def test_noHeaders(self):
        """A message with an empty header section, and an empty message."""
        first = yield self.send(b"\r\nonly a body\r\n")
        second = yield self.send(b"")
        for queueId, after in [(first, b"\r\nonly a body\r\n"), (second, b"")]:
            data, _ = self.stored(queueId)
            _, rest = self.splitTrace(data, queueId)
            self.checkAdded(rest, queueId, b"", after)

    @defer.inlineCallbacks
    def test_privacyOnlyForAuthenticated(self):
        """
        Privacy mode leaves the trace of an unauthenticated session (a
        relay from a trusted network) as it is.
        """
        queueId = yield self.send(b"Date: x\r\nMessage-ID: <y@z>\r\n\r\n")
        data, _ = self.stored()
        trace, _ = self.splitTrace(data, queueId)
        self.assertIn(b"from client.test ([127.0.0.1])", trace)


class MasqueradeTests(HeadersTestCase):
    policies = {
        "masquerade": ["dept.example.com", "example.com"],
        "masquerade_exceptions": ["root"],
        "add_missing": False,
    }

    @defer.inlineCallbacks
    def test_envelopeAndFrom(self):
        """
        The envelope sender and every address in C{From:} in a subdomain of
        a masquerade domain get that domain (first match); only the domain
        bytes change: display names, comments, quoted strings, folding and
        8-bit bytes stay, as do other domains, the exceptions and C{To:}.
        """
        message = (
            b'From: "Alice \xc3\x84. (host.dept.example.com)" <alice@host.dept.example.com>,\r\n'
            b"  Carol <carol@mail.example.COM> (at @x.example.com),\r\n"
            b"\troot@host.example.com, dave@example.com, erin@example.org\r\n"
            b"To: bob@host.example.com\r\n"
            b"\r\n"
            b"From: alice@host.example.com in the body\r\n"
        )
        queueId = yield self.send(message, sender="alice@a.b.example.com")
        data, record = self.stored()
        _, rest = self.splitTrace(data, queueId)
        self.assertEqual(
            rest,
            b'From: "Alice \xc3\x84. (host.dept.example.com)" <alice@dept.example.com>,\r\n'
            b"  Carol <carol@example.com> (at @x.example.com),\r\n"
            b"\troot@host.example.com, dave@example.com, erin@example.org\r\n"
            b"To: bob@host.example.com\r\n"
            b"\r\n"
            b"From: alice@host.example.com in the body\r\n",
        )
        self.assertEqual(record.sender, "alice@example.com")

    @defer.inlineCallbacks
    def test_exceptionAndOtherDomains(self):
        """Senders that are exceptions, or not in a subdomain, stay."""
        first = yield self.send(b"From: x@y\r\n\r\n", sender="root@host.example.com")
        second = yield self.send(b"\r\n", sender="alice@example.com")
        third = yield self.send(b"\r\n", sender="alice@notexample.com")
        fourth = yield self.send(b"\r\n", sender="")
        for queueId, sender in [
            (first, "root@host.example.com"),
            (second, "alice@example.com"),
            (third, "alice@notexample.com"),
            (fourth, ""),
        ]:
            _data, record = self.stored(queueId)
            self.assertEqual(record.sender, sender)


class PrivacyTests(HeadersTestCase):
    policies = {"privacy": True, "sessions": "authenticated", "remove": ["User-Agent"]}

    @defer.inlineCallbacks
    def test_authenticatedSubmission(self):
        """
        An authenticated submission's trace names neither the client's
        address, nor its HELO name, nor the TLS details, and keeps the BY
        host, the protocol keyword, the queue id and the date; rules apply.
        """
        message = (
            b"From: alice@example.org\r\nUser-Agent: Mutt\r\nDate: d\r\nMessage-ID: <m@x>\r\n"
            b"\r\nhello\r\n"
        )
        yield deferToThread(sendAuthenticated, self.setup, self.relayd.port("submission"), message)
        [queueId] = self.relayd.spool.entries("incoming")
        data, record = self.stored()
        trace, rest = self.splitTrace(data, queueId)
        m = re.fullmatch(
            rb"Received: from "
            + re.escape(HIDDEN_HOST.encode())
            + rb" \(authenticated submission\)\r\n"
            rb"\tby relayd\.test \(relayd\) with ESMTPSA id "
            + re.escape(queueId.encode())
            + rb";\r\n\t([^\r\n]+)\r\n",
            trace,
        )
        self.assertIsNotNone(m, trace)
        date = email.utils.parsedate_to_datetime(m.group(1).decode())
        self.assertLess(abs(date.timestamp() - time.time()), 600)
        self.assertEqual(rest, message.replace(b"User-Agent: Mutt\r\n", b""))
        for secret in (b"127.0.0.1", b"laptop.private.test", b"TLS", b"cipher"):
            self.assertNotIn(secret, data)
        self.assertEqual(record.client, "127.0.0.1")

    @defer.inlineCallbacks
    def test_unauthenticatedUntouched(self):
        """
        With C{sessions = "authenticated"}, a relayed message is stored
        exactly as it came, its trace included.
        """
        message = b"User-Agent: Mutt\r\n\r\nhello\r\n"
        queueId = yield self.send(message)
        data, _ = self.stored()
        trace, rest = self.splitTrace(data, queueId)
        self.assertEqual(rest, message)
        self.assertIn(b"from client.test ([127.0.0.1])", trace)


class AddressDomainsTests(unittest.TestCase):
    def domains(self, value):
        return [(value[a : b - 1], value[b:c]) for a, b, c in addressDomains(value)]

    def test_forms(self):
        """
        Addresses in angle brackets, bare, with quoted local parts, domain
        literals, groups and source routes; not in comments or quotes.
        """
        self.assertEqual(
            self.domains(b' "x@q.test" <a@b.test> (c@d.test), e@f.test'),
            [(b"a", b"b.test"), (b"e", b"f.test")],
        )
        self.assertEqual(
            self.domains(b' Team: "we ird"@g.test, <@r.test,@s.test:u@h.test>;'),
            [(b'"we ird"', b"g.test"), (b"u", b"h.test")],
        )
        self.assertEqual(self.domains(b" <x@[192.0.2.1]>"), [(b"x", b"[192.0.2.1]")])
        self.assertEqual(
            self.domains(b" (nested (a@b.test) c@d.test) e@f.test"), [(b"e", b"f.test")]
        )
        self.assertEqual(self.domains(b" Undisclosed recipients:;"), [])
        self.assertEqual(self.domains(b" broken@ <>"), [])


class MasqueradeRawTests(unittest.TestCase):
    def test_quotedException(self):
        """
        Exceptions compare the local part unquoted and without regard to
        case: C{"Root"@host} is C{root}; a quoted local part that is not
        an exception is masqueraded and kept quoted.
        """
        policy = HeaderRewrite(
            "relayd.test", masquerade=("example.com",), masqueradeExceptions=frozenset(["root"])
        )
        self.assertEqual(
            policy._masqueradeRaw(b'From: "Root"@h.example.com, "a b"@h.example.com\r\n'),
            b'From: "Root"@h.example.com, "a b"@example.com\r\n',
        )


def configWith(directory, options):
    setup = TestSetup(directory, chain=CHAIN, policies={"headers": options})
    return load(setup.configPath)


class ConfigTests(unittest.TestCase):
    def check(self, options, key, problem):
        directory = tempfile.mkdtemp(prefix="relayd-headers-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = configWith(directory, options)
        error = self.assertRaises(ConfigError, buildService, config, Clock())
        self.assertEqual(error.key, f"policies.headers.{key}")
        self.assertIn(problem, error.problem)
        self.assertIn(config.path, str(error))

    def test_errors(self):
        """Each bad option gives one error naming its key."""
        self.check({"remove": ["/[/"]}, "remove", "bad regular expression")
        self.check({"remove": ["Bad Name"]}, "remove", "not a field name or /regex/")
        self.check({"remove": "X-A"}, "remove", "must be a list")
        self.check({"replace": ["X-A"]}, "replace", "must be a table")
        self.check({"add": {"Bad:Name": "v"}}, "add", "bad header field name")
        self.check({"add": {"X-A": 1}}, "add", "must be a string")
        self.check({"masquerade": ["not a domain"]}, "masquerade", "not a domain")
        self.check({"masquerade_headers": ["a b"]}, "masquerade_headers", "not a field name")
        self.check({"sessions": "some"}, "sessions", 'must be "all" or "authenticated"')
        self.check({"privacy": "yes"}, "privacy", "must be true or false")
        self.check({"mystery": 1}, "mystery", "unknown option")

    def test_lineBreakInValue(self):
        """
        A value with a line break (TOML's \\n) is refused: it would end
        the field and let the config smuggle another.
        """
        context = PolicyContext("/etc/relayd/relayd.toml", "relayd.test", "headers")
        for key in ("replace", "add"):
            error = self.assertRaises(
                PolicyOptionError, HeaderRewrite.fromConfig, {key: {"X-A": "a\nBcc: x"}}, context
            )
            self.assertEqual(error.key, key)
            self.assertIn("must not contain CR or LF", error.problem)

    def test_loaded(self):
        """Good options give a L{HeaderRewrite} with them."""
        directory = tempfile.mkdtemp(prefix="relayd-headers-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = configWith(
            directory, {"remove": ["/^x-/"], "masquerade": ["Example.COM."], "privacy": True}
        )
        policies, _ = loadPolicies(config)
        policy = policies[-1]
        self.assertIsInstance(policy, HeaderRewrite)
        self.assertEqual(policy.hostname, "relayd.test")
        self.assertEqual(policy.masquerade, ("example.com",))
        self.assertTrue(policy.privacy and policy.addMissing and not policy.authenticatedOnly)
        self.assertTrue(policy.remove[0].matches("X-Foo"))
        self.assertFalse(policy.remove[0].matches("Subject"))
        self.assertEqual(policy.masqueradeDomain("a.example.com"), "example.com")
