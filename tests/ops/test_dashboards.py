"""
The Grafana dashboard (etc/grafana/relayd.json) and the Prometheus alerting
rules (etc/prometheus/relayd-rules.yml): checked with Prometheus' own
C{promtool} (Debian's prometheus package, which C{scripts/test} installs),
the rules' alerts unit-tested with C{promtool test rules}
(tests/fixtures/prometheus/relayd-rules-test.yml), every dashboard query
parsed by promtool, and every metric name that a query uses scraped from a
real C{twistd relayd}'s C{/metrics}.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relayd.testing import TestSetup, freePort

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "etc" / "prometheus" / "relayd-rules.yml"
RULES_TEST = REPO / "tests" / "fixtures" / "prometheus" / "relayd-rules-test.yml"
DASHBOARD = REPO / "etc" / "grafana" / "relayd.json"

PROMETHEUS_OWN = frozenset({"up"})
"""Series Prometheus itself makes for each scrape target."""

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan"}
    # Aggregation operators, which may be followed by a grouping clause
    # before their parenthesis.
    | {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile"}
)


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing (Debian's prometheus package; scripts/test installs it)"
    return found


def dashboardQueries() -> list[str]:
    """Every PromQL query of the dashboard: the panels' and the variables'."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def rulesQueries() -> list[str]:
    """The C{expr} of every rule, read with the YAML reader promtool's file format needs."""
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def asPromQL(query: str) -> str:
    """A dashboard query with Grafana's variables replaced by what Grafana would put."""
    return query.replace("$__rate_interval", "5m").replace("$instance", ".*")


def metricNames(query: str) -> set[str]:
    """
    The metric names a PromQL query reads: identifiers outside strings,
    label matchers, ranges and grouping clauses that are not functions,
    aggregations or keywords.  C{label_values(metric, label)} reads
    C{metric}.
    """
    variable = re.fullmatch(r"\s*label_values\(\s*(\w+)\s*,\s*\w+\s*\)\s*", query)
    if variable:
        return {variable.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', asPromQL(query))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def test_metricNamesOfAQuery() -> None:
    """The name extraction itself: metrics yes, functions, labels, keywords no."""
    query = (
        'sum by (tls) (rate(relayd_delivery_tls_total{instance=~"$instance"}[$__rate_interval]))'
        " / ignoring (tls) group_left sum(rate(relayd_x_total[5m])) > 0.5 and up == 0"
    )
    assert metricNames(query) == {"relayd_delivery_tls_total", "relayd_x_total", "up"}
    assert metricNames("label_values(relayd_build_info, instance)") == {"relayd_build_info"}
    assert metricNames("relayd_spool_free_bytes < 1024 * 1024") == {"relayd_spool_free_bytes"}


def test_promtoolCheckRules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout, result.stdout


def test_promtoolTestRules() -> None:
    """Each alert fires on a sick relayd's series and none on a healthy one's."""
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rulesAlerts() -> None:
    """The alerts issue 15 asks for."""
    import yaml

    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == {
        "RelaydDown",
        "RelaydQueueGrowing",
        "RelaydOldestMessage",
        "RelaydDeferralRate",
        "RelaydSpoolFreeSpaceLow",
        "RelaydReloadFailed",
    }


def test_dashboardQueriesParse(tmp_path: Path) -> None:
    """
    Every dashboard query is valid PromQL: promtool checks them as the
    expressions of recording rules (it parses each).
    """
    queries = [q for q in dashboardQueries() if not q.startswith("label_values(")]
    assert len(queries) >= 20
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(queries):
        lines.append(f"      - record: relayd_dashboard_{i}")
        lines.append(f"        expr: {json.dumps(asPromQL(query))}")
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_dashboardPanels() -> None:
    """The panels issue 15 asks for, each reading relayd's metrics."""
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for wanted in (
        "accepted and refused",
        "sent, deferred, bounced",
        "Queue by state",
        "Oldest message by state",
        "Delivery latency",
        "TLS share",
        "Rate-limit refusals",
    ):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def scrapeNames(text: str) -> set[str]:
    """Every series name a scrape page offers (also families without samples yet)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        suffixes: tuple[str, ...] = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def runningRelaydMetrics(tmp_path: Path) -> str:
    """A real twistd relayd with delivery and metrics: its /metrics page after one message."""
    metricsPort = freePort()
    setup = TestSetup(
        str(tmp_path / "relayd"),
        modes=("relay",),
        portZero=False,
        sections={
            "metrics": {"endpoint": f"tcp:{metricsPort}:interface=127.0.0.1"},
            "delivery": {"enabled": True, "connect_timeout": 2, "retry_initial": 3600},
        },
    )
    setup.routeAllTo(freePort())  # nobody there: the message is deferred
    port = setup.ports["relay"]
    log = tmp_path / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import sys; from twisted.scripts.twistd import run; "
                    "sys.argv = ['twistd', '-n', '--pidfile=', 'relayd', '--config', sys.argv[1]]; "
                    "run()"
                ),
                setup.configPath,
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                    s.sendmail("a@sender.test", ["b@example.org"], b"Subject: m\r\n\r\nx\r\n")
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        while "deferred" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{metricsPort}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            page: Any = r.read().decode()
        return str(page)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("relayd did not stop on SIGTERM")


def test_queriesUseExportedNames(tmp_path: Path) -> None:
    """
    Every metric name in the dashboard's and the rules' queries is one a
    running relayd exports (or Prometheus' own C{up}): a renamed metric
    cannot leave a panel or an alert silently empty.
    """
    exported = scrapeNames(runningRelaydMetrics(tmp_path))
    assert "relayd_queue_oldest_age_seconds" in exported
    used: dict[str, set[str]] = {}
    for query in dashboardQueries() + rulesQueries():
        for name in metricNames(query):
            used.setdefault(name, set()).add(query)
    assert len(used) >= 15, sorted(used)
    missing = {name: queries for name, queries in used.items() if name not in exported}
    missing = {n: q for n, q in missing.items() if n not in PROMETHEUS_OWN}
    assert missing == {}, f"not exported by relayd: {missing}"
