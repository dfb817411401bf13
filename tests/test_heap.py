"""
L{relayd.service.freezeStartupHeap}: every relayd process moves its
startup heap out of the garbage collector's full collections (the tail of
the time-to-250 was made of them, issue 14).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from relayd.config import load
from relayd.service import buildService
from relayd.tap import Options, makeService
from relayd.testing import TestSetup

REPO = Path(__file__).resolve().parents[1]


def test_freezes() -> None:
    """In a fresh interpreter with relayd imported, the heap is frozen."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import gc, relayd.service\n"
                "before = gc.get_freeze_count()\n"
                "relayd.service.freezeStartupHeap()\n"
                "import sys\n"
                "print(before, gc.get_freeze_count(), sys.getswitchinterval())"
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before == 0
    assert after > 10000
    assert float(out[2]) == pytest.approx(0.001)


def test_onlyRealProcessesFreeze(tmp_path: Path) -> None:
    """
    twistd's service (and a receiver's) freezes its heap once the reactor
    runs; a service built inside another program (a test, relayctl's
    config check) leaves that program's heap alone.
    """
    config = TestSetup(str(tmp_path / "relayd"), modes=("relay",)).configPath
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert makeService(options).freezeHeap is True
    assert buildService(load(str(config)), MemoryReactorClock()).freezeHeap is False
