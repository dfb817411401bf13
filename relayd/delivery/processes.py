"""
Delivery processes around the queue manager (DESIGN section 1, issue 14):
Postfix's split of one C{qmgr} and many C{smtp} processes.

One Twisted process uses one core.  With C{[delivery] processes = N} the
queue manager keeps the scheduler and the spool (it alone reads the
envelopes, moves, updates and removes) and hands each
L{Deliverer.deliver} call to one of N delivery processes (C{python -m
relayd.delivery.processes}), each running a real L{Deliverer} with its own
connection cache.  A delivery process reads the message from the queue
file in C{active/} (read only) and answers with the L{AttemptResult}.

The wire: one JSON line per request on the child's standard input, one
JSON line per result on its notice pipe (fd 3, beside the C{ready} and
C{metrics N} notices of L{relayd.receivers}), both made and read by
L{encode} and L{decode} alone.  A line C{abort} on standard input cuts the
child's connections (the scheduler's shutdown deadline); end of file on it
means the queue manager is gone, even by C{kill -9}, and the child stops.

Which process: the destination's processes in a fixed order of their own
(rendezvous hashing of the destination key), the first one whose load is
within L{SLACK} of the least loaded.  So a destination keeps to the same
process, and reuses its cached connections, while the processes are about
equally busy, and spreads over all of them when one is busier: a smart
host that takes all the mail still uses every core.

A delivery process that dies: its attempts in flight come back as
deferrals (C{451 4.3.0}; the message may have gone out before it died, so
it may arrive twice, which at-least-once allows; it is never marked
delivered without the peer's reply), and it is started again as receivers
are (L{relayd.receivers.ProcessPool}).  SIGHUP to the queue manager
reaches every delivery process, which reads the config again (TLS
settings; routes are the queue manager's, each request carries its hops).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

import relayd.reply
from relayd.delivery.attempt import AttemptResult, Deliverer, RecipientResult
from relayd.delivery.client import Reply as ClientReply
from relayd.delivery.oauth2 import OAuth2Config
from relayd.delivery.routing import Destination, Hop
from relayd.delivery.tlsrpt import sessionFromJSON, sessionToJSON
from relayd.interfaces import IDeliverer
from relayd.ops.logs import Logger
from relayd.receivers import ChildProcess, ProcessPool
from relayd.smtp.dsn import DSNParameters, RecipientRequest

__all__ = ["DeliverRequest", "DeliveryPool", "encode", "decode", "main"]

log = Logger(namespace="relayd.delivery.processes")

SLACK = 2
"""How many more attempts in flight than the least loaded process a
destination's own process may have and still be chosen."""


@dataclass(frozen=True)
class DeliverRequest:
    """The arguments of one L{relayd.delivery.attempt.Deliverer.deliver} call."""

    destination: Destination
    sender: str
    recipients: tuple[str, ...]
    dataPath: str
    size: int
    queueId: str | None
    dsn: DSNParameters | None = None
    smtputf8: bool = False
    requireTLS: bool = False
    tlsOptional: bool = False


# --- the wire ------------------------------------------------------------------


def _hop(hop: Hop) -> dict[str, Any]:
    return {
        "host": hop.host,
        "address": hop.address,
        "port": hop.port,
        "tls": hop.tls,
        "username": hop.username,
        "password": hop.password,
        # OAuth2 settings (file names, no secret), only when there are some.
        **({"oauth2": dataclasses.asdict(hop.oauth2)} if hop.oauth2 is not None else {}),
        # MTA-STS testing's certificate check, only when asked for.
        **({"tlsCheck": True} if hop.tlsCheck else {}),
    }


def _loadHop(body: dict[str, Any]) -> Hop:
    """The L{Hop} of a line made by L{_hop}."""
    oauth2 = body.pop("oauth2", None)
    return Hop(**body, oauth2=OAuth2Config(**oauth2) if oauth2 is not None else None)


