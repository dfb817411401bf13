"""
relayd's reactor (L{relayd.reactor}): Twisted's epoll reactor with one log
context per poll instead of one per event.

Each behaviour case runs in a fresh Python process, once on Twisted's own
epoll reactor and once on relayd's, and the two must log the same events
with the same C{system}: legacy log calls inside an event carry the
connection's log prefix, an exception in a protocol is logged with it and
drops only that connection, a C{logPrefix} that raises is reported as
Twisted reports it, and a timed call after the events is outside their
context again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from relayd import reactor as relaydReactor

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, socket, sys, threading

if sys.argv[1] == "relayd":
    from relayd.reactor import install
    assert install()
from twisted.internet import protocol, reactor
from twisted.internet.abstract import FileDescriptor
from twisted.python import log

events = []


def observe(event):
    if event.get("isError"):
        failure = event.get("failure")
        events.append(["error", event.get("system"), str(failure.value) if failure else ""])
    else:
        text = " ".join(map(str, event.get("message", ())))
        if text.startswith(("got", "pipe", "later")):
            events.append(["msg", event.get("system"), text])


log.addObserver(observe)


class Upper(protocol.Protocol):
    def dataReceived(self, data):
        log.msg("got", data.decode())
        if data == b"boom":
            raise RuntimeError("boom")
        if data == b"again":
            reactor.callLater(0, log.msg, "later")
        self.transport.write(data.upper())


class Pipe(FileDescriptor):
    def __init__(self, fd):
        FileDescriptor.__init__(self, reactor)
        self.fd = fd

    def fileno(self):
        return self.fd

    def logPrefix(self):
        raise ValueError("no prefix")

    def doRead(self):
        log.msg("pipe", os.read(self.fd, 100).decode())
        reactor.removeReader(self)
        reactor.callLater(0.05, reactor.stop)


port = reactor.listenTCP(0, protocol.Factory.forProtocol(Upper), interface="127.0.0.1")
readEnd, writeEnd = os.pipe()
os.set_blocking(readEnd, False)
reactor.addReader(Pipe(readEnd))
answers = {}


def client():
    for word in ("hello", "boom", "again"):
        with socket.create_connection(("127.0.0.1", port.getHost().port), 10) as s:
            s.sendall(word.encode())
            answers[word] = s.recv(100).decode()
    os.write(writeEnd, b"ping")


reactor.callWhenRunning(threading.Thread(target=client, daemon=True).start)
reactor.callLater(20, reactor.stop)
reactor.run()
name = type(reactor).__module__ + "." + type(reactor).__qualname__
print(json.dumps({"reactor": name, "answers": answers, "events": events}))
"""


def probe(which: str) -> dict:
    """Run L{PROBE} on C{which} reactor ("twisted" or "relayd")."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, which],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=REPO,
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_sameEventsAndContextAsTwisted() -> None:
    stock, relayd = probe("twisted"), probe("relayd")
    assert stock["reactor"] == "twisted.internet.epollreactor.EPollReactor"
    assert relayd["reactor"] == "relayd.reactor.EPollReactor"
    # The connection that raised was dropped; the reactor went on serving.
    expected = {"hello": "HELLO", "boom": "", "again": "AGAIN"}
    assert stock["answers"] == relayd["answers"] == expected
    assert relayd["events"] == stock["events"]
    assert relayd["events"] == [
        ["msg", "Upper,0,127.0.0.1", "got hello"],
        ["msg", "Upper,1,127.0.0.1", "got boom"],
        ["error", "Upper,1,127.0.0.1", "boom"],
        ["msg", "Upper,2,127.0.0.1", "got again"],
        ["msg", "-", "later"],
        ["error", "(buggy logPrefix method)", "no prefix"],
        ["msg", "(buggy logPrefix method)", "pipe ping"],
    ]


def test_writtenAgainstThisTwisted() -> None:
    """
    The installed Twisted's C{EPollReactor.doPoll} is the one relayd's
    replaces.  When this fails, Twisted changed it: read the new one,
    carry the change into L{relayd.reactor.EPollReactor} if it matters,
    and renew C{_TWISTED_DOPOLL}.  Until then relayd runs on Twisted's
    own reactor (L{relayd.reactor.install} declines).
    """
    assert relaydReactor.matchesTwisted()


def test_installLeavesAChosenReactor() -> None:
    """A reactor installed before (twistd --reactor, a test runner) stays."""
    code = (
        "from twisted.internet import pollreactor; pollreactor.install()\n"
        "from relayd.reactor import install; print(install())\n"
        "from twisted.internet import reactor; print(type(reactor).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    assert out == ["False", "PollReactor"]


def test_installDeclinesAnotherTwisted(monkeypatch) -> None:
    """With a C{doPoll} it was not written against, relayd keeps Twisted's reactor."""
    monkeypatch.setattr(relaydReactor, "_TWISTED_DOPOLL", "0" * 64)
    assert not relaydReactor.matchesTwisted()
    # Declined before it looks at the global reactor: nothing installed.
    monkeypatch.delitem(sys.modules, "twisted.internet.reactor", raising=False)
    assert relaydReactor.install() is False
    assert "twisted.internet.reactor" not in sys.modules
