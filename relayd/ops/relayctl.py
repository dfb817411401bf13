"""
C{relayctl}: look at and steer a running relayd (docs/relayctl.md).

    relayctl [--config PATH] [--timeout SECONDS] COMMAND ...

    status [--json]                      uptime, listeners, connections, queue
    queue list [--json]                  one line per queued message
    queue show ID [--body] [--json]      envelope and headers (or everything)
    queue flush [ID...]                  attempt deferred mail now
    queue hold    ID... | --all [--from ADDR] [--to DOMAIN]
    queue release ID... | --all [--from ADDR] [--to DOMAIN]
    queue delete  ID... | --all [--from ADDR] [--to DOMAIN]
    reload                               re-read the config file
    check-config [PATH] [--live]         validate a config like startup does
    passwd [--stdin] [--rounds N] USER   set a user's password
    check-domain DOMAIN [--json] [--selector S] [--address IP...]
                                         SPF, DKIM, DMARC, MTA-STS, TLSRPT

It finds relayd's control socket (and spool, and users file) through the
config file: C{--config PATH}, else the file named by C{RELAYD_CONFIG}, else
C{/etc/relayd/relayd.toml} (L{relayd.configfile}).
C{queue list} and C{queue show} read the spool directly when relayd is not
running; everything that changes the queue needs the running daemon.

Exit status: 0 done, 1 failure (one line on standard error, starting with
C{relayctl:}), 2 usage error.  Also runs as C{python -m relayd.ops.relayctl}.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from twisted.internet.defer import Deferred, succeed

from relayd.configfile import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigNotFound,
    configPath,
    versionLine,
)
from relayd.ops.control import (
    QUEUE_ID,
    ControlClient,
    ControlClientError,
    ControlError,
    MessageNotFound,
    NotRunning,
    QueueChange,
    QueueFlush,
    QueueList,
    QueueShow,
    Reload,
    Status,
    readQueue,
    showMessage,
)
from relayd.queue.record import QueueRecord
from relayd.queue.spool import QUEUED_STATES, STATES

__all__ = ["main", "DEFAULT_CONFIG"]

_PROG = "relayctl"

PAGE = 2000
"""Messages per L{QueueList} request."""

LIVE_TIMEOUT = 30.0
"""The longest C{check-config --live} waits at any one step, in seconds."""


class _Failure(Exception):
    """A problem to report on one line, exiting with status 1."""


class _Usage(Exception):
    """A usage error: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """Usage errors become one line (L{_Usage}) rather than usage text."""

    def error(self, message: str) -> Any:
        raise _Usage(message)


# --- where things are ---------------------------------------------------------


@dataclass(frozen=True)
class _Paths:
    config: str
    socket: str
    spool: str
    usersFile: str | None


