"""
REQUIRETLS and C{TLS-Required: No} (RFC 8689): a sender's say over how its
message may travel.

Inbound (RFC 8689 sections 2 and 4.1): C{REQUIRETLS} is advertised only
under TLS (the row in L{relayd.smtp.extensions}); the MAIL parameter is
taken only on a TLS session (L{checkMail}: C{530 5.7.10} otherwise) and
recorded in the queue record (C{requireTLS}).  A message without it that
carries C{TLS-Required: No} is recorded as C{tlsOptional}
(L{markRecord}); with it, that header field is ignored and passed on
unchanged, as section 4.1 allows.

Outbound (section 4.2.1), for a C{requireTLS} message, every next hop is
held to what relayd's C{verify} TLS mode already checks (L{verifiedHop}):
STARTTLS, then a certificate that chains to the trust store (C{[delivery]
ca_file}, else the system's) and matches the hop's host name (the MX
name, or the host a route names): the RFC's "otherwise" case.  A hop
DANE decided (L{relayd.delivery.dane}, TLS mode C{"dane"}) qualifies by
its TLSA match instead, which section 4.2.1 counts as verified.  A route hop set to
C{tls = "none"} does not qualify: the operator said no TLS there, and the
message may not go in plain text.  The hop must also advertise
C{REQUIRETLS} in its EHLO inside TLS (L{relayd.delivery.client.SMTPClient.requireTLSRefusal}),
and relayd passes C{REQUIRETLS} on MAIL.  A hop that fails this is left
(with a log line saying why) and the next one tried; when every hop was
reached and none qualified the recipients fail at once (section 4.2.1:
the message must not be sent to the domain, and a non-delivery report goes
to the sender) with C{5.7.10} (no TLS, or a certificate not verified) or
C{5.7.30} (verified TLS but no REQUIRETLS).  A hop that could not be
reached (refused or timed-out connection, a 4xx greeting) may qualify
later: then the message is deferred as any other.  It never falls back to
plain text.

What C{TLS-Required: No} overrides (section 4.2.2): only TLS policies the
recipient domain publishes: MTA-STS (the scheduler does not look the
policy up for a C{tlsOptional} record) and DANE (the deliverer, asked with
C{tlsOptional=True}, looks up no TLSA record and delivers as without DANE;
the delivery log line says C{policy=none (TLS-Required: No)},
L{POLICY_WAIVED}).  The C{tls} mode of a route or of C{[delivery] mx_tls}
is the operator's and stays.

Non-delivery reports (section 5): a report about a C{requireTLS} message
carries the original's header section only, never its body (relayd's
reports always do, see L{relayd.delivery.bounce.makeDSN}), and is itself marked
C{requireTLS} (L{bounceRecord}), so that it travels back under the same
rule: the headers (the subject among them) are no less private than the
message.  The cost: when the way back to the sender does not offer
REQUIRETLS, that report cannot be delivered either, and as a report from
C{<>} it is dropped (logged).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from relayd.delivery.client import HopFailure
from relayd.delivery.routing import Hop
from relayd.envelope import Envelope, Headers, Message, Session
from relayd.queue.record import QueueRecord
from relayd.reply import Reply

if TYPE_CHECKING:
    # The deliverer imports this module: the result type only for the annotation.
    from relayd.delivery.attempt import AttemptResult

__all__ = [
    "HEADER",
    "KEYWORD",
    "POLICY_WAIVED",
    "bounceRecord",
    "checkMail",
    "isTLSFailure",
    "markRecord",
    "markWaived",
    "tlsRequiredNo",
    "verifiedHop",
]

KEYWORD = "REQUIRETLS"
"""The EHLO keyword and MAIL parameter (RFC 8689 section 2)."""

HEADER = "TLS-Required"
"""The header field of RFC 8689 section 3."""

POLICY_WAIVED = "none (TLS-Required: No)"
"""
The policy of an attempt whose recipient-domain TLS policies (DANE) were
not applied because the message has C{TLS-Required: No} (section 4.2.2):
the C{policy} of its L{relayd.delivery.attempt.AttemptResult}, so that the
delivery log line says why no published policy was applied.
"""


def checkMail(session: Session, envelope: Envelope) -> Reply | None:
    """
    RFC 8689 section 2: REQUIRETLS may only be given on a session that
    itself uses TLS (RFC 5248 X.7.10, "encryption needed"; 530 as RFC
    3207 answers a command that needs TLS first).

    @return: the refusal, or None when the MAIL command may go on.
    """
    if envelope.requireTLS and not session.tls:
        return Reply(530, "5.7.10", "Error: REQUIRETLS needs a TLS session")
    return None


def tlsRequiredNo(headers: Headers) -> bool:
    """
    Whether the header section has C{TLS-Required: No} (RFC 8689 section
    3; ABNF literals are case-insensitive).
    """
    return any(value.lower() == "no" for value in headers.getAll(HEADER))


def markRecord(record: QueueRecord, envelope: Envelope, message: Message) -> QueueRecord:
    """
    The record of a received message with what RFC 8689 section 4.1 asks
    to keep: C{requireTLS} from the MAIL parameter, or else C{tlsOptional}
    from a C{TLS-Required: No} field.  With REQUIRETLS the field is ignored
    (and left in the message: section 4.1 allows relaying it).
    """
    if envelope.requireTLS:
        return replace(record, requireTLS=True)
    if tlsRequiredNo(message.headers):
        return replace(record, tlsOptional=True)
    return record


def verifiedHop(hop: Hop) -> Hop | None:
    """
    C{hop} as a REQUIRETLS message must use it: with the C{verify} TLS mode
    (certificate chained to the trust store and matching C{hop.host}).
    None for a hop configured C{tls = "none"}, which never qualifies.
    """
    if hop.tls == "none":
        return None
    if hop.tls in ("verify", "dane"):
        # "dane": the certificate must match the MX host's TLSA records
        # (relayd.delivery.dane), verified TLS for RFC 8689 section 4.2.1.
        return hop
    return replace(hop, tls="verify")


def isTLSFailure(error: HopFailure) -> bool:
    """
    Whether a hop failed the TLS part of REQUIRETLS: it offered no
    STARTTLS (4.7.4), or the handshake or the certificate check failed
    (4.7.5), as L{relayd.delivery.client.SMTPClient} reports them, before TLS was
    up.  Anything else (a refused connection, a timeout, a 4xx greeting or
    reply) says nothing about the hop's TLS and stays temporary.
    """
    reply = error.reply
    return (
        error.connected
        and error.tls is None
        and not reply.remote
        and reply.enhanced in ("4.7.4", "4.7.5")
    )


def markWaived(result: AttemptResult) -> AttemptResult:
    """
    C{result} labelled with L{POLICY_WAIVED} (when a hop was tried at all):
    the domain's published policies were waived, not absent.
    """
    if result.hop is not None:
        result.policy = POLICY_WAIVED
    return result


def bounceRecord(dsn: QueueRecord, original: QueueRecord) -> QueueRecord:
    """
    The record of a delivery status notification about C{original}:
    marked C{requireTLS} when the original was (RFC 8689 section 5).
    """
    if original.requireTLS:
        return replace(dsn, requireTLS=True)
    return dsn
