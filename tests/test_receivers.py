"""
Several receiving processes around one queue manager (L{relayd.receivers},
issue 14): a real C{twistd relayd} with C{[server] processes = 2} shares
its listening socket with two receiver processes, and leaves the
connections to them while one is ready.

Mail accepted by any process is delivered (to Postfix's smtp-sink) by the
queue manager, promptly and completely; the receivers take the
connections, and the queue manager only while none is running; SIGHUP and
SIGTERM reach the receivers; a receiver that dies is started again; when
the queue manager is killed with SIGKILL the receivers stop by themselves,
and a restart delivers everything that got a C{250}.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relayd.config import load
from relayd.receivers import NOTICE_FD, REFUSAL_GRACE, ChildProcess, NoticePipe, ReceiverPool
from relayd.smtp.session import ConnectionLimits
from relayd.testing import DEMO_USER, PostfixSink, TestSetup, freePort
from relayd.testing.process import (  # noqa: F401 (fixture)
    RelaydProcess,
    childPids,
    relaydProcesses,
    waitFor,
)

TOKEN = re.compile(rb"X-Token: ([0-9a-f-]+)")
HANDED_OVER = "ready: new connections are the receivers'"
TAKEN_BACK = "no receiver is running: the queue manager accepts connections"
PROCESSES = 2


def receiverPids(parent: int) -> list[int]:
    """The pids of C{parent}'s children running C{relayd.receivers}."""
    return childPids(parent, "relayd.receivers")


def waitReady(relayd: RelaydProcess) -> None:
    """Until every receiver has said it is receiving."""
    for index in range(1, PROCESSES + 1):
        waitFor(
            lambda i=index: (
                f"[receiver-{i} relayd.receivers#info] receiver-{i} receiving" in relayd.log(10**7)
            ),
            30,
            f"receiver-{index} not ready",
            relayd.log,
        )
    # ... and the queue manager has left new connections to them.
    waitFor(
        lambda: HANDED_OVER in relayd.log(10**7), 10, "the queue manager still accepts", relayd.log
    )


def startWithReceivers(
    setup: TestSetup, logPath: Path, started: list[RelaydProcess]
) -> RelaydProcess:
    """
    Start C{twistd relayd} on C{setup} (added to C{started}, the
    C{relaydProcesses} fixture), and wait until it listens and each of its
    C{PROCESSES} receivers has said it is receiving.
    """
    relayd = RelaydProcess(setup, logPath)
    started.append(relayd)
    relayd.waitListening()
    waitFor(
        lambda: len(receiverPids(relayd.process.pid)) == PROCESSES,
        20,
        "receivers did not start",
        relayd.log,
    )
    waitReady(relayd)
    return relayd


def tokensAt(sink: PostfixSink) -> set[str]:
    found: set[str] = set()
    for text in sink.messages():
        found.update(t.decode() for t in TOKEN.findall(text))
    return found


def sendMany(port: int, count: int, clients: int = 6) -> list[str]:
    """C{count} messages from C{clients} threads; the tokens that got a 250."""
    accepted: list[str] = []
    lock = threading.Lock()
    per = count // clients

    def client(n: int) -> None:
        for i in range(per):
            token = f"{n}-{i}-{secrets.token_hex(4)}"
            message = f"Subject: {token}\r\nX-Token: {token}\r\n\r\nhello\r\n".encode()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                    s.sendmail(f"c{n}@example.org", [f"r{n}@example.net"], message)
            except (smtplib.SMTPException, OSError):
                continue
            with lock:
                accepted.append(token)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return accepted


@pytest.fixture
def sink():
    # smtp-sink runs as nobody: its folder must not be under pytest's 0700 tmp_path.
    directory = tempfile.mkdtemp(prefix="relayd-receivers-sink-")
    sink = PostfixSink(directory)
    yield sink
    sink.stop()
    shutil.rmtree(directory, True)


