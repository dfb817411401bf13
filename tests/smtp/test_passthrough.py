"""
Relaying in session (C{mode = "passthrough"} routes, L{relayd.smtp.passthrough}),
over real sockets: relayd in process, clients in threads (smtplib and
L{WireClient}), and as the next hop Postfix's C{smtp-sink}, relayd's
L{SinkServer} or a small scripted server of this module for the faults
the others cannot make (a connection dropped in the middle of the message,
multi-line replies).
"""

from __future__ import annotations

import io
import os
import shutil
import smtplib
import tempfile
import urllib.request
from dataclasses import replace
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from relayd.certificates import loadServerOptions
from relayd.config import load
from relayd.delivery.client import Reply
from relayd.delivery.passthrough import Connector, messageFile
from relayd.delivery.routing import NextHopConfig, Route, matchRoute
from relayd.ops import relayctl
from relayd.smtp.passthrough import clientReply, replyBytes
from relayd.testing import (
    QUICK_DELIVERY,
    InProcessRelayd,
    PostfixSink,
    SinkServer,
    TestSetup,
    WireClient,
    dotStuff,
    freePort,
)
from relayd.testing.certs import makeCA, makeServerCert
from tests.smtp.test_dialogue import DialogueTestCase

MESSAGE = (
    b"From: app@example.org\r\n"
    b"To: friend@example.net\r\n"
    b"Subject: passthrough\r\n"
    b"\r\n"
    b".a line with a leading dot\r\n"
    b"..and two\r\n"
    b".\r\n"
    b"last line\r\n"
)


def addRoute(
    setup: TestSetup,
    port: int,
    *,
    domains: tuple[str, ...] = ("*",),
    mode: str = "passthrough",
    fallback: str | None = None,
    hopLines: tuple[str, ...] = ('tls = "none"',),
) -> None:
    """Append a C{[[routes]]} table with one hop on 127.0.0.1:C{port}."""
    quoted = ", ".join(f'"{d}"' for d in domains)
    lines = ["", "[[routes]]", f"domains = [{quoted}]", f'mode = "{mode}"']
    if fallback is not None:
        lines.append(f'fallback = "{fallback}"')
    lines += ["[[routes.hops]]", 'host = "127.0.0.1"', f"port = {port}", *hopLines, ""]
    with open(setup.configPath, "a") as f:
        f.write("\n".join(lines))


def scratch(testCase: unittest.TestCase) -> str:
    """A temporary folder removed at cleanup (not under the current directory)."""
    directory = tempfile.mkdtemp(prefix="relayd-passthrough-")
    testCase.addCleanup(shutil.rmtree, directory, True)
    return directory


def spoolFiles(relayd: InProcessRelayd, setup: TestSetup) -> list[str]:
    """Every file in the spool's queue folders and in C{tmp/}."""
    found = []
    for state in ("tmp", "incoming", "active", "deferred", "hold"):
        folder = os.path.join(setup.spoolPath, state)
        if os.path.isdir(folder):
            found += [f"{state}/{name}" for name in os.listdir(folder)]
    return found


def session(port: int, steps: list[bytes | str], data: bytes | None = None) -> list[Any]:
    """
    EHLO, then each of C{steps} (a command, or C{data} dot-stuffed after a
    354 when the step is C{DATA}), then QUIT: every reply C{(code, lines)}.
    """
    client = WireClient(port)
    try:
        replies = [client.reply(), client.command("EHLO client.example")]
        for step in steps:
            reply = client.command(step)
            replies.append(reply)
            if step == "DATA" and reply[0] == 354:
                assert data is not None
                client.send(dotStuff(data))
                replies.append(client.reply())
        replies.append(client.command("QUIT"))
        return replies
    finally:
        client.close()


class Script:
    """What L{ScriptedUpstream} answers and what it saw."""

    def __init__(self) -> None:
        self.replies: dict[str, bytes] = {}
        self.dropAfterDataLines: int | None = None
        self.finalDelay = 0.0
        self.connections = 0
        self.commands: list[bytes] = []
        self.dataLines: list[bytes] = []
        self.ended = False


