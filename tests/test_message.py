"""
L{relayd.envelope.Headers} and L{relayd.envelope.Message}: the header
editing API of message policies, and the spool storing an edited header
section with the body bytes exactly as received.
"""

import os
import random
import re
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from relayd.envelope import (
    DEFAULT_HEADER_SIZE,
    FIRST_READ,
    Headers,
    HeaderSectionTooLarge,
    Message,
    _fields,
    _hops,
    _sectionEnd,
)
from relayd.queue.spool import Spool, envelopeRecord

RAW = (
    b"Received: from client.test ([127.0.0.1])\r\n"
    b"\tby relayd.test (relayd) with ESMTP id X; Sun, 22 Nov 2026 09:00:00 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: a folded\r\n"
    b"  subject \xc3\xa9\r\n"
    b"X-Trace :  odd spacing kept\r\n"
    b"\r\n"
    b"Body line 1\r\n"
    b"From: not a header, this is body\r\n"
)


class HeadersTests(unittest.TestCase):
    def test_parse(self):
        headers, offset = Headers.parse(RAW)
        self.assertEqual([f.name for f in headers], ["Received", "From", "Subject", "X-Trace"])
        self.assertEqual(RAW[offset:], b"Body line 1\r\nFrom: not a header, this is body\r\n")
        self.assertEqual(headers.get("subject"), "a folded  subject \xe9")
        self.assertEqual(headers.get("x-trace"), "odd spacing kept")
        self.assertEqual(headers.toBytes() + b"\r\n", RAW[:offset])
        self.assertIn("FROM", headers)
        self.assertNotIn("To", headers)

    def test_parseStopsAtNonHeaderLine(self):
        raw = b"Received: x\r\nnot a header line\r\nmore\r\n"
        headers, offset = Headers.parse(raw)
        self.assertEqual(len(headers), 1)
        self.assertEqual(raw[offset:], b"not a header line\r\nmore\r\n")

    def test_edits(self):
        headers, _ = Headers.parse(RAW)
        self.assertFalse(headers.changed)
        headers.add("Message-ID", "<1@x>")
        headers.add("X-Top", "1", top=True)
        self.assertEqual(headers.replace("subject", "new"), 1)
        self.assertEqual(headers.remove("x-trace"), 1)
        self.assertEqual(headers.remove(lambda f: f.name == "Nope"), 0)
        self.assertTrue(headers.changed)
        self.assertEqual(
            headers.toBytes(),
            b"X-Top: 1\r\n"
            + RAW[: RAW.index(b"Subject")]
            + b"Subject: new\r\nMessage-ID: <1@x>\r\n",
        )

    def test_replaceAddsMissing(self):
        headers, _ = Headers.parse(b"A: 1\r\n\r\n")
        self.assertEqual(headers.replace("B", "2"), 0)
        self.assertEqual(headers.replace("C", "3", addMissing=False), 0)
        self.assertEqual(headers.toBytes(), b"A: 1\r\nB: 2\r\n")

    def test_noSmuggling(self):
        """
        Values with line breaks and bad names are refused, so a policy
        cannot add a second field or end the header section by mistake.
        """
        headers, _ = Headers.parse(RAW)
        for name, value in [
            ("X", "a\r\nBcc: victim@example.net"),
            ("X", "a\nb"),
            ("Bad Name", "v"),
            ("Bad:Name", "v"),
            ("", "v"),
        ]:
            self.assertRaises(ValueError, headers.add, name, value)
        self.assertRaises(ValueError, headers.addRaw, b"X: 1\r\nY: 2\r\n")
        self.assertRaises(ValueError, headers.addRaw, b"X: 1")
        self.assertRaises(ValueError, headers.setRaw, 0, b"\r\n")
        self.assertFalse(headers.changed)

    def test_nothingRelaydWouldRefuse(self):
        """
        No NUL and no line over 998 octets (RFC 5322 section 2.1.1): relayd
        refuses both from clients, so a policy must not be able to add them.
        A long value folded by the policy goes in with addRaw.
        """
        headers, _ = Headers.parse(RAW)
        longest = "x" * (998 - len("X: "))
        headers.add("X", longest)
        self.assertRaises(ValueError, headers.add, "X", longest + "x")
        self.assertRaises(ValueError, headers.replace, "Subject", longest + "x")
        self.assertRaises(ValueError, headers.add, "X", "a\0b")
        self.assertRaises(ValueError, headers.addRaw, b"X: a\0b\r\n")
        self.assertRaises(ValueError, headers.addRaw, b"X: " + b"y" * 996 + b"\r\n")
        self.assertRaises(ValueError, headers.setRaw, 0, b"X: 1\r\n " + b"y" * 998 + b"\r\n")
        folded = b"X: " + b"y" * 995 + b"\r\n " + b"z" * 997 + b"\r\n"
        headers.addRaw(folded)
        self.assertEqual(headers.fields[-1].raw, folded)
        self.assertEqual(
            next(f.raw for f in headers if f.name == "X"), b"X: " + longest.encode() + b"\r\n"
        )

    def test_addRawFolded(self):
        headers, _ = Headers.parse(b"A: 1\r\n\r\n")
        headers.addRaw(b"DKIM-Signature: v=1;\r\n b=xyz\r\n", top=True)
        self.assertEqual(headers.get("dkim-signature"), "v=1; b=xyz")
        self.assertEqual(headers.toBytes(), b"DKIM-Signature: v=1;\r\n b=xyz\r\nA: 1\r\n")


