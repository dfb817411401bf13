"""
Log formats (L{relayd.ops.logs}): twistd's text lines by default, JSON lines
with C{[logging] format = "json"}.

The end-to-end test runs the real C{twistd -n relayd --config X} with JSON
logs, sends a message over SMTP that relayd delivers to Postfix's
C{smtp-sink}, scrapes the metrics endpoint, stops twistd, and checks that
every line it printed is one JSON object and that grepping the queue id
gives the message's story.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure

from relayd.config import load
from relayd.ops.logs import _classicText, _formatTime, _present, eventAsJSON, observerFor
from relayd.testing import PostfixSink, TestSetup, freePort

REPO = Path(__file__).resolve().parents[2]
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


# --- the quick formatter agrees with Twisted's ------------------------------------


class _Named:
    name = "a name"

    def __str__(self) -> str:
        return "as text"

    def method(self) -> str:
        return "called"


_AGREEMENT_EVENTS: list[dict[str, Any]] = [
    {"log_format": "plain text"},
    {
        "log_format": "{queue_id}: to={to}, delay={delay:.1f}",
        "queue_id": "Q1",
        "to": "a@b",
        "delay": 0.25,
    },
    {"log_format": "{what!r} and {what!s}", "what": "x'y"},
    {
        "log_format": "{obj.name} {obj} {items[1]} {table[k]}",
        "obj": _Named(),
        "items": [1, 2],
        "table": {"k": "v"},
    },
    {"log_format": "{obj.method()} via a call", "obj": _Named()},
    {"log_format": "missing {field} here"},
    {"log_format": "{value}", "value": None},
    {"log_format": "two\nlines {n}", "n": 2},
    {"log_format": "{{braces}} {n:>5}", "n": 3},
    {"log_format": "unbalanced {", "n": 3},
    {"log_format": "a system line", "log_system": "receiver-1"},
    {"log_format": "{level} {data}", "level": LogLevel.warn, "data": b"\xff"},
    {"log_format": ""},
    {},
]


@pytest.mark.parametrize("event", _AGREEMENT_EVENTS)
def test_quickFormatAgreesWithTwisted(event: dict[str, Any]) -> None:
    """
    The text lines relayd writes are exactly Twisted's, whichever path
    formatted them (str.format_map for plain fields, Twisted's formatter
    for calls and what cannot be formatted).
    """
    event = dict(event, log_time=1764763200.5, log_namespace="relayd.test", log_level=LogLevel.info)
    expected = formatEventAsClassicLogText(_present(event), formatTime=_formatTime)
    assert _classicText(event) == expected
    line = eventAsJSON(event)
    assert json.loads(line)["message"] == formatEvent(_present(event))


# --- the JSON object ------------------------------------------------------------


def test_loggerEventsAreTwisted() -> None:
    """
    relayd's Logger (a cheaper level check) emits the event Twisted's
    does, key for key, at every level; an invalid level is Twisted's
    failure event, not a line at that level.
    """
    from twisted.logger import Logger as TwistedLogger

    from relayd.ops.logs import Logger

    for level in LogLevel.iterconstants():
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        Logger(namespace="n", observer=ours.append).emit(level, "x {a}", a=1, log_trace=[])
        TwistedLogger(namespace="n", observer=theirs.append).emit(level, "x {a}", a=1, log_trace=[])
        [event], [expected] = ours, theirs
        assert event.keys() == expected.keys()
        for key in ("log_level", "log_namespace", "log_format", "a"):
            assert event[key] == expected[key]
        assert event["log_trace"] == [(event["log_logger"], ours.append)]
    bad: list[dict[str, Any]] = []
    Logger(namespace="n", observer=bad.append).emit("loud", "x")  # type: ignore[arg-type]
    [event] = bad
    assert event["log_level"] is LogLevel.critical
    assert event["invalidLevel"] == "loud"


def test_eventAsJSON() -> None:
    """One flat object: time, level, namespace, message, then the fields."""

    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    event = {
        "log_format": "{queue_id}: to=<{to}> status={status}",
        "log_level": LogLevel.info,
        "log_namespace": "relayd.qmgr",
        "log_time": 1700000000.25,
        "log_logger": object(),
        "queue_id": "18BC0F3A9D1E2ABCDE",
        "to": "b@example.org",
        "status": "sent",
        "delay": 1.5,
        "message": "a field called message",
        "thing": Opaque(),
    }
    line = eventAsJSON(event)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record == {
        "time": "2023-11-14T22:13:20.250000+00:00",
        "level": "info",
        "namespace": "relayd.qmgr",
        "message": "18BC0F3A9D1E2ABCDE: to=<b@example.org> status=sent",
        "queue_id": "18BC0F3A9D1E2ABCDE",
        "to": "b@example.org",
        "status": "sent",
        "delay": 1.5,
        "message_": "a field called message",
        "thing": "opaque!",
    }
    assert list(record)[:4] == ["time", "level", "namespace", "message"]


def test_eventAsJSONFailure() -> None:
    """A failure's error and traceback are fields, still on one line."""
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    event = {
        "log_format": "{queue_id}: attempt failed",
        "log_level": LogLevel.critical,
        "log_time": 1700000000.0,
        "log_failure": failure,
        "queue_id": "Q",
    }
    line = eventAsJSON(event)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["message"] == "Q: attempt failed"
    assert record["level"] == "critical"
    assert record["namespace"] is None
    assert "division by zero" in record["error"]
    assert "ZeroDivisionError" in record["traceback"]


