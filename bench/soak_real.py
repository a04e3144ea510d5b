"""
Failure detection between dmq-bus nodes with real processes, real time and
real packet loss: no false positive in a long soak, and every crash seen by
every survivor within a bound.

N node processes (L{bench._procs}) on 127.0.0.1 at the default settings,
all joined through node 1. Each node drops every UDP datagram it receives,
and every one it sends, with probability C{--loss} (its own seeded
random): loss in both directions on every link, over real loopback sockets.

  1. Soak: C{--minutes} real minutes. Every membership change every node
     reports is checked: a live node marked anything but active (disabled,
     pending, timeout) or removed by another live node is a false positive.
  2. Crashes, C{--crashes} times, at the same loss: kill -9 one non-seed
     node (the last, then the one before, ...); when did every survivor
     mark it, and remove it? Then a fresh process on its port, waited for
     until every node lists every node active (and covers it with probes)
     before the next crash. False positives are still watched.

Nodes report health events (suspicions started, refuted, failed) and
timers their reactor ran 100 ms late or more, so a false positive can be
put down to CPU starvation or to the protocol; the machine's CPU pressure
(C{/proc/pressure/cpu}) is printed each minute.

    python bench/soak_real.py                     # 5 nodes, 10 min, 5 % loss, 3 crashes
    python bench/soak_real.py --short             # 1 min, 1 crash
    python bench/soak_real.py --loss 0.10 --minutes 10
    python bench/soak_real.py --minutes 0 --crashes 20   # crashes only

Exits 1 on any false positive, or any survivor marking a crash later than
C{--bound} s (or never), saying why.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import attrs

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._procs import (
    NodeProcess,
    NodeProcesses,
    NodeSpec,
    Report,
    parseStats,
    percentile,
    table,
    writeLine,
)
from tests.interop.kamailio import allocatePorts, releasePorts

LAG_INTERVAL = 0.1
"""Seconds between two ticks of each node's lag probe."""

CONTEXT = 5.0
"""Seconds either side of a false positive, and before a crash, whose events are printed."""


