"""
The SMTP service extensions relayd offers, as one table (RFC 5321 section
2.2): for each, its EHLO keyword and arguments, when it is advertised, the
MAIL and RCPT parameters it brings with their parsers, and how much longer
it lets a MAIL line be.

The session asks this table what to advertise (L{advertise}), how to read
the parameters of MAIL and RCPT (L{parseMail}, L{parseRecipient}) and how
long a MAIL line may be (L{MAIL_ALLOWANCE}); it has no list of its own.
Adding an extension (SMTPUTF8, DSN, REQUIRETLS) is a row here
plus the session's handling of what the row's parsers record.

A parameter is read whenever its extension is in the table, advertised on
this connection or not: an C{AUTH=} before TLS is accepted and ignored, as
relayd always did.  A row whose parameter must not be used unadvertised
refuses it in its parser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from relayd import dsn
from relayd.envelope import Envelope, Recipient
from relayd.reply import Reply
from relayd.smtp import sasl

__all__ = [
    "EXTENSIONS",
    "MAIL_ALLOWANCE",
    "RCPT_ALLOWANCE",
    "Extension",
    "Offer",
    "advertise",
    "parseMail",
    "parseRecipient",
]


@dataclass(frozen=True)
class Offer:
    """
    What decides which extensions a session is offered now.

    @ivar tls: the session is under TLS (STARTTLS done, or port 465).
    @ivar tlsAvailable: the listener can start TLS (it has server options).
    @ivar authAvailable: the listener can check passwords (a portal).
    @ivar authenticated: the client has logged in.
    @ivar mode: the listener's mode: C{"relay"}, C{"submission"} or
        C{"submissions"}.
    @ivar messageSize: the largest message accepted, in octets.
    """

    tls: bool
    tlsAvailable: bool
    authAvailable: bool
    authenticated: bool
    mode: str
    messageSize: int


Parser = Callable[[str | None, Envelope], Reply | None]
"""
Reads one MAIL parameter's value (None for a bare keyword) into the
envelope; returns the reply refusing it, or None when it is taken.
"""

RecipientParser = Callable[[str | None, Envelope, Recipient], Reply | None]
"""
Reads one RCPT parameter's value into the L{Recipient} being added (the
server keeps it only once the recipient is accepted); returns the reply
refusing it, or None when it is taken.
"""


def _always(offer: Offer) -> bool:
    return True


@dataclass(frozen=True)
class Extension:
    """
    One row of the table.

    @ivar keyword: the EHLO keyword.
    @ivar rfc: where it is defined.
    @ivar offered: whether to advertise it, given the session's L{Offer}.
    @ivar arguments: the EHLO keyword's arguments (e.g. SIZE's limit), if any.
    @ivar mail: MAIL FROM parameters, by upper-case keyword.
    @ivar rcpt: RCPT TO parameters, by upper-case keyword.
    @ivar mailAllowance: octets the extension's MAIL parameters may add to
        the 512-octet command line (RFC 5321 section 4.5.3.1.4).
    @ivar rcptAllowance: the same for RCPT.
    """

    keyword: str
    rfc: str
    offered: Callable[[Offer], bool] = _always
    arguments: Callable[[Offer], str] | None = None
    mail: Mapping[str, Parser] = field(default_factory=dict)
    rcpt: Mapping[str, RecipientParser] = field(default_factory=dict)
    mailAllowance: int = 0
    rcptAllowance: int = 0

    def line(self, offer: Offer) -> str:
        """The EHLO reply line (without the code) advertising it."""
        if self.arguments is None:
            return self.keyword
        return f"{self.keyword} {self.arguments(offer)}"


def _size(value: str | None, envelope: Envelope) -> Reply | None:
    """RFC 1870: C{SIZE=<octets>}, the size the client expects to send."""
    # isascii: str.isdigit() takes superscripts (latin-1 "\xb9"), which int() refuses.
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
        return Reply(501, "5.5.4", "Error: bad SIZE parameter")
    envelope.declaredSize = int(value)
    return None


def _body(value: str | None, envelope: Envelope) -> Reply | None:
    """RFC 6152: C{BODY=7BIT} or C{BODY=8BITMIME}."""
    if value is None or value.upper() not in ("7BIT", "8BITMIME"):
        return Reply(501, "5.5.4", "Error: bad BODY parameter")
    envelope.body = value.upper()
    return None


def _smtputf8(value: str | None, envelope: Envelope) -> Reply | None:
    """
    RFC 6531 section 3.4: C{SMTPUTF8}, a bare keyword: the transaction may
    carry internationalized addresses and UTF-8 header fields.
    """
    if value is not None:
        return Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value")
    envelope.smtputf8 = True
    return None


def _authParameter(value: str | None, envelope: Envelope) -> Reply | None:
    """RFC 4954 section 5: C{AUTH=<mailbox>} is accepted; relayd does not trust it."""
    return None


def _ret(value: str | None, envelope: Envelope) -> Reply | None:
    """RFC 3461 section 4.3: C{RET=FULL} or C{RET=HDRS}."""
    ret, refusal = dsn.parseRet(value)
    if refusal is None:
        envelope.ret = ret
    return refusal


def _envid(value: str | None, envelope: Envelope) -> Reply | None:
    """RFC 3461 section 4.4: C{ENVID=<xtext>}, at most 100 characters decoded."""
    envid, refusal = dsn.parseEnvid(value)
    if refusal is None:
        envelope.envid = envid
    return refusal


def _notify(value: str | None, envelope: Envelope, recipient: Recipient) -> Reply | None:
    """RFC 3461 section 4.1: C{NOTIFY=NEVER} or C{SUCCESS,FAILURE,DELAY}."""
    notify, refusal = dsn.parseNotify(value)
    if refusal is None:
        recipient.notify = notify
    return refusal


def _orcpt(value: str | None, envelope: Envelope, recipient: Recipient) -> Reply | None:
    """RFC 3461 section 4.2: C{ORCPT=<addr-type>;<xtext>}."""
    orcpt, refusal = dsn.parseOrcpt(value)
    if refusal is None:
        recipient.orcpt = orcpt
    return refusal


def _requireTLS(value: str | None, envelope: Envelope) -> Reply | None:
    """
    RFC 8689 section 4.1: C{REQUIRETLS}, a bare keyword, tags the message
    to be relayed only over verified TLS.  That the session itself is under
    TLS is checked by the session (L{relayd.requiretls.checkMail}), which
    knows it.
    """
    if value is not None:
        return Reply(501, "5.5.4", "Error: bad REQUIRETLS parameter")
    envelope.requireTLS = True
    return None


EXTENSIONS: tuple[Extension, ...] = (
    Extension("PIPELINING", "RFC 2920"),
    Extension(
        "SIZE",
        "RFC 1870",
        arguments=lambda offer: str(offer.messageSize),
        mail={"SIZE": _size},
        mailAllowance=26,
    ),
    Extension(
        "STARTTLS",
        "RFC 3207",
        offered=lambda offer: offer.tlsAvailable and not offer.tls,
    ),
    Extension(
        "AUTH",
        "RFC 4954",
        # Only under TLS (DESIGN section 4.6), and only until it worked.
        offered=lambda offer: offer.tls and offer.authAvailable and not offer.authenticated,
        arguments=lambda offer: " ".join(sasl.MECHANISMS),
        mail={"AUTH": _authParameter},
        mailAllowance=500,
    ),
    Extension("ENHANCEDSTATUSCODES", "RFC 2034"),
    Extension("8BITMIME", "RFC 6152", mail={"BODY": _body}, mailAllowance=14),
    # BDAT without BINARYMIME: the content keeps DATA's line rules
    # (relayd.smtp.wire.ChunkReader), so it can be relayed as DATA.
    Extension("CHUNKING", "RFC 3030"),
    # RFC 3461 section 4: MAIL may grow by 100 octets (RET=, ENVID=), RCPT
    # by 500 (NOTIFY=, ORCPT=).
    Extension(
        "DSN",
        "RFC 3461",
        mail={"RET": _ret, "ENVID": _envid},
        rcpt={"NOTIFY": _notify, "ORCPT": _orcpt},
        mailAllowance=100,
        rcptAllowance=500,
    ),
    # Only under TLS (RFC 8689 section 2); no MAIL allowance, as the RFC
    # gives none.
    Extension(
        "REQUIRETLS",
        "RFC 8689",
        offered=lambda offer: offer.tls,
        mail={"REQUIRETLS": _requireTLS},
    ),
    # RFC 6531 section 3.4: the keyword adds 10 octets (" SMTPUTF8") to
    # the MAIL line.  The session checks the addresses against it.
    Extension("SMTPUTF8", "RFC 6531", mail={"SMTPUTF8": _smtputf8}, mailAllowance=10),
)
"""The extensions, in the order EHLO lists them."""

MAIL_ALLOWANCE = sum(extension.mailAllowance for extension in EXTENSIONS)
"""
Extra octets a MAIL line may use for the extensions relayd offers: SIZE
(RFC 1870: 26), BODY=8BITMIME (14), AUTH= (RFC 4954 section 5: 500),
RET=/ENVID= (RFC 3461 section 4: 100) and SMTPUTF8 (RFC 6531 section
3.4: 10).
"""

RCPT_ALLOWANCE = sum(extension.rcptAllowance for extension in EXTENSIONS)
"""Extra octets a RCPT line may use: NOTIFY=/ORCPT= (RFC 3461 section 4: 500)."""

_MAIL: Mapping[str, Parser] = MappingProxyType(
    {name: parser for extension in EXTENSIONS for name, parser in extension.mail.items()}
)
_RCPT: Mapping[str, RecipientParser] = MappingProxyType(
    {name: parser for extension in EXTENSIONS for name, parser in extension.rcpt.items()}
)


def advertise(offer: Offer) -> list[str]:
    """The EHLO reply lines after the greeting line, in table order."""
    return [extension.line(offer) for extension in EXTENSIONS if extension.offered(offer)]


def _unsupported(key: str) -> Reply:
    return Reply(555, "5.5.4", f"Error: unsupported parameter {key}")


def parseMail(parameters: Mapping[str, str | None], envelope: Envelope) -> Reply | None:
    """
    Read MAIL FROM's parameters into C{envelope}, in the client's order.

    @return: the reply refusing the first bad or unknown parameter
        (C{555 5.5.4} for an unknown one, RFC 5321 section 4.1.1.11), or
        None when all were taken.
    """
    for key, value in parameters.items():
        parser = _MAIL.get(key)
        if parser is None:
            return _unsupported(key)
        refusal = parser(value, envelope)
        if refusal is not None:
            return refusal
    return None


def parseRecipient(
    parameters: Mapping[str, str | None], envelope: Envelope, recipient: Recipient
) -> Reply | None:
    """
    Read RCPT TO's parameters, in keyword order, into C{recipient}, the
    recipient being added (the envelope is left alone: the server keeps
    C{recipient} once it is accepted).

    @return: the reply refusing the first bad or unknown one, or None.
    """
    for key in sorted(parameters):
        parser = _RCPT.get(key)
        if parser is None:
            return _unsupported(key)
        refusal = parser(parameters[key], envelope, recipient)
        if refusal is not None:
            return refusal
    return None