# --- where the observer writes ----------------------------------------------------


def config(tmp_path: Path, fmt: str) -> Any:
    setup = TestSetup(str(tmp_path), modes=("relay",), sections={"logging": {"format": fmt}})
    return load(setup.configPath)


def test_textToStdoutAtInfo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Text as twistd writes it, without the debug events: [logging] level
    (default info) drops them before they are formatted.
    """
    observer = observerFor(config(tmp_path, "text"), {"nodaemon": True})
    observer(
        {
            "log_format": "shown {n}",
            "log_level": LogLevel.info,
            "n": 1,
            "log_time": 0.0,
            "log_namespace": "t",
        }
    )
    observer(
        {"log_format": "hidden", "log_level": LogLevel.debug, "log_time": 0.0, "log_namespace": "t"}
    )
    out = capsys.readouterr().out
    assert "shown 1" in out
    assert "hidden" not in out


def test_levelDebugShowsDebug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup = TestSetup(
        str(tmp_path),
        modes=("relay",),
        sections={"logging": {"format": "json", "level": "debug"}},
    )
    observer = observerFor(load(setup.configPath), {"nodaemon": True})
    observer(
        {"log_format": "detail", "log_level": LogLevel.debug, "log_time": 0.0, "log_namespace": "t"}
    )
    assert json.loads(capsys.readouterr().out)["message"] == "detail"


def test_twistdOptionsWin(tmp_path: Path) -> None:
    """twistd's --logger and --syslog keep their meaning; so does its refusal of - for daemons."""
    json_ = config(tmp_path, "json")
    assert observerFor(json_, {"logger": "some.factory", "nodaemon": True}) is None
    assert observerFor(json_, {"syslog": True}) is None
    assert observerFor(json_, {"logfile": "-", "nodaemon": False}) is None


def test_jsonToStdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    observer = observerFor(config(tmp_path, "json"), {"nodaemon": True})
    observer({"log_format": "hello {who}", "log_level": LogLevel.warn, "who": "world"})
    record = json.loads(capsys.readouterr().out)
    assert (record["message"], record["level"], record["who"]) == ("hello world", "warn", "world")


def test_jsonToLogfile(tmp_path: Path) -> None:
    """With --logfile (or as a daemon), a file rotated the way twistd rotates its own."""
    path = tmp_path / "relayd.log"
    before = signal.getsignal(signal.SIGUSR1)
    try:
        observer = observerFor(config(tmp_path, "json"), {"logfile": str(path), "nodaemon": False})
        observer({"log_format": "one", "log_level": LogLevel.info})
        observer({"log_format": "two", "log_level": LogLevel.info})
        assert [json.loads(x)["message"] for x in path.read_text().splitlines()] == [
            "one",
            "two",
        ]
        if not before:
            assert callable(signal.getsignal(signal.SIGUSR1))
    finally:
        signal.signal(signal.SIGUSR1, before)


# --- batched writes -------------------------------------------------------------------

BATCHING = r"""
import os, sys
from twisted.internet import reactor
from twisted.logger import LogLevel
from relayd.ops.logs import LazyFlushObserver, _classicText

class Counting:
    def __init__(self):
        self.fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.writes = 0
    def write(self, text):
        self.writes += 1
        os.write(self.fd, text.encode())
    def flush(self):
        pass

out = Counting()
observer = LazyFlushObserver(out, _classicText)

def event(text, level=LogLevel.info):
    observer({"log_format": text, "log_level": level, "log_time": 0.0, "log_namespace": "t"})

def burst():
    for i in range(100):
        event(f"line {i}")
    print("written during the burst:", out.writes, flush=True)
    reactor.callLater(0.5, severe)

def severe():
    print("written after the interval:", out.writes, flush=True)
    event("one more")
    event("bad news", LogLevel.error)
    print("written after an error:", out.writes, flush=True)
    event("last words")  # the reactor stops before the interval is over
    reactor.stop()

reactor.callWhenRunning(burst)
reactor.run()
"""


