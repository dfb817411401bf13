"""
relayd's side of the maildrop (L{relayd.ops.maildrop}): Postfix's C{pickup}.

At startup and every C{[maildrop] interval} seconds, the files
C{relayd-sendmail} left in the maildrop while relayd was down are
submitted, one SMTP transaction each, to relayd's own relay listener over
loopback: the same path as any local submission (the policy chain, the
Received: field, the spool's commit before the 250 reply), nothing
special-cased.  A file is removed only after that 250, so a crash in
between submits it again: at least once, never lost.  A file relayd
refuses for good (5xx, e.g. a policy refusal) is returned to its sender,
the local user who ran C{relayd-sendmail}, as Postfix does: a DSN
(L{bounceToSpool}) in relayd's own queue, then the file goes; with a
null sender it is moved aside with a log line.  The blocking work
(listing, reading, smtplib) runs in a thread, never in the reactor.
"""

from __future__ import annotations

import re
import tempfile
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.python.failure import Failure

from relayd.ops.logs import Logger
from relayd.ops.maildrop import (
    Bounce,
    Dropped,
    FlushResult,
    Refused,
    Unreachable,
    ensureDirectory,
    flush,
    pending,
    receivedField,
    removeStale,
)

__all__ = ["MaildropService", "bounceToSpool", "submitOverSMTP"]

log = Logger(namespace="relayd.ops.maildrop")

SUBMIT_TIMEOUT = 60.0
"""Seconds for the connection and each read or write of one submission."""

DEFERRED_WAIT = 300.0
"""
Seconds before a maildrop file relayd answered with a 4xx is tried again
(Postfix's minimal_backoff_time), rather than at every round.
"""


def submitOverSMTP(host: str, port: int, helo: str, timeout: float = SUBMIT_TIMEOUT) -> Any:
    """
    A C{submit} for L{relayd.ops.maildrop.flush}: one all-or-nothing SMTP
    transaction to C{host:port} with C{relayd-sendmail}'s own client
    (L{relayd.ops.sendmail.submit}), its failures mapped to L{Unreachable}
    (no connection: try later) and L{Refused} (a reply: 5xx permanent).
    """
    from relayd.ops.sendmail import EX_UNAVAILABLE, SendmailConfig, SendmailError, submit

    config = SendmailConfig(host=host, port=port, tls="none", timeout=timeout, helo=helo)

    def submitOne(dropped: Dropped) -> str:
        message = receivedField(dropped, helo) + dropped.message
        try:
            reply: str = submit(config, dropped.sender, dropped.recipients, message)
        except SendmailError as e:
            if getattr(e, "unreachable", False):
                raise Unreachable(e.message) from None
            raise Refused(
                e.message, permanent=e.status == EX_UNAVAILABLE, replies=e.replies
            ) from None
        return reply

    return submitOne


def bounceToSpool(spool: Any, hostname: str, reactor: Any) -> Bounce:
    """
    A L{relayd.ops.maildrop.Bounce} for the pickup thread: a non-delivery
    report (RFC 3464, L{relayd.delivery.bounce.makeDSN}, the same report
    as for mail that fails in delivery) to a maildrop file's sender about
    the recipients relayd refused, queued in relayd's own spool
    (L{relayd.queue.spool.Spool.submit}, durable before it returns) as
    relayd queues every DSN: from C{<>}, delivered by the scheduler along
    the sender's route.  Postfix likewise returns mail its cleanup
    refuses for a local sender.

    It runs in a pool thread (makeDSN reads a file); the spool is called
    on the reactor thread (C{blockingCallFromThread}).
    """
    from relayd.delivery.bounce import RecipientStatus, makeDSN, noticeRecord

    def bounceOne(dropped: Dropped, refused: list[tuple[str, int, str]]) -> str:
        now = time.time()
        statuses = [
            RecipientStatus(
                address=recipient,
                action="failed",
                status=_enhanced(text),
                diagnostic=f"{code} {text}",
                lastAttempt=now,
            )
            for recipient, code, text in refused
        ]
        # The report returns the original's headers as relayd saw them
        # (with pickup's Received: field); makeDSN reads them from a file.
        with tempfile.NamedTemporaryFile(prefix="relayd-maildrop-") as original:
            original.write(receivedField(dropped, hostname) + dropped.message)
            original.flush()
            dsn = makeDSN(
                reportingMTA=hostname,
                queueId=dropped.name.replace(".", "-"),
                sender=dropped.sender,
                arrival=dropped.time,
                now=now,
                recipients=statuses,
                originalPath=original.name,
            )
        record = noticeRecord([dropped.sender], dsn, now, "bounce")
        bounceId: str = blockingCallFromThread(reactor, spool.submit, record, dsn)
        return bounceId

    return bounceOne


def _enhanced(text: str) -> str:
    """The RFC 3463 code a refusal's text starts with, as a failure (5.X.X)."""
    m = re.match(r"([45])\.(\d{1,3})\.(\d{1,3})(?:\s|$)", text)
    return f"5.{m.group(2)}.{m.group(3)}" if m else "5.0.0"


