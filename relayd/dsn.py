# -*- test-case-name: tests.test_dsn -*-
"""
Delivery status notification requests (RFC 3461): the C{RET} and C{ENVID}
parameters of MAIL, the C{NOTIFY} and C{ORCPT} parameters of RCPT.

This module reads them from a client (the parsers of the C{DSN} row in
L{relayd.smtp.extensions}), writes them for a next hop
(L{DSNParameters}), and answers the questions the scheduler asks of them
(L{wants}): which notices a recipient asked for.

What is kept where:

  - C{ret}: C{"FULL"} or C{"HDRS"}, or None when the client gave none;
  - C{envid}: the envelope id decoded from xtext (printable US-ASCII, at
    most 100 characters, RFC 3461 section 4.4), or None;
  - C{notify}: a tuple of C{"SUCCESS"}, C{"FAILURE"}, C{"DELAY"} in that
    order, C{("NEVER",)}, or None when the client gave none (RFC 3461
    section 4.1: then FAILURE and DELAY);
  - C{orcpt}: C{"<addr-type>;<xtext>"} as the client gave it, the type in
    lower case (RFC 3461 section 4.2): stored and passed on encoded, decoded
    only for the report's C{Original-Recipient} field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relayd.reply import Reply

__all__ = [
    "MAX_ENVID",
    "NOTIFY_KEYWORDS",
    "DSNParameters",
    "RecipientRequest",
    "decodeXtext",
    "encodeXtext",
    "originalRecipient",
    "parseEnvid",
    "parseNotify",
    "parseOrcpt",
    "parseRet",
    "wants",
]

MAX_ENVID = 100
"""RFC 3461 section 4.4: an ENVID is at most 100 characters (decoded)."""

NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
"""The NOTIFY keywords besides NEVER, in the order relayd writes them."""

ADDRESS_TYPES = ("rfc822", "utf-8")
"""ORCPT address types relayd takes: RFC 3461's and RFC 6533's."""

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
"""RFC 3461 section 4: xchar (C{!} to C{~} except C{+} and C{=}) or C{+HH}."""
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def decodeXtext(value: str) -> str:
    """
    Decode RFC 3461 section 4 xtext.

    @raise ValueError: when C{value} is not xtext (a C{+} without two
        upper-case hex digits, an C{=}, a space or a control character).
    """
    if _XTEXT.fullmatch(value) is None:
        raise ValueError(f"not xtext: {value!r}")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def encodeXtext(text: str) -> str:
    """
    Encode C{text} (ASCII) as xtext: C{+}, C{=}, space and anything outside
    C{!} to C{~} become C{+HH} (RFC 3461 section 4).

    @raise ValueError: for a non-ASCII character, which xtext cannot hold.
    """
    if not text.isascii():
        raise ValueError(f"xtext holds ASCII only: {text!r}")
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def _bad(name: str) -> Reply:
    return Reply(501, "5.5.4", f"Error: bad {name} parameter")


def parseRet(value: str | None) -> tuple[str | None, Reply | None]:
    """C{RET=FULL} or C{RET=HDRS} (RFC 3461 section 4.3), any case."""
    if value is None or value.upper() not in ("FULL", "HDRS"):
        return None, _bad("RET")
    return value.upper(), None


def parseEnvid(value: str | None) -> tuple[str | None, Reply | None]:
    """
    C{ENVID=<xtext>} (RFC 3461 section 4.4): decoded, printable US-ASCII
    (it goes into a report's header-like field), at most L{MAX_ENVID}
    characters.
    """
    if value is None:
        return None, _bad("ENVID")
    try:
        decoded = decodeXtext(value)
    except ValueError:
        return None, _bad("ENVID")
    if not decoded or len(decoded) > MAX_ENVID or not all(" " <= c <= "~" for c in decoded):
        return None, _bad("ENVID")
    return decoded, None


def parseNotify(value: str | None) -> tuple[tuple[str, ...] | None, Reply | None]:
    """
    C{NOTIFY=NEVER} or a comma-separated list of C{SUCCESS}, C{FAILURE},
    C{DELAY} (RFC 3461 section 4.1), any case; NEVER with anything else is
    refused.
    """
    if value is None:
        return None, _bad("NOTIFY")
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return ("NEVER",), None
    if any(word not in NOTIFY_KEYWORDS for word in words) or len(set(words)) != len(words):
        return None, _bad("NOTIFY")
    return tuple(k for k in NOTIFY_KEYWORDS if k in words), None


def parseOrcpt(value: str | None) -> tuple[str | None, Reply | None]:
    """
    C{ORCPT=<addr-type>;<xtext>} (RFC 3461 section 4.2): the type
    C{rfc822} (or RFC 6533's C{utf-8}) and a non-empty xtext address.
    """
    if value is None or ";" not in value:
        return None, _bad("ORCPT")
    kind, _, address = value.partition(";")
    if _ADDRESS_TYPE.fullmatch(kind) is None or kind.lower() not in ADDRESS_TYPES:
        return None, _bad("ORCPT")
    try:
        decodeXtext(address)
    except ValueError:
        return None, _bad("ORCPT")
    if not address:
        return None, _bad("ORCPT")
    return f"{kind.lower()};{address}", None


def wants(notify: tuple[str, ...] | None, kind: str) -> bool:
    """
    Whether a recipient asked for a notice of C{kind} (C{"SUCCESS"},
    C{"FAILURE"} or C{"DELAY"}).  Without NOTIFY a client gets failure and
    delay notices, as RFC 3461 section 4.1 leaves to the server and Postfix
    does; C{NEVER} asks for none.
    """
    if notify is None:
        return kind in ("FAILURE", "DELAY")
    return kind in notify


def originalRecipient(orcpt: str) -> str:
    """
    The C{Original-Recipient} field's value for a stored ORCPT (RFC 3464
    section 2.3.1): C{rfc822;} and the address decoded from xtext when it
    decodes to printable ASCII; otherwise (a C{utf-8} address, RFC 6533
    section 3) as the client encoded it.
    """
    kind, _, address = orcpt.partition(";")
    if kind == "rfc822":
        try:
            decoded = decodeXtext(address)
        except ValueError:
            decoded = ""
        if decoded and all("!" <= c <= "~" for c in decoded):
            return f"{kind};{decoded}"
    return orcpt


@dataclass(frozen=True)
class RecipientRequest:
    """
    What one recipient asked for: C{notify} and C{orcpt} as this module
    keeps them.
    """

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True)
class DSNParameters:
    """
    The DSN parameters of one message, as the client writes them to a next
    hop that advertises DSN (RFC 3461 section 4: the parameters are passed
    on with the message).

    @ivar ret: see the module docstring.
    @ivar envid: see the module docstring (decoded).
    @ivar recipients: by recipient address, what each asked for.
    """

    ret: str | None = None
    envid: str | None = None
    recipients: Mapping[str, RecipientRequest] = field(default_factory=dict)

    @classmethod
    def fromRecord(cls, record: Any) -> DSNParameters:
        """From a L{relayd.queuefile.QueueRecord}."""
        return cls(
            ret=record.ret,
            envid=record.envid,
            recipients={
                r.address: RecipientRequest(r.notify, r.orcpt)
                for r in record.recipients
                if r.notify is not None or r.orcpt is not None
            },
        )

    @property
    def empty(self) -> bool:
        """True when there is nothing to pass on."""
        return self.ret is None and self.envid is None and not self.recipients

    def mail(self) -> str:
        """What MAIL FROM gets: C{" RET=HDRS ENVID=xtext"} or C{""}."""
        out = ""
        if self.ret is not None:
            out += f" RET={self.ret}"
        if self.envid is not None:
            out += f" ENVID={encodeXtext(self.envid)}"
        return out

    def rcpt(self, recipient: str) -> str:
        """What RCPT TO gets for C{recipient}: C{" NOTIFY=... ORCPT=..."} or C{""}."""
        request = self.recipients.get(recipient)
        if request is None:
            return ""
        out = ""
        if request.notify is not None:
            out += " NOTIFY=" + ",".join(request.notify)
        if request.orcpt is not None:
            out += f" ORCPT={request.orcpt}"
        return out
