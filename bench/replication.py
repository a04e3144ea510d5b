"""
Replicated sets per second: one node of a 3-node bus sets N keys from
inside its own process, replicated to the other two; timed from the first
set until BOTH receivers hold all N keys. dmq-bus and real Kamailio 5.6.3,
in alternating runs (a fresh bus for every run), on 127.0.0.1.

  - dmq-bus: three node processes (C{bench/common.py node}); the writer gets
    C{write PREFIX N BATCH WINDOW} on its stdin and runs
    C{table.set(f"k{i}", f"v{i}")} in a loop, BATCH sets per reactor turn
    (answers are read between turns, as Kamailio's other processes read
    them while its worker loops), a turn put off while more than WINDOW
    client transactions are open. Each receiver reports the moment its
    table holds N keys.
  - Kamailio: three nodes (C{tests/interop/kamailio-node.cfg}); one SIP
    C{MESSAGE sip:htbulk@...} makes node 1 loop N times over
    C{$sht(kv=>k<i>) = "v<i>"} in its config; the receivers' C{htable.stats}
    are polled every 5 ms over the jsonrpcs datagram socket.

Per run: sets/s, CPU seconds of the writer and of each receiver (Kamailio:
summed over the node's processes), datagrams the kernel dropped for a full
receive buffer (C{RcvbufErrors} of /proc/net/snmp, machine-wide) and
dmq-bus retransmissions. Then medians, and last the line
C{ratio dmq-bus/kamailio: X.XX} (median sets/s over median sets/s).

    python bench/replication.py                 # N=20000, 3 runs of each
    python bench/replication.py --n 5000 --runs 5
    python bench/replication.py --profile       # + a cProfile of the dmq-bus writer (extra run)
"""

from __future__ import annotations

import argparse
import math
import os
import pstats
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, NoReturn

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (
    BenchError,
    BusNode,
    KamailioRPC,
    allocatePorts,
    cpuSeconds,
    formatTable,
    kamailioAvailable,
    median,
    releasePorts,
    sipBulk,
    udpRcvbufErrors,
    waitFor,
)
from tests.interop.kamailio import KamailioNode

BUS_TIMEOUT = 30.0
"""Seconds for three fresh nodes to list each other active."""

SETTLE = 0.5
"""Seconds to let the last answers land before CPU times are read."""


@attrs.frozen
class Run:
    """One measured run."""

    index: int
    system: str
    n: int
    elapsed: float
    cpu: tuple[float, float, float]
    dropped: int
    retransmissions: int | None = None

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


def _replicationTimeout(n: int) -> float:
    """Seconds allowed for N replicated sets (20 times Kamailio's pace, at least 60)."""
    return max(60.0, n / 350.0)


def dmqRun(n: int, batch: int, window: int, logDir: str, profile: str | None) -> Run:
    """One dmq-bus run on a fresh 3-node bus."""
    ports = allocatePorts(3)
    writer = BusNode(ports[0], logDir=logDir, profile=profile)
    receivers = [BusNode(p, ports[0], logDir=logDir) for p in ports[1:]]
    nodes = [writer, *receivers]
    try:
        for node in nodes:
            node.start()
        waitFor(
            lambda: all(node.activeNodes() == 2 for node in nodes),
            BUS_TIMEOUT,
            "3 dmq-bus nodes to list each other active",
            0.05,
        )
        for node in receivers:
            node.send(f"watch {n}")
        pids = [node.pid for node in nodes]
        cpu0 = [cpuSeconds([pid]) for pid in pids]
        dropped0 = udpRcvbufErrors()
        writer.send(f"write k {n} {batch} {window}")
        timeout = _replicationTimeout(n)
        written = writer.expect("written", timeout)
        reached = [float(node.expect("reached", timeout)[1]) for node in receivers]
        elapsed = max(reached) - float(written[0])
        if int(written[2]):
            raise BenchError(f"dmq-bus writer: {written[2]} sets refused")
        time.sleep(SETTLE)
        cpu1 = [cpuSeconds([pid]) for pid in pids]
        dropped = udpRcvbufErrors() - dropped0
        retransmissions = writer.stats().get("client.retransmissions", 0)
        cpu = tuple(b - a for a, b in zip(cpu0, cpu1))
        return Run(0, "dmq-bus", n, elapsed, (cpu[0], cpu[1], cpu[2]), dropped, retransmissions)
    finally:
        for node in nodes:
            node.stop()
        releasePorts(ports)


