"""
relayd's reactor: Twisted's epoll reactor with a cheaper log context
around each I/O event (issue 14; twisted/twisted#2534).

Twisted's C{EPollReactor.doPoll} dispatches every event through
C{log.callWithLogger}, which gives legacy log calls made while handling
it (C{twisted.python.log.msg} and C{err}, still used inside Twisted) the
C{system} of the connection: its C{logPrefix()}.  It does that by copying
the context dictionary and pushing and popping it on a thread-local
stack: about ten Python calls per event, eight events or so per relayed
message in a receiver.  Under callgrind, dropping them saved 7% of the
instructions a relayed message costs.

L{EPollReactor} keeps that behaviour at the price of one copy per poll:
it pushes one context dictionary around all the events one C{epoll_wait}
returned and sets its C{system} to each selectable's C{logPrefix()} in
turn.  A legacy log event copies the context when it is made, so it sees
exactly what Twisted's own reactor would give it, as does an error from
an event (C{err} with the selectable's prefix as system) or from a
C{logPrefix} that raises (C{"(buggy logPrefix method)"}).

The class overrides one method of Twisted's and calls the private names
that method uses.  L{install} therefore installs it only when Twisted's
C{doPoll} is, to the character, the one it replaces (L{matchesTwisted});
otherwise relayd runs on Twisted's default reactor, unchanged.  The test
suite fails when they differ, so that a Twisted upgrade is read before
the fingerprint is renewed.

Installed by C{twistd relayd} (unless C{twistd --reactor} chose one), and
by the receiving and delivering processes, before anything imports the
global reactor.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import epollreactor
from twisted.python import context, log

__all__ = ["EPollReactor", "globalReactor", "install", "matchesTwisted", "reactorName"]

_TWISTED_DOPOLL = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"
"""SHA-256 of the source of the C{EPollReactor.doPoll} that L{EPollReactor} replaces."""

_BUGGY_PREFIX = "(buggy logPrefix method)"


def matchesTwisted() -> bool:
    """
    Whether Twisted's C{EPollReactor.doPoll} is the one
    L{EPollReactor.doPoll} was written against.
    """
    try:
        source = inspect.getsource(epollreactor.EPollReactor.doPoll)
    except (OSError, TypeError):  # no source installed
        return False
    return hashlib.sha256(source.encode()).hexdigest() == _TWISTED_DOPOLL


class EPollReactor(epollreactor.EPollReactor):
    """
    Twisted's epoll reactor; each poll's events share one log context.
    """

    def doPoll(self, timeout: float | None) -> None:
        """Wait for I/O events at most C{timeout} seconds, then handle them."""
        if timeout is None:
            timeout = -1  # wait until an event comes
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        if events:
            logContext = dict(context.get(log.ILogContext))
            context.call({log.ILogContext: logContext}, self._dispatch, events, logContext)

    doIteration = doPoll

    def _dispatch(self, events: list[tuple[int, int]], logContext: dict[str, Any]) -> None:
        """
        Handle C{events}, each with C{logContext["system"]} set to its
        selectable's log prefix, as C{log.callWithLogger} would.
        """
        selectables = self._selectables
        handle: Callable[[Any, int, int], None] = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by an earlier event of this poll
            try:
                prefix = selectable.logPrefix()
            except KeyboardInterrupt:
                raise
            except BaseException:
                prefix = _BUGGY_PREFIX
                log.err(system=prefix)
            logContext["system"] = prefix
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.err(system=prefix)


def install() -> bool:
    """
    Make L{EPollReactor} the global reactor, unless one is installed
    already (C{twistd --reactor}, a test runner, an earlier import of
    C{twisted.internet.reactor}) or L{matchesTwisted} says no.

    @return: whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules or not matchesTwisted():
        return False
    from twisted.internet.main import installReactor

    installReactor(EPollReactor())
    return True


def globalReactor() -> Any:
    """
    The global reactor, relayd's if none was installed before
    (L{install}): what a relayd process's C{main} runs on.
    """
    install()
    from twisted.internet import reactor

    return reactor


def reactorName(reactor: Any) -> str:
    """The reactor's class, as twistd logs its own: C{relayd.reactor.EPollReactor}."""
    return f"{type(reactor).__module__}.{type(reactor).__qualname__}"