class MessageTests(unittest.TestCase):
    def message(self, raw, maxHeaderSize=DEFAULT_HEADER_SIZE):
        fd, path = tempfile.mkstemp()
        os.write(fd, raw)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        return Message(path, len(raw), maxHeaderSize)

    def test_unchanged(self):
        m = self.message(RAW)
        self.assertEqual(m.headerBytes() + b"".join(m.iterBody(chunkSize=5)), RAW)
        self.assertFalse(m.changed)
        self.assertEqual(m.size, len(RAW))

    def test_changedKeepsBody(self):
        m = self.message(RAW)
        m.headers.add("Date", "Sun, 22 Nov 2026 09:00:01 +0000")
        expected = RAW.replace(b"\r\n\r\n", b"\r\nDate: Sun, 22 Nov 2026 09:00:01 +0000\r\n\r\n", 1)
        self.assertEqual(m.asBytes(), expected)
        self.assertEqual(m.size, len(expected))

    def test_noSeparator(self):
        """A message whose header section is not ended by an empty line."""
        raw = b"Received: x\r\nbody without separator\r\n"
        m = self.message(raw)
        m.headers.add("X", "1")
        self.assertEqual(m.asBytes(), b"Received: x\r\nX: 1\r\nbody without separator\r\n")

    def test_emptyHeaderSection(self):
        m = self.message(b"\r\nbody\r\n")
        m.headers.add("X", "1")
        self.assertEqual(m.asBytes(), b"X: 1\r\n\r\nbody\r\n")

    def test_hasSeparator(self):
        """
        L{Message.hasSeparator} tells whether an empty line ends the header
        section, whatever ended it and whether the headers were edited.
        """
        for raw, expected in [
            (RAW, True),
            (b"\r\nbody\r\n", True),
            (b"Received: x\r\n\r\n", True),
            (b"Received: x\r\nbody without separator\r\n", False),
            (b"Received: x\r\nSubject: only headers\r\n", False),
            (b"", False),
        ]:
            m = self.message(raw)
            self.assertEqual(m.hasSeparator, expected, raw)
            m.headers.add("X", "1")
            self.assertEqual(m.hasSeparator, expected, raw)

    def test_mayHaveField(self):
        """
        L{Message.mayHaveField} is False only when the field cannot be in
        the header section (its name is nowhere in it, any case), never
        for a field that is there, and follows edits once parsed.
        """
        raw = b"Subject: hi\r\ntls-required: No\r\n\r\nTLS-Required: in the body\r\n"
        m = self.message(raw)
        self.assertTrue(m.mayHaveField("TLS-Required"))
        self.assertFalse(m.mayHaveField("X-Absent"))
        m = self.message(b"Subject: hi\r\n\r\nTLS-Required: No\r\n")
        self.assertFalse(m.mayHaveField("TLS-Required"))
        m.headers.add("TLS-Required", "No")
        self.assertTrue(m.mayHaveField("TLS-Required"))
        m = self.message(b"Subject: TLS-Required talk\r\n\r\n")
        self.assertTrue(m.mayHaveField("TLS-Required"))  # maybe: ask headers
        self.assertEqual(m.headers.getAll("TLS-Required"), [])

    def test_hopCount(self):
        """Received: fields of the header section, in any case; not the body's."""
        raw = b"Received: a\r\nreceived : b\r\n\tfolded\r\nX: 1\r\n\r\nReceived: body\r\n"
        self.assertEqual(self.message(raw).hopCount, 2)
        self.assertEqual(self.message(b"\r\nReceived: body\r\n").hopCount, 0)


