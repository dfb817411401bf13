"""
DSN (RFC 3461, 3464) end to end: Python's smtplib sends with RET, ENVID,
NOTIFY and ORCPT to relayd (in-process, the whole service tree), which
delivers over real sockets to SMTP sinks found through a real DNS server
(the set-up of test_delivery_e2e.py); the sender's own domain has a sink
too, where relayd's notices arrive.
"""

import email
import email.policy
import smtplib

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.delivery.test_attempt_e2e import DeliveryTestCase, afterReceived

BODY = b"Subject: dsn e2e\r\nFrom: a@sender.test\r\n\r\nthe body text\r\n"
MAIL_OPTIONS = ["RET=HDRS", "ENVID=abc"]
RCPT_OPTIONS = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;x@y"]


class DSNEndToEndTests(DeliveryTestCase):
    def setUp(self):
        d = super().setUp()

        def mx(_):
            self.dns.setMX("example.net", [(10, "mx1.example.net")])
            self.dns.setA("mx1.example.net", ["127.0.0.2"])

        return d.addCallback(mx)

    def sendDSN(self, recipients, mailOptions=MAIL_OPTIONS, rcptOptions=RCPT_OPTIONS):
        def send():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay")) as s:
                return s.sendmail(
                    "a@sender.test",
                    list(recipients),
                    BODY,
                    mail_options=list(mailOptions),
                    rcpt_options=list(rcptOptions),
                )

        return deferToThread(send)

    def parse(self, message):
        return email.message_from_bytes(afterReceived(message.data), policy=email.policy.default)

    @defer.inlineCallbacks
    def quiet(self):
        """The spool is empty and stays so a moment: no late notice either."""
        yield self.waitFor(lambda: self.spoolCount() == 0)
        yield deferLater(reactor, 0.5, lambda: None)
        yield self.waitFor(lambda: self.spoolCount() == 0)

    @defer.inlineCallbacks
    def test_successNoticeWhenNextHopLacksDSN(self):
        """
        The next hop does not advertise DSN: it gets none of the
        parameters, and relayd sends the sender a notice with Action:
        relayed, the ENVID and the ORCPT.
        """
        sink = self.sinks["127.0.0.2"]
        self.assertNotIn("DSN", sink.advertise)
        yield self.sendDSN(["r@example.net"])
        yield self.waitFor(lambda: sink.messages and self.dsns())
        [message] = sink.messages
        self.assertNotIn("RET=", message.mailParameters)
        rcpt = [c.line for c in sink.commands if c.line.upper().startswith("RCPT")]
        self.assertEqual(rcpt, ["RCPT TO:<r@example.net>"])
        [notice] = self.dsns()
        self.assertEqual(notice.recipients, ["a@sender.test"])
        parsed = self.parse(notice)
        self.assertEqual(parsed["Subject"], "Successful Mail Delivery Report")
        _text, report, original = parsed.get_payload()
        perMessage, perRecipient = report.get_payload()
        self.assertEqual(perMessage["Original-Envelope-Id"], "abc")
        self.assertEqual(perRecipient["Original-Recipient"], "rfc822;x@y")
        self.assertEqual(perRecipient["Final-Recipient"], "rfc822; r@example.net")
        self.assertEqual(perRecipient["Action"], "relayed")
        self.assertEqual(perRecipient["Status"], "2.0.0")
        self.assertEqual(perRecipient["Remote-MTA"], "dns; mx1.example.net")
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        yield self.quiet()
        self.assertEqual(len(self.dsns()), 1)

    @defer.inlineCallbacks
    def test_parametersPassedToNextHopWithDSN(self):
        """
        The next hop advertises DSN: RET, ENVID, NOTIFY and ORCPT go to it
        (xtext as received), and relayd sends no notice of its own.
        """
        sink = self.sinks["127.0.0.2"]
        sink.advertise.append("DSN")
        yield self.sendDSN(["r@example.net"], ["RET=HDRS", "ENVID=a+2Bb"])
        yield self.waitFor(lambda: sink.messages)
        [message] = sink.messages
        self.assertTrue(message.mailParameters.endswith("RET=HDRS ENVID=a+2Bb"), message)
        rcpt = [c.line for c in sink.commands if c.line.upper().startswith("RCPT")]
        self.assertEqual(rcpt, ["RCPT TO:<r@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y"])
        yield self.quiet()
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_notifyNeverNoBounce(self):
        """NOTIFY=NEVER to a recipient the next hop refuses: no bounce."""
        self.sinks["127.0.0.2"].rcptReply = {"r@example.net": (550, "5.1.1 no such user")}
        yield self.sendDSN(["r@example.net"], [], ["NOTIFY=NEVER"])
        yield self.quiet()
        self.assertEqual(self.dsns(), [])

    @defer.inlineCallbacks
    def test_retHdrsBounceHasNoBodyAndNamesRcpt(self):
        """
        RET=HDRS: the bounce returns the header section only; its text
        names the command the next hop refused, as Postfix's does.
        """
        self.sinks["127.0.0.2"].rcptReply = {"r@example.net": (550, "5.1.1 no such user")}
        yield self.sendDSN(["r@example.net"])
        yield self.waitFor(self.dsns)
        [notice] = self.dsns()
        self.checkDSN(notice, "r@example.net", "5.1.1")
        text, report, original = self.parse(notice).get_payload()
        self.assertIn("(in reply to RCPT TO command)", " ".join(text.get_content().split()))
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: dsn e2e", notice.data)
        self.assertNotIn(b"the body text", notice.data)
        self.assertEqual(report.get_payload()[1]["Original-Recipient"], "rfc822;x@y")

    @defer.inlineCallbacks
    def test_retFullBounceHasMessageAndNamesData(self):
        """RET=FULL: the whole message comes back; refused after the data."""
        self.sinks["127.0.0.2"].dataReply = (554, "5.7.1 rejected by content filter")
        yield self.sendDSN(["r@example.net"], ["RET=FULL"], [])
        yield self.waitFor(self.dsns)
        [notice] = self.dsns()
        self.checkDSN(notice, "r@example.net", "5.7.1")
        text, _, original = self.parse(notice).get_payload()
        self.assertIn("(in reply to end of DATA command)", " ".join(text.get_content().split()))
        self.assertEqual(original.get_content_type(), "message/rfc822")
        self.assertIn(b"the body text", notice.data)

    @defer.inlineCallbacks
    def test_mailRefusedNamesMail(self):
        """A next hop refusing MAIL: the bounce says "in reply to MAIL FROM command"."""
        self.sinks["127.0.0.2"].refuse["MAIL"] = (553, "5.7.1 sender rejected")
        yield self.sendDSN(["r@example.net"], [], [])
        yield self.waitFor(self.dsns)
        [notice] = self.dsns()
        self.checkDSN(notice, "r@example.net", "5.7.1")
        text = self.parse(notice).get_payload()[0]
        self.assertIn("(in reply to MAIL FROM command)", " ".join(text.get_content().split()))
