"""
The README's operator examples work as written (issue 15, "Done means"):
every C{relayctl}, C{relayd-sendmail} and C{mailq} command in the README's
fenced code blocks runs against one real relayd (C{twistd relayd} from
L{relayd.testing.process.RelaydProcess}) and exits 0 with sensible output.

Each command line runs in its own C{bash}, after the block's C{export}
lines, in a directory laid out as a checkout (C{.venv/bin} holding the
installed C{relayctl} and C{relayd-sendmail}), the way an operator pastes
them.  Two substitutions map the development instance onto the test's
relayd, and nothing else is changed: C{$PWD/etc/dev.toml} becomes the
test's config file and C{127.0.0.1:2525} (dev.toml's relay listener) the
test relayd's relay listener.  Like dev.toml's test MX when C{scripts/run}
runs alone, the route's next hop does not answer: mail is deferred.

docs/operations.md's examples run the same way (L{test_operationsExamples}
says what is filled in there).  A command the test cannot run is in
L{SKIP} with its reason; every other one needs an entry in L{EXPECT}, so a
new example is checked as soon as it is written.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from relayd.testing import QUICK_DELIVERY, TestSetup, freePort
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
PROGRAMS = ("relayctl", "relayd-sendmail", "mailq")

SKIP: dict[str, str] = {
    # Commands the test cannot run (a regular expression), each with why:
    r"^relayctl check-domain": "asks the public DNS about a real domain; "
    "tests/ops/test_checkdomain.py runs it against the DNS test server",
    r"^relayctl check-config .*--live": "connects to real smart hosts",
    r"^relayctl passwd": "asks for a password on the terminal; "
    "tests/ops/test_relayctl.py covers it",
}

EXPECT: dict[str, str] = {
    # A word the output must hold, by the command's start (the longest wins).
    "relayctl --version": "relayctl",
    "relayctl status": "relay",
    "relayd-sendmail --server": "",  # silent on success, as sendmail is
    "relayctl queue list": "ops@example.org",
    "relayd-sendmail -bp": "ops@example.org",
    "mailq": "ops@example.org",
    "relayctl queue summary": "TOTAL",
    "relayctl route": "127.0.0.1",
    "relayctl destination suspend": ": suspended",
    "relayctl destination list": "suspended since",
    "relayctl destination resume": ": resumed",
    "relayctl queue summary --by sender": "localhost",
    "relayctl queue list --json": '"queue_id"',
    "relayctl queue show": "cron@localhost",
    "relayctl config": "server.hostname = ",
    "relayctl config --defaults --json": '"key": "server.hostname"',
    "relayctl check-config": "config OK",
    "relayctl reload": "reload",
    "relayctl queue bounce": "bounced",
    # The test's queue holds no day-old mail:
    "relayctl queue bounce --domain mail.partner.example --older-than 1d": "no queued message",
    "relayctl queue hold": ": on hold",
    "relayctl queue release": ": released",
    "relayctl queue flush": "attempted now",
    "relayctl queue requeue": "requeued",
    "relayctl queue delete": ": deleted",
}


def blocks(text: str) -> list[list[str]]:
    """The lines of each fenced code block of a Markdown text."""
    found: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                found.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return found


def commandsOf(line: str) -> list[str]:
    """The commands of one shell line (split at C{&&}, C{||}, C{|}, C{;}), comments cut."""
    line = re.sub(r"\s+#.*$", "", line)
    return [part.strip() for part in re.split(r"&&|\|\||\||;", line) if part.strip()]


def examples(text: str) -> list[tuple[list[str], str]]:
    """
    The lines of C{text}'s code blocks that run one of L{PROGRAMS}, each
    with its block's C{export} lines.
    """
    found = []
    for block in blocks(text):
        exports = [line for line in block if line.startswith("export ")]
        for line in block:
            line = line.removeprefix("$ ")  # a prompt before a command shown with its output
            if line.startswith(("#", "export ")) or not line.strip():
                continue
            words = [c.split()[0] for c in commandsOf(line)]
            if any(w in PROGRAMS or w.endswith(tuple("/" + p for p in PROGRAMS)) for w in words):
                found.append((exports, line))
    return found


def test_examplesFound() -> None:
    """The README shows the operator commands this test runs (not none)."""
    lines = [line for _, line in examples(README.read_text())]
    for wanted in ("relayctl status", "relayctl queue summary", "relayd-sendmail -bp", "mailq"):
        assert any(wanted in line for line in lines), (wanted, lines)


def expectation(command: str) -> str | None:
    """What the output of C{command} must hold; None for a skipped one."""
    if any(re.search(pattern, command) for pattern in SKIP):
        return None
    prefixes = [p for p in EXPECT if command.startswith(p)]
    assert prefixes, f"no expectation for the documented command {command!r}: add one to EXPECT"
    return EXPECT[max(prefixes, key=len)]


def startRelayd(tmp_path: Path, processes: list[RelaydProcess]) -> tuple[TestSetup, str]:
    """
    One relayd for a document's examples, and a checkout-like folder whose
    C{.venv/bin} holds the installed commands.
    """
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        # dev.toml's retries (10 s, then up to 60 s; here 30 and 60): no
        # attempt under way while a command changes the queue, unless the
        # command before started one (a refused connection, over at once).
        sections={"delivery": {**QUICK_DELIVERY, "retry_initial": 30, "retry_max": 60}},
    )
    setup.routeAllTo(freePort())  # a next hop that does not answer
    relayd = RelaydProcess(setup, tmp_path / "relayd.log")
    processes.append(relayd)
    relayd.waitListening()
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    for program in ("relayctl", "relayd-sendmail"):
        assert (BIN / program).exists(), f"{BIN / program} missing: pip install -e ."
        (checkout / ".venv" / "bin" / program).symlink_to(BIN / program)
    return setup, str(checkout)


CHANGES = re.compile(r"relayctl queue (hold|release|delete|bounce|flush|requeue)\b")
"""The commands that change a message: never while an attempt is under way."""


def waitIdle(configPath: str, timeout: float = 30.0) -> None:
    """
    Until no delivery attempt is under way, as docs/operations.md tells an
    operator to wait: relayctl leaves a message being delivered alone.
    (A command just before, e.g. C{release}, starts one at once.)
    """
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [str(BIN / "relayctl"), "--config", configPath, "status", "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        if json.loads(result.stdout)["delivering"] == 0:
            return
        assert time.monotonic() < deadline, "an attempt stays under way"
        time.sleep(0.1)


def runExamples(
    document: Path,
    setup: TestSetup,
    checkout: str,
    relayd: RelaydProcess,
    substitutions: dict[str, str],
    environ: dict[str, str] | None = None,
) -> list[str]:
    """
    Run every example of C{document}, in order, each after its block's
    C{export} lines, with C{substitutions} (a regular expression to its
    replacement) applied; check its exit status and output.

    @return: the lines run.
    """
    ran = []
    for exports, line in examples(document.read_text()):
        commands = commandsOf(line)
        expected = [expectation(c) for c in commands if c.split()[0] in PROGRAMS]
        if None in expected:
            continue
        # The output is the last command's: its word, if it is one of ours.
        last = commands[-1]
        expected = [expectation(last)] if last.split()[0] in PROGRAMS else []
        script = "\n".join([*exports, line]) + "\n"
        for pattern, replacement in substitutions.items():
            script = re.sub(pattern, replacement, script)
        if CHANGES.search(line):
            waitIdle(setup.configPath)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        env["PATH"] = os.defpath
        env.update(environ or {})
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = result.stdout + result.stderr
        context = (
            f"{document.name}: {line}\nran: {script}exit {result.returncode}\n{output}\n"
            "--- relayd log:\n"
        )
        assert result.returncode == 0, context + relayd.log()
        for word in expected:
            assert word is not None
            if word:
                assert word in output, context + relayd.log()
        if not line.startswith("echo "):
            assert output.strip(), context
        ran.append(line)
    return ran


def test_readmeExamples(tmp_path: Path, relaydProcesses) -> None:  # noqa: F811
    """
    The README's walk-through, as written: C{$PWD/etc/dev.toml} is the
    test's config, C{127.0.0.1:2525} its relay listener.
    """
    setup, checkout = startRelayd(tmp_path, relaydProcesses)
    ran = runExamples(
        README,
        setup,
        checkout,
        relaydProcesses[-1],
        {
            re.escape("$PWD/etc/dev.toml"): setup.configPath,
            re.escape("127.0.0.1:2525"): f"127.0.0.1:{setup.ports['relay']}",
        },
    )
    assert len(ran) >= 15, ran


def test_operationsExamples(tmp_path: Path, relaydProcesses) -> None:  # noqa: F811
    """
    docs/operations.md's commands, in order: the reference list with its
    placeholders filled in (C{ID} a queued message, C{DOMAIN} its
    destination, C{ADDR} a sender with mail queued), then "A day with
    relayd" on a queue that holds mail for C{mail.partner.example}.  The
    server's default config file (C{/etc/relayd/relayd.toml}, also what
    C{relayctl} finds without C{RELAYD_CONFIG}) is the test's; the
    development instance's is too, as in the README test.
    """
    setup, checkout = startRelayd(tmp_path, relaydProcesses)
    relayPort = setup.ports["relay"]
    with smtplib.SMTP("127.0.0.1", relayPort, timeout=30) as client:
        for sender, recipient in (
            ("cron@localhost", "ops@example.org"),
            ("app@localhost", "someone@mail.partner.example"),
            ("backup@localhost", "archive@example.net"),
        ):
            client.sendmail(sender, [recipient], f"Subject: from {sender}\r\n\r\nhi\r\n")
    listing = subprocess.run(
        [str(BIN / "relayctl"), "--config", setup.configPath, "queue", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [queueId] = [
        m["queue_id"] for m in json.loads(listing.stdout) if m["sender"] == "cron@localhost"
    ]
    ran = runExamples(
        REPO / "docs" / "operations.md",
        setup,
        checkout,
        relaydProcesses[-1],
        {
            re.escape("/etc/relayd/relayd.toml"): setup.configPath,
            re.escape("$PWD/etc/dev.toml"): setup.configPath,
            re.escape("127.0.0.1:2525"): f"127.0.0.1:{relayPort}",
            r"\bID\b": queueId,
            r"\bDOMAIN\b": "example.org",
            r"\bADDR\b": "backup@localhost",
        },
        # The install block put relayctl on PATH (/usr/local/bin); the
        # test's stand-in is the checkout's .venv/bin.
        {"RELAYD_CONFIG": setup.configPath, "PATH": f"{checkout}/.venv/bin:{os.defpath}"},
    )
    assert len(ran) >= 20, ran
