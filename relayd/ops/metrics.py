"""
Prometheus metrics for one relayd, and the HTTP page that serves them.

Each relayd service tree owns a L{Metrics} with its own
L{CollectorRegistry}, never prometheus_client's global one, so that several
relayds in one process (tests) count apart.  The parts that count (the SMTP
server, the policy chain, the scheduler) take a C{metrics} argument that
defaults to L{NO_METRICS}, which counts nothing: built without one, they
behave exactly as before.

The queue gauges are read at scrape time from the scheduler's in-memory
index (L{QueueCollector}); a scrape never touches the disk.  The page is
rendered on the reactor thread: it only formats numbers already in memory.

Metric names, all prefixed C{relayd_} (see also README.md):

  - C{relayd_connections_open{listener}}: SMTP connections open now.
  - C{relayd_connections_total{listener}}: SMTP connections accepted,
    including those refused at once for a connection limit.
  - C{relayd_auth_attempts_total{listener,result}}: AUTH exchanges that
    reached the password check; C{result} is C{success}, C{failure} (535)
    or C{error} (454, the users file could not be checked).
  - C{relayd_auth_lockouts_total{listener,scope}}: AUTH refused with 454
    before any password check, for too many failures across connections
    (L{relayd.smtp.auth.Lockout}); C{scope} is C{client} (the address) or
    C{user} (that user name at that address).
  - C{relayd_policy_verdicts_total{phase,policy,action}}: the deciding
    verdict of each policy chain run; C{phase} is C{connect}, C{helo},
    C{mail}, C{rcpt} or C{data}; when every policy said CONTINUE, C{policy}
    is C{none} and C{action} C{continue} (at RCPT that means relay denied).
  - C{relayd_messages_accepted_total{listener}}: messages queued (250 sent).
  - C{relayd_messages_rejected_total{stage,code}}: MAIL, RCPT and end of
    DATA refused by a policy, a limit, the message's content or the spool,
    and every other refused MAIL or RCPT (530 without AUTH, 555, 501
    syntax, 503 sequence); C{stage} is C{mail}, C{rcpt} or C{data}, C{code}
    the reply code.
  - C{relayd_received_bytes_total{listener}}: octets of the messages
    queued, as stored (with relayd's Received: header).
  - C{relayd_commit_latency_seconds}: histogram, end of DATA to 250
    (message policies and the durable commit).
  - C{relayd_delivery_attempts_total{outcome}}: delivery attempts per
    recipient; C{outcome} is C{sent}, C{deferred} or C{bounced}.
  - C{relayd_delivery_latency_seconds}: histogram, arrival to delivery of
    each recipient delivered.
  - C{relayd_spool_errors_total{operation}}: spool operations of the
    delivery side that failed; C{operation} is C{read}, C{move}, C{update},
    C{remove} or C{bounce} (a DSN could not be queued).  Each is one log
    line, and the message is tried again with backoff.
  - C{relayd_delivery_outcomes_unrecorded_total}: delivery attempts whose
    recipient outcomes could not be written to the spool; they are kept in
    memory (no delivered recipient is sent to again while relayd runs) and
    written at the next attempt, which backs off.
  - C{relayd_queue_stuck_total}: queued messages that the sweep found in
    the spool but not in the schedule (stuck mail), and scheduled again.
  - C{relayd_queue_messages{state}}: queued messages by spool state
    (C{incoming}, C{active}, C{deferred}, C{hold}).
  - C{relayd_queue_oldest_message_age_seconds}: age of the oldest queued
    message, 0 when the queue is empty.
  - C{relayd_queue_stuck_messages}: queued messages whose last spool
    operation failed (a read, a move, writing their outcome), waiting for
    their retry: mail stuck now.  0 once the spool works again.
  - C{relayd_queue_oldest_age_seconds{state}}: age of the oldest queued
    message in each spool state, 0 when that state is empty.
  - C{relayd_smtp_replies_total{command,code,enhanced}}: every reply relayd
    sent that refused something (4xx and 5xx), by the command it answered
    (C{GREETING} for the greeting, C{DATA} for the end of data, C{AUTH}
    for AUTH's continuation lines, C{UNKNOWN} for unrecognised verbs).
  - C{relayd_build_info{version}}: 1, the running relayd's version.
  - C{relayd_reload_success}: 1 when the last reload (or the start) put
    its config in force, 0 when it was refused.
  - C{relayd_reload_timestamp_seconds}: when that last reload (or the
    start) happened, epoch seconds.
  - C{relayd_tls_handshakes_total{listener,version}}: inbound TLS sessions
    established (STARTTLS or implicit), by TLS version.
  - C{relayd_tls_handshake_failures_total{listener}}: inbound TLS
    handshakes that failed.
  - C{relayd_delivery_tls_total{policy,tls}}: outbound sessions' recipients
    by the hop's TLS policy (C{none}, C{may}, C{encrypt}, C{verify}, ...)
    and what the session got: C{none}, C{unverified} or C{verified}.
  - C{relayd_spool_free_bytes}: free octets on the spool's file system
    (the figure the free-space reserve is checked against).
  - C{relayd_destination_deliveries_total{destination,outcome}} and
    C{relayd_destination_delivery_latency_seconds{destination}}: per
    destination class, C{mx} for MX delivery, C{route:N} for the N-th
    configured route, C{none} when routing failed.
  - C{process_*}: prometheus_client's process collector (CPU, memory,
    open files, start time) for the queue manager's process, and for each
    child process (receivers, delivery processes) the same series from its
    own collector with C{process="receiver-N"} or C{process="delivery-N"}
    (L{parseProcessSamples}).

C{_created} series are off (prometheus_client's
C{disable_created_metrics}): they double the page and no dashboard or
alert uses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

__all__ = [
    "NoMetrics",
    "NO_METRICS",
    "Metrics",
    "QueueSource",
    "QueueCollector",
    "MetricsResource",
    "metricsSite",
    "QUEUE_STATES",
]

QUEUE_STATES = ("incoming", "active", "deferred", "hold")
"""The spool states a queued message can be in (L{relayd.queue.spool})."""

COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: fsync is milliseconds, a slow message policy can take its timeout."""

