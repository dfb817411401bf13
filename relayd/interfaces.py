"""
The zope interfaces of relayd: policy phases, optional policy hooks, and
what each room offers the next (DESIGN sections 1 and 5): the spool to the
SMTP session (L{IIncomingSpool}), the queue to the scheduler and the
control service (L{IQueue}), routing (L{IRouter}, L{IMXResolver}) and
delivery (L{IDeliverer}) to the scheduler.

A policy is an object built by its class's C{fromConfig(options, context)}
(L{relayd.policy.PolicyContext}) and declared with C{@implementer(...)} to
provide one or more of the phase interfaces below; it implements only the
phases it cares about.  Each check method returns a L{PolicyAnswer}: a
L{relayd.verdict.Verdict}, a L{Deferred} firing with one, or it is a
coroutine (C{async def}) returning one.  Authors import all of this from
L{relayd.plugin}.

Checks decide; modifiers (L{IMessageModifier}: header edits, masquerading,
DKIM) change the message once the checks have accepted it, all of them in
config order, so no check's answer can skip one (DESIGN section 3; maddy's
check/modifier split).

Policies run in config order (C{[policy] chain}); in each phase the first
answer other than C{CONTINUE} ends the phase and later policies are not
asked.  A policy that raises, answers something other than a Verdict, or
takes longer than C{[policy] timeout} seconds gives the client C{451
4.3.0}; when it times out, its Deferred (or coroutine) is cancelled.  See
L{relayd.policy} and C{docs/plugins.md}.

The objects handed to policies are a L{SessionView} of the connection (a
read-only view of L{relayd.envelope.Session}), an
L{relayd.envelope.Envelope} (one per transaction), an
L{relayd.address.Address} and a L{relayd.envelope.Message}.  Both carry a
C{notes} dict for what a policy wants to remember between phases.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from relayd.queue.record import QueueRecord
from relayd.verdict import Verdict

if TYPE_CHECKING:
    # Only for the annotations: these modules import this one (they
    # declare @implementer), so importing them here at run time would be
    # a circle.  The queue's record types come from relayd.queue.record,
    # which imports nothing of relayd.
    from twisted.internet.interfaces import IReactorTime

    from relayd.address import Address
    from relayd.delivery.attempt import AttemptResult
    from relayd.delivery.routing import Destination
    from relayd.envelope import Envelope, Message
    from relayd.queue.spool import IncomingMessage
    from relayd.smtp.dsn import DSNParameters

__all__ = [
    "PolicyAnswer",
    "Modification",
    "SessionView",
    "IPolicy",
    "IConnectionPolicy",
    "IHeloPolicy",
    "ISenderPolicy",
    "IRecipientPolicy",
    "IMessagePolicy",
    "IMessageModifier",
    "ITransactionObserver",
    "IPolicyLifecycle",
    "IReloadable",
    "IRateCounterStore",
    "IIncomingSpool",
    "ISpool",
    "IQueue",
    "QueueObserver",
    "IRouter",
    "IDeliverer",
    "IMXResolver",
]


PolicyAnswer: TypeAlias = "Verdict | Deferred[Verdict] | Awaitable[Verdict]"
"""
What a check method returns: a verdict now, a Deferred firing with one, or
(from an C{async def}) a coroutine returning one.
"""

Modification: TypeAlias = "Deferred[None] | Awaitable[None] | None"
"""
What L{IMessageModifier.modifyMessage} returns: nothing when done, or a
Deferred (or coroutine) that fires when done.
"""


class SessionView(Protocol):
    """
    What policies may read about the connection (L{relayd.envelope.Session}
    provides it); relayd's server owns and sets all of it.  Only C{notes}
    is the policy's to change.
    """

    @property
    def clientAddress(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The client's IP address (after a PROXY header: the real client's)."""

    @property
    def clientPort(self) -> int:
        """The client's TCP port."""

    @property
    def listener(self) -> str:
        """The C{[[listeners]] name} that accepted the connection."""

    @property
    def mode(self) -> str:
        """C{"relay"}, C{"submission"} or C{"submissions"}."""

    @property
    def sessionId(self) -> str:
        """A short id for log lines about this connection."""

    @property
    def helo(self) -> str | None:
        """The EHLO/HELO name, None before it (and again after STARTTLS)."""

    @property
    def esmtp(self) -> bool:
        """True after EHLO, False after HELO."""

    @property
    def tls(self) -> bool:
        """True once the connection is encrypted."""

    @property
    def tlsVersion(self) -> str | None:
        """E.g. C{"TLSv1.3"}, once the handshake is done."""

    @property
    def tlsCipher(self) -> str | None:
        """The cipher's name, once the handshake is done."""

    @property
    def user(self) -> str | None:
        """The user name after SMTP AUTH, else None."""

    @property
    def notes(self) -> dict[str, Any]:
        """Free-form storage for policies, kept for the whole connection."""


