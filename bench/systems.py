"""
The processes a benchmark run starts: the counting sink, relayd under
twistd and a private Postfix instance.  Each has C{start} and C{stop}, and
C{stop} is safe to call twice or after a failed start, so that the runner's
C{finally} leaves nothing behind.

Everything listens on 127.0.0.1 only, on ports chosen free at start.  The
private Postfix has its own configuration, queue and data directories
(C{postfix -c DIR}, as in Postfix's MULTI_INSTANCE_README, without
registering it with the default instance): the system's Postfix instance is
never configured, started or stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = [
    "BenchError",
    "commitOf",
    "descendants",
    "PrivatePostfix",
    "Relayd",
    "Sink",
    "freePort",
    "pythonEnvironment",
    "runSmtpSource",
    "rss",
    "treeRss",
    "waitForGreeting",
    "which",
]

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
SENDER = "bench@relayd-bench.example"
RECIPIENT = "sink@sink.example"


class BenchError(Exception):
    """
    The benchmark cannot go on: a process did not start, a message went
    missing.  The message says which.
    """


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def waitForGreeting(
    port: int, timeout: float, what: str, alive: subprocess.Popen[bytes] | None
) -> None:
    """
    Wait until an SMTP server on C{port} answers with a 220 greeting.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"{what} exited with status {alive.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                greeting = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if greeting.startswith(b"220"):
                    return
                last = greeting.decode(errors="replace").strip()
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise BenchError(f"{what} did not greet on {LOOPBACK}:{port} within {timeout:.0f} s ({last})")


def rss(pid: int) -> dict[str, int]:
    """
    VmRSS and VmHWM (peak RSS) of process C{pid}, in KiB, from /proc.
    """
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                found[name] = int(value.split()[0])
    return found