DELIVERY_BUCKETS = (
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    12 * 3600.0,
    86400.0,
    2 * 86400.0,
    5 * 86400.0,
)
"""Seconds: most mail goes at once, the rest over the retry schedule (5 days)."""


class QueueSource(Protocol):
    """What L{QueueCollector} reads: the scheduler's in-memory index."""

    def queueSummary(self) -> tuple[dict[str, int], float | None]:
        """Messages by state, and the arrival time (epoch) of the oldest."""

    def stuckMessages(self) -> int:
        """Queued messages whose last spool operation failed (waiting for the disk)."""


class SpoolSource(Protocol):
    """What L{Metrics.watchSpool} reads: the spool's cached free-space figure."""

    def freeBytes(self) -> int | None:
        """Free octets last measured (no disk access), None before the first measure."""


class JournalSource(Protocol):
    """What L{Metrics.watchJournal} reads: the spool's journal counts."""

    @property
    def journalMode(self) -> str:
        """C{aio}, C{threads} (how the journal is synced) or C{off}."""

    @property
    def journalCommits(self) -> int:
        """Messages committed through the journal by this process."""

    @property
    def journalSyncs(self) -> int:
        """Syncs of this process's journal segments."""


class NoMetrics:
    """
    Counts nothing.  The methods are the counting API of L{Metrics}; parts
    built without metrics get this one (L{NO_METRICS}).
    """

    def connectionOpened(self, listener: str) -> None:
        """An SMTP connection was accepted on C{listener}."""

    def connectionClosed(self, listener: str) -> None:
        """An SMTP connection on C{listener} has gone."""

    def authenticated(self, listener: str, result: str) -> None:
        """An AUTH exchange ended: C{success}, C{failure} or C{error}."""

    def authLockedOut(self, listener: str, scope: str) -> None:
        """AUTH was refused for too many failures: C{scope} C{client} or C{user}."""

    def policyVerdict(self, phase: str, policy: str, action: str) -> None:
        """The policy chain decided a phase (see the module docstring)."""

    def messageAccepted(self, listener: str, size: int, seconds: float) -> None:
        """A message was queued: C{size} octets, C{seconds} from end of data to 250."""

    def messageRejected(self, stage: str, code: int) -> None:
        """MAIL, RCPT or end of DATA was refused with C{code}."""

    def deliveryAttempt(self, outcome: str, latency: float | None = None) -> None:
        """
        One recipient's delivery attempt ended: C{sent}, C{deferred} or
        C{bounced}; C{latency} is arrival to delivery, for C{sent}.
        """

    def spoolError(self, operation: str) -> None:
        """A spool C{operation} of the delivery side failed (see the module docstring)."""

    def outcomesUnrecorded(self) -> None:
        """The outcomes of a delivery attempt could not be written; kept in memory."""

    def queueStuck(self) -> None:
        """The sweep found a queued message that the schedule had lost."""

    def watchQueue(self, source: QueueSource) -> None:
        """Report the queue from C{source} at each scrape."""

    def smtpReply(self, command: str, code: int, enhanced: str | None) -> None:
        """relayd refused C{command} with C{code} (4xx or 5xx) and C{enhanced}."""

    def reloaded(self, success: bool, when: float | None = None) -> None:
        """A reload (or the start) was done at C{when}: in force, or refused."""

    def tlsHandshake(self, listener: str, version: str | None) -> None:
        """An inbound TLS session was established on C{listener} with C{version}."""

    def tlsHandshakeFailed(self, listener: str) -> None:
        """An inbound TLS handshake on C{listener} failed."""

    def deliveryTLS(self, policy: str, tls: str) -> None:
        """
        A recipient's delivery attempt ran under the hop's TLS C{policy};
        C{tls} is C{none}, C{unverified} or C{verified}.
        """

    def destinationDelivery(
        self, destination: str, outcome: str, latency: float | None = None
    ) -> None:
        """One recipient's attempt to C{destination} (a class) ended with C{outcome}."""

    def watchSpool(self, source: SpoolSource) -> None:
        """Report the spool's free space from C{source} at each scrape."""

    def watchJournal(self, source: JournalSource) -> None:
        """Report this process's journal counts from C{source} at each scrape."""


