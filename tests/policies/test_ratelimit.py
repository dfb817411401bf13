"""
The C{ratelimit} policy over real SMTP sessions (relayd in-process on
127.0.0.1, clients in threads), its counter stores (in memory, and a real
C{redis-server}), and its config errors.
"""

import base64
import ipaddress
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import time

import pytest
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relayd.address import Address
from relayd.config import ConfigError, load
from relayd.envelope import Session
from relayd.interfaces import IMessagePolicy, IRateCounterStore, IRecipientPolicy
from relayd.policies.ratecounter import (
    MemoryStore,
    RateStoreError,
    RedisStore,
    withoutPassword,
)
from relayd.policies.ratelimit import RateLimit, Rule, parseLimit
from relayd.policy import PolicyChain, PolicyContext
from relayd.service import buildService
from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    InProcessRelayd,
    RedisServer,
    TestSetup,
    WireClient,
    freePort,
)
from relayd.verdict import CONTINUE, reject

CONTEXT = PolicyContext("relayd.toml", "relayd.test", "ratelimit")

CHAIN = ["ratelimit", "mynetworks", "authenticated"]
BODY = b"Subject: rate\r\n\r\nhello\r\n"
RESET = re.compile(r"; next in at most (\d+) s$")


def plain(user=DEMO_USER, password=DEMO_PASSWORD):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class SourceClient(WireClient):
    """An L{WireClient} connecting from a chosen loopback address."""

    def __init__(self, port, source):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        )
        self._buf = b""


def transaction(c, sender, recipients, body=BODY):
    """
    One mail transaction on an open session: MAIL, each RCPT, then DATA if
    a recipient was accepted (else RSET).  Returns the replies as
    C{{"mail": (code, text), "rcpt": [...], "data": (code, text) | None}}.
    """

    def text(reply):
        return reply[0], " ".join(reply[1])

    result = {"mail": text(c.command(f"MAIL FROM:<{sender}>")), "rcpt": [], "data": None}
    if result["mail"][0] != 250:
        return result
    for recipient in recipients:
        result["rcpt"].append(text(c.command(f"RCPT TO:<{recipient}>")))
    if not any(code == 250 for code, _ in result["rcpt"]):
        c.command("RSET")
        return result
    code, _ = c.command("DATA")
    assert code == 354, code
    c.send(body + b".\r\n")
    result["data"] = text(c.reply())
    return result


@implementer(IRecipientPolicy)
class DenyDomain:
    """Refuses recipients at one domain: a later policy in the chain."""

    name = "denydomain"

    def __init__(self, domain):
        self.domain = domain

    def checkRecipient(self, session, envelope, recipient):
        if recipient.domainLower == self.domain:
            return reject(550, "5.1.1", "No such user here")
        return CONTINUE


@implementer(IMessagePolicy)
class RefuseMessages:
    """Refuses every message at the end of DATA, after ratelimit."""

    name = "refuse"

    def checkMessage(self, session, envelope, message):
        return reject(554, "5.7.1", "Message refused by a later policy")


class RateLimitCase(unittest.TestCase):
    """
    Starts relayd in-process with the ratelimit policy first in the chain.

    @cvar options: the C{[policies.ratelimit]} table.
    @cvar mynetworks: the C{[policies.mynetworks]} table.
    """

    options: dict = {}
    mynetworks: dict = {}
    sections: dict = {}
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relayd = yield self.startRelayd(self.options)

    def startRelayd(self, options, sections=None):
        directory = tempfile.mkdtemp(prefix="relayd-rl-")
        self.addCleanup(shutil.rmtree, directory, True)
        policies = {"ratelimit": options}
        if self.mynetworks:
            policies["mynetworks"] = self.mynetworks
        setup = TestSetup(
            directory, sections=sections or self.sections, chain=CHAIN, policies=policies
        )
        self.setup = setup
        d = InProcessRelayd.start(setup)

        def started(relayd):
            relayd.setup = setup
            self.addCleanup(relayd.stop)
            return relayd

        return d.addCallback(started)

    def policy(self, relayd=None):
        policy = (relayd or self.relayd).service.policies.chain.policies[0]
        assert isinstance(policy, RateLimit)
        return policy

    def useChain(self, *policies, relayd=None):
        relayd = relayd or self.relayd
        chain = PolicyChain(policies, 30.0, reactor)
        relayd.service.policies.chain = chain
        for factory in relayd.service.factories:
            factory.chain = chain

    def connect(self, mode="relay", source="127.0.0.1", relayd=None):
        relayd = relayd or self.relayd
        c = SourceClient(relayd.port(mode), source)
        self.addCleanup(c.close)
        assert c.reply()[0] == 220
        assert c.command("EHLO client.test")[0] == 250
        return c

    def connectUser(self, relayd=None):
        """A submission session authenticated (AUTH PLAIN over STARTTLS)."""
        relayd = relayd or self.relayd
        c = self.connect("submission", relayd=relayd)
        assert c.command("STARTTLS")[0] == 220
        c.starttls(relayd.setup.clientContext())
        assert c.command("EHLO client.test")[0] == 250
        code, lines = c.command("AUTH PLAIN " + plain())
        assert code == 235, (code, lines)
        return c

    def run_(self, f, *args):
        return deferToThread(f, *args)

    def key(self, rule, kind, window, value, now=None):
        return f"{{relayd:rl:}}{rule}:{kind}:{window}:{value}"

    def logged(self, words):
        lines = [formatEvent(e) for e in self.events]
        return [line for line in lines if all(w in line for w in words)]


