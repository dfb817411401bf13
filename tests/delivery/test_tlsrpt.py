"""
TLSRPT (RFC 8460, relayd.delivery.tlsrpt): the TXT record grammar, the
counts and their day files, the report (validated against a JSON schema
written from section 4.4) and the message carrying it (section 5.3); and
end to end: smtplib to relayd (in-process) to TLS sinks under MTA-STS
(a policy served over HTTPS) and DANE (TLSA from the project's DNS
server), with the sessions counted, MTA-STS testing checking certificates
without refusing, the daily report queued and delivered to the rua
mailbox's sink, and C{relayctl tls report}.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime, timedelta

import jsonschema
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from relayd.certificates import issueCertificate, loadServerOptions, makeCA, writeKeyPair
from relayd.config import ConfigError
from relayd.delivery.attempt import AttemptResult, RecipientResult
from relayd.delivery.client import Reply
from relayd.delivery.processes import decode, encode
from relayd.delivery.routing import Hop
from relayd.delivery.tlsrpt import (
    TLSReportCounts,
    TLSReporter,
    TLSRPTError,
    TLSSession,
    buildReport,
    mailtoAddress,
    parseTLSRPT,
    reportFilename,
    reportMessage,
)
from relayd.ops import relayctl
from relayd.testing import InProcessRelayd, TestSetup
from tests.delivery.test_attempt_e2e import BODY, DeliveryTestCase, afterReceived
from tests.delivery.test_dane import sha256, spki
from tests.delivery.test_mtasts import PolicyServer, makeTLSDir

# --- the RFC 8460 section 4.4 schema -----------------------------------------------

_DATETIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$"}
_COUNT = {"type": "integer", "minimum": 0}

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["organization-name", "date-range", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object",
            "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": _DATETIME, "end-datetime": _DATETIME},
            "additionalProperties": False,
        },
        "contact-info": {"type": "string"},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["policy", "summary"],
                "additionalProperties": False,
                "properties": {
                    "policy": {
                        "type": "object",
                        "required": ["policy-type", "policy-domain"],
                        "additionalProperties": False,
                        "properties": {
                            "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                            "policy-string": {"type": "array", "items": {"type": "string"}},
                            "policy-domain": {"type": "string", "minLength": 1},
                            "mx-host": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "summary": {
                        "type": "object",
                        "required": [
                            "total-successful-session-count",
                            "total-failure-session-count",
                        ],
                        "additionalProperties": False,
                        "properties": {
                            "total-successful-session-count": _COUNT,
                            "total-failure-session-count": _COUNT,
                        },
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["result-type", "failed-session-count"],
                            "additionalProperties": False,
                            "properties": {
                                "result-type": {
                                    "enum": [
                                        "starttls-not-supported",
                                        "certificate-host-mismatch",
                                        "certificate-expired",
                                        "certificate-not-trusted",
                                        "validation-failure",
                                        "tlsa-invalid",
                                        "dnssec-invalid",
                                        "dane-required",
                                        "sts-policy-fetch-error",
                                        "sts-policy-invalid",
                                        "sts-webpki-invalid",
                                    ]
                                },
                                "sending-mta-ip": {"type": "string"},
                                "receiving-mx-hostname": {"type": "string"},
                                "receiving-mx-helo": {"type": "string"},
                                "receiving-ip": {"type": "string"},
                                "failed-session-count": _COUNT,
                                "additional-information": {"type": "string"},
                                "failure-reason-code": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "additionalProperties": False,
}


def validateReport(report):
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)


# --- grammar -------------------------------------------------------------------------


class GrammarTests(unittest.TestCase):
    def test_record(self):
        self.assertEqual(
            parseTLSRPT(["v=TLSRPTv1; rua=mailto:tlsrpt@example.net"]),
            ["mailto:tlsrpt@example.net"],
        )
        self.assertEqual(
            parseTLSRPT(
                ["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@example.net,https://r.example.net/x"]
            ),
            ["mailto:a@example.net", "https://r.example.net/x"],
        )

    def test_refused(self):
        for records in (
            [],
            ["v=spf1 -all"],
            ["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"],
            ["v=TLSRPTv1;"],
            ["v=TLSRPTv1; rua=ftp://x.test/"],
            ["v=TLSRPTv10; rua=mailto:a@x.test"],
            ["v=TLSRPTv1; broken"],
        ):
            with self.assertRaises(TLSRPTError, msg=records):
                parseTLSRPT(records)

    def test_mailto(self):
        self.assertEqual(
            mailtoAddress("mailto:tls%2Breports@example.net"), "tls+reports@example.net"
        )
        self.assertEqual(mailtoAddress("mailto:r@example.net?subject=x"), "r@example.net")
        self.assertIsNone(mailtoAddress("https://example.net/"))
        self.assertIsNone(mailtoAddress("mailto:no-at-sign"))
        self.assertIsNone(mailtoAddress("mailto:a@b.test%0D%0ABcc:%20x@y.test"))


# --- counts, report, message --------------------------------------------------------------


class CountsTests(unittest.TestCase):
    def setUp(self):
        self.spool = tempfile.mkdtemp(prefix="relayd-tlsrpt-")
        self.addCleanup(shutil.rmtree, self.spool, True)

    def counts(self):
        return TLSReportCounts(reactor, self.spool)

    @defer.inlineCallbacks
    def test_countedWrittenAndReadBack(self):
        counts = self.counts()
        counts.start()
        counts.add("sts", "example.net", TLSSession("mx1.example.net", "192.0.2.1", "192.0.2.9"))
        for _ in range(2):
            counts.add(
                "sts",
                "example.net",
                TLSSession(
                    "mx2.example.net", "192.0.2.2", "192.0.2.9", "certificate-expired", "expired"
                ),
                policyString=["version: STSv1", "mode: enforce", "mx: *.example.net"],
                mxPatterns=["*.example.net"],
            )
        counts.add("tlsa", "example.net", TLSSession("mx1.example.net", "192.0.2.1"))
        yield counts.stop()
        # A restart: today's file read back, counting goes on.
        again = self.counts()
        again.start()
        self.addCleanup(again.stop)
        again.add("sts", "example.net", TLSSession("mx1.example.net", "192.0.2.1"))
        summary = again.summary("Example.NET.")
        self.assertEqual(
            summary,
            [
                {
                    "day": summary[0]["day"],
                    "policy-type": "sts",
                    "policy-domain": "example.net",
                    "success": 2,
                    "failure": 2,
                    "failures": {"certificate-expired": 2},
                },
                {
                    "day": summary[0]["day"],
                    "policy-type": "tlsa",
                    "policy-domain": "example.net",
                    "success": 1,
                    "failure": 0,
                    "failures": {},
                },
            ],
        )
        self.assertEqual(again.summary("other.example"), [])

    def test_unreadableFileIgnored(self):
        os.makedirs(os.path.join(self.spool, "tlsrpt"))
        today = datetime.now(UTC).date().isoformat()
        with open(os.path.join(self.spool, "tlsrpt", f"{today}.json"), "w") as f:
            f.write("{not json")
        counts = self.counts()
        self.assertEqual(counts.summary("example.net"), [])


def sampleCounts():
    return {
        "day": "2026-12-02",
        "sent": [],
        "policies": {
            "sts example.net": {
                "policy-type": "sts",
                "policy-domain": "example.net",
                "policy-string": ["version: STSv1", "mode: testing", "mx: mx1.example.net"],
                "mx-host": ["mx1.example.net"],
                "success": 5,
                "failure": 2,
                "failures": {
                    "certificate-not-trusted|192.0.2.9|mx1.example.net|192.0.2.1": {
                        "count": 2,
                        "detail": "self-signed certificate",
                    }
                },
            },
            "sts other.example": {
                "policy-type": "sts",
                "policy-domain": "other.example",
                "policy-string": [],
                "mx-host": [],
                "success": 1,
                "failure": 0,
                "failures": {},
            },
        },
    }


class ReportTests(unittest.TestCase):
    def test_report(self):
        report = buildReport(
            sampleCounts(), "example.net", "Example Org", "tls@relayd.test", "relayd.test"
        )
        validateReport(report)
        self.assertEqual(
            report["date-range"],
            {"start-datetime": "2026-12-02T00:00:00Z", "end-datetime": "2026-12-02T23:59:59Z"},
        )
        self.assertEqual(report["organization-name"], "Example Org")
        self.assertEqual(report["contact-info"], "tls@relayd.test")
        # A msg-id, as the Subject carries it (RFC 8460 section 5.3).
        self.assertEqual(report["report-id"], "2026-12-02_example.net@relayd.test")
        [policy] = report["policies"]
        self.assertEqual(policy["policy"]["policy-type"], "sts")
        self.assertEqual(policy["policy"]["mx-host"], ["mx1.example.net"])
        self.assertEqual(
            policy["summary"],
            {"total-successful-session-count": 5, "total-failure-session-count": 2},
        )
        self.assertEqual(
            policy["failure-details"],
            [
                {
                    "result-type": "certificate-not-trusted",
                    "sending-mta-ip": "192.0.2.9",
                    "receiving-mx-hostname": "mx1.example.net",
                    "receiving-ip": "192.0.2.1",
                    "failed-session-count": 2,
                    "failure-reason-code": "self-signed certificate",
                }
            ],
        )

    def test_schemaRefusesBrokenReport(self):
        report = buildReport(sampleCounts(), "example.net", "Org", None, "relayd.test")
        validateReport(report)
        report["policies"][0]["summary"]["total-failure-session-count"] = -1
        with self.assertRaises(jsonschema.ValidationError):
            validateReport(report)

    def test_message(self):
        report = buildReport(sampleCounts(), "example.net", "Org", None, "relayd.test")
        data = reportMessage(report, "example.net", "relayd.test", ["r@reports.test"], 1.7e9)
        self.assertTrue(data.isascii())
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        message = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "tlsrpt")
        self.assertEqual(message["TLS-Report-Domain"], "example.net")
        self.assertEqual(message["TLS-Report-Submitter"], "relayd.test")
        self.assertEqual(
            message["Subject"],
            f"Report Domain: example.net Submitter: relayd.test Report-ID: <{report['report-id']}>",
        )
        parts = list(message.iter_parts())
        self.assertEqual(
            [p.get_content_type() for p in parts], ["text/plain", "application/tlsrpt+gzip"]
        )
        self.assertEqual(
            parts[1].get_filename(), "relayd.test!example.net!1796169600!1796255999.json.gz"
        )
        self.assertEqual(
            reportFilename("relayd.test", "example.net", "2026-12-02"), parts[1].get_filename()
        )
        self.assertEqual(json.loads(gzip.decompress(parts[1].get_content())), report)


class PipeTests(unittest.TestCase):
    def test_sessionsCrossThePipe(self):
        """A delivery process's sessions reach the queue manager with its result."""
        hop = Hop("mx1.example.net", "192.0.2.1", 25, "opportunistic", tlsCheck=True)
        sessions = [
            TLSSession("mx1.example.net", "192.0.2.1", "192.0.2.9", "certificate-expired", "old"),
            TLSSession("mx2.example.net", "192.0.2.2", "", None, "", ("3 1 1 ab",), dane=True),
        ]
        reply = Reply(250, "2.0.0", "ok", remote=True)
        result = AttemptResult(
            [RecipientResult("b@example.net", "delivered", reply, "mx1.example.net")],
            hop,
            "TLSv1.3",
            None,
            sessions,
        )
        number, decoded = decode(encode(7, result))
        self.assertEqual((number, decoded.sessions, decoded.hop), (7, sessions, hop))
        # A line without sessions (an older delivery process) still reads.
        line = json.loads(encode(7, result))
        del line["sessions"]
        del line["hop"]["tlsCheck"]
        _, old = decode(json.dumps(line).encode())
        self.assertEqual((old.sessions, old.hop.tlsCheck), ([], False))


