"""
C{headers}: edit the header section of mail before it is queued.

A message modifier (L{IMessageModifier}): it runs once the checks have let
the message through, whatever they answered, and decides nothing.  It
removes, replaces and adds header fields, masquerades sender domains, adds
a missing C{Date:} and C{Message-ID:} (RFC 6409 section 8) and, for
authenticated submissions, can hide the client's address in relayd's own
C{Received:} field.  Every field it does not touch keeps its exact bytes
and place, and the body is stored exactly as received.

Options (C{[policies.headers]}), all optional:
  - C{sessions}: C{"all"} (default) or C{"authenticated"}: which sessions
    the rules (remove, replace, add, masquerade, add_missing) apply to.
  - C{remove}: list of field matchers; every matching field is removed.
  - C{replace}: table of matcher to value; every matching field gets the
    value (keeping its name); a missing field is not added.
  - C{add}: table of field name to value, added at the end of the header
    section.
  - C{masquerade}: list of domains; a sender in a subdomain of one of them
    is rewritten to that domain (first match wins, as Postfix's
    C{masquerade_domains}), in the envelope and in C{masquerade_headers}.
  - C{masquerade_exceptions}: local parts that are never masqueraded
    (e.g. C{["root"]}).
  - C{masquerade_headers}: the fields whose addresses are masqueraded;
    default C{["From"]}.
  - C{add_missing}: add C{Date:} and C{Message-ID:} when missing; default
    true.
  - C{privacy}: for authenticated sessions, replace relayd's own
    C{Received:} field with one that names neither the client's address,
    nor its HELO name, nor the TLS details; default false.

A matcher is a field name (any case), or a regular expression between
slashes, searched for in the field name without regard to case:
C{"X-Originating-IP"}, C{"/^X-MS-/"}.  Rules never touch relayd's own
C{Received:} field (the first one, written by the server).

Order: remove, replace, add, masquerade, add missing fields, privacy.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from relayd.plugin import (
    Address,
    Envelope,
    HeaderField,
    Headers,
    IMessageModifier,
    Message,
    PolicyContext,
    PolicyOptionError,
    SessionView,
)

__all__ = ["HeaderRewrite", "FieldMatcher", "addressDomains", "HIDDEN_HOST"]

log = Logger(namespace="relayd.policies.headers")

HIDDEN_HOST = "hidden.invalid"
"""
The FROM domain of a private C{Received:} field: RFC 5321 section 4.4
requires a FROM clause, and C{.invalid} is reserved (RFC 6761 section 6.4),
so the name points at nothing real.
"""

_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_OWN_TRACE = re.compile(
    r"\bby\s+(?P<host>\S+)\s+\(relayd\)\s+with\s+(?P<protocol>[A-Za-z0-9-]+)"
    r"\s+id\s+(?P<id>[A-Za-z0-9]+)\b"
)
_DOMAIN_END = frozenset(b' \t\r\n<>()[],;:"@\\')
_KNOWN = (
    "sessions",
    "remove",
    "replace",
    "add",
    "masquerade",
    "masquerade_exceptions",
    "masquerade_headers",
    "add_missing",
    "privacy",
)


@dataclass(frozen=True)
class FieldMatcher:
    """
    Which header fields a rule is about: a field name compared without
    regard to case, or a regular expression searched for in the name.

    @ivar text: the matcher as written in the config.
    """

    text: str

    @classmethod
    def parse(cls, text: Any, key: str) -> FieldMatcher:
        """
        Check C{text}: C{"/regex/"} must compile, anything else must be a
        valid field name (RFC 5322 section 2.2).

        @raise PolicyOptionError: naming C{key}.
        """
        if not isinstance(text, str):
            raise PolicyOptionError(key, f"not a field name or /regex/: {text!r}")
        if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
            try:
                re.compile(text[1:-1], re.IGNORECASE)
            except re.error as e:
                raise PolicyOptionError(key, f"bad regular expression {text!r}: {e}") from None
        elif not _FIELD_NAME.match(text):
            raise PolicyOptionError(key, f"not a field name or /regex/: {text!r}")
        return cls(text)

    def matches(self, name: str) -> bool:
        """True when the field called C{name} is one of ours."""
        if len(self.text) >= 2 and self.text.startswith("/") and self.text.endswith("/"):
            return re.search(self.text[1:-1], name, re.IGNORECASE) is not None
        return name.lower() == self.text.lower()


def addressDomains(value: bytes) -> list[tuple[int, int, int]]:
    """
    Find the addresses in an address-list field value (RFC 5322 section
    3.4): C{From:}, C{Sender:}, C{Reply-To:} and the like.

    The scan skips quoted strings and (nested) comments, so an C{@} in a
    display name or comment is not taken for an address; inside angle
    brackets only the last C{@} counts (an obsolete source route, RFC 5322
    section 4.4, comes before it).  Bytes above 127 (UTF-8 names, RFC
    6532) are kept as they are.

    @return: for each address, C{(localStart, domainStart, domainEnd)}
        offsets into C{value}: the local part is C{value[localStart:
        domainStart - 1]} and the domain C{value[domainStart:domainEnd]}.
    """
    found: list[tuple[int, int, int]] = []
    angle: tuple[int, int, int] | None = None
    inAngle = False
    depth = 0
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if depth:
            if c == 0x5C:  # backslash: quoted-pair
                i += 2
                continue
            if c == 0x28:
                depth += 1
            elif c == 0x29:
                depth -= 1
            i += 1
            continue
        if c == 0x22:  # quoted string
            i += 1
            while i < n and value[i] != 0x22:
                i += 2 if value[i] == 0x5C else 1
            i += 1
            continue
        if c == 0x28:
            depth = 1
        elif c == 0x3C:
            inAngle, angle = True, None
        elif c == 0x3E:
            if angle is not None:
                found.append(angle)
            inAngle, angle = False, None
        elif c == 0x40:
            start = i + 1
            end = start
            if value[start : start + 1] == b"[":
                close = value.find(b"]", start)
                end = n if close < 0 else close + 1
            else:
                while end < n and value[end] not in _DOMAIN_END:
                    end += 1
            span = (_localStart(value, i), start, end)
            if inAngle:
                angle = span
            elif end > start:
                found.append(span)
            i = end
            continue
        i += 1
    return [span for span in found if span[2] > span[1]]


def _localStart(value: bytes, at: int) -> int:
    """Where the local part ending just before C{value[at]} (an C{@}) starts."""
    i = at
    if i > 0 and value[i - 1] == 0x22:  # quoted local part
        i -= 1
        while i > 0:
            i -= 1
            if value[i] == 0x22 and (i == 0 or value[i - 1] != 0x5C):
                return i
        return 0
    while i > 0 and value[i - 1] not in _DOMAIN_END:
        i -= 1
    return i


def _unquoteLocal(local: bytes) -> str:
    text = local.decode("utf-8", "surrogateescape")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    return text.lower()


@implementer(IMessageModifier)
class HeaderRewrite:
    """
    The C{headers} policy (see the module docstring for its options).

    @ivar hostname: relayd's host name, for C{Message-ID:}.
    """

    name = "headers"

    def __init__(
        self,
        hostname: str,
        *,
        authenticatedOnly: bool = False,
        remove: tuple[FieldMatcher, ...] = (),
        replace: tuple[tuple[FieldMatcher, str], ...] = (),
        add: tuple[tuple[str, str], ...] = (),
        masquerade: tuple[str, ...] = (),
        masqueradeExceptions: frozenset[str] = frozenset(),
        masqueradeHeaders: tuple[str, ...] = ("From",),
        addMissing: bool = True,
        privacy: bool = False,
    ) -> None:
        self.hostname = hostname
        self.authenticatedOnly = authenticatedOnly
        self.remove = remove
        self.replace = replace
        self.add = add
        self.masquerade = tuple(d.lower().rstrip(".") for d in masquerade)
        self.masqueradeExceptions = frozenset(x.lower() for x in masqueradeExceptions)
        self.masqueradeHeaders = frozenset(h.lower() for h in masqueradeHeaders)
        self.addMissing = addMissing
        self.privacy = privacy

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> HeaderRewrite:
        """
        Build the policy from C{[policies.headers]}.

        @raise PolicyOptionError: for an unknown option or a bad value.
        """
        for key in options:
            if key not in _KNOWN:
                raise PolicyOptionError(key, f"unknown option (known: {', '.join(_KNOWN)})")
        sessions = options.get("sessions", "all")
        if sessions not in ("all", "authenticated"):
            raise PolicyOptionError(
                "sessions", f'must be "all" or "authenticated", not {sessions!r}'
            )
        remove = tuple(FieldMatcher.parse(text, "remove") for text in _list(options, "remove", str))
        replace = []
        for text, value in _table(options, "replace").items():
            matcher = FieldMatcher.parse(text, "replace")
            _checkField("replace", "X-Replace", value)
            replace.append((matcher, value))
        add = []
        for fieldName, value in _table(options, "add").items():
            _checkField("add", fieldName, value)
            add.append((fieldName, value))
        masquerade = _list(options, "masquerade", str)
        for domain in masquerade:
            if not re.match(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.?$", domain):
                raise PolicyOptionError("masquerade", f"not a domain: {domain!r}")
        headers = _list(options, "masquerade_headers", str, ["From"])
        for fieldName in headers:
            if not _FIELD_NAME.match(fieldName):
                raise PolicyOptionError("masquerade_headers", f"not a field name: {fieldName!r}")
        return cls(
            context.hostname,
            authenticatedOnly=sessions == "authenticated",
            remove=remove,
            replace=tuple(replace),
            add=tuple(add),
            masquerade=tuple(masquerade),
            masqueradeExceptions=frozenset(_list(options, "masquerade_exceptions", str)),
            masqueradeHeaders=tuple(headers),
            addMissing=_bool(options, "add_missing", True),
            privacy=_bool(options, "privacy", False),
        )

    def modifyMessage(self, session: SessionView, envelope: Envelope, message: Message) -> None:
        """
        Edit C{message.headers} (and C{envelope.sender} when masquerading).
        """
        headers = message.headers
        own = self._ownTrace(headers, envelope.queueId)
        done: list[str] = []
        if session.user is not None or not self.authenticatedOnly:
            self._applyRules(headers, own, done)
            self._masquerade(envelope, headers, own, done)
            if self.addMissing:
                self._addMissing(headers, envelope.queueId, done)
        if self.privacy and session.user is not None and own is not None:
            self._hideClient(headers, own, envelope.queueId, done)
        if done:
            log.info(
                "{queue_id}: headers: {actions}",
                queue_id=envelope.queueId,
                actions=", ".join(done),
            )

    def _ownTrace(self, headers: Headers, queueId: str | None) -> HeaderField | None:
        """
        relayd's own C{Received:} field: the first one that names this
        message's queue id after C{(relayd)}; the server writes it first.
        """
        for f in headers.fields:
            if f.name.lower() == "received":
                m = _OWN_TRACE.search(f.value)
                if m is not None and m.group("id") == queueId:
                    return f
                return None
        return None

    def _applyRules(self, headers: Headers, own: HeaderField | None, done: list[str]) -> None:
        for matcher in self.remove:

            def test(f: HeaderField, matcher: FieldMatcher = matcher) -> bool:
                return f is not own and matcher.matches(f.name)

            count = headers.remove(test)
            if count:
                done.append(f"removed {count} {matcher.text}")
        for matcher, value in self.replace:
            count = 0
            for index, f in enumerate(headers.fields):
                if f is not own and matcher.matches(f.name):
                    headers.setRaw(index, _field(f.name, value))
                    count += 1
            if count:
                done.append(f"replaced {count} {matcher.text}")
        for fieldName, value in self.add:
            headers.add(fieldName, value)
            done.append(f"added {fieldName}")

    def masqueradeDomain(self, domain: str) -> str | None:
        """
        The domain to write instead of C{domain}, or None to keep it: the
        first configured domain that C{domain} equals (keep) or is a
        subdomain of (rewrite), as Postfix's C{masquerade_domains}.
        """
        lower = domain.lower().rstrip(".")
        for target in self.masquerade:
            if lower == target:
                return None
            if lower.endswith("." + target):
                return target
        return None

    def _masquerade(
        self, envelope: Envelope, headers: Headers, own: HeaderField | None, done: list[str]
    ) -> None:
        if not self.masquerade:
            return
        sender = envelope.sender
        if not sender.isNull and sender.local.lower() not in self.masqueradeExceptions:
            target = self.masqueradeDomain(sender.domain)
            if target is not None:
                envelope.sender = Address(sender.local, target)
                done.append(f"sender {sender.domain} masqueraded as {target}")
        for index, f in enumerate(headers.fields):
            if f is own or f.name.lower() not in self.masqueradeHeaders:
                continue
            raw = self._masqueradeRaw(f.raw)
            if raw != f.raw:
                headers.setRaw(index, raw)
                done.append(f"masqueraded {f.name}")

    def _masqueradeRaw(self, raw: bytes) -> bytes:
        """C{raw} (one whole field) with masqueraded address domains."""
        colon = raw.index(b":") + 1
        value = raw[colon:]
        out = []
        last = 0
        for localStart, start, end in addressDomains(value):
            if _unquoteLocal(value[localStart : start - 1]) in self.masqueradeExceptions:
                continue
            target = self.masqueradeDomain(value[start:end].decode("utf-8", "surrogateescape"))
            if target is None:
                continue
            out += [value[last:start], target.encode("ascii")]
            last = end
        if not out:
            return raw
        return raw[:colon] + b"".join(out) + value[last:]

    def _addMissing(self, headers: Headers, queueId: str | None, done: list[str]) -> None:
        """RFC 6409 sections 8.2 and 8.3: add C{Date:}, then C{Message-ID:}."""
        if "Date" not in headers:
            headers.add("Date", formatdate(time.time(), localtime=True))
            done.append("added Date")
        if "Message-ID" not in headers:
            headers.add("Message-ID", f"<{queueId}.{secrets.token_hex(6)}@{self.hostname}>")
            done.append("added Message-ID")

    def _hideClient(
        self, headers: Headers, own: HeaderField, queueId: str | None, done: list[str]
    ) -> None:
        """
        Replace relayd's C{Received:} field with one that keeps its BY
        host, protocol (e.g. C{ESMTPSA}, RFC 3848), id and date, and says
        nothing about the client (RFC 5321 section 4.4 still wants a FROM
        clause: L{HIDDEN_HOST}).
        """
        value = own.value
        m = _OWN_TRACE.search(value)
        if m is None or ";" not in value:  # pragma: no cover - _ownTrace found it
            return
        date = value.rsplit(";", 1)[1].strip()
        raw = (
            f"{own.name}: from {HIDDEN_HOST} (authenticated submission)\r\n"
            f"\tby {m.group('host')} (relayd) with {m.group('protocol')} id {m.group('id')};\r\n"
            f"\t{date}\r\n"
        ).encode("utf-8", "surrogateescape")
        index = next(i for i, f in enumerate(headers.fields) if f is own)
        headers.setRaw(index, raw)
        done.append("client hidden in Received")


def _field(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def _checkField(key: str, name: Any, value: Any) -> None:
    """Refuse a bad field name or a value that is not one line of text."""
    if not isinstance(value, str):
        raise PolicyOptionError(key, f"value must be a string, not {value!r}")
    try:
        Headers([]).add(name, value)
    except (ValueError, TypeError) as e:
        raise PolicyOptionError(key, str(e)) from None


def _list(options: dict[str, Any], key: str, kind: type, default: Any = None) -> list[Any]:
    value = options.get(key, [] if default is None else default)
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise PolicyOptionError(key, f"must be a list of {kind.__name__}s")
    return value


def _table(options: dict[str, Any], key: str) -> dict[str, Any]:
    value = options.get(key, {})
    if not isinstance(value, dict):
        raise PolicyOptionError(key, 'must be a table like { "X-Name" = "value" }')
    return value


def _bool(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise PolicyOptionError(key, "must be true or false")
    return value