def lineByLine(data):
    """
    The obvious reading of a header section, one line at a time (what
    relayd did before it used C{re}): the fields as (name, raw), the body's
    offset, and whether the section ended within C{data}.
    """
    fields = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        line = data[pos : end + 2]
        if line == b"\r\n":
            return fields, end + 2, True
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        elif re.match(rb"[!-9;-~]+[ \t]*:", line):
            fields.append((line.split(b":", 1)[0].rstrip(b" \t").decode("ascii"), line))
        else:
            return fields, pos, True
        pos = end + 2
    return fields, pos, False


class SectionTests(unittest.TestCase):
    def test_sameAsLineByLine(self):
        """
        The one-pass reading (where the section ends, its fields, its hop
        count) agrees with the line-by-line one on many random inputs made
        of the pieces that matter: fields, continuations, empty lines, body
        lines, lone CR and LF, half a field name.
        """
        pieces = [
            b"From: a\r\n",
            b"Received: x\r\n",
            b"received :y\r\n",
            b" cont\r\n",
            b"\tcont\r\n",
            b"\r\n",
            b"body\r\n",
            b"X",
            b":",
            b" ",
            b"\r",
            b"\n",
            b"Re",
            b"ceived:",
        ]
        randomness = random.Random(5321)
        for _ in range(20000):
            data = b"".join(randomness.choice(pieces) for _ in range(randomness.randint(0, 12)))
            fields, offset, ended = lineByLine(data)
            self.assertEqual(_sectionEnd(data), (offset, ended), data)
            section = data[:offset]
            self.assertEqual([(f.name, f.raw) for f in _fields(section)], fields, data)
            hops = sum(1 for name, _ in fields if name.lower() == "received")
            self.assertEqual(_hops(section), hops, data)


PAD = b"X-Pad: " + b"p" * 90 + b"\r\n"


