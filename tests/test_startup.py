"""
Startup failures that only show when relayd really starts, run through the
real twistd: a listener port already in use, a spool another relayd holds.
Each gets one line naming the config file, the key and the problem, exit
status 1, no traceback, and no process left hanging (thread pools that had
already started are stopped).
"""

import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path

from relayd.testing import TestSetup

REPO = Path(__file__).resolve().parent.parent
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


def runTwistd(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "relayd", "--config", config],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def errorLines(result: subprocess.CompletedProcess[str]) -> list[str]:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if "relayd: " in line and "Server Shut" not in line]


def test_portInUse(tmp_path: Path) -> None:
    setup = TestSetup(str(tmp_path), modes=("relay",), portZero=False)
    port = setup.ports["relay"]
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = runTwistd(setup.configPath)
    assert result.returncode == 1, result
    [line] = errorLines(result)
    assert f"{setup.configPath}: listeners: cannot listen on 127.0.0.1:{port}" in line, line


def test_spoolInUse(tmp_path: Path) -> None:
    setup = TestSetup(str(tmp_path), modes=("relay",))
    os.makedirs(setup.spoolPath)
    fd = os.open(os.path.join(setup.spoolPath, "lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = runTwistd(setup.configPath)
    finally:
        os.close(fd)
    assert result.returncode == 1, result
    [line] = errorLines(result)
    assert f"{setup.configPath}: spool.directory: spool {setup.spoolPath} is in use" in line, line