class IPolicy(Interface):
    """
    Common to every policy.  relayd knows each policy by the name it has
    in C{[policy] chain} (its registry, L{relayd.policy.PolicyChain.names})
    and uses that name in log lines and metrics; it never sets anything on
    the policy object.  A policy that wants its own name (for log lines,
    note keys) gets it as C{context.name} in C{fromConfig}.
    """


class IConnectionPolicy(IPolicy):
    """The connection phase: a client has connected."""

    def checkConnection(session: SessionView) -> PolicyAnswer:
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
        @type session: L{SessionView}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class IHeloPolicy(IPolicy):
    """The HELO/EHLO phase."""

    def checkHelo(session: SessionView, name: str) -> PolicyAnswer:
        """
        Called on each EHLO or HELO (again after STARTTLS) with the name
        given, before C{session.helo} is set to it.

          - CONTINUE or ACCEPT: relayd answers with its own C{250} (the
            EHLO reply lists the extensions) and the session goes on.
          - REJECT or TEMPFAIL: the verdict's reply is sent; the client
            may try again (set C{disconnect} to close the connection).

        @param session: the connection.
        @type session: L{SessionView}
        @param name: the first word of the EHLO/HELO argument, at most 255
            characters, anything but printable ASCII replaced by C{?}.
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class ISenderPolicy(IPolicy):
    """The MAIL FROM phase: a transaction starts."""

    def checkSender(session: SessionView, envelope: Envelope, sender: Address) -> PolicyAnswer:
        """
        Called on MAIL FROM, after relayd's own checks (syntax, parameters,
        declared size, free space in the spool).

          - CONTINUE or ACCEPT: the transaction starts; relayd answers
            C{250 2.1.0 Ok} (the verdict's text is not used).
          - REJECT or TEMPFAIL: the verdict's reply is sent and no
            transaction starts.

        @param session: the connection; C{session.user} is the
            authenticated user, if any.
        @type session: L{SessionView}
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

    def checkRecipient(
        session: SessionView, envelope: Envelope, recipient: Address
    ) -> PolicyAnswer:
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
        @type session: L{SessionView}
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

    def checkMessage(session: SessionView, envelope: Envelope, message: Message) -> PolicyAnswer:
        """
        Called at the end of DATA, before the message is committed to the
        spool, to decide: refuse it, or let it go on.  C{message} is a
        L{relayd.envelope.Message}: read its header fields and its body.
        Changing the message (header edits, masquerading, signing) is the
        job of an L{IMessageModifier}, which runs after every check has let
        the message through, whatever they answered.

          - CONTINUE or ACCEPT: the message goes on (ACCEPT: later checks
            are not asked); the modifiers run, the message is committed to
            the spool and the client gets C{250 2.0.0 Ok: queued as ID}
            once it is durable (the verdict's text is not used).
          - REJECT or TEMPFAIL: the verdict's reply is sent and the message
            is discarded; no modifier runs.

        Reading the message is blocking file I/O: the header section is
        read once and whole (relayd refuses a message whose header section
        is larger than C{[limits] header_size}, or that has more
        C{Received:} fields than C{[limits] hops}, before any policy is
        asked), but read a big body in a thread (see
        L{relayd.envelope.Message.iterBody}).

        @param session: the connection.
        @type session: L{SessionView}
        @param envelope: the transaction, with every accepted recipient
            and its C{queueId}.
        @type envelope: L{relayd.envelope.Envelope}
        @param message: the message as received, relayd's C{Received:}
            field first.
        @type message: L{relayd.envelope.Message}
        @return: a L{relayd.verdict.Verdict}, a Deferred firing with one,
            or a coroutine returning one.
        """


class IMessageModifier(IPolicy):
    """
    The end of DATA, after the checks: change the message before it is
    queued (header edits, address masquerading, DKIM signing).
    """

    def modifyMessage(session: SessionView, envelope: Envelope, message: Message) -> Modification:
        """
        Called once the checks (L{IMessagePolicy}) have let the message
        through, whatever they answered (an ACCEPT ends the checks, never
        the modifiers), before it is committed to the spool.  Every
        modifier runs, in config order (C{[policy] chain}), each seeing the
        edits of the earlier ones: so a signer (DKIM) goes last among the
        modifiers, wherever the checks are.

        Edit C{message.headers} (add, remove, replace); the spool stores
        the edited header section followed by the body exactly as
        received.  A modifier may also change C{envelope.sender}
        (masquerading).  It does not decide: it returns nothing (or a
        Deferred, or is a coroutine, that fires when done).  A modifier
        that raises, or does not finish within C{[policy] timeout}, gives
        the client C{451 4.3.0} and the message is not queued: mail that
        should have been signed or rewritten is delayed, not sent as is.

        @param session: the connection.
        @type session: L{SessionView}
        @param envelope: the transaction, with every accepted recipient
            and its C{queueId}.
        @type envelope: L{relayd.envelope.Envelope}
        @param message: the message, with the edits of earlier modifiers.
        @type message: L{relayd.envelope.Message}
        @return: None, or a Deferred firing (or a coroutine returning) None.
        """


class ITransactionObserver(IPolicy):
    """Optional: be told how each transaction ended."""

    def transactionEnded(session: SessionView, envelope: Envelope, queued: bool) -> None:
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

    def startPolicy(reactor: IReactorTime) -> Deferred[None] | None:
        """
        Called once, when relayd starts (or when a reload brings the policy
        in): open connections, start thread pools, keep the reactor for
        timers (C{deferLater}, C{callLater}).  At startup it is called
        before the listeners open, but relayd does not wait for a Deferred
        it returns (sessions may arrive first); on reload, the new chain
        is put in place only after that Deferred fired.  A failure is
        logged.

        @param reactor: the reactor relayd runs on (use it instead of
            importing the global one, so tests can pass their own); the
            same as C{context.reactor} in C{fromConfig}.
        """

    def stopPolicy() -> Deferred[None] | None:
        """
        Called once at shutdown (after the listeners have closed), or when
        a reload drops or replaces the policy.  Cancel timers, close
        connections, stop thread pools.  May return a Deferred that fires
        when it has let go of its resources; shutdown waits for it.  A
        failure is logged.
        """


class IReloadable(IPolicy):
    """Optional: re-read files on SIGHUP."""

    def reload() -> Deferred[None] | None:
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
        L{relayd.policies.ratecounter}).

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


