"""
SMTPUTF8 end to end: Python's smtplib sends with C{SMTPUTF8} and UTF-8
addresses to relayd (in-process, the whole service tree), which resolves
the recipient's U-label domain by its A-label on the test DNS server and
delivers over real sockets to SMTP sinks: one that offers SMTPUTF8 gets
the message with C{SMTPUTF8} on MAIL; when the next hop does not offer it,
the sender gets a 5.6.7 DSN.
"""

import email
import email.policy
import smtplib

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from relayd._testsink import DEFAULT_ADVERTISE
from tests.test_delivery_e2e import DeliveryTestCase, afterReceived

UTF8_ADVERTISE = [*DEFAULT_ADVERTISE, "SMTPUTF8"]
SENDER = "jürgen@sender.test"
BODY = "From: Jürgen <jürgen@sender.test>\r\nSubject: Grüße\r\n\r\nHallo, 世界\r\n".encode()


class SMTPUTF8DeliveryTests(DeliveryTestCase):
    def setUp(self):
        d = super().setUp()

        def zones(_):
            # bücher.test offers SMTPUTF8 at 127.0.0.2; münchen.test does
            # not at 127.0.0.3; the sender's domain (DSNs) does at 127.0.0.5.
            self.dns.setMX("xn--bcher-kva.test", [(10, "mx.xn--bcher-kva.test")])
            self.dns.setA("mx.xn--bcher-kva.test", ["127.0.0.2"])
            self.dns.setMX("xn--mnchen-3ya.test", [(10, "mx.xn--mnchen-3ya.test")])
            self.dns.setA("mx.xn--mnchen-3ya.test", ["127.0.0.3"])
            self.sinks["127.0.0.2"].advertise = UTF8_ADVERTISE
            self.sinks["127.0.0.5"].advertise = UTF8_ADVERTISE

        return d.addCallback(zones)

    def sendUTF8(self, recipients, body=BODY, sender=SENDER):
        def send():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay")) as s:
                return s.sendmail(sender, list(recipients), body, mail_options=["SMTPUTF8"])

        return deferToThread(send)

    @defer.inlineCallbacks
    def test_deliveredWithSMTPUTF8(self):
        """
        A UTF-8 sender, recipient and header section arrive as sent, with
        SMTPUTF8 and BODY=8BITMIME on MAIL; Received: says UTF8SMTP.
        """
        yield self.sendUTF8(["用户@bücher.test"])
        sink = self.sinks["127.0.0.2"]
        yield self.waitFor(lambda: sink.messages)
        [message] = sink.messages
        self.assertEqual((message.sender, message.recipients), (SENDER, ["用户@bücher.test"]))
        self.assertIn("SMTPUTF8", message.mailParameters.split())
        self.assertIn("BODY=8BITMIME", message.mailParameters.split())
        self.assertEqual(afterReceived(message.data), BODY)
        self.assertIn(b" with UTF8SMTP id ", message.data.split(b"\r\n\r\n")[0])
        yield self.waitFor(lambda: self.spoolCount() == 0)
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_hopWithoutSMTPUTF8Bounces(self):
        """
        The next hop does not offer SMTPUTF8: it gets no MAIL at all, and
        the (internationalized) sender gets a DSN with 5.6.7, itself sent
        with SMTPUTF8.
        """
        yield self.sendUTF8(["otto@münchen.test"])
        yield self.waitFor(self.dsns)
        self.assertEqual(self.sinks["127.0.0.3"].messages, [])
        self.assertNotIn("MAIL", self.sinks["127.0.0.3"].verbs())
        [dsn] = self.dsns()
        self.assertEqual(dsn.recipients, [SENDER])
        self.assertIn("SMTPUTF8", dsn.mailParameters.split())
        parsed = email.message_from_string(
            afterReceived(dsn.data).decode("utf-8"), policy=email.policy.SMTPUTF8
        )
        self.assertEqual(parsed["To"].addresses[0].addr_spec, SENDER)
        text, report, _ = parsed.get_payload()
        fields = report.get_payload()[1]
        self.assertEqual(fields["Status"], "5.6.7")
        self.assertEqual(fields["Action"], "failed")
        self.assertEqual(fields["Final-Recipient"], "utf-8; otto@m\\x{FC}nchen.test")
        self.assertIn(
            "<otto@münchen.test>: Non-ASCII addresses not permitted for that\r\n"
            "    sender/recipient (5.6.7)",
            text.get_content(),
        )
        yield self.waitFor(lambda: self.spoolCount() == 0)

    @defer.inlineCallbacks
    def test_asciiMessageGoesWithout(self):
        """
        SMTPUTF8 on MAIL inbound, but ASCII addresses and headers: the
        hop without SMTPUTF8 takes it, sent without the parameter.
        """
        self.dns.setMX("example.net", [(10, "mx.example.net")])
        self.dns.setA("mx.example.net", ["127.0.0.4"])
        body = b"Subject: plain\r\n\r\nbody \xc3\xa9\r\n"
        yield self.sendUTF8(["r@example.net"], body, sender="a@sender.test")
        sink = self.sinks["127.0.0.4"]
        yield self.waitFor(lambda: sink.messages)
        self.assertNotIn("SMTPUTF8", sink.messages[0].mailParameters)
        self.assertEqual(afterReceived(sink.messages[0].data), body)

    @defer.inlineCallbacks
    def test_withoutParameterRefused(self):
        """smtplib without SMTPUTF8 and a UTF-8 recipient: 553 5.6.7 from relayd."""

        def send():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay")) as s:
                s.ehlo()
                s.command_encoding = "utf-8"  # what smtplib does with SMTPUTF8
                self.assertEqual(s.mail("a@sender.test")[0], 250)
                return s.rcpt("otto@münchen.test")

        code, text = yield deferToThread(send)
        self.assertEqual(
            (code, text), (553, b"5.6.7 Error: non-ASCII recipient address not permitted")
        )
