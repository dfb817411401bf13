"""
Policies compare internationalized addresses in relayd's one normal form
(L{relayd.address}: lower-case A-label domain, NFC lower-case local part),
over real SMTP sessions with SMTPUTF8: access lists, sender-login maps and
rate-limit keys.
"""

from __future__ import annotations

import ipaddress
import smtplib

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.address import Address
from relayd.policies.ratelimit import Rule
from relayd.policies.senderlogin import parseFrom
from tests.policies.test_access import AccessTestCase
from tests.policies.test_senderlogin import PASSWORD, SenderLoginTestCase


class AccessDomainTests(AccessTestCase):
    options = {
        "sender_domain_deny": ["bücher.example"],
        "recipient_deny": ["Jürgen@xn--MNCHEN-3ya.example"],
    }

    def utf8Mail(self, sender, recipient="b@example.net"):
        """MAIL with SMTPUTF8 and RCPT: their codes."""
        d = self.session(f"MAIL FROM:<{sender}> SMTPUTF8", f"RCPT TO:<{recipient}>")
        return d.addCallback(lambda replies: [code for code, _ in replies[1:]])

    @defer.inlineCallbacks
    def test_uLabelAndALabelSameEntry(self):
        """
        C{user@bücher.example} and C{user@xn--bcher-kva.example} match the
        same C{sender_domain_deny} entry (written with U-labels).
        """
        uLabel = yield self.utf8Mail("user@bücher.example")
        aLabel = yield self.mail("user@xn--bcher-kva.example")
        upper = yield self.utf8Mail("user@BÜCHER.example")
        other = yield self.utf8Mail("user@bucher.example")
        self.assertEqual((uLabel[0], aLabel[0], upper[0], other[0]), (550, 550, 550, 250))

    @defer.inlineCallbacks
    def test_utf8LocalPart(self):
        """
        A recipient entry with a UTF-8 local part matches whatever the case,
        the Unicode normalization (NFC) or the domain's form.
        """
        cases = {
            "jürgen@münchen.example": 550,
            "JÜRGEN@xn--mnchen-3ya.example": 550,
            "ju\u0308rgen@münchen.example": 550,  # u + combining diaeresis
            "jurgen@münchen.example": 250,
        }
        codes = {}
        for recipient in cases:
            codes[recipient] = (yield self.utf8Mail("a@example.com", recipient))[1]
        self.assertEqual(codes, cases)


class SenderLoginUTF8Tests(SenderLoginTestCase):
    options = {"map": {"alice": ["jürgen@xn--bcher-kva.example", "@münchen.example"]}}

    def sendUTF8(self, sender, data):
        def dialogue():
            with smtplib.SMTP("127.0.0.1", self.relayd.port("relay"), timeout=20) as s:
                s.starttls(context=self.setup.clientContext())
                s.ehlo()
                s.login("alice", PASSWORD)
                code, _text = s.mail(sender, ["SMTPUTF8"])
                if code != 250:
                    return [code]
                assert s.rcpt("b@example.net")[0] == 250
                return [code, s.data(data)[0]]

        return deferToThread(dialogue)

    @defer.inlineCallbacks
    def test_ownedInEitherForm(self):
        """
        The map's entries (A-label address, U-label domain) cover the
        envelope sender and the C{From:} mailbox in the other form.
        """
        data = "From: Jürgen <JÜRGEN@bücher.example>\r\nSubject: ü\r\n\r\nhi\r\n".encode()
        owned = yield self.sendUTF8("jürgen@bücher.example", data)
        domain = yield self.sendUTF8("x@xn--mnchen-3ya.example", data)
        notOwned = yield self.sendUTF8("jurgen@bücher.example", data)
        self.assertEqual((owned, domain, notOwned), ([250, 250], [250, 250], [553]))

    def test_parseFromUTF8(self):
        self.assertEqual(
            parseFrom(["Jürgen <Ju\u0308rgen@Bücher.example>"]),
            ["jürgen@xn--bcher-kva.example"],
        )


class RateLimitKeyTests(unittest.TestCase):
    def test_sameKeyForBothForms(self):
        """A limit per sender or per sender domain cannot be split by writing the domain twice."""

        class Session:
            clientAddress = ipaddress.ip_address("127.0.0.1")
            user = None

        sender = Rule("s", "sender")
        domain = Rule("d", "sender_domain")
        uLabel = Address("Jürgen", "Bücher.example")
        aLabel = Address("jürgen", "xn--bcher-kva.example")
        self.assertEqual(sender.value(Session(), uLabel), sender.value(Session(), aLabel))
        self.assertEqual(
            sender.value(Session(), aLabel), ("sender", "jürgen@xn--bcher-kva.example")
        )
        self.assertEqual(
            domain.value(Session(), uLabel), ("sender domain", "xn--bcher-kva.example")
        )
        # ASCII keys are what they were before SMTPUTF8.
        self.assertEqual(
            sender.value(Session(), Address("Alice", "Example.COM")),
            ("sender", "alice@example.com"),
        )


class DKIMDomainTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_idna2008SigningDomain(self):
        """
        A UTF-8 C{From:} domain finds the key of its IDNA 2008 A-label
        (C{faß.example} is C{xn--fa-hia.example}, not IDNA 2003's
        C{fass.example}); C{d=} is the A-label (RFC 8616 section 4).
        """
        from relayd.config import load
        from relayd.envelope import Envelope, Message, Session
        from relayd.policy import loadPolicies
        from tests.policies.test_dkim import GOOD_KEYS, DKIMTestCase, configDir, writeFile

        setup = configDir(
            self,
            {"domains": {"xn--fa-hia.example": {"selector": "s", "key": "dkim/good.pem"}}},
            keys=GOOD_KEYS,
        )
        [policy] = [p for p in loadPolicies(load(setup.configPath))[0] if p.name == "dkim"]
        policy.startPolicy(reactor)
        self.addCleanup(policy.stopPolicy)
        raw = "From: Jörg <jörg@FAß.example>\r\nSubject: ü\r\n\r\nbody\r\n".encode()
        path = f"{setup.directory}/message"
        writeFile(path, raw)
        session = Session(ipaddress.ip_address("127.0.0.1"), 1, "relay", "relay", "S")
        message = Message(path, len(raw))
        envelope = Envelope(Address("jörg", "faß.example"), queueId="Q1", smtputf8=True)
        yield policy.modifyMessage(session, envelope, message)
        [tags] = DKIMTestCase.signatures(self, message.asBytes())
        self.assertEqual(tags["d"], "xn--fa-hia.example")


class SendmailTests(unittest.TestCase):
    def test_nonAsciiStillRefused(self):
        """
        relayd-sendmail does not send SMTPUTF8, so it refuses a non-ASCII
        address itself (EX_DATAERR), as before relayd's grammar took them.
        """
        from relayd.ops import sendmail

        config = sendmail.SendmailConfig(domain="example.test")
        arguments = sendmail.parseArguments(["-f", "jürgen@example.test", "root"])
        with self.assertRaises(sendmail.SendmailError) as raised:
            sendmail.envelopeSender(arguments, config, "root")
        self.assertEqual(raised.exception.status, sendmail.EX_DATAERR)
        self.assertIn("non-ASCII needs SMTPUTF8", str(raised.exception))