NO_METRICS = NoMetrics()
"""The shared do-nothing default."""


class Metrics(NoMetrics):
    """
    The metrics of one relayd, in a registry of its own.

    @ivar registry: the L{CollectorRegistry} to serve (L{metricsSite}).
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        """
        @param now: the wall clock, for the oldest message's age (queue ids
            and arrival times are wall-clock times).
        """
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self._now = now
        r = self.registry
        ProcessCollector(registry=r)
        from relayd.configfile import version

        self.buildInfo = Gauge(
            "relayd_build_info", "The running relayd's version; always 1.", ["version"], registry=r
        )
        self.buildInfo.labels(version()).set(1)
        self.reloadSuccess = Gauge(
            "relayd_reload_success",
            "1 when the last reload (or the start) put its config in force, 0 when refused.",
            registry=r,
        )
        self.reloadTime = Gauge(
            "relayd_reload_timestamp_seconds",
            "When the last reload (or the start) was done, epoch seconds.",
            registry=r,
        )
        self.reloaded(True, now())
        self.replies = Counter(
            "relayd_smtp_replies",
            "Refusing SMTP replies (4xx, 5xx) by command, code and enhanced code.",
            ["command", "code", "enhanced"],
            registry=r,
        )
        self.tlsHandshakes = Counter(
            "relayd_tls_handshakes",
            "Inbound TLS sessions established, by listener and TLS version.",
            ["listener", "version"],
            registry=r,
        )
        self.tlsFailures = Counter(
            "relayd_tls_handshake_failures",
            "Inbound TLS handshakes that failed, by listener.",
            ["listener"],
            registry=r,
        )
        self.deliveryTls = Counter(
            "relayd_delivery_tls",
            "Recipients' delivery attempts by the hop's TLS policy and what the session got.",
            ["policy", "tls"],
            registry=r,
        )
        self.destinationDeliveries = Counter(
            "relayd_destination_deliveries",
            "Delivery attempts per recipient by destination class (mx, route:N, none) and outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self.destinationLatency = Histogram(
            "relayd_destination_delivery_latency_seconds",
            "Seconds from arrival to delivery per recipient delivered, by destination class.",
            ["destination"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.connectionsOpen = Gauge(
            "relayd_connections_open", "SMTP connections open now.", ["listener"], registry=r
        )
        self.connections = Counter(
            "relayd_connections",
            "SMTP connections accepted (including those refused for a connection limit).",
            ["listener"],
            registry=r,
        )
        self.auth = Counter(
            "relayd_auth_attempts",
            "AUTH exchanges checked: success, failure (535) or error (454).",
            ["listener", "result"],
            registry=r,
        )
        self.lockouts = Counter(
            "relayd_auth_lockouts",
            "AUTH refused (454) for too many failures, by scope: client or user.",
            ["listener", "scope"],
            registry=r,
        )
        self.verdicts = Counter(
            "relayd_policy_verdicts",
            "Deciding verdicts of the policy chain; policy none: every policy said continue.",
            ["phase", "policy", "action"],
            registry=r,
        )
        self.accepted = Counter(
            "relayd_messages_accepted", "Messages queued (250 sent).", ["listener"], registry=r
        )
        self.rejected = Counter(
            "relayd_messages_rejected",
            "MAIL, RCPT and end of DATA refused, by stage and reply code.",
            ["stage", "code"],
            registry=r,
        )
        self.receivedBytes = Counter(
            "relayd_received_bytes",
            "Octets of the messages queued, as stored.",
            ["listener"],
            registry=r,
        )
        self.commitLatency = Histogram(
            "relayd_commit_latency_seconds",
            "Seconds from the end of DATA to the 250 reply (message policies and commit).",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "relayd_delivery_attempts",
            "Delivery attempts per recipient, by outcome: sent, deferred or bounced.",
            ["outcome"],
            registry=r,
        )
        self.deliveryLatency = Histogram(
            "relayd_delivery_latency_seconds",
            "Seconds from arrival to delivery, per recipient delivered.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )

        self.spoolErrors = Counter(
            "relayd_spool_errors",
            "Failed spool operations of the delivery side (read, move, update, remove, bounce).",
            ["operation"],
            registry=r,
        )
        self.unrecorded = Counter(
            "relayd_delivery_outcomes_unrecorded",
            "Delivery attempts whose outcomes could not be written to the spool (kept in memory).",
            registry=r,
        )
        self.stuck = Counter(
            "relayd_queue_stuck",
            "Queued messages the sweep found in the spool but not in the schedule.",
            registry=r,
        )

    def connectionOpened(self, listener: str) -> None:
        self.connections.labels(listener).inc()
        self.connectionsOpen.labels(listener).inc()

    def connectionClosed(self, listener: str) -> None:
        self.connectionsOpen.labels(listener).dec()

    def authenticated(self, listener: str, result: str) -> None:
        self.auth.labels(listener, result).inc()

    def authLockedOut(self, listener: str, scope: str) -> None:
        self.lockouts.labels(listener, scope).inc()

    def policyVerdict(self, phase: str, policy: str, action: str) -> None:
        self.verdicts.labels(phase, policy, action).inc()

    def messageAccepted(self, listener: str, size: int, seconds: float) -> None:
        self.accepted.labels(listener).inc()
        self.receivedBytes.labels(listener).inc(size)
        self.commitLatency.observe(seconds)

    def messageRejected(self, stage: str, code: int) -> None:
        self.rejected.labels(stage, str(code)).inc()

    def deliveryAttempt(self, outcome: str, latency: float | None = None) -> None:
        self.deliveries.labels(outcome).inc()
        if latency is not None:
            self.deliveryLatency.observe(max(latency, 0.0))

    def spoolError(self, operation: str) -> None:
        self.spoolErrors.labels(operation).inc()

    def outcomesUnrecorded(self) -> None:
        self.unrecorded.inc()

    def queueStuck(self) -> None:
        self.stuck.inc()

    def watchQueue(self, source: QueueSource) -> None:
        self.registry.register(QueueCollector(source, self._now))

    def watchJournal(self, source: JournalSource) -> None:
        self.registry.register(JournalCollector(source))

    def smtpReply(self, command: str, code: int, enhanced: str | None) -> None:
        self.replies.labels(command, str(code), enhanced or "").inc()

    def reloaded(self, success: bool, when: float | None = None) -> None:
        self.reloadSuccess.set(1 if success else 0)
        self.reloadTime.set(self._now() if when is None else when)

    def tlsHandshake(self, listener: str, version: str | None) -> None:
        self.tlsHandshakes.labels(listener, version or "unknown").inc()

    def tlsHandshakeFailed(self, listener: str) -> None:
        self.tlsFailures.labels(listener).inc()

    def deliveryTLS(self, policy: str, tls: str) -> None:
        self.deliveryTls.labels(policy, tls).inc()

    def destinationDelivery(
        self, destination: str, outcome: str, latency: float | None = None
    ) -> None:
        self.destinationDeliveries.labels(destination, outcome).inc()
        if latency is not None:
            self.destinationLatency.labels(destination).observe(max(latency, 0.0))

    def watchSpool(self, source: SpoolSource) -> None:
        def free() -> float:
            value = source.freeBytes()
            return float("nan") if value is None else float(value)

        Gauge(
            "relayd_spool_free_bytes",
            "Free octets on the spool's file system, as last measured (every few seconds).",
            registry=self.registry,
        ).set_function(free)


class JournalCollector:
    """
    The commit journal's counters, read from the spool at scrape time:
    how many messages it took, and in how many syncs (their ratio is how
    well commits share a sync), labelled with how it is synced.  Every
    process that commits has one; the queue manager's scrape adds them up.
    """

    def __init__(self, source: JournalSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return self._families("off", 0, 0)

    def collect(self) -> Iterable[Metric]:
        source = self.source
        return self._families(source.journalMode, source.journalCommits, source.journalSyncs)

    @staticmethod
    def _families(mode: str, commits: int, syncs: int) -> list[Metric]:
        committed = CounterMetricFamily(
            "relayd_journal_commits",
            "Messages whose commit went through the journal (one fdatasync shared by "
            "those that finish together), by how the journal is synced.",
            labels=["sync"],
        )
        synced = CounterMetricFamily(
            "relayd_journal_syncs",
            "Syncs of journal segments, each covering one or more commits.",
            labels=["sync"],
        )
        if mode != "off":
            committed.add_metric([mode], commits)
            synced.add_metric([mode], syncs)
        return [committed, synced]


class QueueCollector:
    """
    The queue gauges, computed at scrape time from the scheduler's index
    (a custom collector: nothing to keep in step, nothing read from disk).
    """

    def __init__(self, source: QueueSource, now: Callable[[], float]) -> None:
        self.source = source
        self.now = now

    def describe(self) -> Iterable[Metric]:
        """The metric names, without asking the source (registration)."""
        return self._families({}, None, 0)

    def collect(self) -> Iterable[Metric]:
        counts, oldest = self.source.queueSummary()
        # A source without per-state ages (an older or a test's) reports none.
        byState: Callable[[], dict[str, float]] | None = getattr(self.source, "oldestByState", None)
        return self._families(
            counts, oldest, self.source.stuckMessages(), byState() if byState else {}
        )

    def _families(
        self,
        counts: dict[str, int],
        oldest: float | None,
        stuck: int,
        oldestByState: dict[str, float] | None = None,
    ) -> list[Metric]:
        size = GaugeMetricFamily(
            "relayd_queue_messages", "Queued messages by spool state.", labels=["state"]
        )
        for state in QUEUE_STATES:
            size.add_metric([state], counts.get(state, 0))
        age = 0.0 if oldest is None else max(self.now() - oldest, 0.0)
        oldestAge = GaugeMetricFamily(
            "relayd_queue_oldest_message_age_seconds",
            "Age of the oldest queued message; 0 when the queue is empty.",
            value=age,
        )
        stuckNow = GaugeMetricFamily(
            "relayd_queue_stuck_messages",
            "Queued messages whose last spool operation failed; retried with backoff.",
            value=stuck,
        )
        now = self.now()
        ages = GaugeMetricFamily(
            "relayd_queue_oldest_age_seconds",
            "Age of the oldest queued message by spool state; 0 when the state is empty.",
            labels=["state"],
        )
        for state in QUEUE_STATES:
            arrival = (oldestByState or {}).get(state)
            ages.add_metric([state], 0.0 if arrival is None else max(now - arrival, 0.0))
        return [size, oldestAge, stuckNow, ages]


PER_PROCESS = frozenset(
    {"relayd_build_info", "relayd_reload_success", "relayd_reload_timestamp_seconds"}
)
"""Families (with C{process_*}) that are the serving process's own: never
added up with other processes' samples (a version, a time, a state)."""

