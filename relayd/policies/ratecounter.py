"""
GCRA rate limiters for the C{ratelimit} policy and the AUTH lockout:
L{MemoryStore} (one process) and L{RedisStore} (shared by every relayd
using the same Redis), with one and the same arithmetic.

Both implement L{relayd.interfaces.IRateCounterStore}.  A limit of
C{limit} per C{window} seconds is a GCRA (generic cell rate algorithm, the
leaky bucket as a meter, as in redis-cell and KumoMTA's throttles): each
key keeps one number, its theoretical arrival time (TAT).  One unit costs
the emission interval C{T = window / limit}; a request of C{amount} units
at time C{now} fits when C{max(TAT, now) + amount * T - now <= burst * T},
and then that becomes the new TAT.  So C{burst} units (by default the
whole C{limit}) may go at once, after which the bucket refills at one unit
every C{T} seconds.  Unlike fixed windows aligned to the clock, which let
a client send C{2 * limit} in two seconds around a window boundary, no
span of time is special: at most C{burst} units pass in an instant, and at
most C{limit + burst - 1} in any C{window} seconds.

Giving back C{amount} units (a reservation for a message that was not
accepted) moves the TAT back by C{amount * T}, never before C{now}.  A key
whose TAT is past is equivalent to no key at all: the memory store drops
it, and Redis expires it at its TAT.

Either every limiter of a L{reserve} call has room and all are charged,
or none is: a message that passes a per-user limit but not a per-network
one must not be charged to the user.

Times are milliseconds as floating point numbers in both stores, so the
Lua script and the Python code compute the same thing.

L{redisClient} builds the redis-py client from the configuration: a URL
(C{redis://}, C{rediss://} with TLS, C{unix://}), an ACL user and a
password (from a file), Sentinel or Cluster, with timeouts on every call.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayd.interfaces import IRateCounterStore

__all__ = [
    "MemoryStore",
    "RedisStore",
    "RateStoreError",
    "WallClock",
    "fits",
    "redisClient",
    "unitsUsed",
    "withoutPassword",
]

Ask = tuple[Any, ...]
"""C{(key, amount, limit, windowSeconds)} or C{(..., burst)}."""


class WallClock:
    """The system clock as an C{IReactorTime}-like C{seconds()} provider."""

    def seconds(self) -> float:
        return time.time()


def withoutPassword(url: str) -> str:
    """C{url} fit for a log line: any user name and password dropped."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(
        p
        for p in parts.query.split("&")
        if p.split("=", 1)[0].lower() not in ("password", "username")
    )
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")


class RateStoreError(Exception):
    """The counter store could not answer (Redis down, too slow, ...)."""


def _terms(ask: Ask) -> tuple[int, float, float]:
    """C{(amount, interval, tolerance)} of one ask, in milliseconds."""
    amount, limit, window = int(ask[1]), int(ask[2]), int(ask[3])
    burst = int(ask[4]) if len(ask) > 4 else limit
    interval = window * 1000.0 / limit
    return amount, interval, max(1, min(burst, limit)) * interval


def fits(tat: float, now: float, amount: int, interval: float, tolerance: float) -> bool:
    """
    Whether C{amount} more units fit a limiter whose TAT is C{tat} at
    C{now} (milliseconds): the rule of L{RESERVE_SCRIPT}, in Python.
    """
    return max(tat, now) + amount * interval - now <= tolerance


def unitsUsed(tat: float, now: float, interval: float) -> int:
    """How many units a limiter with TAT C{tat} holds at C{now} (ms)."""
    if tat <= now:
        return 0
    return math.ceil((tat - now) / interval - 1e-9)


