"""
SMTP TLS Reporting (RFC 8460): count, per policy domain and UTC day, the
sessions relayd had with MX hosts under a published TLS policy (MTA-STS,
RFC 8461; DANE, RFC 7672) and how they failed, and once a day send each
domain that asks for it (C{_smtp._tls.<domain>} TXT, section 3) the JSON
report of the day before (section 4), gzipped, by mail through relayd's
own queue (section 5.3) or by HTTPS POST (section 5.4).

The pieces:

  - L{TLSSession}: one session as delivery saw it (the MX host, the
    addresses, the RFC 8460 result type when it failed).  The
    L{relayd.delivery.attempt.Deliverer} puts them in its
    L{relayd.delivery.attempt.AttemptResult}, which delivery processes
    send back to the queue manager with the rest of the result
    (L{relayd.delivery.processes}): so every count reaches the one
    process that owns the files, summed there.
  - L{TLSReportCounts}: the counts, in memory and in
    C{<spool>/tlsrpt/<YYYY-MM-DD>.json}, one file per UTC day.
  - L{parseTLSRPT}, L{buildReport}, L{reportMessage}: the TXT record, the
    report and the message carrying it.
  - L{TLSReporter}: the daily sender (C{[delivery] tlsrpt = true}).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from relayd.delivery.mtasts import txtFields
from relayd.ops.logs import Logger
from relayd.queue.safeio import writeAtomically

__all__ = [
    "RESULT_TYPES",
    "DIRECTORY",
    "TLSSession",
    "TLSReportCounts",
    "TLSRPTError",
    "parseTLSRPT",
    "buildReport",
    "reportMessage",
    "reportFilename",
    "TLSReporter",
    "countAttempt",
    "sessionToJSON",
    "sessionFromJSON",
]

log = Logger(namespace="relayd.tlsrpt")

DIRECTORY = "tlsrpt"
"""The counts' folder inside the spool directory."""

RESULT_TYPES = (
    # Section 4.3.1: negotiation failures.
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    # Section 4.3.2.1: DANE.
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    # Section 4.3.2.2: MTA-STS.
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
)
"""The failure result types of RFC 8460 section 4.3 that relayd reports."""

KEEP_DAYS = 8
"""Day files older than this many days are removed once sent (or never to be sent)."""

SEND_DAYS = 2
"""Reports are sent for at most this many past days (a daemon down over midnight)."""


@dataclass(frozen=True)
class TLSSession:
    """
    One SMTP session (or attempt at one) with an MX host under a policy.

    @ivar mxHost: the MX host name (C{receiving-mx-hostname}).
    @ivar receivingIp: its address (C{receiving-ip}).
    @ivar sendingIp: relayd's address of the connection (C{sending-mta-ip}),
        C{""} when no connection was made.
    @ivar result: None for a successful TLS session, else one of
        L{RESULT_TYPES}.
    @ivar detail: why, for C{additional-information} and the log.
    @ivar tlsa: the TLSA records (presentation form) when DANE applied.
    @ivar dane: DANE applied to the host (its MX RRset and zone signed):
        the session counts under policy type C{tlsa}.
    """

    mxHost: str
    receivingIp: str
    sendingIp: str = ""
    result: str | None = None
    detail: str = ""
    tlsa: tuple[str, ...] = ()
    dane: bool = False


def sessionToJSON(session: TLSSession) -> dict[str, Any]:
    """A JSON-serialisable dict of C{session} (for the delivery processes' pipe)."""
    return {
        "mx": session.mxHost,
        "ip": session.receivingIp,
        "from": session.sendingIp,
        "result": session.result,
        "detail": session.detail,
        "tlsa": list(session.tlsa),
        "dane": session.dane,
    }


def sessionFromJSON(body: dict[str, Any]) -> TLSSession:
    """The inverse of L{sessionToJSON}."""
    return TLSSession(
        str(body["mx"]),
        str(body["ip"]),
        str(body.get("from", "")),
        body.get("result"),
        str(body.get("detail", "")),
        tuple(str(r) for r in body.get("tlsa", ())),
        bool(body.get("dane", False)),
    )


def utcDay(seconds: float) -> str:
    """The UTC date of C{seconds} since the epoch, C{YYYY-MM-DD}."""
    return datetime.fromtimestamp(seconds, UTC).date().isoformat()


# --- the counts -----------------------------------------------------------------