Samples = dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]
"""Sample values by family name, then by (sample name, labels)."""


def parseSamples(text: str, gauges: bool = True) -> Samples:
    """
    The samples of a scrape page (another process's, L{relayd.receivers}),
    without C{_created} timestamps and L{PER_PROCESS} families (which do
    not add up) and, unless
    C{gauges}, without gauges (a gone process's open connections are not
    open any more; its counts stay counted).
    """
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.type == "gauge" and not gauges:
            continue
        if family.name in PER_PROCESS or family.name.startswith("process_"):
            continue
        into = found.setdefault(family.name, {})
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, frozenset(sample.labels.items()))
            into[key] = into.get(key, 0.0) + sample.value
    return found


PROCESS_LABEL = "process"
"""
The label a child process's C{process_*} series carry on the queue
manager's page: C{receiver-N} (L{relayd.receivers}) or C{delivery-N}
(L{relayd.delivery.processes}).  The queue manager's own series have no
such label, as with one process, so existing queries keep their meaning.
"""


def parseProcessSamples(text: str, label: str) -> Samples:
    """
    The C{process_*} samples of a child's scrape page (its own CPU, memory,
    open files, start time: prometheus_client's process collector in the
    child), each with L{PROCESS_LABEL} set to C{label}.  They are the
    child's own and never added up: a distinct label per child, and gone
    from the page when the child ends (L{relayd.receivers.ProcessPool}).
    """
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("process_"):
            continue
        into = found.setdefault(family.name, {})
        for sample in family.samples:
            labels = dict(sample.labels)
            labels[PROCESS_LABEL] = label
            into[(sample.name, frozenset(labels.items()))] = sample.value
    return found


