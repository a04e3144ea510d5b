"""
Round-trip latency of KDMQ messages between two dmq-bus node processes on
127.0.0.1, at fixed rates, open loop.

The receiver is a node process with the echo peer (channel C{echo}). This
process is the sender: a dmq-bus node that sends on the reactor's clock,
every millisecond as many messages as are due at the rate (so at 5,000/s
about 5 per tick), never waiting for answers. Each message is timed with
C{time.perf_counter()} from just before C{bus.send} to the callback of its
Deferred: the sender's SIP stack, loopback, the receiver's stack and peer,
and back. After a warm-up (not counted), each rate runs for C{--duration}
seconds; messages not answered within C{--drain} seconds after the last
send, or that failed, count as lost.

    python bench/latency.py                          # 1,000/s and 5,000/s, 10 s each
    python bench/latency.py --rates 500,1000,2000,5000 --duration 5
    python bench/latency.py --transport tcp
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._procs import NodeProcesses, NodeSpec, percentile, table, writeLine
from tests.interop.kamailio import allocatePorts, releasePorts

BODY = b'{"action":2,"htname":"kv","cname":"key-000001","type":2,"strval":"value-000001","mode":1}'
TICK = 0.001
"""Seconds between the sender's pacing ticks (epoll waits in whole milliseconds)."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _processCPU(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sender:
    """The sending node and its open-loop pacing."""

    def __init__(self, port: int, target: int, transport: str, receiverPid: int) -> None:
        from twisted.internet import reactor

        from dmq_bus.bus.dispatch import BusConfig
        from dmq_bus.bus.values import Node, NodeStatus
        from dmq_bus.service import DMQService, NodeConfig
        from dmq_bus.sip.uri import SIPURI

        self.reactor: Any = reactor
        suffix = ";transport=tcp" if transport == "tcp" else ""
        self.service = DMQService(
            NodeConfig(bus=BusConfig(serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}"))),
            reactor,
        )
        self.target = Node.fromURI(
            SIPURI.parse(f"sip:127.0.0.1:{target}{suffix}"), NodeStatus.ACTIVE
        )
        self.receiverPid = receiverPid
        self.latencies: list[float] = []
        self.outstanding = 0
        self.failed = 0
        self.codes: dict[int, int] = {}

    def _sendOne(self, record: bool) -> None:
        sentAt = time.perf_counter()
        self.outstanding += 1
        d = self.service.bus.send("echo", self.target, BODY, "application/json")
        d.addCallbacks(self._answered, self._failed, callbackArgs=(sentAt, record))

    def _answered(self, delivery: Any, sentAt: float, record: bool) -> None:
        now = time.perf_counter()
        self.outstanding -= 1
        if record:
            self.latencies.append(now - sentAt)
            self.codes[delivery.code] = self.codes.get(delivery.code, 0) + 1

    def _failed(self, failure: Any) -> None:
        self.outstanding -= 1
        self.failed += 1

    async def pace(self, rate: float, duration: float, record: bool) -> int:
        """Send at C{rate} for C{duration} seconds; how many were sent."""
        from twisted.internet.task import deferLater

        start = time.perf_counter()
        sent = 0
        while True:
            elapsed = time.perf_counter() - start
            due = min(int(elapsed * rate), int(duration * rate)) - sent
            for _ in range(due):
                self._sendOne(record)
            sent += due
            if elapsed >= duration:
                return sent
            await deferLater(self.reactor, TICK, lambda: None)

    async def measure(
        self, rate: float, duration: float, warmup: float, drain: float
    ) -> dict[str, Any]:
        from twisted.internet.task import deferLater

        if warmup > 0:
            await self.pace(rate, warmup, record=False)
        self.latencies = []
        self.failed = 0
        self.codes = {}
        stats0 = self.service.stack.stats()
        cpu0, receiver0, wall0 = _cpu(), _processCPU(self.receiverPid), time.perf_counter()
        sent = await self.pace(rate, duration, record=True)
        sendWall = time.perf_counter() - wall0
        cpu1, receiver1 = _cpu(), _processCPU(self.receiverPid)
        deadline = time.perf_counter() + drain
        while self.outstanding and time.perf_counter() < deadline:
            await deferLater(self.reactor, 0.01, lambda: None)
        stats1 = self.service.stack.stats()
        answered = len(self.latencies)
        latencies = sorted(self.latencies)
        return {
            "rate": rate,
            "sent": sent,
            "achieved": sent / sendWall,
            "answered": answered,
            "lost": sent - answered,
            "failed": self.failed,
            "p50": percentile(latencies, 0.50),
            "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999),
            "max": latencies[-1] if latencies else float("nan"),
            "over2ms": sum(1 for x in latencies if x > 0.002),
            "retransmissions": stats1.get("client.retransmissions", 0)
            - stats0.get("client.retransmissions", 0),
            "senderCPU": (cpu1 - cpu0) / sendWall,
            "receiverCPU": (receiver1 - receiver0) / sendWall,
            "codes": dict(self.codes),
        }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rates = [float(r) for r in args.rates.split(",")]
    ports = allocatePorts(2)
    try:
        with NodeProcesses() as procs:
            receiver = procs.start(NodeSpec(ports[1], echo=True, events=False))
            list(procs.readUntil(lambda: receiver.ready is not None, 30.0))
            if receiver.ready is None:
                raise SystemExit("the receiver did not start")
            # the reactor is installed only now, after the fork
            from twisted.internet import reactor
            from twisted.internet.defer import Deferred

            sender = Sender(ports[0], ports[1], args.transport, receiver.pid)
            results: list[dict[str, Any]] = []
            errors: list[Any] = []

            async def runAll() -> None:
                for rate in rates:
                    writeLine(sys.stderr, f"  {rate:,.0f} msg/s for {args.duration:g} s ...")
                    results.append(
                        await sender.measure(rate, args.duration, args.warmup, args.drain)
                    )

            def begin() -> None:
                sender.service.startService()
                d = Deferred.fromCoroutine(runAll())
                d.addErrback(errors.append)
                d.addBoth(lambda _: sender.service.stopService())
                d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

            if args.no_gc:
                gc.disable()
            reactor.callWhenRunning(begin)  # type: ignore[attr-defined]
            reactor.run()  # type: ignore[attr-defined]
            if errors:
                errors[0].raiseException()
    finally:
        releasePorts(ports)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rates", default="1000,5000", help="messages per second, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per rate")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent first, not counted")
    parser.add_argument(
        "--drain", type=float, default=2.0, help="seconds to wait for answers after the last send"
    )
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument("--no-gc", action="store_true", help="disable the sender's cyclic GC")
    args = parser.parse_args()
    results = run(args)
    print(
        f"latency: KDMQ on channel echo, sender process → receiver process (echo peer), "
        f"{args.transport} on 127.0.0.1, open loop, {args.duration:g} s per rate "
        f"(after {args.warmup:g} s warm-up)"
    )

    def ms(x: float) -> str:
        return f"{x * 1000:.3f}"

    print(
        table(
            (
                "rate/s",
                "sent",
                "achieved/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                ">2 ms",
                "lost",
                "retrans",
                "sender cpu",
                "receiver cpu",
            ),
            [
                (
                    f"{r['rate']:,.0f}",
                    f"{r['sent']:,}",
                    f"{r['achieved']:,.0f}",
                    ms(r["p50"]),
                    ms(r["p99"]),
                    ms(r["p999"]),
                    ms(r["max"]),
                    r["over2ms"],
                    r["lost"],
                    r["retransmissions"],
                    f"{r['senderCPU'] * 100:.0f}%",
                    f"{r['receiverCPU'] * 100:.0f}%",
                )
                for r in results
            ],
        )
    )
    for r in results:
        if r["codes"] and set(r["codes"]) != {200}:
            print(f"  responses at {r['rate']:,.0f}/s: {r['codes']}")


if __name__ == "__main__":
    main()
