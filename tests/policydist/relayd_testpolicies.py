"""
Policies that exist for relayd's own tests (tests/test_plugins.py), found
through the entry points in C{relayd_testpolicies-1.0.dist-info} next to
this file (see README.md here).
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from relayd.interfaces import (
    IMessageModifier,
    IMessagePolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ISenderPolicy,
    ITransactionObserver,
)
from relayd.verdict import CONTINUE, accept, reject, tempfail


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
    def fromConfig(cls, options: dict[str, Any], context: Any) -> MissingMethod:
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
    def fromConfig(cls, options: dict[str, Any], context: Any) -> NoInterface:
        return cls()


@implementer(IMessagePolicy)
class AcceptAtData:
    """
    A check that vouches for every message at the end of DATA (ACCEPT):
    before the modifier phase, such an answer ended the phase and skipped
    the header rewriting and DKIM policies listed after it.  Counts its
    calls in L{asked}.
    """

    def __init__(self) -> None:
        self.asked = 0

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: Any) -> AcceptAtData:
        return cls()

    def checkMessage(self, session: Any, envelope: Any, message: Any) -> Any:
        self.asked += 1
        return accept()


@implementer(ISenderPolicy)
class Legacy:
    """
    Written against relayd's older API: C{fromConfig(options)} with one
    parameter, and no C{name} attribute (relayd used to set one).  Refuses
    senders whose local part is C{legacy} with the phase's default reply.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    @classmethod
    def fromConfig(cls, options: dict[str, Any]) -> Legacy:
        return cls(options)

    def checkSender(self, session: Any, envelope: Any, sender: Any) -> Any:
        if sender.local == "legacy":
            return reject()
        return CONTINUE


@implementer(IRecipientPolicy)
class Defaults:
    """
    Answers with the constructors' defaults only, chosen by the recipient's
    local part (C{accept}, C{reject}, C{tempfail}, C{rejecttext}), so the
    defaults of the RCPT phase show on the wire.
    """

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: Any) -> Defaults:
        return cls()

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Any:
        answers = {
            "accept": accept(),
            "reject": reject(),
            "tempfail": tempfail(),
            "rejecttext": reject(text="Not this one"),
        }
        return answers.get(recipient.local, CONTINUE)


@implementer(IMessageModifier)
class Marker:
    """
    A modifier: adds C{X-Marked: yes}, or raises when the message's
    Subject is C{fail} (a broken modifier must delay the message, not let
    it out unmodified).
    """

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: Any) -> Marker:
        return cls()

    def modifyMessage(self, session: Any, envelope: Any, message: Any) -> None:
        if message.headers.get("subject") == "fail":
            raise RuntimeError("the marker failed on purpose")
        message.headers.add("X-Marked", "yes")
