"""
Proof of durability: relayd runs as a real process, concurrent clients send
it mail, relayd is killed with SIGKILL while clients are in the middle of
transactions, and is then restarted on the same spool (which runs startup
recovery).  Afterwards:

  - every message that got a C{250} is in the spool: its envelope names the
    sender and recipients that were sent, and its data file holds relayd's
    C{Received:} header followed by the message exactly as sent;
  - C{tmp/} is empty, nothing is in C{corrupt/}, and there is no data file
    without an envelope nor an envelope without a data file;
  - every message in the spool either got its C{250} or was sent completely
    (final C{.} included) and lost its reply to the kill: nothing that was
    never fully sent, nothing that was refused, nothing twice, nothing
    truncated.

A plain pytest test: there is no reactor in this process.  The clients are
threads on blocking sockets (L{relayd.testing.WireClient}); every socket has
a timeout, every wait a deadline, and the relayd processes are killed in the
fixture's teardown whatever happens.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.queue.record import readData, readRecord
from relayd.queue.spool import QUEUED_STATES
from relayd.testing import TestSetup, WireClient
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)

QUEUE_ID = re.compile(r"^[0-9A-Z]{1,64}$")

FAST_CLIENTS = 8
"""Clients sending one message after another as fast as relayd answers."""
TARGET_QUEUED = 100
"""Kill relayd once this many messages got their 250 ..."""
RUN_SECONDS = 3.0
"""... or once this much time has passed, whichever comes first."""
MIN_QUEUED = 10
"""Fewer 250s than this before the kill and the test proves nothing."""
TRICKLE_WAIT = 3.0
"""How long to wait past the above for the slow client to be mid-DATA."""
SOCKET_TIMEOUT = 10.0
JOIN_TIMEOUT = 10.0

QUEUED_AS = re.compile(r"\bqueued as ([0-9A-Z]+)$")
TOKEN = re.compile(rb"^X-Durability-Token: (\S+)\r$", re.MULTILINE)

# The stages of a message, as far as its client knows.
NEW = "new"  # not started
MAIL = "mail"  # MAIL sent: the transaction has started
DATA = "data"  # 354 received; part of the message may have been sent
ENDED = "ended"  # the final "." is being or has been sent; no reply yet
QUEUED = "queued"  # 250 received, queue id known
REFUSED = "refused"  # another reply to the end of data
IN_FLIGHT = (MAIL, DATA, ENDED)


# --- messages ------------------------------------------------------------


@dataclass(eq=False)
class Sent:
    """One message as its client sent it, and how far it got."""

    client: int
    token: str
    sender: str
    recipients: list[str]
    body: bytes
    eightBit: bool
    stage: str = NEW
    queueId: str | None = None
    reply: str | None = None
    chunksSent: int = 0


def randomText(rng: random.Random, length: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,-"
    return "".join(rng.choice(alphabet) for _ in range(length))


def makeMessage(rng: random.Random, runId: str, client: int, index: int) -> Sent:
    """
    A message unique to (run, client, index).  Kinds rotate: short; multi-KB;
    dot lines and 8-bit octets; several recipients with all of the above.
    The trickle client (number 0) always sends the big mixed kind.
    """
    token = f"{runId}-C{client:02d}-M{index:05d}"
    kind = 3 if client == 0 else (index + client) % 4
    sender = "" if index % 9 == 4 else f"sender{client}@client{client}.durability.test"
    if kind == 3:
        count = rng.randint(2, 5)
    else:
        count = 1
    recipients = [f"rcpt{k}.{token.lower()}@dest{k}.durability.test" for k in range(count)]
    eightBit = kind in (2, 3)

    lines: list[bytes] = [
        f"From: <{sender or 'mailer-daemon@client.durability.test'}>".encode(),
        f"To: {', '.join(f'<{r}>' for r in recipients)}".encode(),
        f"Subject: durability {token}".encode(),
        f"Message-ID: <{token}@durability.test>".encode(),
        f"X-Durability-Token: {token}".encode(),
    ]
    if eightBit:
        lines += [
            b"MIME-Version: 1.0",
            b"Content-Type: text/plain; charset=utf-8",
            b"Content-Transfer-Encoding: 8bit",
        ]
    lines.append(b"")

    def dotLines() -> list[bytes]:
        return rng.sample(
            [
                b".",
                b"..",
                b"...",
                b".leading dot",
                b"..two leading dots",
                b". ",
                b".\t.",
                b"." + randomText(rng, 40).encode(),
            ],
            k=rng.randint(2, 5),
        )

    def eightBitLines() -> list[bytes]:
        return [
            "Gr\u00fc\u00dfe aus K\u00f6ln, \u00e7a va? \u2603 \u65e5\u672c".encode("utf-8"),
            bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 300))),
            b"latin-1: \xe9\xe8\xff\xa0end",
        ]

    if kind == 0:
        lines += [randomText(rng, rng.randint(0, 70)).encode() for _ in range(rng.randint(1, 5))]
    elif kind == 1:
        size = rng.randint(2_000, 64_000)
        while size > 0:
            line = randomText(rng, rng.randint(0, 76)).encode()
            lines.append(line)
            size -= len(line) + 2
        lines.append(b"x" * 998)  # the longest line allowed
    elif kind == 2:
        lines += dotLines() + eightBitLines() + dotLines()
        lines += [randomText(rng, 60).encode() for _ in range(rng.randint(0, 40))]
    else:
        size = rng.randint(4_000, 40_000)
        while size > 0:
            pick = rng.random()
            if pick < 0.1:
                extra = dotLines()
            elif pick < 0.15:
                extra = eightBitLines()
            else:
                extra = [randomText(rng, rng.randint(0, 76)).encode()]
            lines += extra
            size -= sum(len(line) + 2 for line in extra)
    if index % 3 == 0:
        lines.append(b".")  # the very last line is a lone dot
    body = b"\r\n".join(lines) + b"\r\n"
    assert b"\x00" not in body and body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    return Sent(client, token, sender, recipients, body, eightBit)


def dotStuff(body: bytes) -> bytes:
    """RFC 5321 section 4.5.2; C{body} ends with CRLF."""
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..")


def splitReceived(data: bytes) -> tuple[bytes, bytes]:
    """
    Split a data file into relayd's C{Received:} header (one line starting
    C{Received:} and its TAB continuation lines) and the message.
    """
    if not data.startswith(b"Received: "):
        raise ValueError("does not start with a Received: header")
    end = data.index(b"\r\n") + 2
    while data.startswith(b"\t", end):
        end = data.index(b"\r\n", end) + 2
    return data[:end], data[end:]


# --- the clients ---------------------------------------------------------


class UnexpectedReply(Exception):
    pass


class Traffic:
    """
    What the clients did, shared by their threads and the test.  Every
    change of a message's stage happens under L{lock}; the test holds it
    while it kills relayd, so the stages it reads then are the clients'
    view at the moment of the kill.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.runId = secrets.token_hex(4).upper()
        self.lock = threading.Lock()
        self.messages: list[Sent] = []
        self.current: dict[int, Sent] = {}
        self.killed = False
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.queuedCount = 0

    def advance(self, message: Sent, stage: str) -> None:
        with self.lock:
            if message.stage == NEW:
                self.messages.append(message)
                self.current[message.client] = message
            message.stage = stage

    def answered(self, message: Sent, code: int, lines: list[str]) -> None:
        text = " / ".join(lines)
        with self.lock:
            message.reply = f"{code} {text}"
            match = QUEUED_AS.search(lines[-1]) if code == 250 else None
            if match is not None:
                message.stage = QUEUED
                message.queueId = match.group(1)
                self.queuedCount += 1
            else:
                message.stage = REFUSED
                self.errors.append(
                    f"client {message.client}: {message.token} answered {code} {text}"
                )

    def failed(self, client: int, error: BaseException) -> None:
        with self.lock:
            # A broken connection is what the kill does; anything else, or a
            # broken connection before the kill, is a failure.
            expected = self.killed and isinstance(error, (OSError, EOFError))
            if not expected:
                self.errors.append(f"client {client}: {error!r} (killed={self.killed})")

    def count(self, *stages: str) -> int:
        return sum(1 for m in self.messages if m.stage in stages)


