"""
C{twistd relayd}: command-line options and L{makeService}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from relayd.config import ConfigError, load

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "relayd: a durable ESMTP smart host.  Reads a TOML config file; "
        "see etc/relayd.toml for every key."
    )
    optParameters = [
        ["config", "c", "/etc/relayd/relayd.toml", "Path to the TOML configuration file."],
    ]


def makeService(options: Options):  # type: ignore[no-untyped-def]
    """
    Read the config and build the service tree.  A bad config ends the
    process here with one line on stderr and exit status 1, no traceback.
    """
    from twisted.internet import reactor

    from relayd.service import buildService

    try:
        config = load(options["config"])
        return buildService(config, reactor)
    except ConfigError as e:
        sys.stderr.write(f"relayd: config error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
