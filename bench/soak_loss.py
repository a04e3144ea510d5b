"""
Soak under loss: 10,000 KDMQ messages between two dmq-bus node processes,
each behind a chaos proxy (L{dmq_bus.chaos}) that drops 20% of what goes
into its node, so 20% in both directions, with some duplication and
reordering on top. The issue's acceptance run for reliability.

Two processes on 127.0.0.1: this one runs the sending node A (behind its
proxy) and keeps C{--window} messages outstanding; a child process runs
the receiving node B (behind its own proxy) with a counting echo peer on
channel C{echo}. At the end B reports how often each message reached its
peer. Printed:

    sent                  messages handed to bus.send
    delivered             sends that fired with a Delivery (the echoed body checked)
    failed                sends that failed with DeliveryFailed: the sender knows
    delivered twice       messages B's peer saw more than once          (must be 0)
    lost silently         sends that never fired, or fired Delivered for a message
                          B's peer never saw                            (must be 0)
    retransmissions       requests A sent again, responses B sent again
    elapsed               from the first send to the last outcome

The run is bounded (C{--max-seconds}); the child stops on SIGTERM, when
this process goes away, or at its own deadline; nothing is left behind.
Exit status 1 when a must-be-0 figure is not 0.

    python bench/soak_loss.py                       # 10,000 messages at 20% loss
    python bench/soak_loss.py --count 2000 --loss 0.3 --window 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOPBACK = "127.0.0.1"
CHANNEL = "echo"


def freePorts(n: int) -> list[int]:
    """C{n} distinct ports free on 127.0.0.1 for both UDP and TCP."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < n:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((LOOPBACK, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            held += [udp, tcp]
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def nodeConfig(port: int, seeds: list[int]) -> Any:
    from dmq_bus.bus.dispatch import BusConfig
    from dmq_bus.service import NodeConfig
    from dmq_bus.sip.uri import SIPURI

    return NodeConfig(
        bus=BusConfig(
            serverAddress=SIPURI.parse(f"sip:{LOOPBACK}:{port}"),
            notificationAddresses=tuple(SIPURI.parse(f"sip:{LOOPBACK}:{s}") for s in seeds),
        )
    )


def impairment(args: argparse.Namespace) -> Any:
    from dmq_bus.chaos import Impairment

    return Impairment(loss=args.loss, duplicate=args.duplicate, reorder=args.reorder)