def expect(reply: tuple[int, list[str]], code: int, what: str) -> None:
    if reply[0] != code:
        raise UnexpectedReply(f"{what}: expected {code}, got {reply[0]} {' / '.join(reply[1])}")


def runClient(traffic: Traffic, number: int, trickle: bool) -> None:
    """
    One client: one connection, one message after another until the
    connection breaks (the kill) or the test says stop.  The trickle client
    sends each message in small pieces with pauses, so it spends most of its
    time in the middle of DATA.
    """
    rng = random.Random(f"{traffic.runId}-{number}")
    client: WireClient | None = None
    try:
        client = WireClient(traffic.port, timeout=SOCKET_TIMEOUT)
        expect(client.reply(), 220, "greeting")
        expect(client.command(f"EHLO client{number}.durability.test"), 250, "EHLO")
        for index in itertools.count():
            if traffic.stopping.is_set():
                return
            message = makeMessage(rng, traffic.runId, number, index)
            traffic.advance(message, MAIL)
            mail = f"MAIL FROM:<{message.sender}>" + (" BODY=8BITMIME" if message.eightBit else "")
            expect(client.command(mail), 250, "MAIL")
            for recipient in message.recipients:
                expect(client.command(f"RCPT TO:<{recipient}>"), 250, "RCPT")
            expect(client.command("DATA"), 354, "DATA")
            traffic.advance(message, DATA)
            stuffed = dotStuff(message.body)
            if trickle:
                # Cut at random octets: inside CRLFs, before and after dots.
                cuts = sorted(rng.sample(range(1, len(stuffed)), k=min(40, len(stuffed) - 1)))
                for start, end in zip([0, *cuts], [*cuts, len(stuffed)], strict=False):
                    if traffic.stopping.is_set():
                        return
                    client.send(stuffed[start:end])
                    with traffic.lock:
                        message.chunksSent += 1
                    time.sleep(0.02)
            else:
                client.send(stuffed)
            traffic.advance(message, ENDED)
            client.send(b".\r\n")
            code, lines = client.reply()
            traffic.answered(message, code, lines)
            if code != 250:
                return
    except BaseException as e:
        traffic.failed(number, e)
    finally:
        if client is not None:
            client.close()