def test_linesAreWrittenInBatches(tmp_path: Path) -> None:
    """
    Informational lines are kept and written with one write per
    FLUSH_INTERVAL; an error writes at once, after what came before it;
    lines still kept when the process ends are written at exit.
    """
    log = tmp_path / "out.log"
    result = subprocess.run(
        [sys.executable, "-c", BATCHING, str(log)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "written during the burst: 0",
        "written after the interval: 1",
        "written after an error: 2",
    ]
    lines = [line.split("] ", 1)[1] for line in log.read_text().splitlines()]
    assert lines == [f"line {i}" for i in range(100)] + ["one more", "bad news", "last words"]


# --- the real twistd ------------------------------------------------------------------


def waitFor(condition: Any, what: str, process: subprocess.Popen[Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process.poll() is not None:
            raise AssertionError(f"twistd exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_twistdJSONLogs(tmp_path: Path) -> None:
    # Not under tmp_path: smtp-sink runs as nobody, and pytest's folders
    # are closed to others.
    directory = tempfile.mkdtemp(prefix="relayd-logs-sink-")
    try:
        sink = PostfixSink(directory)
        try:
            runTwistd(tmp_path, sink)
        finally:
            sink.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def runTwistd(tmp_path: Path, sink: PostfixSink) -> None:
    metricsPort = freePort()
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={
            "logging": {"format": "json"},
            "metrics": {"endpoint": f"tcp:{metricsPort}:interface=127.0.0.1"},
            "delivery": {"enabled": True, "connect_timeout": 10, "command_timeout": 30},
        },
    )
    setup.routeAllTo(sink.port)
    port = setup.ports["relay"]
    out = tmp_path / "stdout"
    err = tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "relayd", "--config", setup.configPath],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:

        def listening() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=5):
                    return True
            except OSError:
                return False

        waitFor(listening, "the SMTP listener", process)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("b@example.org")
            code, reply = s.data(b"Subject: json logs\r\n\r\nhello\r\n")
        assert code == 250, reply
        queueId = reply.decode().split()[-1]
        waitFor(sink.messages, "the sink to receive the message", process)
        waitFor(lambda: f'"{queueId}: removed"' in out.read_text(), "removed", process)

        with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
        }
        assert found[("relayd_messages_accepted_total", (("listener", "relay"),))] == 1
        assert found[("relayd_delivery_attempts_total", (("outcome", "sent"),))] == 1
        assert found[("relayd_queue_messages", (("state", "incoming"),))] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # twistd stops cleanly, then ends itself with the signal it was sent.
    assert process.returncode in (0, -signal.SIGTERM), err.read_text()
    assert err.read_text() == ""

    text = out.read_text()
    lines = text.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert isinstance(record, dict)
        assert {"time", "level", "namespace", "message"} <= set(record)
        datetime.fromisoformat(record["time"])
    messages = [r["message"] for r in records]
    # twistd's own lines and relayd's, from start to shutdown.
    assert any("twistd" in m and "starting up" in m for m in messages), messages
    assert any("Server Shut Down" in m for m in messages), messages

    # grep QUEUEID: the message's story, in order.
    story = [json.loads(line) for line in lines if queueId in line]
    assert all(r.get("queue_id") == queueId or queueId in r.get("queue_ids", []) for r in story), (
        story
    )
    said = [r["message"] for r in story]
    assert said[0].startswith(f"{queueId}: MAIL sender=<a@sender.test> client=127.0.0.1 "), said
    assert "helo=client.test" in said[0]
    steps = [
        "MAIL",
        "queued from=",
        "to=<b@example.org>, relay=",
    ]
    positions = [next(i for i, m in enumerate(said) if step in m) for step in steps]
    assert positions == sorted(positions), said
    assert said[-1] == f"{queueId}: removed"
    # At info, as Postfix: no line for an accepted recipient (debug), none
    # for the spool's fsync (the "queued" line comes after it).
    assert not any(": RCPT " in m or "durable in incoming" in m for m in said), said
    [delivery] = [r for r in story if r.get("to") == "b@example.org"]
    assert delivery["status"] == "sent"
    assert delivery["relay_address"] == "127.0.0.1"
    assert delivery["relay_port"] == sink.port
    assert delivery["reply"].startswith("250 ")
    assert delivery["tls"] is None and delivery["tls_verified"] is False
    assert os.path.exists(setup.spoolPath)
