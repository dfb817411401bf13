"""
DSN (RFC 3461, 3464): the MAIL and RCPT parameters as dialogues over a
L{StringTransport} (one test per rule, bad input included), the queue
record keeping them, the report's fields, and the scheduler deciding which
notices go out.  tests/test_dsn_e2e.py has the same over real sockets.
"""

from __future__ import annotations

import email
import email.policy
import json

import pytest
from test_dialogue import DialogueTestCase
from test_scheduler import SchedulerTestCase
from twisted.internet import defer

from relayd import dsn
from relayd.bounce import RELAYED_SUBJECT, RecipientStatus, makeDSN
from relayd.client import Reply as RemoteReply
from relayd.queuefile import QueueRecord, RecipientRecord, readData
from relayd.spool import envelopeRecord

BODY = b"Subject: test\r\nFrom: a@example.org\r\n\r\nthe body\r\n"


class DSNDialogueTests(DialogueTestCase):
    """DSN's parameters at the server, and what a refusal leaves."""

    def finish(self) -> QueueRecord:
        self.assertEqual(self.talk("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(
            self.talk("Subject: x\r\n\r\nhello\r\n.\r\n"), ["250 2.0.0 Ok: queued as Q0001"]
        )
        record = self.spool.records["Q0001"]
        assert isinstance(record, QueueRecord)
        return record

    def test_advertised(self) -> None:
        self.assertIn("DSN", [line[4:] for line in self.ehlo()])

    def test_parametersStored(self) -> None:
        """RET, ENVID (xtext decoded), NOTIFY and ORCPT end up in the record."""
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> RET=hdrs ENVID=QQ+2B1\r\n"), ["250 2.1.0 Ok"]
        )
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net> NOTIFY=failure,success ORCPT=rfc822;b+40x.y\r\n"),
            ["250 2.1.5 Ok"],
        )
        self.assertEqual(self.talk("RCPT TO:<c@example.net>\r\n"), ["250 2.1.5 Ok"])
        record = self.finish()
        self.assertEqual((record.ret, record.envid), ("HDRS", "QQ+1"))
        b, c = record.recipients
        self.assertEqual((b.notify, b.orcpt), (("SUCCESS", "FAILURE"), "rfc822;b+40x.y"))
        self.assertEqual((c.notify, c.orcpt), (None, None))

    def test_notifyNeverWithOthers(self) -> None:
        """NOTIFY=NEVER,SUCCESS: 501 5.5.4, the recipient not added."""
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS\r\n"),
            ["501 5.5.4 Error: bad NOTIFY parameter"],
        )
        self.assertEqual(self.talk("DATA\r\n"), ["554 5.5.1 Error: no valid recipients"])

    def test_orcptWithoutAddressType(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net> ORCPT=b@example.net\r\n"),
            ["501 5.5.4 Error: bad ORCPT parameter"],
        )

    def test_orcptBadXtext(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        for bad in ("rfc822;b+4", "rfc822;b+zzx", "rfc822;"):
            self.assertEqual(
                self.talk(f"RCPT TO:<b@example.net> ORCPT={bad}\r\n"),
                ["501 5.5.4 Error: bad ORCPT parameter"],
            )

    def test_refusedRecipientLeavesNothing(self) -> None:
        """
        A RCPT refused for its ORCPT keeps nothing of its good NOTIFY: the
        same recipient given again without parameters has none.
        """
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net> NOTIFY=NEVER ORCPT=x\r\n"),
            ["501 5.5.4 Error: bad ORCPT parameter"],
        )
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])
        [b] = self.finish().recipients
        self.assertEqual((b.address, b.notify, b.orcpt), ("b@example.net", None, None))

    def test_envidOver100(self) -> None:
        """ENVID of 101 characters (decoded): 501, and no transaction started."""
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> ENVID=" + "x" * 101 + "\r\n"),
            ["501 5.5.4 Error: bad ENVID parameter"],
        )
        self.assertEqual(
            self.talk("RCPT TO:<b@example.net>\r\n"), ["503 5.5.1 Error: need MAIL command"]
        )
        # 100 is fine, and so is one that is longer only in its xtext form.
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> ENVID=" + "+2B" * 100 + "\r\n"),
            ["250 2.1.0 Ok"],
        )
        self.talk("RCPT TO:<b@example.net>\r\n")
        self.assertEqual(self.finish().envid, "+" * 100)

    def test_retTwice(self) -> None:
        """Any parameter twice: 501, and no transaction started."""
        self.ehlo()
        reply = self.talk("MAIL FROM:<a@example.com> RET=FULL RET=HDRS\r\n")
        self.assertEqual(reply[0][:4], "501 ")
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])

    def test_notifyTwice(self) -> None:
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        reply = self.talk("RCPT TO:<b@example.net> NOTIFY=NEVER NOTIFY=NEVER\r\n")
        self.assertEqual(reply[0][:4], "501 ")

    def test_badRet(self) -> None:
        self.ehlo()
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com> RET=BODY\r\n"),
            ["501 5.5.4 Error: bad RET parameter"],
        )

    def test_rcptAllowance(self) -> None:
        """RFC 3461 section 4: a RCPT line may be 500 octets longer for ORCPT."""
        self.ehlo()
        self.talk("MAIL FROM:<a@example.com>\r\n")
        orcpt = "rfc822;" + "o" * 700
        line = f"RCPT TO:<b@example.net> ORCPT={orcpt}\r\n"
        self.assertGreater(len(line), 512)
        self.assertEqual(self.talk(line), ["250 2.1.5 Ok"])
        self.assertEqual(
            self.talk("RCPT TO:<c@example.net> ORCPT=rfc822;" + "o" * 1000 + "\r\n"),
            ["500 5.5.2 Error: line too long"],
        )
        self.assertEqual(self.finish().recipients[0].orcpt, orcpt)


