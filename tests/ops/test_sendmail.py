"""
relayd-sendmail: the installed console script, run as a subprocess the way
cron, mailx or PHP run /usr/sbin/sendmail, against a real relayd running in
the test process (relay listener on 127.0.0.1, trusted by mynetworks).
What relayd wrote to its spool (the queue files in incoming/) is checked
byte for byte.
"""

from __future__ import annotations

import email.policy
import email.utils
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.ops import sendmail
from relayd.queue.record import readData, readRecord
from relayd.testing import (
    DEMO_PASSWORD,
    DEMO_USER,
    InProcessRelayd,
    SinkServer,
    TestSetup,
    freePort,
)
from relayd.testing.process import RelaydProcess, relaydProcesses  # noqa: F401 (fixture)

SCRIPT = os.path.join(os.path.dirname(sys.executable), "relayd-sendmail")
DOMAIN = "example.test"
LOGIN = pwd.getpwuid(os.getuid()).pw_name
RECEIVED = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
DATE = re.compile(rb"^Date: (.*)\r\n", re.MULTILINE)
MESSAGE_ID = re.compile(rb"^Message-ID: <[^<>@\s]+@example\.test>\r\n", re.MULTILINE)


def run(args, stdin=b"", config=None, env=None):
    """Run the installed relayd-sendmail; blocking (call in a thread)."""
    assert os.path.exists(SCRIPT), f"{SCRIPT} missing: pip install -e . makes it"
    environ = dict(os.environ)
    environ.pop(sendmail.CONFIG_ENV, None)
    environ.pop("RELAYD_CONFIG", None)
    if config is not None:
        environ[sendmail.CONFIG_ENV] = config
    environ.update(env or {})
    return subprocess.run(
        [SCRIPT, *args], input=stdin, capture_output=True, env=environ, timeout=120
    )