class PerUserTests(RateLimitCase):
    options = {
        "rules": [
            {
                "name": "per-user",
                "key": "user",
                "messages": ["2/hour", "1000/day"],
                "recipients": ["3/hour"],
            }
        ]
    }

    @defer.inlineCallbacks
    def test_messagesPerUser(self):
        """
        The third message of an authenticated user within the hour is
        refused at MAIL with 450 4.7.1, saying which limit and when it
        resets; an unauthenticated session is not counted under any user.
        """

        def dialogue():
            c = self.connectUser()
            first = transaction(c, "demo@example.org", ["a@example.net"])
            second = transaction(c, "demo@example.org", ["b@example.net"])
            third = transaction(c, "demo@example.org", ["c@example.net"])
            other = transaction(self.connect(), "x@example.org", ["d@example.net"])
            return first, second, third, other

        first, second, third, other = yield self.run_(dialogue)
        self.assertEqual(first["data"][0], 250)
        self.assertEqual(second["data"][0], 250)
        code, text = third["mail"]
        self.assertEqual(code, 450)
        self.assertTrue(
            text.startswith(
                "4.7.1 Rate limit exceeded: per-user allows 2 messages per hour for user demo; "
            ),
            text,
        )
        # 2 per hour: one more every 1800 s.
        self.assertEqual(int(RESET.search(text).group(1)), 1800)
        self.assertEqual(other["data"][0], 250)
        store = self.policy().store
        self.assertEqual(store.value(self.key("per-user", "m", 3600, "demo")), 2)
        self.assertEqual(store.value(self.key("per-user", "m", 86400, "demo")), 2)
        self.assertEqual(store.value(self.key("per-user", "r", 3600, "demo")), 2)
        self.assertTrue(self.logged(["rate limit exceeded at MAIL", "per-user", "demo"]))

    @defer.inlineCallbacks
    def test_recipientsPerUser(self):
        """
        The fourth recipient within the hour gets 452 4.5.3 and the message
        goes to the three others; the next transaction's first recipient is
        refused too.
        """

        def dialogue():
            c = self.connectUser()
            first = transaction(
                c,
                "demo@example.org",
                ["a@example.net", "b@example.net", "c@example.net", "d@example.net"],
            )
            second = transaction(c, "demo@example.org", ["e@example.net"])
            return first, second

        first, second = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in first["rcpt"]], [250, 250, 250, 452])
        text = first["rcpt"][3][1]
        self.assertTrue(
            text.startswith(
                "4.5.3 Too many recipients: per-user allows 3 recipients per hour for user demo; "
                "next in at most 1200 s"
            ),
            text,
        )
        self.assertEqual(first["data"][0], 250)
        spooled = [self.relayd.spool.load(q) for q in self.relayd.spool.entries("incoming")]
        self.assertEqual(len(spooled), 1)
        self.assertEqual(second["rcpt"][0][0], 452)
        self.assertEqual(
            self.policy().store.value(self.key("per-user", "r", 3600, "demo")),
            3,
        )
        self.assertEqual(self.policy().store.value(self.key("per-user", "m", 3600, "demo")), 1)


class PerClientTests(RateLimitCase):
    options = {
        "rules": [
            {
                "name": "per-net",
                "key": "client",
                "prefix_v4": 24,
                "prefix_v6": 64,
                "messages": ["2/hour"],
            }
        ]
    }

    @defer.inlineCallbacks
    def test_networkSharesLimit(self):
        """
        Clients in one /24 share the limit; another /24 has its own.
        """

        def dialogue():
            one = transaction(self.connect(source="127.0.0.1"), "a@example.org", ["x@example.net"])
            two = transaction(self.connect(source="127.0.0.2"), "a@example.org", ["x@example.net"])
            three = transaction(
                self.connect(source="127.0.0.2"), "b@example.org", ["x@example.net"]
            )
            other = transaction(
                self.connect(source="127.0.1.1"), "a@example.org", ["x@example.net"]
            )
            return one, two, three, other

        one, two, three, other = yield self.run_(dialogue)
        self.assertEqual((one["data"][0], two["data"][0]), (250, 250))
        self.assertEqual(three["mail"][0], 450)
        self.assertIn(
            "per-net allows 2 messages per hour for client network 127.0.0.0/24;",
            three["mail"][1],
        )
        self.assertEqual(other["data"][0], 250)
        store = self.policy().store
        self.assertEqual(store.value(self.key("per-net", "m", 3600, "127.0.0.0/24")), 2)
        self.assertEqual(store.value(self.key("per-net", "m", 3600, "127.0.1.0/24")), 1)

    @defer.inlineCallbacks
    def test_peekAtMailChargesNothing(self):
        """MAIL only looks: transactions given up before DATA cost nothing."""

        def dialogue():
            c = self.connect()
            for _ in range(5):
                assert c.command("MAIL FROM:<a@example.org>")[0] == 250
                assert c.command("RSET")[0] == 250
            return [transaction(c, "a@example.org", ["x@example.net"]) for _ in range(3)]

        results = yield self.run_(dialogue)
        self.assertEqual([r["data"][0] for r in results[:2]], [250, 250])
        self.assertEqual(results[2]["mail"][0], 450)

    @defer.inlineCallbacks
    def test_limitReachedDuringTransaction(self):
        """
        When another session takes the last message of the window after
        this one's MAIL, this one is refused at the end of DATA (450 4.7.1)
        and its recipients are given back.
        """
        store = self.policy().store
        store.reserve([(self.key("per-net", "m", 3600, "127.0.0.0/24"), 1, 2, 3600)])

        def dialogue():
            a = self.connect()
            assert a.command("MAIL FROM:<a@example.org>")[0] == 250
            assert a.command("RCPT TO:<x@example.net>")[0] == 250
            b = transaction(self.connect(), "b@example.org", ["y@example.net"])
            assert a.command("DATA")[0] == 354
            a.send(BODY + b".\r\n")
            return b, a.reply()

        b, (code, lines) = yield self.run_(dialogue)
        self.assertEqual(b["data"][0], 250)
        self.assertEqual((code, lines[0][:5]), (450, "4.7.1"))
        self.assertIn("per-net allows 2 messages per hour", lines[0])
        self.assertEqual(store.value(self.key("per-net", "m", 3600, "127.0.0.0/24")), 2)
        self.assertEqual(len(self.relayd.spool.entries("incoming")), 1)


