"""
C{senderlogin}: an authenticated user may only send as the addresses that
are theirs.

Postfix's C{reject_sender_login_mismatch} with C{smtpd_sender_login_maps},
for the envelope sender, plus what Postfix cannot do without a milter:
the same check on the addresses of the message's C{From:} header field
(RFC 5322 section 3.6.2), the one the recipient sees and DMARC aligns on.

The map gives each user what they may use:

  - an address, C{alice@example.com} (compared without regard to case);
  - C{@example.com}: any address at that domain; C{@.example.com}: any
    address at a subdomain of it;
  - C{*}: any address at all (an application that sends for many).

A user who is not in the map may send as nobody: every MAIL they give
except C{<>} gets C{553 5.7.1}.

  - At MAIL (L{ISenderPolicy}): the envelope sender must be permitted.  The
    null sender C{<>} is let through (auto-replies and notifications send
    from it, RFC 3834 section 3.3), but the message's C{From:} is still
    checked.
  - At the end of DATA (L{IMessagePolicy}), unless C{check_header_from =
    false}: every mailbox of every C{From:} field must be permitted.  A
    C{From:} that does not parse as a list of mailboxes is refused too (a
    field this policy cannot read could be read otherwise by the
    recipient's software).  A message without C{From:} passes.

Sessions without AUTH are not checked (trusted networks relay for many
senders).  Refusals are C{553 5.7.1}; the user, the address and the reason
go into the log line.

Options (C{[policies.senderlogin]}):
  - C{map}: inline table, user name to a list of entries;
  - C{map_files}: files of lines C{user  entry, entry, ...} (C{#}
    comments), read at startup and again on SIGHUP (L{SenderLogin.reload});
  - C{check_header_from}: check C{From:} at the end of DATA; default true.

See C{docs/policies/senderlogin.md}.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from relayd.plugin import (
    CONTINUE,
    Address,
    Envelope,
    IMessagePolicy,
    IPolicyLifecycle,
    IReloadable,
    ISenderPolicy,
    Message,
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

__all__ = ["SenderLogin", "Grants", "SenderMap", "parseFrom"]

log = Logger(namespace="relayd.policies.senderlogin")

NOT_OWNED = reject(553, "5.7.1", "Sender address not owned by user")
FROM_NOT_OWNED = reject(553, "5.7.1", "From: address not owned by user")
FROM_UNREADABLE = reject(553, "5.7.1", "From: header cannot be parsed")

_KNOWN = ("map", "map_files", "check_header_from")
_SEPARATORS = re.compile(r"[\s,]+")


@dataclass
class Grants:
    """
    What one user may send as.

    @ivar anything: C{*} was given.
    @ivar addresses: normalized addresses.
    @ivar domains: domains whose every address is permitted.
    @ivar parents: domains whose subdomains' addresses are permitted.
    """

    anything: bool = False
    addresses: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    parents: set[str] = field(default_factory=set)

    def add(self, entry: str) -> None:
        """
        Add one entry: C{*}, C{@domain}, C{@.domain} or an address.

        @raise EntryError: when it is none of these.
        """
        if entry == "*":
            self.anything = True
        elif entry.startswith("@."):
            self.parents.add(normalizeDomain(entry[2:]))
        elif entry.startswith("@"):
            self.domains.add(normalizeDomain(entry[1:]))
        else:
            try:
                self.addresses.add(normalizeAddress(entry))
            except EntryError:
                raise EntryError(f"not an address, @domain, @.domain or *: {entry!r}") from None

    def permits(self, address: str) -> bool:
        """Whether the normalized C{address} is one of this user's."""
        if self.anything or address in self.addresses:
            return True
        domain = address.rpartition("@")[2]
        if domain in self.domains:
            return True
        labels = domain.split(".")
        return any(".".join(labels[i:]) in self.parents for i in range(1, len(labels)))


class SenderMap:
    """
    User name to L{Grants}; built whole, then swapped in by one assignment
    on reload.  Entries for the same user from several places add up.
    """

    def __init__(self) -> None:
        self.users: dict[str, Grants] = {}

    def add(self, user: str, entries: Iterable[str]) -> None:
        grants = self.users.setdefault(user, Grants())
        for entry in entries:
            grants.add(entry)

    def get(self, user: str) -> Grants | None:
        return self.users.get(user)

    def addFileLine(self, line: Line) -> None:
        """
        Add a file line C{user  entry, entry ...}.

        @raise EntryError: naming the file and line.
        """
        user, _, rest = line.text.replace("\t", " ").partition(" ")
        entries = [e for e in _SEPARATORS.split(rest) if e]
        if not entries:
            raise EntryError(f"{line.source}: user {user!r} has no addresses")
        try:
            self.add(user, entries)
        except EntryError as e:
            raise EntryError(f"{line.source}: {e}") from None


def _read(inline: dict[str, list[str]], files: list[str]) -> SenderMap:
    """Build the map from the inline table and the files (blocking)."""
    senders = SenderMap()
    for user, entries in inline.items():
        try:
            senders.add(user, entries)
        except EntryError as e:
            raise PolicyOptionError("map", f"{user}: {e}") from None
    for path in files:
        try:
            for line in readLines(path):
                senders.addFileLine(line)
        except EntryError as e:
            raise PolicyOptionError("map_files", str(e)) from None
    return senders


def _outside(value: str) -> str | None:
    """
    C{value} with quoted strings and comments (RFC 5322 section 3.2.2 and
    3.2.4) taken out, or None when a quote, a comment or an angle bracket
    is left open or closed without being opened.
    """
    out = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
        elif ch == ")":
            return None
        else:
            out.append(ch)
    text = "".join(out)
    if quoted or depth or escaped:
        return None
    opened = 0
    for ch in text:
        if ch == "<":
            opened += 1
        elif ch == ">":
            opened -= 1
        if not 0 <= opened <= 1:
            return None
    return text if opened == 0 else None


