"""
L{relayd.smtp.wire.DataReader}: end of data, dot stuffing, and the checks that
keep SMTP smuggling and over-long lines out, fed in every chunking.
"""

import pytest

from relayd.smtp.wire import DataReader


def feedAll(stream: bytes, chunkSize: int, maxSize=10**9):
    out = []
    reader = DataReader(out.append, maxSize)
    rest = None
    consumed = 0
    for i in range(0, len(stream), chunkSize):
        rest = reader.feed(stream[i : i + chunkSize])
        consumed = i + chunkSize
        if rest is not None:
            rest = rest + stream[consumed:]
            break
    return reader, b"".join(out), rest


def stuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


BODY = b"Subject: x\r\n\r\n.starts with dot\r\n..two dots\r\nplain\r\n.\r\nx.\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 13, 64, 1 << 16])
def test_unstuffing_any_chunking(chunk):
    wire = stuff(BODY) + b".\r\nNOOP\r\n"
    reader, out, rest = feedAll(wire, chunk)
    assert reader.problem is None
    assert out == BODY
    assert rest == b"NOOP\r\n"


def test_dot_on_first_line():
    _reader, out, rest = feedAll(b"..hello\r\n.\r\n", 1)
    assert out == b".hello\r\n"
    assert rest == b""


def test_empty_message():
    reader, out, rest = feedAll(b".\r\nQUIT\r\n", 3)
    assert out == b""
    assert rest == b"QUIT\r\n"
    assert reader.problem is None


def test_dot_lines_at_every_offset_of_16k_chunks():
    """A stuffed dot line starting at each position around a 16 KiB edge."""
    for offset in range(16384 - 8, 16384 + 8):
        prefix = b"a" * 10 + b"\r\n"
        filler = b"b" * 900 + b"\r\n"
        body = prefix
        while len(body) + len(filler) < offset:
            body += filler
        pad = offset - len(body) - 2
        body += b"c" * max(pad, 0) + b"\r\n" + b".dot line\r\ntail\r\n"
        wire = stuff(body) + b".\r\n"
        reader, out, rest = feedAll(wire, 16384)
        assert reader.problem is None, offset
        assert out == body, offset
        assert rest == b""


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n\x00.\r\n"],
)
@pytest.mark.parametrize("chunk", [1, 2, 5, 4096])
def test_smuggling_variants_are_not_an_end(variant, chunk):
    """
    Each fake end-of-data is message content, refused as a whole after the
    real end; the smuggled commands never come back as commands.
    """
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n"
    wire = b"Subject: a\r\n\r\nhello" + variant + smuggled + b".\r\nQUIT\r\n"
    reader, _out, rest = feedAll(wire, chunk)
    assert reader.problem in ("bare", "nul")
    assert rest == b"QUIT\r\n"


def test_bare_lf_inside_body_refused():
    reader, _out, rest = feedAll(b"line one\nline two\r\n.\r\n", 1024)
    assert reader.problem == "bare"
    assert rest == b""


def test_bare_cr_at_chunk_edge():
    reader, _out, _rest = feedAll(b"abc\rdef\r\n.\r\n", 4)
    assert reader.problem == "bare"


def test_cr_lf_split_over_chunks_is_fine():
    reader, out, _rest = feedAll(b"abc\r\ndef\r\n.\r\n", 4)
    assert reader.problem is None
    assert out == b"abc\r\ndef\r\n"


def test_line_of_998_is_fine_999_is_not():
    ok = b"x" * 998 + b"\r\n"
    reader, out, rest = feedAll(ok + b".\r\n", 100)
    assert reader.problem is None and out == ok
    bad = b"x" * 999 + b"\r\n"
    for chunk in (100, 4096):
        reader, out, rest = feedAll(bad + b".\r\nNOOP\r\n", chunk)
        assert reader.problem == "line"
        assert rest == b"NOOP\r\n"


