"""
REQUIRETLS and C{TLS-Required: No} (RFC 8689, L{relayd.delivery.requiretls}).

Dialogues over a L{StringTransport} for the inbound rules; the queue
record's new fields; and whole journeys: Python's smtplib sends with
C{REQUIRETLS} over STARTTLS to relayd (in-process), which delivers over
real sockets and real TLS to test sinks with certificates made here, MX
names served by a real DNS server on 127.0.0.1.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import tempfile
from dataclasses import replace

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from relayd.delivery.attempt import AttemptResult, RecipientResult
from relayd.delivery.client import Reply as RemoteReply
from relayd.delivery.requiretls import POLICY_WAIVED, markWaived
from relayd.delivery.routing import Hop
from relayd.queue.record import QueueRecord
from relayd.smtp import extensions
from relayd.testing import PostfixSink
from relayd.testing.certs import makeCA, makeServerCert
from tests.delivery.test_attempt import DeliveryTestCase as ClientTestCase
from tests.delivery.test_attempt_e2e import BODY, DeliveryTestCase, afterReceived
from tests.smtp.test_dialogue import DialogueTestCase
from tests.smtp.test_extensions import offer

# --- inbound: the dialogue ---------------------------------------------------


class AdvertiseTests(DialogueTestCase):
    """RFC 8689 section 2: REQUIRETLS is offered only under TLS."""

    def test_notBeforeTLS(self) -> None:
        lines = self.ehlo()
        self.assertFalse([line for line in lines if "REQUIRETLS" in line], lines)

    def test_afterSTARTTLS(self) -> None:
        self.ehlo()
        self.assertEqual(self.talk("STARTTLS\r\n"), ["220 2.0.0 Ready to start TLS"])
        lines = self.ehlo()
        self.assertIn("REQUIRETLS", [line[4:] for line in lines])

    def test_table(self) -> None:
        """The row: under TLS (STARTTLS done or port 465), never before."""
        self.assertNotIn("REQUIRETLS", extensions.advertise(offer()))
        self.assertIn("REQUIRETLS", extensions.advertise(offer(tls=True)))
        self.assertIn(
            "REQUIRETLS",
            extensions.advertise(offer(tls=True, tlsAvailable=False, mode="submissions")),
        )


class ImplicitTLSAdvertiseTests(DialogueTestCase):
    """On a port 465 listener the session is under TLS from the start."""

    mode = "submissions"

    def test_advertisedAtOnce(self) -> None:
        self.assertIn("REQUIRETLS", [line[4:] for line in self.ehlo()])


class MailParameterTests(DialogueTestCase):
    """RFC 8689 sections 2 and 4.1: the MAIL parameter."""

    def sendMessage(self, mail: str, body: str = "Subject: x\r\n\r\nhello\r\n") -> str:
        self.assertEqual(self.talk(mail), ["250 2.1.0 Ok"])
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])
        self.assertEqual(self.talk("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        [reply] = self.talk(body + ".\r\n")
        self.assertTrue(reply.startswith("250 2.0.0 Ok: queued as "), reply)
        return reply.rsplit(" ", 1)[1]

    def test_refusedWithoutTLS(self) -> None:
        """Without TLS: refused, and the session takes the same MAIL without it."""
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> REQUIRETLS\r\n"),
            ["530 5.7.10 Error: REQUIRETLS needs a TLS session"],
        )
        # No transaction was started: RCPT needs MAIL first.
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net>\r\n"), ["503 5.5.1 Error: need MAIL command"]
        )
        queueId = self.sendMessage("MAIL FROM:<a@example.com>\r\n")
        self.assertFalse(self.spool.records[queueId].requireTLS)

    def test_takenUnderTLSAndRecorded(self) -> None:
        self.ehlo()
        self.starttls()
        queueId = self.sendMessage("MAIL FROM:<a@example.com> REQUIRETLS\r\n")
        record: QueueRecord = self.spool.records[queueId]
        self.assertTrue(record.requireTLS)
        self.assertFalse(record.tlsOptional)

    def test_notRecordedWithoutIt(self) -> None:
        self.ehlo()
        self.starttls()
        queueId = self.sendMessage("MAIL FROM:<a@example.com>\r\n")
        self.assertFalse(self.spool.records[queueId].requireTLS)

    def test_valueRefused(self) -> None:
        """A bare keyword: C{REQUIRETLS=yes} is a syntax error, nothing started."""
        self.ehlo()
        self.starttls()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> REQUIRETLS=yes\r\n"),
            ["501 5.5.4 Error: bad REQUIRETLS parameter"],
        )
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net>\r\n"), ["503 5.5.1 Error: need MAIL command"]
        )

    def test_tlsRequiredNoRecorded(self) -> None:
        """RFC 8689 section 4.1: the header field, without REQUIRETLS, is kept as tlsOptional."""
        self.ehlo()
        queueId = self.sendMessage(
            "MAIL FROM:<a@example.com>\r\n", "Subject: x\r\ntls-required:  NO\r\n\r\nhello\r\n"
        )
        record = self.spool.records[queueId]
        self.assertTrue(record.tlsOptional)
        self.assertFalse(record.requireTLS)

    def test_tlsRequiredOtherValueIgnored(self) -> None:
        self.ehlo()
        queueId = self.sendMessage(
            "MAIL FROM:<a@example.com>\r\n", "Subject: x\r\nTLS-Required: yes\r\n\r\nhello\r\n"
        )
        self.assertFalse(self.spool.records[queueId].tlsOptional)

    def test_requireTLSWinsOverHeader(self) -> None:
        """
        RFC 8689 section 4.1: with REQUIRETLS the header field is ignored;
        it stays in the message (the RFC allows relaying it).
        """
        self.ehlo()
        self.starttls()
        queueId = self.sendMessage(
            "MAIL FROM:<a@example.com> REQUIRETLS\r\n",
            "Subject: x\r\nTLS-Required: No\r\n\r\nhello\r\n",
        )
        record = self.spool.records[queueId]
        self.assertTrue(record.requireTLS)
        self.assertFalse(record.tlsOptional)
        self.assertIn(b"\r\nTLS-Required: No\r\n", self.spool.messages[queueId])


# --- the queue record ---------------------------------------------------------


def newRecord() -> QueueRecord:
    return QueueRecord.new(
        "Q1", "a@example.com", ["b@example.net"], 1.0, 10, "7BIT", "127.0.0.1", None, None, "l"
    )


def test_recordRoundTrip() -> None:
    record = newRecord()
    for requireTLS, tlsOptional in ((True, False), (False, True), (False, False)):
        changed = QueueRecord.decode(
            replace(record, requireTLS=requireTLS, tlsOptional=tlsOptional).encode()
        )
        assert (changed.requireTLS, changed.tlsOptional) == (requireTLS, tlsOptional)


def test_olderRecordReads() -> None:
    """A record written before these fields existed reads as neither."""
    record = newRecord()
    data = record.toJSON()
    del data["require_tls"], data["tls_optional"]
    old = QueueRecord.fromJSON(data)
    assert old.requireTLS is False and old.tlsOptional is False
    assert old == record


# --- whole journeys -------------------------------------------------------------

GOOD = "127.0.0.2"  # verified TLS, REQUIRETLS offered: mx1.example.net
PLAIN = "127.0.0.3"  # no STARTTLS
UNTRUSTED = "127.0.0.4"  # TLS with a certificate from a CA relayd does not trust
SENDER = "127.0.0.5"  # the sender's MX, for the DSNs: verified TLS and REQUIRETLS
NO_KEYWORD = "127.0.0.6"  # verified TLS, no REQUIRETLS
NOBODY = "127.0.0.7"  # nothing listens

NAMES = {
    GOOD: "mx1.example.net",
    UNTRUSTED: "mx3.example.net",
    SENDER: "mx.sender.test",
    NO_KEYWORD: "mx4.example.net",
}


class TLSSinksTestCase(DeliveryTestCase):
    """Sinks at the addresses above, each with the certificate its name says."""

    sinkAddresses = (GOOD, PLAIN, UNTRUSTED, SENDER, NO_KEYWORD)

    @defer.inlineCallbacks
    def setUp(self):
        self.tlsDir = tempfile.mkdtemp(prefix="relayd-requiretls-")
        self.addCleanup(shutil.rmtree, self.tlsDir, True)
        ca = makeCA(self.tlsDir, "trusted test CA")
        caPath = ca.path
        other = makeCA(self.tlsDir, "a CA nobody trusts")
        self.options = {}
        for address, name in NAMES.items():
            issuer = other if address == UNTRUSTED else ca
            cert = makeServerCert(issuer, self.tlsDir, name, (), baseName=address)
            self.options[address] = cert.serverOptions()
        self.delivery = {**self.delivery, "ca_file": caPath}
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        yield super().setUp()
        self.dns.setA("mx.sender.test", [SENDER])
        for address, name in NAMES.items():
            self.dns.setA(name, [address])
        self.dns.setA("mx2.example.net", [PLAIN])
        self.dns.setA("nobody.example.net", [NOBODY])
        self.dns.setA("wrong-name.example.net", [GOOD])

    def startSink(self, address, **options):
        d = super().startSink(address, tlsOptions=self.options.get(address), **options)
        if address in (GOOD, SENDER):
            self.sinks[address].advertise.append("REQUIRETLS")
        return d

    def mx(self, *hosts):
        self.dns.setMX("example.net", [(10 * (i + 1), h) for i, h in enumerate(hosts)])

    def sendTLS(self, recipients, body=BODY, requireTLS=True):
        def send():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay")) as s:
                s.starttls(context=self.setup.clientContext())
                s.ehlo()
                assert s.has_extn("requiretls") == requireTLS or not requireTLS
                options = ["REQUIRETLS"] if requireTLS else []
                return s.sendmail("a@sender.test", list(recipients), body, mail_options=options)

        return deferToThread(send)

    def logged(self, text):
        """The log lines that have C{text}."""
        return [line for line in map(formatEvent, self.events) if text in line]

    def checkBounce(self, status, text, why):
        """One DSN for b@example.net with C{status}; the log says C{why}."""
        self.assertTrue(self.logged(why), why)
        [line] = [x for x in self.logged("to=<b@example.net>, relay=") if "status=bounced" in x]
        self.assertIn(f"(550 {status} requiretls: ", line)
        self.assertIn(why, line)
        [dsn] = self.dsns()
        # The report travels under REQUIRETLS too (RFC 8689 section 5).
        self.assertIn("REQUIRETLS", dsn.mailParameters.split())
        self.assertIsNotNone(dsn.tls)
        self.checkDSN(dsn, "b@example.net", status)
        parsed = email.message_from_bytes(afterReceived(dsn.data), policy=email.policy.default)
        explanation = parsed.get_payload()[0].get_content()
        self.assertIn(text, " ".join(explanation.split()))
        original = parsed.get_payload()[2]
        # Headers only: never the body of a message that asked for TLS.
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"leading dot", dsn.data)


class RequireTLSDeliveryTests(TLSSinksTestCase):
    """smtplib with REQUIRETLS through relayd to next hops that do or do not qualify."""

    @defer.inlineCallbacks
    def test_deliveredWithREQUIRETLS(self):
        """(a) Verified TLS and REQUIRETLS offered: delivered, REQUIRETLS passed on."""
        self.mx("mx1.example.net")
        yield self.sendTLS(["b@example.net"])
        sink = self.sinks[GOOD]
        yield self.waitFor(lambda: sink.messages)
        [message] = sink.messages
        self.assertIn("REQUIRETLS", message.mailParameters.split())
        self.assertIn(message.tls, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(afterReceived(message.data), BODY)
        yield self.waitFor(lambda: self.spoolCount() == 0)
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_noSTARTTLSBounces(self):
        """(b) A next hop without STARTTLS: 5.7.10, never plain text."""
        self.mx("mx2.example.net")
        yield self.sendTLS(["b@example.net"])
        yield self.waitFor(self.dsns)
        self.assertNotIn("MAIL", self.sinks[PLAIN].verbs())
        self.checkBounce(
            "5.7.10",
            "Encryption needed (5.7.10)",
            "requiretls: TLS with host mx2.example.net[127.0.0.3] not established or its "
            "certificate not verified: TLS is required, but was not offered",
        )
        yield self.waitFor(lambda: self.spoolCount() == 0)

    @defer.inlineCallbacks
    def test_untrustedCertificateBounces(self):
        """(c) TLS, but a certificate from a CA relayd does not trust: 5.7.10."""
        self.mx("mx3.example.net")
        yield self.sendTLS(["b@example.net"])
        yield self.waitFor(self.dsns)
        self.assertNotIn("MAIL", self.sinks[UNTRUSTED].verbs())
        self.checkBounce(
            "5.7.10",
            "Encryption needed (5.7.10)",
            "requiretls: TLS with host mx3.example.net[127.0.0.4] not established or its "
            "certificate not verified: TLS handshake with mx3.example.net[127.0.0.4] failed",
        )

    @defer.inlineCallbacks
    def test_certificateForAnotherNameBounces(self):
        """A trusted certificate, but not for the MX name: 5.7.10."""
        self.mx("wrong-name.example.net")
        yield self.sendTLS(["b@example.net"])
        yield self.waitFor(self.dsns)
        self.assertEqual(self.sinks[GOOD].messages, [])
        self.assertNotIn("MAIL", self.sinks[GOOD].verbs())
        self.checkBounce(
            "5.7.10",
            "Encryption needed (5.7.10)",
            "certificate not verified: TLS handshake with wrong-name.example.net[127.0.0.2] "
            "failed: server certificate does not match the host name",
        )

    @defer.inlineCallbacks
    def test_noREQUIRETLSKeywordBounces(self):
        """
        (d) Verified TLS but no REQUIRETLS in EHLO: 5.7.30, the code RFC
        8689 registers for it ("REQUIRETLS support required").
        """
        self.mx("mx4.example.net")
        yield self.sendTLS(["b@example.net"])
        yield self.waitFor(self.dsns)
        sink = self.sinks[NO_KEYWORD]
        self.assertIn("STARTTLS", sink.verbs())
        self.assertNotIn("MAIL", sink.verbs())
        self.checkBounce(
            "5.7.30",
            "REQUIRETLS support required (5.7.30)",
            "requiretls: next hop mx4.example.net[127.0.0.6] does not offer REQUIRETLS",
        )

    @defer.inlineCallbacks
    def test_nextMXThatQualifies(self):
        """Hops that do not qualify are passed over for one that does (section 4.2.1)."""
        self.mx("mx2.example.net", "mx4.example.net", "mx1.example.net")
        yield self.sendTLS(["b@example.net"])
        sink = self.sinks[GOOD]
        yield self.waitFor(lambda: sink.messages)
        self.assertIn("REQUIRETLS", sink.messages[0].mailParameters.split())
        self.assertNotIn("MAIL", self.sinks[PLAIN].verbs())
        self.assertNotIn("MAIL", self.sinks[NO_KEYWORD].verbs())
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_unreachableHopDefers(self):
        """
        A hop that could not be reached may qualify later: with it in the
        list the message is deferred, not bounced.
        """
        self.mx("mx2.example.net", "nobody.example.net")
        yield self.sendTLS(["b@example.net"])
        yield self.waitFor(lambda: self.relayd.spool.entries("deferred"))
        [queueId] = self.relayd.spool.entries("deferred")
        record, _ = self.relayd.spool.load(queueId)
        self.assertTrue(record.requireTLS)
        self.assertEqual(record.recipients[0].state, "deferred")
        self.assertEqual(self.dsns(), [])
        self.assertNotIn("MAIL", self.sinks[PLAIN].verbs())

    @defer.inlineCallbacks
    def test_withoutREQUIRETLSUnchanged(self):
        """The same message without REQUIRETLS goes to the plain hop as before."""
        self.mx("mx2.example.net")
        yield self.sendTLS(["b@example.net"], requireTLS=False)
        sink = self.sinks[PLAIN]
        yield self.waitFor(lambda: sink.messages)
        self.assertNotIn("REQUIRETLS", sink.messages[0].mailParameters)
        self.assertIsNone(sink.messages[0].tls)


class RouteTests(TLSSinksTestCase):
    """Routes: their hops' TLS modes are raised to verify, never lowered."""

    # Long enough that the connection-reuse tests do not depend on timing.
    delivery = {"idle_timeout": 30}

    routes = [
        {
            "domains": ["example.org"],
            "hops": [
                {"host": "127.0.0.3", "tls": "none"},
                {"host": "mx1.example.net", "tls": "opportunistic"},
            ],
        },
        {"domains": ["example.com"], "hops": [{"host": "127.0.0.3", "tls": "none"}]},
        {"domains": ["example.info"], "hops": [{"host": "mx4.example.net", "tls": "verify"}]},
    ]

    def appendRoutes(self):
        for route in self.routes:
            for hop in route["hops"]:
                hop["port"] = self.port
        super().appendRoutes()

    @defer.inlineCallbacks
    def test_noneHopPassedOverOpportunisticVerified(self):
        """
        A hop configured C{tls = "none"} never takes the message; an
        C{opportunistic} one does, with its certificate verified.
        """
        yield self.sendTLS(["b@example.org"])
        sink = self.sinks[GOOD]
        yield self.waitFor(lambda: sink.messages)
        self.assertIn("REQUIRETLS", sink.messages[0].mailParameters.split())
        self.assertEqual(self.sinks[PLAIN].connections, 0)
        self.assertTrue(
            self.logged(f'127.0.0.3[127.0.0.3]:{self.port} is configured with tls = "none"')
        )

    @defer.inlineCallbacks
    def test_onlyNoneHopBounces(self):
        yield self.sendTLS(["b@example.com"])
        yield self.waitFor(self.dsns)
        self.assertEqual(self.sinks[PLAIN].connections, 0)
        [dsn] = self.dsns()
        self.assertIn("Status: 5.7.10", dsn.data.decode())

    @defer.inlineCallbacks
    def test_sessionKeptForOtherMailNotUsedForREQUIRETLS(self):
        """
        A verified session without REQUIRETLS, cached after ordinary mail,
        is not used for a REQUIRETLS message: it bounces with 5.7.30, and
        the session stays for other mail.
        """
        sink = self.sinks[NO_KEYWORD]
        yield self.sendTLS(["first@example.info"], requireTLS=False)
        yield self.waitFor(lambda: sink.messages)
        yield self.sendTLS(["b@example.info"])
        yield self.waitFor(self.dsns)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(len(sink.messages), 1)
        [dsn] = self.dsns()
        self.assertIn("Status: 5.7.30", dsn.data.decode())

    @defer.inlineCallbacks
    def test_sessionReusedForREQUIRETLS(self):
        """Two REQUIRETLS messages in a row: one verified session carries both."""
        sink = self.sinks[GOOD]
        yield self.sendTLS(["one@example.org"])
        yield self.waitFor(lambda: len(sink.messages) == 1)
        yield self.sendTLS(["two@example.org"])
        yield self.waitFor(lambda: len(sink.messages) == 2)
        self.assertEqual(sink.connections, 1)
        for message in sink.messages:
            self.assertIn("REQUIRETLS", message.mailParameters.split())


