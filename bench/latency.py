"""
Latency at a fixed offered load: the time from the end-of-data dot to the
server's reply to it, which smtp-source does not measure.

Messages are started on a fixed schedule (message i at i/rate seconds), one
SMTP session per message, as smtp-source does without -d.  At most
C{sessions} are open at once, the same cap as smtp-source's -s: a server
that falls behind sees the offered rate drop to what it can take (the
achieved rate is reported) instead of an unbounded pile of connections.
Only the dot-to-reply time is a latency figure; the connection, greeting
and envelope are not part of it.

Run as C{python -m bench.latency --port 2525 --rate 200 --messages 1000};
prints one JSON object on stdout.  asyncio rather than Twisted so that the
client shares nothing with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field

__all__ = ["Result", "main", "measure", "message", "percentile"]


@dataclass
class Result:
    """
    What one latency run saw.

    @ivar latencies: seconds from writing the dot to reading the reply,
        for every message that got a 250.
    @ivar failures: one short text per message that did not get a 250.
    @ivar started: seconds from the first to the last message start.
    """

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = 0.0


def percentile(values: list[float], fraction: float) -> float:
    """
    The nearest-rank percentile (C{fraction} 0.5 for p50, 0.99 for p99).
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def message(size: int, number: int) -> bytes:
    """
    A message of about C{size} octets of body in CRLF lines, dot-stuffed
    already (no line starts with a dot), without the final dot.
    """
    head = (
        f"From: <bench@relayd-bench.example>\r\n"
        f"To: <sink@sink.example>\r\n"
        f"Subject: latency {number}\r\n"
        f"Message-ID: <latency.{number}@relayd-bench.example>\r\n\r\n"
    ).encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line) + 1)
    return head + body


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """
    Read one (possibly multi-line) SMTP reply: its code and last line.
    """
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"connection closed or short reply {line!r}")
        if line[3:4] != b"-":
            return int(line[:3]), line.rstrip()


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, line = await _reply(reader)
    if got != code:
        raise ConnectionError(f"{what}: {line.decode(errors='replace')}")


async def _one(host: str, port: int, body: bytes) -> float:
    """
    One session, one message; the seconds from the dot to the 250.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, 220, "greeting")
        writer.write(b"EHLO latency.relayd-bench.example\r\n")
        await _expect(reader, 250, "EHLO")
        writer.write(b"MAIL FROM:<bench@relayd-bench.example>\r\n")
        await _expect(reader, 250, "MAIL")
        writer.write(b"RCPT TO:<sink@sink.example>\r\n")
        await _expect(reader, 250, "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, 354, "DATA")
        writer.write(body)
        await writer.drain()
        writer.write(b".\r\n")
        dot = time.perf_counter()
        code, line = await _reply(reader)
        latency = time.perf_counter() - dot
        if code != 250:
            raise ConnectionError(f"end of data: {line.decode(errors='replace')}")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        return latency
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def measure(
    host: str, port: int, rate: float, messages: int, sessions: int, size: int
) -> Result:
    """
    Offer C{messages} at C{rate} per second over at most C{sessions}
    sessions at once and collect the dot-to-250 latencies.
    """
    result = Result()
    body = message(size, 0)
    start = time.perf_counter() + 0.05
    starts: list[float] = []
    counter = iter(range(messages))

    async def worker() -> None:
        for number in counter:
            delay = start + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            starts.append(time.perf_counter())
            try:
                result.latencies.append(await _one(host, port, body))
            except (OSError, ConnectionError, ValueError) as e:
                result.failures.append(str(e) or type(e).__name__)

    await asyncio.gather(*(worker() for _ in range(sessions)))
    if len(starts) > 1:
        result.started = max(starts) - min(starts)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages per second offered")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20, help="sessions open at most at once")
    parser.add_argument("--size", type=int, default=4096, help="body octets, like smtp-source -l")
    args = parser.parse_args(argv)
    result = asyncio.run(
        measure(args.host, args.port, args.rate, args.messages, args.sessions, args.size)
    )
    ok = len(result.latencies)
    json.dump(
        {
            "offered_rate": args.rate,
            "achieved_rate": (ok + len(result.failures) - 1) / result.started
            if result.started
            else None,
            "messages": args.messages,
            "accepted": ok,
            "failures": len(result.failures),
            "first_failures": result.failures[:5],
            "p50_ms": percentile(result.latencies, 0.50) * 1000,
            "p99_ms": percentile(result.latencies, 0.99) * 1000,
            "max_ms": max(result.latencies, default=float("nan")) * 1000,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0 if not result.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
