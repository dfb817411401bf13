"""
C{example}: a small but complete third-party relayd policy.

At RCPT it refuses recipients at the domains it is told to refuse
(C{550 5.7.1}, answered after a configurable delay, the way tarpitting
MTAs slow down address harvesters) and temporarily refuses those at the
domains it is told to defer (C{450 4.7.1}).  Once the checks have let a
message through, it stamps it with C{X-Example-Policy}, after removing any
such field the client sent, so that the stamp can be trusted downstream.

It shows every part of the plugin API (see relayd's C{docs/plugins.md}),
all imported from C{relayd.plugin}:

  - options read in C{fromConfig(options, context)}, with
    L{PolicyOptionError} for a bad one and L{PolicyContext.resolvePath}
    for a file name, and the reactor from C{context.reactor};
  - an asynchronous answer: C{checkRecipient} is C{async def} and waits
    with L{deferLater} on the reactor given to C{startPolicy};
  - C{stopPolicy} cancelling the waits still pending, so that shutdown
    leaves no timer behind;
  - C{reload} re-reading the domains file on SIGHUP, in a thread;
  - a header edit in C{modifyMessage} (L{IMessageModifier}): it runs
    after every check has let the message through, even when one of them
    answered ACCEPT.

Options (C{[policies.example]}):
  - C{refuse_domains}: list of domains whose recipients get C{550 5.7.1}.
  - C{refuse_file}: a file with more such domains, one per line (C{#}
    starts a comment); relative to the config file's folder; re-read on
    SIGHUP.
  - C{defer_domains}: list of domains whose recipients get C{450 4.7.1}.
  - C{tarpit}: seconds to wait before answering a refusal; default 0.
    Keep it well below C{[policy] timeout}.
  - C{stamp}: the value of the C{X-Example-Policy} field; default
    C{"checked"}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from relayd.plugin import (
    CONTINUE,
    Address,
    Envelope,
    IMessageModifier,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    Message,
    PolicyContext,
    PolicyOptionError,
    SessionView,
    Verdict,
    reject,
    tempfail,
)

__all__ = ["ExamplePolicy", "HEADER", "readDomainsFile"]

__version__ = "0.1.0"

HEADER = "X-Example-Policy"
"""The header field this policy sets."""

KNOWN_OPTIONS = ("refuse_domains", "refuse_file", "defer_domains", "tarpit", "stamp")


def _domains(options: dict[str, Any], key: str) -> frozenset[str]:
    """Read a list of domain names from C{options[key]}, lower-cased."""
    value = options.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyOptionError(key, 'must be a list of domain names like ["example.net"]')
    return frozenset(v.lower().rstrip(".") for v in value)


def readDomainsFile(path: str) -> frozenset[str]:
    """
    Read one domain per line; blank lines and C{#} comments are skipped.

    @raise OSError: when the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return frozenset(line.lower().rstrip(".") for line in lines if line)


@implementer(IRecipientPolicy, IMessageModifier, IPolicyLifecycle, IReloadable)
class ExamplePolicy:
    """
    Refuses or defers recipients by domain, stamps accepted messages.

    @ivar listedDomains: the C{refuse_domains} option.
    @ivar refuseFile: the absolute path of C{refuse_file}, or None.
    @ivar fileDomains: the domains read from C{refuseFile}.
    @ivar deferDomains: domains refused with C{450 4.7.1}.
    @ivar tarpit: seconds to wait before a refusal.
    @ivar stamp: the value of the L{HEADER} field.
    """

    name = "example"

    def __init__(
        self,
        refuseDomains: frozenset[str],
        deferDomains: frozenset[str],
        tarpit: float,
        stamp: str,
        refuseFile: str | None = None,
        reactor: Any = None,
    ) -> None:
        self.listedDomains = refuseDomains
        self.refuseFile = refuseFile
        self.fileDomains: frozenset[str] = frozenset()
        self.deferDomains = deferDomains
        self.tarpit = tarpit
        self.stamp = stamp
        self.reactor: Any = reactor
        self._waiting: set[Deferred[None]] = set()
        if refuseFile is not None:
            self.fileDomains = readDomainsFile(refuseFile)

    @property
    def refuseDomains(self) -> frozenset[str]:
        """The domains refused with C{550 5.7.1}: listed and from the file."""
        return self.listedDomains | self.fileDomains

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> ExamplePolicy:
        """
        Build the policy from its C{[policies.example]} table.

        relayd calls this once at startup, before it listens (and again
        on a reload if the table changed), so reading a small file here
        is fine.

        @param options: the table as a dict (a copy: it may be consumed).
        @param context: where relayd's config lives, for relative paths.
        @raise PolicyOptionError: for an unknown or bad option; relayd
            turns it into one line naming the file and the key.
        """
        unknown = sorted(set(options) - set(KNOWN_OPTIONS))
        if unknown:
            raise PolicyOptionError(
                unknown[0], f"unknown option (known: {', '.join(KNOWN_OPTIONS)})"
            )
        refuse = _domains(options, "refuse_domains")
        defer = _domains(options, "defer_domains")
        tarpit = options.get("tarpit", 0)
        if isinstance(tarpit, bool) or not isinstance(tarpit, (int, float)) or tarpit < 0:
            raise PolicyOptionError("tarpit", "must be a number of seconds, 0 or more")
        stamp = options.get("stamp", "checked")
        if not isinstance(stamp, str) or not (stamp.isascii() and stamp.isprintable()):
            raise PolicyOptionError("stamp", "must be printable ASCII on one line")
        if not stamp.strip():
            raise PolicyOptionError("stamp", "must not be empty")
        refuseFile = options.get("refuse_file")
        if refuseFile is not None:
            if not isinstance(refuseFile, str):
                raise PolicyOptionError("refuse_file", "must be a path (a string)")
            refuseFile = context.resolvePath(refuseFile)
        try:
            return cls(refuse, defer, float(tarpit), stamp, refuseFile, context.reactor)
        except OSError as e:
            raise PolicyOptionError("refuse_file", f"cannot read {refuseFile}: {e}") from None

    # IPolicyLifecycle

    def startPolicy(self, reactor: Any) -> None:
        """Keep the reactor for the tarpit's timers."""
        self.reactor = reactor

    def stopPolicy(self) -> None:
        """Cancel the tarpit waits still pending: leave no timer behind."""
        for waiting in list(self._waiting):
            waiting.cancel()

    # IReloadable

    def reload(self) -> Deferred[None]:
        """
        Re-read C{refuse_file} in the reactor's thread pool (file I/O never
        runs on the reactor thread).  If it cannot be read, the failure
        makes relayd log it and the old list stays.
        """
        if self.refuseFile is None or self.reactor is None:
            return succeed(None)
        d = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), readDomainsFile, self.refuseFile
        )

        def loaded(domains: frozenset[str]) -> None:
            self.fileDomains = domains

        return d.addCallback(loaded)

    # IRecipientPolicy

    async def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Verdict:
        """
        Refuse or defer by the recipient's domain; no opinion otherwise
        (CONTINUE), so that later policies decide whether it may relay.

        A refusal waits C{tarpit} seconds first.  If the wait is
        cancelled (relayd's C{[policy] timeout}, or L{stopPolicy}),
        C{await} raises L{twisted.internet.defer.CancelledError} and relayd
        answers C{451 4.3.0}.
        """
        domain = recipient.domainLower
        if domain in self.refuseDomains:
            await self._wait(self.tarpit)
            return reject(550, "5.7.1", f"Recipients at {domain} are not accepted here")
        if domain in self.deferDomains:
            return tempfail(450, "4.7.1", f"Recipients at {domain} are not accepted now")
        return CONTINUE

    def _wait(self, seconds: float) -> Deferred[None]:
        """A Deferred that fires after C{seconds}; L{stopPolicy} cancels it."""
        if self.reactor is None:
            raise RuntimeError("startPolicy was not called")
        waiting: Deferred[None] = deferLater(self.reactor, seconds, lambda: None)
        self._waiting.add(waiting)

        def done(result: Any) -> Any:
            self._waiting.discard(waiting)
            return result

        return waiting.addBoth(done)

    # IMessageModifier

    def modifyMessage(self, session: SessionView, envelope: Envelope, message: Message) -> None:
        """
        Replace whatever C{X-Example-Policy} the client sent with ours.  A
        modifier decides nothing: it runs once the checks have let the
        message through, and returns nothing.
        """
        message.headers.remove(HEADER)
        message.headers.add(HEADER, self.stamp)
