"""
The ratelimit policy's Redis connection against the real thing: TLS with
an ACL user whose password is in a file, Sentinel (with a failover), and
Redis Cluster; and Redis answering errors, which must give the configured
C{on_error}, never a traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.certificates import issueCertificate, makeCA
from relayd.envelope import Session
from relayd.policies.ratecounter import RateStoreError, RedisStore
from relayd.policies.ratelimit import RateLimit
from relayd.policy import PolicyContext
from relayd.testing import RedisCluster, RedisSentinel, RedisServer
from relayd.verdict import CONTINUE

CONTEXT = PolicyContext("relayd.toml", "relayd.test", "ratelimit")

PASSWORD = "s3cret-Redis-pw"
RULES = [
    {"name": "per-user", "key": "user", "messages": ["3/hour"]},
    {"name": "per-client", "key": "client", "prefix_v4": 24, "messages": ["5/hour"]},
]
# What the policy needs, and nothing more, on its own keys only.
ACL = ["~{relayd:rl:}*", "~{relayd:authfail}:*", "+@scripting", "+get", "+mget"]
ACL += ["+set", "+del", "+ping", "+client|setname"]


class Envelope:
    def __init__(self):
        self.notes = {}
        self.queueId = "TESTQID"
        self.sender = None
        self.recipients = []


def session(user="alice", address="192.0.2.7"):
    import ipaddress

    s = Session.__new__(Session)
    s.clientAddress = ipaddress.ip_address(address)
    s.user = user
    s.sessionId = "S1"
    return s


class PolicyCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-redismodes-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def policy(self, **options):
        options.setdefault("backend", "redis")
        options.setdefault("redis_timeout", 3.0)
        options.setdefault("rules", RULES)
        policy = RateLimit.fromConfig(options, CONTEXT)
        policy.startPolicy(reactor)
        self.addCleanup(policy.stopPolicy)
        return policy

    @defer.inlineCallbacks
    def message(self, policy, user="alice"):
        """One message through the policy's DATA check: its verdict."""
        envelope = Envelope()
        verdict = yield policy.checkMessage(session(user), envelope, None)
        policy.transactionEnded(session(user), envelope, verdict is CONTINUE)
        yield policy.whenIdle()
        return verdict

    def logText(self):
        return "\n".join(formatEvent(e) for e in self.events)


class TLSAndACLTests(PolicyCase):
    """rediss:// to a redis-server that only speaks TLS and has no default user."""

    def setUp(self):
        PolicyCase.setUp(self)
        caCert, caKey = makeCA("relayd test Redis CA")
        cert, key = issueCertificate(caCert, caKey, "localhost", ["127.0.0.1"])
        self.ca = os.path.join(self.directory, "ca.pem")
        paths = {}
        for name, data in (("ca", caCert), ("cert", cert), ("key", key)):
            paths[name] = os.path.join(self.directory, f"{name}.pem")
            with open(paths[name], "wb") as f:
                f.write(data)
        self.redis = RedisServer(
            tls=(paths["cert"], paths["key"], paths["ca"]),
            arguments=[
                "--user",
                "default",
                "off",
                "--user",
                "relayd",
                "on",
                f">{PASSWORD}",
                *ACL,
                "--user",
                "admin",
                "on",
                ">admin-pw",
                "~*",
                "+@all",
            ],
        )
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.passwordFile = os.path.join(self.directory, "redis-password")
        with open(self.passwordFile, "w") as f:
            f.write(PASSWORD + "\n")
        self.url = f"rediss://relayd@127.0.0.1:{self.redis.port}/0"

    def admin(self):
        client = self.redis.client(username="admin", password="admin-pw")
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_limitHeldOverTLSWithACLUser(self):
        """
        Over TLS, verified with the configured CA, as ACL user relayd with
        the password from its file: the limit holds, and the keys are
        there, in the user's key space.
        """
        policy = self.policy(
            redis_url=self.url,
            redis_password_file=self.passwordFile,
            redis_tls_ca_file=self.ca,
        )
        verdicts = []
        for _ in range(4):
            verdicts.append((yield self.message(policy)))
        self.assertEqual([v.code for v in verdicts[:3]], [None, None, None])
        self.assertEqual((verdicts[3].code, verdicts[3].enhanced), (450, "4.7.1"))
        admin = self.admin()
        self.assertEqual(
            sorted(k.decode() for k in admin.keys("*")),
            ["{relayd:rl:}per-client:m:3600:192.0.2.0/24", "{relayd:rl:}per-user:m:3600:alice"],
        )
        self.assertEqual(policy.store.used("{relayd:rl:}per-user:m:3600:alice", 3, 3600), 3)
        clients = admin.client_list()
        self.assertTrue(any(c["user"] == "relayd" for c in clients), clients)

    @defer.inlineCallbacks
    def test_wrongPasswordTempfailsWithoutLeakingIt(self):
        """A refused login is a store error: 451, logged without the password."""
        wrong = os.path.join(self.directory, "wrong")
        with open(wrong, "w") as f:
            f.write("not-the-password\n")
        policy = self.policy(
            redis_url=self.url, redis_password_file=wrong, redis_tls_ca_file=self.ca
        )
        verdict = yield self.message(policy)
        self.assertEqual((verdict.code, verdict.enhanced), (451, "4.3.0"))
        text = self.logText()
        self.assertIn("ratelimit store failed at DATA", text)
        self.assertNotIn("not-the-password", text)
        self.assertNotIn(PASSWORD, text)

    @defer.inlineCallbacks
    def test_untrustedServerRefused(self):
        """Without the CA that signed Redis's certificate: no connection, 451."""
        policy = self.policy(redis_url=self.url, redis_password_file=self.passwordFile)
        verdict = yield self.message(policy)
        self.assertEqual((verdict.code, verdict.enhanced), (451, "4.3.0"))
        self.assertIn("certificate verify failed", self.logText())

    @defer.inlineCallbacks
    def test_errorReplyGivesOnError(self):
        """
        Redis answering an error (NOPERM: keys outside the user's ACL) is
        the configured behaviour: 451 by default, mail through with
        on_error = "accept"; an error line each time, no traceback.
        """
        options = {
            "redis_url": self.url,
            "redis_password_file": self.passwordFile,
            "redis_tls_ca_file": self.ca,
            "key_prefix": "other:",
        }
        closed = yield self.message(self.policy(**options))
        self.assertEqual((closed.code, closed.enhanced), (451, "4.3.0"))
        opened = yield self.message(self.policy(on_error="accept", **options))
        self.assertIs(opened, CONTINUE)
        text = self.logText()
        self.assertIn("NoPermissionError", text)
        self.assertIn("answering 451 4.3.0", text)
        self.assertIn("accepting", text)
        self.assertNotIn("Traceback", text)
        self.assertEqual(self.flushLoggedErrors(), [])


