"""
A maildrop file relayd refuses for good is returned to its sender
(L{relayd.ops.pickup}, L{relayd.ops.maildrop.flush}'s C{bounce}), as
Postfix returns mail its cleanup refuses: the installed C{relayd-sendmail}
writes the maildrop while relayd is down; relayd starts with the C{access}
policy denying a recipient; its pickup gets C{550 5.7.1} at RCPT, queues
an RFC 3464 report in its own spool, which its scheduler delivers along
the sender's route to a sink; the maildrop ends empty.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from relayd.ops.maildrop import pending, refusals
from relayd.testing import QUICK_DELIVERY, InProcessRelayd, SinkServer, TestSetup
from tests.ops.test_sendmail import run

SENDER = "cron@example.test"
DENIED = "denied@example.org"


def test_refusals() -> None:
    """A reply to MAIL or DATA refuses every recipient; RCPT replies their own."""
    recipients = ("a@x.test", "b@x.test", "c@x.test")
    assert refusals(recipients, ((None, 554, "5.7.1 no"),)) == (
        [(r, 554, "5.7.1 no") for r in recipients],
        [],
    )
    assert refusals(recipients, (("b@x.test", 550, "5.7.1 denied"),)) == (
        [("b@x.test", 550, "5.7.1 denied")],
        ["a@x.test", "c@x.test"],
    )
    assert refusals(recipients, ()) == ([], list(recipients))


class MaildropBounceTests(unittest.TestCase):
    """relayd-sendmail as cron runs it; relayd in this process; a sink as the sender's next hop."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = tempfile.mkdtemp(prefix="relayd-maildrop-bounce-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.sink = SinkServer()
        self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.setup = TestSetup(
            os.path.join(self.directory, "relayd"),
            modes=("relay",),
            chain=["access", "mynetworks"],
            policies={"access": {"recipient_deny": [DENIED]}},
            sections={"delivery": dict(QUICK_DELIVERY), "maildrop": {"interval": 0.2}},
        )
        # The sender's domain goes to the sink; nothing else has a route.
        with open(self.setup.configPath, "a") as f:
            f.write(
                '\n[[routes]]\ndomains = ["example.test"]\n[[routes.hops]]\n'
                f'host = "127.0.0.1"\nport = {self.sink.port}\ntls = "none"\n'
            )
        self.maildrop = os.path.join(self.setup.spoolPath, "maildrop")
        # relayd makes its maildrop at startup; then it is down.
        relayd = yield InProcessRelayd.start(self.setup)
        downPort = relayd.port("relay")
        yield relayd.stop()
        self.sendmailConfig = os.path.join(self.directory, "sendmail.toml")
        with open(self.sendmailConfig, "w") as f:
            f.write(
                'domain = "example.test"\n[server]\nhost = "127.0.0.1"\n'
                f'port = {downPort}\ntimeout = 30\ntls = "none"\n'
            )

    def send(self, args: list[str]) -> defer.Deferred[Any]:
        """The installed relayd-sendmail, relayd's config named by RELAYD_CONFIG."""
        from twisted.internet.threads import deferToThread

        return deferToThread(
            run,
            args,
            b"Subject: nightly\nFrom: cron@example.test\n\nall good\n",
            self.sendmailConfig,
            {"RELAYD_CONFIG": self.setup.configPath},
        )

    @defer.inlineCallbacks
    def startRelayd(self) -> Any:
        relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(relayd.stop)
        return relayd

    @defer.inlineCallbacks
    def waitFor(self, condition: Any, what: str, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield deferLater(reactor, 0.05, lambda: None)

    def reports(self) -> list[Any]:
        return [m for m in self.sink.messages if m.sender == ""]

    def parse(self, data: bytes) -> email.message.EmailMessage:
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message

    def assertReport(self, data: bytes, refused: list[str]) -> email.message.EmailMessage:
        """An RFC 3464 failure report on exactly C{refused}, returning the headers."""
        report = self.parse(data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        self.assertEqual(report["To"].addresses[0].addr_spec, SENDER)
        self.assertEqual(report["Subject"], "Undelivered Mail Returned to Sender")
        text, status, original = report.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        blocks = status.get_payload()
        perRecipient = blocks[1:]
        self.assertEqual(
            [b["Final-Recipient"] for b in perRecipient], [f"rfc822; {r}" for r in refused]
        )
        for block in perRecipient:
            self.assertEqual(block["Action"], "failed")
            self.assertEqual(block["Status"], "5.7.1")
            self.assertIn("550 5.7.1", block["Diagnostic-Code"])
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")
        headers = original.get_payload(decode=True)
        self.assertIn(b"Subject: nightly", headers)
        self.assertIn(b"(relayd maildrop, from userid", headers)
        return report

    @defer.inlineCallbacks
    def test_refusedReturnedToSender(self) -> Any:
        """
        The one recipient is denied: the sender gets the report through its
        route, the maildrop is empty, nothing is moved aside.
        """
        result = yield self.send(["-f", SENDER, DENIED])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(pending(self.maildrop)), 1)
        yield self.startRelayd()
        yield self.waitFor(self.reports, "the report at the sink")
        [report] = self.reports()
        self.assertEqual(report.recipients, [SENDER])
        self.assertReport(report.data, [DENIED])
        self.assertEqual(pending(self.maildrop), [])
        self.assertFalse(os.path.exists(os.path.join(self.maildrop, "broken")))
        # Only the report went out: the denied recipient got nothing.
        self.assertEqual([m.sender for m in self.sink.messages], [""])

    @defer.inlineCallbacks
    def test_partlyRefused(self) -> Any:
        """
        One recipient denied, one accepted: the accepted one gets the
        message, the sender a report on the denied one only.
        """
        result = yield self.send(["-f", SENDER, "ops@example.test", DENIED])
        self.assertEqual(result.returncode, 0, result.stderr)
        yield self.startRelayd()
        yield self.waitFor(lambda: len(self.sink.messages) == 2, "message and report")
        [delivered] = [m for m in self.sink.messages if m.sender == SENDER]
        self.assertEqual(delivered.recipients, ["ops@example.test"])
        self.assertIn(b"Subject: nightly", delivered.data)
        [report] = self.reports()
        self.assertReport(report.data, [DENIED])
        self.assertEqual(pending(self.maildrop), [])

    @defer.inlineCallbacks
    def test_nullSenderMovedAside(self) -> Any:
        """
        A refused file from the null sender cannot be returned (RFC 5321
        section 4.5.5): moved into broken/ with a log line, as before.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        result = yield self.send(["-f", "<>", DENIED])
        self.assertEqual(result.returncode, 0, result.stderr)
        [name] = pending(self.maildrop)
        yield self.startRelayd()
        broken = os.path.join(self.maildrop, "broken")
        yield self.waitFor(lambda: os.path.exists(os.path.join(broken, name)), "broken/")
        self.assertEqual(pending(self.maildrop), [])
        [line] = [e for e in events if "moved aside" in e.get("log_format", "")]
        self.assertIn("null sender, no report", line["why"])
        self.assertIn("550 5.7.1", line["why"])
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.sink.messages, [])


# --- flush's choices, with its two callables written here ---------------------


def dropOne(directory: str, recipients: list[str], sender: str = SENDER) -> str:
    from relayd.ops.maildrop import drop

    return os.path.basename(drop(directory, sender, recipients, b"Subject: x\r\n\r\nhi\r\n"))


def refusing(replies: dict[str, tuple[int, str]]) -> Any:
    """A submit that refuses the listed recipients at RCPT, all or nothing."""
    from relayd.ops.maildrop import Refused

    calls: list[tuple[str, ...]] = []

    def submit(dropped: Any) -> str:
        calls.append(dropped.recipients)
        refused = [(r, *replies[r]) for r in dropped.recipients if r in replies]
        if refused:
            permanent = any(code >= 500 for _, code, _ in refused)
            raise Refused("refused", permanent=permanent, replies=tuple(refused))
        return "250 2.0.0 Ok: queued as X"

    submit.calls = calls  # type: ignore[attr-defined]
    return submit


def test_flushFourXXWithFiveXXWaits(tmp_path: Path) -> None:
    """A 4xx for one recipient beside a 5xx for another: the file waits, nothing bounced."""
    from relayd.ops.maildrop import flush

    name = dropOne(str(tmp_path), ["a@x.test", "b@x.test"])
    bounced: list[Any] = []
    submit = refusing({"a@x.test": (550, "5.7.1 no"), "b@x.test": (451, "4.3.0 later")})
    result = flush(str(tmp_path), submit, bounce=lambda d, r: bounced.append(r) or "B")
    assert (result.left, result.bounced, bounced) == ([name], [], [])
    assert pending(str(tmp_path)) == [name]


def test_flushReportNotQueued(tmp_path: Path) -> None:
    """
    The report cannot be queued: with nothing sent yet the file waits for
    a later round; after the accepted recipients got it, it is moved aside
    (trying again would send it to them twice).
    """
    from relayd.ops.maildrop import flush

    def failing(dropped: Any, refused: Any) -> str:
        raise OSError("spool full")

    one = dropOne(str(tmp_path), ["a@x.test"])
    result = flush(str(tmp_path), refusing({"a@x.test": (550, "5.7.1 no")}), bounce=failing)
    assert result.left == [one] and pending(str(tmp_path)) == [one]
    os.unlink(tmp_path / one)
    two = dropOne(str(tmp_path), ["a@x.test", "ok@x.test"])
    submit = refusing({"a@x.test": (550, "5.7.1 no")})
    result = flush(str(tmp_path), submit, bounce=failing)
    assert submit.calls == [("a@x.test", "ok@x.test"), ("ok@x.test",)]
    assert [n for n, _ in result.broken] == [two]
    assert "report not queued: spool full" in result.broken[0][1]
    assert pending(str(tmp_path)) == []


def test_flushWithoutBounceMovesAside(tmp_path: Path) -> None:
    """Without a bounce (relayd-sendmail -q) a 5xx moves the file aside, as before."""
    from relayd.ops.maildrop import flush

    name = dropOne(str(tmp_path), ["a@x.test"])
    result = flush(str(tmp_path), refusing({"a@x.test": (550, "5.7.1 no")}))
    assert [n for n, _ in result.broken] == [name] and result.bounced == []
