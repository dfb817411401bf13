"""
A real C{redis-server} on the loopback interface, for tests.

Code that keeps state in Redis is tested against the real server: a fake
would test our idea of Lua scripting, expiry and atomicity, not Redis.
L{RedisServer} starts C{redis-server} (installed by C{scripts/test}) on a
free port of 127.0.0.1 with its working directory in a temporary folder
and persistence off, and stops it again.  L{relayd.testing} re-exports it.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["RedisCluster", "RedisSentinel", "RedisServer"]


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """
    A C{redis-server} process for one test.

    Example::

        server = RedisServer()
        server.start()
        self.addCleanup(server.stop)
        setup = TestSetup(..., policies={"ratelimit": {
            "backend": "redis", "redis_url": server.url, ...}})

    L{start} and L{stop} block (a fraction of a second): call them from
    test set-up and clean-up, not while the reactor has work under way.
    L{stop} then L{start} again gives a Redis outage and its end on the
    same port.

    @ivar port: the TCP port, chosen when first started.
    @ivar directory: the server's working directory (removed by L{stop}
        unless it was given).
    """

    def __init__(
        self,
        directory: str | None = None,
        binary: str | None = None,
        *,
        tls: tuple[str, str, str] | None = None,
        arguments: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        """
        @param tls: C{(certFile, keyFile, caFile)}: serve TLS only (the
            port is a C{--tls-port}); clients are not asked for a
            certificate.
        @param arguments: more C{redis-server} arguments (any config
            directive as C{--name value...}), e.g. C{["--user", "relayd",
            "on", ">pw", "~*", "+@all"]} for an ACL user.
        @param port: the port to use (else a free one).
        """
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self._ownDirectory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="relayd-redis-")
        self.port: int | None = port
        self.tls = tls
        self.arguments = list(arguments or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """C{redis://127.0.0.1:PORT/0} (C{rediss://} with TLS)."""
        if self.port is None:
            raise RuntimeError("RedisServer not started")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def _argv(self, port: int, log: str) -> list[str]:
        argv = [self.binary]
        if self.tls:
            cert, key, ca = self.tls
            argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert]
            argv += ["--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(port)]
        argv += ["--bind", "127.0.0.1", "--dir", self.directory, "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--logfile", log]
        return argv + self.arguments

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0, attempts: int = 5) -> int:
        """
        Start the server and wait until it answers C{PING}.

        @return: the port.
        @raise AssertionError: C{redis-server} is missing or did not start.
        """
        if not os.path.exists(self.binary):
            raise AssertionError("redis-server is not installed; scripts/test installs it")
        if self.running:
            raise RuntimeError("RedisServer already running")
        output = b""
        for _ in range(attempts):
            port = self.port if self.port is not None else _freePort()
            log = os.path.join(self.directory, "redis.log")
            argv = self._argv(port, log)
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            if self._waitReady(port, timeout):
                self.port = port
                return port
            output = self._kill()
            try:
                with open(log, "rb") as f:
                    output += f.read()[-2000:]
            except OSError:
                pass
            if self.port is not None:
                break  # a restart must keep its port; do not wander off
        raise AssertionError(f"redis-server did not start: {output!r}")

    def _waitReady(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                    s = raw
                    if self.tls:
                        context = ssl.create_default_context(cafile=self.tls[2])
                        s = context.wrap_socket(raw, server_hostname="127.0.0.1")
                    s.sendall(b"PING\r\n")
                    # With the default user off, NOAUTH says it is up too.
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _kill(self) -> bytes:
        process, self.process = self.process, None
        if process is None:
            return b""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        output = process.stdout.read() if process.stdout else b""
        if process.stdout:
            process.stdout.close()
        return output

    def client(self, **options: Any) -> Any:
        """A redis-py client for this server (for checks in tests)."""
        import redis

        if self.tls:
            options.setdefault("ssl_ca_certs", self.tls[2])
        return redis.Redis.from_url(self.url, socket_timeout=10, **options)

    def halt(self) -> None:
        """Stop the process but keep the port and folder: L{start} again."""
        self._kill()

    def stop(self) -> None:
        """Stop the process and remove its folder (if it made it)."""
        self._kill()
        if self._ownDirectory:
            shutil.rmtree(self.directory, ignore_errors=True)


class RedisSentinel:
    """
    A C{redis-server --sentinel} watching a L{RedisServer} as service
    C{mymaster}, for tests of relayd's C{redis_sentinels}.

    @ivar port: its TCP port.
    """

    service = "mymaster"

    def __init__(self, primary: RedisServer, password: str | None = None) -> None:
        """@param password: the Sentinel's own C{requirepass}."""
        self.primary = primary
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="relayd-sentinel-")
        self.port = _freePort()
        self.server = RedisServer(self.directory, port=self.port)

    def start(self) -> None:
        """Write its config (Sentinel rewrites it) and start it."""
        config = os.path.join(self.directory, "sentinel.conf")
        with open(config, "w") as f:
            f.write(
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            if self.password:
                f.write(f"requirepass {self.password}\n")
        # A sentinel is a RedisServer with another command line: _argv replaced on purpose.
        self.server._argv = lambda port, log: [  # type: ignore[method-assign]
            self.server.binary,
            config,
            "--sentinel",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--logfile",
            log,
        ]
        self.server.start()

    def client(self) -> Any:
        return self.server.client(password=self.password)

    def primaryPort(self) -> int:
        """The port of the primary the Sentinel names now."""
        with self.client() as c:
            return int(c.sentinel_get_master_addr_by_name(self.service)[1])

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisCluster:
    """
    A Redis Cluster of C{size} primaries (no replicas) on loopback ports,
    made with C{redis-cli --cluster create}, for tests of relayd's
    C{redis_cluster}.
    """

    def __init__(self, size: int = 3) -> None:
        self.nodes = [
            RedisServer(arguments=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
            for _ in range(size)
        ]

    @property
    def url(self) -> str:
        """The URL of the first node (the others are discovered)."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, join them and wait until every slot is served."""
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with node.client() as c:
                    states.append(c.cluster("info").get("cluster_state"))
            if all(state == "ok" for state in states):
                return
            time.sleep(0.1)
        raise AssertionError(f"Redis Cluster not ready: {states}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