class SentinelTests(PolicyCase):
    """relayd finds the primary through a real Sentinel, also after a failover."""

    timeout = 90

    def setUp(self):
        PolicyCase.setUp(self)
        self.primary = RedisServer()
        self.primary.start()
        self.addCleanup(self.primary.stop)
        self.replica = RedisServer(arguments=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.replica.start()
        self.addCleanup(self.replica.stop)
        self.sentinel = RedisSentinel(self.primary, password="sentinel-pw")
        self.sentinel.start()
        self.addCleanup(self.sentinel.stop)

    @defer.inlineCallbacks
    def until(self, condition, what, seconds=30.0):
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"not within {seconds} s: {what}")
            yield deferLater(reactor, 0.1, lambda: None)

    def sentinelPasswordFile(self, password):
        path = os.path.join(self.directory, "sentinel-password")
        with open(path, "w") as f:
            f.write(password + "\n")
        return path

    @defer.inlineCallbacks
    def test_wrongSentinelPassword(self):
        """Sentinels refusing relayd's password: on_error, and no password logged."""
        policy = self.policy(
            redis_url="redis:///0",
            redis_sentinels=[f"127.0.0.1:{self.sentinel.port}"],
            redis_sentinel_password_file=self.sentinelPasswordFile("wrong-pw"),
        )
        verdict = yield self.message(policy)
        self.assertEqual((verdict.code, verdict.enhanced), (451, "4.3.0"))
        self.assertIn("MasterNotFoundError", self.logText())
        self.assertNotIn("wrong-pw", self.logText())

    @defer.inlineCallbacks
    def test_primaryFromSentinelAndAfterFailover(self):
        policy = self.policy(
            redis_url="redis:///0",
            redis_sentinels=[f"127.0.0.1:{self.sentinel.port}"],
            redis_sentinel_service=self.sentinel.service,
            redis_sentinel_password_file=self.sentinelPasswordFile("sentinel-pw"),
        )
        for _ in range(2):
            verdict = yield self.message(policy)
            self.assertIsNone(verdict.code)
        key = "{relayd:rl:}per-user:m:3600:alice"
        with self.primary.client() as c:
            self.assertTrue(c.exists(key))

        def replicated():
            with self.replica.client() as c:
                return bool(c.exists(key))

        yield self.until(replicated, "the replica has the key")
        with self.sentinel.client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.sentinel.service)
        yield self.until(
            lambda: self.sentinel.primaryPort() == self.replica.port, "the replica promoted"
        )
        # Calls in flight during the switch may fail (451); then the new
        # primary answers, with the count the old one had.
        verdicts = []
        for _ in range(50):
            verdict = yield self.message(policy)
            verdicts.append(verdict.code)
            if verdict.code is None:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertIsNone(verdicts[-1], verdicts)
        self.assertTrue(all(code == 451 for code in verdicts[:-1]), verdicts)
        refused = yield self.message(policy)
        self.assertEqual((refused.code, refused.enhanced), (450, "4.7.1"))
        with self.replica.client() as c:
            self.assertTrue(c.exists(key))


