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
    queue summary [--by domain|sender] [--json]   counts by domain and age
    queue bounce  ID... | --all | SELECTORS       bounce to the sender (5.0.0)
    queue requeue ID... | --all | SELECTORS       route afresh now
        SELECTORS (also for flush/hold/release/delete):
        [--domain D] [--sender S] [--older-than 30m|2h|1d]
    destination suspend|resume DOMAIN    hold / restart deliveries to DOMAIN
    destination list [--json]            the suspended destinations
    tls report DOMAIN [--json]           today's TLSRPT counts (RFC 8460) for DOMAIN
    config [--defaults] [--json]         the effective config (secrets masked)
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
    DestinationList,
    DestinationResume,
    DestinationSuspend,
    MessageNotFound,
    NotRunning,
    QueueBounce,
    QueueChange,
    QueueFlush,
    QueueList,
    QueueRequeue,
    QueueShow,
    Reload,
    Status,
    TLSReport,
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
    journal = status.get("journal")
    out.line(f"spool:       {status['spool']}" + (f" (journal: {journal})" if journal else ""))
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
    _report(ctx, results)


def _report(ctx: _Context, results: list[list[Any]]) -> None:
    """
    Print the daemon's C{[queueId, outcome, ok]} results, failures on
    standard error; exit status 1 when one failed.
    """
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


# --- the queue at scale: summary, selectors, bounce, requeue, destinations ------------


def _suspended(ctx: _Context) -> dict[str, Any]:
    """The suspended destinations: from the daemon, else from the spool."""
    from relayd.queue.suspend import SuspensionsError, readSuspended

    try:
        client = ctx.connect()
    except NotRunning:
        try:
            return readSuspended(ctx.paths.spool)
        except SuspensionsError as e:
            raise _Failure(str(e)) from None
    with client:
        domains: dict[str, Any] = client.call(DestinationList)["domains"]
    return domains


def _queueSummary(ctx: _Context) -> None:
    """C{relayctl queue summary}: the queue's shape (L{relayd.ops.queuetools})."""
    from relayd.ops.queuetools import queueShape, shapeLines

    entries = _entries(ctx)
    shape = queueShape(entries, time.time(), ctx.options.by, _suspended(ctx))
    if ctx.options.json:
        ctx.out.json(shape)
        return
    for line in shapeLines(shape):
        ctx.out.line(line)


def _hasSelectors(options: argparse.Namespace) -> bool:
    return any(
        getattr(options, name, None) is not None for name in ("domain", "fromSender", "olderThan")
    )


def _selectedIds(ctx: _Context, heldToo: bool = True) -> list[str]:
    """
    The queue ids C{--domain}, C{--sender} and C{--older-than} pick, from
    the daemon's listing (L{relayd.ops.queuetools.selectEntries}).
    """
    from relayd.ops.queuetools import parseDuration, selectEntries

    options = ctx.options
    olderThan = None
    if options.olderThan is not None:
        try:
            olderThan = parseDuration(options.olderThan)
        except ValueError as e:
            raise _Usage(f"--older-than: {e}") from None
    ctx.daemon().close()  # changes need the daemon: say so before listing
    chosen = selectEntries(
        _entries(ctx), time.time(), options.domain, options.fromSender, olderThan
    )
    held = [e for e in chosen if e["state"] == "hold"]
    if held and not heldToo:
        ctx.out.line(f"{_plural(len(held), 'message')} on hold left alone (release them first)")
        chosen = [e for e in chosen if e["state"] != "hold"]
    return [e["queue_id"] for e in chosen]


def _checkSelection(ctx: _Context, ids: list[str] | None) -> None:
    options = ctx.options
    if ids is not None and (_hasSelectors(options) or getattr(options, "all", False)):
        raise _Usage("give queue ids, or --all and/or selectors, not both")
    fromTo = getattr(options, "sender", None) is not None or getattr(options, "recipient", None)
    if fromTo and _hasSelectors(options):
        raise _Usage("--from/--to go with --all; use --sender/--domain with the selectors")


def _flushSelected(ctx: _Context) -> None:
    """C{relayctl queue flush}: by ids, by selectors, or everything."""
    ids = _ids(ctx)
    _checkSelection(ctx, ids)
    if not _hasSelectors(ctx.options):
        _flush(ctx)
        return
    selected = _selectedIds(ctx, heldToo=False)
    if not selected:
        ctx.out.line("no queued message matched")
        return
    ctx.options.ids = selected
    _flush(ctx)


