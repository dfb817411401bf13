"""
CHUNKING (RFC 3030) as dialogues over a L{StringTransport}, with the same
session, config, policy chain and spool as tests/smtp/test_dialogue.py: BDAT
chunks are counted octets, pipelined with the commands around them, and
keep DATA's line rules (DESIGN section 4.2).  Every refused command leaves
the transaction as it was; a refused BDAT whose count could be read still
has its octets read, never taken for commands.
"""

from __future__ import annotations

import dataclasses
import errno

from tests.smtp.test_dialogue import DialogueTestCase

MAIL = "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
OK_MAIL = ["250 2.1.0 Ok", "250 2.1.5 Ok"]
BARE = "550 5.5.2 Error: bare CR or LF in message; lines must end with CRLF"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
SYNTAX = "501 5.5.4 Syntax: BDAT size [LAST]"


def bdat(content: str, last: bool = False) -> str:
    """One BDAT command and its chunk."""
    return f"BDAT {len(content.encode('latin-1'))}{' LAST' if last else ''}\r\n{content}"


class BdatTests(DialogueTestCase):
    """CHUNKING: what BDAT accepts and how it answers."""

    def setUp(self) -> None:
        super().setUp()
        self.ehlo()

    def body(self, queueId: str) -> bytes:
        """The stored message without relayd's C{Received:} field."""
        message = self.spool.messages[queueId]
        self.assertTrue(message.startswith(b"Received: "))
        end = message.index(b"\r\n", message.index(b"\r\n\tby ")) + 2
        while message[end : end + 1] == b"\t":
            end = message.index(b"\r\n", end) + 2
        return message[end:]

    def test_pipelinedChunksSplitAnywhere(self) -> None:
        """
        Two chunks pipelined with the transaction's other commands, cut
        into two reads at every position: the same replies, and the octets
        stored as sent (a dot starts no transparency here), even with the
        CRLF split between the chunks.
        """
        first, second = "Subject: x\r\n\r\n.dot\r", "\n..two\r\nend\r\n"
        script = (MAIL + bdat(first) + bdat(second, last=True) + "NOOP\r\n").encode("latin-1")
        for cut in range(len(script) + 1):
            replies = self.talk(script[:cut]) + self.talk(script[cut:])
            queueId = f"Q{cut + 1:04d}"
            self.assertEqual(
                replies,
                [
                    *OK_MAIL,
                    f"250 2.0.0 {len(first)} octets received",
                    f"250 2.0.0 Ok: queued as {queueId}",
                    "250 2.0.0 Ok",
                ],
                cut,
            )
            self.assertEqual(self.body(queueId), (first + second).encode())
        self.assertFalse(self.closed())

    def test_byteByByte(self) -> None:
        """One octet per read, commands and chunks alike."""
        script = MAIL + bdat("a\r\n") + bdat("b\r\n", last=True)
        for octet in script:
            self.send(octet)
        self.assertEqual(
            self.read(), [*OK_MAIL, "250 2.0.0 3 octets received", "250 2.0.0 Ok: queued as Q0001"]
        )
        self.assertEqual(self.body("Q0001"), b"a\r\nb\r\n")

    def test_noSize(self) -> None:
        """C{BDAT} alone: 501, and the transaction goes on."""
        self.talk(MAIL)
        self.assertEqual(self.talk("BDAT\r\n"), [SYNTAX])
        self.assertEqual(self.talk(bdat("x\r\n", last=True)), ["250 2.0.0 Ok: queued as Q0001"])

    def test_notANumber(self) -> None:
        """Signs, words and non-ASCII digits are no count."""
        self.talk(MAIL + bdat("a\r\n"))
        for bad in ["abc", "-1", "+1", "1x", "\xb9", "1" * 21]:
            self.assertEqual(self.talk(f"BDAT {bad}\r\n"), [SYNTAX], bad)
        self.assertEqual(self.talk(bdat("b\r\n", last=True)), ["250 2.0.0 Ok: queued as Q0001"])
        self.assertEqual(self.body("Q0001"), b"a\r\nb\r\n")

    def test_badKeywordChunkSkipped(self) -> None:
        """
        C{BDAT 4 LATER}: 501, but the count is known, so its four octets
        are read and dropped rather than read as a command.
        """
        self.talk(MAIL)
        self.assertEqual(self.talk("BDAT 6 LATER\r\nQUIT\r\nNOOP\r\n"), [SYNTAX, "250 2.0.0 Ok"])
        self.assertEqual(self.talk("BDAT 1 LAST EXTRA\r\nx"), [SYNTAX])
        self.assertEqual(self.talk(bdat("x\r\n", last=True)), ["250 2.0.0 Ok: queued as Q0001"])
        self.assertEqual(self.body("Q0001"), b"x\r\n")

    def test_withoutMail(self) -> None:
        """No transaction: 503, the chunk read and dropped, the session usable."""
        self.assertEqual(self.talk(bdat("QUIT\r\n", last=True)), [NEED_MAIL])
        self.assertFalse(self.closed())
        self.assertEqual(
            self.talk(MAIL + bdat("y\r\n", last=True)), [*OK_MAIL, "250 2.0.0 Ok: queued as Q0001"]
        )

    def test_withoutRecipients(self) -> None:
        """No valid recipient yet: 554, as DATA; MAIL still stands."""
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk(bdat("RSET\r\n", last=True)), ["554 5.5.1 Error: no valid recipients"]
        )
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net>\r\n" + bdat("z\r\n", last=True)),
            ["250 2.1.5 Ok", "250 2.0.0 Ok: queued as Q0001"],
        )

    def test_afterData(self) -> None:
        """After a message sent with DATA the transaction is over: 503."""
        self.transaction()
        self.assertEqual(
            self.talk("Subject: x\r\n\r\nhi\r\n.\r\n"), ["250 2.0.0 Ok: queued as Q0001"]
        )
        self.assertEqual(
            self.talk(bdat("QUIT\r\n", last=True) + "NOOP\r\n"), [NEED_MAIL, "250 2.0.0 Ok"]
        )
        self.assertFalse(self.closed())

    def test_dataAfterBdat(self) -> None:
        """DATA in a BDAT transaction: 503, and the chunks so far stay."""
        self.talk(MAIL + bdat("a\r\n"))
        self.assertEqual(self.talk("DATA\r\n"), ["503 5.5.1 Error: BDAT and DATA cannot be mixed"])
        self.assertEqual(self.talk(bdat("b\r\n", last=True)), ["250 2.0.0 Ok: queued as Q0001"])
        self.assertEqual(self.body("Q0001"), b"a\r\nb\r\n")

    def test_moreDataAfterLast(self) -> None:
        """
        A BDAT after LAST belongs to no transaction (RFC 3030 section 2):
        503, its octets dropped; octets beyond a chunk's count are commands.
        """
        self.assertEqual(
            self.talk(MAIL + bdat("a\r\n", last=True) + bdat("RSET\r\n") + "NOOP\r\n"),
            [*OK_MAIL, "250 2.0.0 Ok: queued as Q0001", NEED_MAIL, "250 2.0.0 Ok"],
        )
        self.assertEqual(
            self.talk(MAIL + "BDAT 3 LAST\r\nb\r\nNOOP\r\n"),
            [*OK_MAIL, "250 2.0.0 Ok: queued as Q0002", "250 2.0.0 Ok"],
        )
        self.assertEqual(self.body("Q0002"), b"b\r\n")

    def test_overSize(self) -> None:
        """
        SIZE counts all chunks: the chunk that goes over and those after it
        are read and dropped, C{552 5.3.4} after LAST, and the session goes
        on.
        """
        self.factory.config = dataclasses.replace(self.config, messageSize=20)
        self.assertEqual(
            self.talk(MAIL + bdat("0123456789\r\n") + bdat("0123456789\r\n")),
            [*OK_MAIL, "250 2.0.0 12 octets received", "250 2.0.0 12 octets received"],
        )
        self.assertEqual(
            self.talk(bdat("NOOP\r\n", last=True)),
            ["552 5.3.4 Error: message size exceeds fixed limit"],
        )
        self.assertEqual(self.spool.messages, {})
        self.assertEqual(
            self.talk(MAIL + bdat("ok\r\n", last=True)), [*OK_MAIL, "250 2.0.0 Ok: queued as Q0002"]
        )

    def test_bareLineEndsRefusedAfterLast(self) -> None:
        """
        A bare LF or CR in any chunk, or a CR ending the message: read to
        LAST, then 550 5.5.2, nothing stored.  Relayed as DATA, such a
        message could end early downstream (SMTP smuggling).
        """
        for chunks in [
            ["a\n.\nMAIL FROM:<x@example.com>\r\n", "b\r\n"],
            ["a\r\n", "b\r.\r"],
            ["a\r", "\rb\r\n"],
            ["a\r\n", "b\r"],
        ]:
            self.talk(MAIL)
            replies = self.talk("".join(bdat(c) for c in chunks[:-1]) + bdat(chunks[-1], True))
            self.assertEqual(replies[-1], BARE, chunks)
            self.assertEqual(len(replies), len(chunks), chunks)
        self.assertEqual(self.spool.messages, {})
        self.assertEqual(self.talk("NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_longLineAcrossChunks(self) -> None:
        """
        998 octets is a line, however the chunks cut it; 999 is not, and
        a leading dot counts: BDAT has no transparency dot.
        """
        self.talk(MAIL)
        replies = self.talk(bdat("x" * 500) + bdat("x" * 498 + "\r\n", True))
        self.assertEqual(replies[-1], "250 2.0.0 Ok: queued as Q0001")
        self.talk(MAIL)
        replies = self.talk(bdat("." + "x" * 500) + bdat("x" * 498 + "\r\n", True))
        self.assertEqual(replies[-1], "554 5.6.0 Error: message has a line longer than 998 octets")

    def test_nul(self) -> None:
        self.talk(MAIL)
        self.assertEqual(
            self.talk(bdat("a\x00b\r\n", last=True)),
            ["554 5.6.0 Error: message contains NUL octets"],
        )

    def test_zeroLast(self) -> None:
        """C{BDAT 0 LAST} ends a message, or is one (empty) by itself."""
        self.assertEqual(
            self.talk(MAIL + bdat("a\r\n") + "BDAT 0 LAST\r\n"),
            [*OK_MAIL, "250 2.0.0 3 octets received", "250 2.0.0 Ok: queued as Q0001"],
        )
        self.assertEqual(self.body("Q0001"), b"a\r\n")
        self.assertEqual(
            self.talk(MAIL + "BDAT 0\r\nBDAT 0 LAST\r\n"),
            [*OK_MAIL, "250 2.0.0 0 octets received", "250 2.0.0 Ok: queued as Q0002"],
        )
        self.assertEqual(self.body("Q0002"), b"")

    def test_rsetDropsChunks(self) -> None:
        """RSET between chunks ends the transaction and forgets them."""
        self.talk(MAIL + bdat("old\r\n"))
        self.assertEqual(self.talk("RSET\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(self.talk(bdat("x\r\n", True)), [NEED_MAIL])
        self.talk(MAIL + bdat("new\r\n", True))
        self.assertEqual(self.body("Q0002"), b"new\r\n")

    def test_commandsBetweenChunks(self) -> None:
        """NOOP between chunks; MAIL there is nested and refused."""
        self.talk(MAIL + bdat("a\r\n"))
        self.assertEqual(
            self.talk("NOOP\r\nMAIL FROM:<c@example.com>\r\n" + bdat("b\r\n", True)),
            [
                "250 2.0.0 Ok",
                "503 5.5.1 Error: nested MAIL command",
                "250 2.0.0 Ok: queued as Q0001",
            ],
        )
        self.assertEqual(self.body("Q0001"), b"a\r\nb\r\n")

    def test_chunkDeadline(self) -> None:
        """
        A chunk's transfer has DATA's deadline: a trickle that keeps the
        idle timeout away is cut all the same.
        """
        self.talk(MAIL + "BDAT 1000000 LAST\r\n")
        self.assertEqual(self.server.state, "data")
        step = self.config.timeoutData / 2
        elapsed = 0.0
        while not self.closed():
            self.send("x")
            self.clock.advance(step)
            elapsed += step
            self.assertLess(elapsed, self.config.dataDeadline + 2 * step)
        self.assertEqual(self.read(), ["421 4.4.2 relayd.test Error: timeout exceeded"])

    def test_chunkIdleTimeout(self) -> None:
        """Nothing for C{[timeouts] data} seconds inside a chunk: 421."""
        self.talk(MAIL + "BDAT 10\r\nabc")
        self.clock.advance(self.config.timeoutData)
        self.assertEqual(self.read(), ["421 4.4.2 relayd.test Error: timeout exceeded"])
        self.assertTrue(self.closed())

    def test_spoolFullAtFirstChunk(self) -> None:
        """452 after the chunk is read; later chunks find no transaction."""
        self.talk(MAIL)
        self.spool.openError = OSError(errno.ENOSPC, "No space left on device")
        self.assertEqual(
            self.talk(bdat("NOOP\r\n") + bdat("NOOP\r\n", True)),
            ["452 4.3.1 Error: insufficient system storage", NEED_MAIL],
        )

    def test_commitFails(self) -> None:
        """A failed commit after LAST is 451, never 250 or 5xx."""
        self.talk(MAIL)
        self.spool.commitError = OSError(errno.EIO, "Input/output error")
        self.assertEqual(
            self.talk(bdat("a\r\n") + bdat("b\r\n", True)),
            ["250 2.0.0 3 octets received", "451 4.3.0 Error: local error in processing"],
        )
        self.assertEqual(self.talk("NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_trickleOfChunksCut(self) -> None:
        """
        The deadline covers the whole message, not each chunk: small
        chunks, each sent at once, a command deadline apart, are cut once
        the message has had its C{data_deadline}.
        """
        self.talk(MAIL)
        step = self.config.timeoutData / 2
        elapsed = 0.0
        while not self.closed():
            self.assertEqual(self.talk(bdat("x")), ["250 2.0.0 1 octets received"])
            self.clock.advance(step)
            elapsed += step
            self.assertLess(elapsed, self.config.dataDeadline + 2 * step)
        self.assertEqual(self.read(), ["421 4.4.2 relayd.test Error: timeout exceeded"])
        self.assertEqual(self.spool.messages, {})

    def test_deadlineEndsWithMessage(self) -> None:
        """
        Once LAST is answered, or the transaction reset, the message's
        deadline is gone: the session idles under the command timeout only.
        """
        self.factory.config = dataclasses.replace(self.config, dataDeadline=10.0)
        self.talk(MAIL + bdat("a\r\n") + bdat("b\r\n", True))
        self.clock.advance(20)
        self.assertEqual(self.talk("NOOP\r\n"), ["250 2.0.0 Ok"])
        self.talk(MAIL + bdat("c\r\n") + "RSET\r\n")
        self.clock.advance(20)
        self.assertEqual(self.talk("NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertFalse(self.closed())
