"""
Relaying in session from relayd's receiving processes (C{[server]
processes}, L{relayd.receivers}): a session in any process opens its own
upstream session, and nothing passes through the spool.
"""

from __future__ import annotations

import os
import re

from relayd.testing import TestSetup
from relayd.testing.process import (  # noqa: F401 (fixture)
    RelaydProcess,
    relaydProcesses,
    waitFor,
)
from tests.test_receivers import (  # noqa: F401 (fixture)
    PROCESSES,
    sendMany,
    sink,
    startWithReceivers,
    tokensAt,
)


def test_receiversRelayInSession(tmp_path, sink, relaydProcesses) -> None:  # noqa: F811
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={
            "server": {"processes": PROCESSES},
            "delivery": {"enabled": False},
            "timeouts": {"shutdown_sessions": 5},
        },
    )
    with open(setup.configPath, "a") as f:
        f.write(
            '\n[[routes]]\ndomains = ["*"]\nmode = "passthrough"\nfallback = "tempfail"\n'
            f'[[routes.hops]]\nhost = "127.0.0.1"\nport = {sink.port}\ntls = "none"\n'
        )
    relayd = startWithReceivers(setup, tmp_path / "relayd.log", relaydProcesses)

    accepted = sendMany(relayd.port, 60)
    assert len(accepted) == 60, relayd.log()
    # Accepted means smtp-sink took it: each is there (smtp-sink writes a
    # dump when relayd's upstream session ends, just after the reply).
    waitFor(lambda: tokensAt(sink) >= set(accepted), 30, "not all at the sink", relayd.log)
    # Log lines are written in batches (relayd.ops.logs): wait for them.
    relayed = re.compile(r"\[receiver-\d relayd\.smtpd#info\] \w+: passthrough to ")
    waitFor(lambda: relayed.search(relayd.log(10**7)), 10, "no receiver relayed", relayd.log)
    text = relayd.log(10**7)
    assert " queued from=" not in text
    for state in ("tmp", "incoming", "active", "deferred"):
        assert os.listdir(os.path.join(setup.spoolPath, state)) == []
