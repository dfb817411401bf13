"""
The PROXY protocol (issue 10, item 1; L{relayd.smtp.proxy}).

The security defect this guards against: behind a load balancer, relayd
took the proxy's address for the client's, so with the proxy inside
C{mynetworks} any outside client could relay (an open relay), and access
lists, rate limits and per-client limits keyed on the wrong address.

Parser units first (v1, v2, every bad case), then real sockets against an
in-process relayd whose listeners take PROXY headers from 127.0.0.0/8:
the header's address is the one policies, limits and C{Received:} use;
nothing is sent before the header; bad, late or unauthorised headers close
the connection without a greeting; the header comes before TLS on an
implicit-TLS listener.  Real HAProxy in front of relayd is in
tests/interop/test_haproxy.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
import time

import pytest
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.smtp.proxy import V2_SIGNATURE, ProxyHeaderError, parseHeader
from relayd.testing import DEMO_PASSWORD, DEMO_USER, InProcessRelayd, TestSetup, WireClient

# --- headers ---------------------------------------------------------------


def v1(source: str, port: int = 40000, family: str = "TCP4", dest: str = "") -> bytes:
    dest = dest or ("127.0.0.1" if family == "TCP4" else "::1")
    return f"PROXY {family} {source} {dest} {port} 25\r\n".encode()


def v2(
    source: str | None,
    port: int = 40000,
    *,
    command: int = 1,
    version: int = 2,
    family: int | None = None,
    transport: int = 1,
    extra: bytes = b"",
    length: int | None = None,
) -> bytes:
    if source is None:
        block = b""
        fam = 0
    elif ":" in source:
        block = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, "::1")
        block += struct.pack("!HH", port, 25)
        fam = 2
    else:
        block = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
        block += struct.pack("!HH", port, 25)
        fam = 1
    if family is not None:
        fam = family
    block += extra
    size = len(block) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([(version << 4) | command, (fam << 4) | transport])
        + struct.pack("!H", size)
        + block
    )


class ParserTests(unittest.TestCase):
    def test_v1(self):
        header, used = parseHeader(v1("203.0.113.5", 1234) + b"EHLO x\r\n")
        self.assertEqual(
            (header.source.host, header.source.port, header.destination.port, header.version),
            ("203.0.113.5", 1234, 25, 1),
        )
        self.assertEqual(used, len(v1("203.0.113.5", 1234)))
        header, _ = parseHeader(v1("2001:db8::5", family="TCP6"))
        self.assertEqual((header.source.type, header.source.host), ("TCP", "2001:db8::5"))

    def test_v1Unknown(self):
        header, used = parseHeader(b"PROXY UNKNOWN\r\nEHLO")
        self.assertEqual((header.source, used), (None, 15))

    def test_v2(self):
        data = v2("203.0.113.5", 1234)
        header, used = parseHeader(data + b"EHLO x\r\n")
        self.assertEqual((header.source.host, header.source.port, used), ("203.0.113.5", 1234, 28))
        header, used = parseHeader(v2("2001:db8::5"))
        self.assertEqual((header.source.host, used), ("2001:db8::5", 52))
        # TLVs after the addresses are skipped.
        header, used = parseHeader(v2("198.51.100.7", extra=b"\x05\x00\x02ab") + b"rest")
        self.assertEqual((header.source.host, used), ("198.51.100.7", 33))

    def test_v2Local(self):
        header, used = parseHeader(v2(None, command=0) + b"EHLO")
        self.assertEqual((header.source, header.version, used), (None, 2, 16))

    def test_incompleteWaits(self):
        for data in (v1("203.0.113.5"), v2("203.0.113.5"), v2("2001:db8::5")):
            for cut in range(len(data)):
                self.assertIsNone(parseHeader(data[:cut]), (data, cut))

    def test_badHeaders(self):
        bad = {
            "not a header": b"EHLO client.test\r\n",
            "v1 over 107 octets": b"PROXY TCP4 " + b"1" * 100,
            "v1 bare LF": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            "v1 bad address": v1("300.1.1.1"),
            "v1 family mismatch": v1("2001:db8::1", family="TCP4"),
            "v1 bad port": b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n",
            "v1 leading zero port": b"PROXY TCP4 1.2.3.4 5.6.7.8 025 25\r\n",
            "v1 unknown protocol": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "v1 missing field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "v1 not ASCII": b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
            "v2 wrong signature": b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\0" * 12,
            "v2 version 1": v2("1.2.3.4", version=1),
            "v2 version 3": v2("1.2.3.4", version=3),
            "v2 command 2": v2("1.2.3.4", command=2),
            "v2 length over bound": v2("1.2.3.4", length=4000),
            "v2 UDP": v2("1.2.3.4", transport=2),
            "v2 UNIX": v2("1.2.3.4", family=3),
            "v2 UNSPEC with PROXY": v2("1.2.3.4", family=0),
            "v2 TCP4 block too short": v2("1.2.3.4", length=8)[:24],
            "v2 TCP6 block too short": v2("1.2.3.4", family=2),
        }
        for name, data in bad.items():
            with self.assertRaises(ProxyHeaderError, msg=name):
                parseHeader(data)


# --- over real sockets ------------------------------------------------------


def proxied(setup: TestSetup, networks: list[str]) -> None:
    """Give every listener of C{setup}'s config proxy_protocol from C{networks}."""
    with open(setup.configPath) as f:
        text = f.read()
    text = text.replace(
        'mode = "',
        f'proxy_protocol = true\nproxy_from = {networks!r}\nmode = "'.replace("'", '"'),
    )
    with open(setup.configPath, "w") as f:
        f.write(text)


