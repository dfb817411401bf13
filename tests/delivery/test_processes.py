"""
Delivery processes around the queue manager (L{relayd.delivery.processes},
issue 14), and the durability test under load.

A real C{twistd relayd} with C{[server] processes = 2} (two receivers
beside the queue manager) and C{[delivery] processes = 2}: mail gets to
Postfix's smtp-sink through the delivery processes; a delivery process
killed with attempts in flight defers them (never lost, never counted
delivered) and is started again; SIGHUP and SIGTERM reach them; and under
smtp-source load, a delivery process and then the queue manager killed
with SIGKILL lose nothing that got a C{250}.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.config import ConfigError, load
from relayd.delivery.attempt import AttemptResult, RecipientResult
from relayd.delivery.client import Reply as ClientReply
from relayd.delivery.processes import DeliverRequest, decode, deferredResult, encode
from relayd.delivery.routing import Destination, Hop
from relayd.reply import Reply
from relayd.smtp.dsn import DSNParameters, RecipientRequest
from relayd.testing import PostfixSink, TestSetup
from relayd.testing.powercut import LoopFileSystem
from relayd.testing.process import (  # noqa: F401 (fixture)
    RelaydProcess,
    childPids,
    relaydProcesses,
    waitFor,
)
from tests.test_receivers import sendMany, tokensAt

MESSAGE_ID = re.compile(rb"^Message-Id: <([^>]+)>$", re.MULTILINE | re.IGNORECASE)
SUBJECT = "deliveryprocs-load"


def deliveryPids(parent: int) -> list[int]:
    return childPids(parent, "relayd.delivery.processes")


def receiverPids(parent: int) -> list[int]:
    return childPids(parent, "relayd.receivers")


def setupWith(tmp_path: Path, sinkPort: int, **delivery: object) -> TestSetup:
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={
            "server": {"processes": 2},
            "delivery": {
                "enabled": True,
                "processes": 2,
                "retry_initial": 1,
                "retry_max": 1,
                **delivery,
            },
            "timeouts": {"shutdown_sessions": 5, "shutdown_deliveries": 2},
        },
    )
    setup.routeAllTo(sinkPort)
    return setup


def waitAllReady(relayd: RelaydProcess) -> None:
    """Until both receivers and both delivery processes have said they run."""
    for line in (
        "receiver-1 receiving",
        "receiver-2 receiving",
        "delivery-1 delivering",
        "delivery-2 delivering",
    ):
        waitFor(lambda t=line: t in relayd.log(10**7), 30, f"no {line!r}", relayd.log)


@pytest.fixture
def sink():
    # smtp-sink runs as nobody: its folder must not be under pytest's 0700 tmp_path.
    directory = tempfile.mkdtemp(prefix="relayd-deliveryprocs-sink-")
    sink = PostfixSink(directory)
    yield sink
    sink.stop()
    shutil.rmtree(directory, True)


def test_processesConfig(tmp_path) -> None:
    """
    C{[delivery] processes}: "auto" follows C{[server] processes} (a single
    process delivers itself); a number is taken as it is; anything else is
    refused, naming the key.
    """

    def loaded(name: str, server: object, delivery: object = None) -> int:
        sections: dict[str, dict[str, object]] = {"server": {"processes": server}}
        if delivery is not None:
            sections["delivery"] = {"processes": delivery}
        setup = TestSetup(str(tmp_path / name), modes=("relay",), sections=sections)
        return load(setup.configPath).deliveryProcesses

    assert loaded("a", 3) == 3
    assert loaded("b", 1) == 0
    assert loaded("c", 2, "auto") == 2
    assert loaded("d", 1, 2) == 2
    assert loaded("e", 4, 0) == 0
    for n, bad in enumerate(("many", -1, 1.5)):
        with pytest.raises(ConfigError) as caught:
            loaded(f"bad{n}", 2, bad)
        assert caught.value.key == "delivery.processes"


def test_codecRoundTrip() -> None:
    """
    L{encode} and L{decode} carry a request (with its DSN parameters,
    SMTPUTF8 and REQUIRETLS) and a result (the replies as received, the
    command they answered) unchanged.
    """
    hop = Hop("mx.example.net", "192.0.2.1", 2525, "verify", "user", "pass word")
    dsn = DSNParameters(
        ret="HDRS",
        envid="env 1",
        recipients={
            "a@example.net": RecipientRequest(("SUCCESS", "FAILURE"), "rfc822;a@example.net"),
            "b\u00e9@example.net": RecipientRequest(None, None),
        },
    )
    request = DeliverRequest(
        Destination("route:0", (hop, Hop("b.example.net", "2001:db8::1", 25, "none"))),
        "",
        ("a@example.net", "b\u00e9@example.net"),
        "/var/spool/relayd/active/X",
        1234,
        "QID1",
        dsn,
        True,
        True,
    )
    line = encode(7, request)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == (7, request)
    plain = DeliverRequest(Destination("mx:example.net", ()), "s@x", ("r@y",), "/p", 1, None)
    assert decode(encode(1, plain)) == (1, plain)
    result = AttemptResult(
        [
            RecipientResult(
                "a@example.net",
                "delivered",
                ClientReply.parse(["250-2.0.0 ok", "250 2.0.0 queued as X"]),
                "mx",
                "end of DATA",
                True,
            ),
            RecipientResult(
                "b@example.net",
                "failed",
                ClientReply.parse(["550 no such user"]),
                "mx",
                "RCPT TO",
            ),
            RecipientResult(
                "c@example.net", "deferred", ClientReply.local(451, "4.4.1", "refused"), None
            ),
            RecipientResult("d@example.net", "failed", Reply(554, "5.7.10", "no TLS"), None),
        ],
        hop,
        "TLSv1.3 TLS_AES_256_GCM_SHA384",
    )
    number, back = decode(encode(8, result))
    assert (number, back) == (8, result)
    assert [type(r.reply) for r in back.results] == [type(r.reply) for r in result.results]
    empty = AttemptResult([], None, None)
    assert decode(encode(9, empty)) == (9, empty)
    deferred = deferredResult(["x@example.net"], "delivery process exited")
    assert [(r.status, r.code, r.enhanced, r.remoteHost) for r in deferred.results] == [
        ("deferred", 451, "4.3.0", None)
    ]


def test_deliveryProcessesDeliverAndFollowSignals(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    setup = setupWith(tmp_path, sink.port)
    relayd = RelaydProcess(setup, tmp_path / "relayd.log")
    relaydProcesses.append(relayd)
    relayd.waitListening()
    parent = relayd.process.pid
    waitAllReady(relayd)
    assert len(deliveryPids(parent)) == 2
    # Every process runs on relayd's reactor (relayd.reactor).
    text = relayd.log(10**7)
    assert "reactor class: relayd.reactor.EPollReactor." in text, text
    for label in (
        "receiver-1 receiving",
        "receiver-2 receiving",
        "delivery-1 delivering",
        "delivery-2 delivering",
    ):
        assert re.search(label + r" \(pid \d+, reactor relayd\.reactor\.EPollReactor\)", text), text

    accepted = sendMany(relayd.port, 60)
    assert len(accepted) == 60, relayd.log()
    waitFor(lambda: tokensAt(sink) >= set(accepted), 60, "not all delivered", relayd.log)
    # Log lines are written in batches (relayd.ops.logs): wait for them.
    waitFor(lambda: "status=sent" in relayd.log(10**7), 10, "no status=sent line", relayd.log)
    for state in ("incoming", "active", "deferred"):
        waitFor(
            lambda s=state: os.listdir(os.path.join(setup.spoolPath, s)) == [],
            10,
            f"{state}/ not empty",
            relayd.log,
        )

    os.kill(parent, signal.SIGHUP)
    for index in (1, 2):
        waitFor(
            lambda i=index: (
                f"[delivery-{i} relayd.service#info] reload: new config in force"
                in relayd.log(10**7)
            ),
            20,
            f"delivery-{index} did not reload",
            relayd.log,
        )

    children = deliveryPids(parent) + receiverPids(parent)
    relayd.terminate()
    status = relayd.wait(30)
    assert status in (0, -signal.SIGTERM), relayd.log()
    for pid in children:
        waitFor(lambda p=pid: not os.path.exists(f"/proc/{p}"), 10, f"child {pid} left over")


@contextlib.contextmanager
def hangingAttempts(tmp_path: Path, relaydProcesses: list[RelaydProcess]):  # noqa: F811
    """
    relayd with its delivery processes, and two messages whose attempts
    hang in them: the next hop accepts the connection and never greets.
    Yields the relayd and its setup once the attempts have reached the
    delivery processes.
    """
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(50)
    try:
        setup = setupWith(tmp_path, stalled.getsockname()[1], retry_initial=300, retry_max=300)
        relayd = RelaydProcess(setup, tmp_path / "relayd.log")
        relaydProcesses.append(relayd)
        relayd.waitListening()
        waitAllReady(relayd)
        accepted = sendMany(relayd.port, 2, clients=1)
        assert len(accepted) == 2, relayd.log()
        waitFor(
            lambda: len(os.listdir(os.path.join(setup.spoolPath, "active"))) == 2,
            20,
            "not in delivery",
            relayd.log,
        )
        time.sleep(0.5)  # the requests have reached the delivery processes
        yield relayd, setup
    finally:
        stalled.close()


def test_deliveryProcessKilledInFlightDefers(tmp_path, relaydProcesses) -> None:  # noqa: F811
    """
    A next hop that accepts the connection and never greets: the attempt
    is in flight in a delivery process when that process is killed.  The
    message is deferred with 451 4.3.0 (not lost, not sent), and the
    process is started again.
    """
    with hangingAttempts(tmp_path, relaydProcesses) as (relayd, setup):
        parent = relayd.process.pid
        before = deliveryPids(parent)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        waitFor(
            lambda: len(os.listdir(os.path.join(setup.spoolPath, "deferred"))) == 2,
            20,
            "not deferred",
            relayd.log,
        )
        waitFor(
            lambda: "status=deferred (451 4.3.0 delivery process exited)" in relayd.log(10**7),
            10,
            "no deferral line",
            relayd.log,
        )
        text = relayd.log(10**7)
        assert "attempts in flight; deferring them" in text, text
        assert "status=sent" not in text
        waitFor(
            lambda: len(deliveryPids(parent)) == 2 and not set(deliveryPids(parent)) & set(before),
            20,
            "the killed delivery processes were not replaced",
            relayd.log,
        )


def smtpSource(port: int, messages: int, sessions: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    return subprocess.Popen(
        [
            binary,
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            "2048",
            "-S",
            SUBJECT,
            "-f",
            "load@example.org",
            "-t",
            "sink@example.net",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def underLoad(port: int) -> Iterator[tuple[list[str], threading.Thread]]:
    """
    smtp-source's load (400 messages, 8 sessions) and 200 messages from
    four clients of our own to C{port}: yields the tokens of theirs that
    got a 250 (filled in as they do) and their thread; smtp-source is
    stopped on leaving.
    """
    load = smtpSource(port, 400, 8)
    accepted: list[str] = []
    client = threading.Thread(target=lambda: accepted.extend(sendMany(port, 200, clients=4)))
    client.start()
    try:
        yield accepted, client
    finally:
        if load.poll() is None:
            load.kill()
        load.wait(10)


def waitGone(pids: list[int]) -> None:
    """Until none of C{pids} runs: a killed queue manager's children stop by themselves."""
    for pid in pids:
        waitFor(lambda p=pid: not os.path.exists(f"/proc/{p}"), 20, "a child outlived its manager")


