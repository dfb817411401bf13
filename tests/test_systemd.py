"""
systemd socket activation (issue 10, item 4): C{systemd:} listener
endpoints under a real C{systemd-socket-activate} (from Debian's systemd
package), which binds the sockets and passes them as systemd does
(C{LISTEN_FDS}, C{LISTEN_PID}, C{LISTEN_FDNAMES}); with two processes, so
the receiver shares the passed sockets.  Also C{relayctl check-config} on
such a config (once a traceback), and the one line relayd prints when
started without the sockets.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayd.testing import TestSetup, freePort

REPO = Path(__file__).resolve().parent.parent
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', sys.argv[1]]; run()"
)


def systemdConfig(tmp_path: Path, processes: int = 2) -> TestSetup:
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay", "submissions"),
        sections={"server": {"processes": processes}},
    )
    text = Path(setup.configPath).read_text()
    for mode in ("relay", "submissions"):
        text = text.replace(
            f'endpoint = "tcp:0:interface=127.0.0.1"\nmode = "{mode}"',
            f'endpoint = "systemd:domain=INET:name={mode}"\nmode = "{mode}"',
        )
    Path(setup.configPath).write_text(text)
    assert text.count("systemd:") == 2, text
    return setup


def relayctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.ops.relayctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_checkConfigAcceptsSystemdEndpoints(tmp_path: Path) -> None:
    setup = systemdConfig(tmp_path)
    result = relayctl("check-config", setup.configPath)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config OK" in result.stdout
    assert "Traceback" not in result.stderr


def test_withoutSocketsOneLine(tmp_path: Path) -> None:
    setup = systemdConfig(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [sys.executable, "-c", TWISTD, setup.configPath],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relayd: config error: {setup.configPath}: listeners[0].endpoint:")
    assert "relayd.socket" in lines[0]


def test_socketActivation(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing (Debian's systemd package)"
    setup = systemdConfig(tmp_path)
    relay, submissions = freePort(), freePort()
    logPath = tmp_path / "relayd.log"
    with open(logPath, "wb") as log:
        process = subprocess.Popen(
            [
                activate,
                "-l",
                f"127.0.0.1:{relay}",
                "-l",
                f"127.0.0.1:{submissions}",
                "--fdname=relay:submissions",
                sys.executable,
                "-c",
                TWISTD,
                setup.configPath,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        # systemd-socket-activate binds, then starts relayd at the first
        # connection, which waits in the passed socket's backlog until
        # relayd greets.
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", relay), timeout=30).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, logPath.read_text()
                time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", relay, timeout=30) as s:
            refused = s.sendmail("a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        assert refused == {}
        context = ssl.create_default_context(cafile=setup.caPath)
        with smtplib.SMTP_SSL("127.0.0.1", submissions, timeout=30, context=context) as s:
            assert s.ehlo()[0] == 250
        # The receiver shares the sockets: wait until it says so, then
        # connect until it has greeted someone.
        deadline = time.monotonic() + 30
        while "receiver-1 receiving" not in logPath.read_text("utf-8", "replace"):
            assert time.monotonic() < deadline, logPath.read_text()
            time.sleep(0.1)
        for _ in range(200):
            with smtplib.SMTP("127.0.0.1", relay, timeout=30) as s:
                s.noop()
            if "[receiver-1 relayd.smtpd#info]" in logPath.read_text("utf-8", "replace"):
                break
        text = logPath.read_text("utf-8", "replace")
        assert "[receiver-1 relayd.smtpd#info]" in text, text[-3000:]
        incoming = os.path.join(setup.spoolPath, "incoming")
        assert len(os.listdir(incoming)) == 1
    finally:
        process.terminate()
        try:
            status = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("relayd did not stop on SIGTERM")
    assert status in (0, -15), logPath.read_text()
