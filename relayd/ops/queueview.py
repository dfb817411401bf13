"""
Reading the queue from the spool directory, without the daemon: what
C{relayctl queue list/show}, C{mailq} and the control service show of the
queued messages.  Blocking (the service runs these in a thread); they only
read, so they are safe while relayd runs, and the spool changes while they
read: each message is a snapshot of itself, not of the whole queue at one
instant.
"""

from __future__ import annotations

import os
from typing import Any

from relayd.queue.record import (
    FINAL,
    CorruptRecord,
    QueueRecord,
    openData,
    readRecord,
)
from relayd.queue.spool import STATES, currentState, findQueued, listQueue

__all__ = [
    "HEADER_LIMIT",
    "MessageNotFound",
    "countStates",
    "findMessage",
    "matches",
    "readMessage",
    "readQueue",
    "showMessage",
    "summarize",
]

HEADER_LIMIT = 1024 * 1024
"""The most octets of a message's header section that L{readMessage} returns."""


def summarize(queueId: str, state: str, record: QueueRecord | None) -> dict[str, Any]:
    """
    What C{relayctl queue list} shows of one message: the fields of its
    record (L{relayd.queue.record.QueueRecord}) that tell where it stands,
    as JSON for the control socket.  C{next_attempt} is None on hold;
    C{delivering} is filled in by the daemon.  With no record (it could
    not be read) the fields are empty.
    """
    if record is None:
        record = QueueRecord(queueId=queueId, sender="", recipients=(), arrival=0.0, size=0)
        arrival: float | None = None
        size: int | None = None
    else:
        arrival, size = record.arrival, record.size
    return {
        "queue_id": queueId,
        "state": state,
        "delivering": False,
        "size": size,
        "arrival": arrival,
        "sender": record.sender,
        "attempts": record.attempts,
        "next_attempt": None if state == "hold" else record.nextAttempt,
        "user": record.user,
        "client": record.client or None,
        "listener": record.listener or None,
        "recipients": [
            {
                "address": r.address,
                "state": r.state.value,
                "attempts": r.attempts,
                "last_reply": r.lastReply,
            }
            for r in record.recipients
        ],
    }


def _queuedIds(directory: str) -> dict[str, str]:
    """
    Every queued message's id and state.  A queue file listed in
    C{active/} and in another state (the listing raced with a move) is in
    the other one.
    """
    listed, problems = listQueue(directory)
    for _, error in problems:
        if not isinstance(error, FileNotFoundError):
            raise error
    return {queueId: currentState(states) for queueId, states in listed.items()}


def findMessage(directory: str, queueId: str) -> tuple[str, QueueRecord] | None:
    """
    Find a queued message in the spool at C{directory}
    (L{relayd.queue.spool.findQueued}).  Blocking; reads only.

    @return: its state and record, or None when no queued state holds it.
    @raise OSError: when the queue file is there but cannot be read.
    @raise ValueError: (L{CorruptRecord}) when it is not a sound queue file.
    """
    return findQueued(directory, queueId)


def readQueue(
    directory: str, after: str = "", limit: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """
    List the queued messages of the spool at C{directory} in queue id order
    (that is, by arrival), as L{summarize} gives them.  Blocking; reads only.

    The spool changes while it is read, so this is a snapshot of each
    message, not of the whole queue at one instant.  A queue file that
    cannot be read is listed with an C{error}.

    @param after: only messages whose queue id sorts after this one.
    @param limit: at most this many (None: all).
    @return: the messages and whether more follow.
    """
    found = _queuedIds(directory)
    ids = sorted(queueId for queueId in found if queueId > after)
    more = limit is not None and len(ids) > limit
    if limit is not None:
        ids = ids[:limit]
    entries = []
    for queueId in ids:
        state = found[queueId]
        record: QueueRecord | None
        try:
            record = readRecord(os.path.join(directory, state, queueId), queueId)
        except FileNotFoundError:
            try:
                moved = findMessage(directory, queueId)
            except (OSError, ValueError):
                moved = None
            if moved is None:
                continue  # delivered or deleted meanwhile
            state, record = moved
        except (OSError, ValueError) as e:
            entry = summarize(queueId, state, None)
            entry["error"] = f"unreadable envelope: {e}"
            entries.append(entry)
            continue
        entries.append(summarize(queueId, state, record))
    return entries, more


def countStates(directory: str) -> dict[str, int]:
    """How many queue files each state directory of the spool holds."""
    counts: dict[str, int] = {}
    for state in STATES:
        try:
            names = os.listdir(os.path.join(directory, state))
        except FileNotFoundError:
            names = []
        counts[state.value] = len(names)
    return counts


def readMessage(path: str, body: bool) -> bytes:
    """
    A stored message as it is on disk (the message of the queue file at
    C{path}, L{relayd.queue.record.openData}): the whole of it with C{body},
    else its header section (up to and including the line end before the
    empty line, at most L{HEADER_LIMIT} octets).
    """
    with openData(path) as f:
        if body:
            return f.read()
        data = b""
        while len(data) < HEADER_LIMIT:
            chunk = f.read(65536)
            if not chunk:
                break
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[: end + 2]
            if data.startswith(b"\r\n"):
                return b""
        return data[:HEADER_LIMIT]


class MessageNotFound(Exception):
    """L{showMessage}: what is wrong, in one line for relayctl."""


def showMessage(directory: str, queueId: str, body: bool) -> dict[str, Any]:
    """
    What C{relayctl queue show} prints of a queued message: its
    L{summarize} entry with the whole record as C{envelope}
    (L{QueueRecord.toJSON}), and the message.  Blocking; reads only.

    @raise MessageNotFound: when it is not in the queue or unreadable.
    """
    for _ in range(3):
        try:
            found = findMessage(directory, queueId)
        except (OSError, ValueError) as e:
            raise MessageNotFound(f"{queueId}: unreadable envelope: {e}") from None
        if found is None:
            raise MessageNotFound(f"{queueId}: no such message in the queue")
        state, record = found
        entry = summarize(queueId, state, record)
        entry["envelope"] = record.toJSON()
        try:
            message = readMessage(os.path.join(directory, state, queueId), body)
        except FileNotFoundError:
            continue  # moved on meanwhile: look again
        except CorruptRecord as e:
            raise MessageNotFound(f"{queueId}: unreadable queue file: {e}") from None
        except OSError as e:
            raise MessageNotFound(f"{queueId}: cannot read the message: {e.strerror}") from None
        return {"entry": entry, "message": message}
    raise MessageNotFound(f"{queueId}: no such message in the queue")


def matches(entry: dict[str, Any], sender: str | None, recipient: str | None) -> bool:
    """
    Does a message (a L{summarize} entry) match C{relayctl queue ... --all
    --from SENDER --to RECIPIENT}?

    @param sender: the sender's address (case-insensitive; C{"<>"} or C{""}
        for the null sender), or None for any.
    @param recipient: an address, or a domain matching every address at
        it (case-insensitive), that the message is still to be delivered to
        (recipients already delivered or failed do not count); None for any.
    """
    if sender is not None:
        wanted = "" if sender in ("<>", "") else sender.strip("<>").lower()
        if str(entry.get("sender", "")).lower() != wanted:
            return False
    if recipient is not None:
        wanted = recipient.strip("<>").lower()
        pending = [
            str(r["address"]).lower()
            for r in entry.get("recipients", [])
            if r.get("state") not in FINAL
        ]
        if "@" in wanted:
            return wanted in pending
        return any(address.rpartition("@")[2] == wanted for address in pending)
    return True
