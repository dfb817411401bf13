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
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from relayd.testing import QUICK_DELIVERY, TestSetup, freePort
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
PROGRAMS = ("relayctl", "relayd-sendmail", "mailq")

SKIP: dict[str, str] = {
    # Commands the test cannot run, each with why:
    "relayctl check-domain": "asks the public DNS about a real domain; "
    "tests/ops/test_checkdomain.py runs it against the DNS test server",
    "relayctl check-config --live": "connects to real smart hosts",
    "relayctl passwd": "asks for a password on the terminal; tests/ops/test_relayctl.py covers it",
}

EXPECT: dict[str, str] = {
    # A word the output must hold, by the command's start (the longest wins).
    "relayctl --version": "relayctl",
    "relayctl status": "relay",
    "relayd-sendmail --server": "",  # silent on success, as sendmail is
    "relayctl queue list": "ops@example.org",
    "relayd-sendmail -bp": "ops@example.org",
    "mailq": "ops@example.org",
    "relayctl queue summary": "example.org",
    "relayctl queue summary --by sender --json": "cron@localhost",
    "relayctl route": "127.0.0.1",
    "relayctl destination suspend": "example.org",
    "relayctl destination list": "example.org",
    "relayctl destination resume": "example.org",
    "relayctl config": "server.hostname = ",
    "relayctl config --defaults --json": '"key": "server.hostname"',
    "relayctl check-config": "config OK",
    "relayctl reload": "reload",
    "relayctl queue bounce": "bounced",
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
    if any(command.startswith(prefix) for prefix in SKIP):
        return None
    prefixes = [p for p in EXPECT if command.startswith(p)]
    assert prefixes, f"no expectation for README command {command!r}: add one to EXPECT"
    return EXPECT[max(prefixes, key=len)]


def test_readmeExamples(tmp_path: Path, relaydProcesses) -> None:  # noqa: F811
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
    relaydProcesses.append(relayd)
    relayd.waitListening()
    relayPort = setup.ports["relay"]

    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    for program in ("relayctl", "relayd-sendmail"):
        assert (BIN / program).exists(), f"{BIN / program} missing: pip install -e ."
        (checkout / ".venv" / "bin" / program).symlink_to(BIN / program)

    ran = []
    for exports, line in examples(README.read_text()):
        commands = commandsOf(line)
        expected = [expectation(c) for c in commands if c.split()[0] in PROGRAMS]
        if None in expected:
            continue
        script = "\n".join([*exports, line]) + "\n"
        script = script.replace("$PWD/etc/dev.toml", setup.configPath)
        script = script.replace("127.0.0.1:2525", f"127.0.0.1:{relayPort}")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        environ["PATH"] = os.defpath
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=checkout,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = result.stdout + result.stderr
        context = f"README: {line}\nexit {result.returncode}\n{output}\n--- relayd log:\n"
        assert result.returncode == 0, context + relayd.log()
        for word in expected:
            assert word is not None
            if word:
                assert word in output, context + relayd.log()
        if not line.startswith("echo "):
            assert output.strip(), context
        ran.append(line)
    assert len(ran) >= 15, ran
