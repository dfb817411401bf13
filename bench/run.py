"""
relayd beside Postfix: the same load, the same sink, the same file system,
taking turns in one run, reported as ratios relayd/Postfix (DESIGN section
7: performance is measured here, never by timed assertions in tests).

Both systems under test (SUTs) are configured alike: a smart host that
relays for 127.0.0.0/8, with one route (Postfix: relayhost) to one
smtp-sink on 127.0.0.1, and fsync of each message before its 250 (Postfix's
default; relayd always).  Each round runs, for each SUT in turn (the order
alternates from round to round, so that a drift of the machine does not
always favour the same one):

 1. C{smtp-source -s SESSIONS -m MESSAGES -l SIZE}, one message per
    connection: the accept rate (until every message had its 250) and the
    end-to-end rate (until the sink held every message; the sink's counter
    must reach the exact count, or the run stops with an error);
 2. the same with C{-d}, many messages per connection;
 3. then, for each SUT in turn, latency from the end-of-data dot to the 250
    at a fixed offered load of half of Postfix's accept rate of step 1 in
    this round (L{bench.latency}), p50 and p99.

Steps 1 and 2 also report the CPU time, user and system, that the SUT's
processes (relayd's twistd and its children; Postfix's master and the
daemons it runs) used from the start of smtp-source until the sink held
every message, per message: the work each does for a message, which the
rates of a saturated machine depend on.  It moves with the machine too (on
a shared 2-core VM, Postfix's from 2.5 to 4.4 ms a message between runs of
one evening), so it is a ratio per round like the rates.

Then, in the full run, a fresh relayd takes a run of 20 000 messages while
the VmRSS of its processes (the queue manager and its receivers, summed) is
sampled: the RSS after the first 2 000 messages against over all of them
shows whether memory grows with the number of messages.

Prints a table on stdout and writes everything, configs included, to a
JSON file.  Run it through C{scripts/bench}, which installs what it needs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.systems import (
    LOOPBACK,
    BenchError,
    PrivatePostfix,
    Relayd,
    Sink,
    commitOf,
    descendants,
    runSmtpSource,
    treeCpu,
    treeRss,
)

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent

# Each metric: its key, label, unit, and whether higher is better.
METRICS = [
    ("accept", "accept, 1 msg/conn", "msg/s", True),
    ("e2e", "end to end, 1 msg/conn", "msg/s", True),
    ("accept_d", "accept, many msg/conn (-d)", "msg/s", True),
    ("e2e_d", "end to end, many msg/conn", "msg/s", True),
    ("latency_p50", "latency dot->250 p50", "ms", False),
    ("latency_p99", "latency dot->250 p99", "ms", False),
    ("cpu", "CPU per message, 1 msg/conn", "ms/msg", False),
    ("cpu_d", "CPU per message, many", "ms/msg", False),
]


def say(text: str) -> None:
    sys.stderr.write(f"bench: {text}\n")
    sys.stderr.flush()


class Bench:
    """
    One benchmark run: the sink, both SUTs, the rounds and the RSS run.
    """

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.sink = Sink()
        self.relayd = Relayd(
            workdir / "relayd", self.sink.port, args.per_destination, args.delivery_processes
        )
        self.postfix = PrivatePostfix(workdir / "postfix", self.sink.port, args.per_destination)
        self.expected = 0  # messages the sink should have received so far
        self.rounds: list[dict[str, Any]] = []
        self.rssRun: dict[str, Any] | None = None
        self.relaydPeak: dict[str, int] = {}
        self.pids: list[int] = []  # every long-running process started

    def suts(self) -> dict[str, Relayd | PrivatePostfix]:
        return {"relayd": self.relayd, "postfix": self.postfix}

    def start(self) -> None:
        say(f"work directory {self.workdir}")
        self.sink.start()
        self.pids.append(self.sink.pid)
        say(f"smtp-sink on {LOOPBACK}:{self.sink.port}")
        self.relayd.start()
        self.pids.append(self.relayd.pid)
        say(f"relayd (pid {self.relayd.pid}) on {LOOPBACK}:{self.relayd.port}")
        self.postfix.start()
        self.pids.append(self.postfix.masterPid() or 0)
        say(
            f"private postfix (master pid {self.postfix.masterPid()}) "
            f"on {LOOPBACK}:{self.postfix.port}"
        )

    def stop(self) -> None:
        with contextlib.suppress(AssertionError):  # relayd never started
            self.pids.extend(descendants(self.relayd.pid))
        for stop in (self.relayd.stop, self.postfix.stop, self.sink.stop):
            try:
                stop()
            except Exception as e:
                say(f"while stopping: {e}")

    def smtpSource(self, port: int, messages: int, many: bool) -> float:
        """
        Run smtp-source against C{port}; the seconds until it exited, that
        is until every message had its reply to the end of data.
        """
        return runSmtpSource(port, messages, self.args.sessions, self.args.size, many)

    def delivered(self, what: str, count: int, start: float) -> float:
        """
        Wait until the sink holds C{count} more messages; the seconds from
        C{start} until it did.  A message missing is an error.
        """
        self.expected += count
        end = self.sink.waitFor(self.expected, stall=self.args.stall)
        if end is None:
            missing = self.expected - self.sink.delivered
            raise BenchError(
                f"{what}: {missing} of {count} messages missing at the sink "
                f"({self.args.stall:.0f} s without a new one)"
            )
        return end - start

    def checkSink(self, what: str) -> None:
        if self.sink.delivered != self.expected:
            raise BenchError(
                f"{what}: the sink counted {self.sink.delivered} messages, "
                f"{self.expected} expected (a duplicate or a late delivery)"
            )

    def throughput(
        self, name: str, sut: Relayd | PrivatePostfix, many: bool
    ) -> tuple[float, float, float]:
        """
        Accept and end-to-end rates (msg/s) of one smtp-source run, and the
        CPU the SUT's processes used for it, in milliseconds per message:
        receiving and delivering, until the sink held every message.
        """
        what = f"{name}, {'many messages' if many else 'one message'} per connection"
        self.checkSink(what)
        messages = self.args.messages
        root = sut.rootPid()
        cpu = treeCpu(root)
        start = time.monotonic()
        accepted = self.smtpSource(sut.port, messages, many)
        endToEnd = self.delivered(what, messages, start)
        cpu = treeCpu(root) - cpu
        return messages / accepted, messages / endToEnd, cpu * 1000 / messages

    def latency(self, name: str, port: int, rate: float) -> dict[str, Any]:
        what = f"{name}, latency at {rate:.0f} msg/s"
        self.checkSink(what)
        start = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.latency",
                "--port",
                str(port),
                "--rate",
                f"{rate:.3f}",
                "--messages",
                str(self.args.latency_messages),
                "--sessions",
                str(self.args.sessions),
                "--size",
                str(self.args.size),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        try:
            figures: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            raise BenchError(f"{what}: the latency client failed: {result.stderr[-800:]}") from None
        if figures["failures"]:
            raise BenchError(
                f"{what}: {figures['failures']} messages refused: {figures['first_failures']}"
            )
        self.delivered(what, figures["accepted"], start)
        return figures

    def round(self, number: int) -> dict[str, Any]:
        suts = list(self.suts().items())
        if number % 2 == 0:
            suts.reverse()
        figures: dict[str, dict[str, Any]] = {name: {} for name, _ in suts}
        for name, sut in suts:
            for many in (False, True):
                accept, e2e, cpu = self.throughput(name, sut, many)
                suffix = "_d" if many else ""
                figures[name]["accept" + suffix] = accept
                figures[name]["e2e" + suffix] = e2e
                figures[name]["cpu" + suffix] = cpu
                say(
                    f"round {number}: {name:7} {'-d' if many else '  '} "
                    f"accept {accept:7.1f} msg/s, end to end {e2e:7.1f} msg/s, "
                    f"CPU {cpu:.2f} ms/msg"
                )
        rate = figures["postfix"]["accept"] / 2
        for name, sut in suts:
            lat = self.latency(name, sut.port, rate)
            figures[name]["latency_p50"] = lat["p50_ms"]
            figures[name]["latency_p99"] = lat["p99_ms"]
            figures[name]["latency_run"] = lat
            say(
                f"round {number}: {name:7} latency at {rate:.0f} msg/s offered "
                f"({lat['achieved_rate'] or 0:.0f} achieved): "
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms"
            )
        ratios = {
            key: figures["relayd"][key] / figures["postfix"][key]
            for key, _, _, _ in METRICS
            if figures["postfix"][key]
        }
        return {
            "round": number,
            "order": [name for name, _ in suts],
            "latency_offered_rate": rate,
            "relayd": figures["relayd"],
            "postfix": figures["postfix"],
            "ratio": ratios,
        }

    def memory(self, messages: int) -> dict[str, Any]:
        """
        A fresh relayd takes C{messages} (one per connection) while the RSS
        of its processes (queue manager and receivers, summed) is sampled:
        after the first tenth against over all of them.
        """
        checkpoint = messages // 10
        fresh = Relayd(
            self.workdir / "relayd-rss",
            self.sink.port,
            self.args.per_destination,
            self.args.delivery_processes,
        )
        self.pids.extend([self.relayd.pid, *descendants(self.relayd.pid)])
        self.relayd.stop()
        self.relayd = fresh
        fresh.start()
        time.sleep(1)  # the receiver processes start after the greeting
        start = treeRss(fresh.pid)
        say(f"memory: fresh relayd ({start['processes']} processes), {messages} messages")
        samples: list[tuple[int, int]] = []  # (delivered since start, VmRSS KiB)
        base = self.sink.delivered
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                samples.append((self.sink.delivered - base, treeRss(fresh.pid)["VmRSS"]))

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        began = time.monotonic()
        try:
            accepted = self.smtpSource(fresh.port, messages, many=False)
            endToEnd = self.delivered("memory run", messages, began)
        finally:
            done.set()
            sampler.join()
        end = treeRss(fresh.pid)
        early = [kib for count, kib in samples if count <= checkpoint]
        atCheckpoint = next((kib for count, kib in samples if count >= checkpoint), None)
        peak = max([kib for _, kib in samples] + [end["VmRSS"]])
        result = {
            "messages": messages,
            "checkpoint": checkpoint,
            "processes": end["processes"],
            "rss_start_kib": start["VmRSS"],
            "rss_at_checkpoint_kib": atCheckpoint,
            "peak_rss_to_checkpoint_kib": max(early, default=None),
            "peak_rss_kib": peak,
            "rss_end_kib": end["VmRSS"],
            "hwm_sum_kib": end["VmHWM"],
            "accept_rate": messages / accepted,
            "e2e_rate": messages / endToEnd,
            "samples": len(samples),
        }
        say(
            f"memory: RSS {start['VmRSS'] / 1024:.0f} MiB at start, "
            f"{(atCheckpoint or 0) / 1024:.0f} MiB after {checkpoint}, "
            f"peak {peak / 1024:.0f} MiB over {messages}"
        )
        return result

    def run(self) -> None:
        self.start()
        for number in range(1, self.args.rounds + 1):
            self.rounds.append(self.round(number))
        self.relaydPeak = treeRss(self.relayd.pid)
        if self.args.rss_messages:
            self.rssRun = self.memory(self.args.rss_messages)
        # A duplicate of the last phase's messages would arrive late.
        time.sleep(1)
        self.checkSink("end of the run")


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    with contextlib.suppress(OSError, IndexError):
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def report(bench: Bench, args: argparse.Namespace, started: str, commit: str) -> dict[str, Any]:
    medians = {
        key: _median([r["ratio"].get(key, float("nan")) for r in bench.rounds])
        for key, _, _, _ in METRICS
    }
    try:
        import twisted

        twistedVersion = twisted.__version__
    except ImportError:
        twistedVersion = "?"
    return {
        "started": started,
        "commit": commit,
        "machine": machine(),
        "versions": {"postfix": bench.postfix.version(), "twisted": twistedVersion},
        "parameters": {
            "quick": args.quick,
            "rounds": args.rounds,
            "messages": args.messages,
            "sessions": args.sessions,
            "size": args.size,
            "latency_messages": args.latency_messages,
            "latency_offered": "half of Postfix's accept rate (1 msg/conn) in the same round",
            "rss_messages": args.rss_messages,
            "per_destination": args.per_destination,
            "delivery_processes": args.delivery_processes,
        },
        "configs": {
            "relayd.toml": bench.relayd.config(),
            "postfix main.cf": bench.postfix.mainCf(),
            "postfix master.cf": bench.postfix.masterCf(),
            "sink": " ".join(bench.sink.command()),
        },
        "rounds": bench.rounds,
        "median_ratio": medians,
        "relayd_rss_after_rounds_kib": bench.relaydPeak,
        "memory_run": bench.rssRun,
        "processes": {
            "pids": sorted({pid for pid in bench.pids if pid}),
            "ports": [bench.sink.port, bench.relayd.port, bench.postfix.port],
        },
    }


def table(result: dict[str, Any]) -> str:
    p = result["parameters"]
    lines = [
        (
            f"relayd vs Postfix {result['versions']['postfix']}, commit {result['commit'][:12]}, "
            f"{result['machine']['cpus_usable']} CPUs, {p['rounds']} round(s)"
        ),
        (
            f"load: smtp-source -s {p['sessions']} -m {p['messages']} -l {p['size']}; "
            f"latency: {p['latency_messages']} messages at half of Postfix's accept rate"
        ),
        "",
        (
            f"{'metric':28} {'unit':6} {'round':>5} {'relayd':>9} {'postfix':>9} "
            f"{'relayd/postfix':>15}"
        ),
    ]
    for key, label, unit, higher in METRICS:
        digits = 2 if unit == "ms/msg" else 1
        for r in result["rounds"]:
            lines.append(
                f"{label:28} {unit:6} {r['round']:>5} {r['relayd'][key]:9.{digits}f} "
                f"{r['postfix'][key]:9.{digits}f} {r['ratio'].get(key, float('nan')):15.2f}"
            )
        better = "higher" if higher else "lower"
        lines.append(
            f"{'':28} {'':6} {'median':>5} {'':9} {'':9} "
            f"{result['median_ratio'][key]:15.2f}  ({better} is better for relayd)"
        )
    lines.append("")
    for r in result["rounds"]:
        achieved = [
            r[name]["latency_run"]["achieved_rate"] or 0.0 for name in ("relayd", "postfix")
        ]
        lines.append(
            f"latency load, round {r['round']}: {r['latency_offered_rate']:.0f} msg/s offered, "
            f"achieved relayd {achieved[0]:.0f}, postfix {achieved[1]:.0f} "
            f"(at most {p['sessions']} sessions at once)"
        )
    peak = result["relayd_rss_after_rounds_kib"]
    if peak:
        lines.append(
            f"relayd RSS after the rounds ({peak['processes']} processes, summed): "
            f"{peak['VmRSS'] / 1024:.1f} MiB, peaks {peak['VmHWM'] / 1024:.1f} MiB"
        )
    m = result["memory_run"]
    if m:
        lines.append(
            f"relayd RSS ({m['processes']} processes, summed), fresh, {m['messages']} messages: "
            f"{m['rss_start_kib'] / 1024:.1f} MiB at start, "
            f"{(m['rss_at_checkpoint_kib'] or 0) / 1024:.1f} MiB after {m['checkpoint']}, "
            f"peak {m['peak_rss_kib'] / 1024:.1f} MiB over all "
            f"(peak over all / peak to {m['checkpoint']}: "
            f"{m['peak_rss_kib'] / (m['peak_rss_to_checkpoint_kib'] or m['peak_rss_kib']):.2f}); "
            f"accept {m['accept_rate']:.0f} msg/s, end to end {m['e2e_rate']:.0f} msg/s"
        )
    else:
        lines.append("relayd RSS over a long run: skipped (--rss-messages 0 or --quick)")
    return "\n".join(lines) + "\n"


def _searchableByOthers(path: Path) -> bool:
    """Whether every folder from / down to C{path} lets other users through."""
    return all(os.stat(folder).st_mode & 1 for folder in [path, *path.parents])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="relayd and a private Postfix, alternately, same load and sink.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead: count relayd's instructions per relayed message under callgrind "
        "(bench/instructions.py; --messages N: runs of N and 2N, default 200, --quick 10)",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="with --instructions: count git revision REV too, from a temporary worktree",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
    parser.add_argument("--messages", type=int, help="smtp-source -m (default 2000, --quick 300)")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    parser.add_argument(
        "--latency-messages",
        type=int,
        help="messages per latency run (default 1000, --quick: --messages)",
    )
    parser.add_argument(
        "--rss-messages",
        type=int,
        help="messages of the memory run, 0 to skip (default 20000, --quick 0)",
    )
    parser.add_argument(
        "--per-destination",
        type=int,
        help="connections per destination for both (relayd delivery.per_destination, "
        "Postfix default_destination_concurrency_limit); default: each one's own default",
    )
    parser.add_argument(
        "--delivery-processes",
        type=int,
        help="relayd's [delivery] processes (0: the queue manager delivers itself); "
        "default: relayd's default",
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=60.0,
        help="seconds without a new message at the sink before one counts as missing",
    )
    parser.add_argument("--json", type=Path, help="result file (default var/bench/TIME.json)")
    parser.add_argument(
        "--workdir", type=Path, help="where spools and queues go (default var/bench)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.against and not args.instructions:
        parser.error("--against goes with --instructions")
    if args.messages is None:
        if args.instructions:
            args.messages = 10 if args.quick else 200
        else:
            args.messages = 300 if args.quick else 2000
    if args.latency_messages is None:
        # 1000 gives a p99 from its 10 slowest, and keeps the full run near
        # ten minutes on two cores.
        args.latency_messages = min(args.messages, 1000)
    if args.rss_messages is None:
        args.rss_messages = 0 if args.quick else 20000
    for name in ("rounds", "messages", "sessions", "size", "latency_messages"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.instructions:
        from bench import instructions

        return instructions.main(args)
    if os.geteuid() != 0:
        say("must run as root: the private Postfix instance's master runs as root")
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = commitOf()
    parent = args.workdir or REPO / "var" / "bench"
    if args.workdir is None and not _searchableByOthers(REPO):
        # Postfix's daemons (user postfix) must reach the work directory: a
        # checkout in a private folder (a CI clone in mktemp -d) cannot host
        # it, so the run goes to the system's temporary directory.
        parent = Path(tempfile.gettempdir()) / "relayd-bench"
        say(f"{REPO} is not searchable by other users; working in {parent}")
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(parent.stat().st_mode | 0o011)
    workdir = Path(tempfile.mkdtemp(prefix="work-", dir=parent))
    workdir.chmod(0o755)  # Postfix's daemons run as user postfix
    bench = Bench(args, workdir)
    began = time.monotonic()
    failure = None
    try:
        bench.run()
    except BenchError as e:
        failure = str(e)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        bench.stop()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        say(f"FAILED: {failure}")
        if not bench.rounds:
            return 1
    result = report(bench, args, started, commit)
    result["failure"] = failure
    result["duration_s"] = round(time.monotonic() - began, 1)
    path = args.json or REPO / "var" / "bench" / f"{started.replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(table(result))
    sys.stdout.write(f"JSON: {path}\n")
    sys.stdout.flush()
    return 1 if failure is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