def _dsn(dsn: DSNParameters | None) -> dict[str, Any] | None:
    if dsn is None:
        return None
    return {
        "ret": dsn.ret,
        "envid": dsn.envid,
        "recipients": {
            address: {
                "notify": list(r.notify) if r.notify is not None else None,
                "orcpt": r.orcpt,
            }
            for address, r in dsn.recipients.items()
        },
    }


def _loadDSN(body: dict[str, Any] | None) -> DSNParameters | None:
    if body is None:
        return None
    return DSNParameters(
        ret=body["ret"],
        envid=body["envid"],
        recipients={
            address: RecipientRequest(
                tuple(r["notify"]) if r["notify"] is not None else None, r["orcpt"]
            )
            for address, r in body["recipients"].items()
        },
    )


def _reply(reply: relayd.reply.Reply) -> dict[str, Any]:
    body: dict[str, Any] = {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
    if isinstance(reply, ClientReply):
        body["lines"] = list(reply.lines)
        body["remote"] = reply.remote
    return body


def _loadReply(body: dict[str, Any]) -> relayd.reply.Reply:
    if "remote" in body:
        return ClientReply(
            body["code"],
            body["enhanced"],
            body["text"],
            lines=tuple(body["lines"]),
            remote=body["remote"],
        )
    return relayd.reply.Reply(body["code"], body["enhanced"], body["text"])


def encode(number: int, item: DeliverRequest | AttemptResult) -> bytes:
    """
    One line for the pipe: request C{number}, or the result of request
    C{number}.  The inverse of L{decode}.
    """
    body: dict[str, Any]
    if isinstance(item, DeliverRequest):
        body = {
            "request": number,
            "key": item.destination.key,
            "hops": [_hop(h) for h in item.destination.hops],
            "sender": item.sender,
            "recipients": list(item.recipients),
            "path": item.dataPath,
            "size": item.size,
            "queueId": item.queueId,
            "dsn": _dsn(item.dsn),
            "smtputf8": item.smtputf8,
            "requireTLS": item.requireTLS,
            "tlsOptional": item.tlsOptional,
        }
    else:
        body = {
            "result": number,
            "hop": _hop(item.hop) if item.hop is not None else None,
            "tls": item.tls,
            "policy": item.policy,
            "sessions": [sessionToJSON(s) for s in item.sessions],
            "results": [
                {
                    "recipient": r.recipient,
                    "status": r.status,
                    "reply": _reply(r.reply),
                    "remoteHost": r.remoteHost,
                    "command": r.command,
                    "dsnPassed": r.dsnPassed,
                }
                for r in item.results
            ],
        }
    return json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes) -> tuple[int, DeliverRequest | AttemptResult]:
    """
    The request or result in one line made by L{encode}, with its number.

    @raise ValueError: (or L{KeyError}, L{TypeError}) for a line that
        L{encode} did not make.
    """
    body = json.loads(line)
    if "request" in body:
        destination = Destination(body["key"], tuple(_loadHop(h) for h in body["hops"]))
        request = DeliverRequest(
            destination,
            body["sender"],
            tuple(body["recipients"]),
            body["path"],
            int(body["size"]),
            body["queueId"],
            _loadDSN(body["dsn"]),
            bool(body["smtputf8"]),
            bool(body["requireTLS"]),
            # Absent from a line of an older relayd's queue manager.
            bool(body.get("tlsOptional", False)),
        )
        return int(body["request"]), request
    hop = _loadHop(body["hop"]) if body["hop"] is not None else None
    results = [
        RecipientResult(
            r["recipient"],
            r["status"],
            _loadReply(r["reply"]),
            r["remoteHost"],
            r["command"],
            bool(r["dsnPassed"]),
        )
        for r in body["results"]
    ]
    sessions = [sessionFromJSON(s) for s in body.get("sessions", ())]
    result = AttemptResult(results, hop, body["tls"], body.get("policy"), sessions)
    return int(body["result"]), result


def deferredResult(recipients: list[str] | tuple[str, ...], text: str) -> AttemptResult:
    """Every recipient deferred with C{451 4.3.0 text}: relayd's own trouble."""
    reply = ClientReply.local(451, "4.3.0", text)
    return AttemptResult(
        [RecipientResult(r, "deferred", reply, None) for r in recipients], None, None
    )


