"""
Where relayd's config file is, for every command (C{twistd relayd},
C{relayctl}, C{relayd-sendmail}), and relayd's version.

The order is the same everywhere: C{--config FILE} when given, else the
file named by the environment variable C{RELAYD_CONFIG}, else
L{DEFAULT_CONFIG}.  A file named by C{RELAYD_CONFIG} that does not exist
is an error, not a reason to fall back to the default: acting on another
instance than the one meant (say, production instead of a test instance)
is worse than stopping.

Blocking and free of Twisted: C{relayd-sendmail} imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "ConfigNotFound",
    "RelaydPaths",
    "configPath",
    "relaydPaths",
    "version",
    "versionLine",
]

CONFIG_ENV = "RELAYD_CONFIG"
"""The environment variable naming relayd's config file."""

DEFAULT_CONFIG = "/etc/relayd/relayd.toml"
"""The config file read when neither C{--config} nor L{CONFIG_ENV} names one."""


class ConfigNotFound(Exception):
    """
    No config file where it was looked for; C{str()} says where that was
    and how to name one.

    @ivar tried: the paths looked at, each with why it was looked at.
    """

    def __init__(self, tried: list[tuple[str, str]]) -> None:
        super().__init__(tried)
        self.tried = tried

    def __str__(self) -> str:
        places = ", ".join(f"{path} ({why})" for path, why in self.tried)
        return (
            f"config file not found: tried {places}; "
            f"name one with --config FILE or {CONFIG_ENV}=FILE"
        )


def configPath(
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
    mustExist: bool = True,
) -> str:
    """
    The config file to read.

    @param explicit: C{--config}, or None.
    @param environ: the environment (C{os.environ} when None).
    @param mustExist: raise L{ConfigNotFound} when the chosen file does not
        exist (else return its path anyway, for a caller that reports
        missing files itself).
    @raise ConfigNotFound: naming what was tried.
    """
    env = os.environ if environ is None else environ
    if explicit is not None:
        path, why = explicit, "--config"
    elif env.get(CONFIG_ENV):
        path, why = env[CONFIG_ENV], f"{CONFIG_ENV}"
    else:
        path, why = DEFAULT_CONFIG, f"the default; {CONFIG_ENV} is not set"
    if mustExist and not os.path.exists(path):
        raise ConfigNotFound([(path, why)])
    return path


def version() -> str:
    """relayd's version, from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distributionVersion

    try:
        return distributionVersion("relayd")
    except PackageNotFoundError:
        return "unknown"


def versionLine(program: str) -> str:
    """
    What C{PROGRAM --version} prints: C{"relayctl (relayd) 0.1.0"}, or
    C{"relayd 0.1.0"} for relayd itself.
    """
    if program == "relayd":
        return f"relayd {version()}"
    return f"{program} (relayd) {version()}"


class RelaydPaths:
    """
    Where a relayd keeps its things, read from its config file without the
    full check (C{relayd-sendmail} needs only this): the spool, the control
    socket and the maildrop, resolved against the file's folder as
    L{relayd.config.load} resolves them.
    """

    def __init__(self, config: str, spool: str, socket: str, maildrop: str) -> None:
        self.config = config
        self.spool = spool
        self.socket = socket
        self.maildrop = maildrop


def relaydPaths(path: str) -> RelaydPaths:
    """
    Read L{RelaydPaths} from the config file at C{path}.

    @raise ValueError: it cannot be read or lacks C{spool.directory}; the
        text names the file and the problem.
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))

    def get(section: str, key: str) -> str | None:
        table = raw.get(section, {})
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or not value:
            return None
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    spool = get("spool", "directory")
    if spool is None:
        raise ValueError(f"{path}: spool.directory: missing (required)")
    return RelaydPaths(
        path,
        spool,
        get("control", "socket") or os.path.join(spool, "control.sock"),
        get("maildrop", "directory") or os.path.join(spool, "maildrop"),
    )