def metricTotal(metricsPort: int, name: str) -> float:
    """The samples of C{name} added up over every label, from one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def acceptedTotal(metricsPort: int) -> float:
    """relayd_messages_accepted_total over every listener, from one scrape."""
    return metricTotal(metricsPort, "relayd_messages_accepted_total")


def statusConnections(setup: TestSetup) -> int:
    """The connections C{relayctl status --json} counts."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relayd.ops.relayctl",
            "--config",
            setup.configPath,
            "status",
            "--json",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return int(json.loads(done.stdout)["connections"])


def relaydWith(
    tmp_path: Path, sinkPort: int, processes: int = PROCESSES, metricsPort: int = 0
) -> TestSetup:
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={
            "metrics": (
                {"endpoint": f"tcp:{metricsPort}:interface=127.0.0.1"} if metricsPort else {}
            ),
            "server": {"processes": processes},
            "delivery": {"enabled": True, "retry_initial": 1, "retry_max": 1},
            "timeouts": {"shutdown_sessions": 5, "shutdown_deliveries": 2},
        },
    )
    setup.routeAllTo(sinkPort)
    return setup


def test_receiversTakeMailTheQueueManagerDelivers(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    metricsPort = freePort()
    setup = relaydWith(tmp_path, sink.port, metricsPort=metricsPort)
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)

    accepted = sendMany(relayd.port, 240)
    assert len(accepted) == 240, relayd.log()
    waitFor(lambda: tokensAt(sink) >= set(accepted), 60, "not all delivered", relayd.log)
    assert tokensAt(sink) == set(accepted)

    def connects() -> tuple[int, int]:
        """Connections each side accepted since the receivers took over."""
        text = relayd.log(10**7).split(HANDED_OVER, 1)[1]
        byReceivers = len(re.findall(r"\[receiver-\d relayd\.smtpd#info\] \w+: connect from", text))
        byManager = len(re.findall(r"\[relayd\.smtpd#info\] \w+: connect from", text))
        return byManager, byReceivers

    # Log lines are written in batches (relayd.ops.logs): wait for them all.
    waitFor(lambda: sum(connects()) >= 240, 10, "connect lines missing", relayd.log)
    byManager, byReceivers = connects()
    # Every connection went to a receiver: the queue manager had left them
    # to the receivers before the first one came.
    assert (byManager, byReceivers) == (0, 240)
    text = relayd.log(10**7)
    # The receivers' messages were attempted at once (the notice pipe),
    # not found by a sweep minutes later; every one was removed.
    assert "could not" not in text, text[-5000:]
    for state in ("incoming", "active", "deferred"):
        assert os.listdir(os.path.join(setup.spoolPath, state)) == []
    # One metrics page counts every process (receivers send snapshots
    # every few seconds); the sum never goes down when a receiver ends.
    waitFor(lambda: acceptedTotal(metricsPort) == 240, 30, "metrics do not add up", relayd.log)
    # The receivers' journal counts are added up too.
    waitFor(
        lambda: metricTotal(metricsPort, "relayd_journal_commits_total") >= 240,
        30,
        "journal commits not added up",
        relayd.log,
    )

    # relayctl status counts the receivers' open connections.
    assert statusConnections(setup) == 0
    with socket.create_connection(("127.0.0.1", relayd.port), timeout=10) as held:
        assert held.recv(512).startswith(b"220 ")
        waitFor(lambda: statusConnections(setup) == 1, 20, "not counted", relayd.log)

    victims = receiverPids(relayd.process.pid)
    os.kill(victims[0], signal.SIGKILL)
    waitFor(lambda: victims[0] not in receiverPids(relayd.process.pid), 20, "not reaped")
    waitFor(lambda: "exited (" in relayd.log(10**7), 20, "no exit line", relayd.log)
    assert acceptedTotal(metricsPort) == 240
    # One receiver left: the queue manager still leaves connections to it.
    assert TAKEN_BACK not in relayd.log(10**7)

    # With every receiver gone, the queue manager accepts until one is
    # back (a receiver killed is started again a second later).  Mail
    # just committed leaves the receivers' journal segments live.
    assert len(sendMany(relayd.port, 18)) == 18
    dead = receiverPids(relayd.process.pid)
    for victim in dead:
        os.kill(victim, signal.SIGKILL)
    # The queue manager retires the segments the dead receivers left.
    journal = os.path.join(setup.spoolPath, "journal")
    waitFor(
        lambda: not [n for n in os.listdir(journal) if int(n.partition(".")[0]) in dead],
        20,
        "dead receivers' journal segments left",
        relayd.log,
    )
    waitFor(lambda: TAKEN_BACK in relayd.log(10**7), 20, "nobody accepts", relayd.log)
    assert sendMany(relayd.port, 1, clients=1) != []
    waitFor(lambda: connects()[0] == 1, 10, "not the queue manager's", relayd.log)
    # A receiver is back, and takes the connections again.
    waitFor(lambda: relayd.log(10**7).count(HANDED_OVER) == 2, 30, "not handed over", relayd.log)
    waitFor(lambda: acceptedTotal(metricsPort) == 241, 30, "metrics do not add up", relayd.log)


