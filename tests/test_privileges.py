"""
Deployment as in etc/relayd.service: twistd starts as root, relayd binds a
port below 1024, then twistd drops to an unprivileged user (C{--uid},
C{--gid}) before the spool is opened; mail is accepted and spooled as that
user.  Needs root (CI runs as root) and the C{nobody} user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from relayd.testing import TestSetup

REPO = Path(__file__).resolve().parent.parent


def lowPort() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def test_unitFileDropsPrivileges() -> None:
    unit = (REPO / "etc" / "relayd.service").read_text()
    assert "--uid=relayd --gid=relayd" in unit
    assert "ExecReload=/opt/relayd/bin/relayctl --config /etc/relayd/relayd.toml reload" in unit


@pytest.mark.skipif(os.geteuid() != 0, reason="binding below 1024 then dropping needs root")
def test_bindLowPortThenDropToNobody() -> None:
    nobody = pwd.getpwnam("nobody")
    directory = tempfile.mkdtemp(prefix="relayd-privileges-")
    try:
        os.chmod(directory, 0o755)
        port = lowPort()
        setup = TestSetup(directory, modes=("relay",))
        text = Path(setup.configPath).read_text()
        text = text.replace(
            'endpoint = "tcp:0:interface=127.0.0.1"', f'endpoint = "tcp:{port}:interface=127.0.0.1"'
        )
        Path(setup.configPath).write_text(text)
        os.makedirs(setup.spoolPath)
        os.chown(setup.spoolPath, nobody.pw_uid, nobody.pw_gid)
        logPath = os.path.join(directory, "twistd.log")
        code = (
            "import sys; from twisted.scripts.twistd import run; "
            "sys.argv = ['twistd', '-n', '--pidfile=', "
            f"'--uid={nobody.pw_uid}', '--gid={nobody.pw_gid}', "
            f"'relayd', '--config', {setup.configPath!r}]; run()"
        )
        with open(logPath, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, Path(logPath).read_text()
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=5) as s:
                        refused = s.sendmail(
                            "a@example.org", ["b@example.net"], b"Subject: low\r\n\r\nx\r\n"
                        )
                    break
                except OSError:
                    assert time.monotonic() < deadline, Path(logPath).read_text()
                    time.sleep(0.1)
            assert refused == {}
            status = Path(f"/proc/{process.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == [str(nobody.pw_uid)] * 4, uids
            spooled = os.listdir(os.path.join(setup.spoolPath, "incoming"))
            assert len(spooled) == 1
            owner = os.stat(os.path.join(setup.spoolPath, "incoming", spooled[0])).st_uid
            assert owner == nobody.pw_uid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    finally:
        shutil.rmtree(directory, True)
