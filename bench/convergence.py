"""
How fast a bus converges: N nodes join one seed; how long until EVERY node
lists all N nodes active.

Real processes (default): N dmq-bus node processes on 127.0.0.1, forked
from this process (see C{bench/_procs.py}). The seed starts first, then all the others as fast as
they can be started. Every node reports its list changes on a pipe with a
CLOCK_MONOTONIC stamp, so nothing polls 100 control APIs. Prints the
start-up time apart from the convergence time, then the CPU the converged
bus spends on its pings over C{--steady} seconds.

Simulation (C{--simulate N}): N nodes in one process on
L{dmq_bus.testing.MemoryNetwork}, on a heap-based clock (L{HeapClock})
rather than C{task.Clock}, which sorts its whole call list on every
C{callLater}. Prints the simulated convergence time, the KDMQ datagrams
each node sends per simulated second over the next ping interval, and the
wall time the simulation took.

    python bench/convergence.py                        # 100 processes
    python bench/convergence.py --nodes 20 --ping-interval 1
    python bench/convergence.py --simulate 1000        # in memory
    python bench/convergence.py --simulate 100,200,500 --clock twisted
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from bench._procs import NodeProcesses, NodeSpec, rssMB, table, writeLine
from dmq_bus.bus.values import MembershipChange, MembershipEvent, NodeStatus
from dmq_bus.testing import MemoryDatagramTransport, MemoryNetwork, MemoryNode
from tests.interop.kamailio import allocatePorts, releasePorts

# -- real processes


def _cpuSeconds(pid: int) -> float:
    """utime + stime of a process (children not included), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runProcesses(args: argparse.Namespace) -> None:
    n: int = args.nodes
    ports = allocatePorts(n)
    active: dict[int, int] = {}
    convergedAt: dict[int, float] = {}
    try:
        with NodeProcesses() as procs:

            def take(reports: Sequence[Any]) -> None:
                for report in reports:
                    port = report.process.spec.port
                    if report.kind == "ready":
                        active.setdefault(port, 1)
                        if n == 1:
                            convergedAt[port] = report.time
                    elif report.kind == "node":
                        count = int(report.fields[3])
                        active[port] = count
                        if count >= n:
                            convergedAt.setdefault(port, report.time)
                        else:
                            convergedAt.pop(port, None)

            def spec(port: int, seeds: tuple[int, ...]) -> NodeSpec:
                return NodeSpec(
                    port, seeds, pingInterval=args.ping_interval, pingTimeout=args.ping_timeout
                )

            seed = procs.start(spec(ports[0], ()))
            take(list(procs.readUntil(lambda: seed.ready is not None, 30.0)))
            if seed.ready is None:
                raise SystemExit("the seed did not start")
            for port in ports[1:]:
                procs.start(spec(port, (ports[0],)))
                take(procs.read(0))
            lastSpawn = time.monotonic()
            procs_ = procs.processes

            def allReady() -> bool:
                return all(p.ready is not None for p in procs_)

            def converged() -> bool:
                return len(convergedAt) == n

            take(list(procs.readUntil(lambda: allReady() and converged(), args.timeout)))
            readies = sorted(p.ready for p in procs_ if p.ready is not None)
            if len(readies) < n:
                raise SystemExit(f"only {len(readies)} of {n} nodes started")
            firstSpawn = procs_[0].spawned
            lastReady = readies[-1]
            firstOtherReady = readies[1] if n > 1 else readies[0]
            done = max(convergedAt.values()) if converged() else None
            rss = [rssMB(p.pid) for p in procs_]
            # steady state: CPU of the converged bus over --steady seconds
            cpu0 = {p.pid: _cpuSeconds(p.pid) for p in procs_}
            wall0 = time.monotonic()
            take(list(procs.readUntil(lambda: False, args.steady)))
            steadyWall = time.monotonic() - wall0
            steadyCPU = sum(_cpuSeconds(p.pid) - cpu0[p.pid] for p in procs_)
            stillConverged = converged()
    finally:
        releasePorts(ports)

    print(
        f"convergence: {n} dmq-bus node processes (forked) on 127.0.0.1 joining one seed, "
        f"ping interval {args.ping_interval:g} s, timeout {args.ping_timeout:g} s"
    )
    rows: list[tuple[str, str]] = [
        ("start-up: first spawn → last node ready", f"{lastReady - firstSpawn:.3f} s"),
        ("  spawning all processes (this side)", f"{lastSpawn - firstSpawn:.3f} s"),
        ("  first non-seed ready → last ready", f"{lastReady - firstOtherReady:.3f} s"),
    ]
    if done is None:
        missing = sorted(p for p in ports if p not in convergedAt)
        counts = sorted(active.get(p, 0) for p in ports)
        rows.append(
            (
                "converged",
                f"NO within {args.timeout:g} s: {len(missing)} nodes short; active listed "
                f"min/median/max {counts[0]}/{counts[n // 2]}/{counts[-1]}",
            )
        )
    else:
        perNode = sorted(convergedAt[p.spec.port] - p.ready for p in procs_ if p.ready is not None)
        rows += [
            ("convergence: last node ready → all list all", f"{max(0.0, done - lastReady):.3f} s"),
            ("convergence: first non-seed ready → all list all", f"{done - firstOtherReady:.3f} s"),
            ("convergence: first spawn → all list all", f"{done - firstSpawn:.3f} s"),
            (
                "per node: own ready → lists all (median / max)",
                f"{perNode[len(perNode) // 2]:.3f} / {perNode[-1]:.3f} s",
            ),
        ]
    rows += [
        ("memory per process (RSS median / max)", f"{sorted(rss)[n // 2]:.1f} / {max(rss):.1f} MB"),
        ("memory, all processes (RSS sum, shared pages counted n times)", f"{sum(rss):.0f} MB"),
        (
            f"steady state: CPU of the whole bus over {steadyWall:.1f} s",
            f"{steadyCPU:.2f} s ({steadyCPU / steadyWall * 100:.0f}% of one core)",
        ),
        ("still all converged at the end", "yes" if stillConverged else "NO"),
    ]
    print(table(("figure", "value"), rows))


