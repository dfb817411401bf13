"""
Suspended destinations (C{relayctl destination suspend DOMAIN}): domains
the scheduler starts no delivery to, while relayd keeps accepting mail for
them; their recipients wait in the queue until the domain is resumed.

The set lives in the spool as C{suspended.json}, written with
L{relayd.queue.safeio.writeAtomically}, so a suspension survives a
restart (or a crash) and a reader never sees half a file.  Reading and
writing block: the daemon does both at startup and from a thread
(L{relayd.ops.control}); C{relayctl} reads the file directly when relayd
is down.
"""

from __future__ import annotations

import json
import os
from typing import Any

from relayd.queue.safeio import writeAtomically

__all__ = ["SUSPENDED_NAME", "Suspensions", "SuspensionsError", "normalDomain", "readSuspended"]

SUSPENDED_NAME = "suspended.json"
"""The file, in the spool directory, that lists the suspended domains."""


class SuspensionsError(Exception):
    """The file of suspended domains cannot be read or is not sound."""


def normalDomain(domain: str) -> str:
    """
    A domain as the scheduler compares it: lower case, no trailing dot,
    no brackets around an address literal.

    @raise ValueError: when it cannot be a domain (empty, spaces, an C{@}).
    """
    text = domain.strip().rstrip(".").lower()
    if not text or "@" in text or any(c.isspace() or c in '/\\"' for c in text):
        raise ValueError(f"not a domain name: {domain!r}")
    return text


def readSuspended(directory: str) -> dict[str, dict[str, Any]]:
    """
    The suspended domains recorded in the spool at C{directory}, each with
    when it was suspended (C{since}, seconds since the epoch).  Blocking.

    @raise SuspensionsError: when the file is unreadable or not sound.
    """
    path = os.path.join(directory, SUSPENDED_NAME)
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SuspensionsError(f"{path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise SuspensionsError(f"{path}: not valid JSON: {e}") from None
    domains = raw.get("domains") if isinstance(raw, dict) else None
    if not isinstance(domains, dict):
        raise SuspensionsError(f'{path}: no "domains" table')
    result: dict[str, dict[str, Any]] = {}
    for domain, info in domains.items():
        if not isinstance(domain, str) or not isinstance(info, dict):
            raise SuspensionsError(f"{path}: bad entry {domain!r}")
        result[domain.lower()] = {"since": info.get("since")}
    return result


class Suspensions:
    """
    The suspended domains of one spool, in memory and on disk.

    @ivar directory: the spool directory.
    @ivar domains: domain -> C{{"since": seconds}}, as in the file.
    """

    def __init__(self, directory: str, domains: dict[str, dict[str, Any]] | None = None) -> None:
        self.directory = directory
        self.domains: dict[str, dict[str, Any]] = dict(domains or {})

    @classmethod
    def load(cls, directory: str) -> Suspensions:
        """Read the spool's file (blocking; see L{readSuspended})."""
        return cls(directory, readSuspended(directory))

    def isSuspended(self, domain: str) -> bool:
        """Are deliveries to C{domain} (any case, trailing dot or not) held?"""
        return domain.rstrip(".").lower() in self.domains

    def _write(self, domains: dict[str, dict[str, Any]]) -> None:
        data = json.dumps({"domains": domains}, indent=2, sort_keys=True).encode("utf-8")
        writeAtomically(os.path.join(self.directory, SUSPENDED_NAME), data + b"\n")

    def suspend(self, domain: str, now: float) -> bool:
        """
        Suspend C{domain}: durable on disk before it is in force (blocking).

        @return: False when it was suspended already.
        @raise OSError: the file could not be written; nothing changed.
        """
        domain = normalDomain(domain)
        if domain in self.domains:
            return False
        domains = dict(self.domains)
        domains[domain] = {"since": now}
        self._write(domains)
        self.domains = domains
        return True

    def resume(self, domain: str) -> bool:
        """
        Resume C{domain} (blocking).

        @return: False when it was not suspended.
        @raise OSError: the file could not be written; nothing changed.
        """
        domain = normalDomain(domain)
        if domain not in self.domains:
            return False
        domains = {d: info for d, info in self.domains.items() if d != domain}
        self._write(domains)
        self.domains = domains
        return True
