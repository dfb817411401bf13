"""
relayd as a separate, real process for tests: C{twistd -n relayd} started
from a L{relayd.testing.TestSetup}, the way an operator runs it.

Use it where an in-process service (L{relayd.testing.InProcessRelayd})
cannot show what the test is about: a C{SIGKILL} in the middle of
transactions (durability), signals (C{SIGHUP} reload, C{SIGTERM} graceful
stop), the receiving and delivery processes of C{[server] processes} and
C{[delivery] processes}, a second relayd refused on a locked spool.

  - L{RelaydProcess} starts one C{twistd}, its output going to a log file
    that every failure quotes; L{RelaydProcess.waitListening} waits for the
    greeting on the relay listener; L{RelaydProcess.kill},
    L{RelaydProcess.terminate}, L{RelaydProcess.wait} and
    L{RelaydProcess.reap} stop it.
  - L{RelaydProcess.children} (and L{childPids}) find its receiving and
    delivery processes; L{waitFor} polls for a condition, failing with a
    log.
  - L{relaydProcesses} is a pytest fixture: a list the test appends its
    processes to, each killed at teardown, pass or fail.  A trial test
    calls L{RelaydProcess.reap} from C{addCleanup} instead.

Failures raise L{RelaydProcessError}, an C{AssertionError}, so that both
pytest and trial report them as failures with the process's log.

Example::

    def test_sighupReloads(tmp_path, relaydProcesses):
        setup = TestSetup(str(tmp_path / "relayd"), portZero=False)
        relayd = RelaydProcess(setup, tmp_path / "relayd.log")
        relaydProcesses.append(relayd)
        relayd.waitListening()
        ...
        relayd.terminate()
        assert relayd.wait() == 0
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import relayd
from relayd.testing import TestSetup

__all__ = ["RelaydProcess", "RelaydProcessError", "childPids", "relaydProcesses", "waitFor"]

START_TIMEOUT = 20.0
"""Seconds L{RelaydProcess.waitListening} waits for the greeting by default."""
EXIT_TIMEOUT = 10.0
"""Seconds L{RelaydProcess.wait} waits for the process to exit by default."""


def _sourceRoot() -> Path:
    """
    The directory to run C{twistd} in: the checkout C{relayd} was imported
    from when it holds the Twisted plugin (C{twisted/plugins/}), so that a
    test of a working tree runs that tree; else the current directory (an
    installed relayd finds its plugin on C{sys.path}).
    """
    root = Path(relayd.__file__).resolve().parents[1]
    if (root / "twisted" / "plugins" / "relayd_plugin.py").exists():
        return root
    return Path.cwd()


class RelaydProcessError(AssertionError):
    """A relayd process did not start, listen or exit as the test expected."""


def waitFor(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    log: Callable[[], str] = lambda: "",
) -> None:
    """
    Poll C{predicate} every 50ms until it is true.

    @param what: what did not happen, for the failure: C{"{what} within
        {timeout}s"}, followed by C{log()} (e.g. L{RelaydProcess.log}).
    @raise RelaydProcessError: after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RelaydProcessError(f"{what} within {timeout}s\n{log()}")
        time.sleep(0.05)


def childPids(parent: int, module: str) -> list[int]:
    """
    The pids of C{parent}'s children running C{python -m <module>}, e.g.
    C{relayd.receivers} (C{[server] processes}) or
    C{relayd.delivery.processes} (C{[delivery] processes}), from C{/proc}
    (Linux), sorted.
    """
    wanted = module.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and wanted in cmdline:
            pids.append(int(entry))
    return sorted(pids)


class RelaydProcess:
    """
    One C{twistd -n relayd} process, its output going to a log file.

    @ivar setup: the config it runs.
    @ivar logPath: where its standard output and error go.
    @ivar port: the port of the setup's C{relay} listener (the setup must
        be written with C{portZero=False}, so the port is known before the
        process listens).
    @ivar process: the L{subprocess.Popen}.
    """

    def __init__(self, setup: TestSetup, logPath: Path, listener: str = "relay") -> None:
        """
        Start the process (it returns at once: call L{waitListening}).

        @param listener: the listener whose greeting L{waitListening}
            waits for.
        """
        self.setup = setup
        self.logPath = Path(logPath)
        self.port = setup.ports[listener]
        code = (
            "import sys; from twisted.scripts.twistd import run; "
            "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', "
            f"{setup.configPath!r}]; run()"
        )
        with open(self.logPath, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=_sourceRoot(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, tail: int = 6000) -> str:
        """The end of the process's log, headed by its file name, for a failure message."""
        try:
            text = self.logPath.read_text("utf-8", "replace")
        except OSError as e:
            return f"(no log: {e})"
        if len(text) > tail:
            text = "[...]\n" + text[-tail:]
        return f"--- {self.logPath.name} ---\n{text}"

    def waitLog(self, *needles: str, timeout: float = 10.0) -> str:
        """
        Wait until every one of C{needles} is in the log, and return it
        whole.  relayd writes informational lines in batches, up to
        L{relayd.ops.logs.FLUSH_INTERVAL} seconds after the event.
        """
        text: list[str] = [""]

        def found() -> bool:
            try:
                text[0] = self.logPath.read_text("utf-8", "replace")
            except OSError:
                return False
            return all(needle in text[0] for needle in needles)

        waitFor(found, timeout, f"log lines {needles!r}", self.log)
        return text[0]

    def waitListening(self, timeout: float = START_TIMEOUT) -> None:
        """
        Wait until relayd greets (C{220}) on its port.

        @raise RelaydProcessError: with the log, when the process exits
            first or C{timeout} seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.process.poll()
            if status is not None:
                raise RelaydProcessError(
                    f"relayd exited with status {status} during startup\n{self.log()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    greeting = s.recv(512)
                if greeting.startswith(b"220 "):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RelaydProcessError(
                    f"relayd did not listen on {self.port} within {timeout}s\n{self.log()}"
                )
            time.sleep(0.05)

    def children(self, module: str) -> list[int]:
        """The pids of this relayd's child processes running C{python -m <module>}."""
        return childPids(self.process.pid, module)

    def kill(self) -> None:
        """SIGKILL, without waiting (call L{wait} for that)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM (a graceful stop), without waiting."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """
        Wait for the process to exit.

        @return: its exit status (negative: the signal that ended it).
        @raise RelaydProcessError: with the log, after C{timeout} seconds.
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RelaydProcessError(
                f"relayd did not exit within {timeout}s\n{self.log()}"
            ) from None

    def reap(self) -> None:
        """Teardown: make sure the process is gone, whatever state it is in."""
        if self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)


try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is only for pytest users
    pass
else:

    @pytest.fixture
    def relaydProcesses() -> Iterator[list[RelaydProcess]]:
        """
        Every relayd the test starts (append each one); killed at
        teardown, pass or fail.  Import it into a test module (or a
        C{conftest.py}) to use it.
        """
        processes: list[RelaydProcess] = []
        try:
            yield processes
        finally:
            for process in processes:
                process.reap()