# -- simulation


class HeapClock(Clock):
    """
    A L{task.Clock} whose C{callLater} and C{advance} cost O(log n), not
    O(n log n): pending calls are in a heap, and cancelled or rescheduled
    calls are skipped lazily when they come up. Same DelayedCall objects
    (cancel, reset, delay, active all work).
    """

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._sequence = itertools.count()
        self.fired = 0

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        dc = DelayedCall(self.rightNow + delay, callable, args, kw, _noop, self._push, self.seconds)
        self._push(dc)
        return dc

    def _push(self, dc: DelayedCall) -> None:
        heapq.heappush(self._heap, (dc.getTime(), next(self._sequence), dc))

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return [dc for _, _, dc in self._heap if not (dc.cancelled or dc.called)]

    def nextTime(self) -> float | None:
        """When the next pending call is due (None: nothing pending)."""
        heap = self._heap
        while heap:
            when, _, dc = heap[0]
            if dc.cancelled or dc.called:
                heapq.heappop(heap)
            elif dc.getTime() > when:
                heapq.heapreplace(heap, (dc.getTime(), next(self._sequence), dc))
            else:
                return when
        return None

    def runUntil(self, end: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Run every call due up to C{end}, or until C{stop()} after a call."""
        heap = self._heap
        while True:
            when = self.nextTime()
            if when is None or when > end:
                break
            _, _, dc = heapq.heappop(heap)
            if when > self.rightNow:
                self.rightNow = when
            dc.called = 1
            self.fired += 1
            dc.func(*dc.args, **dc.kw)
            if stop():
                return
        self.rightNow = max(self.rightNow, end)

    def advance(self, amount: float) -> None:
        self.runUntil(self.rightNow + amount)


def _noop(dc: DelayedCall) -> None:
    """Cancelling needs no bookkeeping: the heap skips cancelled calls."""


class ActiveCounts:
    """How many nodes each node lists active (itself included), kept up to date."""

    def __init__(self, total: int, clock: Clock) -> None:
        self.total = total
        self.clock = clock
        self.full = 0
        self.convergedAt: float | None = None

    def watch(self, node: MemoryNode) -> None:
        count = [1 + node.bus.nodeList.count(NodeStatus.ACTIVE)]

        def observe(event: MembershipEvent) -> None:
            before = count[0]
            if event.change is MembershipChange.ADDED:
                count[0] += event.node.status is NodeStatus.ACTIVE
            elif event.change is MembershipChange.REMOVED:
                count[0] -= event.node.status is NodeStatus.ACTIVE
            else:
                count[0] += (event.node.status is NodeStatus.ACTIVE) - (
                    event.previous is NodeStatus.ACTIVE
                )
            if before < self.total <= count[0]:
                self.full += 1
            elif count[0] < self.total <= before:
                self.full -= 1
            if self.full == self.total and self.convergedAt is None:
                self.convergedAt = self.clock.seconds()

        if count[0] >= self.total:
            self.full += 1
        node.bus.addMembershipObserver(observe)


def simulate(
    n: int, pingInterval: float, pingTimeout: float, clockKind: str, maxWall: float
) -> dict[str, Any]:
    """
    N nodes joining one seed at simulated time 0 in a L{MemoryNetwork}
    (0.5 ms per datagram), run until all list all N active, then for one
    more ping interval to count the datagrams of the steady state.
    """
    clock: Clock = HeapClock() if clockKind == "heap" else Clock()
    network = MemoryNetwork(clock)
    counts = ActiveCounts(n, clock)
    options: dict[str, Any] = {"pingInterval": pingInterval, "pingTimeout": pingTimeout}
    wall0 = time.perf_counter()
    seed = network.addNode("127.0.0.1", 20000, start=False, **options)
    counts.watch(seed)
    seed.stack.start()
    for i in range(1, n):
        node = network.addNode("127.0.0.1", 20000 + i, seeds=[seed], start=False, **options)
        counts.watch(node)
        node.stack.start()
    wallDeadline = wall0 + maxWall
    timedOut = False
    bound = 4 * pingInterval + 4 * pingTimeout

    def stop() -> bool:
        return counts.convergedAt is not None or time.perf_counter() > wallDeadline

    if isinstance(clock, HeapClock):
        clock.runUntil(bound, stop)
    else:
        step = 0.0005
        while clock.seconds() < bound and not stop():
            clock.advance(step)
    timedOut = counts.convergedAt is None
    convergeWall = time.perf_counter() - wall0
    joinDatagrams = sum(_sent(node) for node in network.nodes)
    steady: float | None = None
    steadyWall = 0.0
    if not timedOut:
        # count over one whole ping round: from mid-interval to mid-interval
        start = (int(clock.seconds() / pingInterval) + 0.5) * pingInterval
        _runTo(clock, start, wallDeadline)
        sentAt = [_sent(node) for node in network.nodes]
        wall1 = time.perf_counter()
        _runTo(clock, start + pingInterval, wallDeadline)
        steadyWall = time.perf_counter() - wall1
        elapsed = clock.seconds() - start
        if elapsed >= pingInterval * 0.999:
            sent = sum(_sent(node) - before for node, before in zip(network.nodes, sentAt))
            steady = sent / n / elapsed
    return {
        "n": n,
        "converged": counts.convergedAt,
        "joinDatagrams": joinDatagrams,
        "steady": steady,
        "convergeWall": convergeWall,
        "steadyWall": steadyWall,
        "timedOut": timedOut,
    }


def _sent(node: MemoryNode) -> int:
    """Datagrams node C{node} has sent so far."""
    return cast(MemoryDatagramTransport, node.protocol.transport).sent


def _runTo(clock: Clock, end: float, wallDeadline: float) -> None:
    """Advance C{clock} to C{end} unless the wall-time bound passes first."""
    if isinstance(clock, HeapClock):
        clock.runUntil(end, lambda: time.perf_counter() > wallDeadline)
    else:
        while clock.seconds() < end and time.perf_counter() <= wallDeadline:
            clock.advance(min(0.0005, end - clock.seconds()))


def runSimulation(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.simulate.split(",")]
    print(
        f"convergence, simulated: nodes joining one seed in a MemoryNetwork "
        f"(0.5 ms per datagram, no loss), ping interval {args.ping_interval:g} s, "
        f"clock {args.clock}, at most {args.max_wall:g} s of wall time per size"
    )
    header = (
        "nodes",
        "converged after (sim)",
        "datagrams to converge",
        "datagrams/node/s after",
        "2(N-1)/interval",
        "wall: join",
        "wall: 1 ping interval",
    )
    widths = [len(h) for h in header]
    print("  ".join(header))
    print("  ".join("-" * w for w in widths), flush=True)
    for n in sizes:
        writeLine(sys.stderr, f"  simulating {n} nodes ...")
        r = simulate(n, args.ping_interval, args.ping_timeout, args.clock, args.max_wall)
        cells = (
            str(n),
            "not converged" if r["timedOut"] else f"{r['converged'] * 1000:.1f} ms",
            f"{r['joinDatagrams']:,}",
            "-" if r["steady"] is None else f"{r['steady']:.1f}",
            f"{2 * (n - 1) / args.ping_interval:.1f}",
            f"{r['convergeWall']:.1f} s",
            "-" if r["steady"] is None else f"{r['steadyWall']:.1f} s",
        )
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ),
            flush=True,
        )
    print(
        "  (simulated time has no CPU cost: a message takes 0.5 ms whatever the load; the wall "
        "times are the CPU the whole bus would spend, on one core)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100, help="node processes (seed included)")
    parser.add_argument("--ping-interval", type=float, default=5.0)
    parser.add_argument("--ping-timeout", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on start + converge")
    parser.add_argument(
        "--steady", type=float, default=None, help="seconds to measure the converged bus's CPU"
    )
    parser.add_argument(
        "--simulate", metavar="N[,N...]", help="in-memory simulation of N nodes instead"
    )
    parser.add_argument("--clock", choices=["heap", "twisted"], default="heap")
    parser.add_argument(
        "--max-wall", type=float, default=900.0, help="wall-time bound per simulated size"
    )
    args = parser.parse_args()
    if args.steady is None:
        args.steady = args.ping_interval
    if args.simulate:
        runSimulation(args)
    else:
        runProcesses(args)


if __name__ == "__main__":
    main()
