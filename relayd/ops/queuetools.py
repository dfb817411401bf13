"""
The queue at scale, for C{relayctl} (docs/relayctl.md): the shape of the
queue by destination domain or sender and age (Postfix's C{qshape},
KumoMTA's C{queue-summary}), and the selectors C{--domain}, C{--sender},
C{--older-than} of the commands that change it.

Pure functions over L{relayd.ops.control.summarize} entries, so the same
code serves the daemon's answer and the offline reading of the spool.
"""

from __future__ import annotations

import re
from typing import Any

from relayd.queue.spool import arrivalFromQueueId

__all__ = [
    "BUCKETS",
    "bucketLabels",
    "parseDuration",
    "queueShape",
    "selectEntries",
    "shapeLines",
]

BUCKETS = (5, 10, 20, 40, 80, 160, 320)
"""
Upper bounds of the age buckets, in minutes, as qshape's defaults: 0-5,
5-10, 10-20, 20-40, 40-80, 80-160, 160-320 and 320+ minutes.
"""

FINAL = ("delivered", "failed")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parseDuration(text: str) -> float:
    """
    C{30m}, C{2h}, C{1d}, C{90s}, C{1w} or plain seconds, as seconds.

    @raise ValueError: with a line for the operator.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h, 1d)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def bucketLabels() -> list[str]:
    """The column titles of the age buckets: C{0-5m} ... C{320m+}."""
    labels = []
    low = 0
    for high in BUCKETS:
        labels.append(f"{low}-{high}m")
        low = high
    labels.append(f"{low}m+")
    return labels


def _bucket(ageSeconds: float) -> int:
    minutes = max(ageSeconds, 0) / 60
    for index, high in enumerate(BUCKETS):
        if minutes < high:
            return index
    return len(BUCKETS)


def _arrival(entry: dict[str, Any], now: float) -> float:
    """When a message arrived: its record's time, else its queue id's."""
    arrival = entry.get("arrival")
    if arrival is None:
        arrival = arrivalFromQueueId(str(entry["queue_id"]))
    return now if arrival is None else float(arrival)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _pendingDomains(entry: dict[str, Any]) -> list[str]:
    """The destination domains a message still has recipients at."""
    domains = {
        _domain(str(r["address"]))
        for r in entry.get("recipients", [])
        if r.get("state") not in FINAL
    }
    return sorted(domains)


def queueShape(
    entries: list[dict[str, Any]],
    now: float,
    by: str = "domain",
    suspended: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Count queued messages by destination domain (or sender) and age.

    A message with recipients waiting at two domains counts in both rows
    (as in qshape); the TOTAL row counts each message once.  Messages on
    hold are counted like the others (the listing has their states).

    @param by: C{"domain"} or C{"sender"} (C{"<>"} for the null sender).
    @param suspended: the suspended domains (L{relayd.queue.suspend}),
        marked in the rows.
    @return: C{{"by", "buckets", "total", "rows"}}; C{total} and each row
        have C{name}, C{total} and C{counts} (one per bucket); rows are
        sorted by total, largest first, then by name.
    """
    if by not in ("domain", "sender"):
        raise ValueError(f"--by: domain or sender, not {by!r}")
    size = len(BUCKETS) + 1
    total = [0] * size
    rows: dict[str, list[int]] = {}
    for entry in entries:
        bucket = _bucket(now - _arrival(entry, now))
        total[bucket] += 1
        if entry.get("error"):
            keys = ["(unreadable)"]
        elif by == "sender":
            keys = [str(entry.get("sender") or "<>")]
        else:
            keys = _pendingDomains(entry) or ["(none pending)"]
        for key in keys:
            rows.setdefault(key, [0] * size)[bucket] += 1
    suspended = suspended or {}
    ordered = sorted(rows.items(), key=lambda item: (-sum(item[1]), item[0]))
    return {
        "by": by,
        "buckets": bucketLabels(),
        "total": {"name": "TOTAL", "total": sum(total), "counts": total},
        "rows": [
            {
                "name": name,
                "total": sum(counts),
                "counts": counts,
                "suspended": by == "domain" and name in suspended,
            }
            for name, counts in ordered
        ],
    }


def shapeLines(shape: dict[str, Any]) -> list[str]:
    """The table of L{queueShape}, as qshape prints it: TOTAL first."""
    labels = shape["buckets"]
    rows = [shape["total"], *shape["rows"]]
    names = [row["name"] + (" (suspended)" if row.get("suspended") else "") for row in rows]
    width = max(len(name) for name in names + [shape["by"].upper()])
    columns = ["TOTAL", *labels]
    widths = [
        max(len(columns[0]), *(len(str(row["total"])) for row in rows)),
        *(
            max(len(label), *(len(str(row["counts"][i])) for row in rows))
            for i, label in enumerate(labels)
        ),
    ]
    lines = [
        f"{shape['by'].upper():<{width}} "
        + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    ]
    for name, row in zip(names, rows, strict=True):
        values = [row["total"], *row["counts"]]
        lines.append(
            f"{name:<{width}} " + " ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
        )
    return lines


def selectEntries(
    entries: list[dict[str, Any]],
    now: float,
    domain: str | None = None,
    sender: str | None = None,
    olderThan: float | None = None,
) -> list[dict[str, Any]]:
    """
    The messages the selectors pick (all of them must match):

      - C{domain}: it still has a recipient (not delivered, not failed) at
        this domain (case-insensitive; C{.example.com} also matches its
        subdomains);
      - C{sender}: its sender, an address (case-insensitive; C{<>} for the
        null sender), or, without an C{@}, the sender's domain;
      - C{olderThan}: it arrived at least this many seconds ago.
    """
    chosen = []
    for entry in entries:
        if domain is not None:
            wanted = domain.strip().rstrip(".").lower()
            pending = _pendingDomains(entry)
            if wanted.startswith("."):
                if not any(d.endswith(wanted) for d in pending):
                    continue
            elif wanted not in pending:
                continue
        if sender is not None:
            entrySender = str(entry.get("sender") or "").lower()
            wanted = sender.strip().lower()
            if wanted in ("<>", ""):
                if entrySender:
                    continue
            elif "@" in wanted:
                if entrySender != wanted.strip("<>"):
                    continue
            elif _domain(entrySender) != wanted.rstrip("."):
                continue
        if olderThan is not None and now - _arrival(entry, now) < olderThan:
            continue
        chosen.append(entry)
    return chosen