# --- the spool after the fact --------------------------------------------


def listSpool(spool: Path) -> dict[str, list[str]]:
    return {
        name: sorted(os.listdir(spool / name)) if (spool / name).is_dir() else []
        for name in ("tmp", "data", "incoming", "active", "deferred", "hold", "corrupt")
    }


def checkSpool(spool: Path, traffic: Traffic) -> tuple[list[str], dict[str, int]]:
    """
    Compare the spool with what the clients did.

    @return: the problems found (empty when all is well) and some counts.
    """
    problems: list[str] = []
    listing = listSpool(spool)
    if listing["tmp"]:
        problems.append(f"tmp/ not empty after recovery: {listing['tmp']}")
    if listing["corrupt"]:
        problems.append(f"corrupt/ not empty: {listing['corrupt']}")

    if listing["data"]:
        problems.append(f"data/ of the old layout not empty: {listing['data']}")

    envelopes: dict[str, tuple[str, Any]] = {}
    for state in QUEUED_STATES:
        for name in listing[state]:
            queueId = name
            if not QUEUE_ID.match(name):
                problems.append(f"unexpected file {state}/{name}")
                continue
            if queueId in envelopes:
                problems.append(f"{queueId} in two states: {envelopes[queueId][0]} and {state}")
            try:
                record = readRecord(str(spool / state / name), queueId)
            except (OSError, ValueError) as e:
                problems.append(f"{state}/{name} is not a sound queue file: {e}")
                continue
            envelopes[queueId] = (state, record)

    byToken = {m.token: m for m in traffic.messages}
    found: dict[str, str] = {}  # token -> queue id
    lostReplies = 0
    for queueId in sorted(envelopes):
        state, record = envelopes[queueId]
        where = f"{state}/{queueId}"
        data = readData(str(spool / state / queueId))
        try:
            received, body = splitReceived(data)
        except ValueError as e:
            problems.append(f"{where}: {e}: {data[:200]!r}")
            continue
        if f" id {queueId}".encode() not in received:
            problems.append(f"{where}: Received header does not name {queueId}: {received!r}")
        tokens = TOKEN.findall(body)
        message = byToken.get(tokens[0].decode()) if len(tokens) == 1 else None
        if message is None:
            problems.append(
                f"{where}: not a message any client sent (tokens {tokens}, "
                f"{len(data)} octets, starts {body[:300]!r})"
            )
            continue
        if message.token in found:
            problems.append(f"{where}: {message.token} is also queued as {found[message.token]}")
        found[message.token] = queueId
        if message.stage == QUEUED:
            if message.queueId != queueId:
                problems.append(
                    f"{where}: {message.token} got 250 as {message.queueId}, not this id"
                )
        elif message.stage == ENDED:
            lostReplies += 1
        else:
            problems.append(
                f"{where}: {message.token} is queued but its client never finished sending it "
                f"(stage {message.stage}, {message.chunksSent} chunks, reply {message.reply})"
            )
        if body != message.body:
            common = next(
                (i for i, (a, b) in enumerate(zip(body, message.body, strict=False)) if a != b),
                min(len(body), len(message.body)),
            )
            problems.append(
                f"{where}: {message.token} content differs from what was sent: "
                f"{len(body)} octets stored, {len(message.body)} sent, first difference at "
                f"{common}: stored {body[common : common + 60]!r} "
                f"sent {message.body[common : common + 60]!r}"
            )
        expected = {
            "queue_id": queueId,
            "sender": message.sender,
            "recipients": message.recipients,
            "size": len(data),
            "body": "8BITMIME" if message.eightBit else "7BIT",
            "listener": "relay",
        }
        actual = {
            "queue_id": record.queueId,
            "sender": record.sender,
            "recipients": [r.address for r in record.recipients],
            "size": record.size,
            "body": record.body.value,
            "listener": record.listener,
        }
        for key, value in expected.items():
            if actual.get(key) != value:
                problems.append(
                    f"{where}: envelope {key} is {actual.get(key)!r}, expected {value!r}"
                )

    for message in traffic.messages:
        if message.stage == QUEUED and message.token not in found:
            queueId = message.queueId
            problems.append(
                f"LOST: {message.token} got '{message.reply}' but is not in the spool "
                f"(listed in {[s for s in listing if queueId in listing[s]]})"
            )

    counts = {
        "envelopes": len(envelopes),
        "lost replies": lostReplies,
    }
    return problems, counts