def connect(port: int, header: bytes, context: ssl.SSLContext | None = None) -> WireClient:
    """A client that sends C{header} first (as a load balancer would)."""
    c = WireClient(port)
    c.send(header)
    if context is not None:
        c.starttls(context)
    return c


def nothingSent(sock: socket.socket, wait: float = 0.3) -> bool:
    """True when the server sent nothing within C{wait} seconds."""
    sock.settimeout(wait)
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True


def closedWithoutGreeting(sock: socket.socket) -> bool:
    """The server closes (EOF or reset) and sent not a single octet."""
    sock.settimeout(10)
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


class ProxyTestCase(unittest.TestCase):
    networks = ["127.0.0.0/8"]
    sections: dict = {}
    policies: dict = {"mynetworks": {"networks": ["127.0.0.0/8"]}}

    @defer.inlineCallbacks
    def setUp(self):
        directory = tempfile.mkdtemp(prefix="relayd-proxy-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.setup = TestSetup(directory, sections=self.sections, policies=self.policies)
        proxied(self.setup, self.networks)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def port(self, mode: str = "relay") -> int:
        return self.relayd.port(mode)

    def logText(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def spooled(self) -> list[bytes]:
        spool = self.relayd.spool
        out = []
        for queueId in spool.entries("incoming"):
            out.append(spool.readData(queueId))
        return out


class RealClientAddressTests(ProxyTestCase):
    """The proxy (127.0.0.1) is trusted; the clients it speaks for are not."""

    @defer.inlineCallbacks
    def test_outsideClientMayNotRelay(self):
        """The open relay of the issue: v1 and v2 from an outside address."""

        def dialogue(header: bytes):
            c = connect(self.port(), header)
            self.addCleanup(c.close)
            greeting = c.reply()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            return greeting[0], c.command("RCPT TO:<b@example.net>")

        for header in (v1("203.0.113.5"), v2("203.0.113.5"), v2("2001:db8::5")):
            greeting, (code, lines) = yield deferToThread(dialogue, header)
            self.assertEqual(greeting, 220)
            self.assertEqual((code, lines[0]), (554, "5.7.1 Relay access denied"), header)

    @defer.inlineCallbacks
    def test_trustedClientRelaysAndIsNamedInReceived(self):
        def dialogue():
            c = connect(self.port(), v2("127.0.0.77", 4242))
            self.addCleanup(c.close)
            c.reply()
            c.command("EHLO client.test")
            c.command("MAIL FROM:<a@example.org>")
            rcpt = c.command("RCPT TO:<b@example.net>")
            c.command("DATA")
            return rcpt, c.command(b"Subject: proxied\r\n\r\nhello\r\n.")

        (rcpt, _), (code, _) = yield deferToThread(dialogue)
        self.assertEqual((rcpt, code), (250, 250))
        [message] = self.spooled()
        self.assertIn(b"Received: from client.test ([127.0.0.77])", message)
        self.assertIn(
            "connect from [127.0.0.77]:4242 on relay via proxy [127.0.0.1]", self.logText()
        )

    @defer.inlineCallbacks
    def test_nothingSentBeforeHeader(self):
        def dialogue():
            c = WireClient(self.port())
            self.addCleanup(c.close)
            silent = nothingSent(c.sock)
            # The header one octet at a time, then a command in the same
            # segment as its end.
            header = v1("198.51.100.1")
            for octet in header[:-1]:
                c.send(bytes([octet]))
                time.sleep(0.002)
            c.send(header[-1:] + b"NOOP\r\n")
            return silent, c.reply(), c.reply()

        silent, greeting, noop = yield deferToThread(dialogue)
        self.assertTrue(silent)
        self.assertEqual((greeting[0], noop[0]), (220, 250))

    @defer.inlineCallbacks
    def test_localIsTheProxyItself(self):
        """v2 LOCAL (a health check) is served as the proxy's connection."""

        def dialogue():
            c = connect(self.port(), v2(None, command=0))
            self.addCleanup(c.close)
            return c.reply(), c.command("QUIT")

        greeting, bye = yield deferToThread(dialogue)
        self.assertEqual((greeting[0], bye[0]), (220, 221))
        self.assertIn("LOCAL connection (health check) from proxy [127.0.0.1]", self.logText())

    @defer.inlineCallbacks
    def test_implicitTLSHeaderBeforeHandshake(self):
        def dialogue():
            c = connect(self.port("submissions"), v1("203.0.113.9"), self.setup.clientContext())
            self.addCleanup(c.close)
            greeting = c.reply()
            c.command("EHLO client.test")
            import base64

            auth = base64.b64encode(f"\0{DEMO_USER}\0{DEMO_PASSWORD}".encode()).decode()
            return greeting, c.command("AUTH PLAIN " + auth)

        greeting, auth = yield deferToThread(dialogue)
        self.assertEqual((greeting[0], auth[0]), (220, 235))
        self.assertIn("connect from [203.0.113.9]:40000 on submissions", self.logText())


class PerClientLimitTests(ProxyTestCase):
    sections = {"limits": {"connections_per_client": 2}}

    @defer.inlineCallbacks
    def test_limitCountsTheRealClient(self):
        def dialogue():
            held = [connect(self.port(), v1("203.0.113.5")) for _ in range(2)]
            for c in held:
                self.addCleanup(c.close)
                assert c.reply()[0] == 220
            third = connect(self.port(), v1("203.0.113.5"))
            other = connect(self.port(), v1("203.0.113.6"))
            self.addCleanup(third.close)
            self.addCleanup(other.close)
            return third.reply(), other.reply()

        (code, lines), (other, _) = yield deferToThread(dialogue)
        self.assertEqual((code, lines[0][:5]), (421, "4.7.0"))
        self.assertEqual(other, 220)


class BadHeaderTests(ProxyTestCase):
    sections = {"timeouts": {"proxy_header": 0.5}}

    @defer.inlineCallbacks
    def test_badHeadersCloseWithoutGreeting(self):
        bad = [
            b"EHLO client.test\r\n",
            b"PROXY TCP4 " + b"1" * 120,
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            v1("2001:db8::1", family="TCP4"),
            b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + b"\0" * 12,
            v2("1.2.3.4", version=1),
            v2("1.2.3.4", command=3),
            v2("1.2.3.4", length=60000),
            v2("1.2.3.4", transport=2),
            v2("1.2.3.4", family=3),
        ]

        def dialogue():
            results = []
            for header in bad:
                c = WireClient(self.port())
                c.send(header)
                results.append(closedWithoutGreeting(c.sock))
                c.close()
            good = connect(self.port(), v1("127.0.0.1"))
            results.append(good.reply()[0])
            results.append(good.command("QUIT")[0])
            results.append(good.closed())
            good.close()
            return results

        results = yield deferToThread(dialogue)
        self.assertEqual(results, [True] * len(bad) + [220, 221, True])
        self.assertIn("proxy: closing connection from [127.0.0.1] on relay:", self.logText())

    @defer.inlineCallbacks
    def test_noHeaderInTime(self):
        def dialogue():
            c = WireClient(self.port())
            c.send(b"PROXY TCP4 ")  # and then nothing
            started = time.monotonic()
            closed = closedWithoutGreeting(c.sock)
            c.close()
            return closed, time.monotonic() - started

        closed, took = yield deferToThread(dialogue)
        self.assertTrue(closed)
        self.assertLess(took, 9)  # the 0.5 s bound, not the socket's 10 s
        self.assertIn("no complete PROXY header within 0.5s", self.logText())


class UnauthorisedPeerTests(ProxyTestCase):
    """127.0.0.1 is not a load balancer here."""

    networks = ["192.0.2.0/24"]

    @defer.inlineCallbacks
    def test_peerOutsideProxyFromIsClosed(self):
        def dialogue():
            # relayd resets the connection at once: connecting or sending
            # may already see the reset.
            try:
                s = socket.create_connection(("127.0.0.1", self.port()), timeout=10)
            except ConnectionResetError:
                return True
            with s:
                with contextlib.suppress(OSError):
                    s.sendall(v1("127.0.0.1"))
                return closedWithoutGreeting(s)

        self.assertTrue((yield deferToThread(dialogue)))
        self.assertIn("peer [127.0.0.1] is not in proxy_from", self.logText())
        self.assertEqual(self.relayd.sessions, [])


# --- config -----------------------------------------------------------------


def writeConfig(tmp_path, listener: str) -> str:
    setup = TestSetup(str(tmp_path), modes=("relay",))
    with open(setup.configPath) as f:
        text = f.read()
    start = text.index("[[listeners]]")
    with open(setup.configPath, "w") as f:
        f.write(text[:start] + "[[listeners]]\n" + listener + "\n")
    return setup.configPath


@pytest.mark.parametrize(
    "listener, key, problem",
    [
        (
            'endpoint = "haproxy:tcp:2525"\nmode = "relay"',
            "listeners[0].endpoint",
            "the haproxy: endpoint is not supported",
        ),
        (
            'endpoint = "tcp:2525"\nmode = "relay"\nproxy_protocol = true',
            "listeners[0].proxy_from",
            "needs the load balancers' networks",
        ),
        (
            'endpoint = "tcp:2525"\nmode = "relay"\nproxy_from = ["10.0.0.0/8"]',
            "listeners[0].proxy_from",
            "proxy_protocol is not true",
        ),
        (
            'endpoint = "tcp:2525"\nmode = "relay"\nproxy_protocol = true\nproxy_from = ["lb"]',
            "listeners[0].proxy_from",
            "not a network: 'lb'",
        ),
    ],
)
def test_configErrors(tmp_path, listener, key, problem):
    path = writeConfig(tmp_path, listener)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert "\n" not in str(caught.value)


def test_configAccepted(tmp_path):
    path = writeConfig(
        tmp_path,
        'endpoint = "tcp:2525"\nmode = "relay"\nproxy_protocol = true\n'
        'proxy_from = ["10.0.0.0/8", "fd00::/8"]',
    )
    [listener] = load(path).listeners
    assert listener.proxyProtocol
    assert [str(n) for n in listener.proxyFrom] == ["10.0.0.0/8", "fd00::/8"]
    assert os.path.exists(path)
