"""
Delivery attempts over real sockets on 127.0.0.1: relayd's client against
the in-process L{SinkServer} (scripted to misbehave), and against Postfix's
own smtp-sink for interop.  Every sink, connection and timer is gone when a
test ends: trial's dirty-reactor check runs after each one.
"""

import os
import shutil
import socket
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relayd.delivery.attempt import Deliverer
from relayd.delivery.client import ClientTimeouts
from relayd.delivery.routing import Destination, Hop
from relayd.testing import PostfixSink, certs
from relayd.testing.sink import SinkServer

FAST = ClientTimeouts(
    connect=2,
    greeting=2,
    helo=2,
    mail=2,
    rcpt=2,
    dataInit=2,
    dataBlock=2,
    dataDone=2,
    rset=2,
    quit=2,
)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


def bigMessage() -> bytes:
    """
    Dot lines everywhere, 8-bit octets, 998-octet lines, and a "." line
    starting exactly on a 64 KiB read boundary.
    """
    lines = [
        b"Subject: dots \xc3\xa9",
        b"",
        b".",
        b"..",
        b".leading",
        b"middle.",
        b"x" * 998,
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    filler = (b"y" * 98 + b"\r\n") * 700
    body += filler
    pad = 65536 - len(body) % 65536
    body += b"z" * (pad - 2) + b"\r\n"  # filler leaves pad >= 2
    body += b".at the edge\r\n" + b"\xff\xfe 8bit\r\n" + b"." * 998 + b"\r\n" + b".\r\n"
    return body


class DeliveryTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-delivery-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def path(self, name):
        return os.path.join(self.directory, name)

    def sink(self, **kwargs) -> SinkServer:
        sink = SinkServer()
        sink.start(reactor, **kwargs)
        self.addCleanup(sink.stop)
        return sink

    def deliverer(self, **kwargs) -> Deliverer:
        kwargs.setdefault("timeouts", FAST)
        deliverer = Deliverer(reactor, "relay.test", **kwargs)
        # Added after the sinks, so it runs first: QUIT while they listen.
        self.addCleanup(deliverer.stop)
        return deliverer

    def message(self, data: bytes, name="data") -> tuple[str, int]:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data)
        return path, len(data)

    def destination(self, *hops) -> Destination:
        return Destination("route:0", tuple(hops))

    def hop(self, port, tls="none", host="localhost", **kwargs) -> Hop:
        return Hop(host=host, address="127.0.0.1", port=port, tls=tls, **kwargs)

    def deliver(
        self,
        deliverer,
        destination,
        recipients,
        data=b"Subject: hi\r\n\r\nbody\r\n",
        sender="from@example.org",
    ):
        path, size = self.message(data)
        return deliverer.deliver(destination, sender, recipients, path, size)

    def statuses(self, result):
        return [(r.recipient, r.status, r.code, r.enhanced) for r in result.results]

    def tls(self, hostname="localhost", otherCA=False):
        """Server TLS options from a test CA; returns (options, caPath)."""
        ca = certs.makeCA(self.directory, "delivery test CA")
        issuer = certs.makeCA(self.directory, "some other CA") if otherCA else ca
        return certs.makeServerCert(issuer, self.directory, hostname).serverOptions(), ca.path


class DataTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_byteExact(self):
        sink = self.sink()
        deliverer = self.deliverer()
        data = bigMessage()
        self.assertEqual((data.index(b"\r\n.at the edge") + 2) % 65536, 0)
        result = yield self.deliver(
            deliverer,
            self.destination(self.hop(sink.port)),
            ["a@example.net", "b@example.net"],
            data,
        )
        self.assertEqual(
            self.statuses(result),
            [
                ("a@example.net", "delivered", 250, "2.0.0"),
                ("b@example.net", "delivered", 250, "2.0.0"),
            ],
        )
        self.assertEqual(result.results[0].remoteHost, "localhost")
        [message] = sink.messages
        self.assertEqual(message.data, data)
        self.assertEqual(message.sender, "from@example.org")
        self.assertEqual(message.recipients, ["a@example.net", "b@example.net"])
        self.assertEqual(message.helo, "relay.test")
        self.assertIn(f"SIZE={len(data)}", message.mailParameters)
        self.assertIn("BODY=8BITMIME", message.mailParameters)

    @defer.inlineCallbacks
    def test_notEndingInCRLF(self):
        sink = self.sink()
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net"],
            b"Subject: x\r\n\r\nno end\r\n.",
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.messages[0].data, b"Subject: x\r\n\r\nno end\r\n.\r\n")

    @defer.inlineCallbacks
    def test_sevenBit(self):
        """No BODY= for a 7-bit message; no SIZE= when not offered."""
        sink = self.sink()
        sink.advertise = ["PIPELINING", "8BITMIME"]
        yield self.deliver(
            self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        self.assertEqual(sink.messages[0].mailParameters, "")

    @defer.inlineCallbacks
    def test_eightBitWithout8BITMIME(self):
        """Sent as it is, without BODY=, when the server lacks 8BITMIME (as Postfix)."""
        sink = self.sink()
        sink.advertise = ["PIPELINING", "SIZE 100000"]
        data = b"Subject: \xe9\r\n\r\n\xff\r\n"
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net"],
            data,
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.messages[0].mailParameters, f"SIZE={len(data)}")
        self.assertEqual(sink.messages[0].data, data)

    @defer.inlineCallbacks
    def test_nullSender(self):
        sink = self.sink()
        yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net"],
            sender="",
        )
        self.assertIn("MAIL FROM:<> SIZE=", [c.line[:18] for c in sink.commands])
        self.assertEqual(sink.messages[0].sender, "")

    @defer.inlineCallbacks
    def test_pipelined(self):
        """With PIPELINING, MAIL, every RCPT and DATA arrive in one read."""
        sink = self.sink()
        yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net", "b@example.net", "c@example.net"],
        )
        transaction = [c for c in sink.commands if c.line.split()[0] in ("MAIL", "RCPT", "DATA")]
        self.assertEqual(len(transaction), 5)
        self.assertEqual(len({c.read for c in transaction}), 1, transaction)
        self.assertEqual(len(sink.messages), 1)

    @defer.inlineCallbacks
    def test_notPipelined(self):
        """Without PIPELINING, each command waits for its reply."""
        sink = self.sink()
        sink.advertise = ["SIZE 10000000", "8BITMIME", "ENHANCEDSTATUSCODES"]
        data = bigMessage()
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net", "b@example.net"],
            data,
        )
        self.assertEqual([r.status for r in result.results], ["delivered"] * 2)
        self.assertEqual(sink.pipeliningViolations, 0)
        transaction = [c for c in sink.commands if c.line.split()[0] in ("MAIL", "RCPT", "DATA")]
        self.assertEqual(len({c.read for c in transaction}), 4)
        self.assertEqual(sink.messages[0].data, data)

    @defer.inlineCallbacks
    def test_unreadableQueueFile(self):
        sink = self.sink()
        result = yield self.deliverer().deliver(
            self.destination(self.hop(sink.port)),
            "f@example.org",
            ["a@example.net"],
            self.path("missing"),
            10,
        )
        self.assertEqual(self.statuses(result), [("a@example.net", "deferred", 451, "4.3.0")])
        self.assertIsNone(result.results[0].remoteHost)
        self.assertEqual(sink.connections, 0)

    @defer.inlineCallbacks
    def test_tooBigForServer(self):
        """A message over the server's SIZE is not sent: permanent, like Postfix."""
        sink = self.sink()
        sink.advertise = ["PIPELINING", "SIZE 10"]
        result = yield self.deliver(
            self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        self.assertEqual(self.statuses(result), [("a@example.net", "failed", 552, "5.3.4")])
        self.assertNotIn("MAIL", sink.verbs())


class OutcomeTests(DeliveryTestCase):
    def mixed(self, sink):
        sink.rcptReply = {
            "later@example.net": (451, "4.2.0 mailbox busy"),
            "nobody@example.net": (550, "5.1.1 no such user"),
        }

    @defer.inlineCallbacks
    def test_mixedOutcomePipelined(self):
        sink = self.sink()
        self.mixed(sink)
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["ok@example.net", "later@example.net", "nobody@example.net"],
        )
        self.assertEqual(
            self.statuses(result),
            [
                ("ok@example.net", "delivered", 250, "2.0.0"),
                ("later@example.net", "deferred", 451, "4.2.0"),
                ("nobody@example.net", "failed", 550, "5.1.1"),
            ],
        )
        self.assertEqual(result.results[2].text, "no such user")
        self.assertEqual(result.results[2].remoteHost, "localhost")
        self.assertEqual(sink.messages[0].recipients, ["ok@example.net"])

    @defer.inlineCallbacks
    def test_mixedOutcomeNotPipelined(self):
        sink = self.sink()
        sink.advertise = ["ENHANCEDSTATUSCODES"]
        self.mixed(sink)
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["later@example.net", "ok@example.net", "nobody@example.net"],
        )
        self.assertEqual([r.status for r in result.results], ["deferred", "delivered", "failed"])
        self.assertEqual(sink.pipeliningViolations, 0)

    @defer.inlineCallbacks
    def test_noRecipientAcceptedNotPipelined(self):
        """No RCPT accepted: no DATA, RSET instead."""
        sink = self.sink()
        sink.advertise = ["ENHANCEDSTATUSCODES"]
        self.mixed(sink)
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["later@example.net", "nobody@example.net"],
        )
        self.assertEqual([r.status for r in result.results], ["deferred", "failed"])
        self.assertEqual(sink.verbs(), ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"])

    @defer.inlineCallbacks
    def test_noRecipientAcceptedPipelined(self):
        """The pipelined DATA is refused by the server (RFC 2920 section 3.1); then RSET."""
        sink = self.sink()
        self.mixed(sink)
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["nobody@example.net"],
        )
        self.assertEqual(self.statuses(result), [("nobody@example.net", "failed", 550, "5.1.1")])
        self.assertEqual(sink.verbs(), ["EHLO", "MAIL", "RCPT", "DATA", "RSET"])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_mailRefused(self):
        sink = self.sink()
        sink.refuse = {"MAIL": (553, "5.7.1 sender rejected")}
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net", "b@example.net"],
        )
        self.assertEqual([r.status for r in result.results], ["failed", "failed"])
        self.assertEqual(result.results[0].enhanced, "5.7.1")

    @defer.inlineCallbacks
    def test_finalDot4xx(self):
        sink = self.sink()
        sink.dataReply = (451, "4.3.0 queue trouble")
        sink.rcptReply = {"nobody@example.net": (550, "5.1.1 no such user")}
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port)),
            ["a@example.net", "nobody@example.net", "b@example.net"],
        )
        self.assertEqual(
            self.statuses(result),
            [
                ("a@example.net", "deferred", 451, "4.3.0"),
                ("nobody@example.net", "failed", 550, "5.1.1"),
                ("b@example.net", "deferred", 451, "4.3.0"),
            ],
        )

    @defer.inlineCallbacks
    def test_finalDot5xx(self):
        sink = self.sink()
        sink.dataReply = (554, "5.7.1 spam")
        result = yield self.deliver(
            self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        self.assertEqual(self.statuses(result), [("a@example.net", "failed", 554, "5.7.1")])
        self.assertEqual(result.results[0].text, "spam")

    @defer.inlineCallbacks
    def test_dataCommand4xx(self):
        sink = self.sink()
        sink.dataCommandReply = (452, "4.3.1 insufficient storage")
        result = yield self.deliver(
            self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        self.assertEqual(self.statuses(result), [("a@example.net", "deferred", 452, "4.3.1")])

    @defer.inlineCallbacks
    def test_421MidSession(self):
        """421 to a RCPT: the server closes; every remaining recipient is deferred."""
        for advertise in (
            ["PIPELINING", "ENHANCEDSTATUSCODES"],
            ["ENHANCEDSTATUSCODES"],
        ):
            sink = self.sink()
            sink.advertise = advertise
            sink.rcptReply = {"b@example.net": (421, "4.3.2 shutting down")}
            deliverer = self.deliverer()
            result = yield self.deliver(
                deliverer,
                self.destination(self.hop(sink.port)),
                ["a@example.net", "b@example.net", "c@example.net"],
            )
            self.assertEqual(
                [(r.status, r.code, r.enhanced) for r in result.results],
                [("deferred", 421, "4.3.2")] * 3,
            )
            self.assertEqual(sink.messages, [])
            yield deliverer.stop()
            self.assertEqual(sink.openConnections, 0)


class HopTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_firstHopRefused(self):
        sink = self.sink()
        closed = self.hop(freePort(), host="mx1.example")
        second = self.hop(sink.port, host="mx2.example")
        result = yield self.deliver(
            self.deliverer(), self.destination(closed, second), ["a@example.net"]
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(result.hop, second)
        self.assertEqual(result.results[0].remoteHost, "mx2.example")

    @defer.inlineCallbacks
    def test_greeting4xxThenNextHop(self):
        busy = self.sink()
        busy.greeting = "421 4.3.2 busy"
        good = self.sink()
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(busy.port, host="mx1.example"), self.hop(good.port)),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(busy.commands, [])
        self.assertEqual(len(good.messages), 1)

    @defer.inlineCallbacks
    def test_greeting5xxThenNextHop(self):
        rude = self.sink()
        rude.greeting = "554 5.7.1 go away"
        good = self.sink()
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(rude.port), self.hop(good.port)),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(rude.verbs(), ["QUIT"])

    @defer.inlineCallbacks
    def test_allRefused(self):
        hops = [
            self.hop(freePort(), host="mx1.example"),
            self.hop(freePort(), host="mx2.example"),
        ]
        result = yield self.deliver(
            self.deliverer(),
            self.destination(*hops),
            ["a@example.net", "b@example.net"],
        )
        self.assertEqual(
            [(r.status, r.code, r.enhanced) for r in result.results],
            [("deferred", 451, "4.4.1")] * 2,
        )
        self.assertIn("Connection refused", result.results[0].text)
        self.assertIn("mx2.example[127.0.0.1]", result.results[0].text)
        self.assertIsNone(result.results[0].remoteHost)
        self.assertEqual(result.hop, hops[1])

    @defer.inlineCallbacks
    def test_lastFourHundredTextWins(self):
        """A greeting's 4xx is a better diagnosis than a refused connection."""
        busy = self.sink()
        busy.greeting = "421 4.3.2 too busy"
        hops = [
            self.hop(busy.port, host="mx1.example"),
            self.hop(freePort(), host="mx2.example"),
        ]
        result = yield self.deliver(self.deliverer(), self.destination(*hops), ["a@example.net"])
        [r] = result.results
        self.assertEqual(
            (r.status, r.code, r.enhanced, r.text),
            ("deferred", 421, "4.3.2", "too busy"),
        )
        self.assertEqual(r.remoteHost, "mx1.example")

    @defer.inlineCallbacks
    def test_greeting5xxOnly(self):
        """A 5xx greeting on the only hop defers (soft), quoting the reply."""
        rude = self.sink()
        rude.greeting = "554 5.7.1 go away"
        result = yield self.deliver(
            self.deliverer(), self.destination(self.hop(rude.port)), ["a@example.net"]
        )
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.1"))
        self.assertTrue(r.text.endswith("refused to talk to me: 554 5.7.1 go away"), r.text)

    @defer.inlineCallbacks
    def test_setupRefusalsUseRealCodes(self):
        """
        A 5xx greeting or EHLO/HELO refusal defers with a reply code that
        exists (it gave 400 for a 500 greeting: 500 - 100), and the text
        and the log line quote the peer's reply as it came: no made-up
        5.0.0 where the peer sent no enhanced code, every line of a
        multi-line reply.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        cases = [
            ("greeting", "500 no", "500 no", "4.0.0"),
            ("greeting", "521 5.3.2 no mail here", "521 5.3.2 no mail here", "4.3.2"),
            ("greeting", "550", "550", "4.0.0"),
            (
                "greeting",
                "554-5.7.1 first\r\n554 5.7.1 second",
                "554-5.7.1 first 554 5.7.1 second",
                "4.7.1",
            ),
            ("EHLO", "501 who are you", "501 who are you", "4.0.0"),
        ]
        for stage, sent, quoted, enhanced in cases:
            sink = self.sink()
            if stage == "greeting":
                sink.greeting = sent
            else:
                code, text = sent.split(" ", 1)
                sink.refuse = {"EHLO": (int(code), text), "HELO": (int(code), text)}
            del events[:]
            result = yield self.deliver(
                self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
            )
            [r] = result.results
            self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, enhanced), sent)
            self.assertIn(f"refused to talk to me: {quoted}", r.text)
            self.assertIsNone(r.remoteHost)
            [line] = [formatEvent(e) for e in events if e.get("hop")]
            self.assertIn(f"451 {enhanced} host localhost[127.0.0.1] refused", line)
            self.assertIn(quoted, line)

    @defer.inlineCallbacks
    def test_heloFallback(self):
        sink = self.sink()
        sink.refuse = {"EHLO": (502, "5.5.2 what is EHLO")}
        result = yield self.deliver(
            self.deliverer(), self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.verbs()[:3], ["EHLO", "HELO", "MAIL"])
        self.assertEqual(sink.messages[0].mailParameters, "")

    @defer.inlineCallbacks
    def test_hungServer(self):
        """A server that never greets: deferred once the greeting timeout passes."""
        sink = self.sink()
        sink.hang = True
        timeouts = ClientTimeouts(**{**FAST.__dict__, "greeting": 0.5})
        started = time.monotonic()
        result = yield self.deliver(
            self.deliverer(timeouts=timeouts),
            self.destination(self.hop(sink.port)),
            ["a@example.net"],
        )
        elapsed = time.monotonic() - started
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.4.1"))
        self.assertIn("timed out while receiving the initial server greeting", r.text)
        self.assertTrue(0.4 < elapsed < 2.0, elapsed)
        self.assertEqual(sink.connections, 1)


class TimeoutTests(DeliveryTestCase):
    """RFC 5321 section 4.5.3.2 timeouts after the greeting."""

    def timeouts(self, **changes):
        return ClientTimeouts(**{**FAST.__dict__, **changes})

    @defer.inlineCallbacks
    def test_rcptTimeout(self):
        sink = self.sink()
        sink.stallOn = {"RCPT"}
        deliverer = self.deliverer(timeouts=self.timeouts(rcpt=0.3))
        result = yield self.deliver(
            deliverer, self.destination(self.hop(sink.port)), ["a@example.net"]
        )
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.4.2"))
        self.assertIn("timed out while sending RCPT TO", r.text)
        self.assertIsNone(r.remoteHost)

    @defer.inlineCallbacks
    def test_finalDotTimeout(self):
        sink = self.sink()
        sink.stallOn = {"."}
        deliverer = self.deliverer(timeouts=self.timeouts(dataDone=0.3))
        result = yield self.deliver(
            deliverer,
            self.destination(self.hop(sink.port)),
            ["a@example.net", "b@example.net"],
        )
        self.assertEqual([r.status for r in result.results], ["deferred"] * 2)
        self.assertIn(
            "timed out while sending end of data -- message may be sent more than once",
            result.results[0].text,
        )

    @defer.inlineCallbacks
    def test_dataBlockTimeout(self):
        """The peer stops reading mid-message: no progress within dataBlock."""
        sink = self.sink()
        sink.stallOn = {"BODY"}
        deliverer = self.deliverer(timeouts=self.timeouts(dataBlock=0.3))
        data = (b"x" * 998 + b"\r\n") * 32 * 1024  # 32 MiB: more than socket buffers
        result = yield self.deliver(
            deliverer, self.destination(self.hop(sink.port)), ["a@example.net"], data
        )
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), ("deferred", "4.4.2"))
        self.assertIn("timed out while sending message body", r.text)


class TLSTests(DeliveryTestCase):
    def tlsSink(self, auth=False, **tls):
        """
        A sink with a certificate from a test CA (L{tls} with C{tls}), and
        with C{auth} the user C{relay}, password C{s3cret}; returns the
        sink and the CA's file.
        """
        options, caPath = self.tls(**tls)
        sink = self.sink(tlsOptions=options, **({"users": {"relay": "s3cret"}} if auth else {}))
        return sink, caPath

    def deliverVerified(self, sink, caPath, password=None, data=None, **hop):
        """
        Deliver to C{sink} with C{tls = "verify"} against C{caPath}, as user
        C{relay} when a C{password} is given.
        """
        if password is not None:
            hop.update(username="relay", password=password)
        destination = self.destination(self.hop(sink.port, tls="verify", **hop))
        more = () if data is None else (data,)
        return self.deliver(self.deliverer(caFile=caPath), destination, ["a@example.net"], *more)

    @defer.inlineCallbacks
    def test_plaintextAfterStarttlsDiscarded(self):
        """
        Lines injected after the 220 to STARTTLS, before TLS, are thrown
        away, never read as the reply to the EHLO inside TLS (RFC 3207
        section 4.2; CVE-2011-0411 from the client's side).
        """
        sink, caPath = self.tlsSink(auth=True)
        sink.starttlsReply = "220 2.0.0 go ahead\r\n250 injected"
        result = yield self.deliverVerified(sink, caPath, password="s3cret")
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.messages[0].user, "relay")

    @defer.inlineCallbacks
    def test_smartHostVerifyAuthPlain(self):
        sink, caPath = self.tlsSink(auth=True)
        result = yield self.deliverVerified(sink, caPath, password="s3cret")
        self.assertEqual(result.results[0].status, "delivered")
        self.assertTrue(result.tls.startswith("TLSv1."), result.tls)
        [message] = sink.messages
        self.assertTrue(message.tls.startswith("TLSv1."))
        self.assertEqual(message.user, "relay")
        self.assertEqual(sink.verbs(), ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA"])

    @defer.inlineCallbacks
    def test_largeMessageOverTLS(self):
        """The producer streams through the TLS layer too, byte-exact."""
        sink, caPath = self.tlsSink()
        data = bigMessage() * 20  # about 2.6 MiB
        result = yield self.deliverVerified(sink, caPath, data=data)
        self.assertEqual(result.results[0].status, "delivered")
        self.assertTrue(sink.messages[0].data == data, "the message differs")
        self.assertIsNotNone(sink.messages[0].tls)

    @defer.inlineCallbacks
    def test_authLogin(self):
        sink, caPath = self.tlsSink(auth=True)
        sink.advertise = ["PIPELINING", "STARTTLS", "AUTH LOGIN"]
        result = yield self.deliverVerified(sink, caPath, password="s3cret")
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.messages[0].user, "relay")

    @defer.inlineCallbacks
    def test_authFailure(self):
        sink, caPath = self.tlsSink(auth=True)
        result = yield self.deliverVerified(sink, caPath, password="wrong")
        [r] = result.results
        # RFC 4954's temporary authentication failure; it was "435 4.7.8",
        # 535 - 100, a code that does not exist.
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 454, "4.7.0"))
        self.assertTrue(
            r.text.endswith(
                "refused authentication: 535 5.7.8 Error: authentication failed (in reply to AUTH)"
            ),
            r.text,
        )
        self.assertNotIn("MAIL", sink.verbs())

    @defer.inlineCallbacks
    def test_authFailureReportsTLS(self):
        """
        A smart host that refuses AUTH inside TLS: the attempt says TLS was
        up, in its result and in its log line (it said tls=None).
        """
        sink, caPath = self.tlsSink(auth=True)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        result = yield self.deliverVerified(sink, caPath, password="wrong")
        self.assertEqual(result.results[0].code, 454)
        self.assertTrue((result.tls or "").startswith("TLSv1."), result.tls)
        logged = [e for e in events if e.get("recipient") == "a@example.net"]
        self.assertEqual([e["tls"] for e in logged], [result.tls])
        self.assertIn("tls=TLSv1.", formatEvent(logged[0]))

    @defer.inlineCallbacks
    def test_verifyOtherCA(self):
        """A certificate from a CA we do not trust: deferred, and no plaintext fallback."""
        sink, caPath = self.tlsSink(otherCA=True)
        result = yield self.deliverVerified(sink, caPath)
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.5"))
        self.assertIn("TLS handshake with localhost[127.0.0.1] failed", r.text)
        self.assertIsNone(result.tls)
        self.assertEqual(sink.verbs(), ["EHLO", "STARTTLS"])
        self.assertEqual(sink.messages, [])

    @defer.inlineCallbacks
    def test_verifyWrongHostname(self):
        sink, caPath = self.tlsSink(hostname="localhost")
        result = yield self.deliverVerified(sink, caPath, host="smarthost.example")
        [r] = result.results
        self.assertEqual((r.status, r.enhanced), ("deferred", "4.7.5"))
        self.assertIn("does not match", r.text)
        self.assertEqual(sink.verbs(), ["EHLO", "STARTTLS"])

    @defer.inlineCallbacks
    def test_verifyFailsThenNextHop(self):
        badOptions, caPath = self.tls(otherCA=True)
        bad = self.sink(tlsOptions=badOptions)
        good = self.sink()
        result = yield self.deliver(
            self.deliverer(caFile=caPath),
            self.destination(self.hop(bad.port, tls="verify"), self.hop(good.port, tls="none")),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(len(good.messages), 1)

    @defer.inlineCallbacks
    def test_requiredNotOffered(self):
        sink = self.sink()
        deliverer = self.deliverer()
        result = yield self.deliver(
            deliverer,
            self.destination(self.hop(sink.port, tls="required")),
            ["a@example.net"],
        )
        yield deliverer.stop()
        [r] = result.results
        self.assertEqual((r.status, r.code, r.enhanced), ("deferred", 451, "4.7.4"))
        self.assertIn("TLS is required, but was not offered", r.text)
        self.assertEqual(sink.verbs(), ["EHLO", "QUIT"])

    @defer.inlineCallbacks
    def test_requiredWithoutVerification(self):
        """required encrypts without checking the certificate."""
        options, _ = self.tls(otherCA=True)
        sink = self.sink(tlsOptions=options)
        result = yield self.deliver(
            self.deliverer(),
            self.destination(self.hop(sink.port, tls="required")),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNotNone(sink.messages[0].tls)

    @defer.inlineCallbacks
    def test_opportunistic(self):
        options, _ = self.tls(otherCA=True)
        withTLS = self.sink(tlsOptions=options)
        withoutTLS = self.sink()
        deliverer = self.deliverer()
        result = yield self.deliver(
            deliverer,
            self.destination(self.hop(withTLS.port, tls="opportunistic")),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNotNone(result.tls)
        result = yield self.deliver(
            deliverer,
            self.destination(self.hop(withoutTLS.port, tls="opportunistic")),
            ["a@example.net"],
        )
        self.assertEqual(result.results[0].status, "delivered")
        self.assertIsNone(result.tls)
        self.assertIsNone(withoutTLS.messages[0].tls)

    @defer.inlineCallbacks
    def test_noCredentialsInPlaintext(self):
        sink = self.sink(users={"relay": "s3cret"})
        sink.authWithoutTLS = True
        for tls in ("none", "opportunistic"):
            hop = self.hop(sink.port, tls=tls, username="relay", password="s3cret")
            result = yield self.deliver(self.deliverer(), self.destination(hop), ["a@example.net"])
            [r] = result.results
            self.assertEqual((r.status, r.enhanced), ("deferred", "4.7.4"))
            self.assertIn("without TLS", r.text)
        self.assertNotIn("AUTH", sink.verbs())
        self.assertNotIn("MAIL", sink.verbs())


class ReuseTests(DeliveryTestCase):
    @defer.inlineCallbacks
    def test_threeMessagesOneConnection(self):
        sink = self.sink()
        deliverer = self.deliverer()
        destination = self.destination(self.hop(sink.port))
        for n in range(3):
            result = yield self.deliver(
                deliverer,
                destination,
                [f"r{n}@example.net"],
                data=b"Subject: %d\r\n\r\n.body\r\n" % n,
            )
            self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.connections, 1)
        self.assertEqual(
            [m.data for m in sink.messages],
            [b"Subject: %d\r\n\r\n.body\r\n" % n for n in range(3)],
        )
        self.assertEqual(sink.verbs().count("RSET"), 2)
        self.assertEqual(sink.verbs().count("EHLO"), 1)

    @defer.inlineCallbacks
    def test_reuseOverTLS(self):
        options, caPath = self.tls()
        sink = self.sink(tlsOptions=options, users={"relay": "s3cret"})
        deliverer = self.deliverer(caFile=caPath)
        destination = self.destination(
            self.hop(sink.port, tls="verify", username="relay", password="s3cret")
        )
        for _ in range(3):
            result = yield self.deliver(deliverer, destination, ["a@example.net"])
            self.assertEqual(result.results[0].status, "delivered")
            self.assertIsNotNone(result.tls)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(sink.verbs().count("AUTH"), 1)

    @defer.inlineCallbacks
    def test_maxMessagesPerConnection(self):
        sink = self.sink()
        deliverer = self.deliverer(maxMessagesPerConnection=2)
        destination = self.destination(self.hop(sink.port))
        for _ in range(3):
            yield self.deliver(deliverer, destination, ["a@example.net"])
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len(sink.messages), 3)

    @defer.inlineCallbacks
    def test_reuseTimeLimit(self):
        """
        A connection older than C{reuseTimeLimit} carries the message it
        has, then closes; the next message gets a new one, which is reused.
        """
        sink = self.sink()
        deliverer = self.deliverer(reuseTimeLimit=0.3)
        destination = self.destination(self.hop(sink.port))
        yield self.deliver(deliverer, destination, ["a@example.net"])
        yield self.deliver(deliverer, destination, ["b@example.net"])
        self.assertEqual(sink.connections, 1)
        yield sleep(0.4)
        yield self.deliver(deliverer, destination, ["c@example.net"])
        yield self.deliver(deliverer, destination, ["d@example.net"])
        self.assertEqual(sink.connections, 2)
        self.assertEqual(len(sink.messages), 4)

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        sink = self.sink()
        deliverer = self.deliverer(idleTimeout=0.2)
        yield self.deliver(deliverer, self.destination(self.hop(sink.port)), ["a@example.net"])
        self.assertEqual(sink.openConnections, 1)
        yield sleep(0.6)
        self.assertEqual(sink.openConnections, 0)
        self.assertEqual(sink.verbs()[-1], "QUIT")

    @defer.inlineCallbacks
    def test_serverClosedIdleConnection(self):
        """A cached connection the server has dropped: a new one is made at once."""
        sink = self.sink()
        deliverer = self.deliverer()
        destination = self.destination(self.hop(sink.port))
        yield self.deliver(deliverer, destination, ["a@example.net"])
        for session in list(sink.sessions):
            session.transport.loseConnection()
        yield sleep(0.1)
        result = yield self.deliver(deliverer, destination, ["b@example.net"])
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(sink.connections, 2)

    @defer.inlineCallbacks
    def test_serverSilentlyGoneWhileIdle(self):
        """RSET on the cached connection gets no reply: try afresh, not defer."""
        sink = self.sink()
        deliverer = self.deliverer()
        destination = self.destination(self.hop(sink.port))
        yield self.deliver(deliverer, destination, ["a@example.net"])
        sink.rcptReply = {}
        sink.refuse = {}
        # The sink goes quiet on the old connection only: cut it server-side
        # while the client still holds it (no time passes for it to notice).
        [session] = list(sink.sessions)
        session.transport.abortConnection()
        result = yield self.deliver(deliverer, destination, ["b@example.net"])
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(len(sink.messages), 2)

    @defer.inlineCallbacks
    def test_stopQuitsIdle(self):
        sink = self.sink()
        deliverer = self.deliverer()
        yield self.deliver(deliverer, self.destination(self.hop(sink.port)), ["a@example.net"])
        self.assertEqual(sink.openConnections, 1)
        yield deliverer.stop()
        self.assertEqual(sink.openConnections, 0)
        self.assertEqual(sink.verbs()[-1], "QUIT")


class HopChoiceTests(DeliveryTestCase):
    """
    The hop is chosen first, then an idle connection to it reused or a new
    one opened (issue 14): routing's order decides, not the cache, so
    equal-preference MX hosts share the load (RFC 5321 section 5.1) even
    while connections stay open.
    """

    @defer.inlineCallbacks
    def test_chosenHopBeforeIdleConnection(self):
        """
        Routing shuffles equal-preference hosts for each message; here the
        order alternates.  Each message goes to its first hop, over that
        hop's one cached connection, though the other hop's is idle too.
        """
        one, two = self.sink(), self.sink()
        a = self.hop(one.port, host="mx1.example")
        b = self.hop(two.port, host="mx2.example")
        deliverer = self.deliverer()
        for hops in [(a, b), (b, a)] * 3:
            result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
            self.assertEqual(result.hop, hops[0])
        self.assertEqual((len(one.messages), len(two.messages)), (3, 3))
        self.assertEqual((one.connections, two.connections), (1, 1))

    @defer.inlineCallbacks
    def test_downHopGoesLast(self):
        """
        A hop that could not take a session is not tried first again for a
        while: the next messages go straight to the next hop, over one
        connection, instead of each waiting on the broken one.
        """
        busy, good = self.sink(), self.sink()
        busy.greeting = "421 4.3.2 too busy"
        hops = (self.hop(busy.port, host="mx1.example"), self.hop(good.port))
        deliverer = self.deliverer()
        for _ in range(3):
            result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
            self.assertEqual(result.results[0].status, "delivered")
            self.assertEqual(result.hop, hops[1])
        self.assertEqual(busy.connections, 1)
        self.assertEqual((good.connections, len(good.messages)), (1, 3))

    @defer.inlineCallbacks
    def test_downHopTriedAgainLater(self):
        """
        After C{hopDownTime} the hop comes first again: a primary that is
        back gets its mail back, rather than a backup keeping it for as long
        as its cached connection lives.
        """
        busy, good = self.sink(), self.sink()
        busy.greeting = "421 4.3.2 too busy"
        hops = (self.hop(busy.port, host="mx1.example"), self.hop(good.port))
        deliverer = self.deliverer()
        deliverer.hopDownTime = 0.3
        result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
        self.assertEqual(result.hop, hops[1])
        busy.greeting = None
        result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
        self.assertEqual(result.hop, hops[1])
        yield sleep(0.4)
        result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
        self.assertEqual(result.hop, hops[0])
        self.assertEqual(len(busy.messages), 1)

    @defer.inlineCallbacks
    def test_everyHopDownStillTried(self):
        """
        Hops known to be down stay in the list, last: when nothing else
        answers, a message still goes to one that has come back.
        """
        first, second = self.sink(), self.sink()
        first.greeting = second.greeting = "421 4.3.2 too busy"
        hops = (self.hop(first.port, host="mx1.example"), self.hop(second.port))
        deliverer = self.deliverer()
        result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
        self.assertEqual(result.results[0].status, "deferred")
        first.greeting = None
        result = yield self.deliver(deliverer, self.destination(*hops), ["r@example.net"])
        self.assertEqual(result.results[0].status, "delivered")
        self.assertEqual(result.hop, hops[0])


class PostfixSinkInteropTests(DeliveryTestCase):
    """relayd's client against Postfix's smtp-sink, which dumps what it got."""

    def startSmtpSink(self) -> tuple[int, str]:
        sink = PostfixSink(self.directory)
        self.addCleanup(sink.stop)
        return sink.port, sink.dumps

    @defer.inlineCallbacks
    def test_deliverToSmtpSink(self):
        port, dumps = self.startSmtpSink()
        body = (
            b"Subject: interop \xc3\xa9\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n"
            + b"x" * 998
            + b"\r\n"
            + (b"line\r\n" * 20000)
            + b".end\r\n"
        )
        hop = self.hop(port, host="postfix-sink.test", tls="opportunistic")
        result = yield self.deliver(
            self.deliverer(),
            self.destination(hop),
            ["a@example.net", "b@example.net"],
            body,
            sender="s@example.org",
        )
        self.assertEqual([(r.status, r.code) for r in result.results], [("delivered", 250)] * 2)
        # smtp-sink writes its dump when the session ends.
        deadline = time.monotonic() + 5
        while not os.listdir(dumps) and time.monotonic() < deadline:
            yield sleep(0.05)
        [name] = os.listdir(dumps)
        with open(os.path.join(dumps, name), "rb") as f:
            dump = f.read()
        # Its own headers, three lines of Received:, then the message as
        # received with dot-stuffing removed and LF line ends, then an
        # empty line.
        head, _, _ = dump.partition(b"Received: ")
        self.assertEqual(
            head.decode().splitlines()[2:],
            [
                "X-Helo-Args: relay.test",
                "X-Mail-Args: <s@example.org> BODY=8BITMIME",
                "X-Rcpt-Args: <a@example.net>",
                "X-Rcpt-Args: <b@example.net>",
            ],
        )
        message = dump[len(head) :].split(b"\n", 3)[3]
        expected = body.replace(b"\r\n", b"\n") + b"\n"
        self.assertTrue(message == expected, "the message in the dump differs")


def test_hasEightBit(tmp_path):
    """
    An octet above 127 anywhere in the message counts, past the first
    chunk read too; one after the message (in the queue file's record)
    does not.
    """
    from relayd.delivery.attempt import _hasEightBit
    from relayd.delivery.client import CHUNK_SIZE

    path = tmp_path / "q"
    message = b"a" * (CHUNK_SIZE + 10)
    path.write_bytes(message + b"\xe9 record")
    assert not _hasEightBit(str(path), len(message))
    path.write_bytes(message[:-1] + b"\xe9 record")
    assert _hasEightBit(str(path), len(message))
    assert not _hasEightBit(str(path), 0)
