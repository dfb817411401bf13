"""
Real HAProxy in front of relayd (issue 10): HAProxy, started by the test on
loopback ports (never as a system service), forwards TCP to relayd with a
PROXY header, v1 (C{send-proxy}) and v2 (C{send-proxy-v2}).

The load balancer runs on 127.0.0.1 and is trusted (in C{mynetworks}, the
usual setup).  Clients connect to it from other loopback addresses: one that
is trusted too (127.0.0.20) and one that is not (127.0.0.9).  Before the fix
relayd took every client for the proxy, an open relay; now the outside
client is refused and the trusted one is named in C{Received:} and the log.
The header also comes before TLS on the implicit-TLS listener.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.testing import DEMO_PASSWORD, DEMO_USER, InProcessRelayd, TestSetup, freePort

OUTSIDE = "127.0.0.9"
TRUSTED = "127.0.0.20"


class HAProxy:
    """A private haproxy process in the foreground (-db), stopped by L{stop}."""

    def __init__(
        self,
        directory: str,
        backends: dict[str, tuple[int, str] | list[tuple[int, str]]],
    ) -> None:
        """
        @param backends: name to (relayd port, HAProxy server option such
            as C{send-proxy-v2}), or a list of them (balanced round robin;
            a connection refused by one is sent to the next); each gets a
            frontend on a free port.
        """
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        assert os.path.exists(binary), "haproxy is not installed; scripts/test installs it"
        self.ports = {name: freePort() for name in backends}
        lines = [
            "global",
            "    maxconn 200",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    balance roundrobin",
            "    retries 2",
            "    option redispatch",
        ]
        for name, servers in backends.items():
            lines += [
                f"frontend fe_{name}",
                f"    bind 127.0.0.1:{self.ports[name]}",
                f"    default_backend be_{name}",
                f"backend be_{name}",
            ]
            for index, (port, option) in enumerate(
                servers if isinstance(servers, list) else [servers]
            ):
                lines.append(f"    server relayd{index} 127.0.0.1:{port} {option}")
        self.configPath = os.path.join(directory, "haproxy.cfg")
        with open(self.configPath, "w") as f:
            f.write("\n".join(lines) + "\n")
        check = subprocess.run(
            [binary, "-c", "-f", self.configPath], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.logPath = os.path.join(directory, "haproxy.log")
        self.log = open(self.logPath, "wb")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", self.configPath],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        for port in self.ports.values():
            while True:
                assert self.process.poll() is None, self.output()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, self.output()
                    time.sleep(0.05)

    def output(self) -> str:
        with open(self.logPath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def send(port: int, source: str, recipient: str, tls: bool = False, context=None):
    """One message from C{source} (a loopback address) through HAProxy."""
    cls = smtplib.SMTP_SSL if tls else smtplib.SMTP
    kwargs = {"context": context} if tls else {}
    with cls("127.0.0.1", port, timeout=20, source_address=(source, 0), **kwargs) as s:
        s.ehlo("client.test")
        if tls:
            s.login(DEMO_USER, DEMO_PASSWORD)
        try:
            s.sendmail("app@example.org", [recipient], b"Subject: via haproxy\r\n\r\nhello\r\n")
        except smtplib.SMTPRecipientsRefused as e:
            code, text = e.recipients[recipient]
            return code, text.decode()
        return 250, "queued"


class HAProxyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-haproxy-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(
            os.path.join(directory, "relayd"),
            modes=("relay", "submissions"),
            policies={"mynetworks": {"networks": ["127.0.0.1/32", f"{TRUSTED}/32"]}},
        )
        with open(self.setup.configPath) as f:
            text = f.read()
        text = text.replace(
            'mode = "', 'proxy_protocol = true\nproxy_from = ["127.0.0.1/32"]\nmode = "'
        )
        with open(self.setup.configPath, "w") as f:
            f.write(text)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        relay, submissions = self.relayd.port("relay"), self.relayd.port("submissions")
        self.haproxy = HAProxy(
            directory,
            {
                "v1": (relay, "send-proxy"),
                "v2": (relay, "send-proxy-v2"),
                "tls": (submissions, "send-proxy-v2"),
            },
        )
        self.addCleanup(self.haproxy.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logText(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def spooled(self) -> list[bytes]:
        spool = self.relayd.spool
        out = []
        for queueId in spool.entries("incoming"):
            out.append(spool.readData(queueId))
        return out

    @defer.inlineCallbacks
    def test_outsideClientIsNotTheProxy(self):
        for name in ("v1", "v2"):
            code, text = yield deferToThread(
                send, self.haproxy.ports[name], OUTSIDE, "b@example.net"
            )
            self.assertEqual((code, text[:5]), (554, "5.7.1"), name)
        self.assertEqual(self.spooled(), [])
        self.assertIn(f"connect from [{OUTSIDE}]", self.logText())

    @defer.inlineCallbacks
    def test_trustedClientRelaysUnderItsOwnAddress(self):
        for name in ("v1", "v2"):
            code, _ = yield deferToThread(send, self.haproxy.ports[name], TRUSTED, "b@example.net")
            self.assertEqual(code, 250, name)
        messages = self.spooled()
        self.assertEqual(len(messages), 2)
        for message in messages:
            self.assertIn(f"Received: from client.test ([{TRUSTED}])".encode(), message)
        self.assertIn(f"connect from [{TRUSTED}]", self.logText())
        self.assertIn("via proxy [127.0.0.1]", self.logText())

    @defer.inlineCallbacks
    def test_implicitTLSThroughHAProxy(self):
        code, _ = yield deferToThread(
            send,
            self.haproxy.ports["tls"],
            OUTSIDE,
            "b@example.net",
            True,
            self.setup.clientContext(),
        )
        self.assertEqual(code, 250)
        [message] = self.spooled()
        self.assertIn(f"([{OUTSIDE}])".encode(), message)
