"""
Policies that exist for relayd's own tests (tests/test_plugins.py), found
through the entry points in C{relayd_testpolicies-1.0.dist-info} next to
this file (see README.md here).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from relayd.interfaces import (
    IMessagePolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ITransactionObserver,
)
from relayd.verdict import CONTINUE, reject


@implementer(ITransactionObserver, IMessagePolicy, IPolicyLifecycle, IReloadable)
class Recorder:
    """
    Records what relayd calls, in L{events}.  Refuses at DATA a message
    whose Subject is C{refuse}.  Registered twice (C{recorder} and
    C{recorder2}), like a third-party class an operator configures under
    two names; its class-level L{name} is the first.

    Options: C{fail = true} makes every hook raise after recording its
    call; C{valueError = "text"} makes C{fromConfig} raise ValueError.
    """

    name = "recorder"

    def __init__(self, options: dict[str, Any], context: Any) -> None:
        self.options = options
        self.context = context
        self.events: list[tuple[Any, ...]] = []

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: Any) -> Recorder:
        if "valueError" in options:
            raise ValueError(options["valueError"])
        return cls(options, context)

    def _record(self, *event: Any) -> None:
        self.events.append(event)
        if self.options.get("fail"):
            raise RuntimeError(f"{event[0]} failed on purpose")

    def startPolicy(self, reactor: Any) -> None:
        self._record("start", reactor)

    def stopPolicy(self) -> None:
        self._record("stop")

    def reload(self) -> None:
        self._record("reload")

    def transactionEnded(self, session: Any, envelope: Any, queued: bool) -> None:
        recipients = [str(r) for r in envelope.recipients]
        self._record("ended", envelope.queueId, recipients, queued)

    def checkMessage(self, session: Any, envelope: Any, message: Any) -> Any:
        if message.headers.get("subject") == "refuse":
            return reject(554, "5.7.1", "Refused by recorder")
        return CONTINUE


@implementer(IRecipientPolicy)
class MissingMethod:
    """Claims IRecipientPolicy but has no checkRecipient: verifyObject fails."""

    name = "broken"

    @classmethod
    def fromConfig(cls, options: dict[str, Any]) -> MissingMethod:
        return cls()


@implementer(IRecipientPolicy)
class NoFromConfig:
    """An entry point naming a class that cannot be built from options."""

    name = "nofactory"

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Any:
        return CONTINUE


class NoInterface:
    """Provides none of the policy interfaces."""

    @classmethod
    def fromConfig(cls, options: dict[str, Any]) -> NoInterface:
        return cls()