def addSamples(total: Samples, more: Samples) -> None:
    """Add C{more} into C{total}."""
    for name, samples in more.items():
        into = total.setdefault(name, {})
        for key, value in samples.items():
            into[key] = into.get(key, 0.0) + value


class SummedRegistry:
    """
    What L{MetricsResource} serves with several processes: this process's
    registry with the samples of the others (C{others()}, from
    L{parseSamples}) added in, so one scrape counts the whole relayd.
    """

    def __init__(self, registry: CollectorRegistry, others: Callable[[], list[Samples]]) -> None:
        self.registry = registry
        self.others = others

    def collect(self) -> Iterable[Metric]:
        extra: Samples = {}
        for samples in self.others():
            addSamples(extra, samples)
        for family in self.registry.collect():
            more = extra.get(family.name)
            if not more:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen = set()
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                seen.add(key)
                value = sample.value
                if not sample.name.endswith("_created"):
                    value += more.get(key, 0.0)
                merged.add_sample(sample.name, sample.labels, value, sample.timestamp)
            for key, value in more.items():
                if key not in seen:  # a label value only another process has seen
                    merged.add_sample(key[0], dict(key[1]), value)
            yield merged


class MetricsResource(Resource):
    """
    The scrape page: the registry in the text format Prometheus asks for
    (its C{Accept} header chooses the classic text or OpenMetrics).

    Unlike C{prometheus_client.twisted.MetricsResource} (a WSGI app in the
    global reactor's thread pool) it renders on the reactor thread: the
    collectors read the scheduler's index, which only that thread may
    touch, and rendering is in-memory work.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry | SummedRegistry) -> None:
        Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, contentType = choose_encoder(accept.decode("latin-1") if accept else "")
        output = encoder(self.registry)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return output


class _Root(Resource):
    """C{/metrics}, and 404 for everything else."""

    def getChild(self, path: bytes, request: Any) -> IResource:
        return notFound()


class _QuietSite(Site):
    """No access log line per scrape, no "Starting factory" lines."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def metricsSite(
    registry: CollectorRegistry | SummedRegistry, reactor: Any, timeout: float = 30.0
) -> Site:
    """
    The HTTP factory to listen with: C{/metrics} serves the registry,
    anything else is 404.  An idle or slow client is dropped after
    C{timeout} seconds.
    """
    root = _Root()
    root.putChild(b"metrics", MetricsResource(registry))
    return _QuietSite(root, timeout=timeout, reactor=reactor)
