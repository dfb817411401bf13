"""
Relaying in session: a route with C{mode = "passthrough"} (issue 13 item 5).

For such a route relayd does not queue the message: it opens the upstream
transaction to the route's next hop while its own client is connected and
answers that client with the upstream's replies, so that an application
gets the provider's verdict at once.  Postfix's before-queue content
filter (C{smtpd_proxy_filter}) works the same way, with the filter as the
upstream.

How a transaction goes (L{relayd.smtp.session.SMTPServer} drives it):

  - MAIL is answered by relayd as always: routes are chosen by recipient
    domain (L{relayd.delivery.routing.matchRoute}), so the route is known
    only at the first RCPT.  The policy chain runs first at every step; a
    recipient it refuses never reaches the upstream.
  - The first recipient a policy accepts whose route is passthrough opens
    the session (L{relayd.delivery.passthrough.Connector}: the route's hops
    in order, TLS and AUTH as each hop says), sends MAIL and that RCPT; the
    client gets the upstream's reply to the RCPT, or to MAIL when MAIL was
    refused.  Each later RCPT is relayed and answered the same way.  A
    recipient that would go by another route than the transaction's first
    one gets C{452 4.5.3} (RFC 5321 section 4.5.3.1.10), which clients
    take as "send these again in another transaction".
  - When no hop can be reached (connection, greeting, TLS or AUTH refused,
    or the connection lost before MAIL was answered) the route's
    C{fallback} decides: C{"spool"} makes it an ordinary transaction
    (relayd's own replies, the message queued and delivered later);
    C{"tempfail"} answers the RCPT C{451 4.4.1}.
  - DATA (or BDAT) is taken by relayd (its own C{354}), because the
    message checks and modifiers need the whole message.  The message goes
    to a temporary file in the spool's C{tmp/} that is never committed;
    once the policies accept it, relayd sends DATA upstream and the
    message as it would deliver it (its C{Received:} field, the modifiers'
    header changes, dot-stuffed), and the client's reply to the end of
    data is the upstream's.  A connection lost or timed out at that stage
    answers C{451 4.4.2}: nothing was queued, so the client's retry is the
    only copy (nothing is spooled twice).
  - RSET, a new EHLO, STARTTLS, QUIT or the end of the transaction close
    the upstream session (QUIT).  A client that leaves before the message
    is complete, or while it is being written upstream, gets the upstream
    connection aborted without the final dot, so no partial message is
    ever taken.

Upstream replies keep their code, enhanced code and text, lines and all.
Two are changed: a C{421} (the upstream closing) becomes C{451} with the
same text, since to the client it would mean that relayd is closing; and
a reply code that makes no sense for the command (a C{354} to RCPT)
becomes relayd's C{451 4.5.0}.  A line without an enhanced code gets the
class's C{X.0.0}, as RFC 2034 wants one on every line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks

from relayd.delivery.client import _ENHANCED, Reply
from relayd.ops.logs import Logger
from relayd.smtp.dsn import encodeXtext

if TYPE_CHECKING:
    from collections.abc import Generator

    from relayd.delivery.passthrough import Upstream
    from relayd.envelope import Envelope, Recipient, Session

__all__ = ["RelayedTransaction", "replyBytes", "clientReply"]

log = Logger(namespace="relayd.smtpd")


def clientReply(reply: Reply) -> Reply:
    """
    The upstream's C{reply} to RCPT or the end of data as relayd's client
    gets it (see the module docstring): as it is, but C{421} as C{451},
    and a code out of place as relayd's C{451 4.5.0}.
    """
    if reply.code // 100 not in (2, 4, 5):
        return Reply.local(451, "4.5.0", "Error: protocol error from the next hop; try again later")
    if reply.code == 421:
        return Reply(451, reply.enhanced, reply.text, reply.lines, remote=reply.remote)
    return reply


def replyBytes(reply: Reply) -> bytes:
    """
    C{reply} on the wire: each of its lines with the code and C{-} or a
    space (multi-line replies kept), each with an enhanced code.
    """
    lines = reply.lines if reply.remote and reply.lines else (f"{reply.enhanced} {reply.text}",)
    out = []
    last = len(lines) - 1
    for i, text in enumerate(lines):
        text = "".join(c if c >= " " or c == "\t" else "?" for c in text)
        match = _ENHANCED.match(text)
        if match is None or match.group(1) != str(reply.code)[0]:
            text = f"{reply.code // 100}.0.0 {text}".rstrip()
        out.append(f"{reply.code}{' ' if i == last else '-'}{text}")
    return "".join(line + "\r\n" for line in out).encode("utf-8")


class RelayedTransaction:
    """
    One transaction relayed in session: the upstream session and what it
    has answered so far.

    @ivar key: the index of the transaction's route in C{[[routes]]}.
    @ivar upstream: the next hop's session.
    @ivar mailReply: the upstream's reply to MAIL, once sent.
    @ivar accepted: the recipients the upstream accepted.
    """

    def __init__(self, key: int, upstream: Upstream, session: Session) -> None:
        self.key = key
        self.upstream = upstream
        self.session = session
        self.mailReply: Reply | None = None
        self.accepted: list[str] = []

    @property
    def relay(self) -> str:
        return self.upstream.relay

    def _logReply(self, envelope: Envelope, command: str, reply: Reply) -> None:
        log.info(
            "{queue_id}: passthrough to {relay}: {reply} ({command}) session={session_id}",
            queue_id=envelope.queueId,
            relay=self.relay,
            reply=reply.quoted,
            code=reply.code,
            enhanced=reply.enhanced,
            command=command,
            session_id=self.session.sessionId,
        )

    def _mailLine(self, envelope: Envelope) -> bytes | Reply:
        """MAIL FROM with the parameters the upstream can take, or why it cannot."""
        upstream = self.upstream
        offered = upstream.extensions
        if envelope.requireTLS:
            refusal = upstream.requireTLSRefusal()
            if refusal is not None:
                return refusal
        if envelope.smtputf8 and "SMTPUTF8" not in offered:
            return Reply.local(
                553,
                "5.6.7",
                f"SMTPUTF8 is required, but was not offered by host {upstream.peer}",
            )
        line = f"MAIL FROM:<{envelope.sender}>"
        if envelope.declaredSize is not None and "SIZE" in offered:
            line += f" SIZE={envelope.declaredSize}"
        if envelope.body == "8BITMIME" and "8BITMIME" in offered:
            line += " BODY=8BITMIME"
        if "DSN" in offered:
            if envelope.ret is not None:
                line += f" RET={envelope.ret}"
            if envelope.envid is not None:
                line += f" ENVID={encodeXtext(envelope.envid)}"
        if envelope.requireTLS:
            line += " REQUIRETLS"
        if envelope.smtputf8:
            line += " SMTPUTF8"
        return line.encode("utf-8")

    def _rcptLine(self, recipient: Recipient) -> bytes:
        line = f"RCPT TO:<{recipient.address}>"
        if "DSN" in self.upstream.extensions:
            if recipient.notify is not None:
                line += " NOTIFY=" + ",".join(recipient.notify)
            if recipient.orcpt is not None:
                line += f" ORCPT={recipient.orcpt}"
        return line.encode("utf-8")

    @inlineCallbacks
    def recipient(
        self, envelope: Envelope, recipient: Recipient
    ) -> Generator[Deferred[Any], Any, Reply]:
        """
        Relay one RCPT, with MAIL first when it was not sent yet.

        @return: the reply for the client's RCPT: the upstream's to RCPT,
            or to MAIL when MAIL was refused, or relayd's own when the
            session ended (C{remote} False).
        """
        if self.mailReply is None:
            line = self._mailLine(envelope)
            if isinstance(line, Reply):
                self.mailReply = line
            else:
                self.mailReply = yield self.upstream.mail(line)
                self._logReply(envelope, "MAIL FROM", self.mailReply)
        if self.mailReply.code // 100 != 2:
            return clientReply(self.mailReply)
        reply = yield self.upstream.rcpt(self._rcptLine(recipient))
        self._logReply(envelope, f"RCPT TO:<{recipient.address}>", reply)
        if reply.code // 100 == 2:
            self.accepted.append(str(recipient.address))
        return clientReply(reply)

    @inlineCallbacks
    def message(self, envelope: Envelope, file: Any) -> Generator[Deferred[Any], Any, Reply]:
        """
        DATA and the message; the reply for the client's end of data.
        """
        try:
            reply = yield self.upstream.message(file)
        finally:
            file.close()
        self._logReply(envelope, "end of DATA", reply)
        return clientReply(reply)

    def close(self) -> None:
        """End the upstream session (see L{Upstream.close})."""
        self.upstream.close()