def greeting(port: int, source: str) -> tuple[socket.socket, bytes]:
    """A connection from C{source} (a loopback address) and its first reply line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def test_limitsCountEveryProcess(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    C{[limits] connections} and C{connections_per_client} hold for the
    whole relayd, not each process: the queue manager counts the
    receivers' connections (L{relayd.receivers.SharedLimits}), gives a
    slot back when its connection ends, and every slot of a receiver that
    died.
    """
    setup = relaydWith(tmp_path, sink.port)
    with open(setup.configPath, "a") as f:
        f.write("\n[limits]\nconnections = 5\nconnections_per_client = 3\n")
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)
    held: list[socket.socket] = []
    try:
        replies = []
        for _ in range(8):
            sock, reply = greeting(relayd.port, "127.0.0.1")
            held.append(sock)
            replies.append(reply[:3])
        # Whichever receiver took each: three in, the rest refused.
        assert replies == [b"220"] * 3 + [b"421"] * 5, (replies, relayd.log())
        refused = relayd.log().count("refused [127.0.0.1]: too many connections from your address")
        assert refused == 5, relayd.log()
        # Two more from another address, then the total is reached.
        for expected in (b"220", b"220", b"421"):
            sock, reply = greeting(relayd.port, "127.0.0.2")
            held.append(sock)
            assert reply[:3] == expected, (reply, relayd.log())
        assert reply.startswith(b"421 4.7.0 ") and b"too many connections" in reply
        for sock in held[3:]:
            sock.close()

        # A session that ends gives its slot back to every process.
        held[0].sendall(b"QUIT\r\n")
        assert held[0].recv(512).startswith(b"221 ")
        held[0].close()

        def again() -> bool:
            sock, reply = greeting(relayd.port, "127.0.0.1")
            held.append(sock)
            return reply.startswith(b"220 ")

        waitFor(again, 10, "the slot was not given back", relayd.log)

        # Every receiver killed (their connections die with them): the
        # queue manager, accepting until one is back, has all their slots.
        for victim in receiverPids(relayd.process.pid):
            os.kill(victim, signal.SIGKILL)
        waitFor(lambda: TAKEN_BACK in relayd.log(10**7), 20, "nobody accepts", relayd.log)
        replies = []
        for _ in range(4):
            sock, reply = greeting(relayd.port, "127.0.0.1")
            held.append(sock)
            replies.append(reply[:3])
        assert replies == [b"220"] * 3 + [b"421"], (replies, relayd.log())
    finally:
        for sock in held:
            sock.close()