def cpuPressure() -> float | None:
    """Microseconds some task waited for a CPU since boot (PSI), None without PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return float(line.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        pass
    return None


def loadAverage() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


@attrs.define(eq=False)
class Member:
    """One node process: what it lists and what it reported."""

    number: int
    process: NodeProcess
    generation: int = 0
    established: float | None = None
    killedAt: float | None = None
    view: dict[int, str] = attrs.Factory(dict)
    stats: list[tuple[float, dict[str, float]]] = attrs.Factory(list)
    health: list[tuple[float, str, int]] = attrs.Factory(list)
    lags: list[tuple[float, float]] = attrs.Factory(list)
    events: list[tuple[float, str, int, str]] = attrs.Factory(list)

    @property
    def port(self) -> int:
        return self.process.spec.port

    @property
    def name(self) -> str:
        return f"node {self.number}" + (f"#{self.generation}" if self.generation else "")

    def aliveAt(self, t: float) -> bool:
        """Alive and part of the formed bus at C{t}."""
        return (
            self.established is not None
            and self.established <= t
            and (self.killedAt is None or t < self.killedAt)
        )

    def latestStats(self) -> dict[str, float]:
        return self.stats[-1][1] if self.stats else {}


@attrs.frozen
class FalsePositive:
    time: float
    observer: Member
    subject: Member
    change: str
    status: str

    def describe(self, start: float) -> str:
        what = "removed" if self.change == "removed" else f"marked {self.status}"
        return (
            f"t+{self.time - start:.3f} s: {self.observer.name} (port {self.observer.port}) "
            f"{what} {self.subject.name} (port {self.subject.port}), alive"
        )


@attrs.define
class Crash:
    victim: Member
    killedAt: float
    survivors: list[Member]
    marked: dict[int, tuple[float, str]] = attrs.Factory(dict)
    removed: dict[int, float] = attrs.Factory(dict)
    backActive: dict[int, float] = attrs.Factory(dict)
    restartedAt: float | None = None
    reformedAt: float | None = None

    def allRemoved(self) -> bool:
        return len(self.removed) == len(self.survivors)

    def markedAfter(self) -> list[float]:
        return sorted(t - self.killedAt for t, _ in self.marked.values())

    def removedAfter(self) -> list[float]:
        return sorted(t - self.killedAt for t in self.removed.values())


class Soak:
    """The bus, the reports of its nodes and the verdicts."""

    def __init__(self, procs: NodeProcesses, args: argparse.Namespace, ports: list[int]) -> None:
        self.procs = procs
        self.args = args
        self.ports = ports
        self.members: list[Member] = []
        self.byProcess: dict[int, Member] = {}
        self.current: dict[int, Member] = {}
        self.falsePositives: list[FalsePositive] = []
        self.crash: Crash | None = None
        self.crashes: list[Crash] = []
        self.watchFrom = math.inf
        self.reported = 0
        self.start = time.monotonic()

    # -- processes

    def spawn(self, number: int, generation: int) -> Member:
        port = self.ports[number - 1]
        spec = NodeSpec(
            port,
            () if number == 1 else (self.ports[0],),
            loss=self.args.loss,
            lossSeed=self.args.seed * 10_000 + generation * 1000 + number,
            lagInterval=LAG_INTERVAL,
            healthEvents=True,
        )
        member = Member(number, self.procs.start(spec), generation)
        self.members.append(member)
        self.byProcess[id(member.process)] = member
        self.current[port] = member
        return member

    def alive(self) -> list[Member]:
        return [m for m in self.current.values() if m.killedAt is None]

    # -- reports

    def pump(self, timeout: float) -> None:
        for report in self.procs.read(timeout):
            self.take(report)

    def waitFor(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.2))
        return True

    def take(self, report: Report) -> None:
        member = self.byProcess[id(report.process)]
        if report.kind == "stats":
            member.stats.append((report.time, parseStats(report.fields)))
        elif report.kind == "lag":
            member.lags.append((report.time, float(report.fields[0])))
        elif report.kind == "health":
            member.health.append((report.time, report.fields[0], int(report.fields[1])))
        elif report.kind == "node":
            change, port, status = report.fields[0], int(report.fields[1]), report.fields[2]
            member.events.append((report.time, change, port, status))
            if change == "removed":
                member.view.pop(port, None)
            else:
                member.view[port] = status
            self.judge(report.time, member, change, port, status)

    def judge(self, t: float, observer: Member, change: str, port: int, status: str) -> None:
        crash = self.crash
        if (
            crash is not None
            and port == crash.victim.port
            and t >= crash.killedAt
            and (crash.restartedAt is None or t < crash.restartedAt)
        ):
            if observer in crash.survivors:
                if change == "removed":
                    crash.removed.setdefault(observer.port, t)
                elif status != "active":
                    crash.marked.setdefault(observer.port, (t, status))
                elif observer.port in crash.marked:
                    crash.backActive.setdefault(observer.port, t)
            return
        if change != "removed" and status == "active":
            return
        if t < self.watchFrom or not observer.aliveAt(t):
            return
        for subject in self.members:
            if subject.port == port and subject.aliveAt(t):
                fp = FalsePositive(t, observer, subject, change, status)
                self.falsePositives.append(fp)
                writeLine(sys.stderr, "  !!! false positive: " + fp.describe(self.start))

    # -- the bus as a whole

    def formed(self) -> bool:
        """Every live node lists every other live node active."""
        alive = self.alive()
        return all(
            m.process.ready is not None
            and all(m.view.get(o.port) == "active" for o in alive if o is not m)
            for m in alive
        )

    def collectStats(self, timeout: float = 5.0) -> bool:
        """A fresh C{stats} report from every live node."""
        asked = time.monotonic()
        members = [m for m in self.alive() if self.procs.requestStats(m.process)]
        return self.waitFor(
            lambda: all(m.stats and m.stats[-1][0] >= asked for m in members), timeout
        )

    def covered(self) -> bool:
        """Every live node probes (covers) every other one: ask, and look."""
        alive = self.alive()
        if not self.collectStats():
            return False
        return all(m.latestStats().get("health.covered") == len(alive) - 1 for m in alive)

    def form(self, timeout: float) -> float | None:
        """Wait until formed and covered everywhere; when, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.waitFor(self.formed, deadline - time.monotonic()) and self.covered():
                now = time.monotonic()
                for m in self.alive():
                    if m.established is None:
                        m.established = now
                return now
            self.pump(0.5)
        return None


def worstLag(member: Member, start: float, end: float) -> str:
    """
    The latest timer of C{member} between C{start} and C{end}, in ms; when
    none was reported (all under L{LAG_REPORTED}), "<=" the worst since
    the process started.
    """
    lags = [lag for t, lag in member.lags if start <= t <= end]
    if lags:
        return f"{max(lags) * 1000:.0f}"
    return f"<={member.latestStats().get('lag.max', 0.0) * 1000:.0f}"