class SenderDomainTests(RateLimitCase):
    options = {
        "rules": [
            {"name": "domain", "key": "sender_domain", "recipients": ["2/hour"]},
            {"name": "sender", "key": "sender", "messages": ["5/hour"]},
        ]
    }

    @defer.inlineCallbacks
    def test_perSenderDomain(self):
        """
        Senders of one domain (any case) share its limit, another domain
        has its own, and the null sender is not counted.
        """

        def dialogue():
            c = self.connect()
            return [
                transaction(c, "alice@example.org", ["x@example.net"]),
                transaction(c, "bob@EXAMPLE.org", ["y@example.net"]),
                transaction(c, "carol@example.org", ["z@example.net"]),
                transaction(c, "dave@other.example", ["x@example.net"]),
                transaction(c, "", ["a@example.net", "b@example.net", "c@example.net"]),
            ]

        alice, bob, carol, dave, bounce = yield self.run_(dialogue)
        self.assertEqual((alice["data"][0], bob["data"][0]), (250, 250))
        code, text = carol["rcpt"][0]
        self.assertEqual(code, 452)
        self.assertIn("domain allows 2 recipients per hour for sender domain example.org;", text)
        self.assertEqual(dave["data"][0], 250)
        self.assertEqual([code for code, _ in bounce["rcpt"]], [250, 250, 250])
        self.assertEqual(bounce["data"][0], 250)
        store = self.policy().store
        self.assertEqual(store.value(self.key("domain", "r", 3600, "example.org")), 2)
        self.assertEqual(store.value(self.key("sender", "m", 3600, "bob@example.org")), 1)
        self.assertEqual(store.value(self.key("sender", "m", 3600, "carol@example.org")), 0)


class NotChargedTests(RateLimitCase):
    """Transactions that do not end with a queued message cost nothing."""

    mynetworks = {"networks": ["127.0.0.1/32"]}
    options = {
        "rules": [
            {
                "name": "net",
                "key": "client",
                "prefix_v4": 8,
                "messages": ["3/hour"],
                "recipients": ["2/hour"],
            }
        ]
    }

    def counts(self):
        store = self.policy().store
        return (
            store.value(self.key("net", "m", 3600, "127.0.0.0/8")),
            store.value(self.key("net", "r", 3600, "127.0.0.0/8")),
        )

    @defer.inlineCallbacks
    def test_relayDeniedNotCharged(self):
        """
        Recipients refused by a later policy (relay denied) are given back
        at once: five of them in one transaction all get 554, never 452,
        and the trusted client still has its whole limit.
        """

        def dialogue():
            denied = transaction(
                self.connect(source="127.0.0.2"),
                "a@example.org",
                [f"r{i}@example.net" for i in range(5)],
            )
            trusted = transaction(
                self.connect(source="127.0.0.1"),
                "a@example.org",
                ["x@example.net", "y@example.net", "z@example.net"],
            )
            return denied, trusted

        denied, trusted = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in denied["rcpt"]], [554] * 5)
        self.assertEqual([code for code, _ in trusted["rcpt"]], [250, 250, 452])
        self.assertEqual(trusted["data"][0], 250)
        self.assertEqual(self.counts(), (1, 2))

    @defer.inlineCallbacks
    def test_refusedRecipientGivenBackWhenQueued(self):
        """
        A message queued for some recipients keeps only their charge: the
        one refused after ratelimit reserved it is given back.
        """
        policy = self.policy()
        self.useChain(
            policy, DenyDomain("denied.test"), *self.relayd.service.policies.chain.policies[1:]
        )

        def dialogue():
            c = self.connect()
            return transaction(c, "a@example.org", ["x@example.net", "y@denied.test"])

        result = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in result["rcpt"]], [250, 550])
        self.assertEqual(result["data"][0], 250)
        self.assertEqual(self.counts(), (1, 1))

    @defer.inlineCallbacks
    def test_rsetNotCharged(self):
        def dialogue():
            c = self.connect()
            assert c.command("MAIL FROM:<a@example.org>")[0] == 250
            assert c.command("RCPT TO:<x@example.net>")[0] == 250
            assert c.command("RCPT TO:<y@example.net>")[0] == 250
            during = self.counts()
            assert c.command("RSET")[0] == 250
            return during, self.counts()

        during, after = yield self.run_(dialogue)
        self.assertEqual(during, (0, 2))
        self.assertEqual(after, (0, 0))

    @defer.inlineCallbacks
    def test_repeatedRecipientChargedOnce(self):
        def dialogue():
            return transaction(
                self.connect(), "a@example.org", ["x@example.net", "x@example.net", "y@example.net"]
            )

        result = yield self.run_(dialogue)
        self.assertEqual([code for code, _ in result["rcpt"]], [250, 250, 250])
        self.assertEqual(self.counts(), (1, 2))

    @defer.inlineCallbacks
    def test_messageRefusedAtDataNotCharged(self):
        """
        A message the server refuses at the end of DATA (bare LF), or that
        a later message policy refuses, costs neither message nor
        recipients; the client leaving mid-transaction neither.
        """

        def bareLF():
            return transaction(self.connect(), "a@example.org", ["x@example.net"], b"a\nb\r\n")

        result = yield self.run_(bareLF)
        self.assertEqual(result["data"][0], 550)
        self.assertEqual(self.counts(), (0, 0))

        policy = self.policy()
        self.useChain(policy, *self.relayd.service.policies.chain.policies[1:], RefuseMessages())

        def refused():
            return transaction(self.connect(), "a@example.org", ["x@example.net"])

        result = yield self.run_(refused)
        self.assertEqual(result["data"][0], 554)
        self.assertEqual(self.counts(), (0, 0))

        def leave():
            c = self.connect()
            assert c.command("MAIL FROM:<a@example.org>")[0] == 250
            assert c.command("RCPT TO:<x@example.net>")[0] == 250
            c.close()

        yield self.run_(leave)
        for _ in range(500):
            if not self.relayd.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.counts(), (0, 0))


class ResetTests(RateLimitCase):
    options = {"rules": [{"name": "short", "key": "client", "messages": ["1/3s"]}]}

    @defer.inlineCallbacks
    def test_limitResets(self):
        """
        The reply says when the window ends, and from then on the client
        may send again.  (The one test with a window short enough to see.)
        """

        def dialogue():
            c = self.connect()
            for _ in range(5):
                first = transaction(c, "a@example.org", ["x@example.net"])
                second = transaction(c, "a@example.org", ["x@example.net"])
                if second["mail"][0] == 450:
                    break  # both in one window (else the window rolled over)
            else:
                raise AssertionError("never two transactions within one window")
            reset = int(RESET.search(second["mail"][1]).group(1))
            time.sleep(reset + 0.2)
            return first, second, reset, transaction(c, "a@example.org", ["x@example.net"])

        first, second, reset, third = yield self.run_(dialogue)
        self.assertEqual(first["data"][0], 250)
        self.assertIn("short allows 1 message per 3 s for client 127.0.0.1;", second["mail"][1])
        self.assertEqual(reset, 3)
        self.assertEqual(third["data"][0], 250)


