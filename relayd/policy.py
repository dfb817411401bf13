"""
The policy chain: runs the configured policies in order for each phase of
an SMTP session and combines their verdicts (DESIGN section 3).

The first answer other than C{CONTINUE} ends the phase.  A policy that
raises, answers something that is not a L{Verdict}, or does not answer in
time gives C{451 4.3.0}: a broken policy delays mail, it never loses or
wrongly refuses it.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
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
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ISenderPolicy,
    ITransactionObserver,
)
from relayd.metrics import NO_METRICS, NoMetrics
from relayd.verdict import CONTINUE, Verdict, tempfail

__all__ = [
    "PolicyChain",
    "PolicyContext",
    "PolicyOptionError",
    "loadPolicies",
    "installedPolicies",
    "describeInstalled",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "relayd.policies"
PHASES = (IConnectionPolicy, IHeloPolicy, ISenderPolicy, IRecipientPolicy, IMessagePolicy)
HOOKS = (ITransactionObserver, IPolicyLifecycle, IReloadable)
"""Optional interfaces beside the phases; C{verifyObject} checks them too."""

log = Logger(namespace="relayd.policy")


class PolicyOptionError(ValueError):
    """
    Raised by a policy's C{fromConfig} for a bad option.

    relayd turns it into one line and refuses to start (or, on SIGHUP,
    keeps the old config)::

        relayd: config error: FILE: policies.NAME.KEY: PROBLEM

    For example C{raise PolicyOptionError("tarpit", "must be a number of
    seconds")} in the policy configured as C{[policies.example]}.  Use it
    for unknown keys too, so that a typo in the config is caught at
    startup.  Other exceptions from C{fromConfig}: a C{ValueError},
    C{TypeError} or C{OSError} also gives one line (naming only
    C{policies.NAME}); anything else is a bug and shows a traceback.

    @ivar key: the option's name within the policy's table.
    @ivar problem: what is wrong with it, without the key.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class PolicyContext:
    """
    What a policy may want to know about the relayd loading it, passed as
    the second argument of C{fromConfig(options, context)} to policies
    whose C{fromConfig} takes two parameters (C{fromConfig(options)} alone
    is fine: relayd looks at the signature).

    A policy whose options name files should resolve them with
    L{resolvePath}, so that relative paths mean the same as everywhere
    else in the config::

        @classmethod
        def fromConfig(cls, options, context):
            path = context.resolvePath(options.pop("file", "domains"))

    @ivar configPath: the config file's path.
    @ivar hostname: relayd's host name (C{[server] hostname}).
    @ivar name: the policy's name in the chain (its entry-point name).
    """

    configPath: str
    hostname: str
    name: str

    def resolvePath(self, path: str) -> str:
        """A path from the policy's options: relative ones are taken
        against the config file's folder, like every path in the config."""
        return os.path.join(os.path.dirname(os.path.abspath(self.configPath)), path)


def _callFromConfig(factory: Any, options: dict[str, Any], context: PolicyContext) -> Any:
    try:
        parameters = inspect.signature(factory.fromConfig).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    if len(parameters) >= 2:
        return factory.fromConfig(options, context)
    return factory.fromConfig(options)


POLICY_FAILED = tempfail(451, "4.3.0", "Temporary policy failure, try again later")

_PHASE_NAMES = {
    "checkConnection": "connect",
    "checkHelo": "helo",
    "checkSender": "mail",
    "checkRecipient": "rcpt",
    "checkMessage": "data",
}
"""The C{phase} label of L{relayd.metrics}' policy verdict counter."""


class PolicyChain:
    """
    The ordered policies, one method per SMTP phase.

    Each method returns a L{Deferred} that fires with the deciding
    L{Verdict} (L{CONTINUE} when nobody decided); it never fails.
    """

    def __init__(
        self,
        policies: Sequence[Any],
        timeout: float,
        clock: Any,
        options: dict[str, dict[str, Any]] | None = None,
        metrics: NoMetrics = NO_METRICS,
    ) -> None:
        """
        @param policies: the policy objects, in chain order.
        @param timeout: seconds each policy may take to answer.
        @param clock: the reactor (or a L{twisted.internet.task.Clock}) for
            the timeouts.
        @param options: each policy's options as given to C{fromConfig}, by
            chain name and in the order of C{policies} (what
            L{loadPolicies} returns); a reload keeps the instances whose
            options did not change.
        @param metrics: counts each deciding verdict by phase, policy and
            action (L{relayd.metrics}); by default nowhere.
        """
        self.policies = list(policies)
        self.timeout = timeout
        self.clock = clock
        self.options = dict(options or {})
        self.metrics = metrics
        self._byPhase: dict[Any, list[Any]] = {
            phase: [p for p in self.policies if phase.providedBy(p)]
            for phase in PHASES + (ITransactionObserver,)
        }

    def transactionEnded(self, session: Any, envelope: Any, queued: bool) -> None:
        """
        Tell every L{ITransactionObserver} that a transaction ended; an
        exception is logged and goes no further.
        """
        for policy in self._byPhase[ITransactionObserver]:
            try:
                policy.transactionEnded(session, envelope, queued)
            except Exception:
                log.failure(
                    "policy {policy} failed in transactionEnded",
                    policy=getattr(policy, "name", type(policy).__name__),
                    queue_id=getattr(envelope, "queueId", None),
                )

    def checkConnection(self, session: Any) -> Deferred[Verdict]:
        """Ask the L{IConnectionPolicy} policies, in order."""
        return self._run(IConnectionPolicy, "checkConnection", session)

    def checkHelo(self, session: Any, name: str) -> Deferred[Verdict]:
        """Ask the L{IHeloPolicy} policies, in order."""
        return self._run(IHeloPolicy, "checkHelo", session, name)

    def checkSender(self, session: Any, envelope: Any, sender: Any) -> Deferred[Verdict]:
        """Ask the L{ISenderPolicy} policies, in order."""
        return self._run(ISenderPolicy, "checkSender", session, envelope, sender)

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Deferred[Verdict]:
        """
        Ask the L{IRecipientPolicy} policies, in order.  CONTINUE from all
        of them means nobody vouched: the server denies relaying.
        """
        return self._run(IRecipientPolicy, "checkRecipient", session, envelope, recipient)

    def checkMessage(self, session: Any, envelope: Any, message: Any) -> Deferred[Verdict]:
        """Ask the L{IMessagePolicy} policies, in order; they may edit C{message}."""
        return self._run(IMessagePolicy, "checkMessage", session, envelope, message)

    def _run(self, phase: Any, method: str, *args: Any) -> Deferred[Verdict]:
        policies = self._byPhase[phase]
        result: Deferred[Verdict] = Deferred()

        phase = _PHASE_NAMES[method]

        def step(index: int) -> None:
            if index == len(policies):
                self.metrics.policyVerdict(phase, "none", CONTINUE.action.value)
                result.callback(CONTINUE)
                return
            policy = policies[index]
            d = self._ask(policy, method, args)

            def answered(verdict: Verdict) -> None:
                if verdict.final:
                    name = getattr(policy, "name", type(policy).__name__)
                    self.metrics.policyVerdict(phase, name, verdict.action.value)
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
    """
    Entry points of group C{relayd.policies}, by name (none is imported).
    A package makes a policy available by declaring one, e.g. in its
    C{setup.cfg}::

        [options.entry_points]
        relayd.policies =
            example = relayd_policy_example:ExamplePolicy
    """
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def describeInstalled() -> list[tuple[str, str, str, str]]:
    """
    The installed policies as C{(name, distribution, version, object)},
    sorted by name, without importing any of them.
    """
    rows = []
    for name, ep in sorted(installedPolicies().items()):
        dist = getattr(ep, "dist", None)
        rows.append(
            (
                name,
                dist.name if dist is not None else "?",
                dist.version if dist is not None else "?",
                ep.value,
            )
        )
    return rows


def startPolicies(policies: Sequence[Any], reactor: Any) -> Deferred[None]:
    """Call C{startPolicy} on those that have it; failures are logged."""
    return _each(policies, lambda p: p.startPolicy(reactor), "startPolicy")


def stopPolicies(policies: Sequence[Any]) -> Deferred[None]:
    """Call C{stopPolicy} on those that have it; failures are logged."""
    return _each(policies, lambda p: p.stopPolicy(), "stopPolicy")


def _logFailure(failure: Failure, name: str, method: str) -> None:
    log.failure("policy {policy} failed in {method}", failure, policy=name, method=method)


def _each(policies: Sequence[Any], call: Any, method: str) -> Deferred[None]:
    from twisted.internet.defer import gatherResults

    ds = []
    for policy in policies:
        if not IPolicyLifecycle.providedBy(policy):
            continue
        d = maybeDeferred(call, policy)
        d.addErrback(_logFailure, getattr(policy, "name", "?"), method)
        ds.append(d)
    return gatherResults(ds).addCallback(lambda _: None)


def loadPolicies(
    config: Config, previous: PolicyChain | None = None
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """
    Build the configured policies, in chain order, through entry points.

    Only the named entry points are imported.  With C{previous} (a reload),
    a policy whose name and options are unchanged is kept as it is, so that
    its state (rate-limit counters, open connections) survives; it is
    asked to L{IReloadable.reload} its files by the caller.

    @return: the policies and their options by name.

    @raise ConfigError: unknown name (listing the installed ones), a class
        that fails to import, does not provide a phase interface or fails
        C{verifyObject}, or a bad option.
    """
    installed = installedPolicies()
    policies = []
    allOptions: dict[str, dict[str, Any]] = {}
    kept = {}
    if previous is not None and len(previous.options) == len(previous.policies):
        # By chain name (previous.options is in chain order, like its
        # policies), not by each policy's own name attribute: one class may
        # be configured under two names, and both instances then share it.
        kept = dict(zip(previous.options, previous.policies, strict=True))
    seen = set()
    for name in config.policyChain:
        if name in seen:
            raise ConfigError(config.path, "policy.chain", f"policy {name!r} listed twice")
        seen.add(name)
        options = copy.deepcopy(dict(config.policyOptions.get(name, {})))
        allOptions[name] = options
        if previous is not None and name in kept and previous.options.get(name) == options:
            policies.append(kept[name])
            continue
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
        if not callable(getattr(factory, "fromConfig", None)):
            raise ConfigError(
                config.path,
                "policy.chain",
                f"policy {name!r} ({ep.value}) has no fromConfig(options) to build it with",
            )
        try:
            context = PolicyContext(config.path, config.hostname, name)
            policy = _callFromConfig(factory, copy.deepcopy(options), context)
        except PolicyOptionError as e:
            raise ConfigError(config.path, f"{key}.{e.key}", e.problem) from None
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(config.path, key, str(e)) from None
        provided = list(providedBy(policy).flattened())
        phases = [p for p in PHASES + (ITransactionObserver,) if p in provided]
        if not phases:
            raise ConfigError(
                config.path,
                "policy.chain",
                f"policy {name!r} provides none of the policy interfaces",
            )
        if getattr(policy, "name", None) is None:
            policy.name = name
        for phase in phases + [h for h in HOOKS if h in provided and h not in phases]:
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
    return policies, allOptions