def summariseHealth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def soakPhase(soak: Soak, args: argparse.Namespace) -> list[str]:
    """Run the soak; print per-minute progress and the per-node table. Returns failures."""
    alive = soak.alive()
    soak.collectStats()
    first = {id(m): m.latestStats() for m in alive}
    began = time.monotonic()
    soak.watchFrom = began
    pressure0 = cpuPressure()
    minutes = args.minutes
    end = began + minutes * 60.0
    minute = 0
    lastPressure, lastMark = pressure0, began
    while True:
        now = time.monotonic()
        if now >= end:
            break
        nextMark = min(end, began + (minute + 1) * 60.0)
        soak.waitFor(lambda: False, max(0.0, nextMark - now))
        minute += 1
        soak.collectStats()
        pressure = cpuPressure()
        markNow = time.monotonic()
        stall = (
            f"{(pressure - lastPressure) / 1e6 / (markNow - lastMark):.0%}"
            if pressure is not None and lastPressure is not None
            else "?"
        )
        lastPressure, lastMark = pressure, markNow
        totals = {
            k: sum(m.latestStats().get(k, 0.0) - first[id(m)].get(k, 0.0) for m in alive)
            for k in (
                "health.suspicions",
                "health.suspicions_refuted",
                "health.nodes_failed",
                "loss.dropped_in",
                "loss.dropped_out",
                "lag.over_100ms",
                "lag.over_250ms",
            )
        }
        writeLine(
            sys.stderr,
            f"  {(markNow - began) / 60:4.1f} min: false positives {len(soak.falsePositives)}; "
            f"suspicions {totals['health.suspicions']:.0f} "
            f"(refuted {totals['health.suspicions_refuted']:.0f}, "
            f"failed {totals['health.nodes_failed']:.0f}); dropped "
            f"{totals['loss.dropped_in'] + totals['loss.dropped_out']:.0f}; "
            f"late timers >=100 ms {totals['lag.over_100ms']:.0f}, >=250 ms "
            f"{totals['lag.over_250ms']:.0f}; "
            f"CPU pressure {stall}; load {loadAverage()}",
        )
    ran = time.monotonic() - began
    pressure1 = cpuPressure()
    last = {id(m): m.latestStats() for m in alive}

    print(
        f"soak: {len(alive)} dmq-bus node processes on 127.0.0.1, default settings, "
        f"{ran / 60:.2f} minutes at {args.loss:.0%} loss each way on every UDP datagram "
        f"(sender and receiver each drop: {1 - (1 - args.loss) ** 2:.2%} lost end to end)"
    )
    if pressure0 is not None and pressure1 is not None:
        print(
            f"  machine: CPU pressure (some task waiting for a CPU) {(pressure1 - pressure0) / 1e6 / ran:.0%} "
            f"of the time, load {loadAverage()}, {os.cpu_count()} CPUs"
        )
    rows = []
    for m in alive:
        d = summariseHealth(first[id(m)], last[id(m)])
        sent = d.get("loss.dropped_out", 0) + d.get("loss.passed_out", 0)
        received = d.get("loss.dropped_in", 0) + d.get("loss.passed_in", 0)
        rows.append(
            (
                f"{m.name} :{m.port}",
                f"{d.get('loss.dropped_out', 0):.0f}/{sent:.0f}",
                f"{d.get('loss.dropped_in', 0):.0f}/{received:.0f}",
                f"{d.get('health.probes', 0):.0f}",
                f"{d.get('health.indirect_rounds', 0):.0f}",
                f"{d.get('health.suspicions', 0):.0f}",
                sum(1 for t, what, _ in m.health if what == "suspect-own" and began <= t),
                f"{d.get('health.suspicions_refuted', 0):.0f}",
                f"{d.get('health.refutations_sent', 0):.0f}",
                f"{d.get('health.nodes_failed', 0):.0f}",
                f"{d.get('cpu', 0) / ran:.1%}",
                f"{d.get('sched.wait', 0):.1f}",
                worstLag(m, began, began + ran),
                f"{d.get('lag.over_100ms', 0):.0f}/{d.get('lag.over_250ms', 0):.0f}",
            )
        )
    print(
        table(
            (
                "node",
                "dropped out",
                "dropped in",
                "probes",
                "indirect",
                "suspicions",
                "started",
                "refuted",
                "refutations",
                "failed",
                "CPU",
                "CPU wait s",
                "max lag ms",
                "late 100/250",
            ),
            rows,
        )
    )
    print(
        "  suspicions: suspicions this node started or was told of (started: after its own probe "
        "of the node failed, direct and indirect); refuted: ended by an answer "
        "or message from the suspect; refutations: 'alive' rounds this node sent about itself; "
        "failed: suspicions that ran out (should be 0 while all live). CPU wait: seconds runnable "
        "but waiting for a CPU; max lag: the latest a 0.1 s timer ran (<=: at most, since the "
        "process started); late 100/250: timers run >= 100 / 250 ms late."
    )
    return reportFalsePositives(soak, "soak")


