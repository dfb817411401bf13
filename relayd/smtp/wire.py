"""
The wire formats of RFC 5321 section 4.5.2, both ways: L{DataReader} takes
a DATA transfer apart as the server receives it, L{DotStuffer} puts one
together as the client sends it; and the line limits of section 4.5.3.1.

Both work on whole chunks with C{bytes} methods, never Python code per
line, and keep only the state a chunk boundary needs.  L{ChunkReader}
checks the content of BDAT (RFC 3030): it is counted, not stuffed, but it
follows the same line rules as DATA (DESIGN section 4.2), because relayd may
relay it as DATA; the rules themselves are L{_badOctets} and L{_longLine},
shared by both readers.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["COMMAND_LINE", "TEXT_LINE", "ChunkReader", "DataReader", "DotStuffer"]

COMMAND_LINE = 512
"""RFC 5321 section 4.5.3.1.4: a command line, CRLF included."""
TEXT_LINE = 1000
"""RFC 5321 section 4.5.3.1.6: a text line, CRLF included."""

_END = b"\r\n.\r\n"


def _badOctets(lines: bytes) -> str | None:
    """
    The line-ending rule for whole lines joined by CRLF: every CR and LF
    must be part of a CRLF, and there is no NUL.

    @return: C{"bare"}, C{"nul"} or None.
    """
    ends = lines.count(b"\r\n")
    if lines.count(b"\n") != ends or lines.count(b"\r") != ends:
        return "bare"
    if b"\x00" in lines:
        return "nul"
    return None


def _longLine(lines: bytes) -> bool:
    """
    Whether one of these lines, joined by CRLF and without their
    transparency dots, is over 998 octets (RFC 5321 section 4.5.3.1.6).
    """
    return len(lines) > TEXT_LINE - 2 and max(map(len, lines.split(b"\r\n"))) > TEXT_LINE - 2


class DataReader:
    """
    The DATA phase as a byte-stream parser.

    It finds the end of the message (only C{CRLF.CRLF}), removes dot
    stuffing (RFC 5321 section 4.5.2), counts the size and checks every line,
    doing its work with C{bytes} methods over whole chunks rather than
    Python code per line, so that receiving is limited by the disk.

    The stream is treated as if preceded by a CRLF, so a C{.} on the very
    first line is recognised both as end of data and as stuffing.  The
    unprocessed tail (C{_carry}) always starts with that CRLF.

    A line may hold 998 octets (RFC 5321 section 4.5.3.1.6), counted after
    the transparency dot is removed, and however TCP cut it: a CR at the end
    of a chunk may be the first half of the line's CRLF.

    Once a problem is found the reader stops passing data on but keeps
    looking for the end, so the client is answered after its real end of
    data and the session stays in step.

    @ivar problem: None while all is well, else one of C{"size"},
        C{"line"}, C{"bare"}, C{"nul"}, C{"write"}.
    @ivar error: the L{OSError} behind a C{"write"} problem.
    @ivar size: octets of message passed on so far.
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._write = write
        self.maxSize = maxSize
        self._carry = b"\r\n"
        self._started = False
        self.size = 0
        self.problem: str | None = None
        self.error: OSError | None = None

    def feed(self, data: bytes) -> bytes | None:
        """
        Take the next chunk.

        @return: None while the end has not been seen; once it has, the
            bytes that followed it (the next pipelined commands).
        """
        buf = self._carry + data
        end = buf.find(_END)
        if self.problem is not None:
            if end < 0:
                self._carry = buf[-4:]
                return None
            return buf[end + 5 :]
        if end >= 0:
            self._pass(buf[: end + 2])
            return buf[end + 5 :]
        cut = buf.rfind(b"\r\n")
        if cut > 0:
            self._pass(buf[:cut])
            buf = buf[cut:]
        # buf is CRLF and the start of a line.  Refuse it now if it is
        # already too long, which bounds the carry; but a CR at its end may
        # be half of its CRLF, and a dot at its start is transparency
        # (RFC 5321 section 4.5.3.1.6): neither counts.
        if len(buf) > TEXT_LINE and self.problem is None:
            length = len(buf) - 2 - buf.endswith(b"\r") - buf.startswith(b"\r\n.")
            if length > TEXT_LINE - 2:
                self.problem = "line"
        self._carry = buf if self.problem is None else buf[-4:]
        return None

    def _pass(self, segment: bytes) -> None:
        """Check and un-stuff a run of whole lines that starts with CRLF."""
        if self.problem is not None:
            return
        self.problem = _badOctets(segment)
        if self.problem is not None:
            return
        out = segment.replace(b"\r\n.", b"\r\n")
        # Measured without the transparency dots (RFC 5321 section
        # 4.5.3.1.6); every CR and LF is part of a CRLF by now.
        if _longLine(out):
            self.problem = "line"
            return
        if not self._started:
            out = out[2:]
            self._started = True
        self.size += len(out)
        if self.size > self.maxSize:
            self.problem = "size"
            return
        try:
            self._write(out)
        except OSError as e:
            self.problem = "write"
            self.error = e


