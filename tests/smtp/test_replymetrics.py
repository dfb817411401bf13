"""
Every refusal counted (issue 15, metrics), as dialogues over a
L{StringTransport} (tests/smtp/test_dialogue.py's harness): each 4xx/5xx
reply by the command it answers, code and enhanced code
(C{relayd_smtp_replies_total}), and every refused MAIL and RCPT as a
rejected message (C{relayd_messages_rejected_total}), whichever path
refused it (syntax, sequence, parameters, policies).  Over real sockets:
tests/ops/test_metrics.py.
"""

from __future__ import annotations

from relayd.ops.metrics import Metrics
from tests.smtp.test_dialogue import DialogueTestCase


class ReplyMetricsTests(DialogueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.metrics = Metrics()
        self.factory.metrics = self.metrics

    def replies(self, command: str, code: str, enhanced: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relayd_smtp_replies_total", {"command": command, "code": code, "enhanced": enhanced}
        )
        return value or 0.0

    def rejected(self, stage: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relayd_messages_rejected_total", {"stage": stage, "code": code}
        )
        return value or 0.0

    def test_sequenceRefusalsAtMail(self) -> None:
        """503 at MAIL before EHLO: a refused MAIL, counted as both."""
        self.assertEqual(
            self.talk("MAIL FROM:<a@example.com>\r\n"), ["503 5.5.1 Error: send EHLO/HELO first"]
        )
        self.assertEqual(self.replies("MAIL", "503", "5.5.1"), 1)
        self.assertEqual(self.rejected("mail", "503"), 1)

    def test_syntaxAndParameterRefusals(self) -> None:
        """501 (syntax) and 555 (parameters without EHLO) at MAIL: rejected too."""
        self.talk("HELO client.example\r\n")
        self.assertEqual(self.talk("MAIL FROM:<a@@>\r\n")[0][:9], "501 5.1.7")
        self.assertEqual(self.talk("MAIL FROM:<a@example.com> SIZE=10\r\n")[0][:9], "555 5.5.4")
        self.assertEqual(self.rejected("mail", "501"), 1)
        self.assertEqual(self.rejected("mail", "555"), 1)
        self.assertEqual(self.replies("MAIL", "501", "5.1.7"), 1)
        self.assertEqual(self.replies("MAIL", "555", "5.5.4"), 1)
        # The session goes on; a good MAIL is not counted.
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(self.rejected("mail", "250"), 0)

    def test_rcptRefusals(self) -> None:
        """503 before MAIL and 501 syntax at RCPT: rejected at rcpt."""
        self.ehlo()
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n")[0][:3], "503")
        self.talk("MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.talk("RCPT TO:<b@@>\r\n")[0][:9], "501 5.1.3")
        self.assertEqual(self.rejected("rcpt", "503"), 1)
        self.assertEqual(self.rejected("rcpt", "501"), 1)
        self.assertEqual(self.replies("RCPT", "501", "5.1.3"), 1)
        # The transaction is as it was: the good recipient is taken.
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])

    def test_otherCommandsCountedNotRejected(self) -> None:
        """A refused DATA or NOOP argument is a reply, not a rejected message."""
        self.ehlo()
        self.assertEqual(self.talk("DATA\r\n")[0][:3], "503")
        self.assertEqual(self.replies("DATA", "503", "5.5.1"), 1)
        self.assertFalse(
            [
                s
                for f in self.metrics.registry.collect()
                if f.name == "relayd_messages_rejected"
                for s in f.samples
            ]
        )

    def test_unknownVerbsShareOneLabel(self) -> None:
        """A client cannot make up label values: any unknown verb is UNKNOWN."""
        self.ehlo()
        for verb in ("XYZZY", "FOO", "BAR"):
            self.assertEqual(self.talk(f"{verb}\r\n")[0][:9], "502 5.5.2")
        self.assertEqual(self.replies("UNKNOWN", "502", "5.5.2"), 3)
        commands = {
            s.labels["command"]
            for f in self.metrics.registry.collect()
            if f.name == "relayd_smtp_replies"
            for s in f.samples
        }
        self.assertEqual(commands, {"UNKNOWN"})

    def test_successNotCounted(self) -> None:
        self.ehlo()
        self.transaction()
        self.talk("hello\r\n.\r\n")
        self.assertFalse(
            [
                s
                for f in self.metrics.registry.collect()
                if f.name == "relayd_smtp_replies"
                for s in f.samples
            ]
        )
