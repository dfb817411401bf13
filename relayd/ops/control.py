"""
The control channel between C{relayctl} and the running relayd: Twisted AMP
over a UNIX socket (C{[control] socket}, by default C{control.sock} in the
spool directory).

  - The socket is created with mode 0600 under a umask of 0177, so it is
    never, even for a moment, open to anyone but the relayd user (root gets
    in anyway); on Linux the daemon also checks each client's credentials
    (C{SO_PEERCRED}) and hangs up on any other user.
  - The commands (L{Status}, L{QueueList}, L{QueueShow}, L{QueueFlush},
    L{QueueChange}, L{Reload}) carry their larger values as JSON split over
    as many AMP values as needed (AMP values hold at most 65535 octets), so
    a long queue or a big message never hits AMP's limit.
  - Changes to the queue go through the daemon only: it takes a message
    out of the scheduler's index before it moves or removes its files, and
    refuses to touch a message while an attempt to deliver it is under way
    (its envelope is being rewritten by that attempt).  Reads work without
    the daemon too, from the spool directly (L{readQueue}, L{findMessage}):
    they never write.
  - L{ControlClient} is the blocking client C{relayctl} uses: a plain
    socket speaking the AMP wire format, so the command line tool needs no
    reactor and can run anywhere, a thread of a Twisted program included.

Every event about a message is logged with its queue id, like the rest of
relayd.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayd.config import CONTROL_SOCKET_NAME
from relayd.queue.record import CorruptRecord, QueueRecord, openData, readRecord
from relayd.queue.spool import QUEUED_STATES, STATES

__all__ = [
    "ControlService",
    "ControlSocketError",
    "ControlError",
    "ControlClient",
    "ControlClientError",
    "NotRunning",
    "Status",
    "QueueList",
    "QueueShow",
    "QueueFlush",
    "QueueChange",
    "Reload",
    "ACTIONS",
    "readQueue",
    "findMessage",
    "countStates",
    "readMessage",
    "showMessage",
    "MessageNotFound",
    "matches",
    "summarize",
    "QueueBounce",
    "QueueRequeue",
    "DestinationSuspend",
    "DestinationResume",
    "DestinationList",
]

log = Logger(namespace="relayd.ops.control")

QUEUE_ID = re.compile(r"^[0-9A-Z]{1,64}$")
"""What a queue id looks like (as L{relayd.queue.spool} makes them)."""

ACTIONS = ("hold", "release", "delete")
"""What L{QueueChange} can do to a message."""

BUSY = "being delivered right now; not changed (try again once the attempt is over)"
"""The answer for a message an attempt is delivering (see the module docstring)."""

FINAL = ("delivered", "failed")

HEADER_LIMIT = 1024 * 1024
"""The most octets of a message's header section that L{readMessage} returns."""

_UNIX_PATH_MAX = 107
"""The longest path C{bind}/C{connect} take for a UNIX socket on Linux."""


# --- AMP commands ------------------------------------------------------------


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


class DestinationList(amp.Command):
    """The suspended domains: C{domains}, domain -> C{{"since": seconds}}."""

    response = [(b"domains", _JSON())]
    errors = _ERRORS


# --- reading the spool (blocking; safe with or without the daemon) -------------


def summarize(queueId: str, state: str, record: QueueRecord | None) -> dict[str, Any]:
    """
    What C{relayctl queue list} shows of one message: the fields of its
    record (L{relayd.queue.record.QueueRecord}) that tell where it stands,
    as JSON for the control socket.  C{next_attempt} is None on hold;
    C{delivering} is filled in by the daemon.  With no record (it could
    not be read) the fields are empty.
    """
    if record is None:
        record = QueueRecord(queueId=queueId, sender="", recipients=(), arrival=0.0, size=0)
        arrival: float | None = None
        size: int | None = None
    else:
        arrival, size = record.arrival, record.size
    return {
        "queue_id": queueId,
        "state": state,
        "delivering": False,
        "size": size,
        "arrival": arrival,
        "sender": record.sender,
        "attempts": record.attempts,
        "next_attempt": None if state == "hold" else record.nextAttempt,
        "user": record.user,
        "client": record.client or None,
        "listener": record.listener or None,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "last_reply": r.lastReply,
            }
            for r in record.recipients
        ],
    }


