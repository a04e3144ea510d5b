"""
Sync on join: a node joins a bus whose seed holds K keys; how long until
it holds all K. dmq-bus (seed and joiner dmq-bus), real Kamailio 5.6.3
(seed and joiner Kamailio) and mixed (a dmq-bus joiner on a Kamailio
seed), in the same run, on 127.0.0.1. Also the memory of a node: idle and
per 100,000 keys (dmq-bus: RSS and PSS of its process; Kamailio: summed
over its processes, PSS being the meaningful figure for a process group
that shares its memory). Last the big sync (C{--big} keys, dmq-bus; then
Kamailio unless C{--no-kamailio-big}), with a check that every chunk went
once.

Times: dmq-bus joiner from its process spawn (includes ~0.3 s of Python
start-up) and from its C{startService} (the join; the sync request
follows within milliseconds); Kamailio joiner from its process spawn.
The joiners report the moment they hold K keys (dmq-bus: the node process
looks at its table size every 2 ms; Kamailio: C{htable.stats} polled every
5 ms over its jsonrpcs datagram socket). The Kamailio seed is loaded with
the C{htbulk} config loop; its htable has 1,024 slots, so loading
1,000,000 keys takes it a minute or more.

    python bench/sync.py                          # 100,000 keys, then 1,000,000
    python bench/sync.py --keys 20000 --big 0     # quick: no big sync
    python bench/sync.py --no-kamailio-big        # skip Kamailio's 1,000,000-key sync
    python bench/sync.py --profile                # + a cProfile of a dmq-bus big sync
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
from typing import NoReturn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (
    BenchError,
    BusNode,
    KamailioRPC,
    allocatePorts,
    cpuSeconds,
    formatTable,
    kamailioAvailable,
    memory,
    releasePorts,
    sipBulk,
    udpRcvbufErrors,
    waitFor,
)
from tests.interop.kamailio import KamailioNode

IDLE_SETTLE = 1.0
"""Seconds a fresh node is left alone before its idle memory is read."""

JOIN_TIMEOUT = 30.0
"""Seconds a joiner may take to list the seed active."""


def _syncTimeout(keys: int) -> float:
    """Seconds allowed for a K-key sync (at least 60; 30 µs per key)."""
    return max(60.0, keys * 30e-6)


def _fillTimeout(keys: int) -> float:
    """Seconds allowed for loading K keys into a seed (at least 60; 100 µs per key)."""
    return max(60.0, keys * 100e-6)


def _mb(size: float) -> str:
    return f"{size / 2**20:.1f}"


def _kamailioStat(rpc: KamailioRPC, name: str) -> int:
    """One statistic C{GROUP:NAME} (C{stats.get_statistics GROUP:}), 0 if absent."""
    group = name.partition(":")[0] + ":"
    for line in rpc.call("stats.get_statistics", group):
        key, _, value = str(line).partition(" = ")
        if key.strip() == name:
            return int(value)
    return 0


class Report:
    """The rows of the result tables, printed as they come and at the end."""

    SYNC_HEADERS = [
        "sync",
        "keys",
        "seconds",
        "from join s",
        "keys/s",
        "seed cpu s",
        "joiner cpu s",
        "seed sent",
        "joiner rcvd",
        "bytes rcvd",
        "retransmits",
        "dropped",
    ]
    MEMORY_HEADERS = ["memory", "idle RSS MB", "idle PSS MB", "keys", "RSS/100k MB", "PSS/100k MB"]

    def __init__(self) -> None:
        self.sync: list[list[object]] = []
        self.memory: list[list[object]] = []
        self.notes: list[str] = []

    def addSync(self, row: list[object]) -> None:
        self.sync.append(row)
        print(formatTable(self.SYNC_HEADERS, [row]).splitlines()[-1], flush=True)

    def addMemory(self, row: list[object]) -> None:
        self.memory.append(row)
        print(formatTable(self.MEMORY_HEADERS, [row]).splitlines()[-1], flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text, flush=True)

    def print(self) -> None:
        print()
        print(formatTable(self.MEMORY_HEADERS, self.memory))
        print()
        print(formatTable(self.SYNC_HEADERS, self.sync))
        if self.notes:
            print()
            for note in self.notes:
                print(note)


def dmqSync(
    keys: int,
    report: Report,
    logDir: str,
    label: str,
    withMemory: bool,
    profiles: tuple[str, str] | None = None,
) -> None:
    """
    A dmq-bus seed loaded with C{keys} keys, then a dmq-bus joiner (with
    C{profiles}: both under cProfile, written to these two files).
    """
    ports = allocatePorts(2)
    seedProfile, joinerProfile = profiles if profiles is not None else (None, None)
    seed = BusNode(ports[0], logDir=logDir, profile=seedProfile)
    joiner = BusNode(
        ports[1], ports[0], logDir=logDir, watch=keys, countBytes=True, profile=joinerProfile
    )
    try:
        seed.start()
        time.sleep(IDLE_SETTLE)
        idle = memory([seed.pid])
        fillStarted = time.monotonic()
        filled = seed.call(f"fill k {keys}", "filled", _fillTimeout(keys))
        loaded = memory([seed.pid])
        report.note(
            f"  ({label}: seed loaded {keys:,} keys in {float(filled[1]):.2f} s, "
            f"wall {time.monotonic() - fillStarted:.2f} s)"
        )
        if withMemory:
            per = 100_000 / keys
            report.addMemory(
                [
                    "dmq-bus",
                    _mb(idle[0]),
                    _mb(idle[1]),
                    f"{keys:,}",
                    _mb((loaded[0] - idle[0]) * per),
                    _mb((loaded[1] - idle[1]) * per),
                ]
            )
        if seedProfile is not None:
            seed.call("profile-restart", "profiling", 5.0)
        seedStats0 = seed.stats()
        seedCPU0 = cpuSeconds([seed.pid])
        dropped0 = udpRcvbufErrors()
        joiner.start()
        reached = float(joiner.expect("reached", _syncTimeout(keys))[1])
        fromSpawn = reached - joiner.spawnedAt
        fromJoin = reached - joiner.startedAt
        time.sleep(0.2)
        joinerCPU = cpuSeconds([joiner.pid])
        seedCPU = cpuSeconds([seed.pid]) - seedCPU0
        dropped = udpRcvbufErrors() - dropped0
        seedStats = seed.stats()
        joinerStats = joiner.stats()
        chunksSent = seedStats.get("htable.sync.chunks_sent", 0) - seedStats0.get(
            "htable.sync.chunks_sent", 0
        )
        retransmissions = seedStats.get("client.retransmissions", 0) - seedStats0.get(
            "client.retransmissions", 0
        )
        chunksReceived = joinerStats.get("htable.sync.chunks_received", 0)
        report.addSync(
            [
                label,
                f"{keys:,}",
                f"{fromSpawn:.3f}",
                f"{fromJoin:.3f}",
                f"{keys / fromJoin:,.0f}",
                f"{seedCPU:.2f}",
                f"{joinerCPU:.2f}",
                f"{chunksSent:,}",
                f"{joinerStats.get('datagrams.udp_received', 0):,}",
                f"{joinerStats.get('bytes.udp_received', 0):,}",
                f"{retransmissions}",
                f"{dropped}",
            ]
        )
        once = chunksSent == chunksReceived and retransmissions == 0
        report.note(
            f"  ({label}: seed sent {chunksSent} sync chunks, joiner received "
            f"{chunksReceived}; seed retransmissions {retransmissions}: "
            f"{'each chunk sent once' if once else 'NOT each chunk once'}; "
            f"joiner CPU includes its start-up)"
        )
    finally:
        joiner.stop()
        seed.stop()
        releasePorts(ports)


def kamailioSync(
    keys: int,
    report: Report,
    logDir: str,
    label: str,
    withMemory: bool,
    withMixed: bool,
    shmMB: int,
) -> None:
    """
    A Kamailio seed loaded with C{keys} keys (htbulk, alone on its bus); a
    dmq-bus joiner (mixed, then it leaves); then a Kamailio joiner.
    """
    ports = allocatePorts(3)
    base = tempfile.mkdtemp(prefix="dmqb-")
    seed = KamailioNode(ports[0], baseDir=base, shmMB=shmMB)
    joiner = KamailioNode(ports[1], ports[0], baseDir=base, shmMB=shmMB)
    rpcs: list[KamailioRPC] = []
    try:
        seed.start()
        seedRPC = KamailioRPC(seed)
        rpcs.append(seedRPC)
        time.sleep(IDLE_SETTLE)
        idle = memory(seed.livePids())
        started = sipBulk(ports[0], "k", keys, _fillTimeout(keys))
        report.note(
            f"  ({label}: seed loaded {keys:,} keys in {time.monotonic() - started:.2f} s "
            "by htbulk)"
        )
        if seedRPC.keys() != keys:
            raise BenchError(f"kamailio seed holds {seedRPC.keys()} keys, not {keys}")
        loaded = memory(seed.livePids())
        if withMemory:
            per = 100_000 / keys
            report.addMemory(
                [
                    f"kamailio ({len(seed.livePids())} processes)",
                    _mb(idle[0]),
                    _mb(idle[1]),
                    f"{keys:,}",
                    _mb((loaded[0] - idle[0]) * per),
                    _mb((loaded[1] - idle[1]) * per),
                ]
            )

        if withMixed:
            mixed = BusNode(ports[2], ports[0], logDir=logDir, watch=keys, countBytes=True)
            try:
                seedCPU0 = cpuSeconds(seed.livePids())
                sent0 = seedRPC.tmCreated()
                dropped0 = udpRcvbufErrors()
                mixed.start()
                reached = float(mixed.expect("reached", _syncTimeout(keys))[1])
                time.sleep(0.2)
                stats = mixed.stats()
                mixedStats = stats
                report.addSync(
                    [
                        f"mixed: dmq-bus joins kamailio{label[len('kamailio') :]}",
                        f"{keys:,}",
                        f"{reached - mixed.spawnedAt:.3f}",
                        f"{reached - mixed.startedAt:.3f}",
                        f"{keys / (reached - mixed.startedAt):,.0f}",
                        f"{cpuSeconds(seed.livePids()) - seedCPU0:.2f}",
                        f"{cpuSeconds([mixed.pid]):.2f}",
                        f"{seedRPC.tmCreated() - sent0:,}",
                        f"{stats.get('datagrams.udp_received', 0):,}",
                        f"{stats.get('bytes.udp_received', 0):,}",
                        "-",
                        f"{udpRcvbufErrors() - dropped0}",
                    ]
                )
                report.note(
                    f"  (mixed: joiner sent {mixedStats.get('htable.sync.requests_sent', 0)} "
                    f"sync request(s), retransmitted requests "
                    f"{mixedStats.get('client.retransmissions', 0)} time(s); got "
                    f"{mixedStats.get('htable.sync.chunks_received', 0)} sync chunks; the "
                    "Kamailio seed sends every chunk at once)"
                )
            finally:
                mixed.stop()
            # the seed takes the leave at once; the Kamailio joiner must
            # find only the seed active, not ask a node that is gone
            waitFor(lambda: seedRPC.activeNodes() == 0, JOIN_TIMEOUT, "the seed to drop dmq-bus")

        seedCPU0 = cpuSeconds(seed.livePids())
        sent0 = seedRPC.tmCreated()
        dropped0 = udpRcvbufErrors()
        spawned = time.monotonic()
        joiner.start()
        joinerRPC = KamailioRPC(joiner)
        rpcs.append(joinerRPC)
        reachedAt = waitFor(
            lambda: joinerRPC.keys() >= keys,
            _syncTimeout(keys),
            f"the Kamailio joiner to hold {keys} keys",
        )
        time.sleep(0.2)
        received = _kamailioStat(joinerRPC, "core:rcv_requests")
        report.addSync(
            [
                label,
                f"{keys:,}",
                f"{reachedAt - spawned:.3f}",
                "-",
                f"{keys / (reachedAt - spawned):,.0f}",
                f"{cpuSeconds(seed.livePids()) - seedCPU0:.2f}",
                f"{cpuSeconds(joiner.livePids()):.2f}",
                f"{seedRPC.tmCreated() - sent0:,}",
                f"{received:,}",
                "-",
                "-",
                f"{udpRcvbufErrors() - dropped0}",
            ]
        )
    except BenchError as e:
        raise BenchError(f"{e} (Kamailio logs under {base})") from None
    finally:
        for rpc in rpcs:
            rpc.close()
        joiner.stop()
        seed.stop()
        releasePorts(ports)
        shutil.rmtree(base, ignore_errors=True)


def _terminate(signum: int, frame: object) -> NoReturn:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys on the seed")
    parser.add_argument(
        "--big", type=int, default=1_000_000, help="keys of the big sync (0: skip it)"
    )
    parser.add_argument("--no-kamailio", action="store_true", help="dmq-bus only")
    parser.add_argument("--no-mixed", action="store_true", help="skip dmq-bus joining Kamailio")
    parser.add_argument("--no-kamailio-big", action="store_true", help="skip Kamailio's big sync")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more dmq-bus big sync (not counted) with seed and joiner under cProfile",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    withKamailio = not args.no_kamailio and kamailioAvailable()
    if not withKamailio and not args.no_kamailio:
        print("!" * 78)
        print("!!! KAMAILIO NOT INSTALLED: running dmq-bus only, no comparison !!!")
        print("!" * 78)
    logDir = tempfile.mkdtemp(prefix="dmqb-logs-")
    print(
        f"sync on join: seed holds {args.keys:,} keys (big: {args.big:,}); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; node logs in {logDir}"
    )
    print(
        "seed sent: sync chunks (dmq-bus seed) or KDMQ requests (Kamailio seed, tm "
        "transactions, all channels); joiner rcvd/bytes rcvd: datagrams and bytes a dmq-bus "
        "joiner received (all channels), requests a Kamailio joiner received "
        "(core:rcv_requests); retransmits: the dmq-bus seed's; dropped: UDP RcvbufErrors "
        "(machine-wide); seconds: from the joiner's process spawn; from join: from a dmq-bus "
        "joiner's startService"
    )
    report = Report()
    try:
        dmqSync(args.keys, report, logDir, "dmq-bus", withMemory=True)
        if withKamailio:
            kamailioSync(
                args.keys,
                report,
                logDir,
                "kamailio",
                withMemory=True,
                withMixed=not args.no_mixed,
                shmMB=256,
            )
        if args.big:
            dmqSync(args.big, report, logDir, "dmq-bus big", withMemory=False)
            if withKamailio and not args.no_kamailio_big:
                try:
                    kamailioSync(
                        args.big,
                        report,
                        logDir,
                        "kamailio big",
                        withMemory=False,
                        withMixed=False,
                        shmMB=1024,
                    )
                except BenchError as e:
                    report.note(f"  (kamailio big sync did not complete: {e})")
    except BenchError as e:
        report.print()
        raise SystemExit(f"sync benchmark failed: {e} (dmq-bus node logs in {logDir})") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted; every node was stopped") from None
    report.print()
    if args.profile:
        profiles = (os.path.join(logDir, "seed.prof"), os.path.join(logDir, "joiner.prof"))
        keys = args.big or args.keys
        print()
        print(f"profiled dmq-bus sync of {keys:,} keys (not counted):")
        try:
            dmqSync(keys, Report(), logDir, "dmq-bus profiled", False, profiles)
        except BenchError as e:
            raise SystemExit(f"profiled sync failed: {e}") from None
        for name, path, what in zip(
            ("seed", "joiner"), profiles, ("from the end of its fill", "whole life")
        ):
            print()
            print(f"cProfile of the dmq-bus {name} process, by tottime ({what}):")
            pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    shutil.rmtree(logDir, ignore_errors=True)
    if not withKamailio and not args.no_kamailio:
        print()
        print("kamailio: n/a (kamailio not installed)")


if __name__ == "__main__":
    main()
