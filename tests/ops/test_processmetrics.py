"""
C{process_*} metrics of every process: a real C{twistd relayd} with
C{[server] processes = 2} (two receivers beside the queue manager) and, by
C{[delivery] processes = "auto"}, two delivery processes.  Each child sends
its own process collector's figures with its metrics snapshots; one
scrape of the queue manager's page shows them under C{process="receiver-1"},
C{"receiver-2"}, C{"delivery-1"}, C{"delivery-2"} beside the queue manager's own
(unlabelled) series.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relayd.testing import freePort
from relayd.testing.process import RelaydProcess, relaydProcesses, waitFor  # noqa: F401
from tests.test_receivers import relaydWith, sink  # noqa: F401 (fixture)

CHILDREN = ("receiver-1", "receiver-2", "delivery-1", "delivery-2")


def scrape(port: int) -> dict[tuple[str, str], float]:
    """C{process_*} samples by (sample name, process label or "")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, s.labels.get("process", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("process_")
    }


def test_childrenProcessMetrics(tmp_path: Path, sink, relaydProcesses) -> None:  # noqa: F811
    metricsPort = freePort()
    before = time.time()
    setup = relaydWith(tmp_path, sink.port, processes=2, metricsPort=metricsPort)
    relayd = RelaydProcess(setup, tmp_path / "relayd.log")
    relaydProcesses.append(relayd)
    relayd.waitListening()

    def complete() -> bool:
        found = scrape(metricsPort)
        return all(("process_resident_memory_bytes", c) in found for c in CHILDREN)

    # The children send a snapshot every few seconds.
    waitFor(complete, 60, "no process_* series for every child", relayd.log)
    found = scrape(metricsPort)
    labels = {label for _, label in found}
    assert labels == {"", *CHILDREN}, labels
    now = time.time()
    pageSize = os.sysconf("SC_PAGE_SIZE")
    for label in ("", *CHILDREN):
        rss = found[("process_resident_memory_bytes", label)]
        # A Python process with Twisted loaded: more than a few pages, less than 2 GiB.
        assert 100 * pageSize < rss < 2**31, (label, rss)
        assert found[("process_virtual_memory_bytes", label)] >= rss
        assert found[("process_open_fds", label)] >= 3, label
        assert found[("process_max_fds", label)] >= found[("process_open_fds", label)]
        assert found[("process_cpu_seconds_total", label)] > 0, label
        started = found[("process_start_time_seconds", label)]
        assert before - 5 <= started <= now, (label, started, before)
    # The children are processes of their own, started after the queue manager.
    for child in CHILDREN:
        assert (
            found[("process_start_time_seconds", child)]
            >= found[("process_start_time_seconds", "")] - 1
        )
