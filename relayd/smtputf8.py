"""
When a queued message needs C{SMTPUTF8} on its way out (RFC 6531).

A message received with C{SMTPUTF8} on MAIL (L{QueueRecord.smtputf8})
needs the extension at the next hop only if it carries something a
server without it cannot take: an internationalized address in the
transaction, or UTF-8 in the header section (RFC 6532).  The rule, as
Postfix applies it (C{smtputf8_autodetect_classes} aside):

    the message came with SMTPUTF8, and the reverse-path or one of the
    forward-paths of this transaction is not ASCII, or the header section
    (relayd's own C{Received:} included, whose C{for} clause names a lone
    recipient) has an octet above 127.

A message that does not need it is sent without C{SMTPUTF8}, so that a
hop without the extension still takes it.  One that needs it and meets a
hop that does not offer it fails for every recipient of the transaction
with C{5.6.7} (RFC 6531 section 3.2 forbids sending it there, and relayd
does not downgrade), and the sender gets a DSN.  L{relayd.client} does
that, L{relayd.delivery} decides with L{needsSMTPUTF8}.
"""

from __future__ import annotations

from collections.abc import Sequence

from relayd.queuefile import openRegion

__all__ = ["needsSMTPUTF8", "headerHasEightBit"]

_READ = 65536


def headerHasEightBit(path: str, size: int) -> bool:
    """
    True when the header section of the message (the first C{size} octets
    of C{path}, up to the first empty line) has an octet above 127.
    Blocking file I/O, as much as the header section.
    """
    tail = b""
    with openRegion(path, size) as f:
        while chunk := f.read(_READ):
            data = tail + chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return not data[:end].isascii()
            if not data.isascii():
                return True
            tail = data[-3:]
    return False


def needsSMTPUTF8(
    smtputf8: bool, sender: str, recipients: Sequence[str], path: str, size: int
) -> bool:
    """
    Whether this transaction must be sent with C{SMTPUTF8} (the module
    docstring gives the rule).

    @param smtputf8: the message came with C{SMTPUTF8} (the record says).
    @param sender: the reverse-path.
    @param recipients: the forward-paths of this transaction.
    @param path: the queue file; the message is its first C{size} octets.
    @raise OSError: when the queue file cannot be read.
    """
    if not smtputf8:
        return False
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    return headerHasEightBit(path, size)