class ConfigTests(unittest.TestCase):
    def load(self, delivery):
        from relayd.config import load

        directory = tempfile.mkdtemp(prefix="relayd-tlsrpt-config-")
        self.addCleanup(shutil.rmtree, directory, True)
        setup = TestSetup(directory, modes=("relay",), sections={"delivery": delivery})
        return load(setup.configPath)

    def test_defaults(self):
        config = self.load({})
        self.assertEqual(
            (config.tlsrpt, config.tlsrptOrganization, config.tlsrptContact), (False, None, None)
        )

    def test_set(self):
        config = self.load(
            {"tlsrpt": True, "tlsrpt_organization": "Example", "tlsrpt_contact": "tls@x.test"}
        )
        self.assertEqual(
            (config.tlsrpt, config.tlsrptOrganization, config.tlsrptContact),
            (True, "Example", "tls@x.test"),
        )

    def test_refused(self):
        for delivery, words in (
            ({"tlsrpt": "yes"}, "tlsrpt"),
            ({"tlsrpt_organization": ""}, "tlsrpt_organization"),
            ({"tlsrpt_contact": 5}, "tlsrpt_contact"),
            ({"tlsrpt_orgnization": "x"}, "tlsrpt_orgnization"),
        ):
            with self.assertRaises(ConfigError, msg=delivery) as caught:
                self.load(delivery)
            self.assertIn(words, str(caught.exception))