# --- the queue manager's side ----------------------------------------------------


class _DeliveryProcess(ChildProcess):
    def __init__(self, pool: DeliveryPool, index: int) -> None:
        super().__init__(pool, index)
        self.inFlight: dict[int, tuple[Deferred[AttemptResult], tuple[str, ...]]] = {}


@implementer(IDeliverer)
class DeliveryPool(ProcessPool):
    """
    The delivery processes, and the deliverer the scheduler uses in their
    place: L{deliver}, L{stop} and L{abort} as L{relayd.delivery.attempt.Deliverer}
    has them.  Added to the service tree before the scheduler, so that it
    stops after it: the scheduler's deliveries in flight end first.
    """

    kind = "delivery"
    module = "relayd.delivery.processes"

    def __init__(self, *, configPath: str, count: int, reactor: Any, stopDeadline: float) -> None:
        super().__init__(
            configPath=configPath, count=count, reactor=reactor, stopDeadline=stopDeadline
        )
        self._number = 0
        # Requests made while no process was running: sent to the next one.
        self._waiting: list[tuple[int, DeliverRequest, Deferred[AttemptResult]]] = []

    def makeChild(self, index: int) -> ChildProcess:
        return _DeliveryProcess(self, index)

    # --- the deliverer's interface -----------------------------------------

    def deliver(
        self,
        destination: Destination,
        sender: str,
        recipients: list[str],
        dataPath: str,
        size: int,
        *,
        queueId: str | None = None,
        dsn: DSNParameters | None = None,
        smtputf8: bool = False,
        requireTLS: bool = False,
        tlsOptional: bool = False,
    ) -> Deferred[AttemptResult]:
        """
        L{relayd.delivery.attempt.Deliverer.deliver}, in a delivery process.  Never
        errbacks: a process that dies defers the recipients.
        """
        self._number += 1
        request = DeliverRequest(
            destination,
            sender,
            tuple(recipients),
            dataPath,
            size,
            queueId,
            dsn,
            smtputf8,
            requireTLS,
            tlsOptional,
        )
        d: Deferred[AttemptResult] = Deferred()
        child = self._choose(destination.key)
        if child is None:
            if not self.running:
                return succeed(deferredResult(recipients, "relayd is stopping"))
            self._waiting.append((self._number, request, d))
        else:
            self._send(child, self._number, request, d)
        return d

    def stop(self) -> Deferred[None]:
        """
        Nothing to do here: the processes close their connections as they
        stop (L{stopService}, after the scheduler's).
        """
        return succeed(None)

    def abort(self) -> None:
        """Every process cuts its connections now (the shutdown deadline)."""
        for child in list(self.children.values()):
            child.write(b"abort\n")

    # --- the processes --------------------------------------------------------

    def _choose(self, key: str) -> _DeliveryProcess | None:
        children = [c for c in self.children.values() if isinstance(c, _DeliveryProcess)]
        if not children:
            return None
        least = min(len(c.inFlight) for c in children)
        order = sorted(children, key=lambda c: zlib.crc32(f"{c.index}/{key}".encode()))
        for child in order:
            if len(child.inFlight) <= least + SLACK:
                return child
        return order[0]  # not reached: the least loaded qualifies

    def _send(
        self,
        child: _DeliveryProcess,
        number: int,
        request: DeliverRequest,
        d: Deferred[AttemptResult],
    ) -> None:
        child.inFlight[number] = (d, request.recipients)
        child.write(encode(number, request))

    def notice(self, child: ChildProcess, word: str, argument: bytes) -> None:
        """A result line (JSON, so it starts with C{{})."""
        if not isinstance(child, _DeliveryProcess) or not word.startswith("{"):
            return
        line = f"{word} ".encode() + argument if argument else word.encode()
        try:
            number, result = decode(line)
        except (ValueError, KeyError, TypeError) as e:
            log.error("{label}: unreadable result: {error}", label=child.label, error=e)
            return
        entry = child.inFlight.pop(number, None)
        if entry is None or not isinstance(result, AttemptResult):
            return
        entry[0].callback(result)

    def childReady(self, child: ChildProcess) -> None:
        waiting, self._waiting = self._waiting, []
        for number, request, d in waiting:
            target = self._choose(request.destination.key)
            assert target is not None
            self._send(target, number, request, d)

    def childEnded(self, child: ChildProcess) -> None:
        """Its attempts in flight are deferred: never lost, never delivered."""
        if not isinstance(child, _DeliveryProcess):
            return
        inFlight, child.inFlight = child.inFlight, {}
        if inFlight:
            log.warn(
                "{label} ended with {count} attempts in flight; deferring them",
                label=child.label,
                count=len(inFlight),
            )
        for d, recipients in inFlight.values():
            d.callback(deferredResult(recipients, "delivery process exited"))

    def stopService(self) -> Deferred[Any]:
        waiting, self._waiting = self._waiting, []
        for _, request, d in waiting:
            d.callback(deferredResult(request.recipients, "relayd is stopping"))
        return super().stopService()