def receiver(args: argparse.Namespace) -> None:
    """
    Node B behind its proxy, with a counting echo peer; on SIGTERM (or when
    the parent is gone, or at the deadline) print one JSON report line.
    """
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from zope.interface import implementer

    from dmq_bus.bus.values import DMQMessage, PeerResponse
    from dmq_bus.chaos import startBehindProxy
    from dmq_bus.interfaces import IDMQPeer

    @implementer(IDMQPeer)
    class CountingEcho:
        """Answers with the body, counting how often each body arrived."""

        channel = CHANNEL
        description = "echo, counting each body"

        def __init__(self) -> None:
            self.seen: Counter[bytes] = Counter()

        def messageReceived(self, message: DMQMessage) -> PeerResponse:
            self.seen[message.body] += 1
            return PeerResponse(200, "OK", message.body, message.contentType)

        def busJoined(self) -> None:
            """Nothing to sync."""

    peer = CountingEcho()
    node = startBehindProxy(
        nodeConfig(args.port, [args.seed_port]),
        args.inner_port,
        impairment(args),
        peers=[peer],
        seed=args.seed + 1,
        reactor=reactor,
    )
    parent = os.getppid()

    def report() -> None:
        stats = node.service.stack.stats()
        line = {
            "seen": sorted(int(body.split(b"-")[1]) for body in peer.seen),
            "twice": sorted(int(body.split(b"-")[1]) for body, n in peer.seen.items() if n > 1),
            "proxy": node.proxy.summary(),
            "responses_resent": stats.get("server.responses_resent", 0),
            "completed_evicted": stats.get("server.completed_evicted", 0),
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def watch() -> None:
        if os.getppid() != parent:
            reactor.stop()  # type: ignore[attr-defined]

    LoopingCall(watch).start(1.0, now=False)
    reactor.callLater(args.max_seconds + 30, reactor.stop)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", report)  # type: ignore[attr-defined]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


def sender(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    """
    Node A behind its proxy: wait until B is listed active, then send
    C{args.count} messages, C{args.window} at a time; return the outcomes.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from dmq_bus.bus.values import Delivery, DeliveryFailed, NodeStatus
    from dmq_bus.chaos import startBehindProxy

    portA, innerA, portB, _ = ports
    node = startBehindProxy(
        nodeConfig(portA, []), innerA, impairment(args), seed=args.seed, reactor=reactor
    )
    bus = node.service.bus
    delivered: set[int] = set()
    failed: set[int] = set()
    wrongBody: list[int] = []
    firedTwice: list[int] = []
    otherErrors: list[str] = []
    state = {"next": 0, "start": 0.0, "end": 0.0, "joined": 0.0}
    finished: Deferred[None] = Deferred()
    began = time.monotonic()

    def target() -> Any:
        return bus.findNode(f"sip:{LOOPBACK}:{portB}")

    destination: list[Any] = []

    def sendOne() -> None:
        i = state["next"]
        if i >= args.count:
            return
        state["next"] = i + 1
        body = b"message-%06d" % i
        bus.send(CHANNEL, destination[0], body, "text/plain").addCallbacks(
            ok, bad, callbackArgs=(i, body), errbackArgs=(i,)
        )

    def ok(delivery: Delivery, i: int, body: bytes) -> None:
        if delivery.code != 200 or delivery.body != body:
            wrongBody.append(i)
        settled(i, delivered)

    def bad(failure: Failure, i: int) -> None:
        if not failure.check(DeliveryFailed):
            otherErrors.append(repr(failure.value))
        settled(i, failed)

    def settled(i: int, outcomes: set[int]) -> None:
        if i in delivered or i in failed:
            firedTwice.append(i)
        outcomes.add(i)
        if len(delivered) + len(failed) >= args.count:
            if not finished.called:
                finished.callback(None)
        else:
            sendOne()

    def waitForJoin() -> None:
        found = target()
        if found is not None and found.status == NodeStatus.ACTIVE:
            state["joined"] = time.monotonic() - began
            destination.append(found)
            state["start"] = time.monotonic()
            for _ in range(min(args.window, args.count)):
                sendOne()
        elif time.monotonic() - began > 30:
            finished.errback(RuntimeError("node B was not listed active within 30 s"))
        else:
            reactor.callLater(0.05, waitForJoin)  # type: ignore[attr-defined]

    def timedOut() -> None:
        if not finished.called:
            finished.callback(None)

    deadline = reactor.callLater(args.max_seconds, timedOut)  # type: ignore[attr-defined]
    error: list[Failure] = []

    def stopAll(result: object) -> None:
        if isinstance(result, Failure):
            error.append(result)
        state["end"] = time.monotonic()
        if deadline.active():
            deadline.cancel()
        node.stop().addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    finished.addBoth(stopAll)
    reactor.callWhenRunning(waitForJoin)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if error:
        error[0].raiseException()
    stats = node.service.stack.stats()
    return {
        "sent": state["next"],
        "delivered": delivered,
        "failed": failed,
        "wrong_body": wrongBody,
        "fired_twice": firedTwice,
        "other_errors": otherErrors,
        "elapsed": state["end"] - state["start"],
        "joined": state["joined"],
        "retransmissions": stats.get("client.retransmissions", 0),
        "timeouts": stats.get("client.timeouts", 0),
        "proxy": node.proxy.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages to send")
    parser.add_argument("--window", type=int, default=200, help="messages outstanding at once")
    parser.add_argument("--loss", type=float, default=0.2, help="loss into each node")
    parser.add_argument("--duplicate", type=float, default=0.05, help="duplication into each node")
    parser.add_argument("--reorder", type=float, default=0.1, help="reordering into each node")
    parser.add_argument("--seed", type=int, default=1, help="the proxies' random seed")
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="stop sending and report after this"
    )
    parser.add_argument(
        "--role", choices=["main", "receiver"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--inner-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--seed-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receiver":
        receiver(args)
        return

    ports = freePorts(4)
    portA, _, portB, innerB = ports
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--role=receiver",
        f"--port={portB}",
        f"--inner-port={innerB}",
        f"--seed-port={portA}",
        f"--loss={args.loss}",
        f"--duplicate={args.duplicate}",
        f"--reorder={args.reorder}",
        f"--seed={args.seed}",
        f"--max-seconds={args.max_seconds}",
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    report: dict[str, Any] = {}
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the receiver did not start")
        result = sender(args, ports)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
        for line in out.splitlines():
            if line.startswith("{"):
                report = json.loads(line)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if not report:
        raise SystemExit("the receiver did not report")

    seen = set(report["seen"])
    delivered, failed = result["delivered"], result["failed"]
    sent = result["sent"]
    unanswered = sent - len(delivered) - len(failed)
    deliveredUnseen = len(delivered - seen)
    lostSilently = (
        unanswered + deliveredUnseen + len(result["wrong_body"]) + len(result["other_errors"])
    )
    twice = len(report["twice"])
    proxyA, proxyB = result["proxy"], report["proxy"]

    def share(proxy: dict[str, int], kind: str) -> str:
        received = proxy.get("forward.received", 0)
        n = proxy.get(f"forward.{kind}", 0)
        return f"{n} ({n / received:.1%})" if received else str(n)

    print(
        f"soak under loss: {args.count} messages A -> B on channel '{CHANNEL}', window "
        f"{args.window}, two processes on {LOOPBACK}"
    )
    print(
        f"  impairment      loss {args.loss:.0%}, duplicate {args.duplicate:.0%}, reorder "
        f"{args.reorder:.0%} into each node (seed {args.seed})"
    )
    print(f"  sent            {sent:10d}")
    print(f"  delivered       {len(delivered):10d}")
    print(f"  failed          {len(failed):10d}   (DeliveryFailed: the sender knows)")
    print(f"  delivered twice {twice:10d}   (to B's peer; must be 0)")
    print(f"  lost silently   {lostSilently:10d}   (must be 0)")
    print(
        f"  retransmissions {result['retransmissions']:10d}   requests by A "
        f"({result['retransmissions'] / max(sent, 1):.2f}/message); "
        f"{report['responses_resent']} responses resent by B"
    )
    print(f"  elapsed         {result['elapsed']:10.3f} s   (join took {result['joined']:.3f} s)")
    print(
        f"  into B (proxy)  {proxyB.get('forward.received', 0)} datagrams: dropped "
        f"{share(proxyB, 'dropped')}, duplicated {share(proxyB, 'duplicated')}, overtaken "
        f"{share(proxyB, 'reordered')}, held with none behind "
        f"{proxyB.get('forward.held_expired', 0)}"
    )
    print(
        f"  into A (proxy)  {proxyA.get('forward.received', 0)} datagrams: dropped "
        f"{share(proxyA, 'dropped')}, duplicated {share(proxyA, 'duplicated')}, overtaken "
        f"{share(proxyA, 'reordered')}, held with none behind "
        f"{proxyA.get('forward.held_expired', 0)}"
    )
    print(
        f"  also            {len(failed & seen)} failed sends reached B's peer anyway; "
        f"{result['timeouts']} client timeouts; {len(result['fired_twice'])} sends fired twice; "
        f"{report['completed_evicted']} completed server transactions evicted"
    )
    if twice or lostSilently or result["fired_twice"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
