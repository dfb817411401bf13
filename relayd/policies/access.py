"""
C{access}: allow and deny lists for client networks, envelope senders and
recipients (Postfix's C{check_client_access}, C{check_sender_access} and
C{check_recipient_access} with C{OK}/C{REJECT} tables).

Three phases, each with its own lists:

  - connection: C{client_deny} networks get C{554 5.7.1} instead of the
    greeting and the connection is closed (RFC 5321 section 3.1);
  - MAIL: C{sender_deny} addresses and C{sender_domain_deny} domains get
    C{550 5.7.1};
  - RCPT: C{recipient_deny} addresses and C{recipient_domain_deny} domains
    get C{550 5.7.1}.

Each deny list has an allow counterpart (C{client_allow},
C{sender_allow}, ...).  An allow entry only exempts what it matches from
the deny lists of the same phase: this policy then answers CONTINUE and
the rest of the chain decides as if the deny lists were empty.  An allow
entry never accepts anything, and above all it never lets a client relay:
relaying stays denied unless another policy (C{mynetworks},
C{authenticated}) vouches for the recipient.

Every list may be given inline (C{sender_deny = ["a@example.com"]}) and in
files (C{sender_deny_files = ["deny-senders.txt"]}, one entry per line,
C{#} comments), relative paths being taken from the config file's folder.
Files are read at startup (an unreadable file stops startup naming the
option) and again on SIGHUP (L{Access.reload}; an unreadable file keeps the
old lists and is logged).

The reply text is the same for every list ("Access denied"): which list
and which entry matched goes into the log line, with the session id and
the queue id when there is one.  See C{docs/policies/access.md}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from relayd.plugin import (
    CONTINUE,
    Address,
    Envelope,
    IConnectionPolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ISenderPolicy,
    PolicyContext,
    PolicyOptionError,
    SessionView,
    Verdict,
    reject,
)
from relayd.policies._entries import (
    EntryError,
    FileBacked,
    Line,
    normalizeAddress,
    normalizeDomain,
    readLines,
    stringList,
)

__all__ = ["Access", "AccessLists", "LISTS"]

log = Logger(namespace="relayd.policies.access")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

KINDS = {
    "client": "network",
    "sender": "address",
    "sender_domain": "domain",
    "recipient": "address",
    "recipient_domain": "domain",
}
"""Each list's subject and what its entries are."""

LISTS = tuple(f"{subject}_{verb}" for subject in KINDS for verb in ("allow", "deny"))
"""The list names; each is an option, and with C{_files} another."""

_EXAMPLES = {
    "network": '["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]',
    "address": '["user@example.com"]',
    "domain": '["example.com", ".example.com"]',
}

DENIED_CLIENT = reject(554, "5.7.1", "Access denied", disconnect=True)
DENIED = reject(550, "5.7.1", "Access denied")


@dataclass(frozen=True)
class Match:
    """
    The entry that matched: as written, and where (option name or
    C{PATH:LINE}).
    """

    entry: str
    source: str


@dataclass
class _Networks:
    entries: list[tuple[Network, Match]] = field(default_factory=list)

    def add(self, line: Line) -> None:
        try:
            network = ipaddress.ip_network(line.text, strict=False)
        except ValueError:
            raise EntryError(f"not a network: {line.text!r}") from None
        self.entries.append((network, Match(line.text, line.source)))

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, address: IPAddress) -> Match | None:
        for network, match in self.entries:
            if address in network:
                return match
        return None


@dataclass
class _Addresses:
    entries: dict[str, Match] = field(default_factory=dict)

    def add(self, line: Line) -> None:
        if line.text.startswith("@"):
            raise EntryError(f"not an address: {line.text!r} (domains go in the *_domain_* lists)")
        self.entries.setdefault(normalizeAddress(line.text), Match(line.text, line.source))

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, address: str) -> Match | None:
        return self.entries.get(address)