class ScriptedUpstream(LineReceiver):
    """A next hop that answers as its L{Script} says, raw lines and all."""

    delimiter = b"\r\n"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.inData = False
        self.aborted = False

    def connectionMade(self) -> None:
        self.script.connections += 1
        self.transport.write(b"220 scripted.test ESMTP\r\n")

    def lineReceived(self, line: bytes) -> None:
        script = self.script
        if self.aborted:
            # abortConnection does not stop LineReceiver from handing on
            # the lines already read (the end of a message that arrived
            # in the same segment): a dropped peer reads nothing more.
            return
        if self.inData:
            if line == b".":
                self.inData = False
                script.ended = True
                final = script.replies.get("END", b"250 2.0.0 Ok: queued\r\n")
                if script.finalDelay:
                    reactor.callLater(script.finalDelay, self.transport.write, final)
                else:
                    self.transport.write(final)
                return
            script.dataLines.append(line)
            if (
                script.dropAfterDataLines is not None
                and len(script.dataLines) >= script.dropAfterDataLines
            ):
                self.aborted = True
                self.transport.abortConnection()
            return
        script.commands.append(line)
        verb = line.split(b" ", 1)[0].upper().decode()
        if line.decode() in script.replies:
            verb = line.decode()
        if verb == "EHLO":
            self.transport.write(b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            return
        if verb == "QUIT":
            self.transport.write(b"221 2.0.0 Bye\r\n")
            self.transport.loseConnection()
            return
        reply = script.replies.get(verb)
        if reply is None:
            reply = b"354 go ahead\r\n" if verb == "DATA" else b"250 2.0.0 Ok\r\n"
        if verb == "DATA" and reply.startswith(b"354"):
            self.inData = True
        self.transport.write(reply)


class ScriptedFactory(ServerFactory):
    def __init__(self, script: Script) -> None:
        self.script = script

    def buildProtocol(self, addr: Any) -> ScriptedUpstream:
        return ScriptedUpstream(self.script)


class PassthroughTests(unittest.TestCase):
    """A passthrough route, end to end."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="relayd-passthrough-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        # smtp-sink runs as nobody and writes its dumps below this folder.
        os.chmod(self.directory, 0o755)

    @defer.inlineCallbacks
    def relayd(
        self,
        port: int,
        *,
        fallback: str | None = None,
        chain: list[str] | None = None,
        policies: dict[str, dict[str, Any]] | None = None,
        delivery: bool = False,
        routes: list[tuple[int, tuple[str, ...], str]] = (),
        sections: dict[str, dict[str, Any]] | None = None,
        hopLines: tuple[str, ...] = ('tls = "none"',),
    ) -> Any:
        """relayd with a passthrough route for C{*} to 127.0.0.1:C{port}, after C{routes}."""
        merged: dict[str, dict[str, Any]] = {
            "delivery": dict(QUICK_DELIVERY) if delivery else {"enabled": False}
        }
        for name, values in (sections or {}).items():
            merged.setdefault(name, {}).update(values)
        setup = TestSetup(
            os.path.join(self.directory, "relayd"),
            modes=("relay",),
            chain=chain if chain is not None else ["mynetworks"],
            policies=policies,
            sections=merged,
        )
        for otherPort, domains, mode in routes:
            addRoute(setup, otherPort, domains=domains, mode=mode)
        addRoute(setup, port, fallback=fallback, hopLines=hopLines)
        self.setup = setup
        relayd = yield InProcessRelayd.start(setup)
        self.addCleanup(relayd.stop)
        return relayd

    def sink(self) -> SinkServer:
        sink = SinkServer()
        sink.start(reactor)
        self.addCleanup(sink.stop)
        return sink

    def scripted(self, script: Script) -> int:
        listening = reactor.listenTCP(0, ScriptedFactory(script), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return int(listening.getHost().port)

    @defer.inlineCallbacks
    def settled(self, sink: SinkServer | None = None) -> Any:
        """Wait until relayd's upstream sessions are closed."""
        for _ in range(200):
            if sink is None or sink.openConnections == 0:
                break
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_postfixSinkAccepts(self) -> Any:
        """
        Postfix's smtp-sink takes the message: the client's reply to the
        end of data is smtp-sink's own, and relayd's spool holds nothing.
        """
        sink = PostfixSink(self.directory)
        self.addCleanup(sink.stop)
        relayd = yield self.relayd(sink.port)
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"],
            MESSAGE,
        )
        code, lines = replies[5]
        self.assertEqual(code, 250)
        # smtp-sink's end-of-data reply, not relayd's "Ok: queued as".
        self.assertNotIn("queued as", lines[0])
        self.assertEqual(lines, ["2.0.0 Ok"])
        self.assertEqual(spoolFiles(relayd, self.setup), [])
        for _ in range(200):
            dumps = sink.messages()
            if dumps:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [dump] = sink.messages()
        self.assertIn(b"X-Rcpt-Args: <friend@example.net>", dump)
        self.assertIn(b"by relayd.test (relayd) with ESMTP id", dump)
        # The body as sent, dot-stuffing undone (smtp-sink dumps with LF).
        self.assertIn(MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"), dump)

    @defer.inlineCallbacks
    def test_postfixSinkRefusals(self) -> Any:
        """
        smtp-sink told to refuse RCPT for good (550 5.1.1), then for now
        (452): each refusal reaches the client as smtp-sink said it.
        """
        os.makedirs(os.path.join(self.directory, "hard"))
        hard = PostfixSink(
            os.path.join(self.directory, "hard"),
            extra=("-f", "RCPT", "-B", "550 5.1.1 Recipient address rejected: User unknown"),
        )
        os.makedirs(os.path.join(self.directory, "soft"))
        soft = PostfixSink(
            os.path.join(self.directory, "soft"),
            extra=("-r", "RCPT", "-b", "452 4.2.2 Mailbox full"),
        )
        self.addCleanup(hard.stop)
        self.addCleanup(soft.stop)
        relayd = yield self.relayd(
            hard.port, routes=[(soft.port, ("soft.example",), "passthrough")]
        )
        steps = ["MAIL FROM:<app@example.org>", "RCPT TO:<nobody@example.net>"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3], (550, ["5.1.1 Recipient address rejected: User unknown"]))
        steps = ["MAIL FROM:<app@example.org>", "RCPT TO:<full@soft.example>"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3], (452, ["4.2.2 Mailbox full"]))
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_multiLineReplyKept(self) -> Any:
        """
        A multi-line refusal keeps its lines; a 421 reaches the client as
        451 with the same text (relayd is not the one closing); a line
        without an enhanced code gets the class's X.0.0.
        """
        script = Script()
        script.replies["RCPT"] = (
            b"550-5.7.1 first line of the refusal\r\n550 5.7.1 see https://help.example\r\n"
        )
        relayd = yield self.relayd(self.scripted(script))
        steps = ["MAIL FROM:<app@example.org>", "RCPT TO:<a@example.net>"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(
            replies[3],
            (550, ["5.7.1 first line of the refusal", "5.7.1 see https://help.example"]),
        )
        del script.replies["RCPT"]
        script.replies["RCPT TO:<b@example.net>"] = b"421 4.3.2 closing for maintenance\r\n"
        replies = yield deferToThread(
            session, relayd.port("relay"), [*steps, "RCPT TO:<b@example.net>", "DATA"], MESSAGE
        )
        self.assertEqual(replies[3], (250, ["2.0.0 Ok"]))
        self.assertEqual(replies[4], (451, ["4.3.2 closing for maintenance"]))
        # The upstream is gone: DATA is refused at once, nothing is queued.
        self.assertEqual(replies[5], (451, ["4.4.2 Error: lost connection with the next hop"]))
        self.assertEqual(spoolFiles(relayd, self.setup), [])
        script.replies["RCPT"] = b"450 mailbox busy\r\n"
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3], (450, ["4.0.0 mailbox busy"]))

    @defer.inlineCallbacks
    def test_upstreamDropsMidData(self) -> Any:
        """
        The next hop drops the connection in the middle of the message:
        the client gets 451 4.4.2, nothing is in the spool (the client's
        retry will be the only copy), and the next hop never saw the end.
        """
        script = Script()
        script.dropAfterDataLines = 2
        relayd = yield self.relayd(self.scripted(script))
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"],
            MESSAGE,
        )
        self.assertEqual(replies[3][0], 250)
        self.assertEqual(replies[4][0], 354)
        code, [line] = replies[5]
        self.assertEqual((code, line[:6]), (451, "4.4.2 "))
        self.assertFalse(script.ended)
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_upstreamTimesOutAfterData(self) -> Any:
        """
        The next hop never answers the end of data: after
        C{delivery.data_timeout} the client gets 451 4.4.2, nothing spooled.
        """
        sink = self.sink()
        sink.stallOn = {"."}
        relayd = yield self.relayd(sink.port, sections={"delivery": {"data_timeout": 1}})
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"],
            MESSAGE,
        )
        code, [line] = replies[5]
        self.assertEqual((code, line[:6]), (451, "4.4.2 "))
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_slowFinalReply(self) -> Any:
        """
        The next hop takes longer to answer the end of data than relayd's
        own command timeout: the client still gets its reply, since only
        the next hop's timeouts bound that wait.
        """
        script = Script()
        script.finalDelay = 2.0
        relayd = yield self.relayd(self.scripted(script), sections={"timeouts": {"command": 1}})
        client = yield deferToThread(WireClient, relayd.port("relay"))
        self.addCleanup(client.close)

        def talk() -> Any:
            client.reply()
            client.command("EHLO client.example")
            client.command("MAIL FROM:<app@example.org>")
            client.command("RCPT TO:<friend@example.net>")
            client.command("DATA")
            client.send(dotStuff(MESSAGE))
            return client.reply()

        self.assertEqual((yield deferToThread(talk)), (250, ["2.0.0 Ok: queued"]))

    @defer.inlineCallbacks
    def test_fallbackSpool(self) -> Any:
        """
        No next hop listening, C{fallback = "spool"}: relayd's own replies,
        the message queued; once a sink comes up there, it is delivered.
        """
        port = freePort()
        relayd = yield self.relayd(port, fallback="spool", delivery=True)
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"],
            MESSAGE,
        )
        self.assertEqual(replies[3], (250, ["2.1.5 Ok"]))
        code, [line] = replies[5]
        self.assertEqual(code, 250)
        self.assertIn("queued as", line)
        os.makedirs(os.path.join(self.directory, "late"))
        sink = PostfixSink(os.path.join(self.directory, "late"), port=port)
        self.addCleanup(sink.stop)
        for _ in range(400):
            if any(b"last line" in dump for dump in sink.messages()):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        [dump] = sink.messages()
        self.assertIn(b"X-Rcpt-Args: <friend@example.net>", dump)

    @defer.inlineCallbacks
    def test_fallbackTempfail(self) -> Any:
        """No next hop listening, C{fallback = "tempfail"}: 451 4.4.1 to RCPT, nothing queued."""
        relayd = yield self.relayd(freePort(), fallback="tempfail")
        steps = ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3][0], 451)
        self.assertTrue(replies[3][1][0].startswith("4.4.1 "))
        # The transaction is as it was: still no recipient.
        self.assertEqual(replies[4][0], 554)
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_smtplibEndToEnd(self) -> Any:
        """
        smtplib's sendmail with one recipient the next hop refuses: it
        learns of that refusal as the next hop said it, the others get the
        message, with relayd's Received: field and the policies' header
        changes, byte for byte otherwise.
        """
        sink = self.sink()
        sink.rcptReply = {"nobody@example.net": (550, "5.1.1 <nobody@example.net>: unknown")}
        relayd = yield self.relayd(
            sink.port,
            chain=["mynetworks", "headers"],
            policies={"headers": {"add": {"X-Relayed": "in session"}, "add_missing": False}},
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=30) as client:
                return client.sendmail(
                    "app@example.org",
                    ["friend@example.net", "nobody@example.net", "other@example.net"],
                    MESSAGE,
                )

        refused = yield deferToThread(send)
        self.assertEqual(
            refused, {"nobody@example.net": (550, b"5.1.1 <nobody@example.net>: unknown")}
        )
        [message] = sink.messages
        self.assertEqual(message.recipients, ["friend@example.net", "other@example.net"])
        self.assertTrue(message.data.startswith(b"Received: from "))
        self.assertIn(b"by relayd.test (relayd) with ESMTP id", message.data)
        header, body = message.data.split(b"\r\n\r\n", 1)
        self.assertIn(b"\r\nX-Relayed: in session", header)
        self.assertEqual(body, MESSAGE.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_twoTransactionsOneSession(self) -> Any:
        """
        Each transaction of a client session has its own upstream session,
        ended (QUIT) once the transaction is.
        """
        sink = self.sink()
        relayd = yield self.relayd(sink.port)

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=30) as client:
                first = client.sendmail("app@example.org", ["a@example.net"], MESSAGE)
                second = client.sendmail("app@example.org", ["b@example.net"], MESSAGE)
                return first, second

        self.assertEqual((yield deferToThread(send)), ({}, {}))
        yield self.settled(sink)
        self.assertEqual(
            [m.recipients for m in sink.messages], [["a@example.net"], ["b@example.net"]]
        )
        self.assertEqual([m.connection for m in sink.messages], [1, 2])
        self.assertEqual(sink.openConnections, 0)

    @defer.inlineCallbacks
    def test_tlsAndAuthAsTheHopSays(self) -> Any:
        """
        A hop with C{tls = "required"} and a user name: the upstream
        session is encrypted and authenticated before MAIL goes out.
        """
        sink = SinkServer()
        ca = makeCA(self.directory, "upstream CA")
        cert = makeServerCert(ca, self.directory, "upstream.example")
        options = loadServerOptions(cert.certPath, cert.keyPath)
        sink.start(reactor, tlsOptions=options, users={"relay": "upstream secret"})
        self.addCleanup(sink.stop)
        relayd = yield self.relayd(
            sink.port,
            hopLines=('tls = "required"', 'username = "relay"', 'password = "upstream secret"'),
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", relayd.port("relay"), timeout=30) as client:
                return client.sendmail("app@example.org", ["a@example.net"], MESSAGE)

        self.assertEqual((yield deferToThread(send)), {})
        [message] = sink.messages
        self.assertEqual(message.user, "relay")
        self.assertIsNotNone(message.tls)

    @defer.inlineCallbacks
    def test_refusedAfterData(self) -> Any:
        """
        The next hop refuses the message at the end of data: the client
        gets that refusal as it came, relayd queues nothing (no bounce of
        its own), and logs the recipient as refused.
        """
        sink = self.sink()
        sink.dataReply = (554, "5.7.1 Message rejected as spam")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relayd = yield self.relayd(sink.port)
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<friend@example.net>", "DATA"],
            MESSAGE,
        )
        self.assertEqual(replies[5], (554, ["5.7.1 Message rejected as spam"]))
        self.assertEqual(spoolFiles(relayd, self.setup), [])
        texts = [formatEvent(e) for e in events]
        self.assertTrue(
            any("to=<friend@example.net>" in t and "status=refused" in t for t in texts), texts
        )

    @defer.inlineCallbacks
    def test_relayctlRoute(self) -> Any:
        """C{relayctl route} says that the route relays in session, and its fallback."""
        setup = TestSetup(os.path.join(self.directory, "relayd"), modes=("relay",))
        addRoute(setup, 2525, fallback="tempfail")
        out, err = io.StringIO(), io.StringIO()

        def run() -> int:
            argv = ["--config", setup.configPath, "route", "c@example.org"]
            return relayctl.main(argv, stdout=out, stderr=err)

        status = yield deferToThread(run)
        self.assertEqual((status, err.getvalue()), (0, ""))
        self.assertIn(
            "  mode: passthrough (relayed in session; fallback tempfail)\n", out.getvalue()
        )

    @defer.inlineCallbacks
    def test_pipelined(self) -> Any:
        """
        A client that pipelines MAIL, its RCPTs and DATA (RFC 2920) gets
        the replies in order, each RCPT's the next hop's own.
        """
        sink = self.sink()
        sink.rcptReply = {"busy@example.net": (450, "4.2.1 try later")}
        relayd = yield self.relayd(sink.port)

        def talk() -> Any:
            client = WireClient(relayd.port("relay"))
            try:
                client.reply()
                client.command("EHLO client.example")
                client.send(
                    b"MAIL FROM:<app@example.org>\r\nRCPT TO:<a@example.net>\r\n"
                    b"RCPT TO:<busy@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                )
                replies = [client.reply() for _ in range(5)]
                client.send(dotStuff(MESSAGE))
                replies.append(client.reply())
                return replies
            finally:
                client.close()

        replies = yield deferToThread(talk)
        self.assertEqual([code for code, _ in replies], [250, 250, 450, 250, 354, 250], replies)
        self.assertEqual(replies[2], (450, ["4.2.1 try later"]))
        [message] = sink.messages
        self.assertEqual(message.recipients, ["a@example.net", "b@example.net"])

    @defer.inlineCallbacks
    def test_parametersPassedOn(self) -> Any:
        """
        MAIL and RCPT parameters go to a next hop that offers them: SIZE,
        BODY=8BITMIME, and the DSN ones (RFC 3461 section 4: passed on).
        """
        sink = self.sink()
        sink.advertise = [*sink.advertise, "DSN"]
        relayd = yield self.relayd(sink.port)
        steps = [
            "MAIL FROM:<app@example.org> SIZE=300 BODY=8BITMIME RET=HDRS ENVID=id+2B1",
            "RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.net",
            "DATA",
        ]
        replies = yield deferToThread(session, relayd.port("relay"), steps, MESSAGE)
        self.assertEqual(replies[5][0], 250, replies)
        lines = [c.line for c in sink.commands]
        self.assertIn(
            "MAIL FROM:<app@example.org> SIZE=300 BODY=8BITMIME RET=HDRS ENVID=id+2B1", lines
        )
        self.assertIn(
            "RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.net", lines
        )

    @defer.inlineCallbacks
    def test_smtputf8NotOffered(self) -> Any:
        """
        An SMTPUTF8 transaction and a next hop without SMTPUTF8: the RCPT
        gets 553 5.6.7 (RFC 6531 section 3.2: never a downgrade), and the
        next hop no MAIL.
        """
        sink = self.sink()
        relayd = yield self.relayd(sink.port)
        steps = ["MAIL FROM:<app@example.org> SMTPUTF8", "RCPT TO:<a@example.net>"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3][0], 553)
        self.assertTrue(replies[3][1][0].startswith("5.6.7 "), replies[3])
        yield self.settled(sink)
        self.assertNotIn("MAIL", sink.verbs())

    @defer.inlineCallbacks
    def test_dataAnsweredWith250(self) -> Any:
        """A next hop that answers DATA with 250 (not 354): relayd's 451 4.5.0, nothing queued."""
        script = Script()
        script.replies["DATA"] = b"250 2.0.0 sure\r\n"
        relayd = yield self.relayd(self.scripted(script))
        replies = yield deferToThread(
            session,
            relayd.port("relay"),
            ["MAIL FROM:<app@example.org>", "RCPT TO:<a@example.net>", "DATA"],
            MESSAGE,
        )
        code, [line] = replies[5]
        self.assertEqual((code, line[:6]), (451, "4.5.0 "))
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_policyFirst(self) -> Any:
        """
        The policy chain runs first: a denied sender gets relayd's 550
        5.7.1 and a recipient relaying is denied for gets 554 5.7.1; the
        next hop is never contacted.
        """
        sink = self.sink()
        relayd = yield self.relayd(
            sink.port,
            chain=["access"],
            policies={"access": {"sender_deny": ["bad@example.org"]}},
        )
        steps = [
            "MAIL FROM:<bad@example.org>",
            "MAIL FROM:<app@example.org>",
            "RCPT TO:<a@b.example>",
        ]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[2][0], 550)
        self.assertEqual(replies[3][0], 250)
        self.assertEqual(replies[4], (554, ["5.7.1 Relay access denied"]))
        self.assertEqual(sink.connections, 0)

    @defer.inlineCallbacks
    def test_anotherRoute(self) -> Any:
        """
        A recipient whose route is not the transaction's gets 452 4.5.3
        (the client sends it in another transaction), either way round.
        """
        sink = self.sink()
        spooled = self.sink()
        relayd = yield self.relayd(
            sink.port, routes=[(spooled.port, ("spooled.example",), "spool")]
        )
        steps = [
            "MAIL FROM:<app@example.org>",
            "RCPT TO:<a@example.net>",
            "RCPT TO:<b@spooled.example>",
            "RSET",
            "MAIL FROM:<app@example.org>",
            "RCPT TO:<b@spooled.example>",
            "RCPT TO:<a@example.net>",
        ]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[3], (250, ["2.1.5 Ok"]))
        self.assertEqual(replies[4][0], 452)
        self.assertTrue(replies[4][1][0].startswith("4.5.3 "))
        self.assertEqual(replies[7][0], 250)
        self.assertEqual(replies[8][0], 452)
        self.assertEqual(sink.connections, 1)

    @defer.inlineCallbacks
    def test_rsetAndQuit(self) -> Any:
        """The client's RSET ends the upstream transaction (RSET, QUIT) and its session."""
        sink = self.sink()
        relayd = yield self.relayd(sink.port)
        steps = ["MAIL FROM:<app@example.org>", "RCPT TO:<a@example.net>", "RSET"]
        replies = yield deferToThread(session, relayd.port("relay"), steps)
        self.assertEqual(replies[4], (250, ["2.0.0 Ok"]))
        yield self.settled(sink)
        self.assertEqual(sink.verbs(), ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"])
        self.assertEqual(sink.openConnections, 0)

    @defer.inlineCallbacks
    def test_clientLeavesMidData(self) -> Any:
        """
        The client disconnects in the middle of its message: the upstream
        session ends without DATA ever being sent, and nothing is kept.
        """
        sink = self.sink()
        relayd = yield self.relayd(sink.port)

        def leave() -> None:
            client = WireClient(relayd.port("relay"))
            client.reply()
            client.command("EHLO client.example")
            client.command("MAIL FROM:<app@example.org>")
            assert client.command("RCPT TO:<a@example.net>")[0] == 250
            assert client.command("DATA")[0] == 354
            client.send(b"Subject: cut\r\n\r\nhalf a mess")
            client.close()

        yield deferToThread(leave)
        yield self.settled(sink)
        for _ in range(200):
            if not relayd.sessions:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(sink.openConnections, 0)
        self.assertNotIn("DATA", sink.verbs())
        self.assertEqual(sink.messages, [])
        self.assertEqual(spoolFiles(relayd, self.setup), [])

    @defer.inlineCallbacks
    def test_bdatLogAndMetrics(self) -> Any:
        """
        A message sent with BDAT is relayed as DATA, dot-stuffed; the log
        has the upstream's replies and a delivery line per recipient; the
        metrics count the message and the delivery.
        """
        sink = self.sink()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relayd = yield self.relayd(
            sink.port, sections={"metrics": {"endpoint": "tcp:0:interface=127.0.0.1"}}
        )

        def send() -> Any:
            client = WireClient(relayd.port("relay"))
            try:
                client.reply()
                client.command("EHLO client.example")
                client.command("MAIL FROM:<app@example.org>")
                client.command("RCPT TO:<friend@example.net>")
                client.send(b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE)
                return client.reply()
            finally:
                client.close()

        code, [line] = yield deferToThread(send)
        self.assertEqual((code, line), (250, "2.0.0 Ok: queued as S1"))
        [message] = sink.messages
        self.assertTrue(message.data.endswith(MESSAGE))
        texts = [formatEvent(e) for e in events]
        relay = f"127.0.0.1[127.0.0.1]:{sink.port}"
        self.assertTrue(
            any(f"passthrough to {relay}: 250 2.0.0 Ok: queued as S1" in t for t in texts), texts
        )
        self.assertTrue(
            any(
                f"to=<friend@example.net>, relay={relay}," in t and "status=sent" in t
                for t in texts
            ),
            texts,
        )

        def scrape() -> str:
            url = f"http://127.0.0.1:{relayd.metricsPort()}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                return str(r.read().decode())

        text = yield deferToThread(scrape)
        self.assertIn('relayd_delivery_attempts_total{outcome="sent"} 1.0', text)
        self.assertIn('relayd_messages_accepted_total{listener="relay"} 1.0', text)
        self.assertEqual(spoolFiles(relayd, self.setup), [])


class AnotherRouteDialogueTests(DialogueTestCase):
    """
    Over a L{StringTransport}: a recipient for a passthrough route in a
    transaction whose first recipient is spooled gets C{452 4.5.3}, and the
    transaction stays as it was (no next hop is contacted for it).
    """

    def setUp(self) -> None:
        super().setUp()
        route = Route(
            ("passthrough.example",),
            (NextHopConfig("192.0.2.1", 25, "none"),),
            mode="passthrough",
        )
        self.factory.config = replace(self.config, routes=(route,))

    def test_otherRouteRefused(self) -> None:
        self.ehlo()
        self.assertEqual(self.talk("MAIL FROM:<a@example.com>\r\n"), ["250 2.1.0 Ok"])
        self.assertEqual(self.talk("RCPT TO:<b@example.net>\r\n"), ["250 2.1.5 Ok"])
        [line] = self.talk("RCPT TO:<c@passthrough.example>\r\n")
        self.assertTrue(line.startswith("452 4.5.3 "), line)
        envelope = self.server.envelope
        assert envelope is not None
        self.assertEqual([str(r) for r in envelope.recipients], ["b@example.net"])
        self.assertIsNone(self.factory.connector)
        self.assertEqual(self.talk("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        [line] = self.talk("Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as "), line)


class ReplyTests(unittest.TestCase):
    """How an upstream reply reaches the client (L{replyBytes}, L{clientReply})."""

    def test_linesKept(self) -> None:
        reply = Reply.parse(["550-5.7.1 one", "550-5.7.1 two", "550 5.7.1 three"])
        self.assertEqual(
            replyBytes(clientReply(reply)),
            b"550-5.7.1 one\r\n550-5.7.1 two\r\n550 5.7.1 three\r\n",
        )

    def test_enhancedCodeAdded(self) -> None:
        """RFC 2034: with ENHANCEDSTATUSCODES every line has one."""
        reply = Reply.parse(["250-fine", "250 2.1.5 also fine"])
        self.assertEqual(replyBytes(reply), b"250-2.0.0 fine\r\n250 2.1.5 also fine\r\n")

    def test_closingIsNotRelayds(self) -> None:
        reply = clientReply(Reply.parse(["421 4.3.2 going down"]))
        self.assertEqual(replyBytes(reply), b"451 4.3.2 going down\r\n")

    def test_outOfPlaceCode(self) -> None:
        reply = clientReply(Reply.parse(["354 more please"]))
        self.assertEqual((reply.code, reply.enhanced), (451, "4.5.0"))

    def test_controlCharactersNeutered(self) -> None:
        reply = Reply.parse(["550 5.1.1 bad\x1b[31m"])
        self.assertEqual(replyBytes(reply), b"550 5.1.1 bad?[31m\r\n")


class MessageFileTests(unittest.TestCase):
    """L{messageFile}: the received file, with the header policies rewrote."""

    def setUp(self) -> None:
        self.path = os.path.join(scratch(self), "message")
        with open(self.path, "wb") as f:
            f.write(b"A: 1\r\nB: 2\r\n\r\nbody\r\ntrailing record")

    def test_unchanged(self) -> None:
        with messageFile(b"", self.path, 0, 20) as f:
            self.assertEqual(f.read(), b"A: 1\r\nB: 2\r\n\r\nbody\r\n")

    def test_newHeader(self) -> None:
        with messageFile(b"C: 3\r\n\r\n", self.path, 14, 20) as f:
            self.assertEqual(f.read(), b"C: 3\r\n\r\nbody\r\n")


class MatchRouteTests(unittest.TestCase):
    """L{matchRoute}: the route a recipient domain takes, as L{Router} picks it."""

    def test_firstMatch(self) -> None:
        hop = (NextHopConfig("192.0.2.1"),)
        routes = [Route(("a.example",), hop), Route(("*.example",), hop), Route(("*",), hop)]
        self.assertEqual(matchRoute(routes, "A.Example."), 0)
        self.assertEqual(matchRoute(routes, "b.example"), 1)
        self.assertEqual(matchRoute(routes, "example"), 2)
        self.assertIsNone(matchRoute(routes[:2], "example.net"))

    def test_defaults(self) -> None:
        """A route without C{mode} is spooled, as before."""
        route = Route(("*",), (NextHopConfig("192.0.2.1"),))
        self.assertEqual((route.mode, route.fallback), ("spool", "spool"))


class ConnectorConfigTests(unittest.TestCase):
    """L{Connector.configure}: a reload reaches new upstream sessions."""

    def test_reloadedSettings(self) -> None:
        setup = TestSetup(scratch(self), modes=("relay",))
        config = load(setup.configPath)
        connector = Connector(MemoryReactorClock(), config)
        self.assertEqual((connector.heloName, connector.timeouts.mail), ("relayd.test", 300.0))
        self.assertIsNone(connector.trustRoot)
        reloaded = replace(config, hostname="new.test", commandTimeout=7.0, caFile=setup.caPath)
        connector.configure(reloaded)
        self.assertEqual((connector.heloName, connector.timeouts.mail), ("new.test", 7.0))
        self.assertIsNotNone(connector.trustRoot)
        self.assertIs(connector.config, reloaded)


class RelayctlConfigTests(unittest.TestCase):
    """C{relayctl config} shows a route's C{mode} and C{fallback}."""

    def test_modeAndFallback(self) -> None:
        setup = TestSetup(scratch(self), modes=("relay",))
        addRoute(setup, 2525)
        out, err = io.StringIO(), io.StringIO()
        status = relayctl.main(["--config", setup.configPath, "config"], stdout=out, stderr=err)
        self.assertEqual((status, err.getvalue()), (0, ""))
        lines = out.getvalue().splitlines()
        self.assertIn('* routes[0].mode = "passthrough"', lines)
        self.assertIn('  routes[0].fallback = "spool"', lines)
        out = io.StringIO()
        argv = ["--config", setup.configPath, "config", "--defaults"]
        self.assertEqual(relayctl.main(argv, stdout=out, stderr=err), 0)
        self.assertIn('routes[].mode = "spool"', out.getvalue().splitlines())