def _changeSelected(ctx: _Context) -> None:
    """C{relayctl queue hold|release|delete} with the selectors as well."""
    ids = _ids(ctx)
    _checkSelection(ctx, ids)
    if not _hasSelectors(ctx.options):
        _change(ctx)
        return
    selected = _selectedIds(ctx)
    if not selected:
        ctx.out.line("no queued message matched")
        return
    ctx.options.ids = selected
    ctx.options.all = False
    _change(ctx)


def _idsOrSelection(ctx: _Context, what: str) -> list[str] | None:
    """Ids given, or picked by selectors; None for --all alone."""
    ids = _ids(ctx)
    _checkSelection(ctx, ids)
    if ids is not None:
        return ids
    if _hasSelectors(ctx.options):
        return _selectedIds(ctx)
    if not ctx.options.all:
        raise _Usage(f"queue {what}: give queue ids, --all, or --domain/--sender/--older-than")
    return None


def _bounce(ctx: _Context) -> None:
    """C{relayctl queue bounce}: an administrative bounce (a DSN to the sender)."""
    ids = _idsOrSelection(ctx, "bounce")
    if ids is None:
        ids = [e["queue_id"] for e in _entries(ctx)]
    if not ids:
        ctx.out.line("no queued message matched")
        return
    with ctx.daemon() as client:
        results = client.call(QueueBounce, queueIds=ids)["results"]
    _report(ctx, results)


def _requeue(ctx: _Context) -> None:
    """C{relayctl queue requeue}: re-route after a route change."""
    ids = _idsOrSelection(ctx, "requeue")
    if ids is not None and not ids:
        ctx.out.line("no queued message matched")
        return
    with ctx.daemon() as client:
        results: dict[str, str] = client.call(QueueRequeue, queueIds=ids)["results"]
    counts = {o: sum(1 for v in results.values() if v == o) for o in set(results.values())}
    line = f"{_plural(counts.get('scheduled', 0), 'message')} requeued: routed afresh now"
    if counts.get("delivering"):
        line += f", {counts['delivering']} being delivered already"
    if counts.get("hold"):
        line += f", {counts['hold']} on hold (not requeued)"
    ctx.out.line(line)
    for queueId, outcome in sorted(results.items()):
        if outcome == "unknown":
            ctx.out.error(f"{queueId}: no such message in the queue")
    if counts.get("unknown"):
        raise SystemExit(1)


def _destinationDomain(ctx: _Context) -> str:
    from relayd.queue.suspend import normalDomain

    try:
        return normalDomain(ctx.options.domain)
    except ValueError as e:
        raise _Usage(str(e)) from None


def _destinationSuspend(ctx: _Context) -> None:
    domain = _destinationDomain(ctx)
    with ctx.daemon() as client:
        changed = client.call(DestinationSuspend, domain=domain)["changed"]
    ctx.out.line(
        f"{domain}: suspended: no delivery starts, mail for it is accepted and waits"
        if changed
        else f"{domain}: suspended already"
    )


def _destinationResume(ctx: _Context) -> None:
    domain = _destinationDomain(ctx)
    with ctx.daemon() as client:
        answer = client.call(DestinationResume, domain=domain)
    if answer["changed"]:
        ctx.out.line(
            f"{domain}: resumed, {_plural(answer['flushed'], 'message')} to be attempted now"
        )
    else:
        ctx.out.line(f"{domain}: not suspended")


def _destinationList(ctx: _Context) -> None:
    domains = _suspended(ctx)
    if ctx.options.json:
        ctx.out.json(domains)
        return
    if not domains:
        ctx.out.line("no destination is suspended")
        return
    for domain in sorted(domains):
        ctx.out.line(f"{domain}  suspended since {_when(domains[domain].get('since'))}")


# --- TLSRPT ---------------------------------------------------------------------------


