"""
relayd's configuration: a TOML file read with the standard library's
C{tomllib}, checked against a schema and turned into frozen values.

Every problem becomes one L{ConfigError} naming the file, the key and what is
wrong, so that C{twistd relayd} can stop with a single clear line instead of
a traceback.  Relative paths in the file are relative to the directory that
holds the file, so a config and its certificates can move together.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relayd.envelope import DEFAULT_HEADER_SIZE

__all__ = [
    "ConfigError",
    "Config",
    "ListenerConfig",
    "load",
    "LISTENER_MODES",
    "CONTROL_SOCKET_NAME",
    "MAILDROP_NAME",
]

CONTROL_SOCKET_NAME = "control.sock"
"""The control socket's name inside the spool directory, by default."""

MAILDROP_NAME = "maildrop"
"""The maildrop's name inside the spool directory, by default."""

LISTENER_MODES = ("relay", "submission", "submissions")
"""
C{relay}: port 25 style, STARTTLS offered when TLS is configured, AUTH
optional; C{submission}: port 587, STARTTLS, AUTH required before MAIL;
C{submissions}: port 465, implicit TLS, AUTH required before MAIL.
"""


INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
"""
The TLS 1.2 cipher suites of Mozilla's "intermediate" profile (Server Side
TLS guidelines, version 5.7), as an OpenSSL cipher string: key exchange
with forward secrecy (ECDHE, DHE) and AEAD ciphers (AES-GCM,
ChaCha20-Poly1305) only, so no static RSA key exchange, no CBC and no SHA-1
MAC.  The DHE suites need Diffie-Hellman parameters, which relayd does not
load, so a listener negotiates the ECDHE ones (every TLS 1.2 client has
them).  TLS 1.3's suites are OpenSSL's (all AEAD with forward secrecy);
OpenSSL sets them apart from this string.  The listeners' default
(C{[tls] ciphers}) and that of outbound C{required} and C{verify} TLS.
"""

OPPORTUNISTIC_CIPHERS = (
    "ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES:DH+AES:"
    "RSA+AESGCM:RSA+AES:!aNULL:!eNULL:!MD5:!DSS"
)
"""
Outbound opportunistic TLS's default (C{[tls] opportunistic_ciphers}):
forward secrecy and AEAD first, then what old servers still only have (CBC,
static RSA key exchange), as Twisted's own default did.  With opportunistic
TLS the certificate is not checked, so the choice of suites guards against
passive eavesdropping only; a legacy suite still beats plain text, and a
handshake that fails on suites relayd refuses defers the hop (relayd never
retries it in plain text), so the mail would wait for a server that may
never change.  Postfix makes the same trade (C{smtp_tls_ciphers = medium}
for its C{may} level).
"""

TLS_MIN_VERSIONS = ("TLSv1.2", "TLSv1.3")
"""
C{[tls] min_version}'s values.  Nothing older: RFC 8996 deprecates TLS 1.0
and 1.1.
"""


class ConfigError(Exception):
    """
    A configuration problem: which file, which key, what is wrong.

    C{str()} gives the one line printed at startup.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        super().__init__(path, key, problem)
        self.path = path
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else self.path
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class ListenerConfig:
    """
    One C{[[listeners]]} table.

    @ivar proxyFrom: with C{proxyProtocol}, the networks of the load
        balancers allowed to send a PROXY header (L{relayd.smtp.proxy}).
    """

    name: str
    endpoint: str
    mode: str
    proxyProtocol: bool = False
    proxyFrom: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole validated configuration.  See C{etc/relayd.toml}."""

    path: str
    hostname: str
    banner: str
    processes: int
    listeners: tuple[ListenerConfig, ...]
    tlsCertificate: str | None
    tlsKey: str | None
    usersFile: str | None
    authMaxFailures: int
    authFailureDelay: float
    authThreads: int
    authFailureWindow: int
    authClientFailureLimit: int
    authUserFailureLimit: int
    spoolDirectory: str
    spoolReserveBytes: int
    spoolThreads: int
    spoolJournal: bool
    messageSize: int
    maxHeaderSize: int
    maxHops: int
    maxRecipients: int
    maxConnections: int
    maxConnectionsPerClient: int
    maxErrors: int
    timeoutCommand: float
    timeoutData: float
    dataDeadline: float
    dataMinRate: float
    timeoutClose: float
    timeoutProxyHeader: float
    shutdownSessions: float
    shutdownDeliveries: float
    policyChain: tuple[str, ...]
    policyTimeout: float
    policyOptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: tuple[Any, ...] = ()
    deliveryEnabled: bool = True
    deliveryPort: int = 25
    mxTls: str = "opportunistic"
    caFile: str | None = None
    mtaSts: bool = True
    mtaStsPort: int = 443
    mtaStsTimeout: float = 60.0
    tlsrpt: bool = False
    tlsrptOrganization: str | None = None
    tlsrptContact: str | None = None
    resolvers: tuple[str, ...] = ()
    resolverPort: int = 53
    dnsTimeout: float = 5.0
    dane: bool = False
    deliveryConcurrency: int = 100
    perDestination: int = 20
    messagesPerConnection: int = 100
    idleTimeout: float = 2.0
    reuseTimeLimit: float = 300.0
    connectTimeout: float = 30.0
    commandTimeout: float = 300.0
    dataTimeout: float = 600.0
    retryInitial: float = 300.0
    retryMax: float = 4200.0
    lifetime: float = 432000.0
    delayWarning: float = 14400.0
    sweepInterval: float = 60.0
    postmaster: str | None = None
    metricsEndpoint: str = ""
    logFormat: str = "text"
    logLevel: str = "info"
    controlSocket: str = ""
    tlsCiphers: str = INTERMEDIATE_CIPHERS
    tlsMinVersion: str = "TLSv1.2"
    tlsOpportunisticCiphers: str = OPPORTUNISTIC_CIPHERS
    deliveryProcesses: int = 0
    """Delivery processes around the queue manager (L{relayd.delivery.processes});
    0: the queue manager delivers itself."""
    maildropDirectory: str = ""
    maildropInterval: float = 5.0
    maildropListener: str | None = None