def reportFalsePositives(soak: Soak, phase: str) -> list[str]:
    """
    Print the false positives not printed yet, grouped by incident (one
    subject, within C{CONTEXT} s), each incident with what every node
    reported around it: health events and list changes about the subject,
    and timers run late (a process starved of CPU, or stopped).
    """
    found = soak.falsePositives[soak.reported :]
    soak.reported = len(soak.falsePositives)
    print(f"  false positives ({phase}): {len(found)}")
    incidents: list[list[FalsePositive]] = []
    for fp in found:
        last = incidents[-1][-1] if incidents else None
        if last is not None and last.subject is fp.subject and fp.time - last.time <= CONTEXT:
            incidents[-1].append(fp)
        else:
            incidents.append([fp])
    for incident in incidents:
        subject = incident[0].subject
        for fp in incident:
            print("   ", fp.describe(soak.start))
        lo, hi = incident[0].time - CONTEXT, incident[-1].time + CONTEXT
        lines: list[tuple[float, str]] = []
        for m in soak.members:
            lines += [
                (t, f"{m.name}: health {what} {subject.name}")
                for t, what, port in m.health
                if lo <= t <= hi and port == subject.port
            ]
            lines += [
                (t, f"{m.name}: {change} {subject.name} {status}")
                for t, change, port, status in m.events
                if lo <= t <= hi and port == subject.port
            ]
            lines += [
                (
                    t - lag,
                    f"{m.name}: stalled {lag * 1000:.0f} ms from here (a timer ran that late)",
                )
                for t, lag in m.lags
                if t >= lo and t - lag <= hi
            ]
        print(f"      around it (t+s, s from the start; {subject.name} is the subject):")
        for t, line in sorted(lines):
            print(f"      t+{t - soak.start:.3f} {line}")
    return [f"false positive: {fp.describe(soak.start)}" for fp in found]


def crashPhase(soak: Soak, args: argparse.Namespace) -> list[str]:
    failures: list[str] = []
    n = args.nodes
    print(f"crashes: kill -9 of one non-seed node at {args.loss:.0%} loss, seconds after the kill")
    rows = []
    for i in range(args.crashes):
        number = n - i % (n - 1)
        victim = soak.current[soak.ports[number - 1]]
        survivors = [m for m in soak.alive() if m is not victim]
        writeLine(sys.stderr, f"  crash {i + 1}: kill -9 {victim.name} (port {victim.port})")
        killedAt = soak.procs.kill(victim.process)
        victim.killedAt = killedAt
        crash = Crash(victim, killedAt, survivors)
        soak.crash = crash
        soak.crashes.append(crash)
        soak.waitFor(crash.allRemoved, args.removal_timeout)
        # a fresh process on the victim's port, then the whole bus formed again
        crash.restartedAt = time.monotonic()
        soak.spawn(number, i + 1)
        crash.reformedAt = soak.form(args.form_timeout)
        soak.crash = None
        marked, removed = crash.markedAfter(), crash.removedAfter()

        def spread(times: Sequence[float]) -> str:
            return f"{times[0]:.2f} / {times[-1]:.2f}" if times else "-"

        words = "+".join(sorted({w for _, w in crash.marked.values()})) or "-"
        rows.append(
            (
                f"{i + 1}: {victim.name} :{victim.port}",
                f"{len(marked)}/{len(survivors)} {words}",
                spread(marked),
                f"{len(removed)}/{len(survivors)}",
                spread(removed),
                "no" if crash.reformedAt is None else f"{crash.reformedAt - crash.restartedAt:.1f}",
            )
        )
        for survivor in survivors:
            seen = crash.marked.get(survivor.port)
            after = None if seen is None else seen[0] - killedAt
            if after is None or after > args.bound:
                failures.append(
                    f"crash {i + 1}: {survivor.name} marked {victim.name} "
                    + ("never" if after is None else f"after {after:.2f} s > {args.bound:g} s")
                )
        for port, t in crash.backActive.items():
            failures.append(
                f"crash {i + 1}: {soak.current[port].name} listed the dead {victim.name} "
                f"active again {t - killedAt:.2f} s after the kill"
            )
        if crash.reformedAt is None:
            failures.append(f"crash {i + 1}: the bus did not form again in {args.form_timeout:g} s")
            break
    print(
        table(
            ("crash: victim", "marked", "marked after", "removed", "removed after", "re-formed s"),
            rows,
        )
    )
    print(
        "  marked after: first / last survivor; re-formed: from the fresh process's start until "
        "every node lists every node active and probes it; node N#k: the process started on "
        "node N's port after crash k"
    )
    allMarked = sorted(t for crash in soak.crashes for t in crash.markedAfter())
    missed = sum(len(c.survivors) - len(c.marked) for c in soak.crashes)
    if allMarked:
        print(
            f"  all crashes: {len(allMarked)} survivor marks, median {percentile(allMarked, 0.5):.2f} s, "
            f"p90 {percentile(allMarked, 0.9):.2f} s, max {allMarked[-1]:.2f} s; "
            f"{sum(t > args.bound for t in allMarked)} over {args.bound:g} s, {missed} never"
        )
    for number, crash in enumerate(soak.crashes, 1):
        print(
            f"  crash {number}: what each survivor saw of {crash.victim.name}, s after the kill "
            "(from 5 s before: a suspicion may have begun before the kill)"
        )
        until = crash.restartedAt if crash.restartedAt is not None else math.inf
        for m in crash.survivors:
            saw = [
                (t, what)
                for t, what, port in m.health
                if port == crash.victim.port and crash.killedAt - CONTEXT <= t < until
            ]
            mark = crash.marked.get(m.port)
            if mark is not None:
                saw.append((mark[0], mark[1]))
            gone = crash.removed.get(m.port)
            if gone is not None:
                saw.append((gone, "removed"))
            saw += [
                (t - lag, f"stalled {lag * 1000:.0f} ms")
                for t, lag in m.lags
                if t >= crash.killedAt and t - lag < until
            ]
            print(
                f"    {m.name}: "
                + ("; ".join(f"{what} {t - crash.killedAt:.3f}" for t, what in sorted(saw)) or "-")
            )
    failures += reportFalsePositives(soak, "crashes")
    return failures