@dataclass
class _Domains:
    exact: dict[str, Match] = field(default_factory=dict)
    parents: dict[str, Match] = field(default_factory=dict)

    def add(self, line: Line) -> None:
        text = line.text
        table = self.parents if text.startswith(".") else self.exact
        table.setdefault(normalizeDomain(text.removeprefix(".")), Match(text, line.source))

    def __len__(self) -> int:
        return len(self.exact) + len(self.parents)

    def find(self, domain: str) -> Match | None:
        """C{domain} (lower case) itself, then each parent for dot entries."""
        if not domain:
            return None
        match = self.exact.get(domain)
        labels = domain.split(".")
        for i in range(1, len(labels)):
            if match is not None:
                break
            match = self.parents.get(".".join(labels[i:]))
        return match


_FACTORIES: dict[str, Callable[[], Any]] = {
    "network": _Networks,
    "address": _Addresses,
    "domain": _Domains,
}


class AccessLists:
    """
    One complete, immutable-once-built set of lists.  A reload builds a new
    one and swaps it in with one assignment, so a check never sees half of
    an old list and half of a new one.
    """

    def __init__(self) -> None:
        self.lists = {name: _FACTORIES[KINDS[name.rsplit("_", 1)[0]]]() for name in LISTS}

    def add(self, name: str, lines: Iterable[Line]) -> None:
        target = self.lists[name]
        for line in lines:
            try:
                target.add(line)
            except EntryError as e:
                where = "" if line.source == name else f"{line.source}: "
                raise EntryError(f"{where}{e}") from None

    def find(self, name: str, value: Any) -> Match | None:
        match: Match | None = self.lists[name].find(value)
        return match

    def counts(self) -> dict[str, int]:
        """How many entries each non-empty list holds (for the log)."""
        return {name: len(target) for name, target in self.lists.items() if len(target)}

    def describe(self) -> str:
        """The L{counts} as one short string for a log line."""
        return " ".join(f"{k}={v}" for k, v in self.counts().items()) or "none"


def _read(inline: dict[str, list[Line]], files: dict[str, list[str]]) -> AccessLists:
    """Build the lists from the inline entries and the files (blocking)."""
    lists = AccessLists()
    for name in LISTS:
        try:
            lists.add(name, inline[name])
        except EntryError as e:
            raise PolicyOptionError(name, str(e)) from None
        for path in files[name]:
            try:
                lists.add(name, readLines(path))
            except EntryError as e:
                raise PolicyOptionError(f"{name}_files", str(e)) from None
    return lists


