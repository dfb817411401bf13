"""
The policy chain: runs the configured policies in order for each phase of
an SMTP session and combines their verdicts (DESIGN section 3).

The first answer other than C{CONTINUE} ends the phase; a verdict that
left out its code or text gets the phase's (L{Verdict.forPhase}).  After
the checks of the end of DATA have let a message through, every
L{IMessageModifier} runs, in config order (L{PolicyChain.modifyMessage}).
A policy that raises, answers something that is not a L{Verdict}, or does
not answer in time gives C{451 4.3.0}: a broken policy delays mail, it
never loses or wrongly refuses it.

relayd knows each policy by its name in C{[policy] chain}: the chain's
registry (L{PolicyChain.names}) is what log lines and metrics use; nothing
is written onto the policy objects, which belong to their authors.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, cast

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import providedBy
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from relayd.address import Address
from relayd.config import Config, ConfigError
from relayd.envelope import Envelope, Message
from relayd.interfaces import (
    IConnectionPolicy,
    IHeloPolicy,
    IMessageModifier,
    IMessagePolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    IReloadable,
    ISenderPolicy,
    ITransactionObserver,
    SessionView,
)
from relayd.ops.logs import Logger, idFields
from relayd.ops.metrics import NO_METRICS, NoMetrics
from relayd.verdict import CONTINUE, Phase, Verdict, tempfail

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
ROLES = (*PHASES, IMessageModifier, ITransactionObserver)
"""What makes an object a policy: a check phase, the modifier phase, or
observing transactions; it must provide at least one."""
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


def _globalReactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


@dataclass(frozen=True)
class PolicyContext:
    """
    What a policy may want to know about the relayd loading it: the second
    argument of C{fromConfig(options, context)}, the one constructor
    signature (DESIGN section 3).

    A policy whose options name files should resolve them with
    L{resolvePath}, so that relative paths mean the same as everywhere
    else in the config::

        @classmethod
        def fromConfig(cls, options, context):
            path = context.resolvePath(options.pop("file", "domains"))

    @ivar configPath: the config file's path.
    @ivar hostname: relayd's host name (C{[server] hostname}).
    @ivar name: the policy's name in the chain (its entry-point name); the
        name relayd gives it in log lines and metrics.
    @ivar reactor: the reactor relayd runs on, for timers (C{callLater},
        C{deferLater}) and thread pools; the same one C{startPolicy} gets.
        In a context made by hand (a unit test) it is the global reactor
        unless one is given (a L{twisted.internet.task.Clock}, say).
    """

    configPath: str
    hostname: str
    name: str
    reactor: IReactorTime = field(default_factory=_globalReactor, repr=False, compare=False)

    @property
    def configDirectory(self) -> str:
        """The folder of the config file: where relative paths start."""
        return os.path.dirname(os.path.abspath(self.configPath))

    @property
    def log(self) -> Logger:
        """A logger in namespace C{relayd.policies.NAME}, for the policy's log lines."""
        return Logger(namespace=f"relayd.policies.{self.name}")

    def resolvePath(self, path: str) -> str:
        """A path from the policy's options: relative ones are taken
        against the config file's folder, like every path in the config."""
        return os.path.join(self.configDirectory, path)


NEW_FORM = "fromConfig(cls, options, context) (context: relayd.plugin.PolicyContext)"


def _legacyFromConfig(fromConfig: Callable[..., Any]) -> bool:
    """
    True for a C{fromConfig(options)} written for relayd before
    C{fromConfig(options, context)} became the one signature: it binds one
    argument and not two.  Only to keep such policies loading (with a
    deprecation warning); anything else gets C{(options, context)}.
    """
    try:
        signature = inspect.signature(fromConfig)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind({}, None)
    except TypeError:
        pass
    else:
        return False
    try:
        signature.bind({})
    except TypeError:
        return False
    return True