# --- end to end ----------------------------------------------------------------------------

GOOD = "127.0.0.2"  # mx1.example.net (also mx3.example.net): trusted, for mx1 only
UNTRUSTED = "127.0.0.4"  # mx2.example.net: certificate from a CA nobody trusts
REPORTS = "127.0.0.5"  # mx.sender.test: the sender's MX and the rua mailbox's
EXPIRED = "127.0.0.6"  # mx4.example.net: trusted CA, expired yesterday

NAMES = {
    GOOD: "mx1.example.net",
    UNTRUSTED: "mx2.example.net",
    REPORTS: "mx.sender.test",
    EXPIRED: "mx4.example.net",
}


def expiredCertificate(ca, hostname):
    """A certificate for C{hostname} from C{ca} that expired yesterday (PEM cert and key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    caCert = x509.load_pem_x509_certificate(ca[0])
    caKey = serialization.load_pem_private_key(ca[1], None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=10))
        .not_valid_after(now - timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class _TLSRPTCase(DeliveryTestCase):
    """smtplib to relayd to TLS sinks, MTA-STS over HTTPS, DANE on the DNS test server."""

    sinkAddresses = (GOOD, UNTRUSTED, REPORTS, EXPIRED)
    tlsrpt = True
    processes = 0

    @defer.inlineCallbacks
    def setUp(self):
        self.tlsDir, ca, caPath = makeTLSDir(self)
        self.ca = ca
        other = makeCA("a CA nobody trusts")
        self.options = {}
        self.certificates = {}
        for address, name in NAMES.items():
            if address == EXPIRED:
                cert, key = expiredCertificate(ca, name)
            else:
                cert, key = issueCertificate(*(other if address == UNTRUSTED else ca), name)
            self.certificates[address] = cert
            paths = [os.path.join(self.tlsDir, f"{address}.{kind}") for kind in ("crt", "key")]
            writeKeyPair(*paths, cert, key)
            self.options[address] = loadServerOptions(*paths)
        self.server = PolicyServer(self.tlsDir, ca, ["mta-sts.example.net"])
        httpsPort = self.server.start()
        self.addCleanup(self.server.stop)
        self.delivery = {
            "ca_file": caPath,
            "mta_sts_port": httpsPort,
            "mta_sts_timeout": 5,
            "dane": True,
            "tlsrpt": self.tlsrpt,
            "tlsrpt_organization": "Relayd Test Org",
            "tlsrpt_contact": "postmaster@relayd.test",
            "processes": self.processes,
        }
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()
        for address, name in NAMES.items():
            self.dns.setA(name, [address])
        self.dns.setA("mx3.example.net", [GOOD])
        self.dns.setA("mta-sts.example.net", ["127.0.0.1"])
        self.dns.setTXT("_mta-sts.example.net", ["v=STSv1; id=one;"])
        self.dns.setTXT(
            "_smtp._tls.example.net", ["v=TLSRPTv1; rua=mailto:tls-reports@reports.test"]
        )
        self.dns.setMX("reports.test", [(10, "mx.sender.test")])

    def startSink(self, address, **options):
        return super().startSink(address, tlsOptions=self.options.get(address), **options)

    def mx(self, *hosts):
        self.dns.setMX("example.net", [(10 * (i + 1), h) for i, h in enumerate(hosts)])

    def policy(self, mode="enforce", mx=b"mx: mx1.example.net\r\n"):
        self.server.resource.body = (
            b"version: STSv1\r\nmode: " + mode.encode() + b"\r\n" + mx + b"max_age: 86400\r\n"
        )

    def logged(self, text):
        return [line for line in map(formatEvent, self.events) if text in line]

    def deliveryLines(self, status):
        return [x for x in self.logged("to=<b@example.net>, relay=") if f"status={status}" in x]

    @property
    def counts(self):
        return self.relayd.service.tlsReports

    def waitForCount(self, policyType, key, number=1):
        def reached():
            for entry in self.counts.summary("example.net"):
                if entry["policy-type"] == policyType:
                    value = entry["success"] if key == "success" else entry["failures"].get(key, 0)
                    return value >= number
            return False

        return self.waitFor(reached)

    def entry(self, policyType):
        [found] = [e for e in self.counts.summary("example.net") if e["policy-type"] == policyType]
        return found

    @defer.inlineCallbacks
    def restartOnTheNextDay(self):
        """Stop relayd (the counts are written), move today's counts to yesterday, start again."""
        yield self.relayd.stop()
        directory = os.path.join(self.setup.spoolPath, "tlsrpt")
        today = datetime.now(UTC).date()
        yesterday = (today - timedelta(days=1)).isoformat()
        with open(os.path.join(directory, f"{today.isoformat()}.json")) as f:
            counts = json.load(f)
        counts["day"] = yesterday
        os.unlink(os.path.join(directory, f"{today.isoformat()}.json"))
        with open(os.path.join(directory, f"{yesterday}.json"), "w") as f:
            json.dump(counts, f)
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        return os.path.join(directory, f"{yesterday}.json")

    def reports(self):
        return [
            m for m in self.sinks[REPORTS].messages if "tls-reports@reports.test" in m.recipients
        ]

    @defer.inlineCallbacks
    def reporterIdle(self):
        """The reporter's check, run to its end (the one at startup, then one more)."""
        from relayd.delivery.tlsrpt import TLSReporter

        [reporter] = [s for s in self.relayd.service if isinstance(s, TLSReporter)]
        yield self.waitFor(lambda: reporter._running is None)
        yield reporter.check()
        return reporter

    @defer.inlineCallbacks
    def countTestingFailure(self):
        self.policy(mode="testing", mx=b"mx: mx2.example.net\r\n")
        self.mx("mx2.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[UNTRUSTED].messages)
        yield self.waitForCount("sts", "certificate-not-trusted")


class TLSRPTDeliveryTests(_TLSRPTCase):
    @defer.inlineCallbacks
    def test_enforceSuccessCounted(self):
        self.policy()
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        yield self.waitForCount("sts", "success")
        entry = self.entry("sts")
        self.assertEqual((entry["success"], entry["failure"]), (1, 0))

    @defer.inlineCallbacks
    def test_enforceUntrustedCertificateCounted(self):
        self.policy(mx=b"mx: mx2.example.net\r\n")
        self.mx("mx2.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("sts", "certificate-not-trusted")
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        self.assertEqual(self.sinks[UNTRUSTED].messages, [])
        entry = self.entry("sts")
        self.assertEqual(entry["success"], 0)

    @defer.inlineCallbacks
    def test_enforceHostMismatchCounted(self):
        # mx3.example.net reaches the sink whose certificate names mx1 only.
        self.policy(mx=b"mx: *.example.net\r\n")
        self.mx("mx3.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("sts", "certificate-host-mismatch")
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        self.assertEqual(self.sinks[GOOD].messages, [])

    @defer.inlineCallbacks
    def test_enforceExpiredCertificateCounted(self):
        self.policy(mx=b"mx: mx4.example.net\r\n")
        self.mx("mx4.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("sts", "certificate-expired")
        yield self.waitFor(lambda: self.deliveryLines("deferred"))
        self.assertEqual(self.sinks[EXPIRED].messages, [])

    @defer.inlineCallbacks
    def test_testingFailureDeliveredCountedAndLogged(self):
        self.policy(mode="testing", mx=b"mx: mx2.example.net\r\n")
        self.mx("mx2.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[UNTRUSTED].messages)
        [message] = self.sinks[UNTRUSTED].messages
        self.assertIsNotNone(message.tls)
        self.assertEqual(afterReceived(message.data), BODY)
        yield self.waitForCount("sts", "certificate-not-trusted")
        [note] = self.logged("mta-sts testing: would have failed: ")
        self.assertIn("mx2.example.net[127.0.0.4]: certificate-not-trusted", note)
        yield self.waitFor(lambda: self.deliveryLines("sent"))
        self.assertIn("policy=mta-sts:testing, status=sent", self.deliveryLines("sent")[0])

    @defer.inlineCallbacks
    def test_testingGoodCertificateCountedAsSuccess(self):
        self.policy(mode="testing")
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        yield self.waitForCount("sts", "success")
        self.assertEqual(self.entry("sts")["failure"], 0)
        self.assertEqual(self.logged("would have failed"), [])

    @defer.inlineCallbacks
    def test_daneMismatchCounted(self):
        self.policy()
        self.dns.setSecure("example.net")
        self.dns.setTLSA(f"_{self.port}._tcp.mx1.example.net", [(3, 1, 1, sha256(b"not this"))])
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("tlsa", "validation-failure")
        self.assertEqual(self.sinks[GOOD].messages, [])

    @defer.inlineCallbacks
    def test_daneMatchCounted(self):
        self.policy()
        self.dns.setSecure("example.net")
        good = sha256(spki(self.certificates[GOOD]))
        self.dns.setTLSA(f"_{self.port}._tcp.mx1.example.net", [(3, 1, 1, good)])
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitFor(lambda: self.sinks[GOOD].messages)
        yield self.waitForCount("tlsa", "success")
        # DANE decided for that host, not MTA-STS (RFC 8461 section 2).
        self.assertEqual([e["policy-type"] for e in self.counts.summary("example.net")], ["tlsa"])

    @defer.inlineCallbacks
    def test_policyFetchErrorCounted(self):
        self.server.resource.code = 503
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("sts", "sts-policy-fetch-error")
        yield self.waitFor(lambda: self.sinks[GOOD].messages)

    @defer.inlineCallbacks
    def test_relayctlTLSReport(self):
        self.policy(mode="testing", mx=b"mx: mx2.example.net\r\n")
        self.mx("mx2.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("sts", "certificate-not-trusted")

        def run(*extra):
            out, err = io.StringIO(), io.StringIO()
            argv = ["--config", self.setup.configPath, "tls", "report", "example.net", *extra]
            status = relayctl.main(argv, stdout=out, stderr=err)
            return status, out.getvalue(), err.getvalue()

        status, text, err = yield deferToThread(run)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("example.net ", text)
        self.assertIn("policy-type=sts successful=0 failed=1", text)
        self.assertIn("  certificate-not-trusted: 1", text)
        status, text, err = yield deferToThread(run, "--json")
        self.assertEqual((status, err), (0, ""))
        [entry] = json.loads(text)
        self.assertEqual(
            (entry["policy-type"], entry["failures"]), ("sts", {"certificate-not-trusted": 1})
        )
        # Offline: from the day's file, once the daemon has written it.
        yield self.relayd.stop()
        status, text, err = yield deferToThread(run)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("policy-type=sts successful=0 failed=1", text)

    @defer.inlineCallbacks
    def test_dailyReportSentThroughTheQueue(self):
        yield self.countTestingFailure()
        path = yield self.restartOnTheNextDay()
        yield self.waitFor(self.reports)
        [message] = self.reports()
        self.assertEqual(message.sender, "")
        parsed = email.message_from_bytes(afterReceived(message.data), policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed.get_param("report-type"), "tlsrpt")
        self.assertEqual(parsed["TLS-Report-Domain"], "example.net")
        self.assertEqual(parsed["TLS-Report-Submitter"], "relayd.test")
        [gzipped] = [
            p for p in parsed.iter_parts() if p.get_content_type() == "application/tlsrpt+gzip"
        ]
        self.assertTrue(gzipped.get_filename().startswith("relayd.test!example.net!"))
        report = json.loads(gzip.decompress(gzipped.get_content()))
        validateReport(report)
        self.assertEqual(report["organization-name"], "Relayd Test Org")
        self.assertEqual(report["contact-info"], "postmaster@relayd.test")
        [policy] = report["policies"]
        self.assertEqual(policy["policy"]["policy-type"], "sts")
        self.assertEqual(
            policy["policy"]["policy-string"],
            ["version: STSv1", "mode: testing", "mx: mx2.example.net", "max_age: 86400"],
        )
        self.assertEqual(policy["summary"]["total-failure-session-count"], 1)
        [detail] = policy["failure-details"]
        self.assertEqual(detail["result-type"], "certificate-not-trusted")
        self.assertEqual(detail["receiving-mx-hostname"], "mx2.example.net")
        self.assertEqual(detail["receiving-ip"], UNTRUSTED)
        self.assertTrue(detail["sending-mta-ip"].startswith("127."))
        # Marked sent: a restart sends nothing more.
        yield self.reporterIdle()
        with open(path) as f:
            self.assertIn("example.net", json.load(f)["sent"])
        yield self.relayd.stop()
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        yield self.reporterIdle()
        self.assertEqual(len(self.logged("tlsrpt: example.net: report for")), 1)
        self.assertEqual(self.spoolCount(), 0)


class TLSRPTOffTests(_TLSRPTCase):
    """C{tlsrpt = false}: counted, never sent."""

    tlsrpt = False

    @defer.inlineCallbacks
    def test_countedNeverSent(self):
        yield self.countTestingFailure()
        path = yield self.restartOnTheNextDay()
        yield self.reporterIdle()
        self.assertEqual(self.logged("tlsrpt: example.net: report for"), [])
        self.assertEqual(self.spoolCount(), 0)
        self.assertEqual(self.reports(), [])
        with open(path) as f:
            self.assertEqual(json.load(f)["sent"], [])


class TLSRPTDeliveryProcessesTests(_TLSRPTCase):
    """
    With a delivery process (C{[delivery] processes = 1}): the sessions come
    back over its pipe, and the queue manager counts them.
    """

    processes = 1

    @defer.inlineCallbacks
    def test_countedFromTheDeliveryProcess(self):
        self.assertIsNotNone(self.relayd.service.deliveries)
        self.assertIsNone(self.relayd.service.deliverer)
        yield self.countTestingFailure()
        [entry] = self.counts.summary("example.net")
        self.assertEqual((entry["success"], entry["failure"]), (0, 1))


class RuaResource(Resource):
    """An C{https:} rua (RFC 8460 section 5.4): records the POSTs, answers C{code}."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = []
        self.code = 200

    def render_POST(self, request):
        self.posts.append((request.path, request.getHeader("content-type"), request.content.read()))
        request.setResponseCode(self.code)
        return b"thanks"


class TLSRPTRecordTests(_TLSRPTCase):
    """What the reporter does with the domain's C{_smtp._tls} record."""

    @defer.inlineCallbacks
    def test_temporaryDNSFailureRetriedLater(self):
        yield self.countTestingFailure()
        self.dns.setServfail("_smtp._tls.example.net")
        path = yield self.restartOnTheNextDay()
        reporter = yield self.reporterIdle()
        self.assertTrue(self.logged("tlsrpt: example.net: TLSRPT record lookup failed"))
        with open(path) as f:
            self.assertEqual(json.load(f)["sent"], [])
        self.assertEqual(self.reports(), [])
        self.dns.setServfail("_smtp._tls.example.net", False)
        yield reporter.check()
        yield self.waitFor(self.reports)
        with open(path) as f:
            self.assertEqual(json.load(f)["sent"], ["example.net"])

    @defer.inlineCallbacks
    def test_noRecordNothingSent(self):
        yield self.countTestingFailure()
        self.dns.setTXT("_smtp._tls.example.net", ["v=spf1 -all"])
        path = yield self.restartOnTheNextDay()
        yield self.reporterIdle()
        self.assertTrue(self.logged("tlsrpt: example.net: no report sent: "))
        self.assertEqual(self.spoolCount(), 0)
        with open(path) as f:
            self.assertEqual(json.load(f)["sent"], ["example.net"])

    @defer.inlineCallbacks
    def test_daneLookupFailureCountedAsDnssecInvalid(self):
        self.policy()
        self.dns.setSecure("example.net")
        self.dns.setServfail(f"_{self.port}._tcp.mx1.example.net")
        self.mx("mx1.example.net")
        yield self.send(["b@example.net"])
        yield self.waitForCount("tlsa", "dnssec-invalid")
        self.assertEqual(self.sinks[GOOD].messages, [])

    @defer.inlineCallbacks
    def test_httpsRuaPosted(self):
        resource = RuaResource()
        cert, key = issueCertificate(*self.ca, "tlsrpt.reports.test")
        paths = [os.path.join(self.tlsDir, f"rua.{kind}") for kind in ("crt", "key")]
        writeKeyPair(*paths, cert, key)
        site = Site(resource)
        site.noisy = False
        port = reactor.listenSSL(0, site, loadServerOptions(*paths), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns.setA("tlsrpt.reports.test", ["127.0.0.1"])
        uri = f"https://tlsrpt.reports.test:{port.getHost().port}/v1/tlsrpt"
        self.dns.setTXT(
            "_smtp._tls.example.net",
            [f"v=TLSRPTv1; rua={uri},mailto:tls-reports@reports.test"],
        )
        yield self.countTestingFailure()
        yield self.restartOnTheNextDay()
        yield self.waitFor(lambda: resource.posts)
        [(path, contentType, body)] = resource.posts
        self.assertEqual((path, contentType), (b"/v1/tlsrpt", "application/tlsrpt+gzip"))
        report = json.loads(gzip.decompress(body))
        validateReport(report)
        self.assertEqual(report["policies"][0]["policy"]["policy-domain"], "example.net")
        # And by mail to the mailto: rua beside it.
        yield self.waitFor(self.reports)
        self.assertTrue(self.logged(f"tlsrpt: example.net: report posted to {uri}"))

    @defer.inlineCallbacks
    def test_httpsRuaUntrustedNotPosted(self):
        resource = RuaResource()
        cert, key = issueCertificate(*makeCA("nobody trusts me"), "tlsrpt.reports.test")
        paths = [os.path.join(self.tlsDir, f"rua.{kind}") for kind in ("crt", "key")]
        writeKeyPair(*paths, cert, key)
        site = Site(resource)
        site.noisy = False
        port = reactor.listenSSL(0, site, loadServerOptions(*paths), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.dns.setA("tlsrpt.reports.test", ["127.0.0.1"])
        uri = f"https://tlsrpt.reports.test:{port.getHost().port}/v1/tlsrpt"
        self.dns.setTXT("_smtp._tls.example.net", [f"v=TLSRPTv1; rua={uri}"])
        yield self.countTestingFailure()
        path = yield self.restartOnTheNextDay()
        yield self.reporterIdle()
        self.assertEqual(resource.posts, [])
        self.assertTrue(self.logged(f"tlsrpt: example.net: report POST to {uri} failed"))
        with open(path) as f:
            self.assertEqual(json.load(f)["sent"], ["example.net"])


def test_reportIgnoresTheRecipientsTLSPolicies() -> None:
    """
    RFC 8460 section 5.3: a report mailed over SMTP must not be held back
    by the MTA-STS or DANE failures it may be reporting: its queue record
    carries the TLS-Required: No waiver (RFC 8689), which delivery honours
    by skipping both, and the null sender.
    """
    reporter = TLSReporter(
        counts=None,  # type: ignore[arg-type]
        resolver=None,
        spool=None,
        clock=None,
        submitter="relayd.test",
        trustRoot=object(),
    )
    record = reporter._record(["tlsrpt@example.net"], 1764720000.0, b"report\r\n")
    assert record.tlsOptional is True
    assert record.requireTLS is False
    assert record.sender == ""
    assert [r.address for r in record.recipients] == ["tlsrpt@example.net"]
