"""
Prometheus metrics (L{relayd.ops.metrics}) end to end: relayd runs in-process
with a metrics endpoint on port 0, takes mail over real SMTP (accepted,
relay denied, a failed AUTH), delivers it over verified TLS to a sink that
accepts, defers and refuses, and is then scraped over real HTTP and parsed
with prometheus_client's own parser.

Also the per-recipient delivery log line with its TLS fields, and the
C{[metrics]} config errors.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.config import ConfigError, load
from relayd.ops.metrics import Metrics
from relayd.queue.spool import arrivalFromQueueId
from relayd.service import buildService
from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    DNSServer,
    InProcessRelayd,
    SinkServer,
    TestSetup,
    freePort,
)
from relayd.testing.certs import makeCA, makeServerCert

BODY = b"Subject: metrics\r\nFrom: a@sender.test\r\n\r\nhello\r\n"


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """GET over real HTTP: status, content type, body (run in a thread)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], ""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


class MetricsTests(unittest.TestCase):
    """One relayd with metrics, mail in over SMTP, out over TLS to a sink."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DNSServer(ttl=60)
        dnsPort = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        directory = tempfile.mkdtemp(prefix="relayd-metrics-")
        self.addCleanup(shutil.rmtree, directory, True)

        # The next hop: a sink on 127.0.0.6 with a certificate from its own CA.
        ca = makeCA(directory, "sink CA")
        caPath = ca.path
        self.sink = SinkServer()
        self.sinkPort = self.sink.start(
            reactor,
            interface="127.0.0.6",
            tlsOptions=makeServerCert(ca, directory, "sink.test", ()).serverOptions(),
        )
        self.addCleanup(self.sink.stop)
        self.sink.rcptReply = {
            "later@example.org": (451, "4.2.0 not now"),
            "gone@example.org": (550, "5.1.1 no such user"),
        }
        self.dns.setA("sink.test", ["127.0.0.6"])

        self.setup = TestSetup(
            os.path.join(directory, "relayd"),
            modes=("relay", "submission"),
            sections={
                "metrics": {"endpoint": "tcp:0:interface=127.0.0.1"},
                "delivery": {
                    "enabled": True,
                    "resolvers": ["127.0.0.1"],
                    "resolver_port": dnsPort,
                    "ca_file": caPath,
                    # A deferred message stays deferred during the test.
                    "retry_initial": 3600,
                    "retry_max": 3600,
                    "delay_warning": 0,
                    "idle_timeout": 0.5,
                    "connect_timeout": 5,
                    "command_timeout": 10,
                    "data_timeout": 10,
                },
            },
            # 127.0.0.1 is not a trusted network: the relay listener
            # denies relaying, the submission listener takes AUTH.
            policies={"mynetworks": {"networks": ["192.0.2.0/24"]}},
        )
        self.setup.routeAllTo(self.sinkPort, host="sink.test", tls="verify")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)

    @defer.inlineCallbacks
    def waitFor(self, condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail("condition not met in time")
            yield deferLater(reactor, 0.05, lambda: None)

    def submit(self):
        """One submission session: a wrong password, then three messages."""
        with smtplib.SMTP("127.0.0.1", self.relayd.port("submission"), timeout=30) as s:
            s.starttls(context=self.setup.clientContext())
            s.ehlo()
            # One AUTH PLAIN (login() would go on to try LOGIN too).
            s.user, s.password = DEMO_USER, "wrong password"
            try:
                s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                wrong = e.smtp_code
            s.login(DEMO_USER, DEMO_PASSWORD)
            for rcpt in ("ok@example.org", "later@example.org", "gone@example.org"):
                s.sendmail("a@sender.test", [rcpt], BODY)
        return wrong

    def relay(self):
        """A relay attempt from an untrusted address."""
        with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=30) as s:
            try:
                s.sendmail("a@sender.test", ["x@example.org"], BODY)
            except smtplib.SMTPRecipientsRefused as e:
                return e.recipients["x@example.org"][0]
        return None

    def deliveryEvents(self):
        return [e for e in self.events if e.get("log_namespace") == "relayd.qmgr" and "to" in e]

    @defer.inlineCallbacks
    def test_scrape(self):
        wrong = yield deferToThread(self.submit)
        self.assertEqual(wrong, 535)
        denied = yield deferToThread(self.relay)
        self.assertEqual(denied, 554)

        # ok@ delivered, gone@ bounced (its DSN to a@sender.test delivered
        # through the same route), later@ deferred for an hour.
        yield self.waitFor(lambda: len(self.sink.messages) == 2)
        yield self.waitFor(lambda: len(self.deliveryEvents()) == 4)
        yield self.waitFor(lambda: not self.relayd.sessions)
        yield self.waitFor(lambda: len(self.relayd.spool.entries("deferred")) == 1)

        status, contentType, text = yield deferToThread(scrape, self.relayd.metricsPort())
        self.assertEqual(status, 200)
        self.assertTrue(contentType.startswith("text/plain; version=0.0.4"), contentType)
        found = samples(text)

        self.assertEqual(value(found, "relayd_connections_total", listener="submission"), 1)
        self.assertEqual(value(found, "relayd_connections_total", listener="relay"), 1)
        self.assertEqual(value(found, "relayd_connections_open", listener="submission"), 0)
        self.assertEqual(value(found, "relayd_connections_open", listener="relay"), 0)
        auth = "relayd_auth_attempts_total"
        self.assertEqual(value(found, auth, listener="submission", result="failure"), 1)
        self.assertEqual(value(found, auth, listener="submission", result="success"), 1)

        verdicts = "relayd_policy_verdicts_total"
        self.assertEqual(
            value(found, verdicts, phase="rcpt", policy="authenticated", action="accept"), 3
        )
        self.assertEqual(value(found, verdicts, phase="rcpt", policy="none", action="continue"), 1)
        # No policy of the chain looks at MAIL: nobody decided, four times.
        self.assertEqual(value(found, verdicts, phase="mail", policy="none", action="continue"), 4)

        self.assertEqual(value(found, "relayd_messages_accepted_total", listener="submission"), 3)
        self.assertEqual(
            value(found, "relayd_messages_rejected_total", stage="rcpt", code="554"), 1
        )
        queued = [e["size"] for e in self.events if "queued from=" in e.get("log_format", "")]
        self.assertEqual(len(queued), 3)
        self.assertEqual(
            value(found, "relayd_received_bytes_total", listener="submission"), sum(queued)
        )
        self.assertEqual(value(found, "relayd_commit_latency_seconds_count"), 3)
        # The three went through the commit journal (and any notice relayd
        # queued itself), synced through Linux AIO, one sync for one or more.
        commits = value(found, "relayd_journal_commits_total", sync="aio")
        self.assertGreaterEqual(commits, 3)
        self.assertGreaterEqual(value(found, "relayd_journal_syncs_total", sync="aio"), 1)
        self.assertLessEqual(value(found, "relayd_journal_syncs_total", sync="aio"), commits)
        self.assertGreater(value(found, "relayd_commit_latency_seconds_sum"), 0)
        self.assertEqual(value(found, "relayd_commit_latency_seconds_bucket", le="+Inf"), 3)

        attempts = "relayd_delivery_attempts_total"
        self.assertEqual(value(found, attempts, outcome="sent"), 2)
        self.assertEqual(value(found, attempts, outcome="deferred"), 1)
        self.assertEqual(value(found, attempts, outcome="bounced"), 1)
        self.assertEqual(value(found, "relayd_delivery_latency_seconds_count"), 2)

        queue = "relayd_queue_messages"
        self.assertEqual(value(found, queue, state="deferred"), 1)
        for state in ("incoming", "active", "hold"):
            self.assertEqual(value(found, queue, state=state), 0)
        [deferredId] = self.relayd.spool.entries("deferred")
        age = value(found, "relayd_queue_oldest_message_age_seconds")
        self.assertGreater(age, 0)
        self.assertLessEqual(age, time.time() - arrivalFromQueueId(deferredId) + 1)

        status, _, _ = yield deferToThread(scrape, self.relayd.metricsPort(), "/")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_deliveryLogLine(self):
        """
        One log line per recipient and attempt, with the queue id, the
        relay's name, address and port, the delay, TLS version, cipher and
        whether the certificate was verified, the status and the reply.
        """
        yield deferToThread(self.submit)
        yield self.waitFor(lambda: len(self.deliveryEvents()) == 4)
        byRecipient = {e["to"]: e for e in self.deliveryEvents()}
        sent = byRecipient["ok@example.org"]
        self.assertEqual(sent["status"], "sent")
        self.assertEqual(
            (sent["relay_host"], sent["relay_address"], sent["relay_port"]),
            ("sink.test", "127.0.0.6", self.sinkPort),
        )
        self.assertRegex(sent["tls"], r"^TLSv1\.[23] \S+$")
        self.assertIs(sent["tls_verified"], True)
        self.assertEqual((sent["code"], sent["enhanced"]), (250, "2.0.0"))
        self.assertTrue(sent["reply"].startswith("250 2.0.0"), sent["reply"])
        self.assertGreaterEqual(sent["delay"], 0)
        text = formatEvent(sent)
        self.assertTrue(text.startswith(sent["queue_id"] + ": to=<ok@example.org>, "), text)
        self.assertIn(f"relay=sink.test[127.0.0.6]:{self.sinkPort}, ", text)
        self.assertIn(f"tls={sent['tls']} (verified), status=sent (250 2.0.0", text)

        later = byRecipient["later@example.org"]
        self.assertEqual((later["status"], later["reply"]), ("deferred", "451 4.2.0 not now"))
        self.assertEqual(later["remote_host"], "sink.test")
        gone = byRecipient["gone@example.org"]
        self.assertEqual((gone["status"], gone["code"]), ("bounced", 550))

    def refusals(self):
        """530, 555 and 501 at MAIL (another path than the policies' refusals)."""
        replies = []
        with smtplib.SMTP("127.0.0.1", self.relayd.port("submission"), timeout=30) as s:
            s.ehlo()
            replies.append(s.docmd("MAIL", "FROM:<a@sender.test>")[0])  # 530: no AUTH
        with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=30) as s:
            s.helo()
            replies.append(s.docmd("MAIL", "FROM:<a@sender.test> SIZE=10")[0])  # 555
            replies.append(s.docmd("MAIL", "FROM:<a@@>")[0])  # 501
            replies.append(s.docmd("XYZZY")[0])  # 502, UNKNOWN
        return replies

    def badHandshake(self):
        """STARTTLS, then octets that are no TLS ClientHello."""
        import socket

        with socket.create_connection(("127.0.0.1", self.relayd.port("submission")), 30) as c:
            f = c.makefile("rb")
            f.readline()
            c.sendall(b"EHLO x\r\n")
            while f.readline()[3:4] == b"-":
                pass
            c.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220")
            c.sendall(b"\x16\x03\x01\x00\x10" + b"\x00" * 16)
            c.settimeout(10)
            try:
                while c.recv(4096):
                    pass
            except OSError:
                pass

    @defer.inlineCallbacks
    def test_scrapeIssue15(self):
        """
        The metrics issue 15 asked for: every refusal by command and code
        (530, 555, 501 counted as rejected too), build info, reload, TLS in
        and out, spool free space, queue age by state, deliveries per
        destination class, process_*, and no _created series.
        """
        yield deferToThread(self.submit)
        codes = yield deferToThread(self.refusals)
        self.assertEqual(codes, [530, 555, 501, 502])
        yield deferToThread(self.badHandshake)
        yield self.waitFor(lambda: len(self.deliveryEvents()) == 4)
        yield self.waitFor(lambda: not self.relayd.sessions)
        yield self.waitFor(lambda: len(self.relayd.spool.entries("deferred")) == 1)
        before = time.time()
        Path(self.setup.configPath).write_text(
            Path(self.setup.configPath).read_text() + "\n[nonsense]\n"
        )
        ok = yield self.relayd.service.reload()
        self.assertFalse(ok)

        status, _, text = yield deferToThread(scrape, self.relayd.metricsPort())
        self.assertEqual(status, 200)
        self.assertNotIn("_created", text)
        found = samples(text)
        rejected = "relayd_messages_rejected_total"
        self.assertEqual(value(found, rejected, stage="mail", code="530"), 1)
        self.assertEqual(value(found, rejected, stage="mail", code="555"), 1)
        self.assertEqual(value(found, rejected, stage="mail", code="501"), 1)
        replies = "relayd_smtp_replies_total"
        self.assertEqual(value(found, replies, command="MAIL", code="530", enhanced="5.7.0"), 1)
        self.assertEqual(value(found, replies, command="MAIL", code="555", enhanced="5.5.4"), 1)
        self.assertEqual(value(found, replies, command="MAIL", code="501", enhanced="5.1.7"), 1)
        self.assertEqual(value(found, replies, command="UNKNOWN", code="502", enhanced="5.5.2"), 1)
        self.assertEqual(value(found, replies, command="AUTH", code="535", enhanced="5.7.8"), 1)
        # No reply below 400 is counted.
        self.assertFalse([k for k in found if k[0] == replies and dict(k[1])["code"] < "4"])

        [(_, labels)] = [k for k in found if k[0] == "relayd_build_info"]
        self.assertEqual(found[("relayd_build_info", labels)], 1)
        self.assertTrue(dict(labels)["version"])
        self.assertEqual(value(found, "relayd_reload_success"), 0)
        self.assertGreaterEqual(value(found, "relayd_reload_timestamp_seconds"), before)

        handshakes = [k for k in found if k[0] == "relayd_tls_handshakes_total"]
        self.assertEqual(len(handshakes), 1, handshakes)
        self.assertRegex(dict(handshakes[0][1])["version"], r"^TLSv1\.[23]$")
        self.assertEqual(found[handshakes[0]], 1)
        self.assertEqual(
            value(found, "relayd_tls_handshake_failures_total", listener="submission"), 1
        )
        # Outbound: the route's TLS policy is verify; every attempt got it.
        self.assertEqual(
            value(found, "relayd_delivery_tls_total", policy="verify", tls="verified"), 4
        )

        self.assertGreater(value(found, "relayd_spool_free_bytes"), 0)
        st = os.statvfs(self.setup.spoolPath)
        self.assertLessEqual(value(found, "relayd_spool_free_bytes"), st.f_bavail * st.f_frsize * 2)

        ages = "relayd_queue_oldest_age_seconds"
        [deferredId] = self.relayd.spool.entries("deferred")
        self.assertGreater(value(found, ages, state="deferred"), 0)
        self.assertLessEqual(
            value(found, ages, state="deferred"), time.time() - arrivalFromQueueId(deferredId) + 1
        )
        for state in ("incoming", "active", "hold"):
            self.assertEqual(value(found, ages, state=state), 0)

        perClass = "relayd_destination_deliveries_total"
        self.assertEqual(value(found, perClass, destination="route:0", outcome="sent"), 2)
        self.assertEqual(value(found, perClass, destination="route:0", outcome="deferred"), 1)
        self.assertEqual(value(found, perClass, destination="route:0", outcome="bounced"), 1)
        latency = "relayd_destination_delivery_latency_seconds"
        self.assertEqual(value(found, latency + "_count", destination="route:0"), 2)

        self.assertGreater(value(found, "process_start_time_seconds"), 0)
        self.assertGreater(value(found, "process_open_fds"), 0)


