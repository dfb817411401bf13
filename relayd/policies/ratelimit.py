"""
C{ratelimit}: limits how much mail a client, a user or a sender may send,
so that a compromised account or a runaway script cannot spend the relay's
reputation.

Each rule counts under one key (the client address or its network, the
authenticated user, the envelope sender, or the sender's domain) and may
limit messages and recipients at several rates at once, e.g. 100 messages
per hour and 1000 per day.  See C{docs/policies/ratelimit.md}.

What is counted is charged when it is known and given back when the
transaction does not end in a queued message, so refused mail never uses
up a limit:

  - at MAIL, the message limits are only looked at (no charge): when one
    is already full the transaction is refused at once;
  - at RCPT, one unit of every recipient limit is reserved atomically (all
    the applicable counters, or none);
  - at the end of DATA (L{checkMessage}), one unit of every message limit;
  - when the transaction ends (L{transactionEnded}), everything is given
    back unless the message was queued; when it was, the reservations of
    recipients that were refused after this policy answered (relay denied
    by a later policy, say) are given back.  Such recipients are also
    settled at the next RCPT and at the end of DATA, so that a run of
    refused recipients does not fill a limit within one transaction.

Each limit is a GCRA limiter (L{relayd.policies.ratecounter}): C{burst} units (by
default the whole limit) may go at once, then one more every C{window /
limit} seconds; no window boundary lets a client send twice the limit.
The reply says how long until the next unit, at most (C{450 4.7.1} for
messages, C{452 4.5.3} for recipients, RFC 3463; both temporary, RFC 5321
section 4.2.1: the client tries again later).

Counters live in memory (one process, exact) or in Redis (shared by every
relayd behind a load balancer): L{relayd.policies.ratecounter}.

When the store cannot answer (Redis down, or slower than C{redis_timeout}),
C{on_error} decides.  The default, C{"tempfail"}, answers C{451 4.3.0}: a
limit that lifts whenever Redis is unreachable is no limit, since an
attacker who can slow Redis down (or wait for an outage) would send
unmetered.  C{"accept"} is for those who prefer mail flow over limits.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayd.plugin import (
    CONTINUE,
    Address,
    Envelope,
    IMessagePolicy,
    IPolicyLifecycle,
    IRecipientPolicy,
    ISenderPolicy,
    ITransactionObserver,
    Message,
    PolicyContext,
    PolicyOptionError,
    SessionView,
    Verdict,
    tempfail,
)
from relayd.policies.ratecounter import MemoryStore, RedisStore, WallClock, withoutPassword

__all__ = ["RateLimit", "Rule", "Limit", "parseLimit"]


def _ids(session: Any, envelope: Any) -> dict[str, Any]:
    """
    A log line's ids (as L{relayd.ops.logs.idFields}, which a built-in
    policy does not import: only L{relayd.plugin}): C{prefix} is the
    queue id, or before MAIL was accepted the session id, never None.
    """
    queueId = getattr(envelope, "queueId", None)
    sessionId = getattr(session, "sessionId", None)
    return {"prefix": queueId or sessionId or "-", "session_id": sessionId, "queue_id": queueId}


log = Logger(namespace="relayd.policies.ratelimit")

KEYS = ("client", "user", "sender", "sender_domain")
"""What a rule may count under."""

BACKENDS = ("memory", "redis")
ON_ERROR = ("accept", "tempfail")
DEFAULT_ON_ERROR = "tempfail"
"""Fail closed: an outage of the store must not lift every limit."""

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(?:(second|minute|hour|day)|(\d+)\s*s)\s*$")
_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

OPTIONS = (
    "backend",
    "redis_url",
    "redis_timeout",
    "redis_threads",
    "redis_password_file",
    "redis_sentinels",
    "redis_sentinel_service",
    "redis_sentinel_password_file",
    "redis_cluster",
    "redis_tls_ca_file",
    "redis_tls_cert_file",
    "redis_tls_key_file",
    "on_error",
    "key_prefix",
    "rules",
)
RULE_OPTIONS = ("name", "key", "prefix_v4", "prefix_v6", "messages", "recipients", "burst")

STORE_FAILED = tempfail(451, "4.3.0", "Rate limit service unavailable, try again later")


@dataclass(frozen=True)
class Limit:
    """
    At most C{count} per C{window} seconds.

    @ivar spec: the limit as written in the config, e.g. C{"100/hour"}.
    """

    count: int
    window: int
    spec: str

    @property
    def per(self) -> str:
        """The window in words: C{"hour"}, C{"300 s"}."""
        for unit, seconds in UNITS.items():
            if seconds == self.window:
                return unit
        return f"{self.window} s"


def parseLimit(text: Any) -> Limit:
    """
    Parse C{N/second}, C{N/minute}, C{N/hour}, C{N/day} or C{N/<seconds>s}.

    @raise ValueError: for anything else, a count or a window of 0.
    """
    m = _LIMIT.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"not a limit: {text!r} (use N/second, N/minute, N/hour, N/day or N/<seconds>s)"
        )
    count = int(m.group(1))
    window = UNITS[m.group(2)] if m.group(2) else int(m.group(3))
    if count < 1:
        raise ValueError(f"{text!r}: the count must be at least 1")
    if window < 1:
        raise ValueError(f"{text!r}: the window must be at least 1 second")
    return Limit(count, window, text.strip())


@dataclass(frozen=True)
class Rule:
    """
    One configured rule.

    @ivar name: used in counter keys, replies and log lines.
    @ivar key: one of L{KEYS}.
    @ivar prefixV4: for C{key = "client"}: count IPv4 clients by network of
        this prefix length (32: each address alone).
    @ivar prefixV6: the same for IPv6 (64 counts a typical end site).
    @ivar messages: message limits.
    @ivar recipients: recipient limits.
    @ivar burst: how many units of each limit may go at once (at most the
        limit's count); None: the limit's count.
    """

    name: str
    key: str
    messages: tuple[Limit, ...] = ()
    recipients: tuple[Limit, ...] = ()
    prefixV4: int = 32
    prefixV6: int = 128
    burst: int | None = None

    def burstOf(self, limit: Limit) -> int:
        """The burst of C{limit} under this rule."""
        return limit.count if self.burst is None else min(self.burst, limit.count)

    def value(self, session: SessionView, sender: Address | None) -> tuple[str, str] | None:
        """
        What this rule counts under for C{session} and C{sender}, as
        C{(description, value)}, or None when it does not apply (no user
        on a session that did not authenticate, the null sender).
        """
        if self.key == "client":
            address = session.clientAddress
            if address.version == 6 and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            prefix = self.prefixV4 if address.version == 4 else self.prefixV6
            if prefix == address.max_prefixlen:
                return "client", str(address)
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            return "client network", str(network)
        if self.key == "user":
            return None if session.user is None else ("user", session.user)
        if sender is None or sender.isNull:
            return None
        if self.key == "sender":
            # relayd's normal form (relayd.address), lower-cased whole: RFC
            # 5321 section 2.4 lets the local part be case-sensitive, but no
            # one should pass a limit by writing Alice instead of alice, or
            # an A-label domain instead of its U-labels.
            return "sender", sender.normalForm
        if not sender.domain:
            return None
        return "sender domain", sender.normalDomain


def _printable(text: str) -> str:
    """Keep a key's value safe for one reply line."""
    return "".join(c if c.isprintable() and c not in "\r\n" else "?" for c in text[:200])


@dataclass
class _Counter:
    """One counter of one call: which rule and limit, and its store key."""

    rule: Rule
    limit: Limit
    what: str
    value: str
    key: str
    kind: str
    now: float

    def retryIn(self) -> int:
        """Seconds until one more unit fits, at most: the emission interval."""
        return max(1, math.ceil(self.limit.window / self.limit.count))

    def describe(self) -> str:
        kind = self.kind if self.limit.count != 1 else self.kind[:-1]
        return (
            f"{self.rule.name} allows {self.limit.count} {kind} per "
            f"{self.limit.per} for {self.what} {_printable(self.value)}; "
            f"next in at most {self.retryIn()} s"
        )


Charge = list[tuple[str, int, int, int, int]]
"""What was reserved: C{(key, amount, limit, windowSeconds, burst)} each."""


@dataclass
class _Reservations:
    """
    What this policy reserved for one transaction, kept in
    C{envelope.notes[policy name]}.

    @ivar recipients: C{(recipient, charge)} in RCPT order.
    @ivar message: the message charge, once reserved.
    @ivar ended: set by L{RateLimit.transactionEnded}; a reservation that
        completes after it (the chain gave up waiting) is given back at once.
    """

    recipients: list[tuple[Address, Charge]] = field(default_factory=list)
    message: Charge = field(default_factory=list)
    ended: bool = False


@implementer(
    ISenderPolicy, IRecipientPolicy, IMessagePolicy, ITransactionObserver, IPolicyLifecycle
)
class RateLimit:
    """
    The policy.  Put it first in the chain: C{mynetworks} and
    C{authenticated} accept recipients and so end the RCPT phase before
    later policies are asked.

    @ivar store: the L{IRateCounterStore}.
    @ivar rules: the L{Rule}s.
    @ivar onError: C{"tempfail"} (fail closed, C{451 4.3.0}; the default)
        or C{"accept"} (fail open) when the store cannot answer.
    @ivar keyPrefix: put before every counter key.
    """

    name = "ratelimit"

    def __init__(
        self,
        store: Any,
        rules: list[Rule],
        onError: str = DEFAULT_ON_ERROR,
        keyPrefix: str = "relayd:rl:",
        clock: Any = None,
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self.onError = onError
        self.keyPrefix = keyPrefix
        self.clock = WallClock() if clock is None else clock
        self._pending: set[Deferred[Any]] = set()
        self._idle: list[Deferred[None]] = []

    # --- configuration -------------------------------------------------

    @classmethod
    def fromConfig(cls, options: dict[str, Any], context: PolicyContext) -> RateLimit:
        """
        Build from C{[policies.ratelimit]}; see the module docstring and
        C{docs/policies/ratelimit.md}.

        @raise PolicyOptionError: naming the bad option, e.g.
            C{rules[1].messages}.
        """
        for key in sorted(options):
            if key not in OPTIONS:
                raise PolicyOptionError(key, f"unknown option (known: {', '.join(OPTIONS)})")
        backend = options.get("backend", "memory")
        if backend not in BACKENDS:
            raise PolicyOptionError("backend", f"must be one of {_choices(BACKENDS)}")
        onError = options.get("on_error", DEFAULT_ON_ERROR)
        if onError not in ON_ERROR:
            raise PolicyOptionError("on_error", f"must be one of {_choices(ON_ERROR)}")
        keyPrefix = options.get("key_prefix", "relayd:rl:")
        if not isinstance(keyPrefix, str) or "{" in keyPrefix or "}" in keyPrefix:
            raise PolicyOptionError("key_prefix", "must be a string without { or }")
        url = options.get("redis_url", "redis://127.0.0.1:6379/0")
        if not isinstance(url, str) or not url:
            raise PolicyOptionError("redis_url", 'must be a URL like "redis://127.0.0.1:6379/0"')
        timeout = options.get("redis_timeout", 0.5)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise PolicyOptionError("redis_timeout", "must be a positive number of seconds")
        threads = options.get("redis_threads", 4)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise PolicyOptionError("redis_threads", "must be a positive integer")
        rules = _parseRules(options.get("rules"))
        connection = _connectionOptions(options)
        store: Any
        if backend == "redis":
            if not _haveRedis():
                raise PolicyOptionError(
                    "backend",
                    '"redis" needs the redis package, which is not installed: '
                    'pip install "relayd[redis]"',
                )
            try:
                store = RedisStore(url, float(timeout), threads, **connection)
            except ValueError as e:
                raise PolicyOptionError("redis_url", f"{withoutPassword(url)!r}: {e}") from None
        else:
            store = MemoryStore()
        return cls(store, rules, onError, keyPrefix)

    # --- lifecycle -----------------------------------------------------

    def startPolicy(self, reactor: Any) -> None:
        """Use C{reactor}'s clock; start the Redis store's thread pool."""
        self.clock = reactor
        if hasattr(self.store, "clock"):
            self.store.clock = reactor
        start = getattr(self.store, "start", None)
        if start is not None:
            start(reactor)

    def stopPolicy(self) -> Deferred[None]:
        """Wait for the store calls under way (each bounded), then stop it."""

        def stop(_: Any) -> None:
            stopper = getattr(self.store, "stop", None)
            if stopper is not None:
                stopper()

        return self.whenIdle().addCallback(stop)

    def whenIdle(self) -> Deferred[None]:
        """
        A Deferred that fires once no store call of this policy is under
        way (releases included): for an orderly stop, and for tests that
        look at the counters after a transaction ended.
        """
        if not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            if not self._pending:
                waiting, self._idle = self._idle, []
                for w in waiting:
                    w.callback(None)
            return result

        return d.addBoth(done)

    # --- counters ------------------------------------------------------

    def _counters(self, session: SessionView, sender: Address | None, kind: str) -> list[_Counter]:
        """
        The counters of every rule that applies, for C{kind}.  Every key
        starts with the hash tag C{{key_prefix}}: the keys of one call
        share a Redis Cluster hash slot, as one script needs.
        """
        now = self.clock.seconds()
        counters = []
        letter = "m" if kind == "messages" else "r"
        for rule in self.rules:
            limits = rule.messages if kind == "messages" else rule.recipients
            if not limits:
                continue
            found = rule.value(session, sender)
            if found is None:
                continue
            what, value = found
            for limit in limits:
                key = f"{{{self.keyPrefix}}}{rule.name}:{letter}:{limit.window}:{value}"
                counters.append(_Counter(rule, limit, what, value, key, kind, now))
        return counters

    @staticmethod
    def _asks(counters: list[_Counter]) -> Charge:
        return [
            (c.key, 1, c.limit.count, c.limit.window, c.rule.burstOf(c.limit)) for c in counters
        ]

    _charge = _asks

    def _release(self, charge: Charge, queueId: str | None) -> None:
        if not charge:
            return
        d = self.store.release(charge)

        def failed(failure: Failure) -> None:
            log.error(
                "{queue_id}: ratelimit could not give back {count} counter(s): {error}",
                queue_id=queueId,
                count=len(charge),
                error=failure.getErrorMessage(),
            )

        self._track(d.addErrback(failed))

    def _state(self, envelope: Any) -> _Reservations:
        state = envelope.notes.get(self.name)
        if not isinstance(state, _Reservations):
            state = envelope.notes[self.name] = _Reservations()
        return state

    def _settle(self, envelope: Any, state: _Reservations) -> None:
        """
        Give back the reservations of recipients that did not make it into
        C{envelope.recipients} (refused by a later policy or by the server),
        and keep one for each recipient that did.
        """
        kept: list[tuple[Address, Charge]] = []
        seen: set[Address] = set()
        for recipient, charge in state.recipients:
            if recipient in envelope.recipients and recipient not in seen:
                seen.add(recipient)
                kept.append((recipient, charge))
            else:
                self._release(charge, envelope.queueId)
        state.recipients = kept

    def _failed(self, failure: Failure, phase: str, envelope: Any, session: Any = None) -> Verdict:
        action = "accepting" if self.onError == "accept" else "answering 451 4.3.0"
        log.error(
            "{prefix}: ratelimit store failed at {phase}, {action}: {error} session={session_id}",
            phase=phase,
            action=action,
            error=failure.getErrorMessage(),
            **_ids(session, envelope),
        )
        return CONTINUE if self.onError == "accept" else STORE_FAILED

    def _exceeded(
        self,
        counter: _Counter,
        session: SessionView,
        envelope: Envelope,
        phase: str,
        verdict: Verdict,
    ) -> Verdict:
        # At MAIL the transaction has no queue id yet: the session's id leads.
        log.warn(
            "{prefix}: rate limit exceeded at {phase}: {rule} {limit} {kind} for "
            "{what} {value} client=[{client}] session={session_id}",
            **_ids(session, envelope),
            phase=phase,
            rule=counter.rule.name,
            limit=counter.limit.spec,
            kind=counter.kind,
            what=counter.what,
            value=counter.value,
            client=str(session.clientAddress),
        )
        return verdict

    def _ask(
        self,
        call: Callable[[Charge], Deferred[Any]],
        counters: list[_Counter],
        phase: str,
        envelope: Any,
        onRoom: Callable[[], None],
        onFull: Callable[[_Counter], Verdict],
        session: Any = None,
    ) -> Deferred[Verdict]:
        """
        Ask the store; C{onRoom} runs as soon as the store answers (even if
        the chain gave up waiting meanwhile), the verdict goes to the chain.
        """
        answer: Deferred[Verdict] = Deferred()

        def decided(full: int | None) -> None:
            if full is None:
                onRoom()
                verdict = CONTINUE
            else:
                verdict = onFull(counters[full])
            if not answer.called:
                answer.callback(verdict)

        def failed(failure: Failure) -> None:
            verdict = self._failed(failure, phase, envelope, session)
            if not answer.called:
                answer.callback(verdict)

        # Tracked after decided: a release it starts keeps the policy busy.
        self._track(call(self._asks(counters)).addCallbacks(decided, failed))
        return answer

    # --- phases --------------------------------------------------------

    def checkSender(
        self, session: SessionView, envelope: Envelope, sender: Address
    ) -> Deferred[Verdict]:
        """Refuse at once (no charge) when a message limit is already full."""
        counters = self._counters(session, sender, "messages")
        if not counters:
            return succeed(CONTINUE)

        def full(counter: _Counter) -> Verdict:
            text = f"Rate limit exceeded: {counter.describe()}"
            return self._exceeded(counter, session, envelope, "MAIL", tempfail(450, "4.7.1", text))

        return self._ask(self.store.peek, counters, "MAIL", envelope, lambda: None, full, session)

    def checkRecipient(
        self, session: SessionView, envelope: Envelope, recipient: Address
    ) -> Deferred[Verdict]:
        """Reserve one unit of every recipient limit that applies."""
        state = self._state(envelope)
        self._settle(envelope, state)
        if recipient in envelope.recipients:
            return succeed(CONTINUE)  # a repeated RCPT adds no recipient
        counters = self._counters(session, envelope.sender, "recipients")
        if not counters:
            return succeed(CONTINUE)
        charge = self._charge(counters)

        def reserved() -> None:
            if state.ended:
                self._release(charge, envelope.queueId)
            else:
                state.recipients.append((recipient, charge))

        def full(counter: _Counter) -> Verdict:
            text = f"Too many recipients: {counter.describe()}"
            return self._exceeded(counter, session, envelope, "RCPT", tempfail(452, "4.5.3", text))

        return self._ask(self.store.reserve, counters, "RCPT", envelope, reserved, full, session)

    def checkMessage(
        self, session: SessionView, envelope: Envelope, message: Message
    ) -> Deferred[Verdict]:
        """Reserve one unit of every message limit that applies."""
        state = self._state(envelope)
        self._settle(envelope, state)
        counters = self._counters(session, envelope.sender, "messages")
        if not counters:
            return succeed(CONTINUE)
        charge = self._charge(counters)

        def reserved() -> None:
            if state.ended:
                self._release(charge, envelope.queueId)
            else:
                state.message = charge

        def full(counter: _Counter) -> Verdict:
            text = f"Rate limit exceeded: {counter.describe()}"
            return self._exceeded(counter, session, envelope, "DATA", tempfail(450, "4.7.1", text))

        return self._ask(self.store.reserve, counters, "DATA", envelope, reserved, full, session)

    def transactionEnded(self, session: SessionView, envelope: Envelope, queued: bool) -> None:
        """
        Give back everything when the message was not queued; when it was,
        give back what was reserved for recipients refused later.
        """
        state = envelope.notes.get(self.name)
        if not isinstance(state, _Reservations):
            return
        state.ended = True
        if queued:
            self._settle(envelope, state)
            state.recipients, state.message = [], []
            return
        charge: Charge = [c for _, part in state.recipients for c in part] + state.message
        state.recipients, state.message = [], []
        self._release(charge, envelope.queueId)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(f'"{v}"' for v in values)


def _connectionOptions(options: dict[str, Any]) -> dict[str, Any]:
    """
    The keyword arguments for L{relayd.policies.ratecounter.redisClient} from the
    C{redis_*} options: the password read from its file (never logged),
    Sentinels, Cluster and TLS files.
    """
    connection: dict[str, Any] = {}
    for option, name in (
        ("redis_password_file", "password"),
        ("redis_sentinel_password_file", "sentinelPassword"),
    ):
        path = options.get(option)
        if path is None:
            continue
        if not isinstance(path, str) or not path:
            raise PolicyOptionError(option, "must be a file name")
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            problem = getattr(e, "strerror", None) or str(e)
            raise PolicyOptionError(option, f"{path}: {problem}") from None
        if not password:
            raise PolicyOptionError(option, f"{path}: empty")
        connection[name] = password
    sentinels = options.get("redis_sentinels")
    if sentinels is not None:
        if not isinstance(sentinels, list) or not sentinels:
            raise PolicyOptionError("redis_sentinels", 'must be a list like ["10.0.0.5:26379"]')
        parsed = []
        for item in sentinels:
            host, _, port = str(item).rpartition(":")
            if not isinstance(item, str) or not host or not port.isdigit():
                raise PolicyOptionError("redis_sentinels", f"{item!r}: not host:port")
            parsed.append((host.strip("[]"), int(port)))
        connection["sentinels"] = parsed
    service = options.get("redis_sentinel_service", "mymaster")
    if not isinstance(service, str) or not service:
        raise PolicyOptionError("redis_sentinel_service", "must be a name")
    if sentinels is not None:
        connection["sentinelService"] = service
    elif "sentinelPassword" in connection:
        raise PolicyOptionError("redis_sentinel_password_file", "only with redis_sentinels")
    cluster = options.get("redis_cluster", False)
    if not isinstance(cluster, bool):
        raise PolicyOptionError("redis_cluster", "must be true or false")
    if cluster and sentinels is not None:
        raise PolicyOptionError("redis_cluster", "not with redis_sentinels")
    if cluster:
        connection["cluster"] = True
    for option, name in (
        ("redis_tls_ca_file", "caFile"),
        ("redis_tls_cert_file", "certFile"),
        ("redis_tls_key_file", "keyFile"),
    ):
        value = options.get(option)
        if value is None:
            continue
        if not isinstance(value, str) or not os.path.isfile(value):
            raise PolicyOptionError(option, f"{value!r}: no such file")
        connection[name] = value
    return connection


def _parseRules(value: Any) -> list[Rule]:
    if value is None:
        raise PolicyOptionError("rules", "at least one rule is required")
    if not isinstance(value, list) or not value:
        raise PolicyOptionError(
            "rules", 'must be a list of tables like [{name = "per-user", key = "user", ...}]'
        )
    rules = []
    names: set[str] = set()
    for i, table in enumerate(value):
        where = f"rules[{i}]"
        if not isinstance(table, dict):
            raise PolicyOptionError(where, "must be a table {name = ..., key = ..., ...}")
        for key in sorted(table):
            if key not in RULE_OPTIONS:
                raise PolicyOptionError(
                    f"{where}.{key}", f"unknown option (known: {', '.join(RULE_OPTIONS)})"
                )
        name = table.get("name")
        if not isinstance(name, str) or not _RULE_NAME.match(name):
            raise PolicyOptionError(
                f"{where}.name", "required: letters, digits, '.', '_' or '-' (64 at most)"
            )
        if name in names:
            raise PolicyOptionError(f"{where}.name", f"duplicate rule name {name!r}")
        names.add(name)
        key = table.get("key")
        if key not in KEYS:
            raise PolicyOptionError(f"{where}.key", f"must be one of {_choices(KEYS)}")
        prefixes = {}
        for option, top in (("prefix_v4", 32), ("prefix_v6", 128)):
            if option not in table:
                prefixes[option] = top
                continue
            if key != "client":
                raise PolicyOptionError(f"{where}.{option}", 'only for key = "client"')
            prefix = table[option]
            if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= top:
                raise PolicyOptionError(f"{where}.{option}", f"must be an integer 0 to {top}")
            prefixes[option] = prefix
        limits = {}
        for kind in ("messages", "recipients"):
            specs = table.get(kind, [])
            if not isinstance(specs, list):
                raise PolicyOptionError(f"{where}.{kind}", 'must be a list like ["100/hour"]')
            parsed: list[Limit] = []
            for spec in specs:
                try:
                    limit = parseLimit(spec)
                except ValueError as e:
                    raise PolicyOptionError(f"{where}.{kind}", str(e)) from None
                if any(p.window == limit.window for p in parsed):
                    raise PolicyOptionError(
                        f"{where}.{kind}", f"{spec!r}: two limits with the same window"
                    )
                parsed.append(limit)
            limits[kind] = tuple(parsed)
        if not limits["messages"] and not limits["recipients"]:
            raise PolicyOptionError(where, "needs messages or recipients limits (or both)")
        burst = table.get("burst")
        badBurst = isinstance(burst, bool) or not isinstance(burst, int) or burst < 1
        if burst is not None and badBurst:
            raise PolicyOptionError(f"{where}.burst", "must be a positive integer")
        rules.append(
            Rule(
                name,
                key,
                limits["messages"],
                limits["recipients"],
                prefixes["prefix_v4"],
                prefixes["prefix_v6"],
                burst,
            )
        )
    return rules


def _haveRedis() -> bool:
    """redis-py is an optional extra (C{relayd[redis]}): is it installed?"""
    import importlib.util

    return importlib.util.find_spec("redis") is not None
