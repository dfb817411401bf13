"""
systemd's service notification protocol (sd_notify(3)), for C{Type=notify}
units (etc/relayd.service), spoken over the C{NOTIFY_SOCKET} datagram socket
without a dependency: one C{AF_UNIX} datagram of newline-separated
C{KEY=VALUE} assignments per state change.

relayd sends:

  - C{READY=1} once the listeners are bound and the spool is recovered
    (L{relayd.service.RelaydService.startService} has finished and the
    reactor runs, so a connection is answered), so that units ordered
    after relayd (and C{systemctl start}) wait for a relay that answers;
  - C{RELOADING=1} when a reload starts, then C{READY=1} when it ended (in
    force or refused: the old config still serves), so that
    C{systemctl reload} waits for it;
  - C{STOPPING=1} when shutdown starts;
  - C{WATCHDOG=1} every half C{WATCHDOG_USEC} when the unit sets
    C{WatchdogSec=}: pinged from the reactor thread, so a reactor that
    hangs stops the pings and systemd restarts relayd.

Without C{NOTIFY_SOCKET} (not under systemd, or another C{Type=}) nothing
is sent.  A send that fails is logged once and otherwise ignored: systemd's
bookkeeping must never stop relayd from relaying.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.task import LoopingCall

from relayd.ops.logs import Logger

__all__ = ["notify", "watchdogInterval", "SystemdNotifier"]

log = Logger(namespace="relayd.systemd")


def _address(path: str) -> str | bytes:
    """C{NOTIFY_SOCKET}'s address: a leading C{@} names an abstract socket (Linux)."""
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """
    Send C{state} (C{"READY=1"}, C{"STOPPING=1"}, several lines joined by
    newlines) to systemd.  Non-blocking (a datagram to a local socket).

    @return: whether it was sent: False without C{NOTIFY_SOCKET} or when
        the send failed.
    """
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), _address(path))
    except OSError as e:
        log.warn(
            "cannot notify systemd ({state}) at {path}: {error}",
            state=state.replace("\n", " "),
            path=path,
            error=str(e),
        )
        return False
    return True


def watchdogInterval(environ: dict[str, str] | None = None) -> float | None:
    """
    Seconds between C{WATCHDOG=1} pings: half of C{WATCHDOG_USEC} (what
    sd_watchdog_enabled(3) advises), or None when the unit sets no
    C{WatchdogSec=} or C{WATCHDOG_PID} names another process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2e6


class SystemdNotifier:
    """
    relayd's side of C{Type=notify}: L{ready} after startup (and the
    watchdog pings from then on), L{stopping} at shutdown.
    """

    def __init__(self, reactor: Any, environ: dict[str, str] | None = None) -> None:
        self.reactor = reactor
        self.environ = os.environ if environ is None else environ
        self._watchdog: LoopingCall | None = None

    def ready(self, status: str = "") -> None:
        """Tell systemd relayd serves; start the watchdog pings if asked for."""
        message = f"READY=1\nMAINPID={os.getpid()}"
        if status:
            message += f"\nSTATUS={status}"
        if not notify(message, dict(self.environ)):
            return
        interval = watchdogInterval(dict(self.environ))
        if interval is not None and self._watchdog is None:
            self._watchdog = LoopingCall(notify, "WATCHDOG=1", dict(self.environ))
            self._watchdog.clock = self.reactor
            self._watchdog.start(interval, now=True)

    def reloading(self) -> None:
        """A reload started (C{systemctl reload} waits until L{reloaded})."""
        notify("RELOADING=1", dict(self.environ))

    def reloaded(self, status: str = "") -> None:
        """The reload ended, in force or refused: relayd serves either way."""
        notify("READY=1" + (f"\nSTATUS={status}" if status else ""), dict(self.environ))

    def stopping(self) -> None:
        """Tell systemd relayd is stopping; no more watchdog pings."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        notify("STOPPING=1", dict(self.environ))
