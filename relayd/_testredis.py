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
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["RedisServer"]


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

    def __init__(self, directory: str | None = None, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        self._ownDirectory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="relayd-redis-")
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """C{redis://127.0.0.1:PORT/0}."""
        if self.port is None:
            raise RuntimeError("RedisServer not started")
        return f"redis://127.0.0.1:{self.port}/0"

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
            argv = [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                log,
            ]
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
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
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

        return redis.Redis.from_url(self.url, socket_timeout=10, **options)

    def halt(self) -> None:
        """Stop the process but keep the port and folder: L{start} again."""
        self._kill()

    def stop(self) -> None:
        """Stop the process and remove its folder (if it made it)."""
        self._kill()
        if self._ownDirectory:
            shutil.rmtree(self.directory, ignore_errors=True)