@implementer(IConnectionPolicy, ISenderPolicy, IRecipientPolicy, IReloadable, IPolicyLifecycle)
class Access(FileBacked[AccessLists]):
    """
    The C{access} policy.  Build it with L{fromConfig}.  Reading and
    reloading the lists is L{FileBacked}'s.
    """

    name = "access"
    what = "lists"

    def __init__(
        self, inline: dict[str, list[Line]], files: dict[str, list[str]], name: str = "access"
    ) -> None:
        """
        Read the lists now (blocking: at startup).

        @param inline: list name to its inline entries.
        @param files: list name to the absolute paths of its files.
        @raise PolicyOptionError: for a bad entry or a file that cannot be read.
        """
        super().__init__(name, inline, files)

    _readData = staticmethod(_read)

    def _describe(self, data: AccessLists) -> str:
        return str(data.describe())

    @property
    def lists(self) -> AccessLists:
        """The L{AccessLists} in force."""
        return self.data

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> Access:
        """
        Options: each name of L{LISTS} (a list of entries) and the same
        name with C{_files} (a list of file names).

        @raise PolicyOptionError: naming the option, for an unknown option,
            a value of the wrong type, a bad entry or an unreadable file.
        """
        inline: dict[str, list[Line]] = {}
        files: dict[str, list[str]] = {}
        for name in LISTS:
            try:
                values = stringList(options, name, _EXAMPLES[KINDS[name.rsplit("_", 1)[0]]])
            except EntryError as e:
                raise PolicyOptionError(name, str(e)) from None
            inline[name] = [Line(v.strip(), name) for v in values]
            try:
                paths = stringList(options, f"{name}_files", '["deny.txt"]')
            except EntryError as e:
                raise PolicyOptionError(f"{name}_files", str(e)) from None
            files[name] = [context.resolvePath(p) for p in paths]
        if options:
            raise PolicyOptionError(
                min(options),
                f"unknown option (known: {', '.join(LISTS)}, each also with _files)",
            )
        return cls(inline, files, context.name)

    # --- the checks -------------------------------------------------------

    def _decide(
        self,
        session: SessionView,
        envelope: Envelope | None,
        subject: str,
        what: str,
        lookups: list[tuple[str, Any]],
        refusal: Verdict,
    ) -> Verdict:
        """
        Look C{lookups} (list name, value) up: any allow list matching
        exempts, else the first deny list matching refuses.
        """
        queueId = getattr(envelope, "queueId", None)
        for suffix, verdict, level in (("_allow", CONTINUE, "debug"), ("_deny", refusal, "info")):
            found = self._find(lookups, suffix)
            if found is None:
                continue
            name, match = found
            action = "exempted" if verdict is CONTINUE else "denied"
            detail = "" if verdict is CONTINUE else f" -> {refusal.code} {refusal.enhanced}"
            getattr(log, level)(
                "{prefix}: {policy}: {subject} {what} {action} by {list} entry "
                "{entry} ({source}){detail} session={session_id}",
                prefix=queueId or session.sessionId,
                policy=self.name,
                subject=subject,
                what=what,
                action=action,
                list=name,
                entry=match.entry,
                source=match.source,
                detail=detail,
                session_id=session.sessionId,
                queue_id=queueId,
            )
            return verdict
        return CONTINUE

    def _find(self, lookups: Any, suffix: str) -> tuple[str, Match] | None:
        """The first list ending in C{suffix} that matches its value."""
        lists = self.lists
        for name, value in lookups:
            if name.endswith(suffix):
                match = lists.find(name, value)
                if match is not None:
                    return name, match
        return None

    def checkConnection(self, session: SessionView) -> Verdict:
        """Refuse a client in C{client_deny} (and not in C{client_allow})."""
        address = session.clientAddress
        return self._decide(
            session,
            None,
            "client",
            f"[{address}]",
            [("client_allow", address), ("client_deny", address)],
            DENIED_CLIENT,
        )

    def _addressLookups(self, subject: str, address: Address) -> list[tuple[str, Any]]:
        # relayd's normal form (relayd.address), as the entries are.
        mailbox = address.normalForm
        domain = address.normalDomain
        return [
            (f"{subject}_allow", mailbox),
            (f"{subject}_domain_allow", domain),
            (f"{subject}_deny", mailbox),
            (f"{subject}_domain_deny", domain),
        ]

    def checkSender(self, session: SessionView, envelope: Envelope, sender: Address) -> Verdict:
        """
        Refuse a sender in C{sender_deny} or C{sender_domain_deny} (and in
        neither allow list).  The null sender C{<>} is never matched:
        bounces must get through (RFC 5321 section 4.5.5).
        """
        if sender.isNull:
            return CONTINUE
        return self._decide(
            session,
            envelope,
            "sender",
            f"<{sender}>",
            self._addressLookups("sender", sender),
            DENIED,
        )

    def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Verdict:
        """
        Refuse a recipient in C{recipient_deny} or C{recipient_domain_deny}
        (and in neither allow list).  Never accepts: relaying is for other
        policies to allow.
        """
        return self._decide(
            session,
            envelope,
            "recipient",
            f"<{recipient}>",
            self._addressLookups("recipient", recipient),
            DENIED,
        )
