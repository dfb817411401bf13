"""
One delivery attempt: a message to the recipients of one destination, with
an outcome for every recipient (DESIGN sections 1 and 6).

L{Deliverer.deliver} tries the destination's hops in order, like Postfix's
smtp(8) walking the MX list (RFC 5321 section 5.1): a refused or timed-out
connection, a 4xx or 5xx greeting, a failed EHLO/HELO, AUTH or a TLS
failure under C{required}/C{verify} moves on to the next hop.  Once a hop
has accepted the session, its answers are the outcome: per recipient for
RCPT, for all accepted recipients after the data.  When every hop fails, all
recipients are deferred.

The outcome never errbacks: whatever went wrong becomes a L{Reply} (code,
enhanced code (RFC 3463) and text) with the command it answered, which the
scheduler can act on and the bounce module can put in a DSN's
Diagnostic-Code (RFC 3464 section 2.3.6) and "in reply to" text.  The
message's DSN parameters (RFC 3461) go to a next hop that advertises DSN.

Sessions are kept open for a while after a message, per hop, and reused for
the next message to the same hop (Postfix's connection cache): fewer TCP and
TLS handshakes for a smart host that takes most of the mail.  The hop is
chosen first and the cache consulted after, never the other way round: the
first hop of the destination that is not known to be down, which routing
picks at random among equal-preference MX hosts for every message.  So load
spreads over them as RFC 5321 section 5.1 asks however long connections
live; a cache asked first would send everything to whichever host the first
connection happened to reach (issue 14).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    gatherResults,
    inlineCallbacks,
)
from twisted.internet.error import (
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.failure import Failure
from zope.interface import implementer

import relayd.reply
from relayd.certificates import INTERMEDIATE, OPPORTUNISTIC, TLSProfile
from relayd.delivery import dane as daneModule
from relayd.delivery import requiretls
from relayd.delivery.client import (
    CHUNK_SIZE,
    ClientTimeouts,
    HopFailure,
    Reply,
    SMTPClient,
    Transaction,
)
from relayd.delivery.endpoint import hopEndpoint, relayName
from relayd.delivery.oauth2 import TokenSources
from relayd.delivery.routing import Destination, Hop
from relayd.delivery.smtputf8 import needsSMTPUTF8
from relayd.delivery.tlsrpt import TLSSession
from relayd.interfaces import IDeliverer
from relayd.ops.logs import Logger
from relayd.smtp.dsn import DSNParameters

__all__ = ["RecipientResult", "AttemptResult", "Deliverer", "loadTrustRoot"]

log = Logger(namespace="relayd.smtp")

DEFAULT_TIMEOUTS = ClientTimeouts()
"""The RFC 5321 section 4.5.3.2 timeouts."""

_PEM_END = b"-----END CERTIFICATE-----"


@dataclass
class RecipientResult:
    """
    The outcome for one recipient.

    @ivar status: C{"delivered"} (2xx after the data), C{"deferred"} (try
        again later) or C{"failed"} (bounce).
    @ivar reply: the reply that decided it (L{relayd.reply.Reply}; a
        L{relayd.delivery.client.Reply} when it came from a next hop): its code
        class matches C{status}; for a DSN, C{"smtp; <code> <enhanced>
        <text>"}.
    @ivar remoteHost: the host name of the next hop that gave this reply,
        or None when relayd describes the outcome itself (connection
        refused or lost, timeout, TLS failure): then the reply's text names
        the host and what happened, and a DSN should not present it as the
        remote server's words.
    @ivar command: the SMTP command the reply answered (C{"MAIL FROM"},
        C{"RCPT TO"}, C{"DATA"}, C{"end of DATA"}), or None for an outcome
        relayd describes itself; a DSN says "in reply to" it.
    @ivar dsnPassed: the next hop advertised DSN and was given the DSN
        parameters (RFC 3461 section 4), so it sends any further notice
        the recipient asked for, not relayd.
    """

    recipient: str
    status: str
    reply: relayd.reply.Reply
    remoteHost: str | None
    command: str | None = None
    dsnPassed: bool = False

    @property
    def code(self) -> int:
        """The reply code, e.g. 250, 451, 550."""
        return self.reply.code

    @property
    def enhanced(self) -> str:
        """The RFC 3463 code, e.g. C{"5.1.1"}."""
        return self.reply.enhanced or f"{self.reply.code // 100}.0.0"

    @property
    def text(self) -> str:
        """The reply text without the codes."""
        return self.reply.text


@dataclass
class AttemptResult:
    """
    The outcome of one L{Deliverer.deliver}.

    @ivar results: one per recipient, in the order given.
    @ivar hop: the hop whose session gave the results; when every hop
        failed, the hop whose failure is reported; None only for a
        destination without hops.
    @ivar tls: C{"<version> <cipher>"} when the session used TLS.
    @ivar policy: the TLS policy the destination published and relayd
        applied to the hop, for the delivery log line: C{"dane"} (the
        certificate matched a TLSA record), C{"dane-unusable"} (TLSA
        records, none usable: TLS without authentication), or None.
    @ivar sessions: for TLSRPT (RFC 8460, L{relayd.delivery.tlsrpt}): the
        new sessions of this attempt with hops under a published policy
        (C{verify} or C{dane} TLS, or MTA-STS testing's check), each with
        its failure type if it failed; the queue manager counts them.
    """

    results: list[RecipientResult]
    hop: Hop | None
    tls: str | None
    policy: str | None = None
    sessions: list[TLSSession] = field(default_factory=list)


def loadTrustRoot(caFile: str) -> Any:
    """
    The CA certificates in a PEM file as a trust root for C{verify} hops.

    @raise OSError: when the file cannot be read.
    @raise ValueError: when it holds no certificate.
    """
    with open(caFile, "rb") as f:
        data = f.read()
    certificates = [
        Certificate.loadPEM(block + _PEM_END + b"\n")
        for block in data.split(_PEM_END)
        if b"-----BEGIN CERTIFICATE-----" in block
    ]
    if not certificates:
        raise ValueError(f"{caFile}: no PEM certificate found")
    return trustRootFromCertificates(certificates)


def _status(reply: Reply) -> str:
    """2xx delivered, 5xx failed, anything else deferred (RFC 5321 section 4.2.1)."""
    kind = reply.code // 100
    if kind == 2:
        return "delivered"
    if kind == 5:
        return "failed"
    return "deferred"


def _hasEightBit(path: str, size: int) -> bool:
    """
    True when the message (the first C{size} octets of C{path}) has an
    octet above 127 (RFC 6152 8BITMIME).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
            if not chunk:
                break
            if not chunk.isascii():
                return True
            offset += len(chunk)
    finally:
        os.close(fd)
    return False


def _connectError(hop: Hop, failure: Failure) -> Reply:
    """Postfix's C{connect to host[address]:port: reason}, as a 4.4.1."""
    if failure.check(ConnectionRefusedError):
        why = "Connection refused"
    elif failure.check(TimeoutError, TCPTimedOutError):
        why = "Connection timed out"
    elif failure.check(NoRouteError):
        why = "No route to host"
    elif failure.check(CancelledError):
        why = "attempt cancelled: relayd is stopping"
    elif failure.check(DNSLookupError):
        why = "address lookup failed"
    else:
        why = failure.getErrorMessage()
    return Reply.local(451, "4.4.1", f"connect to {relayName(hop)}: {why}")


class _QuietFactory(Factory):
    """
    connectProtocol's one-shot factory without its two log lines
    ("Starting factory", "Stopping factory") per outbound connection.
    """

    noisy = False

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol


@dataclass
class _Idle:
    client: SMTPClient
    timer: Any


@implementer(IDeliverer)
class Deliverer:
    """
    Delivers messages over SMTP, one attempt at a time, reusing idle
    sessions.

    @ivar heloName: the name relayd gives in EHLO/HELO.
    @ivar timeouts: the L{ClientTimeouts}.
    @ivar maxMessagesPerConnection: transactions one connection may carry
        before it is closed (Postfix's C{smtp_connection_reuse_count_limit}
        is similar).
    @ivar idleTimeout: seconds an unused connection stays open.
    @ivar reuseTimeLimit: seconds from the start of a connection during
        which it may be parked for another message (Postfix's
        C{smtp_connection_reuse_time_limit}).
    @ivar hopDownTime: seconds a hop that could not take a session (refused
        or timed-out connection, 4xx/5xx greeting, failed EHLO, TLS or AUTH)
        goes behind the destination's other hops, so that messages are not
        each held up by it; afterwards one attempt at a time probes it.
    """

    hopDownTime = 60.0

    def __init__(
        self,
        reactor: Any,
        heloName: str,
        timeouts: ClientTimeouts = DEFAULT_TIMEOUTS,
        caFile: str | None = None,
        maxMessagesPerConnection: int = 100,
        idleTimeout: float = 2.0,
        reuseTimeLimit: float = 300.0,
        tlsProfile: TLSProfile = INTERMEDIATE,
        opportunisticProfile: TLSProfile = OPPORTUNISTIC,
        dane: daneModule.DaneResolver | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param caFile: PEM file of the CAs trusted for C{verify} hops; None
            for the system's trust store.
        @param tlsProfile: TLS versions and suites for C{required} and
            C{verify} hops; L{opportunisticProfile} for C{opportunistic}
            ones (L{relayd.delivery.client.SMTPClient}).
        @param dane: looks up MX security and TLSA records for MX
            destinations (C{[delivery] dane = true}); None: no DANE.
        @raise OSError: C{caFile} cannot be read.
        @raise ValueError: C{caFile} holds no certificate.
        """
        self.reactor = reactor
        self.heloName = heloName
        self.timeouts = timeouts
        self.maxMessagesPerConnection = maxMessagesPerConnection
        self.idleTimeout = idleTimeout
        self.reuseTimeLimit = reuseTimeLimit
        self.tlsProfile = tlsProfile
        self.opportunisticProfile = opportunisticProfile
        self._trustRoot = loadTrustRoot(caFile) if caFile is not None else None
        self.dane = dane
        self._danePolicies: dict[Hop, daneModule.DanePolicy] = {}
        self._idle: dict[Hop, list[_Idle]] = {}
        self._downUntil: dict[Hop, float] = {}
        self._downPurgeAt = 64
        self._clients: dict[SMTPClient, float] = {}
        self._connecting: set[Deferred[Any]] = set()
        self._stopping = False
        # OAuth2 access tokens (auth = "xoauth2"/"oauthbearer" hops), shared
        # by every connection.
        self.tokens = TokenSources(reactor)

    # --- public ----------------------------------------------------------

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
        Make one attempt to deliver the message in C{dataPath}: its first
        C{size} octets (the rest of a queue file is its record,
        L{relayd.queue.record}).

        @param sender: the reverse-path; C{""} is the null reverse-path
            (C{MAIL FROM:<>}, RFC 5321 section 4.5.5) of a bounce.
        @param recipients: all for this destination; one transaction.
        @param size: the size of the message, for C{SIZE=} (RFC 1870).
        @param queueId: for the log lines about this attempt.
        @param dsn: the message's DSN parameters (RFC 3461), passed on to a
            next hop that advertises DSN.
        @param requireTLS: the message was received with REQUIRETLS (RFC
            8689): only a hop with verified TLS that offers REQUIRETLS may
            take it, and when every hop was reached and none does, the
            recipients fail (L{relayd.delivery.requiretls}).
        @param smtputf8: the message came with C{SMTPUTF8} (its record
            says so); whether the transaction needs it at the next hop is
            L{relayd.delivery.smtputf8.needsSMTPUTF8}'s rule.
        @param tlsOptional: the message has C{TLS-Required: No} (RFC 8689
            section 4.2.2): DANE is not applied, as the scheduler does not
            apply MTA-STS (L{requiretls.POLICY_WAIVED}).
        @return: a Deferred that always fires with an L{AttemptResult},
            never an error.
        """
        d = self._attempt(
            destination,
            sender,
            list(recipients),
            dataPath,
            size,
            queueId,
            dsn,
            smtputf8,
            requireTLS,
            tlsOptional,
        )
        if tlsOptional and self._daneApplies(destination):
            d.addCallback(requiretls.markWaived)

        def unexpected(failure: Failure) -> AttemptResult:
            log.failure("{queue_id}: delivery attempt failed", failure, queue_id=queueId)
            reply = Reply.local(451, "4.3.0", "internal error in relayd's delivery")
            return self._result(recipients, reply, None, None)

        return d.addErrback(unexpected)

    def stop(self) -> Deferred[None]:
        """
        Close the idle connections (QUIT), cancel connection attempts, and
        let the busy ones close after their transaction.  Fires once every
        connection is gone.
        """
        self._stopping = True
        if self.dane is not None:
            self.dane.stop()
        for d in list(self._connecting):
            d.cancel()
        for entries in list(self._idle.values()):
            for entry in list(entries):
                self._dropIdle(entry)
        self._idle.clear()
        closing = [client.whenClosed() for client in list(self._clients)]
        closing.append(self.tokens.stop())
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)

    def abort(self) -> None:
        """
        Cut every connection now (shutdown deadline): the attempts in flight
        end with a temporary failure for their recipients, which stay
        queued; a message cut before the server's final reply may arrive
        twice, the accepted cost in SMTP (RFC 5321 section 6.1 prefers a
        duplicate to a loss).
        """
        self._stopping = True
        for d in list(self._connecting):
            d.cancel()
        for client in list(self._clients):
            transport = getattr(client, "transport", None)
            if transport is not None:
                transport.abortConnection()

    # --- one attempt -----------------------------------------------------

    @inlineCallbacks
    def _attempt(
        self,
        destination: Destination,
        sender: str,
        recipients: list[str],
        dataPath: str,
        size: int,
        queueId: str | None,
        dsn: DSNParameters | None = None,
        smtputf8: bool = False,
        requireTLS: bool = False,
        tlsOptional: bool = False,
    ) -> Generator[Deferred[Any], Any, AttemptResult]:
        if not recipients:
            return AttemptResult([], None, None)
        try:
            eightBit = _hasEightBit(dataPath, size)
            utf8 = needsSMTPUTF8(smtputf8, sender, recipients, dataPath, size)
        except OSError as e:
            reply = Reply.local(451, "4.3.0", f"cannot read queue file: {e.strerror}")
            return self._result(recipients, reply, None, None)

        failure: tuple[Hop, HopFailure] | None = None
        sessions: list[TLSSession] = []
        # DANE (RFC 7672) first: it decides the TLS mode of each MX hop,
        # over MTA-STS and the configured mode (DESIGN section 6).
        if tlsOptional and self._daneApplies(destination):
            # TLS-Required: No (RFC 8689 section 4.2.2): the sender waives
            # the policies the recipient domain publishes, DANE among them.
            log.info(
                "{queue_id}: TLS-Required: No: DANE not applied to {key}",
                queue_id=queueId,
                key=destination.key,
            )
        elif self._daneApplies(destination):
            destination, failure = yield self._applyDane(destination, queueId, sessions)
        # REQUIRETLS: the first hop that was reached and did not qualify.
        unfit: tuple[Hop, Reply] | None = None
        if requireTLS:
            destination, unfit = self._requireTLSHops(destination, queueId)
        for hop in self._order(destination):
            if self._stopping:
                break
            cached = self._takeIdle(hop)
            if cached is not None and requireTLS:
                refusal = cached.requireTLSRefusal()
                if refusal is not None:
                    # Fit for other mail to this hop, not for this message.
                    self._park(hop, cached)
                    unfit = unfit or self._unfit(queueId, hop, refusal)
                    continue
            if cached is not None:
                transaction = yield cached.send(
                    sender, recipients, dataPath, size, eightBit, dsn, utf8, requireTLS=requireTLS
                )
                if not transaction.stale:
                    return self._finished(cached, hop, recipients, transaction, queueId, True)
                log.info(
                    "{queue_id}: cached connection to {peer} is gone; connecting afresh",
                    queue_id=queueId,
                    peer=cached.peer,
                )
                cached.quit()
            if hop in self._downUntil:
                # A probe of a hop that was down (or the last resort): the
                # other messages keep going elsewhere meanwhile.
                self._downUntil[hop] = self.reactor.seconds() + self.hopDownTime
            try:
                client = yield self._connect(hop)
            except HopFailure as e:
                log.info(
                    "{queue_id}: {hop}: {text}",
                    queue_id=queueId,
                    hop=relayName(hop),
                    text=str(e.reply),
                )
                if e.tlsProblem is not None and self._underPolicy(hop):
                    sessions.append(self._session(hop, e.sendingAddress, e.tlsProblem))
                self._markDown(hop)
                if requireTLS and requiretls.isTLSFailure(e):
                    refusal = Reply.local(
                        550,
                        "5.7.10",
                        f"requiretls: TLS with host {hop.host}[{hop.address}] not established "
                        f"or its certificate not verified: {e.reply.text}",
                    )
                    unfit = unfit or self._unfit(queueId, hop, refusal)
                    continue
                if failure is None or e.reply.remote or not failure[1].reply.remote:
                    # A reply the peer actually sent is the better diagnosis
                    # to report than a refused connection elsewhere.
                    failure = (hop, e)
                continue
            self._downUntil.pop(hop, None)
            if self._underPolicy(hop):
                sessions.append(self._session(hop, client.sendingAddress, client.tlsProblem))
                if hop.tlsCheck and client.tlsProblem is not None:
                    log.info(
                        "{queue_id}: mta-sts testing: would have failed: {host}[{address}]: "
                        "{result}: {why}",
                        queue_id=queueId,
                        host=hop.host,
                        address=hop.address,
                        result=client.tlsProblem[0],
                        why=client.tlsProblem[1],
                    )
            if requireTLS:
                refusal = client.requireTLSRefusal()
                if refusal is not None:
                    client.quit()
                    unfit = unfit or self._unfit(queueId, hop, refusal)
                    continue
            transaction = yield client.send(
                sender, recipients, dataPath, size, eightBit, dsn, utf8, requireTLS=requireTLS
            )
            done = self._finished(client, hop, recipients, transaction, queueId, False)
            done.sessions = sessions
            return done

        if unfit is not None and failure is None and not self._stopping:
            # Every hop was reached and none may take a REQUIRETLS
            # message: it must not go to this destination (RFC 8689
            # section 4.2.1), and the sender hears so now.
            hop, refusal = unfit
            result = self._result(recipients, refusal, hop, None)
            result.sessions = sessions
            self._log(queueId, result)
            return result

        if failure is None:
            text = (
                "relayd is stopping"
                if self._stopping
                else f"no next hop for destination {destination.key}"
            )
            return self._result(recipients, Reply.local(451, "4.4.1", text), None, None)
        hop, error = failure
        result = self._result(recipients, error.reply, hop, error.tls)
        result.policy = self._policyName(hop)
        result.sessions = sessions
        self._log(queueId, result)
        return result

    # --- DANE (RFC 7672) ---------------------------------------------------

    @inlineCallbacks
    def _applyDane(
        self,
        destination: Destination,
        queueId: str | None,
        sessions: list[TLSSession] | None = None,
    ) -> Generator[Deferred[Any], Any, tuple[Destination, tuple[Hop, HopFailure] | None]]:
        """
        The MX destination as DANE has it (L{relayd.delivery.dane}): when
        the MX RRset is secure, each host's TLSA records decide its hops'
        TLS mode: C{"dane"} with usable records (TLS and a matching
        certificate, checked by the client), C{"required"} when all are
        unusable (RFC 7672 section 2.2: encryption still mandatory), the
        configured mode without records.  A host whose TLSA lookup failed
        is left out, and its failure (C{4.7.5}) is what the attempt
        reports if no other hop does better: never plain text to it.
        """
        assert self.dane is not None
        domain = destination.key[3:]
        if domain.startswith("["):
            return destination, None
        secure = yield self.dane.mxSecure(domain)
        if not secure:
            log.debug(
                "{queue_id}: MX of {domain} not DNSSEC-validated: no DANE",
                queue_id=queueId,
                domain=domain,
            )
            return destination, None
        keys = sorted({(hop.host, hop.port) for hop in destination.hops})
        found = yield gatherResults([self.dane.lookupTLSA(host, port) for host, port in keys])
        signed = yield gatherResults([self.dane.hostSecure(host) for host, _ in keys])
        policies = {
            # A host in an unsigned zone gets no DANE (RFC 7672 section
            # 2.2.2), whatever its TLSA lookup said.
            key: policy if secure else daneModule.NO_DANE
            for key, policy, secure in zip(keys, found, signed, strict=True)
        }
        hops: list[Hop] = []
        failure: tuple[Hop, HopFailure] | None = None
        for hop in destination.hops:
            policy = policies[(hop.host, hop.port)]
            mode = policy.mode
            if mode == "dane-error":
                reply = Reply.local(
                    451, "4.7.5", f"DANE: {policy.error}; not delivering to {hop.host}"
                )
                log.info("{queue_id}: {text}", queue_id=queueId, text=reply.text)
                failure = failure or (hop, HopFailure(reply, connected=False))
                if sessions is not None:
                    # RFC 8460 section 4.3.2.1: no valid answer from the
                    # resolver for a host of a signed MX RRset.
                    problem = ("dnssec-invalid", str(policy.error))
                    sessions.append(replace(self._session(hop, "", problem), dane=True))
                continue
            if mode == "dane":
                hop = replace(hop, tls="dane")
            elif mode == "dane-unusable" and hop.tls in ("none", "opportunistic"):
                hop = replace(hop, tls="required")
            if mode != "none":
                self._danePolicies[hop] = policy
            hops.append(hop)
        if len(self._danePolicies) > 4096:
            # Policies of hops no longer mailed: looked up afresh anyway.
            self._danePolicies = {h: p for h, p in self._danePolicies.items() if h in hops}
        return replace(destination, hops=tuple(hops)), failure

    def _underPolicy(self, hop: Hop) -> bool:
        """
        Whether a session with C{hop} counts for TLSRPT: its TLS is
        C{verify} (MTA-STS enforce, or configured so), C{dane}, or checked
        for MTA-STS testing.  The queue manager, which knows the policy,
        decides which policy type, if any, the session counts under.
        """
        return hop.tls in ("verify", "dane") or hop.tlsCheck or hop in self._danePolicies

    def _session(
        self, hop: Hop, sendingAddress: str, problem: tuple[str, str] | None
    ) -> TLSSession:
        """One session with C{hop} for TLSRPT; C{problem} None: a success."""
        policy = self._danePolicies.get(hop)
        if problem is None and policy is not None and policy.mode == "dane-unusable":
            # RFC 8460 section 4.3.2.1: TLSA records, none valid (the
            # session went ahead with unauthenticated TLS, RFC 7672 2.2).
            problem = ("tlsa-invalid", "no usable TLSA record")
        tlsa = tuple(
            f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}"
            for r in (policy.records if policy is not None else ())
        )
        return TLSSession(
            hop.host,
            hop.address,
            sendingAddress,
            problem[0] if problem is not None else None,
            problem[1] if problem is not None else "",
            tlsa,
            dane=policy is not None,
        )

    def _daneApplies(self, destination: Destination) -> bool:
        """Whether DANE is on and C{destination} is a domain's MX hosts (not a route)."""
        return (
            self.dane is not None
            and destination.key.startswith("mx:")
            and not destination.key.startswith("mx:[")
        )

    def _policyName(self, hop: Hop | None) -> str | None:
        """The published TLS policy applied to C{hop}, for the log line."""
        policy = self._danePolicies.get(hop) if hop is not None else None
        return policy.mode if policy is not None else None

    def _requireTLSHops(
        self, destination: Destination, queueId: str | None
    ) -> tuple[Destination, tuple[Hop, Reply] | None]:
        """
        The destination as a REQUIRETLS message must use it: every hop with
        verified TLS (L{requiretls.verifiedHop}), those configured
        C{tls = "none"} left out; and the refusal for the first of those.
        """
        hops: list[Hop] = []
        unfit: tuple[Hop, Reply] | None = None
        for hop in destination.hops:
            verified = requiretls.verifiedHop(hop)
            if verified is not None:
                hops.append(verified)
                continue
            refusal = Reply.local(
                550,
                "5.7.10",
                f'requiretls: next hop {relayName(hop)} is configured with tls = "none"',
            )
            unfit = unfit or self._unfit(queueId, hop, refusal)
        return replace(destination, hops=tuple(hops)), unfit

    def _unfit(self, queueId: str | None, hop: Hop, refusal: Reply) -> tuple[Hop, Reply]:
        """Log why C{hop} cannot take a REQUIRETLS message."""
        log.info("{queue_id}: {text}", queue_id=queueId, text=refusal.text, hop=hop.host)
        return hop, refusal

    @inlineCallbacks
    def _connect(self, hop: Hop) -> Generator[Deferred[Any], Any, SMTPClient]:
        """
        Connect to C{hop} and set up the session.

        @raise HopFailure: when the hop cannot take mail.
        """
        client = SMTPClient(
            hop,
            self.heloName,
            self.timeouts,
            self.reactor,
            self._trustRoot,
            self.tlsProfile,
            self.opportunisticProfile,
            dane=self._danePolicies.get(hop),
            tokens=self.tokens,
        )
        endpoint = hopEndpoint(self.reactor, hop.address, hop.port, self.timeouts.connect)
        started = self.reactor.seconds()
        connecting = endpoint.connect(_QuietFactory(client))
        self._connecting.add(connecting)
        try:
            yield connecting
        except Exception:
            raise HopFailure(_connectError(hop, Failure()), connected=False) from None
        finally:
            self._connecting.discard(connecting)
        self._clients[client] = started
        client.whenClosed().addCallback(lambda _: self._forget(client))
        yield client.ready
        return client

    def _finished(
        self,
        client: SMTPClient,
        hop: Hop,
        recipients: list[str],
        transaction: Transaction,
        queueId: str | None,
        reused: bool,
    ) -> AttemptResult:
        """Turn the replies into results; keep or close the connection."""
        results = [
            RecipientResult(
                recipient=recipient,
                status=_status(reply),
                reply=reply,
                remoteHost=hop.host if reply.remote else None,
                command=command if reply.remote else None,
                dsnPassed=transaction.dsn,
            )
            for recipient, reply, command in zip(
                recipients, transaction.replies, transaction.commands, strict=True
            )
        ]
        result = AttemptResult(results, hop, client.tls, self._policyName(hop))
        self._log(queueId, result, reused)
        started = self._clients.get(client)
        if (
            client.reusable
            and not self._stopping
            and client.messages < self.maxMessagesPerConnection
            and started is not None
            and self.reactor.seconds() - started < self.reuseTimeLimit
        ):
            self._park(hop, client)
        else:
            client.quit()
        return result

    def _result(
        self, recipients: list[str], reply: Reply, hop: Hop | None, tls: str | None
    ) -> AttemptResult:
        """Every recipient with the same outcome."""
        remoteHost = hop.host if hop is not None and reply.remote else None
        return AttemptResult(
            [RecipientResult(r, _status(reply), reply, remoteHost) for r in recipients],
            hop,
            tls,
        )

    def _log(self, queueId: str | None, result: AttemptResult, reused: bool = False) -> None:
        hop = result.hop
        relay = relayName(hop)
        # Debug level: the scheduler writes the operator's delivery log line
        # per recipient (with the delay since arrival); this one adds
        # whether the connection was reused.
        for r in result.results:
            log.debug(
                "{queue_id}: to=<{recipient}> relay={relay} status={status} "
                "({code} {enhanced} {text}) tls={tls} policy={policy} reused={reused}",
                queue_id=queueId,
                recipient=r.recipient,
                relay=relay,
                status=r.status,
                code=r.code,
                enhanced=r.enhanced,
                text=r.text,
                tls=result.tls,
                policy=result.policy or "none",
                reused=reused,
            )

    # --- the connection cache ---------------------------------------------

    def _order(self, destination: Destination) -> list[Hop]:
        """
        The destination's hops in the order to try them for one message:
        routing's order (preference, equal preferences shuffled anew for
        every message, or a route's order), except that hops known to be
        down go last.  They stay in the list, so a message still reaches
        them when nothing else answers.
        """
        now = self.reactor.seconds()
        up = [hop for hop in destination.hops if self._downUntil.get(hop, 0.0) <= now]
        down = [hop for hop in destination.hops if self._downUntil.get(hop, 0.0) > now]
        return up + down

    def _markDown(self, hop: Hop) -> None:
        """
        Put C{hop} behind the others for L{hopDownTime} seconds.  Entries
        long expired are dropped now and then, so that hops of domains no
        longer mailed do not pile up.
        """
        now = self.reactor.seconds()
        self._downUntil[hop] = now + self.hopDownTime
        if len(self._downUntil) > self._downPurgeAt:
            oldest = now - self.hopDownTime
            self._downUntil = {h: t for h, t in self._downUntil.items() if t > oldest}
            self._downPurgeAt = max(64, 2 * len(self._downUntil))

    def _takeIdle(self, hop: Hop) -> SMTPClient | None:
        """
        An idle session to C{hop}, if any: the most recently parked, whose
        server is the least likely to have given up on it.
        """
        entries = self._idle.get(hop)
        while entries:
            entry = entries.pop()
            if entry.timer.active():
                entry.timer.cancel()
            if entry.client.reusable:
                if not entries:
                    del self._idle[hop]
                return entry.client
            entry.client.quit()
        self._idle.pop(hop, None)
        return None

    def _park(self, hop: Hop, client: SMTPClient) -> None:
        entry = _Idle(client, None)
        entry.timer = self.reactor.callLater(self.idleTimeout, self._expire, hop, entry)
        self._idle.setdefault(hop, []).append(entry)

    def _expire(self, hop: Hop, entry: _Idle) -> None:
        entries = self._idle.get(hop, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self._idle[hop]
        entry.client.quit()

    def _dropIdle(self, entry: _Idle) -> None:
        if entry.timer.active():
            entry.timer.cancel()
        entry.client.quit()

    def _forget(self, client: SMTPClient) -> None:
        """A connection is gone: drop it from the cache."""
        self._clients.pop(client, None)
        entries = self._idle.get(client.hop)
        if entries:
            for entry in list(entries):
                if entry.client is client:
                    if entry.timer.active():
                        entry.timer.cancel()
                    entries.remove(entry)
            if not entries:
                del self._idle[client.hop]
