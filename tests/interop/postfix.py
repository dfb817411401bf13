"""
Postfix for interop tests, set up the one way every test here needs it:
Postfix's C{smtp-sink} as relayd's next hop (L{relaydToSmtpSink},
L{waitDump}), and L{bench.systems.PrivatePostfix} (the benchmark's instance: its
own main.cf, queue and log, smtpd on a free loopback port, relaying to one
relayhost) in a folder its daemons (user postfix) can reach, started in a
thread and stopped at cleanup.

It stays in C{bench/}, which is not installed with relayd: a policy
author's tests have no Postfix to drive, so it is not part of
L{relayd.testing}.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from bench.systems import PrivatePostfix
from relayd.testing import InProcessRelayd, PostfixSink, TestSetup

__all__ = [
    "PrivatePostfix",
    "postfixDirectory",
    "relaydToSmtpSink",
    "startPostfix",
    "waitArrived",
    "waitDump",
]


def postfixDirectory(testCase: unittest.TestCase, prefix: str) -> Path:
    """
    A temporary folder for a private Postfix and its peers, removed at
    cleanup; fails the test when Postfix is not installed (C{scripts/test}
    installs it), never skips.
    """
    if shutil.which("postfix") is None:
        testCase.fail("Postfix is not installed; scripts/test installs it")
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    testCase.addCleanup(shutil.rmtree, directory, True)
    directory.chmod(0o755)  # Postfix's daemons run as user postfix
    return directory


@defer.inlineCallbacks
def startPostfix(testCase: unittest.TestCase, directory: Path, relayhostPort: int):
    """
    Start a private Postfix in C{directory/postfix} that relays everything
    to 127.0.0.1:C{relayhostPort}; stopped at cleanup.

    @return: a Deferred firing with the L{PrivatePostfix} (its C{port} is
        its smtpd's).
    """
    postfix = PrivatePostfix(directory / "postfix", relayhostPort)
    yield deferToThread(postfix.start)
    testCase.addCleanup(deferToThread, postfix.stop)
    return postfix


@defer.inlineCallbacks
def waitArrived(sink, postfix: PrivatePostfix, seconds: float = 30.0):
    """
    Wait until C{sink} (a L{relayd.testing.SinkServer}) holds a message;
    fail with Postfix's log when none came within C{seconds}.
    """
    for _ in range(int(seconds / 0.05)):
        if sink.messages:
            return
        yield deferLater(reactor, 0.05, lambda: None)
    log = postfix.logPath.read_text(errors="replace") if postfix.logPath.exists() else ""
    raise AssertionError(f"nothing reached the sink; Postfix's log:\n{log}")


@defer.inlineCallbacks
def relaydToSmtpSink(testCase: unittest.TestCase, prefix: str, **setupOptions):
    """
    Postfix's C{smtp-sink} (L{relayd.testing.PostfixSink}) and an
    in-process relayd that delivers to it (L{TestSetup.relayingTo}, with
    C{setupOptions}), in a temporary folder; all stopped and removed at
    cleanup.

    @return: a Deferred firing with C{(relayd, sink)}.
    """
    directory = tempfile.mkdtemp(prefix=prefix)
    testCase.addCleanup(shutil.rmtree, directory, True)
    sink = PostfixSink(directory)
    testCase.addCleanup(sink.stop)
    setup = TestSetup.relayingTo(directory + "/relayd", sink.port, **setupOptions)
    relayd = yield InProcessRelayd.start(setup)
    testCase.addCleanup(relayd.stop)
    return relayd, sink


@defer.inlineCallbacks
def waitDump(sink: PostfixSink, marker: bytes, seconds: float = 20.0):
    """
    Wait until one of C{smtp-sink}'s dumps holds C{marker}: it writes a
    dump when the session ends, which relayd's idle connection does after
    C{idle_timeout}.  Fails after C{seconds}.

    @return: a Deferred firing with the dumps (L{PostfixSink.messages}).
    """
    for _ in range(int(seconds / 0.05)):
        dumps = sink.messages()
        if any(marker in dump for dump in dumps):
            return dumps
        yield deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"no dump with {marker!r} within {seconds}s: {sink.messages()!r}")