def descendants(pid: int) -> list[int]:
    """
    The processes below C{pid} (children, their children, ...), from the
    parent fields of /proc/*/stat.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def treeRss(pid: int) -> dict[str, int]:
    """
    VmRSS and VmHWM summed over process C{pid} and its descendants (relayd's
    receiver processes), in KiB, and how many processes that was.  The sum
    of peaks is an upper bound of the tree's peak, which may not have come
    at one moment.
    """
    total = {"VmRSS": 0, "VmHWM": 0, "processes": 0}
    for one in [pid, *descendants(pid)]:
        try:
            figures = rss(one)
        except OSError:
            continue  # exited meanwhile
        total["VmRSS"] += figures.get("VmRSS", 0)
        total["VmHWM"] += figures.get("VmHWM", 0)
        total["processes"] += 1
    return total


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def treeCpu(pid: int) -> float:
    """
    CPU seconds, user and system, used so far by process C{pid} and its
    descendants, with the children each of them has reaped (Postfix's
    master restarts its smtpd and smtp processes after max_use): the
    difference of two calls is the tree's CPU between them, a process that
    exited meanwhile included once its parent reaped it.
    """
    total = 0
    for one in [pid, *descendants(pid)]:
        try:
            text = Path(f"/proc/{one}/stat").read_text()
        except OSError:
            continue  # exited meanwhile: its parent's reaped children count it
        # After "pid (comm) ": state is field 3, utime..cstime fields 14-17.
        fields = text[text.rfind(")") + 2 :].split()
        total += sum(int(ticks) for ticks in fields[11:15])
    return total / CLOCK_TICKS


def commitOf(tree: Path = REPO) -> str:
    """The commit checked out in C{tree}, with C{+dirty} when files differ."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def pythonEnvironment(code: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """
    This process's environment with C{extra} set, and with the checkout
    C{code} first on C{PYTHONPATH} when given: a Python started with it
    imports relayd (and finds its twistd plugin) from C{code}.
    """
    env = dict(os.environ)
    env.update(extra or {})
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    return env


def runSmtpSource(port: int, messages: int, sessions: int, size: int, many: bool = False) -> float:
    """
    Run C{smtp-source -s SESSIONS -m MESSAGES -l SIZE} (C{-d}: many messages
    per connection) against C{port} on the loopback; the seconds until it
    exited, that is until every message had its reply to the end of data.

    @raise BenchError: when it fails or says anything on its error output.
    """
    command = [
        which("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        "-M",
        "source.relayd-bench.example",
    ]
    if many:
        command.append("-d")
    command.append(f"{LOOPBACK}:{port}")
    start = time.monotonic()
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=3600
    )
    elapsed = time.monotonic() - start
    if result.returncode != 0 or result.stderr.strip():
        raise BenchError(
            f"smtp-source {' '.join(command[1:])} failed ({result.returncode}): "
            f"{result.stderr.strip()[:500]}"
        )
    return elapsed


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        raise BenchError(f"{name} not found (scripts/bench installs Postfix, which has it)")
    return path


def _stopProcess(process: subprocess.Popen[bytes] | None, sig: int, grace: float) -> None:
    if process is None or process.poll() is not None:
        return
    try:
        process.send_signal(sig)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except ProcessLookupError:
        pass


class Sink:
    """
    Postfix's smtp-sink with its running counter (-c): it accepts every
    message and throws it away, and the counter says how many arrived, which
    is how the runner knows end to end that no message is missing.

    @ivar delivered: messages received so far (the counter's C{mesg=} field).
    """

    def __init__(self, backlog: int = 256) -> None:
        self.port = freePort()
        self.backlog = backlog
        self.delivered = 0
        self._changed = threading.Condition()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        # -u nobody: smtp-sink refuses to keep running as root.
        return [
            which("smtp-sink"),
            "-c",
            "-u",
            "nobody",
            f"{LOOPBACK}:{self.port}",
            str(self.backlog),
        ]

    def start(self) -> None:
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name="sink-counter", daemon=True)
        self._reader.start()
        waitForGreeting(self.port, 10, "smtp-sink", self._process)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            pending += chunk
            counts = re.findall(rb"mesg=(\d+)", pending)
            pending = pending[-64:]
            if counts:
                with self._changed:
                    self.delivered = int(counts[-1])
                    self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def waitFor(self, count: int, stall: float) -> float | None:
        """
        Wait until C{count} messages have arrived, and return the
        C{time.monotonic()} at which the last one was seen; C{None} when no
        new message arrived for C{stall} seconds before that.
        """
        with self._changed:
            seen = self.delivered
            lastProgress = time.monotonic()
            while self.delivered < count:
                self._changed.wait(0.5)
                now = time.monotonic()
                if self.delivered != seen:
                    seen, lastProgress = self.delivered, now
                elif now - lastProgress > stall:
                    return None
            return time.monotonic()

    def stop(self) -> None:
        _stopProcess(self._process, signal.SIGTERM, 5)


class Relayd:
    """
    relayd under twistd, from this checkout's .venv, with a generated TOML
    config: one relay listener for 127.0.0.0/8 and one route to the sink.
    Everything else keeps relayd's defaults, unless C{perDestination} sets
    the one knob given to Postfix too, C{deliveryProcesses} relayd's
    C{[delivery] processes} (to compare with the queue manager delivering),
    or C{serverProcesses} its C{[server] processes}.

    @ivar wrapper: a command that runs twistd (valgrind, for
        L{bench.instructions}), or empty.
    @ivar code: a checkout of other relayd code to run instead of this
        one's (put first on C{PYTHONPATH}), or C{None}.
    @ivar environment: variables set for twistd on top of this process's.
    """

    def __init__(
        self,
        base: Path,
        sinkPort: int,
        perDestination: int | None = None,
        deliveryProcesses: int | None = None,
        serverProcesses: int | None = None,
        wrapper: list[str] | None = None,
        code: Path | None = None,
        startTimeout: float = 30,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.base = base
        self.port = freePort()
        self.sinkPort = sinkPort
        self.perDestination = perDestination
        self.deliveryProcesses = deliveryProcesses
        self.serverProcesses = serverProcesses
        self.wrapper = wrapper or []
        self.code = code
        self.startTimeout = startTimeout
        self.environment = environment or {}
        self.configPath = base / "relayd.toml"
        self.logPath = base / "relayd.log"
        self.outputPath = base / "relayd.out"
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        delivery = ""
        if self.perDestination is not None:
            delivery += f"per_destination = {self.perDestination}\n"
        if self.deliveryProcesses is not None:
            delivery += f"processes = {self.deliveryProcesses}\n"
        if delivery:
            delivery = f"\n[delivery]\n{delivery}"
        server = ""
        if self.serverProcesses is not None:
            server = f"processes = {self.serverProcesses}\n"
        return f"""\
# Generated by bench/systems.py: relayd as a trusted-network smart host with
# one route to the benchmark's sink; everything else at relayd's defaults.
[server]
hostname = "relayd-bench.localhost"
{server}
[spool]
directory = "spool"

[policy]
chain = ["mynetworks"]

[policies.mynetworks]
networks = ["127.0.0.0/8"]

[[listeners]]
name = "relay"
endpoint = "tcp:port={self.port}:interface={LOOPBACK}"
mode = "relay"
{delivery}
[[routes]]
domains = ["*"]
[[routes.hops]]
host = "{LOOPBACK}"
port = {self.sinkPort}
tls = "none"
"""

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def rootPid(self) -> int:
        """twistd: the process whose tree is this relayd (L{treeCpu})."""
        return self.pid

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.configPath.write_text(self.config())
        twistd = Path(sys.executable).with_name("twistd")
        env = pythonEnvironment(self.code, self.environment)
        with self.outputPath.open("wb") as output:
            self._process = subprocess.Popen(
                [
                    *self.wrapper,
                    sys.executable,
                    str(twistd),
                    "-n",
                    "--pidfile=",
                    "--logfile",
                    str(self.logPath),
                    "relayd",
                    "--config",
                    str(self.configPath),
                ],
                cwd=self.base,
                env=env,
                stdin=subprocess.DEVNULL,
                # A file, not a pipe nobody reads during the run: a full pipe
                # would stall relayd.
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            waitForGreeting(self.port, self.startTimeout, "relayd", self._process)
        except BenchError as e:
            said = self.outputPath.read_text(errors="replace")[-2000:].strip()
            raise BenchError(f"{e}; {said}") from None

    def stop(self, grace: float = 40) -> None:
        # SIGTERM: relayd's graceful stop (sessions get 421, deliveries end,
        # the queue manager stops its receiver processes).
        _stopProcess(self._process, signal.SIGTERM, grace)
        if self._process is not None:
            # Any receiver left behind: the process group is relayd's own
            # (start_new_session), its id the twistd process's.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)


class PrivatePostfix:
    """
    A private Postfix instance in C{base}: its own main.cf and master.cf in
    C{base/etc}, queue in C{base/queue}, data in C{base/data}, log in
    C{base/maillog}; smtpd on 127.0.0.1:PORT, relaying for 127.0.0.0/8 to
    the sink as its relayhost.  Postfix's defaults otherwise, including
    fsync of the queue file before the 250 and a per-destination
    concurrency of 20, unless C{perDestination} sets it.
    """

    # Postfix's own master.cf services, without chroot (no chroot tree to set
    # up), smtpd on our loopback port instead of port 25, and no pipe
    # transports.
    SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

    def __init__(self, base: Path, sinkPort: int, perDestination: int | None = None) -> None:
        self.base = base
        self.port = freePort()
        self.sinkPort = sinkPort
        self.perDestination = perDestination
        self.etc = base / "etc"
        self.queue = base / "queue"
        self.logPath = base / "maillog"
        self._postfix = which("postfix")
        self._started = False

    def mainCf(self) -> str:
        extra = ""
        if self.perDestination is not None:
            extra = f"default_destination_concurrency_limit = {self.perDestination}\n"
        return f"""\
# Generated by bench/systems.py: a private instance (postfix -c {self.etc}).
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.base / "data"}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localhost
mydomain = localhost
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{LOOPBACK}]:{self.sinkPort}
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file_prefixes = {self.base}
maillog_file = {self.logPath}
biff = no
{extra}"""

    def masterCf(self) -> str:
        return f"{LOOPBACK}:{self.port} inet n - n - - smtpd\n" + self.SERVICES

    def version(self) -> str:
        out = subprocess.run(
            [which("postconf"), "-d", "-h", "mail_version"], capture_output=True, text=True
        )
        return out.stdout.strip()

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [self._postfix, "-c", str(self.etc), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            log = self.logPath.read_text()[-2000:] if self.logPath.exists() else ""
            raise BenchError(
                f"postfix -c {self.etc} {' '.join(args)} failed: "
                f"{(result.stdout + result.stderr).strip()} {log.strip()}"
            )

    def start(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        # root:root 755, as postfix-files wants it; `postfix check` makes the
        # subdirectories and the data directory, owned by postfix.
        self.queue.mkdir(mode=0o755, exist_ok=True)
        # Postfix's daemons (user postfix) must reach the queue directory.
        self.base.chmod(0o755)
        for parent in self.base.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise BenchError(f"{parent} is not searchable by user postfix; use --workdir")
        (self.etc / "main.cf").write_text(self.mainCf())
        (self.etc / "master.cf").write_text(self.masterCf())
        self._run("check")
        self._started = True
        self._run("start")
        waitForGreeting(self.port, 30, "postfix", None)

    def masterPid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def rootPid(self) -> int:
        """The master: the process whose tree is this Postfix (L{treeCpu})."""
        master = self.masterPid()
        if master is None:
            raise BenchError("the private Postfix's master.pid is gone")
        return master

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        pid = self.masterPid()
        with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
            self._run("stop")
        if pid is None:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