# --- xtext and the parameters ---------------------------------------------


def test_xtextRoundTrip() -> None:
    text = "a+b=c d\x01~"
    encoded = dsn.encodeXtext(text)
    assert encoded == "a+2Bb+3Dc+20d+01~"
    assert dsn.decodeXtext(encoded) == text


@pytest.mark.parametrize("bad", ["+", "+4", "+4a", "a=b", "a b", "\xe9"])
def test_xtextRefused(bad: str) -> None:
    with pytest.raises(ValueError):
        dsn.decodeXtext(bad)


def test_wants() -> None:
    """Without NOTIFY: failure and delay notices; NEVER: none."""
    assert [dsn.wants(None, k) for k in dsn.NOTIFY_KEYWORDS] == [False, True, True]
    assert [dsn.wants(("NEVER",), k) for k in dsn.NOTIFY_KEYWORDS] == [False] * 3
    assert [dsn.wants(("SUCCESS",), k) for k in dsn.NOTIFY_KEYWORDS] == [True, False, False]


def test_parametersOut() -> None:
    """What goes to a next hop that offers DSN: xtext encoded again."""
    parameters = dsn.DSNParameters(
        ret="HDRS",
        envid="id+1 x",
        recipients={"b@x.y": dsn.RecipientRequest(("SUCCESS", "DELAY"), "rfc822;b+40x.y")},
    )
    assert parameters.mail() == " RET=HDRS ENVID=id+2B1+20x"
    assert parameters.rcpt("b@x.y") == " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40x.y"
    assert parameters.rcpt("c@x.y") == ""
    assert dsn.DSNParameters().empty


def test_originalRecipient() -> None:
    assert dsn.originalRecipient("rfc822;b+40x.y") == "rfc822;b@x.y"
    # Decoded to something that is not a printable address: kept encoded.
    assert dsn.originalRecipient("rfc822;b+0Ax") == "rfc822;b+0Ax"
    assert dsn.originalRecipient("utf-8;j\\x{E9}") == "utf-8;j\\x{E9}"


# --- the queue record -------------------------------------------------------


def test_recordRoundTrip() -> None:
    record = QueueRecord.new(
        "Q1",
        "a@example.com",
        ["b@example.net", "c@example.net"],
        1.0,
        10,
        "7BIT",
        "127.0.0.1",
        "h",
        None,
        "relay",
        ret="FULL",
        envid="env 1",
        notify={"b@example.net": ("NEVER",)},
        orcpt={"b@example.net": "rfc822;b+40x"},
    )
    record = record.withRecipients(
        [record.recipients[0], RecipientRecord("c@example.net", command="RCPT TO")]
    )
    again = QueueRecord.decode(record.encode())
    assert again == record
    assert (again.ret, again.envid) == ("FULL", "env 1")
    assert again.recipients[0].notify == ("NEVER",)
    assert again.recipients[0].orcpt == "rfc822;b+40x"
    assert again.recipients[1].command == "RCPT TO"


