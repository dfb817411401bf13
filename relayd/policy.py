"""
The policy chain: runs the configured policies in order for each phase of
an SMTP session and combines their verdicts (DESIGN section 3).

The first answer other than C{CONTINUE} ends the phase.  A policy that
raises, answers something that is not a L{Verdict}, or does not answer in
time gives C{451 4.3.0}: a broken policy delays mail, it never loses or
wrongly refuses it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, cast

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import providedBy
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from relayd.config import Config, ConfigError
from relayd.interfaces import (
    IConnectionPolicy,
    IHeloPolicy,
    IMessagePolicy,
    IRecipientPolicy,
    ISenderPolicy,
)
from relayd.verdict import CONTINUE, Verdict, tempfail

__all__ = ["PolicyChain", "PolicyOptionError", "loadPolicies", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "relayd.policies"
PHASES = (IConnectionPolicy, IHeloPolicy, ISenderPolicy, IRecipientPolicy, IMessagePolicy)

log = Logger(namespace="relayd.policy")


class PolicyOptionError(ValueError):
    """
    Raised by a policy's C{fromConfig} for a bad option.

    @ivar key: the option's name within the policy's table.
    @ivar problem: what is wrong with it.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


POLICY_FAILED = tempfail(451, "4.3.0", "Temporary policy failure, try again later")


class PolicyChain:
    """
    The ordered policies, one method per SMTP phase.

    Each method returns a L{Deferred} that fires with the deciding
    L{Verdict} (L{CONTINUE} when nobody decided); it never fails.
    """

    def __init__(self, policies: Sequence[Any], timeout: float, clock: Any) -> None:
        self.policies = list(policies)
        self.timeout = timeout
        self.clock = clock
        self._byPhase = {
            phase: [p for p in self.policies if phase.providedBy(p)] for phase in PHASES
        }

    def checkConnection(self, session: Any) -> Deferred[Verdict]:
        return self._run(IConnectionPolicy, "checkConnection", session)

    def checkHelo(self, session: Any, name: str) -> Deferred[Verdict]:
        return self._run(IHeloPolicy, "checkHelo", session, name)

    def checkSender(self, session: Any, envelope: Any, sender: Any) -> Deferred[Verdict]:
        return self._run(ISenderPolicy, "checkSender", session, envelope, sender)

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Deferred[Verdict]:
        return self._run(IRecipientPolicy, "checkRecipient", session, envelope, recipient)

    def checkMessage(self, session: Any, envelope: Any, message: Any) -> Deferred[Verdict]:
        return self._run(IMessagePolicy, "checkMessage", session, envelope, message)

    def _run(self, phase: Any, method: str, *args: Any) -> Deferred[Verdict]:
        policies = self._byPhase[phase]
        result: Deferred[Verdict] = Deferred()

        def step(index: int) -> None:
            if index == len(policies):
                result.callback(CONTINUE)
                return
            policy = policies[index]
            d = self._ask(policy, method, args)

            def answered(verdict: Verdict) -> None:
                if verdict.final:
                    result.callback(verdict)
                else:
                    step(index + 1)

            d.addCallback(answered)

        step(0)
        return result

    def _ask(self, policy: Any, method: str, args: tuple[Any, ...]) -> Deferred[Verdict]:
        name = getattr(policy, "name", type(policy).__name__)

        def call() -> Any:
            answer = getattr(policy, method)(*args)
            if not isinstance(answer, Deferred) and inspect.isawaitable(answer):
                # Any: ensureDeferred takes coroutines only; another awaitable
                # makes it raise, which counts as a policy failure (below).
                return ensureDeferred(cast(Any, answer))
            return answer

        d = maybeDeferred(call)
        d.addTimeout(self.timeout, self.clock)

        def check(verdict: Any) -> Verdict:
            if not isinstance(verdict, Verdict):
                raise TypeError(f"{method} returned {verdict!r}, not a Verdict")
            return verdict

        def failed(failure: Failure) -> Verdict:
            log.failure(
                "policy {policy} failed in {method}; answering 451 4.3.0",
                failure,
                policy=name,
                method=method,
            )
            return POLICY_FAILED

        d.addCallback(check)
        d.addErrback(failed)
        return d


def installedPolicies() -> dict[str, Any]:
    """Entry points of group C{relayd.policies}, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def loadPolicies(config: Config) -> list[Any]:
    """
    Build the configured policies, in chain order, through entry points.

    Only the named entry points are imported.

    @raise ConfigError: unknown name (listing the installed ones), a class
        that fails to import, does not provide a phase interface or fails
        C{verifyObject}, or a bad option.
    """
    installed = installedPolicies()
    policies = []
    seen = set()
    for name in config.policyChain:
        if name in seen:
            raise ConfigError(config.path, "policy.chain", f"policy {name!r} listed twice")
        seen.add(name)
        ep = installed.get(name)
        if ep is None:
            names = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                config.path, "policy.chain", f"unknown policy {name!r} (installed: {names})"
            )
        try:
            factory = ep.load()
        except Exception as e:
            raise ConfigError(
                config.path, "policy.chain", f"policy {name!r} failed to import: {e}"
            ) from None
        key = f"policies.{name}"
        try:
            policy = factory.fromConfig(dict(config.policyOptions.get(name, {})))
        except PolicyOptionError as e:
            raise ConfigError(config.path, f"{key}.{e.key}", e.problem) from None
        except (ValueError, TypeError) as e:
            raise ConfigError(config.path, key, str(e)) from None
        if getattr(policy, "name", None) is None:
            policy.name = name
        phases = [p for p in PHASES if p in providedBy(policy).flattened()]
        if not phases:
            raise ConfigError(
                config.path,
                "policy.chain",
                f"policy {name!r} provides none of the policy interfaces",
            )
        for phase in phases:
            try:
                verifyObject(phase, policy)
            except Invalid as e:
                problem = " ".join(str(e).split())
                raise ConfigError(
                    config.path,
                    "policy.chain",
                    f"policy {name!r} does not implement {phase.__name__}: {problem}",
                ) from None
        policies.append(policy)
    return policies