def test_limitsReconnectAtOnce(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    A client at exactly C{connections_per_client} that reconnects the
    moment it reads the 221 is never refused: smtp-source with 20 sessions
    of one message each at the default limit of 20 (it stops at the first
    421), whichever receivers each session's end and the next connection
    land on.  The queue manager reads every receiver's pipe before it
    refuses (L{relayd.receivers.ReceiverPool.admitOrWait}).
    """
    setup = relaydWith(tmp_path, sink.port)
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)
    source = subprocess.run(
        [
            shutil.which("smtp-source") or "/usr/sbin/smtp-source",
            "-s",
            "20",
            "-m",
            "4000",
            "-l",
            "4096",
            "-f",
            "load@example.org",
            "-t",
            "sink@example.net",
            f"127.0.0.1:{relayd.port}",
        ],
        capture_output=True,
        timeout=120,
    )
    assert source.returncode == 0, (source.stderr, relayd.log())
    assert "too many connections" not in relayd.log(10**7)


def test_countersCountEveryProcess(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    Rate counters kept in memory are the whole relayd's: a C{ratelimit}
    policy with the memory backend and the AUTH lockout count every
    process's messages and failures in the queue manager
    (L{relayd.receivers.QueueManagerStore}), whichever receiver each
    connection lands on.
    """
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay", "submission"),
        portZero=False,
        chain=["ratelimit", "mynetworks", "authenticated"],
        policies={
            "ratelimit": {
                "rules": [{"name": "per-client", "key": "client", "messages": ["4/hour"]}]
            }
        },
        sections={
            "server": {"processes": PROCESSES},
            "auth": {"client_failure_limit": 3, "user_failure_limit": 0},
        },
    )
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)

    codes = []
    for n in range(8):
        with smtplib.SMTP("127.0.0.1", relayd.port, timeout=30) as s:
            try:
                s.sendmail("app@example.org", ["r@example.net"], b"Subject: %d\r\n\r\nhi\r\n" % n)
                codes.append(250)
            except smtplib.SMTPResponseException as e:
                codes.append(e.smtp_code)
            except smtplib.SMTPRecipientsRefused as e:
                codes.append(e.recipients["r@example.net"][0])
    assert codes == [250] * 4 + [450] * 4, (codes, relayd.log())

    def login() -> int:
        with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as s:
            s.starttls(context=setup.clientContext())
            s.ehlo()
            s.user, s.password = DEMO_USER, "not the password"
            try:
                s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code
            return 235

    assert [login() for _ in range(6)] == [535] * 3 + [454] * 3, relayd.log()


def test_signalsReachReceivers(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    setup = relaydWith(tmp_path, sink.port)
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)
    parent = relayd.process.pid

    os.kill(parent, signal.SIGHUP)
    for index in range(1, PROCESSES + 1):
        waitFor(
            lambda i=index: (
                f"[receiver-{i} relayd.service#info] reload: new config in force"
                in relayd.log(10**7)
            ),
            20,
            f"receiver-{index} did not reload",
            relayd.log,
        )

    # A receiver killed outright is started again.
    victim = receiverPids(parent)[0]
    os.kill(victim, signal.SIGKILL)
    waitFor(
        lambda: (
            "exited (" in relayd.log(10**7)
            and len(receiverPids(parent)) == PROCESSES
            and victim not in receiverPids(parent)
        ),
        20,
        "the killed receiver was not replaced",
        relayd.log,
    )

    children = receiverPids(parent)
    relayd.terminate()
    status = relayd.wait(30)
    assert status in (0, -signal.SIGTERM), relayd.log()
    for pid in children:
        waitFor(lambda p=pid: not os.path.exists(f"/proc/{p}"), 10, f"receiver {pid} left over")