class IIncomingSpool(Interface):
    """
    What the SMTP session uses of the spool, the durable queue between
    receiving and sending: room to accept, a queue id, a file to write the
    message to, and the commit before C{250} (DESIGN section 5).
    """

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


ISpool = IIncomingSpool
"""The former name of L{IIncomingSpool}."""


QueueObserver: TypeAlias = "Callable[[str, QueueRecord | None], object]"
"""
Told of each message that has become durable in C{incoming/}: its queue id
and record (None when another process committed it).
"""


class IQueue(Interface):
    """
    What the scheduler (L{relayd.queue.scheduler}) and the control service
    (L{relayd.ops.control}) use of the spool: the queued messages by state
    (C{incoming}, C{active}, C{deferred}, C{hold}; L{relayd.queue.record.QueueState}),
    their records, and the moves between states.  The spool alone writes
    the queue files (the one-owner rule, DESIGN section 1); every method
    that touches the disk runs off the reactor thread and answers with a
    Deferred, except those marked blocking (tools and tests).
    """

    directory = Attribute("The spool's directory (str): read-only tools read it directly.")
    journalMode = Attribute(
        "How commits are made durable (str): C{aio} or C{threads} (through the commit "
        "journal, synced by Linux AIO or in threads), or C{off} (each message fsync'd)."
    )

    def addQueueObserver(observer: QueueObserver) -> None:
        """
        Call C{observer(queueId, record)} on the reactor thread each time a
        message has become durable in C{incoming/}.
        """

    def scan() -> Deferred[list[tuple[str, str, float]]]:
        """
        List every queued message as C{(queueId, state, nextAttempt)}
        (C{hold} with an infinite next attempt), for the scheduler's index.
        """

    def listQueued() -> Deferred[tuple[dict[str, list[str]], list[tuple[str, str]]]]:
        """
        The states holding a queue file of each queue id (names only, no
        file opened), and C{(state, error)} per directory that could not
        be listed.
        """

    def entries(state: str = "incoming") -> list[str]:
        """The queue ids in one state, sorted (by arrival).  Blocking."""

    def load(queueId: str) -> tuple[QueueRecord, str]:
        """
        A queued message's record and the path of its queue file.
        Blocking.

        @raise KeyError: no queued state holds it.
        """

    def read(queueId: str, state: str) -> Deferred[QueueRecord]:
        """The record of C{queueId} in C{state}."""

    def queueFile(queueId: str, state: str) -> str:
        """The path of the queue file of C{queueId} in C{state}."""

    def update(
        queueId: str, state: str, record: QueueRecord, newState: str | None = None
    ) -> Deferred[None]:
        """Durably replace the record of C{queueId}, moving it to C{newState} if given."""

    def move(queueId: str, state: str, newState: str, durable: bool = True) -> Deferred[None]:
        """Move the queue file of C{queueId} from C{state} to C{newState}."""

    def remove(queueId: str, state: str, durable: bool = False) -> Deferred[None]:
        """Remove a message that has left the queue for good."""

    def submit(record: QueueRecord, data: bytes) -> Deferred[str]:
        """Queue a message relayd makes itself (a DSN); fires with its queue id."""


