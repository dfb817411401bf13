"""
Envelope addresses (RFC 5321 section 4.1.2) and MAIL/RCPT argument parsing.

Only what the envelope needs: the path in angle brackets, its local part
and domain, and the ESMTP parameters after it.  Header addresses are the
business of the policies that read headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Address", "AddressError", "parsePath", "parseParameters"]

MAX_PATH = 256
"""RFC 5321 section 4.5.3.1.3: a path is at most 256 octets."""
MAX_LOCAL = 64
MAX_DOMAIN = 255

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LOCAL = re.compile(rf"^(?:{_DOT_STRING}|{_QUOTED})$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_LITERAL = re.compile(r"^\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]$")
_ROUTE = re.compile(rf"^@{_LABEL}(?:\.{_LABEL})*(?:,@{_LABEL}(?:\.{_LABEL})*)*:")
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_ESMTP_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")


class AddressError(ValueError):
    """
    A path or parameter that does not parse.

    @ivar tooLong: True when the problem is the length limit.
    """

    def __init__(self, message: str, tooLong: bool = False) -> None:
        super().__init__(message)
        self.tooLong = tooLong


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

    def __str__(self) -> str:
        if self.isNull:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


def _parseMailbox(text: str, allowPostmaster: bool) -> Address:
    if allowPostmaster and text.lower() == "postmaster":
        # RFC 5321 section 4.1.1.3: RCPT TO:<Postmaster> without a domain.
        return Address(text, "")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError("address must be local@domain")
    if len(local.encode()) > MAX_LOCAL or not _LOCAL.match(local):
        raise AddressError("bad local part")
    if len(domain) > MAX_DOMAIN or not (_DOMAIN.match(domain) or _LITERAL.match(domain)):
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
