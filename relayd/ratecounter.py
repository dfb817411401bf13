"""
Fixed-window counters for the C{ratelimit} policy: L{MemoryStore} (one
process) and L{RedisStore} (shared by every relayd using the same Redis).

Both implement L{relayd.interfaces.IRateCounterStore}.  A counter is named
by a key that already contains the start of its window (windows are aligned
to the epoch, see L{windowStart}), so a new window is simply a new key and
an old one only has to be forgotten once its window is over: the memory
store drops it, Redis expires it.

Either every counter of a L{reserve} call has room and all are increased,
or none is: a message that passes a per-user limit but not a per-network
one must not be charged to the user.
"""

from __future__ import annotations

import heapq
import math
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
    "windowStart",
    "withoutPassword",
    "windowEnd",
]


class WallClock:
    """The system clock as an C{IReactorTime}-like C{seconds()} provider."""

    def seconds(self) -> float:
        return time.time()


def windowStart(now: float, window: int) -> int:
    """
    The start of the fixed window of C{window} seconds that holds C{now}.

    Windows are aligned to the Unix epoch (a day window starts at 00:00
    UTC), so every relayd sharing a store agrees on them, and the moment a
    limit resets is known exactly.
    """
    return int(now // window) * window


def windowEnd(now: float, window: int) -> int:
    """The end of the window that holds C{now} (the start of the next)."""
    return windowStart(now, window) + window


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


@implementer(IRateCounterStore)
class MemoryStore:
    """
    Counters in a dict, exact within one process, with no thread and no I/O.

    Every counter is forgotten when its window ends (a heap orders them by
    end), so memory is bounded by the number of distinct keys used within
    the longest window.

    @ivar clock: provides C{seconds()}; a L{twisted.internet.task.Clock}
        in tests.
    """

    def __init__(self, clock: Any = None) -> None:
        self.clock = WallClock() if clock is None else clock
        self._counts: dict[str, int] = {}
        self._ends: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """How many counters are held (old windows are dropped)."""
        self._expire()
        return len(self._counts)

    def value(self, key: str) -> int:
        """The current value of counter C{key} (0 if unknown or expired)."""
        self._expire()
        return self._counts.get(key, 0)

    def _expire(self) -> None:
        now = self.clock.seconds()
        while self._ends and self._ends[0][0] <= now:
            _, key = heapq.heappop(self._ends)
            self._counts.pop(key, None)

    def _full(self, counters: list[tuple[str, int, int, int]]) -> int | None:
        for index, (key, amount, limit, _) in enumerate(counters):
            if self._counts.get(key, 0) + amount > limit:
                return index
        return None

    def reserve(self, counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        self._expire()
        full = self._full(counters)
        if full is not None:
            return succeed(full)
        now = self.clock.seconds()
        for key, amount, _, window in counters:
            if key not in self._counts:
                self._counts[key] = 0
                heapq.heappush(self._ends, (windowEnd(now, window), key))
            self._counts[key] += amount
        return succeed(None)

    def peek(self, counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        self._expire()
        return succeed(self._full(counters))

    def release(self, counters: list[tuple[str, int, int]]) -> Deferred[None]:
        self._expire()
        for key, amount, _ in counters:
            if key in self._counts:
                self._counts[key] = max(0, self._counts[key] - amount)
        return succeed(None)


# KEYS: the counters.  ARGV: amount, limit and milliseconds to the end of
# the window, for each key in turn.  Returns 0 when reserved, else the
# 1-based index of the first full counter.  Keys are read and written by
# the script alone, so Redis runs it atomically: two relayd instances can
# never both take the last unit.
RESERVE_SCRIPT = """
local n = #KEYS
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) then
    return i
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
  redis.call('PEXPIRE', KEYS[i], ARGV[3 * i])
end
return 0
"""

# KEYS: the counters.  ARGV: the amount to give back for each.  A counter
# never goes below 0, and one that expired meanwhile is not created again
# (DECRBY keeps the expiry of a key that exists).
RELEASE_SCRIPT = """
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current > 0 then
    redis.call('DECRBY', KEYS[i], math.min(current, tonumber(ARGV[i])))
  end
end
return 0
"""


@implementer(IRateCounterStore)
class RedisStore:
    """
    Counters in Redis, shared by every relayd that uses the same server, so
    a limit holds across the instances behind a load balancer.

    Each update is one Lua script (L{RESERVE_SCRIPT}, L{RELEASE_SCRIPT}),
    atomic on the server; every key gets an expiry at the end of its
    window, so Redis forgets old windows by itself.

    redis-py's synchronous client runs in a L{ThreadPool} owned by this
    store (as relayd's DNS resolver does with dnspython): it fits Twisted
    without switching the daemon to the asyncio reactor, and redis-py is
    the maintained client (txredisapi barely is).  Every call is bounded:
    the socket connect and read timeouts are C{timeout}, redis-py's retries
    are off (a retried increment could count twice), and a call that
    waited longer than C{timeout} for a free thread is not sent at all.

    A single Redis server (or a primary with replicas) is expected: the
    keys of one call belong to different hash slots, which Redis Cluster
    refuses in one script.
    """

    def __init__(
        self,
        url: str,
        timeout: float = 0.5,
        threads: int = 4,
        clock: Any = None,
    ) -> None:
        """
        @param url: C{redis://[[user]:password@]host[:port][/db]},
            C{rediss://...} (TLS) or C{unix:///path?db=N}.
        @param timeout: seconds; bounds connecting, each reply, and the
            wait for a thread.
        @param threads: the most Redis calls under way at once.
        @param clock: provides C{seconds()}, used for key expiry.
        @raise ValueError: for a URL redis-py cannot use.
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.where = withoutPassword(url)
        self.timeout = timeout
        self.threads = threads
        self.clock = WallClock() if clock is None else clock
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "relayd",
        }
        try:
            from redis.maint_notifications import MaintNotificationsConfig

            # Off: maintenance notifications may relax the timeouts.
            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        except ImportError:  # pragma: no cover - redis-py before 7
            pass
        self.client = redis.Redis.from_url(url, **options)
        self._reserve = self.client.register_script(RESERVE_SCRIPT)
        self._release = self.client.register_script(RELEASE_SCRIPT)
        self._reactor: Any = None
        self._pool: ThreadPool | None = None

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
        self.client.close()

    def _call(self, function: Any, *args: Any) -> Deferred[Any]:
        pool = self._pool
        if pool is None:
            return fail(RateStoreError("Redis store is not running"))
        deadline = time.monotonic() + self.timeout

        def work() -> Any:
            if time.monotonic() > deadline:
                raise RateStoreError("no thread free for Redis within the timeout")
            try:
                return function(*args)
            except Exception as e:
                # redis.RedisError and OSError alike: one error type for the
                # policy, the cause in the text for the log line.
                raise RateStoreError(f"Redis {self.where}: {type(e).__name__}: {e}") from e

        return deferToThreadPool(self._reactor, pool, work)

    def _ttls(self, counters: list[tuple[str, int, int, int]]) -> list[int]:
        now = self.clock.seconds()
        return [max(1, math.ceil((windowEnd(now, c[3]) - now) * 1000)) for c in counters]

    def reserve(self, counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        if not counters:
            return succeed(None)
        keys = [c[0] for c in counters]
        args: list[int] = []
        for (_, amount, limit, _), ttl in zip(counters, self._ttls(counters), strict=True):
            args += [amount, limit, ttl]

        def answer(full: Any) -> int | None:
            return int(full) - 1 if int(full) else None

        return self._call(self._reserve, keys, args).addCallback(answer)

    def peek(self, counters: list[tuple[str, int, int, int]]) -> Deferred[Any]:
        if not counters:
            return succeed(None)

        def answer(values: list[Any]) -> int | None:
            for index, ((_, amount, limit, _), value) in enumerate(
                zip(counters, values, strict=True)
            ):
                if int(value or 0) + amount > limit:
                    return index
            return None

        return self._call(self.client.mget, [c[0] for c in counters]).addCallback(answer)

    def release(self, counters: list[tuple[str, int, int]]) -> Deferred[None]:
        if not counters:
            return succeed(None)
        keys = [c[0] for c in counters]
        amounts = [c[1] for c in counters]
        return self._call(self._release, keys, amounts).addCallback(lambda _: None)
