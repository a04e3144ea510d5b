"""
Failure detection: kill -9 one node of N; how long until every survivor
marks it (disabled) and until every survivor has removed it. dmq-bus and
Kamailio 5.6.3, side by side in the same run.

Four buses run at once, each of C{--nodes} nodes joined to its first node;
the victim is the last node (not the seed: a failed seed goes back to
pending and is never removed):

  - dmq-bus with the defaults (ping interval 5 s, ping timeout 5 s);
  - dmq-bus with C{--fast} settings (default 1 s / 1 s);
  - Kamailio with its defaults (fr_timer 30 s, ping_interval 5 s);
  - Kamailio with fr_timer 5 s (ping_interval 5 s, its minimum).

dmq-bus node processes report each list change on a pipe with a
CLOCK_MONOTONIC stamp (see C{bench/_procs.py}); Kamailio nodes are read
with C{kamcmd dmq.list_nodes} every C{--poll} seconds, so their figures
are late by up to one poll plus a kamcmd call. Each bus is bounded: it
is given up on after 3 × (ping interval + timeout) + 10 s.

    python bench/detection.py                  # 5 nodes per bus, ~75 s
    python bench/detection.py --nodes 10 --fast 1,0.5
    python bench/detection.py --no-kamailio    # dmq-bus only, ~35 s
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._procs import NodeProcess, NodeProcesses, NodeSpec, Report, table, writeLine
from tests.interop.kamailio import (
    KamailioError,
    KamailioNode,
    allocatePorts,
    kamailioAvailable,
    releasePorts,
)


class Bus:
    """One bus under test: its nodes, its victim, and what survivors saw."""

    def __init__(self, name: str, settings: str, n: int, interval: float, timeout: float) -> None:
        self.name = name
        self.settings = settings
        self.n = n
        self.ports = allocatePorts(n)
        self.victim = self.ports[-1]
        self.survivors = self.ports[:-1]
        self.killedAt: float | None = None
        self.marked: dict[int, tuple[float, str]] = {}
        self.removed: dict[int, float] = {}
        self.bound = 3 * (interval + timeout) + 10
        self.error: str | None = None

    def converged(self) -> bool:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def poll(self) -> None:
        """Look at the survivors (Kamailio); dmq-bus nodes report by themselves."""

    def stop(self) -> None:
        raise NotImplementedError

    def done(self, now: float) -> bool:
        if self.error is not None:
            return True
        if self.killedAt is None:
            return False
        return len(self.removed) == len(self.survivors) or now - self.killedAt > self.bound

    def row(self) -> Sequence[str]:
        def spread(times: Sequence[float]) -> str:
            if not times:
                return "-"
            times = sorted(times)
            return f"{times[0]:.2f} / {times[-1]:.2f}"

        assert self.killedAt is not None or self.error is not None
        k = self.killedAt or 0.0
        marked = [t - k for t, _ in self.marked.values()]
        removed = [t - k for t in self.removed.values()]
        words = sorted({w for _, w in self.marked.values()})
        survivors = len(self.survivors)
        return (
            self.name,
            self.settings,
            self.error or f"{len(marked)}/{survivors} {'+'.join(words) or '-'}",
            spread(marked),
            f"{len(removed)}/{survivors}",
            spread(removed),
        )


class DMQBusUnderTest(Bus):
    """dmq-bus node processes."""

    def __init__(
        self, procs: NodeProcesses, name: str, n: int, interval: float, timeout: float
    ) -> None:
        super().__init__(name, f"ping {interval:g} s, timeout {timeout:g} s", n, interval, timeout)
        self.procs = procs
        self.active: dict[int, int] = {}
        self.processes: dict[int, NodeProcess] = {}
        for port in self.ports:
            seeds = () if port == self.ports[0] else (self.ports[0],)
            spec = NodeSpec(port, seeds, pingInterval=interval, pingTimeout=timeout)
            self.processes[port] = procs.start(spec)

    def take(self, report: Report) -> None:
        port = report.process.spec.port
        if report.kind != "node":
            return
        change, nodePort, status, active = report.fields[:4]
        self.active[port] = int(active)
        if self.killedAt is None or int(nodePort) != self.victim:
            return
        if change == "status" and status != "active":
            self.marked.setdefault(port, (report.time, status))
        elif change == "removed":
            self.removed.setdefault(port, report.time)

    def converged(self) -> bool:
        return len(self.active) == self.n and all(c == self.n for c in self.active.values())

    def kill(self) -> None:
        self.killedAt = self.procs.kill(self.processes[self.victim])

    def stop(self) -> None:
        """The shared L{NodeProcesses} stops them."""


class KamailioBusUnderTest(Bus):
    """Kamailio 5.6.3 nodes (L{KamailioNode})."""

    def __init__(self, baseDir: str, name: str, n: int, frTimer: int) -> None:
        super().__init__(name, f"ping 5 s, fr_timer {frTimer / 1000:g} s", n, 5, frTimer / 1000)
        self.nodes = [
            KamailioNode(
                port,
                None if port == self.ports[0] else self.ports[0],
                baseDir=baseDir,
                pingInterval=5,
                frTimer=frTimer,
            )
            for port in self.ports
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def converged(self) -> bool:
        try:
            return all(
                len(statuses) == self.n and set(statuses.values()) == {"active"}
                for statuses in (node.nodeStatuses() for node in self.nodes)
            )
        except KamailioError:
            return False

    def kill(self) -> None:
        self.killedAt = time.monotonic()
        self.nodes[-1].kill()

    def poll(self) -> None:
        if self.killedAt is None:
            return
        for node in self.nodes[:-1]:
            if node.port in self.removed:
                continue
            try:
                statuses = node.nodeStatuses()
            except KamailioError:
                continue
            now = time.monotonic()
            status = statuses.get(self.victim)
            if status is None:
                self.removed[node.port] = now
            elif status != "active":
                self.marked.setdefault(node.port, (now, status))

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


def run(args: argparse.Namespace) -> list[Bus]:
    fastInterval, fastTimeout = (float(x) for x in args.fast.split(","))
    buses: list[Bus] = []
    baseDir = tempfile.mkdtemp(prefix="dmqd-")
    withKamailio = not args.no_kamailio and kamailioAvailable()
    if not args.no_kamailio and not withKamailio:
        writeLine(sys.stderr, "  !!! kamailio not installed: dmq-bus only !!!")
    try:
        with NodeProcesses() as procs:
            dmqBuses: list[DMQBusUnderTest] = [
                DMQBusUnderTest(procs, "dmq-bus", args.nodes, 5.0, 5.0),
                DMQBusUnderTest(procs, "dmq-bus", args.nodes, fastInterval, fastTimeout),
            ]
            buses += dmqBuses
            byPort = {port: bus for bus in dmqBuses for port in bus.ports}
            kamBuses: list[KamailioBusUnderTest] = []
            try:
                if withKamailio:
                    kamBuses = [
                        KamailioBusUnderTest(baseDir, "kamailio", args.nodes, 30000),
                        KamailioBusUnderTest(baseDir, "kamailio", args.nodes, 5000),
                    ]
                    buses += kamBuses
                    for kam in kamBuses:
                        kam.start()

                def pump(timeout: float) -> None:
                    for report in procs.read(timeout):
                        byPort[report.process.spec.port].take(report)

                writeLine(sys.stderr, f"  {len(buses)} buses of {args.nodes} nodes: joining ...")
                deadline = time.monotonic() + 30
                while not all(bus.converged() for bus in buses):
                    if time.monotonic() > deadline:
                        for bus in buses:
                            if not bus.converged():
                                bus.error = "did not converge in 30 s"
                        break
                    pump(0.2)
                # settle: a ping round so that every node has pinged every other once
                settle = time.monotonic() + args.settle
                while time.monotonic() < settle:
                    pump(0.1)
                writeLine(sys.stderr, "  kill -9 the last node of each bus; watching ...")
                for bus in buses:
                    if bus.error is None:
                        bus.kill()
                lastPoll = 0.0
                while True:
                    now = time.monotonic()
                    if all(bus.done(now) for bus in buses):
                        break
                    if now - lastPoll >= args.poll:
                        lastPoll = now
                        for kam in kamBuses:
                            if not kam.done(now):
                                kam.poll()
                    pump(0.05)
            finally:
                for kam in kamBuses:
                    kam.stop()
    finally:
        for bus in buses:
            releasePorts(bus.ports)
        shutil.rmtree(baseDir, ignore_errors=True)
    return buses


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5, help="nodes per bus (victim included)")
    parser.add_argument(
        "--fast", default="1,1", help="ping interval,timeout of the second dmq-bus bus (s)"
    )
    parser.add_argument("--poll", type=float, default=0.2, help="seconds between kamcmd polls")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between convergence and the kill"
    )
    parser.add_argument("--no-kamailio", action="store_true", help="dmq-bus buses only")
    args = parser.parse_args()
    if args.nodes < 2:
        raise SystemExit("--nodes must be at least 2")
    buses = run(args)
    print(
        f"detection: kill -9 of 1 node out of {args.nodes}, seconds after the kill "
        f"(first / last survivor); Kamailio read every {args.poll:g} s with kamcmd"
    )
    print(
        table(
            ("bus", "settings", "marked", "marked after", "removed", "removed after"),
            [bus.row() for bus in buses],
        )
    )


if __name__ == "__main__":
    main()
