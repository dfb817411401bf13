"""
The write-through TCP transport of relayd's listeners
(L{relayd.smtp.transport}), over real loopback sockets.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile

from twisted.internet import defer, error, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from relayd.smtp.transport import WriteThroughServer, allSent, writeSoon, writeThrough


class Writer(Protocol):
    """Writes the factory's chunks on connect, noting allSent() after each."""

    def connectionMade(self):
        self.factory.protocols.append(self)
        self.sent = []
        for chunk in self.factory.chunks:
            self.transport.write(chunk)
            self.sent.append(allSent(self.transport))
        if self.factory.close:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.lost.callback(reason.type)


class WriterFactory(ServerFactory):
    protocol = Writer

    def __init__(self, chunks, close=True):
        self.chunks = chunks
        self.close = close
        self.protocols = []
        self.lost = defer.Deferred()


def readAll(port, delay=0.0):
    """Connect, wait C{delay} seconds, read to EOF."""
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        time.sleep(delay)
        parts = []
        while True:
            data = s.recv(1 << 16)
            if not data:
                return b"".join(parts)
            parts.append(data)


class WriteThroughTests(unittest.TestCase):
    def listen(self, factory):
        port = writeThrough(reactor.listenTCP(0, factory, interface="127.0.0.1"))
        self.addCleanup(port.stopListening)
        return port

    def test_portBuildsWriteThroughServers(self):
        port = self.listen(WriterFactory([]))
        self.assertIs(port.transport, WriteThroughServer)

    def test_unixPortUntouched(self):
        path = tempfile.mktemp(prefix="relayd-wt-", suffix=".sock")
        port = reactor.listenUNIX(path, WriterFactory([]))
        self.addCleanup(port.stopListening)
        before = port.transport
        self.assertIs(writeThrough(port), port)
        self.assertIs(port.transport, before)

    @defer.inlineCallbacks
    def test_smallWritesLeaveAtOnce(self):
        """A reply is in the kernel's hands when write() returns."""
        factory = WriterFactory([b"220 one\r\n", b"250 two\r\n"])
        port = self.listen(factory)
        data = yield deferToThread(readAll, port.getHost().port)
        self.assertEqual(data, b"220 one\r\n250 two\r\n")
        self.assertEqual(factory.protocols[0].sent, [True, True])

    @defer.inlineCallbacks
    def test_orderKeptWhenTheSocketIsFull(self):
        """
        What the socket does not take is queued, and what is written after
        it waits behind it: the reader gets every octet, in order.
        """
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB, more than any socket buffer
        factory = WriterFactory([big, b"tail"])
        port = self.listen(factory)
        data = yield deferToThread(readAll, port.getHost().port, 0.2)
        self.assertEqual(len(data), len(big) + 4)
        self.assertTrue(data == big + b"tail")
        self.assertEqual(factory.protocols[0].sent, [False, False])

    @defer.inlineCallbacks
    def test_writeToAResetConnection(self):
        """A write to a connection the peer reset ends it the usual way."""
        factory = WriterFactory([], close=False)
        port = self.listen(factory)

        def resetting():
            s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST

        yield deferToThread(resetting)
        while not factory.protocols:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.1, lambda: None)
        transport = factory.protocols[0].transport
        for _ in range(3):
            transport.write(b"250 nobody listens\r\n")
        # connectionLost runs, the reactor's way; nothing raised from write().
        why = yield factory.lost
        self.assertIn(why, (error.ConnectionLost, error.ConnectionDone))

    @defer.inlineCallbacks
    def test_closedWithoutWatchingForWritability(self):
        """
        loseConnection with everything sent: reading stops, the socket is
        not watched for writability, and connectionLost comes on a later
        turn with ConnectionDone, after the peer got every octet.
        """
        seen = {}

        class Closer(Writer):
            def connectionMade(self):
                self.factory.protocols.append(self)
                self.transport.write(b"221 bye\r\n")
                self.lostYet = False
                self.transport.loseConnection()
                seen["writing"] = self.transport in reactor.getWriters()
                seen["reading"] = self.transport in reactor.getReaders()
                seen["lostDuringCall"] = self.lostYet

            def connectionLost(self, reason):
                self.lostYet = True
                Writer.connectionLost(self, reason)

        factory = WriterFactory([])
        factory.protocol = Closer
        port = self.listen(factory)
        data = yield deferToThread(readAll, port.getHost().port)
        self.assertEqual(data, b"221 bye\r\n")
        why = yield factory.lost
        self.assertIs(why, error.ConnectionDone)
        self.assertEqual(seen, {"writing": False, "reading": False, "lostDuringCall": False})

    @defer.inlineCallbacks
    def test_writtenAfterLoseConnectionStillSent(self):
        """What is written between loseConnection and the close is sent first."""
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB, more than any socket buffer

        class Late(Writer):
            def connectionMade(self):
                self.factory.protocols.append(self)
                self.transport.write(b"221 bye\r\n")
                self.transport.loseConnection()
                self.transport.write(big)

        factory = WriterFactory([])
        factory.protocol = Late
        port = self.listen(factory)
        data = yield deferToThread(readAll, port.getHost().port, 0.2)
        self.assertEqual(len(data), len(big) + 9)
        self.assertTrue(data == b"221 bye\r\n" + big)
        why = yield factory.lost
        self.assertIs(why, error.ConnectionDone)

    @defer.inlineCallbacks
    def test_abortAfterLoseConnection(self):
        """An abort before the close's turn ends it once, as an abort."""
        reasons = []

        class Aborter(Writer):
            def connectionMade(self):
                self.factory.protocols.append(self)
                self.transport.loseConnection()
                self.transport.abortConnection()

            def connectionLost(self, reason):
                reasons.append(reason.type)
                Writer.connectionLost(self, reason)

        factory = WriterFactory([])
        factory.protocol = Aborter
        port = self.listen(factory)

        def readUntilReset():
            with contextlib.suppress(ConnectionResetError):  # an abort resets it
                readAll(port.getHost().port)

        yield deferToThread(readUntilReset)
        yield factory.lost
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(reasons, [error.ConnectionAborted])

    def test_allSentUnknownTransports(self):
        """A transport that cannot say (TLS, a fake) never claims all sent."""
        self.assertFalse(allSent(object()))
        self.assertFalse(allSent(tcp.Server.__new__(tcp.Server)))


