"""
CHUNKING with independent peers.

BDAT in, DATA out: a raw socket client sends a message to relayd in BDAT
chunks, relayd delivers it through a configured route to Postfix's
smtp-sink with DATA, dot-stuffed by relayd's client, and it arrives intact.
relayd does not send BDAT itself: converting to DATA is the only way out,
and this is its proof.

Few stock clients send BDAT: not smtplib, not swaks (20201014), not
Postfix's SMTP client (CHUNKING is a Postfix server feature only).  Perl's
Net::SMTP (libnet, shipped with Perl) has C{bdat} and C{bdatlast}, and is
used here as an independent BDAT client.
"""

import shutil
import subprocess
import tempfile

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.queue.record import readData
from relayd.testing import InProcessRelayd, TestSetup, WireClient
from tests.interop.postfix import relaydToSmtpSink, waitDump

# Lines that need stuffing as DATA: a lone dot would end the message at
# the sink, a leading dot would lose itself, if relayd did not stuff them.
BODY = (
    b"Subject: BDAT to smtp-sink\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"." + b"x" * 997 + b"\r\n"
    b"last line\r\n"
)


class BdatThroughRelaydToSmtpSinkTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_bdatRelayedAsDataByteExact(self):
        relayd, sink = yield relaydToSmtpSink(self, "relayd-interop-bdat-")

        # Cut inside the lone-dot line, between its dot and its CRLF, and
        # between the CR and LF of the long line.
        lone = BODY.index(b"\r\n.\r\n") + 3
        long = BODY.index(b"x\r\nlast") + 2
        chunks = [BODY[:lone], BODY[lone:long], BODY[long:]]

        def send():
            c = WireClient(relayd.port("relay"))
            try:
                replies = [c.reply(), c.command("EHLO client.test")]
                c.send(
                    b"MAIL FROM:<demo@example.org>\r\nRCPT TO:<friend@example.net>\r\n"
                    + b"".join(
                        b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if last else b"", chunk)
                        for chunk, last in zip(chunks, [False, False, True], strict=True)
                    )
                    + b"QUIT\r\n"
                )
                replies += [c.reply() for _ in range(6)]
                return replies
            finally:
                c.close()

        replies = yield deferToThread(send)
        self.assertIn("CHUNKING", replies[1][1])
        self.assertEqual([code for code, _ in replies], [220, 250, 250, 250, 250, 250, 250, 221])

        [dump] = yield waitDump(sink, b"last line")
        self.assertIn(b"X-Mail-Args: <demo@example.org>", dump)
        self.assertIn(b"X-Rcpt-Args: <friend@example.net>", dump)
        self.assertIn(b"by relayd.test (relayd) with ESMTP id", dump)
        # smtp-sink dumps with LF line ends and the stuffing removed, and
        # ends each dump with one empty line of its own.
        start = dump.index(b"Subject: BDAT to smtp-sink")
        self.assertEqual(dump[start:], BODY.replace(b"\r\n", b"\n") + b"\n")
        while relayd.spool.entries("incoming") or relayd.spool.entries("active"):
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(relayd.spool.entries("deferred"), [])


# Net::SMTP sends BDAT only after MAIL ... BODY=BINARYMIME, which relayd
# does not offer; its chunking switch is set by hand instead, so that its
# own BDAT encoding and reply handling are what is tested.
NET_SMTP = r"""
use strict;
use Net::SMTP;
my ($port, @chunks) = @ARGV;
my $smtp = Net::SMTP->new("127.0.0.1", Port => $port, Hello => "perl.test", Timeout => 20)
    or die "connect: $@";
die "no CHUNKING\n" unless defined $smtp->supports("CHUNKING");
$smtp->mail("perl\@example.org") or die "MAIL: " . $smtp->message;
$smtp->to("friend\@example.net") or die "RCPT: " . $smtp->message;
${*$smtp}{net_smtp_chunking} = 1;
my $last = pop @chunks;
for my $chunk (@chunks) {
    $smtp->bdat(pack("H*", $chunk)) or die "BDAT: " . $smtp->code . " " . $smtp->message;
    print "chunk: ", $smtp->code, " ", $smtp->message;
}
$smtp->bdatlast(pack("H*", $last)) or die "BDAT LAST: " . $smtp->code . " " . $smtp->message;
print "last: ", $smtp->code, " ", $smtp->message;
$smtp->quit;
"""


class NetSMTPClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_perlNetSMTPSendsChunks(self):
        """Net::SMTP's BDAT chunks are stored as sent, its replies parsed."""
        perl = shutil.which("perl")
        self.assertIsNotNone(
            perl, "perl is not installed; scripts/test installs swaks, which needs it"
        )
        directory = tempfile.mkdtemp(prefix="relayd-interop-bdat-")
        self.addCleanup(shutil.rmtree, directory, True)
        setup = TestSetup(directory, modes=("relay",))
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        lone = BODY.index(b"\r\n.\r\n") + 3
        chunks = [BODY[:lone], BODY[lone:], b""]
        result = yield deferToThread(
            subprocess.run,
            [perl, "-e", NET_SMTP, str(relayd.port("relay")), *(c.hex() for c in chunks)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(
            result.stdout.splitlines()[:2],
            [
                f"chunk: 250 2.0.0 {len(chunks[0])} octets received",
                f"chunk: 250 2.0.0 {len(chunks[1])} octets received",
            ],
        )
        self.assertTrue(result.stdout.splitlines()[2].startswith("last: 250 2.0.0 Ok: queued as "))
        [queueId] = relayd.spool.entries("incoming")
        _, path = relayd.spool.load(queueId)
        stored = readData(path)
        self.assertEqual(stored[stored.index(b"Subject: BDAT") :], BODY)
