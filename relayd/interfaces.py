"""
The zope interfaces of relayd: policy phases, optional policy hooks, the
spool and the resolvers.

A policy is an object built by its class's C{fromConfig(options)} (or
C{fromConfig(options, context)}, see L{relayd.policy.PolicyContext}) and
declared with C{@implementer(...)} to provide one or more of the phase
interfaces below; it implements only the phases it cares about.  Each
check method returns a L{relayd.verdict.Verdict}, a L{Deferred} firing
with one, or is a coroutine (C{async def}) returning one.

Policies run in config order (C{[policy] chain}); in each phase the first
answer other than C{CONTINUE} ends the phase and later policies are not
asked.  A policy that raises, answers something other than a Verdict, or
takes longer than C{[policy] timeout} seconds gives the client C{451
4.3.0}; when it times out, its Deferred (or coroutine) is cancelled.  See
L{relayd.policy} and C{docs/plugins.md}.

The objects handed to policies are a L{relayd.envelope.Session} (one per
connection), an L{relayd.envelope.Envelope} (one per transaction), an
L{relayd.address.Address} and a L{relayd.envelope.Message}.  Both Session
and Envelope carry a C{notes} dict for what a policy wants to remember
between phases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from relayd.address import Address
    from relayd.envelope import Envelope, Message, Session
    from relayd.queuefile import QueueRecord
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
    """
    Common to every policy: a name for log lines.

    A policy class usually sets C{name} as a class attribute equal to its
    entry-point name.  When the object has no C{name} (or it is None),
    relayd sets it to the name the policy has in C{[policy] chain}; leave
    it unset when one class may be configured under several entry-point
    names.
    """

    name = Attribute("The policy's name as used in the config chain (a str).")


class IConnectionPolicy(IPolicy):
    """The connection phase: a client has connected."""

    def checkConnection(session: Session) -> Any:
        """
        Called when a client connects, before the greeting.

        C{session} has the client's address and port and the listener's
        name and mode; nothing has been said yet (no HELO name, no TLS
        unless the listener is implicit TLS, no user).

          - ACCEPT: the greeting is sent without asking later connection
            policies (the verdict's code and text are not used).
          - REJECT or TEMPFAIL: the verdict's reply is sent instead of the
            greeting and the connection is closed (RFC 5321 section 3.1
            allows a 554 greeting; a 421 says "try later").

        @param session: the new connection.
        @type session: L{relayd.envelope.Session}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class IHeloPolicy(IPolicy):
    """The HELO/EHLO phase."""

    def checkHelo(session: Session, name: str) -> Any:
        """
        Called on each EHLO or HELO (again after STARTTLS) with the name
        given, before C{session.helo} is set to it.

          - CONTINUE or ACCEPT: relayd answers with its own C{250} (the
            EHLO reply lists the extensions) and the session goes on.
          - REJECT or TEMPFAIL: the verdict's reply is sent; the client
            may try again (set C{disconnect} to close the connection).

        @param session: the connection.
        @type session: L{relayd.envelope.Session}
        @param name: the first word of the EHLO/HELO argument, at most 255
            characters, anything but printable ASCII replaced by C{?}.
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class ISenderPolicy(IPolicy):
    """The MAIL FROM phase: a transaction starts."""

    def checkSender(session: Session, envelope: Envelope, sender: Address) -> Any:
        """
        Called on MAIL FROM, after relayd's own checks (syntax, parameters,
        declared size, free space in the spool).

          - CONTINUE or ACCEPT: the transaction starts; relayd answers
            C{250 2.1.0 Ok} (the verdict's text is not used).
          - REJECT or TEMPFAIL: the verdict's reply is sent and no
            transaction starts.

        @param session: the connection; C{session.user} is the
            authenticated user, if any.
        @type session: L{relayd.envelope.Session}
        @param envelope: the transaction about to start: C{sender},
            C{declaredSize} and C{body} are set, C{recipients} is empty.
            Keep per-transaction state in C{envelope.notes}.
        @type envelope: L{relayd.envelope.Envelope}
        @param sender: the reverse-path; C{sender.isNull} for C{MAIL
            FROM:<>} (bounces).
        @type sender: L{relayd.address.Address}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class IRecipientPolicy(IPolicy):
    """The RCPT TO phase: relaying decisions."""

    def checkRecipient(session: Session, envelope: Envelope, recipient: Address) -> Any:
        """
        Called on each RCPT TO, after syntax checks and the recipient
        limit.

        Relaying is denied by default (DESIGN section 3): if every recipient
        policy answers CONTINUE, the recipient gets C{554 5.7.1 Relay access
        denied}.  So a policy that vouches for a recipient (trusted network,
        authenticated user, local domain) answers ACCEPT, and a policy that
        refuses must come I{before} the vouching ones in the chain.

          - ACCEPT: the recipient is added to C{envelope.recipients} and
            the verdict's reply is sent (e.g. C{accept(250, "2.1.5", "Ok")}).
          - REJECT or TEMPFAIL: the verdict's reply is sent; it counts
            towards C{[limits] errors}; the transaction goes on and the
            client may give other recipients.

        @param session: the connection.
        @type session: L{relayd.envelope.Session}
        @param envelope: the transaction; C{envelope.recipients} holds the
            recipients accepted so far (not this one), C{envelope.queueId}
            is set.
        @type envelope: L{relayd.envelope.Envelope}
        @param recipient: the forward-path.  C{recipient.domain} is empty
            for the bare C{<Postmaster>} of RFC 5321 section 4.1.1.3.
        @type recipient: L{relayd.address.Address}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class IMessagePolicy(IPolicy):
    """The end of DATA: the whole message is there."""

    def checkMessage(session: Session, envelope: Envelope, message: Message) -> Any:
        """
        Called at the end of DATA, before the message is committed to the
        spool.  C{message} is a L{relayd.envelope.Message}: read its header
        fields, read its body, and edit C{message.headers} (add, remove,
        replace); the spool then stores the edited header section followed
        by the body exactly as received.  Later policies see the edits of
        earlier ones.  As in every phase, the first answer other than
        CONTINUE ends it: rewriting and signing policies answer CONTINUE,
        and go after the policies that may refuse (DKIM-sign last).

          - CONTINUE or ACCEPT: the message is committed to the spool and
            the client gets C{250 2.0.0 Ok: queued as ID} once it is
            durable (the verdict's text is not used).
          - REJECT or TEMPFAIL: the verdict's reply is sent and the message
            is discarded, edits included.

        Reading the message is blocking file I/O: the header section is
        read once and whole (relayd refuses a message whose header section
        is larger than C{[limits] header_size}, or that has more
        C{Received:} fields than C{[limits] hops}, before any policy is
        asked), but read a big body in a thread (see
        L{relayd.envelope.Message.iterBody}).

        @param session: the connection.
        @type session: L{relayd.envelope.Session}
        @param envelope: the transaction, with every accepted recipient
            and its C{queueId}.
        @type envelope: L{relayd.envelope.Envelope}
        @param message: the message as received, relayd's C{Received:}
            field first.
        @type message: L{relayd.envelope.Message}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class ITransactionObserver(IPolicy):
    """Optional: be told how each transaction ended."""

    def transactionEnded(session: Session, envelope: Envelope, queued: bool) -> None:
        """
        Called exactly once for every transaction that MAIL started, when it
        ends: C{queued} is True when the message got its C{250} (it is
        durable in the spool), False when it ended any other way (RSET, a
        new EHLO or STARTTLS, a refusal at DATA, a spool failure, the
        client leaving).  C{envelope.recipients} holds the recipients that
        were accepted.  For bookkeeping such as rate-limit counters that
        must not charge refused mail; the return value is ignored and an
        exception is logged.

        Called synchronously, on the reactor thread: do not block, and
        start (do not wait for) any network work.  A policy that only
        observes (provides no phase interface) is allowed in the chain.
        """


class IPolicyLifecycle(IPolicy):
    """Optional: be told when relayd starts and stops using the policy."""

    def startPolicy(reactor: Any) -> Any:
        """
        Called once, when relayd starts (or when a reload brings the policy
        in): open connections, start thread pools, keep the reactor for
        timers (C{deferLater}, C{callLater}).  At startup it is called
        before the listeners open, but relayd does not wait for a Deferred
        it returns (sessions may arrive first); on reload, the new chain
        is put in place only after that Deferred fired.  A failure is
        logged.

        @param reactor: the reactor relayd runs on (use it instead of
            importing the global one, so tests can pass their own).
        """

    def stopPolicy() -> Any:
        """
        Called once at shutdown (after the listeners have closed), or when
        a reload drops or replaces the policy.  Cancel timers, close
        connections, stop thread pools.  May return a Deferred that fires
        when it has let go of its resources; shutdown waits for it.  A
        failure is logged.
        """


class IReloadable(IPolicy):
    """Optional: re-read files on SIGHUP."""

    def reload() -> Any:
        """
        Called on SIGHUP when the policy's options did not change (so the
        same instance stays in the chain): re-read the files its options
        name.  Raise (or return a failing Deferred) to keep the old data;
        the error is logged.  A policy whose options changed is instead
        built anew by C{fromConfig} (and started, and the old one stopped).
        Do file I/O in a thread, not on the reactor thread.
        """


class IRateCounterStore(Interface):
    """
    Where rate-limit counters live: in memory (one process) or Redis
    (shared by every relayd behind a load balancer).
    """

    def reserve(counters: list[tuple[Any, ...]]) -> Deferred[Any]:
        """
        Atomically check and charge GCRA limiters (see
        L{relayd.ratecounter}).

        @param counters: C{(key, amount, limit, windowSeconds)}, or
            C{(key, amount, limit, windowSeconds, burst)}: at most C{limit}
            per C{windowSeconds}, C{burst} (default C{limit}) at once.
            Either every limiter has room for its C{amount} and all are
            charged, or none is.
        @return: a Deferred firing with None when reserved, or with the
            index in C{counters} of the first limiter that is full.
        """

    def peek(counters: list[tuple[Any, ...]]) -> Deferred[Any]:
        """
        Check, without changing anything, whether every limiter has room.

        @param counters: as for L{reserve}.
        @return: a Deferred firing with None when every limiter has room
            for its C{amount}, or with the index of the first that has not.
        """

    def release(counters: list[tuple[Any, ...]]) -> Deferred[None]:
        """
        Give back C{amount} units reserved earlier (the same tuples as
        given to L{reserve}), for a transaction that did not end with a
        C{250}: each limiter's TAT moves back by C{amount} emission
        intervals, never before now.
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

    def commit(incoming: IncomingMessage, envelope: QueueRecord) -> Deferred[str]:
        """
        Make the message durable: append the envelope record to the
        message, fsync the file, rename it into the queue, fsync the
        directory, all off the reactor thread.
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