# --- the delivery process ------------------------------------------------------


class _Requests(Protocol):
    """
    The delivery process's standard input: request lines, C{abort}, and
    end of file when the queue manager is gone.
    """

    def __init__(self, deliverer: Deliverer, stop: Callable[[], None]) -> None:
        self.deliverer = deliverer
        self.stop = stop
        self.notices: Any = None
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if line == b"abort":
                self.deliverer.abort()
            elif line:
                self._request(line)

    def _request(self, line: bytes) -> None:
        try:
            number, request = decode(line)
        except (ValueError, KeyError, TypeError) as e:
            log.error("unreadable request: {error}", error=e)
            return
        if not isinstance(request, DeliverRequest):
            return
        d = self.deliverer.deliver(
            request.destination,
            request.sender,
            list(request.recipients),
            request.dataPath,
            request.size,
            queueId=request.queueId,
            dsn=request.dsn,
            smtputf8=request.smtputf8,
            requireTLS=request.requireTLS,
            tlsOptional=request.tlsOptional,
        )
        d.addCallback(lambda result: self.notices.write(encode(number, result)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run one delivery process: C{python -m relayd.delivery.processes --config ... --index N}."""
    parser = argparse.ArgumentParser(prog="relayd delivery")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)

    from relayd.reactor import globalReactor, reactorName
    from relayd.receivers import openLifeline, pushMetrics, startChild
    from relayd.service import freezeStartupHeap, makeDeliverer, reloadDeliverer

    reactor = globalReactor()

    label = f"delivery-{args.index}"
    config = startChild(label, args.config)
    try:
        deliverer = makeDeliverer(config, reactor)
    except (OSError, ValueError) as e:
        log.critical("{label}: cannot start: {error}", label=label, error=e)
        raise SystemExit(1) from None

    def stop() -> None:
        if reactor.running:
            reactor.stop()

    requests = _Requests(deliverer, stop)
    notices = requests.notices = openLifeline(reactor, requests)

    registry = None
    if config.metricsEndpoint:
        from relayd.ops.metrics import Metrics

        registry = Metrics().registry
    pushMetrics(reactor, registry, notices)

    def stopping() -> Deferred[None]:
        # Busy connections finish their transaction, within the deadline.
        timer = reactor.callLater(config.shutdownDeliveries, deliverer.abort)
        d = deliverer.stop()

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    reactor.addSystemEventTrigger("before", "shutdown", stopping)

    def reload() -> None:
        reloadDeliverer(deliverer, args.config)

    def hup(signum: int, frame: Any) -> None:
        reactor.callFromThread(reload)

    signal.signal(signal.SIGHUP, hup)
    log.info(
        "{label} delivering (pid {pid}, reactor {reactor})",
        label=label,
        pid=os.getpid(),
        reactor=reactorName(reactor),
    )
    notices.write(b"ready\n")
    reactor.callWhenRunning(freezeStartupHeap)
    reactor.run()


if __name__ == "__main__":
    main()