class RedisCase(RateLimitCase):
    """With a real redis-server started for each test."""

    rules = [
        {
            "name": "per-user",
            "key": "user",
            "messages": ["2/hour", "1000/day"],
            "recipients": ["10/hour"],
        },
        {"name": "per-client", "key": "client", "messages": ["3/hour"]},
    ]
    onError: str | None = "accept"
    """C{on_error} as configured; None leaves it out (the default)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        self.options = {
            "backend": "redis",
            "redis_url": self.redis.url,
            "redis_timeout": 2.0,
            "rules": self.rules,
        }
        if self.onError is not None:
            self.options["on_error"] = self.onError
        yield RateLimitCase.setUp(self)

    def get(self, key):
        """The units limiter C{key} (as made by L{key}) holds now."""
        rule, kind, window, _ = key.split("}", 1)[1].split(":", 3)
        table = next(r for r in self.rules if r["name"] == rule)
        specs = table["messages" if kind == "m" else "recipients"]
        limit = next(parseLimit(x) for x in specs if parseLimit(x).window == int(window))
        return self.policy().store.used(key, limit.count, limit.window)


class RedisTests(RedisCase):
    @defer.inlineCallbacks
    def test_perUserInRedis(self):
        """
        Counters live in Redis under keys naming rule, kind, window, window
        start and key, each expiring when its window ends.
        """

        def dialogue():
            c = self.connectUser()
            return [
                transaction(c, "demo@example.org", ["a@example.net", "b@example.net"])
                for _ in range(3)
            ]

        first, second, third = yield self.run_(dialogue)
        self.assertEqual((first["data"][0], second["data"][0]), (250, 250))
        self.assertEqual(third["mail"][0], 450)
        self.assertIn("per-user allows 2 messages per hour for user demo;", third["mail"][1])
        now = time.time()
        hour = self.key("per-user", "m", 3600, "demo", now)
        day = self.key("per-user", "m", 86400, "demo", now)
        rcpt = self.key("per-user", "r", 3600, "demo", now)
        self.assertEqual((self.get(hour), self.get(day), self.get(rcpt)), (2, 2, 4))
        # Each key expires when its limiter is at rest: units * interval.
        for key, ms in ((hour, 2 * 1800_000), (day, 2 * 86_400), (rcpt, 4 * 360_000)):
            ttl = self.client.pttl(key)
            self.assertGreater(ttl, ms - 60_000)
            self.assertLessEqual(ttl, ms)
        self.assertEqual(self.get(self.key("per-client", "m", 3600, "127.0.0.1", now)), 2)

    @defer.inlineCallbacks
    def test_rsetGivesBackInRedis(self):
        def dialogue():
            c = self.connectUser()
            assert c.command("MAIL FROM:<demo@example.org>")[0] == 250
            assert c.command("RCPT TO:<a@example.net>")[0] == 250
            during = self.get(self.key("per-user", "r", 3600, "demo"))
            assert c.command("RSET")[0] == 250
            return during

        during = yield self.run_(dialogue)
        yield self.policy().whenIdle()
        self.assertEqual(during, 1)
        self.assertEqual(self.get(self.key("per-user", "r", 3600, "demo")), 0)

    @defer.inlineCallbacks
    def test_twoInstancesShareOneLimit(self):
        """
        Two relayd instances (own spools) using one Redis enforce one
        per-client limit between them.
        """
        other = yield self.startRelayd(self.options)

        def dialogue():
            results = []
            for relayd in (self.relayd, other, self.relayd, other, self.relayd):
                c = self.connect(relayd=relayd)
                results.append(transaction(c, "a@example.org", ["x@example.net"]))
            return results

        results = yield self.run_(dialogue)
        self.assertEqual([r["data"][0] for r in results[:3]], [250, 250, 250])
        self.assertEqual([r["mail"][0] for r in results[3:]], [450, 450])
        self.assertIn("per-client allows 3 messages per hour", results[3]["mail"][1])
        self.assertEqual(len(self.relayd.spool.entries("incoming")), 2)
        self.assertEqual(len(other.spool.entries("incoming")), 1)
        self.assertEqual(self.get(self.key("per-client", "m", 3600, "127.0.0.1")), 3)

    @defer.inlineCallbacks
    def test_redisDownFailOpen(self):
        """
        on_error = "accept": with Redis stopped, mail flows and an error is
        logged; once Redis is back, counting starts again.
        """
        self.redis.halt()

        def send():
            return transaction(self.connect(), "a@example.org", ["x@example.net"])

        result = yield self.run_(send)
        self.assertEqual(result["data"][0], 250)
        self.assertTrue(self.logged(["ratelimit store failed at MAIL", "accepting"]))
        self.assertTrue(self.logged(["ratelimit store failed at DATA", "accepting"]))
        self.redis.start()
        result = yield self.run_(send)
        self.assertEqual(result["data"][0], 250)
        self.assertEqual(self.get(self.key("per-client", "m", 3600, "127.0.0.1")), 1)

    @defer.inlineCallbacks
    def test_releaseFailureLogged(self):
        """Redis gone before a release: an error line, the session goes on."""

        def reserve():
            c = self.connectUser()
            assert c.command("MAIL FROM:<demo@example.org>")[0] == 250
            assert c.command("RCPT TO:<a@example.net>")[0] == 250
            return c

        c = yield self.run_(reserve)
        self.redis.halt()
        code, _ = yield self.run_(c.command, "RSET")
        yield self.policy().whenIdle()
        self.assertEqual(code, 250)
        self.assertTrue(self.logged(["ratelimit could not give back 1 counter(s)", "Redis"]))


class RedisDefaultTests(RedisCase):
    onError = None

    @defer.inlineCallbacks
    def test_redisDownFailsClosedByDefault(self):
        """
        Without on_error, a Redis outage does not lift the limits: MAIL
        gets 451 4.3.0 and nothing is queued uncounted.
        """
        self.redis.halt()

        def send():
            return transaction(self.connect(), "a@example.org", ["x@example.net"])

        result = yield self.run_(send)
        self.assertEqual(result["mail"][0], 451)
        self.assertTrue(result["mail"][1].startswith("4.3.0 "), result["mail"][1])
        self.assertEqual(self.relayd.spool.entries("incoming"), [])
        self.assertTrue(self.logged(["ratelimit store failed at MAIL", "451 4.3.0"]))


class RedisFailClosedTests(RedisCase):
    onError = "tempfail"

    @defer.inlineCallbacks
    def test_redisDownFailClosed(self):
        """on_error = "tempfail": with Redis stopped, 451 4.3.0 at MAIL."""
        self.redis.halt()

        def send():
            return transaction(self.connect(), "a@example.org", ["x@example.net"])

        result = yield self.run_(send)
        self.assertEqual(result["mail"][0], 451)
        self.assertTrue(result["mail"][1].startswith("4.3.0 "), result["mail"][1])
        self.assertTrue(self.logged(["ratelimit store failed at MAIL", "451 4.3.0"]))
        self.redis.start()
        result = yield self.run_(send)
        self.assertEqual(result["data"][0], 250)

    @defer.inlineCallbacks
    def test_silentRedisTimesOut(self):
        """
        A Redis that accepts connections but never answers: every call
        ends within the timeout (no retries), and the client gets 451.
        """
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(50)
        self.addCleanup(silent.close)
        options = dict(self.options)
        options["redis_url"] = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        options["redis_timeout"] = 0.3
        relayd = yield self.startRelayd(options)

        def send():
            start = time.monotonic()
            result = transaction(self.connect(relayd=relayd), "a@example.org", ["x@example.net"])
            return result, time.monotonic() - start

        result, elapsed = yield self.run_(send)
        self.assertEqual(result["mail"][0], 451)
        self.assertLess(elapsed, 15)
        # One connection, one try: redis-py's default would retry (with
        # backoff), each try a new connection after the timeout.
        silent.setblocking(False)
        tries = 0
        while True:
            try:
                connection, _ = silent.accept()
            except BlockingIOError:
                break
            connection.close()
            tries += 1
        self.assertEqual(tries, 1)


class RedisSlowTests(RedisCase):
    """
    A Redis slower than the chain's policy timeout (the process is
    stopped with SIGSTOP, then continued): the RCPT gets 451 from the
    chain, and the reservation that completes afterwards is still given
    back.
    """

    rules = [{"name": "per-client", "key": "client", "recipients": ["10/hour"]}]
    sections = {"policy": {"timeout": 1}}

    def setUp(self):
        d = RedisCase.setUp(self)
        self.options["redis_timeout"] = 30.0
        return d

    def pause(self):
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        self.addCleanup(self.resume)

    def resume(self):
        if self.redis.running:
            os.kill(self.redis.process.pid, signal.SIGCONT)

    def count(self):
        return self.get(self.key("per-client", "r", 3600, "127.0.0.1"))

    @defer.inlineCallbacks
    def test_lateReservationGivenBack(self):
        c = yield self.run_(self.connect)
        yield self.run_(c.command, "MAIL FROM:<a@example.org>")
        self.pause()
        code, lines = yield self.run_(c.command, "RCPT TO:<x@example.net>")
        self.assertEqual((code, lines[0][:5]), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(defer.TimeoutError)), 1)
        self.resume()
        yield self.policy().whenIdle()
        self.assertEqual(self.count(), 1)  # reserved late, not yet settled
        yield self.run_(c.command, "RSET")
        yield self.policy().whenIdle()
        self.assertEqual(self.count(), 0)

    @defer.inlineCallbacks
    def test_reservationAfterTransactionEnded(self):
        c = yield self.run_(self.connect)
        yield self.run_(c.command, "MAIL FROM:<a@example.org>")
        self.pause()
        code, _ = yield self.run_(c.command, "RCPT TO:<x@example.net>")
        self.assertEqual(code, 451)
        self.assertEqual(len(self.flushLoggedErrors(defer.TimeoutError)), 1)
        yield self.run_(c.command, "QUIT")
        for _ in range(500):
            if not self.relayd.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.resume()
        yield self.policy().whenIdle()
        self.assertEqual(self.count(), 0)


class RedisStoreTests(unittest.TestCase):
    """L{RedisStore} against a real redis-server."""

    timeout = 60

    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.client = self.redis.client()
        self.addCleanup(self.client.close)
        self.store = RedisStore(self.redis.url, timeout=2.0, threads=2)
        self.store.start(reactor)
        self.addCleanup(self.store.stop)

    def test_provides(self):
        self.assertTrue(verifyObject(IRateCounterStore, self.store))
        self.assertTrue(verifyObject(IRateCounterStore, MemoryStore()))

    @defer.inlineCallbacks
    def test_allOrNothing(self):
        a = ("t:a", 1, 5, 3600)
        b = ("t:b", 2, 3, 3600)
        self.assertIsNone((yield self.store.reserve([a, b])))
        self.assertEqual((yield self.store.reserve([a, b])), 1)
        self.assertEqual((self.store.used("t:a", 5, 3600), self.store.used("t:b", 3, 3600)), (1, 2))
        self.assertEqual((yield self.store.peek([a, b])), 1)
        self.assertIsNone((yield self.store.peek([a])))
        self.assertEqual(self.store.used("t:a", 5, 3600), 1)
        self.assertGreater(self.client.pttl("t:a"), 0)

    @defer.inlineCallbacks
    def test_releaseNeverBelowZero(self):
        yield self.store.reserve([("t:c", 3, 5, 60)])
        yield self.store.release([("t:c", 1, 5, 60)])
        self.assertEqual(self.store.used("t:c", 5, 60), 2)
        self.assertLessEqual(self.client.pttl("t:c"), 24_000)
        yield self.store.release([("t:c", 5, 5, 60), ("t:missing", 1, 5, 60)])
        self.assertFalse(self.client.exists("t:c"))  # at rest: nothing to keep
        self.assertFalse(self.client.exists("t:missing"))

    @defer.inlineCallbacks
    def test_keyExpiresWithItsWindow(self):
        """A limiter's key is gone from Redis once it is at rest."""
        yield self.store.reserve([("t:short", 1, 5, 1)])
        self.assertLessEqual(self.client.pttl("t:short"), 200)
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertFalse(self.client.exists("t:short"))

    @defer.inlineCallbacks
    def test_stopped(self):
        self.store.stop()
        with self.assertRaises(RateStoreError):
            yield self.store.reserve([("t:d", 1, 5, 60)])