def test_queueManagerKilledReceiversStop(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    SIGKILL to the queue manager under load: the receivers notice (end of
    file on their standard input) and stop; nothing that got a 250 is lost,
    the next start delivers it.
    """
    setup = relaydWith(tmp_path, sink.port)
    first = startWithReceivers(setup, tmp_path / "first.log", relaydProcesses)
    parent = first.process.pid
    children = receiverPids(parent)

    accepted: list[str] = []
    done = threading.Event()

    def load() -> None:
        accepted.extend(sendMany(first.port, 120))
        done.set()

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.5)
    first.kill()
    first.wait(10)
    for pid in children:
        waitFor(lambda p=pid: not os.path.exists(f"/proc/{p}"), 20, "receiver outlived its manager")
    loader.join(120)

    second = RelaydProcess(setup, tmp_path / "second.log")
    relaydProcesses.append(second)
    second.waitListening()
    waitFor(lambda: tokensAt(sink) >= set(accepted), 60, "accepted mail lost", second.log)


def test_restartWaitsForTheOldReceivers(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    """
    SIGKILL to the queue manager while a client is in DATA with a
    receiver: a relayd started at once on the same spool waits for that
    receiver, which holds the spool's lock, instead of recovering the
    spool under it (recovery removes what is in C{tmp/}, the message the
    client is sending).  The client's message gets its 250 from the old
    receiver, and the new relayd delivers it.
    """
    setup = relaydWith(tmp_path, sink.port)
    first = startWithReceivers(setup, tmp_path / "first.log", relaydProcesses)
    token = secrets.token_hex(8)
    client = smtplib.SMTP("127.0.0.1", first.port, timeout=30)
    client.ehlo("held.example")
    client.mail("held@example.org")
    client.rcpt("held@example.net")
    code, reply = client.docmd("DATA")
    assert code == 354, reply
    client.send(f"Subject: held\r\nX-Token: {token}\r\n\r\nhello\r\n".encode())

    first.kill()
    first.wait(10)
    second = RelaydProcess(setup, tmp_path / "second.log")
    relaydProcesses.append(second)
    waitFor(
        lambda: "waiting up to 15s for its receivers to stop" in second.log(),
        30,
        "the new relayd did not wait for the old receivers",
        second.log,
    )
    client.send(b".\r\n")
    code, reply = client.getreply()
    assert code == 250, reply
    client.close()
    second.waitListening()
    assert "spool lock taken after" in second.log(10**7), second.log()
    assert "Traceback" not in first.log(10**7), first.log()
    waitFor(lambda: token in tokensAt(sink), 60, "the held message was lost", second.log)


def test_processesConfig(tmp_path) -> None:
    setup = TestSetup(str(tmp_path / "a"), modes=("relay",), sections={"server": {"processes": 0}})
    assert load(setup.configPath).processes == max(1, os.cpu_count() or 1)
    # Memory rate counters are the queue manager's, for every process:
    # they no longer bring the automatic choice down to 1.
    setup = TestSetup(
        str(tmp_path / "b"),
        modes=("relay",),
        chain=["ratelimit", "mynetworks"],
        sections={"server": {"processes": 0}},
        policies={"ratelimit": {"rules": []}},
    )
    assert load(setup.configPath).processes == max(1, os.cpu_count() or 1)


def _pool(clock: Clock, count: int, **kwargs: Any) -> ReceiverPool:
    """A queue manager's L{ReceiverPool} of C{count}, on C{clock}, with no process started."""
    return ReceiverPool(
        configPath="-",
        count=count,
        listeners=[],
        spool=None,
        reactor=clock,
        stopDeadline=1,
        **kwargs,
    )


class _Pipe:
    """The notice pipe's write end, as a receiver's L{SharedLimits} sees it."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines += data.splitlines()

    writeNow = write


def test_sharedLimitsAnswers() -> None:
    """
    A receiver's limits ask the queue manager and take its answer; a
    refusal gives the local slot back too; each end is told.
    """
    from twisted.internet.task import Clock

    from relayd.receivers import QueueManagerLink, SharedLimits

    pipe = _Pipe()
    link = QueueManagerLink(Clock(), pipe)
    limits = SharedLimits(10, 2, link)
    answers: list[str | None] = []
    first = limits.open("192.0.2.1")
    second = limits.open("192.0.2.1")
    assert isinstance(first, Deferred) and isinstance(second, Deferred)
    first.addCallback(answers.append)
    second.addCallback(answers.append)
    assert pipe.lines == [b"open 1 192.0.2.1", b"open 2 192.0.2.1"]
    # Over the limit here already: refused without asking.
    assert limits.open("192.0.2.1") == "too many connections from your address"
    link.answer(b"answer 2 too many connections")
    link.answer(b"answer 1 ")
    assert answers == ["too many connections", None]
    assert limits.byClient == {"192.0.2.1": 1}
    limits.close("192.0.2.1")
    assert pipe.lines[-1] == b"close 192.0.2.1"
    assert limits.current == 0


def test_sharedLimitsQueueManagerSilent() -> None:
    """
    A queue manager that does not answer within ASK_TIMEOUT does not keep
    the client out: it is let in on this process's counts, and a late
    answer changes nothing.
    """
    from twisted.internet.task import Clock

    from relayd.receivers import ASK_TIMEOUT, QueueManagerLink, SharedLimits

    clock = Clock()
    link = QueueManagerLink(clock, _Pipe())
    limits = SharedLimits(10, 2, link)
    answers: list[str | None] = []
    waiting = limits.open("192.0.2.1")
    assert isinstance(waiting, Deferred)
    waiting.addCallback(answers.append)
    clock.advance(ASK_TIMEOUT - 0.1)
    assert answers == []
    clock.advance(0.1)
    assert answers == [None]
    link.answer(b"answer 1 too many connections")
    assert answers == [None] and limits.byClient == {"192.0.2.1": 1}
    assert not clock.getDelayedCalls()


def test_queueManagerStore() -> None:
    """
    A receiver's rate counters are the queue manager's: each call is a
    question on the pipe, answered by the queue manager's MemoryStore
    (L{ReceiverPool.counted}); a silent queue manager fails the call.
    """
    from twisted.internet.task import Clock

    from relayd.policies.ratecounter import MemoryStore
    from relayd.receivers import (
        ASK_TIMEOUT,
        QueueManagerLink,
        QueueManagerSilent,
        QueueManagerStore,
    )

    clock = Clock()
    pipe = _Pipe()
    link = QueueManagerLink(clock, pipe)
    store = QueueManagerStore(link)
    pool = _pool(clock, 1, counters=MemoryStore(clock))

    def serve() -> None:
        """What the queue manager answers to the last question."""
        word, _, argument = pipe.lines[-1].partition(b" ")
        assert word == b"count"
        token, _, question = argument.partition(b" ")
        pool.counted(question).addCallback(
            lambda payload: link.answer(b"answer %s %s" % (token, payload))
        )

    results: list[object] = []
    counter = ("relayd:rl:test", 1, 2, 60)
    for _ in range(3):
        store.reserve([counter]).addCallback(results.append)
        serve()
    store.peek([counter]).addCallback(results.append)
    serve()
    assert results == [None, None, 0, 0]
    store.release([counter]).addCallback(results.append)
    serve()
    store.reserve([counter]).addCallback(results.append)
    serve()
    assert results[4:] == [None, None]
    # A question the queue manager does not know is refused, not crashed on.
    refused = []
    pool.counted(b"drop []").addCallback(refused.append)
    assert refused[0].startswith(b"!no such question")

    failures = []
    store.peek([counter]).addErrback(failures.append)
    clock.advance(ASK_TIMEOUT)
    assert failures and failures[0].check(QueueManagerSilent)


class _Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class _ChildTransport:
    """A receiver as the queue manager sees it: a real notice pipe, and what it is told."""

    def __init__(self) -> None:
        self.read, self.writeEnd = os.pipe()
        os.set_blocking(self.read, False)
        self.pipes = {NOTICE_FD: _Reader(self.read)}
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        os.close(self.read)
        os.close(self.writeEnd)


class _RetiringSpool:
    """Records which processes' journal segments the pool retires."""

    def __init__(self) -> None:
        self.retired: list[int] = []

    def retireSegmentsOf(self, pid: int) -> None:
        self.retired.append(pid)


def test_noticesAfterTheQueueManagerIsGone() -> None:
    """
    Once the pipe to the queue manager is gone (its writer dropped), a
    line to it is dropped, not an error in the session that sends it.
    """

    class Stdio:
        _writer = None

    NoticePipe(Stdio()).writeNow(b"close 127.0.0.1\n")


def test_endedReceiversJournalRetired() -> None:
    """
    When a receiver ends, the queue manager has the spool retire the
    journal segments of its pid (L{relayd.queue.spool.Spool.retireSegmentsOf},
    tested on real segments in L{tests.queue.test_journal}).
    """
    spool = _RetiringSpool()
    pool = _pool(Clock(), 1)
    pool.spool = spool
    child = ChildProcess(pool, 1)
    child.pid = 4242
    pool.children[1] = child
    pool.childEnded(child)
    assert spool.retired == [4242]


def _poolWithTwoReceivers(perClient: int) -> tuple[Clock, ReceiverPool, list[ChildProcess]]:
    clock = Clock()
    pool = _pool(clock, 2, limits=ConnectionLimits(10, perClient))
    children = []
    for index in (1, 2):
        child = ChildProcess(pool, index)
        child.transport = _ChildTransport()  # type: ignore[assignment]
        pool.children[index] = child
        children.append(child)
    return clock, pool, children


def test_refusalReadsEveryPipeFirst() -> None:
    """
    Before it refuses a connection the queue manager reads every receiver's
    pipe to its end, on the next reactor turn: a client's session that
    ended on receiver 1 (its close written, not yet read) and its next
    connection on receiver 2 at the per-client limit is admitted.
    """
    clock, pool, (first, second) = _poolWithTwoReceivers(1)
    try:
        first.childDataReceived(NOTICE_FD, b"open 1 192.0.2.1\n")
        assert first.transport.written == [b"answer 1 \n"]
        os.write(first.transport.writeEnd, b"close 192.0.2.1\n")
        second.childDataReceived(NOTICE_FD, b"open 1 192.0.2.1\n")
        clock.advance(0)
        assert second.transport.written == [b"answer 1 \n"]
        assert pool.connections[second] == {"192.0.2.1": 1}
        assert pool.connections[first] == {}
        # Over the limit for real: refused after the grace.
        first.childDataReceived(NOTICE_FD, b"open 2 192.0.2.1\n")
        clock.advance(0)
        assert first.transport.written == [b"answer 1 \n"]
        clock.advance(REFUSAL_GRACE)
        assert first.transport.written[-1] == b"answer 2 too many connections from your address\n"
    finally:
        first.transport.close()
        second.transport.close()


def test_refusalAfterTheBusyReceiversLines() -> None:
    """
    The lines a receiver wrote after a connection's C{open} count before
    the refusal is decided, and only then the other pipes: with two slots,
    sessions W (receiver 1) and Y (receiver 2) open, W ends and X opens on
    receiver 2, then Y ends and Z opens on receiver 1.  Read receiver 2
    first: X waits, Y's close is counted, then receiver 1's lines; X and Z
    are both admitted (reading receiver 1 in the middle of receiver 2's
    lines would have counted Z before Y's close and refused X).
    """
    clock, pool, (first, second) = _poolWithTwoReceivers(2)
    try:
        first.childDataReceived(NOTICE_FD, b"open 1 192.0.2.1\n")  # W
        second.childDataReceived(NOTICE_FD, b"open 1 192.0.2.1\n")  # Y
        os.write(first.transport.writeEnd, b"close 192.0.2.1\nopen 2 192.0.2.1\n")  # W ends, Z
        second.childDataReceived(NOTICE_FD, b"open 2 192.0.2.1\nclose 192.0.2.1\n")  # X, Y ends
        clock.advance(0)
        assert first.transport.written == [b"answer 1 \n", b"answer 2 \n"]
        assert second.transport.written == [b"answer 1 \n", b"answer 2 \n"]
        assert not clock.getDelayedCalls()
        assert pool.limits is not None and pool.limits.current == 2
    finally:
        first.transport.close()
        second.transport.close()