class IRouter(Interface):
    """Where a domain's mail goes next (L{relayd.delivery.routing.Router})."""

    def route(domain: str) -> Deferred[Destination]:
        """
        Return a Deferred firing with the L{Destination} of C{domain} (its
        hops, in order), or failing with
        L{relayd.delivery.routing.RoutingError}.
        """


class IDeliverer(Interface):
    """
    Makes delivery attempts for the scheduler: in this process
    (L{relayd.delivery.attempt.Deliverer}) or in the delivery processes
    (L{relayd.delivery.processes.DeliveryPool}).
    """

    def deliver(
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
        Make one attempt to deliver the first C{size} octets of the queue
        file at C{dataPath} to C{recipients} at C{destination}.  The
        Deferred always fires with an L{AttemptResult}, never an error.
        """

    def stop() -> Deferred[None]:
        """Close idle connections and let busy ones finish; fires when all are gone."""

    def abort() -> None:
        """Cut every connection now (the shutdown deadline)."""


class IMXResolver(Interface):
    """DNS lookups for routing (L{relayd.delivery.routing.MXResolver})."""

    def lookupMX(domain: str) -> Deferred[list[tuple[int, str]]]:
        """
        Return a Deferred firing with C{[(preference, host), ...]} as the
        server gave them (a null MX has host C{"."}), or failing with
        L{relayd.delivery.routing.NXDOMAIN}, L{relayd.delivery.routing.NoData} or
        L{relayd.delivery.routing.TemporaryDNSError}.
        """

    def lookupAddresses(host: str) -> Deferred[list[str]]:
        """Return a Deferred firing with the host's IPv4 then IPv6 addresses."""