def restartedDelivers(
    setup: TestSetup,
    tmp_path: Path,
    processes: list[RelaydProcess],
    first: RelaydProcess,
    sink: PostfixSink,
    accepted: list[str],
    before: str = "",
) -> RelaydProcess:
    """
    Start relayd again on C{setup} after C{first} was killed, and wait
    until the sink holds every message of C{accepted} (C{before} says what
    it held before, in the failure).
    """
    second = RelaydProcess(setup, tmp_path / "second.log")
    processes.append(second)
    second.waitListening()
    waitFor(
        lambda: tokensAt(sink) >= set(accepted),
        60,
        f"accepted mail lost: {len(set(accepted) - tokensAt(sink))} of {len(accepted)}"
        + (f" ({before} the restart)" if before else ""),
        lambda: first.log() + second.log(),
    )
    return second


def test_killedUnderLoadLosesNothing(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    The durability test under load (issue 14): smtp-source load plus
    clients of our own that record which of their messages got a 250, to
    relayd with two receivers and two delivery processes; SIGKILL to a
    delivery process, then to the queue manager, mid-run; a restart on the
    same spool delivers every message that got a 250.
    """
    setup = setupWith(tmp_path, sink.port)
    first = RelaydProcess(setup, tmp_path / "first.log")
    relaydProcesses.append(first)
    first.waitListening()
    parent = first.process.pid
    waitAllReady(first)
    children = deliveryPids(parent) + receiverPids(parent)

    with underLoad(first.port) as (accepted, client):
        time.sleep(1.0)
        os.kill(deliveryPids(parent)[0], signal.SIGKILL)
        time.sleep(1.0)
        first.kill()
        first.wait(10)
        waitGone(children)
        client.join(60)
    assert accepted, first.log()
    assert re.search(r"delivery-\d exited \(", first.log(10**7)), first.log()
    deliveredBefore = len(tokensAt(sink))

    second = restartedDelivers(
        setup, tmp_path, relaydProcesses, first, sink, accepted, f"{deliveredBefore} before"
    )
    # What smtp-source got a 250 for is in the spool or at the sink: the
    # spool drains (retries every second) and nothing is left behind.
    for state in ("incoming", "active", "deferred"):
        waitFor(
            lambda s=state: os.listdir(os.path.join(setup.spoolPath, s)) == [],
            30,
            f"{state}/ not empty",
            second.log,
        )
    ids = set()
    for text in sink.messages():
        for block in text.split(b"X-Client-Addr:"):
            if f"Subject: {SUBJECT}".encode() in block:
                ids.update(MESSAGE_ID.findall(block))
    assert ids, "smtp-source's load did not get through"


def test_shutdownDeadlineAbortsDeliveryProcesses(tmp_path, relaydProcesses) -> None:  # noqa: F811
    """
    SIGTERM while attempts hang in the delivery processes (a next hop that
    never greets): at C{shutdown_deliveries} the queue manager has them cut
    their connections; the attempts come back deferred, are recorded, and
    every process exits.
    """
    with hangingAttempts(tmp_path, relaydProcesses) as (relayd, setup):
        parent = relayd.process.pid
        children = deliveryPids(parent) + receiverPids(parent)
        started = time.monotonic()
        relayd.terminate()
        status = relayd.wait(30)
        assert status in (0, -signal.SIGTERM), relayd.log()
        assert time.monotonic() - started < 20
        text = relayd.log(10**7)
        assert "deadline reached; aborting 2 deliveries in flight" in text, text
        assert "ended with" not in text, text  # answered, not lost with a process
        assert len(os.listdir(os.path.join(setup.spoolPath, "deferred"))) == 2, text
        assert "status=sent" not in text
        for pid in children:
            waitFor(lambda p=pid: not os.path.exists(f"/proc/{p}"), 10, f"child {pid} left over")


def test_chooseKeepsADestinationToOneProcessWhileBalanced() -> None:
    """
    The same destination goes to the same process (its cached connections)
    while the processes are about equally busy; when that one is more than
    L{SLACK} attempts busier than the least busy, the next goes elsewhere;
    different destinations spread over the processes.
    """
    from twisted.internet.task import Clock

    from relayd.delivery.processes import SLACK, DeliveryPool, _DeliveryProcess

    pool = DeliveryPool(configPath="unused", count=4, reactor=Clock(), stopDeadline=1)
    for index in range(1, 5):
        pool.children[index] = _DeliveryProcess(pool, index)
    first = pool._choose("route:0")
    assert first is not None
    assert all(pool._choose("route:0") is first for _ in range(10))
    for n in range(SLACK):
        first.inFlight[n] = (None, ())  # type: ignore[assignment]
    assert pool._choose("route:0") is first
    first.inFlight[SLACK] = (None, ())  # type: ignore[assignment]
    other = pool._choose("route:0")
    assert other is not None and other is not first
    first.inFlight.clear()
    homes = {pool._choose(f"mx:domain{n}.example") for n in range(40)}
    assert len(homes) == 4


def test_powerCutUnderLoadLosesNothing(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    A power cut under load: relayd with two receivers, its spool on a file
    system of its own (L{LoopFileSystem}) that loses everything not yet on
    its disk mid-run; then relayd is killed, the file system mounted again
    and relayd started on it with delivery on: every message that got a
    250 reaches the sink.  Delivery is off before the cut, so that what
    got a 250 is still in the spool, and the journals must bring back the
    queue files the cut took.
    """
    why = LoopFileSystem.available()
    if why is not None:
        pytest.skip(why)
    setup = setupWith(tmp_path, sink.port, enabled=False)
    fileSystem = LoopFileSystem(setup.spoolPath)
    try:
        first = RelaydProcess(setup, tmp_path / "first.log")
        relaydProcesses.append(first)
        first.waitListening()
        parent = first.process.pid
        for line in ("receiver-1 receiving", "receiver-2 receiving"):
            waitFor(lambda text=line: text in first.log(10**7), 30, f"no {line!r}", first.log)
        children = receiverPids(parent)

        with underLoad(first.port) as (accepted, client):
            time.sleep(1.0)
            fileSystem.cut()
            client.join(60)
            first.kill()
            first.wait(10)
            waitGone(children)
        assert accepted, first.log()
        fileSystem.remount()
        with open(setup.configPath) as f:
            config = f.read()
        with open(setup.configPath, "w") as f:
            f.write(config.replace("enabled = false", "enabled = true", 1))

        second = restartedDelivers(setup, tmp_path, relaydProcesses, first, sink, accepted)
        text = second.log(10**7)
        assert "restored from the journal" in text, text[-5000:]
        second.terminate()
        second.wait(30)
    finally:
        fileSystem.remove()