class RedisPasswordTests(unittest.TestCase):
    def test_passwordNotLogged(self):
        """Errors name the Redis server without its credentials."""
        port = freePort()
        store = RedisStore(f"redis://relayd:s3cret@127.0.0.1:{port}/0", timeout=1.0)
        store.start(reactor)
        self.addCleanup(store.stop)
        d = store.reserve([("k", 1, 1, 60)])

        def failed(failure):
            failure.trap(RateStoreError)
            message = failure.getErrorMessage()
            self.assertIn(f"redis://127.0.0.1:{port}/0", message)
            self.assertNotIn("s3cret", message)

        return d.addCallbacks(lambda _: self.fail("reserved without Redis"), failed)

    def test_withoutPassword(self):
        self.assertEqual(withoutPassword("redis://:pw@h:1/0"), "redis://h:1/0")
        self.assertEqual(
            withoutPassword("unix:///run/r.sock?db=1&password=pw"), "unix:///run/r.sock?db=1"
        )
        self.assertEqual(withoutPassword("rediss://h/2"), "rediss://h/2")


class GcraMixin:
    """
    The GCRA contract, the same for every store: each test runs against
    L{MemoryStore} and against L{RedisStore} on a real redis-server, both
    on a L{Clock} (the stores take the time from their clock; Redis only
    uses its own to expire keys that are at rest).
    """

    def makeStore(self, clock):
        raise NotImplementedError

    def setUp(self):
        self.clock = Clock()
        self.boundary = 1_000_000_020  # a multiple of 60: an old window boundary
        self.clock.advance(self.boundary - 0.1)
        self.store = self.makeStore(self.clock)

    @defer.inlineCallbacks
    def greedy(self, times, ask):
        """A client trying one unit at each of C{times}: when it got one."""
        accepted = []
        for t in times:
            self.clock.advance(t - self.clock.seconds())
            if (yield self.store.reserve([ask])) is None:
                accepted.append(t)
        return accepted

    @defer.inlineCallbacks
    def test_noDoubleLimitAcrossTheOldWindowBoundary(self):
        """
        Fixed windows let a client send the limit just before a window
        boundary and again just after it; GCRA gives nothing more until
        the bucket drains (one unit per 12 s for 5/60s).
        """
        edge = self.boundary
        before = [edge - 0.1 + i * 0.01 for i in range(9)]  # 59.90 s to 59.98 s
        after = [edge + 0.01 * i for i in range(9)] + [edge + 5]
        ask = ("{t}:edge", 1, 5, 60)
        accepted = yield self.greedy(before + after, ask)
        self.assertEqual(accepted, before[:5])
        # One unit drains 12 s after the burst began, one only.
        accepted = yield self.greedy([before[0] + 12.0, before[0] + 12.5], ask)
        self.assertEqual(accepted, [before[0] + 12.0])

    @defer.inlineCallbacks
    def checkAnyWindow(self, burst):
        """
        A greedy client (one try every 0.7 s for 10 windows): in no span
        of one window does it get more than limit + burst - 1, and over the
        whole run no more than the rate allows plus one burst.
        """
        limit, window = 10, 60
        ask = ("{t}:any", 1, limit, window, burst)
        start = self.clock.seconds()
        times = [start + i * 0.7 for i in range(int(10 * window / 0.7))]
        accepted = yield self.greedy(times, ask)
        worst = max(sum(1 for u in accepted if t <= u < t + window) for t in accepted)
        self.assertLessEqual(worst, limit + burst - 1)
        self.assertGreaterEqual(worst, limit)  # the limit is reached, not undercut
        self.assertLessEqual(len(accepted), limit * 10 + burst)
        self.assertGreaterEqual(len(accepted), limit * 10 - 1)
        # At most burst at one instant.
        now = self.clock.seconds() + window
        instant = yield self.greedy([now] * (burst + 3), ("{t}:instant", 1, limit, window, burst))
        self.assertEqual(len(instant), burst)

    def test_anyWindowDefaultBurst(self):
        return self.checkAnyWindow(10)

    def test_anyWindowSmallBurst(self):
        return self.checkAnyWindow(2)

    @defer.inlineCallbacks
    def test_releaseMovesTheArrivalTimeBack(self):
        """Giving back one unit makes room for exactly one, at once."""
        ask = ("{t}:rel", 1, 5, 60)
        for _ in range(5):
            self.assertIsNone((yield self.store.reserve([ask])))
        self.assertEqual((yield self.store.reserve([ask])), 0)
        yield self.store.release([ask])
        self.assertIsNone((yield self.store.peek([ask])))
        self.assertIsNone((yield self.store.reserve([ask])))
        self.assertEqual((yield self.store.reserve([ask])), 0)
        # Never below empty: giving back more than was taken leaves 5 of room.
        yield self.store.release([("{t}:rel", 50, 5, 60)])
        self.assertIsNone((yield self.store.reserve([("{t}:rel", 5, 5, 60)])))
        self.assertEqual((yield self.store.peek([ask])), 0)

    @defer.inlineCallbacks
    def test_allOrNothingAcrossLimiters(self):
        small, large = ("{t}:s", 1, 1, 60), ("{t}:l", 1, 100, 60)
        self.assertIsNone((yield self.store.reserve([large, small])))
        self.assertEqual((yield self.store.reserve([large, small])), 1)
        # The refused call charged nothing to the large limiter.
        self.assertIsNone((yield self.store.reserve([("{t}:l", 99, 100, 60)])))


