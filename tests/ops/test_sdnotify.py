"""
L{relayd.ops.sdnotify}: the sd_notify(3) datagrams over a real C{AF_UNIX}
datagram socket (a path, and an abstract one as systemd uses), the
watchdog interval systemd asks for, and a send that fails (logged, not
raised).  The whole protocol around a real twistd run is in
tests/test_systemd.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from relayd.ops.sdnotify import SystemdNotifier, notify, watchdogInterval


def test_notifyPathSocket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notifyAbstractSocket() -> None:
    name = f"relayd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_noNotifySocket() -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_failedSendLoggedNotRaised(tmp_path: Path) -> None:
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["log_namespace"] for e in events] == ["relayd.systemd"]


def test_watchdogInterval() -> None:
    assert watchdogInterval({}) is None
    assert watchdogInterval({"WATCHDOG_USEC": "0"}) is None
    assert watchdogInterval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdogInterval({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdogInterval(mine) == 1.0
    # WATCHDOG_PID names another process: not ours to ping.
    assert watchdogInterval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_notifierWatchdogOnTheReactor(tmp_path: Path) -> None:
    """Pings on the reactor's clock from READY=1 on; none after STOPPING=1."""
    path = str(tmp_path / "notify")
    clock = Clock()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        notifier = SystemdNotifier(clock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
        notifier.ready("relaying")
        assert sock.recv(4096) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=relaying".encode()
        assert sock.recv(4096) == b"WATCHDOG=1"  # at once
        clock.advance(2)
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.reloading()
        notifier.reloaded("reload refused: bad")
        assert sock.recv(4096) == b"RELOADING=1"
        assert sock.recv(4096) == b"READY=1\nSTATUS=reload refused: bad"
        notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        clock.advance(10)
        try:
            extra = sock.recv(4096)
        except BlockingIOError:
            extra = b""
        assert extra == b""
