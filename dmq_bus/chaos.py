"""
A chaos proxy for UDP on loopback: it sits in front of one dmq-bus node
and drops, duplicates, delays (fixed plus jitter) and reorders the
datagrams that go to it, at given rates, from a seeded random source.
A test tool, like L{dmq_bus.testing}, but for real sockets and real
processes.

How a node goes behind a proxy
==============================

A DMQ node's identity is the address it advertises (its server address,
C{sip:ip:port}). Other nodes learn it from notifications and send their
requests there; they address their responses to the top Via's sent-by,
which is that same advertised address (dmq-bus adds no C{rport}). So one
proxy per node is enough, and nothing needs rewriting:

    node A advertises sip:127.0.0.1:PA      proxy A listens on PA, forwards to A's port IA
    node B advertises sip:127.0.0.1:PB      proxy B listens on PB, forwards to B's port IB

    A's request to B:       IA ──> PB ─(proxy B)─> IB
    B's response to it:     IB ──> PA ─(proxy A)─> IA   (Via sent-by: 127.0.0.1:PA)

Each proxy impairs everything that goes into its node: the requests of
other nodes and the responses to the node's own requests. The two
directions between A and B are therefore set apart by giving the two
proxies different L{Impairment}s. L{startBehindProxy} starts a
L{DMQService} that listens on the internal port while it advertises the
proxy's address.

The proxy also works as a plain UDP reverse proxy: what arrives from the
forward address is relayed back, through the C{back} direction's own
impairment, to the client that sent to the proxy last. dmq-bus nodes
behind proxies never use that path (their responses go to the other
node's proxy).

What a datagram goes through, in order
======================================

 1. I{loss}: dropped with probability C{loss}.
 2. I{duplication}: with probability C{duplicate}, two copies go on.
 3. I{delay}: each copy waits C{delay} seconds plus a uniform draw in
    C{[0, jitter)} (jitter alone reorders copies too).
 4. I{reordering}: when it is due to leave, a copy is held back with
    probability C{reorder}; the next copy that leaves in the same
    direction overtakes it and the held one leaves right after (counted
    C{reordered}). If nothing comes within C{reorderHold} seconds it
    leaves then (counted C{held_expired}).

Random draws are made only for the knobs that are set, so with a given
seed and the same arrivals a run is repeatable (on a L{Clock}, exactly).

Only 127.0.0.0/8 addresses are accepted, for the listening side and for
the forward address alike: this is not a tool for real networks.

From a shell:

    python -m dmq_bus.chaos --listen 127.0.0.1:5070 --forward 127.0.0.1:5060 \\
        --loss 0.2 --duplicate 0.05 --delay 0.01 --jitter 0.02 --reorder 0.1 --seed 7

The knobs apply to both directions of that one proxy; it prints its
counters every C{--report-interval} seconds and when it stops.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from dmq_bus.interfaces import IDMQPeer
from dmq_bus.service import DMQService, NodeConfig
from dmq_bus.sip.uri import stripBrackets

Endpoint = tuple[str, int]

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")

MAX_DATAGRAM = 65535
"""The largest datagram the proxy receives (and so relays) whole."""

FORWARD = "forward"
"""The direction toward the forward address (into the node behind the proxy)."""

BACK = "back"
"""The direction from the forward address back to the last client."""


class NotLoopback(ValueError):
    """An address outside 127.0.0.0/8 was given to the proxy."""


def checkLoopback(host: str) -> str:
    """
    Return C{host} (brackets stripped) when it is an IPv4 address in
    127.0.0.0/8.

    @raise NotLoopback: anything else (other addresses, IPv6, names).
    """
    bare = stripBrackets(host)
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise NotLoopback(
            f"only 127.0.0.0/8 addresses are accepted, and {host!r} is not an IP address"
        ) from None
    if not isinstance(address, ipaddress.IPv4Address) or address not in LOOPBACK:
        raise NotLoopback(f"only 127.0.0.0/8 addresses are accepted, not {host}")
    return bare


def parseEndpoint(text: str) -> Endpoint:
    """
    C{"127.0.0.1:5060"} as C{("127.0.0.1", 5060)}.

    @raise NotLoopback: the host is not in 127.0.0.0/8.
    @raise ValueError: not C{HOST:PORT} with a port in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535, not {text!r}")
    return checkLoopback(host), int(port)


