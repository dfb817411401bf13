"""
A real load balancer in front of two relayd instances (issue 10 item 2).

HAProxy (started by the test on loopback ports, never as a system service)
balances round robin over two C{twistd relayd} processes with
C{send-proxy-v2}; each instance has its own spool, both share one
C{redis-server} started by the test, and instance A runs two receiving
processes (C{[server] processes = 2}), so a limit must hold across
instances and across the processes of one.  Clients reach HAProxy from
distinct loopback addresses (127.0.0.x), which relayd must see through the
PROXY header.

  - a per-user limit of N messages is held exactly over both instances: N
    accepted in total, the rest C{450 4.7.1};
  - a per-client limit counts the PROXY source address, not HAProxy's;
  - C{Received:} and the logs carry the real client address;
  - an instance killed (SIGKILL) mid-run loses nothing it acknowledged:
    its spool is delivered when it starts again.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import smtplib
import ssl
import tempfile
import threading
from pathlib import Path

import pytest

from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    PostfixSink,
    RedisServer,
    TestSetup,
    freePort,
)
from relayd.testing.process import RelaydProcess, waitFor
from tests.interop.test_haproxy import HAProxy

TOKEN = re.compile(rb"X-Token: ([\w-]+)")
USER_LIMIT = 4
CLIENT_LIMIT = 3


class Instance:
    """One relayd instance: its config, its spool, its twistd process."""

    def __init__(self, name: str, directory: Path, redisUrl: str, sinkPort: int, processes: int):
        self.name = name
        self.directory = directory
        self.processes = processes
        self.setup = TestSetup(
            str(directory / name),
            modes=("relay", "submissions"),
            portZero=False,
            chain=["ratelimit", "mynetworks", "authenticated"],
            sections={
                "server": {"processes": processes, "hostname": f"relayd-{name}.test"},
                "delivery": {"enabled": True, "retry_initial": 1, "retry_max": 1},
                "timeouts": {"shutdown_sessions": 5, "shutdown_deliveries": 2},
            },
            policies={
                "ratelimit": {
                    "backend": "redis",
                    "redis_url": redisUrl,
                    "redis_timeout": 2.0,
                    "rules": [
                        {"name": "per-user", "key": "user", "messages": [f"{USER_LIMIT}/hour"]},
                        {"name": "per-client", "key": "client", "messages": ["3/hour"]},
                    ],
                },
                "mynetworks": {"networks": ["127.0.0.0/8"]},
            },
        )
        with open(self.setup.configPath) as f:
            text = f.read()
        text = text.replace(
            'mode = "', 'proxy_protocol = true\nproxy_from = ["127.0.0.1/32"]\nmode = "'
        )
        text += (
            '\n[[routes]]\ndomains = ["*"]\n[[routes.hops]]\n'
            f'host = "127.0.0.1"\nport = {sinkPort}\ntls = "none"\n'
        )
        with open(self.setup.configPath, "w") as f:
            f.write(text)
        self.runs = 0
        self.process: RelaydProcess | None = None

    def start(self) -> None:
        self.runs += 1
        self.process = RelaydProcess(self.setup, self.directory / f"{self.name}-{self.runs}.log")
        port = self.setup.ports["relay"]

        def greets() -> bool:
            # The listener waits for a PROXY header from 127.0.0.1: send one.
            import socket

            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                    s.sendall(b"PROXY TCP4 127.0.0.250 127.0.0.1 40000 25\r\n")
                    return s.recv(512).startswith(b"220 ")
            except OSError:
                return False

        waitFor(greets, 30, f"relayd {self.name} not listening", self.log)
        receivers = self.processes if self.processes > 1 else 0
        for index in range(1, receivers + 1):
            line = f"[receiver-{index} relayd.receivers#info] receiver-{index} receiving"
            waitFor(lambda line=line: line in self.log(), 30, f"{self.name} receiver", self.log)

    def log(self) -> str:
        """Everything every run of this instance logged."""
        text = ""
        for run in range(1, self.runs + 1):
            path = self.directory / f"{self.name}-{run}.log"
            if path.exists():
                text += path.read_text("utf-8", "replace")
        return text

    def spooled(self) -> int:
        """Messages in this instance's spool, not yet delivered."""
        return sum(
            len(os.listdir(os.path.join(self.setup.spoolPath, state)))
            for state in ("incoming", "active", "deferred")
            if os.path.isdir(os.path.join(self.setup.spoolPath, state))
        )

    def reap(self) -> None:
        if self.process is not None:
            self.process.reap()


