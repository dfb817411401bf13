"""
Envelope addresses (RFC 5321 section 4.1.2) and MAIL/RCPT argument parsing.

Only what the envelope needs: the path in angle brackets, its local part
and domain, and the ESMTP parameters after it.  Header addresses are the
business of the policies that read headers.

Internationalized addresses (RFC 6531 section 3.3): a local part may hold
UTF-8 characters and a domain U-labels (IDNA 2008, RFC 5890), as the
session allows when the transaction has C{SMTPUTF8}; the grammar here
takes them always, and L{Address.isAscii} tells the session whether the
transaction needed it.

The normal form (L{normalDomain}, L{normalLocal}, L{Address.normalForm})
is how policies compare addresses, one form for every policy:

  - the domain in lower-case ASCII, U-labels converted to A-labels by
    IDNA 2008 with the UTS 46 mapping (the C{idna} package; non-
    transitional, so C{fa\u00df.de} stays C{xn--fa-hia.de}), so that
    C{B\u00fccher.example} and C{xn--bcher-kva.example} are the same
    domain; an address literal is only lower-cased;
  - the local part in Unicode NFC (RFC 6530 section 10.1: what differs
    only in normalization is the same text) and lower case.  RFC 5321
    section 2.4 lets a host treat local parts as case-sensitive, but no
    deployed one does, and a rule that a change of case walks around is
    worthless; Postfix folds case in its lookups too (with SMTPUTF8, the
    UTF-8 ones as well).  Python's C{str.lower} is used, not C{casefold}:
    C{stra\u00dfe} and C{strasse} stay two mailboxes.

The address itself is kept as the client sent it (the next hop gets it
unchanged); only comparisons use the normal form.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = [
    "Address",
    "AddressError",
    "asciiDomain",
    "normalDomain",
    "normalLocal",
    "parsePath",
    "parseParameters",
]

MAX_PATH = 256
"""RFC 5321 section 4.5.3.1.3: a path is at most 256 octets."""
MAX_LOCAL = 64
MAX_DOMAIN = 255

_UTF8_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"
"""
RFC 6531 section 3.3 C{UTF8-non-ascii}: any character above ASCII, but not
the surrogates, which only invalid UTF-8 decoded with C{surrogateescape}
gives.
"""
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8_NON_ASCII}-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8_NON_ASCII}]|\\[\x20-\x7e])*"'
_LOCAL = re.compile(rf"^(?:{_DOT_STRING}|{_QUOTED})$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")
_ROUTE = re.compile(rf"^@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")
_SURROGATE = re.compile("[\udc80-\udcff]")
"""What C{surrogateescape} makes of octets that are not UTF-8."""
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_ESMTP_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")


class AddressError(ValueError):
    """
    A path or parameter that does not parse.

    @ivar tooLong: True when the problem is the length limit.
    @ivar badUTF8: True when the path has octets that are not UTF-8 (RFC
        6531 section 3.7.4.1: C{553 5.6.7}, not a syntax error).
    """

    def __init__(self, message: str, tooLong: bool = False, badUTF8: bool = False) -> None:
        super().__init__(message)
        self.tooLong = tooLong
        self.badUTF8 = badUTF8


@dataclass(frozen=True)
class Address:
    """
    A mailbox: C{local@domain}, or the null path when both are empty.

    The domain is kept as given but compared case-insensitively by
    L{domainLower}.
    """

    local: str
    domain: str

    @classmethod
    def null(cls) -> Address:
        """The null reverse-path C{<>} used by bounces."""
        return cls("", "")

    @property
    def isNull(self) -> bool:
        return not self.local and not self.domain

    @property
    def domainLower(self) -> str:
        return self.domain.lower()

    @property
    def isAscii(self) -> bool:
        """
        False for an internationalized address (UTF-8 local part or
        U-labels), which only a transaction with C{SMTPUTF8} may carry
        (RFC 6531 section 3.4).
        """
        return self.local.isascii() and self.domain.isascii()

    @property
    def normalDomain(self) -> str:
        """The domain in the normal form policies compare (L{normalDomain})."""
        return normalDomain(self.domain)

    @property
    def normalForm(self) -> str:
        """
        C{local@domain} in the normal form policies compare (module
        docstring): NFC lower-case local part, lower-case A-label domain.
        C{""} for the null path; the local part alone for C{<Postmaster>}.
        """
        if self.isNull:
            return ""
        if not self.domain:
            return normalLocal(self.local)
        return f"{normalLocal(self.local)}@{normalDomain(self.domain)}"

    def __str__(self) -> str:
        if self.isNull:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


def asciiDomain(domain: str) -> str:
    """
    C{domain} as DNS names it: a name with U-labels converted to A-labels
    by IDNA 2008 with the UTS 46 mapping (RFC 5891, UTS 46
    non-transitional), in lower case; an ASCII name or an address literal
    only lower-cased.  What routing looks up and matches routes against.

    @raise AddressError: for a non-ASCII name that IDNA 2008 refuses.
    """
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"bad internationalized domain: {e}") from None


def normalDomain(domain: str) -> str:
    """
    The domain as policies compare it: L{asciiDomain}, without a final
    dot; a non-ASCII name IDNA refuses is only lower-cased (it matches
    nothing written as an A-label, and the server never accepts one).
    """
    domain = domain.rstrip(".")
    try:
        return asciiDomain(domain)
    except AddressError:
        return domain.lower()


def normalLocal(local: str) -> str:
    """
    The local part as policies compare it: NFC, then lower case (see the
    module docstring for why lower case and not case-sensitive).
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", local).lower())


