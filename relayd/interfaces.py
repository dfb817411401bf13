"""
The zope interfaces of relayd: policy phases and the spool.

A policy implements only the phases it cares about.  Each check method
returns a L{relayd.verdict.Verdict}, a L{Deferred} firing with one, or is a
coroutine (C{async def}).  Policies run in config order; the first answer
other than C{CONTINUE} ends the phase (see L{relayd.policy}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from relayd.spool import IncomingMessage

__all__ = [
    "IPolicy",
    "IConnectionPolicy",
    "IHeloPolicy",
    "ISenderPolicy",
    "IRecipientPolicy",
    "IMessagePolicy",
    "ITransactionObserver",
    "IPolicyLifecycle",
    "IReloadable",
    "IRateCounterStore",
    "ISpool",
    "IMXResolver",
]


class IPolicy(Interface):
    """Common to every policy: a name for log lines."""

    name = Attribute("The policy's name as used in the config chain.")


class IConnectionPolicy(IPolicy):
    def checkConnection(session: Any) -> Any:
        """
        Called when a client connects, before the greeting.  ACCEPT lets the
        session go on without asking later connection policies; REJECT and
        TEMPFAIL send that reply instead of the greeting and close.
        """


class IHeloPolicy(IPolicy):
    def checkHelo(session: Any, name: str) -> Any:
        """Called on EHLO/HELO with the name given."""


class ISenderPolicy(IPolicy):
    def checkSender(session: Any, envelope: Any, sender: Any) -> Any:
        """
        Called on MAIL FROM after syntax and size checks.  C{envelope} is the
        transaction about to start; C{sender} is an L{relayd.address.Address}.
        """


class IRecipientPolicy(IPolicy):
    def checkRecipient(session: Any, envelope: Any, recipient: Any) -> Any:
        """
        Called on each RCPT TO.  Relaying is denied by default: unless some
        recipient policy answers ACCEPT, the recipient gets C{554 5.7.1}.
        """


class IMessagePolicy(IPolicy):
    def checkMessage(session: Any, envelope: Any, message: Any) -> Any:
        """
        Called at the end of DATA, before the message is committed to the
        spool.  C{message} is a L{relayd.envelope.Message}: read its header
        fields, read its body, and edit C{message.headers} (add, remove,
        replace); the spool then stores the edited header section followed
        by the body exactly as received.  Later policies see the edits of
        earlier ones.  As in every phase, the first answer other than
        CONTINUE ends it: rewriting and signing policies answer CONTINUE,
        and go after the policies that may refuse (DKIM-sign last).
        """


class ITransactionObserver(IPolicy):
    def transactionEnded(session: Any, envelope: Any, queued: bool) -> None:
        """
        Called exactly once for every transaction that MAIL started, when it
        ends: C{queued} is True when the message got its C{250} (it is
        durable in the spool), False when it ended any other way (RSET, a
        new EHLO or STARTTLS, a refusal at DATA, a spool failure, the
        client leaving).  C{envelope.recipients} holds the recipients that
        were accepted.  For bookkeeping such as rate-limit counters that
        must not charge refused mail; the return value is ignored and an
        exception is logged.
        """


class IPolicyLifecycle(IPolicy):
    def startPolicy(reactor: Any) -> Any:
        """
        Called once, when relayd starts (or when a reload brings the policy
        in), before any session reaches it: open connections, start thread
        pools.  May return a Deferred; a failure is logged.
        """

    def stopPolicy() -> Any:
        """
        Called once at shutdown, or when a reload drops or replaces the
        policy.  May return a Deferred that fires when it has let go of its
        resources.
        """


class IReloadable(IPolicy):
    def reload() -> Any:
        """
        Called on SIGHUP when the policy's options did not change (so the
        same instance stays in the chain): re-read the files its options
        name.  Raise (or return a failing Deferred) to keep the old data;
        the error is logged.
        """


class IRateCounterStore(Interface):
    """
    Where rate-limit counters live: in memory (one process) or Redis
    (shared by every relayd behind a load balancer).
    """

    def reserve(counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        """
        Atomically check and add to fixed-window counters.

        @param counters: C{(key, amount, limit, windowSeconds)}; C{key}
            already names the window.  Either every counter has room for
            its C{amount} and all are increased, or none is.
        @return: a Deferred firing with None when reserved, or with the
            index in C{counters} of the first counter that is full.
        """

    def peek(counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        """
        Check, without changing anything, whether every counter has room.

        @param counters: as for L{reserve}.
        @return: a Deferred firing with None when every counter has room
            for its C{amount}, or with the index of the first that has not.
        """

    def release(counters: list[tuple[str, int, int]]) -> Deferred[None]:
        """
        Give back C{(key, amount, windowSeconds)} reserved earlier, for a
        transaction that did not end with a C{250}.
        """


class ISpool(Interface):
    """The durable queue between receiving and sending."""

    def reserveOk(size: int) -> bool:
        """
        Return True when the spool has room for C{size} more octets above
        the configured free-space reserve.  Must not block (cached value).
        """

    def newQueueId() -> str:
        """Return a new unique, sortable queue id (str)."""

    def openMessage(queueId: str) -> IncomingMessage:
        """
        Start a message: return an L{IncomingMessage} (a writable binary file
        under C{tmp/}).  Removing it with C{discard()} leaves no trace.
        """

    def commit(incoming: IncomingMessage, envelope: dict[str, Any]) -> Deferred[str]:
        """
        Make the message durable: fsync data and JSON envelope, rename into
        the queue, fsync the directories, all off the reactor thread.
        Return a Deferred that fires with the queue id once it is durable,
        or fails (then nothing of the message is left in the queue).
        """


class IMXResolver(Interface):
    """DNS lookups for routing (L{relayd.routing.MXResolver})."""

    def lookupMX(domain: str) -> Deferred[list[tuple[int, str]]]:
        """
        Return a Deferred firing with C{[(preference, host), ...]} as the
        server gave them (a null MX has host C{"."}), or failing with
        L{relayd.routing.NXDOMAIN}, L{relayd.routing.NoData} or
        L{relayd.routing.TemporaryDNSError}.
        """

    def lookupAddresses(host: str) -> Deferred[list[str]]:
        """Return a Deferred firing with the host's IPv4 then IPv6 addresses."""