@pytest.fixture
def farm(tmp_path):
    """Redis, two relayd instances (A with two processes), HAProxy before them."""
    redis = RedisServer()
    redis.start()
    sinkPort = freePort()
    instances = [
        Instance("a", tmp_path, redis.url, sinkPort, processes=2),
        Instance("b", tmp_path, redis.url, sinkPort, processes=1),
    ]
    haproxy = None
    try:
        for instance in instances:
            instance.start()
        haproxy = HAProxy(
            str(tmp_path),
            {
                "relay": [(i.setup.ports["relay"], "send-proxy-v2") for i in instances],
                "submissions": [(i.setup.ports["submissions"], "send-proxy-v2") for i in instances],
            },
        )
        yield {"redis": redis, "instances": instances, "haproxy": haproxy, "sinkPort": sinkPort}
    finally:
        if haproxy is not None:
            haproxy.stop()
        for instance in instances:
            instance.reap()
        redis.stop()


@pytest.fixture
def sinkDirectory():
    # smtp-sink runs as nobody: its folder must not be under pytest's 0700 tmp_path.
    directory = tempfile.mkdtemp(prefix="relayd-lb-sink-")
    yield directory
    shutil.rmtree(directory, True)


def message(token: str) -> bytes:
    return f"Subject: {token}\r\nX-Token: {token}\r\n\r\nhello\r\n".encode()


def send(port: int, source: str, token: str, login: ssl.SSLContext | None = None):
    """One message through HAProxy from C{source}: C{(code, text)}."""
    if login is not None:
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port, timeout=30, source_address=(source, 0), context=login
        )
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    with client as s:
        s.ehlo("client.test")
        if login is not None:
            s.login(DEMO_USER, DEMO_PASSWORD)
        try:
            s.sendmail("app@example.org", ["rcpt@example.net"], message(token))
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, "queued"


def tokensAt(sink: PostfixSink) -> list[str]:
    found: list[str] = []
    for text in sink.messages():
        found += [t.decode() for t in TOKEN.findall(text)]
    return found


