"""
The JSON log lines against the schema that docs/observability.md publishes
(read from the document itself, so the two cannot drift), with the
C{jsonschema} library, over every line of a real C{twistd relayd} run that
accepts, refuses (at MAIL by the rate limit, at MAIL for a non-ASCII
address, at RCPT for relaying), delivers, defers and bounces through three
Postfix C{smtp-sink}s: one accepting, one answering 4xx and one 5xx to
RCPT.

Also the text format's spelling of the same fields, and that every line
about a session or message starts with its id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from relayd.ops.logs import _classicText
from relayd.testing import DEMO_PASSWORD, DEMO_USER, PostfixSink, TestSetup

REPO = Path(__file__).resolve().parents[2]


def documentedSchema() -> dict[str, Any]:
    """The JSON schema in docs/observability.md, under "### JSON schema"."""
    text = (REPO / "docs" / "observability.md").read_text()
    section = text.split("### JSON schema", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert block, "no JSON block under ### JSON schema"
    schema: dict[str, Any] = json.loads(block.group(1))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        documentedSchema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_schemaRefusesTheOldSpellings() -> None:
    """The schema itself catches what issue 15 found: it can fail."""
    v = validator()
    good = {
        "time": "2026-12-03T10:00:00.000000+00:00",
        "level": "info",
        "namespace": "relayd.smtpd",
        "message": "0A1B2C3D: MAIL sender=<a@b.test> -> reject 450 4.7.1 session=0A1B2C3D",
        "session_id": "0A1B2C3D",
        "queue_id": None,
        "sender": "a@b.test",
        "user": None,
        "tls": None,
    }
    assert list(v.iter_errors(good)) == []
    for bad in (
        {"sender": "<a@b.test>"},
        {"user": "None"},
        {"tls": "none"},
        {"message": "None: MAIL refused"},
        {"session_id": None, "queue_id": None},
        {"level": "information"},
        {"time": "yesterday"},
    ):
        assert list(v.iter_errors({**good, **bad})), bad


@pytest.fixture
def sinks() -> Any:
    # Not under tmp_path: smtp-sink runs as nobody, and pytest's folders
    # are closed to others.
    directory = tempfile.mkdtemp(prefix="relayd-logschema-")
    made: list[PostfixSink] = []
    os.chmod(directory, 0o755)  # smtp-sink (nobody) writes its dumps below
    try:
        for name, extra in (("ok", ()), ("later", ("-r", "RCPT")), ("gone", ("-f", "RCPT"))):
            Path(directory, name).mkdir()
            made.append(PostfixSink(str(Path(directory, name)), f"{name}-sink.test", extra))
        yield made
    finally:
        for sink in made:
            sink.stop()
        shutil.rmtree(directory, ignore_errors=True)


def relaydRun(tmp_path: Path, sinks: list[PostfixSink], fmt: str) -> tuple[str, str]:
    """
    One relayd run in C{fmt}: a message to three recipients over
    submission (AUTH), a second MAIL refused by the rate limit, a
    non-ASCII sender refused, a relay attempt refused at RCPT; deliveries
    sent, deferred, bounced (and the DSN sent).  Its stdout and the queue id.
    """
    ok, later, gone = sinks
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay", "submission"),
        portZero=False,
        chain=["ratelimit", "mynetworks", "authenticated"],
        sections={
            # Debug: every line relayd can write about a message, the
            # accepted RCPTs and the spool's "durable" included.
            "logging": {"format": fmt, "level": "debug"},
            "delivery": {
                "enabled": True,
                "connect_timeout": 10,
                "command_timeout": 30,
                "retry_initial": 3600,
                "retry_max": 3600,
            },
        },
        policies={
            "ratelimit": {
                "rules": [{"name": "per-user", "key": "user", "messages": ["1/hour"]}],
            },
            # 127.0.0.1 is not trusted: the relay listener refuses relaying.
            "mynetworks": {"networks": ["192.0.2.0/24"]},
        },
    )
    with open(setup.configPath, "a") as f:
        f.writelines(
            f'\n[[routes]]\ndomains = ["{domain}"]\n[[routes.hops]]\n'
            f'host = "127.0.0.1"\nport = {sink.port}\ntls = "none"\n'
            for domain, sink in (("later.test", later), ("gone.test", gone), ("*", ok))
        )
    out = tmp_path / f"stdout.{fmt}"
    err = tmp_path / f"stderr.{fmt}"
    with out.open("w") as stdout, err.open("w") as stderr:
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
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60

        def waitFor(what: str, condition: Any) -> None:
            while not condition():
                assert process.poll() is None, err.read_text() + out.read_text()
                assert time.monotonic() < deadline, f"{what}: {out.read_text()[-4000:]}"
                time.sleep(0.1)

        def listening() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", setup.ports["relay"], timeout=5):
                    return True
            except OSError:
                return False

        waitFor("listening", listening)
        recipients = ["b@ok.test", "c@later.test", "d@gone.test"]
        with smtplib.SMTP("127.0.0.1", setup.ports["submission"], timeout=30) as s:
            s.starttls(context=setup.clientContext())
            s.login(DEMO_USER, DEMO_PASSWORD)
            refused = s.sendmail("a@sender.test", recipients, b"Subject: schema\r\n\r\nhi\r\n")
            assert refused == {}
            # The per-user limit is full: refused at MAIL, before a queue id.
            code, _ = s.docmd("MAIL", "FROM:<a@sender.test>")
            assert 400 <= code < 500, code
        with smtplib.SMTP("127.0.0.1", setup.ports["relay"], timeout=30) as s:
            s.ehlo("client.test")
            s.command_encoding = "utf-8"  # UTF-8 octets, without SMTPUTF8
            assert s.docmd("MAIL", "FROM:<\xe4@sender.test>")[0] == 553
            assert s.docmd("MAIL", "FROM:<x@sender.test>")[0] == 250
            assert s.docmd("RCPT", "TO:<y@elsewhere.test>")[0] == 554
        text = out.read_text
        waitFor("the deferral", lambda: "deferred, 1 recipients left" in text())
        # The DSN for d@gone.test, delivered to the accepting sink.
        waitFor("the bounce", lambda: len(ok.messages()) == 2)
        waitFor("the DSN removed", lambda: text().count(": removed") >= 1)
        found = re.search(r"([0-9A-Z]{10,}): queued from=<a@sender.test>", text())
        assert found, text()
        queueId = found.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, -signal.SIGTERM), err.read_text()
    return out.read_text(), queueId


def test_realRunMatchesSchema(tmp_path: Path, sinks: list[PostfixSink]) -> None:
    text, queueId = relaydRun(tmp_path, sinks, "json")
    records = [json.loads(line) for line in text.splitlines()]
    v = validator()
    problems = [(r["message"], e.message) for r in records for e in v.iter_errors(r)]
    assert problems == [], problems

    # The run had every kind of line the schema speaks of.
    byStatus = {
        r["status"]: r for r in records if r.get("namespace") == "relayd.qmgr" and "to" in r
    }
    assert set(byStatus) == {"sent", "deferred", "bounced"}, byStatus
    assert byStatus["sent"]["tls"] is None and byStatus["sent"]["tls_verified"] is False
    assert byStatus["deferred"]["code"] // 100 == 4
    assert byStatus["bounced"]["code"] // 100 == 5
    story = [r for r in records if r.get("queue_id") == queueId]
    [mail] = [r for r in story if r["message"].startswith(f"{queueId}: MAIL ")]
    assert mail["sender"] == "a@sender.test" and mail["user"] == DEMO_USER
    assert re.fullmatch(r"TLSv1\.[23]", mail["tls"]), mail
    assert f"tls={mail['tls']}" in mail["message"] and f"user={DEMO_USER}" in mail["message"]
    # The relay session: no TLS, no AUTH; null in JSON, none in the text.
    [plain] = [r for r in records if r.get("sender") == "x@sender.test" and "MAIL" in r["message"]]
    assert plain["tls"] is None and plain["user"] is None, plain
    assert "tls=none user=none" in plain["message"], plain
    [queued] = [r for r in story if "queued from=" in r["message"]]
    assert queued["user"] == DEMO_USER
    rcpts = [r for r in story if r["message"].startswith(f"{queueId}: RCPT ")]
    assert sorted(r["to"] for r in rcpts) == ["b@ok.test", "c@later.test", "d@gone.test"]

    # Refusals before a queue id: led by the session id, never None.
    [limited] = [r for r in records if "rate limit exceeded at MAIL" in r["message"]]
    assert limited["queue_id"] is None
    assert limited["message"].startswith(f"{limited['session_id']}: rate limit exceeded")
    [nonAscii] = [r for r in records if "non-ASCII sender" in r["message"]]
    assert nonAscii["message"].startswith(f"{nonAscii['session_id']}: MAIL refused")
    [denied] = [
        r for r in records if r["message"].split(" ")[1:2] == ["RCPT"] and r.get("code") == 554
    ]
    assert denied["to"] == "y@elsewhere.test" and denied["sender"] == "x@sender.test"
    assert "to=<y@elsewhere.test> sender=<x@sender.test>" in denied["message"]
    assert denied["message"].startswith(f"{denied['queue_id']}: RCPT")

    # Every line about a session or a message starts with its id.
    for r in records:
        ids = [i for i in (r.get("queue_id"), r.get("session_id")) if i]
        if ids:
            assert r["message"].split(":")[0] in ids, r["message"]
    assert not [r["message"] for r in records if re.search(r"=None\b|\bNone:", r["message"])]


def test_textRunSpellsFieldsOneWay(tmp_path: Path, sinks: list[PostfixSink]) -> None:
    """The text format: user=none / tls=none, never None; addresses in brackets."""
    text, queueId = relaydRun(tmp_path, sinks, "text")
    assert "=None" not in text and "None:" not in text, [
        line for line in text.splitlines() if "None" in line
    ]
    lines = [line for line in text.splitlines() if queueId in line]
    [mail] = [line for line in lines if f"{queueId}: MAIL " in line]
    assert "sender=<a@sender.test>" in mail and f"user={DEMO_USER}" in mail, mail
    [plain] = [line for line in text.splitlines() if "MAIL sender=<x@sender.test>" in line]
    assert "tls=none user=none" in plain, plain
    [sent] = [line for line in lines if "status=sent" in line]
    assert "to=<b@ok.test>, " in sent and "tls=none, " in sent, sent


def test_textShowsAbsentAsNone() -> None:
    """The text formatter: a field without a value reads C{none}, in any line."""
    from twisted.logger import LogLevel

    line = _classicText(
        {
            "log_format": "{prefix}: queued user={user} tls={tls}",
            "log_level": LogLevel.info,
            "log_namespace": "relayd.smtpd",
            "log_time": 1.0,
            "prefix": "Q",
            "user": None,
            "tls": None,
        }
    )
    assert line is not None and line.endswith("Q: queued user=none tls=none\n"), line