class TwoRelaydsTests(unittest.TestCase):
    def test_registriesApart(self):
        """
        Each relayd has a registry of its own: a second one in the same
        process neither clashes with the first nor shares its counts.
        """
        first, second = Metrics(), Metrics()
        first.messageAccepted("relay", 100, 0.01)
        self.assertEqual(
            first.registry.get_sample_value(
                "relayd_messages_accepted_total", {"listener": "relay"}
            ),
            1,
        )
        self.assertIsNone(
            second.registry.get_sample_value(
                "relayd_messages_accepted_total", {"listener": "relay"}
            )
        )


# --- config -------------------------------------------------------------------


def test_badMetricsEndpoint(tmp_path: Path) -> None:
    setup = TestSetup(str(tmp_path), modes=("relay",), sections={"metrics": {"endpoint": "tcp:x"}})
    with pytest.raises(ConfigError) as caught:
        buildService(load(setup.configPath), MemoryReactorClock())
    assert caught.value.key == "metrics.endpoint"
    assert "bad endpoint 'tcp:x'" in caught.value.problem


def test_badLogFormat(tmp_path: Path) -> None:
    setup = TestSetup(str(tmp_path), modes=("relay",), sections={"logging": {"format": "xml"}})
    with pytest.raises(ConfigError) as caught:
        load(setup.configPath)
    assert caught.value.key == "logging.format"
    assert "must be one of text, json" in caught.value.problem