# --- schema -----------------------------------------------------------------


class _Key:
    """One key's expected type, default and extra check."""

    def __init__(
        self,
        kind: type | tuple[type, ...],
        default: Any = None,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.kind = kind
        self.default = default
        self.required = required
        self.check = check


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _nonNegative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _atLeast(least: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= least else f"must be at least {least}"

    return check


def _oneOf(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(choices)} (got {value!r})"

    return check


def _nonEmpty(value: Any) -> str | None:
    return None if str(value).strip() else "must not be empty"


def _stringList(value: Any) -> str | None:
    if all(isinstance(v, str) and v for v in value):
        return None
    return "must be a list of non-empty strings"


_NUMBER = (int, float)

TLS_MODES = ("none", "opportunistic", "required", "verify")
"""Outbound TLS policies, see L{relayd.delivery.client}."""


def _cipherString(value: Any) -> str | None:
    from relayd.certificates import cipherProblem

    return cipherProblem(value)


LOG_FORMATS = ("text", "json")
"""Log line formats, see L{relayd.ops.logs}."""

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
"""The least severe level logged, see L{relayd.ops.logs}."""


def _processes(value: int) -> int:
    """
    How many processes receive mail (C{[server] processes}): 0 means one
    per CPU core.  Whatever the number, connection limits and rate
    counters kept in memory are the whole relayd's: the queue manager
    keeps them for every process (L{relayd.receivers}).
    """
    return max(1, os.cpu_count() or 1) if value == 0 else value


def _autoOrCount(value: Any) -> str | None:
    if value == "auto" or (isinstance(value, int) and value >= 0):
        return None
    return 'must be "auto" or a number, 0 or more'


def _deliveryProcesses(value: int | str, processes: int) -> int:
    """
    How many delivery processes (C{[delivery] processes}): as configured,
    or with C{"auto"} as many as there are receiving processes if there is
    more than one (a single process does everything, as before).
    """
    if isinstance(value, int):
        return value
    return processes if processes > 1 else 0


def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a port number (1-65535)"


_SCHEMA: dict[str, dict[str, _Key]] = {
    "server": {
        "hostname": _Key(str),
        "banner": _Key(str, "ESMTP relayd"),
        # Receiving processes sharing the listening sockets (relayd.receivers);
        # 0: one per CPU core.
        "processes": _Key(int, 0, check=_nonNegative),
    },
    "tls": {
        "certificate": _Key(str),
        "key": _Key(str),
        # Versions and suites (DESIGN section 4, rule 10): for the listeners
        # and outbound required/verify TLS ciphers, for all outbound TLS
        # min_version; outbound opportunistic TLS has its own, wider suites.
        "ciphers": _Key(str, INTERMEDIATE_CIPHERS, check=_cipherString),
        "min_version": _Key(str, "TLSv1.2", check=_oneOf(*TLS_MIN_VERSIONS)),
        "opportunistic_ciphers": _Key(str, OPPORTUNISTIC_CIPHERS, check=_cipherString),
    },
    "auth": {
        "users_file": _Key(str),
        "max_failures": _Key(int, 3, check=_positive),
        "failure_delay": _Key(_NUMBER, 1.0, check=_nonNegative),
        "threads": _Key(int, 2, check=_positive),
        # Across connections (relayd.smtp.auth.Lockout): failures per client
        # address (IPv6: /64) and per user name at that address, in fixed
        # windows; above a limit AUTH gets 454 4.7.0 until the window ends.
        "failure_window": _Key(int, 900, check=_positive),
        "client_failure_limit": _Key(int, 30, check=_nonNegative),
        "user_failure_limit": _Key(int, 10, check=_nonNegative),
    },
    "spool": {
        "directory": _Key(str, required=True),
        "reserve_bytes": _Key(int, 100 * 1024 * 1024, check=_nonNegative),
        "threads": _Key(int, 4, check=_positive),
        "journal": _Key(bool, True),
    },
    "limits": {
        "message_size": _Key(int, 35 * 1024 * 1024, check=_positive),
        # The header section is read whole or the message refused (552
        # 5.3.4), so that no policy decides on part of it; relayd's own
        # Received: field must fit.
        "header_size": _Key(int, DEFAULT_HEADER_SIZE, check=_atLeast(1024)),
        # Received: fields allowed, relayd's own included: more is a mail
        # loop (554 5.4.6).  Postfix's hopcount_limit.
        "hops": _Key(int, 50, check=_positive),
        "recipients": _Key(int, 100, check=_positive),
        "connections": _Key(int, 1000, check=_positive),
        "connections_per_client": _Key(int, 20, check=_positive),
        "errors": _Key(int, 20, check=_positive),
    },
    "timeouts": {
        # RFC 5321 section 4.5.3.2.7: the server waits at least 5 minutes
        # for the next command (here: for the whole command line, however
        # it is trickled); 4.5.3.2.5 gives 3 minutes per DATA block.
        "command": _Key(_NUMBER, 300.0, check=_positive),
        "data": _Key(_NUMBER, 180.0, check=_positive),
        # A whole DATA transfer: this many seconds, plus one second for
        # every data_min_rate octets received (Postfix's smtpd_timeout with
        # smtpd_per_record_deadline and smtpd_min_data_rate).
        "data_deadline": _Key(_NUMBER, 300.0, check=_positive),
        "data_min_rate": _Key(_NUMBER, 500, check=_nonNegative),
        # Once relayd has decided to close a session (QUIT, an error or AUTH
        # limit, a timeout), how long the close may take (a TLS close_notify,
        # the client reading its last reply) before the connection is cut.
        "close": _Key(_NUMBER, 10.0, check=_positive),
        # Listeners with proxy_protocol: how long the load balancer may take
        # to send the whole PROXY header.
        "proxy_header": _Key(_NUMBER, 10.0, check=_positive),
        # Graceful shutdown (SIGTERM): how long sessions in DATA may take to
        # finish, then how long deliveries in flight may take, before they
        # are cut.  Keep their sum below systemd's TimeoutStopSec.
        "shutdown_sessions": _Key(_NUMBER, 30.0, check=_positive),
        "shutdown_deliveries": _Key(_NUMBER, 30.0, check=_positive),
    },
    "policy": {
        "chain": _Key(list, ["mynetworks", "authenticated"], check=_stringList),
        "timeout": _Key(_NUMBER, 30.0, check=_positive),
    },
    "delivery": {
        "enabled": _Key(bool, True),
        # Where and how: RFC 5321 section 5.1 and DESIGN section 6.
        "port": _Key(int, 25, check=_port),
        "mx_tls": _Key(str, "opportunistic", check=_oneOf(*TLS_MODES)),
        "ca_file": _Key(str),
        # MTA-STS (RFC 8461, relayd.delivery.mtasts) for MX delivery, not
        # routes: policy hosts are verified like "verify" hops (ca_file,
        # else the system's trust store); their port (443; tests use
        # another) and the fetch timeout (section 3.3: 60 s or less).
        "mta_sts": _Key(bool, True),
        "mta_sts_port": _Key(int, 443, check=_port),
        "mta_sts_timeout": _Key(_NUMBER, 60.0, check=_positive),
        # TLSRPT (RFC 8460, relayd.delivery.tlsrpt): send the daily report
        # of MTA-STS/DANE outcomes to each policy domain's rua; the
        # organization-name (default: the hostname) and contact-info.
        "tlsrpt": _Key(bool, False),
        "tlsrpt_organization": _Key(str, check=_nonEmpty),
        "tlsrpt_contact": _Key(str, check=_nonEmpty),
        "resolvers": _Key(list, [], check=_stringList),
        "resolver_port": _Key(int, 53, check=_port),
        # DANE (RFC 7672): trusts the AD bit, so only with a validating
        # resolver on this host (checked below; relayd.delivery.dane).
        "dane": _Key(bool, False),
        "dns_timeout": _Key(_NUMBER, 5.0, check=_positive),
        # How much at once: Postfix's default_process_limit (100) and
        # default_destination_concurrency_limit (20); idle connections are
        # kept as long as its smtp_connection_cache_time_limit (2 s).
        "concurrency": _Key(int, 100, check=_positive),
        "per_destination": _Key(int, 20, check=_positive),
        "messages_per_connection": _Key(int, 100, check=_positive),
        "idle_timeout": _Key(_NUMBER, 2.0, check=_positive),
        "reuse_time_limit": _Key(_NUMBER, 300.0, check=_positive),
        # RFC 5321 section 4.5.3.2: client timeouts, in seconds.
        "connect_timeout": _Key(_NUMBER, 30.0, check=_positive),
        "command_timeout": _Key(_NUMBER, 300.0, check=_positive),
        "data_timeout": _Key(_NUMBER, 600.0, check=_positive),
        # Retries (RFC 5321 section 4.5.4.1), close to Postfix's defaults.
        "retry_initial": _Key(_NUMBER, 300.0, check=_positive),
        "retry_max": _Key(_NUMBER, 4200.0, check=_positive),
        "lifetime": _Key(_NUMBER, 432000.0, check=_positive),
        "delay_warning": _Key(_NUMBER, 14400.0, check=_nonNegative),
        "sweep_interval": _Key(_NUMBER, 60.0, check=_positive),
        "postmaster": _Key(str),
        # Delivery processes around the queue manager (relayd.delivery.processes),
        # like Postfix's smtp(8) processes around qmgr: 0 delivers in the
        # queue manager itself; "auto": as many as [server] processes when
        # that is above 1 (one per core by default), else 0.
        "processes": _Key((int, str), "auto", check=_autoOrCount),
    },
    "metrics": {
        # A Twisted server endpoint string for the Prometheus scrape page
        # (/metrics); empty: no metrics endpoint.  Checked in buildService.
        "endpoint": _Key(str, ""),
    },
    "logging": {
        "format": _Key(str, "text", check=_oneOf(*LOG_FORMATS)),
        "level": _Key(str, "info", check=_oneOf(*LOG_LEVELS)),
    },
    "control": {
        # relayctl's UNIX socket; default: CONTROL_SOCKET_NAME in the spool.
        "socket": _Key(str, check=lambda v: None if v else "must not be empty"),
    },
    "maildrop": {
        # Where relayd-sendmail leaves mail while relayd is down
        # (relayd.ops.maildrop); default: MAILDROP_NAME in the spool.
        "directory": _Key(str, check=lambda v: None if v else "must not be empty"),
        # How often relayd looks there, in seconds.
        "interval": _Key(_NUMBER, 5.0, check=_positive),
        # The relay listener maildrop mail is submitted to (over loopback,
        # through the policy chain); default: the first relay listener.
        "listener": _Key(str),
    },
}

_ROUTE: dict[str, _Key] = {
    "domains": _Key(list, required=True, check=_stringList),
    "hops": _Key(list, required=True),
    # "passthrough": relay in the client's session (relayd.smtp.passthrough);
    # "spool": queue, then deliver (the default).
    "mode": _Key(str, "spool", check=_oneOf("spool", "passthrough")),
    # What a passthrough route does when no hop can be reached at RCPT time.
    "fallback": _Key(str, "spool", check=_oneOf("spool", "tempfail")),
}

_HOP: dict[str, _Key] = {
    "host": _Key(str, required=True),
    "port": _Key(int, 25, check=_port),
    "tls": _Key(str, "opportunistic", check=_oneOf(*TLS_MODES)),
    "username": _Key(str),
    "password": _Key(str),
    "password_file": _Key(str),
    # SMTP AUTH with an OAuth2 access token (relayd.delivery.oauth2).
    "auth": _Key(str, check=_oneOf("password", "xoauth2", "oauthbearer")),
    "oauth2_grant": _Key(str, check=_oneOf("refresh_token", "client_credentials")),
    "oauth2_token_url": _Key(str),
    "oauth2_client_id": _Key(str),
    "oauth2_client_secret_file": _Key(str),
    "oauth2_refresh_token_file": _Key(str),
    "oauth2_scope": _Key(str),
    "oauth2_ca_file": _Key(str),
    "oauth2_timeout": _Key(_NUMBER, 30, check=_positive),
}

_LISTENER: dict[str, _Key] = {
    "name": _Key(str),
    "endpoint": _Key(str, required=True),
    "mode": _Key(str, required=True, check=_oneOf(*LISTENER_MODES)),
    # PROXY protocol v1/v2 (relayd.smtp.proxy): every connection must start with
    # a header from one of proxy_from's networks.
    "proxy_protocol": _Key(bool, False),
    "proxy_from": _Key(list, [], check=_stringList),
}

_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "a table",
    _NUMBER: "a number",
    (int, str): '"auto" or a number',
}


def _typeName(kind: type | tuple[type, ...]) -> str:
    return _TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _checkTable(
    path: str, prefix: str, table: dict[str, Any], schema: dict[str, _Key]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in table:
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(path, prefix + key, f"unknown key (known: {known})")
    for key, spec in schema.items():
        name = prefix + key
        if key not in table:
            if spec.required:
                raise ConfigError(path, name, "missing (required)")
            values[key] = spec.default
            continue
        value = table[key]
        # bool is an int subclass: never accept it for a number.
        if isinstance(value, bool) and spec.kind is not bool:
            raise ConfigError(path, name, f"must be {_typeName(spec.kind)}, not a boolean")
        if not isinstance(value, spec.kind):
            raise ConfigError(
                path, name, f"must be {_typeName(spec.kind)}, not {type(value).__name__}"
            )
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                raise ConfigError(path, name, problem)
        values[key] = value
    return values


def _resolve(base: str, value: str | None) -> str | None:
    if value is None:
        return None
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _readable(path: str, key: str, file: str) -> None:
    try:
        with open(file, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(path, key, f"file not found: {file}") from None
    except OSError as e:
        raise ConfigError(path, key, f"cannot read {file}: {e.strerror}") from None


def _checkDaneResolvers(path: str, resolvers: list[str]) -> None:
    """
    C{dane = true} needs C{resolvers} set, every one on a loopback address:
    relayd trusts the AD bit of their answers (RFC 7672 section 2.1, as
    Postfix does), which only a validating resolver on this host (unbound
    on 127.0.0.1, docs/dane.md) makes trustworthy; the AD bit of a remote
    resolver crosses the network unprotected and anyone on the path could
    set it.  The system's resolv.conf is not taken on trust either.
    """
    from relayd.delivery.dane import isLoopbackResolver

    if not resolvers:
        raise ConfigError(
            path,
            "delivery.dane",
            "needs delivery.resolvers set to a validating resolver on this host "
            '(e.g. ["127.0.0.1"] with unbound)',
        )
    remote = [r for r in resolvers if not isLoopbackResolver(r)]
    if remote:
        raise ConfigError(
            path,
            "delivery.dane",
            f"needs resolvers on a loopback address, whose AD bit can be trusted; "
            f"not {', '.join(remote)}",
        )


def load(path: str) -> Config:
    """
    Read, check and freeze the configuration in C{path}.

    Files named by the config (certificate, key, users file) must exist and
    be readable; the spool directory is created at startup if missing.

    @raise ConfigError: with file, key and problem, on any error.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "config file not found") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    return fromDict(raw, path)


def fromDict(raw: dict[str, Any], path: str = "<config>") -> Config:
    """Check and freeze an already parsed TOML document (see L{load})."""
    known = set(_SCHEMA) | {"listeners", "policies", "routes"}
    for section in raw:
        if section not in known:
            raise ConfigError(path, section, f"unknown section (known: {', '.join(sorted(known))})")
    sections: dict[str, dict[str, Any]] = {}
    for name, schema in _SCHEMA.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(path, name, "must be a table ([" + name + "])")
        sections[name] = _checkTable(path, name + ".", table, schema)

    base = os.path.dirname(os.path.abspath(path))

    listenerList = raw.get("listeners")
    if not isinstance(listenerList, list) or not listenerList:
        raise ConfigError(path, "listeners", "at least one [[listeners]] table is required")
    listeners = []
    names: set[str] = set()
    for i, table in enumerate(listenerList):
        prefix = f"listeners[{i}]."
        if not isinstance(table, dict):
            raise ConfigError(path, prefix[:-1], "must be a table ([[listeners]])")
        values = _checkTable(path, prefix, table, _LISTENER)
        name = values["name"] or f"{values['mode']}{i}"
        if name in names:
            raise ConfigError(path, prefix + "name", f"duplicate listener name {name!r}")
        names.add(name)
        endpoint = values["endpoint"]
        if endpoint.strip().lower().startswith("haproxy:"):
            raise ConfigError(
                path,
                prefix + "endpoint",
                "the haproxy: endpoint is not supported (it reports the proxy's address "
                "until the header is read); write the endpoint without haproxy: and set "
                'proxy_protocol = true and proxy_from = ["<load balancer networks>"]',
            )
        proxyFrom = []
        for value in values["proxy_from"]:
            try:
                proxyFrom.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                raise ConfigError(
                    path, prefix + "proxy_from", f"not a network: {value!r}"
                ) from None
        if values["proxy_protocol"] and not proxyFrom:
            raise ConfigError(
                path,
                prefix + "proxy_from",
                "proxy_protocol = true needs the load balancers' networks in proxy_from",
            )
        if proxyFrom and not values["proxy_protocol"]:
            raise ConfigError(path, prefix + "proxy_from", "is set but proxy_protocol is not true")
        listeners.append(
            ListenerConfig(
                name, endpoint, values["mode"], values["proxy_protocol"], tuple(proxyFrom)
            )
        )

    tls = sections["tls"]
    cert, key = _resolve(base, tls["certificate"]), _resolve(base, tls["key"])
    if (cert is None) != (key is None):
        missing = "tls.key" if key is None else "tls.certificate"
        raise ConfigError(path, missing, "tls.certificate and tls.key go together")
    if cert is not None and key is not None:
        _readable(path, "tls.certificate", cert)
        _readable(path, "tls.key", key)
    needsTls = [lc for lc in listeners if lc.mode in ("submission", "submissions")]
    if needsTls and cert is None:
        raise ConfigError(
            path,
            "tls.certificate",
            f"listener {needsTls[0].name!r} ({needsTls[0].mode}) needs TLS: "
            "set [tls] certificate and key",
        )

    auth = sections["auth"]
    usersFile = _resolve(base, auth["users_file"])
    if usersFile is not None:
        _readable(path, "auth.users_file", usersFile)
    if any(lc.mode != "relay" for lc in listeners) and usersFile is None:
        raise ConfigError(
            path, "auth.users_file", "submission listeners need AUTH: set [auth] users_file"
        )

    server = sections["server"]
    hostname = server["hostname"] or socket.getfqdn()
    if not hostname or any(c.isspace() for c in hostname):
        raise ConfigError(path, "server.hostname", "must be a host name without spaces")

    policies = raw.get("policies", {})
    if not isinstance(policies, dict):
        raise ConfigError(path, "policies", "must be a table of [policies.NAME] tables")
    for name, options in policies.items():
        if not isinstance(options, dict):
            raise ConfigError(path, f"policies.{name}", "must be a table")

    spool, limits, timeouts, policy = (
        sections["spool"],
        sections["limits"],
        sections["timeouts"],
        sections["policy"],
    )
    delivery = sections["delivery"]
    caFile = _resolve(base, delivery["ca_file"])
    if caFile is not None:
        _readable(path, "delivery.ca_file", caFile)
    if delivery["retry_max"] < delivery["retry_initial"]:
        raise ConfigError(
            path, "delivery.retry_max", "must not be less than delivery.retry_initial"
        )
    if delivery["dane"]:
        _checkDaneResolvers(path, delivery["resolvers"])
    routes = _routes(path, base, raw.get("routes", []))
    _refuseRoutesToSelf(path, routes, listeners, hostname)
    spoolDirectory = _resolve(base, spool["directory"]) or ""
    controlSocket = _resolve(base, sections["control"]["socket"])
    processes = _processes(server["processes"])
    maildrop = sections["maildrop"]
    if maildrop["listener"] is not None and not any(
        lc.name == maildrop["listener"] and lc.mode == "relay" for lc in listeners
    ):
        raise ConfigError(path, "maildrop.listener", "must name a relay listener")
    return Config(
        path=path,
        hostname=hostname,
        banner=server["banner"],
        processes=processes,
        listeners=tuple(listeners),
        tlsCertificate=cert,
        tlsKey=key,
        tlsCiphers=tls["ciphers"],
        tlsMinVersion=tls["min_version"],
        tlsOpportunisticCiphers=tls["opportunistic_ciphers"],
        usersFile=usersFile,
        authMaxFailures=auth["max_failures"],
        authFailureDelay=float(auth["failure_delay"]),
        authThreads=auth["threads"],
        authFailureWindow=auth["failure_window"],
        authClientFailureLimit=auth["client_failure_limit"],
        authUserFailureLimit=auth["user_failure_limit"],
        spoolDirectory=spoolDirectory,
        spoolReserveBytes=spool["reserve_bytes"],
        spoolThreads=spool["threads"],
        spoolJournal=spool["journal"],
        messageSize=limits["message_size"],
        maxHeaderSize=limits["header_size"],
        maxHops=limits["hops"],
        maxRecipients=limits["recipients"],
        maxConnections=limits["connections"],
        maxConnectionsPerClient=limits["connections_per_client"],
        maxErrors=limits["errors"],
        timeoutCommand=float(timeouts["command"]),
        timeoutData=float(timeouts["data"]),
        dataDeadline=float(timeouts["data_deadline"]),
        dataMinRate=float(timeouts["data_min_rate"]),
        timeoutClose=float(timeouts["close"]),
        timeoutProxyHeader=float(timeouts["proxy_header"]),
        shutdownSessions=float(timeouts["shutdown_sessions"]),
        shutdownDeliveries=float(timeouts["shutdown_deliveries"]),
        policyChain=tuple(policy["chain"]),
        policyTimeout=float(policy["timeout"]),
        policyOptions={k: dict(v) for k, v in policies.items()},
        routes=routes,
        deliveryEnabled=delivery["enabled"],
        deliveryPort=delivery["port"],
        mxTls=delivery["mx_tls"],
        caFile=caFile,
        mtaSts=delivery["mta_sts"],
        mtaStsPort=delivery["mta_sts_port"],
        mtaStsTimeout=min(60.0, float(delivery["mta_sts_timeout"])),
        tlsrpt=delivery["tlsrpt"],
        tlsrptOrganization=delivery["tlsrpt_organization"],
        tlsrptContact=delivery["tlsrpt_contact"],
        resolvers=tuple(delivery["resolvers"]),
        resolverPort=delivery["resolver_port"],
        dane=delivery["dane"],
        dnsTimeout=float(delivery["dns_timeout"]),
        deliveryConcurrency=delivery["concurrency"],
        perDestination=delivery["per_destination"],
        messagesPerConnection=delivery["messages_per_connection"],
        idleTimeout=float(delivery["idle_timeout"]),
        reuseTimeLimit=float(delivery["reuse_time_limit"]),
        connectTimeout=float(delivery["connect_timeout"]),
        commandTimeout=float(delivery["command_timeout"]),
        dataTimeout=float(delivery["data_timeout"]),
        retryInitial=float(delivery["retry_initial"]),
        retryMax=float(delivery["retry_max"]),
        lifetime=float(delivery["lifetime"]),
        delayWarning=float(delivery["delay_warning"]),
        sweepInterval=float(delivery["sweep_interval"]),
        postmaster=delivery["postmaster"],
        metricsEndpoint=sections["metrics"]["endpoint"].strip(),
        logFormat=sections["logging"]["format"],
        logLevel=sections["logging"]["level"],
        controlSocket=controlSocket or os.path.join(spoolDirectory, CONTROL_SOCKET_NAME),
        deliveryProcesses=_deliveryProcesses(delivery["processes"], processes),
        maildropDirectory=_resolve(base, maildrop["directory"])
        or os.path.join(spoolDirectory, MAILDROP_NAME),
        maildropInterval=float(maildrop["interval"]),
        maildropListener=maildrop["listener"],
    )


def _routes(path: str, base: str, raw: Any) -> tuple[Any, ...]:
    """Check C{[[routes]]} and their C{[[routes.hops]]}."""
    from relayd.delivery.routing import NextHopConfig, Route

    if not isinstance(raw, list):
        raise ConfigError(path, "routes", "must be a list of [[routes]] tables")
    routes = []
    for i, table in enumerate(raw):
        prefix = f"routes[{i}]."
        if not isinstance(table, dict):
            raise ConfigError(path, prefix[:-1], "must be a table ([[routes]])")
        values = _checkTable(path, prefix, table, _ROUTE)
        if not values["domains"]:
            raise ConfigError(path, prefix + "domains", 'must name at least one domain (or "*")')
        if not values["hops"]:
            raise ConfigError(
                path, prefix + "hops", "at least one [[routes.hops]] table is required"
            )
        hops = []
        for j, hop in enumerate(values["hops"]):
            hprefix = f"{prefix}hops[{j}]."
            if not isinstance(hop, dict):
                raise ConfigError(path, hprefix[:-1], "must be a table ([[routes.hops]])")
            for inline in ("oauth2_client_secret", "oauth2_refresh_token"):
                if inline in hop:
                    raise ConfigError(
                        path,
                        hprefix + inline,
                        f"never put the secret in the config: give {inline}_file, "
                        "a file readable by relayd only",
                    )
            h = _checkTable(path, hprefix, hop, _HOP)
            oauth2 = _oauth2(path, base, hprefix, h)
            if oauth2 is not None:
                hops.append(
                    NextHopConfig(h["host"], h["port"], h["tls"], h["username"], None, oauth2)
                )
                continue
            password = h["password"]
            if h["password_file"] is not None:
                if password is not None:
                    raise ConfigError(
                        path, hprefix + "password_file", "give password or password_file, not both"
                    )
                file = _resolve(base, h["password_file"]) or ""
                _readable(path, hprefix + "password_file", file)
                with open(file, encoding="utf-8") as f:
                    password = f.read().strip("\r\n")
            if h["auth"] == "password" and h["username"] is None:
                raise ConfigError(path, hprefix + "username", 'required with auth = "password"')
            if (h["username"] is None) != (password is None):
                raise ConfigError(path, hprefix + "username", "username and password go together")
            if h["username"] is not None and h["tls"] == "none":
                raise ConfigError(
                    path,
                    hprefix + "tls",
                    "AUTH needs TLS: credentials are never sent in plain text",
                )
            hops.append(NextHopConfig(h["host"], h["port"], h["tls"], h["username"], password))
        if values["mode"] != "passthrough" and "fallback" in table:
            raise ConfigError(
                path, prefix + "fallback", 'only a route with mode = "passthrough" has a fallback'
            )
        routes.append(
            Route(
                tuple(d.lower() for d in values["domains"]),
                tuple(hops),
                mode=values["mode"],
                fallback=values["fallback"],
            )
        )
    return tuple(routes)


def _oauth2(path: str, base: str, prefix: str, h: dict[str, Any]) -> Any:
    """
    The L{relayd.delivery.oauth2.OAuth2Config} of a hop with C{auth =
    "xoauth2"} or C{"oauthbearer"}, or None for a hop without (whose
    C{oauth2_*} keys must then be absent).  Secrets are named by file only;
    the files must be readable now.
    """
    from relayd.delivery.oauth2 import OAuth2Config, checkTokenURL

    keys = [k for k in _HOP if k.startswith("oauth2_") and k != "oauth2_timeout"]
    if h["auth"] not in ("xoauth2", "oauthbearer"):
        for key in keys:
            if h[key] is not None:
                raise ConfigError(path, prefix + key, 'only with auth = "xoauth2" or "oauthbearer"')
        return None
    for key in ("password", "password_file"):
        if h[key] is not None:
            raise ConfigError(
                path, prefix + key, f"auth = {h['auth']!r} uses OAuth2 tokens, not a password"
            )
    if h["username"] is None:
        raise ConfigError(
            path, prefix + "username", f"required with auth = {h['auth']!r} (the mailbox)"
        )
    if h["tls"] == "none":
        raise ConfigError(
            path, prefix + "tls", "AUTH needs TLS: tokens are never sent in plain text"
        )
    for key in ("oauth2_token_url", "oauth2_client_id"):
        if h[key] is None:
            raise ConfigError(path, prefix + key, f"required with auth = {h['auth']!r}")
    problem = checkTokenURL(h["oauth2_token_url"])
    if problem:
        raise ConfigError(path, prefix + "oauth2_token_url", problem)
    grant = h["oauth2_grant"] or (
        "refresh_token" if h["oauth2_refresh_token_file"] is not None else "client_credentials"
    )
    if grant == "refresh_token" and h["oauth2_refresh_token_file"] is None:
        raise ConfigError(
            path, prefix + "oauth2_refresh_token_file", "required with the refresh_token grant"
        )
    if grant == "client_credentials":
        if h["oauth2_refresh_token_file"] is not None:
            raise ConfigError(
                path,
                prefix + "oauth2_refresh_token_file",
                "not used by the client_credentials grant",
            )
        if h["oauth2_client_secret_file"] is None:
            raise ConfigError(
                path,
                prefix + "oauth2_client_secret_file",
                "required with the client_credentials grant",
            )
    files: dict[str, str | None] = {}
    for key in ("oauth2_client_secret_file", "oauth2_refresh_token_file", "oauth2_ca_file"):
        files[key] = _resolve(base, h[key])
        if files[key] is not None:
            _readable(path, prefix + key, files[key] or "")
    refreshFile = files["oauth2_refresh_token_file"]
    if refreshFile is not None and not os.access(os.path.dirname(refreshFile) or ".", os.W_OK):
        raise ConfigError(
            path,
            prefix + "oauth2_refresh_token_file",
            f"its directory {os.path.dirname(refreshFile)} is not writable "
            "(a rotated refresh token is stored there)",
        )
    return OAuth2Config(
        mechanism=h["auth"],
        grant=grant,
        tokenURL=h["oauth2_token_url"],
        clientID=h["oauth2_client_id"],
        clientSecretFile=files["oauth2_client_secret_file"],
        refreshTokenFile=refreshFile,
        scope=h["oauth2_scope"],
        caFile=files["oauth2_ca_file"],
        timeout=float(h["oauth2_timeout"]),
    )


def _endpointParts(description: str) -> list[str]:
    """Split a Twisted endpoint string at its colons (backslash escapes one)."""
    from relayd.endpoints import splitEndpoint

    return splitEndpoint(description, keepEscapes=False)


_UNSPECIFIED = {
    "tcp": ipaddress.ip_address("0.0.0.0"),
    "ssl": ipaddress.ip_address("0.0.0.0"),
    "tcp6": ipaddress.ip_address("::"),
}


def _listenAddress(
    endpoint: str,
) -> tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """
    The port and interface a C{tcp:}, C{tcp6:} or C{ssl:} listener endpoint
    listens on, or None when the string does not say (port 0, C{systemd:},
    C{unix:}, a bad string: buildService reports those).
    """
    parts = _endpointParts(endpoint)
    if len(parts) < 2 or parts[0].lower() not in _UNSPECIFIED:
        return None
    kind = parts[0].lower()
    positional = [p for p in parts[1:] if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = keywords.get("port", positional[0] if positional else "")
    interface = keywords.get("interface", "")
    try:
        number = int(port)
        address = ipaddress.ip_address(interface) if interface else _UNSPECIFIED[kind]
    except ValueError:
        return None
    if not 0 < number < 65536:
        return None
    return number, address


def _reaches(
    host: str, interface: ipaddress.IPv4Address | ipaddress.IPv6Address, hostname: str
) -> bool:
    """
    Whether connecting to C{host} reaches a listener on C{interface},
    judged without DNS: an address literal that is the interface (or, for a
    listener on every address, a loopback or unspecified one), C{localhost}
    (loopback), or this machine's own name (for a listener on every
    address).  Other names are not resolved at startup; the hop limit
    stops the loops they make.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    name = name.removeprefix("ipv6:")
    everywhere = interface.is_unspecified
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if name == "localhost" or name.endswith(".localhost"):
            return everywhere or interface.is_loopback
        own = {hostname.rstrip(".").lower(), socket.gethostname().lower()}
        return everywhere and name in own
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not everywhere:
        return address == interface
    if address.version != interface.version and interface.version == 4:
        return False  # an IPv4 listener on every address does not take IPv6
    return address.is_loopback or address.is_unspecified


def _refuseRoutesToSelf(
    path: str, routes: tuple[Any, ...], listeners: list[ListenerConfig], hostname: str
) -> None:
    """
    A C{[[routes]]} hop that is one of relayd's own listeners sends every
    message it routes back to relayd, which routes it there again: a mail
    loop that only the hop limit would end, after filling the log and the
    queue.  Refuse it with one line naming the hop.
    """
    own = [(lc, _listenAddress(lc.endpoint)) for lc in listeners]
    for i, route in enumerate(routes):
        for j, hop in enumerate(route.hops):
            for listener, address in own:
                if address is None or address[0] != hop.port:
                    continue
                if _reaches(hop.host, address[1], hostname):
                    raise ConfigError(
                        path,
                        f"routes[{i}].hops[{j}]",
                        f"{hop.host}:{hop.port} is relayd's own listener {listener.name!r} "
                        f"({listener.endpoint}): mail routed there would loop",
                    )