class MemoryGcraTests(GcraMixin, unittest.TestCase):
    def makeStore(self, clock):
        return MemoryStore(clock)


class RedisGcraTests(GcraMixin, unittest.TestCase):
    timeout = 60

    def makeStore(self, clock):
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.stop)
        store = RedisStore(redis.url, timeout=5.0, threads=1, clock=clock)
        store.start(reactor)
        self.addCleanup(store.stop)
        return store

    @defer.inlineCallbacks
    def test_sameAnswersAsMemory(self):
        """
        A random run of reserve, peek and release gets the same answers
        from Redis (the Lua script) as from memory (Python).
        """
        import random

        rng = random.Random(7)
        memory = MemoryStore(self.clock)
        keys = ["{t}:a", "{t}:b", "{t}:c"]
        refused = 0
        for _ in range(400):
            self.clock.advance(rng.choice([0, 0, 0.5, 3, 17]))
            asks = [
                (k, rng.randint(1, 3), rng.choice([3, 7]), rng.choice([10, 60]))
                for k in rng.sample(keys, rng.randint(1, 3))
            ]
            # One limit per key, as the policy does.
            asks = [(k, a, 7 if k != "{t}:a" else 3, 60) for k, a, _, _ in asks]
            operation = rng.choice(["reserve", "reserve", "peek", "release"])
            mine = yield getattr(memory, operation)(asks)
            theirs = yield getattr(self.store, operation)(asks)
            self.assertEqual(mine, theirs, (operation, asks))
            refused += mine is not None
        self.assertGreater(refused, 20)


class MemoryStoreTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(12 * 86400)  # a day window starts here
        self.store = MemoryStore(self.clock)

    def result(self, d):
        return self.successResultOf(d)

    def test_allOrNothing(self):
        a, b = ("a", 1, 2, 60), ("b", 1, 1, 60)
        self.assertIsNone(self.result(self.store.reserve([a, b])))
        self.assertEqual(self.result(self.store.reserve([a, b])), 1)
        self.assertEqual((self.store.value("a"), self.store.value("b")), (1, 1))
        self.assertEqual(self.result(self.store.peek([a])), None)
        self.assertEqual(self.result(self.store.peek([b])), 0)
        self.assertEqual(self.store.value("a"), 1)

    def test_releaseNeverBelowZero(self):
        self.store.reserve([("a", 2, 5, 60)])
        self.store.release([("a", 3, 5, 60), ("gone", 1, 5, 60)])
        self.assertEqual(self.store.value("a"), 0)
        self.assertEqual(len(self.store), 0)

    def test_oldWindowsForgotten(self):
        """Memory stays bounded: limiters go when they are at rest."""
        for i in range(1000):
            self.store.reserve([(f"k{i}", 1, 5, 60), (f"d{i}", 1, 5, 86400)])
        self.assertEqual(len(self.store), 2000)
        self.clock.advance(11.9)  # one unit of 5/60s drains in 12 s
        self.assertEqual(len(self.store), 2000)
        self.clock.advance(0.1)
        self.assertEqual(len(self.store), 1000)
        self.clock.advance(86400)
        self.assertEqual(len(self.store), 0)

    def test_policyWithoutThread(self):
        """The memory backend starts no thread pool."""
        policy = RateLimit.fromConfig(
            {"rules": [{"name": "r", "key": "user", "messages": ["1/hour"]}]}, CONTEXT
        )
        self.assertIsInstance(policy.store, MemoryStore)
        policy.startPolicy(self.clock)
        self.assertIs(policy.store.clock, self.clock)
        self.assertIsNone(self.successResultOf(policy.stopPolicy()))


class BurstTests(unittest.TestCase):
    """The rule option C{burst}, through the policy on a clock."""

    class Envelope:
        def __init__(self):
            self.notes, self.queueId, self.sender, self.recipients = {}, "Q", None, []

    def test_burstThenOnePerInterval(self):
        """
        10/hour with burst = 2: two messages at once, the third refused
        saying one more fits within 360 s; 360 s later one more, not two.
        """
        clock = Clock()
        clock.advance(1_000_000)
        policy = RateLimit.fromConfig(
            {"rules": [{"name": "u", "key": "user", "messages": ["10/hour"], "burst": 2}]},
            CONTEXT,
        )
        policy.startPolicy(clock)
        session = Session(ipaddress.ip_address("192.0.2.1"), 1, "relay", "relay", "s1", user="u1")

        def message():
            envelope = self.Envelope()
            verdict = self.successResultOf(policy.checkMessage(session, envelope, None))
            policy.transactionEnded(session, envelope, verdict is CONTINUE)
            return verdict

        self.assertEqual([message(), message()], [CONTINUE, CONTINUE])
        third = message()
        self.assertEqual((third.code, third.enhanced), (450, "4.7.1"))
        self.assertTrue(third.text.endswith("; next in at most 360 s"), third.text)
        clock.advance(360)
        self.assertIs(message(), CONTINUE)
        self.assertEqual(message().code, 450)


class RuleTests(unittest.TestCase):
    def session(self, address, user=None):
        return Session(ipaddress.ip_address(address), 1234, "relay", "relay", "s1", user=user)

    def test_clientPrefixes(self):
        rule = Rule("n", "client", messages=(parseLimit("1/hour"),), prefixV4=24, prefixV6=64)
        self.assertEqual(
            rule.value(self.session("192.0.2.77"), None), ("client network", "192.0.2.0/24")
        )
        self.assertEqual(
            rule.value(self.session("2001:db8:1:2:3:4:5:6"), None),
            ("client network", "2001:db8:1:2::/64"),
        )
        self.assertEqual(
            rule.value(self.session("::ffff:192.0.2.77"), None), ("client network", "192.0.2.0/24")
        )
        whole = Rule("n", "client", messages=(parseLimit("1/hour"),))
        self.assertEqual(rule.value(self.session("::1"), None)[0], "client network")
        self.assertEqual(whole.value(self.session("2001:db8::1"), None), ("client", "2001:db8::1"))

    def test_unknownKeysDoNotApply(self):
        user = Rule("u", "user", messages=(parseLimit("1/hour"),))
        sender = Rule("s", "sender", messages=(parseLimit("1/hour"),))
        domain = Rule("d", "sender_domain", messages=(parseLimit("1/hour"),))
        anonymous = self.session("192.0.2.1")
        self.assertIsNone(user.value(anonymous, Address("a", "b.example")))
        self.assertEqual(user.value(self.session("192.0.2.1", "joe"), None), ("user", "joe"))
        self.assertIsNone(sender.value(anonymous, Address.null()))
        self.assertIsNone(domain.value(anonymous, Address.null()))
        self.assertIsNone(domain.value(anonymous, Address("postmaster", "")))
        self.assertEqual(
            sender.value(anonymous, Address("Alice", "Example.ORG")),
            ("sender", "alice@example.org"),
        )