@implementer(IRateCounterStore)
class MemoryStore:
    """
    Limiters in a dict, exact within one process, with no thread and no I/O.

    A limiter is forgotten once its TAT is past (a heap orders them), so
    memory is bounded by the number of keys charged within the longest
    window.

    @ivar clock: provides C{seconds()}; a L{twisted.internet.task.Clock}
        in tests.
    """

    def __init__(self, clock: Any = None) -> None:
        self.clock = WallClock() if clock is None else clock
        self._tats: dict[str, tuple[float, float]] = {}
        self._ends: list[tuple[float, str]] = []

    def _now(self) -> float:
        return float(self.clock.seconds()) * 1000.0

    def __len__(self) -> int:
        """How many limiters are held (those at rest are dropped)."""
        self._expire()
        return len(self._tats)

    def value(self, key: str) -> int:
        """The units limiter C{key} holds now (0 if unknown or at rest)."""
        self._expire()
        found = self._tats.get(key)
        return 0 if found is None else unitsUsed(found[0], self._now(), found[1])

    def _expire(self) -> None:
        now = self._now()
        while self._ends and self._ends[0][0] <= now:
            _, key = heapq.heappop(self._ends)
            found = self._tats.get(key)
            if found is not None and found[0] <= now:
                del self._tats[key]

    def _full(self, counters: list[Ask]) -> int | None:
        now = self._now()
        for index, ask in enumerate(counters):
            amount, interval, tolerance = _terms(ask)
            tat = self._tats.get(ask[0], (now, interval))[0]
            if not fits(tat, now, amount, interval, tolerance):
                return index
        return None

    def reserve(self, counters: list[Ask]) -> Deferred[Any]:
        self._expire()
        full = self._full(counters)
        if full is not None:
            return succeed(full)
        now = self._now()
        for ask in counters:
            amount, interval, _ = _terms(ask)
            tat = max(self._tats.get(ask[0], (now, interval))[0], now) + amount * interval
            self._tats[ask[0]] = (tat, interval)
            heapq.heappush(self._ends, (tat, ask[0]))
        return succeed(None)

    def peek(self, counters: list[Ask]) -> Deferred[Any]:
        self._expire()
        return succeed(self._full(counters))

    def release(self, counters: list[Ask]) -> Deferred[None]:
        self._expire()
        now = self._now()
        for ask in counters:
            found = self._tats.get(ask[0])
            if found is None:
                continue
            amount, interval, _ = _terms(ask)
            tat = found[0] - amount * interval
            if tat <= now:
                del self._tats[ask[0]]
            else:
                self._tats[ask[0]] = (tat, interval)
        return succeed(None)


# KEYS: the limiters.  ARGV[1]: now (ms); then amount, interval and
# tolerance (ms) for each key in turn.  Returns 0 when reserved, else the
# 1-based index of the first full limiter.  Keys are read and written by
# the script alone, so Redis runs it atomically: two relayd instances can
# never both take the last unit.  Each key expires at its TAT, when it
# would mean no more than a missing key.
RESERVE_SCRIPT = """
local now = tonumber(ARGV[1])
local tats = {}
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i - 1])
  local interval = tonumber(ARGV[3 * i])
  local tolerance = tonumber(ARGV[3 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tat = tat + amount * interval
  if tat - now > tolerance then
    return i
  end
  tats[i] = tat
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.3f', tats[i]),
             'PX', math.max(1, math.ceil(tats[i] - now)))
end
return 0
"""

# KEYS: the limiters.  ARGV[1]: now (ms); then amount and interval for each
# key.  Moves each TAT back by amount * interval, never before now; a key
# at rest is deleted, one that expired meanwhile is not created again.
RELEASE_SCRIPT = """
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > now then
    tat = tat - tonumber(ARGV[2 * i]) * tonumber(ARGV[2 * i + 1])
    if tat <= now then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], string.format('%.3f', tat),
                 'PX', math.max(1, math.ceil(tat - now)))
    end
  end
end
return 0
"""