def test_noMetricsByDefault(tmp_path: Path) -> None:
    """Without [metrics] nothing listens for HTTP and nothing is counted."""
    setup = TestSetup(str(tmp_path), modes=("relay",))
    service = buildService(load(setup.configPath), MemoryReactorClock())
    assert not isinstance(service.metrics, Metrics)
    assert [s.name for s in service if s.name == "metrics"] == []


REPO = Path(__file__).resolve().parents[2]
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


def test_metricsPortInUse(tmp_path: Path) -> None:
    """A metrics endpoint that cannot bind stops startup with one line naming it."""
    import socket
    import subprocess

    port = freePort()
    setup = TestSetup(
        str(tmp_path),
        modes=("relay",),
        sections={"metrics": {"endpoint": f"tcp:{port}:interface=127.0.0.1"}},
    )
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "relayd", "--config", setup.configPath],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    [line] = [x for x in output.splitlines() if "relayd: " in x and "Server Shut" not in x]
    assert f"{setup.configPath}: metrics.endpoint: cannot listen on 127.0.0.1:{port}" in line


def test_arrivalFromQueueId(tmp_path: Path) -> None:
    """The oldest message's age comes from its queue id: the time it was made."""
    from relayd.queue.spool import Spool

    before = time.time()
    queueId = Spool(str(tmp_path), 0, MemoryReactorClock()).newQueueId()
    made = arrivalFromQueueId(queueId)
    assert made is not None and before - 0.001 <= made <= time.time() + 0.001
    assert arrivalFromQueueId("SHORT") is None
    assert arrivalFromQueueId("ZZZZZZZZZZZZZZZZZZ") is None