def _emptyPolicy(policyType: str, domain: str) -> dict[str, Any]:
    return {
        "policy-type": policyType,
        "policy-domain": domain,
        "policy-string": [],
        "mx-host": [],
        "success": 0,
        "failure": 0,
        "failures": {},
    }


class TLSReportCounts:
    """
    The TLSRPT counts of the queue manager, per UTC day, policy domain and
    policy type.

    Kept in memory and written, when changed, to
    C{<spool>/tlsrpt/<day>.json} with L{writeAtomically} in a thread every
    L{flushInterval} seconds and at shutdown: never an fsync per message.
    A crash loses the counts of the last few seconds at most, which a
    statistical report can afford (RFC 8460 asks for no exact count);
    a restart keeps the rest, read back by L{start}.

    A day's file::

        {"day": "2026-12-02", "sent": ["example.net"],
         "policies": {"sts example.net": {"policy-type": "sts", ...,
             "success": 3, "failure": 1,
             "failures": {"<type>|<sending ip>|<mx>|<receiving ip>":
                 {"count": 1, "detail": "..."}}}}}
    """

    flushInterval = 5.0

    def __init__(self, clock: Any, spoolDirectory: str) -> None:
        self.clock = clock
        self.directory = os.path.join(spoolDirectory, DIRECTORY)
        self._days: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._flushing: Deferred[None] | None = None
        self._loop: LoopingCall | None = None

    # --- life ------------------------------------------------------------

    def start(self) -> None:
        """Read today's file back (blocking, at startup) and start writing."""
        today = utcDay(self.clock.seconds())
        loaded = self.read(today)
        if loaded is not None:
            self._days[today] = loaded
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.flushInterval, now=False).addErrback(
            lambda f: log.failure("tlsrpt: flush loop failed", f)
        )

    def stop(self) -> Deferred[None]:
        """Write what changed since the last flush."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.flush()

    # --- counting ----------------------------------------------------------

    def day(self, day: str) -> dict[str, Any]:
        """The counts of C{day} (created empty, read from disk if there)."""
        counts = self._days.get(day)
        if counts is None:
            counts = self.read(day) or {"day": day, "sent": [], "policies": {}}
            self._days[day] = counts
            self._evict()
        return counts

    def _evict(self) -> None:
        """Only the last three days stay in memory (today, and those being reported)."""
        for old in sorted(self._days)[:-3]:
            if old not in self._dirty:
                del self._days[old]

    def add(
        self,
        policyType: str,
        domain: str,
        session: TLSSession,
        policyString: Sequence[str] = (),
        mxPatterns: Sequence[str] = (),
    ) -> None:
        """
        Count one session of C{domain}'s policy (C{policyType} C{sts} or
        C{tlsa}) today.
        """
        today = utcDay(self.clock.seconds())
        counts = self._days.get(today)
        if counts is None:
            # A new day (its file, if any, was read by start): never a
            # disk read on the reactor thread here.
            counts = self._days[today] = {"day": today, "sent": [], "policies": {}}
            self._evict()
        key = f"{policyType} {domain}"
        policy = counts["policies"].setdefault(key, _emptyPolicy(policyType, domain))
        if policyString:
            policy["policy-string"] = list(policyString)
        if mxPatterns:
            policy["mx-host"] = list(mxPatterns)
        if session.result is None:
            policy["success"] += 1
        else:
            policy["failure"] += 1
            detailKey = "|".join(
                (session.result, session.sendingIp, session.mxHost, session.receivingIp)
            )
            entry = policy["failures"].setdefault(detailKey, {"count": 0, "detail": ""})
            entry["count"] += 1
            entry["detail"] = session.detail[:200]
        self._dirty.add(today)

    def summary(self, domain: str, day: str | None = None) -> list[dict[str, Any]]:
        """
        The counts of C{domain} on C{day} (today by default), one dict per
        policy type, for C{relayctl tls report}.
        """
        day = day or utcDay(self.clock.seconds())
        counts = self.day(day)
        return summarize(counts, domain)

    # --- the files ---------------------------------------------------------

    def path(self, day: str) -> str:
        return os.path.join(self.directory, f"{day}.json")

    def read(self, day: str) -> dict[str, Any] | None:
        """C{day}'s file, or None when there is none or it cannot be read (logged)."""
        return readDay(self.path(day))

    def days(self) -> list[str]:
        """The days with a file or with counts in memory, oldest first."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        found = {n[:-5] for n in names if _DAY_FILE.fullmatch(n)}
        return sorted(found | set(self._days))

    def load(self, day: str) -> Deferred[dict[str, Any]]:
        """L{day}, with the file read in a thread when not in memory yet."""
        if day in self._days:
            return succeed(self._days[day])

        def loaded(stored: dict[str, Any] | None) -> dict[str, Any]:
            counts = self._days.get(day)
            if counts is None:
                counts = self._days[day] = stored or {"day": day, "sent": [], "policies": {}}
                self._evict()
            return counts

        return deferToThread(self.read, day).addCallback(loaded)

    def markSent(self, day: str, domain: str) -> None:
        counts = self.day(day)
        if domain not in counts["sent"]:
            counts["sent"].append(domain)
            self._dirty.add(day)

    def flush(self) -> Deferred[None]:
        """Write the changed days, in a thread; one flush at a time."""
        if self._flushing is not None:
            return self._flushing.addCallback(lambda _: self.flush())
        if not self._dirty:
            return succeed(None)
        writes = [
            (self.path(day), json.dumps(self._days[day], sort_keys=True).encode("utf-8"))
            for day in sorted(self._dirty)
            if day in self._days
        ]
        self._dirty.clear()
        directory = self.directory

        def write() -> None:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            for path, data in writes:
                writeAtomically(path, data, mode=0o600)

        def failed(failure: Failure) -> None:
            log.error(
                "tlsrpt: cannot write the counts in {path}: {error}",
                path=directory,
                error=failure.getErrorMessage(),
            )

        def done(_: Any) -> None:
            self._flushing = None

        d = deferToThread(write).addErrback(failed).addBoth(done)
        self._flushing = d if not d.called else None
        return d

    def remove(self, day: str) -> None:
        """Forget C{day} (blocking unlink: a small file, once a day)."""
        self._days.pop(day, None)
        self._dirty.discard(day)
        try:
            os.unlink(self.path(day))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn("tlsrpt: cannot remove {path}: {error}", path=self.path(day), error=e)


_DAY_FILE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\.json")


def readDay(path: str) -> dict[str, Any] | None:
    """A day file (blocking), or None when missing or unreadable (logged)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
        if not isinstance(data.get("policies"), dict) or not isinstance(data.get("sent"), list):
            raise ValueError("not a TLSRPT day file")
        return dict(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        log.warn("tlsrpt: ignoring {path}: {error}", path=path, error=e)
        return None


def summarize(counts: dict[str, Any], domain: str) -> list[dict[str, Any]]:
    """C{domain}'s entries of a day's counts, as L{TLSReportCounts.summary} gives them."""
    domain = domain.lower().rstrip(".")
    found = []
    for policy in counts["policies"].values():
        if policy["policy-domain"] != domain:
            continue
        failures: dict[str, int] = {}
        for key, entry in policy["failures"].items():
            kind = key.split("|", 1)[0]
            failures[kind] = failures.get(kind, 0) + int(entry["count"])
        found.append(
            {
                "day": counts["day"],
                "policy-type": policy["policy-type"],
                "policy-domain": domain,
                "success": policy["success"],
                "failure": policy["failure"],
                "failures": failures,
            }
        )
    return sorted(found, key=lambda p: str(p["policy-type"]))


# --- what the queue manager counts ---------------------------------------------------


def stsPolicyString(policy: Any) -> list[str]:
    """
    The policy text as RFC 8460 section 4.4 wants it (one string per
    line), from a L{relayd.delivery.mtasts.TLSPolicy}: the fields relayd
    keeps, in the order of RFC 8461 section 3.2's example.
    """
    return [
        "version: STSv1",
        f"mode: {policy.mode}",
        *(f"mx: {pattern}" for pattern in policy.mxPatterns),
        f"max_age: {policy.maxAge}",
    ]


def mxMismatch(host: str, policy: Any, address: str = "") -> TLSSession:
    """An MX host the MTA-STS policy does not list, as a failed session."""
    patterns = " ".join(policy.mxPatterns)
    return TLSSession(
        host, address, "", "validation-failure", f"MX host {host} does not match mx {patterns}"
    )


def countAttempt(
    counts: TLSReportCounts, domain: str, policy: Any, sessions: Iterable[TLSSession]
) -> None:
    """
    Count the sessions of one delivery attempt to C{domain}'s MX hosts.

    @param policy: the domain's L{relayd.delivery.mtasts.TLSPolicy}, or
        None when MTA-STS was not looked up.
    @param sessions: what the deliverer reported: sessions with hops under
        DANE count under C{tlsa}, the others under C{sts} when an MTA-STS
        policy in C{enforce} or C{testing} applied.

    Domains without a policy (C{no-policy-found}) are not counted: that
    would be an entry, a rewrite of the day file and a TXT lookup a day
    for every domain relayd mails, for domains that mostly publish no
    TLSRPT record either.
    """
    sts = policy is not None and policy.kind == "mta-sts" and policy.mode != "none"
    for session in sessions:
        if session.dane:
            counts.add("tlsa", domain, session, policyString=session.tlsa)
        elif sts:
            counts.add(
                "sts",
                domain,
                session,
                policyString=stsPolicyString(policy),
                mxPatterns=policy.mxPatterns,
            )


# --- the TXT record ------------------------------------------------------------------


class TLSRPTError(Exception):
    """A C{_smtp._tls} TXT record that cannot be used."""


def parseTLSRPT(records: Sequence[str]) -> list[str]:
    """
    The C{rua} URIs of a domain's TLSRPT TXT record (RFC 8460 section 3):
    of the records, those starting with C{v=TLSRPTv1} count, and there
    must be exactly one; fields C{key=value} separated by C{;}; C{rua} a
    comma-separated list of C{mailto:} and C{https:} URIs.

    @raise TLSRPTError: no such record, more than one, or no C{rua}.
    """
    candidates = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(candidates) != 1:
        raise TLSRPTError(f"{len(candidates)} TXT records starting with v=TLSRPTv1, not one")
    fields = txtFields(candidates[0], TLSRPTError)
    if fields.get("v") != "TLSRPTv1":
        raise TLSRPTError("version is not TLSRPTv1")
    uris = [u.strip(" \t") for u in fields.get("rua", "").split(",") if u.strip(" \t")]
    good = [u for u in uris if u.lower().startswith(("mailto:", "https:"))]
    if not good:
        raise TLSRPTError("no mailto: or https: rua")
    return good


def mailtoAddress(uri: str) -> str | None:
    """The address of a C{mailto:} URI (RFC 6068), percent-decoded, without a query."""
    if not uri.lower().startswith("mailto:"):
        return None
    address = urllib.parse.unquote(uri[len("mailto:") :].split("?", 1)[0])
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in " <>\r\n,"):
        return None
    return address