def test_recordWithoutDSNFieldsReads() -> None:
    """A record written before DSN (no ret, envid, notify, orcpt, command) reads."""
    old = {
        "version": 2,
        "queue_id": "Q1",
        "sender": "a@example.com",
        "recipients": [{"address": "b@example.net", "state": "deferred", "attempts": 1}],
        "arrival": 1.0,
        "size": 10,
    }
    record = QueueRecord.decode(json.dumps(old).encode())
    assert (record.ret, record.envid) == (None, None)
    [b] = record.recipients
    assert (b.notify, b.orcpt, b.command) == (None, None, None)
    # And a record without DSN parameters is written without their keys.
    assert "ret" not in record.toJSON() and "notify" not in b.toJSON()


@pytest.mark.parametrize(
    "change",
    [{"ret": "ALL"}, {"ret": 1}],
)
def test_recordBadRet(change: dict) -> None:
    data = {"version": 2, "queue_id": "Q", "sender": "", "recipients": [], "arrival": 1, "size": 0}
    data.update(change)
    with pytest.raises(ValueError):
        QueueRecord.fromJSON(data)


def test_recordBadNotify() -> None:
    data = {
        "version": 2,
        "queue_id": "Q",
        "sender": "",
        "recipients": [{"address": "b@x", "notify": ["SOMETIMES"]}],
        "arrival": 1,
        "size": 0,
    }
    with pytest.raises(ValueError):
        QueueRecord.fromJSON(data)


# --- the report ---------------------------------------------------------------

ORIGINAL = b"From: a@example.com\r\nSubject: hi\r\n\r\nthe body\r\n"


def report(tmp_path, recipients, **options) -> email.message.EmailMessage:
    path = tmp_path / "Q1"
    path.write_bytes(ORIGINAL)
    data = makeDSN(
        reportingMTA="relayd.test",
        queueId="Q1",
        sender="a@example.com",
        arrival=1_700_000_000.0,
        now=1_700_000_100.0,
        recipients=recipients,
        originalPath=str(path),
        **options,
    )
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


