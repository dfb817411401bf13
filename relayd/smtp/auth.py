"""
SMTP AUTH through L{twisted.cred}: a users file of bcrypt hashes, its
checker, the realm and the portal.

The users file holds one C{user:hash} line per user, as written by
C{htpasswd -B} (Apache) or by C{relayd-passwd}; blank lines and lines
starting with C{#} are ignored.  Hashes are bcrypt in any of its common
spellings (C{$2a$}, C{$2b$}, C{$2y$}: one algorithm under three names).

Why bcrypt, and why in a thread pool: a password hash must be slow to make
a stolen users file expensive to attack, and a slow computation on the
reactor thread would stall every other connection.  So every verification
runs in the thread pool handed to L{UsersFileChecker}, and the reactor
thread only looks names up in a dict and stats the file.

No user enumeration (DESIGN.md section 4, rule 6): an unknown user costs
the same bcrypt work as a known one, against a dummy hash of the usual
cost, and fails with the same L{UnauthorizedLogin}.

Password guessing over many connections: L{Lockout} counts failures per
client address and per user name at that address, across connections (and
across relayd instances when they share a Redis), so the server can refuse
AUTH for a while before any password is checked.
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Iterable
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import Interface, implementer

from relayd.interfaces import IRateCounterStore
from relayd.ops.logs import Logger
from relayd.policies.ratecounter import MemoryStore, RedisStore
from relayd.queue.safeio import writeAtomically

__all__ = [
    "IMailUser",
    "UsersFileError",
    "UsersFile",
    "UsersFileChecker",
    "Realm",
    "makePortal",
    "hashPassword",
    "setPassword",
    "checkUsername",
    "Lockout",
    "DEFAULT_ROUNDS",
    "MAX_PASSWORD_BYTES",
]

_log = Logger()

DEFAULT_ROUNDS = 12
"""
The bcrypt cost (log2 of the number of rounds) for new hashes: about a
quarter of a second on a current CPU, the usual recommendation.
"""

MAX_PASSWORD_BYTES = 72
"""
bcrypt only ever reads the first 72 octets of a password.  bcrypt 5 refuses
longer input; L{hashPassword} refuses it too, so that no password is
silently shortened when it is set.
"""

_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")

# The salt and digest of a bcrypt hash of a random password, forgotten at
# once.  Put behind any cost prefix it is a well-formed hash that
# bcrypt.checkpw works on for the full cost and that no password matches,
# which is all an unknown user's attempt needs.  Making it costs one cost-4
# hash (about a millisecond) at import, instead of a full-cost hash on the
# reactor thread at every reload.
_DUMMY_SALT_AND_DIGEST = bcrypt.hashpw(os.urandom(32).hex().encode("ascii"), bcrypt.gensalt(4))[
    7:
].decode("ascii")


class IMailUser(Interface):
    """
    What an authenticated SMTP client is logged in as.

    Marker interface: the avatar that L{Realm} returns for it is simply the
    user name as a C{str}, which is all the server needs (for
    L{relayd.envelope.Session.user}, the C{Received:} header and the
    C{authenticated} policy).  It exists so that C{Portal.login} can be
    asked for something more specific than C{Interface}.
    """


class UsersFileError(Exception):
    """
    The users file cannot be used: missing, unreadable or malformed.

    @ivar path: the users file's path.
    @ivar problem: one short line saying what is wrong; for a malformed
        line it starts with C{"line N: "}.  It never quotes a hash.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def checkUsername(username: str) -> None:
    """
    Refuse a user name that cannot be stored in a users file line.

    A name is compared exactly (case-sensitive) at login.  It may not be
    empty, contain C{:} (the field separator) or control characters (a line
    break would start a new line), start with C{#} (a comment) or start or
    end with white space (invisible in the file, so a likely mistake).

    @raise ValueError: with the reason.
    """
    if not username:
        raise ValueError("user name is empty")
    if ":" in username:
        raise ValueError("user name contains ':'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ValueError("user name contains a control character")
    if username.startswith("#"):
        raise ValueError("user name starts with '#'")
    if username != username.strip():
        raise ValueError("user name starts or ends with white space")


def _splitLines(data: bytes) -> list[bytes]:
    """
    Split C{data} after each LF, keeping the line ends so that a rewrite
    can put every untouched line back byte for byte.
    """
    lines = data.split(b"\n")
    result = [line + b"\n" for line in lines[:-1]]
    if lines[-1]:
        result.append(lines[-1])
    return result


def _parseUsers(path: str, data: bytes) -> dict[str, str]:
    """
    Parse the contents of a users file.

    @return: user name to hash.
    @raise UsersFileError: naming the first malformed line by number.
    """
    users: dict[str, str] = {}
    firstSeen: dict[str, int] = {}
    for number, raw in enumerate(_splitLines(data), start=1):
        try:
            line = raw.rstrip(b"\r\n").decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(path, f"line {number}: not valid UTF-8") from None
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if not sep:
            raise UsersFileError(path, f"line {number}: expected 'user:bcrypt-hash', found no ':'")
        try:
            checkUsername(username)
        except ValueError as e:
            raise UsersFileError(path, f"line {number}: {e}") from None
        match = _BCRYPT_HASH.match(hashed.strip())
        if match is None or not 4 <= int(match.group(1)) <= 31:
            raise UsersFileError(
                path,
                f"line {number}: the hash for user {username!r} is not a bcrypt "
                "hash ($2a$, $2b$ or $2y$, as made by 'htpasswd -B' or "
                "relayd-passwd)",
            )
        if username in users:
            raise UsersFileError(
                path,
                f"line {number}: user {username!r} already defined on line {firstSeen[username]}",
            )
        users[username] = hashed.strip()
        firstSeen[username] = number
    return users


def _dummyHashFor(users: dict[str, str]) -> bytes:
    """
    Build the hash an unknown user's password is checked against: the cost
    most hashes in the file have (the higher one on a tie), or
    L{DEFAULT_ROUNDS} for an empty file, so that an unknown user takes as
    long as a typical known one.
    """
    costs = collections.Counter(int(h[4:6]) for h in users.values())
    if costs:
        cost = max(costs, key=lambda c: (costs[c], c))
    else:
        cost = DEFAULT_ROUNDS
    return f"$2b${cost:02d}${_DUMMY_SALT_AND_DIGEST}".encode("ascii")


_Signature = tuple[int, int, int, int]

_NEVER = object()
"""Stands for "no failed reload since the last good one"."""


def _signature(st: os.stat_result) -> _Signature:
    """
    What tells one version of the file from the next: device and inode
    change on an atomic rename (L{setPassword}, C{htpasswd}), size and
    mtime on an edit in place.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _readUsersFile(path: str) -> tuple[dict[str, str], _Signature]:
    """
    Read and parse the users file.

    The signature comes from the open file, so it describes exactly the
    bytes parsed even when the file is replaced meanwhile.

    @raise UsersFileError: missing, unreadable or malformed.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UsersFileError(path, "not a regular file")
            data = f.read()
    except FileNotFoundError:
        raise UsersFileError(path, "no such file") from None
    except OSError as e:
        raise UsersFileError(path, f"cannot read: {e.strerror or e}") from None
    return _parseUsers(path, data), _signature(st)


class UsersFile:
    """
    The users file, kept in memory and reloaded when it changes.

    At most once per C{checkInterval} seconds a lookup stats the file; when
    its device, inode, size or mtime changed, it is read again, so that
    C{relayd-passwd} or C{htpasswd} take effect without a restart.

    A reload that fails (the file went missing or has a malformed line)
    keeps the last good contents and logs the error once per change of the
    file: the same choice as a daemon refusing a bad configuration reload,
    and it does not lock every user out because of one typo.

    Only used from the reactor thread; the file is small and a stat is
    cheap, so neither blocks it noticeably.

    @ivar path: the file's path.
    @ivar dummyHash: the hash (bytes) to check unknown users against.
    """

    def __init__(self, path: str, clock: Any, checkInterval: float = 1.0) -> None:
        """
        Load the file.

        @param path: the users file.
        @param clock: an L{IReactorTime} provider, for the reload interval.
        @param checkInterval: the least number of seconds between two stats.
        @raise UsersFileError: if the file is missing, unreadable or
            malformed; startup stops with this one line.
        """
        self.path = path
        self._clock = clock
        self._checkInterval = checkInterval
        self._users, self._loaded = _readUsersFile(path)
        self.dummyHash = _dummyHashFor(self._users)
        self._failed: object = _NEVER
        self._lastCheck = clock.seconds()

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def refresh(self) -> None:
        """
        Reload the file if it changed, at most once per check interval.
        """
        now = self._clock.seconds()
        if now - self._lastCheck < self._checkInterval:
            return
        self._lastCheck = now
        try:
            current: _Signature | None = _signature(os.stat(self.path))
        except OSError:
            current = None
        if current == self._loaded or current == self._failed:
            # Unchanged, or still in the state a reload already failed on
            # (None: missing), which was logged then.
            return
        try:
            users, signature = _readUsersFile(self.path)
        except UsersFileError as e:
            _log.error(
                "Users file not reloaded, keeping the {count} users loaded before: {problem}",
                count=len(self._users),
                problem=str(e),
            )
            self._failed = current
            return
        self._users, self._loaded = users, signature
        self._failed = _NEVER
        self.dummyHash = _dummyHashFor(users)
        _log.info(
            "Users file {path} reloaded: {count} users",
            path=self.path,
            count=len(users),
        )

    def hashFor(self, username: str) -> bytes | None:
        """
        Return the stored hash for C{username} (exact, case-sensitive
        match), or None if there is no such user; reload first if due.
        """
        self.refresh()
        hashed = self._users.get(username)
        return None if hashed is None else hashed.encode("ascii")


def _checkPassword(password: bytes, hashed: bytes) -> bool:
    """
    Run bcrypt: True if C{password} matches C{hashed}.  Called in a thread
    pool thread, never on the reactor thread.

    The password is cut to L{MAX_PASSWORD_BYTES} as every bcrypt (and
    C{htpasswd -B}) did before bcrypt 5 made longer input an error, so a
    long password set with C{htpasswd} still works.
    """
    try:
        return bcrypt.checkpw(password[:MAX_PASSWORD_BYTES], hashed)
    except ValueError:
        return False


def _asText(value: object) -> str | None:
    """A user name from credentials (bytes from the wire, or str)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _asBytes(value: object) -> bytes | None:
    """A password from credentials (bytes from the wire, or str)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return None


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """
    Check user names and passwords against a L{UsersFile}.

    The avatar id is the user name as a C{str}.

    @ivar usersFile: the L{UsersFile}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, threadpool: Any, reactor: Any) -> None:
        """
        @param path: the users file.
        @param threadpool: the started L{twisted.python.threadpool.ThreadPool}
            bcrypt runs in.  Its size bounds how many verifications run at
            once, and so how much CPU password guessing can take.
        @param reactor: provides L{IReactorFromThreads} (to return the
            result) and L{IReactorTime} (for the reload interval).
        @raise UsersFileError: if the file is missing, unreadable or
            malformed.
        """
        self.usersFile = UsersFile(path, reactor)
        self._threadpool = threadpool
        self._reactor = reactor

    # Twisted annotates avatar ids as bytes; relayd's are the user name as str.
    def requestAvatarId(self, credentials: Any) -> Deferred[str]:  # type: ignore[override]
        """
        Verify C{credentials} in the thread pool.

        @param credentials: an L{IUsernamePassword} provider; its user name
            and password may be C{bytes} (UTF-8) or C{str}.
        @return: a Deferred firing with the user name, or failing with
            L{UnauthorizedLogin} for a wrong password and an unknown user
            alike, after the same bcrypt work.
        """
        username = _asText(credentials.username)
        password = _asBytes(credentials.password)
        hashed = None if username is None else self.usersFile.hashFor(username)
        known = hashed is not None and password is not None
        if hashed is None:
            hashed = self.usersFile.dummyHash
        d: Deferred[bool] = deferToThreadPool(
            self._reactor, self._threadpool, _checkPassword, password or b"", hashed
        )

        def decide(matched: bool) -> str:
            if matched and known:
                assert username is not None
                return username
            raise UnauthorizedLogin("Invalid user name or password")

        return d.addCallback(decide)


def _logout() -> None:
    """Nothing to release when an SMTP client logs out."""


@implementer(IRealm)
class Realm:
    """
    The realm of SMTP users: the avatar for L{IMailUser} is the avatar id,
    that is the user name as a C{str}.
    """

    # Twisted annotates avatar ids as bytes; UsersFileChecker gives str.
    def requestAvatar(  # type: ignore[override]
        self, avatarId: str | bytes, mind: object, *interfaces: Any
    ) -> tuple[Any, str, Callable[[], None]]:
        if IMailUser not in interfaces:
            raise NotImplementedError("relayd's realm only provides IMailUser")
        if isinstance(avatarId, bytes):
            avatarId = avatarId.decode("utf-8")
        return IMailUser, avatarId, _logout


def makePortal(checker: ICredentialsChecker) -> Portal:
    """
    Make the portal the SMTP server logs clients in through: L{Realm} and
    C{checker}.  Ask it for L{IMailUser}::

        portal.login(UsernamePassword(user, password), None, IMailUser)
    """
    return Portal(Realm(), [checker])


def hashPassword(password: str, rounds: int = DEFAULT_ROUNDS) -> str:
    """
    Hash C{password} with bcrypt at cost C{rounds}.

    @return: the C{$2b$...} hash, which C{htpasswd}-reading software
        accepts as well.
    @raise ValueError: for an empty password, one with a NUL character
        (which C implementations of bcrypt, and SASL PLAIN, cannot carry),
        one longer than L{MAX_PASSWORD_BYTES} octets in UTF-8, or C{rounds}
        outside 4..31.
    """
    if not 4 <= rounds <= 31:
        raise ValueError(f"rounds must be between 4 and 31, not {rounds}")
    if not password:
        raise ValueError("password is empty")
    if "\0" in password:
        raise ValueError("password contains a NUL character")
    encoded = password.encode("utf-8")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise ValueError(
            f"password is longer than {MAX_PASSWORD_BYTES} bytes, the most bcrypt uses"
        )
    return bcrypt.hashpw(encoded, bcrypt.gensalt(rounds)).decode("ascii")


def _replaceUser(lines: Iterable[bytes], username: str, newLine: str) -> bytes:
    """
    Put C{newLine} in place of C{username}'s line, or at the end; every
    other line stays as it was, byte for byte.
    """
    out: list[bytes] = []
    replaced = False
    prefix = username.encode("utf-8") + b":"
    for raw in lines:
        if not replaced and raw.startswith(prefix):
            ending = b"\r\n" if raw.endswith(b"\r\n") else b"\n"
            out.append(newLine.encode("utf-8") + ending)
            replaced = True
        else:
            out.append(raw)
    if not replaced:
        if out and not out[-1].endswith(b"\n"):
            out[-1] += b"\n"
        out.append(newLine.encode("utf-8") + b"\n")
    return b"".join(out)


def setPassword(path: str, user: str, password: str, rounds: int = DEFAULT_ROUNDS) -> None:
    """
    Set C{user}'s password in the users file at C{path}, adding the user
    if needed and creating the file (mode 0o600) if missing.

    The file is rewritten atomically (see L{relayd.queue.safeio.writeAtomically}); the other
    users' lines, comments and blank lines are kept byte for byte.  If
    C{path} is a symbolic link, the file it points to is replaced and the
    link kept.  Two concurrent runs on one file are not serialised: the
    later rename wins.

    @raise ValueError: for an unusable user name or password (see
        L{checkUsername} and L{hashPassword}).
    @raise UsersFileError: when the existing file is malformed (nothing is
        written, so the problem is seen now rather than at relayd's next
        reload) or cannot be read or written.
    """
    checkUsername(user)
    newLine = f"{user}:{hashPassword(password, rounds)}"
    target = os.path.realpath(path)
    try:
        with open(target, "rb") as f:
            like: os.stat_result | None = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        like, data = None, b""
    except OSError as e:
        raise UsersFileError(path, f"cannot read: {e.strerror or e}") from None
    _parseUsers(path, data)
    try:
        writeAtomically(target, _replaceUser(_splitLines(data), user, newLine), like=like)
    except OSError as e:
        raise UsersFileError(path, f"cannot write: {e.strerror or e}") from None


LOCKOUT_KEY_PREFIX = "{relayd:authfail}:"
"""
Put before every AUTH failure counter key (in memory and in Redis); the
hash tag keeps the keys of one call in one Redis Cluster slot.
"""

LOCKOUT_PREFIX_V6 = 64
"""
An IPv6 client is counted by its /64, the smallest network a site is
usually given: one host can use any address in it.
"""


def clientNetwork(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What an AUTH failure is counted under: the IPv4 address, or the IPv6 /64."""
    if address.version == 6:
        network = ipaddress.ip_network(f"{address}/{LOCKOUT_PREFIX_V6}", strict=False)
        return str(network)
    return str(address)


def sharedStore(chain: Any) -> RedisStore | None:
    """
    The Redis store of the C{ratelimit} policy in C{chain}, if it uses one:
    then every relayd behind the same Redis shares the AUTH failure counts.
    """
    for policy in getattr(chain, "policies", ()):
        store = getattr(policy, "store", None)
        if isinstance(store, RedisStore):
            return store
    return None


class Lockout:
    """
    AUTH failures counted across connections, so that password guessing
    spread over many connections is stopped, not only slowed per
    connection (issue 9 item 8).

    Two GCRA limiters of C{limit} failures per C{failureWindow} seconds (as
    the C{ratelimit} policy's), in an
    L{relayd.interfaces.IRateCounterStore}:

      - per client (its IPv4 address or IPv6 /64), over every user name:
        one address cannot guess many users' passwords;
      - per user name I{at that client}: one address cannot guess one
        user's password, and a NAT shared by many users does not lock them
        all out for one user's mistakes.

    Above either limit AUTH from that client (for that user) is refused,
    before any password is checked, until one failure's worth has drained
    (C{failureWindow / limit} seconds); a limiter drains completely
    C{failureWindow} seconds after the last failure.  Neither counter
    is per user name alone, so guessing from one address never locks the
    real user out of the addresses they use.

    The counts are kept in this process's memory; in a receiver (C{[server]
    processes} above 1) also in the queue manager's, where every process
    counts (L{relayd.receivers.QueueManagerStore}), so the limits are the
    whole relayd's; and in the Redis of the C{ratelimit} policy when the
    chain has one (L{sharedStore}), so instances share them.  When the
    queue manager or Redis cannot answer, the counts nearer still apply.
    Nothing here blocks: memory answers at once, the queue manager over
    its pipe, Redis in its own threads.

    @ivar memory: the in-process L{MemoryStore}.
    @ivar queueManager: in a receiver, the queue manager's counts; None
        elsewhere.
    """

    def __init__(
        self,
        clock: Any,
        memory: MemoryStore | None = None,
        queueManager: IRateCounterStore | None = None,
    ) -> None:
        """
        @param clock: provides C{seconds()} (the reactor).
        @param memory: the store to count in; by default one of its own
            (the queue manager's is the one its receivers count in too).
        @param queueManager: a receiver's L{relayd.receivers.QueueManagerStore}.
        """
        self.clock = clock
        self.memory = MemoryStore(clock) if memory is None else memory
        self.queueManager = queueManager

    def _counters(
        self, client: ipaddress.IPv4Address | ipaddress.IPv6Address, user: str, config: Any
    ) -> list[tuple[str, tuple[str, int, int, int]]]:
        window = config.authFailureWindow
        net = clientNetwork(client)
        # A digest: bounded keys whatever the client sent as a user name.
        name = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        counters = []
        if config.authClientFailureLimit:
            key = f"{LOCKOUT_KEY_PREFIX}c:{window}:{net}"
            counters.append(("client", (key, 1, config.authClientFailureLimit, window)))
        if config.authUserFailureLimit:
            key = f"{LOCKOUT_KEY_PREFIX}u:{window}:{net}:{name}"
            counters.append(("user", (key, 1, config.authUserFailureLimit, window)))
        return counters

    def refused(
        self,
        chain: Any,
        client: ipaddress.IPv4Address | ipaddress.IPv6Address,
        user: str,
        config: Any,
    ) -> Deferred[str | None]:
        """
        Whether AUTH as C{user} from C{client} is refused now.

        @param chain: the policy chain, to find a shared store.
        @param config: the L{relayd.config.Config} with the limits.
        @return: a Deferred firing with C{"client"} or C{"user"}, the
            counter over its limit, or None; it never fails.
        """
        named = self._counters(client, user, config)
        if not named:
            return succeed(None)
        counters = [counter for _, counter in named]

        def scope(index: int | None) -> str | None:
            return None if index is None else named[index][0]

        def shared(index: int | None) -> Any:
            if index is not None:
                return scope(index)
            store = sharedStore(chain)
            if store is None:
                return None
            d = store.peek(counters)
            d.addCallback(scope)
            d.addErrback(_storeFailed, "check")
            return d

        def local(index: int | None) -> Any:
            if index is not None or self.queueManager is None:
                return shared(index)
            d = self.queueManager.peek(counters)
            d.addErrback(_queueManagerFailed, "check")
            return d.addCallback(shared)

        return self.memory.peek(counters).addCallback(local)

    def failed(
        self,
        chain: Any,
        client: ipaddress.IPv4Address | ipaddress.IPv6Address,
        user: str,
        config: Any,
    ) -> None:
        """
        Count one failed AUTH as C{user} from C{client}, in each limiter
        on its own (one that is full already refuses AUTH anyway).
        """
        store = sharedStore(chain)
        for _, counter in self._counters(client, user, config):
            self.memory.reserve([counter])
            if self.queueManager is not None:
                self.queueManager.reserve([counter]).addErrback(_queueManagerFailed, "count")
            if store is not None:
                store.reserve([counter]).addErrback(_storeFailed, "count")

    def succeeded(
        self,
        chain: Any,
        client: ipaddress.IPv4Address | ipaddress.IPv6Address,
        user: str,
        config: Any,
    ) -> None:
        """
        C{user} logged in from C{client}: forget that user's failures at
        that address, so a real user's earlier typos do not add up to a
        lockout.  The address's own count stays: one account of one's own
        must not wipe the record of guessing at others.
        """
        # Giving back a whole limit's worth empties the limiter.
        counters = [
            (key, limit, limit, window)
            for scope, (key, _, limit, window) in self._counters(client, user, config)
            if scope == "user"
        ]
        if not counters:
            return
        self.memory.release(counters)
        if self.queueManager is not None:
            self.queueManager.release(counters).addErrback(_queueManagerFailed, "reset")
        store = sharedStore(chain)
        if store is not None:
            store.release(counters).addErrback(_storeFailed, "reset")


def _queueManagerFailed(failure: Any, what: str) -> None:
    _log.warn(
        "AUTH failure counts: the queue manager could not {what} them, using this "
        "process's counts: {error}",
        what=what,
        error=failure.getErrorMessage(),
    )


def _storeFailed(failure: Any, what: str) -> None:
    _log.warn(
        "AUTH failure counts: cannot {what} in Redis, using this instance's counts: {error}",
        what=what,
        error=failure.getErrorMessage(),
    )
