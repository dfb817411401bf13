"""
Instructions per relayed message: a figure of relayd's per-message work
that does not move with the machine.

The rates and the CPU times of L{bench.run} scatter by 15% from run to run
on a shared virtual machine, so a change worth a few percent cannot be
seen there.  This counts instead, under valgrind's callgrind, the
user-space instructions one relayd process (C{[server] processes = 1},
C{[delivery] processes = 0}: it receives, queues and delivers) executes
while it relays C{N} messages from C{smtp-source} to C{smtp-sink}, then
C{2N} messages in a fresh process; the difference divided by C{N} is the
cost of a message, with start-up and shutdown cancelled out.  Two counts
of the same code agree to about 0.1% with 200 and 400 messages (0.5%
with 50 and 100).

What it leaves out: the kernel's work (system calls, the fsyncs), the
other processes of a default relayd, and time spent waiting.  It is a
measure of relayd's own code on the hot path, to compare two commits
(C{--against REV} counts a checkout of C{REV} the same way, from a
temporary git worktree); the rates against Postfix stay L{bench.run}'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.systems import (
    BenchError,
    Relayd,
    Sink,
    commitOf,
    pythonEnvironment,
    runSmtpSource,
    which,
)

__all__ = ["count", "perMessage", "main"]

REPO = Path(__file__).resolve().parent.parent
SESSIONS = 5
SIZE = 4096

# The same hash seed in every run: dict and set layouts, and with them
# the instructions, do not vary from run to run.
_SEED = {"PYTHONHASHSEED": "0"}

_TOTAL = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


def say(text: str) -> None:
    print(f"scripts/bench: {text}", file=sys.stderr, flush=True)


def readTotal(path: Path) -> int:
    """
    The instructions a callgrind output file counted in all (its
    C{totals:} line, or C{summary:} in older formats).
    """
    found = _TOTAL.findall(path.read_bytes())
    if not found:
        raise BenchError(f"{path}: no totals line; not a callgrind output file")
    return int(found[-1])


def prepare(code: Path | None = None) -> None:
    """
    Do what a tree's first run would do once, so that neither count pays
    for it: compile its modules to bytecode and write Twisted's plugin
    cache (C{dropin.cache}), with the interpreter and path the counts use.
    """
    tree = code or REPO
    env = pythonEnvironment(code, _SEED)
    loadPlugins = (
        "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; "
        "list(getPlugins(IPlugin, twisted.plugins))"
    )
    for command in (
        [sys.executable, "-m", "compileall", "-q", str(tree / "relayd"), str(tree / "twisted")],
        [sys.executable, "-c", loadPlugins],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"preparing {tree}: {done.stderr.strip()[-500:]}")


def count(workdir: Path, messages: int, code: Path | None = None) -> int:
    """
    Start one relayd process under callgrind, relay C{messages} messages
    through it to a fresh smtp-sink, stop it, and return the instructions
    it executed from start to exit.

    @param code: a checkout whose relayd runs instead of this one's.
    @raise BenchError: when a process does not start, smtp-source fails or
        a message does not arrive.
    """
    workdir.mkdir(parents=True)
    out = workdir / "callgrind.out"
    sink = Sink()
    relayd = Relayd(
        workdir / "relayd",
        sink.port,
        deliveryProcesses=0,
        serverProcesses=1,
        wrapper=[
            which("valgrind"),
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--trace-children=no",
        ],
        code=code,
        startTimeout=300,
        environment=_SEED,
    )
    try:
        sink.start()
        relayd.start()
        runSmtpSource(relayd.port, messages, SESSIONS, SIZE)
        if sink.waitFor(messages, stall=120) is None:
            raise BenchError(f"{messages - sink.delivered} of {messages} messages missing")
    finally:
        # SIGTERM, then valgrind writes its totals as relayd exits.
        relayd.stop(grace=300)
        sink.stop()
    if not out.exists():
        raise BenchError(f"valgrind wrote no {out}; see {relayd.outputPath}")
    return readTotal(out)


def perMessage(workdir: Path, messages: int, code: Path | None = None) -> dict[str, Any]:
    """
    Instructions per message: C{count} of C{2 * messages} minus C{count} of
    C{messages}, divided by C{messages}.
    """
    prepare(code)
    small = count(workdir / "small", messages, code)
    large = count(workdir / "large", 2 * messages, code)
    return {
        "messages": [messages, 2 * messages],
        "instructions": [small, large],
        "per_message": round((large - small) / messages),
    }


@contextlib.contextmanager
def _worktree(revision: str, parent: Path) -> Any:
    """A detached git worktree of C{revision}, removed afterwards."""
    path = parent / "against"
    added = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), revision],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        said = added.stderr.strip() or "git worktree add failed"
        raise BenchError(f"--against {revision}: {said}")
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
            capture_output=True,
        )


def main(args: argparse.Namespace) -> int:
    """
    C{scripts/bench --instructions}: count this checkout, and with
    C{--against REV} that revision too (its worktree is made first, so a
    bad revision fails at once); print both and their ratio, and write
    them to the JSON file.
    """
    messages = args.messages
    parent = args.workdir or Path(tempfile.gettempdir()) / "relayd-bench"
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="instructions-", dir=parent))
    result: dict[str, Any] = {"sessions": SESSIONS, "size": SIZE, "failure": None}
    try:
        with contextlib.ExitStack() as stack:
            tree = stack.enter_context(_worktree(args.against, workdir)) if args.against else None
            say(f"counting {REPO} under callgrind: {messages} and {2 * messages} messages")
            result["this"] = {"commit": commitOf(REPO), **perMessage(workdir / "this", messages)}
            if tree is not None:
                say(f"counting {args.against} the same way")
                result["against"] = {
                    "revision": args.against,
                    "commit": commitOf(tree),
                    **perMessage(workdir / "against-run", messages, tree),
                }
                result["ratio"] = result["this"]["per_message"] / result["against"]["per_message"]
    except BenchError as e:
        result["failure"] = str(e)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    path = args.json or REPO / "var" / "bench" / "instructions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if result["failure"] is not None:
        say(f"FAILED: {result['failure']}")
        return 1
    lines = ["instructions per relayed message (callgrind, one relayd process)"]
    for key in ("against", "this"):
        if key in result:
            lines.append(f"  {result[key]['commit'][:12]:<18} {result[key]['per_message']:>12,}")
    if "ratio" in result:
        lines.append(f"  {'ratio this/against':<18} {result['ratio']:>12.4f}")
    sys.stdout.write("\n".join(lines) + f"\nJSON: {path}\n")
    return 0