def _rate(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be a probability in [0, 1], not {value}")


def _seconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{attribute.name} must be >= 0 seconds, not {value}")


@attrs.frozen
class Impairment:
    """
    What the proxy does to the datagrams of one direction (see the module
    docstring for the order the steps apply in).

    @ivar loss: probability that a datagram is dropped.
    @ivar duplicate: probability that a datagram that was not dropped goes
        on as two copies.
    @ivar delay: seconds every copy waits before it leaves.
    @ivar jitter: extra wait, uniform in C{[0, jitter)} seconds, per copy.
    @ivar reorder: probability that a copy, when due to leave, is held back
        until the next copy of the same direction has left.
    @ivar reorderHold: the longest a held copy waits for one to overtake it,
        in seconds; it then leaves anyway.
    """

    loss: float = attrs.field(default=0.0, validator=_rate)
    duplicate: float = attrs.field(default=0.0, validator=_rate)
    delay: float = attrs.field(default=0.0, validator=_seconds)
    jitter: float = attrs.field(default=0.0, validator=_seconds)
    reorder: float = attrs.field(default=0.0, validator=_rate)
    reorderHold: float = attrs.field(default=0.05, validator=_seconds)


def _defaultClock() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


@attrs.define
class _Held:
    """A copy held back for reordering, and the timer that lets it go."""

    data: bytes
    destination: Endpoint
    timer: IDelayedCall


class ChaosProxy(DatagramProtocol):
    """
    Relays datagrams that arrive on its port to C{forward} (direction
    L{FORWARD}), and datagrams from C{forward} back to the client that sent
    last (direction L{BACK}), impairing each direction as told.

    @ivar counters: per direction C{d} (C{forward}, C{back}):
        C{d.received}, C{d.dropped}, C{d.duplicated}, C{d.reordered} (held
        back and overtaken), C{d.held_expired} (held back, nothing came),
        C{d.sent}, C{d.send_errors}, C{d.discarded} (still in the proxy
        when it stopped); and C{back.no_client} (a datagram from the
        forward address before any client sent).
    """

    log = Logger()

    def __init__(
        self,
        forward: Endpoint,
        toForward: Impairment = Impairment(),
        back: Impairment | None = None,
        *,
        clock: IReactorTime | None = None,
        rng: random.Random | None = None,
        seed: int = 0,
    ) -> None:
        """
        @param forward: where datagrams go (a 127.0.0.0/8 address).
        @param toForward: the impairment toward C{forward}.
        @param back: the impairment back to the client (default: the same).
        @param clock: what delays are scheduled on (default: the reactor).
        @param rng: the random source (default: C{random.Random(seed)}).
        @raise NotLoopback: C{forward} is not a loopback address.
        """
        self.forward = (checkLoopback(forward[0]), forward[1])
        self.impairments = {FORWARD: toForward, BACK: toForward if back is None else back}
        self.clock = _defaultClock() if clock is None else clock
        self.random = random.Random(seed) if rng is None else rng
        self.counters: Counter[str] = Counter()
        self.client: Endpoint | None = None
        self._held: dict[str, _Held] = {}
        self._scheduled: dict[IDelayedCall, str] = {}

    @property
    def inFlight(self) -> int:
        """How many copies the proxy holds (delayed or held back)."""
        return len(self._scheduled) + len(self._held)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        source = (addr[0], int(addr[1]))
        if source == self.forward:
            direction = BACK
            destination = self.client
            if destination is None:
                self.counters["back.received"] += 1
                self.counters["back.no_client"] += 1
                return
        else:
            direction = FORWARD
            destination = self.forward
            self.client = source
        self.relay(direction, datagram, destination)

    def relay(self, direction: str, datagram: bytes, destination: Endpoint) -> None:
        """Put one datagram through C{direction}'s impairment to C{destination}."""
        impairment = self.impairments[direction]
        counters = self.counters
        counters[f"{direction}.received"] += 1
        draw = self.random.random
        if impairment.loss and draw() < impairment.loss:
            counters[f"{direction}.dropped"] += 1
            return
        copies = 1
        if impairment.duplicate and draw() < impairment.duplicate:
            counters[f"{direction}.duplicated"] += 1
            copies = 2
        for _ in range(copies):
            wait = impairment.delay
            if impairment.jitter:
                wait += draw() * impairment.jitter
            if wait > 0:
                self._later(direction, wait, datagram, destination)
            else:
                self._depart(direction, datagram, destination)

    def _later(
        self, direction: str, seconds: float, datagram: bytes, destination: Endpoint
    ) -> None:
        """Let a copy leave (L{_depart}) in C{seconds}."""
        call: IDelayedCall

        def due() -> None:
            del self._scheduled[call]
            self._depart(direction, datagram, destination)

        call = self.clock.callLater(seconds, due)
        self._scheduled[call] = direction

    def _depart(self, direction: str, datagram: bytes, destination: Endpoint) -> None:
        """A copy is due to leave: hold it back, or send it (and any held one after it)."""
        held = self._held.pop(direction, None)
        if held is not None:
            held.timer.cancel()
            self._write(direction, datagram, destination)
            self.counters[f"{direction}.reordered"] += 1
            self._write(direction, held.data, held.destination)
            return
        impairment = self.impairments[direction]
        if impairment.reorder and self.random.random() < impairment.reorder:
            timer = self.clock.callLater(impairment.reorderHold, self._holdExpired, direction)
            self._held[direction] = _Held(datagram, destination, timer)
            return
        self._write(direction, datagram, destination)

    def _holdExpired(self, direction: str) -> None:
        held = self._held.pop(direction, None)
        if held is not None:
            self.counters[f"{direction}.held_expired"] += 1
            self._write(direction, held.data, held.destination)

    def _write(self, direction: str, datagram: bytes, destination: Endpoint) -> None:
        transport = self.transport
        if transport is None:
            self.counters[f"{direction}.discarded"] += 1
            return
        try:
            transport.write(datagram, destination)  # type: ignore[call-arg]
        except Exception as e:
            self.counters[f"{direction}.send_errors"] += 1
            self.log.debug(
                "chaos proxy could not send to {destination}: {error}",
                destination=destination,
                error=e,
            )
            return
        self.counters[f"{direction}.sent"] += 1

    def discardInFlight(self) -> None:
        """Cancel every delayed or held copy (counted C{discarded})."""
        for direction, held in self._held.items():
            self.counters[f"{direction}.discarded"] += 1
            held.timer.cancel()
        self._held.clear()
        for call, direction in self._scheduled.items():
            self.counters[f"{direction}.discarded"] += 1
            call.cancel()
        self._scheduled.clear()

    def stopProtocol(self) -> None:
        """The port closed: nothing more can leave."""
        self.discardInFlight()

    def summary(self) -> dict[str, int]:
        """The counters as a sorted plain dict, with C{in_flight}."""
        return dict(sorted(self.counters.items())) | {"in_flight": self.inFlight}


def listenProxy(
    proxy: ChaosProxy, listen: Endpoint, reactor: IReactorUDP | None = None
) -> IListeningPort:
    """
    Start C{proxy} on UDP C{listen} (a 127.0.0.0/8 address).

    @raise NotLoopback: C{listen} is not a loopback address.
    """
    host = checkLoopback(listen[0])
    udp = cast(IReactorUDP, _defaultClock()) if reactor is None else reactor
    return udp.listenUDP(listen[1], proxy, interface=host, maxPacketSize=MAX_DATAGRAM)


# ---------------------------------------------------------------------------
# dmq-bus nodes behind a proxy


class _ListeningElsewhere:
    """
    A reactor that is C{reactor} in every respect except one: asked to
    listen (UDP or TCP) on port C{advertised}, it listens on C{actual}.
    Lets an unchanged L{DMQService} advertise a proxy's address.
    """

    def __init__(self, reactor: Any, advertised: int, actual: int) -> None:
        self._reactor = reactor
        self._ports = {advertised: actual}
        self.callLater = reactor.callLater
        self.seconds = reactor.seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenUDP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        return self._reactor.listenUDP(self._ports.get(port, port), *args, **kwargs)

    def listenTCP(self, port: int, *args: Any, **kwargs: Any) -> Any:
        return self._reactor.listenTCP(self._ports.get(port, port), *args, **kwargs)


@attrs.define
class ProxiedNode:
    """A dmq-bus node and the chaos proxy in front of it, in one process."""

    service: DMQService
    proxy: ChaosProxy
    port: IListeningPort

    def stop(self) -> Deferred[None]:
        """Stop the node (it announces its leave through the proxy), then the proxy."""

        def closeProxy(_: object) -> Deferred[None] | None:
            return self.port.stopListening()

        d = cast("Deferred[object]", self.service.stopService())
        return d.addCallback(closeProxy).addCallback(lambda _: None)


def startBehindProxy(
    config: NodeConfig,
    internalPort: int,
    impairment: Impairment,
    *,
    peers: Sequence[IDMQPeer] = (),
    seed: int = 0,
    reactor: Any = None,
) -> ProxiedNode:
    """
    Start a proxy on the server address of C{config} (a 127.0.0.0/8 UDP
    address: the node's identity) that forwards, impaired, to
    C{internalPort} on the same host, then a L{DMQService} with C{peers}
    that advertises the server address and listens on C{internalPort}.
    Every datagram sent to the node passes the proxy; see the module
    docstring for why that is every datagram of its exchanges.

    @raise NotLoopback: the server address is not in 127.0.0.0/8.
    """
    if reactor is None:
        reactor = _defaultClock()
    server = config.bus.serverAddress
    if server.transport != "udp":
        raise ValueError(f"the chaos proxy relays UDP only, not {server}")
    host = checkLoopback(server.host)
    advertised = server.defaultedPort
    proxy = ChaosProxy((host, internalPort), impairment, clock=reactor, seed=seed)
    port = listenProxy(proxy, (host, advertised), reactor)
    service = DMQService(config, _ListeningElsewhere(reactor, advertised, internalPort))
    for peer in peers:
        service.bus.registerPeer(peer)
    try:
        service.startService()
    except BaseException:
        port.stopListening()
        raise
    return ProxiedNode(service, proxy, port)


# ---------------------------------------------------------------------------
# python -m dmq_bus.chaos


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], not {text}")
    return value