def test_huge_line_bounded_and_read_to_end():
    """A 16 KiB+ line never falls back to command mode; memory stays bounded."""
    wire = b"a\r\n" + b"y" * (1 << 20) + b"\r\nMAIL FROM:<x@y>\r\n.\r\nNOOP\r\n"
    out = []
    reader = DataReader(out.append, 10**9)
    rest = None
    for i in range(0, len(wire), 8192):
        rest = reader.feed(wire[i : i + 8192])
        assert len(reader._carry) <= 1004
        if rest is not None:
            rest += wire[i + 8192 :]
            break
    assert reader.problem == "line"
    assert rest == b"NOOP\r\n"


def test_size_limit_read_to_end():
    body = (b"z" * 98 + b"\r\n") * 20
    reader, _out, rest = feedAll(body + b".\r\nRSET\r\n", 256, maxSize=1000)
    assert reader.problem == "size"
    assert rest == b"RSET\r\n"
    assert reader.size > 1000


def test_write_error_recorded():
    def write(data):
        raise OSError(28, "No space left on device")

    reader = DataReader(write, 10**9)
    rest = reader.feed(b"hello\r\n.\r\n")
    assert rest == b""
    assert reader.problem == "write"
    assert reader.error.errno == 28


def splitFeeds(wire: bytes, cuts):
    """Feed C{wire} to a fresh reader in pieces ending at C{cuts}."""
    out = []
    reader = DataReader(out.append, 10**9)
    rest = None
    start = 0
    for cut in [*list(cuts), len(wire)]:
        if cut <= start:
            continue
        rest = reader.feed(wire[start:cut])
        start = cut
        if rest is not None:
            rest += wire[cut:]
            break
    return reader, b"".join(out), rest


# Text lines around the limit (RFC 5321 section 4.5.3.1.6: 998 octets plus
# CRLF), with and without a leading dot, which the client doubles on the
# wire (section 4.5.2) and which does not count.
LIMIT_LINES = [
    (b"x" * 997, True),
    (b"x" * 998, True),
    (b"x" * 999, False),
    (b"." + b"x" * 996, True),
    (b"." + b"x" * 997, True),
    (b"." + b"x" * 998, False),
    (b"." * 998, True),
    (b"." * 999, False),
]


def _lineId(value):
    if isinstance(value, bytes):
        return f"{len(value)}{'-dot' if value.startswith(b'.') else ''}"
    return "legal" if value else "too-long"


@pytest.mark.parametrize("first", [True, False], ids=["first-line", "after-a-line"])
@pytest.mark.parametrize(("line", "legal"), LIMIT_LINES, ids=_lineId)
def test_line_limit_at_every_split(line, legal, first):
    """
    A line at the limit is judged the same however the stream is cut: its
    CR and LF in different segments (issue 9 item 7), its transparency dot
    alone in a segment, or any other cut (issue 11).
    """
    body = (b"" if first else b"Subject: limit\r\n\r\n") + line + b"\r\n"
    wire = stuff(body) + b".\r\nNOOP\r\n"
    for cut in range(1, len(wire)):
        reader, out, rest = splitFeeds(wire, [cut])
        assert rest == b"NOOP\r\n", cut
        if legal:
            assert reader.problem is None, cut
            assert out == body, cut
        else:
            assert reader.problem == "line", cut


@pytest.mark.parametrize(("line", "legal"), LIMIT_LINES, ids=_lineId)
def test_line_limit_at_every_pair_of_cuts_near_its_end(line, legal):
    """Three segments, both cuts anywhere in the last octets of the line."""
    body = b"a\r\n" + line + b"\r\nb\r\n"
    wire = stuff(body) + b".\r\n"
    end = wire.index(b"\r\nb\r\n") + 2
    for first in range(end - 6, end + 1):
        for second in range(first + 1, end + 3):
            reader, out, rest = splitFeeds(wire, [first, second])
            assert rest == b"", (first, second)
            assert (reader.problem is None) is legal, (first, second)
            if legal:
                assert out == body
