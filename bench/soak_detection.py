"""
Failure detection between dmq-bus nodes (L{dmq_bus.bus.health}) on the
in-memory network, in simulated time: how fast a crash is seen, whether
packet loss ever gets a live node marked, and how many datagrams each
node sends per second as the bus grows.

    python bench/soak_detection.py                     # all three, defaults
    python bench/soak_detection.py soak --minutes 10 --loss 0.05 --nodes 5
    python bench/soak_detection.py detect --nodes 5,20 --crashes 20
    python bench/soak_detection.py load --nodes 5,20,50

Every run is repeatable (C{--seed}); wall times are printed for each part.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmq_bus.bus.values import MembershipChange, MembershipEvent, NodeStatus
from dmq_bus.testing import MemoryDatagramTransport, MemoryNetwork, MemoryNode


def sentBy(node: MemoryNode) -> int:
    """Datagrams the node has sent so far."""
    transport = node.protocol.transport
    assert isinstance(transport, MemoryDatagramTransport)
    return transport.sent


def buildBus(
    nodes: int, *, loss: float = 0.0, seed: int = 0, settle: float = 15.0
) -> tuple[MemoryNetwork, list[MemoryNode]]:
    """C{nodes} nodes joined through the first, default settings, run C{settle} s."""
    network = MemoryNetwork(loss=loss, seed=seed)
    first = network.addNode("127.0.0.1")
    members = [first] + [
        network.addNode(f"127.0.{i // 250}.{i % 250 + 1}", seeds=[first]) for i in range(1, nodes)
    ]
    network.run(settle)
    return network, members


def detectionTimes(network: MemoryNetwork, members: list[MemoryNode], victim: MemoryNode) -> float:
    """Crash C{victim}; seconds until the last survivor no longer lists it active."""
    start = network.clock.seconds()
    victim.crash()
    pending = {m.uri for m in members if m is not victim}
    latest = 0.0
    while pending and network.clock.seconds() - start < 30.0:
        network.run(0.01)
        for m in members:
            if m.uri in pending and m.statuses().get(victim.uri) != "active":
                pending.discard(m.uri)
                latest = network.clock.seconds() - start
    return latest if not pending else float("inf")


def detect(sizes: Sequence[int], crashes: int, seed: int) -> None:
    """Crash one node at a different phase each time; worst and mean detection."""
    for size in sizes:
        began = time.monotonic()
        times = []
        for i in range(crashes):
            network, members = buildBus(size, seed=seed + i, settle=15.0 + i * 0.037)
            times.append(detectionTimes(network, members, members[1 + i % (size - 1)]))
        print(
            f"detect: {size} nodes, {crashes} crashes: worst {max(times):.2f} s, "
            f"mean {sum(times) / len(times):.2f} s (wall {time.monotonic() - began:.1f} s)"
        )


def soak(nodes: int, minutes: float, loss: float, seed: int) -> int:
    """Run a bus at C{loss} for C{minutes}; return how many times a live node was marked."""
    began = time.monotonic()
    network, members = buildBus(nodes, loss=loss, seed=seed)
    falsePositives: list[str] = []

    def watch(observer: MemoryNode) -> None:
        def seen(event: MembershipEvent) -> None:
            if event.change is MembershipChange.REMOVED or (
                event.change is MembershipChange.STATUS
                and event.node.status is not NodeStatus.ACTIVE
            ):
                falsePositives.append(f"{observer.uri} saw {event.node.uri} {event.change.value}")

        observer.bus.addMembershipObserver(seen)

    for m in members:
        watch(m)
    network.run(minutes * 60.0)
    health = [m.stack.notification.health.counters for m in members]
    print(
        f"soak: {nodes} nodes, {minutes:g} min at {loss:.0%} loss: "
        f"{len(falsePositives)} false positives; "
        f"suspicions {sum(c['health.suspicions'] for c in health)}, "
        f"refuted {sum(c['health.suspicions_refuted'] for c in health)}, "
        f"indirect rounds {sum(c['health.indirect_rounds'] for c in health)}; "
        f"{network.delivered} datagrams delivered, {network.dropped} lost "
        f"(wall {time.monotonic() - began:.1f} s)"
    )
    for line in falsePositives[:10]:
        print("  ", line)
    return len(falsePositives)


def load(sizes: Sequence[int], seconds: float) -> None:
    """Datagrams sent per node per second once the bus settled."""
    for size in sizes:
        began = time.monotonic()
        network, members = buildBus(size, settle=20.0)
        before = [sentBy(m) for m in members]
        network.run(seconds)
        rates = [(sentBy(m) - b) / seconds for m, b in zip(members, before)]
        print(
            f"load: {size} nodes: datagrams sent per node per second: "
            f"max {max(rates):.2f}, mean {sum(rates) / len(rates):.2f} "
            f"(wall {time.monotonic() - began:.1f} s)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("part", nargs="?", choices=["all", "detect", "soak", "load"], default="all")
    parser.add_argument("--nodes", default=None, help="node count(s), comma-separated")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (simulated)")
    parser.add_argument("--loss", type=float, default=0.05, help="soak packet loss")
    parser.add_argument("--crashes", type=int, default=10, help="crashes per size (detect)")
    parser.add_argument("--seconds", type=float, default=60.0, help="load window (simulated)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")] if args.nodes else None
    failed = 0
    if args.part in ("all", "detect"):
        detect(sizes or [5, 20], args.crashes, args.seed)
    if args.part in ("all", "soak"):
        failed += soak((sizes or [5])[0], args.minutes, args.loss, args.seed)
    if args.part in ("all", "load"):
        load(sizes or [5, 20, 50], args.seconds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