def buildPolicy(factory: Any, options: dict[str, Any], context: PolicyContext, where: str) -> Any:
    """
    Call C{factory.fromConfig(options, context)}.  A factory whose
    C{fromConfig} takes only the options (the form relayd accepted before)
    is still called, with a L{DeprecationWarning} and a log line naming the
    new form.

    @param where: the factory as the entry point names it, for the warning.
    """
    fromConfig = factory.fromConfig
    if _legacyFromConfig(fromConfig):
        message = (
            f"policy {context.name!r} ({where}): fromConfig(options) is deprecated "
            f"and will stop working; define {NEW_FORM}"
        )
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        log.warn("{deprecation}", deprecation=message, policy=context.name)
        return fromConfig(options)
    return fromConfig(options, context)


POLICY_FAILED = tempfail(451, "4.3.0", "Temporary policy failure, try again later")

_PHASE_NAMES: dict[str, Phase] = {
    "checkConnection": "connect",
    "checkHelo": "helo",
    "checkSender": "mail",
    "checkRecipient": "rcpt",
    "checkMessage": "data",
}
"""The C{phase} label of L{relayd.ops.metrics}' policy verdict counter."""

_PHASE_OF: dict[str, Any] = {
    "checkConnection": IConnectionPolicy,
    "checkHelo": IHeloPolicy,
    "checkSender": ISenderPolicy,
    "checkRecipient": IRecipientPolicy,
    "checkMessage": IMessagePolicy,
}
"""The phase (the interface) each check method of L{PolicyChain} asks."""


_UNASKED: Any = object()
"""No answer yet: L{PolicyChain._call} asks the policy itself."""


