"""
relayd's C{Received:} field stays valid RFC 5322 whatever the client sends
as its EHLO name (DESIGN section 4, rule 9), over real sockets against an
in-process relayd: each nasty name is sent, the message spooled, and the
stored field parsed by a strict reader of RFC 5322 section 3.6.7's grammar
(comments balanced, every token a word, domain, domain literal or angle
address, then C{;} and a date) as well as by the C{email} package.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import email.utils
import re
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.queue.record import readData
from relayd.testing import InProcessRelayd, TestSetup, WireClient

ATEXT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
DTEXT = re.compile(r"[!-Z^-~]*")
ADDR_SPEC = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r'|"(?:[ !#-\[\]-~]|\\[ -~])*")'
    r"@(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[!-Z^-~]*\])"
)

NASTY = [
    "x(",
    "a)b",
    '"q"',
    "x;y",
    "[1.2.3.4",
    "1.2.3.4]",
    "a\\b",
    "((x)",
    "<x>",
    "a@b",
    "a:b,c",
    "..",
    "caf\u00e9.example",
    "\u00ff" * 3,
    "l" * 300,
]


class ReceivedSyntaxError(ValueError):
    pass


def tokens(value: str) -> list[tuple[str, str]]:
    """
    Split an unfolded C{Received:} body into RFC 5322 lexical tokens:
    C{("comment", ...)}, C{("word", ...)} (atom or dot-atom),
    C{("quoted", ...)}, C{("literal", "[...]")}, C{("angle", "<...>")},
    C{(";", ";")}, then C{("date", ...)} for the rest.  Anything else
    before the C{;} is a syntax error.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in " \t":
            i += 1
        elif c == "(":
            start, depth = i, 0
            while True:
                if i >= n:
                    raise ReceivedSyntaxError(f"unterminated comment from {value[start:]!r}")
                ch = value[i]
                if ch == "\\":
                    i += 2
                    continue
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                elif not (" " <= ch <= "~" or ch == "\t"):
                    raise ReceivedSyntaxError(f"{ch!r} in a comment")
                i += 1
            out.append(("comment", value[start:i]))
        elif c == '"':
            m = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~])*"').match(value, i)
            if m is None:
                raise ReceivedSyntaxError(f"bad quoted string at {value[i:]!r}")
            out.append(("quoted", m.group()))
            i = m.end()
        elif c == "[":
            m = DTEXT.match(value, i + 1)
            assert m is not None
            if value[m.end() : m.end() + 1] != "]":
                raise ReceivedSyntaxError(f"unterminated domain literal at {value[i:]!r}")
            out.append(("literal", value[i : m.end() + 1]))
            i = m.end() + 1
        elif c == "<":
            end = value.find(">", i)
            if end < 0 or not ADDR_SPEC.fullmatch(value[i + 1 : end]):
                raise ReceivedSyntaxError(f"bad angle-addr at {value[i:]!r}")
            out.append(("angle", value[i : end + 1]))
            i = end + 1
        elif c == ";":
            # The date-time follows: checked by checkReceived.
            out.append((";", ";"))
            out.append(("date", value[i + 1 :].strip()))
            break
        elif c in ATEXT or c == ".":
            start = i
            while i < n and (value[i] in ATEXT or value[i] == "."):
                i += 1
            word = value[start:i]
            if "" in word.split("."):
                raise ReceivedSyntaxError(f"{word!r} is not a dot-atom")
            out.append(("word", word))
        else:
            raise ReceivedSyntaxError(f"{c!r} where a token should start: {value[i:]!r}")
    return out


def checkReceived(field: str, recipient: str) -> tuple[str, datetime.datetime]:
    """
    Check one relayd C{Received:} field (unfolded, without its name) and
    return the FROM name and the date.
    """
    toks = tokens(field)
    kinds = [k for k, _ in toks]
    if kinds.count(";") != 1:
        raise ReceivedSyntaxError(f"{kinds.count(';')} semicolons: {toks}")
    semi = kinds.index(";")
    trace = [(k, v) for k, v in toks[:semi] if k != "comment"]
    words = [v for _, v in trace]
    if len(words) != 10 or words[0::2] != ["from", "by", "with", "id", "for"]:
        raise ReceivedSyntaxError(f"clauses lost: {words}")
    if words[3:8:2] != ["relayd.test", "ESMTP", words[7]] or trace[9] != (
        "angle",
        f"<{recipient}>",
    ):
        raise ReceivedSyntaxError(f"clauses changed: {words}")
    if trace[1][0] not in ("word", "literal"):
        raise ReceivedSyntaxError(f"FROM is a {trace[1][0]}")
    return words[1], email.utils.parsedate_to_datetime(toks[semi + 1][1])


class ReceivedTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-received-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, modes=("relay",))
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_checkerCatchesTheBrokenForms(self):
        """The checker itself refuses what the issue saw, and takes the good form."""
        date = "Thu, 03 Dec 2026 08:00:00 +0000"
        good = (
            "from client.test ([127.0.0.1]) by relayd.test (relayd) with ESMTP id Q1 "
            f"for <b@example.org>; {date}"
        )
        self.assertEqual(checkReceived(good, "b@example.org")[0], "client.test")
        for bad in ["x(", '"q', "x;y", "[1.2.3.4", "a\\b"]:
            with self.assertRaises(ReceivedSyntaxError, msg=bad):
                checkReceived(good.replace("client.test", bad), "b@example.org")

    @defer.inlineCallbacks
    def test_nastyEhloNames(self):
        """
        Every EHLO argument gives a Received: field whose FROM is one token
        and whose BY, WITH, ID, FOR clauses and date survive, dated +0000;
        the log's helo= keeps what the client sent (printable).
        """

        def dialogue():
            client = WireClient(self.relayd.port("relay"))
            try:
                assert client.reply()[0] == 220
                codes = []
                for i, name in enumerate(NASTY):
                    client.send(b"EHLO " + name.encode("utf-8") + b"\r\n")
                    ehlo = client.reply()[0]
                    mail = client.command("MAIL FROM:<a@example.org>")[0]
                    rcpt = client.command(f"RCPT TO:<b{i}@example.org>")[0]
                    data = client.command("DATA")[0]
                    client.send(b"Subject: nasty\r\n\r\nhi\r\n.\r\n")
                    codes.append((name, ehlo, mail, rcpt, data, client.reply()[0]))
                return codes
            finally:
                client.close()

        codes = yield deferToThread(dialogue)
        self.assertEqual([c[1:] for c in codes], [(250, 250, 250, 354, 250)] * len(NASTY))
        spool = self.relayd.spool
        stored = {}
        for queueId in spool.entries("incoming"):
            record, path = spool.load(queueId)
            stored[record.recipients[0].address] = (record, readData(path))
        self.assertEqual(len(stored), len(NASTY))
        for i, name in enumerate(NASTY):
            record, data = stored[f"b{i}@example.org"]
            message = email.message_from_bytes(data, policy=email.policy.default)
            [received] = message.get_all("Received")
            unfolded = re.sub(r"\r?\n[ \t]", " ", str(received))
            with self.subTest(name=name):
                fromName, date = checkReceived(unfolded, f"b{i}@example.org")
                self.assertEqual(date.utcoffset(), datetime.timedelta(0))
                self.assertTrue(unfolded.endswith("+0000"), unfolded)
                self.assertLessEqual(len(fromName), 255)
                self.assertEqual(message["Subject"], "nasty")
                # The envelope and the log keep the name as sent (printable).
                sent = name.encode("utf-8").decode("latin-1")
                printable = "".join(c if "!" <= c <= "~" else "?" for c in sent)
                self.assertEqual(record.helo, printable[:255])
        logged = [formatEvent(e) for e in self.events if e.get("helo") is not None]
        self.assertTrue(any("helo=x(" in line for line in logged), logged[:3])

    @defer.inlineCallbacks
    def test_addressLiteralAndNameKept(self):
        """
        A plain name and an address literal go into FROM unchanged; the date
        is in UTC written C{+0000} (C{-0000} would mean "zone unknown",
        RFC 5322 section 3.3).
        """

        def dialogue():
            client = WireClient(self.relayd.port("relay"))
            try:
                client.reply()
                for name in ["mail.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]"]:
                    client.command(f"EHLO {name}")
                    client.command("MAIL FROM:<a@example.org>")
                    client.command(f"RCPT TO:<{name.strip('[]').replace(':', '-')}@example.org>")
                    client.command("DATA")
                    client.send(b"Subject: ok\r\n\r\nhi\r\n.\r\n")
                    client.reply()
            finally:
                client.close()

        yield deferToThread(dialogue)
        spool = self.relayd.spool
        names = set()
        for queueId in spool.entries("incoming"):
            record, path = spool.load(queueId)
            message = email.message_from_bytes(readData(path), policy=email.policy.default)
            unfolded = re.sub(r"\r?\n[ \t]", " ", str(message["Received"]))
            self.assertTrue(unfolded.endswith(" +0000"), unfolded)
            names.add(checkReceived(unfolded, record.recipients[0].address)[0])
        self.assertEqual(names, {"mail.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]"})
