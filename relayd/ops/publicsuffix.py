"""
The Public Suffix List (U{https://publicsuffix.org/list/}) and the
organisational domain of DMARC (RFC 7489 section 3.2) that it gives.

C{relayctl check-domain} looks for a DMARC record at the organisational
domain when a domain has none of its own (RFC 7489 section 6.6.3).  That
domain is the public suffix plus one label: C{example.co.uk} under
C{co.uk}, not C{co.uk} as "the last two labels" would have it.

The list is read from the file Debian's C{publicsuffix} package installs
(L{DEFAULT_PATH}), which the distribution keeps current; relayd downloads
nothing.  The matcher is the list's own algorithm (U{https://publicsuffix.org/list/},
"Formal algorithm"): normal rules, wildcard rules (C{*.ck}) and exception
rules (C{!www.ck}); the prevailing rule is an exception if one matches,
else the matching rule with the most labels, else the implicit rule C{*}.
Both the ICANN and the private sections count, as the RFC's examples and
the common DMARC implementations (OpenDMARC, checkdmarc) do.  Rules in
Unicode are kept in A-label form too, since relayd works with A-labels.

Why not a PyPI package: C{publicsuffix2} and C{publicsuffixlist} each
bundle their own copy of the list (which goes stale unless the package is
upgraded), and C{tldextract} fetches the list over HTTP at run time; the
algorithm is thirty lines, and the distribution's file is kept up to date
with the rest of the system.
"""

from __future__ import annotations

import functools

import idna

__all__ = ["DEFAULT_PATH", "PublicSuffixList", "load", "default"]

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"
"""Where Debian's C{publicsuffix} package puts the list."""


class PublicSuffixList:
    """
    The rules of one list, by kind, each without its C{*.} or C{!} and in
    lower case.
    """

    def __init__(self, lines: list[str]) -> None:
        """
        @param lines: the list file's lines: a rule is the first word of a
            line; empty lines and C{//} comments are skipped.
        """
        self.rules: set[str] = set()
        self.wildcards: set[str] = set()
        self.exceptions: set[str] = set()
        for line in lines:
            words = line.split()
            if not words or words[0].startswith("//"):
                continue
            rule = words[0].lower().rstrip(".")
            for form in {rule, _aLabels(rule)}:
                if form.startswith("!"):
                    self.exceptions.add(form[1:])
                elif form.startswith("*."):
                    self.wildcards.add(form[2:])
                elif form == "*":
                    continue  # the implicit rule
                else:
                    self.rules.add(form)

    def publicSuffix(self, domain: str) -> str:
        """
        The public suffix of C{domain} (lower case, no trailing dot), by
        the prevailing rule.
        """
        labels = domain.lower().rstrip(".").split(".")
        # An exception rule prevails over every other: its public suffix is
        # the rule without its leftmost label.
        for i in range(len(labels)):
            if ".".join(labels[i:]) in self.exceptions:
                return ".".join(labels[i + 1 :])
        # Otherwise the matching rule with the most labels: scan from the
        # longest candidate suffix down.
        for i in range(len(labels)):
            if ".".join(labels[i:]) in self.rules:
                return ".".join(labels[i:])
            if i + 1 < len(labels) and ".".join(labels[i + 1 :]) in self.wildcards:
                return ".".join(labels[i:])
        return labels[-1]  # the implicit rule "*"

    def organizationalDomain(self, domain: str) -> str:
        """
        RFC 7489 section 3.2: the public suffix and one more label; a name
        that is itself a public suffix is its own organisational domain.
        """
        labels = domain.lower().rstrip(".").split(".")
        suffix = self.publicSuffix(domain)
        count = suffix.count(".") + 1 if suffix else 0
        if count >= len(labels):
            return ".".join(labels)
        return ".".join(labels[-(count + 1) :])


def _aLabels(rule: str) -> str:
    """C{rule} with Unicode labels as A-labels (its C{!}/C{*.} kept)."""
    if rule.isascii():
        return rule
    prefix = "!" if rule.startswith("!") else "*." if rule.startswith("*.") else ""
    try:
        return prefix + idna.encode(rule[len(prefix) :], uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return rule


def load(path: str = DEFAULT_PATH) -> PublicSuffixList | None:
    """
    Read the list at C{path}; None when it cannot be read (the caller
    falls back and says so).  Blocking: relayctl calls it, never the
    reactor.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return PublicSuffixList(f.read().splitlines())
    except OSError:
        return None


@functools.cache
def default() -> PublicSuffixList | None:
    """The list at L{DEFAULT_PATH}, read once per process."""
    return load(DEFAULT_PATH)
