"""
Helpers for testing relayd and policies written for it, over real sockets.

  - L{TestSetup} writes a complete config into a directory: a test CA and a
    server certificate signed by it, a users file, and listeners on free
    loopback ports (one per mode).
  - L{InProcessRelayd} starts that config's service tree inside the test
    process (for C{twisted.trial} tests: the reactor is already running)
    and stops it again.
  - L{DNSServer} is a real authoritative DNS server on 127.0.0.1 (UDP and
    TCP) serving MX, A, AAAA records, null MX, NXDOMAIN and SERVFAIL as a
    test sets them up; point C{[delivery] resolvers} at it.
  - L{SinkServer} is an SMTP server that keeps what it is sent and can be
    scripted to refuse, defer, hang or demand TLS and AUTH: a next hop.
  - L{RedisServer} is a real C{redis-server} on a free loopback port, with
    persistence off, that a test starts, stops and restarts; with TLS and
    ACL users when asked.  L{RedisSentinel} watches one as a Sentinel,
    L{RedisCluster} is a small real Redis Cluster.
  - L{WireClient} is a small blocking line-level client for dialogues that
    C{smtplib} refuses to have (bare LF, pipelining abuse, floods); run it
    in a thread (L{twisted.internet.threads.deferToThread}) next to an
    in-process server.
  - L{PostfixSink} is Postfix's C{smtp-sink} as an independent next hop.
  - L{TestSetup.relayingTo} is a setup whose relayd delivers at once to
    one next hop (L{QUICK_DELIVERY}); L{freePort} a port for a process the
    test starts later.

And in their own modules, imported by name:

  - L{relayd.testing.certs}: a test CA and server certificates on disk
    (C{makeCA}, C{makeServerCert}, C{writeRSASelfSigned}).
  - L{relayd.testing.memoryqueue}: C{MemoryQueue}, what the queue manager
    uses of the spool, in memory, for scheduler tests on a C{task.Clock}.
  - L{relayd.testing.process}: C{RelaydProcess}, relayd as a separate
    C{twistd} process (signals, SIGKILL, several processes), and the
    pytest fixture C{relaydProcesses} that reaps them.
  - L{relayd.testing.sink}, L{relayd.testing.dnsserver},
    L{relayd.testing.redisserver}: the servers above, with their details
    (C{SinkMessage}, C{SinkCommand}, C{DEFAULT_ADVERTISE}).

Example for a policy author::

    class MyPolicyTests(unittest.TestCase):
        @defer.inlineCallbacks
        def test_refused(self):
            setup = TestSetup(self.mktemp(), chain=["mypolicy"],
                              policies={"mypolicy": {"limit": 1}})
            relayd = yield InProcessRelayd.start(setup)
            self.addCleanup(relayd.stop)
            code = yield deferToThread(sendOne, relayd.port("relay"))
            self.assertEqual(code, 550)
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
from typing import Any

from twisted.internet.defer import Deferred, succeed

from relayd.testing.dnsserver import DNSServer
from relayd.testing.redisserver import RedisCluster, RedisSentinel, RedisServer
from relayd.testing.sink import SinkServer

__all__ = [
    "TestSetup",
    "InProcessRelayd",
    "WireClient",
    "PostfixSink",
    "DNSServer",
    "SinkServer",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "freePort",
    "dotStuff",
    "DEMO_USER",
    "DEMO_PASSWORD",
    "QUICK_DELIVERY",
]

QUICK_DELIVERY: dict[str, Any] = {
    "enabled": True,
    "retry_initial": 1,
    "retry_max": 1,
    "idle_timeout": 0.2,
}
"""The C{[delivery]} settings of L{TestSetup.relayingTo}: deliver, retry soon."""

DEMO_USER = "demo"
"""The user in L{TestSetup}'s users file."""
DEMO_PASSWORD = "correct horse battery staple"
"""L{DEMO_USER}'s password."""