class HeaderBoundTests(unittest.TestCase):
    """
    L{Message} gives the whole header section or refuses: never the part
    that fits in its bound.
    """

    message = MessageTests.message

    def assertRefused(self, m):
        self.assertTrue(m.headerTooLarge)
        for read in (
            lambda: m.headers,
            lambda: m.bodyOffset,
            lambda: m.hasSeparator,
            lambda: m.hopCount,
            m.headerBytes,
            m.asBytes,
        ):
            self.assertRaises(HeaderSectionTooLarge, read)
        self.assertFalse(m.changed)

    def test_fromPastTheBound(self):
        """
        A From: after more header than the bound: refused, where a parse
        of the first bound octets would have shown no From: at all.
        """
        raw = PAD * 1000 + b"From: ceo@example.com\r\n\r\nbody\r\n"
        self.assertRefused(self.message(raw, 64 * 1024))
        m = self.message(raw, 128 * 1024)
        self.assertFalse(m.headerTooLarge)
        self.assertEqual(m.headers.get("From"), "ceo@example.com")
        self.assertEqual(m.asBytes(), raw)

    def test_exactlyTheBound(self):
        """
        The bound counts the header section with the empty line ending it:
        a section of exactly the bound is read, one octet more is not.
        """
        head = PAD * 20 + b"From: a@example.com\r\n\r\n"
        raw = head + b"body\r\n" * 500
        m = self.message(raw, len(head))
        self.assertEqual((m.bodyOffset, m.headers.get("from")), (len(head), "a@example.com"))
        self.assertRefused(self.message(raw, len(head) - 1))

    def test_endedByEndOfMessage(self):
        """A message that is all header section: its size is what counts."""
        raw = PAD * 20
        m = self.message(raw, len(raw))
        self.assertEqual((len(m.headers), m.hasSeparator), (20, False))
        self.assertRefused(self.message(raw, len(raw) - 1))

    def test_endedByBodyLine(self):
        """A line that is no field ends the section, as in L{Headers.parse}."""
        head = PAD * 20
        raw = head + b"not a field\r\n" + PAD * 1000
        m = self.message(raw, len(head))
        self.assertEqual((len(m.headers), m.bodyOffset), (20, len(head)))
        self.assertRefused(self.message(raw, len(head) - 1))

    def test_default(self):
        """1 MiB by default, as relayd's [limits] header_size."""
        line = b"X-Pad: " + b"p" * 900 + b"\r\n"
        raw = line * (DEFAULT_HEADER_SIZE // len(line) + 1) + b"From: x@example.com\r\n\r\n"
        fd, path = tempfile.mkstemp()
        os.write(fd, raw)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.assertRefused(Message(path, len(raw)))


def messageWithHead(self, raw, maxHeaderSize=DEFAULT_HEADER_SIZE):
    """L{Message} given the first octets, as the receiving session gives them."""
    fd, path = tempfile.mkstemp()
    os.write(fd, raw)
    os.close(fd)
    self.addCleanup(os.unlink, path)
    return Message(path, len(raw), maxHeaderSize, raw[:FIRST_READ])


class HeaderBoundFromHeadTests(HeaderBoundTests):
    """The same bounds when the header section comes from the kept head."""

    message = messageWithHead


class HeadTests(unittest.TestCase):
    def test_headIsNotReadBack(self):
        """With the head given, a header section within it needs no file."""
        m = Message("/nonexistent/relayd-test", len(RAW), head=RAW)
        self.assertEqual(m.headers.get("From"), "Alice <alice@example.org>")
        self.assertEqual(m.hopCount, 1)
        self.assertFalse(m.headerTooLarge)

    def test_sameAsFromTheFile(self):
        for raw in (RAW, b"\r\nbody\r\n", PAD * 2000 + b"\r\nbody\r\n", PAD * 20):
            fromFile = MessageTests.message(self, raw)
            fromHead = messageWithHead(self, raw)
            self.assertEqual(
                (fromFile.bodyOffset, fromFile.hopCount, fromFile.headerBytes()),
                (fromHead.bodyOffset, fromHead.hopCount, fromHead.headerBytes()),
            )

    def test_incomingKeepsTheHead(self):
        """The spool's incoming message keeps its first FIRST_READ octets."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        spool = Spool(directory, 0, reactor, threads=1)
        spool.startService()
        self.addCleanup(spool.stopService)
        incoming = spool.openMessage(spool.newQueueId())
        self.addCleanup(incoming.discard)
        chunks = [bytes([65 + i % 26]) * 1000 for i in range(100)]
        for chunk in chunks:
            incoming.write(chunk)
        self.assertEqual(incoming.head, b"".join(chunks)[:FIRST_READ])


class SpoolRewriteTests(unittest.TestCase):
    """The spool stores the edited header followed by the received body."""

    @defer.inlineCallbacks
    def test_commitWithReplacedHeader(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        spool = Spool(directory, 0, reactor, threads=1)
        spool.startService()
        self.addCleanup(spool.stopService)
        queueId = spool.newQueueId()
        incoming = spool.openMessage(queueId)
        body = b"x" * 200000 + b"\r\n"
        incoming.write(RAW + body)
        incoming.flush()
        m = Message(incoming.path, incoming.size)
        m.headers.remove("x-trace")
        incoming.replaceHeader(m.headerBytes(), m.bodyOffset)
        expected = RAW.replace(b"X-Trace :  odd spacing kept\r\n", b"") + body
        self.assertEqual(incoming.size, len(expected))
        record = envelopeRecord(
            queueId=queueId,
            sender="a@example.org",
            recipients=["b@example.net"],
            arrival=0.0,
            size=incoming.size,
            body="8BITMIME",
            client="127.0.0.1",
            helo="client.test",
            user=None,
            listener="relay",
        )
        yield spool.commit(incoming, record)
        self.assertEqual(spool.readData(queueId), expected)
        self.assertEqual(os.listdir(os.path.join(directory, "tmp")), [])

    @defer.inlineCallbacks
    def test_replaceHeaderChecksOffset(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        spool = Spool(directory, 0, reactor, threads=1)
        spool.startService()
        self.addCleanup(spool.stopService)
        incoming = spool.openMessage(spool.newQueueId())
        self.addCleanup(incoming.discard)
        incoming.write(b"A: 1\r\n\r\n")
        self.assertRaises(ValueError, incoming.replaceHeader, b"B: 2\r\n\r\n", 100)
        yield None
