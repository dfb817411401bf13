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
import signal
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
        # (Its log lines are written in batches, up to 0.2 s later.)
        deadline = time.monotonic() + 30
        while "[receiver-1 relayd.smtpd#info]" not in logPath.read_text("utf-8", "replace"):
            assert time.monotonic() < deadline, logPath.read_text("utf-8", "replace")[-3000:]
            with smtplib.SMTP("127.0.0.1", relay, timeout=30) as s:
                s.noop()
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


# --- Type=notify (relayd.ops.sdnotify) -----------------------------------


def notifyingRelayd(
    tmp_path: Path, environ: dict[str, str]
) -> tuple[TestSetup, int, subprocess.Popen[bytes], Path]:
    """relayd under twistd on a fixed port, with C{environ} added (NOTIFY_SOCKET...)."""
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",))
    port = freePort()
    text = Path(setup.configPath).read_text()
    text = text.replace(
        'endpoint = "tcp:0:interface=127.0.0.1"', f'endpoint = "tcp:{port}:interface=127.0.0.1"'
    )
    Path(setup.configPath).write_text(text)
    logPath = tmp_path / "relayd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env.update(environ)
    with open(logPath, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", TWISTD, setup.configPath],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    return setup, port, process, logPath


def receive(sock: socket.socket, want: str, logPath: Path, timeout: float = 30) -> list[str]:
    """Datagrams until one has the line C{want}; all of them, in order."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {want} in {got}: {logPath.read_text()[-3000:]}") from None
        if want in got[-1].split("\n"):
            return got


def test_notifyReadyReloadWatchdogStopping(tmp_path: Path) -> None:
    """
    Under a real NOTIFY_SOCKET (a datagram socket, as systemd's): READY=1
    only once the listener answers, WATCHDOG=1 pings at half WATCHDOG_USEC,
    RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM.
    """
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        _setup, port, process, logPath = notifyingRelayd(
            tmp_path, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        )
        try:
            got = receive(sock, "READY=1", logPath)
            # Nothing before READY=1: readiness is the first word.
            assert len(got) == 1, got
            ready = got[0].split("\n")
            assert f"MAINPID={process.pid}" in ready
            assert any(line.startswith("STATUS=") for line in ready), ready
            # Ready means answering: connect at once, no retry.
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                assert s.noop()[0] == 250
            # The watchdog: every 0.1 s from the event loop.
            started = time.monotonic()
            pings = [receive(sock, "WATCHDOG=1", logPath, 5) for _ in range(5)]
            assert all(p == ["WATCHDOG=1"] for p in pings), pings
            assert time.monotonic() - started < 3
            process.send_signal(signal.SIGHUP)
            got = [g for g in receive(sock, "READY=1", logPath) if g != "WATCHDOG=1"]
            assert got[0] == "RELOADING=1", got
            assert got[-1] == "READY=1", got
            process.terminate()
            got = [g for g in receive(sock, "STOPPING=1", logPath) if g != "WATCHDOG=1"]
            assert got == ["STOPPING=1"], got
            assert process.wait(30) in (0, -15), logPath.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_notifyRefusedReloadSaysWhy(tmp_path: Path) -> None:
    """A refused reload still ends with READY=1 (the old config serves), with its reason."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        setup, _port, process, logPath = notifyingRelayd(tmp_path, {"NOTIFY_SOCKET": path})
        try:
            receive(sock, "READY=1", logPath)
            Path(setup.configPath).write_text(
                Path(setup.configPath).read_text() + "\n[nonsense]\nx = 1\n"
            )
            result = relayctl("--config", setup.configPath, "reload")
            assert result.returncode != 0, result.stdout + result.stderr
            assert "refused" in result.stderr + result.stdout
            got = receive(sock, "READY=1", logPath)
            assert got[0] == "RELOADING=1", got
            status = got[-1].split("\n")
            assert status[0] == "READY=1"
            assert any(line.startswith("STATUS=reload refused:") for line in status), status
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_noNotifySocketNoNotification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET relayd runs as before (and sends nothing anywhere)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # pytest's own, under systemd
    _setup, port, process, logPath = notifyingRelayd(tmp_path, {})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    assert s.noop()[0] == 250
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, logPath.read_text()
                time.sleep(0.1)
        assert "cannot notify systemd" not in logPath.read_text()
    finally:
        process.terminate()
        process.wait(30)


def test_unitFileVerifies(tmp_path: Path) -> None:
    """
    etc/relayd.service passes C{systemd-analyze verify} without a warning
    (with the virtualenv's paths for /opt/relayd, which must exist for it).
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian's systemd package)"
    venv = Path(sys.executable).parent
    unit = (REPO / "etc" / "relayd.service").read_text().replace("/opt/relayd/bin/", f"{venv}/")
    (tmp_path / "relayd.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "relayd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if "relayd.service" in line]
    assert problems == [], result.stderr


def test_unitFileNotifyAndHardening() -> None:
    unit = (REPO / "etc" / "relayd.service").read_text()
    lines = set(unit.splitlines())
    for wanted in (
        "Type=notify",
        "NotifyAccess=main",
        "RuntimeDirectory=relayd",
        "SystemCallFilter=@system-service",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "ProtectClock=yes",
        "ProtectKernelLogs=yes",
        "ProtectProc=invisible",
    ):
        assert wanted in lines, wanted
    assert any(line.startswith("WatchdogSec=") for line in lines)
    reload = next(line for line in lines if line.startswith("ExecReload="))
    assert reload.split()[-1] == "reload" and "relayctl" in reload
    # The shipped config puts the control socket in the RuntimeDirectory.
    config = (REPO / "etc" / "relayd.toml").read_text()
    assert 'socket = "/run/relayd/control.sock"' in config
    # Documentation= names files the package installs (setup.cfg data_files).
    setupCfg = (REPO / "setup.cfg").read_text()
    for line in lines:
        if line.startswith("Documentation="):
            for url in line.partition("=")[2].split():
                assert url.startswith("file:///opt/relayd/share/doc/relayd/"), url
                name = url.rpartition("/")[2]
                assert (REPO / "docs" / name).is_file(), name
                assert f"docs/{name}" in setupCfg, name
