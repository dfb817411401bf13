"""
The queue at scale (issue 15): C{relayctl queue summary}, the selectors
C{--domain}, C{--sender}, C{--older-than}, the administrative bounce,
C{requeue} after a route change, suspended destinations, and C{relayctl
config}.

relayd runs in-process (L{tests.ops.test_relayctl.RelayctlTestCase}); its
next hop is a L{SinkServer} that is not listening at first, so mail is
deferred for an hour until a test starts it.  Mail is sent over SMTP with
smtplib; messages that arrived in the past are queued with the spool's
own API (L{relayd.queue.spool.Spool.submit}).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor

from relayd.ops.queuetools import (
    bucketLabels,
    parseDuration,
    queueShape,
    selectEntries,
)
from relayd.queue.spool import envelopeRecord
from relayd.queue.suspend import SUSPENDED_NAME, Suspensions, readSuspended
from relayd.testing import InProcessRelayd, SinkServer, freePort
from tests.ops.test_relayctl import BODY, RelayctlTestCase, hopLines, run

# --- pure parts ---------------------------------------------------------------------


def test_parseDuration() -> None:
    assert parseDuration("90s") == 90
    assert parseDuration("30m") == 1800
    assert parseDuration("2H") == 7200
    assert parseDuration("1d") == 86400
    assert parseDuration("1w") == 7 * 86400
    assert parseDuration("45") == 45
    assert parseDuration("1.5h") == 5400
    for bad in ("", "h", "-1m", "2 days", "1y"):
        with pytest.raises(ValueError):
            parseDuration(bad)


def _entry(queueId: str, age: float, now: float, sender: str, *rcpts: tuple[str, str]) -> Any:
    return {
        "queue_id": queueId,
        "arrival": now - age,
        "sender": sender,
        "recipients": [{"address": a, "state": s} for a, s in rcpts],
    }


def test_shapeBucketsAndOrder() -> None:
    """
    Bucket edges are qshape's (0-5 ... 320+ minutes, lower bound
    included); rows sort by total; a message counts once per domain still
    pending, once in TOTAL; final recipients do not count.
    """
    now = 1_000_000.0
    entries = [
        _entry("A", 0, now, "a@s.test", ("x@one.test", "deferred")),
        _entry("B", 299, now, "a@s.test", ("x@one.test", "pending")),
        _entry("C", 300, now, "b@s.test", ("x@one.test", "deferred"), ("y@two.test", "deferred")),
        _entry("D", 40 * 60, now, "", ("x@two.test", "deferred"), ("z@three.test", "delivered")),
        _entry("E", 320 * 60, now, "b@s.test", ("q@one.test", "deferred")),
        _entry("F", 10 * 86400, now, "b@s.test", ("q@ONE.test", "deferred")),
    ]
    assert bucketLabels() == [
        "0-5m",
        "5-10m",
        "10-20m",
        "20-40m",
        "40-80m",
        "80-160m",
        "160-320m",
        "320m+",
    ]
    shape = queueShape(entries, now, suspended={"two.test": {"since": 1}})
    assert shape["total"] == {"name": "TOTAL", "total": 6, "counts": [2, 1, 0, 0, 1, 0, 0, 2]}
    rows = {row["name"]: row for row in shape["rows"]}
    assert [row["name"] for row in shape["rows"]] == ["one.test", "two.test"]
    assert rows["one.test"]["counts"] == [2, 1, 0, 0, 0, 0, 0, 2]
    assert rows["two.test"]["counts"] == [0, 1, 0, 0, 1, 0, 0, 0]
    assert rows["two.test"]["suspended"] and not rows["one.test"]["suspended"]
    bySender = queueShape(entries, now, by="sender")
    assert [(r["name"], r["total"]) for r in bySender["rows"]] == [
        ("b@s.test", 3),
        ("a@s.test", 2),
        ("<>", 1),
    ]
    with pytest.raises(ValueError):
        queueShape(entries, now, by="recipient")


def test_selectEntries() -> None:
    now = 1_000_000.0
    entries = [
        _entry("A", 60, now, "App@S.test", ("x@one.test", "deferred")),
        _entry("B", 7200, now, "", ("x@one.test", "delivered"), ("y@mx.two.test", "deferred")),
        _entry("C", 86400, now, "b@other.test", ("x@ONE.test", "deferred")),
    ]

    def ids(**selectors: Any) -> list[str]:
        return [e["queue_id"] for e in selectEntries(entries, now, **selectors)]

    assert ids(domain="one.test") == ["A", "C"]  # B's one.test recipient is done
    assert ids(domain=".two.test") == ["B"]
    assert ids(domain="two.test") == []
    assert ids(sender="app@s.test") == ["A"]
    assert ids(sender="<>") == ["B"]
    assert ids(sender="other.test") == ["C"]
    assert ids(olderThan=3600) == ["B", "C"]
    assert ids(domain="one.test", olderThan=3600) == ["C"]
    assert ids() == ["A", "B", "C"]


def test_suspensionsFile(tmp_path: Path) -> None:
    """
    The suspended domains are in the spool, written whole (safeio) and
    read back; a damaged file is an error, not an empty set.
    """
    suspensions = Suspensions(str(tmp_path))
    assert suspensions.suspend("Example.NET.", 5.0)
    assert not suspensions.suspend("example.net", 6.0)
    assert suspensions.isSuspended("EXAMPLE.net.")
    assert readSuspended(str(tmp_path)) == {"example.net": {"since": 5.0}}
    assert oct((tmp_path / SUSPENDED_NAME).stat().st_mode & 0o777) == "0o600"
    assert suspensions.resume("example.net")
    assert not suspensions.resume("example.net")
    assert readSuspended(str(tmp_path)) == {}
    with pytest.raises(ValueError):
        suspensions.suspend("user@example.net", 1.0)
    (tmp_path / SUSPENDED_NAME).write_text("{not json")
    from relayd.queue.suspend import SuspensionsError

    with pytest.raises(SuspensionsError):
        Suspensions.load(str(tmp_path))


def test_recordWithoutSuspensionFieldsUnchanged() -> None:
    """
    Nothing new is stored in queue files (suspensions live in their own
    file): a record written by the current code reads back as it was.
    """
    from relayd.queue.record import QueueRecord

    record = envelopeRecord(
        "0ABC", "a@b.test", ["c@d.test"], 1.0, 10, "7BIT", "::1", None, None, "x"
    )
    assert QueueRecord.fromJSON(record.toJSON()) == record


# --- against relayd ---------------------------------------------------------------------


class QueueToolsTestCase(RelayctlTestCase):
    @defer.inlineCallbacks
    def queueAged(self, ageSeconds: float, sender: str, recipients: list[str]) -> Any:
        """Queue a message that arrived C{ageSeconds} ago; wait until deferred."""
        before = set(self.inState("deferred"))
        record = envelopeRecord(
            queueId="",
            sender=sender,
            recipients=recipients,
            arrival=time.time() - ageSeconds,
            size=0,
            body="7BIT",
            client="127.0.0.1",
            helo="test",
            user=None,
            listener="relay0",
        )
        queueId = yield self.relayd.spool.submit(record, BODY)
        yield self.waitFor(lambda: queueId in self.inState("deferred"))
        yield self.settled()
        self.assertNotIn(queueId, before)
        return queueId

    def settled(self) -> defer.Deferred[Any]:
        """
        Wait until no attempt is under way: a queue file reaches deferred/
        a moment before its attempt is over (and a message in delivery is
        neither flushed nor changed).
        """
        scheduler = self.relayd.service.scheduler
        d: defer.Deferred[Any] = self.waitFor(lambda: not scheduler.delivering())
        return d


class SummaryTests(QueueToolsTestCase):
    @defer.inlineCallbacks
    def test_summaryOnlineAndOffline(self) -> Any:
        """
        C{queue summary} through the control socket and, relayd stopped,
        from the spool: TOTAL first, rows by total, ages in buckets.
        """
        yield self.queueAged(60, "app@sender.test", ["a@example.net"])
        yield self.queueAged(7 * 60, "app@sender.test", ["b@example.net", "c@example.org"])
        yield self.queueAged(30 * 60, "other@sender.test", ["d@example.net"])
        yield self.queueAged(400 * 60, "", ["e@example.org"])
        status, out, err, _ = yield self.ctl("queue", "summary")
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["DOMAIN", "TOTAL", *bucketLabels()],
        )
        self.assertEqual(lines[1].split(), ["TOTAL", "4", "1", "1", "0", "1", "0", "0", "0", "1"])
        self.assertEqual(
            lines[2].split(), ["example.net", "3", "1", "1", "0", "1", "0", "0", "0", "0"]
        )
        self.assertEqual(
            lines[3].split(), ["example.org", "2", "0", "1", "0", "0", "0", "0", "0", "1"]
        )
        status, out, _, _ = yield self.ctl("queue", "summary", "--by", "sender", "--json")
        shape = json.loads(out)
        self.assertEqual(
            [(r["name"], r["total"]) for r in shape["rows"]],
            [("app@sender.test", 2), ("<>", 1), ("other@sender.test", 1)],
        )

        yield self.relayd.stop()
        status, out, err, _ = yield self.ctl("queue", "summary", "--json")
        self.assertEqual(status, 0, err)
        self.assertIn("reading the spool", err)
        shape = json.loads(out)
        self.assertEqual(shape["total"]["counts"], [1, 1, 0, 1, 0, 0, 0, 1])
        self.assertEqual([r["name"] for r in shape["rows"]], ["example.net", "example.org"])


class SelectorTests(QueueToolsTestCase):
    @defer.inlineCallbacks
    def test_selectors(self) -> Any:
        """
        hold/release/delete/flush by C{--domain}, C{--sender} and
        C{--older-than}; each picks exactly the messages it names.
        """
        old = yield self.queueAged(3 * 3600, "app@sender.test", ["a@example.net"])
        net, org = yield self.deferred(["b@example.net"], ["c@example.org"])
        other = (yield self.deferred(["d@example.com"], sender="x@other.test"))[0]
        yield self.settled()

        status, out, err, _ = yield self.ctl("queue", "hold", "--domain", "example.org")
        self.assertEqual((status, out, err), (0, f"{org}: on hold\n", ""))
        status, out, _, _ = yield self.ctl("queue", "hold", "--older-than", "2h")
        self.assertEqual((status, out), (0, f"{old}: on hold\n"))
        status, out, _, _ = yield self.ctl("queue", "hold", "--older-than", "1d")
        self.assertEqual((status, out), (0, "no queued message matched\n"))
        self.assertEqual(sorted(self.inState("hold")), sorted([old, org]))
        status, out, _, _ = yield self.ctl(
            "queue", "release", "--domain", "example.net", "--older-than", "1h"
        )
        self.assertEqual((status, out), (0, f"{old}: released\n"))
        # Released means attempted at once: wait until that attempt is over.
        scheduler = self.relayd.service.scheduler
        yield self.waitFor(lambda: old in self.inState("deferred") and not scheduler.delivering())
        status, out, _, _ = yield self.ctl("queue", "delete", "--sender", "other.test")
        self.assertEqual((status, out), (0, f"{other}: deleted\n"))

        sink = self.startSink()
        status, out, err, _ = yield self.ctl("queue", "flush", "--sender", "app@SENDER.test")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.splitlines()[0], "1 message on hold left alone (release them first)")
        self.assertEqual(
            sorted(out.splitlines()[1:]), sorted(f"{q}: to be attempted now" for q in (old, net))
        )
        yield self.waitFor(lambda: len(sink.messages) == 2)
        self.assertEqual(
            sorted(r for m in sink.messages for r in m.recipients),
            ["a@example.net", "b@example.net"],
        )
        yield self.waitFor(lambda: self.gone(net) and self.gone(old))
        self.assertEqual(self.inState("hold"), [org])

        status, _, err, _ = yield self.ctl("queue", "hold", org, "--domain", "example.org")
        self.assertEqual(status, 2)
        self.assertIn("not both", err)
        status, _, err, _ = yield self.ctl("queue", "hold", "--older-than", "soon")
        self.assertEqual(status, 2)
        self.assertIn("not a duration", err)
        status, _, err, _ = yield self.ctl("queue", "bounce")
        self.assertEqual(status, 2)


class BounceRequeueTests(QueueToolsTestCase):
    @defer.inlineCallbacks
    def test_administrativeBounce(self) -> Any:
        """
        C{queue bounce}: the recipients fail with 5.0.0, the sender gets a
        DSN (RFC 3464) saying so, and the message leaves the queue.
        """
        queueId, keep = yield self.deferred(["a@example.net", "b@example.net"], ["c@example.org"])
        yield self.settled()
        status, out, err, _ = yield self.ctl("queue", "bounce", "--domain", "example.net")
        self.assertEqual((status, out, err), (0, f"{queueId}: bounced (2 recipients)\n", ""))
        self.assertTrue(self.gone(queueId))
        # The DSN's first attempt finds no next hop either: wait for it.
        yield self.waitFor(lambda: len(self.inState("deferred")) == 2)
        yield self.settled()
        sink = self.startSink()
        status, out, _, _ = yield self.ctl("queue", "flush")
        self.assertEqual(out, "2 messages to be attempted now\n")
        yield self.waitFor(lambda: len(sink.messages) == 2)
        [dsn] = [m for m in sink.messages if m.sender == ""]
        self.assertEqual(dsn.recipients, ["app@sender.test"])
        text = dsn.data.decode("utf-8", "replace")
        self.assertIn("Status: 5.0.0", text)
        self.assertIn("<a@example.net>: 550 5.0.0 message bounced by the administrator", text)
        self.assertIn("Diagnostic-Code: smtp; 550 5.0.0 message bounced by the administrator", text)
        self.assertIn("Action: failed", text)
        self.assertIn("a@example.net", text)
        self.assertIn("b@example.net", text)
        self.assertIn(queueId, text)
        yield self.waitFor(lambda: self.gone(keep))

        status, _, err, _ = yield self.ctl("queue", "bounce", queueId)
        self.assertEqual((status, err), (1, f"relayctl: {queueId}: no such message in the queue\n"))

    @defer.inlineCallbacks
    def test_requeueAfterRouteChange(self) -> Any:
        """
        The route moves to another next hop (config edited, reloaded):
        C{queue requeue} sends the waiting mail there now rather than an
        hour later.  Messages on hold stay held.
        """
        one, held = yield self.deferred(["a@example.net"], ["b@example.net"])
        yield self.settled()
        yield self.ctl("queue", "hold", held)
        newPort = freePort()
        sink = SinkServer()
        sink.start(reactor, port=newPort)
        self.addCleanup(sink.stop)
        with open(self.setup.configPath) as f:
            config = f.read()
        with open(self.setup.configPath, "w") as f:
            f.write(config.replace(f"port = {self.sinkPort}", f"port = {newPort}"))
        status, out, err, _ = yield self.ctl("reload")
        self.assertEqual((status, err), (0, ""))
        status, out, err, _ = yield self.ctl("queue", "requeue", "--all")
        self.assertEqual(
            (status, out, err),
            (0, "1 message requeued: routed afresh now, 1 on hold (not requeued)\n", ""),
        )
        yield self.waitFor(lambda: len(sink.messages) == 1)
        self.assertEqual(sink.messages[0].recipients, ["a@example.net"])
        yield self.waitFor(lambda: self.gone(one))
        self.assertEqual(self.inState("hold"), [held])
        status, out, _, _ = yield self.ctl("queue", "requeue", "--domain", "example.org")
        self.assertEqual((status, out), (0, "no queued message matched\n"))
        status, out, err, _ = yield self.ctl("queue", "requeue", one)
        self.assertEqual(status, 1)
        self.assertEqual(err, f"relayctl: {one}: no such message in the queue\n")


class DestinationTests(QueueToolsTestCase):
    @defer.inlineCallbacks
    def test_suspendSurvivesRestartResumeDelivers(self) -> Any:
        """
        A suspended domain gets no delivery attempt (mail for it is still
        accepted and waits), other domains are delivered; the suspension
        is in the spool and holds after a restart; resume delivers.
        """
        status, out, err, _ = yield self.ctl("destination", "suspend", "Example.NET")
        self.assertEqual(status, 0, err)
        self.assertIn("example.net: suspended", out)
        self.assertEqual(list(readSuspended(self.setup.spoolPath)), ["example.net"])
        sink = self.startSink()
        yield self.send(["a@example.net", "b@example.org"])
        yield self.waitFor(lambda: len(sink.messages) == 1)
        self.assertEqual(sink.messages[0].recipients, ["b@example.org"])
        yield self.waitFor(lambda: len(self.inState("deferred")) == 1)
        yield self.settled()
        [waiting] = self.inState("deferred")
        record = self.relayd.spool.load(waiting)[0]
        states = {r.address: r.state.value for r in record.recipients}
        self.assertEqual(states, {"a@example.net": "pending", "b@example.org": "delivered"})

        status, out, _, _ = yield self.ctl("queue", "summary")
        self.assertIn("example.net (suspended)", out)
        scheduler = self.relayd.service.scheduler
        before = scheduler.attempts
        status, out, _, _ = yield self.ctl("queue", "flush")
        self.assertEqual(out, "1 message to be attempted now\n")
        yield self.send(["c@example.net"])
        # Both looked at; a message only for suspended destinations is not
        # even moved (it stays in incoming/, nothing written).
        yield self.waitFor(lambda: scheduler.attempts >= before + 2 and not scheduler.delivering())
        [new] = self.inState("incoming")
        self.assertEqual(self.inState("deferred"), [waiting])
        self.assertEqual(len(sink.messages), 1)

        # A restart: the same config and spool, a new service tree.
        yield self.relayd.stop()
        status, out, _, _ = yield self.ctl("destination", "list")
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("example.net  suspended since "), out)
        self.relayd = yield InProcessRelayd.start(self.setup)
        scheduler = self.relayd.service.scheduler
        yield scheduler.whenIndexed()
        # The message in incoming/ is looked at as soon as relayd starts.
        yield self.waitFor(lambda: scheduler.attempts >= 1 and not scheduler.delivering())
        before = scheduler.attempts
        status, out, _, _ = yield self.ctl("queue", "flush")
        self.assertEqual(out, "2 messages to be attempted now\n")
        status, out, _, _ = yield self.ctl("destination", "list", "--json")
        self.assertEqual(list(json.loads(out)), ["example.net"])
        yield self.waitFor(lambda: scheduler.attempts >= before + 2 and not scheduler.delivering())
        self.assertEqual((self.inState("deferred"), self.inState("incoming")), ([waiting], [new]))
        self.assertEqual(len(sink.messages), 1)
        record = self.relayd.spool.load(new)[0]
        self.assertEqual([(r.state.value, r.attempts) for r in record.recipients], [("pending", 0)])

        status, out, err, _ = yield self.ctl("destination", "resume", "example.net")
        self.assertEqual(
            (status, out, err), (0, "example.net: resumed, 2 messages to be attempted now\n", "")
        )
        yield self.waitFor(lambda: len(sink.messages) == 3)
        self.assertEqual(
            sorted(r for m in sink.messages[1:] for r in m.recipients),
            ["a@example.net", "c@example.net"],
        )
        yield self.waitFor(lambda: not self.inState("deferred") and not self.inState("active"))
        self.assertEqual(readSuspended(self.setup.spoolPath), {})
        status, out, _, _ = yield self.ctl("destination", "resume", "example.net")
        self.assertEqual(out, "example.net: not suspended\n")
        status, _, err, _ = yield self.ctl("destination", "suspend", "a@example.net")
        self.assertEqual(status, 2)


# --- relayctl config ---------------------------------------------------------------------


def test_configMasksSecrets(tmp_path: Path) -> None:
    """
    C{relayctl config}: every key with its value, what differs from the
    default marked; a hop's password masked, a password_file shown as its
    path; C{--defaults} lists the built-in defaults; C{--json}.
    """
    (tmp_path / "secret.txt").write_text("file-secret-value\n")
    config = tmp_path / "relayd.toml"
    config.write_text(
        '[server]\nhostname = "mx.example.test"\n'
        '[spool]\ndirectory = "spool"\n'
        "[delivery]\nport = 2525\n"
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nmode = "relay"\n'
        + hopLines(
            [
                {"host": "smart.example.test", "username": "u", "password": "inline-secret"},
                {"host": "other.example.test", "username": "v", "password_file": "secret.txt"},
            ]
        )
    )
    status, out, err, _ = run(["--config", str(config), "config"])
    assert (status, err) == (0, "")
    assert "inline-secret" not in out and "file-secret-value" not in out
    lines = out.splitlines()
    assert '* routes[0].hops[0].password = "********"' in lines
    assert f'* routes[0].hops[1].password_file = "{tmp_path / "secret.txt"}"' in lines
    assert "* delivery.port = 2525" in lines
    assert "  delivery.retry_initial = 300.0" in lines
    assert f'* spool.directory = "{tmp_path / "spool"}"' in lines
    assert f'  control.socket = "{tmp_path / "spool" / "control.sock"}"' not in lines
    assert '* server.hostname = "mx.example.test"' in lines

    status, out, _, _ = run(["--config", str(config), "config", "--json"])
    settings = {s["key"]: s for s in json.loads(out)}
    assert settings["routes[0].hops[0].password"]["value"] == "********"
    assert settings["delivery.port"] == {
        "key": "delivery.port",
        "value": 2525,
        "default": 25,
        "set": True,
    }

    status, out, _, _ = run(["--config", str(config), "config", "--defaults"])
    assert status == 0
    assert "delivery.port = 25" in out.splitlines()
    assert "mx.example.test" not in out

    config.write_text(config.read_text() + "\n[delivery.bad]\n")
    status, _, err, _ = run(["--config", str(config), "config"])
    assert status == 1 and err.startswith("relayctl: config error: "), err


def test_configPolicySecretsMasked(tmp_path: Path) -> None:
    """A policy option whose name looks secret is masked; a *_file one is a path."""
    from relayd.ops.showconfig import MASK, effectiveSettings

    config = tmp_path / "relayd.toml"
    config.write_text(
        '[spool]\ndirectory = "spool"\n'
        '[policy]\nchain = ["mynetworks"]\n'
        '[policies.mynetworks]\nnetworks = ["127.0.0.0/8"]\n'
        '[[listeners]]\nendpoint = "tcp:0:interface=127.0.0.1"\nmode = "relay"\n'
    )
    settings = {s["key"]: s["value"] for s in effectiveSettings(str(config))}
    assert settings["policies.mynetworks.networks"] == ["127.0.0.0/8"]
    from relayd.ops.showconfig import _maskOption

    assert _maskOption("api_key", "k", str(tmp_path)) == MASK
    assert _maskOption("redis_password", "p", str(tmp_path)) == MASK
    assert _maskOption("key_file", "k.pem", str(tmp_path)) == os.path.join(tmp_path, "k.pem")
    assert _maskOption("limit", 5, str(tmp_path)) == 5
    assert _maskOption("redis", "redis://u:s3cret@db:6379/0", "/") == "redis://********@db:6379/0"
    assert _maskOption("redis", "rediss://db/0?password=s3cret&db=1", "/") == (
        "rediss://db/0?password=********&db=1"
    )
    assert _maskOption("servers", ["redis://:pw@a", "redis://b"], "/") == [
        "redis://********@a",
        "redis://b",
    ]
    assert _maskOption("user@example", "a@b.test", "/") == "a@b.test"


# --- a real twistd relayd, restarted ------------------------------------------------


def test_twistdSuspensionSurvivesRestart(tmp_path: Path) -> None:
    """
    Against a real C{twistd -n relayd} and Postfix's C{smtp-sink} as the
    next hop, with the installed command line (C{python -m
    relayd.ops.relayctl}): a destination suspended before a SIGTERM is
    still suspended after the restart; mail for it is accepted and waits
    while mail for another domain in the same message is delivered;
    C{destination resume} delivers it.
    """
    import shutil
    import signal
    import smtplib
    import subprocess
    import sys
    import tempfile

    from relayd.testing import PostfixSink, TestSetup
    from tests.ops.test_relayctl import REPO, ctlProcess, waitUntil

    hopPort = freePort()
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={"delivery": {"enabled": True, "retry_initial": 3600, "retry_max": 3600}},
    )
    with open(setup.configPath, "a") as f:
        f.write(hopLines([{"host": "127.0.0.1", "port": hopPort, "tls": "none"}]))
    code = (
        "import sys; from twisted.scripts.twistd import run; "
        "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', "
        f"{setup.configPath!r}]; run()"
    )
    socketPath = os.path.join(setup.spoolPath, "control.sock")
    logPath = tmp_path / "relayd.log"

    def start() -> subprocess.Popen[bytes]:
        with open(logPath, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        waitUntil(lambda: os.path.exists(socketPath) or process.poll() is not None, "the socket")
        assert process.poll() is None, logPath.read_text()
        return process

    def stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        result = ctlProcess(setup.configPath, *args)
        assert result.returncode == 0, result
        return result

    sinkDirectory = tempfile.mkdtemp(prefix="queuetools-sink-")
    sink = None
    process = start()
    try:
        assert "example.net: suspended" in ctl("destination", "suspend", "example.net").stdout
        stop(process)
        listed = ctl("destination", "list").stdout  # offline, from the spool
        assert listed.startswith("example.net  suspended since "), listed
        process = start()
        sink = PostfixSink(sinkDirectory, port=hopPort)
        with smtplib.SMTP("127.0.0.1", setup.ports["relay"], timeout=30) as s:
            s.sendmail("app@sender.test", ["a@example.net", "b@example.org"], BODY)
        # smtp-sink creates its dump file before it has written it.
        waitUntil(
            lambda: any(b"b@example.org" in d for d in sink.messages()), "delivery to example.org"
        )
        [dump] = sink.messages()
        assert b"b@example.org" in dump and b"a@example.net" not in dump

        def entries() -> list[dict[str, Any]]:
            result: list[dict[str, Any]] = json.loads(ctl("queue", "list", "--json").stdout)
            return result

        waitUntil(lambda: [e["state"] for e in entries()] == ["deferred"], "the waiting message")
        [entry] = entries()
        assert {r["address"]: r["state"] for r in entry["recipients"]} == {
            "a@example.net": "pending",
            "b@example.org": "delivered",
        }
        summary = ctl("queue", "summary").stdout
        assert "example.net (suspended)" in summary, summary
        assert ctl("destination", "resume", "example.net").stdout == (
            "example.net: resumed, 1 message to be attempted now\n"
        )
        waitUntil(lambda: entries() == [], "delivery to example.net")
        waitUntil(
            lambda: any(b"a@example.net" in d for d in sink.messages()), "the dump of example.net"
        )
        # Log lines are written in batches (relayd.ops.logs).
        waitUntil(
            lambda: "destination example.net resumed by relayctl" in logPath.read_text(),
            "the resume log line",
        )
    finally:
        stop(process)
        if sink is not None:
            sink.stop()
        shutil.rmtree(sinkDirectory, True)