def kamailioShm(n: int) -> int:
    """MB of shm for a writer of N sets: tm keeps ~9 KB per KDMQ for ~5 s."""
    return max(256, 128 + math.ceil(n * 2 * 12 / 1024))


def kamailioRun(n: int) -> Run:
    """One Kamailio run on a fresh 3-node bus."""
    ports = allocatePorts(3)
    base = tempfile.mkdtemp(prefix="dmqb-")
    shm = kamailioShm(n)
    nodes = [
        KamailioNode(ports[0], baseDir=base, shmMB=shm),
        *(KamailioNode(p, ports[0], baseDir=base, shmMB=256) for p in ports[1:]),
    ]
    rpcs: list[KamailioRPC] = []
    try:
        for node in nodes:
            node.start()
        rpcs = [KamailioRPC(node) for node in nodes]
        waitFor(
            lambda: all(rpc.activeNodes() == 2 for rpc in rpcs),
            BUS_TIMEOUT,
            "3 Kamailio nodes to list each other active",
            0.1,
        )
        groups = [node.livePids() for node in nodes]
        cpu0 = [cpuSeconds(pids) for pids in groups]
        dropped0 = udpRcvbufErrors()
        timeout = _replicationTimeout(n)
        outcome: dict[str, Any] = {}

        def trigger() -> None:
            try:
                outcome["start"] = sipBulk(ports[0], "k", n, timeout)
            except BaseException as e:
                outcome["error"] = e

        thread = threading.Thread(target=trigger, daemon=True)
        before = time.monotonic()
        thread.start()
        reached: list[float] = []
        for rpc in rpcs[1:]:
            reached.append(
                waitFor(
                    lambda rpc=rpc: rpc.keys() >= n,
                    timeout,
                    f"a Kamailio receiver to hold {n} keys",
                )  # type: ignore[misc]
            )
        thread.join(timeout)
        if "error" in outcome:
            raise outcome["error"]
        elapsed = max(reached) - outcome.get("start", before)
        time.sleep(SETTLE)
        cpu1 = [cpuSeconds(pids) for pids in groups]
        dropped = udpRcvbufErrors() - dropped0
        cpu = tuple(b - a for a, b in zip(cpu0, cpu1))
        return Run(0, "kamailio", n, elapsed, (cpu[0], cpu[1], cpu[2]), dropped)
    except BenchError as e:
        raise BenchError(f"{e} (Kamailio logs under {base})") from None
    finally:
        for rpc in rpcs:
            rpc.close()
        for node in nodes:
            node.stop()
        releasePorts(ports)
        shutil.rmtree(base, ignore_errors=True)


def _row(run: Run) -> list[object]:
    return [
        f"{run.index}",
        run.system,
        f"{run.rate:,.0f}",
        f"{run.elapsed:.3f}",
        f"{run.cpu[0]:.2f}",
        f"{run.cpu[1]:.2f}",
        f"{run.cpu[2]:.2f}",
        f"{1e6 * run.cpu[0] / run.n:.0f}",
        f"{1e6 * sum(run.cpu) / run.n:.0f}",
        f"{run.dropped}",
        "-" if run.retransmissions is None else f"{run.retransmissions}",
    ]


HEADERS = [
    "run",
    "system",
    "sets/s",
    "seconds",
    "writer cpu s",
    "recv1 cpu s",
    "recv2 cpu s",
    "writer µs/set",
    "all µs/set",
    "dropped",
    "retransmits",
]


