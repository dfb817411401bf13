"""
C{twistd relayd}: command-line options and L{makeService}.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from twisted.python import usage

from relayd.config import ConfigError, load

if TYPE_CHECKING:
    from relayd.service import RelaydService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "relayd: a durable ESMTP smart host.  Reads a TOML config file; "
        "see etc/relayd.toml for every key."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            (
                "Path to the TOML configuration file (default: $RELAYD_CONFIG, "
                "else /etc/relayd/relayd.toml)."
            ),
        ],
    ]
    optFlags = [
        [
            "list-policies",
            None,
            (
                "Print the installed policies (entry points of group relayd.policies) "
                "with their distribution and version, and exit."
            ),
        ],
    ]

    def opt_version(self) -> None:
        """Print relayd's version and exit."""
        from relayd.configfile import versionLine

        sys.stdout.write(versionLine("relayd") + "\n")
        sys.stdout.flush()
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["list-policies"]:
            from relayd.policy import describeInstalled

            rows = describeInstalled()
            widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_HEADINGS)]
            for row in [_HEADINGS, *rows]:
                line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                sys.stdout.write(line.rstrip() + "\n")
            sys.stdout.flush()
            raise SystemExit(0)


_HEADINGS = ("NAME", "DISTRIBUTION", "VERSION", "OBJECT")


def makeService(options: Options) -> RelaydService:
    """
    Read the config and build the service tree.  A bad config ends the
    process here with one line on stderr and exit status 1, no traceback.

    twistd has not installed a reactor yet unless C{--reactor} chose one:
    relayd's is installed first (L{relayd.reactor.globalReactor}).
    """
    from relayd.configfile import ConfigNotFound, configPath
    from relayd.ops.logs import observerFor
    from relayd.reactor import globalReactor
    from relayd.service import buildService

    reactor = globalReactor()

    try:
        # An explicit --config that is missing is load()'s usual config
        # error; otherwise the error says where relayd looked.
        explicit = options["config"]
        config = load(configPath(explicit, mustExist=explicit is None))
        service = buildService(config, reactor)
        service.installSignalHandlers = True
        service.freezeHeap = True
        # [logging] format: twistd's text, or relayd's JSON lines.
        service.logObserver = observerFor(config, options.parent)
        return service
    except ConfigNotFound as e:
        sys.stderr.write(f"relayd: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    except ConfigError as e:
        sys.stderr.write(f"relayd: config error: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