class MaildropService(Service):
    """
    Picks the maildrop up while relayd runs.  Added after the listeners,
    so it starts once they listen and stops before they close.
    """

    def __init__(self, top: Any, reactor: Any) -> None:
        """
        @param top: the L{relayd.service.RelaydService}: its config and
            listeners.
        @param reactor: the reactor (its thread pool runs the blocking work).
        """
        self.top = top
        self.reactor = reactor
        self.directory: str = top.config.maildropDirectory
        self._loop: LoopingCall | None = None
        self._running: Deferred[Any] | None = None
        self._notBefore: dict[str, float] = {}
        """File name to when it may be tried again after relayd deferred it."""

    def startService(self) -> None:
        """Create the maildrop if missing, then pick up now and periodically."""
        ensureDirectory(self.directory)
        Service.startService(self)
        self._loop = LoopingCall(self.pickup)
        self._loop.clock = self.reactor
        self._loop.start(self.top.config.maildropInterval, now=True).addErrback(
            lambda f: log.failure("maildrop pickup stopped", f)
        )

    def stopService(self) -> Deferred[Any]:
        """Stop looking; wait for a submission under way to end."""
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running
        if running is None:
            return succeed(None)
        done: Deferred[Any] = Deferred()
        running.addBoth(lambda _: done.callback(None))
        return done

    def _target(self) -> tuple[str, int] | None:
        """The loopback address and port of the relay listener to submit to."""
        from relayd.service import ListenerService

        wanted = self.top.config.maildropListener
        modes = {lc.name: lc.mode for lc in self.top.config.listeners}
        for child in self.top:
            if not isinstance(child, ListenerService) or child.port is None:
                continue
            name = child.listenerName
            if (wanted is not None and name != wanted) or modes.get(name) != "relay":
                continue
            address = child.port.getHost()
            port = getattr(address, "port", None)
            if port is None:
                continue
            host = str(getattr(address, "host", ""))
            if host in ("", "0.0.0.0"):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            return host, int(port)
        return None

    def pickup(self) -> Deferred[Any]:
        """
        Submit what waits in the maildrop (one round; a round still under
        way makes this one a no-op).
        """
        if self._running is not None:
            return succeed(None)
        target = self._target()
        if target is None:
            log.error(
                "maildrop {directory}: no TCP relay listener to submit to "
                "(set [maildrop] listener); its mail waits",
                directory=self.directory,
            )
            return succeed(None)
        submitOne = submitOverSMTP(target[0], target[1], self.top.config.hostname)
        bounceOne = bounceToSpool(self.top.spool, self.top.config.hostname, self.reactor)
        events: list[tuple[str, dict[str, Any]]] = []

        def note(event: str, **details: Any) -> None:
            events.append((event, details))  # logged in the reactor thread

        now = self.reactor.seconds()
        waiting = {name for name, when in self._notBefore.items() if when > now}

        def work() -> FlushResult:
            for name in removeStale(self.directory):
                note("stale", name=name)
            names = [name for name in pending(self.directory) if name not in waiting]
            return flush(self.directory, submitOne, note, names, bounce=bounceOne)

        running = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), work)
        self._running = running

        def done(result: FlushResult | Failure) -> None:
            self._running = None
            for event, details in events:
                self._log(event, details)
            if isinstance(result, Failure):
                if result.check(FileNotFoundError):
                    log.error(
                        "maildrop {directory}: missing (relayd makes it at startup)",
                        directory=self.directory,
                    )
                else:
                    log.failure(
                        "maildrop {directory}: pickup failed", result, directory=self.directory
                    )
            elif result.unreachable is not None:
                log.warn(
                    "maildrop {directory}: relayd's own listener did not answer ({why}); "
                    "{count} files wait",
                    directory=self.directory,
                    why=result.unreachable,
                    count=len(result.left),
                )

        running.addBoth(done)
        return running

    def _log(self, event: str, details: dict[str, Any]) -> None:
        dropped: Dropped | None = details.get("dropped")
        who = f"uid={dropped.uid} user={dropped.user or '-'}" if dropped is not None else ""
        if event in ("submitted", "broken"):
            self._notBefore.pop(details["name"], None)
        if event == "submitted":
            log.info(
                "maildrop {name}: {who} from=<{sender}> submitted: {reply}",
                name=details["name"],
                who=who,
                sender=dropped.sender if dropped else "",
                reply=details["reply"],
            )
        elif event == "deferred":
            # Not again at every round: relayd said later, as for any 4xx.
            self._notBefore[details["name"]] = self.reactor.seconds() + DEFERRED_WAIT
            log.warn(
                "maildrop {name}: {who} deferred, tried again later: {reply}",
                name=details["name"],
                who=who,
                reply=details["reply"],
            )
        elif event == "bounced":
            refused = details["refused"]
            log.warn(
                "maildrop {name}: {who} from=<{sender}> refused: {refused}; "
                "non-delivery report {bounce_id} to the sender, file removed",
                name=details["name"],
                who=who,
                sender=dropped.sender if dropped else "",
                refused="; ".join(f"<{r}> {code} {text}" for r, code, text in refused),
                bounce_id=details["bounce_id"],
            )
        elif event == "stale":
            log.warn(
                "maildrop {name}: removed a writer's temp file left for over a day",
                name=details["name"],
            )
        elif event == "broken":
            log.error(
                "maildrop {name}: moved aside to {target}: {why}",
                name=details["name"],
                target=details["target"],
                why=details["why"],
            )
        else:
            log.error(
                "maildrop {name}: {event}: {details}",
                name=details.get("name"),
                event=event,
                details={k: v for k, v in details.items() if k != "name"},
            )
