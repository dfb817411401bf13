"""
Tests for L{relayd.queue.record}: the typed, versioned envelope record and
the queue file that holds it after the message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from relayd.queue.record import (
    FOOTER_LENGTH,
    BodyType,
    CorruptRecord,
    QueueRecord,
    RecipientRecord,
    RecipientState,
    encodeTrailer,
    evolve,
    openData,
    openRegion,
    readData,
    readRecord,
)

MESSAGE = b"Subject: x\r\n\r\n" + bytes(range(256)) + b"\r\nRQF2 0000000000000000\n"


def record(queueId: str = "0ABC", size: int = len(MESSAGE)) -> QueueRecord:
    return QueueRecord.new(
        queueId,
        "s@example.org",
        ["a@example.com", "b@example.net"],
        1700000000.5,
        size,
        "8BITMIME",
        "192.0.2.1",
        "client.example",
        "alice",
        "submission",
    )


def queueFile(tmp_path: Path, r: QueueRecord | None = None, data: bytes = MESSAGE) -> Path:
    r = r if r is not None else record(size=len(data))
    path = tmp_path / r.queueId
    path.write_bytes(data + encodeTrailer(r, len(data)))
    return path


def test_roundTrip() -> None:
    """A record with every field set comes back equal through JSON."""
    r = dataclasses.replace(
        record(),
        attempts=2,
        nextAttempt=1700000900.0,
        delayWarned=True,
        recipients=(
            RecipientRecord(
                "a@example.com",
                RecipientState.DELIVERED,
                1,
                "250 ok",
                "2.0.0",
                "mx.example",
                1700000100.0,
            ),
            RecipientRecord(
                "b@example.net",
                RecipientState.FAILED,
                2,
                "451 later",
                "4.4.7",
                None,
                1700000200.0,
                expired=True,
            ),
        ),
    )
    text = json.dumps(r.toJSON())
    assert QueueRecord.fromJSON(json.loads(text)) == r
    assert QueueRecord.decode(r.encode()) == r
    assert r.encode().endswith(b"\n") and r.encode().count(b"\n") == 1


def test_new() -> None:
    """A new record: every recipient pending, due at arrival, typed fields."""
    r = record()
    assert [(x.address, x.state, x.attempts) for x in r.recipients] == [
        ("a@example.com", RecipientState.PENDING, 0),
        ("b@example.net", RecipientState.PENDING, 0),
    ]
    assert r.body is BodyType.EIGHT_BIT_MIME
    assert r.nextAttempt == r.arrival
    assert r.toJSON()["version"] == 2
    assert r.waiting() == list(r.recipients)
    assert not r.smtputf8
    utf8 = QueueRecord.new(
        "0A", "", ["x@y"], 0.0, 0, "8BITMIME", "", None, None, "relay", smtputf8=True
    )
    assert utf8.smtputf8
    assert QueueRecord.decode(utf8.encode()).smtputf8
    with pytest.raises(ValueError):
        QueueRecord.new("0A", "", ["x@y"], 0.0, 0, "BINARYMIME", "", None, None, "relay")


def test_frozen() -> None:
    """Records are values: changing one means making a new one."""
    r = record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sender = "other@example.org"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.recipients[0].state = RecipientState.DELIVERED  # type: ignore[misc]


# A value unlike record()'s for each field type (as the module spells it).
OTHER_VALUES = {
    "str": "other",
    "int": 7,
    "float": 9.5,
    "bool": True,
    "str | None": "set",
    "float | None": 3.25,
    "tuple[str, ...] | None": ("SUCCESS",),
    "RecipientState": RecipientState.DEFERRED,
    "BodyType": BodyType.SEVEN_BIT,
}


@pytest.mark.parametrize("cls", [QueueRecord, RecipientRecord])
def test_evolve(cls) -> None:
    """
    L{evolve} makes what C{dataclasses.replace} makes, field by field,
    leaves the original alone, and refuses a name that is not a field.
    """
    original = record() if cls is QueueRecord else record().recipients[0]
    for f in dataclasses.fields(cls):
        if f.name == "recipients":
            value = (RecipientRecord("c@example.com"),)
        else:
            value = OTHER_VALUES[f.type]
        assert getattr(original, f.name) != value, f.name
        made = evolve(original, **{f.name: value})
        assert made == dataclasses.replace(original, **{f.name: value}), f.name
        assert getattr(made, f.name) == value
        assert made.__dict__ == {**original.__dict__, f.name: value}
        assert type(made) is cls
    assert evolve(original) == original
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(original).attempts = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        evolve(original, nextattempt=1.0)
    assert original == (record() if cls is QueueRecord else record().recipients[0])


def test_finalStates() -> None:
    """Delivered and failed are final; pending and deferred wait."""
    assert [s for s in RecipientState if s.final] == [
        RecipientState.DELIVERED,
        RecipientState.FAILED,
    ]
    r = record().withRecipients(
        [
            RecipientRecord("a@x", RecipientState.DELIVERED),
            RecipientRecord("b@x", RecipientState.DEFERRED),
        ]
    )
    assert [x.address for x in r.waiting()] == ["b@x"]


def test_readsVersion1() -> None:
    """
    A version-1 envelope, as the spool before queue files wrote it, reads
    with its recipients' states (their unused next_attempt ignored).
    """
    v1 = {
        "version": 1,
        "queue_id": "0ABC",
        "sender": "",
        "arrival": 5.0,
        "size": 3,
        "body": "7BIT",
        "client": "::1",
        "helo": None,
        "user": None,
        "listener": "relay",
        "attempts": 1,
        "next_attempt": 9.0,
        "delay_warned": True,
        "recipients": [
            {
                "address": "a@x",
                "state": "deferred",
                "attempts": 1,
                "next_attempt": None,
                "last_reply": "451 4.7.1 later",
                "status": "4.7.1",
                "remote": "mx",
                "last_attempt": 6.0,
            },
            {
                "address": "b@x",
                "state": "delivered",
                "attempts": 1,
                "next_attempt": None,
                "last_reply": "250 ok",
            },
        ],
    }
    r = QueueRecord.fromJSON(v1)
    assert (r.version, r.attempts, r.nextAttempt, r.delayWarned) == (1, 1, 9.0, True)
    assert [(x.state, x.lastReply) for x in r.recipients] == [
        (RecipientState.DEFERRED, "451 4.7.1 later"),
        (RecipientState.DELIVERED, "250 ok"),
    ]
    assert r.toJSON()["version"] == 2


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("version"),
        lambda d: d.update(version=3),
        lambda d: d.update(version=True),
        lambda d: d.pop("queue_id"),
        lambda d: d.update(sender=None),
        lambda d: d.update(size="12"),
        lambda d: d.update(size=-1),
        lambda d: d.update(size=True),
        lambda d: d.update(arrival="now"),
        lambda d: d.update(body="BINARYMIME"),
        lambda d: d.update(recipients={"a": 1}),
        lambda d: d.update(recipients=["a@x"]),
        lambda d: d["recipients"][0].update(state="lost"),
        lambda d: d["recipients"][0].pop("address"),
        lambda d: d["recipients"][0].update(attempts=1.5),
        lambda d: d.update(delay_warned="yes"),
        lambda d: d.update(delay_warned=1),
        lambda d: d.update(arrival=True),
        lambda d: d.update(attempts=1.0),
        lambda d: d.update(client=5),
        lambda d: d["recipients"][0].update(attempts=True),
        lambda d: d["recipients"][0].update(last_attempt=False),
    ],
)
def test_corrupt(change) -> None:
    """Anything but a sound record raises L{CorruptRecord}, a ValueError."""
    data = record().toJSON()
    change(data)
    with pytest.raises(CorruptRecord):
        QueueRecord.fromJSON(data)


def test_corruptNotJSON() -> None:
    for value in (b"{not json", b"[1, 2]", b'"text"', b""):
        with pytest.raises(CorruptRecord):
            QueueRecord.decode(value)
    assert issubclass(CorruptRecord, ValueError)


def test_queueFile(tmp_path: Path) -> None:
    """
    The message comes first, byte-exact (even when it ends with what looks
    like a footer), then the record, then the footer.
    """
    path = queueFile(tmp_path)
    assert readRecord(str(path), "0ABC") == record()
    assert readData(str(path)) == MESSAGE
    raw = path.read_bytes()
    assert raw.startswith(MESSAGE)
    assert raw.endswith(b"RQF2 %016X\n" % len(MESSAGE))
    assert len(raw) == len(MESSAGE) + len(record().encode()) + FOOTER_LENGTH
    with openData(str(path)) as f:
        assert f.readline() == b"Subject: x\r\n"
        assert f.read() == MESSAGE[len(b"Subject: x\r\n") :]
        assert f.read() == b""


def test_emptyMessage(tmp_path: Path) -> None:
    path = queueFile(tmp_path, data=b"")
    assert readData(str(path)) == b""
    assert readRecord(str(path)).size == 0


@pytest.mark.parametrize("recipients", [1, 2, 300])
@pytest.mark.parametrize("size", [0, 10, 5000, 70000])
def test_recordLongerOrShorterThanOneRead(tmp_path: Path, recipients: int, size: int) -> None:
    """
    readRecord reads the end of the file once and takes the record from
    it; a record longer than that read (many recipients), or a file
    shorter than it, reads right too.
    """
    data = (b"x" * 99 + b"\n") * (size // 100) + b"y" * (size % 100)
    r = QueueRecord.new(
        "0LONG",
        "s@example.org",
        [f"rcpt{i}@example.com" for i in range(recipients)],
        1700000000.5,
        len(data),
        "7BIT",
        "192.0.2.1",
        None,
        None,
        "relay",
    )
    path = queueFile(tmp_path, r, data)
    assert readRecord(str(path), "0LONG") == r
    assert readData(str(path)) == data
    with openRegion(str(path), len(data)) as f:
        assert f.read() == data


def test_trailerChecksSize() -> None:
    """The footer and the record must agree on where the message ends."""
    with pytest.raises(ValueError):
        encodeTrailer(record(size=3), 4)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # torn: the footer's last octet
        lambda raw: raw[: len(MESSAGE) + 10],  # torn in the record
        lambda raw: raw[:10],  # shorter than a footer
        lambda raw: raw[:-FOOTER_LENGTH] + b"RQF2 +000000000000001\n",  # not hex
        lambda raw: raw[:-FOOTER_LENGTH] + b"RQF2 FFFFFFFFFFFFFFFF\n",  # past the end
        lambda raw: raw[:-FOOTER_LENGTH] + b"RQF2 0000000000000001\n",  # not where the record is
        lambda raw: raw.replace(b'"size": %d' % len(MESSAGE), b'"size": 1'),  # sizes disagree
    ],
)
def test_damagedQueueFile(tmp_path: Path, damage) -> None:
    """A damaged queue file raises L{CorruptRecord} for the record and the data."""
    path = queueFile(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptRecord):
        readRecord(str(path))
    if path.stat().st_size < FOOTER_LENGTH:
        with pytest.raises(CorruptRecord):
            openData(str(path))


def test_wrongId(tmp_path: Path) -> None:
    path = queueFile(tmp_path)
    with pytest.raises(CorruptRecord):
        readRecord(str(path), "0OTHER")


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        readRecord(str(tmp_path / "0GONE"))
    with pytest.raises(FileNotFoundError):
        openData(str(tmp_path / "0GONE"))


def test_openRegion(tmp_path: Path) -> None:
    """L{openRegion} reads the first octets only, however they are read."""
    path = tmp_path / "f"
    path.write_bytes(b"line one\r\nline two\r\nrecord\n")
    with openRegion(str(path), 20) as f:
        assert list(f) == [b"line one\r\n", b"line two\r\n"]
    with openRegion(str(path), 12) as f:
        assert f.read(100) == b"line one\r\nli"
        assert f.read(100) == b""
    with openRegion(str(path), 1000) as f:
        assert f.read() == path.read_bytes()