def _tlsReport(ctx: _Context) -> None:
    """
    C{relayctl tls report DOMAIN}: today's TLSRPT counts of DOMAIN
    (L{relayd.delivery.tlsrpt}), from the running daemon, else from the
    day's file in the spool (which lags the daemon by a few seconds).
    """
    import datetime

    from relayd.delivery.tlsrpt import DIRECTORY, readDay, summarize

    domain = _destinationDomain(ctx)
    try:
        client = ctx.connect()
    except NotRunning:
        day = datetime.datetime.now(datetime.UTC).date().isoformat()
        stored = readDay(os.path.join(ctx.paths.spool, DIRECTORY, f"{day}.json"))
        counts = summarize(stored, domain) if stored is not None else []
    else:
        with client:
            counts = client.call(TLSReport, domain=domain)["counts"]
    if ctx.options.json:
        ctx.out.json(counts)
        return
    if not counts:
        ctx.out.line(f"{domain}: no TLS sessions under a policy counted today")
        return
    for entry in counts:
        ctx.out.line(
            f"{domain} {entry['day']} policy-type={entry['policy-type']} "
            f"successful={entry['success']} failed={entry['failure']}"
        )
        for kind, count in sorted(entry["failures"].items()):
            ctx.out.line(f"  {kind}: {count}")


# --- the effective config -------------------------------------------------------------


def _config(ctx: _Context) -> None:
    """C{relayctl config}: like C{postconf -n}/C{-d} (L{relayd.ops.showconfig})."""
    from relayd.config import ConfigError
    from relayd.ops.showconfig import defaultSettings, effectiveSettings, settingLines

    if ctx.options.defaults:
        settings = defaultSettings()
    else:
        try:
            settings = effectiveSettings(ctx.options.config)
        except ConfigError as e:
            raise _Failure(f"config error: {e}") from None
        except (OSError, ValueError) as e:
            raise _Failure(f"config error: {ctx.options.config}: {e}") from None
    if ctx.options.json:
        ctx.out.json(settings)
        return
    for line in settingLines(settings, mark=not ctx.options.defaults):
        ctx.out.line(line)


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


# --- route ---------------------------------------------------------------------------


def _route(ctx: _Context) -> None:
    """
    Where mail to ADDRESS would go and under which TLS policy, as delivery
    decides it (L{relayd.delivery.routing.Router}, L{relayd.delivery.mtasts}):
    offline, through C{[delivery] resolvers}; the MTA-STS policy from the
    spool's cache or fetched now (not written back).  Credentials are named
    by user name only.  Exit status 1 when there is no route.
    """
    from relayd.address import AddressError, asciiDomain
    from relayd.config import ConfigError, load

    address = ctx.options.address.strip()
    local, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".")
    if not at or not local or not domain:
        raise _Usage(f"not a mail address: {ctx.options.address!r}")
    if not (domain.startswith("[") and domain.endswith("]")):
        try:
            domain = asciiDomain(domain)
        except AddressError:
            raise _Usage(f"not a mail address: {ctx.options.address!r}") from None
    try:
        config = load(ctx.options.config)
    except ConfigError as e:
        raise _Failure(f"config error: {e}") from None
    lines, ok = _inReactor(
        lambda reactor: Deferred.fromCoroutine(_routeLines(config, reactor, address, domain))
    )
    if ctx.options.sender:
        lines.insert(1, f"  sender: {ctx.options.sender} (routes depend on the recipient only)")
    for line in lines:
        ctx.out.line(line)
    if not ok:
        raise SystemExit(1)


