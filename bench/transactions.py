"""
KDMQ request/response transactions per second between processes on loopback.

One sender process keeps a window of requests outstanding to one or more
receiver processes (each a dmq-bus node with the echo peer); every request
is a full client transaction (Via, branch, timers) answered by a server
transaction on the receiver. Prints transactions/s and the CPU time each
process spent per transaction.

With C{--serve-only}, ONE receiver is loaded by several light sender
processes (raw UDP sockets replaying a Kamailio-shaped KDMQ request with a
fresh branch and Call-ID each time, no dmq-bus stack) so that the receiver
is the bottleneck: prints the requests/s it answered and its CPU time per
request, the figure to compare with Kamailio's ~52 µs.

    python bench/transactions.py                 # 1 receiver, 100,000 requests
    python bench/transactions.py --receivers 2   # the replication shape: 2 targets
    python bench/transactions.py --serve-only --senders 2   # one receiver's capacity
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


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def receiver(port: int, profile: bool = False) -> None:
    """
    Run a dmq-bus node with the echo peer until SIGTERM; then print the CPU
    seconds of the whole process life, those spent since it was ready, and
    the requests it answered (optionally a cProfile of its serving).
    """
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

    profiler = cProfile.Profile() if profile else None

    def report() -> None:
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        served = service.stack.stats().get("server.responses_sent", 0)
        sys.stdout.write(f"cpu {_cpu():.3f} {_cpu() - readyCPU:.3f} {served}\n")
        sys.stdout.flush()

    reactor.addSystemEventTrigger("before", "shutdown", report)  # type: ignore[attr-defined]
    readyCPU = _cpu()
    if profiler is not None:
        profiler.enable()
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


RAW_REQUEST = (
    "KDMQ sip:htable@127.0.0.1:{port} SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:{myPort};branch=z9hG4bK{tag}.{n:x}\r\n"
    "To: <sip:htable@127.0.0.1:{port}>\r\n"
    "From: <sip:htable@127.0.0.1:{myPort}>;tag={tag}-{n:08x}\r\n"
    "CSeq: 10 KDMQ\r\n"
    "Call-ID: {n:016x}-{tag}@127.0.0.1\r\n"
    "Content-Length: {length}\r\n"
    "User-Agent: dmq-bus-bench\r\n"
    "Max-Forwards: 1\r\n"
    "Content-Type: application/json\r\n"
    "\r\n"
)
"""
A KDMQ htable request in the header order of Kamailio 5.6.3, from a
dmq-bus User-Agent (so answered 200 with the body, as in the main mode).
"""


def rawSender(port: int, count: int, window: int) -> None:
    """
    Send C{count} KDMQ requests to C{port} from a plain UDP socket,
    C{window} outstanding at once, each with a fresh branch and Call-ID;
    print C{answered lost elapsed}. A window that gets no answer for a
    second is counted lost and sent afresh (no retransmissions).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(1.0)
    myPort = sock.getsockname()[1]
    template = RAW_REQUEST.replace("{port}", str(port)).replace("{myPort}", str(myPort))
    template = template.replace("{tag}", f"{os.getpid():x}").replace("{length}", str(len(BODY)))
    sent = answered = lost = 0
    outstanding = 0
    start = time.perf_counter()
    while answered + lost < count:
        while outstanding < window and sent < count:
            sock.send(template.format(n=sent).encode() + BODY)
            sent += 1
            outstanding += 1
        try:
            response = sock.recv(65535)
        except TimeoutError:
            lost += outstanding
            outstanding = 0
            continue
        if response.startswith(b"SIP/2.0 200 "):
            answered += 1
            outstanding -= 1
    elapsed = time.perf_counter() - start
    sys.stdout.write(f"{answered} {lost} {elapsed:.6f}\n")
    sys.stdout.flush()


