"""
A TCP server transport that sends a reply at once when nothing is queued
before it (write-through), for relayd's listeners.

Twisted's TCP transport never sends from C{write()}: it queues the octets,
asks the reactor to watch the socket for writability (an C{epoll_ctl}),
and sends on the next reactor turn, then stops watching (another
C{epoll_ctl}).  An SMTP session is a string of short replies, each
answering one command, so that is two system calls and one reactor turn
for every reply.  asyncio, Postfix's smtpd and most servers try the socket
first; so does this: when nothing is queued, C{write()} sends right away,
and only what the socket does not take is queued, the Twisted way.
Ordering is kept (nothing is sent ahead of queued octets) and so are
errors (a failed send queues the data, and the reactor's next write
reports the lost connection as usual).

Octets of a STARTTLS session go through Twisted's TLS layer, which writes
to the base transport directly: they are queued as before.  An implicit
TLS listener (C{ssl:}) writes its encrypted records through here.

L{Port.transport} is the documented way to choose the transport a port
builds (L{twisted.internet.tcp.Port}); L{writeThrough} sets it on a bound
port.  The delivery client's connections are Twisted's own
L{tcp.Client}s, built by its endpoints; it writes through
L{writeSoon}, the same rule applied from outside.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure

__all__ = ["WriteThroughServer", "allSent", "writeSoon", "writeThrough"]


def _nothingQueued(connection: tcp.Connection) -> bool:
    """
    Whether everything written to C{connection} so far is in the kernel's
    hands (never said of a STARTTLS session, whose octets the TLS layer
    queues).
    """
    return (
        not connection.TLS
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    )


def _sendFirst(connection: tcp.Connection, data: bytes) -> bytes:
    """
    Send what the socket takes of C{data} now, if nothing written to
    C{connection} before is still queued (and it is no TLS session).

    @return: what is left to queue with the transport's own C{write}:
        C{b""} when all was sent, all of C{data} when nothing could be.
    """
    if (
        type(data) is bytes
        and data
        and connection.connected
        and not connection._writeDisconnected
        and _nothingQueued(connection)
    ):
        try:
            sent = connection.socket.send(data)
        except OSError:
            # EAGAIN, or a broken connection: queued, and the reactor's
            # next write finds out which.
            sent = 0
        return data[sent:] if sent else data
    return data


class WriteThroughServer(tcp.Server):
    """A L{tcp.Server} whose C{write} tries the socket first."""

    def write(self, data: bytes) -> None:
        rest = _sendFirst(self, data)
        if rest or not data:
            super().write(rest)  # type: ignore[no-untyped-call]

    def allSent(self) -> bool:
        """
        Whether everything written so far is in the kernel's hands (never
        said of a STARTTLS session, whose octets the TLS layer queues).
        """
        return _nothingQueued(self)

    def loseConnection(self) -> None:
        """
        Close the connection once what was written is sent.

        Twisted's way stops reading and watches the socket for
        writability, only to find on the next turn that nothing is left
        to write: three C{epoll_ctl} and a poll event for every session's
        end.  When everything is sent already (and no producer is
        registered), the connection is closed on the next reactor turn by
        a timed call instead, as Twisted would have closed it: reading
        stopped at once, C{connectionLost} with C{ConnectionDone} later,
        never from inside this call.  Anything written in between is still
        sent first, the Twisted way.
        """
        if (
            self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and self.producer is None
            and self.allSent()
        ):
            self.stopReading()
            self.disconnecting = True
            reactor: Any = self.reactor  # typed as IReactorFDSet; it is the whole reactor
            reactor.callLater(0, self._closeSent)
            return
        super().loseConnection()  # type: ignore[no-untyped-call]

    def _closeSent(self) -> None:
        """The turn after L{loseConnection}: close, unless more was written meanwhile."""
        if not self.connected or self.disconnected or self._aborting:
            return  # lost meanwhile, or aborted: the abort's own timed call ends it
        if not self.allSent() or self.producer is not None:
            self.startWriting()  # doWrite sends it, then closes (disconnecting is set)
            return
        self.connectionLost(Failure(main.CONNECTION_DONE))


def writeSoon(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, sending at once what the socket takes when
    C{transport} is a plain TCP client connection with nothing queued:
    the delivery client's commands and message, which otherwise each
    wait a reactor turn and cost two C{epoll_ctl}.  Any other transport
    (TLS, a test's) is written to as usual.
    """
    if type(transport) is tcp.Client:
        data = _sendFirst(transport, data)
        if not data:
            return
    transport.write(data)


def writeThrough(port: Any) -> Any:
    """
    C{port} (a listening port), made to build L{WriteThroughServer}s if it
    is a plain TCP port; any other port (UNIX sockets) as it is.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = WriteThroughServer
    return port


def allSent(transport: Any) -> bool:
    """
    Whether C{transport} says that everything written to it was sent;
    False when it cannot say (a TLS transport, a test's fake).
    """
    check = getattr(transport, "allSent", None)
    return bool(check()) if callable(check) else False