async def _routeLines(
    config: Any, reactor: Any, address: str, domain: str
) -> tuple[list[str], bool]:
    """The lines C{relayctl route} prints, and whether there is a route."""
    from relayd.delivery.mtasts import NO_POLICY, MTASTSPolicies, applyTLSPolicy
    from relayd.delivery.routing import MXResolver, ResolverError, Router, RoutingError

    resolver = MXResolver(
        reactor,
        list(config.resolvers) or None,
        port=config.resolverPort,
        timeout=min(config.dnsTimeout, LIVE_TIMEOUT),
    )
    resolver.start()
    try:
        router = Router(
            resolver,
            config.routes,
            port=config.deliveryPort,
            mxTls=config.mxTls,
            localNames=(config.hostname,),
        )
        try:
            destination = await router.route(domain)
        except RoutingError as e:
            kind = "bounce" if e.permanent else "defer"
            return [f"{address}: no route: {e.enhanced} {e.text} (would {kind})"], False
        lines: list[str] = []
        if destination.key.startswith("route:"):
            index = int(destination.key.split(":", 1)[1])
            route = config.routes[index]
            lines.append(f"{address}: route {index} (domains {' '.join(route.domains)})")
            if route.mode == "passthrough":
                lines.append(f"  mode: passthrough (relayed in session; fallback {route.fallback})")
            for hop in route.hops:
                auth = f", auth as {hop.username}" if hop.username else ""
                addresses = " ".join(
                    h.address for h in destination.hops if h.host == hop.host.strip("[]")
                )
                lines.append(
                    f"  hop: {hop.host}:{hop.port} {addresses or '(no address)'} "
                    f"tls={hop.tls}{auth}"
                )
            lines.append("  policy: none (MTA-STS and DANE apply to MX delivery, not to routes)")
            return lines, True
        lines.append(f"{address}: MX delivery to {domain}")
        try:
            records = sorted(await resolver.lookupMX(domain))
        except ResolverError:
            records = [(0, domain)]  # implicit MX, or an address literal
        for preference, host in records:
            addresses = " ".join(h.address for h in destination.hops if h.host == host)
            lines.append(f"  mx: {preference} {host} {addresses or '(not used)'}")
        lines.append(f"  tls: mx_tls = {config.mxTls}")
        policy = NO_POLICY
        if not config.mtaSts:
            lines.append("  policy: none ([delivery] mta_sts = false)")
        else:
            policies = MTASTSPolicies(
                reactor,
                resolver,
                config.spoolDirectory,
                caFile=config.caFile,
                port=config.mtaStsPort,
                timeout=config.mtaStsTimeout,
                persist=False,
            )
            policies.loadCache()
            policy = await policies.lookup(domain)
            if policy.kind == "none":
                lines.append(f"  policy: none ({policy.note})")
            else:
                lines.append(
                    f"  policy: {policy.kind} {policy.mode} (id {policy.policyId}, "
                    f"{policy.note}), mx {' '.join(policy.mxPatterns)}"
                )
        dane = await _routeDane(config, reactor, domain, destination, lines)
        applied = applyTLSPolicy(destination, policy)
        used = {hop.host: hop.tls for hop in applied.destination.hops}
        for _, host in records:
            mode = dane.get(host, "none")
            if mode == "dane-error":
                lines.append(f"  {host}: not used (TLSA lookup failed: deferred, DANE)")
            elif mode == "dane":
                lines.append(f"  {host}: tls=dane (certificate must match a TLSA record)")
            elif applied.refusal is None and host in used:
                tls = used[host]
                if mode == "dane-unusable" and tls in ("none", "opportunistic"):
                    tls = "required"
                lines.append(f"  {host}: tls={tls}")
            elif policy.kind == "mta-sts" and not policy.matches(host):
                lines.append(f"  {host}: not used (does not match the policy)")
        if applied.refusal is not None:
            lines.append(f"  would defer: {applied.refusal.enhanced} {applied.refusal.text}")
        return lines, True
    finally:
        resolver.stop()


