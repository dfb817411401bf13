"""
Endpoint strings in the config (issue 15, packaging): relative file names
resolve against the config file's folder, not the working directory, and
a bad endpoint is named in words (no C{invalid literal for int()}), by
C{relayctl check-config} and by a starting relayd alike.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relayd.endpoints import endpointProblem, explainError, resolvePaths
from relayd.testing import TestSetup

REPO = Path(__file__).resolve().parent.parent


def test_resolvePaths() -> None:
    assert resolvePaths("unix:relay.sock", "/etc/relayd") == "unix:/etc/relayd/relay.sock"
    assert (
        resolvePaths("unix:address=s/r.sock:mode=660", "/c") == "unix:address=/c/s/r.sock:mode=660"
    )
    assert resolvePaths("unix:/run/relayd/r.sock", "/c") == "unix:/run/relayd/r.sock"
    assert (
        resolvePaths("ssl:465:privateKey=k.pem:certKey=/abs/c.pem", "/c")
        == "ssl:465:privateKey=/c/k.pem:certKey=/abs/c.pem"
    )
    assert resolvePaths("ssl:465:k.pem", "/c") == "ssl:465:/c/k.pem"
    # A folder with a colon in its name stays one argument.
    assert resolvePaths("unix:r.sock", "/a:b") == "unix:/a\\:b/r.sock"
    # Nothing else changes.
    for text in ("tcp:25:interface=127.0.0.1", "systemd:domain=INET:name=relay", "tcp6:587"):
        assert resolvePaths(text, "/c") == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tcp:abc", "port 'abc' is not a number from 0 to 65535"),
        ("tcp:70000", "port '70000' is not a number from 0 to 65535"),
        ("tcp:port=x1", "port 'x1' is not a number from 0 to 65535"),
        ("tcp:", "no port (write tcp:PORT, for example tcp:25)"),
        ("tcp:25:interface=mail.example", "interface 'mail.example' is not an IP address"),
        ("tcp6:25:backlog=many", "backlog 'many' is not a number"),
        ("unix:", "no socket path (write unix:PATH)"),
        ("unix:/r.sock:mode=rw", "mode 'rw' is not an octal file mode such as 660"),
        (":25", "no endpoint type (tcp:PORT, tcp6:PORT, ssl:PORT, unix:PATH or systemd:...)"),
    ],
)
def test_endpointProblem(text: str, problem: str) -> None:
    assert endpointProblem(text) == problem


def test_goodEndpointsHaveNoProblem() -> None:
    for text in ("tcp:25", "tcp:0:interface=127.0.0.1", "tcp6:587:interface=\\:\\:1", "unix:/r"):
        assert endpointProblem(text) is None, text


def test_explainError() -> None:
    error = ValueError("invalid literal for int() with base 10: 'x'")
    assert explainError(error) == "'x' is not a number"


def checkConfig(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.ops.relayctl", "check-config", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("tcp:abc:interface=127.0.0.1", "port 'abc' is not a number from 0 to 65535"),
        ("tcp:25:interface=nowhere", "interface 'nowhere' is not an IP address"),
        ("nonsense:25", "nonsense"),
        ("unix:r.sock:mode=9z", "mode '9z' is not an octal file mode"),
    ],
)
def test_badEndpointInWords(tmp_path: Path, endpoint: str, words: str) -> None:
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",))
    text = Path(setup.configPath).read_text()
    text = text.replace('endpoint = "tcp:0:interface=127.0.0.1"', f'endpoint = "{endpoint}"')
    Path(setup.configPath).write_text(text)
    result = checkConfig(setup.configPath)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "listeners[0].endpoint" in output and words in output, output
    assert "invalid literal" not in output and "Traceback" not in output, output


def test_relativeUnixEndpointIsTheConfigFolders(tmp_path: Path) -> None:
    """
    relayd started from / with C{endpoint = "unix:relay.sock"} (and the
    metrics on C{unix:metrics.sock}) listens beside its config file.
    """
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",))
    text = Path(setup.configPath).read_text()
    text = text.replace('endpoint = "tcp:0:interface=127.0.0.1"', 'endpoint = "unix:relay.sock"')
    text += '\n[metrics]\nendpoint = "unix:metrics.sock"\n'
    Path(setup.configPath).write_text(text)
    folder = Path(setup.configPath).parent
    assert checkConfig(setup.configPath).returncode == 0
    log = tmp_path / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import sys; from twisted.scripts.twistd import run; "
                    "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', sys.argv[1]]; "
                    "run()"
                ),
                setup.configPath,
            ],
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (folder / "relay.sock").exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(folder / "relay.sock"))
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 "), log.read_text()
            s.sendall(b"QUIT\r\n")
            assert f.readline().startswith(b"221 ")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(folder / "metrics.sock"))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            page = b""
            while chunk := s.recv(65536):
                page += chunk
        assert page.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), page[:200]
        assert b"relayd_connections_total" in page
        assert not Path("/relay.sock").exists()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