# --- the test --------------------------------------------------------------


def test_killedRelaydKeepsEveryAcceptedMessage(
    tmp_path: Path,
    relaydProcesses: list,  # noqa: F811 (the fixture)
) -> None:
    began = time.monotonic()
    setup = TestSetup(str(tmp_path / "relayd"), portZero=False, modes=("relay",))
    spool = Path(setup.spoolPath)

    first = RelaydProcess(setup, tmp_path / "first.log")
    relaydProcesses.append(first)
    first.waitListening()

    traffic = Traffic(first.port)
    threads = [
        threading.Thread(
            target=runClient,
            args=(traffic, number, number == 0),
            name=f"durability-client-{number}",
            daemon=True,
        )
        for number in range(FAST_CLIENTS + 1)
    ]
    try:
        for thread in threads:
            thread.start()

        # Let the clients run ...
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            with traffic.lock:
                if traffic.errors or traffic.queuedCount >= TARGET_QUEUED:
                    break
            time.sleep(0.005)
        # ... then kill relayd while the trickle client is in the middle of
        # DATA (so tmp/ holds a partial message) and the others are busy.
        deadline = time.monotonic() + TRICKLE_WAIT
        while True:
            with traffic.lock:
                trickling = traffic.current.get(0)
                partial = (
                    trickling is not None and trickling.stage == DATA and trickling.chunksSent > 0
                )
                if partial or traffic.errors or time.monotonic() > deadline:
                    inFlight = [m for m in traffic.messages if m.stage in IN_FLIGHT]
                    stages = {s: traffic.count(s) for s in (MAIL, DATA, ENDED, QUEUED, REFUSED)}
                    first.kill()
                    traffic.killed = True
                    break
            time.sleep(0.002)
        killedAt = time.monotonic() - began
        first.wait()
    finally:
        traffic.stopping.set()
        end = time.monotonic() + JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))

    assert not [t.name for t in threads if t.is_alive()], "client threads did not finish"
    assert not traffic.errors, (
        "clients failed before the kill:\n" + "\n".join(traffic.errors) + "\n" + first.log()
    )
    assert stages[QUEUED] >= MIN_QUEUED, (
        f"only {stages[QUEUED]} messages queued before the kill\n{first.log()}"
    )
    assert partial, f"the trickle client was not mid-DATA at the kill: {stages}"
    assert inFlight, f"no client was in the middle of a transaction at the kill: {stages}"

    before = listSpool(spool)
    # The trickle client's 354 means relayd had created its tmp/ file.
    assert before["tmp"], f"tmp/ was empty at the kill: {before}"

    # Restart on the same spool: recovery runs before it listens.
    second = RelaydProcess(setup, tmp_path / "second.log")
    relaydProcesses.append(second)
    second.waitListening()
    second.terminate()
    status = second.wait()
    # twistd ends by re-raising the signal it stopped on: -SIGTERM is clean.
    assert status in (0, -signal.SIGTERM), (
        f"restarted relayd exited with {status} on SIGTERM\n{second.log()}"
    )

    problems, counts = checkSpool(spool, traffic)
    summary = (
        f"killed after {killedAt:.2f}s; clients' stages at the kill: {stages}; "
        f"before recovery: {len(before['tmp'])} in tmp/, {len(before['data'])} data, "
        f"{len(before['incoming'])} incoming; after: {counts}"
    )
    print(summary)
    assert not problems, (
        f"{len(problems)} problems:\n" + "\n".join(problems[:50]) + f"\n{summary}\n{second.log()}"
    )
    assert counts["envelopes"] == traffic.count(QUEUED) + counts["lost replies"]
    assert time.monotonic() - began < 30, f"took {time.monotonic() - began:.1f}s"