def bothCAs(instances: list[Instance]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for instance in instances:
        context.load_verify_locations(instance.setup.caPath)
    return context


def test_limitsHeldAcrossInstancesOnRealAddresses(farm, sinkDirectory) -> None:
    instances, haproxy = farm["instances"], farm["haproxy"]
    sink = PostfixSink(sinkDirectory, port=farm["sinkPort"])
    try:
        context = bothCAs(instances)
        # Per user: ten tries, each from its own address (no per-client
        # limit in the way), round robin over both instances.
        byUser = [
            send(haproxy.ports["submissions"], f"127.0.0.{40 + i}", f"user-{i}", context)
            for i in range(10)
        ]
        accepted = [code for code, _ in byUser if code == 250]
        refused = [(code, text) for code, text in byUser if code != 250]
        assert len(accepted) == USER_LIMIT, byUser
        assert all(code == 450 and text.startswith("4.7.1 ") for code, text in refused), byUser
        assert (
            f"per-user allows {USER_LIMIT} messages per hour for user {DEMO_USER}" in refused[0][1]
        )

        # Per client, on the PROXY source address: 127.0.0.21 gets three,
        # and 127.0.0.22 is not charged for them (HAProxy's own address is
        # the same for both).
        first = [send(haproxy.ports["relay"], "127.0.0.21", f"c21-{i}") for i in range(5)]
        assert [code for code, _ in first] == [250] * CLIENT_LIMIT + [450, 450], first
        assert "per-client allows 3 messages per hour for client 127.0.0.21" in first[3][1]
        assert send(haproxy.ports["relay"], "127.0.0.22", "c22-0")[0] == 250

        # Both instances took part, and Redis holds one count for each key.
        for instance in instances:
            # Log lines are written in batches (relayd.ops.logs): wait.
            waitFor(
                lambda i=instance: "connect from [127.0.0.4" in i.log(),
                10,
                f"no connection to {instance.name}",
                instance.log,
            )
        client = farm["redis"].client()
        try:
            keys = sorted(k.decode() for k in client.keys("*"))
        finally:
            client.close()
        assert "{relayd:rl:}per-user:m:3600:" + DEMO_USER in keys
        assert "{relayd:rl:}per-client:m:3600:127.0.0.21" in keys
        assert not any(k.endswith(":127.0.0.1") for k in keys), keys

        # What was delivered names the real client, as do the logs.
        expected = {"user-0", "user-1", "user-2", "user-3", "c21-0", "c21-1", "c21-2", "c22-0"}
        waitFor(
            lambda: set(tokensAt(sink)) >= expected,
            30,
            "not all delivered",
            lambda: f"{tokensAt(sink)}\n" + instances[0].log()[-4000:],
        )
        texts = sink.messages()
        for token, address in (("c21-0", "127.0.0.21"), ("c22-0", "127.0.0.22")):
            [text] = [t for t in texts if f"X-Token: {token}".encode() in t]
            assert re.search(rb"Received: from client\.test \(\[" + address.encode(), text), text
        logs = "".join(instance.log() for instance in instances)
        assert "connect from [127.0.0.21]" in logs
        assert "via proxy [127.0.0.1]" in logs
        assert "rate limit exceeded at MAIL: per-client 3/hour messages for client 127.0.0.21" in (
            logs
        )

        # Redis stopped mid-run: 451 4.3.0 from both instances (fail
        # closed, the default), nothing accepted uncounted; started again
        # (empty, persistence is off): both recover without a restart.
        redis = farm["redis"]
        redis.halt()
        down = [send(haproxy.ports["relay"], "127.0.0.23", f"down-{i}") for i in range(2)]
        assert [(code, text[:5]) for code, text in down] == [(451, "4.3.0")] * 2, down
        redis.start()
        up = [send(haproxy.ports["relay"], "127.0.0.23", f"up-{i}") for i in range(2)]
        assert [code for code, _ in up] == [250, 250], up
        for instance in instances:
            waitFor(
                lambda i=instance: "ratelimit store failed at MAIL, answering 451 4.3.0" in i.log(),
                10,
                f"no store failure logged by {instance.name}",
                instance.log,
            )
            assert "Traceback" not in instance.log()
        waitFor(lambda: {"up-0", "up-1"} <= set(tokensAt(sink)), 30, "not delivered after Redis")
        assert not {"down-0", "down-1"} & set(tokensAt(sink))
    finally:
        sink.stop()


def test_killedInstanceLosesNothingItAcknowledged(farm, sinkDirectory) -> None:
    """
    The next hop is down, so acknowledged mail waits in the spools; one
    instance is killed with SIGKILL while clients are sending.  Once the
    next hop is up and the instance is started again, every message that
    got a 250 from either instance is delivered.
    """
    instances, haproxy = farm["instances"], farm["haproxy"]
    victim = instances[1]
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        # Each message from its own address: the per-client limit stays out.
        for i in range(40):
            if stop.is_set():
                return
            token = f"{n}-{i}-{secrets.token_hex(3)}"
            try:
                code, _ = send(haproxy.ports["relay"], f"127.0.{10 + n}.{1 + i}", token)
            except (smtplib.SMTPException, OSError):
                continue
            if code == 250:
                with lock:
                    accepted.append(token)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        waitFor(lambda: victim.spooled() >= 5, 30, "the victim acknowledged nothing", victim.log)
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
    finally:
        for t in threads:
            t.join(60)
    leftBehind = victim.spooled()
    assert leftBehind >= 5  # acknowledged by the victim, not delivered
    assert len(accepted) >= 40, len(accepted)

    sink = PostfixSink(sinkDirectory, port=farm["sinkPort"])
    try:
        victim.start()
        waitFor(
            lambda: set(tokensAt(sink)) >= set(accepted),
            45,
            f"not all delivered: {len(set(accepted) - set(tokensAt(sink)))} missing",
            victim.log,
        )
        waitFor(lambda: victim.spooled() == 0, 30, "the victim's spool not emptied", victim.log)
    finally:
        sink.stop()