class TLSRequiredNoTests(DeliveryTestCase):
    """
    C{TLS-Required: No} waives recipient-domain policies only (MTA-STS:
    tests/delivery/test_mtasts.py; DANE: tests/delivery/test_dane.py); the
    operator's C{mx_tls = "verify"} still holds.
    """

    delivery = {"mx_tls": "verify"}

    @defer.inlineCallbacks
    def test_operatorTLSModeStillApplies(self):
        self.dns.setMX("example.org", [(10, "mx.example.org")])
        self.dns.setA("mx.example.org", ["127.0.0.2"])
        body = b"Subject: not secret\r\nTLS-Required: No\r\n\r\nhello\r\n"
        yield self.send(["b@example.org"], body=body)
        yield self.waitFor(lambda: self.relayd.spool.entries("deferred"))
        [queueId] = self.relayd.spool.entries("deferred")
        record, _ = self.relayd.spool.load(queueId)
        self.assertTrue(record.tlsOptional)
        self.assertFalse(record.requireTLS)
        self.assertEqual(self.sinks["127.0.0.2"].messages, [])
        self.assertNotIn("MAIL", self.sinks["127.0.0.2"].verbs())


# --- the deliverer and the client ------------------------------------------------


class DelivererTests(ClientTestCase):
    @defer.inlineCallbacks
    def test_postfixNextHopWithoutTLS(self):
        """
        Postfix's smtp-sink, a real next hop without STARTTLS: a REQUIRETLS
        message fails with 5.7.10 and smtp-sink never sees a transaction.
        """
        sink = PostfixSink(self.directory)
        self.addCleanup(sink.stop)
        hop = self.hop(sink.port, host="postfix-sink.test", tls="opportunistic")
        path, size = self.message(b"Subject: secret\r\n\r\nbody\r\n")
        result = yield self.deliverer().deliver(
            self.destination(hop), "s@example.org", ["a@example.net"], path, size, requireTLS=True
        )
        self.assertEqual(self.statuses(result), [("a@example.net", "failed", 550, "5.7.10")])
        self.assertIn("requiretls: TLS with host postfix-sink.test", result.results[0].text)
        self.assertEqual(sink.messages(), [])

    @defer.inlineCallbacks
    def test_clientRefusesWithoutVerifiedTLS(self):
        """
        The client's own check, whoever calls it: on a session without
        verified TLS a REQUIRETLS transaction is refused before MAIL.
        """
        sink = self.sink()
        deliverer = self.deliverer()
        client = yield deliverer._connect(self.hop(sink.port))
        self.addCleanup(client.quit)
        path, size = self.message(b"Subject: secret\r\n\r\nbody\r\n")
        transaction = yield client.send(
            "s@example.org", ["a@example.net"], path, size, requireTLS=True
        )
        [reply] = transaction.replies
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.10"))
        self.assertNotIn("MAIL", sink.verbs())
        # The session is still good for other mail.
        transaction = yield client.send("s@example.org", ["a@example.net"], path, size)
        self.assertEqual(transaction.replies[0].code, 250)

    @defer.inlineCallbacks
    def test_clientSendsREQUIRETLSOnlyWhenAsked(self):
        options, caPath = self.tls("localhost")
        sink = self.sink(tlsOptions=options)
        sink.advertise.append("REQUIRETLS")
        deliverer = self.deliverer(caFile=caPath)
        hop = self.hop(sink.port, tls="verify")
        path, size = self.message(b"Subject: secret\r\n\r\nbody\r\n")
        for requireTLS in (False, True):
            result = yield deliverer.deliver(
                self.destination(hop),
                "s@example.org",
                ["a@example.net"],
                path,
                size,
                requireTLS=requireTLS,
            )
            self.assertEqual(result.results[0].status, "delivered")
        first, second = sink.messages
        self.assertNotIn("REQUIRETLS", first.mailParameters)
        self.assertIn("REQUIRETLS", second.mailParameters.split())


def test_markWaived():
    """
    An attempt for a C{TLS-Required: No} message is labelled with why no
    published policy applied (the delivery log line's C{policy=}); one that
    tried no hop at all is left unlabelled.
    """
    reply = RemoteReply.local(250, "2.0.0", "ok")
    recipients = [RecipientResult("a@example.org", "delivered", reply, None)]
    hop = Hop("mx.example.org", "127.0.0.1", 25, "opportunistic")
    assert markWaived(AttemptResult(recipients, hop, None)).policy == POLICY_WAIVED
    assert markWaived(AttemptResult(recipients, None, None)).policy is None