def _nonNegative(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _endpoint(text: str) -> Endpoint:
    try:
        return parseEndpoint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def argumentParser() -> argparse.ArgumentParser:
    """The command line of C{python -m dmq_bus.chaos}."""
    parser = argparse.ArgumentParser(
        prog="python -m dmq_bus.chaos",
        description=(
            "A UDP proxy on loopback that drops, duplicates, delays and reorders "
            "datagrams between --listen and --forward, in both directions. "
            "Only 127.0.0.0/8 addresses are accepted."
        ),
    )
    parser.add_argument("--listen", type=_endpoint, required=True, metavar="127.0.0.1:PORT")
    parser.add_argument("--forward", type=_endpoint, required=True, metavar="127.0.0.1:PORT")
    parser.add_argument("--loss", type=_probability, default=0.0, help="drop probability")
    parser.add_argument(
        "--duplicate", type=_probability, default=0.0, help="probability of a second copy"
    )
    parser.add_argument("--delay", type=_nonNegative, default=0.0, help="fixed delay, seconds")
    parser.add_argument(
        "--jitter", type=_nonNegative, default=0.0, help="extra uniform delay, seconds"
    )
    parser.add_argument(
        "--reorder",
        type=_probability,
        default=0.0,
        help="probability a datagram is overtaken by the next one",
    )
    parser.add_argument(
        "--reorder-hold",
        type=_nonNegative,
        default=0.05,
        help="longest wait for the overtaking datagram, seconds",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are repeatable)")
    parser.add_argument(
        "--report-interval",
        type=_nonNegative,
        default=0.0,
        help="print the counters every N seconds (0: only when stopping)",
    )
    parser.add_argument(
        "--duration", type=_nonNegative, default=0.0, help="stop after N seconds (0: never)"
    )
    return parser


def impairmentOf(args: argparse.Namespace) -> Impairment:
    """The L{Impairment} the parsed command line asks for."""
    return Impairment(
        loss=args.loss,
        duplicate=args.duplicate,
        delay=args.delay,
        jitter=args.jitter,
        reorder=args.reorder,
        reorderHold=args.reorder_hold,
    )


def main(
    argv: Sequence[str] | None = None, reactor: Any = None, out: IO[str] | None = None
) -> None:
    """Run the proxy until interrupted (or C{--duration}), printing its counters."""
    args = argumentParser().parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor
    stream = sys.stdout if out is None else out
    proxy = ChaosProxy(args.forward, impairmentOf(args), clock=reactor, seed=args.seed)
    listenProxy(proxy, args.listen, reactor)

    def report(final: bool = False) -> None:
        line = {"final": final, **proxy.summary()}
        stream.write(json.dumps(line) + "\n")
        stream.flush()

    stream.write(
        f"chaos proxy {args.listen[0]}:{args.listen[1]} -> {args.forward[0]}:{args.forward[1]}"
        f" {impairmentOf(args)} seed={args.seed}\n"
    )
    stream.flush()
    if args.report_interval:
        from twisted.internet.task import LoopingCall

        loop = LoopingCall(report)
        loop.clock = reactor
        loop.start(args.report_interval, now=False)
    if args.duration:
        reactor.callLater(args.duration, reactor.stop)
    reactor.addSystemEventTrigger("before", "shutdown", report, True)
    reactor.run()


if __name__ == "__main__":
    main()