class PolicyChain:
    """
    The ordered policies, one method per SMTP phase, and the modifiers.

    Each method returns a L{Deferred} that fires with the deciding
    L{Verdict} (L{CONTINUE} when nobody decided); it never fails.

    @ivar names: the registry: each policy by its name in the chain, in
        chain order.  Log lines and metrics name policies from it.
    """

    def __init__(
        self,
        policies: Sequence[Any],
        timeout: float,
        clock: IReactorTime,
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
            L{loadPolicies} returns): the names of the registry; a reload
            keeps the instances whose options did not change.  Without
            them (a chain built by hand in a test), each policy is known
            by its own C{name} attribute, or its class's name.
        @param metrics: counts each deciding verdict by phase, policy and
            action (L{relayd.ops.metrics}); by default nowhere.
        """
        self.policies = list(policies)
        self.timeout = timeout
        self.clock = clock
        self.options = dict(options or {})
        self.metrics = metrics
        if len(self.options) == len(self.policies):
            names = list(self.options)
        else:
            names = []
            for policy in self.policies:
                name = own = _ownName(policy)
                count = 1
                while name in names:  # one class twice in a hand-built chain
                    count += 1
                    name = f"{own}#{count}"
                names.append(name)
        self.names: dict[str, Any] = dict(zip(names, self.policies, strict=True))
        self._nameOf = {id(p): name for name, p in self.names.items()}
        self._byPhase: dict[Any, list[Any]] = {
            phase: [p for p in self.policies if phase.providedBy(p)] for phase in ROLES
        }

    @property
    def readsMessages(self) -> bool:
        """
        Whether a policy of this chain looks at messages (an
        L{IMessagePolicy} or L{IMessageModifier}): they may read the file
        at C{message.path} before the commit.
        """
        return bool(self._byPhase[IMessagePolicy] or self._byPhase[IMessageModifier])

    def nameOf(self, policy: Any) -> str:
        """The name C{policy} has in this chain (its registry entry)."""
        return self._nameOf.get(id(policy)) or _ownName(policy)

    def transactionEnded(self, session: SessionView, envelope: Envelope, queued: bool) -> None:
        """
        Tell every L{ITransactionObserver} that a transaction ended; an
        exception is logged and goes no further.
        """
        for policy in self._byPhase[ITransactionObserver]:
            try:
                policy.transactionEnded(session, envelope, queued)
            except Exception:
                log.failure(
                    "{prefix}: policy {policy} failed in transactionEnded",
                    policy=self.nameOf(policy),
                    **idFields(session, envelope),
                )

    def checkConnection(self, session: SessionView) -> Deferred[Verdict]:
        """Ask the L{IConnectionPolicy} policies, in order."""
        return self._run(IConnectionPolicy, "checkConnection", session)

    def checkHelo(self, session: SessionView, name: str) -> Deferred[Verdict]:
        """Ask the L{IHeloPolicy} policies, in order."""
        return self._run(IHeloPolicy, "checkHelo", session, name)

    def checkSender(
        self, session: SessionView, envelope: Envelope, sender: Address
    ) -> Deferred[Verdict]:
        """Ask the L{ISenderPolicy} policies, in order."""
        return self._run(ISenderPolicy, "checkSender", session, envelope, sender)

    def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Deferred[Verdict]:
        """
        Ask the L{IRecipientPolicy} policies, in order.  CONTINUE from all
        of them means nobody vouched: the server denies relaying.
        """
        return self._run(IRecipientPolicy, "checkRecipient", session, envelope, recipient)

    def checkMessage(
        self, session: SessionView, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        """
        Ask the L{IMessagePolicy} policies, in order.  Unless they refuse,
        the server then calls L{modifyMessage}.
        """
        return self._run(IMessagePolicy, "checkMessage", session, envelope, message)

    def modify(
        self, session: SessionView, envelope: Envelope, message: Message
    ) -> Verdict | Deferred[Verdict]:
        """L{modifyMessage}, but C{CONTINUE} itself when there is no modifier to run."""
        if not self._byPhase[IMessageModifier]:
            return CONTINUE
        return self.modifyMessage(session, envelope, message)

    def modifyMessage(
        self, session: SessionView, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        """
        Run every L{IMessageModifier}, in config order, each after the
        previous one finished; called by the server once the checks of the
        end of DATA let the message through (whatever they answered).

        @return: a Deferred firing with L{CONTINUE} when all are done, or
            with C{451 4.3.0} when one raised or took longer than the
            timeout (the later ones are then not run: the message is not
            queued).  It never fails.
        """
        modifiers = self._byPhase[IMessageModifier]
        result: Deferred[Verdict] = Deferred()

        def step(index: int) -> None:
            if index == len(modifiers):
                result.callback(CONTINUE)
                return
            policy = modifiers[index]
            d = self._call(policy, "modifyMessage", (session, envelope, message))

            def done(answer: object) -> None:
                if answer is not None:
                    log.warn(
                        "{prefix}: policy {policy}: modifyMessage returned {answer!r}, "
                        "not None; ignored",
                        **idFields(session, envelope),
                        policy=self.nameOf(policy),
                        answer=answer,
                    )
                step(index + 1)

            def failed(failure: Failure) -> None:
                name = self.nameOf(policy)
                log.failure(
                    "{prefix}: policy {policy} failed in {method}; answering 451 4.3.0",
                    failure,
                    **idFields(session, envelope),
                    policy=name,
                    method="modifyMessage",
                )
                self.metrics.policyVerdict("data", name, POLICY_FAILED.action.value)
                result.callback(POLICY_FAILED)

            d.addCallbacks(done, failed)

        step(0)
        return result

    def _run(self, phase: Any, method: str, *args: Any) -> Deferred[Verdict]:
        """L{walk} as a Deferred, for callers that want one."""
        answer = self._walk(phase, method, args)
        return succeed(answer) if isinstance(answer, Verdict) else answer

    def walk(self, method: str, *args: Any) -> Verdict | Deferred[Verdict]:
        """
        Like the check method named C{method} (C{"checkSender"}, ...), but
        a verdict the policies gave at once comes back as it is, not
        wrapped in a Deferred: the session takes most verdicts on the
        spot, without the callbacks a Deferred costs per command.  The
        verdicts, logs and metrics are the same either way.
        """
        return self._walk(_PHASE_OF[method], method, args)

    def _walk(
        self, phase: Any, method: str, args: tuple[Any, ...], start: int = 0
    ) -> Verdict | Deferred[Verdict]:
        """
        Ask the policies of C{phase} in order until one answers finally.
        Verdicts given at once (most of them: the built-in checks answer
        from memory) are taken on the spot, and when all were, the result
        is the verdict itself; the first Deferred or coroutine makes it a
        Deferred, and the walk continues when it fires.
        """
        policies = self._byPhase[phase]
        label = _PHASE_NAMES[method]
        index = start
        while index < len(policies):
            answer = self._answer(policies[index], method, args)
            # Not isinstance(answer, Deferred): Deferred's ABCMeta makes
            # that check two calls dearer, on every policy of every command.
            if not isinstance(answer, Verdict):
                result: Deferred[Verdict] = Deferred()
                answer.addCallback(self._later, phase, index, method, args, result)
                return result
            if answer.final:
                return self._decided(label, policies[index], answer)
            index += 1
        self.metrics.policyVerdict(label, "none", "continue")
        return CONTINUE

    def _decided(self, label: Phase, policy: Any, verdict: Verdict) -> Verdict:
        """The final C{verdict} of C{policy}, counted, with its phase's defaults."""
        verdict = verdict.forPhase(label)
        # _value_, not .value: Enum's value property is a Python-level call.
        self.metrics.policyVerdict(label, self.nameOf(policy), verdict.action._value_)
        return verdict

    def _later(
        self,
        verdict: Verdict,
        phase: Any,
        index: int,
        method: str,
        args: tuple[Any, ...],
        result: Deferred[Verdict],
    ) -> None:
        """A policy's late answer: decide on it, or walk on from the next policy."""
        if verdict.final:
            policy = self._byPhase[phase][index]
            result.callback(self._decided(_PHASE_NAMES[method], policy, verdict))
            return
        rest = self._walk(phase, method, args, index + 1)
        if isinstance(rest, Verdict):
            result.callback(rest)
        else:
            rest.chainDeferred(result)

    def _answer(
        self, policy: Any, method: str, args: tuple[Any, ...]
    ) -> Verdict | Deferred[Verdict]:
        """
        C{policy.method(*args)} as a L{Verdict} when it answered at once,
        else as a Deferred bounded by the timeout.  What it raised, or an
        answer that is not a Verdict, counts as L{POLICY_FAILED} (logged),
        the same at once or later.
        """
        try:
            answer = getattr(policy, method)(*args)
        except Exception:
            return self._failed(Failure(), policy, method, args)
        if isinstance(answer, Verdict):
            return answer
        if not isinstance(answer, Deferred) and not inspect.isawaitable(answer):
            return self._failed(
                Failure(TypeError(f"{method} returned {answer!r}, not a Verdict")),
                policy,
                method,
                args,
            )
        return self._ask(policy, method, args, answer)

    def _failed(self, failure: Failure, policy: Any, method: str, args: tuple[Any, ...]) -> Verdict:
        log.failure(
            "{prefix}: policy {policy} failed in {method}; answering 451 4.3.0 "
            "session={session_id}",
            failure,
            policy=self.nameOf(policy),
            method=method,
            **idFields(args[0] if args else None, args[1] if len(args) > 1 else None),
        )
        return POLICY_FAILED

    def _call(
        self, policy: Any, method: str, args: tuple[Any, ...], answer: Any = _UNASKED
    ) -> Deferred[Any]:
        """
        Call C{policy.method(*args)} (or take its C{answer}, when it was
        already called): its answer, a Deferred or a coroutine, as a
        Deferred bounded by the timeout (then cancelled).
        """

        def call() -> Any:
            given = getattr(policy, method)(*args) if answer is _UNASKED else answer
            if not isinstance(given, Deferred) and inspect.isawaitable(given):
                # Any: ensureDeferred takes coroutines only; another awaitable
                # makes it raise, which counts as a policy failure.
                return ensureDeferred(cast(Any, given))
            return given

        d = maybeDeferred(call)
        if not d.called:
            # An answer given at once needs no timer (the callLater and
            # its cancel were a per-command cost).
            d.addTimeout(self.timeout, self.clock)
        return d

    def _ask(
        self, policy: Any, method: str, args: tuple[Any, ...], answer: Any
    ) -> Deferred[Verdict]:
        """C{answer}, a Deferred or an awaitable, checked as L{_answer} checks a verdict."""
        d = self._call(policy, method, args, answer)

        def check(verdict: Any) -> Verdict:
            if not isinstance(verdict, Verdict):
                raise TypeError(f"{method} returned {verdict!r}, not a Verdict")
            return verdict

        d.addCallback(check)
        d.addErrback(self._failed, policy, method, args)
        return d