def _terminate(signum: int, frame: object) -> NoReturn:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="keys to set per run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each system")
    parser.add_argument("--batch", type=int, default=100, help="dmq-bus sets per reactor turn")
    parser.add_argument(
        "--window", type=int, default=1000, help="dmq-bus: most open client transactions"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more dmq-bus run (not counted) with the writer under cProfile; print the top",
    )
    parser.add_argument(
        "--no-kamailio", action="store_true", help="run dmq-bus only (no comparison)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    withKamailio = not args.no_kamailio and kamailioAvailable()
    if not withKamailio and not args.no_kamailio:
        print("!" * 78)
        print("!!! KAMAILIO NOT INSTALLED: running dmq-bus only, no comparison !!!")
        print("!" * 78)
    logDir = tempfile.mkdtemp(prefix="dmqb-logs-")
    profilePath = os.path.join(logDir, "writer.prof") if args.profile else None
    print(
        f"replication: {args.n} sets on node 1 of a 3-node bus, until both other nodes "
        f"hold them; {args.runs} run(s) each, alternating; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"dmq-bus writer: {args.batch} sets per reactor turn, at most {args.window} open "
        f"transactions; Kamailio: htbulk in-config loop, writer shm "
        f"{kamailioShm(args.n)} MB; node logs in {logDir}"
    )
    print(
        "cpu: CPU seconds of each node during the run (Kamailio: all its processes); "
        "all µs/set: CPU of the three nodes per set; dropped: UDP RcvbufErrors "
        "(machine-wide); retransmits: the dmq-bus writer's"
    )
    print(formatTable(HEADERS, []), flush=True)
    runs: list[Run] = []
    try:
        for i in range(args.runs):
            for system in ("dmq-bus", "kamailio") if withKamailio else ("dmq-bus",):
                if system == "dmq-bus":
                    run = dmqRun(args.n, args.batch, args.window, logDir, None)
                else:
                    run = kamailioRun(args.n)
                run = attrs.evolve(run, index=i + 1)
                runs.append(run)
                print(formatTable(HEADERS, [_row(run)]).splitlines()[-1], flush=True)
        if profilePath is not None:
            profiled = dmqRun(args.n, args.batch, args.window, logDir, profilePath)
            print(
                f"(profiled dmq-bus run, not counted: {profiled.rate:,.0f} sets/s, "
                f"writer cpu {profiled.cpu[0]:.2f} s)",
                flush=True,
            )
    except BenchError as e:
        raise SystemExit(
            f"replication benchmark failed: {e} (dmq-bus node logs in {logDir})"
        ) from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; every node was stopped") from None

    print()
    print(formatTable(HEADERS, [_row(r) for r in runs]))
    print()
    medians = []
    for system in ("dmq-bus", "kamailio"):
        mine = [r for r in runs if r.system == system]
        if not mine:
            continue
        medians.append(
            [
                system,
                f"{median([r.rate for r in mine]):,.0f}",
                f"{median([r.cpu[0] for r in mine]):.2f}",
                f"{median([r.cpu[1] for r in mine]):.2f}",
                f"{median([r.cpu[2] for r in mine]):.2f}",
                f"{median([1e6 * r.cpu[0] / r.n for r in mine]):.0f}",
                f"{median([1e6 * sum(r.cpu) / r.n for r in mine]):.0f}",
                f"{median([r.dropped for r in mine]):.0f}",
            ]
        )
    print(
        formatTable(
            [
                "median",
                "sets/s",
                "writer cpu s",
                "recv1 cpu s",
                "recv2 cpu s",
                "writer µs/set",
                "all µs/set",
                "dropped",
            ],
            medians,
        )
    )
    if profilePath is not None and os.path.exists(profilePath):
        print()
        print("cProfile of the dmq-bus writer process (the extra run, whole life), by tottime:")
        pstats.Stats(profilePath, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    shutil.rmtree(logDir, ignore_errors=True)
    print()
    if withKamailio:
        dmq = median([r.rate for r in runs if r.system == "dmq-bus"])
        kam = median([r.rate for r in runs if r.system == "kamailio"])
        print(f"ratio dmq-bus/kamailio: {dmq / kam:.2f}")
    elif args.no_kamailio:
        print("ratio dmq-bus/kamailio: n/a (kamailio not run: --no-kamailio)")
    else:
        print("ratio dmq-bus/kamailio: n/a (kamailio not installed)")


if __name__ == "__main__":
    main()