def _startReceivers(ports: list[int], profile: bool = False) -> list[subprocess.Popen[str]]:
    procs = []
    for port in ports:
        command = [sys.executable, __file__, "--role", "receiver", "--port", str(port)]
        proc = subprocess.Popen(
            command + (["--profile"] if profile else []), stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("receiver did not start")
    return procs


def _stopReceivers(procs: list[subprocess.Popen[str]]) -> list[tuple[float, float, int]]:
    """Stop the receivers; C{(life CPU, serving CPU, requests answered)} of each."""
    reports = []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        for line in out.splitlines():
            if line.startswith("cpu "):
                _, life, serving, served = line.split()
                reports.append((float(life), float(serving), int(served)))
    return reports


def serveOnly(args: argparse.Namespace) -> None:
    """One receiver loaded by C{args.senders} raw senders: its capacity."""
    port = freePort()
    procs = _startReceivers([port], args.profile)
    share = args.count // args.senders
    try:
        start = time.perf_counter()
        senders = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "raw-sender",
                    "--port",
                    str(port),
                    "--count",
                    str(share),
                    "--window",
                    str(args.window),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(args.senders)
        ]
        results = []
        for proc in senders:
            out, _ = proc.communicate()
            answeredText, lostText, elapsedText = out.split()
            results.append((int(answeredText), int(lostText), float(elapsedText)))
        wall = time.perf_counter() - start
    finally:
        reports = _stopReceivers(procs)
    answered = sum(r[0] for r in results)
    lost = sum(r[1] for r in results)
    slowest = max(r[2] for r in results)
    life, serving, served = reports[0]
    print(
        f"serving: {args.count} KDMQ requests over udp from {args.senders} raw sender(s) "
        f"to 1 receiver, window {args.window} each"
    )
    print(f"  rate            {answered / slowest:10.0f} requests/s answered")
    print(f"  elapsed         {slowest:10.3f} s (wall {wall:.3f} s with process start-up)")
    print(
        f"  receiver cpu    {serving:10.3f} s ({serving / max(served, 1) * 1e6:.1f} µs/request, "
        f"{served} answered; whole life {life:.3f} s)"
    )
    print(f"  capacity        {served / serving if serving else 0:10.0f} requests/s per core")
    print(f"  lost            {lost}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="requests to send")
    parser.add_argument("--window", type=int, default=200, help="requests outstanding at once")
    parser.add_argument("--receivers", type=int, default=1, help="receiver processes")
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the sender (the receiver with --serve-only)",
    )
    parser.add_argument(
        "--serve-only",
        action="store_true",
        help="measure one receiver loaded by --senders raw UDP senders",
    )
    parser.add_argument("--senders", type=int, default=2, help="raw senders for --serve-only")
    parser.add_argument(
        "--role", choices=["main", "receiver", "raw-sender"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        receiver(args.port, args.profile)
        return
    if args.role == "raw-sender":
        rawSender(args.port, args.count, args.window)
        return
    if args.serve_only:
        serveOnly(args)
        return
    ports = [freePort() for _ in range(args.receivers)]
    procs = _startReceivers(ports)
    try:
        result = sender(ports, args.count, args.window, args.transport, args.profile)
    finally:
        reports = _stopReceivers(procs)
    print(
        f"transactions: {args.count} over {args.transport} to {args.receivers} receiver(s), "
        f"window {args.window}"
    )
    print(f"  rate            {result['rate']:10.0f} transactions/s")
    print(f"  elapsed         {result['elapsed']:10.3f} s")
    print(
        f"  sender cpu      {result['cpu']:10.3f} s ({result['cpu'] / args.count * 1e6:.1f} µs/transaction)"
    )
    for i, (life, serving, served) in enumerate(reports):
        print(
            f"  receiver{i} cpu   {serving:10.3f} s ({serving / max(served, 1) * 1e6:.1f} µs/request, "
            f"{served} answered; whole life {life:.3f} s)"
        )
    print(f"  responses       {result['codes']}  failed {result['failed']}")
    print(f"  retransmissions {result['retransmissions']}")


if __name__ == "__main__":
    main()