def _ownName(policy: Any) -> str:
    """A policy's name outside a registry: its C{name}, or its class's."""
    name = getattr(policy, "name", None)
    return name if isinstance(name, str) and name else type(policy).__name__


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


Named = Mapping[str, Any]
"""Policies by their names in the chain (L{PolicyChain.names}, or a part of it)."""


def startPolicies(policies: Named, reactor: IReactorTime) -> Deferred[None]:
    """Call C{startPolicy} on those that have it; failures are logged."""
    return _each(policies, lambda p: p.startPolicy(reactor), "startPolicy")


def stopPolicies(policies: Named) -> Deferred[None]:
    """Call C{stopPolicy} on those that have it; failures are logged."""
    return _each(policies, lambda p: p.stopPolicy(), "stopPolicy")


def _logFailure(failure: Failure, name: str, method: str) -> None:
    log.failure("policy {policy} failed in {method}", failure, policy=name, method=method)


def _each(policies: Named, call: Callable[[Any], Any], method: str) -> Deferred[None]:
    from twisted.internet.defer import gatherResults

    ds = []
    for name, policy in policies.items():
        if not IPolicyLifecycle.providedBy(policy):
            continue
        d = maybeDeferred(call, policy)
        d.addErrback(_logFailure, name, method)
        ds.append(d)
    return gatherResults(ds).addCallback(lambda _: None)