def run(args: argparse.Namespace) -> int:
    ports = allocatePorts(args.nodes)
    failures: list[str] = []
    try:
        with NodeProcesses() as procs:
            soak = Soak(procs, args, ports)
            writeLine(
                sys.stderr,
                f"  {args.nodes} node processes, {args.loss:.0%} loss each way: forming the bus ...",
            )
            seed = soak.spawn(1, 0)
            soak.waitFor(lambda: seed.process.ready is not None, 30)
            for number in range(2, args.nodes + 1):
                soak.spawn(number, 0)
            formedAt = soak.form(args.form_timeout)
            if formedAt is None:
                covered = {m.name: m.latestStats().get("health.covered") for m in soak.alive()}
                raise SystemExit(
                    f"the bus did not form in {args.form_timeout:g} s: views "
                    f"{ {m.name: m.view for m in soak.alive()} }, covered {covered}"
                )
            writeLine(
                sys.stderr,
                f"  formed in {formedAt - seed.process.spawned:.1f} s (every node lists and "
                f"probes every other); soaking {args.minutes:g} min ...",
            )
            if args.minutes > 0:
                failures += soakPhase(soak, args)
            else:
                soak.watchFrom = time.monotonic()
            if args.crashes:
                failures += crashPhase(soak, args)
            soak.collectStats()
    finally:
        releasePorts(ports)
    if failures:
        print("FAILED:")
        for failure in failures:
            print("  " + failure)
        return 1
    print(f"OK: no false positive; every crash marked by every survivor within {args.bound:g} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5, help="node processes (node 1 is the seed)")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length, real minutes")
    parser.add_argument("--loss", type=float, default=0.05, help="loss each way per datagram")
    parser.add_argument("--crashes", type=int, default=3, help="kill -9 this many times")
    parser.add_argument("--bound", type=float, default=3.0, help="seconds to mark a crash")
    parser.add_argument("--short", action="store_true", help="quick check: 1 minute, 1 crash")
    parser.add_argument("--seed", type=int, default=1, help="seed of the loss randomness")
    parser.add_argument(
        "--form-timeout", type=float, default=60.0, help="seconds for the bus to form"
    )
    parser.add_argument(
        "--removal-timeout",
        type=float,
        default=40.0,
        help="seconds to wait for every survivor to remove a crashed node",
    )
    args = parser.parse_args(argv)
    if args.short:
        args.minutes, args.crashes = 1.0, min(args.crashes, 1)
    if args.nodes < 3:
        raise SystemExit("--nodes must be at least 3")
    if not 0 <= args.loss < 1:
        raise SystemExit("--loss must be in [0, 1)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
