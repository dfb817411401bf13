"""
The outbound client's pure parts: dot-stuffing across chunk boundaries
(DESIGN section 1: the stock client can end the data early there), reply
parsing and EHLO keywords.  Sessions over real sockets are in
test_delivery.py.
"""

import io
import random

from twisted.internet.task import Clock
from twisted.trial import unittest

from relayd.delivery.client import CHUNK_SIZE, DotStuffer, Reply, _extensions, _MessageProducer
from relayd.timeouts import IdleTimer


def reference(message: bytes) -> bytes:
    """Dot-stuffing the obvious way: split into lines, stuff, join, end."""
    if not message:
        return b".\r\n"
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n"


def stuffInChunks(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = []
    last = 0
    for cut in [*sorted(cuts), len(message)]:
        out.append(stuffer.encode(message[last:cut]))
        last = cut
    out.append(stuffer.finish())
    return b"".join(out)


def endsOnlyAtEnd(testCase: unittest.TestCase, wire: bytes) -> None:
    """The end of data appears once, at the very end (the DATA line is CRLF-ended)."""
    stream = b"\r\n" + wire
    testCase.assertEqual(stream.find(b"\r\n.\r\n"), len(stream) - 5)


class DotStufferTests(unittest.TestCase):
    def check(self, message: bytes, cuts: list[int]) -> None:
        wire = stuffInChunks(message, cuts)
        self.assertEqual(wire, reference(message), f"cuts={cuts}")
        endsOnlyAtEnd(self, wire)

    def test_firstLineDot(self):
        """A "." on the very first line is stuffed: the message starts a line."""
        self.check(b".\r\n", [])
        self.assertEqual(stuffInChunks(b".\r\n", []), b"..\r\n.\r\n")
        self.assertEqual(stuffInChunks(b".hidden\r\nx\r\n", []), b"..hidden\r\nx\r\n.\r\n")

    def test_firstChunkIsJustDot(self):
        self.assertEqual(stuffInChunks(b".\r\n", [1]), b"..\r\n.\r\n")
        self.assertEqual(stuffInChunks(b".\r\n", [1, 2]), b"..\r\n.\r\n")

    def test_emptyMessage(self):
        self.assertEqual(DotStuffer().finish(), b".\r\n")

    def test_notEndingInCRLF(self):
        """CRLF is added before the final dot when the message lacks one."""
        self.assertEqual(stuffInChunks(b"abc", []), b"abc\r\n.\r\n")
        self.assertEqual(stuffInChunks(b"abc\r\n.", []), b"abc\r\n..\r\n.\r\n")
        self.assertEqual(stuffInChunks(b"abc\r\n.", [5]), b"abc\r\n..\r\n.\r\n")
        self.assertEqual(stuffInChunks(b"abc\r", []), b"abc\r\r\n.\r\n")

    def test_crAtChunkEnd(self):
        """A chunk ending in CR, the next starting with LF and a dot."""
        stuffer = DotStuffer()
        out = stuffer.encode(b"a\r") + stuffer.encode(b"\n.b\r\n") + stuffer.finish()
        self.assertEqual(out, b"a\r\n..b\r\n.\r\n")
        stuffer = DotStuffer()
        out = (
            stuffer.encode(b"a\r")
            + stuffer.encode(b"\n")
            + stuffer.encode(b".")
            + stuffer.encode(b"\r\n")
            + stuffer.finish()
        )
        self.assertEqual(out, b"a\r\n..\r\n.\r\n")

    def test_crNotFollowedByLF(self):
        """A CR then a chunk starting "\\r\\n." (bare CR before CRLF)."""
        self.check(b"a\r\r\n.b\r\n", [2])
        self.check(b"a\r\r\n.b\r\n", [3])

    def test_emptyChunks(self):
        stuffer = DotStuffer()
        out = stuffer.encode(b"a\r\n") + stuffer.encode(b"") + stuffer.encode(b".x\r\n")
        self.assertEqual(out + stuffer.finish(), b"a\r\n..x\r\n.\r\n")

    def test_everySplitPoint(self):
        """Every one- and two-cut chunking of a message full of dot lines."""
        message = b".a\r\n.\r\n..b\r\nc.\r\n\r\n.\r\n.d\r\ne"
        for i in range(len(message) + 1):
            self.check(message, [i])
            for j in range(i, len(message) + 1):
                self.check(message, [i, j])

    def test_sixteenKiBEdges(self):
        """
        A line starting with "." at every offset around 16 KiB and 64 KiB
        chunk edges (Twisted's FileSender reads 16 KiB; relayd reads
        L{CHUNK_SIZE}).
        """
        for edge in (16384, 32768, CHUNK_SIZE):
            for offset in range(-4, 5):
                position = edge + offset  # where the "." goes
                filler = b"x" * 70 + b"\r\n"
                head = (filler * (position // len(filler) + 1))[: position - 2] + b"\r\n"
                message = head + b".line\r\n.\r\ntail\r\n"
                self.assertEqual(message[position : position + 1], b".")
                for size in (16384, CHUNK_SIZE):
                    cuts = list(range(size, len(message), size))
                    self.check(message, cuts)
                self.check(message, [position - 2, position - 1, position, position + 1])

    def test_reuseAfterFinish(self):
        stuffer = DotStuffer()
        stuffer.encode(b"abc")
        self.assertEqual(stuffer.finish(), b"\r\n.\r\n")
        self.assertEqual(stuffer.encode(b".x\r\n") + stuffer.finish(), b"..x\r\n.\r\n")

    def test_randomChunkings(self):
        """Property check against the reference for random messages and cuts."""
        rng = random.Random(5321)
        tokens = [
            b"\r\n",
            b"\r\n",
            b"\r\n.",
            b".",
            b"..",
            b"a",
            b"bc",
            b"\xff",
            b"\r",
            b"\n",
            b" ",
        ]
        for _ in range(3000):
            message = b"".join(rng.choice(tokens) for _ in range(rng.randint(0, 40)))
            cuts = sorted(rng.randint(0, len(message)) for _ in range(rng.randint(0, 8)))
            wire = stuffInChunks(message, cuts)
            self.assertEqual(wire, reference(message), (message, cuts))
            endsOnlyAtEnd(self, wire)

    def test_largeRandomMessages(self):
        rng = random.Random(6152)
        for _ in range(20):
            lines = []
            for _ in range(rng.randint(1, 3000)):
                line = bytes(rng.choice(b"..ab\xe9 ") for _ in range(rng.randint(0, 120)))
                lines.append(line)
            message = b"\r\n".join(lines) + rng.choice([b"", b"\r\n"])
            cuts = sorted(rng.sample(range(len(message) + 1), min(len(message) + 1, 30)))
            self.assertEqual(stuffInChunks(message, cuts), reference(message))


class ReplyTests(unittest.TestCase):
    def test_enhancedCode(self):
        reply = Reply.parse(["550 5.1.1 <a@example.net>: Recipient address rejected"])
        self.assertEqual(
            (reply.code, reply.enhanced, reply.text),
            (550, "5.1.1", "<a@example.net>: Recipient address rejected"),
        )
        self.assertTrue(reply.remote)

    def test_noEnhancedCode(self):
        """Without one, the class default X.0.0 (RFC 3463 section 3.1)."""
        reply = Reply.parse(["451 try later"])
        self.assertEqual((reply.enhanced, reply.text), ("4.0.0", "try later"))

    def test_enhancedClassMustMatch(self):
        reply = Reply.parse(["451 5.1.1 odd"])
        self.assertEqual((reply.enhanced, reply.text), ("4.0.0", "5.1.1 odd"))

    def test_multiline(self):
        reply = Reply.parse(["550-5.7.1 first", "550-5.7.1 second", "550 5.7.1 third"])
        self.assertEqual((reply.enhanced, reply.text), ("5.7.1", "first second third"))

    def test_bareCode(self):
        reply = Reply.parse(["250"])
        self.assertEqual((reply.code, reply.enhanced, reply.text), (250, "2.0.0", ""))

    def test_local(self):
        reply = Reply.local(451, "4.4.1", "connect to x: refused")
        self.assertFalse(reply.remote)
        self.assertEqual(str(reply), "451 4.4.1 connect to x: refused")


class ExtensionTests(unittest.TestCase):
    def test_keywords(self):
        found = _extensions(
            ("PIPELINING", "size 1000", "AUTH PLAIN LOGIN", "AUTH=CRAM-MD5", "8BITMIME")
        )
        self.assertEqual(found["SIZE"], "1000")
        self.assertEqual(found["PIPELINING"], "")
        self.assertEqual(found["AUTH"].split(), ["PLAIN", "LOGIN", "CRAM-MD5"])
        self.assertIn("8BITMIME", found)


class ReplyQuotingTests(unittest.TestCase):
    """relayd quotes a peer's reply as it came, never with codes it made up."""

    def test_noEnhancedCodeAdded(self):
        reply = Reply.parse(["500 no"])
        self.assertEqual(str(reply), "500 5.0.0 no")
        self.assertEqual(reply.quoted, "500 no")

    def test_multiLine(self):
        reply = Reply.parse(["554-5.7.1 first", "554 5.7.1 second"])
        self.assertEqual(reply.quoted, "554-5.7.1 first 554 5.7.1 second")

    def test_bareCode(self):
        self.assertEqual(Reply.parse(["421"]).quoted, "421")

    def test_localOutcome(self):
        reply = Reply.local(451, "4.4.1", "connect to x[192.0.2.1]:25: Connection refused")
        self.assertEqual(reply.quoted, str(reply))


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.producer = True

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def unregisterProducer(self) -> None:
        self.producer = False


class _Client:
    """What L{_MessageProducer} asks of its L{SMTPClient}."""

    def __init__(self) -> None:
        self.transport = _RecordingTransport()
        self.sent = False
        self._idle = IdleTimer(Clock(), lambda: None)

    def _dataSent(self) -> None:
        self.sent = True

    def _readFailed(self, error: OSError) -> None:
        raise AssertionError(error)


class MessageProducerTests(unittest.TestCase):
    """
    L{_MessageProducer} writes the message dot-stuffed, and the last chunk
    together with the final dot: two writes let Nagle's algorithm hold the
    dot until the next hop acknowledged the chunk (its delayed ACK), tens
    of milliseconds per message.
    """

    def produce(self, message: bytes) -> _Client:
        client = _Client()
        producer = _MessageProducer(client, io.BufferedReader(io.BytesIO(message)))  # type: ignore[arg-type]
        for _ in range(len(message) // CHUNK_SIZE + 3):
            if not client.transport.producer:
                break
            producer.resumeProducing()
        self.assertTrue(client.sent)
        self.assertEqual(b"".join(client.transport.writes), reference(message))
        return client

    def test_smallMessageOneWrite(self) -> None:
        message = b"Subject: x\r\n\r\n.dot\r\nbody\r\n"
        self.assertEqual(self.produce(message).transport.writes, [reference(message)])

    def test_lastChunkCarriesTheDot(self) -> None:
        for size in (CHUNK_SIZE - 1, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 100):
            message = (b"x" * 98 + b"\r\n") * (size // 100) + b"y" * (size % 100)
            writes = self.produce(message).transport.writes
            self.assertGreater(len(writes[-1]), len(b"\r\n.\r\n"), size)
            self.assertTrue(writes[-1].endswith(b"\r\n.\r\n"), size)

    def test_edgeCases(self) -> None:
        """Empty, exactly one chunk, a dot line at the very end."""
        for message in (b"", b"z" * CHUNK_SIZE, b"a\r\n.\r\n", b"a\r\n."):
            self.produce(message)