class Quiet(Protocol):
    def connectionLost(self, reason):
        self.lost = reason


class WriteSoonTests(unittest.TestCase):
    """
    L{writeSoon}, the delivery client's way to write to Twisted's own
    TCP client connections: octets leave before the reactor turns, unless
    something written before them is still queued.
    """

    @defer.inlineCallbacks
    def connected(self):
        """A Twisted client connection and the plain socket it reached."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listener.getsockname()[1])
        client = yield connectProtocol(endpoint, Quiet())
        self.addCleanup(client.transport.abortConnection)
        peer, _ = listener.accept()
        self.addCleanup(peer.close)
        peer.settimeout(2)
        return client.transport, peer

    @defer.inlineCallbacks
    def test_leavesAtOnce(self):
        transport, peer = yield self.connected()
        self.assertIs(type(transport), tcp.Client)
        writeSoon(transport, b"MAIL FROM:<a@example.org>\r\n")
        # No reactor turn in between: the peer reads it already.
        self.assertEqual(peer.recv(100), b"MAIL FROM:<a@example.org>\r\n")

    @defer.inlineCallbacks
    def test_waitsBehindQueuedOctets(self):
        """
        Octets written behind queued ones are queued too: the peer gets
        every octet, in order.
        """
        transport, peer = yield self.connected()
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB, more than any socket buffer
        writeSoon(transport, big)
        writeSoon(transport, b"tail")
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)

        def readAll():
            parts, size = [], 0
            while size < len(big) + 4:
                part = peer.recv(1 << 20)
                if not part:
                    break
                parts.append(part)
                size += len(part)
            return b"".join(parts)

        data = yield deferToThread(readAll)
        self.assertEqual(len(data), len(big) + 4)
        self.assertTrue(data == big + b"tail")

    def test_otherTransportsWrittenToAsUsual(self):
        """A transport that is no plain TCP client (TLS, a test's) gets write()."""
        written = []

        class Fake:
            def write(self, data):
                written.append(data)

        writeSoon(Fake(), b"RSET\r\n")
        self.assertEqual(written, [b"RSET\r\n"])