@pytest.mark.parametrize(
    "text, count, window",
    [
        ("100/hour", 100, 3600),
        ("1/second", 1, 1),
        ("50/minute", 50, 60),
        (" 1000 / day ", 1000, 86400),
        ("5/300s", 5, 300),
    ],
)
def test_parseLimit(text, count, window):
    limit = parseLimit(text)
    assert (limit.count, limit.window) == (count, window)


@pytest.mark.parametrize("text", ["100", "100/week", "-1/hour", "0/hour", "1/0s", "1/hours", 5])
def test_parseLimitRefuses(text):
    with pytest.raises(ValueError):
        parseLimit(text)


GOOD_RULE = {"name": "u", "key": "user", "messages": ["100/hour"]}

CONFIG_ERRORS = {
    "unknown-option": ({"rule": [GOOD_RULE]}, "rule", "unknown option"),
    "bad-backend": ({"backend": "mongo", "rules": [GOOD_RULE]}, "backend", '"memory", "redis"'),
    "no-rules": ({}, "rules", "at least one rule"),
    "rules-not-list": ({"rules": "per-user"}, "rules", "list of tables"),
    "unknown-key": (
        {"rules": [GOOD_RULE, {"name": "n", "key": "ip", "messages": ["1/hour"]}]},
        "rules[1].key",
        '"client", "user", "sender", "sender_domain"',
    ),
    "bad-window": (
        {"rules": [GOOD_RULE, {"name": "n", "key": "user", "messages": ["10/fortnight"]}]},
        "rules[1].messages",
        "not a limit: '10/fortnight'",
    ),
    "bad-recipients": (
        {"rules": [{"name": "n", "key": "user", "recipients": "10/hour"}]},
        "rules[0].recipients",
        "must be a list",
    ),
    "same-window": (
        {"rules": [{"name": "n", "key": "user", "messages": ["1/hour", "2/3600s"]}]},
        "rules[0].messages",
        "same window",
    ),
    "no-limits": ({"rules": [{"name": "n", "key": "user"}]}, "rules[0]", "needs messages"),
    "prefix-not-client": (
        {"rules": [{"name": "n", "key": "user", "prefix_v4": 24, "messages": ["1/hour"]}]},
        "rules[0].prefix_v4",
        'only for key = "client"',
    ),
    "prefix-too-long": (
        {"rules": [{"name": "n", "key": "client", "prefix_v6": 129, "messages": ["1/hour"]}]},
        "rules[0].prefix_v6",
        "0 to 128",
    ),
    "duplicate-name": ({"rules": [GOOD_RULE, GOOD_RULE]}, "rules[1].name", "duplicate"),
    "bad-name": (
        {"rules": [{"name": "a b", "key": "user", "messages": ["1/hour"]}]},
        "rules[0].name",
        "letters, digits",
    ),
    "unknown-rule-option": (
        {"rules": [dict(GOOD_RULE, window="hour")]},
        "rules[0].window",
        "unknown option",
    ),
    "bad-on-error": ({"on_error": "maybe", "rules": [GOOD_RULE]}, "on_error", '"accept"'),
    "bad-timeout": ({"redis_timeout": 0, "rules": [GOOD_RULE]}, "redis_timeout", "positive"),
    "bad-threads": ({"redis_threads": 0, "rules": [GOOD_RULE]}, "redis_threads", "positive"),
    "bad-burst": (
        {"rules": [dict(GOOD_RULE, burst=0)]},
        "rules[0].burst",
        "positive integer",
    ),
    "prefix-braces": ({"key_prefix": "{x}", "rules": [GOOD_RULE]}, "key_prefix", "without {"),
    "password-file-missing": (
        {"redis_password_file": "/nonexistent/pw", "rules": [GOOD_RULE]},
        "redis_password_file",
        "/nonexistent/pw: No such file",
    ),
    "bad-sentinels": (
        {"redis_sentinels": ["10.0.0.5"], "rules": [GOOD_RULE]},
        "redis_sentinels",
        "not host:port",
    ),
    "sentinel-password-alone": (
        {"redis_sentinel_password_file": __file__, "rules": [GOOD_RULE]},
        "redis_sentinel_password_file",
        "only with redis_sentinels",
    ),
    "cluster-not-bool": ({"redis_cluster": "yes", "rules": [GOOD_RULE]}, "redis_cluster", "true"),
    "cluster-and-sentinels": (
        {"redis_cluster": True, "redis_sentinels": ["h:26379"], "rules": [GOOD_RULE]},
        "redis_cluster",
        "not with redis_sentinels",
    ),
    "ca-file-missing": (
        {"redis_tls_ca_file": "/nonexistent/ca.pem", "rules": [GOOD_RULE]},
        "redis_tls_ca_file",
        "no such file",
    ),
    "bad-url": (
        {"backend": "redis", "redis_url": "http://127.0.0.1/", "rules": [GOOD_RULE]},
        "redis_url",
        "http://127.0.0.1/",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_configErrors(case, tmp_path):
    """
    A bad option stops startup with one line naming the file, the key
    (C{policies.ratelimit.rules[1].messages}) and the problem.
    """
    options, key, words = CONFIG_ERRORS[case]
    setup = TestSetup(str(tmp_path), chain=CHAIN, policies={"ratelimit": options})
    with pytest.raises(ConfigError) as info:
        buildService(load(setup.configPath), MemoryReactorClock())
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"{setup.configPath}: policies.ratelimit.{key}: "), line
    assert words in line, line


def test_goodConfigBuilds(tmp_path):
    options = {
        "backend": "redis",
        "redis_url": "redis://127.0.0.1:1/0",
        "redis_timeout": 0.25,
        "on_error": "tempfail",
        "key_prefix": "mail:",
        "rules": [
            GOOD_RULE,
            {
                "name": "net",
                "key": "client",
                "prefix_v4": 24,
                "prefix_v6": 64,
                "recipients": ["5/60s"],
            },
        ],
    }
    setup = TestSetup(str(tmp_path), chain=CHAIN, policies={"ratelimit": options})
    service = buildService(load(setup.configPath), MemoryReactorClock())
    policy = service.policies.chain.policies[0]
    assert isinstance(policy.store, RedisStore)
    assert (policy.onError, policy.keyPrefix) == ("tempfail", "mail:")
    assert [r.name for r in policy.rules] == ["u", "net"]
    assert policy.rules[1].recipients[0].window == 60
    assert math.isclose(policy.store.timeout, 0.25)
    policy.store.client.close()