def loadPolicies(
    config: Config, previous: PolicyChain | None = None, reactor: IReactorTime | None = None
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """
    Build the configured policies, in chain order, through entry points.

    Only the named entry points are imported.  With C{previous} (a reload),
    a policy whose name and options are unchanged is kept as it is, so that
    its state (rate-limit counters, open connections) survives; it is
    asked to L{IReloadable.reload} its files by the caller.

    @param reactor: the reactor the policies get in their L{PolicyContext};
        the global one when None.
    @return: the policies and their options by name (chain order: the
        names of L{PolicyChain.names}).

    @raise ConfigError: unknown name (listing the installed ones), a class
        that fails to import, does not provide a phase interface or fails
        C{verifyObject}, or a bad option.
    """
    installed = installedPolicies()
    if reactor is None:
        reactor = _globalReactor()
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
                f"policy {name!r} ({ep.value}) has no fromConfig(options, context) "
                "to build it with",
            )
        try:
            context = PolicyContext(config.path, config.hostname, name, reactor)
            policy = buildPolicy(factory, copy.deepcopy(options), context, ep.value)
        except PolicyOptionError as e:
            raise ConfigError(config.path, f"{key}.{e.key}", e.problem) from None
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(config.path, key, str(e)) from None
        provided = list(providedBy(policy).flattened())
        phases = [p for p in ROLES if p in provided]
        if not phases:
            raise ConfigError(
                config.path,
                "policy.chain",
                f"policy {name!r} provides none of the policy interfaces",
            )
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