def _queuedIds(directory: str) -> dict[str, str]:
    """
    Every queued message's id and state.  A queue file listed in
    C{active/} and in another state (the listing raced with a move) is in
    the other one.
    """
    found: dict[str, str] = {}
    for state in QUEUED_STATES:
        try:
            names = os.listdir(os.path.join(directory, state))
        except FileNotFoundError:
            continue
        for name in names:
            if QUEUE_ID.match(name) and found.get(name) in (None, "active"):
                found[name] = state
    return found


def findMessage(directory: str, queueId: str) -> tuple[str, QueueRecord] | None:
    """
    Find a queued message in the spool at C{directory}.  Blocking; reads
    only.

    @return: its state and record, or None when no queued state holds it.
    @raise OSError: when the queue file is there but cannot be read.
    @raise ValueError: (L{CorruptRecord}) when it is not a sound queue file.
    """
    if not QUEUE_ID.match(queueId):
        return None
    for _ in range(3):
        states = [
            state
            for state in QUEUED_STATES
            if os.path.exists(os.path.join(directory, state, queueId))
        ]
        if not states:
            return None
        state = next((s for s in states if s != "active"), states[0])
        try:
            return state, readRecord(os.path.join(directory, state, queueId), queueId)
        except FileNotFoundError:
            continue  # moved on meanwhile: look again
    return None


