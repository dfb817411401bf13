"""
What the list-reading policies (C{access}, C{senderlogin}) share: reading
entry files, and normalizing the domains and addresses they compare.

An entry file holds one entry per line; blank lines are skipped and C{#}
starts a comment when it begins the line or follows white space (so an
address such as C{a#b@example.com}, where C{#} is valid, RFC 5322 section
3.2.3, stays whole).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relayd.address import AddressError, asciiDomain, normalLocal

__all__ = [
    "FileBacked",
    "Line",
    "EntryError",
    "readLines",
    "normalizeDomain",
    "normalizeAddress",
    "stringList",
    "inThread",
]

T = TypeVar("T")
D = TypeVar("D")

_COMMENT = re.compile(r"(?:^|[ \t])#.*$")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
"""RFC 6531 section 3.3 C{UTF8-non-ascii}, as in L{relayd.address}."""
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_UTF8}-]"
_LOCAL = re.compile(
    rf"^(?:{_ATEXT}+(?:\.{_ATEXT}+)*"
    rf'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*")$'
)


class EntryError(ValueError):
    """An entry, or a file of entries, that cannot be used."""


@dataclass(frozen=True)
class Line:
    """
    One entry as written, and where: C{source} is the option name for an
    inline entry, C{PATH:LINE} for one read from a file.
    """

    text: str
    source: str


def readLines(path: str) -> Iterator[Line]:
    """
    The entries of the file at C{path}, without comments and blank lines.

    Blocking file I/O: call it at startup or from a thread.

    @raise EntryError: when the file cannot be read or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise EntryError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise EntryError(f"{path} is not UTF-8 text") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if line:
            yield Line(line, f"{path}:{number}")


def normalizeDomain(domain: str) -> str:
    """
    The domain as compared: relayd's normal form (L{relayd.address}), lower
    case with internationalized names as their A-labels by IDNA 2008, so
    C{B\u00fccher.Example} and C{xn--bcher-kva.example} are the same.

    @raise EntryError: when it is not a domain name.
    """
    try:
        name = asciiDomain(domain)
    except AddressError:
        raise EntryError(f"not a domain: {domain!r}") from None
    if len(name) > 255 or not _DOMAIN.match(name):
        raise EntryError(f"not a domain: {domain!r}")
    return name


def normalizeAddress(address: str) -> str:
    """
    The mailbox C{local@domain} as compared: relayd's normal form
    (L{relayd.address.Address.normalForm}): the domain through
    L{normalizeDomain}, the local part (UTF-8 allowed, RFC 6531 section
    3.3) in NFC and lower case.  RFC 5321 section 2.4 lets a host treat
    local parts as case-sensitive, but no deployed one does, and an
    access rule that a change of case walks around would be worthless
    (Postfix access tables compare the same way).

    @raise EntryError: when it is not a mailbox.
    """
    local, at, domain = address.rpartition("@")
    if not at or not local or len(local.encode("utf-8", "surrogateescape")) > 64:
        raise EntryError(f"not an address: {address!r}")
    if not _LOCAL.match(local):
        raise EntryError(f"not an address: {address!r}")
    try:
        domain = normalizeDomain(domain)
    except EntryError:
        raise EntryError(f"not an address: {address!r}") from None
    return f"{normalLocal(local)}@{domain}"


def stringList(options: dict[str, Any], key: str, example: str) -> list[str]:
    """
    Take option C{key} out of C{options}: a list of strings, empty when
    absent.

    @raise EntryError: when it is something else; the message shows
        C{example}.
    """
    value = options.pop(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EntryError(f"must be a list of strings like {example}")
    return value


def inThread(reactor: Any, f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    Run C{f(*args)} in C{reactor}'s thread pool (the global reactor's when
    C{reactor} is None: a policy that was never started, as in a unit test).
    """
    from twisted.internet.threads import deferToThreadPool

    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class FileBacked(Generic[D]):
    """
    The reload plumbing shared by policies whose data comes from inline
    options plus files (C{access}, C{senderlogin}): the data is read at
    startup, and again on SIGHUP (L{relayd.interfaces.IReloadable}) in the
    reactor's thread pool, then swapped in at once.  When a file cannot be
    read or holds a bad entry, the reload fails and the old data stays.
    Reloads run one at a time, so an older read never replaces a newer one.

    Subclasses set L{what} and implement L{_readData} and L{_describe}.

    @ivar data: the data in force (of the type C{D} the subclass names).
    """

    data: D

    what = "data"
    """How log lines name the data ("lists", "map")."""

    def __init__(self, name: str, inline: Any, files: Any) -> None:
        from twisted.internet.defer import DeferredLock

        self.name = name
        self.inline = inline
        self.files = files
        self.data = self._readData(inline, files)
        self._reactor: Any = None
        self._reloading = DeferredLock()
        self._log = Logger(namespace=type(self).__module__)

    @staticmethod
    def _readData(inline: Any, files: Any) -> Any:
        """Read the data (blocking); raise for a bad entry or file."""
        raise NotImplementedError

    def _describe(self, data: D) -> str:
        """A short summary of C{data} for log lines."""
        raise NotImplementedError

    def startPolicy(self, reactor: Any) -> None:
        """Keep the reactor: L{reload} reads files in its thread pool."""
        self._reactor = reactor
        self._log.info(
            "{policy}: {what} loaded: {summary}",
            policy=self.name,
            what=self.what,
            summary=self._describe(self.data),
        )

    def stopPolicy(self) -> None:
        """Nothing to let go of."""

    def reload(self) -> Deferred[None]:
        """Re-read the files in a thread and swap the new data in at once."""

        def read() -> Deferred[Any]:
            return inThread(self._reactor, self._readData, self.inline, self.files)

        def swap(data: D) -> None:
            self.data = data
            self._log.info(
                "{policy}: {what} reloaded: {summary}",
                policy=self.name,
                what=self.what,
                summary=self._describe(data),
            )

        d: Deferred[None] = self._reloading.run(read).addCallback(swap)
        return d
