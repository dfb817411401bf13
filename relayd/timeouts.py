"""
How long a connection may keep relayd waiting, for the server session and
the delivery client alike.

Twisted's C{TimeoutMixin} resets its C{DelayedCall} on every sign of life
and makes a new one whenever the limit changes; a reset to an earlier time
searches the reactor's whole timer heap (C{_moveCallLaterSooner} is
linear).  An SMTP connection shows a sign of life several times a message
(each command, each reply, each read in DATA), so that was a dozen timer
operations per message.  L{IdleTimer} keeps one timer and a deadline
instead: a sign of life only moves the deadline; the timer, when it fires,
finds the time left and waits the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["IdleTimer"]


class IdleTimer:
    """
    At most one timer on C{clock}, and a deadline: C{expired()} is called
    once the deadline passes with no L{restart} or L{start} moving it.
    """

    def __init__(self, clock: IReactorTime, expired: Callable[[], Any]) -> None:
        self._clock = clock
        self._expired = expired
        self._timer: Any = None  # the one DelayedCall
        self._deadline: float | None = None
        self._period = 0.0

    @property
    def period(self) -> float | None:
        """The limit being kept, in seconds; None when there is none."""
        return None if self._deadline is None else self._period

    def start(self, seconds: float | None) -> None:
        """
        Wait at most C{seconds} from now (None: no limit).  A later
        deadline leaves the timer alone; an earlier one replaces it (a
        cancelled call costs the reactor nothing until it is due); no
        limit leaves it to fire once for nothing.
        """
        if seconds is None:
            self._deadline = None
            return
        self._period = seconds
        self._deadline = deadline = self._clock.seconds() + seconds
        timer = self._timer
        if timer is None:
            self._timer = self._clock.callLater(seconds, self._fired)
        elif timer.getTime() > deadline:
            timer.cancel()
            self._timer = self._clock.callLater(seconds, self._fired)

    def restart(self) -> None:
        """A sign of life: the current limit starts over from now."""
        if self._deadline is not None:
            self._deadline = self._clock.seconds() + self._period

    def stop(self) -> None:
        """No limit, and no timer left holding the connection."""
        self._deadline = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fired(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        left = self._deadline - self._clock.seconds()
        if left > 0:
            self._timer = self._clock.callLater(left, self._fired)
            return
        self._deadline = None
        self._expired()