def test_reportFieldsAndCommand(tmp_path) -> None:
    """
    Original-Envelope-Id per message, Original-Recipient per recipient
    (RFC 3464 sections 2.2.1, 2.3.1); the text names the command that
    failed, as Postfix's does.
    """
    bob = RecipientStatus(
        address="bob@example.net",
        action="failed",
        status="5.1.1",
        remoteMTA="mx.example.net",
        reply=RemoteReply.parse(["550 5.1.1 no such user"]),
        command="RCPT TO",
        originalRecipient="rfc822;Bob+40example.net",
    )
    message = report(tmp_path, [bob], envid="env-42")
    text, status, original = message.get_payload()
    assert "host mx.example.net said: 550 5.1.1 no such user (in reply to RCPT TO command)" in (
        " ".join(text.get_content().split())
    )
    perMessage, perRecipient = status.get_payload()
    assert perMessage["Original-Envelope-Id"] == "env-42"
    assert perRecipient["Original-Recipient"] == "rfc822;Bob@example.net"
    assert perRecipient["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert original.get_content_type() == "text/rfc822-headers"


def test_reportRelayed(tmp_path) -> None:
    """Action: relayed (RFC 3464 section 2.3.3), a 2.X.X status."""
    bob = RecipientStatus(
        address="bob@example.net",
        action="relayed",
        status="2.0.0",
        remoteMTA="mx.example.net",
        reply=RemoteReply.parse(["250 2.0.0 Ok: queued as X"]),
        command="end of DATA",
    )
    message = report(tmp_path, [bob])
    assert message["Subject"] == RELAYED_SUBJECT
    _, status, original = message.get_payload()
    assert status.get_payload()[1]["Action"] == "relayed"
    assert original.get_content_type() == "text/rfc822-headers"
    with pytest.raises(ValueError):
        RecipientStatus("bob@example.net", "relayed", "5.0.0")


# --- the scheduler: which notices go out ------------------------------------


class DSNSchedulerTests(SchedulerTestCase):
    """
    A real spool and the scripted deliverer of test_scheduler: the notices
    each recipient's NOTIFY asks for, and RET.
    """

    def submitDSN(self, recipients, notify=None, orcpt=None, ret=None, envid=None):
        record = envelopeRecord(
            queueId="",
            sender="a@example.org",
            recipients=list(recipients),
            arrival=self.clock.seconds(),
            size=len(BODY),
            body="7BIT",
            client="127.0.0.1",
            helo="h",
            user=None,
            listener="relay",
            ret=ret,
            envid=envid,
            notify=notify,
            orcpt=orcpt,
        )
        return self.spool.submit(record, BODY)

    def notices(self, exclude):
        """The reports in the spool (the sender's domain is scripted to defer)."""
        out = []
        for queueId in self.spool.entries("deferred"):
            if queueId in exclude:
                continue
            record, path = self.spool.load(queueId)
            if record.sender == "":
                data = readData(path)
                out.append(email.message_from_bytes(data, policy=email.policy.default))
        return out

    @defer.inlineCallbacks
    def test_parametersReachTheDeliverer(self):
        yield self.start()
        yield self.submitDSN(
            ["b@x.test"],
            notify={"b@x.test": ("SUCCESS",)},
            orcpt={"b@x.test": "rfc822;b"},
            ret="HDRS",
            envid="e1",
        )
        yield self.settle()
        parameters = self.deliverer.dsn[0]
        self.assertEqual((parameters.ret, parameters.envid), ("HDRS", "e1"))
        self.assertEqual(parameters.rcpt("b@x.test"), " NOTIFY=SUCCESS ORCPT=rfc822;b")

    @defer.inlineCallbacks
    def test_notifyNeverNoBounce(self):
        """NOTIFY=NEVER: the recipient fails without a notice; others still get one."""
        self.deliverer.script = {
            "no@x.test": ["failed"],
            "other@x.test": ["failed"],
            "a@example.org": ["deferred"],
        }
        yield self.start()
        queueId = yield self.submitDSN(["no@x.test"], notify={"no@x.test": ("NEVER",)})
        yield self.settle()
        self.assertEqual(self.notices({queueId}), [])
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
        yield self.submitDSN(["no@x.test", "other@x.test"], notify={"no@x.test": ("NEVER",)})
        yield self.settle()
        [notice] = self.notices(set())
        fields = notice.get_payload()[1].get_payload()[1:]
        self.assertEqual([f["Final-Recipient"] for f in fields], ["rfc822; other@x.test"])

    @defer.inlineCallbacks
    def test_notifySuccessOnlyNoBounce(self):
        """NOTIFY=SUCCESS does not ask for a failure notice."""
        self.deliverer.script = {"no@x.test": ["failed"], "a@example.org": ["deferred"]}
        yield self.start()
        queueId = yield self.submitDSN(["no@x.test"], notify={"no@x.test": ("SUCCESS",)})
        yield self.settle()
        self.assertEqual(self.notices({queueId}), [])

    @defer.inlineCallbacks
    def test_delayWarningOnlyWhereAsked(self):
        """
        The delay warning names the recipients that asked DELAY or gave no
        NOTIFY; NOTIFY=FAILURE alone does not get one.
        """
        self.deliverer.script = {
            "d@x.test": ["deferred"],
            "f@x.test": ["deferred"],
            "n@x.test": ["deferred"],
            "a@example.org": ["deferred"],
        }
        yield self.start(delayWarning=500, retryInitial=300, retryMax=300)
        queueId = yield self.submitDSN(
            ["d@x.test", "f@x.test", "n@x.test"],
            notify={"d@x.test": ("FAILURE", "DELAY"), "f@x.test": ("FAILURE",)},
        )
        yield self.settle()
        for _ in range(3):
            self.clock.advance(330)
            yield self.settle()
        [notice] = self.notices({queueId})
        fields = notice.get_payload()[1].get_payload()[1:]
        self.assertEqual(
            [f["Final-Recipient"] for f in fields], ["rfc822; d@x.test", "rfc822; n@x.test"]
        )
        self.assertEqual({f["Action"] for f in fields}, {"delayed"})
        record, _ = self.spool.load(queueId)
        self.assertTrue(record.delayWarned)

    @defer.inlineCallbacks
    def test_relayedNoticeWhenNextHopLacksDSN(self):
        """
        NOTIFY=SUCCESS and a next hop that took the message without DSN:
        relayd says "relayed" itself (RFC 3461 section 6.2.3), with the
        ENVID and ORCPT given.
        """
        self.deliverer.script = {"a@example.org": ["deferred"]}
        yield self.start()
        queueId = yield self.submitDSN(
            ["s@x.test", "plain@x.test"],
            notify={"s@x.test": ("SUCCESS", "FAILURE")},
            orcpt={"s@x.test": "rfc822;orig+40x.test"},
            envid="env-7",
        )
        yield self.settle()
        [notice] = self.notices({queueId})
        self.assertEqual(notice["Subject"], "Successful Mail Delivery Report")
        perMessage, *fields = notice.get_payload()[1].get_payload()
        self.assertEqual(perMessage["Original-Envelope-Id"], "env-7")
        self.assertEqual(len(fields), 1)
        self.assertEqual(fields[0]["Final-Recipient"], "rfc822; s@x.test")
        self.assertEqual(fields[0]["Original-Recipient"], "rfc822;orig@x.test")
        self.assertEqual((fields[0]["Action"], fields[0]["Status"]), ("relayed", "2.0.0"))

    @defer.inlineCallbacks
    def test_noRelayedNoticeWhenNextHopHasDSN(self):
        """The next hop took NOTIFY with the message: it reports, not relayd."""
        self.deliverer.script = {"a@example.org": ["deferred"]}
        self.deliverer.dsnPassed = True
        yield self.start()
        queueId = yield self.submitDSN(["s@x.test"], notify={"s@x.test": ("SUCCESS",)})
        yield self.settle()
        self.assertEqual(self.notices({queueId}), [])
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})

    @defer.inlineCallbacks
    def test_retFullReturnsMessage(self):
        self.deliverer.script = {"no@x.test": ["failed"], "a@example.org": ["deferred"]}
        yield self.start()
        yield self.submitDSN(["no@x.test"], ret="FULL")
        yield self.settle()
        [notice] = self.notices(set())
        original = notice.get_payload()[2]
        self.assertEqual(original.get_content_type(), "message/rfc822")
        self.assertIn(b"the body", original.as_bytes())

    @defer.inlineCallbacks
    def test_retHdrsReturnsHeaders(self):
        self.deliverer.script = {"no@x.test": ["failed"], "a@example.org": ["deferred"]}
        yield self.start()
        yield self.submitDSN(["no@x.test"], ret="HDRS")
        yield self.settle()
        [notice] = self.notices(set())
        original = notice.get_payload()[2]
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"the body", notice.as_bytes())

    @defer.inlineCallbacks
    def test_parametersKeptAcrossRetriesAndRestart(self):
        """A deferral and a new scheduler on the same spool keep every parameter."""
        self.deliverer.script = {"b@x.test": ["deferred", "delivered"]}
        yield self.start()
        queueId = yield self.submitDSN(
            ["b@x.test"],
            notify={"b@x.test": ("FAILURE", "DELAY")},
            orcpt={"b@x.test": "rfc822;b+40x"},
            ret="FULL",
            envid="e2",
        )
        yield self.settle()
        yield self.scheduler.stopService()
        record, _ = self.spool.load(queueId)
        self.assertEqual((record.ret, record.envid), ("FULL", "e2"))
        self.assertEqual(record.recipients[0].notify, ("FAILURE", "DELAY"))
        self.assertEqual(record.recipients[0].command, "end of DATA")
        yield self.start()
        self.clock.advance(400)
        yield self.settle()
        first, second = self.deliverer.dsn
        self.assertEqual(first, second)
        self.assertEqual(second.rcpt("b@x.test"), " NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+40x")
        self.assertEqual(self.queued(), {"incoming": [], "active": [], "deferred": []})