def _ephemeralLow() -> int:
    """The lowest port the kernel hands out to port-0 binds and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_given: set[int] = set()
_portRandom = random.Random()


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, for a process the
    test starts later (a twistd, HAProxy, Redis).  It is picked below the
    kernel's ephemeral range, so that no outgoing connection and no port-0
    listener of another test can take it in between; and never twice in
    one test run.
    """
    high = min(_ephemeralLow(), 65536) - 1
    low = max(1024, high - 12000)
    for _ in range(200):
        port = _portRandom.randint(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        # An inline table; keys quoted so any string is a valid key.
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


class TestSetup:
    """
    A config directory for tests: certificates, users file, relayd.toml.

    The config has C{[server] hostname = "relayd.test"}, the users file
    holds the user L{DEMO_USER} with L{DEMO_PASSWORD}, delivery is off (so
    accepted mail stays in the spool's C{incoming/} for the test to read),
    and the policy chain is C{["mynetworks", "authenticated"]} unless
    C{chain} says otherwise.  Each listener is named after its mode.

    @ivar directory: where everything lives.
    @ivar configPath: the written C{relayd.toml}.
    @ivar caPath: the test CA certificate (trust it in clients).
    @ivar spoolPath: the spool directory.
    @ivar ports: mode to port, fixed when the file is written (0: the
        system picks one when relayd listens; ask L{InProcessRelayd.port}).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        directory: str,
        *,
        sections: dict[str, dict[str, Any]] | None = None,
        chain: list[str] | None = None,
        policies: dict[str, dict[str, Any]] | None = None,
        modes: tuple[str, ...] = ("relay", "submission", "submissions"),
        portZero: bool = True,
    ) -> None:
        """
        @param directory: where to write everything (it is created).
        @param sections: more config, by section, merged over the defaults,
            e.g. C{{"policy": {"timeout": 5}}}.
        @param chain: the policy chain.
        @param policies: each policy's options, by name: the
            C{[policies.NAME]} tables.
        @param modes: the listeners to make, one per mode.
        @param portZero: listen on port 0 (the default), or on free ports
            chosen now (for a C{twistd} subprocess the test must reach).
        """
        from relayd.smtp.auth import setPassword
        from relayd.testing.certs import makeCA, makeServerCert

        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        ca = makeCA(self.directory, "relayd test CA", fileName="ca.pem")
        self.caPath = ca.path
        makeServerCert(ca, self.directory, "localhost", fileNames=("cert.pem", "key.pem"))
        self.usersPath = os.path.join(self.directory, "users")
        setPassword(self.usersPath, DEMO_USER, DEMO_PASSWORD, rounds=4)

        self.ports = {mode: (0 if portZero else freePort()) for mode in modes}
        base: dict[str, dict[str, Any]] = {
            "server": {"hostname": "relayd.test", "processes": 1},
            "tls": {"certificate": "cert.pem", "key": "key.pem"},
            "auth": {"users_file": "users", "failure_delay": 0},
            "spool": {"directory": "spool", "reserve_bytes": 0},
            "policy": {"chain": chain if chain is not None else ["mynetworks", "authenticated"]},
            # Inbound tests inspect incoming/: no scheduler unless asked for.
            "delivery": {"enabled": False},
        }
        for name, values in (sections or {}).items():
            base.setdefault(name, {}).update(values)
        lines = []
        for name, values in base.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
            lines.append("")
        for mode, port in self.ports.items():
            lines += [
                "[[listeners]]",
                f'name = "{mode}"',
                f'endpoint = "tcp:{port}:interface=127.0.0.1"',
                f'mode = "{mode}"',
                "",
            ]
        for name, options in (policies or {}).items():
            lines.append(f"[policies.{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
            lines.append("")
        self.configPath = os.path.join(self.directory, "relayd.toml")
        with open(self.configPath, "w") as f:
            f.write("\n".join(lines))
        self.spoolPath = os.path.join(self.directory, "spool")

    @classmethod
    def relayingTo(
        cls,
        directory: str,
        port: int,
        *,
        tls: str = "none",
        modes: tuple[str, ...] = ("relay",),
        sections: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> TestSetup:
        """
        A setup whose relayd delivers: everything goes to one next hop on
        127.0.0.1:C{port} (L{routeAllTo}), tried at once, retried after a
        second, and connections to it closed after 0.2s idle, so a test
        of mail passing through relayd waits for nothing else.

        @param sections: more config, merged over those delivery settings.
        @param kwargs: the rest of L{TestSetup}'s keyword arguments.
        """
        merged: dict[str, dict[str, Any]] = {"delivery": dict(QUICK_DELIVERY)}
        for name, values in (sections or {}).items():
            merged.setdefault(name, {}).update(values)
        setup = cls(directory, modes=modes, sections=merged, **kwargs)
        setup.routeAllTo(port, tls=tls)
        return setup

    def routeAllTo(self, port: int, host: str = "127.0.0.1", tls: str = "none") -> None:
        """Append a C{[[routes]]} table sending all mail to one next hop."""
        with open(self.configPath, "a") as f:
            f.write(
                '\n[[routes]]\ndomains = ["*"]\n[[routes.hops]]\n'
                f'host = "{host}"\nport = {port}\ntls = "{tls}"\n'
            )

    def clientContext(self) -> ssl.SSLContext:
        """A client TLS context that trusts the test CA."""
        context = ssl.create_default_context(cafile=self.caPath)
        return context


class InProcessRelayd:
    """relayd's service tree running in this process, on the global reactor."""

    def __init__(self, service: Any) -> None:
        self.service = service

    @classmethod
    def start(cls, setup: TestSetup, reactor: Any = None) -> Deferred[InProcessRelayd]:
        from relayd.config import load
        from relayd.service import buildService

        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        service = buildService(load(setup.configPath), reactor)
        service.startService()
        return succeed(cls(service))

    def port(self, name: str) -> int:
        """The bound port of the listener called C{name}."""
        svc = self.service.getServiceNamed(f"listener:{name}")
        return int(svc.port.getHost().port)

    def metricsPort(self) -> int:
        """The bound port of the Prometheus endpoint (C{[metrics] endpoint})."""
        svc = self.service.getServiceNamed("metrics")
        return int(svc.port.getHost().port)

    @property
    def spool(self) -> Any:
        from relayd.queue.spool import Spool

        for svc in self.service:
            if isinstance(svc, Spool):
                return svc
        raise LookupError("no spool")

    @property
    def sessions(self) -> list[Any]:
        """The SMTP sessions currently open, over all listeners."""
        return [s for f in self.service.factories for s in f.sessions]

    def stop(self) -> Deferred[Any]:
        """
        Stop listening, cut the sessions still open and stop the spool;
        fires once every connection is gone, so trial sees a clean reactor.
        """
        from twisted.internet import reactor
        from twisted.internet.defer import inlineCallbacks, maybeDeferred
        from twisted.internet.task import deferLater

        @inlineCallbacks
        def stop() -> Any:
            if not self.service.running:
                return
            for session in self.sessions:
                session.transport.abortConnection()
            for _ in range(500):
                if not self.sessions:
                    break
                yield deferLater(reactor, 0.01, lambda: None)
            yield maybeDeferred(self.service.stopService)

        return stop()


def dotStuff(data: bytes) -> bytes:
    """
    The DATA payload on the wire for a message C{data} whose lines end in
    CRLF (RFC 5321 section 4.5.2): each line that starts with a dot gets
    one more, and the line C{.} that ends the data is appended.  Written
    here plainly, apart from L{relayd.smtp.wire.DotStuffer}, so that a test
    does not check relayd against its own code.
    """
    if data and not data.endswith(b"\r\n"):
        raise ValueError("the message must end with CRLF")
    lines = data.split(b"\r\n")[:-1]
    stuffed = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(stuffed) + b".\r\n"


class WireClient:
    """
    A blocking SMTP client that sends exactly the bytes it is given.

    Named for the wire, not for SMTP: relayd's own outbound client is
    L{relayd.delivery.client.SMTPClient}, and this one is nothing like it
    (no state machine, no pipelining rules, no checks): it is for
    dialogues a real client refuses to have.

    Use from a thread.  L{reply} reads one whole (possibly multi-line)
    reply and returns C{(code, [lines])}.
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        context: ssl.SSLContext | None = None,
        source: str | None = None,
    ) -> None:
        """
        @param source: the local address to connect from, e.g. another
            loopback address (C{127.0.0.2}) to be a second client.
        """
        self.sock: Any = socket.create_connection(
            (host, port), timeout=timeout, source_address=None if source is None else (source, 0)
        )
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; pending {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            line = self.line().decode("utf-8", "replace")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def command(self, data: bytes | str) -> tuple[int, list[str]]:
        if isinstance(data, str):
            data = data.encode()
        self.send(data + b"\r\n")
        return self.reply()

    def sendMessage(
        self, sender: str, recipients: list[str] | tuple[str, ...], data: bytes
    ) -> tuple[int, list[str]]:
        """
        One transaction, after EHLO: MAIL, each RCPT and DATA, each of
        which must be accepted (an C{AssertionError} with the reply if
        not), then C{data} dot-stuffed (L{dotStuff}).

        @return: the reply to the end of data.
        """
        for command, expected in (
            (f"MAIL FROM:<{sender}>", 250),
            *((f"RCPT TO:<{r}>", 250) for r in recipients),
            ("DATA", 354),
        ):
            reply = self.command(command)
            if reply[0] != expected:
                raise AssertionError(f"{command}: {reply}")
        self.send(dotStuff(data))
        return self.reply()

    def starttls(self, context: ssl.SSLContext) -> None:
        """Upgrade after a 220 reply to STARTTLS (nothing may be pending)."""
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF or reset)."""
        try:
            self.sock.settimeout(5)
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, OSError):
            return True
        if data:
            self._buf += data
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class PostfixSink:
    """
    Postfix's C{smtp-sink} as a real, independent next hop: it accepts
    everything and dumps each message into L{dumps} (its own headers,
    then the message with LF line ends).  C{scripts/test} installs it.
    """

    def __init__(
        self,
        directory: str,
        hostname: str = "postfix-sink.test",
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        """
        @param port: listen on this port (a next hop that was down and
            comes up where relayd expects it); else a free one.
        """
        import shutil
        import subprocess
        import time

        binary = next(
            (
                p
                for p in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink")
                if p and os.path.exists(p)
            ),
            None,
        )
        if binary is None:
            raise AssertionError("Postfix's smtp-sink is not installed; scripts/test installs it")
        self.dumps = os.path.join(directory, "dumps")
        os.mkdir(self.dumps)
        os.chmod(directory, 0o755)
        os.chmod(self.dumps, 0o777)
        self.port = freePort() if port is None else port
        argv = [binary, "-d", os.path.join(self.dumps, "%H%M%S."), "-h", hostname, *extra]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
        argv += [f"127.0.0.1:{self.port}", "10"]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    output = self.process.stdout.read() if self.process.stdout else b""
                    self.stop()
                    raise AssertionError(f"smtp-sink did not start: {output!r}") from None
                time.sleep(0.05)

    def messages(self) -> list[bytes]:
        """The dumps written so far (one per session), oldest first."""
        names = sorted(os.listdir(self.dumps))
        result = []
        for name in names:
            with open(os.path.join(self.dumps, name), "rb") as f:
                result.append(f.read())
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()
