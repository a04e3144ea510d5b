"""
KDMQ request/response transactions per second between processes on loopback.

One sender process keeps a window of requests outstanding to one or more
receiver processes (each a dmq-bus node with the echo peer); every request
is a full client transaction (Via, branch, timers) answered by a server
transaction on the receiver. Prints transactions/s and CPU seconds per process.

    python bench/transactions.py                 # 1 receiver, 100,000 requests
    python bench/transactions.py --receivers 2   # the replication shape: 2 targets
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BODY = b'{"action":2,"htname":"kv","cname":"key-000001","type":2,"strval":"value-000001","mode":1}'


def freePort() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port: int = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def receiver(port: int) -> None:
    """Run a dmq-bus node with the echo peer until SIGTERM."""
    from twisted.internet import reactor

    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.peers.echo import EchoPeer
    from dmq_bus.service import DMQService, NodeConfig
    from dmq_bus.sip.uri import SIPURI

    service = DMQService(
        NodeConfig(bus=BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}"))), reactor
    )
    service.bus.registerPeer(EchoPeer("htable"))
    service.startService()

    def report() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        sys.stdout.write(f"cpu {usage.ru_utime + usage.ru_stime:.3f}\n")
        sys.stdout.flush()

    reactor.addSystemEventTrigger("before", "shutdown", report)  # type: ignore[attr-defined]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


def sender(
    ports: list[int], count: int, window: int, transport: str, profile: bool = False
) -> dict[str, Any]:
    """Send C{count} requests spread over the receivers, C{window} at a time."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.bus.values import Node, NodeStatus
    from dmq_bus.service import DMQService, NodeConfig
    from dmq_bus.sip.uri import SIPURI

    myPort = freePort()
    suffix = ";transport=tcp" if transport == "tcp" else ""
    service = DMQService(
        NodeConfig(bus=BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{myPort}"))), reactor
    )
    service.startService()
    targets = [
        Node.fromURI(SIPURI.parse(f"sip:127.0.0.1:{p}{suffix}"), NodeStatus.ACTIVE) for p in ports
    ]
    bus = service.bus
    counts = {"sent": 0, "done": 0, "failed": 0}
    codes: dict[int, int] = {}
    finished: Deferred[None] = Deferred()

    def sendOne() -> None:
        target = targets[counts["sent"] % len(targets)]
        counts["sent"] += 1
        bus.send("htable", target, BODY, "application/json").addCallbacks(ok, bad)

    def ok(delivery: Any) -> None:
        codes[delivery.code] = codes.get(delivery.code, 0) + 1
        next_()

    def bad(failure: Any) -> None:
        counts["failed"] += 1
        next_()

    def next_() -> None:
        counts["done"] += 1
        if counts["sent"] < count:
            sendOne()
        elif counts["done"] == count and not finished.called:
            finished.callback(None)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()

    def begin() -> None:
        for _ in range(min(window, count)):
            sendOne()

    reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
    finished.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    reactor.run()  # type: ignore[attr-defined]
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    elapsed = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stats = service.stack.stats()
    return {
        "elapsed": elapsed,
        "rate": count / elapsed,
        "failed": counts["failed"],
        "codes": codes,
        "cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "retransmissions": stats.get("client.retransmissions", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="requests to send")
    parser.add_argument("--window", type=int, default=200, help="requests outstanding at once")
    parser.add_argument("--receivers", type=int, default=1, help="receiver processes")
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument("--profile", action="store_true", help="cProfile the sender")
    parser.add_argument(
        "--role", choices=["main", "receiver"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        receiver(args.port)
        return
    ports = [freePort() for _ in range(args.receivers)]
    procs = []
    try:
        for port in ports:
            proc = subprocess.Popen(
                [sys.executable, __file__, "--role", "receiver", "--port", str(port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("receiver did not start")
        result = sender(ports, args.count, args.window, args.transport, args.profile)
    finally:
        cpus: list[float] = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
            cpus.extend(
                float(line.split()[1]) for line in out.splitlines() if line.startswith("cpu")
            )
    print(
        f"transactions: {args.count} over {args.transport} to {args.receivers} receiver(s), "
        f"window {args.window}"
    )
    print(f"  rate            {result['rate']:10.0f} transactions/s")
    print(f"  elapsed         {result['elapsed']:10.3f} s")
    print(
        f"  sender cpu      {result['cpu']:10.3f} s ({result['cpu'] / args.count * 1e6:.1f} µs/transaction)"
    )
    for i, cpu in enumerate(cpus):
        print(f"  receiver{i} cpu   {cpu:10.3f} s (whole process life)")
    print(f"  responses       {result['codes']}  failed {result['failed']}")
    print(f"  retransmissions {result['retransmissions']}")


if __name__ == "__main__":
    main()