# --- the report ---------------------------------------------------------------------


def dayRange(day: str) -> tuple[datetime, datetime]:
    """The first and last second of a UTC day."""
    start = datetime.combine(date.fromisoformat(day), datetime.min.time(), UTC)
    return start, start + timedelta(days=1) - timedelta(seconds=1)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def buildReport(
    counts: dict[str, Any], domain: str, organization: str, contact: str | None, submitter: str
) -> dict[str, Any]:
    """
    The report (RFC 8460 section 4.4) of C{domain} for the day of
    C{counts}: one C{policies} entry per policy type counted.
    """
    start, end = dayRange(counts["day"])
    policies = []
    for entry in counts["policies"].values():
        if entry["policy-domain"] != domain:
            continue
        policy: dict[str, Any] = {
            "policy-type": entry["policy-type"],
            "policy-domain": domain,
        }
        if entry["policy-string"]:
            policy["policy-string"] = list(entry["policy-string"])
        if entry["mx-host"]:
            policy["mx-host"] = list(entry["mx-host"])
        details = []
        for key, failure in sorted(entry["failures"].items()):
            kind, sendingIp, mx, receivingIp = key.split("|", 3)
            detail: dict[str, Any] = {"result-type": kind, "failed-session-count": failure["count"]}
            if sendingIp:
                detail["sending-mta-ip"] = sendingIp
            if mx:
                detail["receiving-mx-hostname"] = mx
            if receivingIp:
                detail["receiving-ip"] = receivingIp
            if failure.get("detail"):
                detail["failure-reason-code"] = failure["detail"]
            details.append(detail)
        item: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": entry["success"],
                "total-failure-session-count": entry["failure"],
            },
        }
        if details:
            item["failure-details"] = details
        policies.append(item)
    report: dict[str, Any] = {
        "organization-name": organization,
        "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(end)},
        # A msg-id (RFC 5322 3.6.4): the Subject carries it in <> (section 5.3).
        "report-id": f"{counts['day']}_{domain}@{submitter}",
        "policies": sorted(policies, key=lambda p: str(p["policy"]["policy-type"])),
    }
    if contact:
        report["contact-info"] = contact
    return report