def redisClient(
    url: str,
    timeout: float,
    *,
    password: str | None = None,
    sentinels: list[tuple[str, int]] | None = None,
    sentinelService: str = "mymaster",
    sentinelPassword: str | None = None,
    cluster: bool = False,
    caFile: str | None = None,
    certFile: str | None = None,
    keyFile: str | None = None,
) -> Any:
    """
    A redis-py client for C{url}, every call bounded by C{timeout}.

    @param url: C{redis://[[user]:password@]host[:port][/db]},
        C{rediss://...} (TLS), or C{unix:///path?db=N}.  With C{sentinels}
        only its scheme, user, password and database are used: the host is
        the primary the Sentinels name.  With C{cluster}, its host is one of
        the cluster's nodes (the others are discovered).
    @param password: overrides the URL's (read from C{redis_password_file}).
    @param sentinels: C{(host, port)} of Sentinels: ask them for the
        primary of C{sentinelService} (and again after a failover).
    @param sentinelPassword: for Sentinels with C{requirepass}.
    @param cluster: talk to a Redis Cluster.
    @param caFile: the CA certificates to verify a TLS server with (else
        the system's).
    @param certFile: a client certificate for TLS, with C{keyFile}.
    @raise ValueError: for a URL redis-py cannot use.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.retry import Retry

    # parse_url raises ValueError for a scheme it does not know.
    # redis-py leaves this unannotated.
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No retries: a retried increment could count twice.
        "retry": Retry(NoBackoff(), 0),
    }
    if password is not None:
        options["password"] = password
    tls = url.lower().startswith("rediss:")
    if tls:
        for option, value in (
            ("ssl_ca_certs", caFile),
            ("ssl_certfile", certFile),
            ("ssl_keyfile", keyFile),
        ):
            if value is not None:
                options[option] = value
    if cluster:
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    try:
        from redis.maint_notifications import MaintNotificationsConfig

        # Off: maintenance notifications may relax the timeouts.
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    except ImportError:  # pragma: no cover - redis-py before 7
        pass
    options["client_name"] = "relayd"
    if sentinels:
        from redis.sentinel import Sentinel

        for key in ("username", "password", "db"):
            if key in parsed and key not in options:
                options[key] = parsed[key]
        if tls:
            options["ssl"] = True
        # Through Any: redis-py annotates Sentinel from 8.x on, not before
        # (setup.cfg takes >= 5.0), and an ignore would be unused on one.
        sentinelType: Any = Sentinel
        sentinel = sentinelType(
            sentinels,
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "password": sentinelPassword,
            },
            **{k: v for k, v in options.items() if k != "maint_notifications_config"},
        )
        return sentinel.master_for(sentinelService)
    return redis.Redis.from_url(url, **options)


@implementer(IRateCounterStore)
class RedisStore:
    """
    Limiters in Redis, shared by every relayd that uses the same server, so
    a limit holds across the instances behind a load balancer.

    Each update is one Lua script (L{RESERVE_SCRIPT}, L{RELEASE_SCRIPT}),
    atomic on the server.  With Redis Cluster the keys of one call must
    share a hash slot: the callers put one hash tag (C{{...}}) in all
    their keys.

    redis-py's synchronous client runs in a L{ThreadPool} owned by this
    store (as relayd's DNS resolver does with dnspython): it fits Twisted
    without switching the daemon to the asyncio reactor, and redis-py is
    the maintained client (txredisapi barely is).  Every call is bounded:
    the socket connect and read timeouts are C{timeout}, redis-py's retries
    are off (a retried increment could count twice), and a call that
    waited longer than C{timeout} for a free thread is not sent at all.
    After an outage the next call simply connects again.

    The client is made at the first call, in a thread of the pool: a
    Cluster client connects as it is made, and a Cluster that is down at
    startup must give C{on_error}, like one that goes down later, not stop
    relayd.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        threads: int = 4,
        clock: Any = None,
        **connection: Any,
    ) -> None:
        """
        @param url: see L{redisClient}.
        @param timeout: seconds; bounds connecting, each reply, and the
            wait for a thread.
        @param threads: the most Redis calls under way at once.
        @param clock: provides C{seconds()}, the time the limiters use.
        @param connection: more keyword arguments for L{redisClient}.
        @raise ValueError: for a URL redis-py cannot use.
        """
        self.url = url
        self.where = withoutPassword(url)
        self.timeout = timeout
        self.threads = threads
        self.clock = WallClock() if clock is None else clock
        self.cluster = bool(connection.get("cluster"))
        if connection.get("sentinels"):
            names = ",".join(f"{h}:{p}" for h, p in connection["sentinels"])
            self.where = f"sentinel {names} service {connection.get('sentinelService')}"
        # Checked now, so that a bad URL stops startup with one line.
        from redis.connection import parse_url

        # redis-py leaves this unannotated.
        parse_url(url)  # type: ignore[no-untyped-call]
        self._connection = connection
        self._client: Any = None
        self._reserve: Any = None
        self._release: Any = None
        self._lock = threading.Lock()
        self._reactor: Any = None
        self._pool: ThreadPool | None = None

    @property
    def client(self) -> Any:
        """
        The redis-py client, made at first use (blocking: call it from
        the pool's threads, or from tests and tools).
        """
        with self._lock:
            if self._client is None:
                client = redisClient(self.url, self.timeout, **self._connection)
                self._reserve = client.register_script(RESERVE_SCRIPT)
                self._release = client.register_script(RELEASE_SCRIPT)
                self._client = client
            return self._client

    def start(self, reactor: Any) -> None:
        """Start the thread pool; C{reactor} delivers the results."""
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="relayd-ratelimit")
        self._pool.start()

    def stop(self) -> None:
        """
        Stop the thread pool (a call under way finishes first, within the
        timeout) and close the connections.  Calls after this fail.
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _call(self, function: Any, *args: Any) -> Deferred[Any]:
        pool = self._pool
        if pool is None:
            return fail(RateStoreError("Redis store is not running"))
        deadline = time.monotonic() + self.timeout

        def work() -> Any:
            if time.monotonic() > deadline:
                raise RateStoreError("no thread free for Redis within the timeout")
            try:
                return function(self.client, *args)
            except Exception as e:
                # redis.RedisError and OSError alike: one error type for the
                # policy, the cause in the text for the log line.
                raise RateStoreError(f"Redis {self.where}: {type(e).__name__}: {e}") from e

        return deferToThreadPool(self._reactor, pool, work)

    def _now(self) -> float:
        return float(self.clock.seconds()) * 1000.0

    def reserve(self, counters: list[Ask]) -> Deferred[Any]:
        if not counters:
            return succeed(None)
        keys = [c[0] for c in counters]
        args: list[Any] = [repr(self._now())]
        for ask in counters:
            amount, interval, tolerance = _terms(ask)
            args += [amount, repr(interval), repr(tolerance)]

        def answer(full: Any) -> int | None:
            return int(full) - 1 if int(full) else None

        return self._call(lambda _: self._reserve(keys, args)).addCallback(answer)

    def peek(self, counters: list[Ask]) -> Deferred[Any]:
        if not counters:
            return succeed(None)
        now = self._now()

        def answer(values: list[Any]) -> int | None:
            for index, (ask, value) in enumerate(zip(counters, values, strict=True)):
                amount, interval, tolerance = _terms(ask)
                if not fits(float(value or 0), now, amount, interval, tolerance):
                    return index
            return None

        keys = [c[0] for c in counters]
        if self.cluster:
            # MGET over several slots is refused by a cluster; one slot is
            # what the callers' hash tags give, and a GET each is as good.
            return self._call(lambda c: [c.get(k) for k in keys]).addCallback(answer)
        return self._call(lambda c: c.mget(keys)).addCallback(answer)

    def release(self, counters: list[Ask]) -> Deferred[None]:
        if not counters:
            return succeed(None)
        keys = [c[0] for c in counters]
        args: list[Any] = [repr(self._now())]
        for ask in counters:
            amount, interval, _ = _terms(ask)
            args += [amount, repr(interval)]
        return self._call(lambda _: self._release(keys, args)).addCallback(lambda _: None)

    def used(self, key: str, limit: int, window: int) -> int:
        """
        The units limiter C{key} holds now, read at once (blocking: for
        tests and tools, not for the reactor thread).
        """
        value = self.client.get(key)
        interval = window * 1000.0 / limit
        return 0 if value is None else unitsUsed(float(value), self._now(), interval)