class ClusterTests(PolicyCase):
    """A real three-node Redis Cluster: every check's keys in one slot."""

    timeout = 90

    def setUp(self):
        PolicyCase.setUp(self)
        self.cluster = RedisCluster(3)
        self.addCleanup(self.cluster.stop)
        self.cluster.start()

    @defer.inlineCallbacks
    def test_limitsHoldInACluster(self):
        from redis.cluster import key_slot

        policy = self.policy(redis_url=self.cluster.url, redis_cluster=True)
        self.assertIsInstance(policy.store, RedisStore)
        verdicts = []
        for user in ("alice", "bob", "alice", "carol", "alice", "alice", "dave"):
            verdicts.append((yield self.message(policy, user)).code)
        # per-user 3/hour for alice; per-client 5/hour for the /24 over all.
        self.assertEqual(verdicts, [None, None, None, None, None, 450, 450])
        keys = []
        for node in self.cluster.nodes:
            with node.client() as c:
                found = [k.decode() for k in c.keys("*")]
                keys.append(found)
        everything = [k for found in keys for k in found]
        # alice, bob, carol and the network: dave's refused call charged nothing.
        self.assertEqual(len(everything), 4)
        self.assertEqual(len({key_slot(k.encode()) for k in everything}), 1)
        self.assertEqual(sorted(len(found) for found in keys), [0, 0, 4])
        used = policy.store.used("{relayd:rl:}per-client:m:3600:192.0.2.0/24", 5, 3600)
        self.assertEqual(used, 5)
        # MAIL's look (no charge) and a release work on the cluster too.
        envelope = Envelope()
        refused = yield policy.checkSender(session("erin"), envelope, None)
        self.assertEqual((refused.code, refused.enhanced), (450, "4.7.1"))
        yield policy.store.release([("{relayd:rl:}per-client:m:3600:192.0.2.0/24", 1, 5, 3600)])
        allowed = yield policy.checkSender(session("erin"), envelope, None)
        self.assertIs(allowed, CONTINUE)


class ClusterDownTests(PolicyCase):
    @defer.inlineCallbacks
    def test_clusterDownAtStartIsOnError(self):
        """
        A Cluster that cannot be reached when relayd starts (the client
        connects as it is made) does not stop relayd: each check gets
        on_error, as with an outage later.
        """
        from relayd.testing import freePort

        port = freePort()
        policy = self.policy(redis_url=f"redis://127.0.0.1:{port}/0", redis_cluster=True)
        for _ in range(2):
            verdict = yield self.message(policy)
            self.assertEqual((verdict.code, verdict.enhanced), (451, "4.3.0"))
        text = self.logText()
        self.assertIn("ratelimit store failed at DATA, answering 451 4.3.0", text)
        self.assertNotIn("Traceback", text)


class HashSlotTests(unittest.TestCase):
    def test_keysOfOneCheckShareASlot(self):
        """
        Whatever the rules and values, the keys of one call carry the same
        hash tag, so Redis Cluster can run the script on them.
        """
        from redis.cluster import key_slot

        from relayd.address import Address
        from relayd.smtp.auth import LOCKOUT_KEY_PREFIX

        rules = [
            *RULES,
            {
                "name": "per-sender",
                "key": "sender",
                "messages": ["9/day"],
                "recipients": ["1/second"],
            },
            {"name": "dom", "key": "sender_domain", "recipients": ["5/minute", "50/hour"]},
        ]
        policy = RateLimit.fromConfig({"rules": rules, "key_prefix": "mail:"}, CONTEXT)
        sender = Address("Zed", "Example.ORG")
        for kind in ("messages", "recipients"):
            keys = [c.key for c in policy._counters(session(), sender, kind)]
            self.assertGreaterEqual(len(keys), 2)
            self.assertTrue(all(k.startswith("{mail:}") for k in keys), keys)
            self.assertEqual(len({key_slot(k.encode()) for k in keys}), 1, keys)
        self.assertTrue(LOCKOUT_KEY_PREFIX.startswith("{relayd:authfail}"))

    def test_storeErrorType(self):
        self.assertTrue(issubclass(RateStoreError, Exception))