def reportFilename(submitter: str, domain: str, day: str) -> str:
    """
    Section 5.1: C{submitter!policy-domain!begin!end.json.gz}, the
    timestamps in seconds since the epoch.
    """
    start, end = dayRange(day)
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


def reportMessage(
    report: dict[str, Any], domain: str, submitter: str, recipients: Sequence[str], now: float
) -> bytes:
    """
    The message carrying C{report} (RFC 8460 section 5.3): C{multipart/report;
    report-type="tlsrpt"}, a short text part and the gzipped JSON as
    C{application/tlsrpt+gzip}, with C{TLS-Report-Domain} and
    C{TLS-Report-Submitter} and the Subject of section 5.3.
    """
    day = report["date-range"]["start-datetime"][:10]
    message = EmailMessage()
    message["From"] = f"TLS reporting <noreply-tlsrpt@{submitter}>"
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    message["Message-ID"] = make_msgid(domain=submitter)
    message["Subject"] = (
        f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    )
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = submitter
    message["MIME-Version"] = "1.0"
    message.set_content(
        f"This is the SMTP TLS report (RFC 8460) of {submitter} for {domain} on {day} (UTC).\n"
    )
    body = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
    message.add_attachment(
        body,
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=reportFilename(submitter, domain, day),
    )
    # multipart/mixed as add_attachment made it, boundary kept.
    message.set_type("multipart/report")
    message.set_param("report-type", "tlsrpt")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


