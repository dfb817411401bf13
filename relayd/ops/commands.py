"""
The control socket's protocol: the AMP commands C{relayctl} sends to the
running relayd (L{Status}, L{QueueList}, L{QueueShow}, L{QueueFlush},
L{QueueChange}, L{Reload}) and how the socket's path is reached.

The commands carry their larger values as JSON split over as many AMP
values as needed (AMP values hold at most 65535 octets), so a long queue or
a big message never hits AMP's limit.  Both ends import this module: the
service (L{relayd.ops.control}) and the blocking client
(L{relayd.ops.controlclient}).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.protocols import amp

__all__ = [
    "ACTIONS",
    "ControlError",
    "DestinationList",
    "DestinationResume",
    "DestinationSuspend",
    "QueueBounce",
    "QueueChange",
    "QueueFlush",
    "QueueList",
    "QueueRequeue",
    "QueueShow",
    "Reload",
    "Status",
    "TLSReport",
    "reachablePath",
]

ACTIONS = ("hold", "release", "delete")
"""What L{QueueChange} can do to a message."""

_UNIX_PATH_MAX = 107
"""The longest path C{bind}/C{connect} take for a UNIX socket on Linux."""


class _Chunked(amp.Argument):
    """
    Octets of any length: AMP values are limited to 65535 octets, so the
    value goes as C{NAME} (the number of chunks) and C{NAME.0}, C{NAME.1},
    ... each at most that long.
    """

    def __init__(self) -> None:
        amp.Argument.__init__(self)

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        return data

    def toBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        data = self.encode(objects.pop(name.decode("ascii")))
        size = amp.MAX_VALUE_LENGTH
        chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        strings[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode("ascii")] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: dict[str, Any], proto: Any) -> None:
        count = int(strings.pop(name))
        data = b"".join(strings.pop(name + b"." + str(i).encode("ascii")) for i in range(count))
        objects[name.decode("ascii")] = self.decode(data)


class _JSON(_Chunked):
    """Any JSON value, as UTF-8, chunked (see L{_Chunked})."""

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, sort_keys=True).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))


class ControlError(Exception):
    """
    The daemon refuses a control command, for a reason worth one line to the
    operator (e.g. delivery is disabled, so there is nothing to flush).
    """


_ERRORS: dict[type[Exception], bytes] = {ControlError: b"CONTROL_ERROR"}


class Status(amp.Command):
    """
    How relayd is doing: version, pid, start time, listeners with their
    connections, queue counts by state, messages in delivery.
    """

    response = [(b"status", _JSON())]
    errors = _ERRORS


class QueueList(amp.Command):
    """
    One page of the queue: up to C{limit} messages whose queue ids sort
    after C{after}, as L{summarize} describes them; C{more} is true when
    there are others after them.  Queue ids sort by arrival, so paging by
    the last id seen neither repeats nor skips a message.
    """

    arguments = [(b"after", amp.Unicode()), (b"limit", amp.Integer())]
    response = [(b"entries", _JSON()), (b"more", amp.Boolean())]
    errors = _ERRORS


class QueueShow(amp.Command):
    """
    One message: its summary and whole envelope (C{message}: its header
    section, or with C{body} the whole message, exactly as stored).
    """

    arguments = [(b"queueId", amp.Unicode()), (b"body", amp.Boolean())]
    response = [(b"entry", _JSON()), (b"message", _Chunked())]
    errors = _ERRORS


class QueueFlush(amp.Command):
    """
    Attempt the given messages (C{queueIds}, a JSON list; null for every
    queued message) now; see L{relayd.queue.scheduler.Scheduler.flush} for the
    outcomes, given by queue id.
    """

    arguments = [(b"queueIds", _JSON())]
    response = [(b"results", _JSON())]
    errors = _ERRORS


class QueueChange(amp.Command):
    """
    Put messages on hold, release them, or delete them (C{action}, one of
    L{ACTIONS}): the C{queueIds} given (a JSON list), or with null every
    queued message that L{matches} C{sender} and C{recipient}.
    C{results} is a list of C{[queueId, outcome, ok]}.
    """

    arguments = [
        (b"action", amp.Unicode()),
        (b"queueIds", _JSON()),
        (b"sender", amp.Unicode(optional=True)),
        (b"recipient", amp.Unicode(optional=True)),
    ]
    response = [(b"results", _JSON())]
    errors = _ERRORS


class Reload(amp.Command):
    """
    Re-read the config file (L{relayd.service.RelaydService.reload}).
    C{applied} says whether the new config is in force; if not, C{error}
    says why and the old one stays.
    """

    response = [
        (b"applied", amp.Boolean()),
        (b"error", amp.Unicode(optional=True)),
        (b"chain", _JSON()),
    ]
    errors = _ERRORS


def reachablePath(path: str) -> tuple[str, int | None]:
    """
    A path C{bind}/C{connect} accept for the socket at C{path}: C{path}
    itself, or when it is longer than a UNIX socket address can hold, the
    same file reached through an open descriptor of its directory
    (C{/proc/self/fd/N/NAME}, Linux).

    @return: the path to use and the descriptor to close afterwards, if any.
    """
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX or not os.path.isdir("/proc/self/fd"):
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    return f"/proc/self/fd/{fd}/{name}", fd


# --- AMP commands of the queue tools (relayctl queue bounce/requeue, destination) --


class QueueBounce(amp.Command):
    """
    Bounce the given messages (C{queueIds}, a JSON list) on the operator's
    word: L{relayd.queue.scheduler.Scheduler.administrativeBounce}.
    C{results} is a list of C{[queueId, outcome, ok]}.
    """

    arguments = [(b"queueIds", _JSON())]
    response = [(b"results", _JSON())]
    errors = _ERRORS


class QueueRequeue(amp.Command):
    """
    Re-route the given messages (C{queueIds}, a JSON list; null for every
    queued message) after a route change: cached DNS answers dropped, the
    messages attempted now (L{relayd.queue.scheduler.Scheduler.requeue});
    outcomes by queue id as for L{QueueFlush}.
    """

    arguments = [(b"queueIds", _JSON())]
    response = [(b"results", _JSON())]
    errors = _ERRORS


class DestinationSuspend(amp.Command):
    """
    Suspend deliveries to C{domain} (L{relayd.queue.suspend}); C{changed} is
    false when it was suspended already.
    """

    arguments = [(b"domain", amp.Unicode())]
    response = [(b"changed", amp.Boolean())]
    errors = _ERRORS


class DestinationResume(amp.Command):
    """
    Resume deliveries to C{domain}; C{changed} is false when it was not
    suspended; C{flushed} messages with recipients there are attempted now.
    """

    arguments = [(b"domain", amp.Unicode())]
    response = [(b"changed", amp.Boolean()), (b"flushed", amp.Integer())]
    errors = _ERRORS


class TLSReport(amp.Command):
    """
    Today's TLSRPT counts (RFC 8460, L{relayd.delivery.tlsrpt}) for
    C{domain}: C{counts}, one entry per policy type (C{sts}, C{tlsa},
    C{no-policy-found}) with C{success}, C{failure} and C{failures} by
    result type; empty when nothing was counted.
    """

    arguments = [(b"domain", amp.Unicode())]
    response = [(b"counts", _JSON())]
    errors = _ERRORS


class DestinationList(amp.Command):
    """The suspended domains: C{domains}, domain -> C{{"since": seconds}}."""

    response = [(b"domains", _JSON())]
    errors = _ERRORS
