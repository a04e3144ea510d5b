"""
The chaos proxy (L{dmq_bus.chaos}): its knobs on a L{Clock} with a fake
socket, its refusal of anything but loopback, its command line, and two
real dmq-bus nodes keeping every promise of C{send} through it at 20%
loss both ways.
"""

# Twisted's assert* methods carry no annotations: calling them is fine here.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import contextlib
import io
import json
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dmq_bus.bus.dispatch import BusConfig
from dmq_bus.bus.values import Delivery, DeliveryFailed, DMQMessage, Node, PeerResponse
from dmq_bus.chaos import (
    BACK,
    FORWARD,
    MAX_DATAGRAM,
    ChaosProxy,
    Impairment,
    NotLoopback,
    ProxiedNode,
    argumentParser,
    checkLoopback,
    impairmentOf,
    listenProxy,
    main,
    parseEndpoint,
    startBehindProxy,
)
from dmq_bus.interfaces import IDMQPeer
from dmq_bus.peers.echo import EchoPeer
from dmq_bus.service import NodeConfig
from dmq_bus.sip.uri import SIPURI

from .interop.kamailio import allocatePorts, waitFor

NODE = ("127.0.0.1", 5060)
CLIENT = ("127.0.0.1", 40000)


class RecordingTransport:
    """A fake UDP socket: remembers what was written, and when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.written: list[tuple[float, bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((self.clock.seconds(), data, addr))

    def payloads(self) -> list[bytes]:
        return [data for _, data, _ in self.written]


def proxyOn(
    impairment: Impairment | None = None, back: Impairment | None = None, seed: int = 1
) -> tuple[ChaosProxy, RecordingTransport, Clock]:
    clock = Clock()
    proxy = ChaosProxy(NODE, impairment or Impairment(), back, clock=clock, seed=seed)
    transport = RecordingTransport(clock)
    proxy.makeConnection(transport)  # type: ignore[arg-type]
    return proxy, transport, clock


def datagrams(n: int) -> list[bytes]:
    return [b"datagram-%04d" % i for i in range(n)]


def sendAll(proxy: ChaosProxy, packets: list[bytes], source: tuple[str, int] = CLIENT) -> None:
    for packet in packets:
        proxy.datagramReceived(packet, source)


def settle(clock: Clock) -> None:
    """Fire every pending call, however far off."""
    while clock.getDelayedCalls():
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())


class KnobTests(SynchronousTestCase):
    """What the proxy does to datagrams, knob by knob, on a fake clock."""

    def test_noKnobsRelaysEverythingAtOnceInOrder(self) -> None:
        """
        With no impairment every datagram goes to the node at once,
        unchanged and in order, and nothing is scheduled.
        """
        proxy, transport, clock = proxyOn()
        packets = datagrams(50)
        sendAll(proxy, packets)
        self.assertEqual(transport.payloads(), packets)
        self.assertEqual({addr for _, _, addr in transport.written}, {NODE})
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(
            proxy.summary(), {"forward.received": 50, "forward.sent": 50, "in_flight": 0}
        )

    def test_lossDropsTheSeededShare(self) -> None:
        """
        At 20% loss, 1,000 datagrams lose exactly the same ones on every run
        with seed 1 (180 of them); the others arrive in order.
        """
        proxy, transport, _ = proxyOn(Impairment(loss=0.2))
        packets = datagrams(1000)
        sendAll(proxy, packets)
        self.assertEqual(proxy.counters["forward.dropped"], 180)
        self.assertEqual(proxy.counters["forward.sent"], 820)
        self.assertEqual(len(transport.written), 820)
        self.assertEqual(
            transport.payloads(), [p for p in packets if p in set(transport.payloads())]
        )
        again, secondTransport, _ = proxyOn(Impairment(loss=0.2))
        sendAll(again, packets)
        self.assertEqual(secondTransport.payloads(), transport.payloads())

    def test_duplicateSendsASecondCopy(self) -> None:
        """
        At 5% duplication, 1,000 datagrams become 1,000 + 54 with seed 1;
        each duplicate follows its original directly.
        """
        proxy, transport, _ = proxyOn(Impairment(duplicate=0.05))
        sendAll(proxy, datagrams(1000))
        self.assertEqual(proxy.counters["forward.duplicated"], 54)
        self.assertEqual(len(transport.written), 1054)
        copies = Counter(transport.payloads())
        self.assertEqual(Counter(copies.values()), {1: 946, 2: 54})
        payloads = transport.payloads()
        for i, payload in enumerate(payloads):
            if copies[payload] == 2 and payloads.index(payload) == i:
                self.assertEqual(payloads[i + 1], payload)

    def test_lossComesBeforeDuplication(self) -> None:
        """
        A dropped datagram is never duplicated: at 100% loss and 100%
        duplication nothing arrives.
        """
        proxy, transport, _ = proxyOn(Impairment(loss=1.0, duplicate=1.0))
        sendAll(proxy, datagrams(10))
        self.assertEqual(transport.written, [])
        self.assertEqual(proxy.counters["forward.dropped"], 10)
        self.assertEqual(proxy.counters["forward.duplicated"], 0)

    def test_fixedDelay(self) -> None:
        """
        With a 10 ms delay nothing arrives before 10 ms and everything,
        in order, at 10 ms.
        """
        proxy, transport, clock = proxyOn(Impairment(delay=0.01))
        sendAll(proxy, datagrams(5))
        self.assertEqual(proxy.inFlight, 5)
        clock.advance(0.0099)
        self.assertEqual(transport.written, [])
        clock.advance(0.0001)
        self.assertEqual(transport.payloads(), datagrams(5))
        self.assertEqual({t for t, _, _ in transport.written}, {0.01})
        self.assertEqual(proxy.inFlight, 0)

    def test_jitterSpreadsAndReorders(self) -> None:
        """
        With 10 ms delay and 20 ms jitter every datagram arrives between
        10 and 30 ms after it was sent; datagrams sent 1 ms apart overtake
        each other (with seed 1, 92 of 100 arrive out of their place).
        """
        proxy, transport, clock = proxyOn(Impairment(delay=0.01, jitter=0.02))
        sentAt = {}
        for packet in datagrams(100):
            sentAt[packet] = clock.seconds()
            proxy.datagramReceived(packet, CLIENT)
            clock.advance(0.001)
        settle(clock)
        self.assertEqual(len(transport.written), 100)
        for at, packet, _ in transport.written:
            self.assertTrue(0.01 - 1e-9 <= at - sentAt[packet] < 0.03 + 1e-9, packet)
        order = transport.payloads()
        misplaced = sum(1 for i, p in enumerate(order) if p != datagrams(100)[i])
        self.assertEqual(misplaced, 92)

    def test_reorderLetsTheNextOneOvertake(self) -> None:
        """
        At 10% reordering, a held datagram leaves right after the one that
        overtakes it: nothing is lost or duplicated, and with seed 1 exactly
        89 of 1,000 are overtaken.
        """
        proxy, transport, clock = proxyOn(Impairment(reorder=0.1))
        packets = datagrams(1000)
        sendAll(proxy, packets)
        settle(clock)
        self.assertEqual(proxy.counters["forward.reordered"], 89)
        self.assertEqual(sorted(transport.payloads()), packets)
        swapped = [
            i for i, p in enumerate(transport.payloads()) if p != packets[i] and p == packets[i + 1]
        ]
        self.assertEqual(len(swapped), 89)
        for i in swapped:
            self.assertEqual(transport.payloads()[i + 1], packets[i])

    def test_heldDatagramLeavesAfterTheHold(self) -> None:
        """
        A datagram held back for reordering with nothing behind it leaves
        after C{reorderHold} seconds anyway, late but not lost.
        """
        proxy, transport, clock = proxyOn(Impairment(reorder=1.0, reorderHold=0.05))
        proxy.datagramReceived(b"alone", CLIENT)
        self.assertEqual(transport.written, [])
        self.assertEqual(proxy.inFlight, 1)
        clock.advance(0.05)
        self.assertEqual(transport.written, [(0.05, b"alone", NODE)])
        self.assertEqual(proxy.counters["forward.held_expired"], 1)
        self.assertEqual(proxy.counters["forward.reordered"], 0)

    def test_allKnobsTogetherAreRepeatable(self) -> None:
        """
        With every knob set, a seed fixes what happens: the same 500
        datagrams give the same output (with seed 7: 111 dropped, 25
        duplicated, 38 overtaken), and the counters add up: what left = what
        came - dropped + duplicated.
        """

        def run() -> tuple[list[tuple[float, bytes, tuple[str, int]]], dict[str, int]]:
            knobs = Impairment(loss=0.2, duplicate=0.05, delay=0.01, jitter=0.02, reorder=0.1)
            proxy, transport, clock = proxyOn(knobs, seed=7)
            for packet in datagrams(500):
                proxy.datagramReceived(packet, CLIENT)
                clock.advance(0.002)
            settle(clock)
            return transport.written, proxy.summary()

        first, counters = run()
        self.assertEqual(run(), (first, counters))
        self.assertEqual(
            counters["forward.sent"],
            500 - counters["forward.dropped"] + counters["forward.duplicated"],
        )
        self.assertEqual(
            (
                counters["forward.dropped"],
                counters["forward.duplicated"],
                counters["forward.reordered"],
                counters["forward.sent"],
            ),
            (111, 25, 38, 414),
        )

    def test_repliesGoBackToTheLastClient(self) -> None:
        """
        What the forward address sends to the proxy goes back to the client
        that sent last; before any client did, it is counted and dropped.
        """
        proxy, transport, _ = proxyOn()
        proxy.datagramReceived(b"too early", NODE)
        self.assertEqual(transport.written, [])
        self.assertEqual(proxy.counters["back.no_client"], 1)
        proxy.datagramReceived(b"request", CLIENT)
        proxy.datagramReceived(b"response", NODE)
        other = ("127.0.0.1", 40001)
        proxy.datagramReceived(b"request 2", other)
        proxy.datagramReceived(b"response 2", NODE)
        self.assertEqual(
            [(data, addr) for _, data, addr in transport.written],
            [
                (b"request", NODE),
                (b"response", CLIENT),
                (b"request 2", NODE),
                (b"response 2", other),
            ],
        )

    def test_eachDirectionHasItsOwnImpairment(self) -> None:
        """
        Total loss toward the node and none back: requests vanish, replies
        all arrive; the counters say so per direction.
        """
        proxy, transport, _ = proxyOn(Impairment(loss=1.0), back=Impairment())
        proxy.datagramReceived(b"request", CLIENT)
        sendAll(proxy, datagrams(10), NODE)
        self.assertEqual(transport.payloads(), datagrams(10))
        self.assertEqual(proxy.counters[f"{FORWARD}.dropped"], 1)
        self.assertEqual(proxy.counters[f"{BACK}.sent"], 10)
        self.assertEqual(proxy.counters[f"{BACK}.dropped"], 0)

    def test_stoppingDiscardsWhatIsInFlight(self) -> None:
        """
        When its port closes, the proxy cancels every delayed or held
        datagram (counted as discarded): no timer is left behind.
        """
        proxy, _, clock = proxyOn(Impairment(delay=0.01, reorder=0.5))
        sendAll(proxy, datagrams(4))
        clock.advance(0.01)
        proxy.datagramReceived(b"late", CLIENT)
        inFlight = proxy.inFlight
        self.assertEqual(inFlight, 1 + (1 if proxy._held else 0))
        proxy.doStop()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(proxy.inFlight, 0)
        self.assertEqual(proxy.counters["forward.discarded"], inFlight)

    def test_sendErrorsAreCounted(self) -> None:
        """A socket error on send is counted, never raised to the reactor."""

        class Failing:
            def write(self, data: bytes, addr: Any) -> None:
                raise OSError("no buffer space")

        proxy = ChaosProxy(NODE, clock=Clock())
        proxy.makeConnection(Failing())  # type: ignore[arg-type]
        proxy.datagramReceived(b"x", CLIENT)
        self.assertEqual(proxy.counters["forward.send_errors"], 1)
        self.assertEqual(proxy.counters["forward.sent"], 0)


class LoopbackOnlyTests(SynchronousTestCase):
    """The proxy works on 127.0.0.0/8 and refuses everything else."""

    def test_acceptsAllOf127Slash8(self) -> None:
        """127.0.0.1 and 127.255.0.9 are fine, brackets or not."""
        self.assertEqual(checkLoopback("127.0.0.1"), "127.0.0.1")
        self.assertEqual(checkLoopback("127.255.0.9"), "127.255.0.9")
        self.assertEqual(parseEndpoint("127.0.0.2:5070"), ("127.0.0.2", 5070))

    def test_refusesOtherAddresses(self) -> None:
        """
        Public and private addresses, IPv6 loopback and host names are
        refused with an error naming 127.0.0.0/8.
        """
        for host in ["10.0.0.1", "192.168.1.1", "8.8.8.8", "0.0.0.0", "::1", "[::1]", "localhost"]:
            error = self.assertRaises(NotLoopback, checkLoopback, host)
            self.assertIn("127.0.0.0/8", str(error))

    def test_proxyRefusesANonLoopbackForward(self) -> None:
        """A proxy cannot be made to forward off the machine."""
        self.assertRaises(NotLoopback, ChaosProxy, ("10.0.0.1", 5060), clock=Clock())

    def test_listenRefusesANonLoopbackAddress(self) -> None:
        """The proxy never listens on anything but loopback."""
        reactor = FakeUDPReactor()
        proxy = ChaosProxy(NODE, clock=reactor)
        self.assertRaises(NotLoopback, listenProxy, proxy, ("0.0.0.0", 5070), reactor)
        self.assertEqual(reactor.udpPorts, [])

    def test_nodeBehindAProxyMustBeOnLoopback(self) -> None:
        """
        A node whose server address is not on loopback cannot be put
        behind a proxy; nothing starts listening.
        """
        reactor = FakeUDPReactor()
        config = NodeConfig(bus=BusConfig(serverAddress=SIPURI.parse("sip:10.1.2.3:5060")))
        self.assertRaises(
            NotLoopback, startBehindProxy, config, 5061, Impairment(), reactor=reactor
        )
        self.assertEqual(reactor.udpPorts, [])

    def test_badRatesAreRefused(self) -> None:
        """Rates outside [0, 1] and negative delays are refused."""
        self.assertRaises(ValueError, Impairment, loss=1.5)
        self.assertRaises(ValueError, Impairment, reorder=-0.1)
        self.assertRaises(ValueError, Impairment, delay=-1.0)
        self.assertRaises(ValueError, Impairment, jitter=float("nan"))


class FakePort:
    def __init__(self, reactor: FakeUDPReactor) -> None:
        self.reactor = reactor

    def stopListening(self) -> None:
        self.reactor.stopped += 1


class FakeUDPReactor(MemoryReactorClock):
    """A memory reactor that also records C{listenUDP}."""

    def __init__(self) -> None:
        super().__init__()
        self.udpPorts: list[tuple[int, Any, str, int]] = []
        self.stopped = 0

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakePort:
        self.udpPorts.append((port, protocol, interface, maxPacketSize))
        return FakePort(self)


class CommandLineTests(SynchronousTestCase):
    """C{python -m dmq_bus.chaos}."""

    def parseError(self, *argv: str) -> str:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            error = self.assertRaises(SystemExit, argumentParser().parse_args, list(argv))
        self.assertEqual(error.code, 2)
        return stderr.getvalue()

    def test_knobs(self) -> None:
        """Every knob of the command line reaches the impairment."""
        args = argumentParser().parse_args(
            "--listen 127.0.0.1:5070 --forward 127.0.0.1:5060 --loss 0.2 --duplicate 0.05"
            " --delay 0.01 --jitter 0.02 --reorder 0.1 --seed 9".split()
        )
        self.assertEqual(args.listen, ("127.0.0.1", 5070))
        self.assertEqual(args.forward, ("127.0.0.1", 5060))
        self.assertEqual(args.seed, 9)
        self.assertEqual(
            impairmentOf(args),
            Impairment(loss=0.2, duplicate=0.05, delay=0.01, jitter=0.02, reorder=0.1),
        )

    def test_refusesNonLoopback(self) -> None:
        """
        A non-loopback --listen or --forward stops the command with a usage
        error that says only 127.0.0.0/8 is accepted.
        """
        message = self.parseError("--listen", "0.0.0.0:5070", "--forward", "127.0.0.1:5060")
        self.assertIn("--listen", message)
        self.assertIn("only 127.0.0.0/8 addresses are accepted, not 0.0.0.0", message)
        message = self.parseError("--listen", "127.0.0.1:5070", "--forward", "10.0.0.1:5060")
        self.assertIn("--forward", message)
        self.assertIn("127.0.0.0/8", message)

    def test_refusesBadValues(self) -> None:
        """A probability above 1 or a missing port is a usage error."""
        self.assertIn(
            "probability",
            self.parseError("--listen", "127.0.0.1:1", "--forward", "127.0.0.1:2", "--loss", "2"),
        )
        self.assertIn(
            "HOST:PORT", self.parseError("--listen", "127.0.0.1", "--forward", "127.0.0.1:2")
        )

    def test_runs(self) -> None:
        """
        The command listens on the --listen port (with room for the largest
        datagram), says what it does, and prints its counters as JSON when
        the reactor stops.
        """
        reactor = FakeUDPReactor()
        out = io.StringIO()
        main(
            ["--listen", "127.0.0.1:5070", "--forward", "127.0.0.1:5060", "--loss", "0.5"],
            reactor,
            out,
        )
        [(port, proxy, interface, size)] = reactor.udpPorts
        self.assertEqual((port, interface, size), (5070, "127.0.0.1", MAX_DATAGRAM))
        self.assertIsInstance(proxy, ChaosProxy)
        self.assertTrue(out.getvalue().startswith("chaos proxy 127.0.0.1:5070 -> 127.0.0.1:5060"))
        [(report, args, _)] = reactor.triggers["before"]["shutdown"]
        report(*args)
        final = json.loads(out.getvalue().splitlines()[-1])
        self.assertEqual(final, {"final": True, "in_flight": 0})


# ---------------------------------------------------------------------------
# Real nodes


@implementer(IDMQPeer)
class CountingEcho:
    """The echo peer, counting how often each body reached it."""

    channel = "echo"
    description = "echo, counting each body"

    def __init__(self) -> None:
        self.echo = EchoPeer()
        self.seen: Counter[bytes] = Counter()

    def messageReceived(self, message: DMQMessage) -> PeerResponse:
        self.seen[message.body] += 1
        return self.echo.messageReceived(message)

    def busJoined(self) -> None:
        """Nothing to sync."""


class RealNodesTests(TestCase):
    """Two dmq-bus nodes on real sockets, each behind a chaos proxy."""

    MESSAGES = 300
    WINDOW = 100

    def test_countingEchoIsAPeer(self) -> None:
        """The counting echo peer used below provides IDMQPeer."""
        self.assertTrue(verifyObject(IDMQPeer, CountingEcho()))

    @inlineCallbacks
    def test_everySendIsAnsweredThroughLossDuplicationAndReordering(self) -> Any:
        """
        With 20% loss both ways, 5% duplication and 10% reordering, 300
        messages on the echo channel: every send fires (never silence), each
        message reaches the receiving peer exactly once, and with the
        default SIP timers none is lost (all 300 are delivered, echoed).
        """
        portA, portB, innerA, innerB = allocatePorts(4)
        knobs = Impairment(loss=0.2, duplicate=0.05, reorder=0.1, reorderHold=0.02)

        def config(port: int, *seeds: int) -> NodeConfig:
            return NodeConfig(
                bus=BusConfig(
                    serverAddress=SIPURI.parse(f"sip:127.0.0.1:{port}"),
                    notificationAddresses=tuple(SIPURI.parse(f"sip:127.0.0.1:{s}") for s in seeds),
                )
            )

        counting = CountingEcho()
        a = startBehindProxy(config(portA), innerA, knobs, seed=1, reactor=reactor)
        try:
            b = startBehindProxy(
                config(portB, portA), innerB, knobs, seed=2, peers=[counting], reactor=reactor
            )
        except BaseException:
            a.stop()
            raise
        # Both leave at once: each leave waits (at most 2 s) for the other's answer.
        self.addCleanup(lambda: DeferredList([a.stop(), b.stop()]))

        def status(node: ProxiedNode, port: int) -> str | None:
            found = node.service.bus.findNode(f"sip:127.0.0.1:{port}")
            return None if found is None else found.status.word

        yield waitFor(lambda: status(a, portB) == "active" and status(b, portA) == "active", 10)
        target = a.service.bus.findNode(f"sip:127.0.0.1:{portB}")
        assert isinstance(target, Node)

        outcomes: dict[bytes, Delivery | DeliveryFailed] = {}
        firedTwice: list[bytes] = []
        done: Deferred[None] = Deferred()
        bodies = [b"message-%04d" % i for i in range(self.MESSAGES)]
        pending = iter(bodies)
        started = time.monotonic()

        def sendNext() -> None:
            body = next(pending, None)
            if body is None:
                if len(outcomes) == self.MESSAGES and not done.called:
                    done.callback(None)
                return
            d = a.service.bus.send("echo", target, body, "text/plain")
            d.addCallbacks(lambda r: record(body, r), lambda f: record(body, f))

        def record(body: bytes, result: Delivery | Failure) -> None:
            if body in outcomes:
                firedTwice.append(body)
            if isinstance(result, Failure):
                if not isinstance(result.value, DeliveryFailed):
                    done.errback(result)
                    return
                outcomes[body] = result.value
            else:
                outcomes[body] = result
            sendNext()

        for _ in range(self.WINDOW):
            sendNext()
        yield done
        elapsed = time.monotonic() - started

        self.assertEqual(len(outcomes), self.MESSAGES)
        self.assertEqual(firedTwice, [])
        failed = [body for body, o in outcomes.items() if isinstance(o, DeliveryFailed)]
        self.assertEqual(failed, [])
        for body, outcome in outcomes.items():
            assert isinstance(outcome, Delivery)
            self.assertEqual((outcome.code, outcome.body), (200, body))
        self.assertEqual(set(counting.seen), set(bodies))
        self.assertEqual(set(counting.seen.values()), {1})
        # The chaos did happen, in both directions, and was repaired.
        for node in (a, b):
            counters = node.proxy.counters
            for kind in ("dropped", "duplicated", "reordered"):
                self.assertGreater(counters[f"forward.{kind}"], 0, kind)
        self.assertGreater(a.service.stack.stats().get("client.retransmissions", 0), 0)
        self.assertLess(elapsed, 60)

    test_everySendIsAnsweredThroughLossDuplicationAndReordering.timeout = 90  # type: ignore[attr-defined]
