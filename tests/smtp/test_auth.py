"""
Tests for L{relayd.smtp.auth} and the C{relayd-passwd} command (L{relayd.ops.passwd}).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import Interface
from zope.interface.verify import verifyObject

from relayd.ops import passwd
from relayd.smtp import auth
from relayd.smtp.auth import (
    IMailUser,
    UsersFile,
    UsersFileChecker,
    UsersFileError,
    hashPassword,
    makePortal,
    setPassword,
)

ROUNDS = 4
"""The cheapest bcrypt cost, to keep the tests fast."""


def _realReactor() -> Any:
    from twisted.internet import reactor

    return reactor


class ClockedReactor:
    """
    The real reactor for getting results back from threads, with the time
    of a L{Clock}, so a test decides when the users file's reload interval
    has passed.
    """

    def __init__(self, clock: Clock) -> None:
        self._reactor = _realReactor()
        self._clock = clock

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._reactor.callFromThread(f, *args, **kwargs)

    def seconds(self) -> float:
        return self._clock.seconds()


def tempPath(testCase: SynchronousTestCase) -> str:
    """
    Return a path that does not exist yet, in a fresh directory removed
    after the test.  (Trial's C{mktemp} is relative to the working
    directory, which under pytest is the checkout.)
    """
    directory = tempfile.mkdtemp(prefix="relayd-test-")
    testCase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return os.path.join(directory, "users")


def writeUsers(path: str, *lines: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def readBytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class UsersFileTests(SynchronousTestCase):
    """
    Parsing and reloading of L{UsersFile}.
    """

    def setUp(self) -> None:
        self.path = tempPath(self)
        self.clock = Clock()
        self.hash = hashPassword("secret", ROUNDS)

    def test_commentsAndBlankLines(self) -> None:
        """
        Blank lines and comment lines are skipped; names are exact.
        """
        writeUsers(
            self.path,
            "# relayd users",
            "",
            "   ",
            "  # indented comment",
            f"alice:{self.hash}",
            f"Bob:{self.hash}",
        )
        users = UsersFile(self.path, self.clock)
        self.assertEqual(len(users), 2)
        self.assertEqual(users.hashFor("alice"), self.hash.encode("ascii"))
        self.assertIsNone(users.hashFor("Alice"))
        self.assertIsNone(users.hashFor("bob"))
        self.assertIsNotNone(users.hashFor("Bob"))

    def test_crlfLines(self) -> None:
        """
        A file with CRLF line ends (edited on Windows) is read.
        """
        with open(self.path, "wb") as f:
            f.write(f"# x\r\nalice:{self.hash}\r\n".encode("ascii"))
        self.assertIsNotNone(UsersFile(self.path, self.clock).hashFor("alice"))

    def test_missingFile(self) -> None:
        """
        A missing file raises L{UsersFileError} naming the path.
        """
        e = self.assertRaises(UsersFileError, UsersFile, self.path, self.clock)
        self.assertEqual(e.path, self.path)
        self.assertEqual(str(e), f"{self.path}: no such file")

    def test_directory(self) -> None:
        """
        A directory in place of the file is reported, not a traceback.
        """
        os.mkdir(self.path)
        e = self.assertRaises(UsersFileError, UsersFile, self.path, self.clock)
        self.assertTrue(str(e).startswith(f"{self.path}: "), str(e))

    def test_unreadable(self) -> None:
        """
        An unreadable file is reported as such.
        """
        if os.getuid() == 0:
            self.skipTest("root reads files whatever their mode")
        writeUsers(self.path, f"alice:{self.hash}")
        os.chmod(self.path, 0)
        e = self.assertRaises(UsersFileError, UsersFile, self.path, self.clock)
        self.assertIn("cannot read", e.problem)

    def assertMalformed(self, lineNumber: int, *lines: str) -> UsersFileError:
        writeUsers(self.path, *lines)
        e: UsersFileError = self.assertRaises(UsersFileError, UsersFile, self.path, self.clock)
        self.assertTrue(e.problem.startswith(f"line {lineNumber}: "), f"unexpected: {e}")
        self.assertTrue(str(e).startswith(f"{self.path}: line {lineNumber}: "))
        self.assertNotIn(self.hash, str(e))
        return e

    def test_noColon(self) -> None:
        """
        A line without C{:} is reported with its line number.
        """
        e = self.assertMalformed(3, "# users", f"alice:{self.hash}", "bob")
        self.assertIn("':'", e.problem)

    def test_notBcrypt(self) -> None:
        """
        A hash that is not bcrypt (plain text, MD5 crypt) is refused with
        the line number, without quoting the would-be hash (it may be a
        password).
        """
        e = self.assertMalformed(2, f"alice:{self.hash}", "bob:hunter2")
        self.assertIn("'bob'", e.problem)
        self.assertNotIn("hunter2", str(e))
        self.assertMalformed(1, "carol:$apr1$abcdefgh$abcdefghijklmnopqrstuv")

    def test_badCost(self) -> None:
        """
        A bcrypt cost outside 4..31 is refused.
        """
        self.assertMalformed(1, "alice:$2b$03$" + self.hash[7:])

    def test_duplicateUser(self) -> None:
        """
        A user defined twice is an error naming both lines, not a silent
        choice of one of the hashes.
        """
        e = self.assertMalformed(
            4, f"alice:{self.hash}", "", f"bob:{self.hash}", f"alice:{self.hash}"
        )
        self.assertIn("line 1", e.problem)

    def test_badUserNames(self) -> None:
        """
        Empty names and names with surrounding white space are refused.
        """
        self.assertMalformed(2, f"alice:{self.hash}", f":{self.hash}")
        self.assertMalformed(1, f" alice:{self.hash}")

    def test_notUtf8(self) -> None:
        """
        A line that is not UTF-8 is refused with its number.
        """
        with open(self.path, "wb") as f:
            f.write(f"alice:{self.hash}\n\xe9:{self.hash}\n".encode("latin-1"))
        e = self.assertRaises(UsersFileError, UsersFile, self.path, self.clock)
        self.assertEqual(e.problem, "line 2: not valid UTF-8")

    def test_dummyHashCost(self) -> None:
        """
        The dummy hash for unknown users has the cost most users' hashes
        have, the default cost for an empty file, and is a hash bcrypt
        accepts without matching.
        """
        cheap = hashPassword("x", 5)
        writeUsers(self.path, f"a:{self.hash}", f"b:{self.hash}", f"c:{cheap}")
        dummy = UsersFile(self.path, self.clock).dummyHash
        self.assertTrue(dummy.startswith(b"$2b$04$"), dummy)
        self.assertFalse(bcrypt.checkpw(b"secret", dummy))

        writeUsers(self.path, "# nobody yet")
        dummy = UsersFile(self.path, self.clock).dummyHash
        self.assertTrue(dummy.startswith(b"$2b$12$"), dummy)

    def test_reloadAtMostOncePerSecond(self) -> None:
        """
        A change is seen once a second has passed since the last check, not
        before.
        """
        writeUsers(self.path, f"alice:{self.hash}")
        users = UsersFile(self.path, self.clock)
        setPassword(self.path, "bob", "other", ROUNDS)
        self.clock.advance(0.5)
        self.assertIsNone(users.hashFor("bob"))
        self.clock.advance(0.5)
        self.assertIsNotNone(users.hashFor("bob"))
        self.assertIsNotNone(users.hashFor("alice"))

    def test_reloadInPlaceEdit(self) -> None:
        """
        An edit in place (same inode) is seen too.
        """
        writeUsers(self.path, f"alice:{self.hash}")
        users = UsersFile(self.path, self.clock)
        with open(self.path, "a") as f:
            f.write(f"bob:{self.hash}\n")
        self.clock.advance(1)
        self.assertIsNotNone(users.hashFor("bob"))

    def test_badReloadKeepsLastGood(self) -> None:
        """
        When the file becomes malformed or goes missing, the users loaded
        before stay; the next good version is loaded.
        """
        writeUsers(self.path, f"alice:{self.hash}")
        users = UsersFile(self.path, self.clock)
        writeUsers(self.path, f"alice:{self.hash}", "garbage")
        self.clock.advance(1)
        self.assertIsNotNone(users.hashFor("alice"))
        os.unlink(self.path)
        self.clock.advance(1)
        self.assertIsNotNone(users.hashFor("alice"))
        writeUsers(self.path, f"bob:{self.hash}")
        self.clock.advance(1)
        self.assertIsNone(users.hashFor("alice"))
        self.assertIsNotNone(users.hashFor("bob"))


class HashPasswordTests(SynchronousTestCase):
    """
    Tests for L{hashPassword}.
    """

    def test_bcrypt2b(self) -> None:
        """
        The hash is a C{$2b$} bcrypt hash with the cost asked for.
        """
        hashed = hashPassword("s\u00e9cret", 5)
        self.assertTrue(hashed.startswith("$2b$05$"), hashed)
        self.assertTrue(bcrypt.checkpw("s\u00e9cret".encode("utf-8"), hashed.encode()))

    def test_defaultCost(self) -> None:
        """
        The default cost is 12.
        """
        self.assertEqual(auth.DEFAULT_ROUNDS, 12)

    def test_refused(self) -> None:
        """
        Empty passwords, NULs, passwords bcrypt would cut and silly costs
        are refused.
        """
        self.assertRaises(ValueError, hashPassword, "", ROUNDS)
        self.assertRaises(ValueError, hashPassword, "a\0b", ROUNDS)
        self.assertRaises(ValueError, hashPassword, "a" * 73, ROUNDS)
        # 72 octets in UTF-8 but 37 characters.
        self.assertRaises(ValueError, hashPassword, "\u00e9" * 37, ROUNDS)
        hashPassword("a" * 72, ROUNDS)
        self.assertRaises(ValueError, hashPassword, "x", 3)
        self.assertRaises(ValueError, hashPassword, "x", 32)


class SetPasswordTests(SynchronousTestCase):
    """
    Tests for L{setPassword}.
    """

    def setUp(self) -> None:
        self.path = tempPath(self)
        self.clock = Clock()

    def test_createsPrivateFile(self) -> None:
        """
        A missing file is created with mode 0o600 and one line.
        """
        setPassword(self.path, "alice", "secret", ROUNDS)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        content = readBytes(self.path).decode("ascii")
        self.assertTrue(content.startswith("alice:$2b$04$"), content)
        self.assertEqual(content.count("\n"), 1)

    def test_keepsOtherLines(self) -> None:
        """
        Changing one user's password replaces its line in place and keeps
        every other byte, CRLF and a missing final line end included.
        """
        other = hashPassword("x", ROUNDS)
        old = hashPassword("old", ROUNDS)
        before = (
            f"# users of relay\r\n\nbob:{other}\r\nalice:{old}\n  # trailing comment\ncarol:{other}"
        ).encode("ascii")
        with open(self.path, "wb") as f:
            f.write(before)
        setPassword(self.path, "alice", "new", ROUNDS)
        after = readBytes(self.path)
        head, _sep, tail = after.partition(b"alice:")
        self.assertEqual(head, before.partition(b"alice:")[0])
        self.assertEqual(
            tail.partition(b"\n")[2], before.partition(b"alice:")[2].partition(b"\n")[2]
        )
        newHash = tail.partition(b"\n")[0]
        self.assertTrue(bcrypt.checkpw(b"new", newHash))

        setPassword(self.path, "dave", "pw", ROUNDS)
        after2 = readBytes(self.path)
        self.assertTrue(after2.startswith(after + b"\ndave:$2b$04$"), after2)
        self.assertEqual(len(UsersFile(self.path, self.clock)), 4)

    def test_keepsMode(self) -> None:
        """
        The rewritten file keeps the mode of the one it replaces.
        """
        setPassword(self.path, "alice", "secret", ROUNDS)
        os.chmod(self.path, 0o640)
        setPassword(self.path, "alice", "secret2", ROUNDS)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_keepsOwner(self) -> None:
        """
        When root changes a password in a file owned by the relayd user,
        the new file is still owned by that user, who must read it.
        """
        if os.getuid() != 0:
            self.skipTest("only root can give a file to another user")
        setPassword(self.path, "alice", "secret", ROUNDS)
        os.chown(self.path, 65534, 65534)
        setPassword(self.path, "alice", "secret2", ROUNDS)
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid), (65534, 65534))

    def test_atomicRename(self) -> None:
        """
        The file is replaced by a rename (new inode), and no temp file is
        left behind.
        """
        setPassword(self.path, "alice", "secret", ROUNDS)
        inode = os.stat(self.path).st_ino
        setPassword(self.path, "alice", "secret2", ROUNDS)
        self.assertNotEqual(os.stat(self.path).st_ino, inode)
        directory = os.path.dirname(os.path.abspath(self.path))
        self.assertEqual(os.listdir(directory), [os.path.basename(self.path)])

    def test_symlinkKept(self) -> None:
        """
        A symbolic link to the users file stays a link; its target changes.
        """
        target = tempPath(self)
        setPassword(target, "alice", "secret", ROUNDS)
        os.symlink(os.path.abspath(target), self.path)
        setPassword(self.path, "bob", "secret", ROUNDS)
        self.assertTrue(os.path.islink(self.path))
        self.assertIn(b"bob:", readBytes(target))

    def test_malformedFileUntouched(self) -> None:
        """
        A malformed file is reported and left as it was.
        """
        writeUsers(self.path, "# x", "nonsense")
        before = readBytes(self.path)
        e = self.assertRaises(UsersFileError, setPassword, self.path, "alice", "secret", ROUNDS)
        self.assertIn("line 2", str(e))
        self.assertEqual(readBytes(self.path), before)

    def test_badUserName(self) -> None:
        """
        User names that cannot be stored are refused before any writing.
        """
        for name in ["a:b", "", "#root", " alice", "a\nb"]:
            self.assertRaises(ValueError, setPassword, self.path, name, "pw", ROUNDS)
        self.assertFalse(os.path.exists(self.path))


class CheckerTests(TestCase):
    """
    Tests for L{UsersFileChecker}, L{Realm} and L{makePortal} with a real
    thread pool.
    """

    def setUp(self) -> None:
        self.path = tempPath(self)
        setPassword(self.path, "alice", "secret", ROUNDS)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = Clock()
        self.reactor = ClockedReactor(self.clock)
        self.checker = UsersFileChecker(self.path, self.pool, self.reactor)

    def recordChecks(self) -> list[tuple[threading.Thread, bytes]]:
        """
        Wrap the bcrypt call and record the thread it runs in and the hash
        it checks against.
        """
        calls: list[tuple[threading.Thread, bytes]] = []
        original = auth._checkPassword

        def recording(password: bytes, hashed: bytes) -> bool:
            calls.append((threading.current_thread(), hashed))
            return original(password, hashed)

        self.patch(auth, "_checkPassword", recording)
        return calls

    def test_interfaces(self) -> None:
        """
        The checker and realm provide their cred interfaces.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))
        self.assertTrue(verifyObject(IRealm, auth.Realm()))
        self.assertEqual(self.checker.credentialInterfaces, (IUsernamePassword,))

    @inlineCallbacks
    def test_success(self) -> Any:
        """
        The right password gives the user name as a str, for bytes (as
        from the wire) and str credentials alike.
        """
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(avatarId, "alice")
        self.assertIsInstance(avatarId, str)
        avatarId = yield self.checker.requestAvatarId(
            UsernamePassword("alice", "secret")  # type: ignore[arg-type]
        )
        self.assertEqual(avatarId, "alice")

    @inlineCallbacks
    def test_wrongPasswordAndUnknownUser(self) -> Any:
        """
        A wrong password and an unknown user fail alike, with
        L{UnauthorizedLogin} and the same message, after bcrypt work of
        the same cost.
        """
        calls = self.recordChecks()
        failures = []
        for user, password in [
            (b"alice", b"wrong"),
            (b"mallory", b"secret"),
            (b"Alice", b"secret"),
            (b"\xff\xfe", b"secret"),
        ]:
            d = self.checker.requestAvatarId(UsernamePassword(user, password))
            failure = yield self.assertFailure(d, UnauthorizedLogin)
            failures.append(str(failure))
        self.assertEqual(len(set(failures)), 1)
        self.assertEqual(len(calls), 4)
        for _, hashed in calls:
            self.assertTrue(hashed.startswith(b"$2b$04$"), hashed)

    @inlineCallbacks
    def test_emptyPassword(self) -> Any:
        """
        An empty password fails.
        """
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b""))
        yield self.assertFailure(d, UnauthorizedLogin)

    @inlineCallbacks
    def test_longPasswordTruncatedLikeHtpasswd(self) -> Any:
        """
        A password longer than 72 octets is checked on its first 72, as
        C{htpasswd -B} hashed it, instead of bcrypt 5's ValueError.
        """
        long = b"p" * 80
        hashed = bcrypt.hashpw(long[:72], bcrypt.gensalt(ROUNDS)).decode("ascii")
        writeUsers(self.path, f"alice:{hashed}")
        self.clock.advance(1)
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"alice", long))
        self.assertEqual(avatarId, "alice")

    @inlineCallbacks
    def test_2yAnd2aHashes(self) -> Any:
        """
        C{$2y$} (PHP, C{htpasswd -B}) and C{$2a$} hashes are checked like
        C{$2b$}: one algorithm.
        """
        hashed = hashPassword("secret", ROUNDS)
        writeUsers(self.path, "bob:$2y$" + hashed[4:], "carol:$2a$" + hashed[4:])
        self.clock.advance(1)
        for user in (b"bob", b"carol"):
            avatarId = yield self.checker.requestAvatarId(UsernamePassword(user, b"secret"))
            self.assertEqual(avatarId, user.decode())
            d = self.checker.requestAvatarId(UsernamePassword(user, b"wrong"))
            yield self.assertFailure(d, UnauthorizedLogin)

    @inlineCallbacks
    def test_htpasswd(self) -> Any:
        """
        A file written by Apache's C{htpasswd -B} works.
        """
        htpasswd = shutil.which("htpasswd")
        # scripts/test installs it: missing here is a failure, not a skip.
        self.assertIsNotNone(htpasswd, "htpasswd (apache2-utils) is not installed")
        assert htpasswd is not None
        subprocess.run(
            [htpasswd, "-b", "-B", "-C", "4", "-c", self.path, "dan", "pass word"],
            check=True,
            capture_output=True,
        )
        self.assertIn(b"dan:$2y$04$", readBytes(self.path))
        self.clock.advance(1)
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"dan", b"pass word"))
        self.assertEqual(avatarId, "dan")

    @inlineCallbacks
    def test_offReactorThread(self) -> Any:
        """
        bcrypt runs in a thread of the given pool, never on the reactor
        thread, for known and unknown users.
        """
        calls = self.recordChecks()
        yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        d = self.checker.requestAvatarId(UsernamePassword(b"nobody", b"secret"))
        yield self.assertFailure(d, UnauthorizedLogin)
        self.assertTrue(threadable.isInIOThread())
        self.assertEqual(len(calls), 2)
        for thread, _ in calls:
            self.assertIsNot(thread, threading.current_thread())
            self.assertIn(thread, self.pool.threads)

    @inlineCallbacks
    def test_reloadAfterSetPassword(self) -> Any:
        """
        A password changed with L{setPassword} takes effect once the check
        interval has passed, without a restart; a new user too.
        """
        setPassword(self.path, "alice", "changed", ROUNDS)
        setPassword(self.path, "bob", "bobpw", ROUNDS)
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(avatarId, "alice", "reloaded before the interval")
        self.clock.advance(1)
        d = self.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        yield self.assertFailure(d, UnauthorizedLogin)
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"alice", b"changed"))
        self.assertEqual(avatarId, "alice")
        avatarId = yield self.checker.requestAvatarId(UsernamePassword(b"bob", b"bobpw"))
        self.assertEqual(avatarId, "bob")

    def test_constructorErrors(self) -> None:
        """
        A missing or malformed file stops the checker's construction with
        L{UsersFileError}.
        """
        missing = tempPath(self)
        self.assertRaises(UsersFileError, UsersFileChecker, missing, self.pool, self.reactor)
        writeUsers(missing, "x")
        e = self.assertRaises(UsersFileError, UsersFileChecker, missing, self.pool, self.reactor)
        self.assertIn("line 1", str(e))

    @inlineCallbacks
    def test_portal(self) -> Any:
        """
        Logging in through L{makePortal} for L{IMailUser} gives the user
        name as avatar and a logout callable.
        """
        portal = makePortal(self.checker)
        interface, avatar, logout = yield portal.login(
            UsernamePassword(b"alice", b"secret"), None, IMailUser
        )
        self.assertIs(interface, IMailUser)
        self.assertEqual(avatar, "alice")
        self.assertIsNone(logout())
        d = portal.login(UsernamePassword(b"alice", b"bad"), None, IMailUser)
        yield self.assertFailure(d, UnauthorizedLogin)

    def test_realmOtherInterface(self) -> None:
        """
        The realm only provides L{IMailUser}.
        """
        self.assertRaises(NotImplementedError, auth.Realm().requestAvatar, "alice", None, Interface)
        self.assertEqual(auth.Realm().requestAvatar(b"alice", None, IMailUser)[1], "alice")