def test_perProcessFamiliesNotSummed() -> None:
    """
    A receiver's scrape page, added into the queue manager's: its counts
    are, its version, reload state and process_* figures are not (one
    relayd_build_info of 1, the queue manager's own process).
    """
    from prometheus_client import generate_latest

    from relayd.ops.metrics import SummedRegistry, parseSamples

    receiver = Metrics()
    receiver.messageRejected("mail", 530)
    samples = parseSamples(generate_latest(receiver.registry).decode())
    assert not [name for name in samples if name.startswith("process_")]
    assert "relayd_build_info" not in samples and "relayd_reload_success" not in samples
    main = Metrics()
    main.messageRejected("mail", 530)
    text = generate_latest(SummedRegistry(main.registry, lambda: [samples, samples])).decode()
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert value(found, "relayd_messages_rejected_total", stage="mail", code="530") == 3
    [(_, labels)] = [k for k in found if k[0] == "relayd_build_info"]
    assert found[("relayd_build_info", labels)] == 1
    assert value(found, "relayd_reload_success") == 1
    assert value(found, "process_start_time_seconds") > 0


def test_childProcessSeriesLabelled() -> None:
    """
    A child's process_* figures join the queue manager's page with its own
    process label, beside (not added into) the queue manager's unlabelled
    series; nothing else of the page is taken from them.
    """
    from prometheus_client import generate_latest

    from relayd.ops.metrics import SummedRegistry, parseProcessSamples

    child = Metrics()
    child.messageRejected("mail", 530)
    processes = parseProcessSamples(generate_latest(child.registry).decode(), "delivery-2")
    assert processes and all(name.startswith("process_") for name in processes)
    main = Metrics()
    text = generate_latest(SummedRegistry(main.registry, lambda: [processes])).decode()
    found = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    rss = "process_resident_memory_bytes"
    assert value(found, rss) > 0
    assert value(found, rss, process="delivery-2") > 0
    assert not [k for k in found if k[0] == "relayd_messages_rejected_total"]