def _parseMailbox(text: str, allowPostmaster: bool) -> Address:
    if allowPostmaster and text.lower() == "postmaster":
        # RFC 5321 section 4.1.1.3: RCPT TO:<Postmaster> without a domain.
        return Address(text, "")
    if _SURROGATE.search(text):
        raise AddressError("address is not UTF-8", badUTF8=True)
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError("address must be local@domain")
    if len(local.encode()) > MAX_LOCAL or not _LOCAL.match(local):
        raise AddressError("bad local part")
    if domain.isascii():
        if len(domain) > MAX_DOMAIN or not (_DOMAIN.match(domain) or _LITERAL.match(domain)):
            raise AddressError("bad domain")
    else:
        # RFC 6531 section 3.3: sub-domain =/ U-label.  The A-label form
        # must be a valid domain as well (RFC 5890 section 2.3.2.1).
        ascii = asciiDomain(domain)
        if len(ascii) > MAX_DOMAIN or not _DOMAIN.match(ascii):
            raise AddressError("bad domain")
    return Address(local, domain)


def parsePath(argument: str, prefix: str, allowNull: bool) -> tuple[Address, str]:
    """
    Parse C{FROM:<path> params} or C{TO:<path> params}.

    Accepts a space after the colon and a path without angle brackets, as
    deployed clients send both; strips an RFC 5321 source route.

    @param argument: the command's argument, e.g. C{"FROM:<a@b> SIZE=10"}.
    @param prefix: C{"FROM:"} or C{"TO:"}.
    @param allowNull: whether C{<>} is acceptable (MAIL only).
    @return: the address and the unparsed parameter string.
    @raise AddressError: on any syntax error or an over-long path.
    """
    if argument[: len(prefix)].upper() != prefix:
        raise AddressError(f"syntax: expected {prefix}<address>")
    rest = argument[len(prefix) :].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            raise AddressError("missing '>'")
        path, params = rest[1:end], rest[end + 1 :]
        if params and not params.startswith(" "):
            raise AddressError("garbage after '>'")
    else:
        path, _, params = rest.partition(" ")
        if not path:
            raise AddressError("missing address")
    if len(path.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH:
        raise AddressError("path too long", tooLong=True)
    if not path:
        if not allowNull:
            raise AddressError("null address not allowed here")
        return Address.null(), params.strip(" ")
    route = _ROUTE.match(path)
    if route:
        path = path[route.end() :]
    return _parseMailbox(path, allowPostmaster=not allowNull), params.strip(" ")


def parseParameters(params: str) -> dict[str, str | None]:
    """
    Parse C{esmtp-param *(SP esmtp-param)} (RFC 5321 section 4.1.2).

    @return: keyword (upper-cased) to value (None when absent).
    @raise AddressError: on malformed or repeated parameters.
    """
    result: dict[str, str | None] = {}
    for item in params.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.match(key) or (eq and not _ESMTP_VALUE.match(value)):
            raise AddressError(f"bad parameter {item!r}")
        key = key.upper()
        if key in result:
            raise AddressError(f"repeated parameter {key}")
        result[key] = value if eq else None
    return result