class SendmailTestCase(unittest.TestCase):
    """A relayd per test, and a sendmail.toml pointing at its relay port."""

    sections: dict = {}
    chain = None
    listener = "relay"
    tls = "none"
    auth = None

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="relayd-sendmail-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.setup = TestSetup(
            os.path.join(self.directory, "relayd"), sections=self.sections, chain=self.chain
        )
        self.relayd = yield InProcessRelayd.start(self.setup)
        self.addCleanup(self.relayd.stop)
        self.config = self.writeConfig(self.relayd.port(self.listener))

    def writeConfig(self, port, server=""):
        """Write sendmail.toml for 127.0.0.1:port; C{server}: more [server] lines."""
        lines = [f'domain = "{DOMAIN}"', "[server]", 'host = "127.0.0.1"', f"port = {port}"]
        lines += [server or "timeout = 30", f'tls = "{self.tls}"']
        if self.tls != "none":
            lines.append(f'ca_file = "{self.setup.caPath}"')
        if self.auth is not None:
            user, password = self.auth
            passwordFile = os.path.join(self.directory, "password")
            with open(passwordFile, "w") as f:
                f.write(password + "\n")
            lines += ["[auth]", f'user = "{user}"', f'password_file = "{passwordFile}"']
        path = os.path.join(self.directory, "sendmail.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def send(self, args, stdin=b"", config=None, env=None):
        return deferToThread(run, args, stdin, config or self.config, env)

    def spooled(self):
        """(envelope record, message bytes without relayd's Received) per message."""
        result = []
        incoming = os.path.join(self.setup.spoolPath, "incoming")
        for name in sorted(os.listdir(incoming)):
            path = os.path.join(incoming, name)
            record = readRecord(path, name)
            data = readData(path)
            received = RECEIVED.match(data)
            assert received is not None, data[:200]
            result.append((record, data[received.end() :]))
        return result

    def only(self):
        messages = self.spooled()
        self.assertEqual(len(messages), 1, messages)
        return messages[0]

    def assertOk(self, result):
        self.assertEqual(
            (result.returncode, result.stderr), (0, b""), result.stdout + result.stderr
        )

    def assertFailed(self, result, status, text):
        """Exit status, one error line naming the problem, nothing spooled."""
        self.assertEqual(result.returncode, status, result.stderr)
        line = result.stderr.decode()
        self.assertTrue(line.startswith("relayd-sendmail: "), line)
        self.assertEqual(line.count("\n"), 1, line)
        self.assertIn(text, line)
        self.assertEqual(self.spooled(), [])


def recipients(record):
    return [r.address for r in record.recipients]


class RecipientsTests(SendmailTestCase):
    @defer.inlineCallbacks
    def test_argumentsAndIgnoreDots(self):
        """
        Recipients as arguments (one of them unqualified, one in a
        comma-separated list with a name); with -i a lone dot line is
        message text, dot-stuffed on the wire and un-stuffed by relayd; bare
        LF and bare CR become CRLF.  A message with From, Date and Message-ID
        is sent unchanged.
        """
        message = (
            b"From: App <app@example.org>\n"
            b"To: alice@example.org\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
            b"Message-ID: <1@example.org>\n"
            b"Subject: report\n"
            b"\n"
            b"first\n"
            b".\n"
            b"..two dots\n"
            b"bare\rcr\r\n"
            b".leading dot"
        )
        result = yield self.send(
            ["-i", "alice@example.org", "Bob <bob@example.org>, carol@example.org", "root"],
            message,
        )
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(
            recipients(record),
            ["alice@example.org", "bob@example.org", "carol@example.org", f"root@{DOMAIN}"],
        )
        self.assertEqual(record.sender, f"{LOGIN}@{DOMAIN}")
        self.assertEqual(record.listener, "relay")
        self.assertEqual(record.body, "7BIT")
        expected = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        self.assertEqual(data, expected + b"\r\n")

    @defer.inlineCallbacks
    def test_dotLineEndsInput(self):
        """
        Without -i (or -oi) a line holding just a dot ends the message, as
        with classic sendmail; what follows is not sent.  A line with two
        dots does not end it.
        """
        message = b"Subject: x\nFrom: a@example.org\nDate: x\nMessage-ID: <m@x>\n\n1\n..\n.\n2\n"
        result = yield self.send(["a@example.org"], message)
        self.assertOk(result)
        _, data = self.only()
        self.assertEqual(data, message.split(b"\n.\n")[0].replace(b"\n", b"\r\n") + b"\r\n")

    @defer.inlineCallbacks
    def test_oiIgnoresDots(self):
        message = b"Subject: x\nFrom: a@example.org\nDate: x\nMessage-ID: <m@x>\n\n1\n.\n2\n"
        result = yield self.send(["-oi", "a@example.org"], message)
        self.assertOk(result)
        _, data = self.only()
        self.assertEqual(data, message.replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_extractRemovesBcc(self):
        """
        -t takes the recipients from To, Cc and Bcc (folded, with names and
        groups), adds those given as arguments, removes the Bcc field with
        its continuation lines, and leaves every other byte alone.
        """
        head = (
            b"From: App <app@example.org>\n"
            b"To: Alice <alice@example.org>,\n"
            b"\tbob@example.org\n"
            b'Cc: friends: carol@example.org, "Dan, D." <dan@example.org>;\n'
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\n"
            b"To: =?utf-8?q?J=C3=BCrgen?= <j@example.org>, J\xc3\xbcrgen <k@example.org>\n"
        )
        bcc = b"Bcc: eve@example.org,\n  frank@example.org\n"
        tail = b"Message-ID: <1@example.org>\nSubject: hello\n\nTo: not@example.org\nbody\n"
        result = yield self.send(["-t", "-i", "grace@example.org"], head + bcc + tail)
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(
            recipients(record),
            [
                "grace@example.org",
                "alice@example.org",
                "bob@example.org",
                "carol@example.org",
                "dan@example.org",
                "j@example.org",
                "k@example.org",
                "eve@example.org",
                "frank@example.org",
            ],
        )
        self.assertEqual(data, (head + tail).replace(b"\n", b"\r\n"))
        self.assertNotIn(b"eve", data)

    @defer.inlineCallbacks
    def test_bccRemovedWithoutExtract(self):
        """Bcc never reaches the recipients, -t or not; its addresses are
        not recipients without -t."""
        message = b"From: a@example.org\nDate: x\nMessage-ID: <m@x>\nBcc: eve@example.org\n\nhi\n"
        result = yield self.send(["alice@example.org"], message)
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(recipients(record), ["alice@example.org"])
        self.assertEqual(data, b"From: a@example.org\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nhi\r\n")

    @defer.inlineCallbacks
    def test_extractWithoutRecipients(self):
        """-t and no recipient anywhere: EX_DATAERR, nothing sent."""
        result = yield self.send(["-t"], b"To: undisclosed-recipients:;\nSubject: x\n\nhi\n")
        self.assertFailed(result, 65, "no recipients")


class SenderAndHeadersTests(SendmailTestCase):
    @defer.inlineCallbacks
    def test_defaultSenderAddsHeaders(self):
        """
        No -f: the sender is the invoking user at the configured domain.
        From, Date and Message-ID are added at the end of the header
        section; when that ends on a line that is no header field (no empty
        line), an empty line goes before it.
        """
        result = yield self.send(["root"], b"Status: disk full\nsee log\n")
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(record.sender, f"{LOGIN}@{DOMAIN}")
        self.assertEqual(recipients(record), [f"root@{DOMAIN}"])
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"Status: disk full\r\nFrom: "), data)
        self.assertEqual(body, b"see log\r\n")
        self.assertIn(f"From: {LOGIN}@{DOMAIN}\r\n".encode(), data)
        date = DATE.search(data)
        assert date is not None, data
        self.assertIsNotNone(email.utils.parsedate_to_datetime(date.group(1).decode()))
        self.assertIsNotNone(MESSAGE_ID.search(data), data)

    @defer.inlineCallbacks
    def test_noHeaderSection(self):
        """Text whose first line is no header field gets an empty line
        after the added fields, so it stays the body."""
        result = yield self.send(["root"], b"all is well\n")
        self.assertOk(result)
        _, data = self.only()
        self.assertTrue(data.endswith(b">\r\n\r\nall is well\r\n"), data)
        self.assertEqual(
            [line.split(b":")[0] for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")],
            [b"From", b"Date", b"Message-ID"],
        )

    @defer.inlineCallbacks
    def test_senderAndFullName(self):
        """-f sets the envelope sender and the added From; -F its name."""
        result = yield self.send(
            ["-f", "cron@example.org", "-F", "Cron Daemon", "root"], b"Subject: x\n\nhi\n"
        )
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(record.sender, "cron@example.org")
        self.assertTrue(data.startswith(b"Subject: x\r\nFrom: Cron Daemon <cron@example.org>\r\n"))
        self.assertTrue(data.endswith(b">\r\n\r\nhi\r\n"), data)

    @defer.inlineCallbacks
    def test_attachedSenderNonAsciiName(self):
        """-fADDR and -FNAME attached; a bare login is qualified; a
        non-ASCII name is RFC 2047 encoded; a newline in it cannot start a
        header field of its own."""
        result = yield self.send(["-fbackup", "-FJürgen\nBcc: x@example.org", "root"], b"\nhi\n")
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(record.sender, f"backup@{DOMAIN}")
        self.assertEqual(recipients(record), [f"root@{DOMAIN}"])
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        [author] = parsed["From"].addresses
        self.assertEqual(author.display_name, "Jürgen Bcc: x@example.org")
        self.assertEqual(author.addr_spec, f"backup@{DOMAIN}")
        self.assertIn(b"From: =?utf-8?", data)
        self.assertNotIn(b"\r\nBcc", data)

    @defer.inlineCallbacks
    def test_existingFromKept(self):
        """With a From field, -F changes nothing and From is not added."""
        message = b"From: Me <me@example.org>\nDate: x\nMessage-ID: <m@x>\n\nhi\n"
        result = yield self.send(
            ["-F", "Other", "-f", "bounces@example.org", "a@b.example"], message
        )
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(record.sender, "bounces@example.org")
        self.assertEqual(data, message.replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_nullSender(self):
        """-f '<>' (and -f '') is the null reverse-path of bounces."""
        for null in ("<>", ""):
            result = yield self.send(["-f", null, "a@example.org"], b"Subject: x\n\nhi\n")
            self.assertOk(result)
        records = [record for record, _ in self.spooled()]
        self.assertEqual([r.sender for r in records], ["", ""])

    @defer.inlineCallbacks
    def test_eightBit(self):
        """8-bit text goes with BODY=8BITMIME, unchanged."""
        message = "Subject: café\nFrom: a@example.org\nDate: x\nMessage-ID: <m@x>\n\nnaïve\n"
        result = yield self.send(["-B8BITMIME", "a@example.org"], message.encode())
        self.assertOk(result)
        record, data = self.only()
        self.assertEqual(record.body, "8BITMIME")
        self.assertEqual(data, message.replace("\n", "\r\n").encode())

    @defer.inlineCallbacks
    def test_leadingMailboxFromLine(self):
        """A Unix mailbox "From " line before the header is dropped."""
        message = b"From app Mon Jan  1 00:00:00 2024\nFrom: a@example.org\nDate: x\n"
        message += b"Message-ID: <m@x>\n\nhi\n"
        result = yield self.send(["a@example.org"], message)
        self.assertOk(result)
        _, data = self.only()
        self.assertEqual(data, message.split(b"\n", 1)[1].replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_verbose(self):
        """-v prints relayd's final reply (with the queue id)."""
        result = yield self.send(["-v", "a@example.org"], b"hi\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        record, _ = self.only()
        self.assertEqual(
            result.stderr.decode(),
            f"relayd-sendmail: 250 2.0.0 Ok: queued as {record.queueId}\n",
        )


class CallersTests(SendmailTestCase):
    """The command lines real programs use, no-op options and all."""

    callers = [
        # Debian cron
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        # Vixie cron (BSD): the recipient is in the To field
        ["-FCronDaemon", "-odi", "-oem", "-oi", "-t"],
        # cronie
        ["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"],
        # PHP mail() default sendmail_path, and with additional_params -f
        ["-t", "-i"],
        ["-t", "-i", "-fwww-data@example.org"],
        # mutt
        ["-oem", "-oi", "-N", "never", "-R", "hdrs", "-V", "envid", "--", "root"],
        # mailx / s-nail / git send-email
        ["-i", "-v", "-m", "--", "root"],
        ["-bm", "-odb", "-oee", "-oep", "-odq", "-U", "-n", "-L", "tag", "-h", "3", "root"],
        # options after the recipients (GNU getopt order)
        ["root", "-oi", "-Nsuccess,failure"],
    ]

    @defer.inlineCallbacks
    def test_callers(self):
        for argv in self.callers:
            result = yield self.send(argv, b"To: root\nSubject: cron\n\nout\n")
            self.assertEqual(result.returncode, 0, f"{argv}: {result.stderr!r}")
            if "-v" not in argv:
                self.assertEqual(result.stderr, b"")
        records = [record for record, _ in self.spooled()]
        self.assertEqual(len(records), len(self.callers))
        self.assertEqual(
            sorted(r.sender for r in records),
            sorted(
                [f"{LOGIN}@{DOMAIN}"] * 7 + [f"root@{DOMAIN}", "www-data@example.org"],
            ),
        )
        for record in records:
            self.assertEqual(recipients(record), [f"root@{DOMAIN}"])


class UsageTests(SendmailTestCase):
    """EX_USAGE (64) and EX_DATAERR (65): nothing is sent."""

    @defer.inlineCallbacks
    def test_usage(self):
        for argv, text in [
            (["-X", "root"], "option -X not recognized"),
            (["-bs", "root"], "mode -bs not supported"),
            (["-bi"], "mode -bi not supported"),
            (["-oQ/var/spool", "root"], "option -oQ/var/spool not supported"),
            (["-B", "BINARYMIME", "root"], "-B takes 7BIT or 8BITMIME"),
            (["--server", "::", "root"], "--server: expected HOST:PORT"),
            (["-f"], "option -f requires argument"),
            ([], "no recipients given"),
            (["-i", "-f", "a@example.org"], "no recipients given"),
        ]:
            result = yield self.send(argv, b"Subject: x\n\nhi\n")
            self.assertFailed(result, 64, text)

    @defer.inlineCallbacks
    def test_help(self):
        result = yield self.send(["--help"])
        self.assertEqual(result.returncode, 0)
        self.assertTrue(result.stdout.startswith(b"usage: relayd-sendmail "))

    @defer.inlineCallbacks
    def test_badMessageOrAddress(self):
        good = b"Subject: x\n\nhi\n"
        for argv, stdin, text in [
            (["alice@@example.org"], good, "bad recipient address in 'alice@@example.org'"),
            (["x <a@example.org> y"], good, "bad recipient address in"),
            (["al ice@example.org"], good, "bad recipient address"),
            (["josé@example.org"], good, "bad recipient address"),
            (["-t"], b"To: bad@-example.org\n\nhi\n", "bad recipient address"),
            (["-f", "a b@example.org", "root"], good, "bad sender address"),
            (["root"], b"Subject: x\n\nnul \0 byte\n", "NUL byte"),
            (["root"], b"Subject: x\n\n" + b"x" * 999 + b"\n", "line 3 is 999 octets"),
        ]:
            result = yield self.send(argv, stdin)
            self.assertFailed(result, 65, text)

    @defer.inlineCallbacks
    def test_longestLine(self):
        """998 octets is the limit, and allowed."""
        result = yield self.send(["root"], b"Subject: x\n\n" + b"x" * 998 + b"\n")
        self.assertOk(result)


class RelayDeniedTests(SendmailTestCase):
    """A 5xx from relayd is permanent: EX_UNAVAILABLE (69)."""

    chain = ["authenticated"]  # 127.0.0.1 is not trusted: relay access denied

    @defer.inlineCallbacks
    def test_relayDenied(self):
        result = yield self.send(["a@example.org", "b@example.org"], b"Subject: x\n\nhi\n")
        self.assertFailed(
            result,
            69,
            "refused recipient <a@example.org>: 554 5.7.1 Relay access denied (and 1 more); "
            "nothing sent",
        )


class MessageTooBigTests(SendmailTestCase):
    sections = {"limits": {"message_size": 100}}

    @defer.inlineCallbacks
    def test_sizeRefusedAtMail(self):
        """SIZE is declared at MAIL; relayd's 552 there is permanent."""
        result = yield self.send(["a@example.org"], b"Subject: x\n\n" + b"y" * 200 + b"\n")
        self.assertFailed(result, 69, "refused sender")
        self.assertIn("552 5.3.4", result.stderr.decode())


class TooManyRecipientsTests(SendmailTestCase):
    """A 4xx for one recipient: EX_TEMPFAIL (75) and nothing is sent to
    the others either, so that a retry cannot duplicate."""

    sections = {"limits": {"recipients": 2}}

    @defer.inlineCallbacks
    def test_tooManyRecipients(self):
        result = yield self.send(
            ["a@example.org", "b@example.org", "c@example.org"], b"Subject: x\n\nhi\n"
        )
        self.assertFailed(
            result, 75, "refused recipient <c@example.org>: 452 4.5.3 Error: too many recipients"
        )
        # The same message to two recipients goes through.
        result = yield self.send(["a@example.org", "b@example.org"], b"Subject: x\n\nhi\n")
        self.assertOk(result)


class SpoolFullTests(SendmailTestCase):
    """relayd's spool below its free-space reserve: 452 at MAIL, 75."""

    sections = {"spool": {"reserve_bytes": 2**62}}

    @defer.inlineCallbacks
    def test_spoolFull(self):
        result = yield self.send(["a@example.org"], b"Subject: x\n\nhi\n")
        self.assertFailed(result, 75, "452 4.3.1 Error: insufficient system storage")


class ConnectionTests(SendmailTestCase):
    """No relayd, or a stuck one: EX_TEMPFAIL (75), so cron can retry."""

    @defer.inlineCallbacks
    def test_nothingListening(self):
        port = freePort()
        result = yield self.send(["a@example.org"], b"hi\n", config=self.writeConfig(port))
        self.assertFailed(result, 75, f"cannot connect to 127.0.0.1:{port}: Connection refused")

    @defer.inlineCallbacks
    def test_stoppedRelayd(self):
        port = self.relayd.port("relay")
        yield self.relayd.stop()
        result = yield self.send(["a@example.org"], b"hi\n")
        self.assertFailed(result, 75, f"cannot connect to 127.0.0.1:{port}")

    @defer.inlineCallbacks
    def test_serverOption(self):
        """--server overrides the config file's host and port."""
        port = freePort()
        result = yield self.send(["--server", f"127.0.0.1:{port}", "a@example.org"], b"hi\n")
        self.assertFailed(result, 75, f"cannot connect to 127.0.0.1:{port}")
        right = f"127.0.0.1:{self.relayd.port('relay')}"
        result = yield self.send(
            ["--server", right, "a@example.org"], b"hi\n", config=self.writeConfig(port)
        )
        self.assertOk(result)

    @defer.inlineCallbacks
    def test_silentServer(self):
        """A server that takes the connection and never greets: the read
        timeout ends the wait."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(5)  # the kernel completes the handshake; no accept
            port = listener.getsockname()[1]
            self.writeConfig(port, "timeout = 1\n")
            result = yield self.send(["a@example.org"], b"hi\n")
        self.assertFailed(result, 75, f"cannot connect to 127.0.0.1:{port}: timed out")

    @defer.inlineCallbacks
    def test_deadline(self):
        """A server that trickles its greeting, each byte well within the
        read timeout, is cut off by the overall deadline."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(5)
            port = listener.getsockname()[1]
            self.writeConfig(port, "deadline = 2\n")

            def trickle():
                connection, _ = listener.accept()
                with connection:
                    try:
                        for _ in range(120):  # at most a minute
                            connection.sendall(b"2")
                            time.sleep(0.5)
                    except OSError:
                        return  # the client gave up and closed

            trickling = deferToThread(trickle)
            started = time.monotonic()
            result = yield self.send(["a@example.org"], b"hi\n")
            elapsed = time.monotonic() - started
            yield trickling
        self.assertFailed(result, 75, f"127.0.0.1:{port}: gave up after 2 seconds")
        self.assertLess(elapsed, 50)


class ConfigTests(SendmailTestCase):
    """EX_CONFIG (78): one line naming the file, the key and the problem."""

    @defer.inlineCallbacks
    def test_badConfig(self):
        directory = self.directory
        path = os.path.join(directory, "bad.toml")
        for text, problem in [
            ("[server]\nport = 'x'\n", "server.port: must be a int, not str"),
            ("[server]\nport = 0\n", "server.port: must be between 1 and 65535"),
            ("[server]\nprot = 25\n", "server.prot: unknown key"),
            ("[smtp]\nhost = 'x'\n", "smtp: unknown section"),
            ("[server]\ntls = 'yes'\n", "server.tls: must be one of none, starttls, implicit"),
            ("[server]\ntimeout = 0\n", "server.timeout: must be greater than 0"),
            ("[server]\ntimeout = true\n", "server.timeout: must be a number, not bool"),
            ("domain = 'not a domain'\n", "domain: not a domain"),
            ("[server\n", "bad.toml: Expected ']'"),
            ("[auth]\nuser = 'x'\n", "auth.password_file: auth needs both"),
            (
                "[auth]\nuser = 'x'\npassword_file = 'p'\n",
                'auth.user: AUTH needs server.tls = "starttls" or "implicit"',
            ),
            (
                "[server]\ntls = 'starttls'\n[auth]\nuser = 'x'\npassword_file = 'nope'\n",
                f"auth.password_file: {directory}/nope: No such file or directory",
            ),
            (
                "[server]\ntls = 'starttls'\nca_file = 'nope.pem'\n",
                f"server.ca_file: {directory}/nope.pem: No such file or directory",
            ),
        ]:
            with open(path, "w") as f:
                f.write(text)
            result = yield self.send(["a@example.org"], b"hi\n", config=path)
            self.assertFailed(result, 78, f"relayd-sendmail: config error: {path}: ")
            self.assertIn(problem, result.stderr.decode())
        missing = os.path.join(directory, "missing.toml")
        result = yield self.send(["a@example.org"], b"hi\n", config=missing)
        self.assertFailed(result, 78, f"config error: {missing}: no such file")
        # --config wins over the environment variable.
        result = yield self.send(["--config", self.config, "a@example.org"], b"hi\n", config=path)
        self.assertOk(result)


class SubmissionTests(SendmailTestCase):
    """STARTTLS (verified against the test CA) and AUTH on relayd's
    submission port."""

    listener = "submission"
    tls = "starttls"
    auth = (DEMO_USER, DEMO_PASSWORD)

    @defer.inlineCallbacks
    def test_starttlsAuth(self):
        result = yield self.send(["-f", "demo@example.org", "a@example.org"], b"Subject: x\n\nhi\n")
        self.assertOk(result)
        record, _data = self.only()
        self.assertEqual(record.user, DEMO_USER)
        self.assertEqual(record.listener, "submission")
        received = readData(os.path.join(self.setup.spoolPath, "incoming", record.queueId))
        self.assertIn(b"with ESMTPSA id", received)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        self.auth = (DEMO_USER, "wrong")
        config = self.writeConfig(self.relayd.port("submission"))
        result = yield self.send(["a@example.org"], b"hi\n", config=config)
        self.assertFailed(result, 69, f"refused AUTH as {DEMO_USER}: 535 5.7.8")

    @defer.inlineCallbacks
    def test_untrustedCertificate(self):
        """Without the test CA the certificate does not verify: 75, and the
        password is never sent."""
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(re.sub(r"ca_file = .*\n", "", text))
        result = yield self.send(["a@example.org"], b"hi\n")
        self.assertFailed(result, 75, "TLS certificate not trusted")


class ImplicitTLSTests(SendmailTestCase):
    listener = "submissions"
    tls = "implicit"
    auth = (DEMO_USER, DEMO_PASSWORD)

    @defer.inlineCallbacks
    def test_implicitTLS(self):
        result = yield self.send(["a@example.org"], b"Subject: x\n\nhi\n")
        self.assertOk(result)
        record, _ = self.only()
        self.assertEqual(record.listener, "submissions")
        self.assertEqual(record.user, DEMO_USER)


class ScriptedServerTests(unittest.TestCase):
    """
    Replies relayd does not give on cue, from relayd.testing's scripted
    SinkServer on a real socket: the command sequence is checked too.
    """

    tls = "starttls"

    def setUp(self):
        from twisted.internet import reactor

        self.sink = SinkServer()
        port = self.sink.start(reactor)
        self.addCleanup(self.sink.stop)
        self.directory = tempfile.mkdtemp(prefix="relayd-sendmail-test-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.config = os.path.join(self.directory, "sendmail.toml")
        with open(self.config, "w") as f:
            f.write(f'domain = "{DOMAIN}"\n[server]\nhost = "127.0.0.1"\nport = {port}\n')

    def send(self, args, stdin=b"Subject: x\n\nhi\n"):
        return deferToThread(run, args, stdin, self.config)

    def assertFailed(self, result, status, text):
        self.assertEqual(result.returncode, status, result.stderr)
        self.assertIn(text, result.stderr.decode())
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertEqual(self.sink.messages, [])

    @defer.inlineCallbacks
    def test_oneRecipientRefusedNothingSent(self):
        """All or nothing: one 550 recipient and the transaction is reset,
        DATA never sent, QUIT said."""
        self.sink.rcptReply = {"b@example.org": (550, "5.1.1 no such user")}
        result = yield self.send(["a@example.org", "b@example.org", "c@example.org"])
        self.assertFailed(
            result, 69, "refused recipient <b@example.org>: 550 5.1.1 no such user; nothing sent"
        )
        self.assertEqual(
            self.sink.verbs(), ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "RSET", "QUIT"]
        )

    @defer.inlineCallbacks
    def test_mixedRefusalsPermanentWins(self):
        """A 4xx and a 5xx recipient: retrying cannot help, so 69."""
        self.sink.rcptReply = {
            "a@example.org": (451, "4.3.0 later"),
            "b@example.org": (550, "5.1.1 no such user"),
        }
        result = yield self.send(["a@example.org", "b@example.org"])
        self.assertFailed(result, 69, "<a@example.org>: 451 4.3.0 later (and 1 more)")

    @defer.inlineCallbacks
    def test_greeting(self):
        for greeting, status in [("554 5.7.1 go away", 69), ("421 4.3.2 busy", 75)]:
            self.sink.greeting = greeting
            result = yield self.send(["a@example.org"])
            self.assertFailed(result, status, f"refused the connection: {greeting}")

    @defer.inlineCallbacks
    def test_maildropOnlyWhenNothingWasSent(self):
        """
        With a maildrop: a 421 greeting (relayd shutting down) keeps the
        message there (0); a refusal once the transaction began (a 4xx to
        the message) does not, since relayd may act on what it was sent:
        75, the maildrop empty.
        """
        maildrop = os.path.join(self.directory, "maildrop")
        os.mkdir(maildrop)
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(f'maildrop = "{maildrop}"\n' + text)
        self.sink.greeting = "421 4.3.2 busy"
        result = yield self.send(["a@example.org"])
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(len(maildropFiles(maildrop)), 1)
        self.sink.greeting = None
        self.sink.dataReply = (451, "4.3.0 spool trouble")
        result = yield self.send(["b@example.org"])
        self.assertFailed(result, 75, "refused the message: 451 4.3.0 spool trouble")
        self.assertEqual(len(maildropFiles(maildrop)), 1)

    @defer.inlineCallbacks
    def test_dataReplies(self):
        self.sink.dataReply = (451, "4.3.0 spool trouble")
        result = yield self.send(["a@example.org"])
        self.assertFailed(result, 75, "refused the message: 451 4.3.0 spool trouble")
        self.sink.dataReply = None
        self.sink.dataCommandReply = (554, "5.5.1 no")
        result = yield self.send(["a@example.org"])
        self.assertFailed(result, 69, "refused the message: 554 5.5.1 no")

    @defer.inlineCallbacks
    def test_mailParameters(self):
        """SIZE as advertised, BODY=8BITMIME only for 8-bit text; the
        lone-dot line arrives intact (smtplib dot-stuffs it)."""
        message = "Subject: x\nFrom: a@b.example\nDate: x\nMessage-ID: <m@x>\n\nnaïve\n.\n"
        result = yield self.send(["-i", "a@example.org"], message.encode())
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        [received] = self.sink.messages
        wire = message.replace("\n", "\r\n").encode()
        self.assertEqual(received.data, wire)
        self.assertEqual(received.mailParameters, f"SIZE={len(wire)} BODY=8BITMIME")
        self.assertEqual(received.sender, f"{LOGIN}@{DOMAIN}")
        result = yield self.send(["a@example.org"], b"hi\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(self.sink.messages[1].mailParameters.startswith("SIZE="))
        self.assertNotIn("BODY", self.sink.messages[1].mailParameters)

    @defer.inlineCallbacks
    def test_starttlsNotOffered(self):
        """tls = "starttls" and no STARTTLS offered: 75, nothing sent in
        plain text."""
        with open(self.config, "a") as f:
            f.write('tls = "starttls"\n')
        result = yield self.send(["a@example.org"])
        self.assertFailed(result, 75, "does not offer STARTTLS")
        self.assertEqual(self.sink.verbs(), ["EHLO", "QUIT"])


class MessageTests(unittest.SynchronousTestCase):
    """The message rules, in process: what is added where."""

    config = sendmail.SendmailConfig(domain=DOMAIN)

    def prepare(self, data, argv=("root",)):
        arguments = sendmail.parseArguments(list(argv))
        return sendmail.prepareMessage(data, arguments, "app@example.org", self.config, 0.0)

    def fields(self, message):
        head = message.split(b"\r\n\r\n", 1)[0]
        return [line.split(b":")[0] for line in head.split(b"\r\n")]

    def test_empty(self):
        """No input at all: the three fields and the empty line."""
        message, recipients = self.prepare(b"")
        self.assertEqual(recipients, [f"root@{DOMAIN}"])
        self.assertEqual(self.fields(message), [b"From", b"Date", b"Message-ID"])
        self.assertTrue(message.endswith(b">\r\n\r\n"), message)
        self.assertIn(b"From: app@example.org\r\n", message)
        self.assertIn(b"Date: Thu, 01 Jan 1970 ", message)

    def test_headerOnly(self):
        message, _ = self.prepare(b"Subject: x\r\n")
        self.assertEqual(self.fields(message), [b"Subject", b"From", b"Date", b"Message-ID"])
        self.assertTrue(message.endswith(b">\r\n\r\n"), message)

    def test_foldedBccLast(self):
        """A folded Bcc at the end of the header goes with all its lines."""
        data = b"Subject: x\r\nDate: d\r\nMessage-ID: <m@x>\r\nFrom: f@x\r\n"
        message, recipients = self.prepare(
            data + b"BCC: a@example.org,\r\n b@example.org\r\n\r\nbody\r\n", ["-t"]
        )
        self.assertEqual(message, data + b"\r\nbody\r\n")
        self.assertEqual(recipients, ["a@example.org", "b@example.org"])

    def test_duplicates(self):
        _, recipients = self.prepare(
            b"To: root, root@example.test\r\nCc: ROOT@example.test\r\n\r\n",
            ["-t", "root"],
        )
        self.assertEqual(recipients, [f"root@{DOMAIN}", f"ROOT@{DOMAIN}"])

    def test_nullSenderFrom(self):
        """The null sender's added From is the invoking user's address."""
        arguments = sendmail.parseArguments(["-f", "<>", "root"])
        sender = sendmail.envelopeSender(arguments, self.config, LOGIN)
        self.assertEqual(sender, "")
        message, _ = sendmail.prepareMessage(b"\r\nhi\r\n", arguments, sender, self.config)
        self.assertTrue(message.startswith(f"From: {LOGIN}@{DOMAIN}\r\n".encode()), message)

    def test_noLogin(self):
        arguments = sendmail.parseArguments(["root"])
        with self.assertRaises(sendmail.SendmailError) as raised:
            sendmail.envelopeSender(arguments, self.config, None)
        self.assertEqual(raised.exception.status, sendmail.EX_CONFIG)
        self.assertIn("give the sender with -f", str(raised.exception))

    def test_serverOption(self):
        for value, expected in [
            ("relay.example.org", ("relay.example.org", None)),
            ("relay.example.org:587", ("relay.example.org", 587)),
            ("[::1]:2525", ("::1", 2525)),
            ("[::1]", ("::1", None)),
        ]:
            self.assertEqual(sendmail.parseArguments(["--server", value]).server, expected)
        for bad in ("::1", "host:0", "host:99999", ""):
            with self.assertRaises(sendmail.SendmailError) as raised:
                sendmail.parseArguments(["--server", bad])
            self.assertEqual(raised.exception.status, sendmail.EX_USAGE)

    def test_defaultConfig(self):
        """No file at the default path: every default applies."""
        config = sendmail.loadConfig(None, {})
        if os.path.exists(sendmail.DEFAULT_CONFIG):
            self.assertEqual(config.path, sendmail.DEFAULT_CONFIG)
        else:
            self.assertEqual(
                (config.path, config.host, config.port, config.tls, config.user),
                (None, "127.0.0.1", 25, "none", None),
            )
            self.assertEqual(config.domain, socket.gethostname())


# --- the maildrop, -q, mailq and -bp ------------------------------------------------


def maildropFiles(directory):
    """The maildrop's waiting files (not broken/ nor temp files)."""
    from relayd.ops.maildrop import pending

    return pending(directory) if os.path.isdir(directory) else []


class MaildropTestCase(SendmailTestCase):
    """relayd with its maildrop pickup looking every 0.2 s; RELAYD_CONFIG set."""

    sections = {"maildrop": {"interval": 0.2}}

    def setUp(self):
        d = super().setUp()

        def more(_):
            self.env = {"RELAYD_CONFIG": self.setup.configPath}
            self.maildrop = os.path.join(self.setup.spoolPath, "maildrop")

        return d.addCallback(more)

    def restart(self):
        """relayd again, same config (its relay port changes: port 0)."""
        d = InProcessRelayd.start(self.setup)

        def started(relayd):
            self.relayd = relayd
            self.addCleanup(relayd.stop)
            self.config = self.writeConfig(relayd.port("relay"))

        return d.addCallback(started)

    @defer.inlineCallbacks
    def waitFor(self, condition, what, timeout=30.0):
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            yield deferLater(reactor, 0.05, lambda: None)


class MaildropTests(MaildropTestCase):
    """
    relayd down: relayd-sendmail leaves the message in relayd's maildrop
    (exit 0); relayd picks it up when it runs; -q flushes it.
    """

    @defer.inlineCallbacks
    def test_downDroppedThenPickedUp(self):
        """
        relayd stopped: exit 0 (-v says where the message went), the file
        is in the maildrop, nothing in the spool; relayd started again
        picks it up through its relay listener and removes the file.
        """
        self.assertEqual(os.stat(self.maildrop).st_mode & 0o7777, 0o3730)
        yield self.relayd.stop()
        result = yield self.send(
            ["-v", "-f", "cron@example.test", "ops@example.org"],
            b"Subject: nightly\n\nall good\n",
            env=self.env,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"cannot connect to 127.0.0.1", result.stderr)
        self.assertIn(b"queued in the maildrop as " + self.maildrop.encode(), result.stderr)
        [name] = maildropFiles(self.maildrop)
        info = os.stat(os.path.join(self.maildrop, name))
        self.assertEqual((info.st_uid, info.st_mode & 0o777), (os.getuid(), 0o640))
        self.assertEqual(self.spooled(), [])
        result = yield self.send(["-bp"], env=self.env)
        self.assertEqual(
            result.stdout.decode(),
            "Mail queue is empty\n"
            f"-- 1 message in the maildrop {self.maildrop}, not yet picked up by relayd\n",
        )
        yield self.restart()
        yield self.waitFor(lambda: not maildropFiles(self.maildrop), "the pickup")
        record, data = self.only()
        self.assertEqual(record.sender, "cron@example.test")
        self.assertEqual(recipients(record), ["ops@example.org"])
        self.assertEqual(record.client, "127.0.0.1")  # the local submission path
        self.assertIn(b"Subject: nightly\r\n", data)
        self.assertTrue(data.endswith(b"\r\n\r\nall good\r\n"), data)
        # Who dropped it, and when: a trace field as Postfix's pickup writes.
        self.assertRegex(
            data,
            rb"\AReceived: by relayd\.test \(relayd maildrop, from userid "
            + str(os.getuid()).encode()
            + rb" \("
            + LOGIN.encode()
            + rb"\)\)\r\n\tid "
            + name.encode()
            + rb"; [^\r\n]+\r\n",
        )

    @defer.inlineCallbacks
    def test_brokenMovedAsideRestDelivered(self):
        """
        A file that is no maildrop file, a truncated one and one claiming
        another uid go to broken/; the good ones are submitted; relayd
        keeps running.
        """
        yield self.relayd.stop()
        for i in range(2):
            result = yield self.send([f"ops{i}@example.org"], b"Subject: x\n\nhi\n", env=self.env)
            self.assertEqual(result.returncode, 0, result.stderr)
        good = maildropFiles(self.maildrop)
        with open(os.path.join(self.maildrop, good[0]), "rb") as f:
            content = f.read()
        bad = {
            "0-garbage": b"not a maildrop file\n",
            "1-truncated": content[:-3],
            "2-forged": content.replace(
                f'"uid": {os.getuid()}'.encode(), f'"uid": {os.getuid() + 1}'.encode()
            ),
        }
        for name, data in bad.items():
            with open(os.path.join(self.maildrop, name), "wb") as f:
                f.write(data)
        os.symlink("/etc/passwd", os.path.join(self.maildrop, "3-link"))
        # A writer that died before its rename: its temp file, a day old
        # (removed), and one being written now (left alone).
        for name, age in ((".old.tmp", 86400 + 60), (".new.tmp", 0)):
            path = os.path.join(self.maildrop, name)
            with open(path, "wb") as f:
                f.write(content[:10])
            os.utime(path, (time.time() - age, time.time() - age))
        yield self.restart()
        yield self.waitFor(lambda: not maildropFiles(self.maildrop), "the pickup")
        self.assertEqual(
            sorted(recipients(record)[0] for record, _ in self.spooled()),
            ["ops0@example.org", "ops1@example.org"],
        )
        broken = os.path.join(self.maildrop, "broken")
        self.assertEqual(sorted(os.listdir(broken)), sorted([*bad, "3-link"]))
        self.assertEqual(
            sorted(n for n in os.listdir(self.maildrop) if n.startswith(".")), [".new.tmp"]
        )
        self.assertTrue(self.relayd.service.running)

    @defer.inlineCallbacks
    def test_flushWithQ(self):
        """
        -q submits the maildrop to relayd at once; with relayd down it says
        relayd is not running and leaves the files (75).  (sendmail.toml
        names a maildrop of its own here, which relayd's pickup does not
        look at, so that only -q can have submitted the message.)
        """
        own = os.path.join(self.directory, "own-maildrop")
        os.mkdir(own)
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(f'maildrop = "{own}"\n' + text)
        yield self.relayd.stop()
        result = yield self.send(["ops@example.org"], b"Subject: x\n\nhi\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        result = yield self.send(["-q"])
        self.assertEqual(result.returncode, 75, result.stderr)
        self.assertIn(b"relayd is not running (cannot connect to", result.stderr)
        self.assertIn(b"1 message left in the maildrop", result.stderr)
        self.assertEqual(len(maildropFiles(own)), 1)
        yield self.restart()
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(f'maildrop = "{own}"\n' + text)
        result = yield self.send(["-q", "-v"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"maildrop flushed: 1 submitted", result.stderr)
        self.assertEqual(maildropFiles(own), [])
        self.assertEqual(recipients(self.only()[0]), ["ops@example.org"])
        result = yield self.send(["-q"])
        self.assertEqual((result.returncode, result.stderr), (0, b""))

    @defer.inlineCallbacks
    def test_noMaildrop(self):
        """
        relayd down and no maildrop to write to (relayd's config names
        none that exists): 75 as before, saying both.
        """
        yield self.relayd.stop()
        missing = os.path.join(self.directory, "nothing.toml")
        result = yield self.send(["a@example.org"], b"hi\n", env={"RELAYD_CONFIG": missing})
        self.assertFailed(
            result,
            75,
            f"no maildrop either: relayd's config file not found: tried {missing} (RELAYD_CONFIG)",
        )
        with open(os.path.join(self.directory, "other.toml"), "w") as f:
            f.write('[spool]\ndirectory = "nowhere"\n')
        result = yield self.send(["a@example.org"], b"hi\n", env={"RELAYD_CONFIG": f.name})
        self.assertFailed(
            result, 75, f"cannot write to the maildrop {self.directory}/nowhere/maildrop"
        )

    @defer.inlineCallbacks
    def test_sendmailTomlMaildrop(self):
        """C{maildrop} in sendmail.toml names the folder without relayd's config."""
        yield self.relayd.stop()
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(f'maildrop = "{self.maildrop}"\n' + text)
        result = yield self.send(["a@example.org"], b"hi\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(maildropFiles(self.maildrop)), 1)


class MaildropDeferredTests(MaildropTestCase):
    """relayd answers the pickup with a 4xx: the file waits, not retried every round."""

    sections = {"maildrop": {"interval": 0.1}}

    @defer.inlineCallbacks
    def test_deferredWaits(self):
        from twisted.logger import globalLogPublisher

        from relayd.ops import pickup

        yield self.relayd.stop()
        result = yield self.send(["ops@example.org"], b"Subject: x\n\nhi\n", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        events = []

        def observe(event):
            if event.get("log_namespace") == "relayd.ops.maildrop":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        # The spool below its free-space reserve: 452 4.3.1 at MAIL.
        with open(self.setup.configPath) as f:
            text = f.read()
        with open(self.setup.configPath, "w") as f:
            f.write(text.replace("reserve_bytes = 0", f"reserve_bytes = {2**62}"))
        yield self.restart()
        yield self.waitFor(lambda: events, "the first attempt")
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        yield deferLater(reactor, 1.0, lambda: None)  # ten rounds
        deferred = [e for e in events if "deferred" in e["log_format"]]
        self.assertEqual(len(deferred), 1, events)
        self.assertIn("452 4.3.1", deferred[0]["reply"])
        self.assertEqual(len(maildropFiles(self.maildrop)), 1)
        self.assertEqual(self.spooled(), [])
        self.assertEqual(pickup.DEFERRED_WAIT, 300.0)


MAILQ_HEADING = "-Queue ID-           --Size-- ----Arrival Time---- -Sender/Recipient-------"


class MailqTests(SendmailTestCase):
    """
    -bp, and the program run as mailq, list relayd's queue like Postfix's
    mailq: through the control socket while relayd runs, from the spool
    when it does not.
    """

    def mailq(self, args, program=None):
        env = {"RELAYD_CONFIG": self.setup.configPath}
        if program is None:
            return self.send(args, env=env)
        link = os.path.join(self.directory, program)
        if not os.path.exists(link):
            os.symlink(SCRIPT, link)
        environ = dict(os.environ, **env)
        environ.pop(sendmail.CONFIG_ENV, None)
        return deferToThread(
            subprocess.run, [link, *args], capture_output=True, env=environ, timeout=120
        )

    @defer.inlineCallbacks
    def test_emptyQueue(self):
        for result in [(yield self.mailq(["-bp"])), (yield self.mailq([], "mailq"))]:
            self.assertEqual((result.returncode, result.stderr), (0, b""), result.stderr)
            self.assertEqual(result.stdout, b"Mail queue is empty\n")

    @defer.inlineCallbacks
    def test_listRunningAndStopped(self):
        result = yield self.send(
            ["-f", "app@example.test", "a@example.org", "b@example.org"],
            b"Subject: x\n\n" + b"y" * 50 + b"\n" * 40,
        )
        self.assertOk(result)
        [(record, _)] = self.spooled()
        outputs = []
        for args, program in ((["-bp"], None), ([], "mailq")):
            outputs.append((yield self.mailq(args, program)))
        yield self.relayd.stop()
        outputs.append((yield self.mailq(["-bp"])))
        outputs.append((yield self.mailq([], "mailq")))
        arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(record.arrival))
        for i, result in enumerate(outputs):
            self.assertEqual((result.returncode, result.stderr), (0, b""), result.stderr)
            lines = result.stdout.decode().splitlines()
            source = "from relayd" if i < 2 else "relayd is not running; read from"
            self.assertEqual(lines[0], MAILQ_HEADING)
            self.assertEqual(
                lines[1],
                f"{record.queueId:<20} {record.size:>8} {arrival:<20} app@example.test",
            )
            self.assertEqual(lines[2].strip(), "a@example.org")
            self.assertEqual(lines[3].strip(), "b@example.org")
            self.assertEqual(lines[4], "")
            self.assertTrue(
                lines[5].startswith(
                    f"-- {(record.size + 1023) // 1024} Kbytes in 1 Request. ({source}"
                ),
                lines[5],
            )

    @defer.inlineCallbacks
    def test_lastReplyShown(self):
        """A deferred recipient's last reply is shown above its address."""
        from relayd.queue.record import RecipientState

        result = yield self.send(["a@example.org", "b@example.org"], b"Subject: x\n\nhi\n")
        self.assertOk(result)
        [(record, _)] = self.spooled()
        from dataclasses import replace

        changed = replace(
            record,
            recipients=(
                replace(
                    record.recipients[0],
                    state=RecipientState.DEFERRED,
                    lastReply="451 4.7.1 try again later",
                ),
                replace(record.recipients[1], state=RecipientState.DELIVERED),
            ),
        )
        yield self.relayd.spool.update(record.queueId, "incoming", changed)
        for stop in (False, True):
            if stop:
                yield self.relayd.stop()
            result = yield self.mailq(["-bp"])
            lines = result.stdout.decode().splitlines()
            self.assertEqual(
                [line.strip() for line in lines[2:4]],
                ["(451 4.7.1 try again later)", "a@example.org"],
            )
            self.assertNotIn("b@example.org", result.stdout.decode())

    @defer.inlineCallbacks
    def test_noConfig(self):
        missing = os.path.join(self.directory, "missing.toml")
        result = yield self.send(["-bp"], env={"RELAYD_CONFIG": missing})
        self.assertEqual(result.returncode, 78, result.stderr)
        self.assertIn(
            f"tried {missing} (RELAYD_CONFIG); name one with --config FILE or RELAYD_CONFIG=FILE",
            result.stderr.decode(),
        )


class VersionTests(unittest.TestCase):
    def test_version(self):
        """--version: relayd's version, not a sendmail option error."""
        import importlib.metadata

        result = run(["--version"])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout.decode().strip(),
            f"relayd-sendmail (relayd) {importlib.metadata.version('relayd')}",
        )


def test_maildropThroughRealRelaydToSink(tmp_path, relaydProcesses):  # noqa: F811
    """
    End to end with a real twistd relayd and Postfix's smtp-sink as the
    next hop: relayd down, relayd-sendmail exits 0 and the message waits in
    the maildrop; relayd started picks it up and delivers it to the sink.
    """
    from relayd.testing import PostfixSink

    # smtp-sink runs as nobody: its folder must not be under pytest's 0700 tmp_path.
    sinkDirectory = tempfile.mkdtemp(prefix="relayd-sendmail-sink-")
    sink = PostfixSink(sinkDirectory)
    try:
        setup = TestSetup(
            str(tmp_path / "relayd"),
            sections={"delivery": {"enabled": True}, "maildrop": {"interval": 0.5}},
            modes=("relay",),
            portZero=False,
        )
        setup.routeAllTo(sink.port)
        config = tmp_path / "sendmail.toml"
        config.write_text(
            f'domain = "{DOMAIN}"\n[server]\nhost = "127.0.0.1"\nport = {setup.ports["relay"]}\n'
        )
        env = {"RELAYD_CONFIG": setup.configPath}
        # Installed and run once (it makes the maildrop), then down.
        first = RelaydProcess(setup, tmp_path / "relayd-1.log")
        relaydProcesses.append(first)
        first.waitListening(30.0)
        first.terminate()
        first.wait(30.0)  # stopped by SIGTERM (twistd exits by that signal)
        result = run(
            ["-f", "cron@example.test", "ops@example.org"],
            b"Subject: cron\n\nout\n",
            str(config),
            env,
        )
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
        maildrop = os.path.join(setup.spoolPath, "maildrop")
        assert len(maildropFiles(maildrop)) == 1
        second = RelaydProcess(setup, tmp_path / "relayd-2.log")
        relaydProcesses.append(second)
        second.waitListening(30.0)
        deadline = time.monotonic() + 30
        # smtp-sink writes its dump while the session runs: wait for it whole.
        while not any(m.rstrip().endswith(b"out") for m in sink.messages()) or maildropFiles(
            maildrop
        ):
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.1)
        [dump] = sink.messages()
        assert b"Subject: cron" in dump
        assert b"out" in dump
        second.waitLog("maildrop ", "submitted: 250")
    finally:
        sink.stop()
        shutil.rmtree(sinkDirectory, True)


def test_relaydConfigVariable(tmp_path):
    """relayd-sendmail -bp finds relayd through RELAYD_CONFIG."""
    setup = TestSetup(str(tmp_path / "relayd"), modes=("relay",))
    os.makedirs(os.path.join(setup.spoolPath, "incoming"))
    result = run(["-bp"], env={"RELAYD_CONFIG": setup.configPath})
    assert (result.returncode, result.stdout) == (0, b"Mail queue is empty\n"), result.stderr


def test_relaydPathsAsConfigLoads(tmp_path):
    """
    relayd-sendmail's light reading of relayd's config (no full check, no
    Twisted) finds the spool, the control socket and the maildrop where
    relayd itself puts them, by default and when set.
    """
    from relayd.config import load
    from relayd.configfile import relaydPaths

    setup = TestSetup(str(tmp_path / "default"), modes=("relay",))
    custom = TestSetup(
        str(tmp_path / "custom"),
        modes=("relay",),
        sections={"control": {"socket": "run/ctl.sock"}, "maildrop": {"directory": "drop"}},
    )
    for one in (setup, custom):
        config, paths = load(one.configPath), relaydPaths(one.configPath)
        assert (paths.spool, paths.socket, paths.maildrop) == (
            config.spoolDirectory,
            config.controlSocket,
            config.maildropDirectory,
        )
    assert paths.maildrop == str(tmp_path / "custom" / "drop")