async def _routeDane(
    config: Any, reactor: Any, domain: str, destination: Any, lines: list[str]
) -> dict[str, str]:
    """
    DANE (RFC 7672, L{relayd.delivery.dane}) for C{relayctl route}, as the
    deliverer decides it: nothing unless C{[delivery] dane} is on and the
    MX RRset is DNSSEC-validated; then each MX host's mode (C{"dane"},
    C{"dane-unusable"}, C{"dane-error"} or C{"none"}), which wins over
    MTA-STS for that host.  Adds the C{dane:} line(s) to C{lines}.
    """
    if not getattr(config, "dane", False):
        lines.append("  dane: off ([delivery] dane = false)")
        return {}
    from twisted.internet.defer import gatherResults

    from relayd.delivery.dane import NO_DANE, DaneResolver

    resolver = DaneResolver(
        reactor, list(config.resolvers), port=config.resolverPort, timeout=config.dnsTimeout
    )
    try:
        if domain.startswith("[") or not await resolver.mxSecure(domain):
            if domain.startswith("[") or await resolver.validates():
                lines.append("  dane: none (MX records not DNSSEC-validated)")
            else:
                # No AD even for the signed root: the resolver does not
                # validate (or is down), so DANE never applies (docs/dane.md).
                servers = ", ".join(config.resolvers)
                lines.append(
                    f"  dane: not checked (resolver {servers} set no AD bit for the signed "
                    "root zone: not a validating resolver, see docs/dane.md)"
                )
            return {}
        hosts = sorted({hop.host for hop in destination.hops})
        found = await gatherResults(
            [resolver.lookupTLSA(host, config.deliveryPort) for host in hosts]
        )
        signed = await gatherResults([resolver.hostSecure(host) for host in hosts])
    finally:
        resolver.stop()
    modes: dict[str, str] = {}
    for host, policy, secure in zip(hosts, found, signed, strict=True):
        policy = policy if secure else NO_DANE
        modes[host] = policy.mode
        detail = {
            "dane": f"{len(policy.usable)} usable TLSA record(s)",
            "dane-unusable": "TLSA records, none usable: TLS required, not authenticated",
            "dane-error": policy.error or "TLSA lookup failed",
            "none": "no TLSA records" if secure else "host not in a signed zone",
        }[policy.mode]
        lines.append(f"  dane: {host}: {policy.mode} ({detail})")
    return modes


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
    sub = add(queueCommands, "flush", _flushSelected, "attempt deferred mail now")
    sub.add_argument("ids", metavar="ID", nargs="*", help="queue ids (default: all)")
    _selectors(sub)
    for action, text in (
        ("hold", "put messages on hold: kept, never attempted"),
        ("release", "release held messages: attempted now"),
        ("delete", "delete messages, without a bounce"),
    ):
        sub = add(queueCommands, action, _changeSelected, text)
        _selectors(sub)
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

    sub = add(
        queueCommands,
        "summary",
        _queueSummary,
        "messages by domain (or sender) and age, like qshape",
    )
    sub.add_argument(
        "--by", choices=("domain", "sender"), default="domain", help="rows by (default domain)"
    )
    sub.add_argument("--json", action="store_true", help="print JSON")
    for action, run, text in (
        ("bounce", _bounce, "bounce messages to their senders (5.0.0) and remove them"),
        ("requeue", _requeue, "route messages afresh now, after a route change"),
    ):
        sub = add(queueCommands, action, run, text)
        sub.set_defaults(action=action)
        sub.add_argument("ids", metavar="ID", nargs="*", help="queue ids")
        sub.add_argument("--all", action="store_true", help="every queued message")
        _selectors(sub)

    destination = commands.add_parser("destination", help="suspend and resume a destination")
    destinationCommands = destination.add_subparsers(
        dest="what", metavar="ACTION", parser_class=_Parser
    )
    destinationCommands.required = True
    for action, run, text in (
        ("suspend", _destinationSuspend, "hold deliveries to DOMAIN (mail is still accepted)"),
        ("resume", _destinationResume, "deliver to DOMAIN again, starting now"),
    ):
        sub = add(destinationCommands, action, run, text)
        sub.add_argument("domain", metavar="DOMAIN", help="the destination domain")
    sub = add(destinationCommands, "list", _destinationList, "the suspended destinations")
    sub.add_argument("--json", action="store_true", help="print JSON")

    tls = commands.add_parser("tls", help="outbound TLS reporting (TLSRPT)")
    tlsCommands = tls.add_subparsers(dest="what", metavar="ACTION", parser_class=_Parser)
    tlsCommands.required = True
    sub = add(tlsCommands, "report", _tlsReport, "today's TLSRPT counts for DOMAIN")
    sub.add_argument("domain", metavar="DOMAIN", help="the policy domain")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = add(commands, "config", _config, "the effective config, like postconf")
    sub.add_argument(
        "--defaults", action="store_true", help="the built-in defaults (like postconf -d)"
    )
    sub.add_argument("--json", action="store_true", help="print JSON")

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

    sub = add(
        commands,
        "route",
        _route,
        "where mail to an address would go: route or MX list, TLS mode and policy",
    )
    sub.add_argument("address", metavar="ADDRESS", help="the recipient address")
    sub.add_argument("--sender", metavar="S", help="the sender (shown; routes ignore it)")

    from relayd.ops.passwd import _rounds
    from relayd.smtp.auth import DEFAULT_ROUNDS

    sub = add(commands, "passwd", _passwd, "set a user's password in the users file")
    sub.add_argument("user", metavar="USER", help="the user name")
    sub.add_argument("--stdin", action="store_true", help="read the password from stdin")
    sub.add_argument(
        "--rounds", type=_rounds, default=DEFAULT_ROUNDS, metavar="N", help="bcrypt cost"
    )
    return parser


def _selectors(sub: _Parser) -> None:
    """C{--domain}, C{--sender}, C{--older-than} (L{relayd.ops.queuetools.selectEntries})."""
    sub.add_argument(
        "--domain", metavar="D", help="messages with recipients still to go to domain D"
    )
    sub.add_argument(
        "--sender",
        dest="fromSender",
        metavar="S",
        help="messages from S (an address, <> for the null sender, or a domain)",
    )
    sub.add_argument(
        "--older-than",
        dest="olderThan",
        metavar="DURATION",
        help="messages that arrived at least DURATION ago (90s, 30m, 2h, 1d)",
    )


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