def readQueue(
    directory: str, after: str = "", limit: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """
    List the queued messages of the spool at C{directory} in queue id order
    (that is, by arrival), as L{summarize} gives them.  Blocking; reads only.

    The spool changes while it is read, so this is a snapshot of each
    message, not of the whole queue at one instant.  A queue file that
    cannot be read is listed with an C{error}.

    @param after: only messages whose queue id sorts after this one.
    @param limit: at most this many (None: all).
    @return: the messages and whether more follow.
    """
    found = _queuedIds(directory)
    ids = sorted(queueId for queueId in found if queueId > after)
    more = limit is not None and len(ids) > limit
    if limit is not None:
        ids = ids[:limit]
    entries = []
    for queueId in ids:
        state = found[queueId]
        record: QueueRecord | None
        try:
            record = readRecord(os.path.join(directory, state, queueId), queueId)
        except FileNotFoundError:
            try:
                moved = findMessage(directory, queueId)
            except (OSError, ValueError):
                moved = None
            if moved is None:
                continue  # delivered or deleted meanwhile
            state, record = moved
        except (OSError, ValueError) as e:
            entry = summarize(queueId, state, None)
            entry["error"] = f"unreadable envelope: {e}"
            entries.append(entry)
            continue
        entries.append(summarize(queueId, state, record))
    return entries, more


def countStates(directory: str) -> dict[str, int]:
    """How many queue files each state directory of the spool holds."""
    counts: dict[str, int] = {}
    for state in STATES:
        try:
            names = os.listdir(os.path.join(directory, state))
        except FileNotFoundError:
            names = []
        counts[state.value] = len(names)
    return counts


def readMessage(path: str, body: bool) -> bytes:
    """
    A stored message as it is on disk (the message of the queue file at
    C{path}, L{relayd.queue.record.openData}): the whole of it with C{body},
    else its header section (up to and including the line end before the
    empty line, at most L{HEADER_LIMIT} octets).
    """
    with openData(path) as f:
        if body:
            return f.read()
        data = b""
        while len(data) < HEADER_LIMIT:
            chunk = f.read(65536)
            if not chunk:
                break
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[: end + 2]
            if data.startswith(b"\r\n"):
                return b""
        return data[:HEADER_LIMIT]


class MessageNotFound(Exception):
    """L{showMessage}: what is wrong, in one line for relayctl."""


def showMessage(directory: str, queueId: str, body: bool) -> dict[str, Any]:
    """
    What C{relayctl queue show} prints of a queued message: its
    L{summarize} entry with the whole record as C{envelope}
    (L{QueueRecord.toJSON}), and the message.  Blocking; reads only.

    @raise MessageNotFound: when it is not in the queue or unreadable.
    """
    for _ in range(3):
        try:
            found = findMessage(directory, queueId)
        except (OSError, ValueError) as e:
            raise MessageNotFound(f"{queueId}: unreadable envelope: {e}") from None
        if found is None:
            raise MessageNotFound(f"{queueId}: no such message in the queue")
        state, record = found
        entry = summarize(queueId, state, record)
        entry["envelope"] = record.toJSON()
        try:
            message = readMessage(os.path.join(directory, state, queueId), body)
        except FileNotFoundError:
            continue  # moved on meanwhile: look again
        except CorruptRecord as e:
            raise MessageNotFound(f"{queueId}: unreadable queue file: {e}") from None
        except OSError as e:
            raise MessageNotFound(f"{queueId}: cannot read the message: {e.strerror}") from None
        return {"entry": entry, "message": message}
    raise MessageNotFound(f"{queueId}: no such message in the queue")


def matches(entry: dict[str, Any], sender: str | None, recipient: str | None) -> bool:
    """
    Does a message (a L{summarize} entry) match C{relayctl queue ... --all
    --from SENDER --to RECIPIENT}?

    @param sender: the sender's address (case-insensitive; C{"<>"} or C{""}
        for the null sender), or None for any.
    @param recipient: an address, or a domain matching every address at
        it (case-insensitive), that the message is still to be delivered to
        (recipients already delivered or failed do not count); None for any.
    """
    if sender is not None:
        wanted = "" if sender in ("<>", "") else sender.strip("<>").lower()
        if str(entry.get("sender", "")).lower() != wanted:
            return False
    if recipient is not None:
        wanted = recipient.strip("<>").lower()
        pending = [
            str(r["address"]).lower()
            for r in entry.get("recipients", [])
            if r.get("state") not in FINAL
        ]
        if "@" in wanted:
            return wanted in pending
        return any(address.rpartition("@")[2] == wanted for address in pending)
    return True


# --- the daemon side -----------------------------------------------------------


class ControlSocketError(Exception):
    """The control socket cannot be set up: startup stops with one line."""


def _bindable(path: str) -> tuple[str, int | None]:
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


def _peerUid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket, if known."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        raw = transport.getHandle().getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("3i", raw)[1])


class ControlProtocol(amp.AMP):
    """One relayctl connection: answers the commands of this module."""

    def __init__(self, service: ControlService) -> None:
        amp.AMP.__init__(self)
        self.service = service

    def makeConnection(self, transport: Any) -> None:
        # Not AMP's: it logs every connection at info level.
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        uid = _peerUid(self.transport)
        if uid is not None and uid not in (0, os.geteuid()):
            log.warn("refused a control connection from uid {uid}", uid=uid)
            cast(Any, self.transport).abortConnection()
            return
        log.debug("relayctl connected (uid {uid})", uid=uid)
        self.service.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.service.connections.discard(self)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @Status.responder
    def status(self) -> Deferred[dict[str, Any]]:
        return self.service.status().addCallback(lambda status: {"status": status})

    @QueueList.responder
    def queueList(self, after: str, limit: int) -> Deferred[dict[str, Any]]:
        return self.service.queueList(after, limit)

    @QueueShow.responder
    def queueShow(self, queueId: str, body: bool) -> Deferred[dict[str, Any]]:
        return self.service.queueShow(queueId, body)

    @QueueFlush.responder
    def queueFlush(self, queueIds: list[str] | None) -> Deferred[dict[str, Any]]:
        return self.service.flush(queueIds).addCallback(lambda results: {"results": results})

    @QueueChange.responder
    def queueChange(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> Deferred[dict[str, Any]]:
        return self.service.change(action, queueIds, sender, recipient).addCallback(
            lambda results: {"results": results}
        )

    @Reload.responder
    def reload(self) -> Deferred[dict[str, Any]]:
        return self.service.reload()

    @QueueBounce.responder
    def queueBounce(self, queueIds: list[str]) -> Deferred[dict[str, Any]]:
        return self.service.bounce(queueIds).addCallback(lambda results: {"results": results})

    @QueueRequeue.responder
    def queueRequeue(self, queueIds: list[str] | None) -> Deferred[dict[str, Any]]:
        return self.service.requeue(queueIds).addCallback(lambda results: {"results": results})

    @DestinationSuspend.responder
    def destinationSuspend(self, domain: str) -> Deferred[dict[str, Any]]:
        return self.service.suspend(domain).addCallback(lambda changed: {"changed": changed})

    @DestinationResume.responder
    def destinationResume(self, domain: str) -> Deferred[dict[str, Any]]:
        return self.service.resume(domain)

    @DestinationList.responder
    def destinationList(self) -> dict[str, Any]:
        return {"domains": self.service.suspendedDomains()}


class _ControlFactory(ServerFactory):
    noisy = False

    def __init__(self, service: ControlService) -> None:
        self.service = service

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.service)


class ControlService(Service):
    """
    Listens on the control socket while relayd runs and carries out what
    C{relayctl} asks (see the module docstring).

    It is the last child of the service tree: it starts once the spool holds
    its lock (so a socket file left by a crash can only be stale, and is
    replaced) and stops first.

    @ivar path: the socket's path.
    @ivar startedAt: when the service started (seconds since the epoch).
    @ivar connections: the relayctl connections open now.
    """

    def __init__(self, top: Any, spool: Any, reactor: Any) -> None:
        """
        @param top: the L{relayd.service.RelaydService}: its config,
            listeners, scheduler and C{reload}.
        @param spool: the L{relayd.queue.spool.Spool}, to move and remove messages.
        @param reactor: provides C{listenUNIX} and C{seconds}.
        """
        self.top = top
        self.spool = spool
        self.reactor = reactor
        self.path: str = top.config.controlSocket or os.path.join(
            spool.directory, CONTROL_SOCKET_NAME
        )
        self.startedAt: float | None = None
        self.connections: set[ControlProtocol] = set()
        self._port: Any = None
        self._fd: int | None = None
        self._lock = DeferredLock()

    # Service

    def startService(self) -> None:
        """
        Replace a stale socket, then listen with mode 0600.

        @raise ControlSocketError: the path is not a socket, another process
            listens on it, or it cannot be bound.
        """
        bindPath, self._fd = _bindable(self.path)
        try:
            self._removeStale(bindPath)
            # bind() creates the file with the umask's permissions before
            # Twisted chmods it: a umask of 0177 leaves no such moment.
            # Nothing else creates files at this point of startup.
            old = os.umask(0o177)
            try:
                self._port = self.reactor.listenUNIX(bindPath, _ControlFactory(self), mode=0o600)
            except CannotListenError as e:
                raise ControlSocketError(f"cannot listen on {self.path}: {e.socketError}") from None
            finally:
                os.umask(old)
        except BaseException:
            self._closeFd()
            raise
        self.startedAt = self.reactor.seconds()
        log.info("control socket listening on {path}", path=self.path)
        Service.startService(self)

    def _removeStale(self, bindPath: str) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ControlSocketError(f"{self.path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(bindPath)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(bindPath)
            log.info("removed stale control socket {path}", path=self.path)
            return
        except OSError as e:
            raise ControlSocketError(f"cannot check {self.path}: {e.strerror or e}") from None
        finally:
            probe.close()
        raise ControlSocketError(f"{self.path} is in use by another process (another relayd?)")

    def _closeFd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def stopService(self) -> Deferred[None]:
        """Stop listening (the socket file is removed) and hang up on relayctl."""
        Service.stopService(self)
        for protocol in list(self.connections):
            cast(Any, protocol.transport).abortConnection()
        port, self._port = self._port, None
        return Deferred.fromCoroutine(self._stopListening(port))

    async def _stopListening(self, port: Any) -> None:
        try:
            if port is not None:
                await port.stopListening()
        finally:
            # After the socket file is gone: it may be reached through _fd.
            self._closeFd()

    # Commands

    @property
    def scheduler(self) -> Any:
        return self.top.scheduler

    def _indexed(self) -> Deferred[None]:
        """Fires once the scheduler knows the whole queue (at once without one)."""
        if self.scheduler is None:
            return succeed(None)
        d: Deferred[None] = self.scheduler.whenIndexed()
        return d

    def status(self) -> Deferred[dict[str, Any]]:
        """See L{Status}."""
        top = self.top
        config = top.config
        listeners = []
        for factory, listener in zip(top.factories, config.listeners, strict=False):
            address = None
            try:
                host = top.getServiceNamed(f"listener:{listener.name}").port.getHost()
                address = f"{host.host}:{host.port}"
            except (KeyError, AttributeError):
                pass
            listeners.append(
                {
                    "name": listener.name,
                    "mode": listener.mode,
                    "endpoint": listener.endpoint,
                    "address": address,
                    "connections": len(factory.sessions),
                }
            )
        status: dict[str, Any] = {
            "version": _version(),
            "pid": os.getpid(),
            "config": config.path,
            "started": self.startedAt,
            "now": self.reactor.seconds(),
            "listeners": listeners,
            "connections": sum(one["connections"] for one in listeners),
            "connection_limit": config.maxConnections,
            "delivery": self.scheduler is not None,
            "delivering": len(self.scheduler.delivering()) if self.scheduler else 0,
            "policies": _chain(top),
            "spool": self.spool.directory,
        }

        def counted(counts: dict[str, int]) -> dict[str, Any]:
            status["queue"] = counts
            return status

        d: Deferred[dict[str, int]] = deferToThread(countStates, self.spool.directory)
        return d.addCallback(counted)

    def queueList(self, after: str, limit: int) -> Deferred[dict[str, Any]]:
        """See L{QueueList}."""
        d = deferToThread(readQueue, self.spool.directory, after, max(1, min(limit, 10000)))

        def listed(result: tuple[list[dict[str, Any]], bool]) -> dict[str, Any]:
            entries, more = result
            for entry in entries:
                entry["delivering"] = self._delivering(entry["queue_id"])
            return {"entries": entries, "more": more}

        return d.addCallback(listed)

    def _delivering(self, queueId: str) -> bool:
        return self.scheduler is not None and bool(self.scheduler.isDelivering(queueId))

    def queueShow(self, queueId: str, body: bool) -> Deferred[dict[str, Any]]:
        """See L{QueueShow}."""
        directory = self.spool.directory

        def show() -> dict[str, Any]:
            try:
                return showMessage(directory, queueId, body)
            except MessageNotFound as e:
                raise ControlError(str(e)) from None

        def mark(result: dict[str, Any]) -> dict[str, Any]:
            result["entry"]["delivering"] = self._delivering(queueId)
            return result

        d: Deferred[dict[str, Any]] = deferToThread(show)
        return d.addCallback(mark)

    def flush(self, queueIds: list[str] | None) -> Deferred[dict[str, str]]:
        """See L{QueueFlush}."""
        scheduler = self.scheduler
        if scheduler is None:
            raise ControlError(
                "delivery is disabled ([delivery] enabled = false): nothing to flush"
            )

        def flush(_: object) -> dict[str, str]:
            results: dict[str, str] = scheduler.flush(queueIds)
            for queueId, outcome in results.items():
                if outcome == "scheduled":
                    log.info("{queue_id}: flushed by relayctl", queue_id=queueId)
            return results

        return self._indexed().addCallback(flush)

    def change(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> Deferred[list[list[Any]]]:
        """See L{QueueChange}.  One change at a time, message after message."""
        if action not in ACTIONS:
            raise ControlError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._change(action, queueIds, sender, recipient))
        )

    async def _change(
        self, action: str, queueIds: list[str] | None, sender: str | None, recipient: str | None
    ) -> list[list[Any]]:
        await self._indexed()
        if queueIds is None:
            entries, _ = await deferToThread(readQueue, self.spool.directory)
            queueIds = [e["queue_id"] for e in entries if matches(e, sender, recipient)]
        results = []
        for queueId in queueIds:
            outcome, ok = await Deferred.fromCoroutine(self._changeOne(action, queueId))
            results.append([queueId, outcome, ok])
        return results

    async def _changeOne(self, action: str, queueId: str) -> tuple[str, bool]:
        """
        Hold, release or delete one message.  The scheduler forgets it first
        (on the reactor thread, so no attempt can start in between), and
        learns its new state after the files have moved.
        """
        if not QUEUE_ID.match(queueId):
            return "not a queue id", False
        scheduler = self.scheduler
        if scheduler is not None and scheduler.isDelivering(queueId):
            return BUSY, False
        indexed = scheduler.withdraw(queueId) if scheduler is not None else None
        state: str | None = None
        when: float | None = indexed[1] if indexed is not None else None
        try:
            found = await deferToThread(findMessage, self.spool.directory, queueId)
            if found is None:
                return "no such message in the queue", False
            state, record = found
            if when is None:
                when = float(record.nextAttempt or self.reactor.seconds())
            if action == "hold":
                if state == "hold":
                    return "already on hold", True
                await self.spool.move(queueId, state, "hold")
                log.info(
                    "{queue_id}: put on hold by relayctl (was {state})",
                    queue_id=queueId,
                    state=state,
                )
                state = "hold"
                return "on hold", True
            if action == "release":
                if state != "hold":
                    return f"not on hold ({state})", True
                state = "deferred" if record.attempts else "incoming"
                await self.spool.move(queueId, "hold", state)
                log.info("{queue_id}: released by relayctl", queue_id=queueId)
                when = None
                return "released", True
            await self.spool.remove(queueId, state, durable=True)
            log.info("{queue_id}: deleted by relayctl (was {state})", queue_id=queueId, state=state)
            state = None
            return "deleted", True
        except Exception as e:
            log.failure("{queue_id}: relayctl {action} failed", queue_id=queueId, action=action)
            return f"{action} failed: {e}", False
        finally:
            if scheduler is not None and state is not None:
                scheduler.reschedule(queueId, state, when)

    def reload(self) -> Deferred[dict[str, Any]]:
        """See L{Reload}."""
        top = self.top

        def reloaded(applied: bool) -> dict[str, Any]:
            return {
                "applied": bool(applied),
                "error": None if applied else (top.reloadError or "see relayd's log"),
                "chain": _chain(top),
            }

        d: Deferred[bool] = top.reload()
        return d.addCallback(reloaded)

    # Commands of the queue tools (relayctl queue bounce/requeue, destination)

    def _needScheduler(self, what: str) -> Any:
        if self.scheduler is None:
            raise ControlError(f"delivery is disabled ([delivery] enabled = false): {what}")
        return self.scheduler

    def bounce(self, queueIds: list[str]) -> Deferred[list[list[Any]]]:
        """See L{QueueBounce}.  One change at a time, message after message."""
        scheduler = self._needScheduler("no bounce can be sent")
        if not isinstance(queueIds, list):
            raise ControlError("give the queue ids to bounce")
        return self._lock.run(lambda: Deferred.fromCoroutine(self._bounceAll(scheduler, queueIds)))

    async def _bounceAll(self, scheduler: Any, queueIds: list[str]) -> list[list[Any]]:
        await self._indexed()
        results = []
        for queueId in queueIds:
            outcome, ok = await Deferred.fromCoroutine(self._bounceOne(scheduler, queueId))
            results.append([queueId, outcome, ok])
        return results

    async def _bounceOne(self, scheduler: Any, queueId: str) -> tuple[str, bool]:
        """
        Bounce one message: withdrawn from the schedule first (as in
        L{_changeOne}); if the bounce fails half-way the message is put
        back wherever it is now, and the next attempt carries on.
        """
        if not QUEUE_ID.match(queueId):
            return "not a queue id", False
        if scheduler.isDelivering(queueId):
            return BUSY, False
        indexed = scheduler.withdraw(queueId)
        try:
            found = await deferToThread(findMessage, self.spool.directory, queueId)
        except Exception as e:
            if indexed is not None:
                scheduler.reschedule(queueId, indexed[0], indexed[1])
            return f"bounce failed: {e}", False
        if found is None:
            if indexed is not None:
                scheduler.reschedule(queueId, indexed[0], indexed[1])
            return "no such message in the queue", False
        state = found[0]
        try:
            count = await scheduler.administrativeBounce(queueId, state, self.reactor.seconds())
        except Exception as e:
            log.failure("{queue_id}: relayctl bounce failed", queue_id=queueId)
            again = await deferToThread(findMessage, self.spool.directory, queueId)
            if again is not None:
                scheduler.reschedule(queueId, again[0], None)
            return f"bounce failed: {e}", False
        log.info(
            "{queue_id}: bounced by relayctl (was {state}, {count} recipients)",
            queue_id=queueId,
            state=state,
            count=count,
        )
        return f"bounced ({count} recipients)", True

    def requeue(self, queueIds: list[str] | None) -> Deferred[dict[str, str]]:
        """See L{QueueRequeue}."""
        scheduler = self._needScheduler("nothing to requeue")

        def requeue(_: object) -> dict[str, str]:
            results: dict[str, str] = scheduler.requeue(queueIds)
            for queueId, outcome in results.items():
                if outcome == "scheduled":
                    log.info("{queue_id}: requeued by relayctl", queue_id=queueId)
            return results

        return self._indexed().addCallback(requeue)

    def _suspensions(self) -> Any:
        from relayd.queue.suspend import Suspensions

        if self.scheduler is not None and self.scheduler.suspensions is not None:
            return self.scheduler.suspensions
        if getattr(self, "_ownSuspensions", None) is None:
            # Delivery disabled: the state is still kept for the next start.
            # A small file, read once (like at startup).
            self._ownSuspensions = Suspensions.load(self.spool.directory)
        return self._ownSuspensions

    def suspendedDomains(self) -> dict[str, Any]:
        """See L{DestinationList}."""
        return dict(self._suspensions().domains)

    def suspend(self, domain: str) -> Deferred[bool]:
        """See L{DestinationSuspend}: written durably (in a thread) before it holds."""
        from relayd.queue.suspend import normalDomain

        try:
            domain = normalDomain(domain)
        except ValueError as e:
            raise ControlError(str(e)) from None
        suspensions = self._suspensions()

        async def suspend() -> bool:
            try:
                changed: bool = await deferToThread(
                    suspensions.suspend, domain, self.reactor.seconds()
                )
            except OSError as e:
                raise ControlError(f"cannot record the suspension: {e}") from None
            if changed:
                log.info("destination {domain} suspended by relayctl", domain=domain)
            return changed

        return self._lock.run(lambda: Deferred.fromCoroutine(suspend()))

    def resume(self, domain: str) -> Deferred[dict[str, Any]]:
        """See L{DestinationResume}: the waiting mail for the domain is flushed."""
        from relayd.queue.suspend import normalDomain

        try:
            domain = normalDomain(domain)
        except ValueError as e:
            raise ControlError(str(e)) from None
        suspensions = self._suspensions()

        async def resume() -> dict[str, Any]:
            try:
                changed: bool = await deferToThread(suspensions.resume, domain)
            except OSError as e:
                raise ControlError(f"cannot record the resumption: {e}") from None
            flushed = 0
            if changed:
                log.info("destination {domain} resumed by relayctl", domain=domain)
            if self.scheduler is not None:
                await self._indexed()
                entries, _ = await deferToThread(readQueue, self.spool.directory)
                ids = [e["queue_id"] for e in entries if matches(e, None, domain)]
                results = self.scheduler.flush(ids) if ids else {}
                flushed = sum(1 for outcome in results.values() if outcome == "scheduled")
            return {"changed": changed, "flushed": flushed}

        return self._lock.run(lambda: Deferred.fromCoroutine(resume()))


def _chain(top: Any) -> list[str]:
    if top.policies is None:
        return []
    # relayd's registry: chain names, whatever the policy objects carry.
    return list(top.policies.chain.names)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relayd")
    except PackageNotFoundError:
        return "unknown"


# --- the client side --------------------------------------------------------------


class ControlClientError(Exception):
    """Talking to the daemon failed; C{str()} is the line to print."""


class NotRunning(ControlClientError):
    """Nothing listens on the control socket: relayd is not running."""


class ControlClient:
    """
    A blocking AMP client for the control socket (no reactor needed).

    Use as a context manager::

        with ControlClient(path) as client:
            answer = client.call(Status)
    """

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        """
        @param path: the control socket.
        @param timeout: seconds to wait for the connection and for each answer.
        @raise NotRunning: nothing listens there.
        @raise ControlClientError: it cannot be reached (e.g. permissions).
        """
        self.path = path
        self.timeout = timeout
        self._tag = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        fd = None
        try:
            connectPath, fd = _bindable(path)
            self._sock.connect(connectPath)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise NotRunning(f"relayd is not running (nothing listens on {path})") from None
        except OSError as e:
            self._sock.close()
            raise ControlClientError(f"cannot connect to {path}: {e.strerror or e}") from None
        finally:
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """
        Send one command and wait for its answer.

        @return: the answer's values by name.
        @raise ControlError: the daemon refused the command (its reason).
        @raise ControlClientError: the connection failed or timed out, or the
            daemon failed unexpectedly (its log says more).
        """
        self._tag += 1
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = str(self._tag).encode("ascii")
        try:
            self._sock.sendall(box.serialize())
            answer = self._readBox()
        except TimeoutError:
            raise ControlClientError(
                f"no answer from relayd within {self.timeout:g} seconds"
            ) from None
        except OSError as e:
            raise ControlClientError(f"connection to relayd failed: {e.strerror or e}") from None
        if b"_error" in answer:
            description = answer.get(b"_error_description", b"").decode("utf-8", "replace")
            if answer.get(b"_error_code") == b"CONTROL_ERROR":
                raise ControlError(description)
            raise ControlClientError(
                f"relayd failed to answer {command.__name__} ({description}; see its log)"
            )
        result: dict[str, Any] = command.parseResponse(answer, None)
        return result

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self._sock.recv(count - len(data))
            if not chunk:
                raise ControlClientError("relayd closed the control connection")
            data += chunk
        return data

    def _readBox(self) -> dict[bytes, bytes]:
        """One AMP box: (16-bit length, key, 16-bit length, value)... then an empty key."""
        box: dict[bytes, bytes] = {}
        while True:
            (length,) = struct.unpack("!H", self._read(2))
            if length == 0:
                return box
            key = self._read(length)
            (length,) = struct.unpack("!H", self._read(2))
            box[key] = self._read(length)
