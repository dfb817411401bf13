"""
Outbound SMTPUTF8 (RFC 6531): L{relayd.delivery.Deliverer} sends
C{SMTPUTF8} on MAIL when the message needs it and the next hop offers it,
fails the recipients with C{5.6.7} when the hop does not, and leaves it
out when the message does not need it; over real sockets to the test sink.
"""

from __future__ import annotations

from twisted.internet import defer

from relayd._testsink import DEFAULT_ADVERTISE
from relayd.smtputf8 import headerHasEightBit, needsSMTPUTF8
from tests.test_delivery import DeliveryTestCase

UTF8_ADVERTISE = [*DEFAULT_ADVERTISE, "SMTPUTF8"]
ASCII_BODY = b"Subject: hi\r\n\r\nbody \xc3\xa9\r\n"
UTF8_HEADER = "Subject: Grüße\r\n\r\nbody\r\n".encode()


class NeedsTests(DeliveryTestCase):
    def test_rule(self):
        """The rule of L{relayd.smtputf8}: flag and (address or header)."""
        ascii, asciiSize = self.message(ASCII_BODY, "ascii")
        utf8, utf8Size = self.message(UTF8_HEADER, "utf8")
        self.assertFalse(needsSMTPUTF8(False, "jürgen@example.com", ["b@x.example"], utf8, 10))
        self.assertTrue(needsSMTPUTF8(True, "jürgen@example.com", ["b@x.example"], ascii, 10))
        self.assertTrue(needsSMTPUTF8(True, "a@example.com", ["b@bücher.example"], ascii, 10))
        self.assertTrue(needsSMTPUTF8(True, "a@example.com", ["b@x.example"], utf8, utf8Size))
        # 8-bit in the body only does not need it (8BITMIME does).
        self.assertFalse(needsSMTPUTF8(True, "a@example.com", ["b@x.example"], ascii, asciiSize))

    def test_headerAcrossReads(self):
        """The end of the header section is found across read boundaries."""
        data = b"X: " + b"a" * 65530 + b"\r\n\r\n\xc3\xa9\r\n"
        path, size = self.message(data)
        self.assertFalse(headerHasEightBit(path, size))
        data = b"X: " + b"a" * 65530 + b"\r\nY: \xc3\xa9\r\n\r\nbody\r\n"
        path, size = self.message(data)
        self.assertTrue(headerHasEightBit(path, size))


class OutboundTests(DeliveryTestCase):
    def send(self, sink, sender, recipients, data, smtputf8=True):
        path, size = self.message(data)
        return self.deliverer().deliver(
            self.destination(self.hop(sink.port)),
            sender,
            recipients,
            path,
            size,
            queueId="Q1",
            smtputf8=smtputf8,
        )

    @defer.inlineCallbacks
    def test_sentWhenNeededAndOffered(self):
        sink = self.sink()
        sink.advertise = UTF8_ADVERTISE
        result = yield self.send(sink, "jürgen@bücher.example", ["用户@例え.テスト"], UTF8_HEADER)
        self.assertEqual(self.statuses(result), [("用户@例え.テスト", "delivered", 250, "2.0.0")])
        [message] = sink.messages
        self.assertEqual(message.sender, "jürgen@bücher.example")
        self.assertEqual(message.recipients, ["用户@例え.テスト"])
        self.assertIn("SMTPUTF8", message.mailParameters.split())
        self.assertEqual(message.data, UTF8_HEADER)

    @defer.inlineCallbacks
    def test_notOfferedFailsWith567(self):
        """
        Never a downgrade: nothing is sent (no MAIL), and every recipient
        fails for good with 5.6.7, naming the host.
        """
        sink = self.sink()
        result = yield self.send(
            sink, "a@example.com", ["b@bücher.example", "c@example.net"], ASCII_BODY
        )
        self.assertEqual(
            self.statuses(result),
            [
                ("b@bücher.example", "failed", 553, "5.6.7"),
                ("c@example.net", "failed", 553, "5.6.7"),
            ],
        )
        self.assertIn("SMTPUTF8 is required, but was not offered by host", result.results[0].text)
        self.assertIsNone(result.results[0].remoteHost)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("MAIL", sink.verbs())

    @defer.inlineCallbacks
    def test_notNeededNotSent(self):
        """
        A message that came with SMTPUTF8 but has ASCII addresses and
        headers goes without it, even to a hop that offers it, and to one
        that does not.
        """
        offers = self.sink()
        offers.advertise = UTF8_ADVERTISE
        lacks = self.sink()
        for sink in (offers, lacks):
            result = yield self.send(sink, "a@example.com", ["b@example.net"], ASCII_BODY)
            self.assertEqual(result.results[0].status, "delivered")
            [message] = sink.messages
            self.assertNotIn("SMTPUTF8", message.mailParameters)

    @defer.inlineCallbacks
    def test_notFlaggedNotSent(self):
        """Without the record's flag, nothing is sent with SMTPUTF8."""
        sink = self.sink()
        sink.advertise = UTF8_ADVERTISE
        yield self.send(sink, "a@example.com", ["b@example.net"], UTF8_HEADER, smtputf8=False)
        self.assertNotIn("SMTPUTF8", sink.messages[0].mailParameters)
