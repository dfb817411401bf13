"""
L{PolicyChain}'s walk through one phase, for every form an answer can
take: a L{Verdict} at once (taken on the spot), a Deferred that fires
later, a coroutine, a Deferred that fails, an exception, something that is
not a Verdict, and no answer within the timeout.  Each gives the same
verdict, log and metric however it came.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from relayd.address import Address
from relayd.envelope import Envelope, Session
from relayd.interfaces import IMessageModifier, IMessagePolicy, IRecipientPolicy
from relayd.policy import PolicyChain
from relayd.verdict import CONTINUE, Action, reject


class Recorder:
    """The chain's metrics: every (phase, policy, action) counted."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, str, str]] = []

    def policyVerdict(self, phase: str, policy: str, action: str) -> None:
        self.verdicts.append((phase, policy, action))

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@implementer(IRecipientPolicy)
class Answers:
    """A recipient policy answering with whatever C{make} returns."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.asked = 0

    def checkRecipient(self, session: Any, envelope: Any, recipient: Any) -> Any:
        self.asked += 1
        return self.make()


class WalkTests(unittest.TestCase):
    def chain(self, *policies: Answers) -> PolicyChain:
        self.clock = Clock()
        options = {f"p{i}": {} for i in range(len(policies))}
        chain = PolicyChain(list(policies), 5.0, self.clock, options)
        self.recorder = Recorder()
        chain.metrics = self.recorder  # type: ignore[assignment]
        return chain

    def ask(self, chain: PolicyChain) -> defer.Deferred[Any]:
        session = Session(ipaddress.ip_address("192.0.2.1"), 50000, "relay", "relay", "S1")
        envelope = Envelope(Address("a", "example.org"), queueId="Q1")
        return chain.checkRecipient(session, envelope, Address("b", "example.net"))

    def failures(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_atOnceInOrder(self) -> None:
        """CONTINUE passes on at once; the first final verdict ends the walk."""
        first, second, third = (
            Answers(lambda: CONTINUE),
            Answers(reject),
            Answers(lambda: CONTINUE),
        )
        d = self.ask(self.chain(first, second, third))
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual((first.asked, second.asked, third.asked), (1, 1, 0))
        self.assertEqual(len(self.recorder.verdicts), 1)
        self.assertEqual(self.recorder.verdicts[0][2], Action.REJECT.value)

    def test_nobodyDecides(self) -> None:
        d = self.ask(self.chain(Answers(lambda: CONTINUE), Answers(lambda: CONTINUE)))
        self.assertIs(self.successResultOf(d), CONTINUE)
        self.assertEqual(self.recorder.verdicts[0][1:], ("none", CONTINUE.action.value))

    def test_laterThenAtOnce(self) -> None:
        """A Deferred holds the walk until it fires; the next policy is asked only then."""
        pending: defer.Deferred[Any] = defer.Deferred()
        first, second = Answers(lambda: pending), Answers(reject)
        d = self.ask(self.chain(first, second))
        self.assertNoResult(d)
        self.assertEqual(second.asked, 0)
        pending.callback(CONTINUE)
        self.assertEqual(self.successResultOf(d).action, Action.REJECT)
        self.assertEqual(second.asked, 1)

    def test_coroutine(self) -> None:
        async def decide() -> Any:
            return reject()

        d = self.ask(self.chain(Answers(lambda: CONTINUE), Answers(decide)))
        self.assertEqual(self.successResultOf(d).action, Action.REJECT)

    def test_failuresAre451(self) -> None:
        """Raising, failing later, or answering something else: 451 4.3.0, logged."""

        def raises() -> Any:
            raise RuntimeError("at once")

        for make in (
            raises,
            lambda: defer.fail(RuntimeError("later")),
            lambda: None,
            lambda: defer.succeed("not a verdict"),
        ):
            events = self.failures()
            behind = Answers(reject)
            d = self.ask(self.chain(Answers(make), behind))
            verdict = self.successResultOf(d)
            self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (451, "4.3.0"))
            self.assertEqual(behind.asked, 0)
            [failed] = [e for e in events if e.get("log_failure") is not None]
            self.assertEqual(failed["policy"], "p0")
            self.assertEqual(failed["queue_id"], "Q1")
            self.flushLoggedErrors(RuntimeError, TypeError)

    def walk(self, chain: PolicyChain) -> Any:
        session = Session(ipaddress.ip_address("192.0.2.1"), 50000, "relay", "relay", "S1")
        envelope = Envelope(Address("a", "example.org"), queueId="Q1")
        return chain.walk("checkRecipient", session, envelope, Address("b", "example.net"))

    def test_walkAtOnceIsTheVerdict(self) -> None:
        """
        walk() gives the verdict itself when every policy answered at
        once (the session then takes it on the spot), with the same
        metric as the Deferred form.
        """
        verdict = self.walk(self.chain(Answers(lambda: CONTINUE), Answers(reject)))
        self.assertNotIsInstance(verdict, defer.Deferred)
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual(verdict.reply.enhanced, "5.7.1")  # the rcpt phase's default
        self.assertEqual(self.recorder.verdicts, [("rcpt", "p1", "reject")])
        self.assertIs(self.walk(self.chain(Answers(lambda: CONTINUE))), CONTINUE)
        self.assertEqual(self.recorder.verdicts, [("rcpt", "none", "continue")])

    def test_walkLaterIsADeferred(self) -> None:
        """
        One late answer makes walk() a Deferred; the policies after it are
        asked when it fires, at once ones included, and the verdict and
        metric are those of the at-once walk.
        """
        pending: defer.Deferred[Any] = defer.Deferred()
        first, second, third = (
            Answers(lambda: CONTINUE),
            Answers(lambda: pending),
            Answers(reject),
        )
        d = self.walk(self.chain(first, second, third))
        self.assertIsInstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual(third.asked, 0)
        pending.callback(CONTINUE)
        self.assertEqual(self.successResultOf(d).action, Action.REJECT)
        self.assertEqual(self.recorder.verdicts, [("rcpt", "p2", "reject")])

    def test_walkTwoLate(self) -> None:
        """A late answer after a late answer: the walk goes on from each."""
        answers = [defer.Deferred(), defer.Deferred()]
        first, second = Answers(lambda: answers[0]), Answers(lambda: answers[1])
        d = self.walk(self.chain(first, second))
        answers[0].callback(CONTINUE)
        self.assertNoResult(d)
        answers[1].callback(reject())
        self.assertEqual(self.successResultOf(d).action, Action.REJECT)
        self.assertEqual(self.recorder.verdicts, [("rcpt", "p1", "reject")])

    def test_timeout(self) -> None:
        """No answer within the timeout: 451 4.3.0; only pending answers get a timer."""
        d = self.ask(self.chain(Answers(lambda: CONTINUE), Answers(defer.Deferred)))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d).reply.enhanced, "4.3.0")
        self.flushLoggedErrors(defer.TimeoutError)


@implementer(IMessageModifier)
class Modifier:
    name = "modifier"

    def modifyMessage(self, session: Any, envelope: Any, message: Any) -> None:
        return None


@implementer(IMessagePolicy)
class Checker:
    name = "checker"

    def checkMessage(self, session: Any, envelope: Any, message: Any) -> Any:
        return CONTINUE


def test_modifyWithoutModifiers() -> None:
    """modify() is CONTINUE itself with no modifier, and modifyMessage's Deferred with one."""
    clock = Clock()
    assert PolicyChain([Checker()], 5.0, clock).modify(None, None, None) is CONTINUE  # type: ignore[arg-type]
    d = PolicyChain([Modifier()], 5.0, clock).modify(None, None, None)  # type: ignore[arg-type]
    assert isinstance(d, defer.Deferred)
    assert d.result is CONTINUE


def test_readsMessages() -> None:
    """
    Whether a policy may read the message file before the commit (the
    server then writes it out first; otherwise the commit writes it with
    its record in one go).
    """
    clock = Clock()
    assert not PolicyChain([Answers(lambda: CONTINUE)], 5.0, clock).readsMessages
    assert PolicyChain([Answers(lambda: CONTINUE), Modifier()], 5.0, clock).readsMessages
    assert PolicyChain([Checker()], 5.0, clock).readsMessages
