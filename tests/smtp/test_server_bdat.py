"""
CHUNKING (RFC 3030) over real sockets: relayd in the test process on
127.0.0.1, a raw socket client in a thread (Python's smtplib has no BDAT,
and neither has swaks), sending exactly the bytes given.
"""

import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from relayd.queue.record import readData
from tests.smtp.test_server import RelaydTestCase

MAIL = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"


def bdat(content: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


class BdatTests(RelaydTestCase):
    sections = {"limits": {"message_size": 20000}}

    def stored(self) -> list[bytes]:
        return [readData(path) for _, path in self.spooled()]

    @defer.inlineCallbacks
    def test_pipelinedChunksByteExact(self):
        """
        EHLO offers CHUNKING; three chunks pipelined in one write with the
        rest of the transaction; the message is stored as sent: dots,
        8-bit octets and a 998-octet line included, a CRLF split between
        chunks.
        """
        body = (
            b"Subject: chunks\r\n\r\n.leading dot\r\n.\r\n..\r\n\xe9\xe8 8-bit\r\n"
            + b"x" * 998
            + b"\r\nlast\r\n"
        )
        chunks = [body[:25], body[25:-7], body[-7:]]
        assert chunks[1].endswith(b"\r")

        def dialogue():
            c = self.connect()
            ehlo = c.command("EHLO client.test")
            c.send(
                MAIL + bdat(chunks[0]) + bdat(chunks[1]) + bdat(chunks[2], last=True) + b"NOOP\r\n"
            )
            return ehlo, [c.reply() for _ in range(6)]

        (_, features), replies = yield self.run_(dialogue)
        self.assertIn("CHUNKING", features)
        self.assertEqual([code for code, _ in replies], [250] * 6)
        self.assertEqual(replies[2][1], [f"2.0.0 {len(chunks[0])} octets received"])
        queueId = replies[4][1][0].split()[-1]
        [(record, _)] = self.spooled()
        self.assertEqual(record.queueId, queueId)
        [stored] = self.stored()
        self.assertTrue(stored.startswith(b"Received: from client.test ([127.0.0.1])\r\n"))
        self.assertEqual(stored[stored.index(b"Subject: chunks") :], body)
        self.assertEqual(self.tmpFiles(), [])

    @defer.inlineCallbacks
    def test_segmentsCutAnywhere(self):
        """
        TCP cuts the BDAT line, the chunk and the CRLF anywhere: sent
        segment by segment with TCP_NODELAY and pauses, the same message.
        """
        body = b"Subject: cut\r\n\r\n" + b"y" * 998 + b"\r\n.end\r\n"
        wire = MAIL + bdat(body[:30]) + bdat(body[30:], last=True)
        cuts = [5, 40, wire.index(b"BDAT", 60) + 3, len(wire) - 9, len(wire) - 1]

        def dialogue():
            c = self.connect()
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.command("EHLO client.test")
            for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
                c.send(wire[start:end])
                time.sleep(0.05)
            return [c.reply()[0] for _ in range(4)], c.command("NOOP")[0]

        codes, noop = yield self.run_(dialogue)
        self.assertEqual(codes, [250, 250, 250, 250])
        self.assertEqual(noop, 250)
        [stored] = self.stored()
        self.assertEqual(stored[stored.index(b"Subject: cut") :], body)

    @defer.inlineCallbacks
    def test_smugglingInChunksRefused(self):
        """
        A bare-LF end of data and a second transaction inside BDAT content:
        one refusal after LAST, nothing stored, the session in step.
        Relayed as DATA, the content could have ended the message early.
        """
        smuggled = (
            b"Subject: real\r\n\r\nhello\n.\n"
            b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nSubject: forged\r\n\r\nforged\r\n.\r\n"
        )

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.send(MAIL + bdat(smuggled[:40]) + bdat(smuggled[40:], last=True) + b"NOOP\r\n")
            return [c.reply() for _ in range(5)]

        replies = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 550, 250])
        self.assertEqual(replies[3][1][0][:5], "5.5.2")
        self.assertEqual(self.spooled(), [])
        self.assertEqual(self.tmpFiles(), [])

    @defer.inlineCallbacks
    def test_overSizeThenNextMessage(self):
        """
        Chunks over C{message_size} together are read and dropped, 552
        after LAST, and the next transaction on the connection works.
        """
        line = b"z" * 98 + b"\r\n"

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.send(MAIL + bdat(line * 150) + bdat(line * 150, last=True))
            first = [c.reply() for _ in range(4)]
            c.send(MAIL + bdat(b"Subject: small\r\n\r\nok\r\n", last=True))
            return first, [c.reply()[0] for _ in range(3)]

        first, second = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in first], [250, 250, 250, 552])
        self.assertEqual(first[3][1][0][:5], "5.3.4")
        self.assertEqual(second, [250, 250, 250])
        [stored] = self.stored()
        self.assertTrue(stored.endswith(b"Subject: small\r\n\r\nok\r\n"))

    @defer.inlineCallbacks
    def test_disconnectMidChunk(self):
        """A client gone inside a chunk leaves nothing behind."""

        def dialogue():
            c = self.connect()
            c.command("EHLO client.test")
            c.send(MAIL + bdat(b"Subject: half\r\n\r\n") + b"BDAT 1000 LAST\r\npartial")
            [c.reply() for _ in range(3)]
            c.close()

        yield self.run_(dialogue)
        for _ in range(200):
            if not self.relayd.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.tmpFiles(), [])
        self.assertEqual(self.spooled(), [])