# --- the daily sender ---------------------------------------------------------------


class _Discard(Protocol):
    """Read a response body away (a rua server's answer is not used)."""

    def dataReceived(self, data: bytes) -> None:
        pass


class TLSReporter(Service):
    """
    Sends the reports of past days (C{[delivery] tlsrpt = true}): checks
    every L{interval} seconds (and at startup, for a day the daemon was
    down at midnight) for days before today with counts not yet sent, and
    for each policy domain of such a day looks up C{_smtp._tls.<domain>},
    builds the report and queues it to the C{mailto:} rua addresses with
    L{relayd.queue.spool.Spool.submit}, like a bounce.  The domain is then
    marked sent in the day's file, so a restart does not send it twice
    (a crash between queueing and marking may: at least once, like mail).

    @ivar send: when False (C{tlsrpt = false}) nothing is sent; the counts
        are kept for C{relayctl tls report} and removed after L{KEEP_DAYS}.
    """

    interval = 300.0
    postTimeout = 60.0

    def __init__(
        self,
        *,
        counts: TLSReportCounts,
        resolver: Any,
        spool: Any,
        clock: Any,
        submitter: str,
        organization: str | None = None,
        contact: str | None = None,
        send: bool = True,
        trustRoot: Any = None,
    ) -> None:
        """
        @param trustRoot: the CAs trusted for C{https:} rua servers (as for
            MTA-STS policy hosts: C{ca_file}, else the system's).
        """
        self.counts = counts
        self.resolver = resolver
        self.spool = spool
        self.clock = clock
        self.submitter = submitter
        self.organization = organization or submitter
        self.contact = contact
        self.send = send
        if trustRoot is None:
            from twisted.internet.ssl import platformTrust

            trustRoot = platformTrust()
        self.trustRoot = trustRoot
        self._loop: LoopingCall | None = None
        self._running: Deferred[None] | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.counts.start()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("tlsrpt: report loop failed", f)
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running = self._running or succeed(None)
        return running.addBoth(lambda _: self.counts.stop())

    def check(self) -> Deferred[None]:
        """Send what is due now; one run at a time."""
        if self._running is not None:
            return succeed(None)
        d = self._sendDue()

        def done(result: Any) -> None:
            self._running = None
            if isinstance(result, Failure):
                log.failure("tlsrpt: sending reports failed", result)

        d.addBoth(done)
        if not d.called:
            self._running = d
        return d

    @inlineCallbacks
    def _sendDue(self) -> Any:
        now = self.clock.seconds()
        today = utcDay(now)
        oldest = utcDay(now - KEEP_DAYS * 86400)
        # Yesterday's, and the day before's for a daemon that was down over
        # a whole day; older days were missed, not sent late in a burst.
        earliest = utcDay(now - SEND_DAYS * 86400)
        days = yield deferToThread(self.counts.days)
        for day in days:
            if day >= today:
                continue
            if day < oldest:
                yield deferToThread(self.counts.remove, day)
                continue
            if not self.send or day < earliest:
                continue
            counts = yield self.counts.load(day)
            domains = sorted({p["policy-domain"] for p in counts["policies"].values()})
            for domain in domains:
                if domain in counts["sent"]:
                    continue
                done = yield self.sendOne(day, domain, now)
                if done:
                    self.counts.markSent(day, domain)
        yield self.counts.flush()

    @inlineCallbacks
    def sendOne(self, day: str, domain: str, now: float) -> Any:
        """
        Look up C{domain}'s rua and queue its report of C{day}; log why not.

        @return: a Deferred firing with True when done with the domain (the
            report queued, or the domain wants none), False to try again
            at the next check (a temporary DNS failure).
        """
        from relayd.delivery.routing import ResolverError, TemporaryDNSError

        try:
            records = yield self.resolver.lookupTXT(f"_smtp._tls.{domain}")
            uris = parseTLSRPT(records)
        except TLSRPTError as e:
            log.info("tlsrpt: {domain}: no report sent: {why}", domain=domain, why=e)
            return True
        except TemporaryDNSError as e:
            log.info(
                "tlsrpt: {domain}: TLSRPT record lookup failed ({why}); trying again later",
                domain=domain,
                why=e.reason,
            )
            return False
        except ResolverError as e:
            log.info(
                "tlsrpt: {domain}: no report sent: no TLSRPT record ({why})",
                domain=domain,
                why=e.reason,
            )
            return True
        counts = yield self.counts.load(day)
        report = buildReport(counts, domain, self.organization, self.contact, self.submitter)
        for uri in uris:
            if uri.lower().startswith("https:"):
                yield self.post(domain, uri, report)
        addresses = [a for a in (mailtoAddress(u) for u in uris) if a is not None]
        if not addresses:
            if not any(u.lower().startswith("https:") for u in uris):
                log.info("tlsrpt: {domain}: no report sent: no usable mailto: rua", domain=domain)
            return True
        data = reportMessage(report, domain, self.submitter, addresses, now)
        record = self._record(addresses, now, data)
        queueId = yield self.spool.submit(record, data)
        log.info(
            "tlsrpt: {domain}: report for {day} queued as {queue_id} to {rua}",
            domain=domain,
            day=day,
            queue_id=queueId,
            rua=", ".join(addresses),
        )
        return True

    @inlineCallbacks
    def post(self, domain: str, uri: str, report: dict[str, Any]) -> Any:
        """
        POST the gzipped report to an C{https:} rua (RFC 8460 section 5.4):
        C{Content-Type: application/tlsrpt+gzip}, the certificate verified
        like a policy host's, no redirect followed; a 2xx answer is
        success.  A failure is logged and not retried (the section allows,
        not requires, retries).

        @return: a Deferred firing with True when the server took it.
        """
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        from relayd.delivery.mtasts import httpsAgent

        body = gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)
        agent = httpsAgent(self.clock, self.resolver, self.trustRoot, self.postTimeout)
        headers = Headers({b"content-type": [b"application/tlsrpt+gzip"]})
        try:
            d = agent.request(
                b"POST", uri.encode("ascii"), headers, FileBodyProducer(io.BytesIO(body))
            )
            d.addTimeout(self.postTimeout, self.clock)
            response = yield d
            code = response.code
            response.deliverBody(_Discard())
        except Exception as e:
            reasons = getattr(e, "reasons", None)
            why = reasons[0].getErrorMessage() if reasons else str(e) or type(e).__name__
            log.info(
                "tlsrpt: {domain}: report POST to {uri} failed: {why}",
                domain=domain,
                uri=uri,
                why=why,
            )
            return False
        if 200 <= code < 300:
            log.info("tlsrpt: {domain}: report posted to {uri}", domain=domain, uri=uri)
            return True
        log.info(
            "tlsrpt: {domain}: report POST to {uri} answered HTTP {code}",
            domain=domain,
            uri=uri,
            code=code,
        )
        return False

    def _record(self, addresses: list[str], now: float, data: bytes) -> Any:
        from relayd.delivery.bounce import noticeRecord

        # The null reverse-path: a report that cannot be delivered must
        # not come back as a bounce (no loop between reporters).
        record = noticeRecord(addresses, data, now, "tlsrpt")
        # RFC 8460 section 5.3: "when sending failure reports via SMTP,
        # sending MTAs MUST NOT honor MTA-STS or DANE TLSA failures" (the
        # report may be about exactly those): the waiver TLS-Required: No
        # gives (RFC 8689), so the report goes out over opportunistic TLS.
        return dataclasses.replace(record, tlsOptional=True)
