"""
C{scripts/bench --quick} runs end to end and prints every figure.  Only
that: how fast relayd is gets measured by the benchmark itself, against
Postfix on the same machine, never asserted in a test (DESIGN section 7).
"""

import json
import math
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

LABELS = [
    "accept, 1 msg/conn",
    "end to end, 1 msg/conn",
    "accept, many msg/conn (-d)",
    "end to end, many msg/conn",
    "latency dot->250 p50",
    "latency dot->250 p99",
    "CPU per message, 1 msg/conn",
    "CPU per message, many",
]
KEYS = ["accept", "e2e", "accept_d", "e2e_d", "latency_p50", "latency_p99", "cpu", "cpu_d"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the private Postfix instance needs root")
def test_quickRunPrintsTheFigures(tmp_path: Path) -> None:
    """
    One quick round: a table with each metric for relayd, Postfix and their
    ratio, a median line per metric, relayd's RSS, and the same in JSON,
    with every message counted at the sink (or the run would fail); and
    afterwards no process it started still runs.
    """
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--quick", "--json", str(out)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    for label in LABELS:
        [row] = [line for line in table.splitlines() if line.startswith(label)]
        relayd, postfix, ratio = (float(v) for v in row.split()[-3:])
        assert relayd > 0 and postfix > 0 and ratio > 0, row
    assert table.count("median") == len(LABELS), table
    assert "relayd/postfix" in table
    assert "relayd RSS after the rounds" in table

    figures = json.loads(out.read_text())
    assert figures["failure"] is None
    assert figures["parameters"]["rounds"] == 1
    [round1] = figures["rounds"]
    for key in KEYS:
        assert round1["relayd"][key] > 0
        assert round1["postfix"][key] > 0
        assert not math.isnan(figures["median_ratio"][key])
    assert "[[routes]]" in figures["configs"]["relayd.toml"]
    assert "mynetworks = 127.0.0.0/8" in figures["configs"]["postfix main.cf"]
    assert figures["relayd_rss_after_rounds_kib"]["VmHWM"] > 0

    # Nothing the run started is left: no process, nothing listening.
    started = figures["processes"]
    for pid in started["pids"]:
        assert not Path(f"/proc/{pid}").exists(), started
    for port in started["ports"]:
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def instructions(tmp_path: Path, *arguments: str) -> tuple[Any, dict[str, Any]]:
    """Run C{scripts/bench --instructions} with C{arguments}; its result and its JSON."""
    out = tmp_path / "instructions.json"
    result = subprocess.run(
        [
            str(REPO / "scripts" / "bench"),
            "--instructions",
            *arguments,
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return result, json.loads(out.read_text())


def test_instructionsCountsThisCheckoutAndAnother(tmp_path: Path) -> None:
    """
    C{scripts/bench --instructions --against HEAD}: relayd relays its
    messages under callgrind, twice per tree (N and 2N messages), and the
    figure per message is the difference of the two totals over N, for
    this checkout and for a worktree of HEAD, which is removed afterwards.
    Both run the same code here, so their figures differ only by what a
    run varies (under 1% with 50 and 100 messages, a few percent with
    these 20 and 40); a count that included start-up (about 1.8 billion)
    or missed the messages would not be near 3 million.
    """
    result, figures = instructions(tmp_path, "--messages", "20", "--against", "HEAD")
    assert result.returncode == 0, result.stdout + result.stderr
    assert figures["failure"] is None
    for key in ("this", "against"):
        run = figures[key]
        assert run["messages"] == [20, 40]
        small, large = run["instructions"]
        assert run["per_message"] == round((large - small) / 20)
        # relayd's start-up alone is over a billion instructions; a message
        # costs a few million (2.9 million at c282c74 with 200 and 400).
        assert small > 10**9
        assert 10**6 < run["per_message"] < 10**7, run
    assert figures["against"]["revision"] == "HEAD"
    assert 0.9 < figures["ratio"] < 1.1, figures
    lines = result.stdout.splitlines()
    assert lines[0] == "instructions per relayed message (callgrind, one relayd process)"
    assert lines[3].split()[:3] == ["ratio", "this/against", f"{figures['ratio']:.4f}"]
    # The worktree is gone, and git no longer lists it.
    listed = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert str(tmp_path) not in listed
    assert not any((tmp_path / "work").glob("*/against"))


def test_instructionsRefusesAnUnknownRevisionAtOnce(tmp_path: Path) -> None:
    """
    C{--against} a revision git does not know fails before anything is
    counted (its worktree is made first), with git's words, exit status 1
    and the failure in the JSON file.
    """
    result, figures = instructions(tmp_path, "--against", "no-such-revision-of-relayd")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: --against no-such-revision-of-relayd: " in result.stderr, result.stderr
    assert "counting" not in result.stderr, result.stderr
    assert figures["failure"].startswith("--against no-such-revision-of-relayd: ")
    assert "this" not in figures