def parseFrom(values: list[str]) -> list[str] | None:
    """
    The mailboxes of C{From:} field values, normalized, or None when one
    of them does not parse cleanly.

    C{email.utils.getaddresses} reads anything and guesses; on its own it
    can be made to find an address other than the one a mail reader shows
    (CVE-2023-27043).  So, as the strict mode of newer Pythons does, a
    value is refused when its quotes, comments or angle brackets do not
    balance, when the number of mailboxes found is not one more than the
    number of commas outside quotes and comments, or when a mailbox is not
    a plain C{local@domain}.
    """
    result = []
    for value in values:
        text = _outside(value)
        if text is None:
            return None
        pairs = getaddresses([value])
        if len(pairs) != text.count(",") + 1:
            return None
        for _, address in pairs:
            try:
                result.append(normalizeAddress(address))
            except EntryError:
                return None
    return result


@implementer(ISenderPolicy, IMessagePolicy, IReloadable, IPolicyLifecycle)
class SenderLogin(FileBacked[SenderMap]):
    """
    The C{senderlogin} policy.  Build it with L{fromConfig}.  Reading and
    reloading the map is L{FileBacked}'s.
    """

    name = "senderlogin"
    what = "map"

    def __init__(
        self,
        inline: dict[str, list[str]],
        files: list[str],
        checkHeaderFrom: bool = True,
        name: str = "senderlogin",
    ) -> None:
        """
        Read the map now (blocking: at startup).

        @param inline: user to entries, as in the C{map} option.
        @param files: absolute paths of map files.
        @raise PolicyOptionError: for a bad entry or an unreadable file.
        """
        super().__init__(name, inline, files)
        self.checkHeaderFrom = checkHeaderFrom

    _readData = staticmethod(_read)

    def _describe(self, data: SenderMap) -> str:
        return f"{len(data.users)} users"

    @property
    def senders(self) -> SenderMap:
        """The L{SenderMap} in force."""
        return self.data

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> SenderLogin:
        """
        @raise PolicyOptionError: naming the option, for an unknown option,
            a value of the wrong type, a bad entry or an unreadable file.
        """
        table = options.pop("map", {})
        if not isinstance(table, dict):
            raise PolicyOptionError("map", 'must be a table like { alice = ["alice@example.com"] }')
        inline = {}
        for user, entries in table.items():
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise PolicyOptionError(
                    "map", f'{user}: must be a list of strings like ["{user}@example.com"]'
                )
            inline[user] = entries
        try:
            files = stringList(options, "map_files", '["senders.txt"]')
        except EntryError as e:
            raise PolicyOptionError("map_files", str(e)) from None
        check = options.pop("check_header_from", True)
        if not isinstance(check, bool):
            raise PolicyOptionError("check_header_from", "must be true or false")
        if options:
            raise PolicyOptionError(min(options), f"unknown option (known: {', '.join(_KNOWN)})")
        return cls(inline, [context.resolvePath(p) for p in files], check, context.name)

    # --- lifecycle and reload ---------------------------------------------

    # --- the checks -------------------------------------------------------

    def _refuse(
        self,
        session: SessionView,
        envelope: Envelope | None,
        verdict: Verdict,
        what: str,
        reason: str,
    ) -> Verdict:
        queueId = getattr(envelope, "queueId", None)
        log.info(
            "{prefix}: {policy}: user {user} may not use {what}: {reason} "
            "-> {code} {enhanced} session={session_id}",
            prefix=queueId or session.sessionId,
            policy=self.name,
            user=session.user,
            what=what,
            reason=reason,
            code=verdict.code,
            enhanced=verdict.enhanced,
            session_id=session.sessionId,
            queue_id=queueId,
        )
        return verdict

    def checkSender(self, session: SessionView, envelope: Envelope, sender: Address) -> Verdict:
        """
        The envelope sender of an authenticated session must be the user's.
        """
        if session.user is None or sender.isNull:
            return CONTINUE
        grants = self.senders.get(session.user)
        what = f"sender <{sender}>"
        if grants is None:
            return self._refuse(session, envelope, NOT_OWNED, what, "user not in the map")
        if not grants.permits(sender.normalForm):
            return self._refuse(session, envelope, NOT_OWNED, what, "not in the user's entries")
        return CONTINUE

    def checkMessage(self, session: SessionView, envelope: Envelope, message: Message) -> Verdict:
        """
        Every C{From:} mailbox of an authenticated session's message must be
        the user's (unless C{check_header_from} is off).
        """
        if not self.checkHeaderFrom or session.user is None:
            return CONTINUE
        grants = self.senders.get(session.user)
        if grants is not None and grants.anything:
            return CONTINUE
        values = message.headers.getAll("From")
        if not values:
            return CONTINUE
        addresses = parseFrom(values)
        if addresses is None:
            shown = " | ".join(v.encode("ascii", "backslashreplace").decode() for v in values)
            return self._refuse(
                session, envelope, FROM_UNREADABLE, f"From: {shown[:300]}", "does not parse"
            )
        if grants is None:
            return self._refuse(
                session, envelope, FROM_NOT_OWNED, f"From: <{addresses[0]}>", "user not in the map"
            )
        for address in addresses:
            if not grants.permits(address):
                reason = "not in the user's entries"
                return self._refuse(session, envelope, FROM_NOT_OWNED, f"From: <{address}>", reason)
        return CONTINUE
