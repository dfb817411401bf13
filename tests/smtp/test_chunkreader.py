"""
L{relayd.smtp.wire.ChunkReader}: BDAT content passes through unchanged but
keeps DATA's line rules (DESIGN section 4.2), however the chunks cut it.
"""

import errno
from itertools import pairwise

import pytest

from relayd.smtp.wire import ChunkReader


def readAll(message: bytes, cuts: list[int], maxSize: int = 10**9) -> tuple[ChunkReader, bytes]:
    """Feed C{message} cut at C{cuts}, then finish it."""
    out: list[bytes] = []
    reader = ChunkReader(out.append, maxSize)
    edges = [0, *cuts, len(message)]
    for start, end in pairwise(edges):
        reader.feed(message[start:end])
    reader.finish()
    return reader, b"".join(out)


BODY = b"Subject: x\r\n\r\n.starts with dot\r\n..two dots\r\n.\r\nx.\r\n"


@pytest.mark.parametrize("cut", range(len(BODY) + 1))
def test_unchanged_at_every_cut(cut):
    """No dot is removed or added, wherever the chunk boundary falls."""
    reader, out = readAll(BODY, [cut])
    assert reader.problem is None
    assert out == BODY
    assert reader.size == len(BODY)


@pytest.mark.parametrize("cut", range(1, 7))
@pytest.mark.parametrize(
    "message,problem",
    [
        (b"a\nb\r\n", "bare"),
        (b"a\rb\r\n", "bare"),
        (b"ab\r\r\n", "bare"),
        (b"ab\r\n\n", "bare"),
        (b"a\x00b\r\n", "nul"),
        (b"ab\r\nc\r", "bare"),
        (b"ab\r\ncd\n", "bare"),
    ],
)
def test_line_rules_at_every_cut(message, problem, cut):
    """Bare CR, bare LF and NUL are found whichever chunk they fall in."""
    reader, _ = readAll(message, [min(cut, len(message))])
    assert reader.problem == problem


def test_last_line_without_crlf_allowed():
    """RFC 3030 does not ask for a final CRLF; DotStuffer adds one for DATA."""
    reader, out = readAll(b"Subject: x\r\n\r\nno end", [3])
    assert reader.problem is None
    assert out == b"Subject: x\r\n\r\nno end"


@pytest.mark.parametrize("length,legal", [(998, True), (999, False)])
def test_line_limit_at_every_cut(length, legal):
    """998 octets is a line; 999 is not, even cut between CR and LF."""
    message = b"a\r\n" + b"x" * length + b"\r\nb\r\n"
    for cut in range(len(message) + 1):
        reader, _ = readAll(message, [cut])
        assert (reader.problem is None) is legal, cut
    reader, _ = readAll(message, list(range(1, len(message))))
    assert (reader.problem is None) is legal


def test_long_unfinished_line_bounded():
    """A line that never ends is refused without holding it in memory."""
    out: list[bytes] = []
    reader = ChunkReader(out.append, 10**9)
    for _ in range(100):
        reader.feed(b"y" * 1000)
    assert reader.problem == "line"
    assert len(reader._carry) == 0


def test_size_counted_across_chunks():
    """SIZE counts the whole message over all its chunks."""
    out: list[bytes] = []
    reader = ChunkReader(out.append, 10)
    reader.feed(b"12345\r\n")
    assert reader.problem is None
    reader.feed(b"678\r\n")
    reader.feed(b"more\r\n")
    reader.finish()
    assert reader.problem == "size"
    assert b"".join(out) == b"12345\r\n"


def test_write_error_recorded():
    def write(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    reader = ChunkReader(write, 10**9)
    reader.feed(b"a\r\n")
    assert reader.problem == "write"
    assert reader.error is not None and reader.error.errno == errno.ENOSPC