class PasswdCommandTests(TestCase):
    """
    Tests for C{relayd-passwd}, run as a real process where it matters.
    """

    def setUp(self) -> None:
        self.path = tempPath(self)

    def runPasswd(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "relayd.ops.passwd", *args],
            input=stdin,
            capture_output=True,
            timeout=60,
        )

    def assertOneLineError(self, result: subprocess.CompletedProcess[bytes]) -> str:
        error = result.stderr.decode("utf-8")
        self.assertEqual(error.count("\n"), 1, error)
        self.assertTrue(error.startswith("relayd-passwd: "), error)
        self.assertNotIn("Traceback", error)
        return error

    @inlineCallbacks
    def test_stdinThenLogin(self) -> Any:
        """
        C{--stdin} reads one line, drops its line end, creates the file;
        the checker then accepts the password.
        """
        result = self.runPasswd(
            "--rounds", "4", "--stdin", self.path, "alice", stdin=b"p w\xc3\xa9\n"
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIn(b"alice:$2b$04$", readBytes(self.path))

        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-passwd")
        pool.start()
        self.addCleanup(pool.stop)
        checker = UsersFileChecker(self.path, pool, _realReactor())
        avatarId = yield checker.requestAvatarId(
            UsernamePassword(b"alice", "p w\u00e9".encode("utf-8"))
        )
        self.assertEqual(avatarId, "alice")
        d = checker.requestAvatarId(UsernamePassword(b"alice", "p w\u00e9\n".encode()))
        yield self.assertFailure(d, UnauthorizedLogin)

    def test_usage(self) -> None:
        """
        Missing arguments, a bad C{--rounds} and an impossible user name are
        usage errors (status 2).
        """
        self.assertEqual(self.runPasswd(self.path).returncode, 2)
        self.assertEqual(self.runPasswd("--rounds", "99", self.path, "a").returncode, 2)
        self.assertEqual(self.runPasswd("--rounds", "x", self.path, "a").returncode, 2)
        result = self.runPasswd("--stdin", self.path, "a:b", stdin=b"pw\n")
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"':'", result.stderr)
        self.assertFalse(os.path.exists(self.path))

    def test_failures(self) -> None:
        """
        An empty password and a malformed file fail with status 1 and one
        line on standard error.
        """
        result = self.runPasswd("--rounds", "4", "--stdin", self.path, "alice", stdin=b"\n")
        self.assertEqual(result.returncode, 1)
        self.assertIn("password is empty", self.assertOneLineError(result))

        writeUsers(self.path, "ok", "")
        result = self.runPasswd("--rounds", "4", "--stdin", self.path, "alice", stdin=b"pw\n")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{self.path}: line 1:", self.assertOneLineError(result))

        missingDir = os.path.join(tempPath(self), "users")
        result = self.runPasswd("--rounds", "4", "--stdin", missingDir, "alice", stdin=b"pw\n")
        self.assertEqual(result.returncode, 1)
        self.assertIn(missingDir, self.assertOneLineError(result))

    def test_askTwice(self) -> None:
        """
        Without C{--stdin} the password is asked twice; a mismatch fails.
        """
        answers = iter(["one", "two"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        status = passwd.main(["--rounds", "4", self.path, "alice"], ask=lambda p: next(answers))
        self.assertEqual(status, 1)
        self.assertEqual(stderr.getvalue(), "relayd-passwd: the passwords do not match\n")
        self.assertFalse(os.path.exists(self.path))

        prompts = []

        def ask(prompt: str) -> str:
            prompts.append(prompt)
            return "same"

        self.assertEqual(passwd.main(["--rounds", "4", self.path, "alice"], ask=ask), 0)
        self.assertEqual(len(prompts), 2)
        hashed = readBytes(self.path).split(b":", 1)[1].strip()
        self.assertTrue(bcrypt.checkpw(b"same", hashed))

    def test_askInterrupted(self) -> None:
        """
        End of input or Ctrl-C at the prompt fail cleanly.
        """
        self.patch(sys, "stderr", io.StringIO())
        for exception in (EOFError, KeyboardInterrupt):

            def ask(prompt: str, exception: type[BaseException] = exception) -> str:
                raise exception()

            self.assertEqual(passwd.main([self.path, "alice"], ask=ask), 1)
        self.assertFalse(os.path.exists(self.path))


class _LockoutConfig:
    authFailureWindow = 900
    authClientFailureLimit = 4
    authUserFailureLimit = 2


class LockoutTests(SynchronousTestCase):
    """L{auth.Lockout}: AUTH failures counted across connections, in memory."""

    def setUp(self) -> None:
        import ipaddress

        self.ip = ipaddress.ip_address
        self.clock = Clock()
        self.clock.advance(10 * 900)
        self.lockout = auth.Lockout(self.clock)
        self.config = _LockoutConfig()

    def refused(self, client: str, user: str) -> Any:
        return self.successResultOf(self.lockout.refused(None, self.ip(client), user, self.config))

    def failures(self, client: str, user: str, times: int = 1) -> None:
        for _ in range(times):
            self.lockout.failed(None, self.ip(client), user, self.config)

    def test_userAtOneAddress(self) -> None:
        """The user's failures at one address do not lock them out elsewhere."""
        self.failures("192.0.2.1", "alice")
        self.assertIsNone(self.refused("192.0.2.1", "alice"))
        self.failures("192.0.2.1", "alice")
        self.assertEqual(self.refused("192.0.2.1", "alice"), "user")
        self.assertIsNone(self.refused("192.0.2.2", "alice"))
        self.assertIsNone(self.refused("192.0.2.1", "bob"))

    def test_addressOverAllUsers(self) -> None:
        for user in ("a", "b", "c", "d"):
            self.failures("192.0.2.1", user)
        self.assertEqual(self.refused("192.0.2.1", "e"), "client")
        self.assertIsNone(self.refused("192.0.2.9", "e"))

    def test_ipv6CountedByItsSlash64(self) -> None:
        self.failures("2001:db8:1:2::1", "alice")
        self.failures("2001:db8:1:2:ffff::7", "alice")
        self.assertEqual(self.refused("2001:db8:1:2::99", "alice"), "user")
        self.assertIsNone(self.refused("2001:db8:1:3::1", "alice"))

    def test_windowEndsTheLockout(self) -> None:
        self.failures("192.0.2.1", "alice", 2)
        self.assertEqual(self.refused("192.0.2.1", "alice"), "user")
        self.clock.advance(900)
        self.assertIsNone(self.refused("192.0.2.1", "alice"))

    def test_successForgetsTheUsersFailuresOnly(self) -> None:
        """A login clears that user's count at that address, not the address's."""
        self.failures("192.0.2.1", "alice")
        self.lockout.succeeded(None, self.ip("192.0.2.1"), "alice", self.config)
        self.failures("192.0.2.1", "alice")
        self.assertIsNone(self.refused("192.0.2.1", "alice"))
        # The address's count kept the failure from before the login.
        self.failures("192.0.2.1", "bob")
        self.failures("192.0.2.1", "mallory")
        self.assertEqual(self.refused("192.0.2.1", "carol"), "client")

    def test_zeroMeansNoLimit(self) -> None:
        self.config.authUserFailureLimit = 0
        self.config.authClientFailureLimit = 0
        self.failures("192.0.2.1", "alice", 50)
        self.assertIsNone(self.refused("192.0.2.1", "alice"))
        self.assertEqual(len(self.lockout.memory), 0)

    def test_keysBoundedWhateverTheUserName(self) -> None:
        self.failures("192.0.2.1", "x" * 5000)
        self.assertTrue(all(len(key) < 200 for key in self.lockout.memory._tats))