def _locate(path: str) -> _Paths:
    """
    Read just what relayctl needs from the config file: the control socket,
    the spool, the users file, resolved as L{relayd.config.load} does.  Not
    the full check, so that C{relayctl reload} can reach a daemon whose
    config file has meanwhile been edited into a mistake.
    """
    from relayd.config import CONTROL_SOCKET_NAME

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise _Failure(
            f"{path}: config file not found (name one with --config FILE or {CONFIG_ENV}=FILE)"
        ) from None
    except OSError as e:
        raise _Failure(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise _Failure(f"config error: {path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))

    def get(section: str, key: str) -> str | None:
        table = raw.get(section, {})
        value = table.get(key) if isinstance(table, dict) else None
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _Failure(f"config error: {path}: {section}.{key}: must be a non-empty string")
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    spool = get("spool", "directory")
    if spool is None:
        raise _Failure(f"config error: {path}: spool.directory: missing (required)")
    socketPath = get("control", "socket") or os.path.join(spool, CONTROL_SOCKET_NAME)
    return _Paths(path, socketPath, spool, get("auth", "users_file"))


# --- output -------------------------------------------------------------------


class _Output:
    def __init__(self, stdout: IO[str], stderr: IO[str]) -> None:
        self.stdout = stdout
        self.stderr = stderr

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def error(self, text: str) -> None:
        self.stderr.write(f"{_PROG}: {text}\n")

    def json(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")

    def raw(self, data: bytes) -> None:
        """Octets as they are when stdout has a binary buffer, else as text."""
        self.stdout.flush()
        buffer = getattr(self.stdout, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.stdout.write(data.decode("utf-8", "replace"))


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# --- the commands -----------------------------------------------------------------


class _Context:
    def __init__(
        self,
        options: argparse.Namespace,
        output: _Output,
        stdin: BinaryIO | None,
        ask: Callable[[str], str],
    ) -> None:
        self.options = options
        self.out = output
        self.stdin = stdin
        self.ask = ask
        self._paths: _Paths | None = None

    @property
    def paths(self) -> _Paths:
        if self._paths is None:
            self._paths = _locate(self.options.config)
        return self._paths

    def connect(self) -> ControlClient:
        return ControlClient(self.paths.socket, self.options.timeout)

    def daemon(self) -> ControlClient:
        """A client, for commands that need the running daemon."""
        try:
            return self.connect()
        except NotRunning as e:
            raise _Failure(f"{e}: {self.options.commandLine} needs the running daemon") from None


def _status(ctx: _Context) -> None:
    with ctx.daemon() as client:
        status = client.call(Status)["status"]
    if ctx.options.json:
        ctx.out.json(status)
        return
    out = ctx.out
    started = status.get("started") or status["now"]
    out.line(
        f"relayd {status['version']}, pid {status['pid']}, "
        f"up {_duration(status['now'] - started)} (since {_when(started)})"
    )
    out.line(f"config:      {status['config']}")
    out.line(f"spool:       {status['spool']}")
    out.line("listeners:")
    for one in status["listeners"]:
        where = one["address"] or one["endpoint"]
        out.line(
            f"  {one['name']:<14} {one['mode']:<12} {where:<24} "
            f"{_plural(one['connections'], 'connection')}"
        )
    out.line(f"connections: {status['connections']} (limit {status['connection_limit']})")
    queue = status["queue"]
    out.line("queue:       " + ", ".join(f"{state} {queue.get(state, 0)}" for state in STATES))
    if status["delivery"]:
        out.line(f"delivery:    on, {status['delivering']} being delivered now")
    else:
        out.line("delivery:    disabled ([delivery] enabled = false)")
    out.line(f"policies:    {' '.join(status['policies']) or '(none)'}")


def _entries(ctx: _Context) -> list[dict[str, Any]]:
    """The whole queue: from the daemon, or from the spool when it is down."""
    try:
        client = ctx.connect()
    except NotRunning as e:
        entries: list[dict[str, Any]] = _offline(ctx, e, lambda spool: readQueue(spool)[0])
        return entries
    entries = []
    with client:
        after = ""
        while True:
            page = client.call(QueueList, after=after, limit=PAGE)
            entries += page["entries"]
            if not page["more"] or not page["entries"]:
                return entries
            after = page["entries"][-1]["queue_id"]


def _offline(ctx: _Context, why: Exception, read: Callable[[str], Any]) -> Any:
    spool = ctx.paths.spool
    if not os.path.isdir(os.path.join(spool, "incoming")):
        raise _Failure(f"{why}, and {spool} holds no spool")
    if os.path.isdir(os.path.join(spool, "data")):
        # Queue files (relayd.queue.record) replaced data/ + <state>/<id>.json;
        # relayd converts the spool at startup.
        raise _Failure(
            f"{why}, and {spool} has the spool layout of an older relayd: "
            "start relayd once to convert it"
        )
    ctx.out.error(f"{why}; reading the spool {spool} directly")
    try:
        return read(spool)
    except OSError as e:
        raise _Failure(f"cannot read the spool: {e.filename or spool}: {e.strerror}") from None


def _recipientText(r: dict[str, Any]) -> str:
    text = f"{r['address']} {r['state']}"
    if r.get("last_reply") and r["state"] != "delivered":
        text += f" ({r['last_reply']})"
    return text


def _queueList(ctx: _Context) -> None:
    entries = _entries(ctx)
    out = ctx.out
    if ctx.options.json:
        out.json(entries)
        return
    if not entries:
        out.line("Mail queue is empty")
        return
    width = max(len(e["queue_id"]) for e in entries)
    out.line(
        f"{'QUEUE ID':<{width}}  {'STATE':<10} {'SIZE':>9}  {'ARRIVAL':<19}  "
        f"{'NEXT ATTEMPT':<19}  SENDER -> RECIPIENTS"
    )
    for e in entries:
        state = "delivering" if e.get("delivering") else e["state"]
        rest = (
            f"(unreadable envelope: {e['error']})"
            if e.get("error")
            else f"<{e['sender']}> -> " + "; ".join(_recipientText(r) for r in e["recipients"])
        )
        out.line(
            f"{e['queue_id']:<{width}}  {state:<10} {e['size'] or 0:>9}  "
            f"{_when(e['arrival']):<19}  {_when(e['next_attempt']):<19}  {rest}"
        )
    counts = {state: sum(1 for e in entries if e["state"] == state) for state in QUEUED_STATES}
    octets = sum(e["size"] or 0 for e in entries)
    out.line(
        f"-- {_plural(len(entries), 'message')}, {octets} octets: "
        + ", ".join(f"{state} {n}" for state, n in counts.items() if n)
    )


def _queueId(text: str) -> str:
    queueId = text.strip().upper()
    if not QUEUE_ID.match(queueId):
        raise _Usage(f"not a queue id: {text!r}")
    return queueId


def _queueShow(ctx: _Context) -> None:
    queueId = _queueId(ctx.options.id)
    body = ctx.options.body
    try:
        client = ctx.connect()
    except NotRunning as e:

        def read(spool: str) -> dict[str, Any]:
            try:
                return showMessage(spool, queueId, body)
            except MessageNotFound as e:
                raise _Failure(str(e)) from None

        answer = _offline(ctx, e, read)
    else:
        with client:
            answer = client.call(QueueShow, queueId=queueId, body=body)
    entry, message = answer["entry"], answer["message"]
    out = ctx.out
    if ctx.options.json:
        out.json(dict(entry, message=message.decode("utf-8", "replace")))
        return
    envelope = QueueRecord.fromJSON(entry["envelope"])
    state = entry["state"] + (", being delivered now" if entry.get("delivering") else "")
    out.line(f"queue id:   {queueId}")
    out.line(f"state:      {state}")
    out.line(f"arrival:    {_when(entry['arrival'])}")
    out.line(f"size:       {entry['size']} octets ({envelope.body})")
    out.line(f"sender:     <{entry['sender']}>")
    received = f"from {envelope.client}"
    if envelope.helo:
        received += f" (EHLO {envelope.helo})"
    if envelope.user:
        received += f" as user {envelope.user}"
    out.line(f"received:   {received} on listener {envelope.listener}")
    out.line(f"attempts:   {entry['attempts']}, next {_when(entry['next_attempt'])}")
    for r in entry["recipients"]:
        line = f"recipient:  {r['address']} {r['state']}, {_plural(r['attempts'], 'attempt')}"
        if r.get("last_reply"):
            line += f", last reply: {r['last_reply']}"
        out.line(line)
    out.line()
    out.raw(message)


def _ids(ctx: _Context) -> list[str] | None:
    return [_queueId(text) for text in ctx.options.ids] or None


def _flush(ctx: _Context) -> None:
    ids = _ids(ctx)
    with ctx.daemon() as client:
        results: dict[str, str] = client.call(QueueFlush, queueIds=ids)["results"]
    out = ctx.out
    if ids is None:
        count = {o: sum(1 for v in results.values() if v == o) for o in set(results.values())}
        line = f"{_plural(count.get('scheduled', 0), 'message')} to be attempted now"
        if count.get("delivering"):
            line += f", {count['delivering']} being delivered already"
        if count.get("hold"):
            line += f", {count['hold']} on hold (not flushed)"
        out.line(line)
        return
    failed = 0
    for queueId in ids:
        outcome = results.get(queueId, "unknown")
        if outcome == "scheduled":
            out.line(f"{queueId}: to be attempted now")
        elif outcome == "delivering":
            out.line(f"{queueId}: being delivered already")
        else:
            failed += 1
            out.error(
                f"{queueId}: on hold; release it first (relayctl queue release {queueId})"
                if outcome == "hold"
                else f"{queueId}: no such message in the queue"
            )
    if failed:
        raise SystemExit(1)


def _change(ctx: _Context) -> None:
    options = ctx.options
    ids = _ids(ctx)
    if ids is not None and options.all:
        raise _Usage("give queue ids or --all, not both")
    if ids is None and not options.all:
        raise _Usage(f"queue {options.action}: give queue ids, or --all")
    if (options.sender is not None or options.recipient is not None) and not options.all:
        raise _Usage("--from and --to narrow --all; they go with it")
    with ctx.daemon() as client:
        results = client.call(
            QueueChange,
            action=options.action,
            queueIds=ids,
            sender=options.sender,
            recipient=options.recipient,
        )["results"]
    if not results:
        ctx.out.line("no queued message matched")
    failed = 0
    for queueId, outcome, ok in results:
        if ok:
            ctx.out.line(f"{queueId}: {outcome}")
        else:
            failed += 1
            ctx.out.error(f"{queueId}: {outcome}")
    if failed:
        raise SystemExit(1)


def _reload(ctx: _Context) -> None:
    with ctx.daemon() as client:
        answer = client.call(Reload)
    if not answer["applied"]:
        raise _Failure(f"reload refused, the old config stays in force: {answer['error']}")
    ctx.out.line(
        "reloaded: the new config is in force (policy chain: "
        + (" ".join(answer["chain"]) or "empty")
        + ")"
    )


def _passwd(ctx: _Context) -> None:
    from relayd.ops.passwd import PasswordError, readPassword
    from relayd.smtp.auth import UsersFileError, checkUsername, setPassword

    options = ctx.options
    try:
        checkUsername(options.user)
    except ValueError as e:
        raise _Usage(f"invalid USER {options.user!r}: {e}") from None
    usersFile = ctx.paths.usersFile
    if usersFile is None:
        raise _Failure(f"{ctx.paths.config}: auth.users_file is not set: relayd has no users")
    try:
        password = readPassword(options.stdin, ctx.stdin, ctx.ask)
        setPassword(usersFile, options.user, password, options.rounds)
    except (PasswordError, ValueError, UsersFileError) as e:
        raise _Failure(str(e)) from None
    except OSError as e:
        raise _Failure(f"{usersFile}: {e.strerror or e}") from None
    ctx.out.line(f"{options.user}: password set in {usersFile}")


# --- check-domain -------------------------------------------------------------------


def _checkDomain(ctx: _Context) -> None:
    """
    Check DOMAIN's DNS against what relayd sends (L{relayd.ops.checkdomain}):
    offline, through the resolvers of C{[delivery]}; exit status 1 when
    any finding is a failure.
    """
    from relayd.address import AddressError, asciiDomain
    from relayd.config import ConfigError, load
    from relayd.delivery.routing import newResolver
    from relayd.ops.checkdomain import FAIL, DomainDNS, checkDomain, setupFromConfig
    from relayd.policy import PolicyOptionError

    options = ctx.options
    domain = options.domain.strip().rstrip(".").lower()
    if not domain or "." not in domain or any(c.isspace() or c in "@/" for c in domain):
        raise _Usage(f"not a domain name: {options.domain!r}")
    try:
        domain = asciiDomain(domain)  # DNS asks for A-labels (IDNA 2008)
    except AddressError:
        raise _Usage(f"not a domain name: {options.domain!r}") from None
    try:
        config = load(options.config)
        setup = setupFromConfig(config, domain, options.address or (), options.selector)
    except ConfigError as e:
        raise _Failure(f"config error: {e}") from None
    except PolicyOptionError as e:
        raise _Failure(f"config error: {options.config}: policies.dkim: {e}") from None
    except ValueError as e:
        raise _Usage(str(e)) from None
    resolver = newResolver(list(config.resolvers) or None, config.resolverPort, config.dnsTimeout)
    findings = checkDomain(DomainDNS(resolver), domain, setup, options.selector)
    if options.json:
        ctx.out.json([f.asJSON() for f in findings])
    else:
        for finding in findings:
            ctx.out.line(finding.line())
    if any(f.status == FAIL for f in findings):
        raise SystemExit(1)


# --- check-config -------------------------------------------------------------------


def _checkConfig(ctx: _Context) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from relayd.config import ConfigError, load
    from relayd.service import buildService

    path = ctx.options.path or ctx.options.config
    try:
        config = load(path)
        # Built, never started, on a reactor that only records: this checks
        # certificates, the users file, policies and endpoints as startup
        # does, without listening or touching the spool.
        buildService(config, MemoryReactorClock(), checkOnly=True)
    except ConfigError as e:
        raise _Failure(f"config error: {e}") from None
    except (OSError, ValueError) as e:
        raise _Failure(f"config error: {path}: {e}") from None
    ctx.out.line(f"{path}: config OK")
    if not ctx.options.live:
        return
    reports = _inReactor(lambda reactor: Deferred.fromCoroutine(_checkUpstreams(config, reactor)))
    if not reports:
        ctx.out.line("no [[routes]] upstreams configured: nothing to check live")
        return
    for report in reports:
        ctx.out.line(report.title)
        for label, status, text in report.steps:
            ctx.out.line(f"  {label:<9} {status}" + (f": {text}" if text else ""))
    failed = [r for r in reports if not r.ok]
    if failed:
        raise _Failure(
            f"{len(failed)} of {_plural(len(reports), 'upstream')} failed: "
            + ", ".join(r.name for r in failed)
        )
    ctx.out.line(f"all {_plural(len(reports), 'upstream')} OK")


def _inReactor(f: Callable[[Any], Any]) -> Any:
    """
    Run C{f(reactor)} (which returns a Deferred) to its end.  Normally this
    runs the reactor for the time it takes; called from a thread of a
    program whose reactor is running already, it runs there instead.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.threads import blockingCallFromThread
    from twisted.python.failure import Failure

    r: Any = reactor
    if r.running:
        return blockingCallFromThread(r, f, r)
    result: list[Any] = []

    def start() -> None:
        d = maybeDeferred(f, r)
        d.addBoth(result.append)
        d.addBoth(lambda _: r.stop())

    r.callWhenRunning(start)
    r.run(installSignalHandlers=threading.current_thread() is threading.main_thread())
    if not result:
        raise _Failure("interrupted")
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]


@dataclass
class _Report:
    name: str
    title: str
    steps: list[tuple[str, str, str]]
    ok: bool = True


async def _checkUpstreams(config: Any, reactor: Any) -> list[_Report]:
    """
    Connect to every configured smart host (each address of each
    C{[[routes.hops]]}), as delivery would: EHLO, STARTTLS under the hop's
    TLS mode (verifying the certificate under C{verify}), AUTH with its
    credentials; then QUIT.  No mail is sent.
    """
    from twisted.internet.defer import gatherResults

    from relayd.delivery.attempt import loadTrustRoot
    from relayd.delivery.client import ClientTimeouts
    from relayd.delivery.routing import MXResolver, ResolverError

    step = min(LIVE_TIMEOUT, config.commandTimeout)
    timeouts = ClientTimeouts(
        connect=min(LIVE_TIMEOUT, config.connectTimeout), greeting=step, helo=step, quit=step
    )
    trustRoot = loadTrustRoot(config.caFile) if config.caFile else None
    resolver = MXResolver(
        reactor,
        list(config.resolvers) or None,
        port=config.resolverPort,
        timeout=min(config.dnsTimeout, LIVE_TIMEOUT),
    )
    resolver.start()
    try:
        checks = []
        for i, route in enumerate(config.routes):
            for j, hop in enumerate(route.hops):
                name = f"route {i} hop {j} ({hop.host}:{hop.port})"
                title = (
                    f"upstream {name}, for {' '.join(route.domains)}: tls={hop.tls}"
                    + (f", auth as {hop.username}" if hop.username else "")
                    + (
                        f" with {hop.oauth2.mechanism.upper()} ({hop.oauth2.grant} grant)"
                        if getattr(hop, "oauth2", None) is not None
                        else ""
                    )
                )
                try:
                    addresses = await resolver.lookupAddresses(hop.host)
                except ResolverError as e:
                    checks.append(
                        succeed([_Report(name, title, [("resolve", "FAILED", e.reason)], ok=False)])
                    )
                    continue
                for address in addresses:
                    checks.append(
                        Deferred.fromCoroutine(
                            _checkHop(
                                config, reactor, timeouts, trustRoot, hop, address, name, title
                            )
                        )
                    )
        groups = await gatherResults(checks)
    finally:
        resolver.stop()
    return [report for group in groups for report in group]


async def _checkHop(
    config: Any,
    reactor: Any,
    timeouts: Any,
    trustRoot: Any,
    hopConfig: Any,
    address: str,
    name: str,
    title: str,
) -> list[_Report]:
    from twisted.internet.endpoints import connectProtocol

    from relayd.certificates import TLSProfile
    from relayd.delivery.client import HopFailure, SMTPClient
    from relayd.delivery.endpoint import hopEndpoint
    from relayd.delivery.routing import Hop

    host = hopConfig.host.strip("[]")
    oauth2 = getattr(hopConfig, "oauth2", None)
    hop = Hop(
        host,
        address,
        hopConfig.port,
        hopConfig.tls,
        hopConfig.username,
        hopConfig.password,
        oauth2,
    )
    report = _Report(f"{name} [{address}]", f"{title} [{address}]", [])
    tokens = None
    if oauth2 is not None:
        from relayd.delivery.oauth2 import TokenSources

        tokens = TokenSources(reactor)
        report.steps.append(await _checkToken(tokens, oauth2, reactor))
        if report.steps[-1][1] != "ok":
            await tokens.stop()
            report.ok = False
            return [report]
    client = SMTPClient(
        hop,
        config.hostname,
        timeouts,
        reactor,
        trustRoot,
        TLSProfile(config.tlsCiphers, config.tlsMinVersion),
        TLSProfile(config.tlsOpportunisticCiphers, config.tlsMinVersion),
        tokens=tokens,
    )
    endpoint = hopEndpoint(reactor, address, hop.port, timeouts.connect)
    try:
        await connectProtocol(endpoint, client)
    except Exception as e:
        report.steps.append(("connect", "FAILED", f"{address}:{hop.port}: {e}"))
        report.ok = False
        return [report]
    report.steps.append(("connect", "ok", f"{address}:{hop.port}"))
    error = None
    try:
        await client.ready
    except HopFailure as e:
        error = str(e.reply)
    except Exception as e:  # pragma: no cover - the client turns errors into HopFailure
        error = str(e)
    await client.quit()
    if tokens is not None:
        await tokens.stop()
    done = client.steps
    labels = (
        ("greeting", "greeting"),
        ("ehlo", "EHLO"),
        ("starttls", "STARTTLS"),
        ("auth", "AUTH"),
    )
    for step, label in labels:
        if step in done:
            text = ""
            if step == "starttls":
                text = client.tls or ""
                if hop.tls == "verify":
                    text += f", certificate verified for {hop.host}"
            if step == "auth" and oauth2 is not None:
                text = f"{oauth2.mechanism.upper()} as {hop.username}"
            report.steps.append((label, "ok", text))
        elif step == "starttls" and hop.tls == "none":
            report.steps.append((label, "-", "not used (tls = none)"))
        elif step == "auth" and hop.username is None:
            report.steps.append((label, "-", "not used (no username)"))
        elif error is not None:
            report.steps.append((label, "FAILED", error))
            report.ok = False
            break
        elif step == "starttls":
            report.steps.append((label, "-", "not offered: mail goes unencrypted (opportunistic)"))
    return [report]


async def _checkToken(tokens: Any, oauth2: Any, reactor: Any) -> tuple[str, str, str]:
    """
    Fetch an OAuth2 access token for a hop, as delivery would: the C{token}
    step of C{check-config --live}, with its expiry or the error (never the
    token itself).
    """
    from relayd.delivery.oauth2 import TokenError

    source = tokens.source(oauth2)
    try:
        await source.token()
    except TokenError as e:
        return ("token", "FAILED", f"{e.code} {e.enhanced} {e.text}")
    expires = source.expiresAt
    left = "" if expires is None else f", expires in {_duration(expires - reactor.seconds())}"
    return ("token", "ok", f"{oauth2.grant} grant from {oauth2.tokenURL}{left}")


# --- the command line --------------------------------------------------------------


def _parser() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"relayd's config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})",
    )
    common.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=argparse.SUPPRESS,
        help="how long to wait for relayd's answer (default 60)",
    )
    parser = _Parser(
        prog=_PROG,
        description="Look at and control a running relayd.",
        parents=[common],
    )
    parser.add_argument(
        "--version", action="version", version=versionLine(_PROG), help="print the version"
    )
    # Not set_defaults(): it would change the actions shared with every
    # subcommand (parents=[common]), which would then reset the value.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(group: Any, name: str, run: Callable[[_Context], None], text: str) -> _Parser:
        sub: _Parser = group.add_parser(name, parents=[common], help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    sub = add(commands, "status", _status, "uptime, listeners, connections, queue counts")
    sub.add_argument("--json", action="store_true", help="print JSON")

    queue = commands.add_parser("queue", help="look at and change the mail queue")
    queueCommands = queue.add_subparsers(dest="what", metavar="ACTION", parser_class=_Parser)
    queueCommands.required = True
    sub = add(queueCommands, "list", _queueList, "one line per queued message")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = add(queueCommands, "show", _queueShow, "one message's envelope and headers")
    sub.add_argument("id", metavar="ID", help="the queue id")
    sub.add_argument("--body", action="store_true", help="print the whole message")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub = add(queueCommands, "flush", _flush, "attempt deferred mail now")
    sub.add_argument("ids", metavar="ID", nargs="*", help="queue ids (default: all)")
    for action, text in (
        ("hold", "put messages on hold: kept, never attempted"),
        ("release", "release held messages: attempted now"),
        ("delete", "delete messages, without a bounce"),
    ):
        sub = add(queueCommands, action, _change, text)
        sub.set_defaults(action=action)
        sub.add_argument("ids", metavar="ID", nargs="*", help="queue ids")
        sub.add_argument("--all", action="store_true", help="every queued message")
        sub.add_argument(
            "--from", dest="sender", metavar="ADDR", help="with --all: only mail from ADDR"
        )
        sub.add_argument(
            "--to",
            dest="recipient",
            metavar="DOMAIN",
            help="with --all: only mail still to go to DOMAIN (or to an address)",
        )

    add(commands, "reload", _reload, "make relayd re-read its config file")

    sub = add(commands, "check-config", _checkConfig, "check a config file as startup does")
    sub.add_argument("path", metavar="PATH", nargs="?", help="the file (default: --config)")
    sub.add_argument(
        "--live",
        action="store_true",
        help="also connect to every [[routes]] upstream: TLS, AUTH",
    )

    sub = add(
        commands,
        "check-domain",
        _checkDomain,
        "check a domain's SPF, DKIM, DMARC, MTA-STS and TLSRPT records against relayd",
    )
    sub.add_argument("domain", metavar="DOMAIN", help="the sending domain (the From: domain)")
    sub.add_argument("--json", action="store_true", help="print the findings as JSON")
    sub.add_argument("--selector", metavar="S", help="only the DKIM key with this selector")
    sub.add_argument(
        "--address",
        metavar="IP",
        action="append",
        help="an address relayd sends from (repeatable; default: its host name's addresses)",
    )

    from relayd.ops.passwd import _rounds
    from relayd.smtp.auth import DEFAULT_ROUNDS

    sub = add(commands, "passwd", _passwd, "set a user's password in the users file")
    sub.add_argument("user", metavar="USER", help="the user name")
    sub.add_argument("--stdin", action="store_true", help="read the password from stdin")
    sub.add_argument(
        "--rounds", type=_rounds, default=DEFAULT_ROUNDS, metavar="N", help="bcrypt cost"
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    stdin: BinaryIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> int:
    """
    Run C{relayctl}.  Safe to call from any thread: only C{check-config
    --live} needs a reactor (see L{_inReactor}).

    @param argv: the arguments without the program name (C{sys.argv[1:]}
        when None).
    @param stdout: where output goes (C{sys.stdout} when None).
    @param stderr: where errors go (C{sys.stderr} when None).
    @param stdin: where C{passwd --stdin} reads (C{sys.stdin.buffer}).
    @param ask: prompts for a password without echo.
    @return: the exit status: 0 done, 1 failure, 2 usage error.
    """
    output = _Output(stdout or sys.stdout, stderr or sys.stderr)
    try:
        options = _parser().parse_args(argv)
        try:
            options.config = configPath(getattr(options, "config", None))
        except ConfigNotFound as e:
            if options.command == "check-config" and getattr(options, "path", None):
                options.config = e.tried[0][0]
            else:
                raise _Failure(str(e)) from None
        options.timeout = getattr(options, "timeout", 60.0)
        options.commandLine = " ".join(
            part for part in (_PROG, options.command, getattr(options, "what", None)) if part
        )
        options.run(_Context(options, output, stdin, ask))
    except _Usage as e:
        output.error(f"{e} (see relayctl --help)")
        return 2
    except _Failure as e:
        output.error(str(e))
        return 1
    except ControlError as e:
        output.error(str(e))
        return 1
    except ControlClientError as e:
        output.error(str(e))
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        output.error("interrupted")
        return 1
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