class ChunkReader:
    """
    The content of one message sent with BDAT (RFC 3030), chunk after
    chunk, as a byte-stream checker.

    BDAT content is counted, not stuffed: the session reads exactly the
    octets each C{BDAT n} announces and gives them to L{feed}, which passes
    them on unchanged.  But relayd may relay the message as DATA, so it
    keeps the rules of DATA (DESIGN section 4.2): every line ends with
    CRLF, no NUL, no line over 998 octets.  A line may span chunks and a
    CRLF may be split between them; the only state kept across a chunk
    boundary is the unfinished last line (C{_carry}, at most a line long).

    Once a problem is found nothing more is passed on; the session reads
    the rest of the message to its C{LAST} chunk and then refuses it,
    as L{DataReader} does after the real end of DATA.

    @ivar problem: None while all is well, else one of C{"size"},
        C{"line"}, C{"bare"}, C{"nul"}, C{"write"}.
    @ivar error: the L{OSError} behind a C{"write"} problem.
    @ivar size: octets of message passed on so far.
    """

    def __init__(self, write: Callable[[bytes], None], maxSize: int) -> None:
        self._write = write
        self.maxSize = maxSize
        self._carry = b""
        self.size = 0
        self.problem: str | None = None
        self.error: OSError | None = None

    def feed(self, data: bytes) -> None:
        """Take the next octets of the message, from one chunk."""
        if self.problem is not None or not data:
            return
        buf = self._carry + data
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            whole, buf = buf[:cut], buf[cut + 2 :]
            self.problem = _badOctets(whole)
            if self.problem is None and _longLine(whole):
                self.problem = "line"
        # buf is the unfinished last line: only its final octet may be a
        # CR (the first half of its CRLF), and it may not grow past 998.
        if self.problem is None:
            if b"\n" in buf or b"\r" in buf[:-1]:
                self.problem = "bare"
            elif b"\x00" in buf:
                self.problem = "nul"
            elif len(buf) - buf.endswith(b"\r") > TEXT_LINE - 2:
                self.problem = "line"
        self._carry = buf
        if self.problem is not None:
            self._carry = b""
            return
        self.size += len(data)
        if self.size > self.maxSize:
            self.problem = "size"
            return
        try:
            self._write(data)
        except OSError as e:
            self.problem = "write"
            self.error = e

    def finish(self) -> None:
        """
        The C{LAST} chunk has been read: the message ends here.  A CR left
        at its very end is a bare CR.  A last line without CRLF is allowed
        (RFC 3030 has no such rule); L{DotStuffer.finish} adds the CRLF
        should the message be relayed as DATA.
        """
        if self.problem is None and self._carry.endswith(b"\r"):
            self.problem = "bare"
        self._carry = b""


_LINE_START = 0
_AFTER_CR = 1
_MIDDLE = 2


class DotStuffer:
    """
    Dot-stuffing for DATA (RFC 5321 section 4.5.2) as a stateful encoder.

    Every line that begins with C{"."} gets one more C{"."} in front, so
    that no line of the message can read as the end of data.  The work is
    one C{bytes.replace} per chunk; the only state is where the previous
    chunk left off: at the start of a line (after CRLF, or at the very start
    of the message), just after a CR, or elsewhere.  That is what a C{"."}
    at the start of the next chunk, or a C{"\\n."} after a chunk that ended
    in CR, needs to be handled right.

    The input is relayd's spool data, whose lines always end with CRLF; a
    bare CR or LF is passed on as is.
    """

    def __init__(self) -> None:
        self._state = _LINE_START

    def encode(self, chunk: bytes) -> bytes:
        """
        Stuff the next chunk of the message.

        @return: the bytes to send for C{chunk}.
        """
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n.", b"\r\n..")
        state = self._state
        if state == _LINE_START and chunk[:1] == b".":
            out = b"." + out
        elif state == _AFTER_CR and chunk[:2] == b"\n.":
            out = b"\n.." + out[2:]
        if chunk.endswith(b"\r\n") or (chunk == b"\n" and state == _AFTER_CR):
            self._state = _LINE_START
        elif chunk.endswith(b"\r"):
            self._state = _AFTER_CR
        else:
            self._state = _MIDDLE
        return out

    def finish(self) -> bytes:
        """
        End the message and make the encoder ready for the next one.

        @return: the end-of-data indication C{".\\r\\n"}, preceded by a CRLF
            when the message did not end with one (RFC 5321 section 4.1.1.4:
            the message must end in CRLF before the final dot).  An empty
            message gives just C{".\\r\\n"}.
        """
        state, self._state = self._state, _LINE_START
        return b".\r\n" if state == _LINE_START else b"\r\n.\r\n"
